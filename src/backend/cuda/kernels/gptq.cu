// GPTQ: Hessian sums, preparation of the Hessian and weight (dead inputs,
// act-order permutation, dampening), static group grids and the column loop
// of one lazy-update block. Grid fitting and rounding follow
// src/quant/rtn.rs (GridRule::MinMaxWithZero) operation for operation, with
// explicitly rounded products so that no multiply-add is contracted.

// Scale and zero point of a group whose values span [lo, hi].
__device__ void gptq_fit(float lo, float hi, int bits, int sym, float* scale, int* zero) {
    const int maxq = (1 << bits) - 1;
    const float mq = (float)maxq;
    lo = fminf(lo, 0.f);
    hi = fmaxf(hi, 0.f);
    if (sym) {
        hi = fmaxf(hi, -lo);
        if (lo < 0.f) lo = -hi;
    }
    if (lo == 0.f && hi == 0.f) {
        lo = -1.f;
        hi = 1.f;
    }
    const float s = f16_scale(__fdiv_rn(__fsub_rn(hi, lo), mq));
    if (sym) {
        *scale = s;
        *zero = (maxq + 1) / 2;
        return;
    }
    const float z = rintf(__fdiv_rn(-lo, s));
    if (z < 1.f) {
        // z >= 1 so that GPTQ v1 checkpoints (which store z - 1) can hold it.
        *scale = f16_scale(__fdiv_rn(hi, mq - 1.f));
        *zero = 1;
        return;
    }
    *scale = s;
    *zero = (int)fminf(z, mq);
}

__device__ __forceinline__ int gptq_code(float v, float scale, int zero, int maxq) {
    const float q = rintf(__fdiv_rn(v, scale)) + (float)zero;
    return (int)fminf(fmaxf(q, 0.f), (float)maxq);
}

__device__ __forceinline__ float gptq_value(int code, float scale, int zero) {
    return __fmul_rn((float)code - (float)zero, scale);
}

// dst += src on the upper triangle (row-major; column >= row) of n x n.
extern "C" __global__ void gptq_acc_upper(const float* __restrict__ src, double* __restrict__ dst,
                                          int n) {
    pdl_start();
    const u64 total = (u64)n * n;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        const int r = (int)(i / n), c = (int)(i % n);
        if (c >= r) dst[i] += (double)src[i];
    }
}

// h = scale * sum, the lower triangle mirrored from the upper one.
extern "C" __global__ void gptq_hessian_finish(const double* __restrict__ sum,
                                               double* __restrict__ h, int n, double scale) {
    pdl_start();
    const u64 total = (u64)n * n;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        const int r = (int)(i / n), c = (int)(i % n);
        h[i] = scale * (c >= r ? sum[i] : sum[(u64)c * n + r]);
    }
}

// d[i] = h[i, i].
extern "C" __global__ void gptq_diag(const double* __restrict__ h, double* __restrict__ d, int n) {
    pdl_start();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) d[i] = h[(u64)i * n + i];
}

// a = H permuted (a[i, j] = h[perm[i], perm[j]]), dead inputs (zero
// diagonal) given 1 on the diagonal, plus `add` on the diagonal.
extern "C" __global__ void gptq_prepare_h(const double* __restrict__ h, double* __restrict__ a,
                                          const int* __restrict__ perm, int n, double add) {
    pdl_start();
    const u64 total = (u64)n * n;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        const int r = (int)(i / n), c = (int)(i % n);
        double v = h[(u64)perm[r] * n + perm[c]];
        if (r == c) v = (v == 0.0 ? 1.0 : v) + add;
        a[i] = v;
    }
}

// wp = W with columns permuted (wp[r, j] = w[r, perm[j]]) and dead inputs zeroed.
extern "C" __global__ void gptq_prepare_w(const float* __restrict__ w, float* __restrict__ wp,
                                          const int* __restrict__ perm,
                                          const double* __restrict__ h, int out, int n) {
    pdl_start();
    const u64 total = (u64)out * n;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / n;
        const int c = perm[i % n];
        wp[i] = h[(u64)c * n + c] == 0.0 ? 0.f : w[r * n + c];
    }
}

// U = the upper triangle of the row-major view of `l`, a column-major lower
// Cholesky factor (so U = L^T), rounded to f32; zeros below the diagonal.
extern "C" __global__ void gptq_upper_f32(const double* __restrict__ l, float* __restrict__ u,
                                          int n) {
    pdl_start();
    const u64 total = (u64)n * n;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        const int r = (int)(i / n), c = (int)(i % n);
        u[i] = c >= r ? (float)l[i] : 0.f;
    }
}

// Grids of the original column groups of W (dead inputs read as zero), one
// thread per (row, group): scales/zeros are [out, groups].
extern "C" __global__ void gptq_static_grids(const float* __restrict__ w,
                                             const double* __restrict__ h,
                                             float* __restrict__ scales, u16* __restrict__ zeros,
                                             int out, int n, int gs, int groups, int bits,
                                             int sym) {
    pdl_start();
    const u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    if (i >= (u64)out * groups) return;
    const u64 r = i / groups;
    const int g = (int)(i % groups);
    const int end = min(n, (g + 1) * gs);
    float lo = QB_INF, hi = -QB_INF;
    for (int c = g * gs; c < end; ++c) {
        const float v = h[(u64)c * n + c] == 0.0 ? 0.f : w[r * n + c];
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
    }
    float scale;
    int zero;
    gptq_fit(lo, hi, bits, sym, &scale, &zero);
    scales[i] = scale;
    zeros[i] = (u16)zero;
}

// One lazy-update block of the GPTQ column loop: columns i1 .. i1+count of
// every row of w ([out, n], columns in quantization order), one warp per
// row, the row's block held in shared memory (count floats per warp).
// Column j: fit the group grid when j starts a group (over the row's current
// values of the group, inside and after the block), q = code(w_j),
// e = (w_j - value(q)) / U_jj, w_k -= e * U_jk for the block's later columns.
// Writes codes ([out, n]), the errors ([out, count]) and the grids
// (scales/zeros [out, groups]); with `fixed`, grids are read instead: the
// static grid of original column perm[j].
extern "C" __global__ void gptq_block(const float* __restrict__ w, const float* __restrict__ u,
                                      u8* __restrict__ codes, float* __restrict__ err,
                                      float* __restrict__ scales, u16* __restrict__ zeros,
                                      const int* __restrict__ perm, int out, int n, int i1,
                                      int count, int gs, int groups, int bits, int sym,
                                      int fixed) {
    pdl_start();
    extern __shared__ float gptq_seg[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r = blockIdx.x * (blockDim.x >> 5) + warp;
    if (r >= out) return;
    float* seg = gptq_seg + (size_t)warp * count;
    const float* wr = w + (u64)r * n;
    for (int k = lane; k < count; k += 32) seg[k] = wr[i1 + k];
    __syncwarp();
    const int maxq = (1 << bits) - 1;
    float* sr = scales + (u64)r * groups;
    u16* zr = zeros + (u64)r * groups;
    float scale = 0.f;
    int zero = 0;
    if (!fixed && i1 % gs != 0) {
        scale = sr[i1 / gs];
        zero = zr[i1 / gs];
    }
    const int i2 = i1 + count;
    for (int j = 0; j < count; ++j) {
        const int col = i1 + j;
        if (fixed) {
            const int g = perm[col] / gs;
            scale = sr[g];
            zero = zr[g];
        } else if (col % gs == 0) {
            const int end = min(col + gs, n);
            float lo = QB_INF, hi = -QB_INF;
            for (int k = col + lane; k < end; k += 32) {
                const float v = k < i2 ? seg[k - i1] : wr[k];
                lo = fminf(lo, v);
                hi = fmaxf(hi, v);
            }
            lo = warp_min(lo);
            hi = warp_max(hi);
            gptq_fit(lo, hi, bits, sym, &scale, &zero);
            if (lane == 0) {
                sr[col / gs] = scale;
                zr[col / gs] = (u16)zero;
            }
        }
        const float v = seg[j];
        const int q = gptq_code(v, scale, zero, maxq);
        const float e = __fdiv_rn(__fsub_rn(v, gptq_value(q, scale, zero)), u[(u64)col * n + col]);
        if (lane == 0) {
            codes[(u64)r * n + col] = (u8)q;
            err[(u64)r * count + j] = e;
        }
        const float* ur = u + (u64)col * n + i1;
        for (int k = j + 1 + lane; k < count; k += 32) seg[k] = __fsub_rn(seg[k], __fmul_rn(e, ur[k]));
        __syncwarp();
    }
}
