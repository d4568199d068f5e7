// LLM.int8() for batches larger than gemv_int8 takes, with the arithmetic of
// the CPU reference (src/quant/int8.rs) step for step, so that results match
// it bit for bit; the int8 x int8 -> int32 product runs in cuBLAS between
// these kernels. Activations are first rounded to the compute dtype `cd`
// (rnd, gemv.cu).
//
// 1. int8_gemm_quant, one block per row (rows padded to a multiple of 4 get
//    zero codes): the absmax over the elements below the threshold, codes
//    round_half_even(x * (127 / absmax)) in every column, and a flag on
//    every column holding an element at or above the threshold.
// 2. int8_gemm_outliers, one block per row: the flagged columns in
//    ascending order; the row's codes there become 0 and its values there
//    are kept apart. Block 0 writes the list: [count, columns...].
// 3. cuBLAS: acc[t, o] = sum_j codes[t, j] * cb[o, j] in int32.
// 4. int8_gemm_dequant: y = rnd(acc * (sca * scb) * (1/127^2)), and with outlier
//    columns y = rnd(y + sum_i x[t, c_i] * rnd(cb[o, c_i] * scb * (1/127)))
//    summed in column order with separately rounded products, like the CPU.

// bitsandbytes' 1/127 and 1/127^2 as the CPU reference rounds them to f32.
#define I8_INV_127 __int_as_float(0x3c010204)
#define I8_INV_127_SQ __int_as_float(0x38820610)

// Needs k % 4 == 0. Flags must be zero beforehand.
extern "C" __global__ void __launch_bounds__(256)
int8_gemm_quant(const float* __restrict__ x, signed char* __restrict__ xq,
                float* __restrict__ sca, u8* __restrict__ flag, int n, int k, float threshold,
                int cd) {
    pdl_start();
    __shared__ float sh[33];
    const int t = blockIdx.x;
    const int k4 = k >> 2;
    u32* qr = (u32*)(xq + (size_t)t * k);
    if (t >= n) {
        for (int c = threadIdx.x; c < k4; c += blockDim.x) qr[c] = 0u;
        return;
    }
    const float4* xr = (const float4*)(x + (size_t)t * k);
    float m = 0.f;
    for (int c = threadIdx.x; c < k4; c += blockDim.x) {
        const float4 v4 = xr[c];
        const float v[4] = {v4.x, v4.y, v4.z, v4.w};
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float a = fabsf(rnd(v[e], cd));
            if (threshold > 0.f && a >= threshold)
                flag[4 * c + e] = 1;
            else
                m = fmaxf(m, a);
        }
    }
    m = warp_max(m);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sh[warp] = m;
    __syncthreads();
    if (warp == 0) {
        float a = lane < (int)(blockDim.x >> 5) ? sh[lane] : 0.f;
        a = warp_max(a);
        if (lane == 0) sh[32] = a;
    }
    __syncthreads();
    const float a = sh[32];
    const float scale = 127.0f / a;
    for (int c = threadIdx.x; c < k4; c += blockDim.x) {
        const float4 v4 = xr[c];
        const float v[4] = {v4.x, v4.y, v4.z, v4.w};
        u32 packed = 0;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float code =
                a == 0.f ? 0.f
                         : fminf(fmaxf(rintf(__fmul_rn(rnd(v[e], cd), scale)), -127.f), 127.f);
            packed |= ((u32)(int)code & 0xffu) << (8 * e);
        }
        qr[c] = packed;
    }
    if (threadIdx.x == 0) sca[t] = a;
}

// Outlier values go to xo[t * k + i] for the i-th flagged column.
extern "C" __global__ void __launch_bounds__(256)
int8_gemm_outliers(const float* __restrict__ x, const u8* __restrict__ flag,
                     signed char* __restrict__ xq, float* __restrict__ xo, u32* __restrict__ list,
                     int k, int cd) {
    pdl_start();
    __shared__ int counts[8];
    const int t = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int base = 0;
    for (int j0 = 0; j0 < k; j0 += 256) {
        const int j = j0 + threadIdx.x;
        const bool f = j < k && flag[j] != 0;
        const u32 bits = __ballot_sync(0xffffffffu, f);
        __syncthreads();  // the previous round's counts are read
        if (lane == 0) counts[warp] = __popc(bits);
        __syncthreads();
        int before = base;
        for (int w = 0; w < warp; w++) before += counts[w];
        if (f) {
            const int i = before + __popc(bits & ((1u << lane) - 1u));
            xq[(size_t)t * k + j] = 0;
            xo[(size_t)t * k + i] = rnd(x[(size_t)t * k + j], cd);
            if (t == 0) list[1 + i] = (u32)j;
        }
        for (int w = 0; w < 8; w++) base += counts[w];
    }
    if (t == 0 && threadIdx.x == 0) list[0] = (u32)base;
}

// Block: 32 tokens x 64 output rows; thread (ty, tx) owns row tx and tokens
// 8 ty .. 8 ty + 7. acc is [>= n, out] int32.
extern "C" __global__ void __launch_bounds__(256)
int8_gemm_dequant(const int* __restrict__ acc, const float* __restrict__ sca,
             const float* __restrict__ scb, const signed char* __restrict__ cb,
             const float* __restrict__ xo, const u32* __restrict__ list, float* __restrict__ y,
             int n, int out, int k, int cd) {
    pdl_start();
    __shared__ float xs[32][33];
    __shared__ float ws[64][33];
    const int tx = threadIdx.x & 63, ty = threadIdx.x >> 6;
    const int o = blockIdx.x * 64 + tx;
    const int t0 = blockIdx.y * 32;
    const int count = (int)list[0];
    float e[8];
#pragma unroll
    for (int r = 0; r < 8; r++) e[r] = 0.f;
    for (int i0 = 0; i0 < count; i0 += 32) {
        const int m = min(32, count - i0);
        __syncthreads();
        for (int idx = threadIdx.x; idx < 32 * 32; idx += blockDim.x) {
            const int r = idx >> 5, i = idx & 31;
            xs[r][i] = (t0 + r < n && i < m) ? xo[(size_t)(t0 + r) * k + i0 + i] : 0.f;
        }
        for (int idx = threadIdx.x; idx < 64 * 32; idx += blockDim.x) {
            const int r = idx >> 5, i = idx & 31;
            const int row = blockIdx.x * 64 + r;
            float w = 0.f;
            if (row < out && i < m) {
                const int j = (int)list[1 + i0 + i];
                w = rnd(__fmul_rn(__fmul_rn((float)cb[(size_t)row * k + j], scb[row]), I8_INV_127),
                        cd);
            }
            ws[r][i] = w;
        }
        __syncthreads();
        for (int i = 0; i < m; i++) {
            const float w = ws[tx][i];
#pragma unroll
            for (int r = 0; r < 8; r++) e[r] = __fadd_rn(e[r], __fmul_rn(xs[ty * 8 + r][i], w));
        }
    }
    if (o >= out) return;
    const float so = scb[o];
#pragma unroll
    for (int r = 0; r < 8; r++) {
        const int t = t0 + ty * 8 + r;
        if (t < n) {
            const float s = __fmul_rn((float)acc[(size_t)t * out + o], __fmul_rn(sca[t], so));
            float v = rnd(__fmul_rn(s, I8_INV_127_SQ), cd);
            if (count > 0) v = rnd(__fadd_rn(v, e[r]), cd);
            y[(size_t)t * out + o] = v;
        }
    }
}
