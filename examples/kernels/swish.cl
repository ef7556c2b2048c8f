/* A user-defined activation for examples/custom_layer.c:
   swish(x) = x · sigmoid(x), and its derivative. Same conventions as mpar's
   own kernels: (buffer, int offset) pairs, global size = element count. */

__kernel void swish_fwd(__global const float* x, int x_off, __global float* y, int y_off, int n)
{
    int i = (int)get_global_id(0);
    if (i >= n) return;
    float v = x[x_off + i];
    y[y_off + i] = v / (1.0f + exp(-v));
}

__kernel void swish_bwd(__global const float* x, int x_off, __global const float* dy, int dy_off,
                        __global float* dx, int dx_off, int n)
{
    int i = (int)get_global_id(0);
    if (i >= n) return;
    float v = x[x_off + i];
    float s = 1.0f / (1.0f + exp(-v));
    dx[dx_off + i] = dy[dy_off + i] * (s + v * s * (1.0f - s));
}
