/* embedding.cl - mpar token + learned position embedding (GPT style).
   OpenCL C 1.2, no extensions. float32, row-major.

   tokens (int) has rows = B*T elements, row = b*T + t, position t = row % T.
   wte is V x C, wpe is (at least) T x C, out/dout are rows x C. Every buffer
   argument is followed by a ulong element offset; rows, T, C and V are int,
   and every index into memory is computed in size_t / ulong. A token outside [0, V) is
   skipped: it contributes nothing and nothing out of range is read or
   written (the host validates tokens anyway). Sums run in a fixed order
   inside one work-item (deterministic, no atomics). */

/* Forward (overwrite). Global size: rows*C (one work-item per output).
   out[row, c] = wte[tokens[row], c] + wpe[row % T, c]
   (out[row, c] = wpe[row % T, c] when the token is out of range). */
__kernel void mpar_embedding_fwd(__global const int* tokens, ulong tokens_off,
                                 __global const float* wte, ulong wte_off,
                                 __global const float* wpe, ulong wpe_off,
                                 __global float* out, ulong out_off,
                                 int rows, int T, int C, int V)
{
    size_t i = get_global_id(0);
    if (rows <= 0 || T <= 0 || C <= 0 || i >= (ulong)rows * (ulong)C) return;
    ulong row = i / (ulong)C, c = i % (ulong)C;
    int tok = tokens[tokens_off + row];
    float v = wpe[wpe_off + (row % (ulong)T) * (ulong)C + c];
    if (tok >= 0 && tok < V) v = wte[wte_off + (ulong)tok * (ulong)C + c] + v;
    out[out_off + i] = v;
}

/* Token-table gradient (accumulate). Global size: V*C, one work-item per
   (v, c) = (i / C, i % C).
   dwte[v, c] += sum over rows with tokens[row] == v (row ascending) of
   dout[row, c]. Cost O(V*C*rows): meant for small vocabularies. */
__kernel void mpar_embedding_bwd_wte(__global const int* tokens, ulong tokens_off,
                                     __global const float* dout, ulong dout_off,
                                     __global float* dwte, ulong dwte_off,
                                     int rows, int C, int V)
{
    size_t i = get_global_id(0);
    if (V <= 0 || C <= 0 || i >= (ulong)V * (ulong)C) return;
    int v = (int)(i / (ulong)C); /* < V */
    ulong c = i % (ulong)C;
    float s = 0.0f;
    int hit = 0;
    for (int row = 0; row < rows; ++row) {
        if (tokens[tokens_off + row] == v) {
            s += dout[dout_off + (ulong)row * (ulong)C + c];
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
__kernel void mpar_embedding_bwd_wpe(__global const float* dout, ulong dout_off,
                                     __global float* dwpe, ulong dwpe_off,
                                     int rows, int T, int C)
{
    size_t i = get_global_id(0);
    if (T <= 0 || C <= 0 || i >= (ulong)T * (ulong)C) return;
    int t = (int)(i / (ulong)C); /* < T */
    ulong c = i % (ulong)C;
    float s = 0.0f;
    for (int row = t; row < rows; row += T) s += dout[dout_off + (ulong)row * (ulong)C + c];
    dwpe[dwpe_off + i] += s;
}
