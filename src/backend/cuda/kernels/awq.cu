// AWQ: capture of a linear input (Σ|x| per channel, kept tokens), the
// fake quantization of the scale search (W·diag(s) on AWQ's min-max grid,
// then divided by s) and of the clipping search (groups clamped to a shrunk
// maximum), and the error sums of both searches. Grid fitting and rounding
// follow src/quant/rtn.rs (GridRule::MinMax) operation for operation, with
// explicitly rounded arithmetic so that no multiply-add is contracted; error
// sums are f64, as on the CPU.

// AWQ's grid of a group spanning [lo, hi]: scale, zero point, largest code.
struct AwqGrid {
    float scale, zero, maxq;
};

__device__ __forceinline__ AwqGrid awq_fit(float lo, float hi, int bits) {
    const float mq = (float)((1 << bits) - 1);
    const float s = f16_scale(__fdiv_rn(fmaxf(__fsub_rn(hi, lo), 1e-5f), mq));
    const float z = fminf(fmaxf(-rintf(__fdiv_rn(lo, s)), 0.f), mq);
    return AwqGrid{s, z, mq};
}

// v rounded onto the grid: (clamp(round(v / s) + z, 0, maxq) - z) * s.
__device__ __forceinline__ float awq_round(float v, AwqGrid g) {
    const float q = fminf(fmaxf(__fadd_rn(rintf(__fdiv_rn(v, g.scale)), g.zero), 0.f), g.maxq);
    return __fmul_rn(__fsub_rn(q, g.zero), g.scale);
}

// One warp per (row, group) item of a [rows, cols] matrix with groups of gs
// columns: the row and the group's column range, or false past the end.
__device__ __forceinline__ bool awq_warp_item(int rows, int cols, int gs, int g0, int gcount,
                                              u64* r, int* g, int* c0, int* c1) {
    const u64 item = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (item >= (u64)rows * gcount) return false;
    *r = item / gcount;
    *g = g0 + (int)(item % gcount);
    *c0 = *g * gs;
    *c1 = min(cols, *c0 + gs);
    return true;
}

// partial[chunk, c] = Σ |x[r, c]| (f64) over the chunk-th run of `chunk`
// rows of x ([rows, cols]); grid (cols / blockDim, chunks).
extern "C" __global__ void awq_abs_partial(const float* __restrict__ x, double* __restrict__ partial,
                                           int rows, int cols, int chunk) {
    pdl_start();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const int r0 = blockIdx.y * chunk, r1 = min(rows, r0 + chunk);
    double s = 0.0;
    for (int r = r0; r < r1; ++r) s += (double)fabsf(x[(u64)r * cols + c]);
    partial[(u64)blockIdx.y * cols + c] = s;
}

// sums[c] += Σ_i partial[i, c], in order of i.
extern "C" __global__ void awq_abs_accumulate(const double* __restrict__ partial,
                                              double* __restrict__ sums, int chunks, int cols) {
    pdl_start();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    double s = sums[c];
    for (int i = 0; i < chunks; ++i) s += partial[(u64)i * cols + c];
    sums[c] = s;
}

// dst[j, c] = x[first + j * stride, c] (divided by s[c] when s is given),
// for j < count; x and dst have `cols` columns.
extern "C" __global__ void awq_gather_rows(const float* __restrict__ x,
                                           const float* __restrict__ s, float* __restrict__ dst,
                                           int cols, long long first, long long stride,
                                           long long count) {
    pdl_start();
    const u64 total = (u64)count * cols;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        const u64 j = i / cols;
        const int c = (int)(i % cols);
        const float v = x[((u64)first + j * (u64)stride) * cols + c];
        dst[i] = s ? __fdiv_rn(v, s[c]) : v;
    }
}

// Scale search: out = Q(w·diag(s))·diag(1/s), one warp per (row, group).
extern "C" __global__ void awq_scale_quant(const float* __restrict__ w,
                                           const float* __restrict__ s, float* __restrict__ out,
                                           int rows, int cols, int gs, int bits) {
    pdl_start();
    u64 r;
    int g, c0, c1;
    if (!awq_warp_item(rows, cols, gs, 0, (cols + gs - 1) / gs, &r, &g, &c0, &c1)) return;
    const int lane = threadIdx.x & 31;
    const float* wr = w + r * cols;
    float lo = QB_INF, hi = -QB_INF;
    for (int c = c0 + lane; c < c1; c += 32) {
        const float v = __fmul_rn(wr[c], s[c]);
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
    }
    const AwqGrid grid = awq_fit(warp_min(lo), warp_max(hi), bits);
    for (int c = c0 + lane; c < c1; c += 32)
        out[r * cols + c] = __fdiv_rn(awq_round(__fmul_rn(wr[c], s[c]), grid), s[c]);
}

// wmax[r, g] = max |w| over row r's group g (0 for an all-zero group).
extern "C" __global__ void awq_group_absmax(const float* __restrict__ w, float* __restrict__ wmax,
                                            int rows, int cols, int gs) {
    pdl_start();
    const int groups = (cols + gs - 1) / gs;
    u64 r;
    int g, c0, c1;
    if (!awq_warp_item(rows, cols, gs, 0, groups, &r, &g, &c0, &c1)) return;
    const int lane = threadIdx.x & 31;
    float m = 0.f;
    for (int c = c0 + lane; c < c1; c += 32) m = fmaxf(m, fabsf(w[r * cols + c]));
    m = warp_max(m);
    if (lane == 0) wmax[r * groups + g] = m;
}

// Clipping search, one step: for groups g0 .. g0+gcount of every row, the
// values clamped to ±wmax·shrink and rounded onto the clamped group's grid.
extern "C" __global__ void awq_clip_quant(const float* __restrict__ w,
                                          const float* __restrict__ wmax, float* __restrict__ out,
                                          int rows, int cols, int gs, int g0, int gcount, int bits,
                                          float shrink) {
    pdl_start();
    const int groups = (cols + gs - 1) / gs;
    u64 r;
    int g, c0, c1;
    if (!awq_warp_item(rows, cols, gs, g0, gcount, &r, &g, &c0, &c1)) return;
    const int lane = threadIdx.x & 31;
    const float lim = __fmul_rn(wmax[r * groups + g], shrink);
    const float* wr = w + r * cols;
    float lo = QB_INF, hi = -QB_INF;
    for (int c = c0 + lane; c < c1; c += 32) {
        const float v = fminf(fmaxf(wr[c], -lim), lim);
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
    }
    const AwqGrid grid = awq_fit(warp_min(lo), warp_max(hi), bits);
    for (int c = c0 + lane; c < c1; c += 32)
        out[r * cols + c] = awq_round(fminf(fmaxf(wr[c], -lim), lim), grid);
}

// Clipping search, one step: per (group, row) of the chunk, the partial
// output error Σ_j (out − org)² / tt over the chunk's products
// ([gcount, tt, m] each), summed in f64 in token order as on the CPU; where it
// is lower than the best so far (strictly: ties and NaN keep the earlier
// step), it becomes the best and the group's maximum wmax·shrink is kept.
// best_max, best_err and wmax are [m, groups].
extern "C" __global__ void awq_clip_update(const float* __restrict__ out,
                                           const float* __restrict__ org,
                                           const float* __restrict__ wmax,
                                           float* __restrict__ best_max,
                                           double* __restrict__ best_err, int tt, int m, int g0,
                                           int gcount, int groups, float shrink) {
    pdl_start();
    const u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    if (i >= (u64)gcount * m) return;
    const u64 gl = i / m, r = i % m;
    const float* o = out + gl * tt * m + r;
    const float* a = org + gl * tt * m + r;
    double e = 0.0;
    for (int j = 0; j < tt; ++j) {
        const double d = (double)__fsub_rn(o[(u64)j * m], a[(u64)j * m]);
        e = __dadd_rn(e, __dmul_rn(d, d));
    }
    e = __ddiv_rn(e, (double)tt);
    const u64 idx = r * groups + g0 + gl;
    if (e < best_err[idx]) {
        best_err[idx] = e;
        best_max[idx] = __fmul_rn(wmax[idx], shrink);
    }
}

// partial[blockIdx.x] = Σ (a − b)² over a grid-stride share of n values, in
// f64 (the difference in f32, as the CPU takes it); blockDim.x = 256.
extern "C" __global__ void awq_sq_err(const float* __restrict__ a, const float* __restrict__ b,
                                      u64 n, double* __restrict__ partial) {
    pdl_start();
    __shared__ double sh[256];
    double e = 0.0;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        const double d = (double)__fsub_rn(a[i], b[i]);
        e = __dadd_rn(e, __dmul_rn(d, d));
    }
    sh[threadIdx.x] = e;
    __syncthreads();
    for (int h = blockDim.x >> 1; h > 0; h >>= 1) {
        if (threadIdx.x < h) sh[threadIdx.x] = __dadd_rn(sh[threadIdx.x], sh[threadIdx.x + h]);
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}
