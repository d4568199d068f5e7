//! GPTQ on the GPU: the same algorithm as the CPU reference
//! ([`crate::quant::gptq`]), with the same results up to f32 rounding.
//!
//! - Hessians: each calibration batch `X` (`[tokens, in]`, f32 on the device)
//!   adds `XᵀX` by a cuBLAS SYRK in f32 into an f64 sum, as the CPU adds f32
//!   partial products in f64; `H = 2/n · Σ`.
//! - Inverse: dead inputs, act-order permutation and dampening are applied on
//!   the device; cuSOLVER (f64) factors `H`, inverts it and factors the
//!   inverse; the upper factor is rounded to f32. Without libcusolver the
//!   factorization runs on the host (faer), as on the CPU.
//! - Column loop: per lazy-update block, one kernel with a warp per output
//!   row quantizes the block's columns (fitting group grids, spreading each
//!   column's error over the block), then one cuBLAS SGEMM applies the
//!   block's errors to all later columns.
//!
//! Codes and grids come back to the host and are packed exactly as the CPU
//! packs them, so checkpoints and kernels see one format.

use std::cell::RefCell;

use anyhow::{Context, Result, bail};
use cudarc::cublas::result::sgemm;
use cudarc::cublas::sys::{cublasFillMode_t, cublasOperation_t, cublasSsyrk_v2};
use cudarc::driver::result::memset_d8_async;
use cudarc::driver::sys::CUdeviceptr;

use super::gpu::{Gpu, arg, grid_for};
use super::memory::DevBuf;
use super::solver::Solver;
use super::{CudaBackend, CudaTensor};
use crate::backend::Backend;
use crate::model::LlamaWeights;
use crate::quant::gptq::{
    DAMP_RETRIES, GptqDevice, GptqParams, assemble_gptq, column_order, inverse_cholesky_upper,
    mean_diagonal, run_gptq,
};
use crate::quant::packed::PackedIntMatrix;
use crate::quant::rtn::{GroupGrid, resolve_group_size};
use crate::quant::spec::GptqConfig;
use crate::quant::stage_clock::{StageClock, StageTimes};

/// Output rows (one warp each) per block of the column-loop kernel.
const ROWS_PER_BLOCK: usize = 8;
/// Largest lazy-update block the column-loop kernel takes (its shared
/// memory holds `ROWS_PER_BLOCK` rows of the block).
pub const MAX_BLOCK_SIZE: usize = 1024;

/// GPTQ's stages on the device, timed separately.
#[derive(Clone, Copy, Debug)]
enum Stage {
    /// Everything outside the other stages: the calibration forward, weight
    /// uploads, host-side dequantization.
    Forward,
    Hessian,
    Prepare,
    Cholesky,
    Columns,
    Pack,
}

const STAGE_NAMES: &[&str] = &[
    "calibration forward and uploads",
    "Hessians",
    "weight/Hessian preparation",
    "Cholesky inverse",
    "column loop",
    "download and packing",
];

/// A running `Σ xᵀx` on the device: f64 sums (upper triangle) and an f32
/// scratch matrix for each batch's product.
pub struct HessianSum {
    dim: usize,
    rows: usize,
    sum: DevBuf,
    scratch: DevBuf,
}

/// `H = 2/n · Σ xᵀx` on the device: `[dim, dim]` f64, row-major (symmetric).
pub struct DeviceHessian {
    dim: usize,
    h: DevBuf,
}

impl DeviceHessian {
    /// Input features.
    pub fn dim(&self) -> usize {
        self.dim
    }
}

/// GPTQ on a [`CudaBackend`].
pub struct CudaGptq<'a> {
    backend: &'a CudaBackend,
    solver: Option<Solver>,
    laps: RefCell<StageClock>,
}

impl<'a> CudaGptq<'a> {
    /// GPTQ on `backend`; with cuSOLVER when it can be loaded (a warning
    /// says when it cannot).
    pub fn new(backend: &'a CudaBackend) -> Result<Self> {
        let solver = Solver::new(&backend.gpu)?;
        if solver.is_none() {
            tracing::warn!(
                "libcusolver was not found: GPTQ's Cholesky factorizations run on the host (slow for large layers); put the CUDA toolkit's lib directory on LD_LIBRARY_PATH"
            );
        }
        Ok(CudaGptq {
            backend,
            solver,
            laps: RefCell::new(StageClock::new(STAGE_NAMES)),
        })
    }

    fn gpu(&self) -> &Gpu {
        &self.backend.gpu
    }

    /// Waits for the device and books the time since the last lap to `stage`.
    fn lap(&self, stage: Stage) -> Result<()> {
        self.gpu().sync()?;
        self.laps.borrow_mut().lap(stage as usize);
        Ok(())
    }

    /// Time per stage so far (the time since the last lap is booked to the
    /// calibration forward first).
    pub fn timings(&self) -> Result<StageTimes> {
        self.lap(Stage::Forward)?;
        Ok(self.laps.borrow().totals())
    }

    /// Uploads a host Hessian (`[n, n]` row-major, as
    /// [`crate::quant::gptq::Hessian::matrix`] returns).
    pub fn upload_hessian(&self, h: &[f64], n: usize) -> Result<DeviceHessian> {
        if h.len() != n * n {
            bail!("a {n}x{n} Hessian cannot hold {} values", h.len());
        }
        let gpu = self.gpu();
        gpu.bind()?;
        let buf = gpu.alloc(h.len() * 8)?;
        gpu.upload(buf.ptr(), h)?;
        Ok(DeviceHessian { dim: n, h: buf })
    }

    /// Copies a Hessian to the host (row-major).
    pub fn download_hessian(&self, h: &DeviceHessian) -> Result<Vec<f64>> {
        let gpu = self.gpu();
        gpu.bind()?;
        let mut out = vec![0f64; h.dim * h.dim];
        gpu.download(&mut out, h.h.ptr())?;
        Ok(out)
    }

    /// Upper Cholesky factor of `(H + damp·I)⁻¹` (row-major f32, on the
    /// host), as [`crate::quant::gptq::inverse_cholesky_upper`] computes it,
    /// with dead inputs given 1 on the diagonal.
    pub fn inverse_cholesky_upper(&self, h: &DeviceHessian, damp_percent: f64) -> Result<Vec<f32>> {
        let n = h.dim;
        let identity: Vec<usize> = (0..n).collect();
        let diag = self.live_diagonal(h)?;
        let u = self.inverse_upper(h, &identity, &diag, damp_percent)?;
        let mut out = vec![0f32; n * n];
        self.gpu().download(&mut out, u.ptr())?;
        Ok(out)
    }

    /// The diagonal of `h`, with dead inputs (0) read as 1.
    fn live_diagonal(&self, h: &DeviceHessian) -> Result<Vec<f64>> {
        let gpu = self.gpu();
        gpu.bind()?;
        let n = h.dim;
        let d = gpu.alloc(n * 8)?;
        let (hp, dp, ni) = (h.h.ptr(), d.ptr(), n as i32);
        gpu.launch(
            "gptq_diag",
            (n.div_ceil(256) as u32, 1, 1),
            256,
            0,
            &mut [arg(&hp), arg(&dp), arg(&ni)],
        )?;
        let mut diag = vec![0f64; n];
        gpu.download(&mut diag, dp)?;
        Ok(diag
            .into_iter()
            .map(|v| if v == 0.0 { 1.0 } else { v })
            .collect())
    }

    /// Uploads a column order as i32.
    fn upload_perm(&self, perm: &[usize]) -> Result<DevBuf> {
        let gpu = self.gpu();
        let p: Vec<i32> = perm.iter().map(|&c| c as i32).collect();
        let buf = gpu.alloc(p.len() * 4)?;
        gpu.upload(buf.ptr(), &p)?;
        Ok(buf)
    }

    /// `a` = `h` permuted by `perm` (device i32), dead diagonal entries set
    /// to 1, plus `add` on the diagonal.
    fn prepare_h(
        &self,
        h: &DeviceHessian,
        perm: CUdeviceptr,
        a: CUdeviceptr,
        add: f64,
    ) -> Result<()> {
        let gpu = self.gpu();
        let (hp, n) = (h.h.ptr(), h.dim as i32);
        gpu.launch(
            "gptq_prepare_h",
            grid_for(gpu, h.dim * h.dim),
            256,
            0,
            &mut [arg(&hp), arg(&a), arg(&perm), arg(&n), arg(&add)],
        )
    }

    /// The upper Cholesky factor of the inverse of `h` permuted by `perm`
    /// and dampened by `damp_percent` of the mean of `diag` (the live
    /// diagonal in original order), row-major f32 on the device; retried
    /// with more dampening as on the CPU.
    fn inverse_upper(
        &self,
        h: &DeviceHessian,
        perm: &[usize],
        diag: &[f64],
        damp_percent: f64,
    ) -> Result<DevBuf> {
        let gpu = self.gpu();
        gpu.bind()?;
        let n = h.dim;
        let perm_dev = self.upload_perm(perm)?;
        let a = gpu.alloc(n * n * 8)?;
        let u = gpu.alloc(n * n * 4)?;
        let Some(solver) = &self.solver else {
            // On the host: the CPU's own factorization of the prepared matrix.
            self.prepare_h(h, perm_dev.ptr(), a.ptr(), 0.0)?;
            let mut host = vec![0f64; n * n];
            gpu.download(&mut host, a.ptr())?;
            let upper = inverse_cholesky_upper(&host, n, damp_percent)?;
            gpu.upload(u.ptr(), &upper)?;
            return Ok(u);
        };
        let mean = mean_diagonal(perm.iter().map(|&c| diag[c]));
        let mut damp = damp_percent;
        for attempt in 0..=DAMP_RETRIES {
            self.prepare_h(h, perm_dev.ptr(), a.ptr(), damp * mean)?;
            if solver.inverse_cholesky(gpu, a.ptr(), n)? {
                if attempt > 0 {
                    tracing::warn!(
                        "GPTQ: Hessian needed damp_percent {damp} to be positive definite"
                    );
                }
                let (ap, up, ni) = (a.ptr(), u.ptr(), n as i32);
                gpu.launch(
                    "gptq_upper_f32",
                    grid_for(gpu, n * n),
                    256,
                    0,
                    &mut [arg(&ap), arg(&up), arg(&ni)],
                )?;
                return Ok(u);
            }
            damp *= 10.0;
        }
        bail!(
            "GPTQ: the Hessian is not positive definite even with damp_percent {damp}; calibrate on more tokens"
        )
    }

    /// `W[:, i2..] −= Err · U[i1..i2, i2..]` for the block `i1..i1+count`
    /// (`w` `[out, n]` and `u` `[n, n]` row-major, `err` `[out, count]`).
    #[allow(clippy::too_many_arguments)]
    fn lazy_update(
        &self,
        w: CUdeviceptr,
        u: CUdeviceptr,
        err: CUdeviceptr,
        out: usize,
        n: usize,
        i1: usize,
        count: usize,
    ) -> Result<()> {
        let i2 = i1 + count;
        let (alpha, beta) = (-1.0f32, 1.0f32);
        // Column-major views: W[:, i2..]ᵀ (n−i2 × out, ld n) −=
        // U[i1..i2, i2..]ᵀ (n−i2 × count, ld n) · Errᵀ (count × out, ld count).
        unsafe {
            sgemm(
                *self.gpu().blas.handle(),
                cublasOperation_t::CUBLAS_OP_N,
                cublasOperation_t::CUBLAS_OP_N,
                (n - i2) as i32,
                out as i32,
                count as i32,
                &alpha,
                (u + ((i1 * n + i2) * 4) as u64) as *const f32,
                n as i32,
                err as *const f32,
                count as i32,
                &beta,
                (w + (i2 * 4) as u64) as *mut f32,
                n as i32,
            )
        }
        .map_err(|e| anyhow::anyhow!("GPTQ lazy update (cublasSgemm): {e:?}"))
    }
}

impl GptqDevice for CudaGptq<'_> {
    type Backend = CudaBackend;
    type Accumulator = HessianSum;
    type Hessian = DeviceHessian;

    fn backend(&self) -> &CudaBackend {
        self.backend
    }

    /// Half the device memory.
    fn keep_bytes(&self) -> usize {
        self.gpu().total_mem / 2
    }

    fn accumulator(&self, dim: usize) -> Result<HessianSum> {
        let gpu = self.gpu();
        gpu.bind()?;
        let sum = gpu.alloc(dim * dim * 8)?;
        unsafe { memset_d8_async(sum.ptr(), 0, dim * dim * 8, gpu.stream.cu_stream()) }?;
        Ok(HessianSum {
            dim,
            rows: 0,
            sum,
            scratch: gpu.alloc(dim * dim * 4)?,
        })
    }

    fn add_batch(&self, acc: &mut HessianSum, x: &CudaTensor) -> Result<()> {
        let d = acc.dim;
        if x.cols != d {
            bail!(
                "Hessian of {d} features given a batch of {} features",
                x.cols
            );
        }
        if x.rows == 0 {
            return Ok(());
        }
        self.lap(Stage::Forward)?;
        let gpu = self.gpu();
        gpu.bind()?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Column-major, X is Xᵀ (d × rows, ld d): C = Xᵀ X in C's lower
        // triangle, which is the upper triangle of the row-major view.
        unsafe {
            cublasSsyrk_v2(
                *gpu.blas.handle(),
                cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                cublasOperation_t::CUBLAS_OP_N,
                d as i32,
                x.rows as i32,
                &alpha,
                x.ptr() as *const f32,
                d as i32,
                &beta,
                acc.scratch.ptr() as *mut f32,
                d as i32,
            )
        }
        .result()
        .map_err(|e| anyhow::anyhow!("Hessian batch (cublasSsyrk, {d} features): {e:?}"))?;
        let (sp, hp, di) = (acc.scratch.ptr(), acc.sum.ptr(), d as i32);
        gpu.launch(
            "gptq_acc_upper",
            grid_for(gpu, d * d),
            256,
            0,
            &mut [arg(&sp), arg(&hp), arg(&di)],
        )?;
        acc.rows += x.rows;
        self.lap(Stage::Hessian)
    }

    fn hessian(&self, acc: HessianSum) -> Result<DeviceHessian> {
        if acc.rows == 0 {
            bail!("no calibration inputs reached this layer");
        }
        self.lap(Stage::Forward)?;
        let gpu = self.gpu();
        gpu.bind()?;
        let d = acc.dim;
        let h = gpu.alloc(d * d * 8)?;
        let (sp, hp, di, scale) = (acc.sum.ptr(), h.ptr(), d as i32, 2.0 / acc.rows as f64);
        gpu.launch(
            "gptq_hessian_finish",
            grid_for(gpu, d * d),
            256,
            0,
            &mut [arg(&sp), arg(&hp), arg(&di), arg(&scale)],
        )?;
        self.lap(Stage::Hessian)?;
        Ok(DeviceHessian { dim: d, h })
    }

    fn quantize(
        &self,
        w: &[f32],
        out: usize,
        n: usize,
        h: &DeviceHessian,
        p: &GptqParams,
    ) -> Result<PackedIntMatrix> {
        p.validate()?;
        if w.len() != out * n || h.dim != n {
            bail!(
                "GPTQ: weight {} values and a Hessian of {} features do not fit a {out}x{n} layer",
                w.len(),
                h.dim
            );
        }
        if p.block_size > MAX_BLOCK_SIZE {
            bail!(
                "GPTQ on the GPU takes block_size up to {MAX_BLOCK_SIZE}, not {}",
                p.block_size
            );
        }
        self.lap(Stage::Forward)?;
        let gpu = self.gpu();
        gpu.bind()?;
        let gs = resolve_group_size(p.group_size, n);
        let groups = n.div_ceil(gs).max(1);
        let diag = self.live_diagonal(h)?;
        let perm = column_order(&diag, p.desc_act);
        let perm_dev = self.upload_perm(&perm)?;
        let (hp, pp) = (h.h.ptr(), perm_dev.ptr());
        let (oi, ni, gsi, gi, bits, sym) = (
            out as i32,
            n as i32,
            gs as i32,
            groups as i32,
            p.bits as i32,
            p.sym as i32,
        );
        // The weight: dead inputs zeroed, columns in quantization order.
        let wq = gpu.alloc(out * n * 4)?;
        let scales = gpu.alloc(out * groups * 4)?;
        let zeros = gpu.alloc(out * groups * 2)?;
        {
            let w0 = gpu.alloc(out * n * 4)?;
            gpu.upload(w0.ptr(), w)?;
            let (w0p, wqp) = (w0.ptr(), wq.ptr());
            gpu.launch(
                "gptq_prepare_w",
                grid_for(gpu, out * n),
                256,
                0,
                &mut [arg(&w0p), arg(&wqp), arg(&pp), arg(&hp), arg(&oi), arg(&ni)],
            )?;
            if p.static_groups {
                let (sp, zp) = (scales.ptr(), zeros.ptr());
                gpu.launch(
                    "gptq_static_grids",
                    ((out * groups).div_ceil(256) as u32, 1, 1),
                    256,
                    0,
                    &mut [
                        arg(&w0p),
                        arg(&hp),
                        arg(&sp),
                        arg(&zp),
                        arg(&oi),
                        arg(&ni),
                        arg(&gsi),
                        arg(&gi),
                        arg(&bits),
                        arg(&sym),
                    ],
                )?;
            }
        }
        self.lap(Stage::Prepare)?;
        let u = self.inverse_upper(h, &perm, &diag, p.damp_percent)?;
        self.lap(Stage::Cholesky)?;

        let bs = p.block_size.min(n.max(1));
        let codes = gpu.alloc(out * n)?;
        let err = gpu.alloc(out * bs * 4)?;
        let (wqp, up, cp, ep, sp, zp) = (
            wq.ptr(),
            u.ptr(),
            codes.ptr(),
            err.ptr(),
            scales.ptr(),
            zeros.ptr(),
        );
        let fixed = p.static_groups as i32;
        let blocks = out.div_ceil(ROWS_PER_BLOCK) as u32;
        let threads = (ROWS_PER_BLOCK * 32) as u32;
        for i1 in (0..n).step_by(bs) {
            let count = bs.min(n - i1);
            let (i1i, ci) = (i1 as i32, count as i32);
            gpu.launch(
                "gptq_block",
                (blocks, 1, 1),
                threads,
                (ROWS_PER_BLOCK * count * 4) as u32,
                &mut [
                    arg(&wqp),
                    arg(&up),
                    arg(&cp),
                    arg(&ep),
                    arg(&sp),
                    arg(&zp),
                    arg(&pp),
                    arg(&oi),
                    arg(&ni),
                    arg(&i1i),
                    arg(&ci),
                    arg(&gsi),
                    arg(&gi),
                    arg(&bits),
                    arg(&sym),
                    arg(&fixed),
                ],
            )?;
            if i1 + count < n {
                self.lazy_update(wqp, up, ep, out, n, i1, count)?;
            }
        }
        self.lap(Stage::Columns)?;

        let mut host_codes = vec![0u8; out * n];
        let mut host_scales = vec![0f32; out * groups];
        let mut host_zeros = vec![0u16; out * groups];
        gpu.download(&mut host_codes, cp)?;
        gpu.download(&mut host_scales, sp)?;
        gpu.download(&mut host_zeros, zp)?;
        let maxq = ((1u32 << p.bits) - 1) as u16;
        let grids: Vec<Vec<GroupGrid>> = host_scales
            .chunks(groups)
            .zip(host_zeros.chunks(groups))
            .map(|(s, z)| {
                s.iter()
                    .zip(z)
                    .map(|(&scale, &zero)| GroupGrid { scale, zero, maxq })
                    .collect()
            })
            .collect();
        let q = assemble_gptq(out, n, p, &perm, &host_codes, grids)?;
        self.lap(Stage::Pack)?;
        Ok(q)
    }
}

/// Quantizes every decoder-block linear of `weights` with GPTQ on
/// `cuda:{ordinal}`: the calibration forward, Hessians, inverses and column
/// loops all on the GPU (see [`run_gptq`]). Prints the time per stage.
pub fn quantize_model_gptq(
    weights: &mut LlamaWeights,
    cfg: &GptqConfig,
    samples: &[Vec<u32>],
    ordinal: usize,
) -> Result<()> {
    let backend = CudaBackend::new(ordinal)?;
    let gptq = CudaGptq::new(&backend)?;
    run_gptq(&gptq, weights, cfg, samples)
        .with_context(|| format!("GPTQ on {}", backend.describe()))?;
    let times = gptq.timings()?;
    eprintln!("gptq on {}: {times}", backend.describe());
    Ok(())
}
