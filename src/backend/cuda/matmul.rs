//! `y[n, out] = x[n, in] · Wᵀ` for every weight format: small batches go
//! through the GEMV kernels (weights streamed once, in their storage format),
//! larger ones through cuBLAS.

use std::ffi::c_void;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::sys::CUdeviceptr;

use super::gpu::{Arg, Gpu, arg, grid_for};
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
    if x.rows == 0 || gemv_into(gpu, x, w, &y, false)? {
        return Ok(y);
    }
    match w {
        CudaWeight::Dense { dtype, buf, .. } => {
            gemm_dense(gpu, *dtype, buf.ptr(), x, &y, out_f, in_f)?
        }
        CudaWeight::Bnb4(q) => matmul_bnb4(gpu, q, x, &y)?,
        CudaWeight::Packed(q) => matmul_packed(gpu, q, x, &y)?,
        CudaWeight::Int8(q) => matmul_int8(gpu, q, x, &y)?,
    }
    Ok(y)
}

/// `x += a·Wᵀ`: the GEMV adds its results to `x` directly; other paths
/// compute the product, then add it.
pub fn matmul_add(gpu: &Gpu, x: &mut CudaTensor, a: &CudaTensor, w: &CudaWeight) -> Result<()> {
    let (out_f, in_f) = w.shape();
    if a.cols != in_f || x.rows != a.rows || x.cols != out_f {
        bail!(
            "matmul_add: {}x{} += {}x{} times a {out_f}x{in_f} weight",
            x.rows,
            x.cols,
            a.rows,
            a.cols
        );
    }
    if a.rows == 0 || gemv_into(gpu, a, w, x, true)? {
        return Ok(());
    }
    let y = matmul(gpu, a, w)?;
    super::ops::add_assign(gpu, x, &y)
}

/// Fewest rows for which NF4/FP4 batches take the tensor-core kernels: on
/// an H100 (Llama-3.2-1B shapes, `nf4,compute_dtype=f16`) a batch-2 step
/// took 1.72 ms with them against 1.59 without, batch 4 1.85 against 2.14
/// and batch 8 2.30 against 3.40 (bench/RESULTS.md, twenty-third session).
const MMA_MIN_ROWS: usize = 4;

/// Whether a batch of `rows` with NF4/FP4 weights `q` takes the
/// tensor-core kernels (gemv_mma.cu): 4 to 8 rows, the shapes of the
/// 32-weights-per-lane kernels, staged inputs that fit shared memory, and
/// not switched off ([`mma_enabled`]).
fn q4_mma_ok(q: &CudaBnb4, rows: usize) -> bool {
    mma_enabled()
        && (MMA_MIN_ROWS..=GEMV_MAX_ROWS).contains(&rows)
        && q4_bnb_ok(q)
        && bnb4_mma_smem_floats(q, rows) * 4 <= LAUNCH_MAX_SMEM_BYTES
}

/// Dynamic shared memory of an NF4/FP4 tensor-core launch for a batch of
/// `rows`, in floats: the code-pair tables, then the staged inputs, split
/// into bf16 halves for an f32 compute dtype (the `_f32` kernels).
fn bnb4_mma_smem_floats(q: &CudaBnb4, rows: usize) -> usize {
    if q.compute_dtype == DType::F32 {
        split_mma_smem_floats(rows, q.cols)
    } else {
        mma_smem_floats(q.cols)
    }
}

/// Whether a batch of `rows` with a dense `dtype` weight of `out_f` x
/// `in_f` takes the tensor-core kernel `gemv_bf16_mma`: bf16 weights, 2 to
/// 8 rows, at least eight 16-row tiles per SM (the lm_head: the kernel's
/// warps each own whole tiles), rows of a multiple of 64 inputs whose
/// staged halves fit shared memory, and not switched off
/// ([`mma_enabled`]).
fn dense_mma_ok(gpu: &Gpu, dtype: DType, rows: usize, out_f: usize, in_f: usize) -> bool {
    mma_enabled()
        && dtype == DType::BF16
        && (2..=GEMV_MAX_ROWS).contains(&rows)
        && out_f >= 16 * GEMV_WARPS * gpu.sm_count
        && in_f.is_multiple_of(64)
        && mma_dense_b_words(in_f) * 4 <= LAUNCH_MAX_SMEM_BYTES
}

/// Words (floats) of `gemv_bf16_mma`'s staged inputs: four per lane, step
/// and 64-input round (`mma_dense_b_words` in gemv_mma.cu).
fn mma_dense_b_words(in_f: usize) -> usize {
    in_f / 64 * 4 * 32 * 4
}

/// Whether the tensor-core kernels are on (`QUANTBENCH_CUDA_MMA=0` turns
/// them off, for comparing the two paths).
fn mma_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("QUANTBENCH_CUDA_MMA").as_deref() != Ok("0"))
}

/// Whether a batch of `rows` with packed integers `q` takes the tensor-core
/// kernels (`gemv_q4packed_mma*`): as [`q4_mma_ok`], for 4-bit groups of a
/// multiple of 128 inputs (one scale per row and 128-input round).
fn packed_mma_ok(q: &CudaPacked, rows: usize) -> bool {
    mma_enabled()
        && (MMA_MIN_ROWS..=GEMV_MAX_ROWS).contains(&rows)
        && q4_packed_ok(q)
        && q.group_size.is_multiple_of(128)
        && split_mma_smem_floats(rows, q.cols) * 4 <= LAUNCH_MAX_SMEM_BYTES
}

/// Dynamic shared memory of a 4-bit tensor-core launch for `in_f`-wide
/// rows, in floats: the code-pair tables, then the staged B fragments.
fn mma_smem_floats(in_f: usize) -> usize {
    q4_pair_floats(false) + mma_b_words(in_f)
}

/// Dynamic shared memory of a split-input tensor-core launch (packed
/// integers, f32-compute NF4/FP4) for a batch of `rows` of `in_f` inputs, in
/// floats: the code-pair tables, then the staged inputs, four words (two
/// bf16 halves of two pairs) per batch row, lane column, step and
/// 128-input round (`mma_stage_x_split` in gemv_mma.cu).
fn split_mma_smem_floats(rows: usize, in_f: usize) -> usize {
    q4_pair_floats(false) + in_f.div_ceil(128) * 8 * rows * 4 * 4
}

/// A 4-bit weight of a batch that takes the tensor-core kernels.
#[derive(Clone, Copy)]
enum MmaWeight<'a> {
    Bnb4(&'a CudaBnb4),
    Packed(&'a CudaPacked),
}

impl<'a> MmaWeight<'a> {
    /// `w` when a batch of `rows` takes the tensor-core kernels with it.
    fn of(w: &'a CudaWeight, rows: usize) -> Option<Self> {
        match w {
            CudaWeight::Bnb4(q) if q4_mma_ok(q, rows) => Some(MmaWeight::Bnb4(q)),
            CudaWeight::Packed(q) if packed_mma_ok(q, rows) => Some(MmaWeight::Packed(q)),
            _ => None,
        }
    }

    /// Output and input features.
    fn shape(self) -> (usize, usize) {
        match self {
            MmaWeight::Bnb4(q) => (q.rows, q.cols),
            MmaWeight::Packed(q) => (q.rows, q.cols),
        }
    }

    /// Whether `self` and `up` can share a pair launch: the same format,
    /// and for NF4/FP4 the same compute dtype.
    fn pairs_with(self, up: MmaWeight) -> bool {
        match (self, up) {
            (MmaWeight::Bnb4(a), MmaWeight::Bnb4(b)) => a.compute_dtype == b.compute_dtype,
            (MmaWeight::Packed(_), MmaWeight::Packed(_)) => true,
            _ => false,
        }
    }
}

/// Words (floats) of the 4-bit tensor-core kernels' staged inputs: two per
/// lane, step and 128-input round (`mma_b_words` in gemv_mma.cu).
fn mma_b_words(in_f: usize) -> usize {
    in_f.div_ceil(128) * 8 * 32 * 2
}

/// Whether NF4/FP4 weights take the 32-weights-per-lane kernel: rows a
/// multiple of 32, blocks of at least 32, and 32-bit offsets
/// ([`q4_offsets_fit`]).
fn q4_bnb_ok(q: &CudaBnb4) -> bool {
    q.cols.is_multiple_of(32) && q.bs_log2 >= 5 && q4_offsets_fit(q.rows, q.cols)
}

/// Whether packed integers take the 32-weights-per-lane kernel: 4 bits,
/// groups of whole 32-column chunks, no act-order permutation, and 32-bit
/// offsets ([`q4_offsets_fit`]).
fn q4_packed_ok(q: &CudaPacked) -> bool {
    q.bits == 4
        && q.cols.is_multiple_of(32)
        && q.group_size.is_multiple_of(32)
        && q.g_idx.is_none()
        && q4_offsets_fit(q.rows, q.cols)
}

/// Whether a `rows` x `cols` matrix has fewer than 2^32 weights: the
/// 32-weights-per-lane kernels (gemv_q4.cu) index it with 32-bit offsets.
fn q4_offsets_fit(rows: usize, cols: usize) -> bool {
    rows.checked_mul(cols)
        .is_some_and(|n| n <= u32::MAX as usize)
}

/// The 4-bit kernel instance for a batch of `rows` (one for single rows,
/// one for up to four, one for up to eight) and its tiling: every instance
/// keeps its code-pair tables in shared memory and its blocks loop over
/// logical blocks, so that a block fills the tables once; single rows also
/// stage x there, in f16 when `half` (see [`q4_half`]).
fn q4_kernel(
    gpu: &Gpu,
    base: &str,
    rows: usize,
    in_f: usize,
    suffix: &str,
    tilings: Q4Tilings,
    stage: Q4Stage,
) -> Result<(String, GemvTiling)> {
    if rows > 1 {
        let nb = q4_batch(rows);
        let tiling = if nb == 4 {
            tilings.batch4
        } else {
            tilings.batch8
        };
        let name = format!("{base}_b{nb}{suffix}");
        let smem = stage_smem(gpu, &name, q4_batch_floats(nb, in_f, stage.norm))?;
        return Ok((name, tiling.looping(smem)));
    }
    let tag = if stage.half { "h1" } else { "b1" };
    let name = format!("{base}_{tag}{suffix}");
    let smem = stage_smem(gpu, &name, q4_staged_floats(in_f, stage.half))?;
    Ok((name, tilings.single.looping(smem)))
}

/// How a 4-bit launch stages its input: single rows in f16 when `half`
/// (see [`q4_half`]); batches normalize and stage their rows when `norm`.
#[derive(Clone, Copy)]
struct Q4Stage {
    half: bool,
    norm: bool,
}

/// Staging without f16 single rows or normalized batch rows (packed
/// single-matrix products).
const NO_STAGE: Q4Stage = Q4Stage {
    half: false,
    norm: false,
};

/// The largest batch of the 4-bit instance that takes `rows` rows (`b4` or
/// `b8`).
fn q4_batch(rows: usize) -> usize {
    if rows <= 4 { 4 } else { GEMV_MAX_ROWS }
}

/// Dynamic shared memory of a 4-bit batch launch of instance `nb`, in
/// floats: the code-pair tables, then with `norm` its `nb` normalized rows
/// (`Q4_BATCH_ROWS_AT` in gemv_q4.cu).
fn q4_batch_floats(nb: usize, in_f: usize, norm: bool) -> usize {
    let rows = if norm { nb * q4_row_floats(in_f) } else { 0 };
    q4_pair_floats(false) + rows
}

/// Most dynamic shared memory a batch launch's staged rows may bring it to
/// (under the 227 KiB an H100 block may have, with room for the kernel's
/// static shared memory): wider rows take the separate norm (4-bit batch
/// instances) or the CUDA-core kernels (tensor-core launches).
const LAUNCH_MAX_SMEM_BYTES: usize = 192 * 1024;

/// Floats of one f32 row staged with a pad word per 32 values, rounded up
/// to an even count (`q4_pairs_at<false>` in gemv_q4.cu).
fn q4_row_floats(in_f: usize) -> usize {
    (in_f + in_f / 32).next_multiple_of(2)
}

/// Whether a single row meets NF4/FP4 weights of compute dtype `cd`
/// (`dtype_mode`) in the half-precision kernels (`H` in gemv_q4.cu): f16
/// products summed in f16 pairs over each lane's 32 weights, then in f32.
/// Only for an f16 or bf16 compute dtype, which already rounds activations
/// and products to 2^-11 relative or coarser; f32 keeps f32 products.
fn q4_half(cd: i32) -> bool {
    cd != 0
}

/// The tilings of a 4-bit kernel family: its single-row and its batch
/// instance.
#[derive(Clone, Copy)]
struct Q4Tilings {
    single: GemvTiling,
    /// Batches of up to four rows (the `b4` instances).
    batch4: GemvTiling,
    /// Batches of up to eight rows (the `b8` instances).
    batch8: GemvTiling,
}

/// 4-bit single-matrix kernels: four rows per warp in both instances, a
/// single row's row groups on at most four warps.
const Q4_SINGLE: Q4Tilings = Q4Tilings {
    single: WIDE_SINGLE,
    batch4: WIDE,
    batch8: WIDE,
};
/// 4-bit pair kernels.
const Q4_PAIR: Q4Tilings = Q4Tilings {
    single: WIDE_PAIR_SINGLE,
    batch4: WIDE_PAIR_BATCH4,
    batch8: WIDE_PAIR,
};

/// Floats of a single-row 4-bit kernel's code-pair tables: 256 entries of
/// 16 slots of two floats (128 bytes), or in `half` kernels of 32 slots of
/// two f16 values padded to 256 bytes (`Q4_PAIR_FLOATS` and
/// `Q4_PAIR_FLOATS_H` in gemv_q4.cu, filled by `q4_pair_tables`).
fn q4_pair_floats(half: bool) -> usize {
    if half { 256 * 64 } else { 256 * 32 }
}

/// Dynamic shared memory of a single-row 4-bit kernel for an `in_f`-wide
/// row, in floats (`q4_pairs_at` in gemv_q4.cu): the staged row (one pad
/// word per 32 values, 8-byte aligned; in `half` kernels 20 words and a
/// scale per 32 values), then the code-pair tables.
fn q4_staged_floats(in_f: usize, half: bool) -> usize {
    let row = if half {
        21 * (in_f / 32)
    } else {
        q4_row_floats(in_f)
    };
    row + q4_pair_floats(half)
}

/// Small batches: the GEMV of `x` with `w` into `y` (adding to `y` when
/// `acc`); `false` when the batch or format has no GEMV kernel.
fn gemv_into(gpu: &Gpu, x: &CudaTensor, w: &CudaWeight, y: &CudaTensor, acc: bool) -> Result<bool> {
    let (out_f, in_f) = w.shape();
    if x.rows > GEMV_MAX_ROWS {
        return Ok(false);
    }
    let g = Gemv { out_f, in_f, acc };
    if let Some(m) = MmaWeight::of(w, x.rows) {
        q4_mma_gemv(gpu, x, m, None, y, acc, None)?;
        return Ok(true);
    }
    match w {
        CudaWeight::Dense { dtype, buf, .. } if dense_mma_ok(gpu, *dtype, x.rows, out_f, in_f) => {
            let name = "gemv_bf16_mma";
            let smem = stage_smem(gpu, name, mma_dense_b_words(in_f))?;
            let p = buf.ptr();
            let tiling = MMA.split_at_most(1).looping(smem);
            g.launch(gpu, name, vec![arg(&p)], &[], x, y, tiling)?;
        }
        CudaWeight::Dense { dtype, buf, .. } if in_f % 8 == 0 => {
            let name = dense_kernel(*dtype, x.rows, "");
            let p = buf.ptr();
            g.launch(gpu, &name, vec![arg(&p)], &[], x, y, NARROW)?;
        }
        CudaWeight::Bnb4(q) => {
            let cd = dtype_mode(q.compute_dtype);
            if q4_bnb_ok(q) {
                let stage = Q4Stage {
                    half: q4_half(cd),
                    norm: false,
                };
                let (name, tiling) =
                    q4_kernel(gpu, "gemv_q4bnb", x.rows, in_f, "", Q4_SINGLE, stage)?;
                let a = Q4BnbArgs::of(q);
                g.launch(gpu, &name, vec![arg(&a)], &[arg(&cd)], x, y, tiling)?;
            } else {
                let params = bnb4_params(q);
                let name = gemv_kernel("gemv_bnb4", x.rows, "");
                g.launch(gpu, &name, params.args(), &[arg(&cd)], x, y, NARROW)?;
            }
        }
        CudaWeight::Packed(q) => {
            let params = packed_params(q);
            if q4_packed_ok(q) {
                let (name, tiling) =
                    q4_kernel(gpu, "gemv_q4packed", x.rows, in_f, "", Q4_SINGLE, NO_STAGE)?;
                g.launch(gpu, &name, params.args(), &[], x, y, tiling)?;
            } else {
                let name = gemv_kernel(&format!("gemv_packed{}", q.bits), x.rows, "");
                g.launch(gpu, &name, params.args(), &[], x, y, NARROW)?;
            }
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// The tensor-core GEMV of the batch `x` with `w` into `y` (adding to it
/// when `acc`), or with `up` (of the same format, see
/// [`MmaWeight::pairs_with`]) silu(x·Wᵀ) * (x·Upᵀ) (the `_pair` kernels),
/// of `rms_norm(x)` with `norm`.
fn q4_mma_gemv(
    gpu: &Gpu,
    x: &CudaTensor,
    w: MmaWeight,
    up: Option<MmaWeight>,
    y: &CudaTensor,
    acc: bool,
    norm: Option<FusedNorm>,
) -> Result<()> {
    if let Some(u) = up
        && !w.pairs_with(u)
    {
        bail!("a tensor-core pair launch needs two weights of one format and compute dtype");
    }
    let (out_f, in_f) = w.shape();
    let pair = if up.is_some() { "_pair" } else { "" };
    // The kernel, its shared memory and, for NF4/FP4, the compute dtype
    // argument that precedes the norm's.
    let (name, floats, cd) = match w {
        MmaWeight::Bnb4(q) => {
            let f32 = if q.compute_dtype == DType::F32 {
                "_f32"
            } else {
                ""
            };
            let name = format!("gemv_q4bnb_mma{f32}{pair}");
            let cd = dtype_mode(q.compute_dtype);
            (name, bnb4_mma_smem_floats(q, x.rows), Some(cd))
        }
        MmaWeight::Packed(_) => {
            let name = format!("gemv_q4packed_mma{pair}");
            (name, split_mma_smem_floats(x.rows, in_f), None)
        }
    };
    let tiling = MMA.looping(stage_smem(gpu, &name, floats)?);
    // One of these holds the matrices (the pair check above).
    let mats = [Some(w), up].into_iter().flatten();
    let bnb: Vec<Q4BnbArgs> = mats
        .clone()
        .filter_map(|m| match m {
            MmaWeight::Bnb4(q) => Some(Q4BnbArgs::of(q)),
            MmaWeight::Packed(_) => None,
        })
        .collect();
    let packed: Vec<Q4PackedArgs> = mats
        .filter_map(|m| match m {
            MmaWeight::Packed(q) => Some(Q4PackedArgs::of(q)),
            MmaWeight::Bnb4(_) => None,
        })
        .collect();
    let pre = bnb.iter().map(arg).chain(packed.iter().map(arg)).collect();
    let na = NormArgs::of(norm);
    let post: Vec<Arg> = cd.iter().map(arg).chain(na.args()).collect();
    let g = Gemv { out_f, in_f, acc };
    g.launch(gpu, &name, pre, &post, x, y, tiling)
}

/// An RMS norm folded into a single-row GEMV: the norm's weight and epsilon.
#[derive(Clone, Copy)]
pub struct FusedNorm<'a> {
    pub weight: &'a CudaTensor,
    pub eps: f32,
}

/// The norm arguments of a kernel that takes an optional norm (a null
/// pointer without one), kept alive for a launch.
struct NormArgs {
    ptr: CUdeviceptr,
    eps: f32,
}

impl NormArgs {
    fn of(norm: Option<FusedNorm>) -> Self {
        NormArgs {
            ptr: norm.map_or(0, |n| n.weight.ptr()),
            eps: norm.map_or(0.0, |n| n.eps),
        }
    }

    fn args(&self) -> [Arg; 2] {
        [arg(&self.ptr), arg(&self.eps)]
    }
}

/// `silu(x·Gᵀ) ⊙ (x·Uᵀ)` in one fused GEMV when the batch is small and both
/// weights share a format that has a pair kernel; with `norm`, of
/// `rms_norm(x)` for a single row, or for a batch of 4-bit weights whose
/// normalized rows fit the launch's shared memory. `None` when no kernel
/// fits (the caller then runs the products, the activation and the norm
/// separately).
pub fn gate_up_silu(
    gpu: &Gpu,
    x: &CudaTensor,
    gate: &CudaWeight,
    up: &CudaWeight,
    norm: Option<FusedNorm>,
) -> Result<Option<CudaTensor>> {
    let (out_f, in_f) = gate.shape();
    if up.shape() != (out_f, in_f) || x.cols != in_f || x.rows == 0 || x.rows > GEMV_MAX_ROWS {
        return Ok(None);
    }
    let mma = match (MmaWeight::of(gate, x.rows), MmaWeight::of(up, x.rows)) {
        (Some(a), Some(b)) if a.pairs_with(b) => Some((a, b)),
        _ => None,
    };
    let batch_norm_fits = || {
        mma.is_some() || q4_batch_floats(q4_batch(x.rows), in_f, true) * 4 <= LAUNCH_MAX_SMEM_BYTES
    };
    if norm.is_some_and(|n| n.weight.len() != in_f || (x.rows > 1 && !batch_norm_fits())) {
        return Ok(None);
    }
    let y = CudaTensor::empty(gpu, x.rows, out_f)?;
    if let Some((a, b)) = mma {
        q4_mma_gemv(gpu, x, a, Some(b), &y, false, norm)?;
        return Ok(Some(y));
    }
    let g = Gemv {
        out_f,
        in_f,
        acc: false,
    };
    let na = NormArgs::of(norm);
    let nargs = na.args();
    match (gate, up) {
        (
            CudaWeight::Dense { dtype, buf, .. },
            CudaWeight::Dense {
                dtype: dtype2,
                buf: buf2,
                ..
            },
        ) if dtype == dtype2 && in_f % 8 == 0 && (norm.is_none() || x.rows == 1) => {
            let name = &dense_kernel(*dtype, x.rows, "_pair");
            let smem = if norm.is_some() {
                stage_smem(gpu, name, in_f)?
            } else {
                0
            };
            let (a, b) = (buf.ptr(), buf2.ptr());
            let tiling = NARROW_PAIR.with_smem(smem);
            g.launch(gpu, name, vec![arg(&a), arg(&b)], &nargs, x, &y, tiling)?;
        }
        (CudaWeight::Bnb4(a), CudaWeight::Bnb4(b)) if a.compute_dtype == b.compute_dtype => {
            let cd = dtype_mode(a.compute_dtype);
            if q4_bnb_ok(a) && q4_bnb_ok(b) {
                let stage = Q4Stage {
                    half: q4_half(cd),
                    norm: norm.is_some(),
                };
                let (name, tiling) =
                    q4_kernel(gpu, "gemv_q4bnb", x.rows, in_f, "_pair", Q4_PAIR, stage)?;
                let (qa, qb) = (Q4BnbArgs::of(a), Q4BnbArgs::of(b));
                let post = [arg(&cd), nargs[0], nargs[1]];
                g.launch(gpu, &name, vec![arg(&qa), arg(&qb)], &post, x, &y, tiling)?;
            } else if norm.is_none() {
                let (pa, pb) = (bnb4_params(a), bnb4_params(b));
                let mut pre = pa.args();
                pre.extend(pb.args());
                let name = gemv_kernel("gemv_bnb4", x.rows, "_pair");
                g.launch(gpu, &name, pre, &[arg(&cd)], x, &y, NARROW_PAIR)?;
            } else {
                return Ok(None);
            }
        }
        (CudaWeight::Packed(a), CudaWeight::Packed(b)) if a.bits == b.bits => {
            let (pa, pb) = (packed_params(a), packed_params(b));
            let mut pre = pa.args();
            pre.extend(pb.args());
            if q4_packed_ok(a) && q4_packed_ok(b) {
                let stage = Q4Stage {
                    half: false,
                    norm: norm.is_some(),
                };
                let (name, tiling) =
                    q4_kernel(gpu, "gemv_q4packed", x.rows, in_f, "_pair", Q4_PAIR, stage)?;
                g.launch(gpu, &name, pre, &nargs, x, &y, tiling)?;
            } else if norm.is_none() {
                let name = gemv_kernel(&format!("gemv_packed{}", a.bits), x.rows, "_pair");
                g.launch(gpu, &name, pre, &[], x, &y, NARROW_PAIR)?;
            } else {
                return Ok(None);
            }
        }
        _ => return Ok(None),
    }
    Ok(Some(y))
}

/// The `gemv_body` kernel `base` + `suffix` for a batch of `rows`: the
/// single-row instance (`_b1`, one accumulator per row) or the batched one.
fn gemv_kernel(base: &str, rows: usize, suffix: &str) -> String {
    let b1 = if rows == 1 { "_b1" } else { "" };
    format!("{base}{b1}{suffix}")
}

/// [`gemv_kernel`] for dense `dtype` weights.
fn dense_kernel(dtype: DType, rows: usize, suffix: &str) -> String {
    let base = match dtype {
        DType::F32 => "gemv_f32",
        DType::F16 => "gemv_f16",
        DType::BF16 => "gemv_bf16",
    };
    gemv_kernel(base, rows, suffix)
}

/// Dynamic shared memory of kernel `name` staging `floats` values of its
/// input row, reserved for the kernel.
fn stage_smem(gpu: &Gpu, name: &str, floats: usize) -> Result<u32> {
    let smem = (floats * 4) as u32;
    gpu.reserve_dynamic_smem(name, smem)?;
    Ok(smem)
}

/// One bitsandbytes matrix of a 4-bit GEMV launch (`Q4BnbArgs` in
/// gemv_q4.cu), its 16 code values included.
#[repr(C)]
#[derive(Clone, Copy)]
struct Q4BnbArgs {
    w: CUdeviceptr,
    absmax: CUdeviceptr,
    codes: CUdeviceptr,
    code2: CUdeviceptr,
    code16: [f32; 16],
    offset: f32,
    bs_log2: i32,
    nested_bs_log2: i32,
}

impl Q4BnbArgs {
    /// The arguments describing `q`.
    fn of(q: &CudaBnb4) -> Self {
        Q4BnbArgs {
            w: q.packed.ptr(),
            absmax: q.absmax.ptr(),
            codes: opt_ptr(&q.codes),
            code2: q.code2.ptr(),
            code16: q.code16_values,
            offset: q.offset,
            bs_log2: q.bs_log2 as i32,
            nested_bs_log2: q.nested_bs_log2 as i32,
        }
    }
}

/// One matrix of a `gemv_q4packed_norm3` or `gemv_q4packed_mma*` launch
/// (`Q4PackedArgs`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Q4PackedArgs {
    w: CUdeviceptr,
    scales: CUdeviceptr,
    zeros: CUdeviceptr,
    words_per_row: i32,
    group_size: i32,
}

impl Q4PackedArgs {
    /// The arguments describing `q`.
    fn of(q: &CudaPacked) -> Self {
        Q4PackedArgs {
            w: q.qweight.ptr(),
            scales: q.scales.ptr(),
            zeros: q.zeros.ptr(),
            words_per_row: q.words_per_row as i32,
            group_size: q.group_size as i32,
        }
    }
}

/// Outputs of a three-matrix launch (`GemvMulti` in gemv.cu): matrix i
/// takes the next `blocks[i]` blocks and writes `out[i]` values to `y[i]`.
#[repr(C)]
struct GemvMulti {
    y: [CUdeviceptr; 3],
    out: [i32; 3],
    blocks: [i32; 3],
}

/// The per-matrix arguments of a three-matrix kernel: the matrices' weight
/// structs (or pointers), padded to three by repeating the first.
enum Norm3Weights {
    Dense([CUdeviceptr; 3]),
    Bnb4(Box<[Q4BnbArgs; 3]>, i32),
    Packed([Q4PackedArgs; 3]),
}

/// Which `*_norm3` kernel takes `ws` (all of one format that has one), its
/// name, tiling, per-matrix arguments and floats of staged input; `None`
/// when there is none.
fn norm3_kernel(
    ws: &[&CudaWeight],
    in_f: usize,
) -> Option<(&'static str, GemvTiling, Norm3Weights, usize)> {
    fn pad<T: Copy>(v: Vec<T>) -> [T; 3] {
        [v[0], *v.get(1).unwrap_or(&v[0]), *v.get(2).unwrap_or(&v[0])]
    }
    match ws[0] {
        CudaWeight::Dense { dtype, .. } if in_f.is_multiple_of(8) => {
            let ptrs = ws
                .iter()
                .map(|w| match w {
                    CudaWeight::Dense { dtype: d, buf, .. } if d == dtype => Some(buf.ptr()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            let name = match dtype {
                DType::F32 => "gemv_f32_norm3",
                DType::F16 => "gemv_f16_norm3",
                DType::BF16 => "gemv_bf16_norm3",
            };
            Some((name, NARROW, Norm3Weights::Dense(pad(ptrs)), in_f))
        }
        CudaWeight::Bnb4(first) => {
            let args = ws
                .iter()
                .map(|w| match w {
                    CudaWeight::Bnb4(q)
                        if q4_bnb_ok(q) && q.compute_dtype == first.compute_dtype =>
                    {
                        Some(Q4BnbArgs::of(q))
                    }
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            let cd = dtype_mode(first.compute_dtype);
            let half = q4_half(cd);
            let name = if half {
                "gemv_q4bnb_norm3_h"
            } else {
                "gemv_q4bnb_norm3"
            };
            let weights = Norm3Weights::Bnb4(Box::new(pad(args)), cd);
            Some((name, WIDE, weights, q4_staged_floats(in_f, half)))
        }
        CudaWeight::Packed(_) => {
            let args = ws
                .iter()
                .map(|w| match w {
                    CudaWeight::Packed(q) if q4_packed_ok(q) => Some(Q4PackedArgs::of(q)),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            let weights = Norm3Weights::Packed(pad(args));
            Some((
                "gemv_q4packed_norm3",
                WIDE,
                weights,
                q4_staged_floats(in_f, false),
            ))
        }
        _ => None,
    }
}

/// `rms_norm(x)·Wᵀ` for up to three weights of one format with the norm
/// folded in: in one launch for a single decode row (a block's Q, K and V
/// projections), one tensor-core launch per weight for batches that take
/// them; `None` when the batch, the shapes or the formats have no such
/// kernel.
pub fn norm_matmuls(
    gpu: &Gpu,
    x: &CudaTensor,
    norm: FusedNorm,
    ws: &[&CudaWeight],
) -> Result<Option<Vec<CudaTensor>>> {
    let in_f = x.cols;
    if ws.is_empty() || ws.len() > 3 || norm.weight.len() != in_f {
        return Ok(None);
    }
    if ws.iter().any(|w| w.shape().1 != in_f) {
        return Ok(None);
    }
    // Batches whose weights all take the tensor-core kernel: one launch
    // per weight, each normalizing the rows itself.
    let mma: Option<Vec<MmaWeight>> = ws.iter().map(|w| MmaWeight::of(w, x.rows)).collect();
    if let Some(ms) = mma {
        let mut ys = Vec::with_capacity(ms.len());
        for m in ms {
            let y = CudaTensor::empty(gpu, x.rows, m.shape().0)?;
            q4_mma_gemv(gpu, x, m, None, &y, false, Some(norm))?;
            ys.push(y);
        }
        return Ok(Some(ys));
    }
    if x.rows != 1 {
        return Ok(None);
    }
    let Some((name, tiling, weights, floats)) = norm3_kernel(ws, in_f) else {
        return Ok(None);
    };
    let smem = stage_smem(gpu, name, floats)?;
    let tiling = match weights {
        Norm3Weights::Dense(_) => tiling.with_smem(smem),
        _ => tiling.looping(smem),
    };
    let outs: Vec<usize> = ws.iter().map(|w| w.shape().0).collect();
    let rpw = tiling.rows_per_warp;
    let total: usize = outs.iter().sum();
    let ksplit = tiling.ksplit(gpu, total, in_f);
    let rows_per_block = rpw * (GEMV_WARPS / ksplit);
    let ys = outs
        .iter()
        .map(|&o| CudaTensor::empty(gpu, 1, o))
        .collect::<Result<Vec<_>>>()?;
    let mut multi = GemvMulti {
        y: [0; 3],
        out: [0; 3],
        blocks: [0; 3],
    };
    for (i, (y, &o)) in ys.iter().zip(&outs).enumerate() {
        multi.y[i] = y.ptr();
        multi.out[i] = o as i32;
        multi.blocks[i] = o.div_ceil(rows_per_block) as i32;
    }
    let blocks: i32 = multi.blocks.iter().sum();
    let grid = tiling.grid(gpu, name, blocks as usize)?;
    let na = NormArgs::of(Some(norm));
    let (xp, inf, ks) = (x.ptr(), in_f as i32, ksplit as i32);
    let mut args: Vec<Arg> = match &weights {
        Norm3Weights::Dense(p) => p.iter().map(arg).collect(),
        Norm3Weights::Bnb4(a, _) => a.iter().map(arg).collect(),
        Norm3Weights::Packed(a) => a.iter().map(arg).collect(),
    };
    args.extend([arg(&multi), arg(&xp)]);
    args.extend(na.args());
    args.extend([arg(&inf), arg(&ks)]);
    if let Norm3Weights::Bnb4(_, cd) = &weights {
        args.push(arg(cd));
    }
    gpu.launch(
        name,
        (grid, 1, 1),
        (GEMV_WARPS * 32) as u32,
        tiling.smem,
        &mut args,
    )?;
    Ok(Some(ys))
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

/// A device pointer, or 0 for an absent optional buffer.
fn opt_ptr(b: &Option<super::memory::RawAlloc>) -> CUdeviceptr {
    b.as_ref().map_or(0, |b| b.ptr())
}

/// NF4/FP4 beyond the GEMV's batch: the weight is dequantized into a scratch
/// matrix (exact in its dtype) for cuBLAS.
fn matmul_bnb4(gpu: &Gpu, q: &CudaBnb4, x: &CudaTensor, y: &CudaTensor) -> Result<()> {
    let params = bnb4_params(q);
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

/// Packed integers beyond the GEMV's batch: dequantization to an f16 scratch
/// matrix and cuBLAS.
fn matmul_packed(gpu: &Gpu, q: &CudaPacked, x: &CudaTensor, y: &CudaTensor) -> Result<()> {
    let params = packed_params(q);
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

/// How a GEMV kernel splits its work: rows per warp and weights per lane
/// per round.
#[derive(Clone, Copy)]
struct GemvTiling {
    rows_per_warp: usize,
    chunk: usize,
    /// Dynamic shared memory of a block, in bytes.
    smem: u32,
    /// Whether the kernel's blocks loop over logical blocks, so that the
    /// grid is capped at one wave (see `gemv_q4_body`).
    looping: bool,
    /// Most warps that may share one row group (see `gemv_ksplit`).
    max_ksplit: usize,
}

impl GemvTiling {
    const fn new(rows_per_warp: usize, chunk: usize) -> Self {
        GemvTiling {
            rows_per_warp,
            chunk,
            smem: 0,
            looping: false,
            max_ksplit: GEMV_WARPS,
        }
    }

    /// The same tiling with at most `max_ksplit` warps per row group.
    const fn split_at_most(self, max_ksplit: usize) -> Self {
        GemvTiling { max_ksplit, ..self }
    }

    fn with_smem(self, smem: u32) -> Self {
        GemvTiling { smem, ..self }
    }

    /// A kernel of `smem` bytes whose blocks loop over logical blocks.
    fn looping(self, smem: u32) -> Self {
        GemvTiling {
            smem,
            looping: true,
            ..self
        }
    }

    /// Warps that share one row group of a product with `out_f` rows of
    /// `in_f` inputs.
    fn ksplit(&self, gpu: &Gpu, out_f: usize, in_f: usize) -> usize {
        let chunks = in_f / self.chunk;
        gemv_ksplit(gpu, out_f, chunks, self.rows_per_warp, GEMV_UNROLL).min(self.max_ksplit)
    }

    /// The grid for `blocks` logical blocks of kernel `name`.
    fn grid(&self, gpu: &Gpu, name: &str, blocks: usize) -> Result<u32> {
        let grid = if self.looping {
            gpu.one_wave(name, blocks, self.smem)?
        } else {
            blocks
        };
        Ok(grid as u32)
    }
}

/// `gemv_body` kernels: two rows per warp, 8 weights per lane.
const NARROW: GemvTiling = GemvTiling::new(2, 8);
/// `gemv_body` pair kernels: one row of each matrix per warp.
const NARROW_PAIR: GemvTiling = GemvTiling::new(1, 8);
/// 4-bit kernels (gemv_q4.cu): four rows per warp, 32 weights per lane.
const WIDE: GemvTiling = GemvTiling::new(4, 32);
/// 4-bit pair kernels for batches of up to four rows: two rows of each
/// matrix per warp, so that each x value loaded serves four weight rows
/// (`Q4_PAIR_ROWS` in gemv_q4.cu).
const WIDE_PAIR_BATCH4: GemvTiling = GemvTiling::new(2, 32);
/// 4-bit pair kernels for batches of up to eight rows: one row of each
/// matrix per warp, 32 weights per lane.
const WIDE_PAIR: GemvTiling = GemvTiling::new(1, 32);
/// 4-bit pair kernels for a single row: two rows of each matrix per warp
/// (`Q4_PAIR_ROWS` in gemv_q4.cu), each row group on one warp (measured
/// faster than two warps per group, bench/RESULTS.md, fourteenth session).
const WIDE_PAIR_SINGLE: GemvTiling = GemvTiling::new(2, 32).split_at_most(1);
/// 4-bit single-matrix kernels for a single row: at most four warps per row
/// group (for Llama-3.2-1B's down projection, 2048 rows of 8192, faster than
/// eight: bench/RESULTS.md, fourteenth session).
const WIDE_SINGLE: GemvTiling = WIDE.split_at_most(4);

/// Tensor-core 4-bit kernels (gemv_mma.cu): a warp holds a tile of 16
/// rows; a round is 128 inputs, so that `ksplit` keeps each warp at least
/// two rounds.
const MMA: GemvTiling = GemvTiling::new(16, 4);

/// One GEMV product's shape and whether it adds to its output.
struct Gemv {
    out_f: usize,
    in_f: usize,
    acc: bool,
}

impl Gemv {
    /// Launches GEMV kernel `name` whose leading arguments are `pre` (the
    /// weight's buffers and parameters), followed by x, y, n, out, in,
    /// ksplit, acc and then `post`.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        gpu: &Gpu,
        name: &str,
        pre: Vec<Arg>,
        post: &[Arg],
        x: &CudaTensor,
        y: &CudaTensor,
        tiling: GemvTiling,
    ) -> Result<()> {
        let rpw = tiling.rows_per_warp;
        let ksplit = tiling.ksplit(gpu, self.out_f, self.in_f);
        let groups_per_block = GEMV_WARPS / ksplit;
        let blocks = self.out_f.div_ceil(rpw * groups_per_block);
        let (xp, yp) = (x.ptr(), y.ptr());
        let (n, o, i, k) = (
            x.rows as i32,
            self.out_f as i32,
            self.in_f as i32,
            ksplit as i32,
        );
        let acc = self.acc as i32;
        let mut args = pre;
        args.extend([
            arg(&xp),
            arg(&yp),
            arg(&n),
            arg(&o),
            arg(&i),
            arg(&k),
            arg(&acc),
        ]);
        args.extend_from_slice(post);
        let grid = tiling.grid(gpu, name, blocks)?;
        gpu.launch(
            name,
            (grid, 1, 1),
            (GEMV_WARPS * 32) as u32,
            tiling.smem,
            &mut args,
        )
    }
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
