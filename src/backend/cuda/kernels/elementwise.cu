// Row-wise and elementwise kernels: embedding, RMSNorm, RoPE, SiLU*mul,
// residual add, row gather, argmax, dtype conversions, KV-cache append.

#define EMBED_KERNEL(NAME, T, CONV)                                                        \
    extern "C" __global__ void NAME(const T* __restrict__ table, const u32* __restrict__ tokens, \
                                    float* __restrict__ out, int hidden, int vocab) { pdl_start();      \
        const u32 t = tokens[blockIdx.x];                                                  \
        float* o = out + (size_t)blockIdx.x * hidden;                                      \
        if (t >= (u32)vocab) {                                                             \
            for (int c = threadIdx.x; c < hidden; c += blockDim.x) o[c] = __int_as_float(0x7fc00000); \
            return;                                                                        \
        }                                                                                  \
        const T* r = table + (size_t)t * hidden;                                           \
        for (int c = threadIdx.x; c < hidden; c += blockDim.x) o[c] = CONV(r[c]);          \
    }

#define CONV_F32(v) (v)
EMBED_KERNEL(embed_f32, float, CONV_F32)
EMBED_KERNEL(embed_f16, u16, h2f)
EMBED_KERNEL(embed_bf16, u16, bf2f)

// y = x / sqrt(mean(x^2) + eps) * w, one block per row.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ y, int cols, float eps) {
    pdl_start();
    __shared__ float sh[33];
    const float* xr = x + (size_t)blockIdx.x * cols;
    float* yr = y + (size_t)blockIdx.x * cols;
    float s = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = xr[c];
        s = fmaf(v, v, s);
    }
    s = block_sum(s, sh);
    const float inv = 1.0f / sqrtf(s / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = (xr[c] * inv) * w[c];
}

// HF "rotate half" RoPE in place; one block per token row.
extern "C" __global__ void rope(float* __restrict__ x, const u32* __restrict__ pos,
                                const float* __restrict__ inv_freq, int heads, int head_dim) {
    pdl_start();
    const int half = head_dim / 2;
    const float p = (float)pos[blockIdx.x];
    float* xr = x + (size_t)blockIdx.x * heads * head_dim;
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        const int h = i / half, j = i - h * half;
        float s, c;
        sincosf(p * inv_freq[j], &s, &c);
        float* hd = xr + h * head_dim;
        const float a = hd[j], b = hd[j + half];
        hd[j] = a * c - b * s;
        hd[j + half] = b * c + a * s;
    }
}

extern "C" __global__ void silu_mul(const float* __restrict__ g, const float* __restrict__ u,
                                    float* __restrict__ y, size_t n) {
    pdl_start();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float a = g[i];
        y[i] = a / (1.0f + expf(-a)) * u[i];
    }
}

extern "C" __global__ void add_assign(float* __restrict__ x, const float* __restrict__ y, size_t n) {
    pdl_start();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] += y[i];
}

// out[r] = x[rows[r]], one block per output row.
extern "C" __global__ void gather_rows(const float* __restrict__ x, const u32* __restrict__ rows,
                                       float* __restrict__ out, int cols) {
    pdl_start();
    const float* src = x + (size_t)rows[blockIdx.x] * cols;
    float* dst = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

// Argmax in two passes, first index on ties (NaN never wins). Pass 1: grid
// (parts, rows), each block reduces a contiguous segment of `seg` columns of
// its row to (value, index); pass 2: one block per row reduces the parts.
__device__ __forceinline__ void argmax_take(float& bv, int& bi, float ov, int oi) {
    if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
    }
}

// Reduces every thread's (bv, bi) over the block; thread 0 holds the result.
__device__ __forceinline__ void block_argmax(float& bv, int& bi) {
    __shared__ float sv[32];
    __shared__ int si[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        argmax_take(bv, bi, __shfl_xor_sync(0xffffffffu, bv, o), __shfl_xor_sync(0xffffffffu, bi, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) argmax_take(bv, bi, sv[w], si[w]);
}

extern "C" __global__ void argmax_partial(const float* __restrict__ x, float* __restrict__ pv,
                                          int* __restrict__ pi, int cols, int seg) {
    pdl_start();
    const float* r = x + (size_t)blockIdx.y * cols;
    const int c1 = min(cols, (int)(blockIdx.x + 1) * seg);
    float bv = -QB_INF;
    int bi = 0x7fffffff;
    for (int c = blockIdx.x * seg + threadIdx.x; c < c1; c += blockDim.x) {
        const float v = r[c];
        if (v > bv) {
            bv = v;
            bi = c;
        }
    }
    block_argmax(bv, bi);
    if (threadIdx.x == 0) {
        pv[blockIdx.y * gridDim.x + blockIdx.x] = bv;
        pi[blockIdx.y * gridDim.x + blockIdx.x] = bi;
    }
}

// The winning column of each row as an f32 value (exact below 2^24).
extern "C" __global__ void argmax_final(const float* __restrict__ pv, const int* __restrict__ pi,
                                        float* __restrict__ out, int parts) {
    pdl_start();
    float bv = -QB_INF;
    int bi = 0x7fffffff;
    for (int p = threadIdx.x; p < parts; p += blockDim.x)
        argmax_take(bv, bi, pv[blockIdx.x * parts + p], pi[blockIdx.x * parts + p]);
    block_argmax(bv, bi);
    if (threadIdx.x == 0) out[blockIdx.x] = bi == 0x7fffffff ? 0.f : (float)bi;
}

extern "C" __global__ void f32_to_f16(const float* __restrict__ x, u16* __restrict__ y, size_t n) {
    pdl_start();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = f2h(x[i]);
}

// x ≈ hi + lo with both terms in bf16: about 16 significant bits of x.
extern "C" __global__ void f32_to_bf16_split(const float* __restrict__ x, u16* __restrict__ hi,
                                             u16* __restrict__ lo, size_t n) {
    pdl_start();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float v = x[i];
        const u16 h = f2bf(v);
        hi[i] = h;
        lo[i] = f2bf(v - bf2f(h));
    }
}

// Writes each token's K and V rows into the cache at (slot, position).
extern "C" __global__ void kv_append(const float* __restrict__ k, const float* __restrict__ v,
                                     float* __restrict__ kc, float* __restrict__ vc,
                                     const u32* __restrict__ slot, const u32* __restrict__ pos,
                                     int kv_dim, int max_len) {
    pdl_start();
    const int t = blockIdx.x;
    const size_t dst = ((size_t)slot[t] * max_len + pos[t]) * kv_dim;
    const size_t src = (size_t)t * kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        kc[dst + i] = k[src + i];
        vc[dst + i] = v[src + i];
    }
}
