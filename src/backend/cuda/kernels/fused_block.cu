// Decoder blocks of a single-sequence decode step with 4-bit weights in one
// launch: per block RMS norm and Q/K/V, RoPE + KV append + attention,
// o_proj into the residual, RMS norm and gate/up + SiLU, down_proj into the
// residual; one block per launch or all of them. The phases are the bodies
// of the separate kernels (gemv_q4_body, attn_decode_unit); grid-wide
// barriers stand between them where the separate kernels would end and
// start, so a decoder block pays one launch instead of five, or none. Every
// thread block of the grid is resident at once (the host sizes the grid to
// the occupancy), loops over the logical blocks of each phase, and issues
// its first weight loads of the next phase before the barrier, so the loads
// overlap the wait. Activations written in the launch are read past L1
// (ld_cg); the residual row `x` is updated in place.

// Nanoseconds of the GPU's global timer.
__device__ __forceinline__ u64 global_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Load with acquire and store with release semantics at GPU scope: the
// generation word of the grid barrier.
__device__ __forceinline__ u32 ld_acquire(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_release(u32* p, u32 v) {
    asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Ends the launch with an error.
__device__ __forceinline__ void abort_launch() { asm volatile("trap;"); }

// A barrier wait longer than this means some block of the grid never became
// resident (the GPU shared with other work): the launch aborts, so the host
// reports a failed launch instead of hanging.
#ifndef BARRIER_TIMEOUT_NS
#define BARRIER_TIMEOUT_NS 2000000000ull
#endif

// Grid-wide barrier for a launch of `nblocks` co-resident blocks. bar[0]
// counts arrivals, bar[1] is the generation; the last block to arrive resets
// the count and moves the generation on, so the state is ready for the next
// barrier and the next launch.
__device__ __forceinline__ void grid_barrier(u32* bar, u32 nblocks) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const u32 gen = ld_acquire(bar + 1);
        __threadfence();
        if (atomicAdd(bar, 1u) == nblocks - 1) {
            atomicExch(bar, 0u);
            __threadfence();
            st_release(bar + 1, gen + 1);
        } else {
            const u64 t0 = global_ns();
            while (ld_acquire(bar + 1) == gen)
                if (global_ns() - t0 > BARRIER_TIMEOUT_NS) abort_launch();
        }
        __threadfence();
    }
    __syncthreads();
}

// Buffers and shapes of a fused launch (`FusedBlock` in fused_block.rs),
// shared by its decoder blocks. The attention phase's q, knew and vnew are
// the Q/K/V outputs, its `out` the input of o_proj; its cache pointers are
// each block's own (FusedLayer).
struct FusedBlock {
    AttnDecode attn;
    float* x;    // residual row [hidden]
    float* act;  // silu(gate) * up [inter]
    u32* bar;
    float eps;
    int hidden, inter;
    int ks_qkv, ks_o, ks_gu, ks_down;
    int cd;
};

// One decoder block: its seven matrices in the order q, k, v, o, gate, up,
// down, its norms and its layer of the KV cache.
template <class A>
struct FusedLayer {
    A m[7];
    const float* ln1;
    const float* ln2;
    float* kc;
    float* vc;
};

// The decoder blocks of a launch (the first `nlayers` of N).
template <class A, int N>
struct FusedLayers {
    FusedLayer<A> l[N];
};

__device__ __forceinline__ const float* code_of(const Q4BnbArgs& a) { return a.code16; }

__device__ __forceinline__ const float* code_of(const Q4PackedArgs&) { return nullptr; }

// Decoder block `w` on the residual row. The first block of a launch waits
// for the kernels before it, later ones for the grid; the last one lets the
// next kernel be scheduled once every block of the grid is past its last
// barrier (all resident, so the next kernel cannot take their places).
template <class Q, class A>
__device__ __forceinline__ void fused_block_body(const FusedLayer<A>& w, const FusedBlock& p,
                                                 bool first, bool last) {
    const int bid = blockIdx.x, grid = gridDim.x;
    const auto barrier = [&] { grid_barrier(p.bar, grid); };
    // Code tables of the seven matrices, 16 floats each (0..15 for packed
    // integers), selected without indexing the parameter array. Every read
    // of the previous block's tables came before the last __syncthreads of
    // its final GEMV.
    __shared__ float lut[7 * 16];
    if (threadIdx.x < 7 * 16) {
        const int i = threadIdx.x >> 4;
        const float* c = code_of(i == 0   ? w.m[0]
                                 : i == 1 ? w.m[1]
                                 : i == 2 ? w.m[2]
                                 : i == 3 ? w.m[3]
                                 : i == 4 ? w.m[4]
                                 : i == 5 ? w.m[5]
                                          : w.m[6]);
        lut[threadIdx.x] = c ? c[threadIdx.x & 15] : (float)(threadIdx.x & 15);
    }
    __syncthreads();
    AttnDecode ad = p.attn;
    ad.kc = w.kc;
    ad.vc = w.vc;
    const int qo = ad.q_heads * ad.D, kvo = ad.kv_heads * ad.D;

    // RMS norm and Q/K/V (the attention's inputs, written here) of the
    // residual row, which the previous kernel or block wrote.
    GemvMulti m;
    m.y[0] = (float*)ad.q;
    m.y[1] = (float*)ad.knew;
    m.y[2] = (float*)ad.vnew;
    m.out[0] = qo;
    m.out[1] = kvo;
    m.out[2] = kvo;
    for (int i = 0; i < 3; i++) m.blocks[i] = q4_blocks(m.out[i], 4, p.ks_qkv);
    const auto at_qkv = [&](int b) {
        int blk, out;
        float* y;
        const int i = multi_pick(m, b, blk, y, out);
        const Q q = q4_of(i == 0 ? w.m[0] : (i == 1 ? w.m[1] : w.m[2]), p.hidden, out);
        return Q4Block<Q>{q, q, lut + 16 * i, lut + 16 * i, y, out, blk};
    };
    const auto wait_x = [&] {
        if (first)
            pdl_wait();
        else
            barrier();
    };
    gemv_q4_body<Q, 4, false, 1, true>(at_qkv, m.blocks[0] + m.blocks[1] + m.blocks[2], bid, grid,
                                       wait_x, p.x, 1, p.hidden, p.ks_qkv, p.cd, 0, w.ln1, p.eps);

    // RoPE, KV append and attention: a work unit per (range, kv head). The
    // barrier sits inside a block's first unit, after its cache copies start.
    const int units = ad.splits * ad.kv_heads;
    if (bid >= units) barrier();
    for (int u = bid; u < units; u += grid)
        attn_decode_unit(ad, u % ad.splits, u / ad.splits, 0, [&] {
            if (u == bid) barrier();
        });

    // o_proj into the residual.
    const auto at_o = [&](int b) {
        const Q q = q4_of(w.m[3], qo, p.hidden);
        return Q4Block<Q>{q, q, lut + 48, lut + 48, p.x, p.hidden, b};
    };
    gemv_q4_body<Q, 4, false, 1, true>(at_o, q4_blocks(p.hidden, 4, p.ks_o), bid, grid, barrier,
                                       ad.out, 1, qo, p.ks_o, p.cd, 1, nullptr, 0.f);

    // RMS norm, gate/up and SiLU.
    const auto at_gu = [&](int b) {
        return Q4Block<Q>{q4_of(w.m[4], p.hidden, p.inter), q4_of(w.m[5], p.hidden, p.inter),
                          lut + 64, lut + 80, p.act, p.inter, b};
    };
    gemv_q4_body<Q, 2, true, 1, true>(at_gu, q4_blocks(p.inter, 1, p.ks_gu), bid, grid, barrier,
                                      p.x, 1, p.hidden, p.ks_gu, p.cd, 0, w.ln2, p.eps);

    // down_proj into the residual.
    const auto at_down = [&](int b) {
        const Q q = q4_of(w.m[6], p.inter, p.hidden);
        return Q4Block<Q>{q, q, lut + 96, lut + 96, p.x, p.hidden, b};
    };
    const auto wait_act = [&] {
        barrier();
        if (last) pdl_trigger();
    };
    gemv_q4_body<Q, 4, false, 1, true>(at_down, q4_blocks(p.hidden, 4, p.ks_down), bid, grid,
                                       wait_act, p.act, 1, p.inter, p.ks_down, p.cd, 1, nullptr, 0.f);
}

// The first `nlayers` decoder blocks of `ls`, one after the other.
template <class Q, class A, int N>
__device__ __forceinline__ void fused_layers_body(const FusedLayers<A, N>& ls, int nlayers,
                                                  const FusedBlock& p) {
    const int n = N == 1 ? 1 : nlayers;
    for (int l = 0; l < n; l++) fused_block_body<Q>(ls.l[l], p, l == 0, l == n - 1);
}

// Each format with two register budgets, OCC blocks of 256 threads per SM
// (occ1: no spills, one block per SM; occ2: twice the warps, some spills),
// for one decoder block per launch (N = 1) or up to 32. The blocks'
// descriptors stay in parameter space (__grid_constant__), indexed by layer
// without a local copy.
#define FUSED_KERNELS(OCC, N)                                                                    \
    extern "C" __global__ void __launch_bounds__(256, OCC) fused_q4bnb_occ##OCC##_l##N(          \
        const __grid_constant__ FusedLayers<Q4BnbArgs, N> ls, int nlayers, FusedBlock p) {        \
        fused_layers_body<Q4Bnb>(ls, nlayers, p);                                                \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256, OCC) fused_q4packed_occ##OCC##_l##N(       \
        const __grid_constant__ FusedLayers<Q4PackedArgs, N> ls, int nlayers, FusedBlock p) {     \
        fused_layers_body<Q4Packed>(ls, nlayers, p);                                             \
    }

FUSED_KERNELS(1, 1)
FUSED_KERNELS(2, 1)
FUSED_KERNELS(1, 32)
FUSED_KERNELS(2, 32)
