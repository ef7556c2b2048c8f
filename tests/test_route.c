/* The two routes of a CPU device (mpar_cpu_route): how a context picks one,
   that both train the same model to the same numbers within float rounding,
   that the host route leaves OpenCL out entirely for built-in layers while
   user layers keep working (their own kernels, or host code through
   mpar_exec_host), and the GEMM measurement behind gemm_gflops_1dev.
   Bit-for-bit equality between partitions and schedules on each route is
   test_pipeline's, which make test runs on both routes. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

static char* saved_route; /* make test's MPAR_CPU_ROUTE, which replaces the descriptor's */
static char kernel_dir[64];  /* the user layer's own .cl file */
static const char* user_path; /* kernel_path for the next context */

static int setup(void** state) {
    const char* r = getenv("MPAR_CPU_ROUTE");
    (void)state;
    saved_route = r ? strdup(r) : NULL;
    unsetenv("MPAR_CPU_ROUTE");
    snprintf(kernel_dir, sizeof kernel_dir, "/tmp/mpar_route_XXXXXX");
    if (!mkdtemp(kernel_dir)) return -1;
    {
        char path[128];
        FILE* f;
        snprintf(path, sizeof path, "%s/twice.cl", kernel_dir);
        f = fopen(path, "w");
        if (!f) return -1;
        fputs("__kernel void twice_bwd(__global const float* dy, int dy_off, __global float* dx, int dx_off, int n)\n"
              "{ int i = (int)get_global_id(0); if (i < n) dx[dx_off + i] = 2.0f * dy[dy_off + i]; }\n", f);
        fclose(f);
    }
    return 0;
}
static int teardown(void** state) {
    char path[128];
    (void)state;
    if (saved_route) setenv("MPAR_CPU_ROUTE", saved_route, 1);
    free(saved_route);
    snprintf(path, sizeof path, "%s/twice.cl", kernel_dir);
    remove(path);
    rmdir(kernel_dir);
    return 0;
}

static mpar_result make_ctx(mpar_cpu_route route, mpar_context** ctx, mpar_error* err) {
    mpar_desc d;
    memset(&d, 0, sizeof d);
    d.cpu_route = route;
    d.kernel_path = user_path;
    d.error = err;
    err->message[0] = '\0';
    return mpar_create(&d, ctx);
}

static void test_route_selection(void** state) {
    mpar_context* ctx = NULL;
    mpar_error err;
    mpar_device_info info;
    int i;
    (void)state;
    assert_int_equal(make_ctx(MPAR_CPU_ROUTE_HOST, &ctx, &err), MPAR_SUCCESS);
    for (i = 0; i < mpar_device_count(ctx); i++) {
        assert_int_equal(mpar_device_get_info(ctx, i, &info), MPAR_SUCCESS);
        assert_int_equal(info.type, MPAR_DEVICE_CPU); /* PoCL */
        assert_int_equal(info.host_route, 1);
    }
    mpar_destroy(ctx);
    assert_int_equal(make_ctx(MPAR_CPU_ROUTE_AUTO, &ctx, &err), MPAR_SUCCESS);
    assert_int_equal(mpar_device_get_info(ctx, 0, &info), MPAR_SUCCESS);
    assert_int_equal(info.host_route, 1); /* built with MPAR_USE_CBLAS on PoCL */
    mpar_destroy(ctx);
    assert_int_equal(make_ctx(MPAR_CPU_ROUTE_OPENCL, &ctx, &err), MPAR_SUCCESS);
    for (i = 0; i < mpar_device_count(ctx); i++) {
        assert_int_equal(mpar_device_get_info(ctx, i, &info), MPAR_SUCCESS);
        assert_int_equal(info.host_route, 0);
    }
    mpar_destroy(ctx);
    /* the environment replaces the descriptor */
    setenv("MPAR_CPU_ROUTE", "opencl", 1);
    assert_int_equal(make_ctx(MPAR_CPU_ROUTE_HOST, &ctx, &err), MPAR_SUCCESS);
    assert_int_equal(mpar_device_get_info(ctx, 0, &info), MPAR_SUCCESS);
    assert_int_equal(info.host_route, 0);
    mpar_destroy(ctx);
    setenv("MPAR_CPU_ROUTE", "fast", 1);
    ctx = NULL;
    assert_int_equal(make_ctx(MPAR_CPU_ROUTE_AUTO, &ctx, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_null(ctx);
    assert_non_null(strstr(err.message, "MPAR_CPU_ROUTE is 'fast'"));
    unsetenv("MPAR_CPU_ROUTE");
    assert_int_equal(make_ctx((mpar_cpu_route)7, &ctx, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_null(ctx);
    assert_non_null(strstr(err.message, "cpu_route: unknown value 7"));
}

/* Every built-in layer type that an MLP or a decoder uses, in one model. */
static mpar_model* mlp(void) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    memset(&md, 0, sizeof md);
    md.input_features = 24, md.seed = 11;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, 32, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_gelu(), NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_layernorm(), NULL), MPAR_SUCCESS);
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_dropout(), ld.rate = 0.25f;
    assert_int_equal(mpar_model_add(m, &ld, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, 32, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_tanh(), NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, 16, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_relu(), NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, 5, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    return m;
}

static mpar_model* gpt(void) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    memset(&md, 0, sizeof md);
    md.input_features = 1, md.seq_len = 8, md.seed = 5;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_embedding(), ld.vocab = 13, ld.units = 16;
    assert_int_equal(mpar_model_add(m, &ld, NULL), MPAR_SUCCESS);
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_decoder_block(), ld.heads = 2;
    assert_int_equal(mpar_model_add(m, &ld, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add(m, &ld, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_layernorm(), NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, 13, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    return m;
}

typedef struct run_result {
    double loss[4], grad_norm[4];
    float* params;
    uint64_t launches, opencl_launches;
} run_result;

/* Four AdamW steps with clipping on two stages (1F1B, 4 micro-batches). */
static void train(mpar_cpu_route route, mpar_model* m, int tokens, run_result* out) {
    mpar_context* ctx = NULL;
    mpar_error err;
    mpar_pipeline* p = NULL;
    mpar_pipeline_desc pd;
    mpar_pipeline_stats st;
    mpar_step_info info;
    mpar_batch b;
    enum { N = 16 };
    const mpar_layer* first = mpar_model_layer(m, 0);
    int rows = N * mpar_model_get_desc(m)->seq_len, L = mpar_model_layer_count(m), i, s;
    size_t at = 0;
    float* x = (float*)malloc(sizeof(float) * (size_t)rows * (size_t)first->in_features);
    int32_t *tok = (int32_t*)malloc(sizeof(int32_t) * (size_t)rows), *y = (int32_t*)malloc(sizeof(int32_t) * (size_t)rows);
    uint64_t r = 77;
    if (make_ctx(route, &ctx, &err) != MPAR_SUCCESS) fail_msg("mpar_create: %s", err.message);
    for (i = 0; i < rows * first->in_features; i++) x[i] = (float)(4.0 * mpar__rng_uniform(&r) - 2.0);
    for (i = 0; i < rows; i++) tok[i] = (int32_t)(mpar__rng_next(&r) % 13), y[i] = (int32_t)(mpar__rng_next(&r) % 5);
    memset(&pd, 0, sizeof pd);
    pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = 4, pd.max_batch = N;
    pd.optimizer.lr = 1e-2f, pd.optimizer.clip_norm = 0.5f;
    {
        mpar_stage_desc stages[2] = {{0, 0, 2}, {1, 3, 0}};
        stages[1].last_layer = L - 1;
        pd.stages = stages, pd.stage_count = 2;
        if (mpar_pipeline_create(ctx, m, &pd, &p) != MPAR_SUCCESS) fail_msg("create: %s", mpar_last_error(ctx));
    }
    b.inputs = tokens ? (const void*)tok : (const void*)x, b.targets = y, b.samples = N;
    for (s = 0; s < 4; s++) {
        if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) fail_msg("step: %s", mpar_last_error(ctx));
        out->loss[s] = info.loss, out->grad_norm[s] = info.grad_norm;
    }
    assert_int_equal(mpar_pipeline_get_stats(p, &st), MPAR_SUCCESS);
    out->launches = st.launches[0] + st.launches[1];
    out->opencl_launches = st.opencl_launches[0] + st.opencl_launches[1];
    out->params = (float*)malloc(sizeof(float) * mpar_model_param_count(m));
    for (i = 0; i < L; i++) {
        assert_int_equal(mpar_pipeline_get_params(p, i, out->params + at), MPAR_SUCCESS);
        at += mpar_model_layer(m, i)->param_count;
    }
    mpar_pipeline_destroy(p);
    mpar_destroy(ctx);
    free(x), free(tok), free(y);
}

/* The routes add in different orders (CBLAS against CLBlast, libm against
   the device's exp/tanh), so they agree to float rounding, grown over four
   steps: losses and norms within 1e-5 relative, parameters within 1e-4 of
   the largest parameter (measured: 2e-8 and 6e-6). What each route launched is the same list. */
static void compare_routes(mpar_model* m, int tokens) {
    run_result h, c;
    size_t i, n = mpar_model_param_count(m);
    float biggest = 0.0f, worst = 0.0f;
    int s;
    train(MPAR_CPU_ROUTE_HOST, m, tokens, &h);
    train(MPAR_CPU_ROUTE_OPENCL, m, tokens, &c);
    for (s = 0; s < 4; s++) {
        assert_true(fabs(h.loss[s] - c.loss[s]) <= 1e-5 * fabs(c.loss[s]));
        assert_true(fabs(h.grad_norm[s] - c.grad_norm[s]) <= 1e-5 * fabs(c.grad_norm[s]));
    }
    assert_true(c.loss[3] < c.loss[0]); /* it trains */
    assert_true(h.grad_norm[0] > 0.5);  /* so clipping was on */
    for (i = 0; i < n; i++) {
        if (fabsf(c.params[i]) > biggest) biggest = fabsf(c.params[i]);
        if (fabsf(h.params[i] - c.params[i]) > worst) worst = fabsf(h.params[i] - c.params[i]);
    }
    assert_true(worst <= 1e-4f * biggest);
    assert_true(h.launches > 0);
    assert_int_equal(h.opencl_launches, 0); /* no OpenCL for built-in layers */
    assert_int_equal(c.opencl_launches, c.launches);
    assert_int_equal(h.launches, c.launches);
    free(h.params), free(c.params);
}

static void test_routes_agree_mlp(void** state) {
    mpar_model* m = mlp();
    (void)state;
    compare_routes(m, 0);
    mpar_model_destroy(m);
}

static void test_routes_agree_decoder(void** state) {
    mpar_model* m = gpt();
    (void)state;
    compare_routes(m, 1);
    mpar_model_destroy(m);
}

/* A user layer (y = 2x) with a host path through mpar_exec_host and an
   OpenCL path through elementwise.cl's mpar_scale after a copy. */
static int host_calls, cl_calls;
static mpar_result twice_setup(mpar_layer* l, mpar_error* err) {
    (void)err;
    l->out_features = l->in_features;
    return MPAR_SUCCESS;
}
static mpar_result twice_forward(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    int n = io->rows * l->in_features, i;
    float *x = mpar_exec_host(ex, io->x), *y = mpar_exec_host(ex, io->y);
    if (x && y) {
        for (i = 0; i < n; i++) y[i] = 2.0f * x[i];
        host_calls++;
        return MPAR_SUCCESS;
    }
    cl_calls++;
    MPAR__TRY(mpar_exec_launch(ex, "elementwise.cl", "mpar_copy", (size_t)n, 0, "BBl", io->x, io->y, (size_t)n));
    return mpar_exec_launch(ex, "elementwise.cl", "mpar_scale", (size_t)n, 0, "Blf", io->y, (size_t)n, 2.0);
}
/* Backward always through its own kernel file, which has no host version:
   on the host route, OpenCL and host code alternate on one stage's memory. */
static mpar_result twice_backward(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    int n = io->rows * l->in_features;
    if (!io->need_dx) return MPAR_SUCCESS;
    return mpar_exec_launch(ex, "twice.cl", "twice_bwd", (size_t)n, 0, "bbi", io->dy, io->dx, n);
}
static const mpar_layer_type twice_type = {"twice", 0, twice_setup, NULL, twice_forward, twice_backward, NULL};

static void user_layer_run(mpar_cpu_route route, float* params_out, size_t n, uint64_t* cl_launches) {
    mpar_context* ctx = NULL;
    mpar_error err;
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_layer_desc ld;
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_pipeline_stats st;
    mpar_step_info info;
    mpar_batch b;
    float x[8 * 6];
    int32_t y[8];
    int i;
    for (i = 0; i < 8 * 6; i++) x[i] = (float)((i * 37) % 11) / 11.0f - 0.5f;
    for (i = 0; i < 8; i++) y[i] = i % 3;
    user_path = kernel_dir;
    assert_int_equal(make_ctx(route, &ctx, &err), MPAR_SUCCESS);
    user_path = NULL;
    memset(&md, 0, sizeof md);
    md.input_features = 6, md.seed = 2;
    memset(&ld, 0, sizeof ld);
    ld.type = &twice_type;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, 8, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add(m, &ld, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, 3, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    memset(&pd, 0, sizeof pd);
    pd.schedule = MPAR_SCHEDULE_GPIPE, pd.microbatches = 2, pd.max_batch = 8;
    pd.optimizer.kind = MPAR_OPTIMIZER_SGD, pd.optimizer.lr = 0.1f;
    assert_int_equal(mpar_pipeline_create(ctx, m, &pd, &p), MPAR_SUCCESS);
    b.inputs = x, b.targets = y, b.samples = 8;
    for (i = 0; i < 3; i++) assert_int_equal(mpar_pipeline_train_step(p, &b, &info), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_get_stats(p, &st), MPAR_SUCCESS);
    *cl_launches = 0;
    for (i = 0; i < st.stages; i++) *cl_launches += st.opencl_launches[i];
    assert_int_equal(mpar_model_layer(m, 0)->param_count, n);
    assert_int_equal(mpar_pipeline_get_params(p, 0, params_out), MPAR_SUCCESS);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
    mpar_destroy(ctx);
}

static void test_user_layer_on_both_routes(void** state) {
    float ph[6 * 8 + 8], pc[6 * 8 + 8];
    uint64_t cl_h, cl_c;
    size_t i;
    (void)state;
    host_calls = cl_calls = 0;
    user_layer_run(MPAR_CPU_ROUTE_HOST, ph, sizeof ph / sizeof ph[0], &cl_h);
    assert_true(host_calls > 0);
    assert_int_equal(cl_calls, 0);
    assert_true(cl_h > 0); /* the backward's kernels: OpenCL and host code on one stage */
    host_calls = cl_calls = 0;
    user_layer_run(MPAR_CPU_ROUTE_OPENCL, pc, sizeof pc / sizeof pc[0], &cl_c);
    assert_int_equal(host_calls, 0);
    assert_true(cl_calls > 0);
    for (i = 0; i < sizeof ph / sizeof ph[0]; i++) assert_true(fabsf(ph[i] - pc[i]) <= 1e-5f);
}

/* A linear layer and the relu, gelu or tanh after it run as one fused
   launch when they share a stage. Cutting the model between the two must
   change no bit, on either route, and each fused pair saves one launch per
   micro-batch. */
static void fused_run(mpar_cpu_route route, const mpar_stage_desc* stages, int count, float* params, uint64_t* launches) {
    mpar_context* ctx = NULL;
    mpar_error err;
    mpar_model* m = NULL;
    mpar_model_desc md;
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_pipeline_stats st;
    mpar_step_info info;
    mpar_batch b;
    float x[16 * 12];
    int32_t y[16];
    int i, L;
    size_t at = 0;
    for (i = 0; i < 16 * 12; i++) x[i] = (float)((i * 53) % 17) / 4.0f - 2.0f;
    for (i = 0; i < 16; i++) y[i] = i % 4;
    assert_int_equal(make_ctx(route, &ctx, &err), MPAR_SUCCESS);
    memset(&md, 0, sizeof md);
    md.input_features = 12, md.seed = 8;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, 20, NULL), MPAR_SUCCESS); /* 0 */
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_gelu(), NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, 20, NULL), MPAR_SUCCESS); /* 2 */
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_tanh(), NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, 20, NULL), MPAR_SUCCESS); /* 4 */
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_relu(), NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_linear(m, 4, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    L = mpar_model_layer_count(m);
    memset(&pd, 0, sizeof pd);
    pd.stages = stages, pd.stage_count = count;
    pd.schedule = MPAR_SCHEDULE_1F1B, pd.microbatches = 4, pd.max_batch = 16;
    pd.optimizer.lr = 0.01f;
    if (mpar_pipeline_create(ctx, m, &pd, &p) != MPAR_SUCCESS) fail_msg("create: %s", mpar_last_error(ctx));
    b.inputs = x, b.targets = y, b.samples = 16;
    for (i = 0; i < 3; i++) assert_int_equal(mpar_pipeline_train_step(p, &b, &info), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_get_stats(p, &st), MPAR_SUCCESS);
    *launches = 0;
    for (i = 0; i < st.stages; i++) *launches += st.launches[i];
    for (i = 0; i < L; i++) {
        assert_int_equal(mpar_pipeline_get_params(p, i, params + at), MPAR_SUCCESS);
        at += mpar_model_layer(m, i)->param_count;
    }
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
    mpar_destroy(ctx);
}

static void test_fused_activation_cuts(void** state) {
    const mpar_stage_desc whole[1] = {{0, 0, 7}};
    const mpar_stage_desc cut_gelu[2] = {{0, 0, 0}, {1, 1, 7}};        /* linear | gelu */
    const mpar_stage_desc cut_tanh_relu[3] = {{0, 0, 2}, {1, 3, 4}, {0, 5, 7}}; /* linear | tanh, linear | relu */
    enum { P = 12 * 20 + 20 + 2 * (20 * 20 + 20) + 20 * 4 + 4 };
    float a[P], b[P], c[P];
    uint64_t la, lb, lc;
    int r;
    (void)state;
    for (r = 0; r < 2; r++) {
        mpar_cpu_route route = r ? MPAR_CPU_ROUTE_OPENCL : MPAR_CPU_ROUTE_HOST;
        fused_run(route, whole, 1, a, &la);
        fused_run(route, cut_gelu, 2, b, &lb);
        fused_run(route, cut_tanh_relu, 3, c, &lc);
        assert_memory_equal(a, b, sizeof a);
        assert_memory_equal(a, c, sizeof a);
        /* launches of the last step: each fused pair saves one per
           micro-batch (4); each extra stage costs its own per-step four
           (zeroing gradients, two for the norms, the optimizer) */
        assert_int_equal(lb - la, 1 * 4 + 4);
        assert_int_equal(lc - la, 2 * 4 + 2 * 4);
    }
}

static void test_measure_gemm(void** state) {
    mpar_context* ctx = NULL;
    mpar_error err;
    double flops = 0.0;
    (void)state;
    assert_int_equal(make_ctx(MPAR_CPU_ROUTE_AUTO, &ctx, &err), MPAR_SUCCESS);
    assert_int_equal(mpar_device_measure_gemm(ctx, 0, 32, 64, 48, &flops), MPAR_SUCCESS);
    assert_true(flops > 1e6);
    assert_int_equal(mpar_device_measure_gemm(ctx, 0, 0, 64, 48, &flops), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(ctx), "shape 0x64x48"));
    assert_int_equal(mpar_device_measure_gemm(ctx, 0, (size_t)1 << 21, 64, 48, &flops), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_device_measure_gemm(ctx, 0, 32, 64, 48, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_device_measure_gemm(ctx, 9, 32, 64, 48, &flops), MPAR_ERROR_INVALID_ARGUMENT);
    assert_non_null(strstr(mpar_last_error(ctx), "device 9"));
    mpar_destroy(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_route_selection),        cmocka_unit_test(test_routes_agree_mlp),
        cmocka_unit_test(test_routes_agree_decoder),   cmocka_unit_test(test_user_layer_on_both_routes),
        cmocka_unit_test(test_fused_activation_cuts), cmocka_unit_test(test_measure_gemm),
    };
    return cmocka_run_group_tests_name("route", tests, setup, teardown);
}
