// Causal grouped-query prefill attention on tensor cores (sm_80 and later):
// mma.sync m16n8k16 with f16 inputs and f32 accumulation, for head sizes 64
// and 128 (attn_prefill_d* in attention.cu covers the others and older GPUs).
//
// Work split: the tile table of attn_prefill_d* (per tile [first row, rows
// (<= 32), slot, position of the first row]); block (tile, y) takes the
// tile's query rows for two query heads of one KV group (y = kv head *
// ceil(G / 2) + head pair), one warp per 16 rows of a head. Each K/V tile of
// the f32 cache is rounded to f16 into shared memory once for both heads,
// and the next tile is loaded into registers while the current one is used.
// Scores and probabilities stay in registers (the accumulator layout of S is
// the A-operand layout of P·V); the softmax is online, in base 2, with the
// scale folded into Q before Q is rounded to f16. Row sums add the f16-rounded
// probabilities that P·V multiplies, so every output is a weighted mean of V.

#define TC_THREADS 128

// Two floats as one f16x2 register, `lo` in the low half.
__device__ __forceinline__ u32 tc_pack(float lo, float hi) {
    u32 r;
    asm("{ cvt.rn.f16x2.f32 %0, %1, %2; }" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// The sum of both halves of an f16x2 register.
__device__ __forceinline__ float tc_sum2(u32 v) {
    return h2f((u16)(v & 0xffffu)) + h2f((u16)(v >> 16));
}

// c += a · b for one m16n8k16 tile (A row-major, B column-major).
__device__ __forceinline__ void tc_mma(float c[4], const u32 a[4], u32 b0, u32 b1) {
    asm volatile(
        "{ mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3}; }"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 f16 matrices from shared memory; lane i addresses row i % 8 of
// matrix i / 8. TRANS delivers them transposed.
template <bool TRANS>
__device__ __forceinline__ void tc_ldsm4(u32 r[4], const u16* p) {
    const u32 a = (u32)__cvta_generic_to_shared(p);
    if (TRANS)
        asm volatile("{ ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4]; }"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a)
                     : "memory");
    else
        asm volatile("{ ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4]; }"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a)
                     : "memory");
}

// D: head size; KT: keys per tile.
template <int D, int KT>
__device__ __forceinline__ void attn_prefill_tc_body(const float* __restrict__ q,
                                                     const float* __restrict__ kc,
                                                     const float* __restrict__ vc,
                                                     const u32* __restrict__ tiles,
                                                     float* __restrict__ out, int q_heads,
                                                     int kv_heads, int max_len, float scale) {
#if __CUDA_ARCH__ >= 800
    constexpr int LD = D + 8;                       // f16 row stride: conflict-free ldmatrix
    constexpr int DK = D / 16;                      // k-steps of Q·Kᵀ
    constexpr int NT = KT / 8;                      // key columns of S, 8 per mma
    constexpr int DN = D / 8;                       // head columns of O, 8 per mma
    constexpr int C4 = D / 4;                       // float4s per cache row
    constexpr int LOADS = KT * C4 / TC_THREADS;     // float4s of K (and of V) per thread
    static_assert(LOADS * TC_THREADS == KT * C4, "tile must split evenly over the block");
    __shared__ __align__(16) u16 ks[KT * LD];
    __shared__ __align__(16) u16 vs[KT * LD];

    const u32* tl = tiles + 4 * blockIdx.x;
    const int row0 = (int)tl[0], nrows = (int)tl[1], slot = (int)tl[2], pos0 = (int)tl[3];
    const int G = q_heads / kv_heads;
    const int pairs = (G + 1) / 2;
    const int g = blockIdx.y / pairs;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hl = (blockIdx.y - g * pairs) * 2 + (warp >> 1);  // head within the group
    const int h = g * G + hl;
    const int wr = (warp & 1) * 16;  // the warp's first row in the tile
    const bool busy = hl < G && wr < nrows;
    const int gr = lane >> 2, tq = lane & 3;
    const int kv_dim = kv_heads * D;
    const size_t q_stride = (size_t)q_heads * D;
    const int kend = pos0 + nrows;
    // Last key position any of the warp's rows attends to.
    const int wlast = pos0 + min(wr + 15, nrows - 1);

    // Q · scale · log2(e) as A fragments: rows gr and gr + 8 of the warp's 16.
    u32 qa[DK][4];
    if (busy) {
        const float qs = scale * 1.4426950408889634f;
        const float* q0 = q + (size_t)(row0 + min(wr + gr, nrows - 1)) * q_stride + (size_t)h * D;
        const float* q1 = q + (size_t)(row0 + min(wr + gr + 8, nrows - 1)) * q_stride + (size_t)h * D;
#pragma unroll
        for (int kk = 0; kk < DK; kk++) {
            const int c = kk * 16 + 2 * tq;
            const float2 a = *(const float2*)(q0 + c), b = *(const float2*)(q1 + c);
            const float2 e = *(const float2*)(q0 + c + 8), f = *(const float2*)(q1 + c + 8);
            qa[kk][0] = tc_pack(a.x * qs, a.y * qs);
            qa[kk][1] = tc_pack(b.x * qs, b.y * qs);
            qa[kk][2] = tc_pack(e.x * qs, e.y * qs);
            qa[kk][3] = tc_pack(f.x * qs, f.y * qs);
        }
    }

    float o[DN][4];
#pragma unroll
    for (int dt = 0; dt < DN; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
    float m0 = -QB_INF, m1 = -QB_INF, l0 = 0.f, l1 = 0.f;

    const float* kb = kc + (size_t)slot * max_len * kv_dim + (size_t)g * D;
    const float* vb = vc + (size_t)slot * max_len * kv_dim + (size_t)g * D;
    float4 kr[LOADS], vr[LOADS];
    // Keys at or past kend load as zeros (never NaN for masked products).
    auto fetch = [&](int k0) {
#pragma unroll
        for (int i = 0; i < LOADS; i++) {
            const int idx = i * TC_THREADS + threadIdx.x;
            const int j = idx / C4, c = idx - (idx / C4) * C4;
            if (k0 + j < kend) {
                kr[i] = ((const float4*)(kb + (size_t)(k0 + j) * kv_dim))[c];
                vr[i] = ((const float4*)(vb + (size_t)(k0 + j) * kv_dim))[c];
            } else {
                kr[i] = vr[i] = make_float4(0.f, 0.f, 0.f, 0.f);
            }
        }
    };
    const int mi = lane >> 3, mr = lane & 7;  // ldmatrix: matrix and row this lane addresses

    fetch(0);
    for (int k0 = 0; k0 < kend; k0 += KT) {
        __syncthreads();  // every warp is done with the previous tile
#pragma unroll
        for (int i = 0; i < LOADS; i++) {
            const int idx = i * TC_THREADS + threadIdx.x;
            const int j = idx / C4, c = idx - (idx / C4) * C4;
            *(uint2*)(ks + j * LD + c * 4) =
                make_uint2(tc_pack(kr[i].x, kr[i].y), tc_pack(kr[i].z, kr[i].w));
            *(uint2*)(vs + j * LD + c * 4) =
                make_uint2(tc_pack(vr[i].x, vr[i].y), tc_pack(vr[i].z, vr[i].w));
        }
        __syncthreads();
        if (k0 + KT < kend) fetch(k0 + KT);
        if (!busy || k0 > wlast) continue;

        // S = Q · Kᵀ for the warp's 16 rows and the tile's KT keys.
        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DK; kk++) {
#pragma unroll
            for (int nt = 0; nt < NT; nt += 2) {
                u32 b[4];
                tc_ldsm4<false>(b, ks + (nt * 8 + (mi >> 1) * 8 + mr) * LD + kk * 16 + (mi & 1) * 8);
                tc_mma(s[nt], qa[kk], b[0], b[1]);
                tc_mma(s[nt + 1], qa[kk], b[2], b[3]);
            }
        }
        // Causal mask where the tile reaches past the warp's first position.
        if (k0 + KT - 1 > pos0 + wr) {
            const int p0 = pos0 + wr + gr, p1 = p0 + 8;
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                const int key = k0 + nt * 8 + 2 * tq;
                if (key > p0) s[nt][0] = -QB_INF;
                if (key + 1 > p0) s[nt][1] = -QB_INF;
                if (key > p1) s[nt][2] = -QB_INF;
                if (key + 1 > p1) s[nt][3] = -QB_INF;
            }
        }
        // Online softmax. Key 0 is in every row's range and comes first, so
        // the running maxima are finite from the first tile on.
        float x0 = m0, x1 = m1;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            x0 = fmaxf(x0, fmaxf(s[nt][0], s[nt][1]));
            x1 = fmaxf(x1, fmaxf(s[nt][2], s[nt][3]));
        }
        x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 1));
        x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 2));
        x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 1));
        x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 2));
        const float c0 = exp2f(m0 - x0), c1 = exp2f(m1 - x1);
        m0 = x0;
        m1 = x1;
        l0 *= c0;
        l1 *= c1;
#pragma unroll
        for (int dt = 0; dt < DN; dt++) {
            o[dt][0] *= c0;
            o[dt][1] *= c0;
            o[dt][2] *= c1;
            o[dt][3] *= c1;
        }
        // O += P · V, 16 keys per step; P comes straight from S's registers.
#pragma unroll
        for (int kk = 0; kk < KT / 16; kk++) {
            const float* sa = s[2 * kk];
            const float* sb = s[2 * kk + 1];
            u32 pa[4];
            pa[0] = tc_pack(exp2f(sa[0] - m0), exp2f(sa[1] - m0));
            pa[1] = tc_pack(exp2f(sa[2] - m1), exp2f(sa[3] - m1));
            pa[2] = tc_pack(exp2f(sb[0] - m0), exp2f(sb[1] - m0));
            pa[3] = tc_pack(exp2f(sb[2] - m1), exp2f(sb[3] - m1));
            l0 += tc_sum2(pa[0]) + tc_sum2(pa[2]);
            l1 += tc_sum2(pa[1]) + tc_sum2(pa[3]);
#pragma unroll
            for (int dt = 0; dt < DN; dt += 2) {
                u32 b[4];
                tc_ldsm4<true>(b, vs + (kk * 16 + (mi & 1) * 8 + mr) * LD + dt * 8 + (mi >> 1) * 8);
                tc_mma(o[dt], pa, b[0], b[1]);
                tc_mma(o[dt + 1], pa, b[2], b[3]);
            }
        }
    }
    if (!busy) return;
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = 1.f / l0, i1 = 1.f / l1;
    const int r0 = wr + gr, r1 = r0 + 8;
    float* o0 = out + (size_t)(row0 + r0) * q_stride + (size_t)h * D + 2 * tq;
    float* o1 = out + (size_t)(row0 + r1) * q_stride + (size_t)h * D + 2 * tq;
#pragma unroll
    for (int dt = 0; dt < DN; dt++) {
        if (r0 < nrows) *(float2*)(o0 + dt * 8) = make_float2(o[dt][0] * i0, o[dt][1] * i0);
        if (r1 < nrows) *(float2*)(o1 + dt * 8) = make_float2(o[dt][2] * i1, o[dt][3] * i1);
    }
#endif
}

#define ATTN_PREFILL_TC(DIM, KT)                                                                \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) attn_prefill_tc_d##DIM(            \
        const float* __restrict__ q, const float* __restrict__ kc, const float* __restrict__ vc, \
        const u32* __restrict__ tiles, float* __restrict__ out, int q_heads, int kv_heads,      \
        int max_len, float scale) {                                                             \
        pdl_start();                                                                            \
        attn_prefill_tc_body<DIM, KT>(q, kc, vc, tiles, out, q_heads, kv_heads, max_len, scale); \
    }

// 64-key tiles for head size 64; 32-key tiles for 128 keep the staging
// registers at 16 float4s per thread.
ATTN_PREFILL_TC(64, 64)
ATTN_PREFILL_TC(128, 32)
