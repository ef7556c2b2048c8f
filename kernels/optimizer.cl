/* optimizer.cl - mpar optimizer steps and gradient-norm helpers.
   OpenCL C 1.2, no extensions. float32.

   p (parameters), g (gradients) and the state vectors all have n elements;
   every buffer argument is followed by an int element offset. Each step
   kernel first forms g' = grad_scale * g: the host folds gradient clipping
   (and any loss scaling) into the step through grad_scale, and g itself is
   left unchanged. Deterministic: one work-item per element, or fixed-order
   sequential sums. */

/* SGD with momentum, PyTorch semantics (dampening 0, no Nesterov), with the
   momentum buffer v zero-initialised by the host:
     g' = grad_scale * g
     if (weight_decay != 0) g' += weight_decay * p      (coupled L2)
     v  = momentum * v + g'
     p -= lr * v
   (momentum = 0 gives plain SGD; v then just holds g'.)
   Global size: n. */
__kernel void mpar_sgd_step(__global float* p, int p_off,
                            __global const float* g, int g_off,
                            __global float* v, int v_off,
                            int n, float lr, float momentum,
                            float weight_decay, float grad_scale)
{
    int i = (int)get_global_id(0);
    if (i >= n) return;
    float w = p[p_off + i];
    float gr = grad_scale * g[g_off + i];
    if (weight_decay != 0.0f) gr += weight_decay * w;
    float vel = momentum * v[v_off + i] + gr;
    v[v_off + i] = vel;
    p[p_off + i] = w - lr * vel;
}

/* AdamW (decoupled weight decay). The host passes the bias corrections
   c1 = 1 - beta1^t and c2 = 1 - beta2^t for step t = 1, 2, ... ; m and v
   are zero-initialised by the host.
     g' = grad_scale * g
     m  = beta1 * m + (1 - beta1) * g'
     v  = beta2 * v + (1 - beta2) * g'^2
     p  = p - lr * ( (m / c1) / (sqrt(v / c2) + eps) + weight_decay * p )
   (p on the right is the value before the step; equal to PyTorch's
   p *= 1 - lr*wd; p -= lr * mhat / (sqrt(vhat) + eps) up to rounding.)
   Global size: n. */
__kernel void mpar_adamw_step(__global float* p, int p_off,
                              __global const float* g, int g_off,
                              __global float* m, int m_off,
                              __global float* v, int v_off,
                              int n, float lr, float beta1, float beta2,
                              float eps, float weight_decay,
                              float c1, float c2, float grad_scale)
{
    int i = (int)get_global_id(0);
    if (i >= n) return;
    float w = p[p_off + i];
    float gr = grad_scale * g[g_off + i];
    float mm = beta1 * m[m_off + i] + (1.0f - beta1) * gr;
    float vv = beta2 * v[v_off + i] + (1.0f - beta2) * gr * gr;
    m[m_off + i] = mm;
    v[v_off + i] = vv;
    float upd = (mm / c1) / (sqrt(vv / c2) + eps) + weight_decay * w;
    p[p_off + i] = w - lr * upd;
}

/* Global-norm clipping, step 1: partial sums of squares.
   Work-item k writes partial[partial_off + k] = sum of g[i]^2 for
   i = k*4096 .. min(n, (k+1)*4096) - 1 in order (overwrite).
   Global size: ceil(n / 4096) = (n + 4095) / 4096.
   For several tensors, give each its own range of partial slots and finish
   with one mpar_sum_final over all of them. */
#define MPAR_SUMSQ_CHUNK 4096

__kernel void mpar_sumsq_partial(__global const float* g, int g_off, int n,
                                 __global float* partial, int partial_off)
{
    int k = (int)get_global_id(0);
    int begin = k * MPAR_SUMSQ_CHUNK;
    if (begin >= n) return;
    int end = min(n, begin + MPAR_SUMSQ_CHUNK);
    float s = 0.0f;
    for (int i = begin; i < end; ++i) {
        float x = g[g_off + i];
        s += x * x;
    }
    partial[partial_off + k] = s;
}

/* Global-norm clipping, step 2: out[out_off] = sum_k partial[k],
   k = 0 .. n-1 in order (overwrite). Global size: 1.
   The host reads the sum of squares, sets
   grad_scale = min(1, max_norm / (sqrt(sum) + 1e-6)) and passes it to the
   step kernels (or applies it with mpar_scale from elementwise.cl). */
__kernel void mpar_sum_final(__global const float* partial, int partial_off, int n,
                             __global float* out, int out_off)
{
    if (get_global_id(0) != 0) return;
    float s = 0.0f;
    for (int k = 0; k < n; ++k) s += partial[partial_off + k];
    out[out_off] = s;
}
