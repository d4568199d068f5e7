//! Launches the GEMV kernel families of `kernels/gemv.cu` for small batches
//! (decode): plain products, products added into the residual stream, the
//! fused RMS norm + gate/up + SiLU pair, and the fused RMS norm + q/k/v
//! triple. Weights are streamed once in their storage format.

use anyhow::Result;
use cudarc::driver::sys::CUdeviceptr;

use super::gpu::{Arg, Gpu, arg};
use super::memory::RawAlloc;
use super::tensor::CudaTensor;
use super::weights::{CudaBnb4, CudaPacked, CudaWeight};
use crate::tensor::DType;

/// Largest batch the GEMV kernels take.
pub const GEMV_MAX_ROWS: usize = 8;
/// Warps per GEMV block (matches `GEMV_WARPS` in gemv.cu).
pub const GEMV_WARPS: usize = 8;
/// Chunks of 8 weights each lane loads before using them (defined for
/// gemv.cu at compile time). On an H100 (Llama-3.2-1B shapes, batch 1) 1
/// decoded fastest: 1.77 ms per token against 1.89 (2) and 1.87 (4) with
/// f16 weights.
pub const GEMV_UNROLL: usize = 1;

/// The kernels' code for a compute dtype: 0 f32, 1 f16, 2 bf16.
pub fn dtype_mode(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// A device pointer, or 0 for an absent optional buffer.
pub fn opt_ptr(b: &Option<RawAlloc>) -> CUdeviceptr {
    b.as_ref().map_or(0, |b| b.ptr())
}

/// A weight's GEMV kernel family and its leading kernel arguments, kept
/// alive for the launch.
pub enum GemvWeight {
    /// Unquantized rows.
    Dense { family: &'static str, ptr: CUdeviceptr },
    /// NF4/FP4: packed, absmax, codes, code2, code16; offset; block size
    /// log2, nested block size log2, weight dtype; compute dtype mode.
    Bnb4 {
        ptrs: [CUdeviceptr; 5],
        offset: f32,
        ints: [i32; 3],
        cd: i32,
    },
    /// Packed integers: qweight, scales, zeros, g_idx; words per row, group size.
    Packed {
        bits: u32,
        ptrs: [CUdeviceptr; 4],
        ints: [i32; 2],
    },
}

impl GemvWeight {
    /// The GEMV view of `w`; `None` for formats without GEMV kernels here
    /// (LLM.int8() has its own) or rows the kernels cannot split in eights.
    pub fn of(w: &CudaWeight) -> Option<GemvWeight> {
        if w.shape().1 % 8 != 0 {
            return None;
        }
        Some(match w {
            CudaWeight::Dense { dtype, buf, .. } => GemvWeight::Dense {
                family: match dtype {
                    DType::F32 => "gemv_f32",
                    DType::F16 => "gemv_f16",
                    DType::BF16 => "gemv_bf16",
                },
                ptr: buf.ptr(),
            },
            CudaWeight::Bnb4(q) => GemvWeight::bnb4(q),
            CudaWeight::Packed(q) => GemvWeight::packed(q),
            CudaWeight::Int8(_) => return None,
        })
    }

    /// The arguments of a 4-bit weight.
    pub fn bnb4(q: &CudaBnb4) -> GemvWeight {
        GemvWeight::Bnb4 {
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
            cd: dtype_mode(q.compute_dtype),
        }
    }

    /// The arguments of a packed-integer weight.
    pub fn packed(q: &CudaPacked) -> GemvWeight {
        GemvWeight::Packed {
            bits: q.bits,
            ptrs: [
                q.qweight.ptr(),
                q.scales.ptr(),
                q.zeros.ptr(),
                opt_ptr(&q.g_idx),
            ],
            ints: [q.words_per_row as i32, q.group_size as i32],
        }
    }

    /// The kernel family name (`gemv_f16`, `gemv_bnb4`, `gemv_packed4`, ...).
    pub fn family(&self) -> String {
        match self {
            GemvWeight::Dense { family, .. } => family.to_string(),
            GemvWeight::Bnb4 { .. } => "gemv_bnb4".into(),
            GemvWeight::Packed { bits, .. } => format!("gemv_packed{bits}"),
        }
    }

    /// The compute dtype mode products are rounded to.
    pub fn cd(&self) -> i32 {
        match self {
            GemvWeight::Bnb4 { cd, .. } => *cd,
            _ => 0,
        }
    }

    /// The weight's leading kernel arguments (also those of the dequantize kernels).
    pub fn args(&self) -> Vec<Arg> {
        match self {
            GemvWeight::Dense { ptr, .. } => vec![arg(ptr)],
            GemvWeight::Bnb4 {
                ptrs, offset, ints, ..
            } => {
                let mut v: Vec<Arg> = ptrs.iter().map(arg).collect();
                v.push(arg(offset));
                v.extend(ints.iter().map(arg));
                v
            }
            GemvWeight::Packed { ptrs, ints, .. } => {
                let mut v: Vec<Arg> = ptrs.iter().map(arg).collect();
                v.extend(ints.iter().map(arg));
                v
            }
        }
    }

    /// Whether one fused kernel can read `self` and `other` together.
    fn fuses_with(&self, other: &GemvWeight) -> bool {
        self.family() == other.family() && self.cd() == other.cd()
    }
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

/// Grid blocks for `out_f` rows at `rows_per_warp` rows per warp group.
fn blocks(out_f: usize, rows_per_warp: usize, ksplit: usize) -> usize {
    out_f.div_ceil(rows_per_warp * (GEMV_WARPS / ksplit))
}

fn launch(gpu: &Gpu, name: &str, blocks: usize, args: &mut [Arg]) -> Result<()> {
    gpu.launch(name, (blocks as u32, 1, 1), (GEMV_WARPS * 32) as u32, 0, args)
}

/// `y = x·Wᵀ`, or `y += x·Wᵀ` when `add` (`x` has at most
/// [`GEMV_MAX_ROWS`] rows).
pub fn product(gpu: &Gpu, w: &GemvWeight, x: &CudaTensor, y: &CudaTensor, out_f: usize, add: bool) -> Result<()> {
    let in_f = x.cols;
    let ksplit = gemv_ksplit(gpu, out_f, in_f / 8, 2, GEMV_UNROLL);
    let (xp, yp) = (x.ptr(), y.ptr());
    let (n, o, i, k, cd) = (x.rows as i32, out_f as i32, in_f as i32, ksplit as i32, w.cd());
    let mut args = w.args();
    args.extend([arg(&xp), arg(&yp), arg(&n), arg(&o), arg(&i), arg(&k), arg(&cd)]);
    let name = if add {
        format!("{}_add", w.family())
    } else {
        w.family()
    };
    launch(gpu, &name, blocks(out_f, 2, ksplit), &mut args)
}

/// `silu(h·Gᵀ) ⊙ (h·Uᵀ)` with `h = rms_norm(x) * nw` in one kernel, when
/// both weights fuse; `None` otherwise.
pub fn norm_pair(
    gpu: &Gpu,
    x: &CudaTensor,
    nw: &CudaTensor,
    eps: f32,
    gate: &CudaWeight,
    up: &CudaWeight,
) -> Result<Option<CudaTensor>> {
    let (out_f, in_f) = gate.shape();
    let (Some(g), Some(u)) = (GemvWeight::of(gate), GemvWeight::of(up)) else {
        return Ok(None);
    };
    if !g.fuses_with(&u) || up.shape() != (out_f, in_f) || !fusable_input(x, nw, in_f) {
        return Ok(None);
    }
    let y = CudaTensor::empty(gpu, x.rows, out_f)?;
    let ksplit = gemv_ksplit(gpu, out_f, in_f / 8, 1, GEMV_UNROLL);
    let (xp, np, yp) = (x.ptr(), nw.ptr(), y.ptr());
    let (n, o, i, k, cd) = (x.rows as i32, out_f as i32, in_f as i32, ksplit as i32, g.cd());
    let mut args = g.args();
    args.extend(u.args());
    args.extend([
        arg(&xp),
        arg(&np),
        arg(&eps),
        arg(&yp),
        arg(&n),
        arg(&o),
        arg(&i),
        arg(&k),
        arg(&cd),
    ]);
    let name = format!("{}_pair", g.family());
    launch(gpu, &name, blocks(out_f, 1, ksplit), &mut args)?;
    Ok(Some(y))
}

/// The three products of `h = rms_norm(x) * nw` with `ws` in one kernel,
/// when the weights fuse; `None` otherwise.
pub fn norm_triple(
    gpu: &Gpu,
    x: &CudaTensor,
    nw: &CudaTensor,
    eps: f32,
    ws: [&CudaWeight; 3],
) -> Result<Option<[CudaTensor; 3]>> {
    let in_f = x.cols;
    let (Some(a), Some(b), Some(c)) = (
        GemvWeight::of(ws[0]),
        GemvWeight::of(ws[1]),
        GemvWeight::of(ws[2]),
    ) else {
        return Ok(None);
    };
    if !a.fuses_with(&b)
        || !a.fuses_with(&c)
        || ws.iter().any(|w| w.shape().1 != in_f)
        || !fusable_input(x, nw, in_f)
    {
        return Ok(None);
    }
    let outs = ws.map(|w| w.shape().0);
    let ys = [
        CudaTensor::empty(gpu, x.rows, outs[0])?,
        CudaTensor::empty(gpu, x.rows, outs[1])?,
        CudaTensor::empty(gpu, x.rows, outs[2])?,
    ];
    let ksplit = gemv_ksplit(gpu, outs.iter().sum(), in_f / 8, 2, GEMV_UNROLL);
    let bl = outs.map(|o| blocks(o, 2, ksplit));
    let (xp, np) = (x.ptr(), nw.ptr());
    let yp = [ys[0].ptr(), ys[1].ptr(), ys[2].ptr()];
    let oi = outs.map(|o| o as i32);
    let (n, i, k, cd) = (x.rows as i32, in_f as i32, ksplit as i32, a.cd());
    let (ba, bb) = (bl[0] as i32, bl[1] as i32);
    let mut args = a.args();
    args.extend(b.args());
    args.extend(c.args());
    args.extend([arg(&xp), arg(&np), arg(&eps)]);
    args.extend(yp.iter().map(arg));
    args.push(arg(&n));
    args.extend(oi.iter().map(arg));
    args.extend([arg(&i), arg(&k), arg(&ba), arg(&bb), arg(&cd)]);
    let name = format!("{}_qkv", a.family());
    launch(gpu, &name, bl.iter().sum(), &mut args)?;
    Ok(Some(ys))
}

/// Whether `x` (with norm weights `nw`) is a small batch of `in_f` columns.
fn fusable_input(x: &CudaTensor, nw: &CudaTensor, in_f: usize) -> bool {
    x.rows > 0 && x.rows <= GEMV_MAX_ROWS && x.cols == in_f && nw.len() == in_f
}
