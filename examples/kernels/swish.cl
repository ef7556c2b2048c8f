/* A user-defined activation for examples/custom_layer.c:
   swish(x) = x · sigmoid(x), and its derivative. Same conventions as mpar's
   own kernels: (buffer, ulong offset) pairs (launch letter 'B'), ulong
   element counts ('l'), global size = element count, so a stage may hold
   more than 2^31 floats. */

__kernel void swish_fwd(__global const float* x, ulong x_off, __global float* y, ulong y_off, ulong n)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    float v = x[x_off + i];
    y[y_off + i] = v / (1.0f + exp(-v));
}

__kernel void swish_bwd(__global const float* x, ulong x_off, __global const float* dy, ulong dy_off,
                        __global float* dx, ulong dx_off, ulong n)
{
    size_t i = get_global_id(0);
    if (i >= n) return;
    float v = x[x_off + i];
    float s = 1.0f / (1.0f + exp(-v));
    dx[dx_off + i] = dy[dy_off + i] * (s + v * s * (1.0f - s));
}
