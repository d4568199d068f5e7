//! A whole decoder block of a single-sequence decode step in one launch
//! (fused_block.cu): the five launches of the op-by-op path become phases
//! of one persistent grid, separated by grid-wide barriers. The phases run
//! the same device code with the same work split as the separate kernels,
//! so the results are bit-identical to the op-by-op path.

use anyhow::{Result, bail};
use cudarc::driver::sys::CUdeviceptr;

use super::CudaBackend;
use super::attention::{DecodePlan, check_fits, is_decode};
use super::gpu::{Gpu, arg};
use super::matmul::{
    Q4BnbArgs, Q4PackedArgs, dtype_mode, q4_bnb_ok, q4_ksplit, q4_packed_ok, q4_staged_floats,
};
use super::tensor::{CudaKvCache, CudaTensor};
use super::weights::CudaWeight;
use crate::backend::{BlockStep, BlockWeights, HeadShape};

/// Threads per block (`__launch_bounds__` of the fused kernels).
const THREADS: u32 = 256;
/// Default shared-memory budget of a block.
const SMEM_DEFAULT: usize = 48 * 1024;

/// The attention phase's buffers and shapes (`AttnDecode` in attention.cu).
#[repr(C)]
struct AttnDecode {
    q: CUdeviceptr,
    knew: CUdeviceptr,
    vnew: CUdeviceptr,
    kc: CUdeviceptr,
    vc: CUdeviceptr,
    slot: CUdeviceptr,
    pos: CUdeviceptr,
    inv_freq: CUdeviceptr,
    part: CUdeviceptr,
    count: CUdeviceptr,
    out: CUdeviceptr,
    q_heads: i32,
    kv_heads: i32,
    head_dim: i32,
    max_len: i32,
    splits: i32,
    scale: f32,
}

/// Buffers and shapes of one launch (`FusedBlock` in fused_block.cu).
#[repr(C)]
struct FusedBlock {
    attn: AttnDecode,
    x: CUdeviceptr,
    ln1: CUdeviceptr,
    ln2: CUdeviceptr,
    act: CUdeviceptr,
    bar: CUdeviceptr,
    eps: f32,
    hidden: i32,
    inter: i32,
    ks_qkv: i32,
    ks_o: i32,
    ks_gu: i32,
    ks_down: i32,
    cd: i32,
}

/// The seven matrices in the order q, k, v, o, gate, up, down, as one
/// kernel format takes them, with its kernel and compute-dtype mode.
enum FusedWeights {
    Bnb4([Q4BnbArgs; 7], i32),
    Packed([Q4PackedArgs; 7]),
}

impl FusedWeights {
    /// The fused kernel's arguments for `ws`, when all seven are 4-bit
    /// weights of one format that the single-row 4-bit GEMV takes.
    fn of(ws: &[&CudaWeight; 7]) -> Option<FusedWeights> {
        match ws[0] {
            CudaWeight::Bnb4(first) => {
                let args = ws.map(|w| match w {
                    CudaWeight::Bnb4(q)
                        if q4_bnb_ok(q) && q.compute_dtype == first.compute_dtype =>
                    {
                        Some(Q4BnbArgs::of(q))
                    }
                    _ => None,
                });
                let args = args.iter().copied().collect::<Option<Vec<_>>>()?;
                Some(FusedWeights::Bnb4(
                    args.try_into().ok()?,
                    dtype_mode(first.compute_dtype),
                ))
            }
            CudaWeight::Packed(_) => {
                let args = ws.map(|w| match w {
                    CudaWeight::Packed(q) if q4_packed_ok(q) => Some(Q4PackedArgs::of(q)),
                    _ => None,
                });
                let args = args.iter().copied().collect::<Option<Vec<_>>>()?;
                Some(FusedWeights::Packed(args.try_into().ok()?))
            }
            _ => None,
        }
    }

    /// The compute-dtype rounding mode (`rnd` in gemv.cu).
    fn compute_mode(&self) -> i32 {
        match self {
            FusedWeights::Bnb4(_, cd) => *cd,
            FusedWeights::Packed(_) => 0,
        }
    }

    /// The fused kernel for this format with `occupancy` blocks per SM.
    fn kernel(&self, occupancy: u32) -> String {
        let base = match self {
            FusedWeights::Bnb4(..) => "fused_block_q4bnb",
            FusedWeights::Packed(_) => "fused_block_q4packed",
        };
        format!("{base}_occ{occupancy}")
    }
}

/// Blocks per SM of the fused kernel to use, or 0 for none, from
/// `QUANTBENCH_CUDA_FUSED_BLOCK` (unset or `0`: op-by-op launches; `1` or
/// `2`: fused blocks with that register budget).
pub fn occupancy_from_env() -> Result<u32> {
    match std::env::var("QUANTBENCH_CUDA_FUSED_BLOCK") {
        Err(_) => Ok(0),
        Ok(v) => match v.as_str() {
            "0" | "1" | "2" => Ok(v.parse()?),
            _ => bail!(
                "QUANTBENCH_CUDA_FUSED_BLOCK must be 0 (off), 1 or 2 (blocks per SM), not {v:?}"
            ),
        },
    }
}

/// Whether the weights' shapes are those of a Llama block with `heads`.
fn shapes_match(w: &[&CudaWeight; 7], heads: HeadShape, hidden: usize, inter: usize) -> bool {
    let (qo, kvo) = (
        heads.q_heads * heads.head_dim,
        heads.kv_heads * heads.head_dim,
    );
    let want = [
        (qo, hidden),
        (kvo, hidden),
        (kvo, hidden),
        (hidden, qo),
        (inter, hidden),
        (inter, hidden),
        (hidden, inter),
    ];
    w.iter().zip(want).all(|(w, s)| w.shape() == s)
}

/// Runs decoder block `step.layer` on the residual row `x` in one launch of the
/// fused kernel with `occupancy` (1 or 2) blocks per SM when the step is a
/// decode step of one sequence and every linear weight is 4-bit in one
/// format the fused kernels take; `false` (nothing done) otherwise.
pub fn decode_block(
    gpu: &Gpu,
    occupancy: u32,
    x: &mut CudaTensor,
    w: &BlockWeights<'_, CudaBackend>,
    step: &BlockStep<'_, CudaBackend>,
    cache: &mut CudaKvCache,
) -> Result<bool> {
    let (heads, layout) = (step.heads, step.layout);
    let s = cache.shape;
    let hidden = x.cols;
    let inter = w.gate_proj.shape().0;
    let ws = [
        w.q_proj,
        w.k_proj,
        w.v_proj,
        w.o_proj,
        w.gate_proj,
        w.up_proj,
        w.down_proj,
    ];
    let fits = x.rows == 1
        && layout.n() == 1
        && is_decode(layout)
        && step.layer < s.layers
        && heads.kv_heads == s.kv_heads
        && heads.head_dim == s.head_dim
        && heads.q_heads.is_multiple_of(heads.kv_heads)
        && w.input_layernorm.len() == hidden
        && w.post_attention_layernorm.len() == hidden
        && step.inv_freq.len() * 2 == heads.head_dim
        && shapes_match(&ws, heads, hidden, inter);
    if !fits {
        return Ok(false);
    }
    let Some(fw) = FusedWeights::of(&ws) else {
        return Ok(false);
    };
    check_fits(cache, layout)?;
    let plan = DecodePlan::new(heads, s.max_len)?;
    let name = fw.kernel(occupancy);
    let qo = heads.q_heads * heads.head_dim;
    let staged = [hidden, qo, inter].map(q4_staged_floats);
    let smem = (staged.iter().max().copied().unwrap_or(0) * 4).max(plan.smem);
    if smem > SMEM_DEFAULT {
        gpu.set_max_dynamic_smem(&name, smem as u32)?;
    }
    let grid = gpu.one_wave(&name, usize::MAX, smem as u32)?;
    let q = CudaTensor::empty(gpu, 1, qo)?;
    let k = CudaTensor::empty(gpu, 1, heads.kv_heads * heads.head_dim)?;
    let v = CudaTensor::empty(gpu, 1, heads.kv_heads * heads.head_dim)?;
    let att = CudaTensor::empty(gpu, 1, qo)?;
    let act = CudaTensor::empty(gpu, 1, inter)?;
    let part = gpu.alloc(plan.partial_bytes)?;
    let kvo = heads.kv_heads * heads.head_dim;
    let params = FusedBlock {
        attn: AttnDecode {
            q: q.ptr(),
            knew: k.ptr(),
            vnew: v.ptr(),
            kc: cache.k(step.layer),
            vc: cache.v(step.layer),
            slot: layout.slots(),
            pos: layout.positions(),
            inv_freq: step.inv_freq.ptr(),
            part: part.ptr(),
            count: cache.counters(),
            out: att.ptr(),
            q_heads: heads.q_heads as i32,
            kv_heads: heads.kv_heads as i32,
            head_dim: heads.head_dim as i32,
            max_len: s.max_len as i32,
            splits: plan.splits as i32,
            scale: 1.0 / (heads.head_dim as f32).sqrt(),
        },
        x: x.ptr(),
        ln1: w.input_layernorm.ptr(),
        ln2: w.post_attention_layernorm.ptr(),
        act: act.ptr(),
        bar: cache.barrier(),
        eps: step.eps,
        hidden: hidden as i32,
        inter: inter as i32,
        ks_qkv: q4_ksplit(gpu, qo + 2 * kvo, hidden, 4) as i32,
        ks_o: q4_ksplit(gpu, hidden, qo, 4) as i32,
        ks_gu: q4_ksplit(gpu, inter, hidden, 1) as i32,
        ks_down: q4_ksplit(gpu, hidden, inter, 4) as i32,
        cd: fw.compute_mode(),
    };
    launch(gpu, &name, grid, smem, &fw, &params)?;
    Ok(true)
}

/// Launches fused kernel `name` (taking `fw`) on `grid` blocks.
fn launch(
    gpu: &Gpu,
    name: &str,
    grid: usize,
    smem: usize,
    fw: &FusedWeights,
    params: &FusedBlock,
) -> Result<()> {
    let weights = match fw {
        FusedWeights::Bnb4(m, _) => arg(m),
        FusedWeights::Packed(m) => arg(m),
    };
    let mut args = [weights, arg(params)];
    gpu.launch(name, (grid as u32, 1, 1), THREADS, smem as u32, &mut args)
}
