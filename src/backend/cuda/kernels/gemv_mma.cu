// Batched 4-bit GEMVs on tensor cores: NF4/FP4 weights whose compute dtype
// is f16 or bf16, and packed integers in groups of a multiple of 128
// inputs, batches of 4 to 8 rows. A warp computes a tile of 16
// output rows (with PAIR, 16 rows of gate and the same 16 of up) for all
// rows of the batch at once with m16n8k16 MMAs: A holds the weights (16 rows
// x 16 inputs), B the batch's inputs (16 inputs x 8 batch rows, rows past
// `n` zero), C the f32 sums. Weights are dequantized as bitsandbytes does
// before its half-precision GEMM: code * absmax in f32, rounded once to the
// compute dtype; inputs are rounded to the compute dtype (exact for inputs
// that already are). The products are exact in f32 and summed in f32.
// Packed integers and an f32 compute dtype stay close to the f32 GEMVs
// instead: the inputs are split into bf16 halves (x = hi + lo, as the dense
// kernel below does) and multiplied by both. For packed integers A holds
// code - zero (exact in bf16) and each round's sums are scaled by their
// group's scale (one per row and round, since a group spans whole rounds);
// for NF4/FP4 the dequantized weights are split into bf16 halves too, and
// the products hi·hi, hi·lo and lo·hi summed (about 16 significant bits).
//
// Lane L = 4 g + t holds rows g and g + 8 of a tile. In a round of 128
// inputs it loads 32 consecutive weights of each of its rows (16 bytes, one
// scale) at input 128 c + 32 t; MMA step s (8 per round) takes the lane's
// inputs 4 s .. 4 s + 3 as the A elements of k = 2t, 2t+1 (a0/a1) and
// 2t+8, 2t+9 (a2/a3). The B fragment of lane L (batch row g, k = 2t, 2t+1,
// 2t+8, 2t+9) is then the same four inputs of batch row g, so the sum over
// k pairs each weight with its own input. `ksplit` warps share a tile along
// the input dimension; their sums meet in shared memory.
//
// Dynamic shared memory: the code-pair tables (Q4_PAIR_FLOATS floats,
// filled by q4_pair_tables, read with this lane's slot as the f32 GEMVs
// do), then the batch's inputs as B fragments (mma_stage_x, or for packed
// integers mma_stage_x_split): each block stages all of them once, so that
// a step reads its fragment with one conflict-free load instead of waiting
// on global memory.

// Two f32 values rounded to the compute dtype (bf16 when `bf`, else f16) in
// one word, `lo` in the low half.
__device__ __forceinline__ u32 mma_pack2(float lo, float hi, bool bf) {
    u32 d;
    if (bf)
        asm("{ cvt.rn.bf16x2.f32 %0, %1, %2; }" : "=r"(d) : "f"(hi), "f"(lo));
    else
        asm("{ cvt.rn.f16x2.f32 %0, %1, %2; }" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

// The hi and lo bf16 halves of two inputs, each half pair in one word.
__device__ __forceinline__ void mma_split2(float a, float b, u32& hi, u32& lo) {
    hi = mma_pack2(a, b, true);
    const float ah = __uint_as_float(hi << 16), bh = __uint_as_float(hi & 0xffff0000u);
    lo = mma_pack2(a - ah, b - bh, true);
}

// c += A·B for one m16n8k16 tile of the warp (A: a[4], B: b0, b1, as the
// PTX fragment layouts of mma.sync with row-major A and column-major B),
// bf16 inputs when `bf`, else f16; f32 accumulators.
__device__ __forceinline__ void mma_16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1,
                                          bool bf) {
    if (bf)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Requests the 16 bytes at `p` into L2 without waiting for them.
__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" : : "l"(p));
}

// Batch rows an MMA tile holds (the n of m16n8k16).
#define MMA_BATCH 8

// Words of the B fragments of an `in`-wide input (MMA_BATCH rows): per
// round and step, two words for each of the 32 lanes (`mma_b_words` in
// matmul.rs).
__device__ __forceinline__ int mma_b_words(int in) { return ((in + 127) >> 7) * 8 * 32 * 2; }

// A thread's entries go MMA_STAGE_LOADS at a time, all loads first, so
// that their latencies overlap.
#define MMA_STAGE_LOADS 4

// Stages a batch's inputs for the MMAs as `entries` entries of a layout
// of W-input rounds (W / 16 steps each): entry e is lane L = e % 32 =
// 4 g + t of step (e / 32) % (W / 16) of round e / (2 W), i.e. inputs
// W rc + W/4 t + 4 st .. + 3 of row g, with those of the norm weight `nw`
// when it is set. A thread takes entries threadIdx.x, + blockDim.x, ...,
// loading MMA_STAGE_LOADS of them before `store(e, v, w4, live)` converts
// and stores each; entries of rows past `n` or inputs past the row are not
// live and load zeros.
template <int W, class Store>
__device__ __forceinline__ void mma_stage(const float* __restrict__ x,
                                          const float* __restrict__ nw, int n, int in,
                                          int entries, Store store) {
    const int bd = blockDim.x;
    for (int e0 = threadIdx.x; e0 < entries; e0 += MMA_STAGE_LOADS * bd) {
        float4 v[MMA_STAGE_LOADS], w4[MMA_STAGE_LOADS];
        bool live[MMA_STAGE_LOADS];
#pragma unroll
        for (int u = 0; u < MMA_STAGE_LOADS; u++) {
            const int e = e0 + u * bd;
            const int lane = e & 31, st = (e >> 5) & (W / 16 - 1), rc = e / (2 * W);
            const int g = lane >> 2;
            const int col = W * rc + (W / 4) * (lane & 3) + 4 * st;
            live[u] = e < entries && g < n && col < in;
            v[u] = live[u] ? *(const float4*)(x + (size_t)g * in + col)
                           : make_float4(0.f, 0.f, 0.f, 0.f);
            if (nw && live[u]) w4[u] = *(const float4*)(nw + col);
        }
#pragma unroll
        for (int u = 0; u < MMA_STAGE_LOADS; u++) {
            const int e = e0 + u * bd;
            if (e >= entries) break;
            store(e, v[u], w4[u], live[u]);
        }
    }
}

// Entry `e`'s four inputs `a`, RMS-normalized by the norm weights `w4`
// with its batch row's inverse RMS (`inv`) when `nw` is set and the entry
// is live.
__device__ __forceinline__ float4 mma_norm4(float4 a, const float4& w4, const float* inv, int e,
                                            const float* nw, bool live) {
    if (nw && live) {
        const float r = inv[(e & 31) >> 2];
        a = make_float4((a.x * r) * w4.x, (a.y * r) * w4.y, (a.z * r) * w4.z, (a.w * r) * w4.w);
    }
    return a;
}

// Stages the B fragments of the `n` rows of `x` (RMS-normalized by `nw`
// when set, with `inv` the rows' inverse RMS) at `b`: the two words of
// round rc, step st, lane L = 4 g + t at 2 ((8 rc + st) 32 + L) hold inputs
// 128 rc + 32 t + 4 st .. + 3 of row g, rounded to the compute dtype; zero
// for rows past n and inputs past the row.
__device__ __forceinline__ void mma_stage_x(const float* __restrict__ x,
                                            const float* __restrict__ nw, const float* inv, int n,
                                            int in, bool bf, uint2* b) {
    mma_stage<128>(x, nw, n, in, mma_b_words(in) >> 1,
                   [&](int e, float4 a, const float4& w4, bool live) {
                       a = mma_norm4(a, w4, inv, e, nw, live);
                       b[e] = make_uint2(mma_pack2(a.x, a.y, bf), mma_pack2(a.z, a.w, bf));
                   });
}

// Stages the B fragments of the `n` rows of `x` as mma_stage_x does, each
// entry split into bf16 halves (hi b0, hi b1, lo b0, lo b1: mma_split2) and
// only rows below n kept: the entry of round rc, step st, lane 4 g + t at
// ((8 rc + st) n + g) 4 + t (`mma_split_b_words` words in all).
__device__ __forceinline__ void mma_stage_x_split(const float* __restrict__ x,
                                                  const float* __restrict__ nw, const float* inv,
                                                  int n, int in, uint4* b) {
    mma_stage<128>(x, nw, n, in, mma_b_words(in) >> 1,
                   [&](int e, float4 a, const float4& w4, bool live) {
                       const int g = (e & 31) >> 2;
                       if (g >= n) return;
                       a = mma_norm4(a, w4, inv, e, nw, live);
                       uint4 f;
                       mma_split2(a.x, a.y, f.x, f.z);
                       mma_split2(a.z, a.w, f.y, f.w);
                       b[((e >> 5) * n + g) * 4 + (e & 3)] = f;
                   });
}

// One round's weights and scales of a lane's two rows (g, g + 8) of each
// tile (T: 1, or 2 with PAIR: gate then up).
template <int T>
struct MmaRound {
    uint4 w[T][2];
    float s[T][2], z[T][2];
};

// How mma_a_frag turns a weight's code into an A element: scaled and
// rounded to the compute dtype (MMA_A_ROUND), code - zero in bf16, which is
// exact for packed integers (MMA_A_ZERO), or scaled and split into bf16
// halves, the hi half in `a` and the lo half in `lo` (MMA_A_SPLIT).
#define MMA_A_ROUND 0
#define MMA_A_ZERO 1
#define MMA_A_SPLIT 2

// The A fragment of step `st` (0..7) of a round from the lane's weights `w`
// (rows g, g + 8) and their scales and zeros: bytes 2 (st & 1) and + 1 of
// word st / 2, each two weights decoded by the code-pair table `tab`, then
// converted as MODE says.
template <int MODE>
__device__ __forceinline__ void mma_a_frag(const uint4 (&w)[2], const float (&s)[2],
                                           const float (&z)[2], const float2* tab, int st, bool bf,
                                           u32 (&a)[4], u32 (&lo)[4]) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int j = st >> 1;
        const u32 word = j == 0 ? w[h].x : j == 1 ? w[h].y : j == 2 ? w[h].z : w[h].w;
        const float2 p0 = q4_pair_f32(tab, word, 2 * (st & 1));
        const float2 p1 = q4_pair_f32(tab, word, 2 * (st & 1) + 1);
        if constexpr (MODE == MMA_A_ZERO) {
            a[h] = mma_pack2(p0.x - z[h], p0.y - z[h], true);
            a[2 + h] = mma_pack2(p1.x - z[h], p1.y - z[h], true);
        } else if constexpr (MODE == MMA_A_SPLIT) {
            mma_split2(p0.x * s[h], p0.y * s[h], a[h], lo[h]);
            mma_split2(p1.x * s[h], p1.y * s[h], a[2 + h], lo[2 + h]);
        } else {
            a[h] = mma_pack2(p0.x * s[h], p0.y * s[h], bf);
            a[2 + h] = mma_pack2(p1.x * s[h], p1.y * s[h], bf);
        }
    }
}

// The inverse RMS of each of the `n` rows of `x` into `inv` (a warp per
// row; callers sync before reading), each lane's loads issued
// MMA_STAGE_LOADS at a time.
__device__ __forceinline__ void mma_row_norms(const float* __restrict__ x, int n, int in,
                                              float eps, float* inv) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (warp >= n) return;
    const float* xr = x + (size_t)warp * in;
    float ss = 0.f;
    for (int i0 = 4 * lane; i0 < in; i0 += 128 * MMA_STAGE_LOADS) {
        float4 v[MMA_STAGE_LOADS];
#pragma unroll
        for (int u = 0; u < MMA_STAGE_LOADS; u++) {
            const int i = i0 + 128 * u;
            v[u] = i < in ? *(const float4*)(xr + i) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int u = 0; u < MMA_STAGE_LOADS; u++) ss = sum_squares4(v[u], ss);
    }
    ss = warp_sum(ss);
    if (lane == 0) inv[warp] = 1.0f / sqrtf(ss / (float)in + eps);
}

// The GEMV of `n` rows of `x` (2..8) with `qa` (and `qb` when PAIR, writing
// silu(x·Gᵀ) * (x·Uᵀ)) into `y` (adding to it when `acc`), the rows first
// RMS-normalized by `nw` when it is set. Logical block b holds
// GEMV_WARPS / ksplit tiles of 16 output rows; a block stages the inputs
// once and takes logical blocks blockIdx.x, + gridDim.x, ... (the host
// caps the grid at one wave). Q is Q4Bnb or Q4Packed; SPLIT (packed
// integers, and NF4/FP4 of an f32 compute dtype, `cd` 0) splits the inputs
// into bf16 halves, else `cd` (1 or 2) is the MMAs' input dtype.
template <class Q, bool PAIR, bool SPLIT>
__device__ __forceinline__ void gemv_q4_mma_body(const Q& qa, const Q& qb, const float* luts,
                                                 const float* __restrict__ x,
                                                 float* __restrict__ y, int n, int out, int in,
                                                 int ksplit, int acc, int cd,
                                                 const float* __restrict__ nw, float eps) {
    static_assert(SPLIT || !Q::HAS_ZERO, "packed integers take split inputs");
    constexpr int T = PAIR ? 2 : 1;
    extern __shared__ float xsm[];
    __shared__ float inv[MMA_BATCH];
    __shared__ float red[GEMV_WARPS][T][4][32];
    const bool bf = SPLIT || cd == 2;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3, kp = warp % ksplit;
    const int per_block = GEMV_WARPS / ksplit;
    const int nblocks = ((out + 15) / 16 + per_block - 1) / per_block;
    const int chunks = in >> 5, rounds = (chunks + 3) >> 2;
    // This warp's rows g and g + 8 of the tile of logical block `b`.
    auto tile_rows = [&](int b, int (&rows)[2]) {
        const int row0 = (b * per_block + warp / ksplit) * 16;
        rows[0] = min(row0 + g, out - 1);
        rows[1] = min(row0 + g + 8, out - 1);
        return row0;
    };
    auto load = [&](const int (&rows)[2], int c, MmaRound<T>& r) {
        const int ci = 4 * c + t;
#pragma unroll
        for (int i = 0; i < T; i++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const Q& q = i == 0 ? qa : qb;
                // Past the row (the last round of a row of 64 mod 128
                // inputs): zero weights, whose inputs are staged as zeros,
                // so their products are zero; the scale is still the
                // round's, read from the row's last chunk, because packed
                // integers scale the lane's C elements with it, and those
                // belong to batch rows 2t and 2t + 1, not to its chunk.
                r.w[i][h] = ci < chunks ? q.load(rows[h], ci) : make_uint4(0u, 0u, 0u, 0u);
                q.load_scale(rows[h], min(ci, chunks - 1), r.s[i][h], r.z[i][h]);
            }
    };
    // Requests a logical block's first round of weights into L2 (without
    // holding registers), for the first one before waiting for the
    // preceding kernel.
    auto prefetch = [&](int b) {
        int rows[2];
        tile_rows(b, rows);
        if (b < nblocks && 4 * kp + t < chunks)
#pragma unroll
            for (int i = 0; i < T; i++)
#pragma unroll
                for (int h = 0; h < 2; h++)
                    prefetch_l2((i == 0 ? qa : qb).chunk(rows[h], 4 * kp + t));
    };
    prefetch(blockIdx.x);
    Q4Pairs pairs = q4_pair_tables<Q::HI_FIRST, false>(luts, xsm);
    pdl_wait();
    pdl_release();
    cp_async_wait_all();
    if (nw) mma_row_norms(x, n, in, eps, inv);
    // The norms, then the staged inputs, the code-pair tables and the
    // second-level code tables, visible to every warp.
    __syncthreads();
    const uint2* bfrag = (const uint2*)(xsm + Q4_PAIR_FLOATS);
    const uint4* bsplit = (const uint4*)(xsm + Q4_PAIR_FLOATS);
    if constexpr (SPLIT)
        mma_stage_x_split(x, nw, inv, n, in, (uint4*)bsplit);
    else
        mma_stage_x(x, nw, inv, n, in, bf, (uint2*)bfrag);
    __syncthreads();
    const float2* tab[2] = {(const float2*)(pairs.base + pairs.lane_off(luts, luts)),
                            (const float2*)(pairs.base + pairs.lane_off(luts, luts + 16))};
    for (int blk = blockIdx.x; blk < nblocks; blk += gridDim.x) {
        int rows[2];
        const int row0 = tile_rows(blk, rows);
        MmaRound<T> cur;
        if (kp < rounds) load(rows, kp, cur);
        prefetch(blk + gridDim.x);
        // With split NF4/FP4 weights, `c` takes hi·hi and `cs` hi·lo + lo·hi.
        float c[T][4], cs[T][4];
#pragma unroll
        for (int i = 0; i < T; i++)
#pragma unroll
            for (int e = 0; e < 4; e++) c[i][e] = cs[i][e] = 0.f;
        for (int rc = kp; rc < rounds; rc += ksplit) {
            MmaRound<T> nxt;
            if (rc + ksplit < rounds) load(rows, rc + ksplit, nxt);
#pragma unroll
            for (int i = 0; i < T; i++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const Q& q = i == 0 ? qa : qb;
                    q.finish_scale(cur.s[i][h], cur.z[i][h]);
                }
            if constexpr (SPLIT) {
                // Split inputs: hi·hi into `hi`, the rest into `lo`, each
                // step's products hi·hi and hi·lo (and for NF4/FP4 lo·hi).
                // Packed integers sum code - z over the round apart (ch,
                // cl), then scale the sums by rows g (C elements 0, 1) and
                // g + 8 (2, 3).
                float ch[T][4], cl[T][4];
                float(&hi)[T][4] = Q::HAS_ZERO ? ch : c;
                float(&lo)[T][4] = Q::HAS_ZERO ? cl : cs;
#pragma unroll
                for (int i = 0; i < T; i++)
#pragma unroll
                    for (int e = 0; e < 4; e++) ch[i][e] = cl[i][e] = 0.f;
#pragma unroll
                for (int st = 0; st < 8; st++) {
                    const uint4 b = g < n ? bsplit[((8 * rc + st) * n + g) * 4 + t]
                                          : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
                    for (int i = 0; i < T; i++) {
                        u32 a[4], alo[4];
                        mma_a_frag<Q::HAS_ZERO ? MMA_A_ZERO : MMA_A_SPLIT>(
                            cur.w[i], cur.s[i], cur.z[i], tab[i], st, true, a, alo);
                        mma_16816(hi[i], a, b.x, b.y, true);
                        mma_16816(lo[i], a, b.z, b.w, true);
                        if constexpr (!Q::HAS_ZERO) mma_16816(lo[i], alo, b.x, b.y, true);
                    }
                }
                if constexpr (Q::HAS_ZERO)
#pragma unroll
                    for (int i = 0; i < T; i++)
#pragma unroll
                        for (int e = 0; e < 4; e++)
                            c[i][e] = fmaf(cur.s[i][e >> 1], ch[i][e] + cl[i][e], c[i][e]);
            } else {
#pragma unroll
                for (int st = 0; st < 8; st++) {
                    const uint2 b = bfrag[(8 * rc + st) * 32 + lane];
#pragma unroll
                    for (int i = 0; i < T; i++) {
                        u32 a[4], lo[4];
                        mma_a_frag<MMA_A_ROUND>(cur.w[i], cur.s[i], cur.z[i], tab[i], st, bf, a,
                                                lo);
                        mma_16816(c[i], a, b.x, b.y, bf);
                    }
                }
            }
            if (rc + ksplit < rounds) cur = nxt;
        }
        // Lane L holds C rows g and g + 8, batch rows 2t and 2t + 1.
#pragma unroll
        for (int i = 0; i < T; i++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                red[warp][i][e][lane] = SPLIT && !Q::HAS_ZERO ? c[i][e] + cs[i][e] : c[i][e];
        __syncthreads();
        if (kp == 0)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int row = row0 + g + 8 * (e >> 1), b = 2 * t + (e & 1);
                if (row >= out || b >= n) continue;
                float v[T];
#pragma unroll
                for (int i = 0; i < T; i++) {
                    float sum = 0.f;
                    for (int k = 0; k < ksplit; k++) sum += red[warp + k][i][e][lane];
                    v[i] = rnd(sum, cd);
                }
                float* yp = y + (size_t)b * out + row;
                if (PAIR)
                    *yp = v[0] / (1.0f + expf(-v[0])) * v[T - 1];
                else
                    *yp = acc ? *yp + v[0] : v[0];
            }
        // The next logical block reuses `red`.
        __syncthreads();
    }
}

// Single-matrix and pair (gate/up + SiLU) kernels, both with an optional
// RMS norm `nw`: `cd` 1 (f16) or 2 (bf16), or with the _f32 suffix split
// inputs and weights for an f32 compute dtype (`cd` 0).
#define GEMV_Q4BNB_MMA(SUFFIX, SPLIT, PAIR_BLOCKS)                                                 \
    extern "C" __global__ void __launch_bounds__(256) gemv_q4bnb_mma##SUFFIX(                      \
        const __grid_constant__ Q4BnbArgs a, const float* __restrict__ x, float* __restrict__ y,   \
        int n, int out, int in, int ksplit, int acc, int cd, const float* __restrict__ nw,         \
        float eps) {                                                                               \
        Q4BNB_SETUP;                                                                               \
        gemv_q4_mma_body<Q4Bnb, false, SPLIT>(q, q, lut, x, y, n, out, in, ksplit, acc, cd, nw,    \
                                              eps);                                                \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256, PAIR_BLOCKS) gemv_q4bnb_mma##SUFFIX##_pair(  \
        const __grid_constant__ Q4BnbArgs a, const __grid_constant__ Q4BnbArgs b2,                 \
        const float* __restrict__ x, float* __restrict__ y, int n, int out, int in, int ksplit,    \
        int acc, int cd, const float* __restrict__ nw, float eps) {                                \
        Q4BNB_PAIR_SETUP;                                                                          \
        gemv_q4_mma_body<Q4Bnb, true, SPLIT>(qa, qb, lut, x, y, n, out, in, ksplit, 0, cd, nw,     \
                                             eps);                                                 \
    }

GEMV_Q4BNB_MMA(, false, 3)
GEMV_Q4BNB_MMA(_f32, true, 2)

// The packed-integer kernels (Q4PackedArgs; groups of a multiple of 128
// inputs), with the same optional RMS norm `nw`.
extern "C" __global__ void __launch_bounds__(256) gemv_q4packed_mma(
    const __grid_constant__ Q4PackedArgs a, const float* __restrict__ x, float* __restrict__ y,
    int n, int out, int in, int ksplit, int acc, const float* __restrict__ nw, float eps) {
    __shared__ float lut[48];
    q4_tables(lut, nullptr, nullptr, nullptr);
    const Q4Packed q{a.w, a.scales, a.zeros, in, out, a.wpr, a.gsize};
    gemv_q4_mma_body<Q4Packed, false, true>(q, q, lut, x, y, n, out, in, ksplit, acc, 0, nw, eps);
}

extern "C" __global__ void __launch_bounds__(256, 2) gemv_q4packed_mma_pair(
    const __grid_constant__ Q4PackedArgs a, const __grid_constant__ Q4PackedArgs b2,
    const float* __restrict__ x, float* __restrict__ y, int n, int out, int in, int ksplit,
    int acc, const float* __restrict__ nw, float eps) {
    __shared__ float lut[48];
    q4_tables(lut, nullptr, nullptr, nullptr);
    const Q4Packed qa{a.w, a.scales, a.zeros, in, out, a.wpr, a.gsize};
    const Q4Packed qb{b2.w, b2.scales, b2.zeros, in, out, b2.wpr, b2.gsize};
    gemv_q4_mma_body<Q4Packed, true, true>(qa, qb, lut, x, y, n, out, in, ksplit, 0, 0, nw, eps);
}

// Dense bf16 weights on tensor cores, batches of 2 to 8 rows, for matrices
// with many rows (the lm_head): no decode, so a warp's round is four
// 16-byte loads and eight MMAs. The f32 inputs are split into bf16 halves,
// x = hi + lo with hi = bf16(x) and lo = bf16(x - hi), and each tile is
// multiplied by both (two MMAs); the products are exact in f32, so the sums
// differ from f32 products only by lo's rounding (2^-17 of x) and the order
// of the f32 additions. A round is 64 inputs: lane 4 g + t loads values
// 16 t .. 16 t + 15 of the round for its rows g and g + 8, and step s (4
// per round) takes values 4 s .. 4 s + 3 as k = 2t, 2t+1, 2t+8, 2t+9, as
// in the 4-bit kernels. Every warp owns whole tiles of 16 rows (blocks loop
// over them), and each block stages the inputs once (mma_dense_stage_x).

// Words of the staged inputs of an `in`-wide row batch (in % 64 == 0): per
// round and step, four words (hi b0, hi b1, lo b0, lo b1) per lane
// (`mma_dense_b_words` in matmul.rs).
__device__ __forceinline__ int mma_dense_b_words(int in) { return (in >> 6) * 4 * 32 * 4; }

__device__ __forceinline__ void mma_dense_stage_x(const float* __restrict__ x, int n, int in,
                                                  uint4* b) {
    mma_stage<64>(x, nullptr, n, in, mma_dense_b_words(in) >> 2,
                  [&](int e, float4 v, const float4&, bool) {
                      uint4 f;
                      mma_split2(v.x, v.y, f.x, f.z);
                      mma_split2(v.z, v.w, f.y, f.w);
                      b[e] = f;
                  });
}

// y (+)= x·Wᵀ for `n` rows (2..8) of `x` and bf16 `w` ([out, in], in % 64
// == 0); `ksplit` is 1 (its place in the GEMV launch arguments).
extern "C" __global__ void __launch_bounds__(256) gemv_bf16_mma(
    const u16* __restrict__ w, const float* __restrict__ x, float* __restrict__ y, int n, int out,
    int in, int ksplit, int acc) {
    extern __shared__ float xsm[];
    const uint4* bfr = (const uint4*)xsm;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int tiles = (out + 15) >> 4, rounds = in >> 6;
    pdl_wait();
    pdl_release();
    mma_dense_stage_x(x, n, in, (uint4*)bfr);
    __syncthreads();
    for (int tile = blockIdx.x * GEMV_WARPS + warp; tile < tiles; tile += gridDim.x * GEMV_WARPS) {
        const int row0 = 16 * tile;
        // This lane's two 16-byte pieces of rows g and g + 8 in round 0.
        const uint4* wl = (const uint4*)(w + (size_t)min(row0 + g, out - 1) * in) + 2 * t;
        const uint4* wh = (const uint4*)(w + (size_t)min(row0 + g + 8, out - 1) * in) + 2 * t;
        uint4 cur[4] = {wl[0], wl[1], wh[0], wh[1]};
        float ch[4] = {0.f, 0.f, 0.f, 0.f}, cl[4] = {0.f, 0.f, 0.f, 0.f};
        for (int rc = 0; rc < rounds; rc++) {
            uint4 nxt[4];
            if (rc + 1 < rounds) {
                const int o = 8 * (rc + 1);
                nxt[0] = wl[o];
                nxt[1] = wl[o + 1];
                nxt[2] = wh[o];
                nxt[3] = wh[o + 1];
            }
#pragma unroll
            for (int st = 0; st < 4; st++) {
                const uint4 lo = cur[st >> 1], hi = cur[2 + (st >> 1)];
                const u32 a[4] = {(st & 1) ? lo.z : lo.x, (st & 1) ? hi.z : hi.x,
                                  (st & 1) ? lo.w : lo.y, (st & 1) ? hi.w : hi.y};
                const uint4 b = bfr[(4 * rc + st) * 32 + lane];
                mma_16816(ch, a, b.x, b.y, true);
                mma_16816(cl, a, b.z, b.w, true);
            }
            if (rc + 1 < rounds)
#pragma unroll
                for (int i = 0; i < 4; i++) cur[i] = nxt[i];
        }
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int row = row0 + g + 8 * (e >> 1), bb = 2 * t + (e & 1);
            if (row < out && bb < n) {
                float* yp = y + (size_t)bb * out + row;
                const float s = ch[e] + cl[e];
                *yp = acc ? *yp + s : s;
            }
        }
    }
}
