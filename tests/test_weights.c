/* Deploying from files (issue 17): weights-only files, the model built
   from a file's own description, inference-only pipelines loading them.
   - save_weights writes format version 2: PARAMS only (4·P bytes per
     layer), step 0; it parses as weights_only and has no moments.
   - mpar_model_from_checkpoint rebuilds the model (built-in types; a user
     type only when passed in, else UNSUPPORTED naming it).
   - An inference-only pipeline with another seed, optimizer and split,
     from that model, loads the weights and infers bit for bit as the
     pipeline that wrote them; so does load_checkpoint of a full checkpoint.
   - A training pipeline with another seed and optimizer loads the
     weights: parameters equal, moments zero, step kept; load_checkpoint of
     a weights file into it is MISMATCH naming load_weights.
   - A corrupt file or another model's changes nothing.
     make tests/test_weights && MPAR_CACHE_DIR=$PWD/build/cache tests/test_weights */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <unistd.h>
#include <cmocka.h>
#include "fixture.h"

const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

enum { IN = 5, HID = 7, CLASSES = 4, N = 12 };
static float g_x[N * IN];
static int32_t g_y[N];
static char g_dir[64], g_weights[128], g_ckpt[128];

/* 5 -> linear 7 -> tanh -> dropout 0.1 -> layernorm -> linear 4 -> cross-entropy */
static mpar_model* make_model(uint64_t seed, int extra) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    memset(&md, 0, sizeof md);
    md.input_features = IN, md.seed = seed;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, HID + extra, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_tanh(), NULL), MPAR_SUCCESS);
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_dropout(), ld.rate = 0.1f;
    assert_int_equal(mpar_model_add(m, &ld, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_layernorm(), NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, CLASSES, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    return m;
}

static mpar_pipeline* make_pipeline(const mpar_model* m, int stages, mpar_optimizer_kind opt, int inference_only) {
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd;
    fx_stages(st, stages, mpar_model_layer_count(m)); /* 6 layers: 0-5, or 0-2 and 3-5 */
    pd = fx_pipeline_desc(st, stages, MPAR_SCHEDULE_1F1B, 2, N);
    pd.optimizer.kind = opt, pd.optimizer.lr = 0.02f, pd.inference_only = inference_only;
    return fx_pipeline(fx_ctx, m, &pd);
}

static void outputs(mpar_pipeline* p, float* y, double* loss) {
    mpar_batch b;
    memset(&b, 0, sizeof b);
    b.inputs = g_x, b.targets = g_y, b.samples = N;
    if (mpar_pipeline_infer(p, &b, y, loss) != MPAR_SUCCESS) fail_msg("infer: %s", mpar_last_error(fx_ctx));
}

static void train(mpar_pipeline* p, int steps) {
    mpar_batch b;
    int s;
    memset(&b, 0, sizeof b);
    b.inputs = g_x, b.targets = g_y, b.samples = N;
    for (s = 0; s < steps; s++)
        if (mpar_pipeline_train_step(p, &b, NULL) != MPAR_SUCCESS) fail_msg("train: %s", mpar_last_error(fx_ctx));
}

static unsigned char* slurp(const char* path, size_t* size) {
    FILE* f = fopen(path, "rb");
    unsigned char* d;
    long n;
    assert_non_null(f);
    fseek(f, 0, SEEK_END), n = ftell(f), fseek(f, 0, SEEK_SET);
    d = (unsigned char*)malloc((size_t)n);
    assert_int_equal(fread(d, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *size = (size_t)n;
    return d;
}

static void params_equal(mpar_pipeline* a, mpar_pipeline* b, const mpar_model* m, int want_equal) {
    int first = fx_same_params(a, b, m);
    if ((first < 0) != want_equal)
        fail_msg("parameters %s (layer %d)", want_equal ? "differ" : "are equal", first);
}

/* The file itself: version 2, no moments, step 0, 4·P bytes a layer. */
static void test_weights_file(void** state) {
    mpar_model* m = make_model(1, 0);
    mpar_pipeline* p = make_pipeline(m, 2, MPAR_OPTIMIZER_ADAMW, 0);
    mpar_checkpoint_info wi, ci;
    unsigned char *w, *c;
    size_t ws, cs;
    float f[64];
    (void)state;
    train(p, 3);
    assert_int_equal(mpar_pipeline_save_weights(p, g_weights, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_save_checkpoint(p, g_ckpt, NULL), MPAR_SUCCESS);
    w = slurp(g_weights, &ws), c = slurp(g_ckpt, &cs);
    assert_int_equal(mpar_checkpoint_parse(w, ws, &wi, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_checkpoint_parse(c, cs, &ci, NULL), MPAR_SUCCESS);
    assert_int_equal(wi.format_version, MPAR_WEIGHTS_FORMAT_VERSION);
    assert_int_equal(ci.format_version, MPAR_CHECKPOINT_FORMAT_VERSION);
    assert_true(wi.weights_only && !ci.weights_only);
    assert_int_equal(wi.step, 0);
    assert_int_equal(ci.step, 3);
    /* the same table, a third of the data */
    assert_int_equal(cs - ws, 8 * mpar_model_param_count(m));
    assert_int_equal(mpar_checkpoint_get_state(w, ws, &wi, 0, MPAR_STATE_MOMENT1, f, NULL),
                     MPAR_ERROR_INVALID_ARGUMENT);
    {
        float a[IN * HID + HID], b[IN * HID + HID];
        assert_int_equal(mpar_checkpoint_get_state(w, ws, &wi, 0, MPAR_STATE_PARAMS, a, NULL), MPAR_SUCCESS);
        assert_int_equal(mpar_checkpoint_get_state(c, cs, &ci, 0, MPAR_STATE_PARAMS, b, NULL), MPAR_SUCCESS);
        assert_memory_equal(a, b, sizeof a);
    }
    mpar_checkpoint_info_free(&wi), mpar_checkpoint_info_free(&ci);
    free(w), free(c);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

/* Deploy: the model from the file, an inference-only pipeline with another
   split and optimizer, bit-for-bit outputs; from a full checkpoint too. */
static void test_deploy(void** state) {
    mpar_model* m = make_model(1, 0);
    mpar_pipeline* p = make_pipeline(m, 2, MPAR_OPTIMIZER_ADAMW, 0);
    mpar_model* d = NULL;
    mpar_pipeline* q;
    float y1[N * CLASSES], y2[N * CLASSES];
    double l1 = 0, l2 = 0;
    int k;
    (void)state;
    train(p, 3);
    assert_int_equal(mpar_pipeline_save_weights(p, g_weights, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_save_checkpoint(p, g_ckpt, NULL), MPAR_SUCCESS);
    outputs(p, y1, &l1);
    for (k = 0; k < 2; k++) {
        const char* path = k ? g_ckpt : g_weights;
        assert_int_equal(mpar_model_from_checkpoint(path, NULL, 0, &d, NULL), MPAR_SUCCESS);
        assert_int_equal(mpar_model_layer_count(d), mpar_model_layer_count(m));
        assert_int_equal(mpar_model_get_desc(d)->seed, 1);
        q = make_pipeline(d, 1, MPAR_OPTIMIZER_SGD, 1);
        if (k) assert_int_equal(mpar_pipeline_load_checkpoint(q, path, NULL), MPAR_SUCCESS);
        else assert_int_equal(mpar_pipeline_load_weights(q, path, NULL), MPAR_SUCCESS);
        outputs(q, y2, &l2);
        assert_memory_equal(y1, y2, sizeof y1);
        assert_true(l1 == l2);
        mpar_pipeline_destroy(q);
        mpar_model_destroy(d);
    }
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

/* Into a pipeline that trains, with another seed and optimizer. */
static void test_load_into_training(void** state) {
    mpar_model* m = make_model(1, 0);
    mpar_model* other_seed = make_model(99, 0);
    mpar_pipeline* p = make_pipeline(m, 2, MPAR_OPTIMIZER_ADAMW, 0);
    mpar_pipeline* q = make_pipeline(other_seed, 1, MPAR_OPTIMIZER_ADAMW, 0);
    mpar_pipeline* sgd = make_pipeline(other_seed, 2, MPAR_OPTIMIZER_SGD, 0);
    mpar_error err;
    float mom[IN * HID + HID];
    size_t i;
    (void)state;
    train(p, 3);
    train(q, 2);
    assert_int_equal(mpar_pipeline_save_weights(p, g_weights, NULL), MPAR_SUCCESS);
    params_equal(p, q, m, 0);
    /* a weights file cannot resume training */
    assert_int_equal(mpar_pipeline_load_checkpoint(q, g_weights, &err), MPAR_ERROR_MISMATCH);
    assert_non_null(strstr(err.message, "mpar_pipeline_load_weights"));
    params_equal(p, q, m, 0);
    assert_int_equal(mpar_pipeline_load_weights(q, g_weights, &err), MPAR_SUCCESS);
    params_equal(p, q, m, 1);
    assert_int_equal(mpar_pipeline_get_step(q), 2); /* kept */
    assert_int_equal(mpar_pipeline_read_state(q, 0, MPAR_STATE_MOMENT1, mom), MPAR_SUCCESS);
    for (i = 0; i < sizeof mom / sizeof mom[0]; i++) assert_true(mom[i] == 0.0f);
    assert_int_equal(mpar_pipeline_read_state(q, 0, MPAR_STATE_MOMENT2, mom), MPAR_SUCCESS);
    for (i = 0; i < sizeof mom / sizeof mom[0]; i++) assert_true(mom[i] == 0.0f);
    train(q, 1); /* and it trains on */
    /* another optimizer takes them too; so do a full checkpoint's */
    assert_int_equal(mpar_pipeline_load_weights(sgd, g_weights, NULL), MPAR_SUCCESS);
    params_equal(p, sgd, m, 1);
    train(p, 1);
    assert_int_equal(mpar_pipeline_save_checkpoint(p, g_ckpt, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_load_weights(sgd, g_ckpt, NULL), MPAR_SUCCESS);
    params_equal(p, sgd, m, 1);
    /* load_checkpoint into a training pipeline still needs the same seed and optimizer */
    assert_int_equal(mpar_pipeline_load_checkpoint(sgd, g_ckpt, &err), MPAR_ERROR_MISMATCH);
    mpar_pipeline_destroy(sgd);
    mpar_pipeline_destroy(q);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(other_seed);
    mpar_model_destroy(m);
}

/* Bad files change nothing. */
static void test_bad_files(void** state) {
    mpar_model* m = make_model(1, 0);
    mpar_model* wider = make_model(1, 1);
    mpar_pipeline* p = make_pipeline(m, 1, MPAR_OPTIMIZER_ADAMW, 0);
    mpar_pipeline* q = make_pipeline(wider, 1, MPAR_OPTIMIZER_ADAMW, 0);
    mpar_pipeline* keep = make_pipeline(m, 1, MPAR_OPTIMIZER_ADAMW, 0);
    mpar_model* d = NULL;
    mpar_error err;
    unsigned char* w;
    size_t ws;
    FILE* f;
    (void)state;
    train(p, 2);
    assert_int_equal(mpar_pipeline_save_weights(q, g_weights, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_load_weights(p, g_weights, &err), MPAR_ERROR_MISMATCH);
    assert_non_null(strstr(err.message, "layer 0 differs"));
    assert_int_equal(mpar_pipeline_save_weights(p, g_weights, NULL), MPAR_SUCCESS);
    w = slurp(g_weights, &ws);
    w[ws / 2] ^= 0x10;
    f = fopen(g_weights, "wb");
    fwrite(w, 1, ws, f);
    fclose(f);
    train(keep, 1);
    assert_int_equal(mpar_pipeline_load_weights(keep, g_weights, &err), MPAR_ERROR_CORRUPT);
    assert_int_equal(mpar_model_from_checkpoint(g_weights, NULL, 0, &d, &err), MPAR_ERROR_CORRUPT);
    assert_null(d);
    assert_non_null(strstr(err.message, g_weights));
    params_equal(p, keep, m, 0);
    assert_int_equal(mpar_model_from_checkpoint("/nonexistent/w.bin", NULL, 0, &d, &err), MPAR_ERROR_IO);
    assert_int_equal(mpar_model_from_checkpoint(g_weights, NULL, -1, &d, &err), MPAR_ERROR_INVALID_ARGUMENT);
    free(w);
    mpar_pipeline_destroy(keep);
    mpar_pipeline_destroy(q);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(wider);
    mpar_model_destroy(m);
}

/* A user-defined type: unknown unless passed in. */
static mpar_result twice_setup(mpar_layer* l, mpar_error* err) {
    (void)err;
    l->out_features = l->in_features;
    return MPAR_SUCCESS;
}
static mpar_result twice_fwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    size_t n = (size_t)io->rows * (size_t)l->in_features;
    return mpar_exec_launch(ex, "elementwise.cl", "mpar_copy", n, 0, "BBl", io->x, io->y, n);
}
static mpar_result twice_bwd(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    size_t n = (size_t)io->rows * (size_t)l->in_features;
    if (!io->need_dx) return MPAR_SUCCESS;
    return mpar_exec_launch(ex, "elementwise.cl", "mpar_copy", n, 0, "BBl", io->dy, io->dx, n);
}
static const mpar_layer_type copy_type = {"my_copy", 0, twice_setup, NULL, twice_fwd, twice_bwd, NULL};

static void test_user_type(void** state) {
    mpar_model* m = NULL;
    mpar_model* d = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    mpar_pipeline* p;
    mpar_error err;
    const mpar_layer_type* types[1];
    (void)state;
    memset(&md, 0, sizeof md);
    md.input_features = IN, md.seed = 4;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, HID, NULL), MPAR_SUCCESS);
    memset(&ld, 0, sizeof ld);
    ld.type = &copy_type;
    assert_int_equal(mpar_model_add(m, &ld, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, CLASSES, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    p = make_pipeline(m, 1, MPAR_OPTIMIZER_ADAMW, 0);
    assert_int_equal(mpar_pipeline_save_weights(p, g_weights, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_from_checkpoint(g_weights, NULL, 0, &d, &err), MPAR_ERROR_UNSUPPORTED);
    assert_non_null(strstr(err.message, "\"my_copy\""));
    types[0] = &copy_type;
    assert_int_equal(mpar_model_from_checkpoint(g_weights, types, 1, &d, &err), MPAR_SUCCESS);
    assert_ptr_equal(mpar_model_layer(d, 1)->type, &copy_type);
    mpar_model_destroy(d);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

static int group_setup(void** state) {
    if (fx_group_setup(state) != 0) return -1;
    fx_data(g_x, g_y, N, IN, CLASSES, 5);
    snprintf(g_dir, sizeof g_dir, "build/test_weights.XXXXXX");
    if (!mkdtemp(g_dir)) return -1;
    snprintf(g_weights, sizeof g_weights, "%s/model.weights", g_dir);
    snprintf(g_ckpt, sizeof g_ckpt, "%s/model.ckpt", g_dir);
    return 0;
}

static int group_teardown(void** state) {
    (void)state;
    unlink(g_weights), unlink(g_ckpt), rmdir(g_dir);
    return fx_group_teardown(state);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_weights_file),   cmocka_unit_test(test_deploy), cmocka_unit_test(test_load_into_training),
        cmocka_unit_test(test_bad_files),      cmocka_unit_test(test_user_type),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
