// Causal grouped-query attention over the KV cache.
//
// Decode (flash-decoding): keys 0..=p of each token are cut into `splits`
// equal ranges; one block per (range, kv head, token) runs an online softmax
// over its range, ATT_TK keys at a time, for the group's query heads and
// writes its partial (max, sum, unnormalized output). The last block of a
// (token, kv head) to finish, counted in `count` (which it resets), merges
// the partials. With `inv_freq` set the block applies RoPE to the queries
// and to the new key itself. The grid depends only on the cache length, so
// a captured decode step replays at any position.
//
// Prefill: one block per (32-query tile, head) streams key/value tiles of
// the sequence through shared memory with an online softmax.

#define ATT_TK 32
#define ATT_OUT 16  // outputs (head, dim) per thread: G * D <= 16 * blockDim
#define ATT_MAX_SPLITS 32

// Load that bypasses L1: partials written by other blocks of this launch.
__device__ __forceinline__ float ld_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// Element d of head row `x` (D values) rotated by position p (HF "rotate
// half"), or unchanged without `inv_freq`.
__device__ __forceinline__ float rope_at(const float* x, int d, int D, float p,
                                         const float* inv_freq) {
    if (!inv_freq) return x[d];
    const int half = D / 2;
    float s, c;
    if (d < half) {
        sincosf(p * inv_freq[d], &s, &c);
        return x[d] * c - x[d + half] * s;
    }
    sincosf(p * inv_freq[d - half], &s, &c);
    return x[d] * c + x[d - half] * s;
}

// Partials: per (token t, kv head g, range sp) G rows of [max, sum, o[0..D)].
extern "C" __global__ void __launch_bounds__(128)
attn_decode(const float* __restrict__ q, const float* __restrict__ knew,
            const float* __restrict__ vnew, float* __restrict__ kc, float* __restrict__ vc,
            const u32* __restrict__ slot, const u32* __restrict__ pos,
            const float* __restrict__ inv_freq, float* __restrict__ part, u32* __restrict__ count,
            float* __restrict__ out, int q_heads, int kv_heads, int D, int max_len, int splits,
            float scale) {
    pdl_start();
    extern __shared__ float sm[];
    __shared__ int is_last;
    const int G = q_heads / kv_heads;
    float* qs = sm;                     // G * D
    float* ks = qs + G * D;             // ATT_TK * (D + 1), padded against bank conflicts
    float* vs = ks + ATT_TK * (D + 1);  // ATT_TK * D
    float* ps = vs + ATT_TK * D;        // G * ATT_TK
    float* st = ps + G * ATT_TK;        // 3 * G: running max, running sum, rescale
    const int sp = blockIdx.x, g = blockIdx.y, t = blockIdx.z;
    const int tid = threadIdx.x, nt = blockDim.x;
    const int lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
    const int p = (int)pos[t], s = (int)slot[t];
    const int per = (p + splits) / splits;  // ceil((p + 1) / splits)
    const int k0 = sp * per, k1 = min(p + 1, k0 + per);
    const int kv_dim = kv_heads * D;
    float* kb = kc + (size_t)s * max_len * kv_dim + g * D;
    float* vb = vc + (size_t)s * max_len * kv_dim + g * D;
    const float* qb = q + (size_t)t * q_heads * D + (size_t)g * G * D;
    for (int i = tid; i < G * D; i += nt) {
        const int h = i / D, d = i - h * D;
        qs[i] = rope_at(qb + h * D, d, D, (float)p, inv_freq) * scale;
    }
    // The range holding the token's own position appends its key and value.
    if (k0 <= p && p < k1)
        for (int d = tid; d < D; d += nt) {
            kb[(size_t)p * kv_dim + d] = rope_at(knew + (size_t)t * kv_dim + g * D, d, D, (float)p, inv_freq);
            vb[(size_t)p * kv_dim + d] = vnew[(size_t)t * kv_dim + g * D + d];
        }
    for (int h = tid; h < G; h += nt) {
        st[h] = -QB_INF;
        st[G + h] = 0.f;
    }
    float o[ATT_OUT];
#pragma unroll
    for (int m = 0; m < ATT_OUT; m++) o[m] = 0.f;
    __syncthreads();
    for (int kt = k0; kt < k1; kt += ATT_TK) {
        const int nk = min(ATT_TK, k1 - kt);
        // Four float4 loads of K and of V in flight per thread (D % 4 == 0).
        const int n4 = nk * D / 4;
        for (int i0 = tid; i0 < n4; i0 += 4 * nt) {
            float4 kr[4], vr[4];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const int i = 4 * (i0 + u * nt), j = i / D, d = i - j * D;
                if (i0 + u * nt < n4) {
                    kr[u] = *(const float4*)(kb + (size_t)(kt + j) * kv_dim + d);
                    vr[u] = *(const float4*)(vb + (size_t)(kt + j) * kv_dim + d);
                }
            }
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const int i = 4 * (i0 + u * nt), j = i / D, d = i - j * D;
                if (i0 + u * nt < n4) {
                    float* kd = ks + j * (D + 1) + d;
                    kd[0] = kr[u].x;
                    kd[1] = kr[u].y;
                    kd[2] = kr[u].z;
                    kd[3] = kr[u].w;
                    *(float4*)(vs + j * D + d) = vr[u];
                }
            }
        }
        __syncthreads();
        for (int i = tid; i < G * nk; i += nt) {
            const int h = i / nk, j = i - h * nk;
            const float* qh = qs + h * D;
            const float* kj = ks + j * (D + 1);
            // Four partial sums: a shorter dependency chain.
            float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
            for (int d = 0; d < D; d += 4) {
                a0 = fmaf(qh[d], kj[d], a0);
                a1 = fmaf(qh[d + 1], kj[d + 1], a1);
                a2 = fmaf(qh[d + 2], kj[d + 2], a2);
                a3 = fmaf(qh[d + 3], kj[d + 3], a3);
            }
            ps[h * ATT_TK + j] = (a0 + a1) + (a2 + a3);
        }
        __syncthreads();
        for (int h = warp; h < G; h += nw) {
            float mx = -QB_INF;
            for (int j = lane; j < nk; j += 32) mx = fmaxf(mx, ps[h * ATT_TK + j]);
            const float m_old = st[h];
            const float m_new = fmaxf(m_old, warp_max(mx));
            float sum = 0.f;
            for (int j = lane; j < nk; j += 32) {
                const float e = expf(ps[h * ATT_TK + j] - m_new);
                ps[h * ATT_TK + j] = e;
                sum += e;
            }
            sum = warp_sum(sum);
            __syncwarp();
            if (lane == 0) {
                const float alpha = expf(m_old - m_new);
                st[h] = m_new;
                st[G + h] = fmaf(st[G + h], alpha, sum);
                st[2 * G + h] = alpha;
            }
        }
        __syncthreads();
#pragma unroll
        for (int m = 0; m < ATT_OUT; m++) {
            const int i = tid + m * nt;
            if (i < G * D) {
                const int h = i / D, d = i - h * D;
                float a0 = o[m] * st[2 * G + h], a1 = 0.f;
                int j = 0;
                for (; j + 1 < nk; j += 2) {
                    a0 = fmaf(ps[h * ATT_TK + j], vs[j * D + d], a0);
                    a1 = fmaf(ps[h * ATT_TK + j + 1], vs[(j + 1) * D + d], a1);
                }
                if (j < nk) a0 = fmaf(ps[h * ATT_TK + j], vs[j * D + d], a0);
                o[m] = a0 + a1;
            }
        }
        __syncthreads();
    }
    const int stride = D + 2;
    float* mine = part + ((size_t)(t * kv_heads + g) * splits + sp) * G * stride;
#pragma unroll
    for (int m = 0; m < ATT_OUT; m++) {
        const int i = tid + m * nt;
        if (i < G * D) {
            const int h = i / D, d = i - h * D;
            mine[h * stride + 2 + d] = o[m];
            if (d == 0) {
                mine[h * stride] = st[h];
                mine[h * stride + 1] = st[G + h];
            }
        }
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        u32* c = count + (size_t)s * kv_heads + g;
        const u32 ticket = atomicAdd(c, 1u);
        is_last = ticket == (u32)(splits - 1);
        if (is_last) *c = 0;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    // Merge: weight of range r for head h is exp(m_r - M) / sum_r' l_r' exp(m_r' - M).
    const float* all = part + (size_t)(t * kv_heads + g) * splits * G * stride;
    for (int h = warp; h < G; h += nw) {
        float mr = -QB_INF, lr = 0.f;
        if (lane < splits) {
            mr = ld_cg(all + ((size_t)lane * G + h) * stride);
            lr = ld_cg(all + ((size_t)lane * G + h) * stride + 1);
        }
        const float M = warp_max(mr);
        const float e = lane < splits ? expf(mr - M) : 0.f;
        const float L = warp_sum(lr * e);
        if (lane < splits) ps[h * ATT_TK + lane] = e / L;
    }
    __syncthreads();
    for (int i = tid; i < G * D; i += nt) {
        const int h = i / D, d = i - h * D;
        // All loads first, so that they are in flight together.
        float pv[ATT_MAX_SPLITS];
#pragma unroll
        for (int r = 0; r < ATT_MAX_SPLITS; r++)
            pv[r] = r < splits ? ld_cg(all + ((size_t)r * G + h) * stride + 2 + d) : 0.f;
        float a = 0.f;
#pragma unroll
        for (int r = 0; r < ATT_MAX_SPLITS; r++)
            if (r < splits) a = fmaf(ps[h * ATT_TK + r], pv[r], a);
        out[((size_t)t * q_heads + g * G + h) * D + d] = a;
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
        int max_len, float scale) { pdl_start();                                                             \
        attn_prefill_body<DIM>(q, kc, vc, tiles, out, q_heads, kv_heads, max_len, scale);       \
    }

ATTN_PREFILL(16)
ATTN_PREFILL(32)
ATTN_PREFILL(64)
ATTN_PREFILL(128)
