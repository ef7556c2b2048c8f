/* optimizer.cl - mpar optimizer steps and gradient-norm helpers.
   OpenCL C 1.2, no extensions. float32.

   p (parameters), g (gradients) and the state vectors all have n elements
   (ulong: a stage may hold 2^31 parameters or more); every buffer argument
   is followed by a ulong element offset, and indices are size_t / ulong. Each step
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
__kernel void mpar_sgd_step(__global float* p, ulong p_off,
                            __global const float* g, ulong g_off,
                            __global float* v, ulong v_off,
                            ulong n, float lr, float momentum,
                            float weight_decay, float grad_scale)
{
    size_t i = get_global_id(0);
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
__kernel void mpar_adamw_step(__global float* p, ulong p_off,
                              __global const float* g, ulong g_off,
                              __global float* m, ulong m_off,
                              __global float* v, ulong v_off,
                              ulong n, float lr, float beta1, float beta2,
                              float eps, float weight_decay,
                              float c1, float c2, float grad_scale)
{
    size_t i = get_global_id(0);
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

/* Global-norm clipping: the sum of squares of each layer's gradients, for
   every layer of a stage in two launches. Deterministic: each layer's
   gradients are cut into chunks of 4096 from the layer's first element,
   each chunk summed in element order, then each layer's chunks summed in
   order. The host reads the per-layer sums (layers of other stages are summed
   in model order the same way), sets
   grad_scale = min(1, max_norm / (sqrt(sum) + 1e-6)) and passes it to the
   step kernels above.
   table (ulong) holds two arrays of layers + 1 entries: seg[j], the first
   element of layer j in g (seg[layers] is the end), then first[j], the
   first chunk of layer j in partial (first[layers] is the chunk count);
   table_off counts ulongs (mpar passes the table at offset 0).
   Step 1, one work-item per chunk (global size: the chunk count). */
#define MPAR_SUMSQ_CHUNK 4096

__kernel void mpar_sumsq_layers_partial(__global const float* g, ulong g_off,
                                        __global const ulong* table, ulong table_off,
                                        int layers, __global float* partial, ulong partial_off)
{
    size_t k = get_global_id(0);
    __global const ulong* seg = table + table_off;
    __global const ulong* first = seg + layers + 1;
    if (k >= first[layers]) return;
    int lo = 0, hi = layers - 1;
    while (lo < hi) { /* the last layer whose first chunk is <= k */
        int mid = (lo + hi + 1) / 2;
        if (first[mid] <= k) lo = mid; else hi = mid - 1;
    }
    ulong begin = seg[lo] + (k - first[lo]) * MPAR_SUMSQ_CHUNK;
    ulong end = min(seg[lo + 1], begin + MPAR_SUMSQ_CHUNK);
    float s = 0.0f;
    for (ulong i = begin; i < end; ++i) {
        float x = g[g_off + i];
        s += x * x;
    }
    partial[partial_off + k] = s;
}

/* Step 2, one work-item per layer (global size: layers): out[j] = the sum
   of layer j's chunks in order; 0 for a layer without parameters. */
__kernel void mpar_sumsq_layers_final(__global const float* partial, ulong partial_off,
                                      __global const ulong* table, ulong table_off,
                                      int layers, __global float* out, ulong out_off)
{
    size_t j = get_global_id(0);
    if (layers <= 0 || j >= (ulong)layers) return;
    __global const ulong* first = table + table_off + layers + 1;
    float s = 0.0f;
    for (ulong k = first[j]; k < first[j + 1]; ++k) s += partial[partial_off + k];
    out[out_off + j] = s;
}
