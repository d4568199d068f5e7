// Matrix-vector products for small batches (decode): y[b, o] = sum_k x[b, k] * W[o, k]
// for b < n <= 8, with W in its storage format. Each warp owns R output rows
// for a slice of the input dimension; `ksplit` warps of a block share one row
// group when the matrix has too few rows to fill the GPU, and their partial
// sums meet in shared memory. Weights stream once; each lane issues the loads
// of GEMV_UNROLL chunks before using any of them, so that several memory
// round trips overlap. The activations are re-read from L1/L2 and shared by
// the R rows.

#define GEMV_MAXB 8
#define GEMV_WARPS 8
#define GEMV_UNROLL 1

// Loaders: 8 consecutive weights of `row` starting at column 8 * c. `fetch`
// issues the loads into a `Raw` value; `unpack` turns it into floats, so that
// a lane can hold the next chunk's loads in flight while it multiplies the
// current one.
struct LoadF32 {
    const float* __restrict__ w;
    int in;
    struct Raw {
        float4 a, b;
    };
    __device__ __forceinline__ Raw fetch(int row, int c) const {
        const float4* p = (const float4*)(w + (size_t)row * in + (size_t)c * 8);
        return Raw{p[0], p[1]};
    }
    __device__ __forceinline__ void unpack(const Raw& r, int, int, float v[8]) const {
        v[0] = r.a.x; v[1] = r.a.y; v[2] = r.a.z; v[3] = r.a.w;
        v[4] = r.b.x; v[5] = r.b.y; v[6] = r.b.z; v[7] = r.b.w;
    }
};

__device__ __forceinline__ void unpack_f16x8(uint4 r, float v[8]) {
    v[0] = h2f((u16)(r.x & 0xffff)); v[1] = h2f((u16)(r.x >> 16));
    v[2] = h2f((u16)(r.y & 0xffff)); v[3] = h2f((u16)(r.y >> 16));
    v[4] = h2f((u16)(r.z & 0xffff)); v[5] = h2f((u16)(r.z >> 16));
    v[6] = h2f((u16)(r.w & 0xffff)); v[7] = h2f((u16)(r.w >> 16));
}

__device__ __forceinline__ void unpack_bf16x8(uint4 r, float v[8]) {
    v[0] = __uint_as_float(r.x << 16); v[1] = __uint_as_float(r.x & 0xffff0000u);
    v[2] = __uint_as_float(r.y << 16); v[3] = __uint_as_float(r.y & 0xffff0000u);
    v[4] = __uint_as_float(r.z << 16); v[5] = __uint_as_float(r.z & 0xffff0000u);
    v[6] = __uint_as_float(r.w << 16); v[7] = __uint_as_float(r.w & 0xffff0000u);
}

struct LoadF16 {
    const u16* __restrict__ w;
    int in;
    typedef uint4 Raw;
    __device__ __forceinline__ Raw fetch(int row, int c) const {
        return *(const uint4*)(w + (size_t)row * in + (size_t)c * 8);
    }
    __device__ __forceinline__ void unpack(const Raw& r, int, int, float v[8]) const {
        unpack_f16x8(r, v);
    }
};

struct LoadBF16 {
    const u16* __restrict__ w;
    int in;
    typedef uint4 Raw;
    __device__ __forceinline__ Raw fetch(int row, int c) const {
        return *(const uint4*)(w + (size_t)row * in + (size_t)c * 8);
    }
    __device__ __forceinline__ void unpack(const Raw& r, int, int, float v[8]) const {
        unpack_bf16x8(r, v);
    }
};

// Rounding modes of the compute dtype: 0 f32 (none), 1 f16, 2 bf16.
__device__ __forceinline__ float rnd(float v, int mode) {
    return mode == 1 ? h2f(f2h(v)) : (mode == 2 ? bf2f(f2bf(v)) : v);
}

// ss plus the squares of v's four values, in order (the RMS norm's sum).
__device__ __forceinline__ float sum_squares4(float4 v, float ss) {
    ss = fmaf(v.x, v.x, ss);
    ss = fmaf(v.y, v.y, ss);
    ss = fmaf(v.z, v.z, ss);
    return fmaf(v.w, v.w, ss);
}

// a + w · (x0, x1) over 8 weights, one fused multiply-add each in order.
__device__ __forceinline__ float dot8(const float (&w)[8], float4 x0, float4 x1, float a) {
    a = fmaf(w[0], x0.x, a);
    a = fmaf(w[1], x0.y, a);
    a = fmaf(w[2], x0.z, a);
    a = fmaf(w[3], x0.w, a);
    a = fmaf(w[4], x1.x, a);
    a = fmaf(w[5], x1.y, a);
    a = fmaf(w[6], x1.z, a);
    return fmaf(w[7], x1.w, a);
}

// Eight consecutive values of row data at `xp` (16-byte aligned) in global
// memory, rounded to the compute dtype `cd`.
__device__ __forceinline__ void load_x8(const float* xp, int cd, float4& x0, float4& x1) {
    x0 = ((const float4*)xp)[0];
    x1 = ((const float4*)xp)[1];
    if (cd) {
        x0 = make_float4(rnd(x0.x, cd), rnd(x0.y, cd), rnd(x0.z, cd), rnd(x0.w, cd));
        x1 = make_float4(rnd(x1.x, cd), rnd(x1.y, cd), rnd(x1.z, cd), rnd(x1.w, cd));
    }
}

// Stages the single input row `x` (`in` values, in % 4 == 0) of a one-row
// GEMV in shared memory `xs`, rounded to the compute dtype `cd`. With `nw`
// the row is first RMS-normalized and scaled by `nw` with the arithmetic of
// the `rms_norm` kernel, so that a block's input projections need no
// separate norm launch. PAD leaves one spare word after every 32 values (lane
// L's run of 32 then starts in bank L).
template <bool PAD>
__device__ __forceinline__ void stage_x(const float* __restrict__ x, const float* __restrict__ nw,
                                        float eps, float* xs, int in, int cd) {
    __shared__ float sh[33];
    const float4* x4 = (const float4*)x;
    // A normalized row of at most 8 values per thread: each thread loads
    // its values and their norm weights at once and keeps them in registers
    // across the block sum (the same arithmetic as below).
    if (nw && in <= 8 * (int)blockDim.x) {
        const float4* n4 = (const float4*)nw;
        float4 v[2], g[2];
        float ss = 0.f;
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int i4 = threadIdx.x + u * blockDim.x;
            if (i4 < in / 4) {
                v[u] = x4[i4];
                g[u] = n4[i4];
            }
        }
#pragma unroll
        for (int u = 0; u < 2; u++)
            if (threadIdx.x + u * blockDim.x < in / 4) ss = sum_squares4(v[u], ss);
        const float inv = 1.0f / sqrtf(block_sum(ss, sh) / (float)in + eps);
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int i = 4 * (threadIdx.x + u * blockDim.x);
            if (i < in) {
                const float a[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
                const float w[4] = {g[u].x, g[u].y, g[u].z, g[u].w};
#pragma unroll
                for (int e = 0; e < 4; e++)
                    xs[PAD ? i + e + ((i + e) >> 5) : i + e] = rnd((a[e] * inv) * w[e], cd);
            }
        }
        __syncthreads();
        return;
    }
    float ss = 0.f;
    for (int i0 = threadIdx.x; i0 < in / 4; i0 += 4 * blockDim.x) {
        float4 v[4];
#pragma unroll
        for (int u = 0; u < 4; u++)
            if (i0 + u * (int)blockDim.x < in / 4) v[u] = x4[i0 + u * blockDim.x];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = 4 * (i0 + u * blockDim.x);
            if (i < in) {
                float* d = xs + (PAD ? i + (i >> 5) : i);
                d[0] = nw ? v[u].x : rnd(v[u].x, cd);
                d[1] = nw ? v[u].y : rnd(v[u].y, cd);
                d[2] = nw ? v[u].z : rnd(v[u].z, cd);
                d[3] = nw ? v[u].w : rnd(v[u].w, cd);
                ss = sum_squares4(v[u], ss);
            }
        }
    }
    if (nw) {
        const float inv = 1.0f / sqrtf(block_sum(ss, sh) / (float)in + eps);
        // Each thread rescales the values it stored itself.
        for (int i = 4 * threadIdx.x; i < in; i += 4 * blockDim.x)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float* d = xs + (PAD ? i + e + ((i + e) >> 5) : i + e);
                *d = rnd((*d * inv) * nw[i + e], cd);
            }
    }
    __syncthreads();
}

// Up to three GEMVs of one input row in one launch (the Q, K and V
// projections): matrix i takes the next `blocks[i]` blocks of the grid and
// writes `out[i]` values to `y[i]`.
struct GemvMulti {
    float* y[3];
    int out[3];
    int blocks[3];
};

// The matrix of logical block `b` of a GemvMulti launch, its output and row
// count, and the block's index among that matrix's blocks (selected without
// indexing the parameter arrays, which would copy them to local memory).
__device__ __forceinline__ int multi_pick(const GemvMulti& m, int b, int& blk, float*& y,
                                          int& out) {
    const int i = b < m.blocks[0] ? 0 : (b < m.blocks[0] + m.blocks[1] ? 1 : 2);
    blk = i == 0 ? b : (i == 1 ? b - m.blocks[0] : b - m.blocks[0] - m.blocks[1]);
    y = i == 0 ? m.y[0] : (i == 1 ? m.y[1] : m.y[2]);
    out = i == 0 ? m.out[0] : (i == 1 ? m.out[1] : m.out[2]);
    return i;
}

// With `acc`, the value of y that this thread's lane adds its result to in
// gemv_finish (0 for other lanes), read after the programmatic-launch wait
// and well before the sums are ready, so that its latency overlaps them.
template <int R, bool PAIR>
__device__ __forceinline__ float gemv_y_before(const float* __restrict__ y, int n, int out,
                                               int row0, int ksplit, int acc) {
    const int lane = threadIdx.x & 31, kp = (threadIdx.x >> 5) % ksplit;
    if (PAIR || !acc || kp != 0 || lane >= R * n) return 0.f;
    const int r = lane / n, b = lane - r * n;
    return row0 + r < out ? y[(size_t)b * out + row0 + r] : 0.f;
}

// The end of every GEMV: per-warp sums meet in shared memory across the
// `ksplit` warps of a row group; one lane per (row, batch) writes the result
// rounded to the compute dtype `cd`, adding it to `yold` (gemv_y_before) when
// `acc` (the residual stream: y += x·Wᵀ). A PAIR writes silu(gate) * up.
template <int R, bool PAIR, int NB>
__device__ __forceinline__ void gemv_finish(const float (&accv)[R][NB], float* __restrict__ y,
                                            int n, int out, int row0, int ksplit, int cd,
                                            int acc, float yold) {
    __shared__ float red[GEMV_WARPS][R][NB];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kp = warp % ksplit;
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int b = 0; b < NB; b++)
            if (b < n) {
                const float v = warp_sum(accv[r][b]);
                if (lane == 0) red[warp][r][b] = v;
            }
    __syncthreads();
    if (PAIR) {
        // R / 2 output rows: gate sums at even r, up sums at odd r.
        if (kp == 0 && lane < (R / 2) * n) {
            const int o = lane / n, b = lane - o * n;
            if (row0 + o < out) {
                float g = 0.f, u = 0.f;
                for (int k = 0; k < ksplit; k++) {
                    g += red[warp + k][2 * o][b];
                    u += red[warp + k][2 * o + 1][b];
                }
                g = rnd(g, cd);
                u = rnd(u, cd);
                y[(size_t)b * out + row0 + o] = g / (1.0f + expf(-g)) * u;
            }
        }
    } else if (kp == 0 && lane < R * n) {
        const int r = lane / n, b = lane - (lane / n) * n;
        float s = 0.f;
        for (int k = 0; k < ksplit; k++) s += red[warp + k][r][b];
        if (row0 + r < out) {
            float* yp = y + (size_t)b * out + row0 + r;
            *yp = acc ? yold + rnd(s, cd) : rnd(s, cd);
        }
    }
}

// Where a warp works in a GEMV launch: `ksplit` warps of a block share a row
// group along the input dimension (part `kp`); a group holds R rows, or with
// PAIR row `row0` of two matrices. Rows past the end repeat the last one.
// `blk` is the block's index among the blocks of its matrix.
template <int R, bool PAIR>
struct GemvRows {
    int lane, warp, row0, kp;
    int rows[R];
    __device__ __forceinline__ GemvRows(int out, int ksplit, int blk) {
        lane = threadIdx.x & 31;
        warp = threadIdx.x >> 5;
        row0 = (blk * (GEMV_WARPS / ksplit) + warp / ksplit) * (PAIR ? R / 2 : R);
        kp = warp % ksplit;
#pragma unroll
        for (int r = 0; r < R; r++) rows[r] = min(row0 + (PAIR ? r / 2 : r), out - 1);
    }
};

// With PAIR (and R = 2) a warp group owns one output row o and multiplies by
// row o of two matrices, `ld` (gate) and `ld2` (up), writing
// silu(gate) * up: the MLP's gate/up projections and activation in one pass.
// The first weights are loaded before waiting for the preceding kernel
// (weights never depend on it); with `stage` the single input row is then
// staged in shared memory, RMS-normalized by `nw` when set.
template <class L, int R, bool PAIR, int NB = GEMV_MAXB>
__device__ __forceinline__ void gemv_body(const L ld, const L ld2, const float* __restrict__ x,
                                          float* __restrict__ y, int n, int out, int in,
                                          int ksplit, int cd, int acc, int blk,
                                          const float* __restrict__ nw, float eps, bool stage) {
    static_assert(!PAIR || R == 2, "a pair GEMV holds one row of each matrix");
    trace_event(TRACE_ENTER);
    const GemvRows<R, PAIR> g(out, ksplit, blk);
    const int lane = g.lane, row0 = g.row0, kp = g.kp;
    const int* rows = g.rows;
    const int chunks = in >> 3;
    const int step = 32 * GEMV_UNROLL * ksplit;
    float accv[R][NB];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int b = 0; b < NB; b++) accv[r][b] = 0.f;
    typedef typename L::Raw Raw;
    Raw cur[GEMV_UNROLL][R];
    auto fetch_round = [&](int c0, Raw (&dst)[GEMV_UNROLL][R]) {
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++)
            if (c0 + 32 * u < chunks)
#pragma unroll
                for (int r = 0; r < R; r++)
                    dst[u][r] = (PAIR && r == 1) ? ld2.fetch(rows[r], c0 + 32 * u)
                                                 : ld.fetch(rows[r], c0 + 32 * u);
    };
    int c0 = kp * 32 * GEMV_UNROLL + lane;
    if (c0 < chunks) fetch_round(c0, cur);
    pdl_start();
    const float yold = gemv_y_before<R, PAIR>(y, n, out, row0, ksplit, acc);
    extern __shared__ float xsm[];
    if (stage) {
        stage_x<false>(x, nw, eps, xsm, in, 0);
        x = xsm;
    }
    for (; c0 < chunks; c0 += step) {
        // The next round's loads go out before this round's arithmetic.
        const bool more = c0 + step < chunks;
        Raw nxt[GEMV_UNROLL][R];
        if (more) fetch_round(c0 + step, nxt);
        float w[GEMV_UNROLL][R][8];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++)
            if (c0 + 32 * u < chunks)
#pragma unroll
                for (int r = 0; r < R; r++) {
                    if (PAIR && r == 1)
                        ld2.unpack(cur[u][r], rows[r], c0 + 32 * u, w[u][r]);
                    else
                        ld.unpack(cur[u][r], rows[r], c0 + 32 * u, w[u][r]);
                }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            const int c = c0 + 32 * u;
            if (c >= chunks) break;
#pragma unroll
            for (int b = 0; b < NB; b++) {
                if (b < n) {
                    float4 x0, x1;
                    load_x8(x + (size_t)b * in + (size_t)c * 8, cd, x0, x1);
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        accv[r][b] = dot8(w[u][r], x0, x1, accv[r][b]);
                    }
                }
            }
        }
        if (more)
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; u++)
#pragma unroll
                for (int r = 0; r < R; r++) cur[u][r] = nxt[u][r];
    }
    gemv_finish<R, PAIR, NB>(accv, y, n, out, row0, ksplit, cd, acc, yold);
    trace_event(TRACE_DONE);
}

// Dense weights. The pair kernel (gate/up) and the three-matrix kernel
// (Q/K/V) take an optional RMS-norm weight `nw` for a single input row, which
// they normalize while staging it in shared memory (`in` floats).
#define GEMV_DENSE_NB(NAME, LOADER, T, R, NB)                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        NAME(const T* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,     \
             int n, int out, int in, int ksplit, int acc) {                                    \
        gemv_body<LOADER, R, false, NB>(LOADER{w, in}, LOADER{w, in}, x, y, n, out, in, ksplit, \
                                        0, acc, blockIdx.x, nullptr, 0.f, false);             \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        NAME##_pair(const T* __restrict__ w, const T* __restrict__ w2,                        \
                    const float* __restrict__ x, float* __restrict__ y, int n, int out, int in, \
                    int ksplit, int acc, const float* __restrict__ nw, float eps) {           \
        gemv_body<LOADER, 2, true, NB>(LOADER{w, in}, LOADER{w2, in}, x, y, n, out, in, ksplit, \
                                       0, 0, blockIdx.x, nw, eps, nw != nullptr);             \
    }

// Every dense kernel in a batched (up to 8 rows) and a single-row (_b1)
// instance, and a single-row three-matrix kernel.
#define GEMV_DENSE(NAME, LOADER, T, R)                                                        \
    GEMV_DENSE_NB(NAME, LOADER, T, R, GEMV_MAXB)                                              \
    GEMV_DENSE_NB(NAME##_b1, LOADER, T, R, 1)                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        NAME##_norm3(const T* __restrict__ w0, const T* __restrict__ w1,                      \
                     const T* __restrict__ w2, GemvMulti m, const float* __restrict__ x,      \
                     const float* __restrict__ nw, float eps, int in, int ksplit) {           \
        int blk, out;                                                                         \
        float* y;                                                                             \
        const int i = multi_pick(m, blockIdx.x, blk, y, out);                                             \
        const T* w = i == 0 ? w0 : (i == 1 ? w1 : w2);                                        \
        gemv_body<LOADER, R, false, 1>(LOADER{w, in}, LOADER{w, in}, x, y, 1, out, in, ksplit, \
                                       0, 0, blk, nw, eps, true);                             \
    }

GEMV_DENSE(gemv_f32, LoadF32, float, 2)
GEMV_DENSE(gemv_f16, LoadF16, u16, 2)
GEMV_DENSE(gemv_bf16, LoadBF16, u16, 2)

// bitsandbytes 4-bit: element f of the flattened weight has its index in
// byte f / 2 (high nibble first) and block f >> bs_log2; its value is
// code[index] * absmax(block) rounded to the weight dtype `wdt`, then to the
// compute dtype `cd` when that differs. Needs in % 8 == 0 and a block size
// of at least 8, so that 8 consecutive weights share one 32-bit word and block.
struct LoadBnb4 {
    const u32* __restrict__ packed;
    const float* __restrict__ absmax;  // plain absmax, or nested absmax when codes != 0
    const u8* __restrict__ codes;      // double quant: per-block codes into code2
    const float* __restrict__ code2;   // 256-entry dynamic map
    const float* lut;                  // 16-entry code in shared memory
    float offset;
    int in, bs_log2, nbs_log2, wdt, cd;
    __device__ __forceinline__ float block_absmax(size_t b) const {
        if (codes) return __fadd_rn(__fmul_rn(code2[codes[b]], absmax[b >> nbs_log2]), offset);
        return absmax[b];
    }
    struct Raw {
        u32 w;
        float a;
    };
    __device__ __forceinline__ Raw fetch(int row, int c) const {
        const size_t f = (size_t)row * in + (size_t)c * 8;
        return Raw{packed[f >> 3], block_absmax(f >> bs_log2)};
    }
    __device__ __forceinline__ void unpack(const Raw& r, int, int, float v[8]) const {
        const bool twice = cd != 0 && cd != wdt;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float hi = rnd(lut[(r.w >> (8 * k + 4)) & 15] * r.a, wdt);
            float lo = rnd(lut[(r.w >> (8 * k)) & 15] * r.a, wdt);
            if (twice) {
                hi = rnd(hi, cd);
                lo = rnd(lo, cd);
            }
            v[2 * k] = hi;
            v[2 * k + 1] = lo;
        }
    }
};

// Batched and single-row (_b1) instances; the pair multiplies silu(x·Gᵀ) *
// (x·Uᵀ) for 4-bit G and U of the same compute dtype.
#define GEMV_BNB4(NAME, NB)                                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        NAME(const u32* __restrict__ packed, const float* __restrict__ absmax,                 \
             const u8* __restrict__ codes, const float* __restrict__ code2,                    \
             const float* __restrict__ code16, float offset, int bs_log2, int nbs_log2, int wdt, \
             const float* __restrict__ x, float* __restrict__ y, int n, int out, int in,       \
             int ksplit, int acc, int cd) {                                                    \
        __shared__ float lut[16];                                                              \
        if (threadIdx.x < 16) lut[threadIdx.x] = code16[threadIdx.x];                          \
        __syncthreads();                                                                       \
        const LoadBnb4 ld{packed, absmax, codes, code2, lut, offset, in, bs_log2, nbs_log2, wdt, cd}; \
        gemv_body<LoadBnb4, 2, false, NB>(ld, ld, x, y, n, out, in, ksplit, cd, acc, blockIdx.x, \
                                          nullptr, 0.f, false);                                \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        NAME##_pair(const u32* __restrict__ packed, const float* __restrict__ absmax,          \
                    const u8* __restrict__ codes, const float* __restrict__ code2,             \
                    const float* __restrict__ code16, float offset, int bs_log2, int nbs_log2, \
                    int wdt, const u32* __restrict__ packed2, const float* __restrict__ absmax2, \
                    const u8* __restrict__ codes2, const float* __restrict__ code2b,           \
                    const float* __restrict__ code16b, float offset2, int bs_log2b,            \
                    int nbs_log2b, int wdt2, const float* __restrict__ x, float* __restrict__ y, \
                    int n, int out, int in, int ksplit, int acc, int cd) {                     \
        __shared__ float lut[32];                                                              \
        if (threadIdx.x < 16) lut[threadIdx.x] = code16[threadIdx.x];                          \
        else if (threadIdx.x < 32) lut[threadIdx.x] = code16b[threadIdx.x - 16];               \
        __syncthreads();                                                                       \
        const LoadBnb4 a{packed, absmax, codes, code2, lut, offset, in, bs_log2, nbs_log2, wdt, cd}; \
        const LoadBnb4 b{packed2, absmax2, codes2, code2b, lut + 16, offset2, in, bs_log2b,    \
                         nbs_log2b, wdt2, cd};                                                 \
        gemv_body<LoadBnb4, 2, true, NB>(a, b, x, y, n, out, in, ksplit, cd, 0, blockIdx.x,    \
                                         nullptr, 0.f, false);                                 \
    }

GEMV_BNB4(gemv_bnb4, GEMV_MAXB)
GEMV_BNB4(gemv_bnb4_b1, 1)

// Group-wise packed integers (RTN/GPTQ/AWQ): row r is an LSB-first bitstream
// of BITS-bit codes in `wpr` words; w = (q - zero) * scale with per (group,
// row) f16 scales and u16 zeros stored [groups, out]. Needs in % 8 == 0 and,
// without g_idx, group_size % 8 == 0.
template <int BITS>
struct LoadPacked {
    const u32* __restrict__ qw;
    const u16* __restrict__ scales;
    const u16* __restrict__ zeros;
    const u32* __restrict__ g_idx;
    int in, out, wpr, gsize;
    // The words holding the chunk's codes and, without g_idx, its group's
    // scale and zero, as loaded: `unpack` does all the arithmetic, so that
    // nothing waits on these loads before the next round's are issued.
    struct Raw {
        u32 lo, hi;
        u16 s, z;
    };
    __device__ __forceinline__ Raw fetch(int row, int c) const {
        const u32* rw = qw + (size_t)row * wpr;
        Raw r{0u, 0u, 0, 0};
        if (BITS == 4) {
            r.lo = rw[c];
        } else if (BITS == 8) {
            const uint2 p = *(const uint2*)(rw + 2 * c);
            r.lo = p.x;
            r.hi = p.y;
        } else {
            const int w0 = (c * 8 * BITS) >> 5;
            r.lo = rw[w0];
            if (w0 + 1 < wpr) r.hi = rw[w0 + 1];
        }
        if (!g_idx) {
            const size_t at = (size_t)((c * 8) / gsize) * out + row;
            r.s = scales[at];
            r.z = zeros[at];
        }
        return r;
    }
    __device__ __forceinline__ void unpack(const Raw& r, int row, int c, float v[8]) const {
        const u64 mask = (1ull << BITS) - 1;
        const int o = (BITS == 4 || BITS == 8) ? 0 : (c * 8 * BITS) & 31;
        const u64 bits = (((u64)r.hi << 32) | r.lo) >> o;
        if (!g_idx) {
            const float s = h2f(r.s), z = (float)r.z;
#pragma unroll
            for (int k = 0; k < 8; k++) v[k] = ((float)((bits >> (k * BITS)) & mask) - z) * s;
        } else {
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const size_t at = (size_t)g_idx[c * 8 + k] * out + row;
                v[k] = ((float)((bits >> (k * BITS)) & mask) - (float)zeros[at]) * h2f(scales[at]);
            }
        }
    }
};

#define GEMV_PACKED_NB(NAME, BITS, NB)                                                         \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                    \
        const u32* __restrict__ qw, const u16* __restrict__ scales, const u16* __restrict__ zeros, \
        const u32* __restrict__ g_idx, int wpr, int gsize, const float* __restrict__ x,         \
        float* __restrict__ y, int n, int out, int in, int ksplit, int acc) {                    \
        const LoadPacked<BITS> ld{qw, scales, zeros, g_idx, in, out, wpr, gsize};               \
        gemv_body<LoadPacked<BITS>, 2, false, NB>(ld, ld, x, y, n, out, in, ksplit, 0, acc,     \
                                                  blockIdx.x, nullptr, 0.f, false);             \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) NAME##_pair(                             \
        const u32* __restrict__ qw, const u16* __restrict__ scales, const u16* __restrict__ zeros, \
        const u32* __restrict__ g_idx, int wpr, int gsize, const u32* __restrict__ qw2,         \
        const u16* __restrict__ scales2, const u16* __restrict__ zeros2,                        \
        const u32* __restrict__ g_idx2, int wpr2, int gsize2, const float* __restrict__ x,      \
        float* __restrict__ y, int n, int out, int in, int ksplit, int acc) {                    \
        const LoadPacked<BITS> a{qw, scales, zeros, g_idx, in, out, wpr, gsize};                \
        const LoadPacked<BITS> b{qw2, scales2, zeros2, g_idx2, in, out, wpr2, gsize2};          \
        gemv_body<LoadPacked<BITS>, 2, true, NB>(a, b, x, y, n, out, in, ksplit, 0, 0,          \
                                                 blockIdx.x, nullptr, 0.f, false);              \
    }

// Batched and single-row (_b1) instances of each width.
#define GEMV_PACKED(BITS)                                                                      \
    GEMV_PACKED_NB(gemv_packed##BITS, BITS, GEMV_MAXB)                                         \
    GEMV_PACKED_NB(gemv_packed##BITS##_b1, BITS, 1)

GEMV_PACKED(2)
GEMV_PACKED(3)
GEMV_PACKED(4)
GEMV_PACKED(8)

// Dequantizes a whole weight (for prefill GEMMs) into `dst` as f32 (mode 0),
// f16 (1) or bf16 (2), one thread per 8 weights.
template <class L>
__device__ __forceinline__ void dequant_body(const L ld, void* dst, int out, int in, int mode) {
    const int chunks = in >> 3;
    const size_t total = (size_t)out * chunks;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const int row = (int)(i / chunks), c = (int)(i - (size_t)row * chunks);
        float v[8];
        ld.unpack(ld.fetch(row, c), row, c, v);
        const size_t at = (size_t)row * in + (size_t)c * 8;
        if (mode == 0) {
            float4* d = (float4*)((float*)dst + at);
            d[0] = make_float4(v[0], v[1], v[2], v[3]);
            d[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
            u32 p[4];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const u16 a = mode == 1 ? f2h(v[2 * k]) : f2bf(v[2 * k]);
                const u16 b = mode == 1 ? f2h(v[2 * k + 1]) : f2bf(v[2 * k + 1]);
                p[k] = (u32)a | ((u32)b << 16);
            }
            *(uint4*)((u16*)dst + at) = make_uint4(p[0], p[1], p[2], p[3]);
        }
    }
}

extern "C" __global__ void dequant_bnb4(const u32* __restrict__ packed,
                                        const float* __restrict__ absmax,
                                        const u8* __restrict__ codes,
                                        const float* __restrict__ code2,
                                        const float* __restrict__ code16, float offset,
                                        int bs_log2, int nbs_log2, int wdt, int cd, void* dst,
                                        int out, int in, int mode) {
    pdl_start();
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = code16[threadIdx.x];
    __syncthreads();
    const LoadBnb4 ld{packed, absmax, codes, code2, lut, offset, in, bs_log2, nbs_log2, wdt, cd};
    dequant_body(ld, dst, out, in, mode);
}

#define DEQUANT_PACKED(BITS)                                                                   \
    extern "C" __global__ void dequant_packed##BITS(                                           \
        const u32* __restrict__ qw, const u16* __restrict__ scales, const u16* __restrict__ zeros, \
        const u32* __restrict__ g_idx, int wpr, int gsize, void* dst, int out, int in, int mode) { pdl_start(); \
        const LoadPacked<BITS> ld{qw, scales, zeros, g_idx, in, out, wpr, gsize};               \
        dequant_body(ld, dst, out, in, mode);                                                   \
    }

DEQUANT_PACKED(2)
DEQUANT_PACKED(3)
DEQUANT_PACKED(4)
DEQUANT_PACKED(8)

// Rounds values in place to the compute dtype.
extern "C" __global__ void round_inplace(float* __restrict__ x, size_t n, int mode) {
    pdl_start();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = rnd(x[i], mode);
}

// LLM.int8(). Step 1: a column is an outlier when any of its (compute-dtype
// rounded) activations has |x| >= threshold.
extern "C" __global__ void int8_outlier_cols(const float* __restrict__ x, u8* __restrict__ flag,
                                             int n, int k, float threshold, int cd) {
    pdl_start();
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= k) return;
    u8 f = 0;
    if (threshold > 0.f)
        for (int t = 0; t < n; t++) f |= fabsf(rnd(x[(size_t)t * k + j], cd)) >= threshold;
    flag[j] = f;
}

// Step 2, one block per token: absmax over the elements below the threshold,
// int8 codes round_half_even(x * 127 / absmax) (0 in outlier columns), and
// the outlier columns' values kept apart in f32.
extern "C" __global__ void int8_quant_rows(const float* __restrict__ x, const u8* __restrict__ flag,
                                           signed char* __restrict__ xq, float* __restrict__ xo,
                                           float* __restrict__ sca, int k, float threshold, int cd) {
    pdl_start();
    __shared__ float sh[32];
    const float* xr = x + (size_t)blockIdx.x * k;
    float m = 0.f;
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        const float a = fabsf(rnd(xr[j], cd));
        if (threshold <= 0.f || a < threshold) m = fmaxf(m, a);
    }
    m = warp_max(m);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sh[warp] = m;
    __syncthreads();
    if (warp == 0) {
        float t = lane < (int)(blockDim.x >> 5) ? sh[lane] : 0.f;
        t = warp_max(t);
        if (lane == 0) sh[0] = t;
    }
    __syncthreads();
    const float a = sh[0];
    const float scale = 127.0f / a;
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        const float v = rnd(xr[j], cd);
        const bool out = flag[j] != 0;
        float q = a == 0.f ? 0.f : fminf(fmaxf(rintf(__fmul_rn(v, scale)), -127.f), 127.f);
        xq[(size_t)blockIdx.x * k + j] = out ? (signed char)0 : (signed char)q;
        xo[(size_t)blockIdx.x * k + j] = out ? v : 0.f;
    }
    if (threadIdx.x == 0) sca[blockIdx.x] = a;
}

// Step 3: y = round(round(sum_j xq*cb * (sca*scb) / 127^2) + sum_outliers xo * round(cb*scb/127)),
// for up to GEMV_MAXB tokens; warps split rows like gemv_body. Needs k % 8 == 0.
extern "C" __global__ void __launch_bounds__(256)
gemv_int8(const signed char* __restrict__ cb, const float* __restrict__ scb,
          const signed char* __restrict__ xq, const float* __restrict__ xo,
          const float* __restrict__ sca, const u8* __restrict__ flag, int any_outlier,
          float* __restrict__ y, int n, int out, int in, int ksplit, int cd) {
    pdl_start();
    constexpr int R = 2;
    const float INV_127 = 7.874015718698502e-3f;
    const float INV_127_SQ = 6.200012e-05f;  // as bitsandbytes writes it (MM_DEQUANT_CONST)
    __shared__ int redi[GEMV_WARPS][R][GEMV_MAXB];
    __shared__ float redf[GEMV_WARPS][R][GEMV_MAXB];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int groups = GEMV_WARPS / ksplit;
    const int row0 = (blockIdx.x * groups + warp / ksplit) * R;
    const int kp = warp % ksplit;
    const int chunks = in >> 3;
    int rows[R];
#pragma unroll
    for (int r = 0; r < R; r++) rows[r] = min(row0 + r, out - 1);
    int acc[R][GEMV_MAXB];
    float accf[R][GEMV_MAXB];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int b = 0; b < GEMV_MAXB; b++) {
            acc[r][b] = 0;
            accf[r][b] = 0.f;
        }
    for (int c = kp * 32 + lane; c < chunks; c += 32 * ksplit) {
        int w[R][8];
#pragma unroll
        for (int r = 0; r < R; r++) {
            const uint2 p = *(const uint2*)(cb + (size_t)rows[r] * in + (size_t)c * 8);
#pragma unroll
            for (int q = 0; q < 4; q++) {
                w[r][q] = (int)(signed char)((p.x >> (8 * q)) & 0xff);
                w[r][4 + q] = (int)(signed char)((p.y >> (8 * q)) & 0xff);
            }
        }
        const uint2 fl = any_outlier ? *(const uint2*)(flag + (size_t)c * 8) : make_uint2(0, 0);
#pragma unroll
        for (int b = 0; b < GEMV_MAXB; b++) {
            if (b < n) {
                const uint2 xp = *(const uint2*)(xq + (size_t)b * in + (size_t)c * 8);
                int xv[8];
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    xv[q] = (int)(signed char)((xp.x >> (8 * q)) & 0xff);
                    xv[4 + q] = (int)(signed char)((xp.y >> (8 * q)) & 0xff);
                }
#pragma unroll
                for (int r = 0; r < R; r++) {
                    int a = acc[r][b];
#pragma unroll
                    for (int q = 0; q < 8; q++) a += xv[q] * w[r][q];
                    acc[r][b] = a;
                }
                if (fl.x | fl.y) {
                    const float* xop = xo + (size_t)b * in + (size_t)c * 8;
#pragma unroll
                    for (int q = 0; q < 8; q++) {
                        const u32 fq = ((q < 4 ? fl.x : fl.y) >> (8 * (q & 3))) & 0xff;
                        if (fq) {
#pragma unroll
                            for (int r = 0; r < R; r++) {
                                const float wv =
                                    rnd(__fmul_rn(__fmul_rn((float)w[r][q], scb[rows[r]]), INV_127), cd);
                                accf[r][b] = fmaf(xop[q], wv, accf[r][b]);
                            }
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int b = 0; b < GEMV_MAXB; b++)
            if (b < n) {
                int v = acc[r][b];
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                const float f = warp_sum(accf[r][b]);
                if (lane == 0) {
                    redi[warp][r][b] = v;
                    redf[warp][r][b] = f;
                }
            }
    __syncthreads();
    if (kp == 0 && lane < R * n) {
        const int r = lane / n, b = lane - (lane / n) * n;
        int s = 0;
        float e = 0.f;
        for (int k = 0; k < ksplit; k++) {
            s += redi[warp + k][r][b];
            e += redf[warp + k][r][b];
        }
        const int row = row0 + r;
        if (row < out) {
            float v = rnd(__fmul_rn(__fmul_rn((float)s, __fmul_rn(sca[b], scb[row])), INV_127_SQ), cd);
            if (any_outlier) v = rnd(v + e, cd);
            y[(size_t)b * out + row] = v;
        }
    }
}
