//! bitsandbytes 4-bit weights (NF4 and FP4, optional double quantization),
//! holding exactly the state bitsandbytes keeps for a `Linear4bit` layer.
//!
//! Blocks run over the flattened row-major weight, so when `in_features` is
//! not a multiple of the block size a block spans the end of one row and the
//! start of the next, and the last block may be partial; every path here
//! (quantization, row dequantization, the fused product) handles both.

use std::any::Any;
use std::borrow::Cow;
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use rayon::prelude::*;

use super::bnb_codes::{
    FP4_CODE, NF4_CODE, dynamic_map_signed, nf4_thresholds, quantize_dynamic, quantize_fp4,
    quantize_nf4,
};
use super::spec::Bnb4Config;
use super::{LinearWeight, QuantizedMatrix, is_skipped};
use crate::backend::cpu::matmul::matmul_by_row_blocks;
use crate::model::LlamaWeights;
use crate::tensor::DType;

/// First-level blocks per nested block in double quantization (bitsandbytes' fixed 256).
pub const NESTED_BLOCKSIZE: usize = 256;

/// Which 16-entry code the 4-bit indices select from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bnb4Type {
    /// NormalFloat4: quantiles of a normal distribution.
    Nf4,
    /// A 4-bit float (sign, 2 exponent bits, 1 mantissa bit).
    Fp4,
}

impl Bnb4Type {
    /// `nf4` or `fp4`, as bitsandbytes names it.
    pub fn name(self) -> &'static str {
        match self {
            Bnb4Type::Nf4 => "nf4",
            Bnb4Type::Fp4 => "fp4",
        }
    }

    /// Parses `nf4` / `fp4`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(Bnb4Type::Nf4),
            "fp4" => Ok(Bnb4Type::Fp4),
            other => bail!("unknown 4-bit quant_type '{other}': expected nf4 or fp4"),
        }
    }

    /// The 16-entry code table (bitsandbytes' `quant_map`).
    pub fn code(self) -> [f32; 16] {
        match self {
            Bnb4Type::Nf4 => NF4_CODE,
            Bnb4Type::Fp4 => FP4_CODE,
        }
    }

    /// The index whose code is 0, used for all-zero blocks.
    fn zero_index(self) -> u8 {
        match self {
            Bnb4Type::Nf4 => 7,
            Bnb4Type::Fp4 => 0,
        }
    }
}

/// Maps normalized values (in [-1, 1]) to 4-bit indices as bitsandbytes' kernels do.
struct Quantizer {
    ty: Bnb4Type,
    nf4: [f32; 15],
}

impl Quantizer {
    fn new(ty: Bnb4Type) -> Self {
        Quantizer {
            ty,
            nf4: nf4_thresholds(),
        }
    }

    fn index(&self, x: f32) -> u8 {
        match self.ty {
            Bnb4Type::Nf4 => quantize_nf4(x, &self.nf4),
            Bnb4Type::Fp4 => quantize_fp4(x),
        }
    }
}

/// Double-quantized absmax: the per-block absmax values minus their mean,
/// quantized blockwise to 8 bits with the signed dynamic map.
/// A block's absmax is `code[codes[b]] * absmax[b / blocksize] + offset`, in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct NestedAbsmax {
    /// One dynamic-map index per first-level block (serialized as `weight.absmax`, uint8).
    pub codes: Vec<u8>,
    /// One f32 absmax per `blocksize` first-level blocks (`weight.nested_absmax`).
    pub absmax: Vec<f32>,
    /// The 256-entry signed dynamic map (`weight.nested_quant_map`).
    pub code: Vec<f32>,
    /// Mean of the first-level absmax values, subtracted before quantizing (`nested_offset`).
    pub offset: f32,
    /// First-level blocks per nested block (`nested_blocksize`, 256).
    pub blocksize: usize,
}

impl NestedAbsmax {
    /// Quantizes first-level absmax values as bitsandbytes' `quantize_4bit`
    /// with `compress_statistics=True` does (the mean is taken in f64).
    pub fn quantize(absmax: &[f32]) -> Self {
        let n = absmax.len().max(1);
        let offset = (absmax.iter().map(|&v| v as f64).sum::<f64>() / n as f64) as f32;
        let code = dynamic_map_signed();
        let mut codes = Vec::with_capacity(absmax.len());
        let mut nested = Vec::with_capacity(absmax.len().div_ceil(NESTED_BLOCKSIZE));
        for chunk in absmax.chunks(NESTED_BLOCKSIZE) {
            let centered: Vec<f32> = chunk.iter().map(|&v| v - offset).collect();
            let a = centered.iter().fold(0f32, |m, v| m.max(v.abs()));
            nested.push(a);
            let inv = 1.0f32 / a;
            codes.extend(centered.iter().map(|&v| {
                if a == 0.0 {
                    127 // code[127] = 0: the block decodes to `offset` exactly
                } else {
                    quantize_dynamic(&code, v * inv)
                }
            }));
        }
        NestedAbsmax {
            codes,
            absmax: nested,
            code: code.to_vec(),
            offset,
            blocksize: NESTED_BLOCKSIZE,
        }
    }

    /// The reconstructed absmax of first-level block `b`.
    #[inline]
    pub fn value(&self, b: usize) -> f32 {
        self.code[self.codes[b] as usize] * self.absmax[b / self.blocksize] + self.offset
    }

    /// Bytes of the codes, nested absmax, dynamic map and offset.
    pub fn storage_bytes(&self) -> usize {
        self.codes.len() + 4 * self.absmax.len() + 4 * self.code.len() + 4
    }
}

/// Per-block scales of a 4-bit weight.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// One f32 absmax per block (`weight.absmax`, float32).
    Plain(Vec<f32>),
    /// Double quantization.
    Nested(NestedAbsmax),
}

impl Absmax {
    /// Number of first-level blocks.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Nested(n) => n.codes.len(),
        }
    }

    /// Whether there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Absmax of block `b` (reconstructed when nested).
    #[inline]
    pub fn value(&self, b: usize) -> f32 {
        match self {
            Absmax::Plain(v) => v[b],
            Absmax::Nested(n) => n.value(b),
        }
    }

    /// Bytes stored.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => 4 * v.len(),
            Absmax::Nested(n) => n.storage_bytes(),
        }
    }
}

/// A bitsandbytes 4-bit `[out_features, in_features]` weight (bitsandbytes'
/// `Params4bit` + `QuantState`). Element `f` of the flattened weight has its
/// 4-bit index in `packed[f / 2]` (high nibble for even `f`) and belongs to
/// block `f / blocksize`; its value is `code[index] * absmax(block)`
/// computed in f32 and rounded to `dtype`.
#[derive(Clone, Debug, PartialEq)]
pub struct Bnb4Matrix {
    /// NF4 or FP4.
    pub quant_type: Bnb4Type,
    /// Rows (output features).
    pub out_features: usize,
    /// Columns (input features).
    pub in_features: usize,
    /// `ceil(out*in / 2)` bytes, two indices per byte, first element in the high nibble
    /// (serialized as `weight`, uint8 `[n/2, 1]`).
    pub packed: Vec<u8>,
    /// Weights per absmax block, over the flattened weight.
    pub blocksize: usize,
    /// Per-block scales, plain or double-quantized.
    pub absmax: Absmax,
    /// The 16-entry code (`weight.quant_map`).
    pub code: [f32; 16],
    /// Dtype of the weight before quantization (bitsandbytes' `dtype`); dequantized values are rounded to it.
    pub dtype: DType,
    /// Dtype in which dequantized weights meet activations (`bnb_4bit_compute_dtype`).
    pub compute_dtype: DType,
}

/// Options of one 4-bit quantization.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bnb4Options {
    pub quant_type: Bnb4Type,
    pub blocksize: usize,
    pub double_quant: bool,
    pub compute_dtype: DType,
}

impl Bnb4Matrix {
    /// Quantizes a row-major `[out, in]` weight whose values are representable in `dtype`.
    pub fn quantize(
        w: &[f32],
        out_features: usize,
        in_features: usize,
        dtype: DType,
        opts: Bnb4Options,
    ) -> Result<Self> {
        let n = out_features * in_features;
        ensure!(
            w.len() == n,
            "weight has {} values, shape [{out_features}, {in_features}] needs {n}",
            w.len()
        );
        check_blocksize(opts.blocksize)?;
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            bail!(
                "weight value {} at flat index {i} is not finite; 4-bit blocks need finite weights",
                w[i]
            );
        }
        let q = Quantizer::new(opts.quant_type);
        let bs = opts.blocksize;
        let mut absmax = Vec::with_capacity(n.div_ceil(bs));
        let mut indices = Vec::with_capacity(n);
        for block in w.chunks(bs) {
            let a = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            absmax.push(a);
            if a == 0.0 {
                indices.extend(std::iter::repeat_n(
                    opts.quant_type.zero_index(),
                    block.len(),
                ));
            } else {
                let inv = 1.0f32 / a;
                indices.extend(block.iter().map(|&v| q.index(v * inv)));
            }
        }
        let absmax = if opts.double_quant {
            Absmax::Nested(NestedAbsmax::quantize(&absmax))
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Bnb4Matrix {
            quant_type: opts.quant_type,
            out_features,
            in_features,
            packed: pack_nibbles(&indices),
            blocksize: bs,
            absmax,
            code: opts.quant_type.code(),
            dtype,
            compute_dtype: opts.compute_dtype,
        })
    }

    /// Checks that the parts fit together (used after loading a checkpoint).
    pub fn validate(&self) -> Result<()> {
        let n = self.out_features * self.in_features;
        check_blocksize(self.blocksize)?;
        ensure!(
            self.packed.len() == n.div_ceil(2),
            "packed weight has {} bytes, shape [{}, {}] needs {}",
            self.packed.len(),
            self.out_features,
            self.in_features,
            n.div_ceil(2)
        );
        ensure!(
            self.absmax.len() == n.div_ceil(self.blocksize),
            "absmax has {} entries, {n} weights in blocks of {} need {}",
            self.absmax.len(),
            self.blocksize,
            n.div_ceil(self.blocksize)
        );
        if self.code != self.quant_type.code() {
            bail!(
                "quant_map differs from the {} code table: {:?}",
                self.quant_type.name(),
                self.code
            );
        }
        if let Absmax::Nested(nq) = &self.absmax {
            ensure!(nq.blocksize > 0, "nested_blocksize must be positive");
            ensure!(
                nq.code.len() == 256,
                "nested_quant_map has {} entries, expected 256",
                nq.code.len()
            );
            ensure!(
                nq.absmax.len() == nq.codes.len().div_ceil(nq.blocksize),
                "nested_absmax has {} entries, {} blocks in nested blocks of {} need {}",
                nq.absmax.len(),
                nq.codes.len(),
                nq.blocksize,
                nq.codes.len().div_ceil(nq.blocksize)
            );
            ensure!(
                nq.offset.is_finite(),
                "nested_offset {} is not finite",
                nq.offset
            );
        }
        Ok(())
    }

    /// Whether the absmax values are double-quantized.
    pub fn double_quant(&self) -> bool {
        matches!(self.absmax, Absmax::Nested(_))
    }

    /// The 4-bit index of flattened element `f`.
    #[inline]
    pub fn index(&self, f: usize) -> u8 {
        let byte = self.packed[f / 2];
        if f.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0F
        }
    }

    /// Writes row `row`: `code[index] * absmax` rounded to `dtype`, then to
    /// `then` when given (the compute dtype).
    fn fill_row(&self, row: usize, out: &mut [f32], then: Option<DType>) {
        let in_f = self.in_features;
        let start = row * in_f;
        let end = start + in_f;
        let mut f = start;
        while f < end {
            let b = f / self.blocksize;
            let seg_end = ((b + 1) * self.blocksize).min(end);
            let a = self.absmax.value(b);
            let lut: [f32; 16] = std::array::from_fn(|i| {
                let v = self.dtype.round(self.code[i] * a);
                then.map_or(v, |d| d.round(v))
            });
            for (g, o) in (f..seg_end).zip(&mut out[f - start..seg_end - start]) {
                *o = lut[self.index(g) as usize];
            }
            f = seg_end;
        }
    }
}

/// Packs 4-bit indices two per byte, the first in the high nibble.
pub fn pack_nibbles(indices: &[u8]) -> Vec<u8> {
    indices
        .chunks(2)
        .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0))
        .collect()
}

fn check_blocksize(bs: usize) -> Result<()> {
    if bs < 2 || !bs.is_power_of_two() {
        bail!(
            "block size {bs} must be a power of two of at least 2 (bitsandbytes uses 64 by default)"
        );
    }
    Ok(())
}

impl QuantizedMatrix for Bnb4Matrix {
    fn shape(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        self.fill_row(row, out, None);
    }

    fn storage_bytes(&self) -> usize {
        self.packed.len() + self.absmax.storage_bytes() + 4 * self.code.len()
    }

    fn format_name(&self) -> String {
        let dq = if self.double_quant() { "-dq" } else { "" };
        format!("{}{dq}-b{}", self.quant_type.name(), self.blocksize)
    }

    /// Fused dequantize-matmul in the compute dtype: activations and
    /// dequantized weights are rounded to it, products accumulate in f32, and
    /// the result is rounded to it (as a torch `linear` in that dtype).
    fn matmul_cpu(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let cd = self.compute_dtype;
        let xs: Cow<[f32]> = match cd {
            DType::F32 => Cow::Borrowed(x),
            d => Cow::Owned(x.iter().map(|&v| d.round(v)).collect()),
        };
        let then = (cd != DType::F32 && cd != self.dtype).then_some(cd);
        let in_f = self.in_features;
        matmul_by_row_blocks(&xs, n, in_f, self.out_features, y, |r0, rows, buf| {
            buf.resize(rows * in_f, 0.0);
            for (i, row) in buf.chunks_mut(in_f).enumerate() {
                self.fill_row(r0 + i, row, then);
            }
            None
        });
        if cd != DType::F32 {
            y.iter_mut().for_each(|v| *v = cd.round(*v));
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Quantizes every dense linear layer of the decoder blocks (and the lm_head
/// when it is untied and not skipped) that `cfg.skip_modules` does not name.
pub fn quantize_model_bnb4(
    weights: &mut LlamaWeights,
    quant_type: Bnb4Type,
    cfg: &Bnb4Config,
) -> Result<()> {
    let opts = Bnb4Options {
        quant_type,
        blocksize: cfg.block_size,
        double_quant: cfg.double_quant,
        compute_dtype: cfg.compute_dtype,
    };
    let convert = |name: &str, w: &mut LinearWeight| -> Result<()> {
        if is_skipped(name, &cfg.skip_modules) {
            return Ok(());
        }
        let LinearWeight::Dense(t) = w else {
            return Ok(());
        };
        let (o, i) = t.dims2()?;
        if (o * i) % opts.blocksize != 0 {
            bail!(
                "{} block size {} does not divide the {} weights of {name} ([{o}, {i}]); \
                 choose a power of two that divides every quantized layer's weight count",
                quant_type.name(),
                opts.blocksize,
                o * i
            );
        }
        let q = Bnb4Matrix::quantize(&t.data, o, i, t.dtype, opts)
            .with_context(|| format!("quantizing {name}"))?;
        *w = LinearWeight::Quantized(Arc::new(q));
        Ok(())
    };
    weights
        .layers
        .par_iter_mut()
        .enumerate()
        .try_for_each(|(l, layer)| {
            layer
                .linears_mut()
                .into_iter()
                .try_for_each(|(name, w)| convert(&format!("model.layers.{l}.{name}"), w))
        })?;
    if let Some(head) = &mut weights.lm_head {
        convert("lm_head", head)?;
    }
    Ok(())
}
