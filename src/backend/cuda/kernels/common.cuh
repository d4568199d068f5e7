// Shared helpers for the quantbench kernels. No CUDA headers are included:
// half and bfloat16 values travel as 16-bit integers and are converted with
// PTX instructions, so NVRTC needs nothing beyond its built-ins.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;

#define QB_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(f));
    return h;
}

// Two f16 values in one word (x in the low half), as f16x2 arithmetic takes them.
__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    return (u32)f2h(lo) | ((u32)f2h(hi) << 16);
}

// a * b + c on two f16 lanes at once, each rounded once.
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("{ fma.rn.f16x2 %0, %1, %2, %3; }" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// The sum of the two f16 values of a word, in f32.
__device__ __forceinline__ float h2_sum(u32 v) {
    return h2f((u16)(v & 0xffffu)) + h2f((u16)(v >> 16));
}

__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ u16 f2bf(float f) {
    u16 h;
    asm("{ cvt.rn.bf16.f32 %0, %1; }" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// A quantization scale rounded to the nearest positive, finite f16 value
// (src/quant/rtn.rs, to_f16_scale).
__device__ __forceinline__ float f16_scale(float s) {
    const float h = h2f(f2h(s));
    if (h > 0.f && h <= 65504.f) return h;
    return h > 0.f ? 65504.f : 5.9604644775390625e-8f;
}

// Sum over the block (blockDim.x a multiple of 32); `sh` holds 33 floats.
__device__ __forceinline__ float block_sum(float v, float* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < nw ? sh[lane] : 0.f;
        t = warp_sum(t);
        if (lane == 0) sh[32] = t;
    }
    __syncthreads();
    return sh[32];
}

// Block timelines (QUANTBENCH_CUDA_TRACE, read by bench/timeline.rs): with
// QB_TRACE defined, thread 0 of a block records the device clock, the
// launch's grid id, its SM, its linear block index and what happened into a
// ring of QB_TRACE_EVENTS events; without it recording compiles to nothing.
#define TRACE_ENTER 0
#define TRACE_WAITED 1
#define TRACE_DONE 2
#define TRACE_PARTIAL_DONE 3
#ifdef QB_TRACE
#define QB_TRACE_EVENTS (1 << 20)
__device__ u64 qb_trace[3 * QB_TRACE_EVENTS];
__device__ u64 qb_trace_recorded;
#endif

__device__ __forceinline__ void trace_event(int kind) {
#ifdef QB_TRACE
    if (threadIdx.x != 0 || threadIdx.y != 0 || threadIdx.z != 0) return;
    u64 t, grid;
    u32 sm;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    asm volatile("mov.u64 %0, %%gridid;" : "=l"(grid));
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    const u64 block = blockIdx.x + (u64)gridDim.x * (blockIdx.y + (u64)gridDim.y * blockIdx.z);
    const u64 slot = atomicAdd(&qb_trace_recorded, 1ull) % QB_TRACE_EVENTS;
    qb_trace[3 * slot] = grid;
    qb_trace[3 * slot + 1] = t;
    qb_trace[3 * slot + 2] = (u64)kind | ((u64)(sm & 0xffu) << 8) | (block << 16);
#endif
}

// The two halves of pdl_start: waiting until the kernels this one depends
// on have finished, and letting the next kernel's blocks be scheduled (once
// every block of this one has released them or exited).
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    trace_event(TRACE_WAITED);
}

__device__ __forceinline__ void pdl_release() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Programmatic dependent launch (sm_90+), in every kernel before it reads
// anything an earlier kernel writes (the first statement of most; the GEMVs
// first issue loads of their weights, which no kernel writes): waits until
// the kernels this one depends on have finished and their writes are
// visible, then lets the next kernel's blocks be scheduled while this one
// runs (the single-row 4-bit GEMVs call its halves apart, see
// gemv_q4_body). Kernels launched without the attribute pass through.
__device__ __forceinline__ void pdl_start() {
    pdl_wait();
    pdl_release();
}
