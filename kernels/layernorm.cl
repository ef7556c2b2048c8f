/* layernorm.cl - mpar layer normalisation over the last dimension, with
   affine gamma/beta. OpenCL C 1.2, no extensions. float32, row-major.

   x, y, dy, dx are rows x cols; gamma, beta, dgamma, dbeta have cols
   elements; mean and rstd have rows elements. Every buffer argument is
   followed by a ulong element offset; rows and cols are int, and every
   index into memory (r * cols, ...) is computed in size_t / ulong.
   Reductions run sequentially inside one work-item, so results are
   bit-identical for any local size.

   Maths (per row r):
     mean = (1/cols) sum_c x[c]
     var  = (1/cols) sum_c (x[c] - mean)^2          (biased, as PyTorch)
     rstd = 1 / sqrt(var + eps)
     xhat = (x - mean) * rstd
     y    = xhat * gamma + beta

   Numerics: the mean is accumulated relative to the row's first element
   (shift K = x[0], ms = sum_c (x[c] - K) / cols, mean = K + ms), and the
   variance is a second pass over ((x - K) - ms), which does not suffer from
   the rounding of the mean to float. Rows with a large common offset (1e4)
   thus keep an accurate mean and variance. The saved mean is that float
   (within half an ulp of the row mean, plus rounding), and y and both
   backward kernels use xhat = (x - saved mean) * rstd, so forward and
   backward are consistent with each other. */

/* Forward. Global size: rows (one work-item per row).
   Writes y (rows x cols), mean[r], rstd[r]. y may alias x. */
__kernel void mpar_layernorm_fwd(__global const float* x, ulong x_off,
                                 __global const float* gamma, ulong gamma_off,
                                 __global const float* beta, ulong beta_off,
                                 __global float* y, ulong y_off,
                                 __global float* mean, ulong mean_off,
                                 __global float* rstd, ulong rstd_off,
                                 int rows, int cols, float eps)
{
    size_t r = get_global_id(0);
    if (rows <= 0 || r >= (ulong)rows) return;
    __global const float* xr = x + x_off + r * (ulong)cols;
    __global float* yr = y + y_off + r * (ulong)cols;

    float k = xr[0];
    float s = 0.0f;
    for (int c = 0; c < cols; ++c) s += xr[c] - k;
    float ms = s / (float)cols;      /* mean - k, kept apart: more precise */
    float m = k + ms;

    float v = 0.0f;
    for (int c = 0; c < cols; ++c) {
        float d = (xr[c] - k) - ms;
        v += d * d;
    }
    float rs = 1.0f / sqrt(v / (float)cols + eps);

    for (int c = 0; c < cols; ++c)
        yr[c] = (xr[c] - m) * rs * gamma[gamma_off + c] + beta[beta_off + c];
    mean[mean_off + r] = m;
    rstd[rstd_off + r] = rs;
}

/* Backward, input gradient (overwrite). Global size: rows.
     g    = dy * gamma
     dx   = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))
   mean and rstd are the forward's saved arrays. */
__kernel void mpar_layernorm_bwd_input(__global const float* dy, ulong dy_off,
                                       __global const float* x, ulong x_off,
                                       __global const float* mean, ulong mean_off,
                                       __global const float* rstd, ulong rstd_off,
                                       __global const float* gamma, ulong gamma_off,
                                       __global float* dx, ulong dx_off,
                                       int rows, int cols)
{
    size_t r = get_global_id(0);
    if (rows <= 0 || r >= (ulong)rows) return;
    __global const float* xr = x + x_off + r * (ulong)cols;
    __global const float* dyr = dy + dy_off + r * (ulong)cols;
    __global float* dxr = dx + dx_off + r * (ulong)cols;
    float m = mean[mean_off + r];
    float rs = rstd[rstd_off + r];

    float sg = 0.0f, sgx = 0.0f;
    for (int c = 0; c < cols; ++c) {
        float g = dyr[c] * gamma[gamma_off + c];
        sg += g;
        sgx += g * ((xr[c] - m) * rs);
    }
    sg /= (float)cols;
    sgx /= (float)cols;
    for (int c = 0; c < cols; ++c) {
        float g = dyr[c] * gamma[gamma_off + c];
        float xh = (xr[c] - m) * rs;
        dxr[c] = rs * (g - sg - xh * sgx);
    }
}

/* Backward, parameter gradients (accumulate). Global size: cols.
     dgamma[c] += sum_r dy[r,c] * xhat[r,c]
     dbeta[c]  += sum_r dy[r,c]          (r = 0 .. rows-1 in order) */
__kernel void mpar_layernorm_bwd_weight(__global const float* dy, ulong dy_off,
                                        __global const float* x, ulong x_off,
                                        __global const float* mean, ulong mean_off,
                                        __global const float* rstd, ulong rstd_off,
                                        __global float* dgamma, ulong dgamma_off,
                                        __global float* dbeta, ulong dbeta_off,
                                        int rows, int cols)
{
    size_t c = get_global_id(0);
    if (cols <= 0 || c >= (ulong)cols) return;
    float sg = 0.0f, sb = 0.0f;
    for (int r = 0; r < rows; ++r) {
        ulong rc = (ulong)r * (ulong)cols + c;
        float d = dy[dy_off + rc];
        float xh = (x[x_off + rc] - mean[mean_off + r]) * rstd[rstd_off + r];
        sg += d * xh;
        sb += d;
    }
    dgamma[dgamma_off + c] += sg;
    dbeta[dbeta_off + c] += sb;
}
