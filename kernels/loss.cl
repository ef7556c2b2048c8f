/* loss.cl - mpar softmax cross-entropy over the rows of a logits matrix.
   OpenCL C 1.2, no extensions. float32, row-major.

   logits and dlogits are rows x classes; targets (int) and loss have rows
   elements. A target outside [0, classes) - by convention -1 - marks a row
   to ignore: its loss and its gradient are exactly 0 and nothing out of
   range is read. Every buffer argument is followed by a ulong element offset;
   indices into memory are size_t / ulong (rows and classes are int, their
   product is formed in ulong).
   Each row is reduced sequentially inside one work-item (deterministic).

   Numerics: max subtraction, loss = (max - logit[t]) + log(sum exp(l - max)),
   so rows with a large common offset (1e4) stay accurate. */

/* Per-row loss (overwrite). Global size: rows.
   loss[r] = logsumexp(logits[r,:]) - logits[r, targets[r]]  (0 if ignored) */
__kernel void mpar_xent_fwd(__global const float* logits, ulong logits_off,
                            __global const int* targets, ulong targets_off,
                            __global float* loss, ulong loss_off,
                            int rows, int classes)
{
    size_t r = get_global_id(0);
    if (rows <= 0 || r >= (ulong)rows) return;
    int t = targets[targets_off + r];
    if (t < 0 || t >= classes) {
        loss[loss_off + r] = 0.0f;
        return;
    }
    __global const float* l = logits + logits_off + r * (ulong)classes;
    float mx = l[0];
    for (int c = 1; c < classes; ++c) mx = fmax(mx, l[c]);
    float s = 0.0f;
    for (int c = 0; c < classes; ++c) s += exp(l[c] - mx);
    loss[loss_off + r] = (mx - l[t]) + log(s);
}

/* Logit gradient (overwrite). Global size: rows (one work-item per row).
   dlogits[r,c] = (softmax(logits[r,:])[c] - (c == targets[r])) * scale,
   all zero for an ignored row. The host passes scale = 1 / (number of
   counted rows in the whole batch) so that micro-batches add up to the
   gradient of the whole-batch mean loss. dlogits may alias logits. */
__kernel void mpar_xent_bwd(__global const float* logits, ulong logits_off,
                            __global const int* targets, ulong targets_off,
                            __global float* dlogits, ulong dlogits_off,
                            int rows, int classes, float scale)
{
    size_t r = get_global_id(0);
    if (rows <= 0 || r >= (ulong)rows) return;
    int t = targets[targets_off + r];
    __global const float* l = logits + logits_off + r * (ulong)classes;
    __global float* d = dlogits + dlogits_off + r * (ulong)classes;
    if (t < 0 || t >= classes) {
        for (int c = 0; c < classes; ++c) d[c] = 0.0f;
        return;
    }
    float mx = l[0];
    for (int c = 1; c < classes; ++c) mx = fmax(mx, l[c]);
    float s = 0.0f;
    for (int c = 0; c < classes; ++c) s += exp(l[c] - mx);
    float inv = 1.0f / s;
    for (int c = 0; c < classes; ++c) {
        float p = exp(l[c] - mx) * inv;
        d[c] = (p - (c == t ? 1.0f : 0.0f)) * scale;
    }
}

/* out[0] = sum_i x[i], i = 0 .. n-1 in order (overwrite; one float).
   Global size: 1. Used for the per-row losses; works for any vector. */
__kernel void mpar_loss_sum(__global const float* x, ulong x_off, ulong n,
                            __global float* out, ulong out_off)
{
    if (get_global_id(0) != 0) return;
    float s = 0.0f;
    for (ulong i = 0; i < n; ++i) s += x[x_off + i];
    out[out_off] = s;
}

/* ---- regression losses: float targets, one row of `width` values per
   row of the input. Per-row loss (overwrite), global size: rows:
     mse: loss[r] = sum_c (x[r,c] - t[r,c])^2 / width
     l1:  loss[r] = sum_c |x[r,c] - t[r,c]| / width
   summed in column order; each square is its own statement (never fused
   into the sum). Input gradient (overwrite), global size: rows x width:
     mse: dx = (x - t) * k, k = 2 * scale / width (the host's float)
     l1:  dx = sign(x - t) * k, k = scale / width (0 where x == t)
   dx may alias x. ---- */
__kernel void mpar_mse_fwd(__global const float* x, ulong x_off,
                           __global const float* t, ulong t_off,
                           __global float* loss, ulong loss_off,
                           int rows, int width)
{
    size_t r = get_global_id(0);
    if (rows <= 0 || r >= (ulong)rows) return;
    __global const float* a = x + x_off + r * (ulong)width;
    __global const float* b = t + t_off + r * (ulong)width;
    float s = 0.0f;
    for (int c = 0; c < width; ++c) {
        float d = a[c] - b[c];
        float q = d * d;
        s += q;
    }
    loss[loss_off + r] = s / (float)width;
}

__kernel void mpar_mse_bwd(__global const float* x, ulong x_off,
                           __global const float* t, ulong t_off,
                           __global float* dx, ulong dx_off,
                           ulong n, float k)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    float d = x[x_off + i] - t[t_off + i];
    dx[dx_off + i] = d * k;
}

__kernel void mpar_l1_fwd(__global const float* x, ulong x_off,
                          __global const float* t, ulong t_off,
                          __global float* loss, ulong loss_off,
                          int rows, int width)
{
    size_t r = get_global_id(0);
    if (rows <= 0 || r >= (ulong)rows) return;
    __global const float* a = x + x_off + r * (ulong)width;
    __global const float* b = t + t_off + r * (ulong)width;
    float s = 0.0f;
    for (int c = 0; c < width; ++c) s += fabs(a[c] - b[c]);
    loss[loss_off + r] = s / (float)width;
}

__kernel void mpar_l1_bwd(__global const float* x, ulong x_off,
                          __global const float* t, ulong t_off,
                          __global float* dx, ulong dx_off,
                          ulong n, float k)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    float d = x[x_off + i] - t[t_off + i];
    dx[dx_off + i] = d > 0.0f ? k : d < 0.0f ? -k : 0.0f;
}
