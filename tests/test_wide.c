/* 64-bit sizes end to end: mpar_exec_launch's letters 'B' (an mpar_buf with
   a ulong offset) and 'l' (a size_t as ulong) hand a kernel offsets and
   counts above 2^31 unchanged, on the OpenCL path and in the host route's
   decoder; 'b' (int offset) refuses an offset above INT_MAX instead of
   wrapping; and sizes that would overflow size_t in a stage's layout fail
   at mpar_pipeline_create, naming the layer or the rows.

   The probe kernels (written to a temporary kernel folder) record what they
   receive and never read memory at the offsets they are given, so no
   buffer of 2^31 elements is needed. White box (MPAR_IMPLEMENTATION): an
   mpar_exec is put together as mpar_device_measure_gemm does, and the host
   route's decoder (mpar__host_args) is called directly; mpar_exec's fields,
   mpar__exec_release and mpar__host_args have no public counterpart. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include "fixture.h"

#define BIG_OFF ((((size_t)3) << 31) + 5) /* 6442450949: wraps to 2147483653, then negative, as int */
#define BIG_N ((((size_t)1) << 33) + 7)   /* 8589934599: 7 as int */

static char* saved_route; /* make test's MPAR_CPU_ROUTE, which would replace the descriptor's */
static char kernel_dir[64];

static const char* const probe_source =
    "/* 'B' then 'l': the buffer's offset and the count, as received */\n"
    "__kernel void wide_probe(__global ulong* out, ulong off, ulong n)\n"
    "{ if (get_global_id(0) == 0) { out[0] = off; out[1] = n; } }\n"
    "/* 'B', 'l', 'i', 'B', 'u' in a row: each lands in its place; out's own offset is real */\n"
    "__kernel void wide_mix(__global ulong* out, ulong out_off, ulong n, int i,\n"
    "                       __global const float* x, ulong x_off, uint u)\n"
    "{ if (get_global_id(0) == 0) { out += out_off; out[0] = n; out[1] = (ulong)(long)i; out[2] = x_off; out[3] = u; } }\n"
    "/* 'b': an int offset */\n"
    "__kernel void wide_int(__global ulong* out, int off)\n"
    "{ if (get_global_id(0) == 0) out[0] = (ulong)(long)off; }\n"
    "/* a user layer's forward: x's offset and the count into y's first four words */\n"
    "__kernel void wide_layer(__global float* y, ulong y_off, __global const float* x, ulong x_off, ulong n)\n"
    "{ if (get_global_id(0) == 0) { __global uint* o = (__global uint*)(y + y_off);\n"
    "  o[0] = (uint)x_off; o[1] = (uint)(x_off >> 32); o[2] = (uint)n; o[3] = (uint)(n >> 32); } }\n";

static void probe_path(char* path, size_t size) { snprintf(path, size, "%s/wide.cl", kernel_dir); }

static int setup(void** state) {
    const char* r = getenv("MPAR_CPU_ROUTE");
    char path[128];
    FILE* f;
    (void)state;
    saved_route = r ? strdup(r) : NULL;
    unsetenv("MPAR_CPU_ROUTE");
    snprintf(kernel_dir, sizeof kernel_dir, "/tmp/mpar_wide_XXXXXX");
    if (!mkdtemp(kernel_dir)) return -1;
    probe_path(path, sizeof path);
    f = fopen(path, "w");
    if (!f) return -1;
    fputs(probe_source, f);
    fclose(f);
    return 0;
}
static int teardown(void** state) {
    char path[128];
    (void)state;
    if (saved_route) setenv("MPAR_CPU_ROUTE", saved_route, 1);
    free(saved_route);
    probe_path(path, sizeof path);
    remove(path);
    rmdir(kernel_dir);
    return 0;
}

/* the probe kernels' folder, the route asked for; device 0 is used */
static mpar_context* make_ctx(mpar_cpu_route route) {
    mpar_desc d;
    memset(&d, 0, sizeof d);
    d.cpu_route = route;
    d.kernel_path = kernel_dir;
    return fx_context_or_fail(&d, 1);
}

/* A stage executor on device 0, put together as mpar_device_measure_gemm
   does; host_route as asked (user kernels run as OpenCL either way). */
static void make_exec(mpar_context* ctx, int host_route, mpar_exec* ex) {
    memset(ex, 0, sizeof *ex);
    ex->ctx = ctx, ex->device = 0, ex->stage = -1;
    assert_int_equal(mpar_device_get_cl(ctx, 0, NULL, NULL, &ex->queue), MPAR_SUCCESS);
    ex->host_route = host_route;
}

static cl_mem ulong_buffer(mpar_context* ctx, size_t count) {
    cl_context cc = NULL;
    cl_int st = CL_SUCCESS;
    cl_ulong zero[8] = {0};
    cl_mem m;
    assert_int_equal(mpar_device_get_cl(ctx, 0, NULL, &cc, NULL), MPAR_SUCCESS);
    assert_true(count <= 8);
    m = clCreateBuffer(cc, CL_MEM_READ_WRITE | CL_MEM_COPY_HOST_PTR, sizeof(cl_ulong) * count, zero, &st);
    assert_int_equal(st, CL_SUCCESS);
    return m;
}
static void read_ulongs(mpar_exec* ex, cl_mem m, cl_ulong* out, size_t count) {
    assert_int_equal(clEnqueueReadBuffer(ex->queue, m, CL_TRUE, 0, sizeof(cl_ulong) * count, out, 0, NULL, NULL),
                     CL_SUCCESS);
}

/* 'B' and 'l' pass 3*2^31+5 and 2^33+7 to the kernel exactly, between
   32-bit arguments too; on an executor of either route. */
static void test_launch_wide_values(void** state) {
    mpar_context* ctx = make_ctx(MPAR_CPU_ROUTE_AUTO);
    int host_route;
    (void)state;
    for (host_route = 0; host_route <= 1; host_route++) {
        mpar_exec ex;
        cl_mem out = ulong_buffer(ctx, 6), x = ulong_buffer(ctx, 1);
        cl_ulong got[6];
        mpar_buf b, bx;
        make_exec(ctx, host_route, &ex);
        b.mem = out, b.off = BIG_OFF;
        if (mpar_exec_launch(&ex, "wide.cl", "wide_probe", 1, 0, "Bl", b, BIG_N) != MPAR_SUCCESS)
            fail_msg("wide_probe: %s", mpar_last_error(ctx));
        read_ulongs(&ex, out, got, 2);
        assert_true(got[0] == (cl_ulong)BIG_OFF);
        assert_true(got[1] == (cl_ulong)BIG_N);
        /* out at a real offset of 2 ulongs; x at a fake one (not read) */
        b.off = 2, bx.mem = x, bx.off = BIG_OFF + 1;
        if (mpar_exec_launch(&ex, "wide.cl", "wide_mix", 1, 0, "BliBu", b, BIG_N + 1, -3, bx, 0xfffffffeu) !=
            MPAR_SUCCESS)
            fail_msg("wide_mix: %s", mpar_last_error(ctx));
        read_ulongs(&ex, out, got, 6);
        assert_true(got[0] == (cl_ulong)BIG_OFF && got[1] == (cl_ulong)BIG_N); /* untouched */
        assert_true(got[2] == (cl_ulong)BIG_N + 1);
        assert_true(got[3] == (cl_ulong)(cl_long)-3);
        assert_true(got[4] == (cl_ulong)BIG_OFF + 1);
        assert_true(got[5] == 0xfffffffeu);
        mpar__exec_release(&ex);
        clReleaseMemObject(out), clReleaseMemObject(x);
    }
    mpar_destroy(ctx);
}

/* 'b' passes INT_MAX as it is, and refuses INT_MAX + 1 (and the wide
   offset) with MPAR_ERROR_INVALID_ARGUMENT naming the kernel and the
   offset; the host route's decoder does the same for a built-in kernel. */
static void test_int_offset_refused(void** state) {
    mpar_context* ctx = make_ctx(MPAR_CPU_ROUTE_AUTO);
    int host_route;
    (void)state;
    for (host_route = 0; host_route <= 1; host_route++) {
        mpar_exec ex;
        cl_mem out = ulong_buffer(ctx, 1);
        cl_ulong got = 0;
        mpar_buf b;
        make_exec(ctx, host_route, &ex);
        b.mem = out, b.off = INT_MAX;
        if (mpar_exec_launch(&ex, "wide.cl", "wide_int", 1, 0, "b", b) != MPAR_SUCCESS)
            fail_msg("wide_int: %s", mpar_last_error(ctx));
        read_ulongs(&ex, out, &got, 1);
        assert_true(got == (cl_ulong)INT_MAX);
        b.off = (size_t)INT_MAX + 1;
        assert_int_equal(mpar_exec_launch(&ex, "wide.cl", "wide_int", 1, 0, "b", b), MPAR_ERROR_INVALID_ARGUMENT);
        assert_non_null(strstr(mpar_last_error(ctx), "wide_int"));
        assert_non_null(strstr(mpar_last_error(ctx), "2147483648"));
        b.off = BIG_OFF;
        assert_int_equal(mpar_exec_launch(&ex, "wide.cl", "wide_int", 1, 0, "b", b), MPAR_ERROR_INVALID_ARGUMENT);
        assert_non_null(strstr(mpar_last_error(ctx), "6442450949"));
        /* a built-in kernel: on the host route the decoder refuses it
           before anything runs (the kernel itself takes 'B' now) */
        assert_int_equal(mpar_exec_launch(&ex, "elementwise.cl", "mpar_fill", 1, 0, "blf", b, (size_t)1, 0.0),
                         MPAR_ERROR_INVALID_ARGUMENT);
        assert_non_null(strstr(mpar_last_error(ctx), "mpar_fill"));
        assert_non_null(strstr(mpar_last_error(ctx), "6442450949"));
        read_ulongs(&ex, out, &got, 1);
        assert_true(got == (cl_ulong)INT_MAX); /* no launch wrote anything */
        mpar__exec_release(&ex);
        clReleaseMemObject(out);
    }
    mpar_destroy(ctx);
}

static mpar_result decode(mpar_exec* ex, mpar__harg* a, int* ok, const char* args, ...) {
    va_list ap;
    mpar_result r;
    va_start(ap, args);
    r = mpar__host_args(ex, "decoded", args, ap, a, ok);
    va_end(ap);
    return r;
}

/* The host route's decoder gives the host kernels the same 64-bit values:
   'B' a pointer moved by 4 x 3*2^31+5 bytes, 'l' 2^33+7 in z, the 32-bit
   letters around them in place; 'b' above INT_MAX refused. */
static void test_host_decoder(void** state) {
    mpar_context* ctx = make_ctx(MPAR_CPU_ROUTE_HOST);
    float host[16];
    cl_context cc = NULL;
    cl_int st = CL_SUCCESS;
    cl_mem m;
    mpar_exec ex;
    mpar__harg a[8];
    mpar_buf b, small;
    int ok = -1;
    (void)state;
    assert_int_equal(mpar_device_get_cl(ctx, 0, NULL, &cc, NULL), MPAR_SUCCESS);
    m = clCreateBuffer(cc, CL_MEM_READ_WRITE | CL_MEM_USE_HOST_PTR, sizeof host, host, &st);
    assert_int_equal(st, CL_SUCCESS);
    make_exec(ctx, 1, &ex);
    b.mem = m, b.off = BIG_OFF;
    small.mem = m, small.off = 3;
    memset(a, 0, sizeof a);
    assert_int_equal(decode(&ex, a, &ok, "BliBuf", b, BIG_N, -3, small, 7u, 0.5), MPAR_SUCCESS);
    assert_int_equal(ok, 1);
    assert_true((uintptr_t)a[0].p - (uintptr_t)host == 4 * (uintptr_t)BIG_OFF);
    assert_true(a[1].z == BIG_N);
    assert_int_equal(a[2].i, -3);
    assert_true(a[3].p == (void*)(host + 3));
    assert_true(a[4].u == 7u);
    assert_true(a[5].f == 0.5f);
    /* 'm' and 'b' within INT_MAX */
    small.off = INT_MAX;
    assert_int_equal(decode(&ex, a, &ok, "mb", m, small), MPAR_SUCCESS);
    assert_int_equal(ok, 1);
    assert_true(a[0].p == (void*)host);
    assert_true((uintptr_t)a[1].p - (uintptr_t)host == 4 * (uintptr_t)INT_MAX);
    /* 'b' above it */
    ok = -1;
    assert_int_equal(decode(&ex, a, &ok, "lb", BIG_N, b), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(ok, 0);
    assert_non_null(strstr(mpar_last_error(ctx), "decoded"));
    assert_non_null(strstr(mpar_last_error(ctx), "6442450949"));
    /* OpenCL memory that is not the host's: OpenCL runs the launch */
    make_exec(ctx, 0, &ex);
    assert_int_equal(decode(&ex, a, &ok, "Bl", b, BIG_N), MPAR_SUCCESS);
    assert_int_equal(ok, 0);
    /* and a built-in launched with 'B' and 'l' on the host route */
    make_exec(ctx, 1, &ex);
    memset(host, 0, sizeof host);
    small.off = 5;
    assert_int_equal(mpar_exec_launch(&ex, "elementwise.cl", "mpar_fill", 3, 0, "Blf", small, (size_t)3, 2.5),
                     MPAR_SUCCESS);
    assert_int_equal(ex.cl_launches, 0); /* it ran as host code */
    assert_true(host[4] == 0.0f && host[5] == 2.5f && host[6] == 2.5f && host[7] == 2.5f && host[8] == 0.0f);
    mpar__exec_release(&ex);
    clReleaseMemObject(m);
    mpar_destroy(ctx);
}

/* Through the public API: a user layer on a real stage launches its kernel
   with 'B' and 'l', on both routes, and the inference output holds the
   values it received. */
static mpar_result layer_setup(mpar_layer* l, mpar_error* err) {
    (void)err;
    l->out_features = l->in_features;
    return MPAR_SUCCESS;
}
static mpar_result layer_forward(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    mpar_buf fake = io->x;
    (void)l;
    fake.off = BIG_OFF;
    return mpar_exec_launch(ex, "wide.cl", "wide_layer", 1, 0, "BBl", io->y, fake, BIG_N);
}
static mpar_result layer_backward(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    (void)ex, (void)l, (void)io;
    return MPAR_SUCCESS;
}
static const mpar_layer_type wide_type = {"wide", 0, layer_setup, NULL, layer_forward, layer_backward, NULL};

static void test_user_layer_routes(void** state) {
    int route;
    (void)state;
    for (route = 0; route < 2; route++) {
        mpar_context* ctx = make_ctx(route ? MPAR_CPU_ROUTE_OPENCL : MPAR_CPU_ROUTE_HOST);
        mpar_model* m = NULL;
        mpar_model_desc md;
        mpar_layer_desc ld;
        mpar_pipeline_desc pd;
        mpar_pipeline* p;
        mpar_stage_desc stage;
        mpar_batch batch;
        float x[4] = {1, 2, 3, 4}, y[4];
        uint32_t w[4];
        memset(&md, 0, sizeof md);
        md.input_features = 4;
        memset(&ld, 0, sizeof ld);
        ld.type = &wide_type;
        assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
        assert_int_equal(mpar_model_add(m, &ld, NULL), MPAR_SUCCESS);
        assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
        fx_stages(&stage, 1, 2);
        pd = fx_pipeline_desc(&stage, 1, MPAR_SCHEDULE_SEQUENTIAL, 0, 1);
        p = fx_pipeline(ctx, m, &pd);
        batch.inputs = x, batch.targets = NULL, batch.samples = 1;
        if (mpar_pipeline_infer(p, &batch, y, NULL) != MPAR_SUCCESS) fail_msg("infer: %s", mpar_last_error(ctx));
        memcpy(w, y, sizeof w);
        assert_true(((uint64_t)w[1] << 32 | w[0]) == (uint64_t)BIG_OFF);
        assert_true(((uint64_t)w[3] << 32 | w[2]) == (uint64_t)BIG_N);
        mpar_pipeline_destroy(p);
        mpar_model_destroy(m);
        mpar_destroy(ctx);
    }
}

/* A model whose stage layout overflows size_t fails at
   mpar_pipeline_create with MPAR_ERROR_INVALID_MODEL, before allocating:
   rows x floats per row (2^24 rows of 700 x (2^31 - 1) floats), and the
   sum of parameters (five linear layers of (2^31 - 1)^2 weights); a
   decoder block whose inner widths do not fit the kernels' int fails at
   mpar_model_add. */
static mpar_model* wide_model(int linears, int relus) {
    mpar_model* m = NULL;
    mpar_model_desc md;
    int i;
    memset(&md, 0, sizeof md);
    md.input_features = INT_MAX;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    for (i = 0; i < linears; i++) assert_int_equal(mpar_model_add_linear(m, INT_MAX, NULL), MPAR_SUCCESS);
    for (i = 0; i < relus; i++) assert_int_equal(mpar_model_add_simple(m, mpar_layer_relu(), NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL), MPAR_SUCCESS);
    return m;
}
static mpar_result create_one_stage(mpar_context* ctx, mpar_model* m, int max_batch) {
    mpar_pipeline_desc pd;
    mpar_pipeline* p = NULL;
    mpar_stage_desc stage;
    mpar_result r;
    fx_stages(&stage, 1, mpar_model_layer_count(m));
    pd = fx_pipeline_desc(&stage, 1, MPAR_SCHEDULE_SEQUENTIAL, 0, max_batch); /* the zero desc's schedule */
    r = mpar_pipeline_create(ctx, m, &pd, &p);
    assert_null(p);
    return r;
}

static void test_layout_overflow(void** state) {
    mpar_context* ctx = make_ctx(MPAR_CPU_ROUTE_AUTO);
    mpar_model* m;
    mpar_model_desc md;
    mpar_layer_desc ld;
    mpar_error err;
    (void)state;
    m = wide_model(0, 700);
    assert_int_equal(create_one_stage(ctx, m, 1 << 24), MPAR_ERROR_INVALID_MODEL);
    assert_non_null(strstr(mpar_last_error(ctx), "16777216 rows"));
    assert_non_null(strstr(mpar_last_error(ctx), "overflow size_t"));
    mpar_model_destroy(m);

    m = wide_model(5, 0);
    assert_int_equal(create_one_stage(ctx, m, 1), MPAR_ERROR_INVALID_MODEL);
    assert_non_null(strstr(mpar_last_error(ctx), "at layer 4 (linear, 4611686016279904256 parameters)"));
    mpar_model_destroy(m);

    memset(&md, 0, sizeof md);
    md.input_features = 800000000; /* 3 x 8e8 > INT_MAX */
    memset(&ld, 0, sizeof ld);
    ld.type = mpar_layer_decoder_block(), ld.heads = 1;
    assert_int_equal(mpar_model_create(&md, &m, NULL), MPAR_SUCCESS);
    assert_int_equal(mpar_model_add(m, &ld, &err), MPAR_ERROR_INVALID_MODEL);
    assert_non_null(strstr(err.message, "layer 0 (decoder_block)"));
    assert_non_null(strstr(err.message, "2400000000"));
    mpar_model_destroy(m);
    mpar_destroy(ctx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_launch_wide_values), cmocka_unit_test(test_int_offset_refused),
        cmocka_unit_test(test_host_decoder),       cmocka_unit_test(test_user_layer_routes),
        cmocka_unit_test(test_layout_overflow),
    };
    return cmocka_run_group_tests_name("wide", tests, setup, teardown);
}
