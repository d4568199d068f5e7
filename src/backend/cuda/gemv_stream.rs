//! Streamed single-row NF4/FP4 products (`gemv_q4s_*` in gemv_q4s.cu): a
//! block per SM owns a contiguous run of 16,384-weight units, which one of
//! its threads copies through a ring of shared-memory stages with bulk
//! asynchronous copies, the first ones before the programmatic-launch wait.
//! Used for single decode rows on sm_90+ when the shapes fit (see
//! [`fits`]); other cases keep the `gemv_q4bnb_*` kernels.

use anyhow::Result;
use cudarc::driver::sys::CUdeviceptr;

use super::gpu::{Arg, Gpu, arg};
use super::matmul::{FusedNorm, Q4BnbArgs, dtype_mode, q4_half, q4_staged_floats};
use super::tensor::CudaTensor;
use super::weights::CudaBnb4;

/// Weights per unit (`Q4S_UNIT_WEIGHTS` in gemv_q4s.cu): whole rows of one
/// matrix, 8 KiB of packed codes.
const UNIT_WEIGHTS: usize = 16384;
/// Most ring stages a block takes (`Q4S_MAX_STAGES`).
const MAX_STAGES: usize = 16;
/// Threads per block (8 warps: `GEMV_WARPS`).
const THREADS: u32 = 256;
/// Shared memory a block aims at by default, so that a block of the next
/// launch fits beside it on the SM and starts its own copies early.
const DEFAULT_SMEM_BUDGET: usize = 110 * 1024;

/// The outputs and unit counts of a launch (`Q4sMats` in gemv_q4s.cu).
#[repr(C)]
struct Q4sMats {
    y: [CUdeviceptr; 3],
    out: [i32; 3],
    units: [i32; 3],
}

/// Whether `q` multiplied by a single `in_f`-wide row can stream: rows of
/// 2048, 4096, 8192 or 16384 weights (so that a unit holds whole rows and a
/// warp's 64 chunks lie in one row), whole units, blocks of 32 to 1024
/// weights (a unit's scales then fill whole 16-byte copies) and at most 16
/// nested absmax values per unit.
pub fn fits(gpu: &Gpu, q: &CudaBnb4) -> bool {
    gpu.streamed_q4
        && matches!(q.cols, 2048 | 4096 | 8192 | 16384)
        && (q.rows * q.cols).is_multiple_of(UNIT_WEIGHTS)
        && (5..=10).contains(&q.bs_log2)
        && (q.codes.is_none() || q.bs_log2 + q.nested_bs_log2 >= 10)
}

/// Bytes of a unit's block scales (`q4s_scale_bytes` in gemv_q4s.cu).
fn scale_bytes(q: &CudaBnb4) -> usize {
    let per = if q.codes.is_some() { 1 } else { 4 };
    (UNIT_WEIGHTS >> q.bs_log2) * per
}

/// Nested absmax values per unit (1 without double quantization).
fn nested_per_unit(q: &CudaBnb4) -> usize {
    match q.codes {
        Some(_) => (UNIT_WEIGHTS >> (q.bs_log2 + q.nested_bs_log2)).max(1),
        None => 1,
    }
}

/// One streamed launch: matrices `ws` (read side by side when `pair`,
/// else one after another) times the single row `x`, into `ys`.
struct Launch<'a> {
    ws: &'a [&'a CudaBnb4],
    pair: bool,
    ys: [CUdeviceptr; 3],
    acc: bool,
    norm: Option<FusedNorm<'a>>,
}

impl Launch<'_> {
    fn run(&self, gpu: &Gpu, x: &CudaTensor) -> Result<()> {
        let in_f = x.cols;
        let cd = dtype_mode(self.ws[0].compute_dtype);
        let half = q4_half(cd);
        let tag = if half { "h" } else { "b" };
        let name = format!("gemv_q4s_{tag}{}", if self.pair { "_pair" } else { "" });
        let sides = if self.pair { 2 } else { 1 };
        let mut mats = Q4sMats {
            y: self.ys,
            out: [0; 3],
            units: [0; 3],
        };
        let seq = if self.pair { &self.ws[..1] } else { self.ws };
        for (i, w) in seq.iter().enumerate() {
            mats.out[i] = w.rows as i32;
            mats.units[i] = (w.rows * w.cols / UNIT_WEIGHTS) as i32;
        }
        let total: usize = mats.units.iter().map(|&u| u as usize).sum();
        let per_sm = env_usize("QUANTBENCH_Q4S_BLOCKS").unwrap_or(1).max(1);
        let grid = total.min(gpu.sm_count * per_sm);
        let max_units = total.div_ceil(grid);
        let stage_bytes = self
            .ws
            .iter()
            .map(|w| (UNIT_WEIGHTS / 2 + scale_bytes(w)).next_multiple_of(16))
            .max()
            .unwrap_or(0);
        let npu = self.ws.iter().map(|w| nested_per_unit(w)).max().unwrap_or(1);
        let fixed = q4_staged_floats(in_f, half).next_multiple_of(4) * 4
            + sides * max_units * (8 + npu) * 4;
        let budget = env_usize("QUANTBENCH_Q4S_SMEM_KB").map_or(DEFAULT_SMEM_BUDGET, |k| k * 1024);
        let stages = (budget.saturating_sub(fixed) / (sides * stage_bytes))
            .clamp(2, MAX_STAGES)
            .min(max_units)
            .max(1);
        let smem = (fixed + stages * sides * stage_bytes) as u32;
        gpu.reserve_dynamic_smem(&name, smem)?;
        let mut qa: Vec<Q4BnbArgs> = self.ws.iter().map(|w| Q4BnbArgs::of(w)).collect();
        while qa.len() < 3 {
            qa.push(qa[0]);
        }
        let (xp, inf) = (x.ptr(), in_f as i32);
        let (st, sb, mu, np) = (
            stages as i32,
            stage_bytes as i32,
            max_units as i32,
            npu as i32,
        );
        let acc = self.acc as i32;
        let nw: CUdeviceptr = self.norm.map_or(0, |n| n.weight.ptr());
        let eps = self.norm.map_or(0.0f32, |n| n.eps);
        let mut args: Vec<Arg> = vec![
            arg(&qa[0]),
            arg(&qa[1]),
            arg(&qa[2]),
            arg(&mats),
            arg(&xp),
            arg(&inf),
            arg(&st),
            arg(&sb),
            arg(&mu),
            arg(&np),
            arg(&acc),
            arg(&cd),
            arg(&nw),
            arg(&eps),
        ];
        gpu.launch(&name, (grid as u32, 1, 1), THREADS, smem, &mut args)
    }
}

/// `y (+)= x·Wᵀ` for a single row; `false` when it does not stream.
pub fn single(gpu: &Gpu, x: &CudaTensor, q: &CudaBnb4, y: &CudaTensor, acc: bool) -> Result<bool> {
    if x.rows != 1 || !fits(gpu, q) {
        return Ok(false);
    }
    Launch {
        ws: &[q],
        pair: false,
        ys: [y.ptr(), 0, 0],
        acc,
        norm: None,
    }
    .run(gpu, x)?;
    Ok(true)
}

/// `silu(n(x)·Gᵀ) ⊙ (n(x)·Uᵀ)` for a single row (`n`: the RMS norm when
/// given); `false` when it does not stream.
pub fn pair(
    gpu: &Gpu,
    x: &CudaTensor,
    gate: &CudaBnb4,
    up: &CudaBnb4,
    norm: Option<FusedNorm>,
    y: &CudaTensor,
) -> Result<bool> {
    if x.rows != 1 || !fits(gpu, gate) || !fits(gpu, up) {
        return Ok(false);
    }
    Launch {
        ws: &[gate, up],
        pair: true,
        ys: [y.ptr(), 0, 0],
        acc: false,
        norm,
    }
    .run(gpu, x)?;
    Ok(true)
}

/// `rms_norm(x)·Wᵢᵀ` for up to three matrices of a single row into `ys`;
/// `false` when they do not stream.
pub fn norm_many(
    gpu: &Gpu,
    x: &CudaTensor,
    norm: FusedNorm,
    ws: &[&CudaBnb4],
    ys: &[CudaTensor],
) -> Result<bool> {
    if x.rows != 1 || ws.is_empty() || ws.len() > 3 || !ws.iter().all(|q| fits(gpu, q)) {
        return Ok(false);
    }
    if ws.iter().any(|q| q.compute_dtype != ws[0].compute_dtype) {
        return Ok(false);
    }
    let mut ptrs = [0; 3];
    for (p, y) in ptrs.iter_mut().zip(ys) {
        *p = y.ptr();
    }
    Launch {
        ws,
        pair: false,
        ys: ptrs,
        acc: false,
        norm: Some(norm),
    }
    .run(gpu, x)?;
    Ok(true)
}

/// A positive integer from environment variable `name` (experiment knobs
/// for the grid and the shared-memory budget).
fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.parse().ok()
}
