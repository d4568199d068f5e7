// CPU emulation of the CUDA subset the decode kernels use, for checking
// their logic without a GPU (tests/cuda_kernels_emulated.rs). A launch forks
// one process per block, so `__shared__` statics are per block, and starts
// one OS thread per CUDA thread; __syncthreads and warp shuffles are
// std::barrier waits; device memory is a MAP_SHARED arena all blocks see.
// The helpers written in inline PTX are replaced by the definitions below
// (the test strips the originals from the kernel sources).
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#define __device__
#define __forceinline__ inline
#define __global__
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;

// Aligned as CUDA aligns them: on a GPU a vector load or store through a
// pointer not aligned to its type faults, and the test compiles the
// emulation with -fsanitize=alignment so that one aborts here too.
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
struct dim3 { unsigned x = 1, y = 1, z = 1; };

thread_local dim3 threadIdx;
dim3 blockIdx, blockDim, gridDim;
// Dynamic shared memory of this block (every `extern __shared__` array):
// a std::vector in launch (decode_block_vs_definition.cpp), so 16-byte
// aligned (__STDCPP_DEFAULT_NEW_ALIGNMENT__), the least a GPU's is.
float* emu_dyn_smem;
std::barrier<>* emu_block_bar;
struct EmuWarp {
    std::barrier<>* bar;
    uint64_t val[32];
};
thread_local EmuWarp* emu_warp;

inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <class T>
inline T emu_shfl(T v, int src) {
    const int lane = threadIdx.x & 31;
    memcpy(&emu_warp->val[lane], &v, sizeof(T));
    emu_warp->bar->arrive_and_wait();
    T r;
    memcpy(&r, &emu_warp->val[src & 31], sizeof(T));
    emu_warp->bar->arrive_and_wait();
    return r;
}
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return emu_shfl(v, src); }
inline bool __all_sync(unsigned, bool p) {
    bool all = true;
    for (int i = 0; i < 32; i++) all &= emu_shfl((int)p, i) != 0;
    return all;
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) {
    return emu_shfl(v, (threadIdx.x & 31) ^ o);
}
template <class T> inline T __shfl_down_sync(unsigned, T v, int o) {
    const int l = (threadIdx.x & 31) + o;
    return emu_shfl(v, l < 32 ? l : (threadIdx.x & 31));
}
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned sel) {
    const uint64_t v = (uint64_t)x | ((uint64_t)y << 32);
    unsigned r = 0;
    for (int i = 0; i < 4; i++) r |= (unsigned)((v >> (8 * ((sel >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }

// The inline-PTX helpers of common.cuh and attention.cu.
inline float h2f(u16 h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }
inline u16 f2h(float f) { _Float16 h = (_Float16)f; u16 r; memcpy(&r, &h, 2); return r; }
inline u16 f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (u16)(u >> 16);
}
inline u32 hfma2(u32 a, u32 b, u32 c) {
    u32 d = 0;
    for (int i = 0; i < 2; i++) {
        const double v = (double)h2f((u16)(a >> (16 * i))) * (double)h2f((u16)(b >> (16 * i))) +
                         (double)h2f((u16)(c >> (16 * i)));
        const _Float16 h = (_Float16)v;  // one rounding, as fma.rn.f16x2
        u16 r;
        memcpy(&r, &h, 2);
        d |= (u32)r << (16 * i);
    }
    return d;
}
// The PTX of ld_cg2, ld_cg4 and cp_async16 is a vector access, which faults
// on a GPU unless its address is aligned to its size; the scalar copies
// below would not, so they check.
inline void emu_vector_aligned(const void* p, uintptr_t n, const char* what) {
    if ((uintptr_t)p % n != 0) {
        fprintf(stderr, "%s: misaligned address %p for a %u-byte vector access\n", what, p,
                (unsigned)n);
        abort();
    }
}
inline float ld_cg(const float* p) { return *(const volatile float*)p; }
inline float2 ld_cg2(const float* p) {
    emu_vector_aligned(p, 8, "ld_cg2");
    return make_float2(ld_cg(p), ld_cg(p + 1));
}
inline float4 ld_cg4(const float* p) {
    emu_vector_aligned(p, 16, "ld_cg4");
    return make_float4(ld_cg(p), ld_cg(p + 1), ld_cg(p + 2), ld_cg(p + 3));
}
inline void pdl_wait() {}
inline void pdl_release() {}
inline void trace_event(int) {}
inline void cp_async16(float* dst, const float* src) {
    emu_vector_aligned(dst, 16, "cp_async16 (shared)");
    emu_vector_aligned(src, 16, "cp_async16 (global)");
    memcpy(dst, src, 16);
}
inline void cp_async_wait_all() {}

// The tensor-core helpers of gemv_mma.cu. mma_16816 is warp-collective:
// the lanes' fragments meet in `emu_mma` (per block, i.e. per process, one
// slot per warp), every lane rebuilds the 16x16 A and 16x8 B tiles from the
// PTX fragment layouts and computes its own four C elements.
inline void prefetch_l2(const void*) {}
inline u32 mma_pack2(float lo, float hi, bool bf) {
    const u16 l = bf ? f2bf(lo) : f2h(lo), h = bf ? f2bf(hi) : f2h(hi);
    return (u32)l | ((u32)h << 16);
}
struct EmuMma {
    u32 a[32][4], b[32][2];
};
static EmuMma emu_mma[32];
inline void mma_16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1, bool bf) {
    EmuMma& f = emu_mma[threadIdx.x / 32];
    const int lane = threadIdx.x & 31;
    memcpy(f.a[lane], a, sizeof(f.a[lane]));
    f.b[lane][0] = b0;
    f.b[lane][1] = b1;
    emu_warp->bar->arrive_and_wait();
    auto half = [&](u32 w, int i) {
        const u16 v = (u16)(w >> (16 * i));
        return bf ? __uint_as_float((u32)v << 16) : h2f(v);
    };
    float A[16][16], B[16][8];
    for (int L = 0; L < 32; L++) {
        const int g = L >> 2, t = L & 3;
        for (int e = 0; e < 2; e++) {
            A[g][2 * t + e] = half(f.a[L][0], e);
            A[g + 8][2 * t + e] = half(f.a[L][1], e);
            A[g][2 * t + 8 + e] = half(f.a[L][2], e);
            A[g + 8][2 * t + 8 + e] = half(f.a[L][3], e);
            B[2 * t + e][g] = half(f.b[L][0], e);
            B[2 * t + 8 + e][g] = half(f.b[L][1], e);
        }
    }
    emu_warp->bar->arrive_and_wait();
    const int g = lane >> 2, t = lane & 3;
    for (int e = 0; e < 4; e++) {
        const int m = g + 8 * (e >> 1), n = 2 * t + (e & 1);
        double s = 0;
        for (int k = 0; k < 16; k++) s += (double)A[m][k] * B[k][n];
        c[e] += (float)s;
    }
}
