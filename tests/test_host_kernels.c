/* test_host_kernels.c - every host kernel in mpar.h (mpar__host_kernels[],
   what CPU devices run on the host route) against its OpenCL kernel in
   kernels/<file>.cl, run with raw OpenCL on PoCL.

   Each case fills whole buffers with random values (the words before the
   offset and GUARD words after the range too, so a stray write on either
   side shows), runs the kernel on the device and the host function on a copy
   with the same arguments and global size, then compares every buffer word
   for word. Cases cover offsets, in-place (aliased) arguments, int buffers
   (tokens, targets, with out-of-range values), padded (g0 > n) and short
   (g0 < n) ranges, rows with a large common offset, and dropout's p = 0 / 1.

   What is asserted (exit status 1 on any failure, 2 when OpenCL or the
   kernel files cannot be used):
   1. Bit-identity. mpar.h is compiled here with MPAR__HK_FMA 1: where a
      kernel adds a product (MPAR__HK_MAD), the host uses fmaf, as PoCL's
      LLVM contracts it on FMA CPUs (a probe kernel checks that the device
      does; a failure says so when it does not). Of the operations the
      kernels use, only the transcendental built-ins (tanh, exp, log) are not
      correctly rounded on the device (division and sqrt are, as on the
      host), so they are replaced by the device's own values for the same
      inputs (see "built-ins" below). With that, every word of every buffer
      of every case must have the device's bits: any difference is the host
      code's (a formula, an order of additions, a guard, an offset, a bound).
   2. Coverage. Every entry of mpar__host_kernels[] has cases, and its
      kernel changed some words in them (no comparison of untouched buffers
      passes by itself), so a host kernel added to mpar.h without cases here
      fails; each case's argument letters give exactly the kernel's argument
      count.
   3. libm built-ins within tolerance. The same host code with libm's tanhf,
      expf and logf (what the host route calls): every float within 1e-5 of
      the device's, relative to itself or to the largest |value| of its
      buffer (the latter where a result cancels, as 1 + tanh(x) for x << 0 in
      GELU does); ints and NaNs exact. 1 proves the code but, by
      substituting, says nothing about how far libm is from the device's
      built-ins; 3 bounds that, the difference left between the host route
      and the OpenCL route. It costs one more host run per case.
   Not covered: mpar's default MPAR__HK_FMA 0 (a multiply, then an add). It
   cannot be compiled into the same file, and its difference is the rounding
   of the product alone.

   Built-ins: a call with an input already evaluated on the device returns
   the device's value; any other input is recorded (and answered by libm).
   The recorded inputs are then evaluated by tiny kernels and the host
   function run again, until a run records nothing new (an input can depend
   on an earlier result: log of a sum of exps).

   Run from the repository root: tests/test_host_kernels [seed]. Kernels
   come from the first folder of MPAR_KERNEL_PATH, else ./kernels; the
   device is the first CPU device of the first platform (POCL_DEVICES=basic).
   The seed is fixed unless given, so a run is reproducible. */

/* The host kernels call these through MPAR__HK_TANHF/EXPF/LOGF; defined
   below, after mpar.h. */
static float builtin_tanhf(float x);
static float builtin_expf(float x);
static float builtin_logf(float x);
#define MPAR__HK_FMA 1
#define MPAR__HK_TANHF builtin_tanhf
#define MPAR__HK_EXPF builtin_expf
#define MPAR__HK_LOGF builtin_logf
#define MPAR_IMPLEMENTATION
#include "mpar.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* LeakSanitizer reads this hook at exit. PoCL and the LLVM inside it keep
   compiler state alive until the process ends; only leaks whose stack runs
   through those libraries are suppressed, ours are still reported. */
const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

/* AddressSanitizer reads this hook at start; ASAN_OPTIONS still overrides
   it. On glibc >= 2.25 LeakSanitizer can take a dynamic TLS block (of a
   library loaded with dlopen) for an old glibc's layout and scan a bogus
   range; its tracer then dies at exit with "Tracer caught signal 11"
   (google/sanitizers#1322). Whether it happens depends on addresses only:
   this test hit it with POCL_DEVICES="basic basic". Not tracking
   __tls_get_addr avoids it. Dynamic TLS is then not scanned for pointers,
   which can only add reports, never hide a leak (this file keeps nothing in
   thread-local storage). */
const char* __asan_default_options(void);
const char* __asan_default_options(void) { return "intercept_tls_get_addr=0"; }

#define NKERN (sizeof mpar__host_kernels / sizeof mpar__host_kernels[0])
#define MAX_ARGS 16
#define GUARD 4      /* words after each buffer's range */
#define TOL 1e-5     /* libm built-ins: relative to the value or to the buffer's largest */
#define MAX_PASSES 8 /* built-in substitution: host runs before giving up */

/* ---- failures that stop the test ---- */

static void fatal(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("host_kernels: FATAL: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void check_cl(cl_int st, const char* what) {
    if (st != CL_SUCCESS) fatal("%s failed (%d)", what, (int)st);
}

static void* xmalloc(size_t bytes) {
    void* p = malloc(bytes ? bytes : 1);
    if (!p) fatal("out of memory");
    return p;
}

static void* xrealloc(void* p, size_t bytes) {
    p = realloc(p, bytes ? bytes : 1);
    if (!p) fatal("out of memory");
    return p;
}

/* ---- random numbers: xorshift64*, fixed seed ---- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint32_t rnd32(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545f4914f6cdd1dull) >> 32);
}
/* Uniform in [lo, hi), 24 random bits. */
static float rndf(float lo, float hi) { return lo + (hi - lo) * (float)(rnd32() >> 8) * (1.0f / 16777216.0f); }
/* Uniform in [lo, hi]. */
static int rndi(int lo, int hi) { return lo + (int)(rnd32() % (uint32_t)(hi - lo + 1)); }

/* ---- OpenCL ---- */

static char kernel_dir[1024] = "kernels";
static cl_device_id device;
static cl_context context;
static cl_command_queue queue;
static char device_name[256];

/* Built programs by file name; MATH_FILE is the test's own source. */
#define MATH_FILE "<test built-ins>"
static struct {
    const char* file;
    cl_program prog;
} programs[8];
static int program_count;

/* tanh/exp/log as the device computes them, and a probe of contraction. */
static const char* const math_source =
    "__kernel void t_tanh(__global const float* x, __global float* y, int n)\n"
    "{ int i = (int)get_global_id(0); if (i < n) y[i] = tanh(x[i]); }\n"
    "__kernel void t_exp(__global const float* x, __global float* y, int n)\n"
    "{ int i = (int)get_global_id(0); if (i < n) y[i] = exp(x[i]); }\n"
    "__kernel void t_log(__global const float* x, __global float* y, int n)\n"
    "{ int i = (int)get_global_id(0); if (i < n) y[i] = log(x[i]); }\n"
    "__kernel void t_mad(__global float* y, float a, float b, float c)\n"
    "{ y[0] = a * b + c; }\n";
static const char* const math_kernel[3] = {"t_tanh", "t_exp", "t_log"};

static char* read_text(const char* path, size_t* len) {
    FILE* f = fopen(path, "rb");
    char* s;
    long n;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return NULL;
    }
    s = (char*)xmalloc((size_t)n + 1);
    if (fread(s, 1, (size_t)n, f) != (size_t)n) {
        fclose(f);
        free(s);
        return NULL;
    }
    s[n] = '\0';
    fclose(f);
    *len = (size_t)n;
    return s;
}

/* The program of a kernel file, built on first use with mpar's default
   build options (""), since those are what the device route uses. */
static cl_program program(const char* file) {
    char path[1200];
    char* src;
    size_t len;
    cl_int st;
    cl_program p;
    int i;
    for (i = 0; i < program_count; i++)
        if (!strcmp(programs[i].file, file)) return programs[i].prog;
    if ((size_t)program_count == sizeof programs / sizeof programs[0]) fatal("too many kernel files");
    snprintf(path, sizeof path, "%s/%s", kernel_dir, file);
    if (!strcmp(file, MATH_FILE)) {
        len = strlen(math_source);
        src = (char*)xmalloc(len + 1);
        memcpy(src, math_source, len + 1);
    } else if (!(src = read_text(path, &len))) {
        fatal("cannot read %s (run from the repository root, or set MPAR_KERNEL_PATH)", path);
    }
    p = clCreateProgramWithSource(context, 1, (const char**)&src, &len, &st);
    free(src);
    check_cl(st, "clCreateProgramWithSource");
    st = clBuildProgram(p, 1, &device, "", NULL, NULL);
    if (st != CL_SUCCESS) {
        char log[8192] = "";
        clGetProgramBuildInfo(p, device, CL_PROGRAM_BUILD_LOG, sizeof log - 1, log, NULL);
        fprintf(stderr, "build log of %s:\n%s\n", file, log);
        clReleaseProgram(p);
        fatal("clBuildProgram(%s) failed (%d)", file, (int)st);
    }
    programs[program_count].file = file;
    programs[program_count].prog = p;
    program_count++;
    return p;
}

static void cl_setup(void) {
    cl_platform_id platform;
    cl_uint n = 0;
    cl_int st;
    const char* path = getenv("MPAR_KERNEL_PATH");
    if (path && *path) {
        size_t len = strcspn(path, ":");
        if (len > 0 && len < sizeof kernel_dir) {
            memcpy(kernel_dir, path, len);
            kernel_dir[len] = '\0';
        }
    }
    st = clGetPlatformIDs(1, &platform, &n);
    if (st != CL_SUCCESS || n == 0) fatal("no OpenCL platform (%d)", (int)st);
    st = clGetDeviceIDs(platform, CL_DEVICE_TYPE_CPU, 1, &device, NULL);
    if (st != CL_SUCCESS) fatal("no CPU device on the first platform (%d); run with POCL_DEVICES=basic", (int)st);
    clGetDeviceInfo(device, CL_DEVICE_NAME, sizeof device_name - 1, device_name, NULL);
    context = clCreateContext(NULL, 1, &device, NULL, NULL, &st);
    check_cl(st, "clCreateContext");
    queue = clCreateCommandQueue(context, device, 0, &st);
    check_cl(st, "clCreateCommandQueue");
}

/* Whether the device rounds a * b + c once: with a = b = 1 + 2^-12 and
   c = -1 the product's last bit (2^-24) survives only in a fused result.
   Bit-identity with MPAR__HK_FMA 1 needs it; a failure says so when not. */
static int device_contracts(void) {
    float a = 1.0f + 1.0f / 4096.0f, b = a, c = -1.0f, y = 0.0f;
    size_t one = 1;
    cl_int st;
    cl_mem ym = clCreateBuffer(context, CL_MEM_WRITE_ONLY, sizeof y, NULL, &st);
    cl_kernel k;
    check_cl(st, "clCreateBuffer");
    k = clCreateKernel(program(MATH_FILE), "t_mad", &st);
    check_cl(st, "clCreateKernel(t_mad)");
    st = clSetKernelArg(k, 0, sizeof ym, &ym);
    if (st == CL_SUCCESS) st = clSetKernelArg(k, 1, sizeof a, &a);
    if (st == CL_SUCCESS) st = clSetKernelArg(k, 2, sizeof b, &b);
    if (st == CL_SUCCESS) st = clSetKernelArg(k, 3, sizeof c, &c);
    if (st == CL_SUCCESS) st = clEnqueueNDRangeKernel(queue, k, 1, NULL, &one, NULL, 0, NULL, NULL);
    if (st == CL_SUCCESS) st = clEnqueueReadBuffer(queue, ym, CL_TRUE, 0, sizeof y, &y, 0, NULL, NULL);
    check_cl(st, "t_mad");
    clReleaseKernel(k);
    clReleaseMemObject(ym);
    return y == fmaf(a, b, c);
}

/* ---- built-ins: libm's, or the device's values ---- */

enum { LIBM = 0, DEVICE = 1 };
static int builtin_mode;

/* Per function: the inputs evaluated on the device so far (sorted by their
   bits) with their results, and the inputs met since the last flush. */
static struct builtin_table {
    uint32_t *in, *out;
    int n, cap;
    float* pending;
    int pending_n, pending_cap;
} tables[3];

static float builtin(int f, float x, float (*libm)(float)) {
    struct builtin_table* t = &tables[f];
    uint32_t bits;
    int lo = 0, hi = t->n;
    if (builtin_mode == LIBM) return libm(x);
    memcpy(&bits, &x, sizeof bits);
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (t->in[mid] < bits)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < t->n && t->in[lo] == bits) {
        float y;
        memcpy(&y, &t->out[lo], sizeof y);
        return y;
    }
    if (t->pending_n == t->pending_cap) {
        t->pending_cap = t->pending_cap ? 2 * t->pending_cap : 1024;
        t->pending = (float*)xrealloc(t->pending, sizeof(float) * (size_t)t->pending_cap);
    }
    t->pending[t->pending_n++] = x;
    return libm(x); /* a placeholder: this run is repeated */
}
static float builtin_tanhf(float x) { return builtin(0, x, tanhf); }
static float builtin_expf(float x) { return builtin(1, x, expf); }
static float builtin_logf(float x) { return builtin(2, x, logf); }

static int cmp_pair(const void* a, const void* b) {
    uint32_t x = *(const uint32_t*)a, y = *(const uint32_t*)b;
    return x < y ? -1 : x > y;
}

/* Evaluates every pending input on the device and merges the results into
   the tables. Returns how many inputs were pending. */
static int builtins_flush(void) {
    int f, total = 0;
    cl_int st;
    for (f = 0; f < 3; f++) {
        struct builtin_table* t = &tables[f];
        int n = t->pending_n, m = t->n + n, i, k;
        size_t g = (size_t)n;
        cl_mem xm, ym;
        cl_kernel kern;
        float* y;
        uint32_t* pairs;
        if (n == 0) continue;
        total += n;
        y = (float*)xmalloc(sizeof(float) * g);
        xm = clCreateBuffer(context, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR, sizeof(float) * g, t->pending, &st);
        check_cl(st, "clCreateBuffer");
        ym = clCreateBuffer(context, CL_MEM_WRITE_ONLY, sizeof(float) * g, NULL, &st);
        check_cl(st, "clCreateBuffer");
        kern = clCreateKernel(program(MATH_FILE), math_kernel[f], &st);
        check_cl(st, "clCreateKernel");
        st = clSetKernelArg(kern, 0, sizeof xm, &xm);
        if (st == CL_SUCCESS) st = clSetKernelArg(kern, 1, sizeof ym, &ym);
        if (st == CL_SUCCESS) st = clSetKernelArg(kern, 2, sizeof n, &n);
        if (st == CL_SUCCESS) st = clEnqueueNDRangeKernel(queue, kern, 1, NULL, &g, NULL, 0, NULL, NULL);
        if (st == CL_SUCCESS)
            st = clEnqueueReadBuffer(queue, ym, CL_TRUE, 0, sizeof(float) * g, y, 0, NULL, NULL);
        check_cl(st, math_kernel[f]);
        clReleaseKernel(kern);
        clReleaseMemObject(xm);
        clReleaseMemObject(ym);
        /* (input, result) pairs, old and new, sorted by input; duplicates
           (the same input met twice before a flush) dropped */
        pairs = (uint32_t*)xmalloc(sizeof(uint32_t) * 2 * (size_t)m);
        for (i = 0; i < t->n; i++) pairs[2 * i] = t->in[i], pairs[2 * i + 1] = t->out[i];
        for (i = 0; i < n; i++) {
            memcpy(&pairs[2 * (t->n + i)], &t->pending[i], sizeof(uint32_t));
            memcpy(&pairs[2 * (t->n + i) + 1], &y[i], sizeof(uint32_t));
        }
        qsort(pairs, (size_t)m, 2 * sizeof(uint32_t), cmp_pair);
        if (t->cap < m) {
            t->cap = 2 * m;
            t->in = (uint32_t*)xrealloc(t->in, sizeof(uint32_t) * (size_t)t->cap);
            t->out = (uint32_t*)xrealloc(t->out, sizeof(uint32_t) * (size_t)t->cap);
        }
        for (i = 0, k = 0; i < m; i++) {
            if (k > 0 && t->in[k - 1] == pairs[2 * i]) continue;
            t->in[k] = pairs[2 * i], t->out[k] = pairs[2 * i + 1], k++;
        }
        t->n = k;
        t->pending_n = 0;
        free(pairs);
        free(y);
    }
    return total;
}

/* ---- results per kernel, for each kind of built-ins ---- */

static struct kernel_result {
    int cases;
    long words;      /* buffer words compared */
    long changed;    /* of those, words the device changed */
    long mismatches; /* words whose bits differ */
    long out_of_tol; /* LIBM: mismatches beyond TOL, in ints, NaN on one side */
    double max_rel, max_norm;
    int unsettled;   /* DEVICE: the substitution did not settle */
    char first[200]; /* the first failing word: DEVICE any mismatch, LIBM one beyond TOL */
} results[2][NKERN];

/* ---- one case ----
   tc_begin, then the arguments in the order of the kernel's letters
   (tc_fbuf / tc_ibuf / tc_u64buf / tc_alias for 'B', tc_int 'i', tc_uint
   'u', tc_float 'f', tc_size 'l'), then tc_run. Buffers hold 4-byte words
   (float or int32; a tc_u64buf's cl_ulongs are two words each). */
static struct {
    const char *file, *name, *letters;
    size_t g0;
    int nargs;
    int is_int[MAX_ARGS], off[MAX_ARGS], total[MAX_ARGS]; /* off, total: in words */
    int alias[MAX_ARGS]; /* -1, or the earlier argument this one shares */
    uint32_t* data[MAX_ARGS];
    mpar__harg val[MAX_ARGS];
} tc;
static int total_cases;

static void tc_begin(const char* file, const char* name, const char* letters, size_t g0) {
    memset(&tc, 0, sizeof tc);
    tc.file = file, tc.name = name, tc.letters = letters, tc.g0 = g0;
}

static int tc_next(char want) {
    int k = tc.nargs++;
    if (k >= MAX_ARGS || k >= (int)strlen(tc.letters) || tc.letters[k] != want)
        fatal("%s: argument %d is not '%c' in \"%s\"", tc.name, k, want, tc.letters);
    tc.alias[k] = -1;
    return k;
}

/* A float buffer of `elems` elements at offset `off`, every word uniform in
   [lo, hi). Returns the element at the offset, for a case to adjust. */
static float* tc_fbuf(int elems, int off, float lo, float hi) {
    int k = tc_next('B'), i;
    tc.off[k] = off;
    tc.total[k] = off + elems + GUARD;
    tc.data[k] = (uint32_t*)xmalloc(sizeof(uint32_t) * (size_t)tc.total[k]);
    for (i = 0; i < tc.total[k]; i++) {
        float f = rndf(lo, hi);
        memcpy(&tc.data[k][i], &f, sizeof f);
    }
    return (float*)(void*)(tc.data[k] + off);
}

/* An int32 buffer, every word uniform in [lo, hi]. */
static int32_t* tc_ibuf(int elems, int off, int lo, int hi) {
    int k = tc_next('B'), i;
    tc.is_int[k] = 1;
    tc.off[k] = off;
    tc.total[k] = off + elems + GUARD;
    tc.data[k] = (uint32_t*)xmalloc(sizeof(uint32_t) * (size_t)tc.total[k]);
    for (i = 0; i < tc.total[k]; i++) tc.data[k][i] = (uint32_t)rndi(lo, hi);
    return (int32_t*)(void*)(tc.data[k] + off);
}

/* A cl_ulong buffer (the layer table of mpar_sumsq_layers_*), filled from
   `values`, at offset 0: the kernel counts its offset in ulongs, the host
   route in 4-byte words, and mpar passes the table at 0. */
static void tc_u64buf(const cl_ulong* values, int elems) {
    int k = tc_next('B');
    tc.is_int[k] = 1;
    tc.off[k] = 0;
    tc.total[k] = 2 * elems + GUARD;
    tc.data[k] = (uint32_t*)xmalloc(sizeof(uint32_t) * (size_t)tc.total[k]);
    memset(tc.data[k], 0, sizeof(uint32_t) * (size_t)tc.total[k]);
    memcpy(tc.data[k], values, sizeof(cl_ulong) * (size_t)elems);
}

/* This 'B' argument is the same buffer and offset as argument `of`. */
static void tc_alias(int of) { tc.alias[tc_next('B')] = of; }
static void tc_int(int v) { tc.val[tc_next('i')].i = v; }
static void tc_size(size_t v) { tc.val[tc_next('l')].z = v; }
static void tc_uint(unsigned v) { tc.val[tc_next('u')].u = v; }
static void tc_float(float v) { tc.val[tc_next('f')].f = v; }

static int kernel_index(const char* file, const char* name) {
    size_t i;
    for (i = 0; i < NKERN; i++)
        if (!strcmp(mpar__host_kernels[i].file, file) && !strcmp(mpar__host_kernels[i].name, name)) return (int)i;
    return -1;
}

/* Compares every device buffer with the host's, in full. */
static void compare(int mode, struct kernel_result* r, uint32_t** devr, uint32_t** host) {
    int k, i;
    for (k = 0; k < tc.nargs; k++) {
        double largest = 0.0; /* the largest |device value| in this buffer */
        if (!host[k]) continue;
        if (!tc.is_int[k])
            for (i = 0; i < tc.total[k]; i++) {
                float f;
                memcpy(&f, &devr[k][i], sizeof f);
                if (fabs((double)f) > largest) largest = fabs((double)f);
            }
        for (i = 0; i < tc.total[k]; i++) {
            uint32_t d = devr[k][i], h = host[k][i];
            float fd, fh;
            r->words++;
            if (d != tc.data[k][i]) r->changed++;
            if (d == h) continue;
            r->mismatches++;
            memcpy(&fd, &d, sizeof fd);
            memcpy(&fh, &h, sizeof fh);
            if (mode == LIBM) {
                int ok;
                if (tc.is_int[k] || isnan(fd) || isnan(fh)) {
                    ok = !tc.is_int[k] && isnan(fd) && isnan(fh);
                } else {
                    double diff = fabs((double)fd - (double)fh);
                    double rel = diff / fmax(fabs((double)fd), fabs((double)fh));
                    double norm = largest > 0.0 ? diff / largest : INFINITY;
                    if (rel > r->max_rel) r->max_rel = rel;
                    if (norm > r->max_norm) r->max_norm = norm;
                    ok = rel < TOL || norm < TOL;
                }
                if (ok) continue;
                r->out_of_tol++;
            }
            if (!r->first[0])
                snprintf(r->first, sizeof r->first,
                         "case %d, argument %d, word %d (offset %d): device 0x%08x (%.9g), host 0x%08x (%.9g)",
                         r->cases, k, i, tc.off[k], (unsigned)d, (double)fd, (unsigned)h, (double)fh);
        }
    }
}

/* Runs the case on the device, then on the host with each kind of built-ins,
   and compares; frees the case's buffers. */
static void tc_run(void) {
    int ki = kernel_index(tc.file, tc.name), k, mode;
    cl_kernel kern;
    cl_mem mem[MAX_ARGS];
    uint32_t* host[MAX_ARGS];
    uint32_t* devr[MAX_ARGS];
    cl_uint argi = 0, kernel_args = 0;
    cl_int st;
    if (ki < 0) fatal("%s/%s is not in mpar__host_kernels", tc.file, tc.name);
    if (tc.nargs != (int)strlen(tc.letters)) fatal("%s: %d arguments for \"%s\"", tc.name, tc.nargs, tc.letters);
    kern = clCreateKernel(program(tc.file), tc.name, &st);
    check_cl(st, tc.name);
    for (k = 0; k < tc.nargs; k++) {
        mem[k] = NULL, host[k] = devr[k] = NULL;
        if (tc.letters[k] == 'B' && tc.alias[k] < 0) {
            size_t bytes = sizeof(uint32_t) * (size_t)tc.total[k];
            mem[k] = clCreateBuffer(context, CL_MEM_READ_WRITE | CL_MEM_COPY_HOST_PTR, bytes, tc.data[k], &st);
            check_cl(st, "clCreateBuffer");
            host[k] = (uint32_t*)xmalloc(bytes);
            devr[k] = (uint32_t*)xmalloc(bytes);
        }
    }
    /* device: each 'B' is two kernel arguments, the buffer and a ulong
       offset; 'l' one ulong */
    for (k = 0; k < tc.nargs; k++) {
        char l = tc.letters[k];
        if (l == 'B') {
            int b = tc.alias[k] < 0 ? k : tc.alias[k];
            cl_ulong off = (cl_ulong)tc.off[b];
            st = clSetKernelArg(kern, argi++, sizeof(cl_mem), &mem[b]);
            if (st == CL_SUCCESS) st = clSetKernelArg(kern, argi++, sizeof off, &off);
        } else if (l == 'l') {
            cl_ulong v = (cl_ulong)tc.val[k].z;
            st = clSetKernelArg(kern, argi++, sizeof v, &v);
        } else if (l == 'i') {
            st = clSetKernelArg(kern, argi++, sizeof(int), &tc.val[k].i);
        } else if (l == 'u') {
            cl_uint u = tc.val[k].u;
            st = clSetKernelArg(kern, argi++, sizeof u, &u);
        } else {
            st = clSetKernelArg(kern, argi++, sizeof(float), &tc.val[k].f);
        }
        check_cl(st, "clSetKernelArg");
    }
    check_cl(clGetKernelInfo(kern, CL_KERNEL_NUM_ARGS, sizeof kernel_args, &kernel_args, NULL), "clGetKernelInfo");
    if (kernel_args != argi)
        fatal("%s takes %u arguments, letters \"%s\" give %u", tc.name, (unsigned)kernel_args, tc.letters,
              (unsigned)argi);
    if (tc.g0 > 0) check_cl(clEnqueueNDRangeKernel(queue, kern, 1, NULL, &tc.g0, NULL, 0, NULL, NULL), tc.name);
    for (k = 0; k < tc.nargs; k++)
        if (mem[k])
            check_cl(clEnqueueReadBuffer(queue, mem[k], CL_TRUE, 0, sizeof(uint32_t) * (size_t)tc.total[k], devr[k],
                                         0, NULL, NULL),
                     "clEnqueueReadBuffer");

    /* host: the same arguments, pointers moved to the offsets */
    for (mode = LIBM; mode <= DEVICE; mode++) {
        struct kernel_result* r = &results[mode][ki];
        int pass;
        builtin_mode = mode;
        for (pass = 0;; pass++) {
            mpar__harg a[MAX_ARGS];
            for (k = 0; k < tc.nargs; k++)
                if (host[k]) memcpy(host[k], tc.data[k], sizeof(uint32_t) * (size_t)tc.total[k]);
            for (k = 0; k < tc.nargs; k++) {
                if (tc.letters[k] == 'B') {
                    int b = tc.alias[k] < 0 ? k : tc.alias[k];
                    a[k].p = host[b] + tc.off[b];
                } else {
                    a[k] = tc.val[k];
                }
            }
            mpar__host_kernels[ki].fn(a, tc.g0, 0);
            if (mode == LIBM || builtins_flush() == 0) break; /* this run used device values only */
            if (pass == MAX_PASSES) {
                r->unsettled++;
                break;
            }
        }
        compare(mode, r, devr, host);
        r->cases++;
    }
    total_cases++;
    for (k = 0; k < tc.nargs; k++) {
        if (mem[k]) clReleaseMemObject(mem[k]);
        free(host[k]);
        free(devr[k]);
        free(tc.data[k]);
    }
    clReleaseKernel(kern);
}

/* ---- the cases ---- */

static const int sizes[] = {1, 37, 1000};
#define NSIZES 3

static void cases_elementwise(void) {
    const uint32_t nan_bits = 0x7f800001u; /* rounds up to infinity unless kept a NaN */
    int si, pad;
    for (si = 0; si < NSIZES; si++)
        for (pad = 0; pad <= 5; pad += 5) {
            int n = sizes[si];
            size_t g = (size_t)(n + pad); /* pad > 0: a rounded-up global size */
            float* x;

            tc_begin("elementwise.cl", "mpar_fill", "Blf", g);
            tc_fbuf(n, 3, -1, 1), tc_size((size_t)n), tc_float(rndf(-2, 2)), tc_run();
            tc_begin("elementwise.cl", "mpar_scale", "Blf", g);
            tc_fbuf(n, 5, -1, 1), tc_size((size_t)n), tc_float(rndf(-2, 2)), tc_run();
            tc_begin("elementwise.cl", "mpar_axpy", "BBlf", g);
            tc_fbuf(n, 2, -1, 1), tc_fbuf(n, 7, -1, 1), tc_size((size_t)n), tc_float(rndf(-2, 2)), tc_run();
            tc_begin("elementwise.cl", "mpar_copy", "BBl", g);
            tc_fbuf(n, 4, -1, 1), tc_fbuf(n, 1, -1, 1), tc_size((size_t)n), tc_run();
            tc_begin("elementwise.cl", "mpar_copy", "BBl", g); /* in place */
            tc_fbuf(n, 4, -1, 1), tc_alias(0), tc_size((size_t)n), tc_run();
            tc_begin("elementwise.cl", "mpar_add", "BBBl", g);
            tc_fbuf(n, 1, -1, 1), tc_fbuf(n, 6, -1, 1), tc_fbuf(n, 3, -1, 1), tc_size((size_t)n), tc_run();
            tc_begin("elementwise.cl", "mpar_add", "BBBl", g); /* out aliases a */
            tc_fbuf(n, 1, -1, 1), tc_fbuf(n, 6, -1, 1), tc_alias(0), tc_size((size_t)n), tc_run();

            tc_begin("elementwise.cl", "mpar_round_bf16", "Bl", g);
            x = tc_fbuf(n, 3, -3, 3);
            if (n > 4) x[0] = 1.0f + 1.0f / 256, x[1] = 1.0f + 3.0f / 256, x[2] = 3.4e38f, x[3] = -0.0f; /* ties, overflow */
            if (n > 5) memcpy(&x[4], &nan_bits, 4), x[5] = 1e-40f; /* a NaN with low bits only, a subnormal */
            tc_size((size_t)n), tc_run();
            tc_begin("elementwise.cl", "mpar_pack_bf16", "BBl", g);
            x = tc_fbuf(n, 2, -3, 3);
            if (n > 4) x[0] = 1.0f + 1.0f / 256, x[1] = 1.0f + 3.0f / 256, x[2] = 3.4e38f, x[3] = -0.0f;
            tc_fbuf((n + 1) / 2, 5, -1, 1), tc_size((size_t)n), tc_run();
            tc_begin("elementwise.cl", "mpar_unpack_bf16", "BBl", g);
            tc_fbuf((n + 1) / 2, 4, -3, 3), tc_fbuf(n, 1, -1, 1), tc_size((size_t)n), tc_run();

            tc_begin("elementwise.cl", "mpar_relu_fwd", "BBl", g);
            x = tc_fbuf(n, 3, -2, 2);
            x[0] = -0.0f; /* the sign of a zero output must match too */
            if (n > 1) x[1] = 0.0f;
            tc_fbuf(n, 9, -1, 1), tc_size((size_t)n), tc_run();
            tc_begin("elementwise.cl", "mpar_relu_bwd", "BBBl", g);
            x = tc_fbuf(n, 2, -2, 2);
            x[0] = 0.0f;
            tc_fbuf(n, 5, -1, 1), tc_fbuf(n, 8, -1, 1), tc_size((size_t)n), tc_run();

            tc_begin("elementwise.cl", "mpar_gelu_fwd", "BBl", g);
            tc_fbuf(n, 3, -6, 6), tc_fbuf(n, 1, -1, 1), tc_size((size_t)n), tc_run();
            tc_begin("elementwise.cl", "mpar_gelu_fwd", "BBl", g); /* in place */
            tc_fbuf(n, 3, -6, 6), tc_alias(0), tc_size((size_t)n), tc_run();
            tc_begin("elementwise.cl", "mpar_gelu_bwd", "BBBl", g);
            tc_fbuf(n, 3, -6, 6), tc_fbuf(n, 2, -1, 1), tc_fbuf(n, 5, -1, 1), tc_size((size_t)n), tc_run();
            tc_begin("elementwise.cl", "mpar_tanh_fwd", "BBl", g);
            tc_fbuf(n, 3, -5, 5), tc_fbuf(n, 4, -1, 1), tc_size((size_t)n), tc_run();
            tc_begin("elementwise.cl", "mpar_tanh_bwd", "BBBl", g);
            tc_fbuf(n, 3, -1, 1), tc_fbuf(n, 2, -1, 1), tc_fbuf(n, 7, -1, 1), tc_size((size_t)n), tc_run();
        }
}

static void cases_dropout(void) {
    static const float ps[] = {0.0f, 0.1f, 0.5f, 0.9f, 1.0f};
    /* idx_off: the counter is its low 32 bits plus i, and wraps */
    static const size_t idx[] = {0, 12345, (size_t)-5, 2147483647, ((size_t)3 << 31) + 5};
    int si, pi, bwd;
    for (bwd = 0; bwd < 2; bwd++)
        for (si = 0; si < NSIZES; si++)
            for (pi = 0; pi < 5; pi++) {
                int n = sizes[si];
                tc_begin("elementwise.cl", bwd ? "mpar_dropout_bwd" : "mpar_dropout_fwd", "BBlfuul",
                         (size_t)n + (size_t)(pi & 1) * 3);
                tc_fbuf(n, 3, -2, 2), tc_fbuf(n, 6, -1, 1), tc_size((size_t)n), tc_float(ps[pi]);
                tc_uint(rnd32()), tc_uint(rnd32()), tc_size(idx[(si + pi + bwd) % 5]), tc_run();
            }
}

static void cases_bias(void) {
    /* 70 and 130 columns: more than one MPAR__HK_COLS block */
    static const int rows_[] = {1, 3, 5}, cols_[] = {1, 7, 33, 70, 130};
    int ri, ci;
    for (ri = 0; ri < 3; ri++)
        for (ci = 0; ci < 5; ci++) {
            int r = rows_[ri], c = cols_[ci];
            tc_begin("elementwise.cl", "mpar_bias_add", "BiiB", (size_t)(r * c) + (size_t)(ci & 1) * 4);
            tc_fbuf(r * c, 5, -1, 1), tc_int(r), tc_int(c), tc_fbuf(c, 3, -1, 1), tc_run();
            tc_begin("elementwise.cl", "mpar_bias_grad", "BiiB", (size_t)c + (size_t)(ci & 1) * 2);
            tc_fbuf(r * c, 2, -1, 1), tc_int(r), tc_int(c), tc_fbuf(c, 7, -1, 1), tc_run();
            { /* bias + relu, gelu, tanh: values around gelu's cancellation too */
                int act;
                for (act = 1; act <= 3; act++) {
                    tc_begin("elementwise.cl", "mpar_bias_add_act", "BiiBBi", (size_t)(r * c) + (size_t)(ci & 1) * 4);
                    tc_fbuf(r * c, 5, -6, 4), tc_int(r), tc_int(c), tc_fbuf(c, 3, -1, 1), tc_fbuf(r * c, 2, -1, 1);
                    tc_int(act), tc_run();
                }
            }
        }
}

static void cases_embedding(void) {
    static const int Cs[] = {1, 7, 70};
    int ci, B;
    for (B = 1; B <= 3; B += 2)
        for (ci = 0; ci < 3; ci++) {
            int T = 5, C = Cs[ci], V = 11, rows = B * T;
            /* tokens in [-1, V]: -1 and V are out of range and skipped */
            tc_begin("embedding.cl", "mpar_embedding_fwd", "BBBBiiii", (size_t)(rows * C) + (size_t)ci);
            tc_ibuf(rows, 3, -1, V), tc_fbuf(V * C, 2, -1, 1), tc_fbuf(T * C, 5, -1, 1), tc_fbuf(rows * C, 1, -1, 1);
            tc_int(rows), tc_int(T), tc_int(C), tc_int(V), tc_run();
            tc_begin("embedding.cl", "mpar_embedding_bwd_wte", "BBBiii", (size_t)(V * C) + (size_t)ci);
            tc_ibuf(rows, 3, -1, V), tc_fbuf(rows * C, 2, -1, 1), tc_fbuf(V * C, 5, -1, 1);
            tc_int(rows), tc_int(C), tc_int(V), tc_run();
            tc_begin("embedding.cl", "mpar_embedding_bwd_wpe", "BBiii", (size_t)(T * C) + (size_t)ci);
            tc_fbuf(rows * C, 2, -1, 1), tc_fbuf(T * C, 5, -1, 1), tc_int(rows), tc_int(T), tc_int(C), tc_run();
        }
}

static void cases_layernorm(void) {
    static const int rows_[] = {1, 3, 5}, cols_[] = {1, 7, 33, 100};
    int ri, ci, inplace;
    for (ri = 0; ri < 3; ri++)
        for (ci = 0; ci < 4; ci++)
            for (inplace = 0; inplace < 2; inplace++) {
                int r = rows_[ri], c = cols_[ci], j;
                float* x;
                tc_begin("layernorm.cl", "mpar_layernorm_fwd", "BBBBBBiif", (size_t)r + (size_t)inplace);
                x = tc_fbuf(r * c, 3, -2, 2);
                for (j = 0; j < c; j++) x[j] += 1e4f; /* a row with a large common offset */
                tc_fbuf(c, 1, 0.5f, 1.5f), tc_fbuf(c, 4, -1, 1);
                if (inplace)
                    tc_alias(0);
                else
                    tc_fbuf(r * c, 2, -1, 1);
                tc_fbuf(r, 5, -1, 1), tc_fbuf(r, 6, -1, 1), tc_int(r), tc_int(c), tc_float(1e-5f), tc_run();

                tc_begin("layernorm.cl", "mpar_layernorm_bwd_input", "BBBBBBii", (size_t)r + (size_t)inplace);
                tc_fbuf(r * c, 2, -1, 1), tc_fbuf(r * c, 3, -2, 2), tc_fbuf(r, 1, -0.5f, 0.5f);
                tc_fbuf(r, 4, 0.5f, 2.0f), tc_fbuf(c, 7, 0.5f, 1.5f), tc_fbuf(r * c, 5, -1, 1);
                tc_int(r), tc_int(c), tc_run();

                tc_begin("layernorm.cl", "mpar_layernorm_bwd_weight", "BBBBBBii", (size_t)c + (size_t)inplace);
                tc_fbuf(r * c, 2, -1, 1), tc_fbuf(r * c, 3, -2, 2), tc_fbuf(r, 1, -0.5f, 0.5f);
                tc_fbuf(r, 4, 0.5f, 2.0f), tc_fbuf(c, 7, -1, 1), tc_fbuf(c, 5, -1, 1);
                tc_int(r), tc_int(c), tc_run();
            }
}

static void cases_loss(void) {
    static const int rows_[] = {1, 6}, classes[] = {2, 10, 37};
    static const int ns[] = {1, 7, 1000};
    int ri, ci, inplace, ni;
    for (ri = 0; ri < 2; ri++)
        for (ci = 0; ci < 3; ci++)
            for (inplace = 0; inplace < 2; inplace++) {
                int r = rows_[ri], c = classes[ci], j;
                int32_t* t;
                float* l;
                tc_begin("loss.cl", "mpar_xent_fwd", "BBBii", (size_t)r + (size_t)inplace * 3);
                l = tc_fbuf(r * c, 2, -5, 5);
                for (j = 0; j < c; j++) l[j] += 1e4f; /* exp would overflow without the max */
                t = tc_ibuf(r, 5, -1, c - 1);
                t[0] = 0;
                if (r > 2) t[1] = -1, t[2] = c; /* ignored: negative, and past the classes */
                tc_fbuf(r, 3, -1, 1), tc_int(r), tc_int(c), tc_run();

                tc_begin("loss.cl", "mpar_xent_bwd", "BBBiif", (size_t)r + (size_t)inplace * 3);
                l = tc_fbuf(r * c, 2, -5, 5);
                for (j = 0; j < c; j++) l[j] += 1e4f;
                t = tc_ibuf(r, 5, -1, c - 1);
                t[0] = c - 1;
                if (r > 2) t[1] = -1, t[2] = c;
                if (inplace)
                    tc_alias(0);
                else
                    tc_fbuf(r * c, 3, -1, 1);
                tc_int(r), tc_int(c), tc_float(1.0f / (float)(r + 1)), tc_run();
            }
    for (ri = 0; ri < 2; ri++) /* regression losses: widths 1, 3, 37; l1 with ties (x == t) */
        for (ci = 0; ci < 3; ci++)
            for (inplace = 0; inplace < 2; inplace++) {
                static const char* const fwd[2] = {"mpar_mse_fwd", "mpar_l1_fwd"};
                static const char* const bwd[2] = {"mpar_mse_bwd", "mpar_l1_bwd"};
                int r = rows_[ri], c = ci == 0 ? 1 : ci == 1 ? 3 : 37, k;
                size_t n = (size_t)r * (size_t)c;
                for (k = 0; k < 2; k++) {
                    float *x, *t;
                    tc_begin("loss.cl", fwd[k], "BBBii", (size_t)r + (size_t)inplace * 3);
                    x = tc_fbuf(r * c, 2, -5, 5);
                    t = tc_fbuf(r * c, 5, -5, 5);
                    t[0] = x[0];
                    tc_fbuf(r, 3, -1, 1), tc_int(r), tc_int(c), tc_run();
                    tc_begin("loss.cl", bwd[k], "BBBlf", n + (size_t)inplace * 3);
                    x = tc_fbuf(r * c, 2, -5, 5);
                    t = tc_fbuf(r * c, 5, -5, 5);
                    t[0] = x[0];
                    if (inplace)
                        tc_alias(0);
                    else
                        tc_fbuf(r * c, 3, -1, 1);
                    tc_size(n), tc_float(2.0f / (float)(r * c + 1)), tc_run();
                }
            }
    for (ni = 0; ni < 3; ni++) {
        tc_begin("loss.cl", "mpar_loss_sum", "BlB", ni == 1 ? 4 : 1); /* 4: items 1..3 do nothing */
        tc_fbuf(ns[ni], 3, -1, 1), tc_size((size_t)ns[ni]), tc_fbuf(1, 2, -1, 1), tc_run();
    }
}

static void cases_optimizer(void) {
    int si, v;
    for (si = 0; si < NSIZES; si++)
        for (v = 0; v < 2; v++) { /* v: with momentum, weight decay, a gradient scale */
            int n = sizes[si];
            size_t g = (size_t)n + (size_t)v * 3;
            tc_begin("optimizer.cl", "mpar_sgd_step", "BBBlffff", g);
            tc_fbuf(n, 3, -1, 1), tc_fbuf(n, 5, -1, 1), tc_fbuf(n, 2, -0.1f, 0.1f), tc_size((size_t)n);
            tc_float(0.01f), tc_float(v ? 0.9f : 0.0f), tc_float(v ? 0.01f : 0.0f), tc_float(v ? 0.7f : 1.0f);
            tc_run();
            tc_begin("optimizer.cl", "mpar_adamw_step", "BBBBlffffffff", g);
            tc_fbuf(n, 3, -1, 1), tc_fbuf(n, 5, -1, 1), tc_fbuf(n, 2, -0.1f, 0.1f), tc_fbuf(n, 7, 0, 0.01f);
            tc_size((size_t)n), tc_float(1e-3f), tc_float(0.9f), tc_float(0.999f), tc_float(1e-8f);
            tc_float(v ? 0.01f : 0.0f), tc_float(1.0f - 0.9f * 0.9f * 0.9f), tc_float(1.0f - 0.999f * 0.999f * 0.999f);
            tc_float(v ? 0.5f : 1.0f), tc_run();
        }
}

/* The per-layer sums of squares of a stage (gradient clipping per layer).
   table holds seg[0..layers] (each layer's first element in g, then the
   end) and first[0..layers] (each layer's first chunk of 4096 in partial,
   then the chunk count). Fills it for the given layer sizes; returns the
   chunk count, and the element count in *elems. */
static int fill_layer_table(cl_ulong* table, const int* layer_size, int layers, int* elems) {
    int j, chunks = 0, n = 0;
    for (j = 0; j < layers; j++) {
        table[j] = (cl_ulong)n, table[layers + 1 + j] = (cl_ulong)chunks;
        n += layer_size[j];
        chunks += (layer_size[j] + 4095) / 4096;
    }
    table[layers] = (cl_ulong)n, table[2 * layers + 1] = (cl_ulong)chunks;
    *elems = n;
    return chunks;
}

static void cases_sumsq_layers(void) {
    /* empty layers (two layers starting at the same chunk, and the last
       one), one element, exactly one chunk, several chunks */
    static const int layer_size[] = {4097, 0, 1, 4096, 2 * 4096 + 37, 5, 0};
    static const int layer_counts[] = {1, 3, 7};
    static const int pads[] = {0, 2, -2}; /* a padded range, and a short one (see cases_short_range) */
    int li, pi;
    for (li = 0; li < 3; li++)
        for (pi = 0; pi < 3; pi++) {
            int layers = layer_counts[li], pad = pads[pi], words = 2 * (layers + 1), elems, chunks;
            cl_ulong table[2 * 8];
            if (pad < 0 && layers == 1) continue; /* nothing would run */
            chunks = fill_layer_table(table, layer_size, layers, &elems);
            tc_begin("optimizer.cl", "mpar_sumsq_layers_partial", "BBiB", (size_t)(chunks + pad));
            tc_fbuf(elems, 3, -1, 1);
            tc_u64buf(table, words);
            tc_int(layers), tc_fbuf(chunks, 4, -1, 1), tc_run();

            tc_begin("optimizer.cl", "mpar_sumsq_layers_final", "BBiB", (size_t)(layers + pad));
            tc_fbuf(chunks, 5, 0, 1);
            tc_u64buf(table, words);
            tc_int(layers), tc_fbuf(layers, 1, -1, 1), tc_run();
        }
}

static void cases_attention(void) {
    static const int shapes[][4] = {{1, 1, 4, 1}, {2, 5, 12, 3}, {1, 7, 10, 2}, {3, 4, 8, 4}}; /* B, T, C, H */
    int si, pad;
    for (si = 0; si < 4; si++)
        for (pad = 0; pad < 2; pad++) {
            int B = shapes[si][0], T = shapes[si][1], C = shapes[si][2], H = shapes[si][3];
            int rows = B * T, np = B * H * T * T;
            tc_begin("attention.cl", "mpar_attn_fwd", "BBBiiii", (size_t)(B * H * T) + (size_t)pad * 3);
            tc_fbuf(rows * 3 * C, 3, -2, 2), tc_fbuf(rows * C, 5, -1, 1), tc_fbuf(np, 2, -1, 1);
            tc_int(B), tc_int(T), tc_int(C), tc_int(H), tc_run();
            tc_begin("attention.cl", "mpar_attn_bwd_ds", "BBBBiiii", (size_t)(B * H * T) + (size_t)pad * 3);
            tc_fbuf(rows * C, 3, -1, 1), tc_fbuf(rows * 3 * C, 5, -2, 2), tc_fbuf(np, 2, 0, 1);
            tc_fbuf(np, 7, -1, 1), tc_int(B), tc_int(T), tc_int(C), tc_int(H), tc_run();
            tc_begin("attention.cl", "mpar_attn_bwd_qkv", "BBBBBiiii", (size_t)(rows * 3 * C) + (size_t)pad * 3);
            tc_fbuf(rows * C, 3, -1, 1), tc_fbuf(rows * 3 * C, 5, -2, 2), tc_fbuf(np, 2, 0, 1);
            tc_fbuf(np, 7, -1, 1), tc_fbuf(rows * 3 * C, 1, -1, 1);
            tc_int(B), tc_int(T), tc_int(C), tc_int(H), tc_run();
        }
}

/* generate.cl: rows of uneven slots and positions, some out of range (the
   kernels skip them), caches of S slots x L positions. */
static void cases_generate(void) {
    static const int shapes[][5] = {{1, 4, 1, 1, 1}, {3, 12, 3, 2, 5}, {5, 8, 2, 3, 7}, {4, 10, 5, 2, 6}}; /* rows, C, H, S, L */
    int si, pad;
    for (si = 0; si < 4; si++)
        for (pad = 0; pad < 2; pad++) {
            int rows = shapes[si][0], C = shapes[si][1], H = shapes[si][2], S = shapes[si][3], L = shapes[si][4];
            int V = 9, cache = S * L * C, r;
            int32_t *slots, *pos;
            tc_begin("generate.cl", "mpar_embed_at", "BBBBBiiii", (size_t)(rows * C) + (size_t)pad * 5);
            tc_ibuf(rows, 1, -1, V), tc_ibuf(rows, 2, -1, L), tc_fbuf(V * C, 3, -1, 1), tc_fbuf(L * C, 4, -1, 1);
            tc_fbuf(rows * C, 5, -1, 1), tc_int(rows), tc_int(L), tc_int(C), tc_int(V), tc_run();
            tc_begin("generate.cl", "mpar_kv_store", "BBBBBiiii", (size_t)(rows * 2 * C) + (size_t)pad * 5);
            tc_fbuf(rows * 3 * C, 1, -2, 2);
            slots = tc_ibuf(rows, 2, -1, S), pos = tc_ibuf(rows, 3, -1, L);
            for (r = 0; r < rows; r++) /* distinct places (work-items would race); row 0 and the last out of range */
                pos[r] = r - 1, slots[r] = r == rows - 1 && rows > 2 ? S : r % S;
            tc_fbuf(cache, 4, -1, 1), tc_fbuf(cache, 5, -1, 1), tc_int(rows), tc_int(C), tc_int(S), tc_int(L);
            tc_run();
            tc_begin("generate.cl", "mpar_attn_cached", "BBBBBBBiiiii", (size_t)(rows * H) + (size_t)pad * 3);
            tc_fbuf(rows * 3 * C, 1, -2, 2), tc_ibuf(rows, 2, -1, S), tc_ibuf(rows, 3, -1, L);
            tc_fbuf(cache, 4, -2, 2), tc_fbuf(cache, 5, -1, 1), tc_fbuf(rows * C, 6, -1, 1);
            tc_fbuf(rows * H * L, 7, -1, 1), tc_int(rows), tc_int(C), tc_int(H), tc_int(S), tc_int(L), tc_run();
        }
}

/* Global sizes smaller than the data: only the first g0 work-items run.
   mpar never launches so, but it checks that the host versions that walk
   rows and column blocks stop at the right work-item. */
static void cases_short_range(void) {
    int r = 3, c = 70, T = 5, rows = 10, V = 11;
    tc_begin("elementwise.cl", "mpar_fill", "Blf", 30);
    tc_fbuf(37, 3, -1, 1), tc_size(37), tc_float(0.5f), tc_run();
    tc_begin("elementwise.cl", "mpar_bias_add", "BiiB", (size_t)(r * c - 13));
    tc_fbuf(r * c, 5, -1, 1), tc_int(r), tc_int(c), tc_fbuf(c, 3, -1, 1), tc_run();
    tc_begin("elementwise.cl", "mpar_bias_grad", "BiiB", 67);
    tc_fbuf(r * c, 2, -1, 1), tc_int(r), tc_int(c), tc_fbuf(c, 7, -1, 1), tc_run();
    tc_begin("embedding.cl", "mpar_embedding_fwd", "BBBBiiii", (size_t)(rows * c - 75));
    tc_ibuf(rows, 3, -1, V), tc_fbuf(V * c, 2, -1, 1), tc_fbuf(T * c, 5, -1, 1), tc_fbuf(rows * c, 1, -1, 1);
    tc_int(rows), tc_int(T), tc_int(c), tc_int(V), tc_run();
    tc_begin("embedding.cl", "mpar_embedding_bwd_wte", "BBBiii", (size_t)(V * c - 75));
    tc_ibuf(rows, 3, -1, V), tc_fbuf(rows * c, 2, -1, 1), tc_fbuf(V * c, 5, -1, 1);
    tc_int(rows), tc_int(c), tc_int(V), tc_run();
    tc_begin("embedding.cl", "mpar_embedding_bwd_wpe", "BBiii", (size_t)(T * c - 75));
    tc_fbuf(rows * c, 2, -1, 1), tc_fbuf(T * c, 5, -1, 1), tc_int(rows), tc_int(T), tc_int(c), tc_run();
    tc_begin("layernorm.cl", "mpar_layernorm_bwd_weight", "BBBBBBii", 66);
    tc_fbuf(r * c, 2, -1, 1), tc_fbuf(r * c, 3, -2, 2), tc_fbuf(r, 1, -0.5f, 0.5f);
    tc_fbuf(r, 4, 0.5f, 2.0f), tc_fbuf(c, 7, -1, 1), tc_fbuf(c, 5, -1, 1), tc_int(r), tc_int(c), tc_run();
    tc_begin("layernorm.cl", "mpar_layernorm_fwd", "BBBBBBiif", 2);
    tc_fbuf(r * c, 3, -2, 2), tc_fbuf(c, 1, 0.5f, 1.5f), tc_fbuf(c, 4, -1, 1), tc_fbuf(r * c, 2, -1, 1);
    tc_fbuf(r, 5, -1, 1), tc_fbuf(r, 6, -1, 1), tc_int(r), tc_int(c), tc_float(1e-5f), tc_run();
    tc_begin("attention.cl", "mpar_attn_bwd_qkv", "BBBBBiiii", 2 * 5 * 36 - 40);
    tc_fbuf(2 * 5 * 12, 3, -1, 1), tc_fbuf(2 * 5 * 36, 5, -2, 2), tc_fbuf(2 * 3 * 25, 2, 0, 1);
    tc_fbuf(2 * 3 * 25, 7, -1, 1), tc_fbuf(2 * 5 * 36, 1, -1, 1), tc_int(2), tc_int(5), tc_int(12), tc_int(3);
    tc_run();
    tc_begin("attention.cl", "mpar_attn_fwd", "BBBiiii", 2 * 3 * 5 - 7);
    tc_fbuf(2 * 5 * 36, 3, -2, 2), tc_fbuf(2 * 5 * 12, 5, -1, 1), tc_fbuf(2 * 3 * 25, 2, -1, 1);
    tc_int(2), tc_int(5), tc_int(12), tc_int(3), tc_run();
}

static void cleanup(void) {
    int i;
    for (i = program_count - 1; i >= 0; i--) clReleaseProgram(programs[i].prog);
    program_count = 0;
    clReleaseCommandQueue(queue);
    clReleaseContext(context);
    for (i = 0; i < 3; i++) {
        free(tables[i].in);
        free(tables[i].out);
        free(tables[i].pending);
    }
}

int main(int argc, char** argv) {
    size_t i;
    int failed = 0, libm_not_bit = 0, contracts;
    if (argc > 1) { /* another seed; xorshift needs a non-zero state */
        rng_state ^= strtoull(argv[1], NULL, 0) * 0x2545f4914f6cdd1dull;
        if (!rng_state) rng_state = 1;
    }
    cl_setup();
    contracts = device_contracts();
    printf("host_kernels: mpar__host_kernels (MPAR__HK_FMA %d) against %s on %s\n", MPAR__HK_FMA, kernel_dir,
           device_name);

    cases_elementwise();
    cases_dropout();
    cases_bias();
    cases_embedding();
    cases_layernorm();
    cases_loss();
    cases_optimizer();
    cases_sumsq_layers();
    cases_attention();
    cases_generate();
    cases_short_range();

    /* One line per kernel: with the device's built-ins (asserted bit for bit),
       then with libm's (asserted within TOL). */
    printf("%-26s %5s %7s %7s | %-16s | %s\n", "kernel", "cases", "words", "changed", "device built-ins",
           "libm built-ins: differ max_rel max_norm");
    for (i = 0; i < NKERN; i++) {
        const struct kernel_result* d = &results[DEVICE][i];
        const struct kernel_result* l = &results[LIBM][i];
        const char* name = mpar__host_kernels[i].name;
        if (l->mismatches) libm_not_bit++;
        printf("%-26s %5d %7ld %7ld | %-16s | %22ld %7.2g %8.2g\n", name, d->cases, d->words, d->changed,
               d->cases == 0 ? "-" : d->mismatches || d->unsettled ? "DIFFER" : "bit-identical", l->mismatches,
               l->max_rel, l->max_norm);
    }
    for (i = 0; i < NKERN; i++) {
        const struct kernel_result* d = &results[DEVICE][i];
        const struct kernel_result* l = &results[LIBM][i];
        const char* name = mpar__host_kernels[i].name;
        int bad = 0;
        if (d->cases == 0) {
            printf("FAIL %s: no case\n", name), bad = 1;
        } else if (d->changed == 0) {
            printf("FAIL %s: the kernel changed no word in any case\n", name), bad = 1;
        }
        if (d->unsettled)
            printf("FAIL %s: substituting the device's built-ins did not settle in %d runs (%d cases)\n", name,
                   MAX_PASSES + 1, d->unsettled), bad = 1;
        if (d->mismatches)
            printf("FAIL %s: %ld of %ld words differ with the device's built-ins; first: %s\n", name, d->mismatches,
                   d->words, d->first), bad = 1;
        if (l->out_of_tol)
            printf("FAIL %s: %ld words beyond %.0e with libm's built-ins (or an int or NaN differs); first: %s\n",
                   name, l->out_of_tol, TOL, l->first), bad = 1;
        failed += bad;
    }
    if (failed && !contracts)
        printf("note: %s does not fuse a * b + c (no FMA?), so the kernels with MPAR__HK_MAD cannot be "
               "bit-identical to it with MPAR__HK_FMA 1\n",
               device_name);
    cleanup();
    if (failed) {
        printf("host_kernels: %d kernels, %d cases, %d kernels FAILED\n", (int)NKERN, total_cases, failed);
        return 1;
    }
    printf("host_kernels: libm's built-ins: %d kernels not bit-identical, all within %.0e\n", libm_not_bit, TOL);
    printf("host_kernels: %d kernels, %d cases, all bit-identical\n", (int)NKERN, total_cases);
    return 0;
}
