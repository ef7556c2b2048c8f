/* test_kernels.c - checks every kernel in the kernels/ .cl files against the double
   precision references in tests/ref.h, every backward kernel against central
   finite differences, the optimizers against host steps, and determinism
   (bit-identical reruns, any local size) and numerical stability.

   Raw OpenCL on the first device of the first platform (run with
   POCL_DEVICES=basic). Kernel sources come from the directories in
   MPAR_KERNEL_PATH (colon-separated), else kernels/ or ../kernels/.

   Build: gcc -std=c99 -Wall -Wextra -Werror -pedantic
          -fsanitize=address,undefined -I. tests/test_kernels.c
          -lOpenCL -lcmocka -lm

   Every device buffer is allocated with a guard zone before and after the
   data and passed with a non-zero element offset: reading back checks that
   offsets are honoured and that nothing outside the range was written. */
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "ref.h"

/* LeakSanitizer reads this hook at exit. PoCL and the LLVM inside it keep
   compiler state alive until the process ends; only leaks whose stack runs
   through those libraries are suppressed, ours are still reported. */
const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void)
{
    return "leak:libpocl.so\nleak:libLLVM\n";
}

/* ---- small utilities ----------------------------------------------------- */

static uint64_t g_rng = 0x1234567887654321ull;

static uint64_t rng_u64(void)
{
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double rng_u01(void) { return (double)(rng_u64() >> 11) * (1.0 / 9007199254740992.0); }

static double rng_normal(void)
{
    double u1 = rng_u01(), u2 = rng_u01();
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static int rng_int(int n) { return (int)(rng_u64() % (uint64_t)n); }

/* Float vector of n normals * sd, kept as float; its double copy is exact. */
static float* randf(int n, double sd)
{
    float* v = (float*)malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    assert_non_null(v);
    for (int i = 0; i < n; ++i) v[i] = (float)(rng_normal() * sd);
    return v;
}

static double* f2d(const float* f, int n)
{
    double* d = (double*)malloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
    assert_non_null(d);
    for (int i = 0; i < n; ++i) d[i] = (double)f[i];
    return d;
}

static double* dalloc(int n)
{
    double* d = (double*)calloc((size_t)(n > 0 ? n : 1), sizeof(double));
    assert_non_null(d);
    return d;
}

static float* falloc(int n)
{
    float* f = (float*)calloc((size_t)(n > 0 ? n : 1), sizeof(float));
    assert_non_null(f);
    return f;
}

static double maxabs(const double* v, int n)
{
    double m = 0.0;
    for (int i = 0; i < n; ++i) m = fabs(v[i]) > m ? fabs(v[i]) : m;
    return m;
}

/* |got - want| <= tol * (|want| + max|want|): relative, with an absolute
   floor relative to the vector's scale (cancellation in sums). */
static void check_close(const char* what, const float* got, const double* want, int n, double tol)
{
    double scale = maxabs(want, n), worst = 0.0;
    int wi = -1;
    for (int i = 0; i < n; ++i) {
        double e = fabs((double)got[i] - want[i]) / (fabs(want[i]) + scale + 1e-30);
        if (isnan(e)) { worst = INFINITY; wi = i; break; }
        if (e > worst) { worst = e; wi = i; }
    }
    if (!(worst <= tol)) {
        print_error("%s: element %d got %.9g want %.9g (err %.3g > tol %.3g)\n",
                    what, wi, (double)got[wi], want[wi], worst, tol);
        fail();
    }
}

static void check_bits(const char* what, const float* a, const float* b, int n)
{
    if (memcmp(a, b, sizeof(float) * (size_t)n) != 0) {
        print_error("%s: results are not bit-identical\n", what);
        fail();
    }
}

/* ---- OpenCL setup -------------------------------------------------------- */

#define NPROG 6
static const char* g_files[NPROG] = {
    "elementwise.cl", "layernorm.cl", "loss.cl", "embedding.cl", "attention.cl", "optimizer.cl"
};
static cl_context g_ctx;
static cl_command_queue g_q;
static cl_device_id g_dev;
static cl_program g_prog[NPROG];

#define CL_OK(call)                                                                \
    do {                                                                           \
        cl_int err_ = (call);                                                      \
        if (err_ != CL_SUCCESS) {                                                  \
            print_error("%s:%d: %s failed: %d\n", __FILE__, __LINE__, #call,     \
                        (int)err_);                                                \
            fail();                                                                \
        }                                                                          \
    } while (0)

static char* read_text(const char* path)
{
    FILE* f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char* s = (char*)malloc((size_t)len + 1);
    if (s && fread(s, 1, (size_t)len, f) != (size_t)len) { free(s); s = NULL; }
    if (s) s[len] = '\0';
    fclose(f);
    return s;
}

/* Search MPAR_KERNEL_PATH (colon-separated), then kernels/, ../kernels/. */
static char* load_kernel_source(const char* file)
{
    char path[4096];
    const char* env = getenv("MPAR_KERNEL_PATH");
    if (env) {
        const char* p = env;
        while (*p) {
            const char* e = strchr(p, ':');
            size_t len = e ? (size_t)(e - p) : strlen(p);
            if (len > 0 && len < sizeof(path) - 256) {
                snprintf(path, sizeof(path), "%.*s/%s", (int)len, p, file);
                char* s = read_text(path);
                if (s) return s;
            }
            if (!e) break;
            p = e + 1;
        }
    }
    snprintf(path, sizeof(path), "kernels/%s", file);
    char* s = read_text(path);
    if (s) return s;
    snprintf(path, sizeof(path), "../kernels/%s", file);
    return read_text(path);
}

static int group_setup(void** state)
{
    (void)state;
    cl_platform_id plat;
    cl_uint np = 0;
    cl_int err;
    if (clGetPlatformIDs(1, &plat, &np) != CL_SUCCESS || np == 0) {
        fprintf(stderr, "no OpenCL platform\n");
        return -1;
    }
    if (clGetDeviceIDs(plat, CL_DEVICE_TYPE_ALL, 1, &g_dev, NULL) != CL_SUCCESS) {
        fprintf(stderr, "no OpenCL device\n");
        return -1;
    }
    g_ctx = clCreateContext(NULL, 1, &g_dev, NULL, NULL, &err);
    if (err != CL_SUCCESS) return -1;
    g_q = clCreateCommandQueue(g_ctx, g_dev, 0, &err);
    if (err != CL_SUCCESS) return -1;
    for (int i = 0; i < NPROG; ++i) {
        char* src = load_kernel_source(g_files[i]);
        if (!src) {
            fprintf(stderr, "cannot find kernels/%s (set MPAR_KERNEL_PATH)\n", g_files[i]);
            return -1;
        }
        const char* srcs[1] = { src };
        g_prog[i] = clCreateProgramWithSource(g_ctx, 1, srcs, NULL, &err);
        free(src);
        if (err != CL_SUCCESS) return -1;
        err = clBuildProgram(g_prog[i], 1, &g_dev, "-cl-std=CL1.2 -Werror", NULL, NULL);
        if (err != CL_SUCCESS) {
            size_t len = 0;
            clGetProgramBuildInfo(g_prog[i], g_dev, CL_PROGRAM_BUILD_LOG, 0, NULL, &len);
            char* log = (char*)malloc(len + 1);
            if (log) {
                clGetProgramBuildInfo(g_prog[i], g_dev, CL_PROGRAM_BUILD_LOG, len, log, NULL);
                log[len] = '\0';
                fprintf(stderr, "build of %s failed (%d):\n%s\n", g_files[i], (int)err, log);
                free(log);
            }
            return -1;
        }
    }
    return 0;
}

static int group_teardown(void** state)
{
    (void)state;
    for (int i = NPROG - 1; i >= 0; --i)
        if (g_prog[i]) clReleaseProgram(g_prog[i]);
    if (g_q) clReleaseCommandQueue(g_q);
    if (g_ctx) clReleaseContext(g_ctx);
    return 0;
}

/* ---- device buffers with offset and guard zones ------------------------- */

#define GUARD_F 777.25f
#define GUARD_I 0x5eed
#define TAIL 5

typedef struct dbuf {
    cl_mem m;
    int off, n, total, is_int;
} dbuf;

static int g_off_counter = 0;

static dbuf dev_make(const void* host, int n, int is_int)
{
    dbuf b;
    b.off = 1 + (g_off_counter++ % 7) * 3; /* 1, 4, 7, ... 19 */
    b.n = n;
    b.total = b.off + n + TAIL;
    b.is_int = is_int;
    void* all = malloc(4 * (size_t)b.total);
    assert_non_null(all);
    for (int i = 0; i < b.total; ++i) {
        if (is_int) ((int*)all)[i] = GUARD_I;
        else ((float*)all)[i] = GUARD_F;
    }
    if (host) memcpy((char*)all + 4 * (size_t)b.off, host, 4 * (size_t)n);
    cl_int err;
    b.m = clCreateBuffer(g_ctx, CL_MEM_READ_WRITE | CL_MEM_COPY_HOST_PTR, 4 * (size_t)b.total, all, &err);
    free(all);
    CL_OK(err);
    return b;
}

static dbuf dev_f(const float* host, int n) { return dev_make(host, n, 0); }
static dbuf dev_i(const int* host, int n) { return dev_make(host, n, 1); }

/* A cl_ulong buffer (the layer table of mpar_sumsq_layers_*) at an offset:
   off, n and total count ulongs here, as the kernel counts the offset. */
static dbuf dev_u64(const cl_ulong* host, int n)
{
    dbuf b;
    cl_ulong* all;
    cl_int err;
    b.off = 3, b.n = n, b.total = b.off + n + TAIL, b.is_int = 1;
    all = (cl_ulong*)calloc((size_t)b.total, sizeof(cl_ulong));
    assert_non_null(all);
    memcpy(all + b.off, host, sizeof(cl_ulong) * (size_t)n);
    b.m = clCreateBuffer(g_ctx, CL_MEM_READ_WRITE | CL_MEM_COPY_HOST_PTR, sizeof(cl_ulong) * (size_t)b.total, all,
                         &err);
    free(all);
    CL_OK(err);
    return b;
}

/* Read the data range back; fail if the guard zones changed. */
static void read_f(const dbuf* b, float* out)
{
    float* all = falloc(b->total);
    CL_OK(clEnqueueReadBuffer(g_q, b->m, CL_TRUE, 0, 4 * (size_t)b->total, all, 0, NULL, NULL));
    for (int i = 0; i < b->total; ++i) {
        if (i >= b->off && i < b->off + b->n) continue;
        if (memcmp(&all[i], &(float){GUARD_F}, 4) != 0) {
            print_error("write outside the buffer range at %d (offset %d, n %d)\n",
                        i - b->off, b->off, b->n);
            free(all);
            fail();
        }
    }
    memcpy(out, all + b->off, 4 * (size_t)b->n);
    free(all);
}

static void dev_free(dbuf* b)
{
    if (b->m) clReleaseMemObject(b->m);
    b->m = NULL;
}

/* Launch a kernel and wait. fmt: 'B' = dbuf* (buffer + its offset as a
   ulong: two arguments), 'l' = size_t passed as ulong, 'i' = int,
   'u' = unsigned, 'f' = double passed as float. */
static void run_local(const char* name, size_t global, const size_t* local, const char* fmt, ...)
{
    cl_kernel k = NULL;
    cl_int err = CL_INVALID_KERNEL_NAME;
    for (int i = 0; i < NPROG && !k; ++i) {
        k = clCreateKernel(g_prog[i], name, &err);
        if (err != CL_SUCCESS) k = NULL;
    }
    if (!k) {
        print_error("kernel %s not found (%d)\n", name, (int)err);
        fail();
    }
    va_list ap;
    va_start(ap, fmt);
    cl_uint a = 0;
    for (const char* f = fmt; *f; ++f) {
        if (*f == 'B') {
            dbuf* b = va_arg(ap, dbuf*);
            cl_ulong off = (cl_ulong)b->off;
            CL_OK(clSetKernelArg(k, a++, sizeof(cl_mem), &b->m));
            CL_OK(clSetKernelArg(k, a++, sizeof(cl_ulong), &off));
        } else if (*f == 'l') {
            cl_ulong v = (cl_ulong)va_arg(ap, size_t);
            CL_OK(clSetKernelArg(k, a++, sizeof(cl_ulong), &v));
        } else if (*f == 'i') {
            cl_int v = va_arg(ap, int);
            CL_OK(clSetKernelArg(k, a++, sizeof(cl_int), &v));
        } else if (*f == 'u') {
            cl_uint v = va_arg(ap, unsigned);
            CL_OK(clSetKernelArg(k, a++, sizeof(cl_uint), &v));
        } else if (*f == 'f') {
            cl_float v = (cl_float)va_arg(ap, double);
            CL_OK(clSetKernelArg(k, a++, sizeof(cl_float), &v));
        }
    }
    va_end(ap);
    cl_uint nargs = 0;
    CL_OK(clGetKernelInfo(k, CL_KERNEL_NUM_ARGS, sizeof(nargs), &nargs, NULL));
    assert_int_equal(nargs, a);
    CL_OK(clEnqueueNDRangeKernel(g_q, k, 1, NULL, &global, local, 0, NULL, NULL));
    CL_OK(clFinish(g_q));
    clReleaseKernel(k);
}

#define run(name, global, ...) run_local(name, (size_t)(global), NULL, __VA_ARGS__)

/* ---- finite differences -------------------------------------------------- */

/* objective(ctx) = <projection, f(inputs)> computed with ref.h in double */
typedef double (*objective_fn)(void* ctx);

/* For a sample of indices i of var (all when n <= 200), compare
   fd_i = (obj(var + h e_i) - obj(var - h e_i)) / 2h with
   - ref_grad[i] (double ref backward), tolerance 1e-6
   - kern_grad[i] (float kernel backward), tolerance ktol
   relative to |fd_i| + max|ref_grad|. Either gradient may be NULL. */
static void fd_check(const char* what, objective_fn obj, void* ctx, double* var, int n,
                     const double* ref_grad, const float* kern_grad, double ktol)
{
    const double h = 1e-5;
    double gscale = ref_grad ? maxabs(ref_grad, n) : 0.0;
    if (kern_grad && !ref_grad)
        for (int i = 0; i < n; ++i) gscale = fmax(gscale, fabs((double)kern_grad[i]));
    int count = n <= 200 ? n : 64;
    for (int s = 0; s < count; ++s) {
        int i = n <= 200 ? s : rng_int(n);
        double save = var[i];
        var[i] = save + h;
        double fp = obj(ctx);
        var[i] = save - h;
        double fm = obj(ctx);
        var[i] = save;
        double fd = (fp - fm) / (2.0 * h);
        double den = fabs(fd) + gscale + 1e-30;
        if (ref_grad && !(fabs(ref_grad[i] - fd) / den <= 1e-6)) {
            print_error("%s: ref grad[%d] = %.12g, finite difference %.12g\n", what, i, ref_grad[i], fd);
            fail();
        }
        if (kern_grad && !(fabs((double)kern_grad[i] - fd) / den <= ktol)) {
            print_error("%s: kernel grad[%d] = %.9g, finite difference %.9g\n", what, i,
                        (double)kern_grad[i], fd);
            fail();
        }
    }
}

static double dot(const double* a, const double* b, int n)
{
    double s = 0.0;
    for (int i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

/* ---- elementwise --------------------------------------------------------- */

static void test_vector_ops(void** state)
{
    (void)state;
    const int n = 1000;
    float* x = randf(n, 1.0);
    float* y = randf(n, 1.0);
    float* out = falloc(n);
    double* want = dalloc(n);
    dbuf bx = dev_f(x, n), by = dev_f(y, n), bo = dev_f(NULL, n);

    run("mpar_fill", n, "Blf", &bo, (size_t)n, 2.5);
    read_f(&bo, out);
    for (int i = 0; i < n; ++i) want[i] = 2.5;
    check_close("fill", out, want, n, 0.0);

    run("mpar_copy", n, "BBl", &bx, &bo, (size_t)n);
    read_f(&bo, out);
    for (int i = 0; i < n; ++i) want[i] = x[i];
    check_close("copy", out, want, n, 0.0);

    run("mpar_scale", n, "Blf", &bo, (size_t)n, -0.75);
    read_f(&bo, out);
    for (int i = 0; i < n; ++i) want[i] = -0.75 * x[i];
    check_close("scale", out, want, n, 1e-7);

    run("mpar_axpy", n, "BBlf", &by, &bo, (size_t)n, 0.5);
    read_f(&bo, out);
    for (int i = 0; i < n; ++i) want[i] = -0.75 * x[i] + 0.5 * y[i];
    check_close("axpy", out, want, n, 1e-6);

    run("mpar_add", n, "BBBl", &bx, &by, &bo, (size_t)n);
    read_f(&bo, out);
    for (int i = 0; i < n; ++i) want[i] = (double)x[i] + y[i];
    check_close("add", out, want, n, 1e-7);

    /* n smaller than the buffer: the tail must stay untouched */
    run("mpar_fill", n / 2, "Blf", &bo, (size_t)(n / 2), 0.0);
    read_f(&bo, out);
    for (int i = 0; i < n; ++i) want[i] = i < n / 2 ? 0.0 : (double)x[i] + y[i];
    check_close("fill half", out, want, n, 1e-7);

    dev_free(&bx); dev_free(&by); dev_free(&bo);
    free(x); free(y); free(out); free(want);
}

typedef struct act_ctx {
    int kind; /* 0 relu, 1 gelu, 2 tanh */
    int n;
    double *x, *dy, *y;
} act_ctx;

static double act_obj(void* p)
{
    act_ctx* c = (act_ctx*)p;
    if (c->kind == 0) ref_relu_fwd(c->x, c->y, c->n);
    else if (c->kind == 1) ref_gelu_fwd(c->x, c->y, c->n);
    else ref_tanh_fwd(c->x, c->y, c->n);
    return dot(c->dy, c->y, c->n);
}

static void test_activations(void** state)
{
    (void)state;
    static const char* fwd[3] = { "mpar_relu_fwd", "mpar_gelu_fwd", "mpar_tanh_fwd" };
    static const char* bwd[3] = { "mpar_relu_bwd", "mpar_gelu_bwd", "mpar_tanh_bwd" };
    const int n = 3000;
    for (int kind = 0; kind < 3; ++kind) {
        float* x = randf(n, 2.0);
        for (int i = 0; i < n; ++i) /* keep ReLU's kink out of the FD step */
            if (fabsf(x[i]) < 0.05f) x[i] = x[i] < 0 ? x[i] - 0.05f : x[i] + 0.05f;
        x[0] = 12.0f; x[1] = -12.0f; /* saturated tails */
        float* dy = randf(n, 1.0);
        float* out = falloc(n);
        double* xd = f2d(x, n);
        double* dyd = f2d(dy, n);
        double* y = dalloc(n);
        double* dx = dalloc(n);
        dbuf bx = dev_f(x, n), bdy = dev_f(dy, n), by = dev_f(NULL, n), bdx = dev_f(NULL, n);

        run(fwd[kind], n, "BBl", &bx, &by, (size_t)n);
        read_f(&by, out);
        act_ctx c = { kind, n, xd, dyd, y };
        act_obj(&c);
        check_close(fwd[kind], out, y, n, 1e-5);

        if (kind == 2) { /* tanh backward takes the forward output */
            run(bwd[kind], n, "BBBl", &by, &bdy, &bdx, (size_t)n);
            double* yf = f2d(out, n);
            ref_tanh_bwd(yf, dyd, dx, n);
            free(yf);
        } else {
            run(bwd[kind], n, "BBBl", &bx, &bdy, &bdx, (size_t)n);
            if (kind == 0) ref_relu_bwd(xd, dyd, dx, n);
            else ref_gelu_bwd(xd, dyd, dx, n);
        }
        read_f(&bdx, out);
        check_close(bwd[kind], out, dx, n, 1e-5);
        if (kind == 2) ref_tanh_fwd(xd, y, n), ref_tanh_bwd(y, dyd, dx, n);
        fd_check(bwd[kind], act_obj, &c, xd, n, dx, out, 1e-4);

        /* in place: y aliases x */
        run(fwd[kind], n, "BBl", &bx, &bx, (size_t)n);
        read_f(&bx, out);
        act_obj(&c);
        check_close("in-place activation", out, y, n, 1e-5);

        dev_free(&bx); dev_free(&bdy); dev_free(&by); dev_free(&bdx);
        free(x); free(dy); free(out); free(xd); free(dyd); free(y); free(dx);
    }
}

typedef struct drop_ctx {
    int n, idx_off;
    double p;
    uint32_t lo, hi;
    double *x, *dy, *y;
} drop_ctx;

static double drop_obj(void* p)
{
    drop_ctx* c = (drop_ctx*)p;
    ref_dropout_fwd(c->x, c->y, c->n, c->p, c->lo, c->hi, c->idx_off);
    return dot(c->dy, c->y, c->n);
}

static void test_dropout(void** state)
{
    (void)state;
    const int n = 20000, idx_off = 1000;
    const float p = 0.3f;
    const uint32_t lo = 0xdeadbeefu, hi = 7u;
    float* x = randf(n, 1.0);
    float* dy = randf(n, 1.0);
    float* out = falloc(n);
    float* half = falloc(n);
    double* xd = f2d(x, n);
    double* dyd = f2d(dy, n);
    double* y = dalloc(n);
    double* dx = dalloc(n);
    dbuf bx = dev_f(x, n), bdy = dev_f(dy, n), by = dev_f(NULL, n), bdx = dev_f(NULL, n);

    run("mpar_dropout_fwd", n, "BBlfuul", &bx, &by, (size_t)n, (double)p, lo, hi, (size_t)idx_off);
    read_f(&by, out);
    drop_ctx c = { n, idx_off, (double)p, lo, hi, xd, dyd, y };
    drop_obj(&c);
    check_close("dropout_fwd", out, y, n, 1e-6);
    int kept = 0, mism = 0;
    for (int i = 0; i < n; ++i) {
        kept += y[i] != 0.0;
        mism += (y[i] != 0.0) != (out[i] != 0.0);
    }
    assert_int_equal(mism, 0);
    double frac = (double)kept / n;
    if (fabs(frac - (1.0 - p)) > 0.02) {
        print_error("dropout keeps %.4f, expected %.4f\n", frac, 1.0 - p);
        fail();
    }

    run("mpar_dropout_bwd", n, "BBlfuul", &bdy, &bdx, (size_t)n, (double)p, lo, hi, (size_t)idx_off);
    read_f(&bdx, out);
    ref_dropout_bwd(dyd, dx, n, (double)p, lo, hi, idx_off);
    check_close("dropout_bwd", out, dx, n, 1e-6);
    fd_check("dropout_bwd", drop_obj, &c, xd, n, dx, out, 1e-4);

    /* Two halves with idx_off shifted = the whole, bit for bit (micro-batches). */
    run("mpar_dropout_fwd", n, "BBlfuul", &bx, &by, (size_t)n, (double)p, lo, hi, (size_t)0);
    read_f(&by, out);
    dbuf hx = dev_f(x + n / 2, n - n / 2), hy = dev_f(NULL, n - n / 2);
    run("mpar_dropout_fwd", n - n / 2, "BBlfuul", &hx, &hy, (size_t)(n - n / 2), (double)p, lo, hi, (size_t)(n / 2));
    read_f(&hy, half);
    check_bits("dropout halves", out + n / 2, half, n - n / 2);

    /* Another seed gives another mask. */
    run("mpar_dropout_fwd", n, "BBlfuul", &bx, &by, (size_t)n, (double)p, lo, hi + 1, (size_t)0);
    read_f(&by, half);
    int same = 0;
    for (int i = 0; i < n; ++i) same += (out[i] != 0.0f) == (half[i] != 0.0f);
    assert_true(same < n * 0.7); /* independent masks agree on ~58% */

    /* p = 0 is the identity. */
    run("mpar_dropout_fwd", n, "BBlfuul", &bx, &by, (size_t)n, 0.0, lo, hi, (size_t)0);
    read_f(&by, out);
    check_bits("dropout p=0", out, x, n);

    dev_free(&bx); dev_free(&bdy); dev_free(&by); dev_free(&bdx); dev_free(&hx); dev_free(&hy);
    free(x); free(dy); free(out); free(half); free(xd); free(dyd); free(y); free(dx);
}

static void test_bias(void** state)
{
    (void)state;
    const int rows = 37, cols = 29;
    float* y = randf(rows * cols, 1.0);
    float* b = randf(cols, 1.0);
    float* db0 = randf(cols, 1.0);
    float* out = falloc(rows * cols);
    float* out2 = falloc(cols);
    double* yd = f2d(y, rows * cols);
    double* bd = f2d(b, cols);
    double* dbd = f2d(db0, cols);
    dbuf by = dev_f(y, rows * cols), bb = dev_f(b, cols), bdb = dev_f(db0, cols);

    run("mpar_bias_add", rows * cols, "BiiB", &by, rows, cols, &bb);
    read_f(&by, out);
    ref_bias_add(yd, rows, cols, bd);
    check_close("bias_add", out, yd, rows * cols, 1e-7);

    /* bias_grad accumulates onto db0; y (the dy here) is the original y */
    dbuf bdy = dev_f(y, rows * cols);
    double* dyd = f2d(y, rows * cols);
    run("mpar_bias_grad", cols, "BiiB", &bdy, rows, cols, &bdb);
    read_f(&bdb, out);
    ref_bias_grad(dyd, rows, cols, dbd);
    check_close("bias_grad", out, dbd, cols, 1e-6);

    /* determinism: same input, same bits, with any local size */
    dbuf bdb2 = dev_f(db0, cols);
    run("mpar_bias_grad", cols, "BiiB", &bdy, rows, cols, &bdb2);
    read_f(&bdb2, out2);
    check_bits("bias_grad rerun", out, out2, cols);
    dev_free(&bdb2);
    bdb2 = dev_f(db0, cols);
    size_t one = 1;
    run_local("mpar_bias_grad", (size_t)cols, &one, "BiiB", &bdy, rows, cols, &bdb2);
    read_f(&bdb2, out2);
    check_bits("bias_grad local size 1", out, out2, cols);

    dev_free(&by); dev_free(&bb); dev_free(&bdb); dev_free(&bdy); dev_free(&bdb2);
    free(y); free(b); free(db0); free(out); free(out2); free(yd); free(bd); free(dbd); free(dyd);
}

/* ---- layer norm ---------------------------------------------------------- */

typedef struct ln_ctx {
    int rows, cols;
    double eps;
    double *x, *gamma, *beta, *dy, *y, *mean, *rstd;
} ln_ctx;

static double ln_obj(void* p)
{
    ln_ctx* c = (ln_ctx*)p;
    ref_layernorm_fwd(c->x, c->gamma, c->beta, c->y, c->mean, c->rstd, c->rows, c->cols, c->eps);
    return dot(c->dy, c->y, c->rows * c->cols);
}

/* Forward and the three gradients on rows of N(offset, sd^2). */
static void layernorm_case(int rows, int cols, double offset, double sd, int fd)
{
    const int n = rows * cols;
    const double eps = 1e-5;
    float* x = randf(n, sd);
    for (int i = 0; i < n; ++i) x[i] = (float)(x[i] + offset);
    float* gamma = randf(cols, 0.5);
    for (int c = 0; c < cols; ++c) gamma[c] += 1.0f;
    float* beta = randf(cols, 0.5);
    float* dy = randf(n, 1.0);
    float* dg0 = randf(cols, 1.0);
    float* db0 = randf(cols, 1.0);
    float* out = falloc(n);
    float* km = falloc(rows);
    float* kr = falloc(rows);
    float* kdg = falloc(cols);
    float* kdb = falloc(cols);
    double* xd = f2d(x, n);
    double* gd = f2d(gamma, cols);
    double* bd = f2d(beta, cols);
    double* dyd = f2d(dy, n);
    double* y = dalloc(n);
    double* mean = dalloc(rows);
    double* rstd = dalloc(rows);
    double* dx = dalloc(n);
    double* dg = dalloc(cols);
    double* db = dalloc(cols);
    dbuf bx = dev_f(x, n), bg = dev_f(gamma, cols), bb = dev_f(beta, cols), by = dev_f(NULL, n);
    dbuf bm = dev_f(NULL, rows), br = dev_f(NULL, rows), bdy = dev_f(dy, n), bdx = dev_f(NULL, n);
    dbuf bdg = dev_f(dg0, cols), bdb = dev_f(db0, cols);

    run("mpar_layernorm_fwd", rows, "BBBBBBiif", &bx, &bg, &bb, &by, &bm, &br, rows, cols, eps);
    read_f(&by, out);
    read_f(&bm, km);
    read_f(&br, kr);
    ln_ctx c = { rows, cols, eps, xd, gd, bd, dyd, y, mean, rstd };
    ln_obj(&c);
    check_close("layernorm rstd", kr, rstd, rows, 1e-5);
    /* The saved mean is a float: allow its rounding (half an ulp) and the
       part of y's error it explains, (mean_k - mean) * rstd * gamma. */
    for (int r = 0; r < rows; ++r) {
        double ulp = ldexp(1.0, ilogb(fabs(mean[r]) + 1e-30) - 23);
        if (!(fabs(km[r] - mean[r]) <= 0.5 * ulp + 1e-6 * sd)) {
            print_error("layernorm mean[%d] = %.9g want %.9g\n", r, (double)km[r], mean[r]);
            fail();
        }
    }
    double yscale = maxabs(y, n);
    for (int i = 0; i < n; ++i) {
        int r = i / cols, col = i % cols;
        double allow = fabs((double)km[r] - mean[r]) * rstd[r] * fabs(gd[col]);
        if (!(fabs(out[i] - y[i]) <= 1e-5 * (fabs(y[i]) + yscale) + 1.001 * allow)) {
            print_error("layernorm y[%d] = %.9g want %.9g (offset %g)\n", i, (double)out[i], y[i], offset);
            fail();
        }
    }

    /* Backward against the reference evaluated at the kernel's saved mean
       (the float the kernels use); at offset 0 that equals the exact one. */
    double* kmd = f2d(km, rows);
    run("mpar_layernorm_bwd_input", rows, "BBBBBBii", &bdy, &bx, &bm, &br, &bg, &bdx, rows, cols);
    read_f(&bdx, out);
    ref_layernorm_bwd_input(dyd, xd, kmd, rstd, gd, dx, rows, cols);
    check_close("layernorm_bwd_input", out, dx, n, 1e-5);
    float* kdx = falloc(n);
    memcpy(kdx, out, sizeof(float) * (size_t)n);

    run("mpar_layernorm_bwd_weight", cols, "BBBBBBii", &bdy, &bx, &bm, &br, &bdg, &bdb, rows, cols);
    read_f(&bdg, kdg);
    read_f(&bdb, kdb);
    for (int i = 0; i < cols; ++i) dg[i] = dg0[i], db[i] = db0[i];
    ref_layernorm_bwd_weight(dyd, xd, kmd, rstd, dg, db, rows, cols);
    check_close("layernorm dgamma", kdg, dg, cols, 1e-5);
    check_close("layernorm dbeta", kdb, db, cols, 1e-5);

    if (fd) {
        for (int i = 0; i < cols; ++i) {
            kdg[i] -= dg0[i]; kdb[i] -= db0[i];
            dg[i] = 0.0; db[i] = 0.0;
        }
        ln_obj(&c);
        ref_layernorm_bwd_input(dyd, xd, mean, rstd, gd, dx, rows, cols);
        ref_layernorm_bwd_weight(dyd, xd, mean, rstd, dg, db, rows, cols);
        fd_check("layernorm dx", ln_obj, &c, xd, n, dx, kdx, 1e-4);
        fd_check("layernorm dgamma", ln_obj, &c, gd, cols, dg, kdg, 1e-4);
        fd_check("layernorm dbeta", ln_obj, &c, bd, cols, db, kdb, 1e-4);
    }

    dev_free(&bx); dev_free(&bg); dev_free(&bb); dev_free(&by); dev_free(&bm);
    dev_free(&br); dev_free(&bdy); dev_free(&bdx); dev_free(&bdg); dev_free(&bdb);
    free(x); free(gamma); free(beta); free(dy); free(dg0); free(db0); free(out); free(km);
    free(kr); free(kdg); free(kdb); free(xd); free(gd); free(bd); free(dyd); free(y);
    free(mean); free(rstd); free(dx); free(dg); free(db); free(kmd); free(kdx);
}

static void test_layernorm(void** state)
{
    (void)state;
    layernorm_case(24, 48, 0.0, 1.0, 1);
    layernorm_case(7, 5, 0.3, 2.0, 1);
    layernorm_case(64, 256, 0.0, 0.5, 0);
}

static void test_layernorm_stability(void** state)
{
    (void)state;
    layernorm_case(16, 64, 1e4, 1.0, 0);
    layernorm_case(16, 64, -1e4, 0.1, 0);
    layernorm_case(16, 64, 1e4, 0.03, 0); /* mean rounding >> sd^2 * 1e-5 */
}

/* ---- softmax cross-entropy ----------------------------------------------- */

typedef struct xent_ctx {
    int rows, classes;
    double scale;
    double* logits;
    const int* targets;
    double* loss;
} xent_ctx;

static double xent_obj(void* p)
{
    xent_ctx* c = (xent_ctx*)p;
    ref_xent_fwd(c->logits, c->targets, c->loss, c->rows, c->classes);
    return c->scale * ref_sum(c->loss, c->rows);
}

static void xent_case(int rows, int classes, double offset, double sd, int fd)
{
    const int n = rows * classes;
    float* logits = randf(n, sd);
    for (int i = 0; i < n; ++i) logits[i] = (float)(logits[i] + offset);
    int* targets = (int*)malloc(sizeof(int) * (size_t)rows);
    assert_non_null(targets);
    int counted = 0;
    for (int r = 0; r < rows; ++r) {
        targets[r] = rng_int(classes);
        if (r % 5 == 3) targets[r] = -1;              /* ignored */
        if (r == rows - 1) targets[r] = classes + 2;  /* out of range: ignored too */
        counted += targets[r] >= 0 && targets[r] < classes;
    }
    double scale = 1.0 / counted;
    float* out = falloc(n);
    float* sum = falloc(1);
    double* ld = f2d(logits, n);
    double* loss = dalloc(rows);
    double* dl = dalloc(n);
    dbuf bl = dev_f(logits, n), bt = dev_i(targets, rows), bloss = dev_f(NULL, rows);
    dbuf bd = dev_f(NULL, n), bs = dev_f(NULL, 1);

    run("mpar_xent_fwd", rows, "BBBii", &bl, &bt, &bloss, rows, classes);
    read_f(&bloss, out);
    xent_ctx c = { rows, classes, scale, ld, targets, loss };
    double total = xent_obj(&c) / scale;
    check_close("xent_fwd", out, loss, rows, 1e-5);
    for (int r = 0; r < rows; ++r)
        if (!(targets[r] >= 0 && targets[r] < classes)) assert_true(out[r] == 0.0f);

    run("mpar_loss_sum", 1, "BlB", &bloss, (size_t)rows, &bs);
    read_f(&bs, sum);
    check_close("loss_sum", sum, &total, 1, 1e-5);

    run("mpar_xent_bwd", rows, "BBBiif", &bl, &bt, &bd, rows, classes, scale);
    read_f(&bd, out);
    ref_xent_bwd(ld, targets, dl, rows, classes, scale);
    check_close("xent_bwd", out, dl, n, 1e-5);
    for (int r = 0; r < rows; ++r)
        if (!(targets[r] >= 0 && targets[r] < classes))
            for (int k = 0; k < classes; ++k) assert_true(out[r * classes + k] == 0.0f);
    if (fd) fd_check("xent_bwd", xent_obj, &c, ld, n, dl, out, 1e-4);

    dev_free(&bl); dev_free(&bt); dev_free(&bloss); dev_free(&bd); dev_free(&bs);
    free(logits); free(targets); free(out); free(sum); free(ld); free(loss); free(dl);
}

static void test_xent(void** state)
{
    (void)state;
    xent_case(20, 11, 0.0, 2.0, 1);
    xent_case(64, 500, 0.0, 3.0, 0);
}

static void test_xent_stability(void** state)
{
    (void)state;
    xent_case(16, 40, 1e4, 3.0, 0);
    xent_case(16, 40, -1e4, 30.0, 0);
}

/* ---- embedding ----------------------------------------------------------- */

typedef struct emb_ctx {
    int rows, T, C, V;
    const int* tokens;
    double *wte, *wpe, *dout, *out;
} emb_ctx;

static double emb_obj(void* p)
{
    emb_ctx* c = (emb_ctx*)p;
    ref_embedding_fwd(c->tokens, c->wte, c->wpe, c->out, c->rows, c->T, c->C, c->V);
    return dot(c->dout, c->out, c->rows * c->C);
}

static void test_embedding(void** state)
{
    (void)state;
    const int B = 3, T = 6, C = 10, V = 13, rows = B * T;
    int tokens[3 * 6];
    for (int i = 0; i < rows; ++i) tokens[i] = rng_int(V);
    tokens[2] = tokens[9] = tokens[15] = 4; /* a repeated token */
    tokens[5] = -1;                         /* out of range: skipped */
    tokens[11] = V;                         /* out of range: skipped */
    float* wte = randf(V * C, 1.0);
    float* wpe = randf(T * C, 1.0);
    float* dout = randf(rows * C, 1.0);
    float* dwte0 = randf(V * C, 1.0);
    float* dwpe0 = randf(T * C, 1.0);
    float* out = falloc(rows * C);
    float* kdwte = falloc(V * C);
    float* kdwpe = falloc(T * C);
    double* wted = f2d(wte, V * C);
    double* wped = f2d(wpe, T * C);
    double* doutd = f2d(dout, rows * C);
    double* o = dalloc(rows * C);
    double* dwte = f2d(dwte0, V * C);
    double* dwpe = f2d(dwpe0, T * C);
    dbuf bt = dev_i(tokens, rows), bwte = dev_f(wte, V * C), bwpe = dev_f(wpe, T * C);
    dbuf bo = dev_f(NULL, rows * C), bdo = dev_f(dout, rows * C);
    dbuf bdwte = dev_f(dwte0, V * C), bdwpe = dev_f(dwpe0, T * C);

    run("mpar_embedding_fwd", rows * C, "BBBBiiii", &bt, &bwte, &bwpe, &bo, rows, T, C, V);
    read_f(&bo, out);
    emb_ctx c = { rows, T, C, V, tokens, wted, wped, doutd, o };
    emb_obj(&c);
    check_close("embedding_fwd", out, o, rows * C, 1e-6);

    run("mpar_embedding_bwd_wte", V * C, "BBBiii", &bt, &bdo, &bdwte, rows, C, V);
    run("mpar_embedding_bwd_wpe", T * C, "BBiii", &bdo, &bdwpe, rows, T, C);
    read_f(&bdwte, kdwte);
    read_f(&bdwpe, kdwpe);
    ref_embedding_bwd(tokens, doutd, dwte, dwpe, rows, T, C, V);
    check_close("embedding dwte", kdwte, dwte, V * C, 1e-6);
    check_close("embedding dwpe", kdwpe, dwpe, T * C, 1e-6);

    for (int i = 0; i < V * C; ++i) kdwte[i] -= dwte0[i], dwte[i] = 0.0;
    for (int i = 0; i < T * C; ++i) kdwpe[i] -= dwpe0[i], dwpe[i] = 0.0;
    ref_embedding_bwd(tokens, doutd, dwte, dwpe, rows, T, C, V);
    fd_check("embedding dwte", emb_obj, &c, wted, V * C, dwte, kdwte, 1e-4);
    fd_check("embedding dwpe", emb_obj, &c, wped, T * C, dwpe, kdwpe, 1e-4);

    dev_free(&bt); dev_free(&bwte); dev_free(&bwpe); dev_free(&bo); dev_free(&bdo);
    dev_free(&bdwte); dev_free(&bdwpe);
    free(wte); free(wpe); free(dout); free(dwte0); free(dwpe0); free(out); free(kdwte);
    free(kdwpe); free(wted); free(wped); free(doutd); free(o); free(dwte); free(dwpe);
}

/* ---- attention ----------------------------------------------------------- */

typedef struct attn_ctx {
    int B, T, C, H;
    double *qkv, *dout, *out, *P;
} attn_ctx;

static double attn_obj(void* p)
{
    attn_ctx* c = (attn_ctx*)p;
    ref_attn_fwd(c->qkv, c->out, c->P, c->B, c->T, c->C, c->H);
    return dot(c->dout, c->out, c->B * c->T * c->C);
}

/* Runs forward + backward; returns dqkv (float, caller frees) when asked. */
static void attention_case(int B, int T, int C, int H, int fd, const size_t* local,
                           float** dqkv_out, float** ds_out)
{
    const int nq = B * T * 3 * C, no = B * T * C, np = B * H * T * T;
    float* qkv = randf(nq, 1.0);
    float* dout = randf(no, 1.0);
    float* out = falloc(no);
    float* kP = falloc(np);
    float* kds = falloc(np);
    float* kdq = falloc(nq);
    double* qd = f2d(qkv, nq);
    double* dod = f2d(dout, no);
    double* o = dalloc(no);
    double* P = dalloc(np);
    double* dq = dalloc(nq);
    dbuf bq = dev_f(qkv, nq), bo = dev_f(NULL, no), bP = dev_f(NULL, np);
    dbuf bdo = dev_f(dout, no), bds = dev_f(NULL, np), bdq = dev_f(NULL, nq);

    run_local("mpar_attn_fwd", (size_t)(B * H * T), local, "BBBiiii", &bq, &bo, &bP, B, T, C, H);
    read_f(&bo, out);
    read_f(&bP, kP);
    attn_ctx c = { B, T, C, H, qd, dod, o, P };
    attn_obj(&c);
    check_close("attn_fwd out", out, o, no, 1e-5);
    check_close("attn_fwd P", kP, P, np, 1e-5);
    for (int bh = 0; bh < B * H; ++bh)
        for (int i = 0; i < T; ++i)
            for (int j = i + 1; j < T; ++j) assert_true(kP[(bh * T + i) * T + j] == 0.0f);

    run_local("mpar_attn_bwd_ds", (size_t)(B * H * T), local, "BBBBiiii", &bdo, &bq, &bP, &bds, B, T, C, H);
    run_local("mpar_attn_bwd_qkv", (size_t)nq, local, "BBBBBiiii", &bdo, &bq, &bP, &bds, &bdq, B, T, C, H);
    read_f(&bdq, kdq);
    read_f(&bds, kds);
    ref_attn_bwd(dod, qd, P, dq, B, T, C, H);
    check_close("attn dqkv", kdq, dq, nq, 1e-5);
    if (fd) fd_check("attn dqkv", attn_obj, &c, qd, nq, dq, kdq, 1e-4);

    if (dqkv_out) *dqkv_out = kdq; else free(kdq);
    if (ds_out) *ds_out = kds; else free(kds);
    dev_free(&bq); dev_free(&bo); dev_free(&bP); dev_free(&bdo); dev_free(&bds); dev_free(&bdq);
    free(qkv); free(dout); free(out); free(kP); free(qd); free(dod); free(o); free(P); free(dq);
}

static void test_attention(void** state)
{
    (void)state;
    attention_case(2, 5, 8, 2, 1, NULL, NULL, NULL);
    attention_case(1, 9, 12, 1, 1, NULL, NULL, NULL);
    attention_case(2, 16, 32, 4, 0, NULL, NULL, NULL);
    attention_case(1, 1, 4, 2, 1, NULL, NULL, NULL);
}

static void test_attention_determinism(void** state)
{
    (void)state;
    float *a, *b, *c, *sa, *sb, *sc;
    uint64_t seed = g_rng;
    attention_case(2, 7, 16, 2, 0, NULL, &a, &sa);
    g_rng = seed;
    attention_case(2, 7, 16, 2, 0, NULL, &b, &sb);
    g_rng = seed;
    size_t one = 1;
    attention_case(2, 7, 16, 2, 0, &one, &c, &sc);
    check_bits("attention dqkv rerun", a, b, 2 * 7 * 48);
    check_bits("attention dqkv local size 1", a, c, 2 * 7 * 48);
    check_bits("attention dS rerun", sa, sb, 2 * 2 * 7 * 7);
    check_bits("attention dS local size 1", sa, sc, 2 * 2 * 7 * 7);
    free(a); free(b); free(c); free(sa); free(sb); free(sc);
}

/* ---- optimizers ---------------------------------------------------------- */

static void test_sgd(void** state)
{
    (void)state;
    const int n = 5000;
    const double lr = 0.05, mom = 0.9, gs = 0.7;
    for (int wdi = 0; wdi < 2; ++wdi) {
        double wd = wdi ? 0.01 : 0.0;
        float* p = randf(n, 1.0);
        float* v = falloc(n);
        float* kp = falloc(n);
        float* kv = falloc(n);
        double* pd = f2d(p, n);
        double* vd = dalloc(n);
        dbuf bp = dev_f(p, n), bv = dev_f(v, n);
        for (int step = 0; step < 4; ++step) {
            float* g = randf(n, 1.0);
            double* gd = f2d(g, n);
            dbuf bg = dev_f(g, n);
            run("mpar_sgd_step", n, "BBBlffff", &bp, &bg, &bv, (size_t)n, lr, mom, wd, gs);
            ref_sgd_step(pd, gd, vd, n, (double)(float)lr, (double)(float)mom, (double)(float)wd, (double)(float)gs);
            dev_free(&bg); free(g); free(gd);
        }
        read_f(&bp, kp);
        read_f(&bv, kv);
        check_close("sgd p", kp, pd, n, 1e-6);
        check_close("sgd v", kv, vd, n, 1e-6);
        dev_free(&bp); dev_free(&bv);
        free(p); free(v); free(kp); free(kv); free(pd); free(vd);
    }
}

static void test_adamw(void** state)
{
    (void)state;
    const int n = 5000;
    const float lr = 1e-2f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.1f, gs = 0.5f;
    float* p = randf(n, 1.0);
    float* kp = falloc(n);
    float* km = falloc(n);
    float* kv = falloc(n);
    double* pd = f2d(p, n);
    double* md = dalloc(n);
    double* vd = dalloc(n);
    dbuf bp = dev_f(p, n), bm = dev_f(km, n), bv = dev_f(kv, n);
    for (int t = 1; t <= 5; ++t) {
        float c1 = (float)(1.0 - pow(b1, t)), c2 = (float)(1.0 - pow(b2, t));
        float* g = randf(n, 1.0);
        double* gd = f2d(g, n);
        dbuf bg = dev_f(g, n);
        run("mpar_adamw_step", n, "BBBBlffffffff", &bp, &bg, &bm, &bv, (size_t)n,
            (double)lr, (double)b1, (double)b2, (double)eps, (double)wd, (double)c1, (double)c2, (double)gs);
        ref_adamw_step(pd, gd, md, vd, n, lr, b1, b2, eps, wd, c1, c2, gs);
        dev_free(&bg); free(g); free(gd);
    }
    read_f(&bp, kp);
    read_f(&bm, km);
    read_f(&bv, kv);
    check_close("adamw p", kp, pd, n, 1e-6);
    check_close("adamw m", km, md, n, 1e-6);
    check_close("adamw v", kv, vd, n, 1e-6);
    dev_free(&bp); dev_free(&bm); dev_free(&bv);
    free(p); free(kp); free(km); free(kv); free(pd); free(md); free(vd);
}

static void test_sumsq(void** state)
{
    (void)state;
    const int n1 = 10000, n2 = 4096, k1 = (n1 + 4095) / 4096, k2 = (n2 + 4095) / 4096;
    float* g1 = randf(n1, 1.0);
    float* g2 = randf(n2, 3.0);
    float* part = falloc(k1 + k2);
    float* sum = falloc(1);
    double* g1d = f2d(g1, n1);
    double* g2d = f2d(g2, n2);
    double want[4];
    want[0] = ref_sumsq(g1d, 4096);
    want[1] = ref_sumsq(g1d + 4096, 4096);
    want[2] = ref_sumsq(g1d + 8192, n1 - 8192);
    want[3] = ref_sumsq(g2d, n2);
    double total = want[0] + want[1] + want[2] + want[3];
    /* one stage's gradients: layer 0 (n1), a layer without parameters,
       layer 2 (n2), in one buffer (dev_f puts it at an offset) */
    const cl_ulong table[8] = {0, n1, n1, n1 + n2, 0, k1, k1, k1 + k2};
    float* g = falloc(n1 + n2);
    float* norms = falloc(3);
    memcpy(g, g1, sizeof(float) * (size_t)n1);
    memcpy(g + n1, g2, sizeof(float) * (size_t)n2);
    dbuf bg = dev_f(g, n1 + n2), bt = dev_u64(table, 8), bp = dev_f(NULL, k1 + k2), bn = dev_f(NULL, 3);
    run("mpar_sumsq_layers_partial", k1 + k2, "BBiB", &bg, &bt, 3, &bp);
    run("mpar_sumsq_layers_final", 3, "BBiB", &bp, &bt, 3, &bn);
    read_f(&bp, part);
    read_f(&bn, norms);
    for (int k = 0; k < 4; ++k) {
        double e = fabs(part[k] - want[k]) / want[k];
        if (!(e <= 1e-5)) {
            print_error("sumsq partial %d = %.9g want %.9g\n", k, (double)part[k], want[k]);
            fail();
        }
    }
    {
        /* per layer: its own chunks, in order (exactly, as the host sums them) */
        float l0 = 0.0f;
        l0 += part[0], l0 += part[1], l0 += part[2];
        assert_true(norms[0] == l0);
        assert_true(norms[1] == 0.0f);
        assert_true(norms[2] == part[3]);
    }
    sum[0] = norms[0] + norms[1] + norms[2];
    dbuf bg2 = dev_f(g2, n2);
    check_close("sum_final", sum, &total, 1, 1e-5);

    /* clip: grad_scale applied through mpar_scale */
    double clip = 0.5 / sqrt(total);
    run("mpar_scale", n2, "Blf", &bg2, (size_t)n2, clip);
    float* out = falloc(n2);
    read_f(&bg2, out);
    for (int i = 0; i < n2; ++i) g2d[i] *= (double)(float)clip;
    check_close("clip scale", out, g2d, n2, 1e-7);

    dev_free(&bg); dev_free(&bt); dev_free(&bn); dev_free(&bg2); dev_free(&bp);
    free(g1); free(g2); free(g); free(norms); free(part); free(sum); free(g1d); free(g2d); free(out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vector_ops),
        cmocka_unit_test(test_activations),
        cmocka_unit_test(test_dropout),
        cmocka_unit_test(test_bias),
        cmocka_unit_test(test_layernorm),
        cmocka_unit_test(test_layernorm_stability),
        cmocka_unit_test(test_xent),
        cmocka_unit_test(test_xent_stability),
        cmocka_unit_test(test_embedding),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_attention_determinism),
        cmocka_unit_test(test_sgd),
        cmocka_unit_test(test_adamw),
        cmocka_unit_test(test_sumsq),
    };
    return cmocka_run_group_tests_name("mpar kernels", tests, group_setup, group_teardown);
}
