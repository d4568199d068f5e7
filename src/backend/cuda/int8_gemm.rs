//! LLM.int8() for batches larger than the GEMV kernels take
//! (`int8_gemm.cu`): per-token int8 activations with outlier columns set
//! apart, the int8 × int8 → int32 product in cuBLAS, then one kernel that
//! dequantizes with the token and row scales and adds the outlier columns'
//! products. Each step does the CPU reference's arithmetic (`quant::int8`),
//! so the results are the same bit for bit.

use std::ffi::c_void;

use anyhow::Result;
use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::result;

use super::gpu::{Gpu, arg};
use super::matmul::dtype_mode;
use super::tensor::CudaTensor;
use super::weights::CudaInt8;

/// Threads per block of every kernel here (`int8_gemm_outliers` counts
/// flags with exactly 8 warps).
const THREADS: u32 = 256;
/// Tokens × output rows per `int8_gemm_dequant` block.
const DEQUANT_TILE: (usize, usize) = (32, 64);

/// Whether [`matmul`] takes `q`: cuBLAS's int8 GEMM wants leading
/// dimensions that are multiples of 4 (both the weight's and the output's).
pub fn supported(q: &CudaInt8) -> bool {
    q.rows.is_multiple_of(4) && q.cols.is_multiple_of(4)
}

/// `y = x · Wᵀ` for the LLM.int8() weight `q` (see [`supported`]).
pub fn matmul(gpu: &Gpu, q: &CudaInt8, x: &CudaTensor, y: &CudaTensor) -> Result<()> {
    let (n, k, out) = (x.rows, q.cols, q.rows);
    // Token rows padded to a multiple of 4 (zero codes) so that every
    // dimension of the int8 product is one.
    let n4 = n.next_multiple_of(4);
    let flag = gpu.alloc(k)?;
    let codes = gpu.alloc(n4 * k)?;
    let sca = gpu.alloc(n * 4)?;
    let outliers = gpu.alloc(n * k * 4)?;
    let list = gpu.alloc((k + 1) * 4)?;
    let acc = gpu.alloc(n4 * out * 4)?;
    let (xp, fp, cp, sp, op, lp, ap) = (
        x.ptr(),
        flag.ptr(),
        codes.ptr(),
        sca.ptr(),
        outliers.ptr(),
        list.ptr(),
        acc.ptr(),
    );
    let (ni, ki, oi, thr) = (n as i32, k as i32, out as i32, q.threshold);
    let cd = dtype_mode(q.compute_dtype);
    unsafe { result::memset_d8_async(fp, 0, k, gpu.stream.cu_stream()) }?;
    gpu.launch(
        "int8_gemm_quant",
        (n4 as u32, 1, 1),
        THREADS,
        0,
        &mut [
            arg(&xp),
            arg(&cp),
            arg(&sp),
            arg(&fp),
            arg(&ni),
            arg(&ki),
            arg(&thr),
            arg(&cd),
        ],
    )?;
    gpu.launch(
        "int8_gemm_outliers",
        (n as u32, 1, 1),
        THREADS,
        0,
        &mut [
            arg(&xp),
            arg(&fp),
            arg(&cp),
            arg(&op),
            arg(&lp),
            arg(&ki),
            arg(&cd),
        ],
    )?;
    let (one, zero) = (1i32, 0i32);
    // Column-major view: acc(out x n4) = CB(k x out)ᵀ · codes(k x n4).
    unsafe {
        gemm_ex(
            *gpu.blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            oi,
            n4 as i32,
            ki,
            &one as *const i32 as *const c_void,
            q.cb.ptr() as *const c_void,
            cudaDataType::CUDA_R_8I,
            ki,
            cp as *const c_void,
            cudaDataType::CUDA_R_8I,
            ki,
            &zero as *const i32 as *const c_void,
            ap as *mut c_void,
            cudaDataType::CUDA_R_32I,
            oi,
            cublasComputeType_t::CUBLAS_COMPUTE_32I,
            cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
        )
    }
    .map_err(|e| anyhow::anyhow!("int8 cublasGemmEx ({out}x{k} weight, {n} rows): {e:?}"))?;
    let (cbp, scbp, yp) = (q.cb.ptr(), q.scb.ptr(), y.ptr());
    let grid = (
        out.div_ceil(DEQUANT_TILE.1) as u32,
        n.div_ceil(DEQUANT_TILE.0) as u32,
        1,
    );
    gpu.launch(
        "int8_gemm_dequant",
        grid,
        THREADS,
        0,
        &mut [
            arg(&ap),
            arg(&sp),
            arg(&scbp),
            arg(&cbp),
            arg(&op),
            arg(&lp),
            arg(&yp),
            arg(&ni),
            arg(&oi),
            arg(&ki),
            arg(&cd),
        ],
    )
}
