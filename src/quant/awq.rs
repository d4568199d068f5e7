//! AWQ (Lin et al., 2023): activation-aware weight quantization.
//!
//! For each group of linear layers that share an input `x` (q/k/v; o; gate/up;
//! down) the per-input-channel statistic `s_x = mean |x|` is taken over all
//! calibration tokens. A grid search over `α ∈ {0, 1/grid, …, 1}` tries the
//! scales `s = max(s_x^α, 1e-4) / sqrt(max(s)·min(s))`: each weight becomes
//! `Q(W·diag(s))·diag(1/s)` and the output error against the unquantized
//! output is measured on a subset of the calibration tokens. The compared
//! output is the concatenated q/k/v outputs for the attention input, the o
//! and down outputs for those layers, and the whole MLP output
//! `down(silu(gate)·up)` (with `down` unquantized) for gate/up, as AutoAWQ
//! inspects the MLP. `α = 0` (`s = 1`) is plain round-to-nearest, so the
//! search never does worse than RTN on its tokens.
//!
//! The chosen `1/s` is folded into the preceding operation: `input_layernorm`
//! for q/k/v, the rows of `v_proj` for o_proj (only when `v_proj` and `o_proj`
//! have the same shape: with grouped-query attention AutoAWQ skips it, and so
//! does this), `post_attention_layernorm` for gate/up, the rows of `up_proj`
//! for down; `W·diag(s)` is what gets quantized. The fold is exact in
//! floating point, so searches of all groups use the captured inputs of the
//! unmodified block.
//!
//! Then the clipping search (AutoAWQ `_compute_best_clip`; not for q/k, whose
//! outputs meet in the attention scores): per output row and group, the max
//! `m·(1 − i/20)`, `i = 0..10`, that minimises the group's partial output
//! error on up to 512 tokens; weights are clamped to `±` that max. Finally
//! every linear is quantized group-wise with AWQ's asymmetric min-max grid
//! ([`GridRule::MinMax`]).
//!
//! The functions here are the CPU reference of both searches; the whole-model
//! loop, which runs them on the CPU or a GPU, is in [`super::awq_model`].

use anyhow::{Result, bail};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;

use super::packed::{PackedIntMatrix, check_bits};
use super::rtn::{GridRule, GroupGrid, IntFormat, quantize_groups, resolve_group_size};
use super::spec::AwqConfig;

/// Tokens the clipping search uses (AutoAWQ's `n_sample_token`).
pub const CLIP_TOKENS: usize = 512;
/// Steps of the clipping search: shrink factors `1 − i/CLIP_GRID` for `i < CLIP_GRID·0.5`.
pub const CLIP_GRID: usize = 20;

/// AWQ settings for the search and the final quantization.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AwqParams {
    /// Bits per code.
    pub bits: u32,
    /// Columns per group, resolved (see [`resolve_group_size`]).
    pub group_size: usize,
    /// The α grid has `grid + 1` points `i / grid`.
    pub grid: usize,
    /// Run the clipping search.
    pub clip: bool,
}

impl AwqParams {
    /// The parameters of `cfg` for inputs of `k` features.
    pub fn of(cfg: &AwqConfig, k: usize) -> Self {
        AwqParams {
            bits: cfg.bits,
            group_size: resolve_group_size(cfg.group_size, k),
            grid: cfg.grid,
            clip: cfg.clip,
        }
    }

    /// The format of the final quantization.
    pub fn format(&self) -> IntFormat {
        IntFormat {
            bits: self.bits,
            group_size: self.group_size,
            rule: GridRule::MinMax,
        }
    }

    /// Point `i` of the α grid, `i / grid`.
    pub fn alpha(&self, i: usize) -> f64 {
        i as f64 / self.grid as f64
    }
}

/// `y[n, m] = x[n, k] · w[m, k]ᵀ` (row-major), in f32 through faer; with
/// `parallel`, slices of rows of `x` run on rayon's threads.
pub fn matmul_xwt(x: &[f32], n: usize, k: usize, w: &[f32], m: usize, parallel: bool) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    if n == 0 || m == 0 || k == 0 {
        return out;
    }
    let wm = MatRef::from_row_major_slice(w, m, k);
    let rows = if parallel {
        n.div_ceil(rayon::current_num_threads() * 2).max(16)
    } else {
        n
    };
    out.par_chunks_mut(rows * m)
        .zip(x.par_chunks(rows * k))
        .for_each(|(y, xc)| {
            let r = xc.len() / k.max(1);
            let xm = MatRef::from_row_major_slice(xc, r, k);
            // An owned (column-major) destination: see `gptq::quantize_rows`.
            let mut ym = Mat::<f32>::zeros(r, m);
            matmul(
                ym.as_mut(),
                Accum::Replace,
                xm,
                wm.transpose(),
                1.0,
                Par::Seq,
            );
            for (i, row) in y.chunks_mut(m).enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = ym[(i, j)];
                }
            }
        });
    out
}

/// Rounds every value of a row-major `[rows, cols]` matrix onto its group's
/// min-max grid (AWQ's pseudo-quantization), returning the rounded values.
pub fn fake_quantize(w: &[f32], cols: usize, bits: u32, group_size: usize) -> Vec<f32> {
    let mut out = w.to_vec();
    out.par_chunks_mut(cols).for_each(|row| {
        for chunk in row.chunks_mut(group_size) {
            let g = GroupGrid::fit(chunk, bits, GridRule::MinMax);
            chunk.iter_mut().for_each(|v| *v = g.round(*v));
        }
    });
    out
}

/// Adds `|x|` of every row of `x` (`[rows, sums.len()]`) to `sums`, in f64.
pub fn add_abs(sums: &mut [f64], x: &[f32]) {
    for row in x.chunks(sums.len().max(1)) {
        for (s, v) in sums.iter_mut().zip(row) {
            *s += v.abs() as f64;
        }
    }
}

/// Per-column means of `|x|` from the sums of [`add_abs`] over `rows` rows.
pub fn means_of(sums: &[f64], rows: usize) -> Vec<f32> {
    sums.iter()
        .map(|s| (s / rows.max(1) as f64) as f32)
        .collect()
}

/// Per-column mean of `|x|` over the rows of `x` (`[rows, cols]`).
pub fn mean_abs(x: &[f32], cols: usize) -> Vec<f32> {
    let mut sums = vec![0f64; cols];
    add_abs(&mut sums, x);
    means_of(&sums, x.len() / cols.max(1))
}

/// AWQ's scales for `α`: `max(s_x^α, 1e-4)`, divided by `sqrt(max·min)`.
pub fn scales_for(x_mean: &[f32], alpha: f64) -> Vec<f32> {
    let s: Vec<f64> = x_mean
        .iter()
        .map(|&m| (m as f64).powf(alpha).max(1e-4))
        .collect();
    let (lo, hi) = s
        .iter()
        .fold((f64::INFINITY, 0f64), |(a, b), &v| (a.min(v), b.max(v)));
    let norm = (lo * hi).sqrt();
    s.iter().map(|v| (v / norm) as f32).collect()
}

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// What a scaled group's output is compared on.
#[derive(Clone, Copy, Debug)]
pub enum Inspect<'a> {
    /// The concatenated outputs of the group's linear layers.
    Linears,
    /// The MLP output `down(silu(gate(x)) · up(x))`; the group is `[gate, up]`
    /// and `down` (`[out, intermediate]`) stays unquantized.
    Mlp { down: &'a [f32], out: usize },
}

fn group_output(
    x: &[f32],
    t: usize,
    k: usize,
    ws: &[(Vec<f32>, usize)],
    inspect: Inspect,
) -> Vec<f32> {
    let outs: Vec<Vec<f32>> = ws
        .iter()
        .map(|(w, m)| matmul_xwt(x, t, k, w, *m, true))
        .collect();
    match inspect {
        Inspect::Linears => outs.concat(),
        Inspect::Mlp { down, out } => {
            let inter = ws[0].1;
            let act: Vec<f32> = outs[0]
                .iter()
                .zip(&outs[1])
                .map(|(&g, &u)| silu(g) * u)
                .collect();
            matmul_xwt(&act, t, inter, down, out, true)
        }
    }
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len().max(1) as f64
}

/// Checks that the weights `ws` (`(weights [m, k], m)`) take `k` inputs and
/// that an MLP group is `[gate, up]` with a `down` of matching width.
pub fn check_group(k: usize, ws: &[(Vec<f32>, usize)], inspect: Inspect) -> Result<()> {
    if ws.is_empty() || ws.iter().any(|(w, m)| w.len() != m * k) {
        bail!("AWQ: the weights of a group do not share {k} input channels");
    }
    if let Inspect::Mlp { down, out } = inspect
        && (ws.len() != 2 || ws[0].1 != ws[1].1 || down.len() != out * ws[0].1)
    {
        bail!("AWQ: the MLP group must be [gate, up] with a down_proj of their width");
    }
    Ok(())
}

/// The output error of every point of the α grid (see [`AwqParams::alpha`])
/// for one group of linear layers sharing the input `x` (`[t, k]`, a token
/// subset) with channel statistic `x_mean`: the MSE, summed in f64, of the
/// group output with `Q(W·diag(s))·diag(1/s)` against the unquantized one.
/// `ws` holds `(weights [m, k], m)`.
pub fn scale_errors(
    x: &[f32],
    t: usize,
    x_mean: &[f32],
    ws: &[(Vec<f32>, usize)],
    inspect: Inspect,
    p: &AwqParams,
) -> Result<Vec<f64>> {
    let k = x_mean.len();
    check_group(k, ws, inspect)?;
    if x.len() != t * k {
        bail!(
            "AWQ: {} input values are not {t} tokens of {k} channels",
            x.len()
        );
    }
    let reference = group_output(x, t, k, ws, inspect);
    Ok((0..=p.grid)
        .map(|i| {
            let s = scales_for(x_mean, p.alpha(i));
            let scaled: Vec<(Vec<f32>, usize)> = ws
                .iter()
                .map(|(w, m)| {
                    let mut q = fake_quantize(&scale_columns(w, k, &s), k, p.bits, p.group_size);
                    for row in q.chunks_mut(k) {
                        row.iter_mut().zip(&s).for_each(|(v, s)| *v /= s);
                    }
                    (q, *m)
                })
                .collect();
            mse(&group_output(x, t, k, &scaled, inspect), &reference)
        })
        .collect())
}

/// AWQ's choice among the errors of [`scale_errors`]: the `α` of the lowest
/// finite error, the smallest `α` among equal ones; non-finite errors are
/// skipped, and an error is returned when none is finite.
pub fn best_alpha(errors: &[f64], p: &AwqParams) -> Result<f64> {
    let mut best: Option<(f64, usize)> = None;
    for (i, &err) in errors.iter().enumerate() {
        if err.is_finite() && best.is_none_or(|(e, _)| err < e) {
            best = Some((err, i));
        }
    }
    match best {
        Some((_, i)) => Ok(p.alpha(i)),
        None => bail!("AWQ: every scale candidate gave a non-finite error"),
    }
}

/// Grid search of the scales of one group of linear layers (see
/// [`scale_errors`]): returns the best scales and their `α`.
pub fn search_scales(
    x: &[f32],
    t: usize,
    x_mean: &[f32],
    ws: &[(Vec<f32>, usize)],
    inspect: Inspect,
    p: &AwqParams,
) -> Result<(Vec<f32>, f64)> {
    let alpha = best_alpha(&scale_errors(x, t, x_mean, ws, inspect, p)?, p)?;
    Ok((scales_for(x_mean, alpha), alpha))
}

/// Shrink factor of step `i` of the clipping search, `1 − i/CLIP_GRID` (f32).
pub fn clip_shrink(i: usize) -> f32 {
    1.0 - i as f32 / CLIP_GRID as f32
}

/// Stride of the tokens the clipping search uses out of `t`: up to
/// [`CLIP_TOKENS`] of them, evenly strided from the first.
pub fn clip_stride(t: usize) -> usize {
    t.div_ceil(CLIP_TOKENS).max(1)
}

/// Clipping search for `w` (`[m, k]`) on inputs `x` (`[t, k]`): per row and
/// group, the largest magnitude to keep. Returns `[m, groups]` maxima.
pub fn search_clip(x: &[f32], t: usize, w: &[f32], m: usize, k: usize, p: &AwqParams) -> Vec<f32> {
    let gs = p.group_size;
    let groups = k.div_ceil(gs);
    let rows: Vec<usize> = (0..t).step_by(clip_stride(t)).collect();
    let per_group: Vec<Vec<f32>> = (0..groups)
        .into_par_iter()
        .map(|g| {
            let (c0, c1) = (g * gs, ((g + 1) * gs).min(k));
            let n = c1 - c0;
            let xg: Vec<f32> = rows
                .iter()
                .flat_map(|&r| x[r * k + c0..r * k + c1].iter().copied())
                .collect();
            let wg: Vec<f32> = w
                .chunks(k)
                .flat_map(|row| row[c0..c1].iter().copied())
                .collect();
            let tt = rows.len();
            let org = matmul_xwt(&xg, tt, n, &wg, m, false);
            let org_max: Vec<f32> = wg
                .chunks(n)
                .map(|row| row.iter().fold(0f32, |a, v| a.max(v.abs())))
                .collect();
            let mut best_max = org_max.clone();
            let mut best_err = vec![f64::INFINITY; m];
            for i in 0..CLIP_GRID / 2 {
                let shrink = clip_shrink(i);
                let mut q = Vec::with_capacity(m * n);
                for (row, &mx) in wg.chunks(n).zip(&org_max) {
                    let lim = mx * shrink;
                    let cur: Vec<f32> = row.iter().map(|v| v.clamp(-lim, lim)).collect();
                    let grid = GroupGrid::fit(&cur, p.bits, GridRule::MinMax);
                    q.extend(cur.iter().map(|&v| grid.round(v)));
                }
                let out = matmul_xwt(&xg, tt, n, &q, m, false);
                for r in 0..m {
                    let err = (0..tt)
                        .map(|j| ((out[j * m + r] - org[j * m + r]) as f64).powi(2))
                        .sum::<f64>()
                        / tt as f64;
                    if err < best_err[r] {
                        best_err[r] = err;
                        best_max[r] = org_max[r] * shrink;
                    }
                }
            }
            best_max
        })
        .collect();
    let mut out = vec![0f32; m * groups];
    for (g, maxes) in per_group.iter().enumerate() {
        for (r, &v) in maxes.iter().enumerate() {
            out[r * groups + g] = v;
        }
    }
    out
}

/// Clamps each group of `w` (`[m, k]`) to `±max` from [`search_clip`].
pub fn apply_clip(w: &mut [f32], k: usize, group_size: usize, maxes: &[f32]) {
    let groups = k.div_ceil(group_size);
    for (r, row) in w.chunks_mut(k).enumerate() {
        for (g, chunk) in row.chunks_mut(group_size).enumerate() {
            let m = maxes[r * groups + g];
            chunk.iter_mut().for_each(|v| *v = v.clamp(-m, m));
        }
    }
}

/// AWQ of a single linear layer `w` (`[m, k]`) with inputs `x` (`[t, k]`):
/// scale search, clipping, quantization. Returns the quantized `W·diag(s)`
/// and `s` (the caller divides its input by `s`, i.e. folds `1/s` upstream).
pub fn awq_quantize_linear(
    w: &[f32],
    m: usize,
    k: usize,
    x: &[f32],
    t: usize,
    p: &AwqParams,
) -> Result<(PackedIntMatrix, Vec<f32>)> {
    check_bits(p.bits)?;
    let x_mean = mean_abs(x, k);
    let (s, _) = search_scales(x, t, &x_mean, &[(w.to_vec(), m)], Inspect::Linears, p)?;
    let mut ws = scale_columns(w, k, &s);
    if p.clip {
        let xs = divide_columns(x, k, &s);
        let maxes = search_clip(&xs, t, &ws, m, k, p);
        apply_clip(&mut ws, k, p.group_size, &maxes);
    }
    Ok((quantize_groups(&ws, m, k, p.format(), "awq")?, s))
}

/// `w` (`[rows, k]`) with column `c` multiplied by `s[c]`.
pub fn scale_columns(w: &[f32], k: usize, s: &[f32]) -> Vec<f32> {
    w.chunks(k)
        .flat_map(|row| row.iter().zip(s).map(|(v, s)| v * s))
        .collect()
}

/// `x` (`[rows, k]`) with column `c` divided by `s[c]`.
pub fn divide_columns(x: &[f32], k: usize, s: &[f32]) -> Vec<f32> {
    x.chunks(k)
        .flat_map(|row| row.iter().zip(s).map(|(v, s)| v / s))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::quant::{LinearWeight, QuantizedMatrix};
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use rand_distr::{Distribution, Normal};

    fn output_error(x: &[f32], t: usize, k: usize, w: &[f32], wq: &[f32], m: usize) -> f64 {
        let a = matmul_xwt(x, t, k, w, m, false);
        let b = matmul_xwt(x, t, k, wq, m, false);
        mse(&a, &b)
    }

    /// Inputs with a few outlier channels (×25): AWQ protects the weights
    /// those channels multiply and beats RTN on held-out tokens.
    #[test]
    fn awq_beats_rtn_with_outlier_channels() {
        let (m, k, t) = (64, 256, 512);
        let mut rng = StdRng::seed_from_u64(3);
        let normal = Normal::new(0f32, 1.0).unwrap();
        let w: Vec<f32> = (0..m * k).map(|_| normal.sample(&mut rng) * 0.05).collect();
        let gen_x = |rng: &mut StdRng| -> Vec<f32> {
            (0..2 * t * k)
                .map(|i| {
                    let c = i % k;
                    let scale = if c % 37 == 5 { 25.0 } else { 1.0 };
                    normal.sample(rng) * scale
                })
                .collect()
        };
        let all = gen_x(&mut rng);
        let (calib, held) = all.split_at(t * k);
        let p = AwqParams {
            bits: 4,
            group_size: 128,
            grid: 20,
            clip: true,
        };
        let (q, s) = awq_quantize_linear(&w, m, k, calib, t, &p).unwrap();
        assert_eq!(q.format_name(), "awq-4bit-g128");
        // Effective weight: dequantized W·diag(s), times diag(1/s).
        let mut wq = vec![0f32; m * k];
        for (r, row) in wq.chunks_mut(k).enumerate() {
            q.dequantize_row(r, row);
            row.iter_mut().zip(&s).for_each(|(v, s)| *v /= s);
        }
        let rtn = quantize_groups(&w, m, k, p.format(), "rtn").unwrap();
        let rtn_w = LinearWeight::Quantized(Arc::new(rtn)).dequantize();
        let e_awq = output_error(held, t, k, &w, &wq, m);
        let e_rtn = output_error(held, t, k, &w, &rtn_w, m);
        assert!(e_awq < 0.7 * e_rtn, "AWQ output MSE {e_awq} vs RTN {e_rtn}");
        // The outlier channels got the largest scales.
        let big = s[5];
        assert!(s.iter().enumerate().all(|(c, &v)| c % 37 == 5 || v < big));
    }

    #[test]
    fn scales_are_normalised_and_alpha_zero_is_one() {
        let s = scales_for(&[1.0, 4.0, 16.0], 0.5);
        // [1, 2, 4] / sqrt(4) = [0.5, 1, 2]
        for (a, b) in s.iter().zip([0.5, 1.0, 2.0]) {
            assert!((a - b).abs() < 1e-6);
        }
        assert!(scales_for(&[3.0, 0.0], 0.0).iter().all(|&v| v == 1.0));
    }

    #[test]
    fn clipping_never_increases_the_group_error() {
        let (m, k, t) = (8, 64, 100);
        let mut rng = StdRng::seed_from_u64(9);
        let normal = Normal::new(0f32, 1.0).unwrap();
        let mut w: Vec<f32> = (0..m * k).map(|_| normal.sample(&mut rng)).collect();
        w[3] = 9.0; // a weight outlier stretches its group's grid
        let x: Vec<f32> = (0..t * k).map(|_| normal.sample(&mut rng)).collect();
        let p = AwqParams {
            bits: 3,
            group_size: 32,
            grid: 20,
            clip: true,
        };
        let maxes = search_clip(&x, t, &w, m, k, &p);
        assert!(
            maxes[0] < 9.0,
            "the outlier's group is clipped: {}",
            maxes[0]
        );
        // Per row and group, the partial output error with the chosen max is
        // no larger than without clipping.
        let partial = |wq: &[f32], r: usize, g: usize| -> f64 {
            (0..t)
                .map(|j| {
                    (g * 32..(g + 1) * 32)
                        .map(|c| x[j * k + c] * (w[r * k + c] - wq[r * k + c]))
                        .sum::<f32>() as f64
                })
                .map(|e| e * e)
                .sum()
        };
        let mut clipped = w.clone();
        apply_clip(&mut clipped, k, 32, &maxes);
        let (q0, q1) = (
            fake_quantize(&w, k, 3, 32),
            fake_quantize(&clipped, k, 3, 32),
        );
        for r in 0..m {
            for g in 0..2 {
                let (before, after) = (partial(&q0, r, g), partial(&q1, r, g));
                assert!(
                    after <= before * (1.0 + 1e-4) + 1e-9,
                    "row {r} group {g}: {after} > {before}"
                );
            }
        }
    }
}
