//! `y[n, out] = x[n, in] · Wᵀ` for every weight format: small batches go
//! through the GEMV kernels (weights streamed once, in their storage format),
//! larger ones through cuBLAS.

use std::ffi::c_void;

use anyhow::{Context, Result, bail};
use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::sys::CUdeviceptr;

use super::gpu::{Gpu, arg};
use super::tensor::CudaTensor;
use super::weights::CudaWeight;
use crate::tensor::DType;

/// Largest batch the GEMV kernels take.
pub const GEMV_MAX_ROWS: usize = 8;
/// Warps per GEMV block (matches `GEMV_WARPS` in gemv.cu).
const GEMV_WARPS: usize = 8;

/// Products of `x` with `w`.
pub fn matmul(gpu: &Gpu, x: &CudaTensor, w: &CudaWeight) -> Result<CudaTensor> {
    let (out_f, in_f) = w.shape();
    if x.cols != in_f {
        bail!(
            "matmul: input has {} columns, weight expects {in_f}",
            x.cols
        );
    }
    let y = CudaTensor::empty(gpu, x.rows, out_f)?;
    if x.rows == 0 {
        return Ok(y);
    }
    match w {
        CudaWeight::Dense { dtype, buf, .. } => {
            if x.rows <= GEMV_MAX_ROWS && in_f % 8 == 0 {
                let name = match dtype {
                    DType::F32 => "gemv_f32",
                    DType::F16 => "gemv_f16",
                    DType::BF16 => "gemv_bf16",
                };
                gemv(gpu, name, &[buf.ptr()], x, &y, out_f, in_f, 2)?;
            } else {
                gemm_dense(gpu, *dtype, buf.ptr(), x, &y, out_f, in_f)?;
            }
        }
    }
    Ok(y)
}

/// How many warps share one row group so that about 32 warps per SM are busy.
pub fn gemv_ksplit(gpu: &Gpu, out_f: usize, in_chunks: usize, rows_per_warp: usize) -> usize {
    let groups = out_f.div_ceil(rows_per_warp);
    let want = gpu.sm_count * 32;
    let mut k = 1;
    while k < GEMV_WARPS && groups * k < want && in_chunks >= 64 * k {
        k *= 2;
    }
    k
}

/// Launches GEMV kernel `name` whose leading pointer arguments are `ptrs`
/// (the weight's buffers), followed by x, y, n, out, in, ksplit.
#[allow(clippy::too_many_arguments)]
pub fn gemv(
    gpu: &Gpu,
    name: &str,
    ptrs: &[CUdeviceptr],
    x: &CudaTensor,
    y: &CudaTensor,
    out_f: usize,
    in_f: usize,
    rows_per_warp: usize,
) -> Result<()> {
    let ksplit = gemv_ksplit(gpu, out_f, in_f / 8, rows_per_warp);
    let groups_per_block = GEMV_WARPS / ksplit;
    let blocks = out_f.div_ceil(rows_per_warp * groups_per_block);
    let (xp, yp) = (x.ptr(), y.ptr());
    let (n, o, i, k) = (x.rows as i32, out_f as i32, in_f as i32, ksplit as i32);
    let mut args: Vec<*mut c_void> = ptrs.iter().map(arg).collect();
    args.extend([arg(&xp), arg(&yp), arg(&n), arg(&o), arg(&i), arg(&k)]);
    gpu.launch(
        name,
        (blocks as u32, 1, 1),
        (GEMV_WARPS * 32) as u32,
        0,
        &mut args,
    )
}

/// cuBLAS product with the weight `w` (`[out, in]` row-major, stored as
/// `w_type`) and activations `b` (`[n, in]`, stored as `b_type`), into f32
/// `y`, adding to `y` when `accumulate`.
#[allow(clippy::too_many_arguments)]
pub fn cublas_gemm(
    gpu: &Gpu,
    w: CUdeviceptr,
    w_type: cudaDataType,
    b: CUdeviceptr,
    b_type: cudaDataType,
    y: &CudaTensor,
    n: usize,
    out_f: usize,
    in_f: usize,
    accumulate: bool,
) -> Result<()> {
    let alpha = 1.0f32;
    let beta = if accumulate { 1.0f32 } else { 0.0 };
    // Column-major view: Y(out x n) = W(in x out)ᵀ · X(in x n).
    unsafe {
        gemm_ex(
            *gpu.blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            out_f as i32,
            n as i32,
            in_f as i32,
            &alpha as *const f32 as *const c_void,
            w as *const c_void,
            w_type,
            in_f as i32,
            b as *const c_void,
            b_type,
            in_f as i32,
            &beta as *const f32 as *const c_void,
            y.ptr() as *mut c_void,
            cudaDataType::CUDA_R_32F,
            out_f as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
        )
    }
    .map_err(|e| anyhow::anyhow!("cublasGemmEx ({out_f}x{in_f} weight, {n} rows): {e:?}"))
}

/// Dense GEMM: f32 weights in full f32; f16 weights against f16-rounded
/// activations; bf16 weights against activations split into two bf16 terms
/// (about 16 significant bits), all accumulated in f32.
pub fn gemm_dense(
    gpu: &Gpu,
    dtype: DType,
    w: CUdeviceptr,
    x: &CudaTensor,
    y: &CudaTensor,
    out_f: usize,
    in_f: usize,
) -> Result<()> {
    let n = x.rows;
    let len = x.len();
    let grid = (len.div_ceil(256).clamp(1, gpu.sm_count * 16) as u32, 1, 1);
    match dtype {
        DType::F32 => cublas_gemm(
            gpu,
            w,
            cudaDataType::CUDA_R_32F,
            x.ptr(),
            cudaDataType::CUDA_R_32F,
            y,
            n,
            out_f,
            in_f,
            false,
        ),
        DType::F16 => {
            let xh = gpu.alloc(len * 2)?;
            let (xp, hp) = (x.ptr(), xh.ptr());
            gpu.launch(
                "f32_to_f16",
                grid,
                256,
                0,
                &mut [arg(&xp), arg(&hp), arg(&len)],
            )?;
            cublas_gemm(
                gpu,
                w,
                cudaDataType::CUDA_R_16F,
                hp,
                cudaDataType::CUDA_R_16F,
                y,
                n,
                out_f,
                in_f,
                false,
            )
        }
        DType::BF16 => {
            let hi = gpu.alloc(len * 2)?;
            let lo = gpu.alloc(len * 2)?;
            let (xp, hp, lp) = (x.ptr(), hi.ptr(), lo.ptr());
            gpu.launch(
                "f32_to_bf16_split",
                grid,
                256,
                0,
                &mut [arg(&xp), arg(&hp), arg(&lp), arg(&len)],
            )?;
            cublas_gemm(
                gpu,
                w,
                cudaDataType::CUDA_R_16BF,
                hp,
                cudaDataType::CUDA_R_16BF,
                y,
                n,
                out_f,
                in_f,
                false,
            )?;
            cublas_gemm(
                gpu,
                w,
                cudaDataType::CUDA_R_16BF,
                lp,
                cudaDataType::CUDA_R_16BF,
                y,
                n,
                out_f,
                in_f,
                true,
            )
        }
    }
    .context("dense GEMM")
}
