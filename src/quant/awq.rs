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

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;

use super::calib::{BlockProgress, Calibrator, linear_mut};
use super::packed::{PackedIntMatrix, check_bits};
use super::rtn::{GridRule, GroupGrid, IntFormat, quantize_groups, resolve_group_size};
use super::spec::AwqConfig;
use super::{LinearWeight, is_skipped};
use crate::model::LlamaWeights;
use crate::model::forward::LinearInput;
use crate::model::weights::LayerWeights;

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
    fn format(&self) -> IntFormat {
        IntFormat {
            bits: self.bits,
            group_size: self.group_size,
            rule: GridRule::MinMax,
        }
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

/// Per-column mean of `|x|` over the rows of `x` (`[rows, cols]`).
pub fn mean_abs(x: &[f32], cols: usize) -> Vec<f32> {
    let rows = x.len() / cols.max(1);
    let mut sum = vec![0f64; cols];
    for row in x.chunks(cols) {
        for (s, v) in sum.iter_mut().zip(row) {
            *s += v.abs() as f64;
        }
    }
    sum.iter()
        .map(|s| (s / rows.max(1) as f64) as f32)
        .collect()
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

/// Grid search of the scales of one group of linear layers sharing the input
/// `x` (`[t, k]`, a token subset) with channel statistic `x_mean`: returns
/// the best scales and their `α`. `ws` holds `(weights [m, k], m)`.
pub fn search_scales(
    x: &[f32],
    t: usize,
    x_mean: &[f32],
    ws: &[(Vec<f32>, usize)],
    inspect: Inspect,
    p: &AwqParams,
) -> Result<(Vec<f32>, f64)> {
    let k = x_mean.len();
    if x.len() != t * k || ws.iter().any(|(w, m)| w.len() != m * k) {
        bail!("AWQ: inputs and weights do not share {k} input channels");
    }
    if matches!(inspect, Inspect::Mlp { .. }) && ws.len() != 2 {
        bail!("AWQ: the MLP group must be [gate, up]");
    }
    let reference = group_output(x, t, k, ws, inspect);
    let mut best: Option<(f64, Vec<f32>, f64)> = None;
    for i in 0..=p.grid {
        let alpha = i as f64 / p.grid as f64;
        let s = scales_for(x_mean, alpha);
        let scaled: Vec<(Vec<f32>, usize)> = ws
            .iter()
            .map(|(w, m)| {
                let ws: Vec<f32> = w
                    .chunks(k)
                    .flat_map(|row| row.iter().zip(&s).map(|(v, s)| v * s))
                    .collect();
                let mut q = fake_quantize(&ws, k, p.bits, p.group_size);
                for row in q.chunks_mut(k) {
                    row.iter_mut().zip(&s).for_each(|(v, s)| *v /= s);
                }
                (q, *m)
            })
            .collect();
        let err = mse(&group_output(x, t, k, &scaled, inspect), &reference);
        if !err.is_finite() {
            continue;
        }
        if best.as_ref().is_none_or(|(e, _, _)| err < *e) {
            best = Some((err, s, alpha));
        }
    }
    let (_, s, alpha) = best.context("AWQ: every scale candidate gave a non-finite error")?;
    Ok((s, alpha))
}

/// Clipping search for `w` (`[m, k]`) on inputs `x` (`[t, k]`): per row and
/// group, the largest magnitude to keep. Returns `[m, groups]` maxima.
pub fn search_clip(x: &[f32], t: usize, w: &[f32], m: usize, k: usize, p: &AwqParams) -> Vec<f32> {
    let gs = p.group_size;
    let groups = k.div_ceil(gs);
    // Up to CLIP_TOKENS tokens, evenly strided.
    let step = t.div_ceil(CLIP_TOKENS).max(1);
    let rows: Vec<usize> = (0..t).step_by(step).collect();
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
                let shrink = 1.0 - i as f32 / CLIP_GRID as f32;
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

fn scale_columns(w: &[f32], k: usize, s: &[f32]) -> Vec<f32> {
    w.chunks(k)
        .flat_map(|row| row.iter().zip(s).map(|(v, s)| v * s))
        .collect()
}

fn divide_columns(x: &[f32], k: usize, s: &[f32]) -> Vec<f32> {
    x.chunks(k)
        .flat_map(|row| row.iter().zip(s).map(|(v, s)| v / s))
        .collect()
}

/// Statistics and a token subset of one linear input, captured over all batches.
struct InputCapture {
    cols: usize,
    sum_abs: Vec<f64>,
    seen: usize,
    stride: usize,
    kept: Vec<f32>,
}

impl InputCapture {
    fn new(cols: usize, total: usize, keep: usize) -> Self {
        InputCapture {
            cols,
            sum_abs: vec![0.0; cols],
            seen: 0,
            stride: total.div_ceil(keep.max(1)).max(1),
            kept: Vec::new(),
        }
    }

    fn add(&mut self, x: &[f32]) {
        for row in x.chunks(self.cols) {
            for (s, v) in self.sum_abs.iter_mut().zip(row) {
                *s += v.abs() as f64;
            }
            if self.seen.is_multiple_of(self.stride) {
                self.kept.extend_from_slice(row);
            }
            self.seen += 1;
        }
    }

    fn mean(&self) -> Vec<f32> {
        self.sum_abs
            .iter()
            .map(|s| (s / self.seen.max(1) as f64) as f32)
            .collect()
    }

    fn rows(&self) -> usize {
        self.kept.len() / self.cols
    }
}

/// One scaled group of a block: the input it shares, its linears, the op the
/// inverse scales fold into.
struct ScaleGroup {
    input: LinearInput,
    linears: &'static [&'static str],
}

const GROUPS: [ScaleGroup; 4] = [
    ScaleGroup {
        input: LinearInput::Qkv,
        linears: &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    },
    ScaleGroup {
        input: LinearInput::O,
        linears: &["self_attn.o_proj"],
    },
    ScaleGroup {
        input: LinearInput::GateUp,
        linears: &["mlp.gate_proj", "mlp.up_proj"],
    },
    ScaleGroup {
        input: LinearInput::Down,
        linears: &["mlp.down_proj"],
    },
];

fn dense_f32(layer: &mut LayerWeights, name: &str) -> (Vec<f32>, usize, usize) {
    let w = linear_mut(layer, name);
    let (m, k) = w.shape();
    (w.dequantize(), m, k)
}

fn set_dense(
    layer: &mut LayerWeights,
    name: &str,
    data: Vec<f32>,
    m: usize,
    k: usize,
) -> Result<()> {
    let t = crate::tensor::HostTensor::new(vec![m, k], crate::tensor::DType::F32, data)?;
    *linear_mut(layer, name) = LinearWeight::Dense(t);
    Ok(())
}

/// Divides the preceding op of `group` by `s` (norm weights or producer rows).
fn fold_inverse(layer: &mut LayerWeights, input: LinearInput, s: &[f32]) -> Result<()> {
    let rows = |layer: &mut LayerWeights, name: &str| -> Result<()> {
        let (mut w, m, k) = dense_f32(layer, name);
        for (row, sv) in w.chunks_mut(k).zip(s) {
            row.iter_mut().for_each(|v| *v /= sv);
        }
        set_dense(layer, name, w, m, k)
    };
    match input {
        LinearInput::Qkv => layer
            .input_layernorm
            .iter_mut()
            .zip(s)
            .for_each(|(v, s)| *v /= s),
        LinearInput::GateUp => layer
            .post_attention_layernorm
            .iter_mut()
            .zip(s)
            .for_each(|(v, s)| *v /= s),
        LinearInput::O => rows(layer, "self_attn.v_proj")?,
        LinearInput::Down => rows(layer, "mlp.up_proj")?,
    }
    Ok(())
}

/// Quantizes every decoder-block linear of `weights` with AWQ on the
/// calibration windows `samples`, block by block; each block's inputs come
/// from the already-quantized earlier blocks. Linears in `skip_modules` are
/// scaled with their group (an exact change) but stay dense.
pub fn quantize_model_awq(
    weights: &mut LlamaWeights,
    cfg: &AwqConfig,
    samples: &[Vec<u32>],
) -> Result<()> {
    check_bits(cfg.bits)?;
    if cfg.grid == 0 {
        bail!("AWQ grid must be at least 1");
    }
    if cfg.search_tokens == 0 {
        bail!("AWQ search_tokens must be at least 1");
    }
    let mut cal = Calibrator::new(weights, samples)?;
    let total = cal.tokens();
    let layers = weights.layers.len();
    let mut progress = BlockProgress::new(layers, "awq");
    for l in 0..layers {
        cal.begin_block(&weights.layers[l])?;
        let prefix = format!("model.layers.{l}.");
        let mut caps: Vec<Option<InputCapture>> = (0..4).map(|_| None).collect();
        let inputs = GROUPS.map(|g| g.input);
        cal.observe(&inputs, &mut |which, x| {
            let i = inputs
                .iter()
                .position(|&g| g == which)
                .expect("observed input");
            caps[i]
                .get_or_insert_with(|| InputCapture::new(x.cols, total, cfg.search_tokens))
                .add(&x.data);
            Ok(())
        })?;
        let caps: Vec<InputCapture> = caps
            .into_iter()
            .map(|c| c.context("AWQ: a linear input was never observed"))
            .collect::<Result<_>>()?;
        let layer = &mut weights.layers[l];
        // Scale search on the captured inputs of the unmodified block.
        let mut scales: Vec<Option<Vec<f32>>> = Vec::new();
        for (g, cap) in GROUPS.iter().zip(&caps) {
            if g.input == LinearInput::O {
                let (v, o) = (layer.v_proj.shape(), layer.o_proj.shape());
                if v != o {
                    scales.push(None);
                    continue;
                }
            }
            let k = cap.cols;
            let p = params(cfg, k);
            let ws: Vec<(Vec<f32>, usize)> = g
                .linears
                .iter()
                .map(|n| {
                    let (w, m, _) = dense_f32(layer, n);
                    (w, m)
                })
                .collect();
            let down;
            let inspect = if g.input == LinearInput::GateUp {
                down = dense_f32(layer, "mlp.down_proj");
                Inspect::Mlp {
                    down: &down.0,
                    out: down.1,
                }
            } else {
                Inspect::Linears
            };
            let (s, alpha) = search_scales(&cap.kept, cap.rows(), &cap.mean(), &ws, inspect, &p)
                .with_context(|| format!("AWQ scale search of {prefix}{}", g.linears[0]))?;
            tracing::debug!("awq: {prefix}{:?} alpha {alpha}", g.input);
            scales.push(Some(s));
        }
        // Fold: W·diag(s) for the group, 1/s into the preceding op.
        for (g, s) in GROUPS.iter().zip(&scales) {
            let Some(s) = s else { continue };
            for n in g.linears {
                let (w, m, k) = dense_f32(layer, n);
                set_dense(layer, n, scale_columns(&w, k, s), m, k)?;
            }
            fold_inverse(layer, g.input, s)?;
        }
        // Clip (not q/k) on the scaled inputs, then quantize.
        for (gi, g) in GROUPS.iter().enumerate() {
            let cap = &caps[gi];
            let k = cap.cols;
            let p = params(cfg, k);
            let xs = match &scales[gi] {
                Some(s) => divide_columns(&cap.kept, k, s),
                None => cap.kept.clone(),
            };
            for n in g.linears {
                if is_skipped(&format!("{prefix}{n}"), &cfg.skip_modules) {
                    continue;
                }
                let (mut w, m, _) = dense_f32(layer, n);
                if cfg.clip && !n.ends_with("q_proj") && !n.ends_with("k_proj") {
                    let maxes = search_clip(&xs, cap.rows(), &w, m, k, &p);
                    apply_clip(&mut w, k, p.group_size, &maxes);
                }
                let q = quantize_groups(&w, m, k, p.format(), "awq")
                    .with_context(|| format!("AWQ of {prefix}{n}"))?;
                *linear_mut(layer, n) = LinearWeight::Quantized(Arc::new(q));
            }
        }
        // Scales were folded into norms and linears: take the whole block again.
        cal.begin_block(&weights.layers[l])?;
        cal.advance()?;
        progress.block_done();
    }
    progress.finish(total);
    Ok(())
}

fn params(cfg: &AwqConfig, k: usize) -> AwqParams {
    AwqParams {
        bits: cfg.bits,
        group_size: resolve_group_size(cfg.group_size, k),
        grid: cfg.grid,
        clip: cfg.clip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantizedMatrix;
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
