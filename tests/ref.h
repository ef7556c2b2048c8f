/* ref.h - plain C double-precision reference implementations of the maths of
   every mpar kernel in the kernels/ .cl files, forward and backward. Header-only: every
   function is static inline, so including it without using everything is
   -Wall -Werror clean. C99 and C++.

   Conventions (same as the kernels, minus the buffer offsets):
   - Row-major. "rows x cols" activations: rows = batch*seq, cols = features.
   - Forward functions and input-gradient functions OVERWRITE their outputs.
   - Parameter-gradient functions ACCUMULATE (+=) into their outputs, exactly
     like the kernels, so tests can start from a non-zero gradient.
   - Integer inputs (targets, tokens) are int; everything else double.
   - Pointers may not alias unless stated.

   Kernel <-> reference map:
     mpar_fill/scale/axpy/copy/add      -> (trivial; done inline by tests)
     mpar_relu_fwd/bwd                  -> ref_relu_fwd / ref_relu_bwd
     mpar_gelu_fwd/bwd                  -> ref_gelu_fwd / ref_gelu_bwd
     mpar_tanh_fwd/bwd                  -> ref_tanh_fwd / ref_tanh_bwd
     mpar_dropout_fwd/bwd               -> ref_dropout_fwd / ref_dropout_bwd
     mpar_bias_add / mpar_bias_grad     -> ref_bias_add / ref_bias_grad
     mpar_layernorm_fwd/bwd_input/bwd_weight -> ref_layernorm_*
     mpar_xent_fwd / mpar_xent_bwd      -> ref_xent_fwd / ref_xent_bwd
     mpar_loss_sum, mpar_sum_final      -> ref_sum
     mpar_embedding_fwd / bwd_wte / bwd_wpe -> ref_embedding_fwd / ref_embedding_bwd
     mpar_attn_fwd / bwd_ds + bwd_qkv   -> ref_attn_fwd / ref_attn_bwd
     mpar_sgd_step / mpar_adamw_step    -> ref_sgd_step / ref_adamw_step
     mpar_sumsq_partial                 -> ref_sumsq
*/
#ifndef MPAR_TESTS_REF_H
#define MPAR_TESTS_REF_H

#include <math.h>
#include <stdint.h>

/* ---- activations --------------------------------------------------------- */

/* y = max(x, 0) */
static inline void ref_relu_fwd(const double* x, double* y, int n)
{
    for (int i = 0; i < n; ++i) y[i] = x[i] > 0.0 ? x[i] : 0.0;
}

/* dx = dy * (x > 0) */
static inline void ref_relu_bwd(const double* x, const double* dy, double* dx, int n)
{
    for (int i = 0; i < n; ++i) dx[i] = x[i] > 0.0 ? dy[i] : 0.0;
}

#define REF_GELU_K0 0.7978845608028654 /* sqrt(2/pi) */
#define REF_GELU_K1 0.044715

/* GELU, tanh approximation (GPT-2): 0.5 x (1 + tanh(k0 (x + k1 x^3))) */
static inline double ref_gelu(double x)
{
    return 0.5 * x * (1.0 + tanh(REF_GELU_K0 * (x + REF_GELU_K1 * x * x * x)));
}

/* d/dx of ref_gelu */
static inline double ref_gelu_deriv(double x)
{
    double t = tanh(REF_GELU_K0 * (x + REF_GELU_K1 * x * x * x));
    return 0.5 * (1.0 + t)
         + 0.5 * x * (1.0 - t * t) * REF_GELU_K0 * (1.0 + 3.0 * REF_GELU_K1 * x * x);
}

static inline void ref_gelu_fwd(const double* x, double* y, int n)
{
    for (int i = 0; i < n; ++i) y[i] = ref_gelu(x[i]);
}

/* dx = dy * gelu'(x) */
static inline void ref_gelu_bwd(const double* x, const double* dy, double* dx, int n)
{
    for (int i = 0; i < n; ++i) dx[i] = dy[i] * ref_gelu_deriv(x[i]);
}

static inline void ref_tanh_fwd(const double* x, double* y, int n)
{
    for (int i = 0; i < n; ++i) y[i] = tanh(x[i]);
}

/* dx = dy * (1 - y^2), y = the forward OUTPUT (as the kernel) */
static inline void ref_tanh_bwd(const double* y, const double* dy, double* dx, int n)
{
    for (int i = 0; i < n; ++i) dx[i] = dy[i] * (1.0 - y[i] * y[i]);
}

/* ---- dropout ------------------------------------------------------------- */

/* The 32-bit mixer of the dropout hash (see elementwise.cl). */
static inline uint32_t ref_mix32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/* The dropout uniform in [0, 1) for counter ctr = idx_off + i; exactly the
   float the kernel computes (a multiple of 2^-24). */
static inline double ref_dropout_uniform(uint32_t seed_lo, uint32_t seed_hi, uint32_t ctr)
{
    uint32_t key = ref_mix32(seed_lo ^ ref_mix32(seed_hi ^ 0x9e3779b9u));
    uint32_t h = ref_mix32(ref_mix32(ctr ^ key) + key);
    return (double)(h >> 8) * (1.0 / 16777216.0);
}

/* 1 if the element is kept. Pass p as the exact float given to the kernel
   (converted to double) and the mask agrees with the kernel bit for bit. */
static inline int ref_dropout_keep(uint32_t seed_lo, uint32_t seed_hi, uint32_t ctr, double p)
{
    return p < 1.0 && !(ref_dropout_uniform(seed_lo, seed_hi, ctr) < p);
}

/* y[i] = keep(i) ? x[i] / (1 - p) : 0, counter = idx_off + i */
static inline void ref_dropout_fwd(const double* x, double* y, int n, double p,
                                   uint32_t seed_lo, uint32_t seed_hi, int idx_off)
{
    for (int i = 0; i < n; ++i)
        y[i] = ref_dropout_keep(seed_lo, seed_hi, (uint32_t)idx_off + (uint32_t)i, p)
             ? x[i] / (1.0 - p) : 0.0;
}

/* dx[i] = keep(i) ? dy[i] / (1 - p) : 0 (same mask as the forward) */
static inline void ref_dropout_bwd(const double* dy, double* dx, int n, double p,
                                   uint32_t seed_lo, uint32_t seed_hi, int idx_off)
{
    ref_dropout_fwd(dy, dx, n, p, seed_lo, seed_hi, idx_off);
}

/* ---- bias ---------------------------------------------------------------- */

/* y[r,c] += b[c] */
static inline void ref_bias_add(double* y, int rows, int cols, const double* b)
{
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) y[r * cols + c] += b[c];
}

/* db[c] += sum_r dy[r,c] (accumulate) */
static inline void ref_bias_grad(const double* dy, int rows, int cols, double* db)
{
    for (int c = 0; c < cols; ++c) {
        double s = 0.0;
        for (int r = 0; r < rows; ++r) s += dy[r * cols + c];
        db[c] += s;
    }
}

/* ---- sums ---------------------------------------------------------------- */

/* sum of x[0..n-1] */
static inline double ref_sum(const double* x, int n)
{
    double s = 0.0;
    for (int i = 0; i < n; ++i) s += x[i];
    return s;
}

/* sum of squares of g[0..n-1] */
static inline double ref_sumsq(const double* g, int n)
{
    double s = 0.0;
    for (int i = 0; i < n; ++i) s += g[i] * g[i];
    return s;
}

/* ---- layer norm ---------------------------------------------------------- */

/* y = (x - mean) * rstd * gamma + beta per row; mean[r], rstd[r] saved.
   var is the biased variance; rstd = 1 / sqrt(var + eps). */
static inline void ref_layernorm_fwd(const double* x, const double* gamma, const double* beta,
                                     double* y, double* mean, double* rstd,
                                     int rows, int cols, double eps)
{
    for (int r = 0; r < rows; ++r) {
        const double* xr = x + r * cols;
        double m = 0.0, v = 0.0;
        for (int c = 0; c < cols; ++c) m += xr[c];
        m /= cols;
        for (int c = 0; c < cols; ++c) v += (xr[c] - m) * (xr[c] - m);
        v /= cols;
        double rs = 1.0 / sqrt(v + eps);
        for (int c = 0; c < cols; ++c)
            y[r * cols + c] = (xr[c] - m) * rs * gamma[c] + beta[c];
        mean[r] = m;
        rstd[r] = rs;
    }
}

/* dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)), g = dy * gamma
   (overwrite). mean, rstd: as saved by the forward. */
static inline void ref_layernorm_bwd_input(const double* dy, const double* x,
                                           const double* mean, const double* rstd,
                                           const double* gamma, double* dx,
                                           int rows, int cols)
{
    for (int r = 0; r < rows; ++r) {
        const double* xr = x + r * cols;
        const double* dyr = dy + r * cols;
        double sg = 0.0, sgx = 0.0;
        for (int c = 0; c < cols; ++c) {
            double g = dyr[c] * gamma[c];
            sg += g;
            sgx += g * (xr[c] - mean[r]) * rstd[r];
        }
        sg /= cols;
        sgx /= cols;
        for (int c = 0; c < cols; ++c) {
            double xh = (xr[c] - mean[r]) * rstd[r];
            dx[r * cols + c] = rstd[r] * (dyr[c] * gamma[c] - sg - xh * sgx);
        }
    }
}

/* dgamma[c] += sum_r dy * xhat; dbeta[c] += sum_r dy (accumulate) */
static inline void ref_layernorm_bwd_weight(const double* dy, const double* x,
                                            const double* mean, const double* rstd,
                                            double* dgamma, double* dbeta,
                                            int rows, int cols)
{
    for (int c = 0; c < cols; ++c) {
        double sg = 0.0, sb = 0.0;
        for (int r = 0; r < rows; ++r) {
            double d = dy[r * cols + c];
            sg += d * (x[r * cols + c] - mean[r]) * rstd[r];
            sb += d;
        }
        dgamma[c] += sg;
        dbeta[c] += sb;
    }
}

/* ---- softmax cross-entropy ----------------------------------------------- */

/* loss[r] = logsumexp(logits[r,:]) - logits[r, t]; 0 when t = targets[r] is
   outside [0, classes) (ignored row). */
static inline void ref_xent_fwd(const double* logits, const int* targets, double* loss,
                                int rows, int classes)
{
    for (int r = 0; r < rows; ++r) {
        const double* l = logits + r * classes;
        int t = targets[r];
        if (t < 0 || t >= classes) { loss[r] = 0.0; continue; }
        double mx = l[0], s = 0.0;
        for (int c = 1; c < classes; ++c) mx = l[c] > mx ? l[c] : mx;
        for (int c = 0; c < classes; ++c) s += exp(l[c] - mx);
        loss[r] = (mx - l[t]) + log(s);
    }
}

/* dlogits[r,c] = (softmax(logits[r,:])[c] - (c == t)) * scale; 0 for an
   ignored row (overwrite). This is d(scale * sum_r loss[r]) / dlogits. */
static inline void ref_xent_bwd(const double* logits, const int* targets, double* dlogits,
                                int rows, int classes, double scale)
{
    for (int r = 0; r < rows; ++r) {
        const double* l = logits + r * classes;
        double* d = dlogits + r * classes;
        int t = targets[r];
        if (t < 0 || t >= classes) {
            for (int c = 0; c < classes; ++c) d[c] = 0.0;
            continue;
        }
        double mx = l[0], s = 0.0;
        for (int c = 1; c < classes; ++c) mx = l[c] > mx ? l[c] : mx;
        for (int c = 0; c < classes; ++c) s += exp(l[c] - mx);
        for (int c = 0; c < classes; ++c)
            d[c] = (exp(l[c] - mx) / s - (c == t ? 1.0 : 0.0)) * scale;
    }
}

/* ---- embedding ----------------------------------------------------------- */

/* out[row, c] = wte[tokens[row], c] + wpe[row % T, c]; a token outside
   [0, V) contributes nothing. wte: V x C, wpe: T x C, out: rows x C. */
static inline void ref_embedding_fwd(const int* tokens, const double* wte, const double* wpe,
                                     double* out, int rows, int T, int C, int V)
{
    for (int row = 0; row < rows; ++row) {
        int tok = tokens[row];
        for (int c = 0; c < C; ++c) {
            double v = wpe[(row % T) * C + c];
            if (tok >= 0 && tok < V) v += wte[tok * C + c];
            out[row * C + c] = v;
        }
    }
}

/* dwte[tokens[row], c] += dout[row, c] (in-range tokens only);
   dwpe[row % T, c] += dout[row, c] (accumulate both). */
static inline void ref_embedding_bwd(const int* tokens, const double* dout,
                                     double* dwte, double* dwpe,
                                     int rows, int T, int C, int V)
{
    for (int row = 0; row < rows; ++row) {
        int tok = tokens[row];
        for (int c = 0; c < C; ++c) {
            if (tok >= 0 && tok < V) dwte[tok * C + c] += dout[row * C + c];
            dwpe[(row % T) * C + c] += dout[row * C + c];
        }
    }
}

/* ---- causal multi-head self-attention core ------------------------------- */

/* qkv: [B*T x 3C] rows = [q | k | v], head h in columns h*D.. of each part,
   D = C/H. out: [B*T x C]. P: [B*H*T*T], P[((b*H+h)*T+i)*T+j] =
   softmax_j(q_i.k_j / sqrt(D)) over j <= i, exactly 0 for j > i. */
static inline void ref_attn_fwd(const double* qkv, double* out, double* P,
                                int B, int T, int C, int H)
{
    int D = C / H, C3 = 3 * C;
    double s = 1.0 / sqrt((double)D);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int i = 0; i < T; ++i) {
                const double* q = qkv + (b * T + i) * C3 + h * D;
                double* p = P + ((b * H + h) * T + i) * T;
                double mx = -INFINITY, sum = 0.0;
                for (int j = 0; j <= i; ++j) {
                    const double* k = qkv + (b * T + j) * C3 + C + h * D;
                    double dot = 0.0;
                    for (int d = 0; d < D; ++d) dot += q[d] * k[d];
                    p[j] = dot * s;
                    if (p[j] > mx) mx = p[j];
                }
                for (int j = 0; j <= i; ++j) { p[j] = exp(p[j] - mx); sum += p[j]; }
                for (int j = 0; j <= i; ++j) p[j] /= sum;
                for (int j = i + 1; j < T; ++j) p[j] = 0.0;
                for (int d = 0; d < D; ++d) {
                    double acc = 0.0;
                    for (int j = 0; j <= i; ++j)
                        acc += p[j] * qkv[(b * T + j) * C3 + 2 * C + h * D + d];
                    out[(b * T + i) * C + h * D + d] = acc;
                }
            }
}

/* Gradient of the attention core (overwrite dqkv, [B*T x 3C]), from dout
   [B*T x C], the forward's qkv and P:
     dP = dout_h v_h^T;  dS = P (.) (dP - rowsum(dP (.) P))
     dq = dS k / sqrt(D);  dk = dS^T q / sqrt(D);  dv = P^T dout_h
   Needs no scratch (dP is recomputed). */
static inline void ref_attn_bwd(const double* dout, const double* qkv, const double* P,
                                double* dqkv, int B, int T, int C, int H)
{
    int D = C / H, C3 = 3 * C;
    double s = 1.0 / sqrt((double)D);
    for (int i = 0; i < B * T * C3; ++i) dqkv[i] = 0.0;
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int i = 0; i < T; ++i) {
                const double* go = dout + (b * T + i) * C + h * D;
                const double* q = qkv + (b * T + i) * C3 + h * D;
                double* dq = dqkv + (b * T + i) * C3 + h * D;
                const double* p = P + ((b * H + h) * T + i) * T;
                double rowdot = 0.0;
                for (int pass = 0; pass < 2; ++pass)
                    for (int j = 0; j <= i; ++j) {
                        const double* k = qkv + (b * T + j) * C3 + C + h * D;
                        const double* v = k + C;
                        double* dk = dqkv + (b * T + j) * C3 + C + h * D;
                        double* dv = dk + C;
                        double dp = 0.0;
                        for (int d = 0; d < D; ++d) dp += go[d] * v[d];
                        if (pass == 0) { rowdot += dp * p[j]; continue; }
                        double ds = p[j] * (dp - rowdot);
                        for (int d = 0; d < D; ++d) {
                            dq[d] += ds * k[d] * s;
                            dk[d] += ds * q[d] * s;
                            dv[d] += p[j] * go[d];
                        }
                    }
            }
}

/* ---- optimizers ---------------------------------------------------------- */

/* SGD with momentum (PyTorch, dampening 0), one step over n elements:
   g' = grad_scale*g (+ wd*p if wd != 0); v = momentum*v + g'; p -= lr*v. */
static inline void ref_sgd_step(double* p, const double* g, double* v, int n,
                                double lr, double momentum, double weight_decay,
                                double grad_scale)
{
    for (int i = 0; i < n; ++i) {
        double gr = grad_scale * g[i];
        if (weight_decay != 0.0) gr += weight_decay * p[i];
        v[i] = momentum * v[i] + gr;
        p[i] -= lr * v[i];
    }
}

/* AdamW, one step: g' = grad_scale*g; m = b1 m + (1-b1) g';
   v = b2 v + (1-b2) g'^2; p -= lr * ((m/c1) / (sqrt(v/c2) + eps) + wd p),
   c1 = 1 - b1^t, c2 = 1 - b2^t. */
static inline void ref_adamw_step(double* p, const double* g, double* m, double* v, int n,
                                  double lr, double beta1, double beta2, double eps,
                                  double weight_decay, double c1, double c2,
                                  double grad_scale)
{
    for (int i = 0; i < n; ++i) {
        double gr = grad_scale * g[i];
        m[i] = beta1 * m[i] + (1.0 - beta1) * gr;
        v[i] = beta2 * v[i] + (1.0 - beta2) * gr * gr;
        p[i] -= lr * ((m[i] / c1) / (sqrt(v[i] / c2) + eps) + weight_decay * p[i]);
    }
}

#endif /* MPAR_TESTS_REF_H */
