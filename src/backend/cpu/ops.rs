//! Elementwise and row-wise CPU kernels, and the dense product through `gemm`.

use anyhow::{Result, bail};
use rayon::prelude::*;

use super::CpuTensor;
#[cfg(test)]
use super::matmul::dense_matmul;
use crate::backend::StepLayout;

/// `x / sqrt(mean(x²) + eps) * w` per row, accumulated in f64 for the mean.
pub fn rms_norm(x: &CpuTensor, w: &[f32], eps: f32) -> Result<CpuTensor> {
    if w.len() != x.cols {
        bail!(
            "rms_norm: weight has {} values, rows have {}",
            w.len(),
            x.cols
        );
    }
    let mut out = vec![0.0; x.data.len()];
    out.par_chunks_mut(x.cols)
        .zip(x.data.par_chunks(x.cols))
        .for_each(|(o, r)| {
            let ms = r.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / r.len() as f64;
            let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
            for ((o, &v), &g) in o.iter_mut().zip(r).zip(w) {
                *o = v * inv * g;
            }
        });
    CpuTensor::new(x.rows, x.cols, out)
}

/// Rotates each head in place, HF "rotate half" convention: the pair
/// `(x[i], x[i + d/2])` turns by `position * inv_freq[i]`.
pub fn rope(
    x: &mut CpuTensor,
    heads: usize,
    head_dim: usize,
    inv_freq: &[f32],
    layout: &StepLayout,
) -> Result<()> {
    let half = head_dim / 2;
    if x.cols != heads * head_dim || inv_freq.len() != half || x.rows != layout.num_tokens() {
        bail!(
            "rope: tensor {}x{} does not match {} tokens x {heads} heads x {head_dim}",
            x.rows,
            x.cols,
            layout.num_tokens()
        );
    }
    let positions = layout.token_positions();
    x.data
        .par_chunks_mut(x.cols)
        .zip(positions.par_iter())
        .for_each(|(row, &(_, pos))| {
            let (sin, cos): (Vec<f32>, Vec<f32>) =
                inv_freq.iter().map(|&f| (pos as f32 * f).sin_cos()).unzip();
            for head in row.chunks_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos[i] - b * sin[i];
                    head[i + half] = b * cos[i] + a * sin[i];
                }
            }
        });
    Ok(())
}

fn check_same_shape(op: &str, a: &CpuTensor, b: &CpuTensor) -> Result<()> {
    crate::backend::check_same_shape(op, (a.rows, a.cols), (b.rows, b.cols))
}

/// `silu(gate) * up`.
pub fn silu_mul(gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
    check_same_shape("silu_mul", gate, up)?;
    let data = gate
        .data
        .par_iter()
        .zip(&up.data)
        .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    CpuTensor::new(gate.rows, gate.cols, data)
}

/// `x += y`.
pub fn add_assign(x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
    check_same_shape("add", x, y)?;
    x.data
        .par_iter_mut()
        .zip(&y.data)
        .for_each(|(a, &b)| *a += b);
    Ok(())
}

/// Index of the first largest value.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    #[test]
    fn dense_matmul_matches_f64_reference() {
        for (n, out_f, in_f) in [(1, 7, 5), (3, 64, 33), (17, 130, 96)] {
            let x = random(n * in_f, 1);
            let w = random(out_f * in_f, 2);
            let mut y = vec![0.0; n * out_f];
            dense_matmul(&x, n, &w, out_f, in_f, &mut y);
            for r in 0..n {
                for c in 0..out_f {
                    let want: f64 = (0..in_f)
                        .map(|k| x[r * in_f + k] as f64 * w[c * in_f + k] as f64)
                        .sum();
                    let got = y[r * out_f + c] as f64;
                    assert!(
                        (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "{got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn dense_matmul_rows_do_not_depend_on_batch() {
        let (out_f, in_f) = (96, 80);
        let x = random(9 * in_f, 3);
        let w = random(out_f * in_f, 4);
        let mut all = vec![0.0; 9 * out_f];
        dense_matmul(&x, 9, &w, out_f, in_f, &mut all);
        for r in 0..9 {
            let mut one = vec![0.0; out_f];
            dense_matmul(&x[r * in_f..(r + 1) * in_f], 1, &w, out_f, in_f, &mut one);
            assert_eq!(one, all[r * out_f..(r + 1) * out_f], "row {r}");
        }
    }

    #[test]
    fn rms_norm_silu_and_argmax_by_hand() {
        let x = CpuTensor::new(1, 2, vec![3.0, 4.0]).unwrap();
        // mean square 12.5, 1/sqrt(12.5) = 0.2828427
        let y = rms_norm(&x, &[1.0, 2.0], 0.0).unwrap();
        assert!((y.data[0] - 0.848_528_1).abs() < 1e-6);
        assert!((y.data[1] - 2.262_741_7).abs() < 1e-6);
        let g = CpuTensor::new(1, 2, vec![0.0, 1.0]).unwrap();
        let s = silu_mul(&g, &x).unwrap();
        assert_eq!(s.data[0], 0.0);
        assert!((s.data[1] - 4.0 * 0.731_058_6).abs() < 1e-6);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    }
}
