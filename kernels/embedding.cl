/* embedding.cl - mpar token + learned position embedding (GPT style).
   OpenCL C 1.2, no extensions. float32, row-major.

   tokens (int) has rows = B*T elements, row = b*T + t, position t = row % T.
   wte is V x C, wpe is (at least) T x C, out/dout are rows x C. Every buffer
   argument is followed by an int element offset. A token outside [0, V) is
   skipped: it contributes nothing and nothing out of range is read or
   written (the host validates tokens anyway). Sums run in a fixed order
   inside one work-item (deterministic, no atomics). */

/* Forward (overwrite). Global size: rows*C (one work-item per output).
   out[row, c] = wte[tokens[row], c] + wpe[row % T, c]
   (out[row, c] = wpe[row % T, c] when the token is out of range). */
__kernel void mpar_embedding_fwd(__global const int* tokens, int tokens_off,
                                 __global const float* wte, int wte_off,
                                 __global const float* wpe, int wpe_off,
                                 __global float* out, int out_off,
                                 int rows, int T, int C, int V)
{
    int i = (int)get_global_id(0);
    if (i >= rows * C) return;
    int row = i / C, c = i % C;
    int tok = tokens[tokens_off + row];
    float v = wpe[wpe_off + (row % T) * C + c];
    if (tok >= 0 && tok < V) v = wte[wte_off + tok * C + c] + v;
    out[out_off + i] = v;
}

/* Token-table gradient (accumulate). Global size: V*C, one work-item per
   (v, c) = (i / C, i % C).
   dwte[v, c] += sum over rows with tokens[row] == v (row ascending) of
   dout[row, c]. Cost O(V*C*rows): meant for small vocabularies. */
__kernel void mpar_embedding_bwd_wte(__global const int* tokens, int tokens_off,
                                     __global const float* dout, int dout_off,
                                     __global float* dwte, int dwte_off,
                                     int rows, int C, int V)
{
    int i = (int)get_global_id(0);
    if (i >= V * C) return;
    int v = i / C, c = i % C;
    float s = 0.0f;
    int hit = 0;
    for (int row = 0; row < rows; ++row) {
        if (tokens[tokens_off + row] == v) {
            s += dout[dout_off + row * C + c];
            hit = 1;
        }
    }
    /* Untouched rows of the table stay bit-for-bit as they were. */
    if (hit) dwte[dwte_off + i] += s;
}

/* Position-table gradient (accumulate). Global size: T*C, one work-item per
   (t, c) = (i / C, i % C).
   dwpe[t, c] += sum_b dout[b*T + t, c], b = 0 .. rows/T - 1 in order.
   rows must be a multiple of T. */
__kernel void mpar_embedding_bwd_wpe(__global const float* dout, int dout_off,
                                     __global float* dwpe, int dwpe_off,
                                     int rows, int T, int C)
{
    int i = (int)get_global_id(0);
    if (i >= T * C) return;
    int t = i / C, c = i % C;
    float s = 0.0f;
    for (int row = t; row < rows; row += T) s += dout[dout_off + row * C + c];
    dwpe[dwpe_off + i] += s;
}
