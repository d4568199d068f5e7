// Matrix-vector products for small batches (decode): y[b, o] = sum_k x[b, k] * W[o, k]
// for b < n <= 8, with W in its storage format. Each warp owns R output rows
// for a slice of the input dimension; `ksplit` warps of a block share one row
// group when the matrix has too few rows to fill the GPU, and their partial
// sums meet in shared memory. Weights stream once with 16-byte loads; the
// activations are re-read from L1/L2 and shared by the R rows.

#define GEMV_MAXB 8
#define GEMV_WARPS 8

// Loaders: 8 consecutive weights of `row` starting at column 8 * c, as floats.
struct LoadF32 {
    const float* __restrict__ w;
    int in;
    __device__ __forceinline__ void load(int row, int c, float v[8]) const {
        const float4* p = (const float4*)(w + (size_t)row * in + (size_t)c * 8);
        const float4 a = p[0], b = p[1];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
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
    __device__ __forceinline__ void load(int row, int c, float v[8]) const {
        unpack_f16x8(*(const uint4*)(w + (size_t)row * in + (size_t)c * 8), v);
    }
};

struct LoadBF16 {
    const u16* __restrict__ w;
    int in;
    __device__ __forceinline__ void load(int row, int c, float v[8]) const {
        unpack_bf16x8(*(const uint4*)(w + (size_t)row * in + (size_t)c * 8), v);
    }
};

template <class L, int R>
__device__ __forceinline__ void gemv_body(const L ld, const float* __restrict__ x,
                                          float* __restrict__ y, int n, int out, int in,
                                          int ksplit) {
    __shared__ float red[GEMV_WARPS][R][GEMV_MAXB];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int groups = GEMV_WARPS / ksplit;
    const int row0 = (blockIdx.x * groups + warp / ksplit) * R;
    const int kp = warp % ksplit;
    const int chunks = in >> 3;
    int rows[R];
#pragma unroll
    for (int r = 0; r < R; r++) rows[r] = min(row0 + r, out - 1);
    float acc[R][GEMV_MAXB];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int b = 0; b < GEMV_MAXB; b++) acc[r][b] = 0.f;
    for (int c = kp * 32 + lane; c < chunks; c += 32 * ksplit) {
        float w[R][8];
#pragma unroll
        for (int r = 0; r < R; r++) ld.load(rows[r], c, w[r]);
#pragma unroll
        for (int b = 0; b < GEMV_MAXB; b++) {
            if (b < n) {
                const float4* xp = (const float4*)(x + (size_t)b * in + (size_t)c * 8);
                const float4 x0 = xp[0], x1 = xp[1];
#pragma unroll
                for (int r = 0; r < R; r++) {
                    float a = acc[r][b];
                    a = fmaf(w[r][0], x0.x, a);
                    a = fmaf(w[r][1], x0.y, a);
                    a = fmaf(w[r][2], x0.z, a);
                    a = fmaf(w[r][3], x0.w, a);
                    a = fmaf(w[r][4], x1.x, a);
                    a = fmaf(w[r][5], x1.y, a);
                    a = fmaf(w[r][6], x1.z, a);
                    a = fmaf(w[r][7], x1.w, a);
                    acc[r][b] = a;
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int b = 0; b < GEMV_MAXB; b++)
            if (b < n) {
                const float v = warp_sum(acc[r][b]);
                if (lane == 0) red[warp][r][b] = v;
            }
    __syncthreads();
    if (kp == 0 && lane < R * n) {
        const int r = lane / n, b = lane - (lane / n) * n;
        float s = 0.f;
        for (int k = 0; k < ksplit; k++) s += red[warp + k][r][b];
        if (row0 + r < out) y[(size_t)b * out + row0 + r] = s;
    }
}

#define GEMV_DENSE(NAME, LOADER, T, R)                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        NAME(const T* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,     \
             int n, int out, int in, int ksplit) {                                            \
        gemv_body<LOADER, R>(LOADER{w, in}, x, y, n, out, in, ksplit);                        \
    }

GEMV_DENSE(gemv_f32, LoadF32, float, 2)
GEMV_DENSE(gemv_f16, LoadF16, u16, 2)
GEMV_DENSE(gemv_bf16, LoadBF16, u16, 2)
