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

use super::bnb_codes::{
    FP4_CODE, NF4_CODE, dynamic_map_signed, nf4_thresholds, quantize_dynamic, quantize_fp4,
    quantize_nf4,
};
use super::nibbles::{decode_nibbles, pack_nibbles};
use super::spec::Bnb4Config;
use super::{LinearWeight, QuantizedMatrix, convert_linears, is_skipped};
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
    /// NF4 or FP4.
    pub quant_type: Bnb4Type,
    /// Weights per absmax block (a power of two).
    pub blocksize: usize,
    /// Quantize the absmax values again (8-bit, nested blocks of 256).
    pub double_quant: bool,
    /// Dtype in which dequantized weights meet activations.
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
            let mut lut: [f32; 16] = std::array::from_fn(|i| self.code[i] * a);
            for d in [Some(self.dtype), then].into_iter().flatten() {
                if d != DType::F32 {
                    lut.iter_mut().for_each(|v| *v = d.round(*v));
                }
            }
            decode_nibbles(&self.packed, f, &mut out[f - start..seg_end - start], &lut);
            f = seg_end;
        }
    }
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
    convert_linears(weights, convert)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::bnb_codes::{FP4_RAW, NF4_PUBLISHED};
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use rand_distr::{Distribution, Normal};

    fn normal(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = Normal::new(0.0f32, 0.02).unwrap();
        (0..n).map(|_| d.sample(&mut rng)).collect()
    }

    fn opts(quant_type: Bnb4Type, double_quant: bool) -> Bnb4Options {
        Bnb4Options {
            quant_type,
            blocksize: 64,
            double_quant,
            compute_dtype: DType::F32,
        }
    }

    fn dequantize(m: &Bnb4Matrix) -> Vec<f32> {
        LinearWeight::Quantized(Arc::new(m.clone())).dequantize()
    }

    fn mse(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            / a.len() as f64
    }

    /// Largest gap between adjacent sorted code values.
    fn max_gap(code: &[f32; 16]) -> f32 {
        let mut c = code.to_vec();
        c.sort_by(f32::total_cmp);
        c.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max)
    }

    #[test]
    fn code_tables_equal_the_published_values() {
        assert_eq!(Bnb4Type::Nf4.code(), NF4_PUBLISHED.map(|v| v as f32));
        assert_eq!(Bnb4Type::Fp4.code(), FP4_RAW.map(|v| v / 12.0));
        let dm = dynamic_map_signed();
        assert_eq!(dm.len(), 256);
        assert_eq!(dm[255], 1.0);
        assert_eq!(dm[127], 0.0);
        assert!(dm.windows(2).all(|w| w[0] < w[1]), "dynamic map is sorted");
    }

    #[test]
    fn error_is_within_the_half_gap_bound() {
        let (o, i) = (64, 256);
        let w = normal(o * i, 1);
        for ty in [Bnb4Type::Nf4, Bnb4Type::Fp4] {
            let m = Bnb4Matrix::quantize(&w, o, i, DType::F32, opts(ty, false)).unwrap();
            m.validate().unwrap();
            let d = dequantize(&m);
            let half_gap = max_gap(&ty.code()) / 2.0;
            for (b, (wb, db)) in w.chunks(64).zip(d.chunks(64)).enumerate() {
                let a = m.absmax.value(b);
                assert_eq!(a, wb.iter().fold(0f32, |m, v| m.max(v.abs())));
                for (x, y) in wb.iter().zip(db) {
                    assert!(
                        (x - y).abs() <= half_gap * a * (1.0 + 1e-6),
                        "{ty:?}: {x} → {y}, absmax {a}"
                    );
                }
                // The block's largest magnitude is reproduced exactly (code ±1).
                let k = wb.iter().position(|v| v.abs() == a).unwrap();
                assert_eq!(db[k], wb[k]);
            }
        }
    }

    /// On normal weights in absmax blocks of 64, NF4 (normal quantiles) has the
    /// lowest error. FP4 has the highest, above symmetric uniform int4: its
    /// codes below ±1/6 are only 0 and ±1/192, while most of a normalized
    /// normal block lies within ±0.4. (The issue expected FP4 < uniform; that
    /// ordering does not hold for the mean squared error on normal data.)
    #[test]
    fn nf4_has_the_lowest_error_on_normal_weights_and_fp4_the_highest() {
        let (o, i) = (128, 512);
        let w = normal(o * i, 2);
        let err = |ty| {
            let m = Bnb4Matrix::quantize(&w, o, i, DType::F32, opts(ty, false)).unwrap();
            mse(&w, &dequantize(&m))
        };
        // Symmetric absmax int4 over the same blocks: q = round(7 w / absmax).
        let uniform: Vec<f32> = w
            .chunks(64)
            .flat_map(|b| {
                let a = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                b.iter().map(move |v| (v * 7.0 / a).round() * a / 7.0)
            })
            .collect();
        let (nf4, fp4, int4) = (err(Bnb4Type::Nf4), err(Bnb4Type::Fp4), mse(&w, &uniform));
        assert!(
            nf4 < int4 && int4 < fp4,
            "nf4 {nf4:e}, fp4 {fp4:e}, int4 {int4:e}"
        );
    }

    #[test]
    fn double_quant_reconstructs_absmax_closely() {
        let (o, i) = (256, 512); // 2048 blocks, 8 nested blocks
        let w = normal(o * i, 3);
        let plain = Bnb4Matrix::quantize(&w, o, i, DType::F32, opts(Bnb4Type::Nf4, false)).unwrap();
        let dq = Bnb4Matrix::quantize(&w, o, i, DType::F32, opts(Bnb4Type::Nf4, true)).unwrap();
        dq.validate().unwrap();
        assert_eq!(
            plain.packed, dq.packed,
            "codes do not depend on double quant"
        );
        let Absmax::Nested(n) = &dq.absmax else {
            panic!("not nested")
        };
        assert_eq!(n.absmax.len(), 8);
        let mean = (0..plain.absmax.len())
            .map(|b| plain.absmax.value(b) as f64)
            .sum::<f64>()
            / plain.absmax.len() as f64;
        // The mean is taken in f64 and stored in f32.
        assert!((n.offset as f64 - mean).abs() <= mean * f32::EPSILON as f64);
        let mut worst = 0f32;
        for b in 0..plain.absmax.len() {
            let (a, r) = (plain.absmax.value(b), dq.absmax.value(b));
            // The centred values lie in [-nested absmax, nested absmax]; the dynamic map's
            // spacing near ±1 is below 1/64, so the error is under 1/128 of the nested absmax.
            assert!(
                (a - r).abs() <= n.absmax[b / 256] / 128.0 + 1e-9,
                "block {b}: {a} vs {r}"
            );
            worst = worst.max((a - r).abs() / a);
        }
        assert!(worst < 0.02, "worst relative absmax error {worst}");
        let (e_plain, e_dq) = (mse(&w, &dequantize(&plain)), mse(&w, &dequantize(&dq)));
        assert!(e_dq < e_plain * 1.02, "dq {e_dq:e} vs plain {e_plain:e}");
    }

    #[test]
    fn first_element_goes_in_the_high_nibble() {
        assert_eq!(
            pack_nibbles(&[0x1, 0x2, 0xA, 0xF, 0x3]),
            vec![0x12, 0xAF, 0x30]
        );
        // Code index 15 is +1.0 and index 0 is -1.0 in NF4.
        let w = [1.0f32, -1.0, 0.0, 0.0];
        let m = Bnb4Matrix::quantize(
            &w,
            1,
            4,
            DType::F32,
            Bnb4Options {
                blocksize: 2,
                ..opts(Bnb4Type::Nf4, false)
            },
        )
        .unwrap();
        assert_eq!(m.packed, vec![0xF0, 0x77]);
        assert_eq!((m.index(0), m.index(1), m.index(2)), (15, 0, 7));
    }

    #[test]
    fn rows_of_odd_length_decode_from_odd_offsets() {
        // A 3 × 7 matrix: rows 1 and 2 start on odd flattened elements.
        let w = normal(21, 11);
        let m = Bnb4Matrix::quantize(
            &w,
            3,
            7,
            DType::F32,
            Bnb4Options {
                blocksize: 4,
                ..opts(Bnb4Type::Fp4, false)
            },
        )
        .unwrap();
        let mut row = [0f32; 7];
        for r in 0..3 {
            m.dequantize_row(r, &mut row);
            for (j, v) in row.iter().enumerate() {
                let f = r * 7 + j;
                assert_eq!(*v, m.code[m.index(f) as usize] * m.absmax.value(f / 4));
            }
        }
    }

    #[test]
    fn bits_per_parameter_from_storage() {
        let n = 2048;
        let w = normal(n * n, 4);
        let bits = |dq| {
            let m = Bnb4Matrix::quantize(&w, n, n, DType::F16, opts(Bnb4Type::Nf4, dq)).unwrap();
            8.0 * m.storage_bytes() as f64 / (n * n) as f64
        };
        let (with_dq, without) = (bits(true), bits(false));
        assert!((with_dq - 4.127).abs() < 0.01, "nf4+dq: {with_dq}");
        assert!((without - 4.5).abs() < 0.01, "nf4: {without}");
    }

    /// `x · Wᵀ` in f64 with `W` dequantized, activations rounded to `cd`.
    fn reference(m: &Bnb4Matrix, x: &[f32], n: usize, cd: DType) -> Vec<f64> {
        let w = dequantize(m);
        let (o, k) = (m.out_features, m.in_features);
        let mut y = vec![0f64; n * o];
        for t in 0..n {
            for r in 0..o {
                y[t * o + r] = (0..k)
                    .map(|j| cd.round(x[t * k + j]) as f64 * cd.round(w[r * k + j]) as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn fused_matmul_equals_dequantize_then_matmul() {
        // 100 columns: blocks of 64 straddle rows, and the last block is partial.
        let (o, k, n) = (37, 100, 5);
        let w = normal(o * k, 5);
        let x: Vec<f32> = normal(n * k, 6).iter().map(|v| v * 50.0).collect();
        for (ty, dq, dtype) in [
            (Bnb4Type::Nf4, true, DType::F32),
            (Bnb4Type::Fp4, false, DType::F32),
            (Bnb4Type::Nf4, false, DType::BF16),
        ] {
            let wd: Vec<f32> = w.iter().map(|&v| dtype.round(v)).collect();
            let m = Bnb4Matrix::quantize(&wd, o, k, dtype, opts(ty, dq)).unwrap();
            let mut y = vec![0f32; n * o];
            m.matmul_cpu(&x, n, &mut y);
            let r = reference(&m, &x, n, DType::F32);
            let scale = r.iter().fold(0f64, |a, v| a.max(v.abs()));
            for (a, b) in y.iter().zip(&r) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-5 * scale,
                    "{ty:?} dq={dq} {dtype}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn half_precision_compute_dtype_rounds_weights_activations_and_output() {
        let (o, k, n) = (16, 128, 3);
        let w = normal(o * k, 7);
        let x = normal(n * k, 8);
        for cd in [DType::F16, DType::BF16] {
            let m = Bnb4Matrix::quantize(
                &w,
                o,
                k,
                DType::F32,
                Bnb4Options {
                    compute_dtype: cd,
                    ..opts(Bnb4Type::Nf4, true)
                },
            )
            .unwrap();
            let mut y = vec![0f32; n * o];
            m.matmul_cpu(&x, n, &mut y);
            let r = reference(&m, &x, n, cd);
            let eps = if cd == DType::F16 {
                2f64.powi(-11)
            } else {
                2f64.powi(-8)
            };
            let scale = r.iter().fold(0f64, |a, v| a.max(v.abs()));
            for (a, b) in y.iter().zip(&r) {
                assert_eq!(*a, cd.round(*a), "output is in {cd}");
                assert!(
                    (*a as f64 - b).abs() <= eps * b.abs() + 1e-5 * scale,
                    "{cd}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn rejects_bad_block_sizes_and_values() {
        let w = normal(64, 9);
        let bad = |bs| {
            Bnb4Matrix::quantize(
                &w,
                1,
                64,
                DType::F32,
                Bnb4Options {
                    blocksize: bs,
                    ..opts(Bnb4Type::Nf4, false)
                },
            )
            .unwrap_err()
            .to_string()
        };
        assert!(bad(48).contains("power of two"), "{}", bad(48));
        assert!(bad(0).contains("power of two"));
        let mut w2 = w.clone();
        w2[3] = f32::NAN;
        let e = Bnb4Matrix::quantize(&w2, 1, 64, DType::F32, opts(Bnb4Type::Nf4, false))
            .unwrap_err()
            .to_string();
        assert!(e.contains("flat index 3"), "{e}");
    }

    #[test]
    fn model_quantization_skips_lm_head_and_checks_divisibility() {
        use crate::model::synth::{synth_config, synth_weights};
        let (cfg, dtype) = synth_config("tiny-untied").unwrap();
        let mut w = synth_weights(&cfg, dtype, 1).unwrap();
        let spec = Bnb4Config {
            block_size: 64,
            double_quant: true,
            compute_dtype: DType::F32,
            skip_modules: vec!["lm_head".into(), "down_proj".into()],
        };
        quantize_model_bnb4(&mut w, Bnb4Type::Nf4, &spec).unwrap();
        assert!(matches!(w.lm_head, Some(LinearWeight::Dense(_))));
        assert!(matches!(w.layers[0].down_proj, LinearWeight::Dense(_)));
        assert_eq!(w.layers[0].q_proj.format_name(), "nf4-dq-b64");
        let mut w = synth_weights(&cfg, dtype, 1).unwrap();
        let huge = Bnb4Config {
            block_size: 1 << 30,
            ..spec
        };
        let e = quantize_model_bnb4(&mut w, Bnb4Type::Fp4, &huge).unwrap_err();
        assert!(e.to_string().contains("does not divide"), "{e}");
    }
}
