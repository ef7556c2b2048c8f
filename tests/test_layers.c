/* test_layers.c - every built-in layer and the loss through the public API.

   1. Gradient checks: each layer in a tiny model [layer, ..., linear ->
      classes, cross_entropy], random parameters and inputs; the device
      gradients (mpar_pipeline_compute_gradients + get_grads) against central
      finite differences of a double-precision host model of the same
      network (composed from tests/ref.h). A second variant puts a linear
      layer in front, so its weight gradients depend on the layer's input
      gradient.
   2. Host reference forward/backward: inference outputs, loss and gradients
      of a linear + layer norm + decoder block + loss model against the host
      model (analytic backward from ref.h, itself checked against finite
      differences in 1), and causality of the attention.
   3. Accumulation: M = 4 uneven micro-batches (3,3,2,2) give the gradients
      and the loss of M = 1 (GPipe; also ZB-H1's split backward and
      recomputed activations, with dropout in the model).
   4. Optimizer steps (SGD with momentum and weight decay, AdamW, clipping)
      against host steps, two steps each; the learning-rate schedule.
   5. Models rejected at build time, with their error codes and messages.
   6. An MLP learns on a slice of Fashion-MNIST.
   7. A user-defined layer type with its own .cl file (mpar_desc.kernel_path).
   8. A stage of 600 layers (more than mpar__layer_norms' fixed array holds),
      run in a child process.
   MPAR_TEST_VERBOSE=1 prints every comparison's worst error.

   Tolerances (float32 device against double host), each |got - want| <=
   rtol*|want| + atol per element unless said otherwise:
     device gradient vs finite differences   rtol 1e-2, atol 1e-5
     host analytic gradient vs finite diff.  rtol 1e-6, atol 1e-9 (h = 1e-5)
     loss vs host loss                        relative 1e-5
     inference outputs vs host forward        rtol 1e-5, atol 1e-5
     device gradient vs host analytic         rtol 1e-3, atol 1e-6
     M = 4 vs M = 1 gradients                 max|a-b| <= 1e-5 * max|b| per layer
     M = 4 vs M = 1 loss                      relative 1e-6
     parameters after optimizer steps         rtol 1e-5, atol 1e-6
     learning rate (step_info.lr)             relative 1e-6
     parameters after a scheduled SGD step    rtol 1e-6, atol 1e-7
   One context for the whole run; every pipeline is one stage on device 0. */
#define MPAR_IMPLEMENTATION
#include "mpar.h"
#include "ref.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <cmocka.h>

/* PoCL and its LLVM keep compiler state until exit; only leaks through
   those libraries are suppressed. */
const char* __lsan_default_suppressions(void);
const char* __lsan_default_suppressions(void) { return "leak:libpocl.so\nleak:libLLVM\n"; }

static mpar_context* g_ctx;
static int g_verbose;

/* ---- small utilities ------------------------------------------------------ */

static uint64_t g_rng = 0x2545F4914F6CDD1DULL;
static uint64_t rng_u64(void) {
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static double rng_u01(void) { return (double)(rng_u64() >> 11) * (1.0 / 9007199254740992.0); }
static double rng_normal(void) {
    double u1 = rng_u01(), u2 = rng_u01();
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}
static int rng_int(int n) { return (int)(rng_u64() % (uint64_t)n); }

static void* xalloc(size_t bytes) {
    void* p = calloc(1, bytes ? bytes : 1);
    assert_non_null(p);
    return p;
}
static double* dz(size_t n) { return (double*)xalloc(sizeof(double) * n); }
static float* fz(size_t n) { return (float*)xalloc(sizeof(float) * n); }
static double* f2d(const float* f, size_t n) {
    double* d = dz(n);
    size_t i;
    for (i = 0; i < n; i++) d[i] = (double)f[i];
    return d;
}
static double max_abs(const double* v, size_t n) {
    double m = 0.0;
    size_t i;
    for (i = 0; i < n; i++)
        if (fabs(v[i]) > m) m = fabs(v[i]);
    return m;
}

/* Fails unless every |got - want| <= rtol*|want| + atol; names the worst. */
static void check_close(const char* what, const double* got, const double* want, size_t n, double rtol,
                        double atol) {
    size_t i, worst = 0;
    double ratio = 0.0;
    for (i = 0; i < n; i++) {
        double diff = fabs(got[i] - want[i]), r = diff == 0.0 ? 0.0 : diff / (rtol * fabs(want[i]) + atol);
        if (isnan(r)) {
            ratio = INFINITY, worst = i;
            break;
        }
        if (r > ratio) ratio = r, worst = i;
    }
    if (g_verbose)
        printf("  %-70s worst %.3g of the limit (element %zu: %.9g vs %.9g)\n", what, ratio, worst,
               n ? got[worst] : 0.0, n ? want[worst] : 0.0);
    if (!(ratio <= 1.0))
        fail_msg("%s: element %zu is %.9g, expected %.9g (|diff| %.3g > %.3g*|want| + %.3g)", what, worst, got[worst],
                 want[worst], fabs(got[worst] - want[worst]), rtol, atol);
}
static void check_scalar(const char* what, double got, double want, double rtol, double atol) {
    check_close(what, &got, &want, 1, rtol, atol);
}

static mpar_context* make_ctx(const char* kernel_path) {
    mpar_desc d;
    mpar_error err;
    mpar_context* ctx = NULL;
    memset(&d, 0, sizeof d);
    d.kernel_path = kernel_path;
    d.error = &err;
    err.message[0] = '\0';
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS) fail_msg("mpar_create: %s", err.message);
    return ctx;
}

static mpar_layer_desc ld(const mpar_layer_type* type, int units) {
    mpar_layer_desc d;
    memset(&d, 0, sizeof d);
    d.type = type;
    d.units = units;
    return d;
}
static mpar_layer_desc ld_dropout(float rate) {
    mpar_layer_desc d = ld(mpar_layer_dropout(), 0);
    d.rate = rate;
    return d;
}
static mpar_layer_desc ld_embedding(int vocab, int width) {
    mpar_layer_desc d = ld(mpar_layer_embedding(), width);
    d.vocab = vocab;
    return d;
}
static mpar_layer_desc ld_block(int heads, int hidden) {
    mpar_layer_desc d = ld(mpar_layer_decoder_block(), 0);
    d.heads = heads;
    d.hidden = hidden;
    return d;
}

static mpar_model* make_model(int in, int T, const mpar_layer_desc* layers, int n) {
    mpar_model_desc md;
    mpar_model* m = NULL;
    mpar_error err;
    int i;
    memset(&md, 0, sizeof md);
    md.input_features = in;
    md.seq_len = T;
    md.seed = 42;
    if (mpar_model_create(&md, &m, &err) != MPAR_SUCCESS) fail_msg("mpar_model_create: %s", err.message);
    for (i = 0; i < n; i++)
        if (mpar_model_add(m, &layers[i], &err) != MPAR_SUCCESS) fail_msg("mpar_model_add(%d): %s", i, err.message);
    if (mpar_model_validate(m, &err) != MPAR_SUCCESS) fail_msg("mpar_model_validate: %s", err.message);
    return m;
}

/* One stage on device 0 holding every layer. */
static mpar_pipeline* make_pipe_ex(mpar_context* ctx, const mpar_model* m, int max_batch, int M,
                                   mpar_schedule_kind schedule, const mpar_optimizer_desc* opt, int recompute) {
    mpar_stage_desc st;
    mpar_pipeline_desc d;
    mpar_pipeline* p = NULL;
    st.device = 0;
    st.first_layer = 0;
    st.last_layer = mpar_model_layer_count(m) - 1;
    memset(&d, 0, sizeof d);
    d.stages = &st;
    d.stage_count = 1;
    d.schedule = schedule;
    d.microbatches = M;
    d.max_batch = max_batch;
    d.recompute = recompute;
    if (opt) d.optimizer = *opt;
    if (mpar_pipeline_create(ctx, m, &d, &p) != MPAR_SUCCESS) fail_msg("mpar_pipeline_create: %s", mpar_last_error(ctx));
    return p;
}
static mpar_pipeline* make_pipe(mpar_context* ctx, const mpar_model* m, int max_batch, int M,
                                mpar_schedule_kind schedule, const mpar_optimizer_desc* opt) {
    return make_pipe_ex(ctx, m, max_batch, M, schedule, opt, 0);
}

/* ---- a user-defined layer: y = 2x, kernels in a file of its own ----------- */

#define SCALE2_FILE "mpar_test_scale2.cl"
static const char* const scale2_source =
    "__kernel void test_scale2_fwd(__global const float* x, int x_off, __global float* y, int y_off, int n)\n"
    "{ int i = (int)get_global_id(0); if (i < n) y[y_off + i] = 2.0f * x[x_off + i]; }\n"
    "__kernel void test_scale2_bwd(__global const float* dy, int dy_off, __global float* dx, int dx_off, int n)\n"
    "{ int i = (int)get_global_id(0); if (i < n) dx[dx_off + i] = 2.0f * dy[dy_off + i]; }\n";

static mpar_result scale2_setup(mpar_layer* l, mpar_error* err) {
    if (l->desc.units != 0 && l->desc.units != l->in_features)
        return mpar_error_set(err, MPAR_ERROR_INVALID_MODEL, "layer %d (scale2): width %d, previous gives %d",
                              l->index, l->desc.units, l->in_features);
    l->out_features = l->in_features;
    l->flops_forward = l->flops_backward_input = (double)l->in_features;
    return MPAR_SUCCESS;
}
static mpar_result scale2_forward(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    int n = io->rows * l->in_features;
    return mpar_exec_launch(ex, SCALE2_FILE, "test_scale2_fwd", (size_t)n, 0, "bbi", io->x, io->y, n);
}
static mpar_result scale2_backward(mpar_exec* ex, const mpar_layer* l, const mpar_io* io) {
    int n = io->rows * l->in_features;
    if (!io->need_dx) return MPAR_SUCCESS;
    return mpar_exec_launch(ex, SCALE2_FILE, "test_scale2_bwd", (size_t)n, 0, "bbi", io->dy, io->dx, n);
}
static const mpar_layer_type scale2_type = {"scale2", 0, scale2_setup, NULL, scale2_forward, scale2_backward, NULL};

/* ---- the host model: double precision, composed from ref.h ---------------- */

enum { HK_LINEAR, HK_RELU, HK_GELU, HK_TANH, HK_DROPOUT, HK_LN, HK_EMB, HK_BLOCK, HK_XENT, HK_SCALE2 };
#define HM_MAX 8

typedef struct hlayer {
    int kind, in, out, vocab, heads, hidden;
    double rate, eps;
    size_t np;
    double* p;           /* parameters: exact copies of the device's floats */
    unsigned char* keep; /* dropout: 1 = kept, [rows x in]; NULL: identity (inference) */
} hlayer;

typedef struct hmodel {
    int n, T;
    hlayer l[HM_MAX];
} hmodel;

/* C[m x n] = A[m x k] B[k x n] */
static void mm_nn(const double* A, const double* B, double* C, int m, int k, int n) {
    int i, j, t;
    for (i = 0; i < m; i++)
        for (j = 0; j < n; j++) {
            double s = 0.0;
            for (t = 0; t < k; t++) s += A[i * k + t] * B[t * n + j];
            C[i * n + j] = s;
        }
}
/* C[m x n] = A[m x k] B[n x k]^T */
static void mm_nt(const double* A, const double* B, double* C, int m, int k, int n) {
    int i, j, t;
    for (i = 0; i < m; i++)
        for (j = 0; j < n; j++) {
            double s = 0.0;
            for (t = 0; t < k; t++) s += A[i * k + t] * B[j * k + t];
            C[i * n + j] = s;
        }
}
/* C[k x n] += A[m x k]^T B[m x n] */
static void mm_tn_acc(const double* A, const double* B, double* C, int m, int k, int n) {
    int i, j, t;
    for (t = 0; t < k; t++)
        for (j = 0; j < n; j++) {
            double s = 0.0;
            for (i = 0; i < m; i++) s += A[i * k + t] * B[i * n + j];
            C[t * n + j] += s;
        }
}
/* y = x W + b; W [in x out] row-major, then b */
static void linear_fwd(const double* x, const double* p, double* y, int rows, int in, int out) {
    mm_nn(x, p, y, rows, in, out);
    ref_bias_add(y, rows, out, p + (size_t)in * (size_t)out);
}
static void linear_bwd(const double* x, const double* p, const double* dy, double* dx, double* g, int rows, int in,
                       int out) {
    if (dx) mm_nt(dy, p, dx, rows, out, in);
    mm_tn_acc(x, dy, g, rows, in, out);
    ref_bias_grad(dy, rows, out, g + (size_t)in * (size_t)out);
}

/* Decoder block parameter layout as documented above mpar__block_shape. */
typedef struct hblock_off {
    size_t ln1, wqkv, bqkv, wo, bo, ln2, w1, b1, w2, b2, total;
} hblock_off;
static hblock_off hblock_layout(int C, int hidden) {
    hblock_off o;
    size_t c = (size_t)C, h = (size_t)hidden;
    o.ln1 = 0;
    o.wqkv = o.ln1 + 2 * c;
    o.bqkv = o.wqkv + c * 3 * c;
    o.wo = o.bqkv + 3 * c;
    o.bo = o.wo + c * c;
    o.ln2 = o.bo + c;
    o.w1 = o.ln2 + 2 * c;
    o.b1 = o.w1 + c * h;
    o.w2 = o.b1 + h;
    o.b2 = o.w2 + h * c;
    o.total = o.b2 + c;
    return o;
}

typedef struct hblock_acts {
    double *h1, *m1, *r1, *qkv, *P, *a, *x2, *h2, *m2, *r2, *f, *g;
} hblock_acts;

static void hblock_free(hblock_acts* s) {
    free(s->h1), free(s->m1), free(s->r1), free(s->qkv), free(s->P), free(s->a);
    free(s->x2), free(s->h2), free(s->m2), free(s->r2), free(s->f), free(s->g);
}

/* Pre-norm block: h1 = LN1(x); qkv = h1 Wqkv + bqkv; a = attn(qkv);
   x2 = x + a Wo + bo; h2 = LN2(x2); f = h2 W1 + b1; y = x2 + gelu(f) W2 + b2 */
static void hblock_forward(const hlayer* L, const double* x, double* y, int rows, int T, hblock_acts* s) {
    int C = L->in, hd = L->hidden, H = L->heads, B = rows / T, i;
    size_t r = (size_t)rows, c = (size_t)C;
    hblock_off o = hblock_layout(C, hd);
    const double* p = L->p;
    s->h1 = dz(r * c), s->m1 = dz(r), s->r1 = dz(r), s->qkv = dz(r * 3 * c);
    s->P = dz((size_t)B * (size_t)H * (size_t)T * (size_t)T), s->a = dz(r * c), s->x2 = dz(r * c);
    s->h2 = dz(r * c), s->m2 = dz(r), s->r2 = dz(r), s->f = dz(r * (size_t)hd), s->g = dz(r * (size_t)hd);
    ref_layernorm_fwd(x, p + o.ln1, p + o.ln1 + c, s->h1, s->m1, s->r1, rows, C, L->eps);
    linear_fwd(s->h1, p + o.wqkv, s->qkv, rows, C, 3 * C);
    ref_attn_fwd(s->qkv, s->a, s->P, B, T, C, H);
    linear_fwd(s->a, p + o.wo, s->x2, rows, C, C);
    for (i = 0; i < rows * C; i++) s->x2[i] += x[i];
    ref_layernorm_fwd(s->x2, p + o.ln2, p + o.ln2 + c, s->h2, s->m2, s->r2, rows, C, L->eps);
    linear_fwd(s->h2, p + o.w1, s->f, rows, C, hd);
    ref_gelu_fwd(s->f, s->g, rows * hd);
    linear_fwd(s->g, p + o.w2, y, rows, hd, C);
    for (i = 0; i < rows * C; i++) y[i] += s->x2[i];
}

static void hblock_backward(const hlayer* L, const double* x, const double* dy, double* dx, double* gr, int rows,
                            int T) {
    int C = L->in, hd = L->hidden, H = L->heads, B = rows / T, i;
    size_t r = (size_t)rows, c = (size_t)C;
    hblock_off o = hblock_layout(C, hd);
    const double* p = L->p;
    hblock_acts s;
    double *y = dz(r * c), *dg = dz(r * (size_t)hd), *df = dz(r * (size_t)hd), *dh2 = dz(r * c), *dx2 = dz(r * c);
    double *da = dz(r * c), *dqkv = dz(r * 3 * c), *dh1 = dz(r * c);
    hblock_forward(L, x, y, rows, T, &s);
    /* y = x2 + g W2 + b2 */
    linear_bwd(s.g, p + o.w2, dy, dg, gr + o.w2, rows, hd, C);
    ref_gelu_bwd(s.f, dg, df, rows * hd);
    linear_bwd(s.h2, p + o.w1, df, dh2, gr + o.w1, rows, C, hd);
    ref_layernorm_bwd_input(dh2, s.x2, s.m2, s.r2, p + o.ln2, dx2, rows, C);
    ref_layernorm_bwd_weight(dh2, s.x2, s.m2, s.r2, gr + o.ln2, gr + o.ln2 + c, rows, C);
    for (i = 0; i < rows * C; i++) dx2[i] += dy[i];
    /* x2 = x + a Wo + bo */
    linear_bwd(s.a, p + o.wo, dx2, da, gr + o.wo, rows, C, C);
    ref_attn_bwd(da, s.qkv, s.P, dqkv, B, T, C, H);
    linear_bwd(s.h1, p + o.wqkv, dqkv, dh1, gr + o.wqkv, rows, C, 3 * C);
    ref_layernorm_bwd_input(dh1, x, s.m1, s.r1, p + o.ln1, dx, rows, C);
    ref_layernorm_bwd_weight(dh1, x, s.m1, s.r1, gr + o.ln1, gr + o.ln1 + c, rows, C);
    for (i = 0; i < rows * C; i++) dx[i] += dx2[i];
    hblock_free(&s);
    free(y), free(dg), free(df), free(dh2), free(dx2), free(da), free(dqkv), free(dh1);
}

static void hl_forward(const hlayer* L, const double* x, const int* tok, const int* targets, double* y, int rows,
                       int T) {
    int n = rows * L->in, i;
    switch (L->kind) {
        case HK_LINEAR: linear_fwd(x, L->p, y, rows, L->in, L->out); break;
        case HK_RELU: ref_relu_fwd(x, y, n); break;
        case HK_GELU: ref_gelu_fwd(x, y, n); break;
        case HK_TANH: ref_tanh_fwd(x, y, n); break;
        case HK_DROPOUT:
            for (i = 0; i < n; i++) y[i] = !L->keep ? x[i] : L->keep[i] ? x[i] / (1.0 - L->rate) : 0.0;
            break;
        case HK_LN: {
            double *m = dz((size_t)rows), *r = dz((size_t)rows);
            ref_layernorm_fwd(x, L->p, L->p + L->in, y, m, r, rows, L->in, L->eps);
            free(m), free(r);
            break;
        }
        case HK_EMB:
            ref_embedding_fwd(tok, L->p, L->p + (size_t)L->vocab * (size_t)L->out, y, rows, T, L->out, L->vocab);
            break;
        case HK_BLOCK: {
            hblock_acts s;
            hblock_forward(L, x, y, rows, T, &s);
            hblock_free(&s);
            break;
        }
        case HK_XENT: ref_xent_fwd(x, targets, y, rows, L->in); break;
        case HK_SCALE2:
            for (i = 0; i < n; i++) y[i] = 2.0 * x[i];
            break;
        default: fail_msg("unknown host layer kind %d", L->kind);
    }
}

/* dx (overwrite) and the parameter gradient g (accumulate) from dy. */
static void hl_backward(const hlayer* L, const double* x, const int* tok, const int* targets, const double* dy,
                        double* dx, double* g, int rows, int T, double scale) {
    int n = rows * L->in, i;
    switch (L->kind) {
        case HK_LINEAR: linear_bwd(x, L->p, dy, dx, g, rows, L->in, L->out); break;
        case HK_RELU: ref_relu_bwd(x, dy, dx, n); break;
        case HK_GELU: ref_gelu_bwd(x, dy, dx, n); break;
        case HK_TANH: {
            double* y = dz((size_t)n);
            ref_tanh_fwd(x, y, n);
            ref_tanh_bwd(y, dy, dx, n);
            free(y);
            break;
        }
        case HK_DROPOUT:
            for (i = 0; i < n; i++) dx[i] = !L->keep ? dy[i] : L->keep[i] ? dy[i] / (1.0 - L->rate) : 0.0;
            break;
        case HK_LN: {
            double *m = dz((size_t)rows), *r = dz((size_t)rows), *y = dz((size_t)n);
            ref_layernorm_fwd(x, L->p, L->p + L->in, y, m, r, rows, L->in, L->eps);
            ref_layernorm_bwd_input(dy, x, m, r, L->p, dx, rows, L->in);
            ref_layernorm_bwd_weight(dy, x, m, r, g, g + L->in, rows, L->in);
            free(m), free(r), free(y);
            break;
        }
        case HK_EMB:
            ref_embedding_bwd(tok, dy, g, g + (size_t)L->vocab * (size_t)L->out, rows, T, L->out, L->vocab);
            break;
        case HK_BLOCK: hblock_backward(L, x, dy, dx, g, rows, T); break;
        case HK_XENT: ref_xent_bwd(x, targets, dx, rows, L->in, scale); break;
        case HK_SCALE2:
            for (i = 0; i < n; i++) dx[i] = 2.0 * dy[i];
            break;
        default: fail_msg("unknown host layer kind %d", L->kind);
    }
}

static int count_targets(const int* targets, int rows) {
    int i, n = 0;
    for (i = 0; i < rows; i++) n += targets[i] >= 0;
    return n;
}

/* acts[k]: input of layer k (rows x in_k); acts[n]: the per-row loss. */
static double** hm_acts(const hmodel* h, int rows) {
    double** a = (double**)xalloc(sizeof(double*) * (size_t)(h->n + 1));
    int k;
    for (k = 0; k < h->n; k++) a[k] = dz((size_t)rows * (size_t)h->l[k].in);
    a[h->n] = dz((size_t)rows);
    return a;
}
static void hm_acts_free(const hmodel* h, double** a) {
    int k;
    for (k = 0; k <= h->n; k++) free(a[k]);
    free(a);
}

/* The mean loss over counted rows. */
static double hm_forward(const hmodel* h, double** acts, const double* x, const int* tok, const int* targets,
                         int rows) {
    int k, r, counted = count_targets(targets, rows);
    double sum = 0.0;
    if (x) memcpy(acts[0], x, sizeof(double) * (size_t)rows * (size_t)h->l[0].in);
    for (k = 0; k < h->n; k++) hl_forward(&h->l[k], acts[k], tok, targets, acts[k + 1], rows, h->T);
    for (r = 0; r < rows; r++)
        if (targets[r] >= 0) sum += acts[h->n][r];
    return counted ? sum / counted : 0.0;
}

/* Analytic gradients of the mean loss; acts from hm_forward. */
static void hm_backward(const hmodel* h, double** acts, const int* tok, const int* targets, int rows,
                        double** grads) {
    int k, counted = count_targets(targets, rows);
    double* dy = NULL;
    for (k = h->n - 1; k >= 0; k--) {
        const hlayer* L = &h->l[k];
        double* dx = dz((size_t)rows * (size_t)L->in);
        hl_backward(L, acts[k], tok, targets, dy, dx, grads[k], rows, h->T, counted ? 1.0 / counted : 0.0);
        free(dy);
        dy = dx;
    }
    free(dy);
}

static int host_kind(const mpar_layer_type* t) {
    if (t == mpar_layer_linear()) return HK_LINEAR;
    if (t == mpar_layer_relu()) return HK_RELU;
    if (t == mpar_layer_gelu()) return HK_GELU;
    if (t == mpar_layer_tanh()) return HK_TANH;
    if (t == mpar_layer_dropout()) return HK_DROPOUT;
    if (t == mpar_layer_layernorm()) return HK_LN;
    if (t == mpar_layer_embedding()) return HK_EMB;
    if (t == mpar_layer_decoder_block()) return HK_BLOCK;
    if (t == mpar_layer_cross_entropy()) return HK_XENT;
    if (t == &scale2_type) return HK_SCALE2;
    fail_msg("no host model for layer type %s", t->name);
    return -1;
}

/* Mirrors the device model; checks mpar's parameter counts against the
   documented layouts. */
static void hmodel_from(const mpar_model* m, hmodel* h) {
    int k;
    memset(h, 0, sizeof *h);
    h->n = mpar_model_layer_count(m);
    assert_true(h->n <= HM_MAX);
    for (k = 0; k < h->n; k++) {
        const mpar_layer* l = mpar_model_layer(m, k);
        hlayer* L = &h->l[k];
        size_t want = 0, c = (size_t)l->in_features;
        h->T = l->seq_len;
        L->kind = host_kind(l->type);
        L->in = l->in_features;
        L->out = l->out_features;
        L->vocab = l->desc.vocab;
        L->heads = l->desc.heads;
        L->hidden = l->desc.hidden > 0 ? l->desc.hidden : 4 * l->in_features;
        L->rate = (double)l->desc.rate;
        L->eps = (double)(l->desc.eps > 0.0f ? l->desc.eps : 1e-5f);
        L->np = l->param_count;
        L->p = dz(L->np);
        if (L->kind == HK_LINEAR) want = c * (size_t)L->out + (size_t)L->out;
        if (L->kind == HK_LN) want = 2 * c;
        if (L->kind == HK_EMB) want = ((size_t)L->vocab + (size_t)h->T) * (size_t)L->out;
        if (L->kind == HK_BLOCK) want = hblock_layout(L->in, L->hidden).total;
        assert_int_equal(L->np, want);
        if (L->kind == HK_XENT) assert_int_equal(L->out, 1);
        else if (L->kind != HK_LINEAR && L->kind != HK_EMB) assert_int_equal(L->out, L->in);
    }
}

static void hmodel_free(hmodel* h) {
    int k;
    for (k = 0; k < h->n; k++) free(h->l[k].p), free(h->l[k].keep);
}

/* ---- a test case: device model + pipeline, host model, one batch ---------- */

typedef struct tcase {
    mpar_context* ctx;
    mpar_model* model;
    mpar_pipeline* pipe;
    hmodel h;
    int in, T, samples, rows, classes, tokens;
    float* xf;
    double* xd;
    int* tok;
    int32_t* targets;
    float* pf[HM_MAX]; /* the parameters set on the device */
    mpar_batch batch;
} tcase;

static void case_open(tcase* c, mpar_context* ctx, const mpar_layer_desc* layers, int n, int in, int T, int samples,
                      int M, mpar_schedule_kind schedule, const mpar_optimizer_desc* opt) {
    int i;
    memset(c, 0, sizeof *c);
    c->ctx = ctx;
    c->in = in, c->T = T, c->samples = samples, c->rows = samples * T;
    c->model = make_model(in, T, layers, n);
    c->pipe = make_pipe(ctx, c->model, samples, M, schedule, opt);
    hmodel_from(c->model, &c->h);
    c->classes = c->h.l[c->h.n - 1].in;
    c->tokens = c->h.l[0].kind == HK_EMB;
    c->targets = (int32_t*)xalloc(sizeof(int32_t) * (size_t)c->rows);
    for (i = 0; i < c->rows; i++) c->targets[i] = rng_int(c->classes);
    if (c->rows > 2) c->targets[1] = -1; /* an ignored row in every batch */
    if (c->tokens) {
        c->tok = (int*)xalloc(sizeof(int) * (size_t)c->rows);
        for (i = 0; i < c->rows; i++) c->tok[i] = rng_int(c->h.l[0].vocab);
        c->batch.inputs = c->tok;
    } else {
        c->xf = fz((size_t)c->rows * (size_t)in);
        for (i = 0; i < c->rows * in; i++) c->xf[i] = (float)rng_normal();
        c->xd = f2d(c->xf, (size_t)c->rows * (size_t)in);
        c->batch.inputs = c->xf;
    }
    c->batch.targets = c->targets;
    c->batch.samples = samples;
}

static void case_close(tcase* c) {
    int k;
    mpar_pipeline_destroy(c->pipe);
    mpar_model_destroy(c->model);
    for (k = 0; k < c->h.n; k++) free(c->pf[k]);
    hmodel_free(&c->h);
    free(c->xf), free(c->xd), free(c->tok), free(c->targets);
}

/* Random parameters, rounded to float, on the device and in the host model. */
static void case_randomize(tcase* c) {
    int k;
    for (k = 0; k < c->h.n; k++) {
        hlayer* L = &c->h.l[k];
        size_t i, np = L->np;
        float* f;
        if (np == 0) continue;
        free(c->pf[k]);
        f = c->pf[k] = fz(np);
        for (i = 0; i < np; i++) {
            double sd = L->kind == HK_LINEAR ? (i < (size_t)L->in * (size_t)L->out ? 1.0 / sqrt(L->in) : 0.3)
                      : L->kind == HK_EMB ? 0.7 : 0.35;
            f[i] = (float)(sd * rng_normal());
        }
        if (L->kind == HK_LN)
            for (i = 0; i < (size_t)L->in; i++) f[i] = (float)(1.0 + 0.3 * rng_normal());
        if (L->kind == HK_BLOCK) {
            hblock_off o = hblock_layout(L->in, L->hidden);
            for (i = 0; i < (size_t)L->in; i++) {
                f[o.ln1 + i] = (float)(1.0 + 0.2 * rng_normal());
                f[o.ln2 + i] = (float)(1.0 + 0.2 * rng_normal());
            }
        }
        for (i = 0; i < np; i++) L->p[i] = (double)f[i];
        if (mpar_pipeline_set_params(c->pipe, k, f) != MPAR_SUCCESS)
            fail_msg("set_params(%d): %s", k, mpar_last_error(c->ctx));
    }
}

static double* dev_grads(tcase* c, mpar_pipeline* p, int k) {
    float* f = fz(c->h.l[k].np);
    double* d;
    if (mpar_pipeline_get_grads(p, k, f) != MPAR_SUCCESS) fail_msg("get_grads(%d): %s", k, mpar_last_error(c->ctx));
    d = f2d(f, c->h.l[k].np);
    free(f);
    return d;
}
static double* dev_params(tcase* c, mpar_pipeline* p, int k) {
    float* f = fz(c->h.l[k].np);
    double* d;
    if (mpar_pipeline_get_params(p, k, f) != MPAR_SUCCESS) fail_msg("get_params(%d): %s", k, mpar_last_error(c->ctx));
    d = f2d(f, c->h.l[k].np);
    free(f);
    return d;
}

static void compute(tcase* c, mpar_pipeline* p, const mpar_batch* b, mpar_step_info* info) {
    if (mpar_pipeline_compute_gradients(p, b, info) != MPAR_SUCCESS)
        fail_msg("compute_gradients: %s", mpar_last_error(c->ctx));
}

static double host_loss(tcase* c) {
    double** acts = hm_acts(&c->h, c->rows);
    double loss = hm_forward(&c->h, acts, c->xd, c->tok, c->targets, c->rows);
    hm_acts_free(&c->h, acts);
    return loss;
}

/* Central differences of the host model's loss over layer k's parameters. */
static double* fd_grads(tcase* c, int k) {
    const double h = 1e-5;
    hlayer* L = &c->h.l[k];
    double** acts = hm_acts(&c->h, c->rows);
    double* g = dz(L->np);
    size_t i;
    for (i = 0; i < L->np; i++) {
        double keep = L->p[i], lp, lm;
        L->p[i] = keep + h;
        lp = hm_forward(&c->h, acts, c->xd, c->tok, c->targets, c->rows);
        L->p[i] = keep - h;
        lm = hm_forward(&c->h, acts, c->xd, c->tok, c->targets, c->rows);
        L->p[i] = keep;
        g[i] = (lp - lm) / (2.0 * h);
    }
    hm_acts_free(&c->h, acts);
    return g;
}

static double** host_grads(tcase* c) {
    double** acts = hm_acts(&c->h, c->rows);
    double** g = (double**)xalloc(sizeof(double*) * (size_t)c->h.n);
    int k;
    for (k = 0; k < c->h.n; k++) g[k] = dz(c->h.l[k].np);
    hm_forward(&c->h, acts, c->xd, c->tok, c->targets, c->rows);
    hm_backward(&c->h, acts, c->tok, c->targets, c->rows, g);
    hm_acts_free(&c->h, acts);
    return g;
}
static void free_grads(tcase* c, double** g) {
    int k;
    for (k = 0; k < c->h.n; k++) free(g[k]);
    free(g);
}

/* The dropout mask of layer k as the device applies it in this step. The
   layer must feed the last linear layer, whose classes = rows + 1. With that
   layer's weights at zero every logit is 0 and, with target r on row r,
   dW[c][j] = (S_c/K - xd[j][c]) / rows for j < rows and S_c/(K rows) for
   j = K-1, so xd[r][c] = rows * (dW[c][K-1] - dW[c][r]): the dropout output
   itself, which must be 0 or x / (1 - p). */
static void probe_dropout(tcase* c, int k) {
    hlayer* D = &c->h.l[k];
    hlayer* F = &c->h.l[k + 1];
    int C = D->in, K = F->out, rows = c->rows, r, j, dropped = 0;
    float *zero, *g;
    int32_t* t;
    double** acts;
    mpar_batch b = c->batch;
    mpar_step_info info;
    assert_true(F->kind == HK_LINEAR && k + 2 == c->h.n - 1 && K == rows + 1);
    zero = fz(F->np), g = fz(F->np);
    t = (int32_t*)xalloc(sizeof(int32_t) * (size_t)rows);
    for (r = 0; r < rows; r++) t[r] = r;
    b.targets = t;
    assert_int_equal(mpar_pipeline_set_params(c->pipe, k + 1, zero), MPAR_SUCCESS);
    compute(c, c->pipe, &b, &info);
    assert_int_equal(mpar_pipeline_get_grads(c->pipe, k + 1, g), MPAR_SUCCESS);
    assert_int_equal(mpar_pipeline_set_params(c->pipe, k + 1, c->pf[k + 1]), MPAR_SUCCESS);
    free(D->keep);
    D->keep = NULL;
    acts = hm_acts(&c->h, rows);
    hm_forward(&c->h, acts, c->xd, c->tok, c->targets, rows);
    D->keep = (unsigned char*)xalloc((size_t)rows * (size_t)C);
    for (r = 0; r < rows; r++)
        for (j = 0; j < C; j++) {
            double xd = rows * ((double)g[j * K + K - 1] - (double)g[j * K + r]);
            double full = acts[k][r * C + j] / (1.0 - D->rate);
            int keep = fabs(xd - full) < fabs(xd);
            if (fabs(xd - (keep ? full : 0.0)) > 1e-4 * (1.0 + fabs(full)))
                fail_msg("dropout output at row %d column %d is %g: neither x/(1-p) = %g nor 0", r, j, xd, full);
            D->keep[r * C + j] = (unsigned char)keep;
            dropped += !keep;
        }
    /* p = 0.3 over rows*C elements: far inside [10%, 55%] */
    if (dropped < rows * C / 10 || dropped > rows * C * 55 / 100)
        fail_msg("dropout with p = %g dropped %d of %d elements", D->rate, dropped, rows * C);
    hm_acts_free(&c->h, acts);
    free(zero), free(g), free(t);
}

/* Device gradients against finite differences (and the host's analytic
   backward against the same differences), and the loss. */
static void grad_check_case(tcase* c, const char* name) {
    mpar_step_info info;
    double** hg;
    int k;
    char what[256];
    for (k = 0; k < c->h.n; k++)
        if (c->h.l[k].kind == HK_DROPOUT) probe_dropout(c, k);
    compute(c, c->pipe, &c->batch, &info);
    assert_int_equal(info.counted_rows, count_targets(c->targets, c->rows));
    snprintf(what, sizeof what, "%s: loss", name);
    check_scalar(what, info.loss, host_loss(c), 1e-5, 0.0);
    hg = host_grads(c);
    for (k = 0; k < c->h.n; k++) {
        hlayer* L = &c->h.l[k];
        double *dev, *fd;
        if (L->np == 0) continue;
        dev = dev_grads(c, c->pipe, k);
        fd = fd_grads(c, k);
        if (max_abs(fd, L->np) < 1e-3) fail_msg("%s: layer %d has a vanishing gradient; the check would be empty", name, k);
        snprintf(what, sizeof what, "%s: layer %d (%s) host backward vs finite differences", name, k,
                 mpar_model_layer(c->model, k)->type->name);
        check_close(what, hg[k], fd, L->np, 1e-6, 1e-9);
        snprintf(what, sizeof what, "%s: layer %d (%s) device gradient vs finite differences", name, k,
                 mpar_model_layer(c->model, k)->type->name);
        check_close(what, dev, fd, L->np, 1e-2, 1e-5);
        free(dev), free(fd);
    }
    free_grads(c, hg);
}

static void grad_check(mpar_context* ctx, const char* name, const mpar_layer_desc* layers, int n, int in, int T,
                       int samples) {
    tcase c;
    case_open(&c, ctx, layers, n, in, T, samples, 1, MPAR_SCHEDULE_SEQUENTIAL, NULL);
    case_randomize(&c);
    grad_check_case(&c, name);
    case_close(&c);
}

/* [type, linear -> 4, loss] on 5 features, and with a linear in front. */
static void grad_check_simple(const mpar_layer_type* type, const char* name) {
    mpar_layer_desc a[3], b[4];
    char label[64];
    a[0] = ld(type, 0), a[1] = ld(mpar_layer_linear(), 4), a[2] = ld(mpar_layer_cross_entropy(), 0);
    grad_check(g_ctx, name, a, 3, 5, 1, 6);
    b[0] = ld(mpar_layer_linear(), 6), b[1] = ld(type, 0), b[2] = ld(mpar_layer_linear(), 4);
    b[3] = ld(mpar_layer_cross_entropy(), 0);
    snprintf(label, sizeof label, "linear + %s", name);
    grad_check(g_ctx, label, b, 4, 5, 1, 6);
}

/* ---- 1. gradient checks ---------------------------------------------------- */

static void test_grad_linear(void** state) {
    mpar_layer_desc a[3], b[4];
    (void)state;
    a[0] = ld(mpar_layer_linear(), 6), a[1] = ld(mpar_layer_linear(), 4), a[2] = ld(mpar_layer_cross_entropy(), 0);
    grad_check(g_ctx, "linear", a, 3, 5, 1, 6);
    b[0] = ld(mpar_layer_linear(), 5), b[1] = ld(mpar_layer_linear(), 6), b[2] = ld(mpar_layer_linear(), 4);
    b[3] = ld(mpar_layer_cross_entropy(), 0);
    grad_check(g_ctx, "linear + linear", b, 4, 5, 1, 6);
}

static void test_grad_activations(void** state) {
    (void)state;
    grad_check_simple(mpar_layer_relu(), "relu");
    grad_check_simple(mpar_layer_gelu(), "gelu");
    grad_check_simple(mpar_layer_tanh(), "tanh");
}

static void test_grad_layernorm(void** state) {
    mpar_layer_desc a[4];
    (void)state;
    grad_check_simple(mpar_layer_layernorm(), "layernorm");
    /* a large eps must reach the kernels */
    a[0] = ld(mpar_layer_linear(), 6), a[1] = ld(mpar_layer_layernorm(), 6), a[2] = ld(mpar_layer_linear(), 4);
    a[3] = ld(mpar_layer_cross_entropy(), 0);
    a[1].eps = 0.5f;
    grad_check(g_ctx, "linear + layernorm (eps 0.5)", a, 4, 5, 1, 6);
}

/* Rows = 6, so the last linear has 7 classes (see probe_dropout). The mask is
   fixed per (model seed, optimizer step, layer): the probe and the checked
   gradients run in the same step, and one optimizer step later it differs. */
static void test_grad_dropout(void** state) {
    mpar_layer_desc a[3], b[4];
    tcase c;
    unsigned char* before;
    size_t n, i, changed = 0;
    mpar_step_info info;
    double** acts;
    float* out;
    (void)state;
    a[0] = ld_dropout(0.3f), a[1] = ld(mpar_layer_linear(), 7), a[2] = ld(mpar_layer_cross_entropy(), 0);
    case_open(&c, g_ctx, a, 3, 8, 1, 6, 1, MPAR_SCHEDULE_SEQUENTIAL, NULL);
    case_randomize(&c);
    grad_check_case(&c, "dropout");
    /* a new step, a new mask */
    n = (size_t)c.rows * 8;
    before = (unsigned char*)xalloc(n);
    memcpy(before, c.h.l[0].keep, n);
    if (mpar_pipeline_apply_gradients(c.pipe, &info) != MPAR_SUCCESS)
        fail_msg("apply_gradients: %s", mpar_last_error(g_ctx));
    assert_int_equal(mpar_pipeline_set_params(c.pipe, 1, c.pf[1]), MPAR_SUCCESS);
    probe_dropout(&c, 0);
    for (i = 0; i < n; i++) changed += before[i] != c.h.l[0].keep[i];
    if (changed == 0) fail_msg("the dropout mask did not change after an optimizer step");
    /* inference: dropout is the identity */
    free(c.h.l[0].keep);
    c.h.l[0].keep = NULL;
    out = fz((size_t)c.rows * 7);
    assert_int_equal(mpar_pipeline_infer(c.pipe, &c.batch, out, NULL), MPAR_SUCCESS);
    acts = hm_acts(&c.h, c.rows);
    hm_forward(&c.h, acts, c.xd, c.tok, c.targets, c.rows);
    {
        double* od = f2d(out, (size_t)c.rows * 7);
        check_close("dropout: inference output (identity)", od, acts[2], (size_t)c.rows * 7, 1e-5, 1e-5);
        free(od);
    }
    hm_acts_free(&c.h, acts);
    free(out), free(before);
    case_close(&c);
    b[0] = ld(mpar_layer_linear(), 8), b[1] = ld_dropout(0.3f), b[2] = ld(mpar_layer_linear(), 7);
    b[3] = ld(mpar_layer_cross_entropy(), 0);
    grad_check(g_ctx, "linear + dropout", b, 4, 5, 1, 6);
}

/* Token model: input_features 1, T = 3, int32 token ids. */
static void test_grad_embedding(void** state) {
    mpar_layer_desc a[3];
    (void)state;
    a[0] = ld_embedding(7, 6), a[1] = ld(mpar_layer_linear(), 4), a[2] = ld(mpar_layer_cross_entropy(), 0);
    grad_check(g_ctx, "embedding", a, 3, 1, 3, 3);
}

/* C = 8, H = 2, T = 4, hidden 16; two sequences. */
static void test_grad_decoder_block(void** state) {
    mpar_layer_desc a[3], b[4];
    (void)state;
    a[0] = ld_block(2, 16), a[1] = ld(mpar_layer_linear(), 4), a[2] = ld(mpar_layer_cross_entropy(), 0);
    grad_check(g_ctx, "decoder_block", a, 3, 8, 4, 2);
    b[0] = ld(mpar_layer_linear(), 8), b[1] = ld_block(2, 16), b[2] = ld(mpar_layer_linear(), 4);
    b[3] = ld(mpar_layer_cross_entropy(), 0);
    grad_check(g_ctx, "linear + decoder_block", b, 4, 5, 4, 2);
}

/* The loss: mean over counted rows only, gradient through every logit;
   half of the rows ignored, and a batch where one class dominates. */
static void test_grad_cross_entropy(void** state) {
    mpar_layer_desc a[2];
    tcase c;
    int i;
    (void)state;
    a[0] = ld(mpar_layer_linear(), 5), a[1] = ld(mpar_layer_cross_entropy(), 0);
    case_open(&c, g_ctx, a, 2, 4, 1, 8, 1, MPAR_SCHEDULE_SEQUENTIAL, NULL);
    case_randomize(&c);
    for (i = 0; i < c.rows; i += 2) c.targets[i] = -1;
    grad_check_case(&c, "cross_entropy, half the rows ignored");
    for (i = 0; i < c.rows; i++) c.targets[i] = i % 3 == 0 ? 4 : i % 5;
    c.pf[0][4 * 5 + 4] = 6.0f; /* a large bias on class 4 */
    c.h.l[0].p[4 * 5 + 4] = 6.0;
    assert_int_equal(mpar_pipeline_set_params(c.pipe, 0, c.pf[0]), MPAR_SUCCESS);
    grad_check_case(&c, "cross_entropy, a dominant class");
    case_close(&c);
}

/* ---- 2. host reference forward and backward -------------------------------- */

/* [linear 6->8, layernorm, decoder_block(8, 2 heads, default hidden 32),
   cross_entropy]: the loss layer's input is the block's output. */
static void test_reference_forward_backward(void** state) {
    mpar_layer_desc a[4];
    tcase c;
    float* out;
    double *od, loss = 0.0, hloss, **acts, **hg;
    mpar_step_info info;
    int k, r, j, n;
    (void)state;
    a[0] = ld(mpar_layer_linear(), 8), a[1] = ld(mpar_layer_layernorm(), 8), a[2] = ld_block(2, 0);
    a[3] = ld(mpar_layer_cross_entropy(), 0);
    case_open(&c, g_ctx, a, 4, 6, 4, 3, 1, MPAR_SCHEDULE_SEQUENTIAL, NULL);
    case_randomize(&c);
    n = c.rows * 8;
    out = fz((size_t)n);
    acts = hm_acts(&c.h, c.rows);
    hloss = hm_forward(&c.h, acts, c.xd, c.tok, c.targets, c.rows);
    if (mpar_pipeline_infer(c.pipe, &c.batch, out, &loss) != MPAR_SUCCESS)
        fail_msg("infer: %s", mpar_last_error(g_ctx));
    od = f2d(out, (size_t)n);
    check_close("reference: outputs (linear, layernorm, attention block)", od, acts[3], (size_t)n, 1e-5, 1e-5);
    check_scalar("reference: inference loss", loss, hloss, 1e-5, 0.0);
    /* without targets: the same outputs; a loss asked of them is refused
       (issue 17: it used to be 0, which reads as a perfect model) */
    {
        mpar_batch b = c.batch;
        float* out2 = fz((size_t)n);
        b.targets = NULL;
        assert_int_equal(mpar_pipeline_infer(c.pipe, &b, out2, NULL), MPAR_SUCCESS);
        assert_memory_equal(out, out2, sizeof(float) * (size_t)n);
        loss = -1.0;
        assert_int_equal(mpar_pipeline_infer(c.pipe, &b, out2, &loss), MPAR_ERROR_INVALID_ARGUMENT);
        assert_true(loss == -1.0);
        free(out2);
    }
    /* causal attention: changing the last position of every sequence leaves
       the earlier positions' outputs exactly as they were */
    {
        float* out2 = fz((size_t)n);
        int moved = 0;
        for (r = 0; r < c.rows; r++)
            if (r % c.T == c.T - 1)
                for (j = 0; j < c.in; j++) c.xf[r * c.in + j] += 1.0f;
        assert_int_equal(mpar_pipeline_infer(c.pipe, &c.batch, out2, NULL), MPAR_SUCCESS);
        for (r = 0; r < c.rows; r++)
            for (j = 0; j < 8; j++) {
                if (r % c.T != c.T - 1 && out[r * 8 + j] != out2[r * 8 + j])
                    fail_msg("causality: row %d (position %d) changed when only later positions did", r, r % c.T);
                moved += out[r * 8 + j] != out2[r * 8 + j];
            }
        assert_true(moved > 0);
        for (r = 0; r < c.rows; r++)
            if (r % c.T == c.T - 1)
                for (j = 0; j < c.in; j++) c.xf[r * c.in + j] -= 1.0f;
        free(out2);
    }
    /* backward: every parameter gradient against the host's analytic one */
    compute(&c, c.pipe, &c.batch, &info);
    check_scalar("reference: training loss", info.loss, hloss, 1e-5, 0.0);
    hg = host_grads(&c);
    for (k = 0; k < c.h.n; k++) {
        double* dev;
        char what[128];
        if (c.h.l[k].np == 0) continue;
        dev = dev_grads(&c, c.pipe, k);
        snprintf(what, sizeof what, "reference: layer %d (%s) gradient vs host backward", k,
                 mpar_model_layer(c.model, k)->type->name);
        check_close(what, dev, hg[k], c.h.l[k].np, 1e-3, 1e-6);
        free(dev);
    }
    free_grads(&c, hg);
    /* attention logits in the hundreds (the q and k weights 25 times larger):
       the softmax must subtract each row's maximum, or exp overflows to inf
       and the outputs turn NaN */
    {
        hlayer* B = &c.h.l[2];
        hblock_off o = hblock_layout(B->in, B->hidden);
        size_t i;
        for (i = o.wqkv; i < o.bqkv; i++) c.pf[2][i] *= 25.0f, B->p[i] = (double)c.pf[2][i];
        assert_int_equal(mpar_pipeline_set_params(c.pipe, 2, c.pf[2]), MPAR_SUCCESS);
        hm_forward(&c.h, acts, c.xd, c.tok, c.targets, c.rows);
        assert_int_equal(mpar_pipeline_infer(c.pipe, &c.batch, out, NULL), MPAR_SUCCESS);
        for (i = 0; i < (size_t)n; i++)
            if (!isfinite(out[i])) fail_msg("large attention logits: output %d is %g", (int)i, (double)out[i]);
        free(od);
        od = f2d(out, (size_t)n);
        check_close("reference: outputs with large attention logits", od, acts[3], (size_t)n, 1e-3, 1e-4);
    }
    hm_acts_free(&c.h, acts);
    free(out), free(od);
    case_close(&c);
}

/* ---- 3. accumulation over micro-batches ------------------------------------ */

static void test_accumulation(void** state) {
    mpar_layer_desc a[6];
    tcase c;
    mpar_pipeline* one;
    mpar_step_info i4, i1, again;
    int k, v;
    (void)state;
    a[0] = ld(mpar_layer_linear(), 8), a[1] = ld(mpar_layer_layernorm(), 0), a[2] = ld_dropout(0.2f);
    a[3] = ld_block(2, 16), a[4] = ld(mpar_layer_linear(), 5), a[5] = ld(mpar_layer_cross_entropy(), 0);
    /* 10 samples of 2 rows; M = 4 gives micro-batches of 3, 3, 2 and 2 */
    case_open(&c, g_ctx, a, 6, 6, 2, 10, 4, MPAR_SCHEDULE_GPIPE, NULL);
    case_randomize(&c);
    c.targets[7] = -1, c.targets[18] = -1; /* ignored rows in two micro-batches */
    one = make_pipe(g_ctx, c.model, 10, 1, MPAR_SCHEDULE_SEQUENTIAL, NULL);
    for (k = 0; k < c.h.n; k++)
        if (c.h.l[k].np) assert_int_equal(mpar_pipeline_set_params(one, k, c.pf[k]), MPAR_SUCCESS);
    assert_int_equal(c.pipe->schedule->microbatches, 4);
    compute(&c, c.pipe, &c.batch, &i4);
    compute(&c, one, &c.batch, &i1);
    assert_int_equal(i4.counted_rows, 17);
    assert_int_equal(i1.counted_rows, 17);
    check_scalar("accumulation: loss, M = 4 vs M = 1", i4.loss, i1.loss, 1e-6, 0.0);
    for (k = 0; k < c.h.n; k++) {
        double *g4, *g1;
        char what[128];
        if (c.h.l[k].np == 0) continue;
        g4 = dev_grads(&c, c.pipe, k);
        g1 = dev_grads(&c, one, k);
        snprintf(what, sizeof what, "accumulation: layer %d (%s) gradient, M = 4 vs M = 1", k,
                 mpar_model_layer(c.model, k)->type->name);
        check_close(what, g4, g1, c.h.l[k].np, 0.0, 1e-5 * max_abs(g1, c.h.l[k].np));
        free(g4), free(g1);
    }
    /* gradients are zeroed at the start of every computation */
    {
        double* before = dev_grads(&c, c.pipe, 0);
        double* after;
        compute(&c, c.pipe, &c.batch, &again);
        after = dev_grads(&c, c.pipe, 0);
        assert_memory_equal(before, after, sizeof(double) * c.h.l[0].np);
        assert_true(again.loss == i4.loss);
        free(before), free(after);
    }
    /* the same with the backward split into input and weight passes
       (ZB-H1: the block's gstash lives from I to W), and with recomputed
       activations (dropout must redraw the same mask) */
    for (v = 0; v < 2; v++) {
        mpar_pipeline* other = make_pipe_ex(g_ctx, c.model, 10, 4, v ? MPAR_SCHEDULE_GPIPE : MPAR_SCHEDULE_ZB_H1,
                                            NULL, v);
        mpar_step_info io;
        for (k = 0; k < c.h.n; k++)
            if (c.h.l[k].np) assert_int_equal(mpar_pipeline_set_params(other, k, c.pf[k]), MPAR_SUCCESS);
        compute(&c, other, &c.batch, &io);
        check_scalar(v ? "accumulation: loss with recompute" : "accumulation: loss with ZB-H1", io.loss, i1.loss,
                     1e-6, 0.0);
        for (k = 0; k < c.h.n; k++) {
            double *go, *g1;
            char what[128];
            if (c.h.l[k].np == 0) continue;
            go = dev_grads(&c, other, k);
            g1 = dev_grads(&c, one, k);
            snprintf(what, sizeof what, "accumulation: layer %d gradient, M = 4 %s vs M = 1", k,
                     v ? "recompute" : "ZB-H1");
            check_close(what, go, g1, c.h.l[k].np, 0.0, 1e-5 * max_abs(g1, c.h.l[k].np));
            free(go), free(g1);
        }
        mpar_pipeline_destroy(other);
    }
    mpar_pipeline_destroy(one);
    case_close(&c);
}

/* ---- 4. optimizer steps ----------------------------------------------------- */

/* Two train steps; after each, the device parameters equal a host step from
   the previous parameters and the gradients compute_gradients gives on the
   same batch. */
static void optimizer_check(const char* name, const mpar_optimizer_desc* opt) {
    mpar_layer_desc a[4];
    tcase c;
    double* state1[HM_MAX];
    double* state2[HM_MAX];
    int k, t;
    char what[160];
    a[0] = ld(mpar_layer_linear(), 8), a[1] = ld(mpar_layer_tanh(), 0), a[2] = ld(mpar_layer_linear(), 4);
    a[3] = ld(mpar_layer_cross_entropy(), 0);
    case_open(&c, g_ctx, a, 4, 6, 1, 8, 1, MPAR_SCHEDULE_SEQUENTIAL, opt);
    case_randomize(&c);
    for (k = 0; k < c.h.n; k++) state1[k] = dz(c.h.l[k].np), state2[k] = dz(c.h.l[k].np);
    for (t = 1; t <= 2; t++) {
        mpar_step_info gi, info;
        double* g[HM_MAX];
        double sumsq = 0.0, norm, scale = 1.0;
        compute(&c, c.pipe, &c.batch, &gi);
        for (k = 0; k < c.h.n; k++) {
            g[k] = dev_grads(&c, c.pipe, k);
            sumsq += ref_sumsq(g[k], (int)c.h.l[k].np);
        }
        norm = sqrt(sumsq);
        if (mpar_pipeline_train_step(c.pipe, &c.batch, &info) != MPAR_SUCCESS)
            fail_msg("train_step: %s", mpar_last_error(g_ctx));
        assert_int_equal(info.step, t);
        assert_true(info.lr == opt->lr);
        assert_true(info.loss == gi.loss);
        snprintf(what, sizeof what, "%s: step %d gradient norm", name, t);
        check_scalar(what, info.grad_norm, norm, 1e-5, 0.0);
        if (opt->clip_norm > 0.0f) {
            /* clipped well above the clip norm, untouched well below it */
            if (norm > 1.5 * opt->clip_norm) scale = (double)opt->clip_norm / norm;
            else if (!(norm < opt->clip_norm / 1.5))
                fail_msg("%s: norm %g is too close to the clip norm %g to tell", name, norm, (double)opt->clip_norm);
        }
        for (k = 0; k < c.h.n; k++) {
            hlayer* L = &c.h.l[k];
            double *dev, moved;
            int n = (int)L->np, i;
            if (n == 0) {
                free(g[k]);
                continue;
            }
            if (opt->kind == MPAR_OPTIMIZER_SGD) {
                ref_sgd_step(L->p, g[k], state1[k], n, opt->lr, opt->momentum, opt->weight_decay, scale);
            } else {
                double c1 = 1.0 - pow((double)opt->beta1, t), c2 = 1.0 - pow((double)opt->beta2, t);
                ref_adamw_step(L->p, g[k], state1[k], state2[k], n, opt->lr, opt->beta1, opt->beta2, opt->eps,
                               opt->weight_decay, c1, c2, scale);
            }
            dev = dev_params(&c, c.pipe, k);
            snprintf(what, sizeof what, "%s: step %d, layer %d parameters vs host step", name, t, k);
            check_close(what, dev, L->p, L->np, 1e-5, 1e-6);
            for (moved = 0.0, i = 0; i < n; i++) moved = fmax(moved, fabs(dev[i] - (double)c.pf[k][i]));
            if (moved < 1e-4) fail_msg("%s: step %d left layer %d unchanged", name, t, k);
            for (i = 0; i < n; i++) c.pf[k][i] = (float)dev[i];
            free(dev), free(g[k]);
        }
    }
    for (k = 0; k < c.h.n; k++) free(state1[k]), free(state2[k]);
    case_close(&c);
}

static void test_sgd_momentum(void** state) {
    mpar_optimizer_desc o;
    (void)state;
    memset(&o, 0, sizeof o);
    o.kind = MPAR_OPTIMIZER_SGD;
    o.lr = 0.1f, o.momentum = 0.9f, o.weight_decay = 0.01f;
    optimizer_check("sgd, momentum 0.9, weight decay 0.01", &o);
}

static void test_adamw(void** state) {
    mpar_optimizer_desc o;
    (void)state;
    memset(&o, 0, sizeof o);
    o.kind = MPAR_OPTIMIZER_ADAMW;
    o.lr = 1e-2f, o.beta1 = 0.9f, o.beta2 = 0.999f, o.eps = 1e-8f, o.weight_decay = 0.1f;
    optimizer_check("adamw, lr 1e-2, weight decay 0.1", &o);
}

/* clip_norm below the gradient norm: the step uses grad_scale = clip/norm.
   SGD sees the scale directly; AdamW's second step sees it through m and v. */
static void test_clipping(void** state) {
    mpar_optimizer_desc o;
    (void)state;
    memset(&o, 0, sizeof o);
    o.kind = MPAR_OPTIMIZER_SGD;
    o.lr = 0.1f, o.momentum = 0.9f, o.clip_norm = 0.05f;
    optimizer_check("sgd + clipping to 0.05", &o);
    memset(&o, 0, sizeof o);
    o.kind = MPAR_OPTIMIZER_ADAMW;
    o.lr = 1e-2f, o.beta1 = 0.9f, o.beta2 = 0.999f, o.eps = 1e-8f, o.weight_decay = 0.1f, o.clip_norm = 0.05f;
    optimizer_check("adamw + clipping to 0.05", &o);
    /* a clip norm far above the gradients' norm leaves them alone */
    memset(&o, 0, sizeof o);
    o.kind = MPAR_OPTIMIZER_SGD;
    o.lr = 0.1f, o.momentum = 0.9f, o.clip_norm = 1000.0f;
    optimizer_check("sgd, clip norm 1000 not reached", &o);
}

/* Warm-up over 3 steps, cosine decay over 4 to min_lr, then min_lr; the
   parameters move by exactly lr_t * gradient (plain SGD). */
static void test_lr_schedule(void** state) {
    static const double expect[9] = {0.0333333, 0.0666667, 0.1, 0.0868198, 0.055, 0.0231802, 0.01, 0.01, 0.01};
    mpar_layer_desc a[3];
    mpar_optimizer_desc o;
    tcase c;
    int t, k;
    char what[96];
    (void)state;
    memset(&o, 0, sizeof o);
    o.kind = MPAR_OPTIMIZER_SGD;
    o.lr = 0.1f, o.warmup_steps = 3, o.decay_steps = 4, o.min_lr = 0.01f;
    a[0] = ld(mpar_layer_linear(), 6), a[1] = ld(mpar_layer_linear(), 4), a[2] = ld(mpar_layer_cross_entropy(), 0);
    case_open(&c, g_ctx, a, 3, 5, 1, 6, 1, MPAR_SCHEDULE_SEQUENTIAL, &o);
    case_randomize(&c);
    for (t = 1; t <= 9; t++) {
        mpar_step_info gi, info;
        double warm = (double)o.lr * t / 3.0, tt = fmin((t - 3) / 4.0, 1.0);
        double want = t <= 3 ? warm : o.min_lr + 0.5 * ((double)o.lr - o.min_lr) * (1.0 + cos(3.141592653589793 * tt));
        double *before[HM_MAX], *g[HM_MAX];
        compute(&c, c.pipe, &c.batch, &gi);
        for (k = 0; k < c.h.n; k++) before[k] = dev_params(&c, c.pipe, k), g[k] = dev_grads(&c, c.pipe, k);
        if (mpar_pipeline_apply_gradients(c.pipe, &info) != MPAR_SUCCESS)
            fail_msg("apply_gradients: %s", mpar_last_error(g_ctx));
        assert_int_equal(info.step, t);
        snprintf(what, sizeof what, "lr schedule: step %d lr", t);
        check_scalar(what, info.lr, want, 1e-6, 0.0);
        check_scalar(what, info.lr, expect[t - 1], 0.0, 1e-6);
        for (k = 0; k < c.h.n; k++) {
            size_t i, n = c.h.l[k].np;
            double* after;
            if (n == 0) {
                free(before[k]), free(g[k]);
                continue;
            }
            after = dev_params(&c, c.pipe, k);
            for (i = 0; i < n; i++) before[k][i] -= (double)info.lr * g[k][i];
            snprintf(what, sizeof what, "lr schedule: step %d, layer %d parameters", t, k);
            check_close(what, after, before[k], n, 1e-6, 1e-7);
            free(after), free(before[k]), free(g[k]);
        }
    }
    /* apply needs a fresh compute_gradients */
    {
        mpar_step_info info;
        assert_int_equal(mpar_pipeline_apply_gradients(c.pipe, &info), MPAR_ERROR_INVALID_STATE);
        assert_non_null(strstr(mpar_last_error(g_ctx), "compute_gradients"));
    }
    case_close(&c);
}

/* ---- 5. bad models ------------------------------------------------------------ */

static mpar_model* bad_model(int in, int T) {
    mpar_model_desc md;
    mpar_model* m = NULL;
    mpar_error err;
    memset(&md, 0, sizeof md);
    md.input_features = in;
    md.seq_len = T;
    if (mpar_model_create(&md, &m, &err) != MPAR_SUCCESS) fail_msg("mpar_model_create: %s", err.message);
    return m;
}
static void add_ok(mpar_model* m, mpar_layer_desc d) {
    mpar_error err;
    if (mpar_model_add(m, &d, &err) != MPAR_SUCCESS) fail_msg("mpar_model_add: %s", err.message);
}
/* The add fails with code and a message containing text; the model keeps
   its layers. */
static void add_fails(mpar_model* m, mpar_layer_desc d, mpar_result code, const char* text) {
    mpar_error err;
    int before = mpar_model_layer_count(m);
    memset(&err, 0, sizeof err);
    assert_int_equal(mpar_model_add(m, &d, &err), code);
    assert_int_equal(err.code, code);
    if (!strstr(err.message, text)) fail_msg("'%s' not in '%s'", text, err.message);
    assert_int_equal(mpar_model_layer_count(m), before);
    assert_int_equal(mpar_model_add(m, &d, NULL), code); /* no error struct: still fails, no crash */
}

static void test_bad_models(void** state) {
    mpar_model *m, *out;
    mpar_model_desc md;
    mpar_error err;
    mpar_pipeline* p;
    mpar_pipeline_desc pd;
    mpar_stage_desc st = {0, 0, 0};
    mpar_layer_desc d;
    mpar_layer_type broken = scale2_type;
    (void)state;
    /* linear with 0 or negative units */
    m = bad_model(4, 1);
    add_fails(m, ld(mpar_layer_linear(), 0), MPAR_ERROR_INVALID_MODEL, "units must be positive");
    add_fails(m, ld(mpar_layer_linear(), -3), MPAR_ERROR_INVALID_MODEL, "units must be positive");
    assert_int_equal(mpar_model_add_linear(m, 0, &err), MPAR_ERROR_INVALID_MODEL);
    /* mismatched widths: layer norm declared for 5 on a width of 4 */
    add_fails(m, ld(mpar_layer_layernorm(), 5), MPAR_ERROR_INVALID_MODEL, "expects width 5 but the previous layer gives 4");
    /* dropout rate 1.0 (and below 0) */
    add_fails(m, ld_dropout(1.0f), MPAR_ERROR_INVALID_MODEL, "rate must be in [0, 1)");
    add_fails(m, ld_dropout(-0.1f), MPAR_ERROR_INVALID_MODEL, "rate must be in [0, 1)");
    /* heads not dividing the width (and no heads) */
    add_fails(m, ld_block(3, 0), MPAR_ERROR_INVALID_MODEL, "divide the width 4");
    add_fails(m, ld_block(0, 0), MPAR_ERROR_INVALID_MODEL, "heads (0)");
    /* a token layer that is not first */
    add_ok(m, ld(mpar_layer_linear(), 1));
    add_fails(m, ld_embedding(10, 4), MPAR_ERROR_INVALID_MODEL, "must be the first layer");
    /* no loss: validate and pipeline_create both fail */
    assert_int_equal(mpar_model_validate(m, &err), MPAR_ERROR_INVALID_MODEL);
    if (!strstr(err.message, "not a loss layer")) fail_msg("validate: '%s'", err.message);
    memset(&pd, 0, sizeof pd);
    pd.stages = &st, pd.stage_count = 1, pd.max_batch = 4;
    p = (mpar_pipeline*)&pd;
    assert_int_equal(mpar_pipeline_create(g_ctx, m, &pd, &p), MPAR_ERROR_INVALID_MODEL);
    assert_null(p);
    if (!strstr(mpar_last_error(g_ctx), "not a loss layer")) fail_msg("create: '%s'", mpar_last_error(g_ctx));
    /* cross-entropy on 1 class */
    add_fails(m, ld(mpar_layer_cross_entropy(), 0), MPAR_ERROR_INVALID_MODEL, "at least 2 classes");
    /* settings a checkpoint could not hold: NaN or infinite rate or eps, negative eps */
    {
        mpar_layer_desc bad = ld(mpar_layer_layernorm(), 0);
        bad.eps = NAN;
        add_fails(m, bad, MPAR_ERROR_INVALID_MODEL, "must be finite");
        bad.eps = -1e-5f;
        add_fails(m, bad, MPAR_ERROR_INVALID_MODEL, "eps not negative");
        bad = ld_dropout(0.1f);
        bad.rate = INFINITY;
        add_fails(m, bad, MPAR_ERROR_INVALID_MODEL, "rate inf");
    }
    /* a layer after the loss */
    add_ok(m, ld(mpar_layer_linear(), 3));
    add_ok(m, ld(mpar_layer_cross_entropy(), 0));
    assert_int_equal(mpar_model_validate(m, &err), MPAR_SUCCESS);
    add_fails(m, ld(mpar_layer_relu(), 0), MPAR_ERROR_INVALID_MODEL, "follows the loss layer");
    add_fails(m, ld(mpar_layer_linear(), 2), MPAR_ERROR_INVALID_MODEL, "the loss must be last");
    mpar_model_destroy(m);
    /* an empty model */
    m = bad_model(4, 1);
    assert_int_equal(mpar_model_validate(m, &err), MPAR_ERROR_INVALID_MODEL);
    if (!strstr(err.message, "no layers")) fail_msg("validate: '%s'", err.message);
    /* an embedding on a model that is not a token model */
    add_fails(m, ld_embedding(10, 4), MPAR_ERROR_INVALID_MODEL, "one token per row");
    mpar_model_destroy(m);
    /* model input_features 0, negative seq_len */
    memset(&md, 0, sizeof md);
    out = (mpar_model*)&md;
    assert_int_equal(mpar_model_create(&md, &out, &err), MPAR_ERROR_INVALID_MODEL);
    assert_null(out);
    if (!strstr(err.message, "input_features must be positive")) fail_msg("'%s'", err.message);
    md.input_features = 3, md.seq_len = -1;
    assert_int_equal(mpar_model_create(&md, &out, &err), MPAR_ERROR_INVALID_MODEL);
    if (!strstr(err.message, "seq_len")) fail_msg("'%s'", err.message);
    /* NULL arguments */
    md.seq_len = 1;
    assert_int_equal(mpar_model_create(NULL, &out, &err), MPAR_ERROR_INVALID_ARGUMENT);
    if (!strstr(err.message, "NULL")) fail_msg("'%s'", err.message);
    assert_int_equal(mpar_model_create(&md, NULL, &err), MPAR_ERROR_INVALID_ARGUMENT);
    m = bad_model(4, 1);
    d = ld(mpar_layer_linear(), 3);
    assert_int_equal(mpar_model_add(NULL, &d, &err), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_model_add(m, NULL, &err), MPAR_ERROR_INVALID_ARGUMENT);
    add_fails(m, ld(NULL, 3), MPAR_ERROR_INVALID_ARGUMENT, "NULL");
    broken.forward = NULL;
    add_fails(m, ld(&broken, 0), MPAR_ERROR_INVALID_ARGUMENT, "NULL");
    assert_int_equal(mpar_model_validate(NULL, &err), MPAR_ERROR_INVALID_ARGUMENT);
    add_ok(m, ld(mpar_layer_linear(), 3));
    add_ok(m, ld(mpar_layer_cross_entropy(), 0));
    p = (mpar_pipeline*)&pd;
    assert_int_equal(mpar_pipeline_create(g_ctx, NULL, &pd, &p), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_create(g_ctx, m, NULL, &p), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_create(NULL, m, &pd, &p), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_create(g_ctx, m, &pd, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_compute_gradients(NULL, NULL, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_apply_gradients(NULL, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_train_step(NULL, NULL, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_infer(NULL, NULL, NULL, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_get_params(NULL, 0, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_set_params(NULL, 0, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_get_grads(NULL, 0, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    /* the valid model still builds; a NULL batch or buffer is refused */
    st.last_layer = 1;
    p = make_pipe(g_ctx, m, 4, 1, MPAR_SCHEDULE_SEQUENTIAL, NULL);
    assert_int_equal(mpar_pipeline_compute_gradients(p, NULL, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_get_params(p, 0, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    assert_int_equal(mpar_pipeline_set_params(p, 7, NULL), MPAR_ERROR_INVALID_ARGUMENT);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
}

/* ---- 6. Fashion-MNIST ---------------------------------------------------------- */

#define FMNIST_DIR "/usr/share/datasets/fashion-mnist/"

/* The first `count` bytes after an IDX header, checked against its magic. */
static unsigned char* read_idx_gz(const char* path, uint32_t magic, int header, size_t count) {
    unsigned char head[16], *data;
    gzFile f = gzopen(path, "rb");
    if (!f) return NULL;
    data = (unsigned char*)xalloc(count);
    if (gzread(f, head, (unsigned)header) != header ||
        ((uint32_t)head[0] << 24 | (uint32_t)head[1] << 16 | (uint32_t)head[2] << 8 | head[3]) != magic ||
        gzread(f, data, (unsigned)count) != (int)count) {
        free(data);
        data = NULL;
    }
    gzclose(f);
    return data;
}

static void test_fashion_mnist(void** state) {
    enum { TRAIN = 2000, TEST = 1000, PIX = 784, BATCH = 100, STEPS = 40 };
    unsigned char *img, *lab;
    float* x;
    int32_t* y;
    mpar_model* m;
    mpar_pipeline* p;
    mpar_optimizer_desc o;
    mpar_layer_desc a[4];
    mpar_batch b;
    mpar_step_info info;
    double first = 0.0, last5 = 0.0, test_loss = 0.0;
    float* out;
    int i, s, correct = 0;
    (void)state;
    img = read_idx_gz(FMNIST_DIR "train-images-idx3-ubyte.gz", 0x803, 16, (size_t)(TRAIN + TEST) * PIX);
    lab = read_idx_gz(FMNIST_DIR "train-labels-idx1-ubyte.gz", 0x801, 8, (size_t)(TRAIN + TEST));
    if (!img || !lab) fail_msg("cannot read Fashion-MNIST from " FMNIST_DIR);
    x = fz((size_t)(TRAIN + TEST) * PIX);
    y = (int32_t*)xalloc(sizeof(int32_t) * (TRAIN + TEST));
    for (i = 0; i < (TRAIN + TEST) * PIX; i++) x[i] = (float)img[i] / 255.0f;
    for (i = 0; i < TRAIN + TEST; i++) y[i] = lab[i];
    a[0] = ld(mpar_layer_linear(), 128), a[1] = ld(mpar_layer_relu(), 0), a[2] = ld(mpar_layer_linear(), 10);
    a[3] = ld(mpar_layer_cross_entropy(), 0);
    m = make_model(PIX, 1, a, 4);
    memset(&o, 0, sizeof o);
    o.kind = MPAR_OPTIMIZER_ADAMW;
    o.lr = 1e-3f;
    p = make_pipe(g_ctx, m, BATCH, 1, MPAR_SCHEDULE_SEQUENTIAL, &o);
    for (s = 0; s < STEPS; s++) {
        int first_sample = (s % (TRAIN / BATCH)) * BATCH;
        b.inputs = x + (size_t)first_sample * PIX;
        b.targets = y + first_sample;
        b.samples = BATCH;
        if (mpar_pipeline_train_step(p, &b, &info) != MPAR_SUCCESS) fail_msg("train_step: %s", mpar_last_error(g_ctx));
        if (s == 0) first = info.loss;
        if (s >= STEPS - 5) last5 += info.loss / 5.0;
    }
    out = fz((size_t)TEST * 10);
    b.inputs = x + (size_t)TRAIN * PIX;
    b.targets = y + TRAIN;
    b.samples = TEST;
    if (mpar_pipeline_infer(p, &b, out, &test_loss) != MPAR_SUCCESS) fail_msg("infer: %s", mpar_last_error(g_ctx));
    for (i = 0; i < TEST; i++) {
        int j, best = 0;
        for (j = 1; j < 10; j++)
            if (out[i * 10 + j] > out[i * 10 + best]) best = j;
        correct += best == y[TRAIN + i];
    }
    if (g_verbose)
        printf("  fashion-mnist: first loss %.4f, last 5 %.4f, held-out loss %.4f, accuracy %.3f\n", first, last5,
               test_loss, correct / (double)TEST);
    if (!(last5 < 0.6 * first)) fail_msg("loss went from %g to %g (last 5 steps): not below 60%%", first, last5);
    if (!(correct > TEST * 6 / 10)) fail_msg("held-out accuracy %d / %d is not above 60%%", correct, TEST);
    assert_true(test_loss > 0.0 && test_loss < first);
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
    free(out), free(x), free(y), free(img), free(lab);
}

/* ---- 7. a user-defined layer type ------------------------------------------------- */

/* Removed in group_teardown too, when a failed check skipped the cleanup. */
static char g_tmp_dir[64], g_tmp_file[512];

static void remove_tmp(void) {
    if (g_tmp_file[0]) remove(g_tmp_file);
    if (g_tmp_dir[0]) rmdir(g_tmp_dir);
    g_tmp_file[0] = g_tmp_dir[0] = '\0';
}

static void test_user_layer(void** state) {
    char dir[] = "/tmp/mpar_test_layers_XXXXXX", path[512], found[4096];
    mpar_context* ctx;
    mpar_layer_desc a[3], b[4];
    tcase c;
    FILE* f;
    float* out;
    double *od, loss = 0.0, hloss, **acts;
    (void)state;
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/%s", dir, SCALE2_FILE);
    snprintf(g_tmp_dir, sizeof g_tmp_dir, "%s", dir);
    snprintf(g_tmp_file, sizeof g_tmp_file, "%s", path);
    f = fopen(path, "w");
    assert_non_null(f);
    fputs(scale2_source, f);
    fclose(f);
    ctx = make_ctx(dir);
    /* the user's file comes from kernel_path; the built-in ones from
       MPAR_KERNEL_PATH or beside the executable */
    assert_int_equal(mpar_kernel_find(ctx, SCALE2_FILE, found, sizeof found), MPAR_SUCCESS);
    assert_string_equal(found, path);
    assert_int_equal(mpar_kernel_find(ctx, "elementwise.cl", found, sizeof found), MPAR_SUCCESS);
    assert_null(strstr(found, dir));
    assert_int_equal(mpar_kernel_find(g_ctx, SCALE2_FILE, found, sizeof found), MPAR_ERROR_KERNEL_NOT_FOUND);

    /* forward: [linear 5->6, scale2, loss]: the outputs are 2 (x W + b) */
    a[0] = ld(mpar_layer_linear(), 6), a[1] = ld(&scale2_type, 0), a[2] = ld(mpar_layer_cross_entropy(), 0);
    case_open(&c, ctx, a, 3, 5, 1, 4, 1, MPAR_SCHEDULE_SEQUENTIAL, NULL);
    case_randomize(&c);
    out = fz((size_t)c.rows * 6);
    if (mpar_pipeline_infer(c.pipe, &c.batch, out, &loss) != MPAR_SUCCESS) fail_msg("infer: %s", mpar_last_error(ctx));
    acts = hm_acts(&c.h, c.rows);
    hloss = hm_forward(&c.h, acts, c.xd, c.tok, c.targets, c.rows);
    od = f2d(out, (size_t)c.rows * 6);
    check_close("scale2: outputs vs 2 (x W + b)", od, acts[2], (size_t)c.rows * 6, 1e-5, 1e-5);
    check_scalar("scale2: loss", loss, hloss, 1e-5, 0.0);
    hm_acts_free(&c.h, acts);
    free(od), free(out);
    /* backward: the linear in front sees scale2's input gradient */
    grad_check_case(&c, "linear + scale2");
    case_close(&c);
    b[0] = ld(mpar_layer_linear(), 6), b[1] = ld(&scale2_type, 0), b[2] = ld(mpar_layer_linear(), 4);
    b[3] = ld(mpar_layer_cross_entropy(), 0);
    grad_check(ctx, "linear + scale2 + linear", b, 4, 5, 1, 6);
    a[0] = ld(&scale2_type, 0), a[1] = ld(mpar_layer_linear(), 4), a[2] = ld(mpar_layer_cross_entropy(), 0);
    grad_check(ctx, "scale2 first", a, 3, 5, 1, 6);

    /* a context that cannot find the file fails at the first forward, and
       says which file */
    a[0] = ld(mpar_layer_linear(), 6), a[1] = ld(&scale2_type, 0), a[2] = ld(mpar_layer_cross_entropy(), 0);
    case_open(&c, g_ctx, a, 3, 5, 1, 4, 1, MPAR_SCHEDULE_SEQUENTIAL, NULL);
    {
        mpar_step_info info;
        assert_int_equal(mpar_pipeline_compute_gradients(c.pipe, &c.batch, &info), MPAR_ERROR_KERNEL_NOT_FOUND);
        if (!strstr(mpar_last_error(g_ctx), SCALE2_FILE)) fail_msg("'%s'", mpar_last_error(g_ctx));
    }
    case_close(&c);
    mpar_destroy(ctx);
    remove_tmp();
}

/* ---- a deep stage ------------------------------------------------------------------ */

/* More than 512 layers on one stage: compute, then one step whose gradient
   norm must equal the norm of every layer's gradients. Runs in a child
   process (this executable with --deep-stage) so that memory corruption
   shows up as this test failing instead of ending the whole run. */
static int deep_stage_child(void) {
    enum { LAYERS = 600 };
    mpar_context* ctx;
    mpar_model* m;
    mpar_model_desc md;
    mpar_pipeline* p;
    mpar_desc d;
    mpar_error err;
    mpar_step_info info;
    mpar_batch b;
    float x[12] = {0.5f, 1.0f, -0.25f, 0.75f, 1.5f, -1.0f, 0.25f, 0.5f, -0.5f, 0.125f, 1.25f, 0.375f}, g[4 * 4 + 4];
    int32_t t[3] = {0, 2, 1};
    double sumsq = 0.0;
    int i, k;
    memset(&d, 0, sizeof d), memset(&md, 0, sizeof md);
    d.error = &err;
    md.input_features = 4, md.seq_len = 1, md.seed = 3;
    if (mpar_create(&d, &ctx) != MPAR_SUCCESS || mpar_model_create(&md, &m, &err) != MPAR_SUCCESS) {
        fprintf(stderr, "deep stage: %s\n", err.message);
        return 2;
    }
    mpar_model_add_linear(m, 4, NULL);
    for (i = 0; i < LAYERS - 3; i++) mpar_model_add_simple(m, mpar_layer_relu(), NULL);
    mpar_model_add_linear(m, 3, NULL);
    mpar_model_add_simple(m, mpar_layer_cross_entropy(), NULL);
    if (mpar_model_layer_count(m) != LAYERS) return 2;
    {
        mpar_stage_desc st = {0, 0, LAYERS - 1};
        mpar_pipeline_desc pd;
        memset(&pd, 0, sizeof pd);
        pd.stages = &st, pd.stage_count = 1, pd.max_batch = 3;
        if (mpar_pipeline_create(ctx, m, &pd, &p) != MPAR_SUCCESS) {
            fprintf(stderr, "deep stage: %s\n", mpar_last_error(ctx));
            return 2;
        }
    }
    b.inputs = x, b.targets = t, b.samples = 3;
    if (mpar_pipeline_compute_gradients(p, &b, &info) != MPAR_SUCCESS ||
        mpar_pipeline_apply_gradients(p, &info) != MPAR_SUCCESS) {
        fprintf(stderr, "deep stage: %s\n", mpar_last_error(ctx));
        return 1;
    }
    for (k = 0; k < LAYERS; k += LAYERS - 2) { /* the two linear layers hold every parameter */
        int n = (int)mpar_model_layer(m, k)->param_count;
        mpar_pipeline_get_grads(p, k, g);
        for (i = 0; i < n; i++) sumsq += (double)g[i] * g[i];
    }
    if (!(fabs(info.grad_norm - sqrt(sumsq)) <= 1e-5 * sqrt(sumsq)) || !(sumsq > 0.0)) {
        fprintf(stderr, "deep stage: gradient norm %g, the layers' gradients give %g\n", info.grad_norm, sqrt(sumsq));
        return 1;
    }
    mpar_pipeline_destroy(p);
    mpar_model_destroy(m);
    mpar_destroy(ctx);
    return 0;
}

static void test_deep_stage(void** state) {
    char exe[4096], cmd[4200];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    int status;
    (void)state;
    assert_true(n > 0);
    exe[n] = '\0';
    snprintf(cmd, sizeof cmd, "'%s' --deep-stage", exe);
    status = system(cmd);
    if (status == -1) fail_msg("cannot run %s", cmd);
    if (WIFSIGNALED(status)) fail_msg("a stage of 600 layers crashed the process (signal %d)", WTERMSIG(status));
    if (WIFEXITED(status) && WEXITSTATUS(status) > 128) /* the shell reports a crash this way */
        fail_msg("a stage of 600 layers crashed the process (signal %d)", WEXITSTATUS(status) - 128);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail_msg("a stage of 600 layers failed (exit status %d)", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
}

/* ---- the run ---------------------------------------------------------------------- */

static int group_setup(void** state) {
    mpar_desc d;
    mpar_error err;
    (void)state;
    g_verbose = getenv("MPAR_TEST_VERBOSE") != NULL;
    memset(&d, 0, sizeof d);
    d.error = &err;
    if (mpar_create(&d, &g_ctx) != MPAR_SUCCESS) {
        fprintf(stderr, "mpar_create: %s\n", err.message);
        return -1;
    }
    return 0;
}

static int group_teardown(void** state) {
    (void)state;
    remove_tmp();
    mpar_destroy(g_ctx);
    return 0;
}

int main(int argc, char** argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grad_linear),
        cmocka_unit_test(test_grad_activations),
        cmocka_unit_test(test_grad_dropout),
        cmocka_unit_test(test_grad_layernorm),
        cmocka_unit_test(test_grad_embedding),
        cmocka_unit_test(test_grad_decoder_block),
        cmocka_unit_test(test_grad_cross_entropy),
        cmocka_unit_test(test_reference_forward_backward),
        cmocka_unit_test(test_accumulation),
        cmocka_unit_test(test_sgd_momentum),
        cmocka_unit_test(test_adamw),
        cmocka_unit_test(test_clipping),
        cmocka_unit_test(test_lr_schedule),
        cmocka_unit_test(test_bad_models),
        cmocka_unit_test(test_user_layer),
        cmocka_unit_test(test_fashion_mnist),
        cmocka_unit_test(test_deep_stage),
    };
    if (argc > 1 && !strcmp(argv[1], "--deep-stage")) return deep_stage_child();
    return cmocka_run_group_tests_name("mpar layers", tests, group_setup, group_teardown);
}
