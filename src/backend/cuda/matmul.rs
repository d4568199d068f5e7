//! `y[n, out] = x[n, in] · Wᵀ` for every weight format: small batches go
//! through the GEMV kernels (weights streamed once, in their storage format),
//! larger ones through cuBLAS.

use std::ffi::c_void;

use anyhow::{Context, Result, bail};
use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::sys::CUdeviceptr;

use super::gpu::{Arg, Gpu, arg};
use super::int8_gemm;
use super::tensor::CudaTensor;
use super::weights::{CudaBnb4, CudaInt8, CudaPacked, CudaWeight};
use crate::tensor::DType;

/// The kernels' code for a compute dtype: 0 f32, 1 f16, 2 bf16.
pub fn dtype_mode(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// Largest batch the GEMV kernels take.
pub const GEMV_MAX_ROWS: usize = 8;
/// Warps per GEMV block (matches `GEMV_WARPS` in gemv.cu).
const GEMV_WARPS: usize = 8;
/// Chunks of 8 weights each lane loads per round in the format-generic GEMV
/// kernels (matches `GEMV_UNROLL` in gemv.cu). On an H100 (Llama-3.2-1B
/// shapes, batch 1) 1 decoded fastest: 1.77 ms per token against 1.89 (2)
/// and 1.87 (4) with f16 weights.
const GEMV_UNROLL: usize = 1;

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
                let p = buf.ptr();
                gemv(gpu, name, vec![arg(&p)], &[], x, &y, out_f, in_f, 2)?;
            } else {
                gemm_dense(gpu, *dtype, buf.ptr(), x, &y, out_f, in_f)?;
            }
        }
        CudaWeight::Bnb4(q) => matmul_bnb4(gpu, q, x, &y)?,
        CudaWeight::Packed(q) => matmul_packed(gpu, q, x, &y)?,
        CudaWeight::Int8(q) => matmul_int8(gpu, q, x, &y)?,
    }
    Ok(y)
}

/// `silu(x·Gᵀ) ⊙ (x·Uᵀ)` in one fused GEMV when the batch is small and both
/// weights share a format that has a pair kernel; `None` otherwise (the
/// caller then runs the two products and the activation separately).
pub fn gate_up_silu(
    gpu: &Gpu,
    x: &CudaTensor,
    gate: &CudaWeight,
    up: &CudaWeight,
) -> Result<Option<CudaTensor>> {
    let (out_f, in_f) = gate.shape();
    if up.shape() != (out_f, in_f) || x.cols != in_f || x.rows == 0 || x.rows > GEMV_MAX_ROWS {
        return Ok(None);
    }
    let y = CudaTensor::empty(gpu, x.rows, out_f)?;
    match (gate, up) {
        (
            CudaWeight::Dense { dtype, buf, .. },
            CudaWeight::Dense {
                dtype: dtype2,
                buf: buf2,
                ..
            },
        ) if dtype == dtype2 && in_f % 8 == 0 => {
            let name = match dtype {
                DType::F32 => "gemv_f32_pair",
                DType::F16 => "gemv_f16_pair",
                DType::BF16 => "gemv_bf16_pair",
            };
            let (a, b) = (buf.ptr(), buf2.ptr());
            gemv(
                gpu,
                name,
                vec![arg(&a), arg(&b)],
                &[],
                x,
                &y,
                out_f,
                in_f,
                1,
            )?;
        }
        (CudaWeight::Bnb4(a), CudaWeight::Bnb4(b)) if a.compute_dtype == b.compute_dtype => {
            let (pa, pb) = (bnb4_params(a), bnb4_params(b));
            let mut pre = pa.args();
            pre.extend(pb.args());
            let cd = dtype_mode(a.compute_dtype);
            gemv(
                gpu,
                "gemv_bnb4_pair",
                pre,
                &[arg(&cd)],
                x,
                &y,
                out_f,
                in_f,
                1,
            )?;
        }
        (CudaWeight::Packed(a), CudaWeight::Packed(b)) if a.bits == b.bits => {
            let (pa, pb) = (packed_params(a), packed_params(b));
            let mut pre = pa.args();
            pre.extend(pb.args());
            let name = format!("gemv_packed{}_pair", a.bits);
            gemv(gpu, &name, pre, &[], x, &y, out_f, in_f, 1)?;
        }
        _ => return Ok(None),
    }
    Ok(Some(y))
}

/// The leading kernel arguments of a 4-bit weight, kept alive for a launch.
struct Bnb4Params {
    ptrs: [CUdeviceptr; 5],
    offset: f32,
    ints: [i32; 3],
}

impl Bnb4Params {
    fn args(&self) -> Vec<Arg> {
        let mut v: Vec<Arg> = self.ptrs.iter().map(arg).collect();
        v.push(arg(&self.offset));
        v.extend(self.ints.iter().map(arg));
        v
    }
}

fn bnb4_params(q: &CudaBnb4) -> Bnb4Params {
    Bnb4Params {
        ptrs: [
            q.packed.ptr(),
            q.absmax.ptr(),
            opt_ptr(&q.codes),
            q.code2.ptr(),
            q.code16.ptr(),
        ],
        offset: q.offset,
        ints: [
            q.bs_log2 as i32,
            q.nested_bs_log2 as i32,
            dtype_mode(q.dtype),
        ],
    }
}

/// The leading kernel arguments of a packed-integer weight.
struct PackedParams {
    ptrs: [CUdeviceptr; 4],
    ints: [i32; 2],
}

impl PackedParams {
    fn args(&self) -> Vec<Arg> {
        let mut v: Vec<Arg> = self.ptrs.iter().map(arg).collect();
        v.extend(self.ints.iter().map(arg));
        v
    }
}

fn packed_params(q: &CudaPacked) -> PackedParams {
    PackedParams {
        ptrs: [
            q.qweight.ptr(),
            q.scales.ptr(),
            q.zeros.ptr(),
            opt_ptr(&q.g_idx),
        ],
        ints: [q.words_per_row as i32, q.group_size as i32],
    }
}

/// Grid for a grid-stride loop over `n` items with 256-thread blocks.
fn grid_for(gpu: &Gpu, n: usize) -> (u32, u32, u32) {
    (n.div_ceil(256).clamp(1, gpu.sm_count * 16) as u32, 1, 1)
}

/// A device pointer, or 0 for an absent optional buffer.
fn opt_ptr(b: &Option<super::memory::RawAlloc>) -> CUdeviceptr {
    b.as_ref().map_or(0, |b| b.ptr())
}

/// NF4/FP4: the fused GEMV for small batches; larger ones dequantize the
/// weight into a scratch matrix (exact in its dtype) and use cuBLAS.
fn matmul_bnb4(gpu: &Gpu, q: &CudaBnb4, x: &CudaTensor, y: &CudaTensor) -> Result<()> {
    let params = bnb4_params(q);
    let cd = dtype_mode(q.compute_dtype);
    if x.rows <= GEMV_MAX_ROWS {
        return gemv(
            gpu,
            "gemv_bnb4",
            params.args(),
            &[arg(&cd)],
            x,
            y,
            q.rows,
            q.cols,
            2,
        );
    }
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

/// Packed integers: fused GEMV for small batches, else dequantization to an
/// f16 scratch matrix and cuBLAS.
fn matmul_packed(gpu: &Gpu, q: &CudaPacked, x: &CudaTensor, y: &CudaTensor) -> Result<()> {
    let params = packed_params(q);
    if x.rows <= GEMV_MAX_ROWS {
        let name = format!("gemv_packed{}", q.bits);
        return gemv(gpu, &name, params.args(), &[], x, y, q.rows, q.cols, 2);
    }
    let scratch = gpu.alloc(q.rows * q.cols * 2)?;
    let (sp, mode) = (scratch.ptr(), 1i32);
    let (o, i) = (q.rows as i32, q.cols as i32);
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
/// at a time (the exact algorithm at every batch size); larger batches take
/// the cuBLAS int8 GEMM where its shape rules allow.
fn matmul_int8(gpu: &Gpu, q: &CudaInt8, x: &CudaTensor, y: &CudaTensor) -> Result<()> {
    if x.rows > GEMV_MAX_ROWS && int8_gemm::supported(q) {
        return int8_gemm::matmul(gpu, q, x, y);
    }
    let (n, k) = (x.rows, q.cols);
    let flag = gpu.alloc(k)?;
    let xq = gpu.alloc(n * k)?;
    let xo = gpu.alloc(n * k * 4)?;
    let sca = gpu.alloc(n * 4)?;
    let (xp, fp, qp, op, sp) = (x.ptr(), flag.ptr(), xq.ptr(), xo.ptr(), sca.ptr());
    let (ni, ki, thr, cd) = (n as i32, k as i32, q.threshold, dtype_mode(q.compute_dtype));
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

/// How many warps share one row group so that about 32 warps per SM are
/// busy, while each warp keeps at least two rounds of `lane_chunks` chunks
/// per lane.
pub fn gemv_ksplit(
    gpu: &Gpu,
    out_f: usize,
    in_chunks: usize,
    rows_per_warp: usize,
    lane_chunks: usize,
) -> usize {
    let groups = out_f.div_ceil(rows_per_warp);
    let want = gpu.sm_count * 32;
    let mut k = 1;
    while k < GEMV_WARPS && groups * k < want && in_chunks >= 32 * lane_chunks * 2 * k {
        k *= 2;
    }
    k
}

/// Launches GEMV kernel `name` whose leading arguments are `pre` (the
/// weight's buffers and parameters), followed by x, y, n, out, in, ksplit
/// and then `post`.
#[allow(clippy::too_many_arguments)]
pub fn gemv(
    gpu: &Gpu,
    name: &str,
    pre: Vec<Arg>,
    post: &[Arg],
    x: &CudaTensor,
    y: &CudaTensor,
    out_f: usize,
    in_f: usize,
    rows_per_warp: usize,
) -> Result<()> {
    let ksplit = gemv_ksplit(gpu, out_f, in_f / 8, rows_per_warp, GEMV_UNROLL);
    let groups_per_block = GEMV_WARPS / ksplit;
    let blocks = out_f.div_ceil(rows_per_warp * groups_per_block);
    let (xp, yp) = (x.ptr(), y.ptr());
    let (n, o, i, k) = (x.rows as i32, out_f as i32, in_f as i32, ksplit as i32);
    let mut args = pre;
    args.extend([arg(&xp), arg(&yp), arg(&n), arg(&o), arg(&i), arg(&k)]);
    args.extend_from_slice(post);
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
