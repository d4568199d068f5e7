// Causal grouped-query attention over the KV cache.
//
// Decode (flash-decoding): the keys of each token are cut into `splits`
// chunks of `ch` keys; one block per (chunk, kv head, token) computes the
// partial softmax statistics of the group's query heads, and `attn_combine`
// merges the chunks. The grid depends only on the cache length, so a
// captured decode step replays at any position.
//
// Prefill: one block per (32-query tile, head) streams key/value tiles of
// the sequence through shared memory with an online softmax.

// Partials: for token t, head h, chunk s: [max, sum, o[0..D)] at
// ((t * q_heads + h) * splits + s) * (D + 2).
extern "C" __global__ void __launch_bounds__(128)
attn_decode(const float* __restrict__ q, const float* __restrict__ knew,
            const float* __restrict__ vnew, float* __restrict__ kc, float* __restrict__ vc,
            const u32* __restrict__ slot, const u32* __restrict__ pos, float* __restrict__ part,
            int q_heads, int kv_heads, int D, int max_len, int splits, int ch, float scale) {
    extern __shared__ float sm[];
    const int G = q_heads / kv_heads;
    float* qs = sm;                 // G * D
    float* ks = qs + G * D;         // ch * (D + 1), padded against bank conflicts
    float* vs = ks + ch * (D + 1);  // ch * D
    float* ps = vs + ch * D;        // G * ch
    float* st = ps + G * ch;        // 2 * G
    const int sp = blockIdx.x, g = blockIdx.y, t = blockIdx.z;
    const int p = (int)pos[t], s = (int)slot[t];
    const int k0 = sp * ch;
    const int nk = min(ch, p + 1 - k0);
    const int stride = D + 2;
    float* outp = part + ((size_t)(t * q_heads + g * G) * splits + sp) * stride;
    if (nk <= 0) {
        for (int i = threadIdx.x; i < G * stride; i += blockDim.x) {
            const int h = i / stride, c = i - h * stride;
            outp[(size_t)h * splits * stride + c] = c == 0 ? -QB_INF : 0.f;
        }
        return;
    }
    const int kv_dim = kv_heads * D;
    float* kb = kc + ((size_t)s * max_len + k0) * kv_dim + g * D;
    float* vb = vc + ((size_t)s * max_len + k0) * kv_dim + g * D;
    const float* qb = q + (size_t)t * q_heads * D + (size_t)g * G * D;
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) qs[i] = qb[i] * scale;
    // The token's own key/value come from this step's k/v rows; the block
    // whose chunk holds its position also appends them to the cache.
    const int jn = p - k0;
    for (int i = threadIdx.x; i < nk * D; i += blockDim.x) {
        const int j = i / D, d = i - j * D;
        float kv, vv;
        if (j == jn) {
            kv = knew[(size_t)t * kv_dim + g * D + d];
            vv = vnew[(size_t)t * kv_dim + g * D + d];
            kb[(size_t)j * kv_dim + d] = kv;
            vb[(size_t)j * kv_dim + d] = vv;
        } else {
            kv = kb[(size_t)j * kv_dim + d];
            vv = vb[(size_t)j * kv_dim + d];
        }
        ks[j * (D + 1) + d] = kv;
        vs[j * D + d] = vv;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * nk; i += blockDim.x) {
        const int h = i / nk, j = i - h * nk;
        const float* qh = qs + h * D;
        const float* kj = ks + j * (D + 1);
        float a = 0.f;
        for (int d = 0; d < D; d++) a = fmaf(qh[d], kj[d], a);
        ps[h * ch + j] = a;
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int h = warp; h < G; h += nw) {
        float mx = -QB_INF;
        for (int j = lane; j < nk; j += 32) mx = fmaxf(mx, ps[h * ch + j]);
        mx = warp_max(mx);
        float sum = 0.f;
        for (int j = lane; j < nk; j += 32) {
            const float e = expf(ps[h * ch + j] - mx);
            ps[h * ch + j] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        if (lane == 0) {
            st[2 * h] = mx;
            st[2 * h + 1] = sum;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
        const int h = i / D, d = i - h * D;
        float a = 0.f;
        for (int j = 0; j < nk; j++) a = fmaf(ps[h * ch + j], vs[j * D + d], a);
        float* oh = outp + (size_t)h * splits * stride;
        oh[2 + d] = a;
        if (d == 0) {
            oh[0] = st[2 * h];
            oh[1] = st[2 * h + 1];
        }
    }
}

// Merges the chunk partials of each (head, token): grid (q_heads, tokens).
extern "C" __global__ void attn_combine(const float* __restrict__ part, float* __restrict__ out,
                                        int q_heads, int D, int splits) {
    const int h = blockIdx.x, t = blockIdx.y;
    const int stride = D + 2;
    const float* p = part + (size_t)(t * q_heads + h) * splits * stride;
    float M = -QB_INF;
    for (int s = 0; s < splits; s++) M = fmaxf(M, p[s * stride]);
    float L = 0.f;
    for (int s = 0; s < splits; s++) L = fmaf(p[s * stride + 1], expf(p[s * stride] - M), L);
    const float inv = 1.f / L;
    float* o = out + ((size_t)t * q_heads + h) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float a = 0.f;
        for (int s = 0; s < splits; s++) a = fmaf(p[s * stride + 2 + d], expf(p[s * stride] - M), a);
        o[d] = a * inv;
    }
}

// Tile table: per tile [first row, rows (<= 32), slot, position of the first row].
template <int D>
__device__ __forceinline__ void attn_prefill_body(const float* __restrict__ q,
                                                  const float* __restrict__ kc,
                                                  const float* __restrict__ vc,
                                                  const u32* __restrict__ tiles,
                                                  float* __restrict__ out, int q_heads,
                                                  int kv_heads, int max_len, float scale) {
    constexpr int TPR = 4;  // threads per query row
    constexpr int D4 = D / 4;
    constexpr int NV = D4 / TPR;  // float4s per thread
    constexpr int KT = D <= 64 ? 64 : 32;
    __shared__ float4 ks[KT * D4];
    __shared__ float4 vs[KT * D4];
    const u32* tl = tiles + 4 * blockIdx.x;
    const int row0 = (int)tl[0], nrows = (int)tl[1], slot = (int)tl[2], pos0 = (int)tl[3];
    const int h = blockIdx.y;
    const int g = h / (q_heads / kv_heads);
    const int r = threadIdx.x / TPR, part = threadIdx.x % TPR;
    const bool active = r < nrows;
    const int my_pos = pos0 + r;
    const int kv_dim = kv_heads * D;
    const size_t q_stride = (size_t)q_heads * D;
    const float4* qp = (const float4*)(q + (size_t)(row0 + (active ? r : 0)) * q_stride + h * D);
    float4 qr[NV], o[NV];
#pragma unroll
    for (int i = 0; i < NV; i++) {
        const float4 v = qp[i * TPR + part];
        qr[i] = make_float4(v.x * scale, v.y * scale, v.z * scale, v.w * scale);
        o[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float m = -QB_INF, l = 0.f;
    const int kend = pos0 + nrows;
    const float* kbase = kc + (size_t)slot * max_len * kv_dim + g * D;
    const float* vbase = vc + (size_t)slot * max_len * kv_dim + g * D;
    for (int k0 = 0; k0 < kend; k0 += KT) {
        const int nk = min(KT, kend - k0);
        __syncthreads();
        for (int i = threadIdx.x; i < nk * D4; i += blockDim.x) {
            const int j = i / D4, c = i - j * D4;
            ks[i] = ((const float4*)(kbase + (size_t)(k0 + j) * kv_dim))[c];
            vs[i] = ((const float4*)(vbase + (size_t)(k0 + j) * kv_dim))[c];
        }
        __syncthreads();
        for (int j0 = 0; j0 < nk; j0 += 8) {
            float sc[8];
            float cmax = -QB_INF;
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int j = j0 + u;
                float a = 0.f;
                if (j < nk) {
#pragma unroll
                    for (int i = 0; i < NV; i++) {
                        const float4 kv = ks[j * D4 + i * TPR + part];
                        a = fmaf(qr[i].x, kv.x, a);
                        a = fmaf(qr[i].y, kv.y, a);
                        a = fmaf(qr[i].z, kv.z, a);
                        a = fmaf(qr[i].w, kv.w, a);
                    }
                }
                a += __shfl_xor_sync(0xffffffffu, a, 1);
                a += __shfl_xor_sync(0xffffffffu, a, 2);
                sc[u] = (j < nk && k0 + j <= my_pos) ? a : -QB_INF;
                cmax = fmaxf(cmax, sc[u]);
            }
            const float mnew = fmaxf(m, cmax);
            if (mnew != -QB_INF) {
                const float corr = expf(m - mnew);
                l *= corr;
#pragma unroll
                for (int i = 0; i < NV; i++) {
                    o[i].x *= corr;
                    o[i].y *= corr;
                    o[i].z *= corr;
                    o[i].w *= corr;
                }
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    if (j0 + u < nk) {
                        const float pu = expf(sc[u] - mnew);
                        l += pu;
#pragma unroll
                        for (int i = 0; i < NV; i++) {
                            const float4 vv = vs[(j0 + u) * D4 + i * TPR + part];
                            o[i].x = fmaf(pu, vv.x, o[i].x);
                            o[i].y = fmaf(pu, vv.y, o[i].y);
                            o[i].z = fmaf(pu, vv.z, o[i].z);
                            o[i].w = fmaf(pu, vv.w, o[i].w);
                        }
                    }
                }
                m = mnew;
            }
        }
    }
    if (active) {
        float4* op = (float4*)(out + (size_t)(row0 + r) * q_stride + h * D);
        const float inv = 1.f / l;
#pragma unroll
        for (int i = 0; i < NV; i++)
            op[i * TPR + part] = make_float4(o[i].x * inv, o[i].y * inv, o[i].z * inv, o[i].w * inv);
    }
}

#define ATTN_PREFILL(DIM)                                                                       \
    extern "C" __global__ void __launch_bounds__(128) attn_prefill_d##DIM(                      \
        const float* __restrict__ q, const float* __restrict__ kc, const float* __restrict__ vc, \
        const u32* __restrict__ tiles, float* __restrict__ out, int q_heads, int kv_heads,      \
        int max_len, float scale) {                                                             \
        attn_prefill_body<DIM>(q, kc, vc, tiles, out, q_heads, kv_heads, max_len, scale);       \
    }

ATTN_PREFILL(16)
ATTN_PREFILL(32)
ATTN_PREFILL(64)
ATTN_PREFILL(128)
