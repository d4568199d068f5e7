// Causal grouped-query attention over the KV cache.
//
// Decode (flash-decoding): keys 0..=p of each token are cut into `splits`
// equal ranges; one block per (range, kv head, token) attends the group's
// query heads to its range, one warp per head (looping when the group has
// more heads than the block has warps), ATT_TK keys at a time with an
// online softmax, and writes its partial (unnormalized output, max, sum).
// The last block of a (token, kv head) to finish, counted in `count` (which
// it resets), merges the partials (at most 32 ranges: one per lane). With
// `inv_freq` set the block applies RoPE to the queries and to the new key
// itself. The grid depends only on the cache length, so a captured decode
// step replays at any position. A block copies its cached keys and values
// before waiting on the kernels before it (programmatic dependent launch).
//
// Prefill: one block per (32-query tile, head) streams key/value tiles of
// the sequence through shared memory with an online softmax.

#define ATT_TK 32           // keys per tile: one per lane for the scores
#define ATT_MERGE_BATCH 16  // partial rows each lane loads at once in the merge

// Loads that bypass L1: partials written by other blocks of this launch.
__device__ __forceinline__ float2 ld_cg2(const float* p) {
    float2 v;
    asm volatile("ld.global.cg.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "l"(p));
    return v;
}

__device__ __forceinline__ float4 ld_cg4(const float* p) {
    float4 v;
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p));
    return v;
}

// 16-byte copy from global to shared memory that does not hold the thread
// up (cp.async, sm_80+; a plain copy before); cp_async_wait_all completes
// the thread's copies.
__device__ __forceinline__ void cp_async16(float* dst, const float* src) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                 :
                 : "r"((u32)__cvta_generic_to_shared(dst)), "l"(src)
                 : "memory");
#else
    *(float4*)dst = *(const float4*)src;
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

__device__ __forceinline__ float4 f4_fma(float a, float4 x, float4 y) {
    return make_float4(fmaf(a, x.x, y.x), fmaf(a, x.y, y.y), fmaf(a, x.z, y.z), fmaf(a, x.w, y.w));
}

// Sum of `v` over `groups` lane groups of `d4` lanes (groups a power of
// two): lanes below d4 get the total.
__device__ __forceinline__ float4 sum_lane_groups(float4 v, int groups, int d4) {
    for (int o = groups >> 1; o > 0; o >>= 1) {
        v.x += __shfl_down_sync(0xffffffffu, v.x, o * d4);
        v.y += __shfl_down_sync(0xffffffffu, v.y, o * d4);
        v.z += __shfl_down_sync(0xffffffffu, v.z, o * d4);
        v.w += __shfl_down_sync(0xffffffffu, v.w, o * d4);
    }
    return v;
}

// Dynamic shared memory: rotated and scaled queries [G][D], the token's own
// key and value [D] each, then tile buffers of keys [ATT_TK][KS] (KS: D
// rounded up to an odd number of float4s, so that lanes reading one key
// each hit distinct banks) and values [ATT_TK][D]: one, or two where the
// cache is long enough for a range to span several tiles.
// Partials: per (token t, kv head g, range r, head h of the group) a row of
// D + 4 floats: [o[0..D), max, sum, 2 unused].
extern "C" __global__ void __launch_bounds__(256)
attn_decode(const float* __restrict__ q, const float* __restrict__ knew,
            const float* __restrict__ vnew, float* __restrict__ kc, float* __restrict__ vc,
            const u32* __restrict__ slot, const u32* __restrict__ pos,
            const float* __restrict__ inv_freq, float* __restrict__ part, u32* __restrict__ count,
            float* __restrict__ out, int q_heads, int kv_heads, int D, int max_len, int splits,
            float scale) {
    extern __shared__ __align__(16) float sm[];
    __shared__ int is_last;
    const int G = q_heads / kv_heads;
    const int D4 = D / 4, half = D / 2;
    const int KS = (D4 | 1) * 4;
    const int buf = ATT_TK * (KS + D);  // floats per tile buffer
    float* qs = sm;
    float* kn = qs + G * D;
    float* vn = kn + D;
    float* tiles = vn + D;
    const int sp = blockIdx.x, g = blockIdx.y, t = blockIdx.z;
    const int tid = threadIdx.x, nt = blockDim.x;
    const int lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
    const int kv_dim = kv_heads * D;
    const int PS = D + 4;  // partial row

    // Before the wait: the layout words are uploaded before the step, and
    // cache rows below p were written by earlier steps, so this block looks
    // up its range and starts copying those rows of its first tile.
    const int p = (int)pos[t], s = (int)slot[t];
    const int per = (p + splits) / splits;  // ceil((p + 1) / splits)
    const int nr = (p + per) / per;         // ranges that hold keys
    const int k0 = sp * per, k1 = min(p + 1, k0 + per);
    const int ntiles = sp < nr ? (k1 - k0 + ATT_TK - 1) / ATT_TK : 0;
    float* kb = kc + (size_t)s * max_len * kv_dim + g * D;
    float* vb = vc + (size_t)s * max_len * kv_dim + g * D;
    // Copies the cached rows (positions < p) of the tile at key kt into
    // tile buffer b; the row at p is read from kn / vn instead.
    auto stage = [&](int b, int kt) {
        float* ks = tiles + b * buf;
        float* vs = ks + ATT_TK * KS;
        const int n = max(0, min(min(ATT_TK, k1 - kt), p - kt)) * D4;
        for (int i = tid; i < n; i += nt) {
            const int j = i / D4, c = 4 * (i - j * D4);
            const size_t row = (size_t)(kt + j) * kv_dim + c;
            cp_async16(ks + j * KS + c, kb + row);
            cp_async16(vs + j * D + c, vb + row);
        }
    };
    if (ntiles > 0) stage(0, k0);
    // RoPE: thread tid turns the angle pair (ri, ri + 1) of rows rr,
    // rr + rstep, ...; its sines and cosines need only p and inv_freq.
    const int ri = 2 * (tid % D4), rr = tid / D4, rstep = nt / D4;
    float s0 = 0.f, c0 = 1.f, s1 = 0.f, c1 = 1.f;
    if (inv_freq && ntiles > 0 && rr < rstep) {
        sincosf((float)p * inv_freq[ri], &s0, &c0);
        sincosf((float)p * inv_freq[ri + 1], &s1, &c1);
    }

    // Programmatic dependent launch (see pdl_start): q, knew and vnew come
    // from the kernels before this one.
    pdl_start();

    if (ntiles > 0) {
        // The range holding position p appends the token's key and value to
        // the cache and keeps them in kn / vn.
        const bool own = p < k1;
        const size_t nrow = (size_t)t * kv_dim + g * D;
        if (own && tid < D4) {
            const float4 v = ((const float4*)(vnew + nrow))[tid];
            ((float4*)vn)[tid] = v;
            ((float4*)(vb + (size_t)p * kv_dim))[tid] = v;
        }
        // Rows 0..G-1: the group's queries (times `scale`); row G: the new
        // key. HF "rotate half", as the `rope` kernel and the CPU.
        if (rr < rstep)
            for (int r = rr; r < G + own; r += rstep) {
                const float* x = r < G ? q + ((size_t)t * q_heads + g * G + r) * D : knew + nrow;
                const float2 a = *(const float2*)(x + ri), b = *(const float2*)(x + half + ri);
                float2 lo = a, hi = b;
                if (inv_freq) {
                    lo = make_float2(a.x * c0 - b.x * s0, a.y * c1 - b.y * s1);
                    hi = make_float2(b.x * c0 + a.x * s0, b.y * c1 + a.y * s1);
                }
                if (r < G) {
                    *(float2*)(qs + r * D + ri) = make_float2(lo.x * scale, lo.y * scale);
                    *(float2*)(qs + r * D + half + ri) = make_float2(hi.x * scale, hi.y * scale);
                } else {
                    *(float2*)(kn + ri) = lo;
                    *(float2*)(kn + half + ri) = hi;
                    *(float2*)(kb + (size_t)p * kv_dim + ri) = lo;
                    *(float2*)(kb + (size_t)p * kv_dim + half + ri) = hi;
                }
            }
    }

    // PV product: lane = kg * D4 + c sums keys kg, kg + KG, ... into
    // output columns 4c..4c+3; KG: the most lane groups (a power of two)
    // that fit a warp; lanes past KG * D4 idle.
    const int KG = 1 << (31 - __clz(32 / D4));
    const int kg = lane / D4, c = lane - kg * D4;
    const bool col = kg < KG;
    // Steps: the warp's rounds of heads (round r: head r * nw + warp) times
    // the range's tiles. A one-tile range is staged once for all rounds;
    // longer ranges restage each tile per round, double-buffered: the next
    // tile is copied while this one is used.
    const int steps = (G + nw - 1) / nw * ntiles;
    const bool restage = ntiles > 1;
    float m = -QB_INF, l = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int it = 0; it < steps; it++) {
        const int round = it / ntiles, ti = it - round * ntiles;
        const int h = round * nw + warp, kt = k0 + ti * ATT_TK;
        if (it == 0 || restage) {
            // This tile (and at it == 0 the queries, kn and vn) visible to
            // every warp, and every warp done with the other buffer.
            cp_async_wait_all();
            __syncthreads();
            if (restage && it + 1 < steps) stage((it + 1) & 1, k0 + (it + 1) % ntiles * ATT_TK);
        }
        if (h >= G) continue;
        if (ti == 0) {
            m = -QB_INF;
            l = 0.f;
            acc = make_float4(0.f, 0.f, 0.f, 0.f);
        }
        const float* ks = tiles + (restage ? it & 1 : 0) * buf;
        const float* vs = ks + ATT_TK * KS;
        const int nk = min(ATT_TK, k1 - kt);
        // Lane j: score of key kt + j.
        float sc = -QB_INF;
        if (lane < nk) {
            const float4* kr = (const float4*)(kt + lane == p ? kn : ks + lane * KS);
            const float4* qr = (const float4*)(qs + h * D);
            float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
            for (int i = 0; i < D4; i++) {
                const float4 kv = kr[i], qv = qr[i];
                a.x = fmaf(qv.x, kv.x, a.x);
                a.y = fmaf(qv.y, kv.y, a.y);
                a.z = fmaf(qv.z, kv.z, a.z);
                a.w = fmaf(qv.w, kv.w, a.w);
            }
            sc = (a.x + a.y) + (a.z + a.w);
        }
        // Online softmax; the tile has a key, so mn is finite, e is 0 past
        // nk and alpha is 0 on the first tile.
        const float mn = fmaxf(m, warp_max(sc));
        const float e = expf(sc - mn);
        const float alpha = expf(m - mn);
        l = fmaf(l, alpha, warp_sum(e));
        m = mn;
        acc = make_float4(acc.x * alpha, acc.y * alpha, acc.z * alpha, acc.w * alpha);
        for (int j0 = 0; j0 < nk; j0 += KG) {
            const int j = j0 + kg;
            const float pj = __shfl_sync(0xffffffffu, e, j & 31);
            if (col && j < nk)
                acc = f4_fma(pj, ((const float4*)(kt + j == p ? vn : vs + j * D))[c], acc);
        }
        if (ti == ntiles - 1) {
            const float4 o = sum_lane_groups(acc, KG, D4);
            float* row = part + ((((size_t)t * kv_heads + g) * splits + sp) * G + h) * PS;
            if (lane < D4) ((float4*)row)[lane] = o;
            if (lane == 0) *(float2*)(row + D) = make_float2(m, l);
        }
    }

    __threadfence();
    __syncthreads();
    if (tid == 0) {
        u32* cnt = count + (size_t)s * kv_heads + g;
        const u32 ticket = atomicAdd(cnt, 1u);
        is_last = ticket == (u32)(splits - 1);
        if (is_last) *cnt = 0;
    }
    __syncthreads();
    if (!is_last) {
        trace_event(TRACE_PARTIAL_DONE);
        return;
    }
    __threadfence();
    // Merge, a warp per head: range r (r < nr <= 32, one per lane) weighs
    // exp(m_r - M) / sum_r' l_r' exp(m_r' - M). Each lane's first batch of
    // partial rows is loaded before the weights are worked out.
    const float* all = part + ((size_t)t * kv_heads + g) * splits * G * PS;
    const size_t rs = (size_t)G * PS;  // from one range's row to the next
    for (int h = warp; h < G; h += nw) {
        const float* hr = all + (size_t)h * PS;
        float mr = -QB_INF, lr = 0.f;
        if (lane < nr) {
            const float2 ml = ld_cg2(hr + lane * rs + D);
            mr = ml.x;
            lr = ml.y;
        }
        float w = 0.f;
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int r0 = 0; r0 < nr; r0 += ATT_MERGE_BATCH * KG) {
            float4 v[ATT_MERGE_BATCH];
#pragma unroll
            for (int u = 0; u < ATT_MERGE_BATCH; u++) {
                const int r = r0 + u * KG + kg;
                v[u] = col && r < nr ? ld_cg4(hr + r * rs + 4 * c) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
            if (r0 == 0) {
                const float M = warp_max(mr);
                const float e = lane < nr ? expf(mr - M) : 0.f;
                w = e / warp_sum(lr * e);
            }
#pragma unroll
            for (int u = 0; u < ATT_MERGE_BATCH; u++)
                a = f4_fma(__shfl_sync(0xffffffffu, w, (r0 + u * KG + kg) & 31), v[u], a);
        }
        a = sum_lane_groups(a, KG, D4);
        if (lane < D4) ((float4*)(out + ((size_t)t * q_heads + g * G + h) * D))[lane] = a;
    }
    trace_event(TRACE_DONE);
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
