/* attention.cl - mpar causal multi-head self-attention core (the QKV and
   output projections are GEMMs done by the host). OpenCL C 1.2, no
   extensions. float32, row-major.

   Shapes (D = C / H, s = 1 / sqrt(D) computed in float as 1.0f/sqrt((float)D)):
     qkv   [B*T x 3C]  row b*T+t = [ q (C) | k (C) | v (C) ]; head h uses
                       columns h*D .. h*D+D-1 of each part
     out   [B*T x C]   head h's result in columns h*D ..
     P     [B*H*T*T]   P[((b*H + h)*T + i)*T + j] = softmax_j(s q_i.k_j),
                       causal: entries j > i are exactly 0
     dout  [B*T x C], dqkv [B*T x 3C]
     dS    [B*H*T*T]   scratch for the backward (same layout as P)

   Backward maths, per (b, h):
     dP = dout_h v_h^T;  dS = P (.) (dP - rowsum(dP (.) P))   (masked -> 0)
     dq = s dS k;  dk = s dS^T q;  dv = P^T dout_h
   The backward is two launches: mpar_attn_bwd_ds (writes the dS scratch),
   then mpar_attn_bwd_qkv (reads P and dS, overwrites all of dqkv).

   Every buffer argument is followed by a ulong element offset; B, T, C and
   H are int, and every index into memory is computed in size_t / ulong
   (P alone has B*H*T*T entries). All sums run
   in ascending index order inside one work-item: deterministic for any
   local size. Cost is O(B*H*T*T*D) per kernel; written for clarity and
   bit-reproducibility, not peak speed. */

/* Forward. Global size: B*H*T, one work-item per query row,
   gid = (b*H + h)*T + i. Writes P row (all T entries) and out[b*T+i, h*D..]. */
__kernel void mpar_attn_fwd(__global const float* qkv, ulong qkv_off,
                            __global float* out, ulong out_off,
                            __global float* P, ulong P_off,
                            int B, int T, int C, int H)
{
    size_t gid = get_global_id(0);
    if (B <= 0 || T <= 0 || H <= 0 || gid >= (ulong)B * (ulong)H * (ulong)T) return;
    int i = (int)(gid % (ulong)T), h = (int)(gid / (ulong)T % (ulong)H); /* < T, < H */
    ulong b = gid / ((ulong)T * (ulong)H);
    int D = C / H;
    ulong C3 = 3 * (ulong)C;
    float s = 1.0f / sqrt((float)D);
    __global const float* q = qkv + qkv_off + (b * (ulong)T + (ulong)i) * C3 + (ulong)h * (ulong)D;
    __global const float* kbase = qkv + qkv_off + b * (ulong)T * C3 + (ulong)C + (ulong)h * (ulong)D;
    __global const float* vbase = qkv + qkv_off + b * (ulong)T * C3 + 2 * (ulong)C + (ulong)h * (ulong)D;
    __global float* p = P + P_off + gid * (ulong)T;

    float mx = -INFINITY;
    for (int j = 0; j <= i; ++j) {
        __global const float* k = kbase + (ulong)j * C3;
        float dot = 0.0f;
        for (int d = 0; d < D; ++d) dot += q[d] * k[d];
        dot *= s;
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
    for (int j = i + 1; j < T; ++j) p[j] = 0.0f;

    __global float* o = out + out_off + (b * (ulong)T + (ulong)i) * (ulong)C + (ulong)h * (ulong)D;
    for (int d = 0; d < D; ++d) {
        float acc = 0.0f;
        for (int j = 0; j <= i; ++j) acc += p[j] * vbase[(ulong)j * C3 + (ulong)d];
        o[d] = acc;
    }
}

/* Backward step 1: dS (overwrite). Global size: B*H*T, one work-item per
   row, gid = (b*H + h)*T + i. Reads dout, qkv (v part), P; writes the full
   dS row (T entries, masked ones 0). dS must not alias P. */
__kernel void mpar_attn_bwd_ds(__global const float* dout, ulong dout_off,
                               __global const float* qkv, ulong qkv_off,
                               __global const float* P, ulong P_off,
                               __global float* dS, ulong dS_off,
                               int B, int T, int C, int H)
{
    size_t gid = get_global_id(0);
    if (B <= 0 || T <= 0 || H <= 0 || gid >= (ulong)B * (ulong)H * (ulong)T) return;
    int i = (int)(gid % (ulong)T), h = (int)(gid / (ulong)T % (ulong)H); /* < T, < H */
    ulong b = gid / ((ulong)T * (ulong)H);
    int D = C / H;
    ulong C3 = 3 * (ulong)C;
    __global const float* go = dout + dout_off + (b * (ulong)T + (ulong)i) * (ulong)C + (ulong)h * (ulong)D;
    __global const float* vbase = qkv + qkv_off + b * (ulong)T * C3 + 2 * (ulong)C + (ulong)h * (ulong)D;
    __global const float* p = P + P_off + gid * (ulong)T;
    __global float* ds = dS + dS_off + gid * (ulong)T;

    float rowdot = 0.0f;
    for (int j = 0; j <= i; ++j) {
        __global const float* v = vbase + (ulong)j * C3;
        float dp = 0.0f;
        for (int d = 0; d < D; ++d) dp += go[d] * v[d];
        ds[j] = dp;
        rowdot += dp * p[j];
    }
    for (int j = 0; j <= i; ++j) ds[j] = p[j] * (ds[j] - rowdot);
    for (int j = i + 1; j < T; ++j) ds[j] = 0.0f;
}

/* Backward step 2: dqkv (overwrite). Global size: B*T*3C, one work-item per
   element of dqkv, gid = (b*T + t)*3C + part*C + h*D + d:
     part 0: dq[t,d] = s * sum_{j=0..t}   dS[b,h,t,j] * k[b,j,h,d]
     part 1: dk[t,d] = s * sum_{i=t..T-1} dS[b,h,i,t] * q[b,i,h,d]
     part 2: dv[t,d] =     sum_{i=t..T-1} P[b,h,i,t]  * dout[b,i,h,d] */
__kernel void mpar_attn_bwd_qkv(__global const float* dout, ulong dout_off,
                                __global const float* qkv, ulong qkv_off,
                                __global const float* P, ulong P_off,
                                __global const float* dS, ulong dS_off,
                                __global float* dqkv, ulong dqkv_off,
                                int B, int T, int C, int H)
{
    size_t gid = get_global_id(0);
    ulong C3 = 3 * (ulong)C, TC3 = (ulong)T * C3;
    if (B <= 0 || T <= 0 || C <= 0 || H <= 0 || gid >= (ulong)B * TC3) return;
    ulong b = gid / TC3, rem = gid % TC3;
    int t = (int)(rem / C3), col = (int)(rem % C3); /* < T, < 3C */
    int part = col / C, hc = col % C;
    int D = C / H, h = hc / D, d = hc % D;
    float s = 1.0f / sqrt((float)D);
    ulong bh = (b * (ulong)H + (ulong)h) * (ulong)T * (ulong)T;
    __global const float* xb = qkv + qkv_off + b * TC3 + (ulong)h * (ulong)D + (ulong)d;
    float acc = 0.0f;
    if (part == 0) {
        __global const float* ds = dS + dS_off + bh + (ulong)t * (ulong)T;
        for (int j = 0; j <= t; ++j) acc += ds[j] * xb[(ulong)j * C3 + (ulong)C];
        acc *= s;
    } else if (part == 1) {
        __global const float* ds = dS + dS_off + bh + (ulong)t;
        for (int i = t; i < T; ++i) acc += ds[(ulong)i * (ulong)T] * xb[(ulong)i * C3];
        acc *= s;
    } else {
        __global const float* p = P + P_off + bh + (ulong)t;
        __global const float* go = dout + dout_off + b * (ulong)T * (ulong)C + (ulong)h * (ulong)D + (ulong)d;
        for (int i = t; i < T; ++i) acc += p[(ulong)i * (ulong)T] * go[(ulong)i * (ulong)C];
    }
    dqkv[dqkv_off + gid] = acc;
}
