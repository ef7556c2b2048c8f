/* elementwise.cl - mpar element-wise kernels: fill/scale/axpy/copy/add,
   activations (ReLU, GELU, tanh) forward and backward, dropout, bias.

   OpenCL C 1.2, no extensions. float32, row-major.

   Conventions shared by every mpar kernel file:
   - Every buffer argument is followed by a ulong element offset, so the host
     can address part of a buffer without sub-buffers.
   - Element counts (n) are ulong, and every index into memory is computed
     in size_t / ulong (work-item ids are size_t and never cut to int), so a
     buffer may hold 2^31 elements or more. Row counts and widths (rows,
     cols, T, C, ...) are int; their products are formed in ulong.
   - 1-D NDRange; the global size is stated above each kernel and equals the
     number of outputs. Work-items beyond it return at once, so a padded
     global size is harmless. Any local size (including NULL) gives
     bit-identical results: there are no atomics and no cross-work-item
     reductions; every sum runs in a fixed order inside one work-item.
   - Parameter-gradient kernels ACCUMULATE (+=); input-gradient kernels
     OVERWRITE (=).
   - Element-wise kernels (everything in this file except mpar_bias_grad)
     allow their output to alias an input at the same offset (in-place). */

/* ---------------------------------------------------------------------------
   Basic vector operations. Global size: n.
   ------------------------------------------------------------------------- */

/* y[i] = value */
__kernel void mpar_fill(__global float* y, ulong y_off, ulong n, float value)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    y[y_off + i] = value;
}

/* y[i] *= alpha */
__kernel void mpar_scale(__global float* y, ulong y_off, ulong n, float alpha)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    y[y_off + i] *= alpha;
}

/* y[i] += alpha * x[i] */
__kernel void mpar_axpy(__global const float* x, ulong x_off,
                        __global float* y, ulong y_off, ulong n, float alpha)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    y[y_off + i] += alpha * x[x_off + i];
}

/* y[i] = x[i] */
__kernel void mpar_copy(__global const float* x, ulong x_off,
                        __global float* y, ulong y_off, ulong n)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    y[y_off + i] = x[x_off + i];
}

/* out[i] = a[i] + b[i]   (residual connections) */
__kernel void mpar_add(__global const float* a, ulong a_off,
                       __global const float* b, ulong b_off,
                       __global float* out, ulong out_off, ulong n)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    out[out_off + i] = a[a_off + i] + b[b_off + i];
}

/* ---------------------------------------------------------------------------
   bfloat16 activations: the upper 16 bits of a float, rounded to nearest
   even (a NaN stays a NaN). Bit operations only, no cl_khr_fp16. The
   packed array is ushort, starting at float element y_off (x_off) of its
   buffer: n values take ceil(n / 2) floats. Global size: n.
   ------------------------------------------------------------------------- */

inline uint mpar__bf16_bits(float v)
{
    uint u = as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

/* y[i] = bf16(y[i]), kept as a float (in place) */
__kernel void mpar_round_bf16(__global float* y, ulong y_off, ulong n)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    y[y_off + i] = as_float(mpar__bf16_bits(y[y_off + i]) << 16);
}

/* packed y[i] = bf16(x[i]) */
__kernel void mpar_pack_bf16(__global const float* x, ulong x_off,
                             __global float* y, ulong y_off, ulong n)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    ((__global ushort*)(y + y_off))[i] = (ushort)mpar__bf16_bits(x[x_off + i]);
}

/* y[i] = packed x[i], as a float */
__kernel void mpar_unpack_bf16(__global const float* x, ulong x_off,
                               __global float* y, ulong y_off, ulong n)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    y[y_off + i] = as_float((uint)((__global const ushort*)(x + x_off))[i] << 16);
}

/* ---------------------------------------------------------------------------
   Activations. Forward y = f(x); backward dx = dy * f'(.) (overwrite).
   Global size: n.
   ------------------------------------------------------------------------- */

/* The activations' forward formulas, shared by their own kernels and the
   fused bias + activation below, so that both give the same bits. */
inline float mpar__relu(float v) { return v > 0.0f ? v : 0.0f; }

/* y = max(x, 0) */
__kernel void mpar_relu_fwd(__global const float* x, ulong x_off,
                            __global float* y, ulong y_off, ulong n)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    y[y_off + i] = mpar__relu(x[x_off + i]);
}

/* dx = dy * (x > 0 ? 1 : 0)   (derivative at 0 taken as 0) */
__kernel void mpar_relu_bwd(__global const float* x, ulong x_off,
                            __global const float* dy, ulong dy_off,
                            __global float* dx, ulong dx_off, ulong n)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    dx[dx_off + i] = x[x_off + i] > 0.0f ? dy[dy_off + i] : 0.0f;
}

/* GELU, tanh approximation as in GPT-2:
   y = 0.5 x (1 + tanh(k0 (x + k1 x^3))),  k0 = sqrt(2/pi), k1 = 0.044715 */
#define MPAR_GELU_K0 0.7978845608028654f
#define MPAR_GELU_K1 0.044715f

inline float mpar__gelu(float v)
{
    float t = tanh(MPAR_GELU_K0 * (v + MPAR_GELU_K1 * v * v * v));
    return 0.5f * v * (1.0f + t);
}

__kernel void mpar_gelu_fwd(__global const float* x, ulong x_off,
                            __global float* y, ulong y_off, ulong n)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    y[y_off + i] = mpar__gelu(x[x_off + i]);
}

/* dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) k0 (1 + 3 k1 x^2)),
   t = tanh(k0 (x + k1 x^3)) */
__kernel void mpar_gelu_bwd(__global const float* x, ulong x_off,
                            __global const float* dy, ulong dy_off,
                            __global float* dx, ulong dx_off, ulong n)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    float v = x[x_off + i];
    float t = tanh(MPAR_GELU_K0 * (v + MPAR_GELU_K1 * v * v * v));
    float d = 0.5f * (1.0f + t)
            + 0.5f * v * (1.0f - t * t) * MPAR_GELU_K0 * (1.0f + 3.0f * MPAR_GELU_K1 * v * v);
    dx[dx_off + i] = dy[dy_off + i] * d;
}

/* y = tanh(x) */
__kernel void mpar_tanh_fwd(__global const float* x, ulong x_off,
                            __global float* y, ulong y_off, ulong n)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    y[y_off + i] = tanh(x[x_off + i]);
}

/* dx = dy * (1 - y^2), from the saved forward OUTPUT y */
__kernel void mpar_tanh_bwd(__global const float* y, ulong y_off,
                            __global const float* dy, ulong dy_off,
                            __global float* dx, ulong dx_off, ulong n)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    float t = y[y_off + i];
    dx[dx_off + i] = dy[dy_off + i] * (1.0f - t * t);
}

/* ---------------------------------------------------------------------------
   Dropout: counter-based, stateless, reproducible.

   For element i of a launch, the counter is ctr = (uint)idx_off + (uint)i,
   the low 32 bits of idx_off + i (idx_off lets the host give a micro-batch
   the same mask it would get as part of the whole batch: pass its first
   element's index in the batch).

     mix(x):  x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b;
              x ^= x >> 16                       (all uint32, wrapping)
     key   = mix(seed_lo ^ mix(seed_hi ^ 0x9e3779b9))
     h     = mix(mix(ctr ^ key) + key)
     u     = (float)(h >> 8) * 2^-24             (exact, in [0, 1))
     keep  = u >= p
     y     = keep ? x * (1 / (1 - p)) : 0         (p >= 1: y = 0)

   The scale is computed in float as 1.0f / (1.0f - p). mpar_dropout_bwd
   applies the same mask and scale to dy. Global size: n.
   ------------------------------------------------------------------------- */

inline uint mpar__mix32(uint x)
{
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

inline float mpar__dropout_mult(uint seed_lo, uint seed_hi, uint ctr, float p)
{
    uint key = mpar__mix32(seed_lo ^ mpar__mix32(seed_hi ^ 0x9e3779b9u));
    uint h = mpar__mix32(mpar__mix32(ctr ^ key) + key);
    float u = (float)(h >> 8) * (1.0f / 16777216.0f);
    if (p >= 1.0f || u < p) return 0.0f;
    return 1.0f / (1.0f - p);
}

__kernel void mpar_dropout_fwd(__global const float* x, ulong x_off,
                               __global float* y, ulong y_off, ulong n,
                               float p, uint seed_lo, uint seed_hi, ulong idx_off)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    float m = mpar__dropout_mult(seed_lo, seed_hi, (uint)idx_off + (uint)i, p);
    y[y_off + i] = x[x_off + i] * m;
}

__kernel void mpar_dropout_bwd(__global const float* dy, ulong dy_off,
                               __global float* dx, ulong dx_off, ulong n,
                               float p, uint seed_lo, uint seed_hi, ulong idx_off)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    float m = mpar__dropout_mult(seed_lo, seed_hi, (uint)idx_off + (uint)i, p);
    dx[dx_off + i] = dy[dy_off + i] * m;
}

/* ---------------------------------------------------------------------------
   Bias over the columns of a rows x cols matrix.
   ------------------------------------------------------------------------- */

/* y[r,c] += b[c].  Global size: rows*cols (one work-item per element);
   rows or cols <= 0: nothing. */
__kernel void mpar_bias_add(__global float* y, ulong y_off, int rows, int cols,
                            __global const float* b, ulong b_off)
{
    size_t i = get_global_id(0);
    if (rows <= 0 || cols <= 0 || i >= (ulong)rows * (ulong)cols) return;
    y[y_off + i] += b[b_off + i % (ulong)cols];
}

/* A linear layer's bias and the activation layer after it, in one launch:
   y[r,c] += b[c]; out[r,c] = f(y[r,c]) with f = relu (act 1), gelu (2) or
   tanh (3), computed as mpar_bias_add then that activation's own kernel
   compute them (y is still written: the activation's backward reads it).
   Global size: rows*cols. */
__kernel void mpar_bias_add_act(__global float* y, ulong y_off, int rows, int cols,
                                __global const float* b, ulong b_off,
                                __global float* out, ulong out_off, int act)
{
    size_t i = get_global_id(0);
    if (rows <= 0 || cols <= 0 || i >= (ulong)rows * (ulong)cols) return;
    float v = y[y_off + i] + b[b_off + i % (ulong)cols];
    y[y_off + i] = v;
    out[out_off + i] = act == 1 ? mpar__relu(v) : act == 2 ? mpar__gelu(v) : tanh(v);
}

/* db[c] += sum_r dy[r,c], r = 0, 1, ..., rows-1 in order (accumulate).
   Also the generic column sum. Global size: cols. */
__kernel void mpar_bias_grad(__global const float* dy, ulong dy_off, int rows, int cols,
                             __global float* db, ulong db_off)
{
    size_t c = get_global_id(0);
    if (cols <= 0 || c >= (ulong)cols) return;
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) s += dy[dy_off + (ulong)r * (ulong)cols + c];
    db[db_off + c] += s;
}
