// Streamed single-row NF4/FP4 GEMV (sm_90+). The launch's weights are cut
// into units of Q4S_UNIT_WEIGHTS consecutive (flattened) weights, whole
// rows of one matrix; a block owns a contiguous run of units (about one run
// per SM) and one thread streams them, weights and their block scales,
// through a ring of shared-memory stages with bulk asynchronous copies
// (`cp.async.bulk`, completion counted on one mbarrier per stage), so bytes
// in flight hold no registers and the first stages are requested before the
// programmatic-launch wait: a launch's weights arrive while the kernel
// before it still runs. Warp w computes chunks 64 w .. 64 w + 63 of every
// unit (lane: chunks w*64 + lane and + 32, one row's 32-weight chunks, the
// same arithmetic as gemv_q4_body's single-row rounds) and leaves one sum
// per unit in shared memory; rows are summed from them in a fixed order.
// Pair launches (gate/up) stream unit u of both matrices in one stage.

#define Q4S_UNIT_WEIGHTS 16384
#define Q4S_UNIT_BYTES (Q4S_UNIT_WEIGHTS / 2)
#define Q4S_UNIT_CHUNKS (Q4S_UNIT_WEIGHTS / 32)
#define Q4S_MAX_STAGES 16

// Shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count)
                 : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// One arrival that also expects `bytes` of bulk copies to complete.
__device__ __forceinline__ void mbar_expect_tx(u64* bar, u32 bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
#endif
}

__device__ __forceinline__ void mbar_arrive(u64* bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
#endif
}

// Waits until the phase of parity `parity` of `bar` has completed.
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
#if __CUDA_ARCH__ >= 900
    u32 done = 0;
    while (!done)
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, "
            "0, p; }"
            : "=r"(done)
            : "r"(smem_addr(bar)), "r"(parity)
            : "memory");
#endif
}

// Bulk copy of `bytes` (a multiple of 16, both ends 16-byte aligned) from
// global to shared memory, counted on `bar`.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, u32 bytes, u64* bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
            "r"(smem_addr(dst)),
        "l"(src), "r"(bytes), "r"(smem_addr(bar))
        : "memory");
#endif
}

// The matrices of a streamed launch: up to three in sequence (Q, K, V), or
// with PAIR two read side by side (gate, up); `units[i]` units each, matrix
// i's outputs `y[i]` of `out[i]` rows.
struct Q4sMats {
    float* y[3];
    int out[3];
    int units[3];
};

// Where unit u of a launch lies: its matrix and its index in that matrix.
__device__ __forceinline__ int q4s_pick(const Q4sMats& m, int u, int& local) {
    const int i = u < m.units[0] ? 0 : (u < m.units[0] + m.units[1] ? 1 : 2);
    local = i == 0 ? u : (i == 1 ? u - m.units[0] : u - m.units[0] - m.units[1]);
    return i;
}

// Bytes of a unit's block scales: u8 codes with double quantization, f32
// absmax otherwise (host: `q4s_scale_bytes` in matmul.rs).
__device__ __forceinline__ u32 q4s_scale_bytes(const Q4BnbArgs& a) {
    return (u32)(Q4S_UNIT_WEIGHTS >> a.bs_log2) * (a.codes ? 1u : 4u);
}

// The streamed GEMV. `stages` ring slots of `stage_bytes` (per matrix read
// side by side) follow the staged row and the code-pair tables in dynamic
// shared memory, then `max_units` * 8 sums per side-by-side matrix and the
// nested absmax values of the block's units (`npu` per unit). With `acc`
// results add to y (single matrix); with `nw` the row is RMS-normalized.
template <bool H, bool PAIR>
__device__ __forceinline__ void gemv_q4s_body(const Q4BnbArgs& a0, const Q4BnbArgs& a1,
                                              const Q4BnbArgs& a2, const Q4sMats& m,
                                              const float* __restrict__ x, int in, int stages,
                                              int stage_bytes, int max_units, int npu, int acc,
                                              int cd, const float* __restrict__ nw, float eps) {
    constexpr int NP = PAIR ? 2 : 1;
    typedef typename Q4PairEntry<H>::T E;
    trace_event(TRACE_ENTER);
    __shared__ float lut[48];
    __shared__ __align__(16) float c2s[768];
    __shared__ u64 full[Q4S_MAX_STAGES], empty[Q4S_MAX_STAGES];
    extern __shared__ float xsm[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int total = m.units[0] + m.units[1] + m.units[2];
    const int u0 = (int)((long long)blockIdx.x * total / gridDim.x);
    const int nu = (int)((long long)(blockIdx.x + 1) * total / gridDim.x) - u0;
    const int pairs_at = q4_pairs_at<H>(in);
    u8* ring = (u8*)(xsm + ((pairs_at + Q4_PAIR_FLOATS + 3) & ~3));
    float* sums = (float*)(ring + (size_t)stages * NP * stage_bytes);
    float* nested = sums + NP * 8 * max_units;
    const int chunks = in >> 5;
    const int rpu = Q4S_UNIT_CHUNKS / chunks;  // rows per unit

    // Requests unit k of this block into slot k % stages (thread 0).
    auto issue = [&](int k) {
        int local;
        const int i = q4s_pick(m, u0 + k, local);
        const int slot = k % stages;
        u8* dst = ring + (size_t)slot * NP * stage_bytes;
        u32 bytes = 0;
#pragma unroll
        for (int p = 0; p < NP; p++) {
            const Q4BnbArgs& a = PAIR ? (p == 0 ? a0 : a1) : (i == 0 ? a0 : (i == 1 ? a1 : a2));
            bytes += Q4S_UNIT_BYTES + q4s_scale_bytes(a);
        }
        mbar_expect_tx(&full[slot], bytes);
#pragma unroll
        for (int p = 0; p < NP; p++) {
            const Q4BnbArgs& a = PAIR ? (p == 0 ? a0 : a1) : (i == 0 ? a0 : (i == 1 ? a1 : a2));
            const u32 sb = q4s_scale_bytes(a);
            u8* d = dst + (size_t)p * stage_bytes;
            bulk_copy(d, (const u8*)a.w + (size_t)local * Q4S_UNIT_BYTES, Q4S_UNIT_BYTES, &full[slot]);
            const u8* s = a.codes ? a.codes : (const u8*)a.absmax;
            bulk_copy(d + Q4S_UNIT_BYTES, s + (size_t)local * sb, sb, &full[slot]);
        }
    };
    if (tid == 0) {
        for (int s = 0; s < stages; s++) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], GEMV_WARPS);
        }
    }
    __syncthreads();
    if (tid == 0)
        for (int k = 0; k < min(stages, nu); k++) issue(k);
    // Before the wait as well (nothing here depends on the previous kernel):
    // the code tables and the nested absmax of this block's units.
    if (PAIR) {
        q4_code2_tables(c2s, a0.codes ? a0.code2 : nullptr, a1.codes ? a1.code2 : nullptr, nullptr);
        q4_tables(lut, a0.code16, a1.code16, a1.code16);
    } else {
        q4_code2_tables(c2s, a0.codes ? a0.code2 : nullptr, a1.codes ? a1.code2 : nullptr,
                        a2.codes ? a2.code2 : nullptr);
        q4_tables(lut, a0.code16, a1.code16, a2.code16);
    }
    for (int e = tid; e < NP * nu * npu; e += blockDim.x) {
        const int p = e / (nu * npu), k = (e / npu) % nu, t = e % npu;
        int local;
        const int i = q4s_pick(m, u0 + k, local);
        const int mi = PAIR ? p : i;
        const Q4BnbArgs& a = mi == 0 ? a0 : (mi == 1 ? a1 : a2);
        const int sh = a.bs_log2 + a.nbs_log2;
        if (a.codes)
            nested[(p * max_units + k) * npu + t] =
                a.absmax[((size_t)local * Q4S_UNIT_WEIGHTS >> sh) + (sh >= 14 ? 0 : t)];
    }
    const Q4Pairs<E> pairs = q4_pair_tables<Q4Bnb::HI_FIRST, H>(lut, xsm + pairs_at);
    pdl_wait();
    pdl_release();
    cp_async_wait_all();
    // Single matrices adding to y read their rows' old values now, well
    // before the sums are ready.
    const int vrow0 = u0 * rpu, nrows = nu * rpu;
    float yold = 0.f;
    if (!PAIR && acc && tid < nrows) yold = m.y[0][vrow0 + tid];
    if (H)
        stage_xh(x, nw, eps, (u32*)xsm, xsm + Q4_XH_WORDS * chunks, in, cd);
    else
        stage_x<true>(x, nw, eps, xsm, in, cd);
    const u32* xh = (const u32*)xsm;
    const float* xscale = xsm + Q4_XH_WORDS * chunks;

    const int j0 = 64 * warp + lane;  // this lane's first chunk of a unit
    for (int k = 0; k < nu; k++) {
        const int slot = k % stages;
        mbar_wait(&full[slot], (u32)(k / stages) & 1u);
        int local;
        const int i = q4s_pick(m, u0 + k, local);
#pragma unroll
        for (int p = 0; p < NP; p++) {
            const int mi = PAIR ? p : i;
            const Q4BnbArgs& a = mi == 0 ? a0 : (mi == 1 ? a1 : a2);
            const E* tab = pairs.lane_tab(lut, lut + 16 * mi);
            const u8* st = ring + ((size_t)slot * NP + p) * stage_bytes;
            float sum = 0.f;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int j = j0 + 32 * h;
                const int c = j % chunks;
                const uint4 wv = ((const uint4*)st)[j];
                const int ci = (j * 32) >> a.bs_log2;
                float s;
                if (a.codes) {
                    const int sh = a.bs_log2 + a.nbs_log2;
                    const float nz = nested[(p * max_units + k) * npu + (sh >= 14 ? 0 : (j * 32) >> sh)];
                    s = __fadd_rn(__fmul_rn(c2s[256 * mi + st[Q4S_UNIT_BYTES + ci]], nz), a.offset);
                } else {
                    s = ((const float*)(st + Q4S_UNIT_BYTES))[ci];
                }
                const u32 words[4] = {wv.x, wv.y, wv.z, wv.w};
                if constexpr (H) {
                    const uint4* xr = (const uint4*)(xh + c * Q4_XH_WORDS);
                    u32 hs = 0u;
#pragma unroll
                    for (int q = 0; q < 4; q++) {
                        const uint4 xv = xr[q];
                        const u32 xw[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
                        for (int b = 0; b < 4; b++) hs = hfma2(q4_pair(tab, words[q], b), xw[b], hs);
                    }
                    sum = fmaf(s, h2_sum(hs) * xscale[c], sum);
                } else {
                    const float* xp = xsm + c * 33;
                    float d = 0.f;
#pragma unroll
                    for (int q = 0; q < 4; q++)
#pragma unroll
                        for (int b = 0; b < 4; b++) {
                            const float2 pr = q4_pair(tab, words[q], b);
                            d = fmaf(pr.x, xp[8 * q + 2 * b], d);
                            d = fmaf(pr.y, xp[8 * q + 2 * b + 1], d);
                        }
                    sum = fmaf(s, d, sum);
                }
            }
            sum = warp_sum(sum);
            if (lane == 0) sums[(p * max_units + k) * GEMV_WARPS + warp] = sum;
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[slot]);
        // Thread 0 refills the slot of the previous unit once every warp has
        // left it, so that it rarely waits.
        if (tid == 0 && k >= 1 && k - 1 + stages < nu) {
            const int ps = (k - 1) % stages;
            mbar_wait(&empty[ps], (u32)((k - 1) / stages) & 1u);
            issue(k - 1 + stages);
        }
    }
    __syncthreads();
    // Row r of the block (virtual row vrow0 + r) sums the warps of its unit
    // that cover it, in warp order.
    const int wpr = GEMV_WARPS / rpu;
    for (int r = tid; r < nrows; r += blockDim.x) {
        const int k = r / rpu, w0 = (r % rpu) * wpr;
        float v[NP];
#pragma unroll
        for (int p = 0; p < NP; p++) {
            float s = 0.f;
            for (int w = 0; w < wpr; w++) s += sums[(p * max_units + k) * GEMV_WARPS + w0 + w];
            v[p] = rnd(s, cd);
        }
        const int vr = vrow0 + r;
        if (PAIR) {
            m.y[0][vr] = v[0] / (1.0f + expf(-v[0])) * v[NP - 1];
        } else {
            const int i = vr < m.out[0] ? 0 : (vr < m.out[0] + m.out[1] ? 1 : 2);
            const int row = i == 0 ? vr : (i == 1 ? vr - m.out[0] : vr - m.out[0] - m.out[1]);
            float* y = i == 0 ? m.y[0] : (i == 1 ? m.y[1] : m.y[2]);
            if (acc) v[0] += r < (int)blockDim.x ? yold : y[row];
            y[row] = v[0];
        }
    }
    trace_event(TRACE_DONE);
}

// Instances: h in half precision (H), b in f32; _pair gate/up with SiLU.
#define GEMV_Q4S(TAG, H)                                                                          \
    extern "C" __global__ void __launch_bounds__(256, 2) gemv_q4s_##TAG(                          \
        const __grid_constant__ Q4BnbArgs a0, const __grid_constant__ Q4BnbArgs a1,               \
        const __grid_constant__ Q4BnbArgs a2, Q4sMats m, const float* __restrict__ x, int in,     \
        int stages, int stage_bytes, int max_units, int npu, int acc, int cd,                     \
        const float* __restrict__ nw, float eps) {                                                \
        gemv_q4s_body<H, false>(a0, a1, a2, m, x, in, stages, stage_bytes, max_units, npu, acc,  \
                                cd, nw, eps);                                                     \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256, 2) gemv_q4s_##TAG##_pair(                   \
        const __grid_constant__ Q4BnbArgs a0, const __grid_constant__ Q4BnbArgs a1,               \
        const __grid_constant__ Q4BnbArgs a2, Q4sMats m, const float* __restrict__ x, int in,     \
        int stages, int stage_bytes, int max_units, int npu, int acc, int cd,                     \
        const float* __restrict__ nw, float eps) {                                                \
        gemv_q4s_body<H, true>(a0, a1, a2, m, x, in, stages, stage_bytes, max_units, npu, acc,   \
                               cd, nw, eps);                                                      \
    }

GEMV_Q4S(h, true)
GEMV_Q4S(b, false)
