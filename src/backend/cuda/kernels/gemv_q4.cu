// 4-bit GEMV for decode: each lane takes 32 consecutive weights of a row
// (one 16-byte load) per round, so a warp streams 512 contiguous bytes per
// row and round. The 32 weights share one scale s and zero z (bitsandbytes
// blocks and packed groups of at least 32 columns), so the lane sums
// x·code over them and adds s * (sum - z * sum(x)) once. The 16 code values
// (the NF4/FP4 table, or 0..15 for packed integers) sit in shared memory,
// where 32 lanes read them without bank conflicts; lanes look up the codes
// of a whole byte at once in a table of code pairs (Q4Pairs). Weight
// values are not rounded to the weight dtype one by one as `gemv_bnb4` does:
// the products stay in f32, a rounding difference within the dtype's bound;
// single NF4/FP4 rows of an f16 or bf16 compute dtype take f16 products
// summed in f16 over 32 weights instead (the `h1` and `norm3_h` kernels).
// Single-row launches need q4_pairs_at<H>(in) + Q4_PAIR_FLOATS floats of
// dynamic shared memory (Q4_PAIR_FLOATS_H with H), batch launches
// Q4_PAIR_FLOATS (the tables), plus NB * q4_pairs_at<false>(in) when they
// normalize their rows (Q4_BATCH_ROWS_AT; q4_batch_floats in matmul.rs).

// bitsandbytes NF4/FP4: high nibble first; absmax per block of 2^bs_log2 >= 32
// flattened weights, double-quantized when `codes` is set. Offsets are 32-bit
// (the host takes this kernel only for fewer than 2^32 weights): fewer
// address instructions per round than 64-bit ones; decode measured 0.7%
// (NF4) and 1.1% (packed) faster (bench/RESULTS.md, fifteenth session).
struct Q4Bnb {
    const uint4* __restrict__ w;
    const float* __restrict__ absmax;
    const u8* __restrict__ codes;
    const float* __restrict__ code2;
    float offset;
    int in, bs_log2, nbs_log2;
    static constexpr bool HI_FIRST = true;
    static constexpr bool HAS_ZERO = false;
    // The 16 bytes of chunk c (32 weights) of row `row`.
    __device__ __forceinline__ const uint4* chunk(int row, int c) const {
        return w + ((u32)row * (u32)(in >> 5) + (u32)c);
    }
    __device__ __forceinline__ uint4 load(int row, int c) const { return *chunk(row, c); }
    // The scale words of row `row`, chunk c, as loaded: the absmax, or with
    // double quantization the block's code (its bits) and nested absmax;
    // `finish_scale` turns them into the scale once they have arrived.
    __device__ __forceinline__ void load_scale(int row, int c, float& s, float& z) const {
        const u32 b = ((u32)row * (u32)in + (u32)c * 32u) >> bs_log2;
        if (codes) {
            s = __uint_as_float(codes[b]);
            z = absmax[b >> nbs_log2];
        } else {
            s = absmax[b];
            z = 0.f;
        }
    }
    __device__ __forceinline__ void finish_scale(float& s, float& z) const {
        if (codes) {
            s = __fadd_rn(__fmul_rn(code2[__float_as_uint(s)], z), offset);
            z = 0.f;
        }
    }
};

// Group-wise packed 4-bit integers without g_idx: LSB first, `wpr` words per
// row, f16 scale and integer zero per (group, row) stored [groups, out];
// 32-bit offsets as in Q4Bnb.
struct Q4Packed {
    const u32* __restrict__ w;
    const u16* __restrict__ scales;
    const u16* __restrict__ zeros;
    int in, out, wpr, gsize;
    static constexpr bool HI_FIRST = false;
    static constexpr bool HAS_ZERO = true;
    __device__ __forceinline__ const uint4* chunk(int row, int c) const {
        return (const uint4*)w + (((u32)row * (u32)wpr >> 2) + (u32)c);
    }
    __device__ __forceinline__ uint4 load(int row, int c) const { return *chunk(row, c); }
    // The f16 scale's and the zero's bits as loaded; `finish_scale`
    // converts them once they have arrived.
    __device__ __forceinline__ void load_scale(int row, int c, float& s, float& z) const {
        const u32 at = (u32)((c * 32) / gsize) * (u32)out + (u32)row;
        s = __uint_as_float(scales[at]);
        z = __uint_as_float(zeros[at]);
    }
    __device__ __forceinline__ void finish_scale(float& s, float& z) const {
        s = h2f((u16)__float_as_uint(s));
        z = (float)__float_as_uint(z);
    }
};

// Where a single-row launch's code-pair tables start in its dynamic shared
// memory, in floats: after the staged row (see q4_staged_floats in
// matmul.rs), 8-byte aligned. Half-precision launches (H) stage the row as
// Q4_XH_WORDS words per 32 values, then a scale per 32 values (stage_xh).
#define Q4_XH_WORDS 20

template <bool H>
__device__ __forceinline__ int q4_pairs_at(int in) {
    return H ? (Q4_XH_WORDS + 1) * (in >> 5) : (in + in / 32 + 1) & ~1;
}

// Where a batch launch's staged rows start in its dynamic shared memory, in
// floats: after its code-pair tables, row b at b * q4_pairs_at<false>(in)
// from there, each with one pad word per 32 values as stage_x<true> writes
// them.
#define Q4_BATCH_ROWS_AT Q4_PAIR_FLOATS

// Floats of the code-pair tables: 256 entries, each holding its pair in 16
// slots of two floats (128 bytes), or with H in 32 slots of one f16 pair in
// the first 128 bytes of a 256-byte entry, so that one byte permute builds
// a lookup's offset (q4_pair_h). Q4_PAIR_FLOATS and Q4_PAIR_FLOATS_H in
// matmul.rs size a launch's shared memory with them.
#define Q4_PAIR_FLOATS 8192
#define Q4_PAIR_FLOATS_H 16384

// Code-pair tables of a single-row launch: entry e of a table holds the
// codes of byte e's first and second weight (E: float2, or with H two f16
// values in a word, the first in the low half), in S slots (16, or 32 with
// H; entry e, slot c at S e + c, or 2 S e + c with H) that the distinct
// tables of `luts` (the three 16-entry tables q4_tables fills) share: S,
// S / 2 or S / 3 slots each for 1, 2 or 3 distinct tables, lane L reading
// slot L % that count of its table's. With one table no two lanes that the
// hardware serves together read the same bank, whatever their bytes.
// `off[i]` is the byte offset of this lane's slot of the table of lut i
// within an entry (below 128).
struct Q4Pairs {
    const u8* base;
    u32 off[3];
    __device__ __forceinline__ u32 lane_off(const float* luts, const float* lut) const {
        const int i = (int)(lut - luts) >> 4;
        return i == 0 ? off[0] : (i == 1 ? off[1] : off[2]);
    }
};

// x / (S / ntab) for x < 64 and S = 16 (S = 32 with H): the slots of
// `ntab` tables, without an integer division.
template <bool H>
__device__ __forceinline__ int per_slots(int x, int ntab) {
    if (H) return ntab == 1 ? x >> 5 : (ntab == 2 ? x >> 4 : (x * 13) >> 7);
    return ntab == 1 ? x >> 4 : (ntab == 2 ? x >> 3 : (x * 13) >> 6);
}

// The entry type of the code-pair tables: float2, or with H a word of two
// f16 values.
template <bool H>
struct Q4PairEntry {
    typedef float2 T;
};
template <>
struct Q4PairEntry<true> {
    typedef u32 T;
};

// Fills the pair tables in `mem` from `luts`; callers sync before reading.
// Each warp finds which tables are the same on its own; thread t of the 256
// fills slot t % S of entries (256 / S) i + t / S (i < S), so its slot and
// table stay fixed.
template <bool HI_FIRST, bool H>
__device__ __forceinline__ Q4Pairs q4_pair_tables(const float* luts, float* mem) {
    static_assert(GEMV_WARPS * 32 == 256, "the pair tables are filled by 256 threads");
    typedef typename Q4PairEntry<H>::T E;
    constexpr int S = H ? 32 : 16;
    const int l = threadIdx.x & 15;
    const u32 a = __float_as_uint(luts[l]), b = __float_as_uint(luts[16 + l]);
    const u32 c = __float_as_uint(luts[32 + l]);
    const bool s10 = __all_sync(0xffffffffu, a == b), s20 = __all_sync(0xffffffffu, c == a);
    const bool s21 = __all_sync(0xffffffffu, c == b);
    const int id1 = s10 ? 0 : 1, id2 = s20 ? 0 : (s21 ? id1 : id1 + 1);
    const int ntab = max(id1, id2) + 1;
    const int k = S / ntab;
    const int slot_here = threadIdx.x % S;
    const int ti = min(per_slots<H>(slot_here, ntab), ntab - 1);
    const float* lut = ti == 0 ? luts : (ti == id1 ? luts + 16 : luts + 32);
    E* t = (E*)mem;
#pragma unroll
    for (int i = 0; i < S; i++) {
        const int e = threadIdx.x / S + (256 / S) * i;
        const float first = lut[e >> 4], second = lut[e & 15];
        if constexpr (H)
            t[2 * S * e + slot_here] = HI_FIRST ? pack_h2(first, second) : pack_h2(second, first);
        else
            t[S * e + slot_here] = HI_FIRST ? make_float2(first, second) : make_float2(second, first);
    }
    const int lane = threadIdx.x & 31, slot = lane - k * per_slots<H>(lane, ntab);
    Q4Pairs p;
    p.base = (const u8*)t;
    p.off[0] = (u32)(slot * sizeof(E));
    p.off[1] = (u32)((id1 * k + slot) * sizeof(E));
    p.off[2] = (u32)((id2 * k + slot) * sizeof(E));
    return p;
}

// The f16 code pair of byte b of `word` from the lane's slot at byte
// offset `off` (below 128) of the 256-byte entries at `base`: one byte
// permute places the byte above the offset, i.e. entry byte * 256 plus the
// slot, and the load adds the block-wide base (3 instructions per byte
// instead of 4: NF4 decode with an f16 compute dtype 2% faster,
// bench/RESULTS.md, twentieth session).
__device__ __forceinline__ u32 q4_pair_h(const u8* base, u32 off, u32 word, int b) {
    return *(const u32*)(base + __byte_perm(word, off, 0x7604 | (b << 4)));
}

// The f32 code pair of byte b of `word` from this lane's slot `tab` of
// 128-byte entries.
__device__ __forceinline__ float2 q4_pair_f32(const float2* tab, u32 word, int b) {
    return tab[__byte_perm(word, 0, 0x4440 + b) << 4];
}

// Stages the single input row `x` of a half-precision launch (in % 32 == 0)
// in shared memory: RMS-normalized by `nw` when set and rounded to the
// compute dtype `cd` as stage_x does, then each run of 32 values scaled by
// a power of two that brings its largest magnitude into [1, 2) and stored
// as f16 (Q4_XH_WORDS words per run: 16 of values, 4 of padding, so that
// 16-byte reads of consecutive runs by consecutive lanes meet no bank
// conflict); `scale` gets the power of two that undoes each run's. The
// scale keeps f16 products and their sums over a run far from overflow,
// whatever the activations' range, and their relative precision that of
// f16.
__device__ __forceinline__ void stage_xh(const float* __restrict__ x, const float* __restrict__ nw,
                                         float eps, u32* xh, float* scale, int in, int cd) {
    __shared__ float sh[33];
    const float4* x4 = (const float4*)x;
    const float4* n4 = (const float4*)nw;
    const int n = in >> 2, bd = blockDim.x, tid = threadIdx.x;
    // Rows of at most 16 values per thread are loaded once, before the sum.
    const bool held = n <= 4 * bd;
    float4 v[4], g[4];
    auto load = [&](int i0) {
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int i = i0 + u * bd + tid;
            if (i < n) {
                v[u] = x4[i];
                if (nw) g[u] = n4[i];
            }
        }
    };
    float inv = 1.f;
    if (held) load(0);
    if (nw) {
        float ss = 0.f;
        if (held) {
#pragma unroll
            for (int u = 0; u < 4; u++)
                if (u * bd + tid < n) ss = sum_squares4(v[u], ss);
        } else {
            for (int i = tid; i < n; i += bd) ss = sum_squares4(x4[i], ss);
        }
        inv = 1.0f / sqrtf(block_sum(ss, sh) / (float)in + eps);
    }
    for (int i0 = 0; i0 < n; i0 += 4 * bd) {
        if (!held) load(i0);
#pragma unroll
        for (int u = 0; u < 4; u++) {
            if (i0 + u * bd >= n) break;
            const int i = i0 + u * bd + tid;
            float a[4] = {0.f, 0.f, 0.f, 0.f};
            if (i < n) {
                const float xv[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
                const float gv[4] = {g[u].x, g[u].y, g[u].z, g[u].w};
#pragma unroll
                for (int e = 0; e < 4; e++) a[e] = rnd(nw ? (xv[e] * inv) * gv[e] : xv[e], cd);
            }
            // The 8 threads of a run (consecutive lanes) meet by shuffles.
            float m = fmaxf(fmaxf(fabsf(a[0]), fabsf(a[1])), fmaxf(fabsf(a[2]), fabsf(a[3])));
#pragma unroll
            for (int o = 1; o < 8; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
            // 2^-e with 2^e <= m < 2^(e+1); none for zero or subnormal runs.
            const u32 pow2 = __float_as_uint(m) & 0x7f800000u;
            const float up = pow2 ? __uint_as_float(0x7f000000u - pow2) : 1.f;
            if (i < n) {
                u32* d = xh + (i >> 3) * Q4_XH_WORDS + 2 * (i & 7);
                d[0] = pack_h2(a[0] * up, a[1] * up);
                d[1] = pack_h2(a[2] * up, a[3] * up);
                if ((i & 7) == 0) scale[i >> 3] = pow2 ? __uint_as_float(pow2) : 1.f;
            }
        }
    }
    __syncthreads();
}

// Eight consecutive values of a row staged by stage_x<true> (4-byte
// aligned only: the pad words shift each run of 32).
__device__ __forceinline__ void staged8(const float* xp, float4& x0, float4& x1) {
    x0 = make_float4(xp[0], xp[1], xp[2], xp[3]);
    x1 = make_float4(xp[4], xp[5], xp[6], xp[7]);
}

// The f32 code pairs of word j of each row's 16 bytes (`wv`), rows of `qb`
// (odd rows of a PAIR) from `tab_b`: wf[r] holds row r's 8 codes in order.
template <int R, bool PAIR>
__device__ __forceinline__ void q4_decode_word(const uint4 (&wv)[R], int j, const float2* tab_a,
                                               const float2* tab_b, float (&wf)[R][8]) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        const u32 word = j == 0 ? wv[r].x : j == 1 ? wv[r].y : j == 2 ? wv[r].z : wv[r].w;
        const float2* tab = (PAIR && (r & 1)) ? tab_b : tab_a;
#pragma unroll
        for (int b = 0; b < 4; b++) {
            const float2 pr = q4_pair_f32(tab, word, b);
            wf[r][2 * b] = pr.x;
            wf[r][2 * b + 1] = pr.y;
        }
    }
}

// One logical block of a 4-bit launch: its matrices (PAIR: gate, up) and
// code tables, where it writes `out` rows, and its index among the blocks
// of its matrix.
template <class Q>
struct Q4Block {
    Q qa, qb;
    const float *lut_a, *lut_b;
    float* y;
    int out, blk;
};

// Warps own R rows (PAIR: row o of `qa` and of `qb`), `ksplit` warps share a
// row group along the input dimension as in `gemv_body`; NB is the largest
// batch the instance handles. The grid may be smaller than the `nblocks`
// logical blocks (`at(b)` describes block b): each block then takes blocks
// blockIdx.x, + gridDim.x, ... in turn, so that a launch needs no second
// wave of blocks that would wait for their first loads without overlapping
// the previous kernel. Single-row instances (NB = 1) stage their input once
// per block, RMS-normalized by `nw` when it is set.
//
// A byte (two weights) is decoded with one shared-memory load from a table
// of the 256 code pairs (Q4Pairs, built from `luts`, the 48 floats
// q4_tables fills). Single rows sum x·code over a lane's 32 weights and
// scale the sum once; batches scale each weight once (code * s, or for
// packed integers code * s - z * s, which is exact) and multiply it into
// every row, reading x from global memory (L1), or with `nw` from the
// normalized rows staged in shared memory. With H (single rows whose
// compute dtype is f16 or bf16) the pairs and the staged row are f16
// (stage_xh): a lane's 32 products of a round are summed in f16 pairs, then
// in f32 with the run's scale.
template <class Q, int R, bool PAIR, int NB, bool H, class At>
__device__ __forceinline__ void gemv_q4_body(At at, int nblocks, const float* __restrict__ luts,
                                             const float* __restrict__ x, int n, int in,
                                             int ksplit, int cd, int acc,
                                             const float* __restrict__ nw, float eps) {
    static_assert(!PAIR || R % 2 == 0, "a pair GEMV holds rows of both matrices");
    static_assert(!H || (NB == 1 && !Q::HAS_ZERO),
                  "half-precision rounds are for single rows of codes without zeros");
    trace_event(TRACE_ENTER);
    const int chunks = in >> 5;
    const int step = 32 * ksplit;
    extern __shared__ float xsm[];
    const u32* xh = (const u32*)xsm;
    const float* xscale = xsm + Q4_XH_WORDS * chunks;
    const int lane = threadIdx.x & 31, kp = (threadIdx.x >> 5) % ksplit;
    const int c0 = kp * 32 + lane;
    // Round c of logical block `blk`'s rows `rows`: the weights and the
    // scale words (finished when the round is computed, so that no load
    // holds the thread up before then).
    auto load_round = [&](const Q4Block<Q>& blk, const int (&rows)[R], int c, uint4 (&w)[R],
                          float (&sc)[R], float (&zp)[R]) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            const Q& q = (PAIR && (r & 1)) ? blk.qb : blk.qa;
            w[r] = q.load(rows[r], c);
            q.load_scale(rows[r], c, sc[r], zp[r]);
        }
    };
    Q4Block<Q> L = at(blockIdx.x);
    GemvRows<R, PAIR> g(L.out, ksplit, L.blk);
    uint4 wv[R];
    float s[R], z[R];
    // The first weights are loaded before waiting for the preceding kernel
    // (weights never depend on it).
    if (c0 < chunks) load_round(L, g.rows, c0, wv, s, z);
    // Declared apart from the call: initialized in the declaration,
    // gemv_q4packed_norm3 compiles with its registers renamed, away from
    // the SASS measured on the GPU (bench/RESULTS.md, twenty-second session).
    Q4Pairs pairs{};
    pairs = q4_pair_tables<Q::HI_FIRST, H>(luts, NB == 1 ? xsm + q4_pairs_at<H>(in) : xsm);
    // A block releases the next kernel when it starts its last logical
    // block: blocks that loop hold it back until then, so that its blocks'
    // prologues (weight loads, code tables) do not compete with this
    // kernel's earlier rounds (NF4 decode 1.4-1.6% faster than releasing at
    // the start, packed even: bench/RESULTS.md, nineteenth session).
    pdl_wait();
    if (blockIdx.x + gridDim.x >= nblocks) pdl_release();
    // The second-level code tables (q4_code2_tables) have arrived; the
    // barrier in stage_x, or this one, publishes them and the code-pair
    // tables.
    cp_async_wait_all();
    float yold = gemv_y_before<R, PAIR>(L.y, n, L.out, g.row0, ksplit, acc);
    // Single rows: the block stages x (normalized by `nw` when set, rounded
    // to `cd`) with one pad word per 32 values, or with H in f16 (stage_xh).
    // Batches stage their rows the same way when `nw` is set (the norm needs
    // each whole row) and read x from global memory otherwise.
    const int xrow = q4_pairs_at<false>(in);
    float* xb = xsm + Q4_BATCH_ROWS_AT;
    if (H)
        stage_xh(x, nw, eps, (u32*)xsm, (float*)xscale, in, cd);
    else if (NB == 1)
        stage_x<true>(x, nw, eps, xsm, in, cd);
    else if (nw)
        for (int bb = 0; bb < n; bb++) stage_x<true>(x + (size_t)bb * in, nw, eps, xb + bb * xrow, in, cd);
    else
        __syncthreads();
    for (int b = blockIdx.x; b < nblocks;) {
        const int row0 = g.row0;
        const int nb = b + gridDim.x;
        const u32 off_a = pairs.lane_off(luts, L.lut_a);
        const u32 off_b = pairs.lane_off(luts, L.lut_b);
        // f32 pairs: this lane's slots as pointers (q4_pair_f32).
        const float2* tab_a = (const float2*)(pairs.base + off_a);
        const float2* tab_b = (const float2*)(pairs.base + off_b);
        Q4Block<Q> Ln = L;
        GemvRows<R, PAIR> gn = g;
        // Whether the next logical block's first round is already loading
        // (issued during this block's last round).
        bool next_loading = false;
        float accv[R][NB];
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int bb = 0; bb < NB; bb++) accv[r][bb] = 0.f;
        for (int c = c0; c < chunks; c += step) {
            // The next round's loads (of this logical block or the next
            // one) go out before this round's arithmetic.
            const bool more = c + step < chunks;
            uint4 wn[R];
            float sn[R], zn[R];
            if (more) {
                load_round(L, g.rows, c + step, wn, sn, zn);
            } else if (nb < nblocks) {
                Ln = at(nb);
                gn = GemvRows<R, PAIR>(Ln.out, ksplit, Ln.blk);
                load_round(Ln, gn.rows, c0, wn, sn, zn);
                next_loading = true;
            }
            if constexpr (H) {
                // Byte b of word j holds the weights of columns 8 j + 2 b and
                // + 1, whose f16 values are half word b of x's 16 bytes.
                const uint4* xr = (const uint4*)(xh + c * Q4_XH_WORDS);
                u32 hsum[R];
#pragma unroll
                for (int r = 0; r < R; r++) hsum[r] = 0u;
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const uint4 xv = xr[j];
                    const u32 xw[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        const u32 word = j == 0 ? wv[r].x : j == 1 ? wv[r].y : j == 2 ? wv[r].z : wv[r].w;
                        const u32 off = (PAIR && (r & 1)) ? off_b : off_a;
#pragma unroll
                        for (int b = 0; b < 4; b++)
                            hsum[r] = hfma2(q4_pair_h(pairs.base, off, word, b), xw[b], hsum[r]);
                    }
                }
                const float run = xscale[c];
#pragma unroll
                for (int r = 0; r < R; r++) {
                    float sr = s[r], zr = z[r];
                    ((PAIR && (r & 1)) ? L.qb : L.qa).finish_scale(sr, zr);
                    accv[r][0] = fmaf(sr, h2_sum(hsum[r]) * run, accv[r][0]);
                }
            } else if constexpr (NB == 1) {
                float dot[R][NB], xs[NB];
#pragma unroll
                for (int bb = 0; bb < NB; bb++) {
                    xs[bb] = 0.f;
#pragma unroll
                    for (int r = 0; r < R; r++) dot[r][bb] = 0.f;
                }
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    float wf[R][8];
                    q4_decode_word<R, PAIR>(wv, j, tab_a, tab_b, wf);
#pragma unroll
                    for (int bb = 0; bb < NB; bb++) {
                        if (bb < n) {
                            float4 x0, x1;
                            staged8(xsm + c * 33 + 8 * j, x0, x1);
                            if (Q::HAS_ZERO)
                                xs[bb] += ((x0.x + x0.y) + (x0.z + x0.w)) + ((x1.x + x1.y) + (x1.z + x1.w));
#pragma unroll
                            for (int r = 0; r < R; r++) dot[r][bb] = dot8(wf[r], x0, x1, dot[r][bb]);
                        }
                    }
                }
#pragma unroll
                for (int r = 0; r < R; r++) {
                    float sr = s[r], zr = z[r];
                    ((PAIR && (r & 1)) ? L.qb : L.qa).finish_scale(sr, zr);
#pragma unroll
                    for (int bb = 0; bb < NB; bb++)
                        if (bb < n) {
                            const float d = Q::HAS_ZERO ? fmaf(-zr, xs[bb], dot[r][bb]) : dot[r][bb];
                            accv[r][bb] = fmaf(sr, d, accv[r][bb]);
                        }
                }
            } else {
                // Batches: each weight pair is decoded once and scaled once
                // (w = code * s, or (code - z) * s as code * s - z * s,
                // exact for packed integers), then multiplied into every
                // row of the batch.
                float sc[R], zs[R];
#pragma unroll
                for (int r = 0; r < R; r++) {
                    float sr = s[r], zr = z[r];
                    ((PAIR && (r & 1)) ? L.qb : L.qa).finish_scale(sr, zr);
                    sc[r] = sr;
                    zs[r] = -(zr * sr);
                }
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    float wf[R][8];
                    q4_decode_word<R, PAIR>(wv, j, tab_a, tab_b, wf);
#pragma unroll
                    for (int r = 0; r < R; r++)
#pragma unroll
                        for (int k = 0; k < 8; k++)
                            wf[r][k] = Q::HAS_ZERO ? fmaf(wf[r][k], sc[r], zs[r]) : wf[r][k] * sc[r];
#pragma unroll
                    for (int bb = 0; bb < NB; bb++) {
                        if (bb < n) {
                            float4 x0, x1;
                            if (nw)
                                staged8(xb + bb * xrow + c * 33 + 8 * j, x0, x1);
                            else
                                load_x8(x + (size_t)bb * in + (size_t)c * 32 + 8 * j, cd, x0, x1);
#pragma unroll
                            for (int r = 0; r < R; r++) accv[r][bb] = dot8(wf[r], x0, x1, accv[r][bb]);
                        }
                    }
                }
            }
            if (more || next_loading)
#pragma unroll
                for (int r = 0; r < R; r++) {
                    wv[r] = wn[r];
                    s[r] = sn[r];
                    z[r] = zn[r];
                }
        }
        gemv_finish<R, PAIR, NB>(accv, L.y, n, L.out, row0, ksplit, cd, acc, yold);
        b = nb;
        if (b >= nblocks) {
            trace_event(TRACE_DONE);
            break;
        }
        // The next logical block reuses gemv_finish's shared partial sums.
        __syncthreads();
        if (!next_loading) {
            Ln = at(b);
            gn = GemvRows<R, PAIR>(Ln.out, ksplit, Ln.blk);
            if (c0 < chunks) load_round(Ln, gn.rows, c0, wv, s, z);
        }
        L = Ln;
        g = gn;
        if (b + gridDim.x >= nblocks) pdl_release();
        yold = gemv_y_before<R, PAIR>(L.y, n, L.out, g.row0, ksplit, acc);
    }
}

// Starts copying the second-level code tables of a launch's
// double-quantized matrices (256 floats each; null: none) to shared memory
// `c2s` (16-byte aligned), 256 floats apart, so that a scale waits for one
// global load (its code) instead of two in a row; gemv_q4_body waits for
// the copies after its programmatic-launch wait.
__device__ __forceinline__ void q4_code2_tables(float* c2s, const float* a, const float* b,
                                                const float* c) {
    const int t = threadIdx.x, i = t >> 6, k = 4 * (t & 63);
    const float* src = i == 0 ? a : (i == 1 ? b : (i == 2 ? c : nullptr));
    if (src) cp_async16(c2s + 256 * i + k, src + k);
}

// Copies the code tables of a launch's matrices (16 floats each, from the
// launch's parameters; 0..15 for packed integers, a null `code`) to shared
// memory.
__device__ __forceinline__ void q4_tables(float* lut, const float* c0, const float* c1,
                                          const float* c2) {
    const int t = threadIdx.x;
    if (t < 48) {
        const float* c = t < 16 ? c0 : (t < 32 ? c1 : c2);
        lut[t] = c ? c[t & 15] : (float)(t & 15);
    }
    __syncthreads();
}

// One 4-bit matrix as a kernel argument, laid out as the structs
// `Q4BnbArgs` and `Q4PackedArgs` in matmul.rs: bitsandbytes arguments carry
// their 16 code values, so that a block reads its code table from the
// launch's parameters rather than waiting on a global load.
struct Q4BnbArgs {
    const u32* w;
    const float* absmax;
    const u8* codes;
    const float* code2;
    float code16[16];
    float offset;
    int bs_log2, nbs_log2;
};

struct Q4PackedArgs {
    const u32* w;
    const u16* scales;
    const u16* zeros;
    int wpr, gsize;
};

// The GEMV view of bitsandbytes argument `a` whose second-level code table
// is at `c2s` in shared memory.
__device__ __forceinline__ Q4Bnb q4_bnb(const Q4BnbArgs& a, const float* c2s, int in) {
    return Q4Bnb{(const uint4*)a.w, a.absmax, a.codes, c2s, a.offset, in, a.bs_log2, a.nbs_log2};
}

// The prologue of a kernel taking one bitsandbytes matrix `a` (Q4BnbArgs)
// with `in` inputs: its code tables in shared memory (`lut`, `c2s`) and its
// GEMV view `q`; with two (`a`, `b2`), `qa` and `qb`.
#define Q4BNB_SETUP                                                                                \
    __shared__ float lut[48];                                                                      \
    __shared__ __align__(16) float c2s[256];                                                       \
    q4_code2_tables(c2s, a.codes ? a.code2 : nullptr, nullptr, nullptr);                           \
    q4_tables(lut, a.code16, a.code16, a.code16);                                                  \
    const Q4Bnb q = q4_bnb(a, c2s, in)
#define Q4BNB_PAIR_SETUP                                                                           \
    __shared__ float lut[48];                                                                      \
    __shared__ __align__(16) float c2s[512];                                                       \
    q4_code2_tables(c2s, a.codes ? a.code2 : nullptr, b2.codes ? b2.code2 : nullptr, nullptr);     \
    q4_tables(lut, a.code16, b2.code16, b2.code16);                                                \
    const Q4Bnb qa = q4_bnb(a, c2s, in);                                                           \
    const Q4Bnb qb = q4_bnb(b2, c2s + 256, in)

// Logical blocks of a launch with `out` rows: `rows_per_group` output rows
// per warp group, GEMV_WARPS / ksplit groups per block.
__device__ __forceinline__ int q4_blocks(int out, int rows_per_group, int ksplit) {
    const int per_block = rows_per_group * (GEMV_WARPS / ksplit);
    return (out + per_block - 1) / per_block;
}

// Output rows of each matrix per warp in the pair kernels: two for a single
// row (x is read once for four weight rows, and each warp has four
// independent sums; compiled for two blocks per SM) and for batches of up
// to four rows (each x value loaded serves four weight rows), one for
// batches of up to eight. `WIDE_PAIR_SINGLE`, `WIDE_PAIR_BATCH4` and
// `WIDE_PAIR` in matmul.rs.
#define Q4_PAIR_ROWS(NB) ((NB) <= 4 ? 2 : 1)
#define Q4_PAIR_BOUNDS(NB) __launch_bounds__(256, (NB) == 1 ? 2 : 1)

// bitsandbytes kernels take their matrices as Q4BnbArgs, the pair kernels an
// optional RMS-norm weight `nw`. Instances: b1 single rows, b4 and b8
// batches of up to four and eight rows, h1 single rows in half precision (H
// in gemv_q4_body).
#define GEMV_Q4BNB(TAG, NB, H)                                                                     \
    extern "C" __global__ void __launch_bounds__(256) gemv_q4bnb_##TAG(                            \
        const __grid_constant__ Q4BnbArgs a, const float* __restrict__ x, float* __restrict__ y,   \
        int n, int out, int in, int ksplit, int acc, int cd) {                                     \
        Q4BNB_SETUP;                                                                               \
        const auto at = [&](int b) { return Q4Block<Q4Bnb>{q, q, lut, lut, y, out, b}; };          \
        gemv_q4_body<Q4Bnb, 4, false, NB, H>(at, q4_blocks(out, 4, ksplit), lut, x, n, in, ksplit, \
                                          cd, acc, nullptr, 0.f);                                  \
    }                                                                                              \
    extern "C" __global__ void Q4_PAIR_BOUNDS(NB) gemv_q4bnb_##TAG##_pair(                         \
        const __grid_constant__ Q4BnbArgs a, const __grid_constant__ Q4BnbArgs b2,                 \
        const float* __restrict__ x, float* __restrict__ y, int n, int out, int in, int ksplit,    \
        int acc, int cd, const float* __restrict__ nw, float eps) {                                \
        Q4BNB_PAIR_SETUP;                                                                          \
        const auto at = [&](int b) { return Q4Block<Q4Bnb>{qa, qb, lut, lut + 16, y, out, b}; };   \
        gemv_q4_body<Q4Bnb, 2 * Q4_PAIR_ROWS(NB), true, NB, H>(at, q4_blocks(out, Q4_PAIR_ROWS(NB), \
                                                            ksplit), lut, x, n, in, ksplit, cd, 0, \
                                                            nw, eps);                              \
    }

// Packed kernels take the leading arguments of gemv_packed4, the pair
// kernels an optional RMS-norm weight `nw`.
#define GEMV_Q4PACKED(NB)                                                                          \
    extern "C" __global__ void __launch_bounds__(256) gemv_q4packed_b##NB(                         \
        const u32* __restrict__ qw, const u16* __restrict__ scales, const u16* __restrict__ zeros, \
        const u32* __restrict__ g_idx, int wpr, int gsize, const float* __restrict__ x,            \
        float* __restrict__ y, int n, int out, int in, int ksplit, int acc) {                      \
        __shared__ float lut[48];                                                                  \
        q4_tables(lut, nullptr, nullptr, nullptr);                                                 \
        const Q4Packed q{qw, scales, zeros, in, out, wpr, gsize};                                  \
        const auto at = [&](int b) { return Q4Block<Q4Packed>{q, q, lut, lut, y, out, b}; };       \
        gemv_q4_body<Q4Packed, 4, false, NB, false>(at, q4_blocks(out, 4, ksplit), lut, x, n, in,  \
                                             ksplit, 0, acc, nullptr, 0.f);                        \
    }                                                                                              \
    extern "C" __global__ void Q4_PAIR_BOUNDS(NB) gemv_q4packed_b##NB##_pair(                      \
        const u32* __restrict__ qw, const u16* __restrict__ scales, const u16* __restrict__ zeros, \
        const u32* __restrict__ g_idx, int wpr, int gsize, const u32* __restrict__ qw2,            \
        const u16* __restrict__ scales2, const u16* __restrict__ zeros2,                           \
        const u32* __restrict__ g_idx2, int wpr2, int gsize2, const float* __restrict__ x,         \
        float* __restrict__ y, int n, int out, int in, int ksplit, int acc,                        \
        const float* __restrict__ nw, float eps) {                                                 \
        __shared__ float lut[48];                                                                  \
        q4_tables(lut, nullptr, nullptr, nullptr);                                                 \
        const Q4Packed qa{qw, scales, zeros, in, out, wpr, gsize};                                 \
        const Q4Packed qb{qw2, scales2, zeros2, in, out, wpr2, gsize2};                            \
        const auto at = [&](int b) { return Q4Block<Q4Packed>{qa, qb, lut, lut, y, out, b}; };     \
        gemv_q4_body<Q4Packed, 2 * Q4_PAIR_ROWS(NB), true, NB, false>(                             \
            at, q4_blocks(out, Q4_PAIR_ROWS(NB), ksplit), lut, x, n, in, ksplit, 0, 0, nw, eps);   \
    }

GEMV_Q4BNB(b1, 1, false)
GEMV_Q4BNB(b4, 4, false)
GEMV_Q4BNB(b8, 8, false)
GEMV_Q4BNB(h1, 1, true)
GEMV_Q4PACKED(1)
GEMV_Q4PACKED(4)
GEMV_Q4PACKED(8)

// The Q, K and V projections of one RMS-normalized input row in one launch;
// logical block b belongs to the matrix `multi_pick` names;
// gemv_q4bnb_norm3_h takes the half-precision rounds (H in gemv_q4_body).
template <bool H>
__device__ __forceinline__ void q4bnb_norm3(const Q4BnbArgs& a0, const Q4BnbArgs& a1,
                                            const Q4BnbArgs& a2, const GemvMulti& m,
                                            const float* __restrict__ x,
                                            const float* __restrict__ nw, float eps, int in,
                                            int ksplit, int cd) {
    __shared__ float lut[48];
    __shared__ __align__(16) float c2s[768];
    q4_code2_tables(c2s, a0.codes ? a0.code2 : nullptr, a1.codes ? a1.code2 : nullptr,
                    a2.codes ? a2.code2 : nullptr);
    q4_tables(lut, a0.code16, a1.code16, a2.code16);
    const auto at = [&](int b) {
        int blk, out;
        float* y;
        const int i = multi_pick(m, b, blk, y, out);
        const Q4Bnb q = q4_bnb(i == 0 ? a0 : (i == 1 ? a1 : a2), c2s + 256 * i, in);
        return Q4Block<Q4Bnb>{q, q, lut + 16 * i, lut + 16 * i, y, out, blk};
    };
    gemv_q4_body<Q4Bnb, 4, false, 1, H>(at, m.blocks[0] + m.blocks[1] + m.blocks[2], lut, x, 1,
                                        in, ksplit, cd, 0, nw, eps);
}

#define GEMV_Q4BNB_NORM3(SUFFIX, H)                                                                \
    extern "C" __global__ void __launch_bounds__(256, 2) gemv_q4bnb_norm3##SUFFIX(                 \
        const __grid_constant__ Q4BnbArgs a0, const __grid_constant__ Q4BnbArgs a1,                \
        const __grid_constant__ Q4BnbArgs a2, GemvMulti m, const float* __restrict__ x,            \
        const float* __restrict__ nw, float eps, int in, int ksplit, int cd) {                     \
        q4bnb_norm3<H>(a0, a1, a2, m, x, nw, eps, in, ksplit, cd);                                 \
    }

GEMV_Q4BNB_NORM3(, false)
GEMV_Q4BNB_NORM3(_h, true)

extern "C" __global__ void __launch_bounds__(256, 2)
gemv_q4packed_norm3(Q4PackedArgs a0, Q4PackedArgs a1, Q4PackedArgs a2, GemvMulti m,
                    const float* __restrict__ x, const float* __restrict__ nw, float eps, int in,
                    int ksplit) {
    __shared__ float lut[48];
    q4_tables(lut, nullptr, nullptr, nullptr);
    const auto at = [&](int b) {
        int blk, out;
        float* y;
        const int i = multi_pick(m, b, blk, y, out);
        const Q4PackedArgs a = i == 0 ? a0 : (i == 1 ? a1 : a2);
        const Q4Packed q{a.w, a.scales, a.zeros, in, out, a.wpr, a.gsize};
        return Q4Block<Q4Packed>{q, q, lut, lut, y, out, blk};
    };
    gemv_q4_body<Q4Packed, 4, false, 1, false>(at, m.blocks[0] + m.blocks[1] + m.blocks[2], lut, x,
                                               1, in, ksplit, 0, 0, nw, eps);
}
