//! AWQ on the GPU: the same searches as the CPU reference
//! ([`crate::quant::awq`]), with the same choices up to f32 rounding.
//!
//! - Capture: each calibration batch adds `Σ|x|` per channel (f64, in row
//!   chunks summed in order) and copies every `stride`-th token into the
//!   capture's kept tokens, all on the device.
//! - Scale search: the group's weights are uploaded once; per `α` the host
//!   computes the scales ([`scales_for`]), one kernel rounds `W·diag(s)` onto
//!   AWQ's grid per group and divides by `s`, cuBLAS SGEMMs give the group
//!   output (for gate/up, `down(silu(gate)·up)`), and one kernel sums its
//!   squared error against the unquantized output in f64. All `α` are queued
//!   before the sums are read back.
//! - Clipping search: the kept tokens (strided to at most
//!   [`crate::quant::awq::CLIP_TOKENS`]) are divided by the scales; per chunk
//!   of groups, strided batched SGEMMs give every group's partial product
//!   with the original and, per shrink step, the clamped and rounded weights,
//!   and one kernel per step keeps each row's and group's best maximum.
//!
//! The host keeps the choices (`α` by [`crate::quant::awq::best_alpha`]),
//! the folding and the final [`crate::quant::rtn::quantize_groups`], so
//! checkpoints are the same format on both devices. Device memory comes
//! from the backend's pool, whose out-of-memory error names what was asked.

use anyhow::{Context, Result, bail};
use cudarc::cublas::result::sgemm_strided_batched;
use cudarc::cublas::sys::{cublasOperation_t, cudaDataType};
use cudarc::driver::result::memset_d8_async;
use cudarc::driver::sys::CUdeviceptr;

use super::gpu::{Gpu, arg, grid_for};
use super::matmul::cublas_gemm;
use super::memory::DevBuf;
use super::ops::silu_mul;
use super::{CudaBackend, CudaTensor};
use crate::backend::Backend;
use crate::model::LlamaWeights;
use crate::quant::awq::{AwqParams, CLIP_GRID, Inspect, check_group, clip_shrink, clip_stride};
use crate::quant::awq::{means_of, scales_for};
use crate::quant::awq_model::{AwqDevice, run_awq};
use crate::quant::spec::AwqConfig;

/// Blocks of the squared-error reduction (partial sums read back per `α`).
const SQ_BLOCKS: usize = 512;
/// Most bytes of the clipping search's two product buffers together; more
/// groups than fit are searched chunk by chunk.
const CLIP_PRODUCT_BYTES: usize = 1 << 30;
/// Warps per block of the per-group kernels.
const WARPS: usize = 8;

/// One linear input captured on the device.
pub struct DeviceCapture {
    cols: usize,
    stride: usize,
    seen: usize,
    /// `Σ|x|` per channel, f64.
    sums: DevBuf,
    /// The kept tokens, `[capacity, cols]`; the first `kept` rows are filled.
    tokens: CudaTensor,
    kept: usize,
}

/// AWQ on a [`CudaBackend`].
pub struct CudaAwq<'a> {
    backend: &'a CudaBackend,
}

/// Grid of a kernel with one warp per item, [`WARPS`] warps per block.
fn warp_grid(items: usize) -> (u32, u32, u32) {
    (items.div_ceil(WARPS).max(1) as u32, 1, 1)
}

impl<'a> CudaAwq<'a> {
    /// AWQ on `backend`.
    pub fn new(backend: &'a CudaBackend) -> Self {
        CudaAwq { backend }
    }

    fn gpu(&self) -> &Gpu {
        &self.backend.gpu
    }

    /// `dst[j] = x[first + j·stride]` for `j < count` (rows of `cols`
    /// values), each column divided by `s` when given (device `[cols]`).
    #[allow(clippy::too_many_arguments)]
    fn gather_rows(
        &self,
        x: CUdeviceptr,
        s: CUdeviceptr,
        dst: CUdeviceptr,
        cols: usize,
        first: usize,
        stride: usize,
        count: usize,
    ) -> Result<()> {
        let gpu = self.gpu();
        let (ci, fi, si, ni) = (cols as i32, first as i64, stride as i64, count as i64);
        gpu.launch(
            "awq_gather_rows",
            grid_for(gpu, count * cols),
            256,
            0,
            &mut [
                arg(&x),
                arg(&s),
                arg(&dst),
                arg(&ci),
                arg(&fi),
                arg(&si),
                arg(&ni),
            ],
        )
    }

    /// `y[t, m] = x[t, k] · w[m, k]ᵀ` in f32 (cuBLAS, no TF32).
    fn xwt(
        &self,
        x: &CudaTensor,
        t: usize,
        w: CUdeviceptr,
        m: usize,
        k: usize,
    ) -> Result<CudaTensor> {
        let y = CudaTensor::empty(self.gpu(), t, m)?;
        cublas_gemm(
            self.gpu(),
            w,
            cudaDataType::CUDA_R_32F,
            x.ptr(),
            cudaDataType::CUDA_R_32F,
            &y,
            t,
            m,
            k,
            false,
        )?;
        Ok(y)
    }

    /// The output of a group (weights `w`, `[Σm, k]`, the group's matrices
    /// stacked) on the first `t` rows of `x`, as `group_output` on the CPU:
    /// the stacked outputs, or `down(silu(gate)·up)` with `down` `[out, m]`.
    fn group_output(
        &self,
        x: &CudaTensor,
        t: usize,
        w: &CudaTensor,
        down: Option<(&CudaTensor, usize)>,
    ) -> Result<CudaTensor> {
        let k = w.cols;
        match down {
            None => self.xwt(x, t, w.ptr(), w.rows, k),
            Some((d, out)) => {
                let inter = w.rows / 2;
                let gate = self.xwt(x, t, w.ptr(), inter, k)?;
                let up = self.xwt(x, t, w.ptr() + (inter * k * 4) as u64, inter, k)?;
                let act = silu_mul(self.gpu(), &gate, &up)?;
                self.xwt(&act, t, d.ptr(), out, inter)
            }
        }
    }

    /// Queues `Σ (a − b)²` over the values of `a` and `b` as [`SQ_BLOCKS`]
    /// f64 partial sums at `partial`.
    fn sq_err(&self, a: &CudaTensor, b: &CudaTensor, partial: CUdeviceptr) -> Result<()> {
        let (ap, bp, n) = (a.ptr(), b.ptr(), a.len() as u64);
        self.gpu().launch(
            "awq_sq_err",
            (SQ_BLOCKS as u32, 1, 1),
            256,
            0,
            &mut [arg(&ap), arg(&bp), arg(&n), arg(&partial)],
        )
    }

    /// `y[g] = x_g · w_gᵀ` (`[tt, m]` each, stacked) for the groups
    /// `g0 .. g0+count` of `gs` columns of `x` (`[tt, k]`) and `w` (`[m, k]`):
    /// one strided batched SGEMM over the full groups, one SGEMM for a
    /// shorter last group.
    #[allow(clippy::too_many_arguments)]
    fn group_products(
        &self,
        x: &CudaTensor,
        w: CUdeviceptr,
        m: usize,
        k: usize,
        gs: usize,
        g0: usize,
        count: usize,
        y: CUdeviceptr,
    ) -> Result<()> {
        let tt = x.rows;
        let full = if (g0 + count) * gs <= k {
            count
        } else {
            count - 1
        };
        let gemm = |g: usize, n: usize, batch: usize| {
            let (alpha, beta) = (1.0f32, 0.0f32);
            // Column-major: Y_g (m × tt, ld m) = W_gᵀ-view (n × m, ld k)ᵀ · X_g (n × tt, ld k).
            unsafe {
                sgemm_strided_batched(
                    *self.gpu().blas.handle(),
                    cublasOperation_t::CUBLAS_OP_T,
                    cublasOperation_t::CUBLAS_OP_N,
                    m as i32,
                    tt as i32,
                    n as i32,
                    &alpha,
                    (w + (g * gs * 4) as u64) as *const f32,
                    k as i32,
                    gs as i64,
                    (x.ptr() + (g * gs * 4) as u64) as *const f32,
                    k as i32,
                    gs as i64,
                    &beta,
                    (y + ((g - g0) * tt * m * 4) as u64) as *mut f32,
                    m as i32,
                    (tt * m) as i64,
                    batch as i32,
                )
            }
            .map_err(|e| {
                anyhow::anyhow!("AWQ clipping products (cublasSgemmStridedBatched): {e:?}")
            })
        };
        if full > 0 {
            gemm(g0, gs, full)?;
        }
        if full < count {
            let g = g0 + full;
            gemm(g, k - g * gs, 1)?;
        }
        Ok(())
    }
}

impl AwqDevice for CudaAwq<'_> {
    type Backend = CudaBackend;
    type Capture = DeviceCapture;
    /// The strided tokens, divided by the scales, `[tt, k]`.
    type ClipTokens = CudaTensor;

    fn backend(&self) -> &CudaBackend {
        self.backend
    }

    /// Half the device memory.
    fn keep_bytes(&self) -> usize {
        self.gpu().total_mem / 2
    }

    fn capture(&self, cols: usize, total: usize, stride: usize) -> Result<DeviceCapture> {
        let gpu = self.gpu();
        gpu.bind()?;
        let sums = gpu.alloc(cols * 8)?;
        unsafe { memset_d8_async(sums.ptr(), 0, cols * 8, gpu.stream.cu_stream()) }?;
        Ok(DeviceCapture {
            cols,
            stride,
            seen: 0,
            sums,
            tokens: CudaTensor::empty(gpu, total.div_ceil(stride), cols)?,
            kept: 0,
        })
    }

    fn add_batch(&self, cap: &mut DeviceCapture, x: &CudaTensor) -> Result<()> {
        if x.cols != cap.cols {
            bail!("AWQ capture of {} features given {}", cap.cols, x.cols);
        }
        let gpu = self.gpu();
        gpu.bind()?;
        let (rows, cols) = (x.rows, x.cols);
        if rows > 0 && cols > 0 {
            let chunk = rows.div_ceil(1024).max(64);
            let chunks = rows.div_ceil(chunk);
            let partial = gpu.alloc(chunks * cols * 8)?;
            let (xp, pp, sp) = (x.ptr(), partial.ptr(), cap.sums.ptr());
            let (ri, ci, chi, ni) = (rows as i32, cols as i32, chunk as i32, chunks as i32);
            gpu.launch(
                "awq_abs_partial",
                (cols.div_ceil(256) as u32, chunks as u32, 1),
                256,
                0,
                &mut [arg(&xp), arg(&pp), arg(&ri), arg(&ci), arg(&chi)],
            )?;
            gpu.launch(
                "awq_abs_accumulate",
                (cols.div_ceil(256) as u32, 1, 1),
                256,
                0,
                &mut [arg(&pp), arg(&sp), arg(&ni), arg(&ci)],
            )?;
        }
        // Rows r of this batch with (seen + r) % stride == 0.
        let first = (cap.stride - cap.seen % cap.stride) % cap.stride;
        let count = if first < rows {
            (rows - first - 1) / cap.stride + 1
        } else {
            0
        };
        if cap.kept + count > cap.tokens.rows {
            bail!(
                "AWQ capture: more tokens than the {} the calibration announced",
                cap.tokens.rows * cap.stride
            );
        }
        if count > 0 {
            let dst = cap.tokens.ptr() + (cap.kept * cols * 4) as u64;
            self.gather_rows(x.ptr(), 0, dst, cols, first, cap.stride, count)?;
        }
        cap.kept += count;
        cap.seen += rows;
        Ok(())
    }

    fn channel_mean(&self, cap: &DeviceCapture) -> Result<Vec<f32>> {
        if cap.seen == 0 {
            bail!("AWQ: a linear input was never observed");
        }
        let gpu = self.gpu();
        gpu.bind()?;
        let mut sums = vec![0f64; cap.cols];
        gpu.download(&mut sums, cap.sums.ptr())?;
        Ok(means_of(&sums, cap.seen))
    }

    fn scale_errors(
        &self,
        cap: &DeviceCapture,
        x_mean: &[f32],
        ws: &[(Vec<f32>, usize)],
        inspect: Inspect,
        p: &AwqParams,
    ) -> Result<Vec<f64>> {
        let k = cap.cols;
        check_group(k, ws, inspect)?;
        if x_mean.len() != k {
            bail!("AWQ: {} channel means for {k} channels", x_mean.len());
        }
        let gpu = self.gpu();
        gpu.bind()?;
        let t = cap.kept;
        let rows: usize = ws.iter().map(|(_, m)| m).sum();
        let stacked: Vec<f32> = ws.iter().flat_map(|(w, _)| w.iter().copied()).collect();
        let w = CudaTensor::from_host(gpu, rows, k, &stacked)?;
        let down = match inspect {
            Inspect::Linears => None,
            Inspect::Mlp { down, out } => {
                Some((CudaTensor::from_host(gpu, out, ws[0].1, down)?, out))
            }
        };
        let down = down.as_ref().map(|(d, out)| (d, *out));
        let reference = self.group_output(&cap.tokens, t, &w, down)?;
        let wq = CudaTensor::empty(gpu, rows, k)?;
        // The scales of every α, computed on the host as on the CPU.
        let all_scales: Vec<f32> = (0..=p.grid)
            .flat_map(|i| scales_for(x_mean, p.alpha(i)))
            .collect();
        let s_dev = gpu.alloc(all_scales.len() * 4)?;
        gpu.upload(s_dev.ptr(), &all_scales)?;
        let partial = gpu.alloc((p.grid + 1) * SQ_BLOCKS * 8)?;
        let groups = k.div_ceil(p.group_size);
        let (wp, qp) = (w.ptr(), wq.ptr());
        let (ri, ki, gsi, bits) = (rows as i32, k as i32, p.group_size as i32, p.bits as i32);
        for i in 0..=p.grid {
            let sp = s_dev.ptr() + (i * k * 4) as u64;
            gpu.launch(
                "awq_scale_quant",
                warp_grid(rows * groups),
                (WARPS * 32) as u32,
                0,
                &mut [
                    arg(&wp),
                    arg(&sp),
                    arg(&qp),
                    arg(&ri),
                    arg(&ki),
                    arg(&gsi),
                    arg(&bits),
                ],
            )?;
            let y = self.group_output(&cap.tokens, t, &wq, down)?;
            self.sq_err(&y, &reference, partial.ptr() + (i * SQ_BLOCKS * 8) as u64)?;
        }
        let mut sums = vec![0f64; (p.grid + 1) * SQ_BLOCKS];
        gpu.download(&mut sums, partial.ptr())?;
        let n = reference.len().max(1) as f64;
        Ok(sums
            .chunks(SQ_BLOCKS)
            .map(|c| c.iter().sum::<f64>() / n)
            .collect())
    }

    fn clip_tokens(&self, cap: &DeviceCapture, s: Option<&[f32]>) -> Result<CudaTensor> {
        let gpu = self.gpu();
        gpu.bind()?;
        let stride = clip_stride(cap.kept);
        let tt = cap.kept.div_ceil(stride);
        let x = CudaTensor::empty(gpu, tt, cap.cols)?;
        let s_dev = match s {
            Some(s) => {
                if s.len() != cap.cols {
                    bail!("AWQ: {} scales for {} channels", s.len(), cap.cols);
                }
                let buf = gpu.alloc(s.len() * 4)?;
                gpu.upload(buf.ptr(), s)?;
                Some(buf)
            }
            None => None,
        };
        let sp = s_dev.as_ref().map_or(0, DevBuf::ptr);
        self.gather_rows(cap.tokens.ptr(), sp, x.ptr(), cap.cols, 0, stride, tt)?;
        Ok(x)
    }

    fn search_clip(
        &self,
        x: &CudaTensor,
        w: &[f32],
        m: usize,
        k: usize,
        p: &AwqParams,
    ) -> Result<Vec<f32>> {
        if x.cols != k || w.len() != m * k {
            bail!(
                "AWQ clipping search: a {m}x{k} weight of {} values on tokens of {} channels",
                w.len(),
                x.cols
            );
        }
        let gpu = self.gpu();
        gpu.bind()?;
        let (tt, gs) = (x.rows, p.group_size);
        let groups = k.div_ceil(gs);
        let wd = CudaTensor::from_host(gpu, m, k, w)?;
        let wmax = gpu.alloc(m * groups * 4)?;
        let best_max = gpu.alloc(m * groups * 4)?;
        let best_err = gpu.alloc(m * groups * 8)?;
        let q = CudaTensor::empty(gpu, m, k)?;
        let (wp, mp, bmp, bep, qp) = (
            wd.ptr(),
            wmax.ptr(),
            best_max.ptr(),
            best_err.ptr(),
            q.ptr(),
        );
        let (mi, ki, gsi, gi, bits, tti) = (
            m as i32,
            k as i32,
            gs as i32,
            groups as i32,
            p.bits as i32,
            tt as i32,
        );
        gpu.launch(
            "awq_group_absmax",
            warp_grid(m * groups),
            (WARPS * 32) as u32,
            0,
            &mut [arg(&wp), arg(&mp), arg(&mi), arg(&ki), arg(&gsi)],
        )?;
        gpu.copy(bmp, mp, m * groups * 4)?;
        gpu.upload(bep, &vec![f64::INFINITY; m * groups])?;
        let chunk = (CLIP_PRODUCT_BYTES / (2 * tt.max(1) * m.max(1) * 4)).clamp(1, groups);
        let org = gpu.alloc(chunk * tt * m * 4)?;
        let out = gpu.alloc(chunk * tt * m * 4)?;
        for g0 in (0..groups).step_by(chunk) {
            let count = chunk.min(groups - g0);
            let (g0i, ci) = (g0 as i32, count as i32);
            self.group_products(x, wp, m, k, gs, g0, count, org.ptr())?;
            for i in 0..CLIP_GRID / 2 {
                let shrink = clip_shrink(i);
                gpu.launch(
                    "awq_clip_quant",
                    warp_grid(m * count),
                    (WARPS * 32) as u32,
                    0,
                    &mut [
                        arg(&wp),
                        arg(&mp),
                        arg(&qp),
                        arg(&mi),
                        arg(&ki),
                        arg(&gsi),
                        arg(&g0i),
                        arg(&ci),
                        arg(&bits),
                        arg(&shrink),
                    ],
                )?;
                self.group_products(x, qp, m, k, gs, g0, count, out.ptr())?;
                let (op, orp) = (out.ptr(), org.ptr());
                gpu.launch(
                    "awq_clip_update",
                    ((count * m).div_ceil(256) as u32, 1, 1),
                    256,
                    0,
                    &mut [
                        arg(&op),
                        arg(&orp),
                        arg(&mp),
                        arg(&bmp),
                        arg(&bep),
                        arg(&tti),
                        arg(&mi),
                        arg(&g0i),
                        arg(&ci),
                        arg(&gi),
                        arg(&shrink),
                    ],
                )?;
            }
        }
        let mut maxes = vec![0f32; m * groups];
        gpu.download(&mut maxes, bmp)?;
        Ok(maxes)
    }
}

/// Quantizes every decoder-block linear of `weights` with AWQ on
/// `cuda:{ordinal}`: the calibration forward, input capture, scale and
/// clipping searches on the GPU, choices, folding and packing on the host
/// (see [`run_awq`]), which prints the time per stage.
pub fn quantize_model_awq(
    weights: &mut LlamaWeights,
    cfg: &AwqConfig,
    samples: &[Vec<u32>],
    ordinal: usize,
) -> Result<()> {
    let backend = CudaBackend::new(ordinal)?;
    run_awq(&CudaAwq::new(&backend), weights, cfg, samples)
        .with_context(|| format!("AWQ on {}", backend.describe()))
}
