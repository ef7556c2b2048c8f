/* generate.cl - mpar text generation with a key/value cache (see
   mpar_pipeline_generate). OpenCL C 1.2, no extensions, float32, row-major.

   A generation micro-batch has `rows` rows; row r belongs to sequence slot
   slot[r] and sits at position pos[r] of that sequence. Each decoder block
   keeps, per slot, the keys and values of every position it has seen:
     kc, vc  [S x L x C]   entry ((s*L + t)*C + c)
   (S slots, L positions of context, C = width; head h uses columns
   h*D .. h*D+D-1, D = C / H). A row whose slot or position is out of range
   is skipped by every kernel here (it writes nothing).

   The arithmetic of mpar_attn_cached is mpar_attn_fwd's for one query row
   (attention.cl), the keys and values read from the cache instead of the
   QKV rows, so a cached step computes what a full forward computes for
   that position. Every buffer argument is followed by a ulong element
   offset. */

/* out[r, c] = wte[tokens[r], c] + wpe[pos[r], c], as mpar_embedding_fwd
   with the row's own position (a token outside [0, V): the wpe row alone;
   a position outside [0, T): the row is skipped). Global size rows*C. */
__kernel void mpar_embed_at(__global const int* tokens, ulong tokens_off,
                            __global const int* pos, ulong pos_off,
                            __global const float* wte, ulong wte_off,
                            __global const float* wpe, ulong wpe_off,
                            __global float* out, ulong out_off,
                            int rows, int T, int C, int V)
{
    size_t i = get_global_id(0);
    if (rows <= 0 || T <= 0 || C <= 0 || i >= (ulong)rows * (ulong)C) return;
    ulong row = i / (ulong)C, c = i % (ulong)C;
    int tok = tokens[tokens_off + row], t = pos[pos_off + row];
    if (t < 0 || t >= T) return;
    float v = wpe[wpe_off + (ulong)t * (ulong)C + c];
    if (tok >= 0 && tok < V) v = wte[wte_off + (ulong)tok * (ulong)C + c] + v;
    out[out_off + i] = v;
}

/* Copies each row's key and value (columns C .. 3C-1 of its QKV row) into
   the cache at (slot, position). Global size rows*2C, gid = r*2C + col. */
__kernel void mpar_kv_store(__global const float* qkv, ulong qkv_off,
                            __global const int* slot, ulong slot_off,
                            __global const int* pos, ulong pos_off,
                            __global float* kc, ulong kc_off,
                            __global float* vc, ulong vc_off,
                            int rows, int C, int S, int L)
{
    size_t gid = get_global_id(0);
    if (rows <= 0 || C <= 0 || gid >= (ulong)rows * 2 * (ulong)C) return;
    ulong row = gid / (2 * (ulong)C), col = gid % (2 * (ulong)C);
    int s = slot[slot_off + row], t = pos[pos_off + row];
    if (s < 0 || s >= S || t < 0 || t >= L) return;
    ulong dst = ((ulong)s * (ulong)L + (ulong)t) * (ulong)C + col % (ulong)C;
    float x = qkv[qkv_off + row * 3 * (ulong)C + (ulong)C + col];
    if (col < (ulong)C) kc[kc_off + dst] = x;
    else vc[vc_off + dst] = x;
}

/* Causal attention of each row's query over positions 0 .. pos[r] of its
   slot's cache (stored before this launch, the row's own included).
   Global size rows*H, gid = r*H + h; P has L floats per work-item
   (entries 0 .. pos[r] written). */
__kernel void mpar_attn_cached(__global const float* qkv, ulong qkv_off,
                               __global const int* slot, ulong slot_off,
                               __global const int* pos, ulong pos_off,
                               __global const float* kc, ulong kc_off,
                               __global const float* vc, ulong vc_off,
                               __global float* out, ulong out_off,
                               __global float* P, ulong P_off,
                               int rows, int C, int H, int S, int L)
{
    size_t gid = get_global_id(0);
    if (rows <= 0 || H <= 0 || C <= 0 || gid >= (ulong)rows * (ulong)H) return;
    ulong row = gid / (ulong)H;
    int h = (int)(gid % (ulong)H);
    int s = slot[slot_off + row], i = pos[pos_off + row];
    if (s < 0 || s >= S || i < 0 || i >= L) return;
    int D = C / H;
    ulong C3 = 3 * (ulong)C;
    float sc = 1.0f / sqrt((float)D);
    __global const float* q = qkv + qkv_off + row * C3 + (ulong)h * (ulong)D;
    __global const float* kbase = kc + kc_off + (ulong)s * (ulong)L * (ulong)C + (ulong)h * (ulong)D;
    __global const float* vbase = vc + vc_off + (ulong)s * (ulong)L * (ulong)C + (ulong)h * (ulong)D;
    __global float* p = P + P_off + gid * (ulong)L;

    float mx = -INFINITY;
    for (int j = 0; j <= i; ++j) {
        __global const float* k = kbase + (ulong)j * (ulong)C;
        float dot = 0.0f;
        for (int d = 0; d < D; ++d) dot += q[d] * k[d];
        dot *= sc;
        p[j] = dot;
        mx = fmax(mx, dot);
    }
    float sum = 0.0f;
    for (int j = 0; j <= i; ++j) {
        float e = exp(p[j] - mx);
        p[j] = e;
        sum += e;
    }
    float inv = 1.0f / sum;
    for (int j = 0; j <= i; ++j) p[j] *= inv;

    __global float* o = out + out_off + row * (ulong)C + (ulong)h * (ulong)D;
    for (int d = 0; d < D; ++d) {
        float acc = 0.0f;
        for (int j = 0; j <= i; ++j) acc += p[j] * vbase[(ulong)j * (ulong)C + (ulong)d];
        o[d] = acc;
    }
}
