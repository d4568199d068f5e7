//! Decoder blocks of a single-sequence decode step as persistent launches
//! (fused_block.cu): the five launches per block of the op-by-op path become
//! phases of one grid, separated by grid-wide barriers, for one block per
//! launch or for all blocks in one launch. The phases run the same device
//! code with the same work split as the separate kernels, so the results
//! are bit-identical to the op-by-op path.

use std::ffi::c_void;

use anyhow::{Result, bail};
use cudarc::driver::sys::CUdeviceptr;

use super::CudaBackend;
use super::attention::{DecodePlan, check_fits, is_decode};
use super::gpu::{Arg, Gpu, arg};
use super::matmul::{
    Q4BnbArgs, Q4PackedArgs, dtype_mode, q4_bnb_ok, q4_ksplit, q4_packed_ok, q4_staged_floats,
};
use super::tensor::{CudaKvCache, CudaTensor};
use super::weights::CudaWeight;
use crate::backend::{BlockStep, BlockWeights, HeadShape};

/// Threads per block (`__launch_bounds__` of the fused kernels).
const THREADS: u32 = 256;
/// Most decoder blocks one whole-model launch takes (`FUSED_KERNELS(_, 32)`).
const MAX_LAYERS: usize = 32;

/// How decode steps run their decoder blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusedMode {
    /// Op by op: five launches per block.
    Off,
    /// One launch per block, with `occupancy` (1 or 2) blocks per SM.
    PerBlock { occupancy: u32 },
    /// All blocks in one launch (up to 32 per launch), with `occupancy`
    /// blocks per SM.
    WholeModel { occupancy: u32 },
}

impl FusedMode {
    /// From `QUANTBENCH_CUDA_FUSED`: unset or `off`, `block1`, `block2`,
    /// `model1`, `model2` (the digit: blocks per SM).
    pub fn from_env() -> Result<FusedMode> {
        Ok(match std::env::var("QUANTBENCH_CUDA_FUSED").as_deref() {
            Err(_) | Ok("off") => FusedMode::Off,
            Ok("block1") => FusedMode::PerBlock { occupancy: 1 },
            Ok("block2") => FusedMode::PerBlock { occupancy: 2 },
            Ok("model1") => FusedMode::WholeModel { occupancy: 1 },
            Ok("model2") => FusedMode::WholeModel { occupancy: 2 },
            Ok(other) => bail!(
                "QUANTBENCH_CUDA_FUSED must be off, block1, block2, model1 or model2, not {other:?}"
            ),
        })
    }

    /// Blocks per SM and decoder blocks per launch, or `None` when off.
    fn launch_shape(self) -> Option<(u32, usize)> {
        match self {
            FusedMode::Off => None,
            FusedMode::PerBlock { occupancy } => Some((occupancy, 1)),
            FusedMode::WholeModel { occupancy } => Some((occupancy, MAX_LAYERS)),
        }
    }
}

impl std::fmt::Display for FusedMode {
    /// The `QUANTBENCH_CUDA_FUSED` value that selects this mode.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FusedMode::Off => write!(f, "off"),
            FusedMode::PerBlock { occupancy } => write!(f, "block{occupancy}"),
            FusedMode::WholeModel { occupancy } => write!(f, "model{occupancy}"),
        }
    }
}

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

/// Buffers and shapes a launch's decoder blocks share (`FusedBlock` in
/// fused_block.cu).
#[repr(C)]
struct FusedBlock {
    attn: AttnDecode,
    x: CUdeviceptr,
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

/// One decoder block: its matrices (q, k, v, o, gate, up, down), norms and
/// layer of the KV cache (`FusedLayer` in fused_block.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct FusedLayer<A> {
    m: [A; 7],
    ln1: CUdeviceptr,
    ln2: CUdeviceptr,
    kc: CUdeviceptr,
    vc: CUdeviceptr,
}

/// The decoder blocks of a step in the one format a fused kernel takes,
/// with the compute-dtype mode.
enum FusedLayers {
    Bnb4(Vec<FusedLayer<Q4BnbArgs>>, i32),
    Packed(Vec<FusedLayer<Q4PackedArgs>>),
}

impl FusedLayers {
    /// The kernels' descriptors of `layers` (layer i in layer i of `cache`),
    /// when every matrix is a 4-bit weight of one format (and compute
    /// dtype) that the single-row 4-bit GEMV takes.
    fn of(layers: &[BlockWeights<'_, CudaBackend>], cache: &CudaKvCache) -> Option<FusedLayers> {
        match layers.first()?.q_proj {
            CudaWeight::Bnb4(first) => {
                let cd = first.compute_dtype;
                let ls = describe(layers, cache, |m| match m {
                    CudaWeight::Bnb4(q) if q4_bnb_ok(q) && q.compute_dtype == cd => {
                        Some(Q4BnbArgs::of(q))
                    }
                    _ => None,
                })?;
                Some(FusedLayers::Bnb4(ls, dtype_mode(cd)))
            }
            CudaWeight::Packed(_) => {
                let ls = describe(layers, cache, |m| match m {
                    CudaWeight::Packed(q) if q4_packed_ok(q) => Some(Q4PackedArgs::of(q)),
                    _ => None,
                })?;
                Some(FusedLayers::Packed(ls))
            }
            _ => None,
        }
    }

    /// The compute-dtype rounding mode (`rnd` in gemv.cu).
    fn compute_mode(&self) -> i32 {
        match self {
            FusedLayers::Bnb4(_, cd) => *cd,
            FusedLayers::Packed(_) => 0,
        }
    }

    /// The fused kernel for this format, `occupancy` blocks per SM and up to
    /// `per_launch` decoder blocks per launch.
    fn kernel(&self, occupancy: u32, per_launch: usize) -> String {
        let base = match self {
            FusedLayers::Bnb4(..) => "fused_q4bnb",
            FusedLayers::Packed(_) => "fused_q4packed",
        };
        format!("{base}_occ{occupancy}_l{per_launch}")
    }
}

/// Descriptors of `layers`, each matrix described by `matrix` (`None`
/// when some matrix has no description).
fn describe<A>(
    layers: &[BlockWeights<'_, CudaBackend>],
    cache: &CudaKvCache,
    matrix: impl Fn(&CudaWeight) -> Option<A>,
) -> Option<Vec<FusedLayer<A>>> {
    layers
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let m: Vec<A> = matrices(w)
                .into_iter()
                .map(&matrix)
                .collect::<Option<_>>()?;
            Some(FusedLayer {
                m: m.try_into().ok()?,
                ln1: w.input_layernorm.ptr(),
                ln2: w.post_attention_layernorm.ptr(),
                kc: cache.k(i),
                vc: cache.v(i),
            })
        })
        .collect()
}

/// A block's matrices in the kernels' order.
fn matrices<'a>(w: &BlockWeights<'a, CudaBackend>) -> [&'a CudaWeight; 7] {
    [
        w.q_proj,
        w.k_proj,
        w.v_proj,
        w.o_proj,
        w.gate_proj,
        w.up_proj,
        w.down_proj,
    ]
}

/// Whether block `w`'s shapes are those of a Llama block with `heads`,
/// `hidden` and MLP width `inter`.
fn shapes_match(
    w: &BlockWeights<'_, CudaBackend>,
    heads: HeadShape,
    hidden: usize,
    inter: usize,
) -> bool {
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
    w.input_layernorm.len() == hidden
        && w.post_attention_layernorm.len() == hidden
        && matrices(w).iter().zip(want).all(|(m, s)| m.shape() == s)
}

/// Runs `layers` (layer i of the cache for block i) on the residual row `x`
/// as fused launches in `mode` when the step is a decode step of one
/// sequence and every linear weight is 4-bit in one format the fused kernels
/// take; `false` (nothing done) otherwise.
pub fn decode_blocks(
    gpu: &Gpu,
    mode: FusedMode,
    x: &mut CudaTensor,
    layers: &[BlockWeights<'_, CudaBackend>],
    step: &BlockStep<'_, CudaBackend>,
    cache: &mut CudaKvCache,
) -> Result<bool> {
    let Some((occupancy, per_launch)) = mode.launch_shape() else {
        return Ok(false);
    };
    let (heads, layout) = (step.heads, step.layout);
    let s = cache.shape;
    let hidden = x.cols;
    let Some(inter) = layers.first().map(|w| w.gate_proj.shape().0) else {
        return Ok(false);
    };
    let fits = x.rows == 1
        && layout.n() == 1
        && is_decode(layout)
        && layers.len() <= s.layers
        && heads.kv_heads == s.kv_heads
        && heads.head_dim == s.head_dim
        && heads.q_heads.is_multiple_of(heads.kv_heads)
        && step.inv_freq.len() * 2 == heads.head_dim
        && layers.iter().all(|w| shapes_match(w, heads, hidden, inter));
    if !fits {
        return Ok(false);
    }
    let Some(fused) = FusedLayers::of(layers, cache) else {
        return Ok(false);
    };
    check_fits(cache, layout)?;
    let plan = DecodePlan::new(heads, s.max_len)?;
    let name = fused.kernel(occupancy, per_launch);
    let (qo, kvo) = (
        heads.q_heads * heads.head_dim,
        heads.kv_heads * heads.head_dim,
    );
    let staged = [hidden, qo, inter].map(q4_staged_floats);
    let smem = (staged.iter().max().copied().unwrap_or(0) * 4).max(plan.smem);
    gpu.reserve_dynamic_smem(&name, smem as u32)?;
    let grid = gpu.one_wave(&name, usize::MAX, smem as u32)?;
    let q = CudaTensor::empty(gpu, 1, qo)?;
    let k = CudaTensor::empty(gpu, 1, kvo)?;
    let v = CudaTensor::empty(gpu, 1, kvo)?;
    let att = CudaTensor::empty(gpu, 1, qo)?;
    let act = CudaTensor::empty(gpu, 1, inter)?;
    let part = gpu.alloc(plan.partial_bytes)?;
    let params = FusedBlock {
        attn: AttnDecode {
            q: q.ptr(),
            knew: k.ptr(),
            vnew: v.ptr(),
            kc: 0,
            vc: 0,
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
        act: act.ptr(),
        bar: cache.barrier(),
        eps: step.eps,
        hidden: hidden as i32,
        inter: inter as i32,
        ks_qkv: q4_ksplit(gpu, qo + 2 * kvo, hidden, 4) as i32,
        ks_o: q4_ksplit(gpu, hidden, qo, 4) as i32,
        ks_gu: q4_ksplit(gpu, inter, hidden, 1) as i32,
        ks_down: q4_ksplit(gpu, hidden, inter, 4) as i32,
        cd: fused.compute_mode(),
    };
    let launch = Launch {
        gpu,
        name: &name,
        grid,
        smem,
        params: &params,
    };
    match &fused {
        FusedLayers::Bnb4(ls, _) => launch.chunks(ls, per_launch),
        FusedLayers::Packed(ls) => launch.chunks(ls, per_launch),
    }?;
    Ok(true)
}

/// One fused kernel and its shared arguments.
struct Launch<'a> {
    gpu: &'a Gpu,
    name: &'a str,
    grid: usize,
    smem: usize,
    params: &'a FusedBlock,
}

impl Launch<'_> {
    /// Launches the kernel on `per_launch` decoder blocks of `layers` at a
    /// time; its descriptor array always holds `per_launch` entries (the
    /// kernel's parameter size), the last one repeated past the end.
    fn chunks<A: Copy>(&self, layers: &[FusedLayer<A>], per_launch: usize) -> Result<()> {
        for chunk in layers.chunks(per_launch) {
            let mut descs = chunk.to_vec();
            descs.resize(per_launch, chunk[chunk.len() - 1]);
            let n = chunk.len() as i32;
            let mut args: [Arg; 3] = [descs.as_mut_ptr() as *mut c_void, arg(&n), arg(self.params)];
            self.gpu.launch(
                self.name,
                (self.grid as u32, 1, 1),
                THREADS,
                self.smem as u32,
                &mut args,
            )?;
        }
        Ok(())
    }
}
