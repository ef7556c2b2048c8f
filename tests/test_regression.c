/* Regression losses (issue 17): mpar_layer_mse and mpar_layer_l1 on float
   targets (mpar_batch.float_targets).
   - Gradients match central finite differences of the batch loss.
   - Two stages under 1F1B train bit for bit as one device (losses and
     parameters, 3 AdamW steps), with uneven micro-batches.
   - The loss is what its definition gives, computed here in double.
   - Bad input gets the documented error: no float targets, a NaN target.
   - A model whose loss takes int32 classes ignores float_targets, and one
     whose loss takes floats ignores targets.
     make tests/test_regression && MPAR_CACHE_DIR=$PWD/build/cache tests/test_regression */
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

enum { IN = 4, HID = 6, OUT = 3, N = 10 };
static float g_x[N * IN], g_t[N * OUT];

/* IN -> linear HID -> tanh -> linear OUT -> loss */
static mpar_model* make_model(const mpar_layer_type* loss) {
    static const int widths[] = {IN, HID, OUT};
    return fx_mlp_loss(widths, 3, mpar_layer_tanh(), loss, 21);
}

static mpar_schedule_kind g_kind = MPAR_SCHEDULE_1F1B;

static mpar_pipeline* make_pipeline(mpar_model* m, int stages, int microbatches) {
    mpar_stage_desc st[2];
    mpar_pipeline_desc pd;
    fx_stages(st, stages, 4); /* 0-3, or 0-1 and 2-3 */
    pd = fx_pipeline_desc(st, stages, g_kind, microbatches, N);
    pd.optimizer.kind = MPAR_OPTIMIZER_ADAMW, pd.optimizer.lr = 0.01f;
    return fx_pipeline(fx_ctx, m, &pd);
}

static mpar_batch batch(void) {
    mpar_batch b;
    memset(&b, 0, sizeof b);
    b.inputs = g_x, b.samples = N, b.float_targets = g_t;
    return b;
}

static double loss_of(mpar_pipeline* p) {
    mpar_batch b = batch();
    double loss = 0;
    assert_int_equal(mpar_pipeline_infer(p, &b, NULL, &loss), MPAR_SUCCESS);
    return loss;
}

static void grad_check(const mpar_layer_type* loss_type) {
    mpar_model* m = make_model(loss_type);
    mpar_pipeline* p = make_pipeline(m, 2, 2);
    mpar_batch b = batch();
    int layers[2] = {0, 2}, li, worst_i = -1;
    double worst = 0;
    assert_int_equal(mpar_pipeline_compute_gradients(p, &b, NULL), MPAR_SUCCESS);
    for (li = 0; li < 2; li++) {
        int l = layers[li];
        size_t n = mpar_model_layer(m, l)->param_count, i;
        float* w = (float*)malloc(n * sizeof(float));
        float* g = (float*)malloc(n * sizeof(float));
        assert_int_equal(mpar_pipeline_get_params(p, l, w), MPAR_SUCCESS);
        assert_int_equal(mpar_pipeline_get_grads(p, l, g), MPAR_SUCCESS);
        for (i = 0; i < n; i++) {
            const float h = 1e-2f;
            float keep = w[i];
            double up, down, fd, err;
            w[i] = keep + h;
            assert_int_equal(mpar_pipeline_set_params(p, l, w), MPAR_SUCCESS);
            up = loss_of(p);
            w[i] = keep - h;
            assert_int_equal(mpar_pipeline_set_params(p, l, w), MPAR_SUCCESS);
            down = loss_of(p);
            w[i] = keep;
            assert_int_equal(mpar_pipeline_set_params(p, l, w), MPAR_SUCCESS);
            fd = (up - down) / (2.0 * (double)h);
            err = fabs(fd - (double)g[i]) / (fabs(fd) + fabs((double)g[i]) + 1e-3);
            if (err > worst) worst = err, worst_i = (int)i;
        }
        free(w), free(g);
    }
    if (worst > 2e-2) fail_msg("%s: gradient differs from finite differences by %g (relative) at parameter %d",
                               loss_type->name, worst, worst_i);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

static void test_grad_mse(void** state) {
    (void)state;
    grad_check(mpar_layer_mse());
}

static void test_grad_l1(void** state) {
    (void)state;
    grad_check(mpar_layer_l1());
}

/* The loss as defined: mean over rows of the mean over a row's values of
   (y - t)^2 (or |y - t|), y being the outputs inference returns. */
static void test_loss_definition(void** state) {
    int k;
    (void)state;
    for (k = 0; k < 2; k++) {
        mpar_model* m = make_model(k ? mpar_layer_l1() : mpar_layer_mse());
        mpar_pipeline* p = make_pipeline(m, 1, 2);
        mpar_batch b = batch();
        float y[N * OUT];
        double loss = 0, want = 0;
        int i, c;
        assert_int_equal(mpar_pipeline_infer(p, &b, y, &loss), MPAR_SUCCESS);
        for (i = 0; i < N; i++) {
            double row = 0;
            for (c = 0; c < OUT; c++) {
                double d = (double)y[i * OUT + c] - (double)g_t[i * OUT + c];
                row += k ? fabs(d) : d * d;
            }
            want += row / OUT;
        }
        want /= N;
        if (fabs(loss - want) > 1e-5 * (fabs(want) + 1e-3))
            fail_msg("%s: loss %.9g, definition gives %.9g", k ? "l1" : "mse", loss, want);
        mpar_pipeline_destroy(p);
        mpar_model_destroy(m);
    }
}

/* Two stages train as one device, bit for bit: 3 micro-batches of 4, 3
   and 3 samples, under 1F1B, and under GPipe (whose last stage holds
   every micro-batch's targets at once: one slot each). */
static void test_pipeline_equals_one_device(void** state) {
    int k;
    (void)state;
    for (k = 0; k < 4; k++) {
        mpar_model* m = make_model(k % 2 ? mpar_layer_l1() : mpar_layer_mse());
        mpar_pipeline *one, *two;
        g_kind = MPAR_SCHEDULE_1F1B;
        one = make_pipeline(m, 1, 3);
        g_kind = k < 2 ? MPAR_SCHEDULE_1F1B : MPAR_SCHEDULE_GPIPE;
        two = make_pipeline(m, 2, 3);
        g_kind = MPAR_SCHEDULE_1F1B;
        int s, l;
        for (s = 0; s < 3; s++) {
            mpar_batch b = batch();
            mpar_step_info a, c;
            assert_int_equal(mpar_pipeline_train_step(one, &b, &a), MPAR_SUCCESS);
            assert_int_equal(mpar_pipeline_train_step(two, &b, &c), MPAR_SUCCESS);
            if (memcmp(&a.loss, &c.loss, sizeof a.loss) != 0)
                fail_msg("%s step %d: loss %.9g (one device) vs %.9g (two stages)", mpar_model_layer(m, 3)->type->name,
                         s, a.loss, c.loss);
            assert_int_equal(a.counted_rows, N);
            assert_true(a.loss > 0);
        }
        if ((l = fx_same_params(one, two, m)) >= 0) fail_msg("layer %d's parameters differ", l);
        mpar_pipeline_destroy(two);
        mpar_pipeline_destroy(one);
        mpar_model_destroy(m);
    }
}

static void test_bad_targets(void** state) {
    mpar_model* m = make_model(mpar_layer_mse());
    mpar_model* xent = make_model(mpar_layer_cross_entropy());
    mpar_pipeline* p = make_pipeline(m, 2, 2);
    mpar_pipeline* q = make_pipeline(xent, 2, 2);
    mpar_batch b = batch();
    float keep;
    int32_t classes[N];
    double loss = -1;
    int i;
    (void)state;
    /* no float targets: the field is named */
    b.float_targets = NULL;
    b.targets = classes; /* int32 classes are not what an mse loss takes */
    for (i = 0; i < N; i++) classes[i] = i % OUT;
    assert_int_equal(mpar_pipeline_train_step(p, &b, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(fx_ctx), "float_targets"));
    /* a NaN target: row and column named */
    b = batch();
    keep = g_t[7 * OUT + 2];
    g_t[7 * OUT + 2] = NAN;
    assert_int_equal(mpar_pipeline_train_step(p, &b, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(fx_ctx), "row 7, column 2 is not finite"));
    g_t[7 * OUT + 2] = INFINITY;
    assert_int_equal(mpar_pipeline_infer(p, &b, NULL, &loss), MPAR_ERROR_INVALID_ARGUMENT);
    g_t[7 * OUT + 2] = keep;
    /* inference without targets: outputs, no loss layer run */
    b.float_targets = NULL;
    {
        float y[N * OUT];
        assert_int_equal(mpar_pipeline_infer(p, &b, y, NULL), MPAR_SUCCESS);
    }
    /* a cross-entropy model reads targets and ignores float_targets */
    b = batch();
    b.targets = classes;
    b.float_targets = (const float*)(uintptr_t)1; /* never read */
    assert_int_equal(mpar_pipeline_train_step(q, &b, NULL), MPAR_SUCCESS);
    /* and an mse model ignores targets */
    b = batch();
    b.targets = (const int32_t*)(uintptr_t)1; /* never read */
    assert_int_equal(mpar_pipeline_train_step(p, &b, NULL), MPAR_SUCCESS);
    mpar_pipeline_destroy(q);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(xent);
    mpar_model_destroy(m);
}

/* The memory model counts the wider target buffer: mpar_pipeline_memory
   grows with the loss layer's width exactly as the allocation does. */
static void test_memory_counts_targets(void** state) {
    mpar_model* m = make_model(mpar_layer_mse());
    mpar_model* x = make_model(mpar_layer_cross_entropy());
    mpar_pipeline_memory_info a, b;
    mpar_stage_desc st[1];
    mpar_pipeline_desc pd;
    (void)state;
    fx_stages(st, 1, 4);
    pd = fx_pipeline_desc(st, 1, MPAR_SCHEDULE_1F1B, 1, N);
    assert_int_equal(mpar_pipeline_memory(fx_ctx, m, &pd, &a), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_memory(fx_ctx, x, &pd, &b), MPAR_SUCCESS);
    /* the same but for the targets: N rows × (OUT - 1) more floats (one slot) */
    assert_int_equal((long long)(a.device_bytes[0] - b.device_bytes[0]), (long long)N * (OUT - 1) * 4);
    mpar_model_destroy(x);
    mpar_model_destroy(m);
}

/* inputs in [-1, 1), then float targets in [-1.5, 1.5), from one stream */
static int group_setup(void** state) {
    uint64_t s = 99;
    fx_uniform(g_x, N * IN, -1.0, 1.0, &s);
    fx_uniform(g_t, N * OUT, -1.5, 1.5, &s);
    return fx_group_setup(state);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grad_mse),
        cmocka_unit_test(test_grad_l1),
        cmocka_unit_test(test_loss_definition),
        cmocka_unit_test(test_pipeline_equals_one_device),
        cmocka_unit_test(test_bad_targets),
        cmocka_unit_test(test_memory_counts_targets),
    };
    return cmocka_run_group_tests(tests, group_setup, fx_group_teardown);
}
