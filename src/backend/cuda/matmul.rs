//! `y[n, out] = x[n, in] · Wᵀ` for every weight format: small batches go
//! through the GEMV kernels ([`super::gemv`]), larger ones through cuBLAS
//! (quantized weights dequantized into a scratch matrix first), LLM.int8()
//! through its own kernels.

use std::ffi::c_void;

use anyhow::{Context, Result, bail};
use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::sys::CUdeviceptr;

use super::gemv::{
    GEMV_MAX_ROWS, GEMV_WARPS, GemvWeight, dtype_mode, gemv_ksplit, product,
};
use super::gpu::{Gpu, arg};
use super::tensor::CudaTensor;
use super::weights::{CudaBnb4, CudaInt8, CudaPacked, CudaWeight};
use crate::tensor::DType;

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
    if x.rows <= GEMV_MAX_ROWS
        && let Some(g) = GemvWeight::of(w)
    {
        product(gpu, &g, x, &y, out_f, false)?;
        return Ok(y);
    }
    match w {
        CudaWeight::Dense { dtype, buf, .. } => gemm_dense(gpu, *dtype, buf.ptr(), x, &y, out_f, in_f)?,
        CudaWeight::Bnb4(q) => matmul_bnb4(gpu, q, x, &y)?,
        CudaWeight::Packed(q) => matmul_packed(gpu, q, x, &y)?,
        CudaWeight::Int8(q) => matmul_int8(gpu, q, x, &y)?,
    }
    Ok(y)
}

/// Grid for a grid-stride loop over `n` items with 256-thread blocks.
fn grid_for(gpu: &Gpu, n: usize) -> (u32, u32, u32) {
    (n.div_ceil(256).clamp(1, gpu.sm_count * 16) as u32, 1, 1)
}

/// NF4/FP4 for batches past the GEMV: the weight is dequantized into a
/// scratch matrix (exact in its dtype) for cuBLAS.
fn matmul_bnb4(gpu: &Gpu, q: &CudaBnb4, x: &CudaTensor, y: &CudaTensor) -> Result<()> {
    let cd = dtype_mode(q.compute_dtype);
    // Dequantized values are exact in the compute dtype when it rounds them,
    // else in the weight dtype.
    let scratch_dtype = if q.compute_dtype != DType::F32 && q.compute_dtype != q.dtype {
        q.compute_dtype
    } else {
        q.dtype
    };
    let mode = dtype_mode(scratch_dtype);
    let scratch = gpu.alloc(q.rows * q.cols * scratch_dtype.size_bytes())?;
    let sp = scratch.ptr();
    let (o, i) = (q.rows as i32, q.cols as i32);
    let params = GemvWeight::bnb4(q);
    let mut args = params.args();
    args.extend([arg(&cd), arg(&sp), arg(&o), arg(&i), arg(&mode)]);
    gpu.launch(
        "dequant_bnb4",
        grid_for(gpu, q.rows * q.cols / 8),
        256,
        0,
        &mut args,
    )?;
    gemm_dense(gpu, scratch_dtype, sp, x, y, q.rows, q.cols)?;
    round_output(gpu, y, cd)
}

/// Rounds `y` to the compute dtype `mode` (nothing for f32).
fn round_output(gpu: &Gpu, y: &CudaTensor, mode: i32) -> Result<()> {
    if mode == 0 {
        return Ok(());
    }
    let (yp, n) = (y.ptr(), y.len());
    gpu.launch(
        "round_inplace",
        grid_for(gpu, n),
        256,
        0,
        &mut [arg(&yp), arg(&n), arg(&mode)],
    )
}

/// Packed integers for batches past the GEMV: dequantization to an f16
/// scratch matrix and cuBLAS.
fn matmul_packed(gpu: &Gpu, q: &CudaPacked, x: &CudaTensor, y: &CudaTensor) -> Result<()> {
    let scratch = gpu.alloc(q.rows * q.cols * 2)?;
    let (sp, mode) = (scratch.ptr(), 1i32);
    let (o, i) = (q.rows as i32, q.cols as i32);
    let params = GemvWeight::packed(q);
    let mut args = params.args();
    args.extend([arg(&sp), arg(&o), arg(&i), arg(&mode)]);
    gpu.launch(
        &format!("dequant_packed{}", q.bits),
        grid_for(gpu, q.rows * q.cols / 8),
        256,
        0,
        &mut args,
    )?;
    gemm_dense(gpu, DType::F16, sp, x, y, q.rows, q.cols)
}

/// LLM.int8(): outlier columns, per-token int8 activations, then the int8
/// GEMV with the outlier columns added in the compute dtype, eight tokens
/// at a time (the exact algorithm at every batch size).
fn matmul_int8(gpu: &Gpu, q: &CudaInt8, x: &CudaTensor, y: &CudaTensor) -> Result<()> {
    let (n, k) = (x.rows, q.cols);
    let flag = gpu.alloc(k)?;
    let xq = gpu.alloc(n * k)?;
    let xo = gpu.alloc(n * k * 4)?;
    let sca = gpu.alloc(n * 4)?;
    let (xp, fp, qp, op, sp) = (x.ptr(), flag.ptr(), xq.ptr(), xo.ptr(), sca.ptr());
    let (ni, ki, thr, cd) = (
        n as i32,
        k as i32,
        q.threshold,
        dtype_mode(q.compute_dtype),
    );
    gpu.launch(
        "int8_outlier_cols",
        (k.div_ceil(256) as u32, 1, 1),
        256,
        0,
        &mut [arg(&xp), arg(&fp), arg(&ni), arg(&ki), arg(&thr), arg(&cd)],
    )?;
    gpu.launch(
        "int8_quant_rows",
        (n as u32, 1, 1),
        256,
        0,
        &mut [
            arg(&xp),
            arg(&fp),
            arg(&qp),
            arg(&op),
            arg(&sp),
            arg(&ki),
            arg(&thr),
            arg(&cd),
        ],
    )?;
    // Whether any column can be an outlier decides if the f32 part runs; the
    // kernel checks the flags of each chunk.
    let any = (q.threshold > 0.0) as i32;
    let ksplit = gemv_ksplit(gpu, q.rows, k / 8, 2, 1);
    let blocks = q.rows.div_ceil(2 * (GEMV_WARPS / ksplit));
    let (cb, scb, yp) = (q.cb.ptr(), q.scb.ptr(), y.ptr());
    let (o, ks) = (q.rows as i32, ksplit as i32);
    for t0 in (0..n).step_by(GEMV_MAX_ROWS) {
        let rows = GEMV_MAX_ROWS.min(n - t0) as i32;
        let (xq_t, xo_t, sca_t) = (
            qp + (t0 * k) as u64,
            op + (t0 * k * 4) as u64,
            sp + (t0 * 4) as u64,
        );
        let y_t = yp + (t0 * q.rows * 4) as u64;
        gpu.launch(
            "gemv_int8",
            (blocks as u32, 1, 1),
            (GEMV_WARPS * 32) as u32,
            0,
            &mut [
                arg(&cb),
                arg(&scb),
                arg(&xq_t),
                arg(&xo_t),
                arg(&sca_t),
                arg(&fp),
                arg(&any),
                arg(&y_t),
                arg(&rows),
                arg(&o),
                arg(&ki),
                arg(&ks),
                arg(&cd),
            ],
        )?;
    }
    Ok(())
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
