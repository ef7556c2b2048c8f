/* What users reach for (issue 17): a model destroyed before its pipeline,
   descriptor fields that were silently ignored, a device selected twice,
   a loss asked of a batch without targets, the classification helpers.
     make tests/test_users && MPAR_CACHE_DIR=$PWD/build/cache tests/test_users */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include "fixture.h"

const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

static const float g_x[8 * 4] = {0.1f, 0.2f, 0.3f, 0.4f, 1, 2, 3, 4, -1, 0, 1, 0, 2, 2, 2, 2,
                                 0.5f, 0.5f, 0, 0, 3, 1, 4, 1, 5, 9, 2, 6, -3, -1, 0, 1};
static const int32_t g_y[8] = {0, 1, 2, 0, 1, 2, 0, 1};

/* 4 -> linear 8 -> relu -> linear 3 -> cross-entropy */
static mpar_model* make_model(void) {
    static const int widths[] = {4, 8, 3};
    return fx_mlp(widths, 3, mpar_layer_relu(), 7);
}

/* layers 0-1 on device 0, 2-3 on device 1; 1F1B, 2 micro-batches of 8 rows */
static mpar_pipeline_desc two_stage_desc(mpar_stage_desc* st) {
    fx_stages(st, 2, 4);
    return fx_pipeline_desc(st, 2, MPAR_SCHEDULE_1F1B, 2, 8);
}

/* the devices and faults of the environment are not this suite's */
static int group_setup(void** state) {
    unsetenv("MPAR_DEVICES");
    unsetenv("MPAR_FAULT");
    return fx_group_setup(state);
}

/* ==== 1. a model destroyed before its pipelines ==== */

static void test_model_destroyed_first(void** state) {
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd = two_stage_desc(st);
    mpar_pipeline *p = NULL, *q = NULL;
    mpar_model* m = make_model();
    mpar_batch b;
    mpar_step_info info;
    float out[8 * 3], w[8 * 4 + 8];
    double loss = -1.0;
    char dir[64], path[128], cmd[160];
    (void)state;
    assert_int_equal(mpar_pipeline_create(fx_ctx, m, &pd, &p), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_create(fx_ctx, m, &pd, &q), MPAR_SUCCESS); /* two holders */
    mpar_model_destroy(m); /* the caller's reference only */
    b.inputs = g_x, b.targets = g_y, b.samples = 8;
    assert_int_equal(mpar_pipeline_train_step(p, &b, &info), MPAR_SUCCESS);
    assert_true(isfinite(info.loss) && info.loss > 0.0);
    assert_int_equal(mpar_pipeline_infer(p, &b, out, &loss), MPAR_SUCCESS);
    assert_true(isfinite(loss) && loss > 0.0);
    assert_int_equal(mpar_pipeline_get_params(p, 0, w), MPAR_SUCCESS);
    snprintf(dir, sizeof dir, "/tmp/mpar_test_users_XXXXXX");
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/ck.mpar", dir);
    assert_int_equal(mpar_pipeline_save_checkpoint(p, path, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_load_checkpoint(q, path, NULL), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    /* the model lives on in q */
    assert_int_equal(mpar_pipeline_train_step(q, &b, &info), MPAR_SUCCESS);
    assert_true(isfinite(info.loss));
    mpar_pipeline_destroy(q); /* frees the model: ASan sees a leak or a double free here */
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

/* ==== 2. fields that were silently ignored ==== */

static void test_stages_null_with_count(void** state) {
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd = two_stage_desc(st);
    mpar_pipeline* p = (mpar_pipeline*)&p;
    mpar_pipeline_memory_info mem;
    mpar_model* m = make_model();
    (void)state;
    pd.stages = NULL; /* stage_count stays 2 */
    assert_int_equal(mpar_pipeline_create(fx_ctx, m, &pd, &p), MPAR_ERROR_INVALID_ARGUMENT);
    assert_null(p);
    assert_non_null(strstr(mpar_last_error(fx_ctx), "stages is NULL but stage_count is 2"));
    assert_int_equal(mpar_pipeline_memory(fx_ctx, m, &pd, &mem), MPAR_ERROR_INVALID_ARGUMENT);
    pd.stage_count = -1;
    assert_int_equal(mpar_pipeline_create(fx_ctx, m, &pd, &p), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(fx_ctx), "stage_count is -1"));
    pd.stage_count = 0; /* planned by mpar: still fine */
    assert_int_equal(mpar_pipeline_create(fx_ctx, m, &pd, &p), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

/* ==== 4. a loss asked of a batch without targets ==== */

static void test_infer_loss_without_targets(void** state) {
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd = two_stage_desc(st);
    mpar_pipeline* p = NULL;
    mpar_model* m = make_model();
    mpar_batch b;
    float out[8 * 3];
    double loss = 12345.0;
    (void)state;
    assert_int_equal(mpar_pipeline_create(fx_ctx, m, &pd, &p), MPAR_SUCCESS);
    b.inputs = g_x, b.targets = NULL, b.samples = 8;
    assert_int_equal(mpar_pipeline_infer(p, &b, out, &loss), MPAR_ERROR_INVALID_ARGUMENT);
    assert_true(loss == 12345.0); /* untouched: no 0 that reads as a perfect model */
    assert_non_null(strstr(mpar_last_error(fx_ctx), "loss asked for but the batch has no targets"));
    /* without the loss, or with targets, it runs */
    assert_int_equal(mpar_pipeline_infer(p, &b, out, NULL), MPAR_SUCCESS);
    b.targets = g_y;
    assert_int_equal(mpar_pipeline_infer(p, &b, NULL, &loss), MPAR_SUCCESS);
    assert_true(isfinite(loss) && loss > 0.0);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

/* ==== 5. classification helpers ==== */

/* Within 1e-7, and a NaN fails (cmocka's assert_float_equal passes one). */
#define NEAR(a, b) FX_NEAR(a, b, 1e-7)

static void test_softmax(void** state) {
    /* row 0: 1 : 2 : 4; row 1: huge logits (overflow without the shift);
       row 2: -inf is probability 0; row 3: NaN; row 4: +inf */
    const float x[5 * 3] = {0.0f, 0.69314718f, 1.3862944f, 1000.0f, 1000.0f, 999.0f, -INFINITY, 0.0f, 0.0f,
                            1.0f, NAN, 2.0f, INFINITY, 0.0f, 1.0f};
    float y[5 * 3], z[3] = {0.0f, 0.69314718f, 1.3862944f};
    double e = exp(-1.0);
    mpar_error err;
    int c;
    (void)state;
    assert_int_equal(mpar_softmax(x, 5, 3, y, NULL), MPAR_SUCCESS);
    NEAR(y[0], 1.0 / 7.0);
    NEAR(y[1], 2.0 / 7.0);
    NEAR(y[2], 4.0 / 7.0);
    NEAR(y[3], 1.0 / (2.0 + e));
    NEAR(y[4], 1.0 / (2.0 + e));
    NEAR(y[5], e / (2.0 + e));
    assert_true(y[6] == 0.0f && y[7] == 0.5f && y[8] == 0.5f);
    for (c = 9; c < 15; c++) assert_true(isnan(y[c]));
    assert_int_equal(mpar_softmax(z, 1, 3, z, NULL), MPAR_SUCCESS); /* in place */
    NEAR(z[2], 4.0 / 7.0);
    assert_int_equal(mpar_softmax(x, 0, 3, y, NULL), MPAR_SUCCESS); /* nothing to do */
    assert_int_equal(mpar_softmax(NULL, 1, 3, y, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "mpar_softmax"));
    assert_int_equal(mpar_softmax(x, 1, 3, NULL, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_softmax(x, -1, 3, y, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "rows (-1)"));
    assert_int_equal(mpar_softmax(x, 1, 0, y, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "classes (0)"));
}

static void test_argmax_accuracy(void** state) {
    const float x[5 * 3] = {0.1f, 0.7f, 0.2f,  /* 1 */
                            3.0f, 3.0f, 1.0f,  /* tie: the first, 0 */
                            NAN, -5.0f, -6.0f, /* NaN is never the largest: 1 */
                            NAN, NAN, NAN,     /* all NaN: 0 */
                            -1.0f, -2.0f, 9.0f /* 2 */};
    const int32_t want[5] = {1, 0, 1, 0, 2};
    int32_t got[5], labels[5] = {1, 1, -1, 0, 0};
    double acc = -1.0;
    mpar_error err;
    (void)state;
    assert_int_equal(mpar_argmax(x, 5, 3, got, NULL), MPAR_SUCCESS);
    assert_memory_equal(got, want, sizeof want);
    /* rows 0 and 3 right, 1 and 4 wrong, 2 left out (label -1): 2 of 4 */
    assert_int_equal(mpar_accuracy(x, labels, 5, 3, &acc, NULL), MPAR_SUCCESS);
    assert_true(acc == 0.5);
    labels[4] = 2; /* 3 of 4 */
    assert_int_equal(mpar_accuracy(x, labels, 5, 3, &acc, NULL), MPAR_SUCCESS);
    assert_true(acc == 0.75);
    labels[1] = 3; /* not a class */
    acc = -1.0;
    assert_int_equal(mpar_accuracy(x, labels, 5, 3, &acc, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "label 3 of row 1 is not below 3 classes"));
    assert_true(acc == -1.0);
    labels[0] = labels[1] = labels[2] = labels[3] = labels[4] = -1;
    assert_int_equal(mpar_accuracy(x, labels, 5, 3, &acc, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.message, "none of the 5 rows"));
    assert_int_equal(mpar_accuracy(x, NULL, 5, 3, &acc, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_accuracy(x, labels, 5, 3, NULL, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_argmax(NULL, 5, 3, got, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_argmax(x, 5, 0, got, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_argmax(x, -2, 3, got, NULL), MPAR_ERROR_INVALID_ARGUMENT);
}

/* ==== 7. buffers of a known capacity ==== */

static void test_checked_sizes(void** state) {
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd = two_stage_desc(st);
    mpar_pipeline* p = NULL;
    mpar_model* m = make_model();
    mpar_batch b;
    float w[40], w2[40], out[8 * 3 + 1], out2[8 * 3];
    double loss = -1.0, loss2 = -2.0;
    size_t n = 0;
    (void)state;
    assert_int_equal(mpar_pipeline_create(fx_ctx, m, &pd, &p), MPAR_SUCCESS);
    /* the sizes: linear 4 -> 8 has 4 x 8 + 8 parameters, relu none */
    assert_int_equal(mpar_pipeline_param_size(p, 0, &n), MPAR_SUCCESS);
    assert_int_equal(n, 40);
    assert_int_equal(mpar_pipeline_param_size(p, 1, &n), MPAR_SUCCESS);
    assert_int_equal(n, 0);
    assert_int_equal(mpar_pipeline_param_size(p, 4, &n), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(fx_ctx), "layer 4 does not exist (4 layers)"));
    assert_int_equal(mpar_pipeline_param_size(p, 0, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_output_size(p, 8, &n), MPAR_SUCCESS);
    assert_int_equal(n, 8 * 3);
    assert_int_equal(mpar_pipeline_input_size(p, 8, &n), MPAR_SUCCESS);
    assert_int_equal(n, 8 * 4);
    assert_int_equal(mpar_pipeline_output_size(p, -1, &n), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_input_size(p, -1, &n), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_param_size(NULL, 0, &n), MPAR_ERROR_INVALID_ARGUMENT);
    /* get_params_n: one float short is refused before a write; exact is the unchecked call */
    memset(w, 0x7f, sizeof w);
    assert_int_equal(mpar_pipeline_get_params_n(p, 0, w, 39), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(fx_ctx), "layer 0 has 40 parameters but out holds 39 floats"));
    assert_true(w[0] == w[39] && w[0] > 1e30f); /* untouched */
    assert_int_equal(mpar_pipeline_get_params_n(p, 0, w, 40), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_get_params(p, 0, w2), MPAR_SUCCESS);
    assert_memory_equal(w, w2, sizeof w);
    assert_int_equal(mpar_pipeline_get_params_n(p, 1, NULL, 0), MPAR_SUCCESS); /* no parameters */
    assert_int_equal(mpar_pipeline_get_params_n(p, 9, w, 40), MPAR_ERROR_INVALID_ARGUMENT);
    /* infer_n */
    b.inputs = g_x, b.targets = g_y, b.samples = 8;
    out[8 * 3] = 42.0f;
    assert_int_equal(mpar_pipeline_infer_n(p, &b, out, 8 * 3 - 1, &loss), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(fx_ctx), "8 samples give 24 output floats but outputs holds 23"));
    assert_true(loss == -1.0);
    assert_int_equal(mpar_pipeline_infer_n(p, &b, out, 8 * 3 + 1, &loss), MPAR_SUCCESS);
    assert_true(out[8 * 3] == 42.0f); /* nothing past the outputs */
    assert_int_equal(mpar_pipeline_infer(p, &b, out2, &loss2), MPAR_SUCCESS);
    assert_memory_equal(out, out2, sizeof out2);
    assert_true(loss == loss2);
    assert_int_equal(mpar_pipeline_infer_n(p, &b, NULL, 0, &loss), MPAR_SUCCESS); /* no outputs: no capacity needed */
    b.samples = 0; /* infer's own check still answers */
    assert_int_equal(mpar_pipeline_infer_n(p, &b, out, 0, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

/* ==== the plan: virtual-stage errors say what to give; the automatic plan is logged ==== */

static char g_log[4096];
static void capture(void* user, mpar_log_level level, const char* message) {
    (void)user, (void)level;
    if (strlen(g_log) + strlen(message) + 2 < sizeof g_log) strcat(g_log, message), strcat(g_log, "\n");
}

static void test_plan_messages(void** state) {
    mpar_model* m = make_model();
    mpar_stage_desc st[3];
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_plan plan;
    mpar_context* ctx = NULL;
    mpar_desc d;
    (void)state;
    /* three chunks for virtual_stages 2 */
    memset(&pd, 0, sizeof pd);
    st[0].device = 0, st[0].first_layer = 0, st[0].last_layer = 0;
    st[1].device = 1, st[1].first_layer = 1, st[1].last_layer = 1;
    st[2].device = 0, st[2].first_layer = 2, st[2].last_layer = 3;
    pd.stages = st, pd.stage_count = 3, pd.schedule = MPAR_SCHEDULE_INTERLEAVED_1F1B, pd.virtual_stages = 2;
    pd.microbatches = 2, pd.max_batch = 8;
    assert_int_equal(mpar_pipeline_create(fx_ctx, m, &pd, &p), MPAR_ERROR_INVALID_PLAN);
    assert_non_null(strstr(mpar_last_error(fx_ctx), "give 2 chunks per device"));
    /* a plan on one device for virtual_stages 2 */
    assert_int_equal(mpar_plan_parse("0:0-3", 5, &plan, NULL), MPAR_SUCCESS);
    pd.stages = NULL, pd.stage_count = 0, pd.plan = &plan;
    assert_int_equal(mpar_pipeline_create(fx_ctx, m, &pd, &p), MPAR_ERROR_INVALID_PLAN);
    assert_non_null(strstr(mpar_last_error(fx_ctx), "interleaving needs 2 or more devices; set virtual_stages to 1"));
    mpar_plan_free(&plan);
    /* the automatic plan says what it chose and why */
    memset(&d, 0, sizeof d);
    d.kernel_path = "kernels", d.log = capture, d.log_level = MPAR_LOG_INFO;
    ctx = fx_context_or_fail(&d, 1);
    memset(&pd, 0, sizeof pd);
    pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = 2, pd.max_batch = 8;
    g_log[0] = '\0';
    assert_int_equal(mpar_pipeline_create(ctx, m, &pd, &p), MPAR_SUCCESS);
    if (!strstr(g_log, "automatic plan ") || !strstr(g_log, "predicted step"))
        fail_msg("the automatic plan was not logged; the log says:\n%s", g_log);
    mpar_pipeline_destroy(p);
    mpar_destroy(ctx);
    mpar_model_destroy(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_model_destroyed_first),
        cmocka_unit_test(test_stages_null_with_count),
        cmocka_unit_test(test_infer_loss_without_targets),
        cmocka_unit_test(test_softmax),
        cmocka_unit_test(test_argmax_accuracy),
        cmocka_unit_test(test_checked_sizes),
        cmocka_unit_test(test_plan_messages),
    };
    return cmocka_run_group_tests(tests, group_setup, fx_group_teardown);
}
