//! LLM.int8(): int8 weights with one f32 absmax per output row (bitsandbytes'
//! `Int8Params` CB/SCB), and the product with the outlier decomposition of
//! bitsandbytes' `MatMul8bitLt`: activations are quantized per token to int8
//! except the feature columns holding any |x| ≥ threshold, which multiply in
//! the compute dtype against the dequantized weight columns and are added back.

use std::any::Any;
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use rayon::prelude::*;

use super::spec::Int8Config;
use super::{LinearWeight, QuantizedMatrix, convert_linears, is_skipped};
use crate::model::LlamaWeights;
use crate::tensor::DType;

/// 1/127 as bitsandbytes writes it (`int8_vectorwise_dequant`).
const INV_127: f32 = 7.874015718698502e-3_f64 as f32;
/// 1/127² as bitsandbytes writes it (`int8_mm_dequant`).
const INV_127_SQ: f32 = 6.200012e-05_f64 as f32;
/// Output rows one rayon task handles in the int8 product.
const ROWS_PER_TASK: usize = 16;

/// An LLM.int8() `[out_features, in_features]` weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Matrix {
    /// Rows (output features).
    pub out_features: usize,
    /// Columns (input features).
    pub in_features: usize,
    /// Row-major int8 weight, `round(127 * w / SCB[row])` (serialized as `weight`, int8 `[out, in]`).
    pub cb: Vec<i8>,
    /// Per-row absmax of the original weight (`SCB`, float32 `[out]`).
    pub scb: Vec<f32>,
    /// Activation magnitude from which a feature column is an outlier; 0 disables the decomposition.
    pub threshold: f32,
    /// Dtype activations are rounded to and outlier columns multiply in (the model's dtype in transformers).
    pub compute_dtype: DType,
}

impl Int8Matrix {
    /// Quantizes a row-major `[out, in]` weight row-wise to int8.
    pub fn quantize(
        w: &[f32],
        out_features: usize,
        in_features: usize,
        threshold: f32,
        compute_dtype: DType,
    ) -> Result<Self> {
        ensure!(
            w.len() == out_features * in_features,
            "weight has {} values, shape [{out_features}, {in_features}] needs {}",
            w.len(),
            out_features * in_features
        );
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            bail!("weight value {} at flat index {i} is not finite", w[i]);
        }
        let mut cb = Vec::with_capacity(w.len());
        let mut scb = Vec::with_capacity(out_features);
        for row in w.chunks(in_features.max(1)).take(out_features) {
            let a = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            scb.push(a);
            cb.extend(quantize_row(row, a));
        }
        let m = Int8Matrix {
            out_features,
            in_features,
            cb,
            scb,
            threshold,
            compute_dtype,
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks that the parts fit together (used after loading a checkpoint).
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.cb.len() == self.out_features * self.in_features,
            "int8 weight has {} values, shape [{}, {}] needs {}",
            self.cb.len(),
            self.out_features,
            self.in_features,
            self.out_features * self.in_features
        );
        ensure!(
            self.scb.len() == self.out_features,
            "SCB has {} entries, expected one per output row ({})",
            self.scb.len(),
            self.out_features
        );
        ensure!(
            self.in_features <= (i32::MAX as usize) / (127 * 127),
            "in_features {} would overflow the int32 accumulator",
            self.in_features
        );
        ensure!(
            self.threshold >= 0.0,
            "threshold {} must be ≥ 0",
            self.threshold
        );
        if let Some(v) = self.scb.iter().find(|v| !v.is_finite() || **v < 0.0) {
            bail!("SCB value {v} is not a finite non-negative absmax");
        }
        Ok(())
    }

    /// Weight element `(o, j)` dequantized: `CB * SCB / 127` in f32.
    #[inline]
    fn weight(&self, o: usize, j: usize) -> f32 {
        self.cb[o * self.in_features + j] as f32 * self.scb[o] * INV_127
    }

    /// Columns holding an activation with |x| ≥ threshold (none when the threshold is 0).
    pub fn outlier_columns(&self, x: &[f32], n: usize) -> Vec<usize> {
        if self.threshold <= 0.0 {
            return Vec::new();
        }
        let k = self.in_features;
        (0..k)
            .filter(|&j| (0..n).any(|t| x[t * k + j].abs() >= self.threshold))
            .collect()
    }
}

/// `round_half_even(v * (127 / absmax))` for every value (0 when absmax is 0).
fn quantize_row(row: &[f32], absmax: f32) -> impl Iterator<Item = i8> + '_ {
    let scale = 127.0f32 / absmax;
    row.iter().map(move |&v| {
        if absmax == 0.0 {
            0
        } else {
            (v * scale).round_ties_even().clamp(-127.0, 127.0) as i8
        }
    })
}

/// Per-token int8 activations: the absmax of each row skips the outlier
/// elements (|x| ≥ threshold), and the outlier columns are zeroed.
fn quantize_activations(
    x: &[f32],
    n: usize,
    k: usize,
    threshold: f32,
    outlier: &[bool],
) -> (Vec<i8>, Vec<f32>) {
    let mut ca = Vec::with_capacity(n * k);
    let mut sca = Vec::with_capacity(n);
    for row in x.chunks(k.max(1)).take(n) {
        let a = row
            .iter()
            .filter(|v| threshold <= 0.0 || v.abs() < threshold)
            .fold(0f32, |m, v| m.max(v.abs()));
        sca.push(a);
        ca.extend(
            quantize_row(row, a)
                .zip(outlier)
                .map(|(q, &out)| if out { 0 } else { q }),
        );
    }
    (ca, sca)
}

/// Σ a_j b_j in i32.
#[inline]
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&p, &q)| p as i32 * q as i32).sum()
}

impl QuantizedMatrix for Int8Matrix {
    fn shape(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        for (j, o) in out.iter_mut().enumerate().take(self.in_features) {
            *o = self.weight(row, j);
        }
    }

    fn storage_bytes(&self) -> usize {
        self.cb.len() + 4 * self.scb.len()
    }

    fn format_name(&self) -> String {
        format!("int8-t{}", self.threshold)
    }

    /// `int8(x) · CBᵀ` in i32, scaled by `SCA · SCB / 127²` and rounded to
    /// the compute dtype, plus the outlier columns `x[:, C] · W[:, C]ᵀ`
    /// (dequantized weight, compute dtype, f32 accumulation).
    fn matmul_cpu(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let (out_f, k) = (self.out_features, self.in_features);
        assert_eq!(x.len(), n * k);
        assert_eq!(y.len(), n * out_f);
        if n == 0 || out_f == 0 {
            return;
        }
        let cd = self.compute_dtype;
        let x: Vec<f32> = x.iter().map(|&v| cd.round(v)).collect();
        let cols = self.outlier_columns(&x, n);
        let mut is_outlier = vec![false; k];
        cols.iter().for_each(|&j| is_outlier[j] = true);
        let (ca, sca) = quantize_activations(&x, n, k, self.threshold, &is_outlier);
        let parts: Vec<(usize, Vec<f32>)> = (0..out_f.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .map(|b| {
                let r0 = b * ROWS_PER_TASK;
                let rows = ROWS_PER_TASK.min(out_f - r0);
                let sub_w: Vec<f32> = (r0..r0 + rows)
                    .flat_map(|o| cols.iter().map(move |&j| cd.round(self.weight(o, j))))
                    .collect();
                let mut part = vec![0f32; n * rows];
                for t in 0..n {
                    let xa = &ca[t * k..(t + 1) * k];
                    let sub_x: Vec<f32> = cols.iter().map(|&j| x[t * k + j]).collect();
                    for r in 0..rows {
                        let o = r0 + r;
                        let acc = dot_i8(xa, &self.cb[o * k..(o + 1) * k]);
                        let mut v = cd.round(acc as f32 * (sca[t] * self.scb[o]) * INV_127_SQ);
                        if !cols.is_empty() {
                            let ws = &sub_w[r * cols.len()..(r + 1) * cols.len()];
                            let extra: f32 = sub_x.iter().zip(ws).map(|(a, b)| a * b).sum();
                            v = cd.round(v + extra);
                        }
                        part[t * rows + r] = v;
                    }
                }
                (r0, part)
            })
            .collect();
        for (r0, part) in parts {
            let rows = part.len() / n;
            for t in 0..n {
                y[t * out_f + r0..t * out_f + r0 + rows]
                    .copy_from_slice(&part[t * rows..(t + 1) * rows]);
            }
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Converts every dense linear layer of the decoder blocks (and an untied,
/// unskipped lm_head) to LLM.int8(); the compute dtype is each weight's own dtype.
pub fn quantize_model_int8(weights: &mut LlamaWeights, cfg: &Int8Config) -> Result<()> {
    let convert = |name: &str, w: &mut LinearWeight| -> Result<()> {
        if is_skipped(name, &cfg.skip_modules) {
            return Ok(());
        }
        let LinearWeight::Dense(t) = w else {
            return Ok(());
        };
        let (o, i) = t.dims2()?;
        let q = Int8Matrix::quantize(&t.data, o, i, cfg.threshold, t.dtype)
            .with_context(|| format!("quantizing {name}"))?;
        *w = LinearWeight::Quantized(Arc::new(q));
        Ok(())
    };
    convert_linears(weights, convert)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use rand_distr::{Distribution, Normal};

    fn normal(n: usize, std: f32, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = Normal::new(0.0f32, std).unwrap();
        (0..n).map(|_| d.sample(&mut rng)).collect()
    }

    /// LLM.int8() written out element by element in f64: outlier columns
    /// (any |x| ≥ t, when t > 0) multiply the dequantized weight directly; the
    /// rest is `round(127 x / a_t) · CB / 127² · a_t · SCB`, with `a_t` the
    /// token's absmax over its non-outlier elements.
    fn reference(w: &[f32], x: &[f32], n: usize, o: usize, k: usize, t: f32) -> Vec<f64> {
        // Codes are computed in f32 as the kernels do (`v * (127 / absmax)`, ties to even).
        let code = |v: f32, a: f32| (v * (127.0f32 / a)).round_ties_even() as f64;
        let scb: Vec<f32> = w
            .chunks(k)
            .map(|r| r.iter().fold(0f32, |m, v| m.max(v.abs())))
            .collect();
        let cb: Vec<f64> = w
            .iter()
            .enumerate()
            .map(|(f, &v)| code(v, scb[f / k]))
            .collect();
        let outlier: Vec<bool> = (0..k)
            .map(|j| t > 0.0 && (0..n).any(|r| x[r * k + j].abs() >= t))
            .collect();
        let mut y = vec![0f64; n * o];
        for r in 0..n {
            let xr = &x[r * k..(r + 1) * k];
            let a = xr
                .iter()
                .filter(|v| t <= 0.0 || v.abs() < t)
                .fold(0f32, |m, v| m.max(v.abs()));
            for row in 0..o {
                let s = scb[row] as f64;
                let mut int_part = 0f64;
                let mut outlier_part = 0f64;
                for j in 0..k {
                    let c = cb[row * k + j];
                    if outlier[j] {
                        outlier_part += xr[j] as f64 * c * s / 127.0;
                    } else {
                        int_part += code(xr[j], a) * c;
                    }
                }
                y[r * o + row] = int_part * a as f64 * s / (127.0 * 127.0) + outlier_part;
            }
        }
        y
    }

    fn exact(w: &[f32], x: &[f32], n: usize, o: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0f64; n * o];
        for r in 0..n {
            for row in 0..o {
                y[r * o + row] = (0..k)
                    .map(|j| x[r * k + j] as f64 * w[row * k + j] as f64)
                    .sum();
            }
        }
        y
    }

    fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(p, q)| (*p as f64 - q).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn weights_are_rowwise_absmax_int8() {
        let w = [0.5f32, -1.0, 0.25, 0.0, 2.0, -0.5, 0.0, 0.0, 0.0];
        let m = Int8Matrix::quantize(&w, 3, 3, 6.0, DType::F32).unwrap();
        assert_eq!(m.scb, vec![1.0, 2.0, 0.0]);
        // 127 * 0.25 = 31.75 → 32; 127 * 0.5 / 2 = 31.75 → 32; an all-zero row stays 0.
        assert_eq!(m.cb, vec![64, -127, 32, 0, 127, -32, 0, 0, 0]);
        assert_eq!(m.storage_bytes(), 9 + 3 * 4);
        let mut row = [0f32; 3];
        m.dequantize_row(0, &mut row);
        assert!((row[2] - 32.0 / 127.0).abs() < 1e-7);
    }

    #[test]
    fn matmul_without_outliers_matches_the_reference() {
        let (o, k, n) = (40, 96, 4);
        let w = normal(o * k, 0.02, 1);
        let x = normal(n * k, 1.0, 2);
        for t in [0.0f32, 6.0] {
            // No |x| reaches 6 here, so both thresholds take the pure int8 path.
            let m = Int8Matrix::quantize(&w, o, k, t, DType::F32).unwrap();
            assert!(m.outlier_columns(&x, n).is_empty());
            let mut y = vec![0f32; n * o];
            m.matmul_cpu(&x, n, &mut y);
            let r = reference(&w, &x, n, o, k, t);
            let scale = r.iter().fold(0f64, |a, v| a.max(v.abs()));
            assert!(max_abs_diff(&y, &r) <= 1e-5 * scale, "t={t}");
        }
    }

    #[test]
    fn outlier_columns_multiply_in_full_precision() {
        let (o, k, n) = (24, 64, 3);
        let w = normal(o * k, 0.02, 3);
        let mut x = normal(n * k, 1.0, 4);
        x[k + 5] = 40.0; // column 5 of token 1
        x[2 * k + 17] = -9.0; // column 17 of token 2
        let with = Int8Matrix::quantize(&w, o, k, 6.0, DType::F32).unwrap();
        assert_eq!(with.outlier_columns(&x, n), vec![5, 17]);
        let mut y = vec![0f32; n * o];
        with.matmul_cpu(&x, n, &mut y);
        let r = reference(&w, &x, n, o, k, 6.0);
        let scale = r.iter().fold(0f64, |a, v| a.max(v.abs()));
        assert!(max_abs_diff(&y, &r) <= 1e-5 * scale);

        // Threshold 0 disables the decomposition: the outliers inflate the token
        // absmax and the error against the exact product grows.
        let without = Int8Matrix::quantize(&w, o, k, 0.0, DType::F32).unwrap();
        assert!(without.outlier_columns(&x, n).is_empty());
        let mut y0 = vec![0f32; n * o];
        without.matmul_cpu(&x, n, &mut y0);
        let r0 = reference(&w, &x, n, o, k, 0.0);
        assert!(max_abs_diff(&y0, &r0) <= 1e-5 * scale);
        let e = exact(&w, &x, n, o, k);
        let (err_with, err_without) = (max_abs_diff(&y, &e), max_abs_diff(&y0, &e));
        assert!(
            err_with * 3.0 < err_without,
            "with outliers {err_with:e}, without {err_without:e}"
        );
    }

    #[test]
    fn half_precision_rounds_the_output() {
        let (o, k, n) = (8, 32, 2);
        let w: Vec<f32> = normal(o * k, 0.02, 5)
            .iter()
            .map(|&v| DType::F16.round(v))
            .collect();
        let mut x = normal(n * k, 1.0, 6);
        x[3] = 7.5;
        let m = Int8Matrix::quantize(&w, o, k, 6.0, DType::F16).unwrap();
        let mut y = vec![0f32; n * o];
        m.matmul_cpu(&x, n, &mut y);
        let xr: Vec<f32> = x.iter().map(|&v| DType::F16.round(v)).collect();
        let r = reference(&w, &xr, n, o, k, 6.0);
        let scale = r.iter().fold(0f64, |a, v| a.max(v.abs()));
        for (a, b) in y.iter().zip(&r) {
            assert_eq!(*a, DType::F16.round(*a));
            assert!((*a as f64 - b).abs() <= 2f64.powi(-10) * b.abs() + 1e-3 * scale);
        }
    }

    #[test]
    fn rejects_bad_input_clearly() {
        let e = Int8Matrix::quantize(&[1.0, f32::INFINITY], 1, 2, 6.0, DType::F32).unwrap_err();
        assert!(e.to_string().contains("flat index 1"), "{e}");
        let e = Int8Matrix::quantize(&[1.0], 1, 2, 6.0, DType::F32).unwrap_err();
        assert!(e.to_string().contains("needs 2"), "{e}");
        let e = Int8Matrix::quantize(&[1.0, 2.0], 1, 2, -1.0, DType::F32).unwrap_err();
        assert!(e.to_string().contains("threshold"), "{e}");
    }
}
