/* Injected faults (mpar_set_fault): buffer allocation, kernel enqueue,
   transfers and program builds failing on the first, a middle and the last
   of three stages. Each ends in a returned error within a bounded time,
   with every worker stopped (the pipeline is destroyed or used again), no
   leak (run under ASan by `make check`), and the parameters unchanged; a
   step that fails half-way through the optimizer refuses to continue until
   a checkpoint is loaded. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <math.h>
#include <unistd.h>
#include <cmocka.h>

const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

enum { IN = 16, CLASSES = 4, BATCH = 12, LAYERS = 9 };
static mpar_context* ctx;
static mpar_model* model;
static float x[BATCH * IN];
static int32_t y[BATCH];
static char dir[64];

static int setup(void** state) {
    mpar_desc d;
    mpar_model_desc md;
    mpar_error err;
    uint64_t s = 11;
    int i;
    (void)state;
    memset(&d, 0, sizeof d);
    d.error = &err;
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS) return -1;
    memset(&md, 0, sizeof md);
    md.input_features = IN, md.seed = 5;
    mpar_model_create(&md, &model, &err);
    for (i = 0; i < 4; i++) {
        mpar_model_add_linear(model, 16, &err);
        mpar_model_add_simple(model, mpar_layer_tanh(), &err);
    }
    mpar_model_add_linear(model, CLASSES, &err);
    if (mpar_model_add_simple(model, mpar_layer_cross_entropy(), &err) != MPAR_SUCCESS) return -1;
    for (i = 0; i < BATCH * IN; i++) x[i] = (float)(2.0 * mpar__rng_uniform(&s) - 1.0);
    for (i = 0; i < BATCH; i++) y[i] = i % CLASSES;
    snprintf(dir, sizeof dir, "/tmp/mpar-faults-XXXXXX");
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void** state) {
    char cmd[128];
    (void)state;
    mpar_model_destroy(model);
    mpar_destroy(ctx);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* Three stages over the two devices: 0, 1, 0. */
static mpar_result make(mpar_pipeline** p) {
    static const mpar_stage_desc st[3] = {{0, 0, 2}, {1, 3, 5}, {0, 6, 9}};
    mpar_pipeline_desc pd;
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = 3, pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = 4, pd.max_batch = BATCH;
    pd.optimizer.kind = MPAR_OPTIMIZER_ADAMW;
    return mpar_pipeline_create(ctx, model, &pd, p);
}

static mpar_result step(mpar_pipeline* p) {
    mpar_batch b;
    mpar_step_info info;
    b.inputs = x, b.targets = y, b.samples = BATCH;
    return mpar_pipeline_train_step(p, &b, &info);
}

/* All parameters, concatenated (malloc'd). */
static float* params(mpar_pipeline* p) {
    float* all = (float*)malloc(sizeof(float) * mpar_model_param_count(model));
    size_t off = 0;
    int l;
    for (l = 0; l < LAYERS + 1; l++) {
        assert_int_equal(mpar_pipeline_get_params(p, l, all + off), MPAR_SUCCESS);
        off += mpar_model_layer(model, l)->param_count;
    }
    return all;
}

static void expect_failure(mpar_result r, mpar_result code, const char* text, double started) {
    if (r != code) fail_msg("got %s, want %s: %s", mpar_result_string(r), mpar_result_string(code), mpar_last_error(ctx));
    if (!strstr(mpar_last_error(ctx), text)) fail_msg("'%s' not in '%s'", text, mpar_last_error(ctx));
    assert_true(mpar__now() - started < 5.0); /* promptly, never a hang */
}

static void test_alloc_faults(void** state) {
    int s;
    (void)state;
    for (s = 0; s < 3; s++) {
        mpar_pipeline* p = (mpar_pipeline*)&s;
        char spec[32];
        double t0 = mpar__now();
        snprintf(spec, sizeof spec, "alloc:%d:*:2", s);
        assert_int_equal(mpar_set_fault(ctx, spec), MPAR_SUCCESS);
        expect_failure(make(&p), (mpar_result)CL_MEM_OBJECT_ALLOCATION_FAILURE, "clCreateBuffer", t0);
        assert_null(p);
        assert_int_equal(make(&p), MPAR_SUCCESS); /* once only: the next one works */
        assert_int_equal(step(p), MPAR_SUCCESS);
        mpar_pipeline_destroy(p);
    }
}

/* enqueue and transfer faults in a step: error, parameters unchanged, the
   pipeline usable again. */
static void step_faults(const char* kind, const char* text) {
    int s;
    for (s = 0; s < 3; s++) {
        mpar_pipeline* p;
        float *before, *after;
        char spec[48];
        double t0;
        assert_int_equal(make(&p), MPAR_SUCCESS);
        assert_int_equal(step(p), MPAR_SUCCESS);
        before = params(p);
        snprintf(spec, sizeof spec, "%s:%d:1", kind, s); /* step counter is 1 during the backward pass */
        assert_int_equal(mpar_set_fault(ctx, spec), MPAR_SUCCESS);
        t0 = mpar__now();
        expect_failure(step(p), (mpar_result)CL_OUT_OF_RESOURCES, text, t0);
        {
            char stage[32];
            snprintf(stage, sizeof stage, "stage %d", s);
            if (!strstr(mpar_last_error(ctx), stage)) fail_msg("'%s' not in '%s'", stage, mpar_last_error(ctx));
        }
        after = params(p);
        assert_memory_equal(before, after, sizeof(float) * mpar_model_param_count(model));
        assert_int_equal(mpar_pipeline_get_step(p), 1);
        assert_int_equal(step(p), MPAR_SUCCESS);
        assert_int_equal(mpar_pipeline_get_step(p), 2);
        free(before), free(after);
        mpar_pipeline_destroy(p);
    }
}

static void test_enqueue_faults(void** state) { (void)state; step_faults("enqueue", "injected"); }
static void test_transfer_faults(void** state) { (void)state; step_faults("transfer", ""); }

static void test_build_faults(void** state) {
    int s;
    mpar_device_info info;
    (void)state;
    memset(&info, 0, sizeof info);
    assert_int_equal(mpar_device_get_info(ctx, 0, &info), MPAR_SUCCESS);
    if (info.host_route) {
        /* The host route builds no program for built-in layers, so a build
           fault has nothing to hit and training goes on. */
        mpar_context_stats before, after;
        mpar_pipeline* p = NULL;
        memset(&before, 0, sizeof before), memset(&after, 0, sizeof after);
        assert_int_equal(mpar_context_get_stats(ctx, &before), MPAR_SUCCESS);
        assert_int_equal(mpar_set_fault(ctx, "build:*:*"), MPAR_SUCCESS);
        assert_int_equal(make(&p), MPAR_SUCCESS);
        assert_int_equal(step(p), MPAR_SUCCESS);
        assert_int_equal(mpar_context_get_stats(ctx, &after), MPAR_SUCCESS);
        assert_int_equal(after.programs_built + after.programs_from_cache,
                         before.programs_built + before.programs_from_cache);
        assert_int_equal(mpar_set_fault(ctx, NULL), MPAR_SUCCESS);
        mpar_pipeline_destroy(p);
        return;
    }
    for (s = 0; s < 3; s++) {
        mpar_pipeline* p = NULL;
        char spec[32];
        double t0 = mpar__now();
        mpar_result r;
        snprintf(spec, sizeof spec, "build:%d:*", s);
        assert_int_equal(mpar_set_fault(ctx, spec), MPAR_SUCCESS);
        r = make(&p);
        if (r == MPAR_SUCCESS) r = step(p); /* the build may come at creation or at the first step */
        expect_failure(r, MPAR_ERROR_KERNEL_BUILD, "injected", t0);
        if (!p) assert_int_equal(make(&p), MPAR_SUCCESS);
        assert_int_equal(step(p), MPAR_SUCCESS);
        mpar_pipeline_destroy(p);
    }
}

#include "stall_layer.h"

/* Stage `where` (of 2) hangs for 1.5 s with a 0.3 s link timeout: its
   neighbour's wait (a receive when stage 0 hangs, a send finding no room
   when stage 1 hangs) times out, the step returns MPAR_ERROR_TIMEOUT once
   the sleeper is back, and the next step works. */
static void stall_case(int where, mpar_link_mode mode) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    mpar_pipeline_desc pd;
    mpar_stage_desc st[2] = {{0, 0, 1}, {1, 2, 4}};
    mpar_pipeline* p = NULL;
    mpar_batch b;
    mpar_step_info info;
    double t0;
    mpar_result r;
    memset(&md, 0, sizeof md);
    md.input_features = IN, md.seed = 3;
    memset(&ld, 0, sizeof ld);
    ld.type = &stall_type;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, 16, NULL), MPAR_SUCCESS);
    if (where == 0) assert_int_equal(mpar_model_add(m, &ld, NULL), MPAR_SUCCESS);
    else assert_int_equal(mpar_model_add_simple(m, mpar_layer_tanh(), NULL), MPAR_SUCCESS);
    if (where == 1) assert_int_equal(mpar_model_add(m, &ld, NULL), MPAR_SUCCESS);
    else assert_int_equal(mpar_model_add_simple(m, mpar_layer_tanh(), NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, CLASSES, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    memset(&pd, 0, sizeof pd);
    pd.stages = st, pd.stage_count = 2, pd.schedule = MPAR_SCHEDULE_GPIPE, pd.microbatches = 6;
    pd.max_batch = BATCH, pd.link_capacity = 1, pd.timeout_seconds = 60, pd.link_mode = mode;
    b.inputs = x, b.targets = y, b.samples = BATCH;
    /* kernels built (the context keeps them) with a timeout that covers a
       cold cache's compiles, then the pipeline under test */
    assert_int_equal(mpar_pipeline_create(ctx, m, &pd, &p), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_train_step(p, &b, &info), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    pd.timeout_seconds = 0.3;
    assert_int_equal(mpar_pipeline_create(ctx, m, &pd, &p), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_train_step(p, &b, &info), MPAR_SUCCESS); /* first runs done */
    stall_seconds = 1.5;
    t0 = mpar__now();
    r = mpar_pipeline_train_step(p, &b, &info);
    stall_seconds = 0;
    if (r != MPAR_ERROR_TIMEOUT)
        fail_msg("stage %d hung: %s (%s)", where, mpar_result_string(r), mpar_last_error(ctx));
    assert_non_null(strstr(mpar_last_error(ctx), where == 0 ? "link receive" : "link send"));
    assert_non_null(strstr(mpar_last_error(ctx), "waited over 0.3 s"));
    assert_non_null(strstr(mpar_last_error(ctx), where == 0 ? "stage 1" : "stage 0"));
    assert_true(mpar__now() - t0 < 1.5 + 2.0);
    assert_int_equal(mpar_pipeline_train_step(p, &b, &info), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

/* Every transport: a hung neighbour ends the step in bounded time. */
static void test_link_timeouts(void** state) {
    mpar_device_info a, b;
    (void)state;
    memset(&a, 0, sizeof a), memset(&b, 0, sizeof b);
    assert_int_equal(mpar_device_get_info(ctx, 0, &a), MPAR_SUCCESS);
    assert_int_equal(mpar_device_get_info(ctx, 1, &b), MPAR_SUCCESS);
    stall_case(0, MPAR_LINK_AUTO);
    stall_case(1, MPAR_LINK_AUTO);
    stall_case(0, MPAR_LINK_ASYNC);
    stall_case(1, MPAR_LINK_ASYNC);
    if (a.group == b.group) { /* a device copy needs one context */
        stall_case(0, MPAR_LINK_DEVICE_COPY);
        stall_case(1, MPAR_LINK_DEVICE_COPY);
    }
}

/* A fault inside the optimizer step leaves stages out of step with each
   other: training refuses to go on until a checkpoint is loaded. */
static void test_fault_in_optimizer_step(void** state) {
    mpar_pipeline* p;
    char path[128];
    float *saved, *now;
    double t0;
    (void)state;
    snprintf(path, sizeof path, "%s/ok.ckpt", dir);
    assert_int_equal(make(&p), MPAR_SUCCESS);
    assert_int_equal(step(p), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_save_checkpoint(p, path, NULL), MPAR_SUCCESS);
    saved = params(p);
    assert_int_equal(mpar_set_fault(ctx, "enqueue:2:2"), MPAR_SUCCESS); /* step counter 2 = the optimizer step */
    t0 = mpar__now();
    expect_failure(step(p), (mpar_result)CL_OUT_OF_RESOURCES, "optimizer step", t0);
    assert_int_equal(step(p), MPAR_ERROR_INVALID_STATE);
    assert_non_null(strstr(mpar_last_error(ctx), "load a checkpoint"));
    /* the guard cannot be bypassed: no inference on mixed parameters, and
       no checkpoint of them (which would load as a valid step) */
    {
        mpar_batch b;
        char other[160];
        mpar_error err;
        b.inputs = x, b.targets = y, b.samples = BATCH;
        assert_int_equal(mpar_pipeline_infer(p, &b, NULL, NULL), MPAR_ERROR_INVALID_STATE);
        snprintf(other, sizeof other, "%s/mixed.ckpt", dir);
        assert_int_equal(mpar_pipeline_save_checkpoint(p, other, &err), MPAR_ERROR_INVALID_STATE);
        assert_non_null(strstr(err.message, "not written"));
        assert_int_equal(access(other, F_OK), -1);
        assert_int_equal(mpar_pipeline_save_checkpoint(p, path, &err), MPAR_ERROR_INVALID_STATE); /* ok.ckpt kept */
    }
    assert_int_equal(mpar_pipeline_load_checkpoint(p, path, NULL), MPAR_SUCCESS);
    now = params(p);
    assert_memory_equal(saved, now, sizeof(float) * mpar_model_param_count(model));
    assert_int_equal(step(p), MPAR_SUCCESS);
    free(saved), free(now);
    mpar_pipeline_destroy(p);
}

/* NaN in the parameters makes the loss and gradients non-finite: the step
   reports it with the stage and layer and changes nothing; with
   skip_nonfinite the step is skipped instead. */
static void test_nonfinite(void** state) {
    mpar_pipeline* p;
    float *w, *before, *after;
    size_t n = mpar_model_layer(model, 4)->param_count;
    int skip;
    (void)state;
    for (skip = 0; skip <= 1; skip++) {
        mpar_stage_desc st[3] = {{0, 0, 2}, {1, 3, 5}, {0, 6, 9}};
        mpar_pipeline_desc pd;
        mpar_batch b;
        mpar_step_info info;
        memset(&pd, 0, sizeof pd);
        pd.stages = st, pd.stage_count = 3, pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = 4;
        pd.max_batch = BATCH, pd.skip_nonfinite = skip;
        assert_int_equal(mpar_pipeline_create(ctx, model, &pd, &p), MPAR_SUCCESS);
        assert_int_equal(step(p), MPAR_SUCCESS);
        w = (float*)malloc(sizeof(float) * n);
        assert_int_equal(mpar_pipeline_get_params(p, 4, w), MPAR_SUCCESS);
        w[3] = (float)NAN; /* layer 4 runs on stage 1 */
        assert_int_equal(mpar_pipeline_set_params(p, 4, w), MPAR_SUCCESS);
        before = params(p);
        b.inputs = x, b.targets = y, b.samples = BATCH;
        memset(&info, 0, sizeof info);
        if (!skip) {
            assert_int_equal(mpar_pipeline_train_step(p, &b, &info), MPAR_ERROR_NUMERICAL);
            if (!strstr(mpar_last_error(ctx), "not finite") || !strstr(mpar_last_error(ctx), "layer") ||
                !strstr(mpar_last_error(ctx), "stage"))
                fail_msg("detail: %s", mpar_last_error(ctx));
        } else {
            assert_int_equal(mpar_pipeline_train_step(p, &b, &info), MPAR_SUCCESS);
            assert_int_equal(info.skipped, 1);
        }
        after = params(p);
        assert_memory_equal(before, after, sizeof(float) * mpar_model_param_count(model));
        assert_int_equal(mpar_pipeline_get_step(p), 1);
        free(w), free(before), free(after);
        mpar_pipeline_destroy(p);
    }
}

static void test_fault_spec(void** state) {
    (void)state;
    assert_int_equal(mpar_set_fault(ctx, "nonsense"), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_set_fault(ctx, "alloc:1"), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_set_fault(ctx, "alloc:x:1"), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_set_fault(ctx, "alloc:1:1:0"), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_set_fault(ctx, "alloc:1:1:3:"), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(ctx), "KIND:STAGE:STEP"));
    assert_int_equal(mpar_set_fault(ctx, "transfer:*:*:2"), MPAR_SUCCESS);
    assert_int_equal(mpar_set_fault(ctx, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_set_fault(NULL, ""), MPAR_ERROR_INVALID_ARGUMENT);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fault_spec),     cmocka_unit_test(test_alloc_faults),
        cmocka_unit_test(test_enqueue_faults), cmocka_unit_test(test_transfer_faults),
        cmocka_unit_test(test_build_faults),   cmocka_unit_test(test_fault_in_optimizer_step),
        cmocka_unit_test(test_nonfinite),      cmocka_unit_test(test_link_timeouts),
    };
    return cmocka_run_group_tests_name("faults", tests, setup, teardown);
}
