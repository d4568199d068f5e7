//! AWQ of a whole model, block by block, on the CPU or a GPU.
//!
//! [`run_awq`] is the one block loop: it runs the calibration windows
//! through each block on the device's backend, captures each linear input's
//! channel statistic and token subset, has the device run the scale search
//! of each group of linears (see [`super::awq`]), chooses `α` and folds the
//! scales on the host, has the device run the clipping search, and quantizes
//! on the host with [`quantize_groups`], so both devices write one format.
//! [`AwqDevice`] is what a device provides; [`CpuAwq`] runs the CPU
//! reference functions.

use std::sync::Arc;

use anyhow::{Context, Result, bail};

use super::awq::{
    AwqParams, Inspect, add_abs, apply_clip, best_alpha, divide_columns, means_of, scale_columns,
    scale_errors, scales_for, search_clip,
};
use super::calib::{BlockProgress, Calibrator, KEEP_BYTES, linear_mut};
use super::packed::check_bits;
use super::rtn::quantize_groups;
use super::spec::AwqConfig;
use super::stage_clock::StageClock;
use super::{LinearWeight, is_skipped};
use crate::backend::Backend;
use crate::backend::cpu::{CpuBackend, CpuTensor};
use crate::model::LlamaWeights;
use crate::model::forward::LinearInput;
use crate::model::weights::LayerWeights;

/// Where AWQ runs: the backend of the calibration forward, where each linear
/// input's statistic and tokens are kept, and where the scale and clipping
/// searches run. Choices (`α`), folding and packing stay in [`run_awq`].
pub trait AwqDevice {
    /// The backend the calibration windows run through.
    type Backend: Backend;
    /// One linear input's `Σ|x|` per channel and its kept tokens.
    type Capture;
    /// The tokens of a capture the clipping search uses, divided by the scales.
    type ClipTokens;

    /// The backend.
    fn backend(&self) -> &Self::Backend;
    /// Most bytes of intermediate block values the calibration may keep.
    fn keep_bytes(&self) -> usize;
    /// An empty capture of inputs with `cols` features that keeps every
    /// `stride`-th of the tokens it is given, counting across batches.
    fn capture(&self, cols: usize, total: usize, stride: usize) -> Result<Self::Capture>;
    /// Adds a batch of inputs (`[tokens, cols]`).
    fn add_batch(
        &self,
        cap: &mut Self::Capture,
        x: &<Self::Backend as Backend>::Tensor,
    ) -> Result<()>;
    /// `mean |x|` per channel over every token added ([`means_of`]); an
    /// error when none was.
    fn channel_mean(&self, cap: &Self::Capture) -> Result<Vec<f32>>;
    /// [`scale_errors`] on the kept tokens of `cap`.
    fn scale_errors(
        &self,
        cap: &Self::Capture,
        x_mean: &[f32],
        ws: &[(Vec<f32>, usize)],
        inspect: Inspect,
        p: &AwqParams,
    ) -> Result<Vec<f64>>;
    /// The kept tokens of `cap` with column `c` divided by `s[c]` (as they
    /// are unchanged without `s`), as far as the clipping search uses them.
    fn clip_tokens(&self, cap: &Self::Capture, s: Option<&[f32]>) -> Result<Self::ClipTokens>;
    /// [`search_clip`] of `w` (`[m, k]`) on `x`: `[m, groups]` maxima.
    fn search_clip(
        &self,
        x: &Self::ClipTokens,
        w: &[f32],
        m: usize,
        k: usize,
        p: &AwqParams,
    ) -> Result<Vec<f32>>;
}

/// Stride of the tokens a capture keeps: at most `keep` of `total`, evenly spread.
pub fn keep_stride(total: usize, keep: usize) -> usize {
    total.div_ceil(keep.max(1)).max(1)
}

/// A linear input captured on the host.
pub struct InputCapture {
    cols: usize,
    sum_abs: Vec<f64>,
    seen: usize,
    stride: usize,
    kept: Vec<f32>,
}

impl InputCapture {
    fn rows(&self) -> usize {
        self.kept.len() / self.cols.max(1)
    }
}

/// AWQ on the CPU: the reference functions of [`super::awq`].
pub struct CpuAwq;

impl AwqDevice for CpuAwq {
    type Backend = CpuBackend;
    type Capture = InputCapture;
    /// The kept tokens, divided by the scales, all of them.
    type ClipTokens = (Vec<f32>, usize);

    fn backend(&self) -> &CpuBackend {
        &CpuBackend
    }

    fn keep_bytes(&self) -> usize {
        KEEP_BYTES
    }

    fn capture(&self, cols: usize, _total: usize, stride: usize) -> Result<InputCapture> {
        Ok(InputCapture {
            cols,
            sum_abs: vec![0.0; cols],
            seen: 0,
            stride,
            kept: Vec::new(),
        })
    }

    fn add_batch(&self, cap: &mut InputCapture, x: &CpuTensor) -> Result<()> {
        if x.cols != cap.cols {
            bail!("AWQ capture of {} features given {}", cap.cols, x.cols);
        }
        add_abs(&mut cap.sum_abs, &x.data);
        for row in x.data.chunks(cap.cols) {
            if cap.seen.is_multiple_of(cap.stride) {
                cap.kept.extend_from_slice(row);
            }
            cap.seen += 1;
        }
        Ok(())
    }

    fn channel_mean(&self, cap: &InputCapture) -> Result<Vec<f32>> {
        if cap.seen == 0 {
            bail!("AWQ: a linear input was never observed");
        }
        Ok(means_of(&cap.sum_abs, cap.seen))
    }

    fn scale_errors(
        &self,
        cap: &InputCapture,
        x_mean: &[f32],
        ws: &[(Vec<f32>, usize)],
        inspect: Inspect,
        p: &AwqParams,
    ) -> Result<Vec<f64>> {
        scale_errors(&cap.kept, cap.rows(), x_mean, ws, inspect, p)
    }

    fn clip_tokens(&self, cap: &InputCapture, s: Option<&[f32]>) -> Result<(Vec<f32>, usize)> {
        let x = match s {
            Some(s) => divide_columns(&cap.kept, cap.cols, s),
            None => cap.kept.clone(),
        };
        Ok((x, cap.rows()))
    }

    fn search_clip(
        &self,
        x: &(Vec<f32>, usize),
        w: &[f32],
        m: usize,
        k: usize,
        p: &AwqParams,
    ) -> Result<Vec<f32>> {
        Ok(search_clip(&x.0, x.1, w, m, k, p))
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

/// AWQ's stages, timed separately (in the order of [`STAGE_NAMES`]).
#[derive(Clone, Copy, Debug)]
enum Stage {
    /// The calibration forward, weight uploads and whatever else falls
    /// outside the other stages.
    Forward,
    Capture,
    Scales,
    Clip,
    Pack,
}

const STAGE_NAMES: &[&str] = &[
    "calibration forward and uploads",
    "input capture",
    "scale search",
    "clipping search",
    "folding, quantization and packing",
];

/// Waits for `device`, then books the time since the last lap to `stage`.
fn lap<D: AwqDevice>(device: &D, clock: &mut StageClock, stage: Stage) -> Result<()> {
    device.backend().synchronize()?;
    clock.lap(stage as usize);
    Ok(())
}

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

/// Quantizes every decoder-block linear of `weights` with AWQ on the CPU
/// (see [`run_awq`]).
pub fn quantize_model_awq(
    weights: &mut LlamaWeights,
    cfg: &AwqConfig,
    samples: &[Vec<u32>],
) -> Result<()> {
    run_awq(&CpuAwq, weights, cfg, samples)
}

/// Quantizes every decoder-block linear of `weights` with AWQ on `device`,
/// on the calibration windows `samples`, block by block; each block's inputs
/// come from the already-quantized earlier blocks. Linears in `skip_modules`
/// are scaled with their group (an exact change) but stay dense. Logs each
/// block's stage times (`tracing` info) and prints the totals.
pub fn run_awq<D: AwqDevice>(
    device: &D,
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
    let mut clock = StageClock::new(STAGE_NAMES);
    let mut cal = Calibrator::on(device.backend(), weights, samples, device.keep_bytes())?;
    let total = cal.tokens();
    let stride = keep_stride(total, cfg.search_tokens);
    let layers = weights.layers.len();
    let mut progress = BlockProgress::new(layers, "awq");
    for l in 0..layers {
        cal.begin_block(&weights.layers[l])?;
        let prefix = format!("model.layers.{l}.");
        let layer = &mut weights.layers[l];
        let mut caps: Vec<D::Capture> = GROUPS
            .iter()
            .map(|g| device.capture(linear_mut(layer, g.linears[0]).shape().1, total, stride))
            .collect::<Result<_>>()?;
        let inputs = GROUPS.map(|g| g.input);
        lap(device, &mut clock, Stage::Forward)?;
        cal.observe(&inputs, &mut |which, x| {
            lap(device, &mut clock, Stage::Forward)?;
            let i = inputs
                .iter()
                .position(|&g| g == which)
                .expect("observed input");
            device.add_batch(&mut caps[i], x)?;
            lap(device, &mut clock, Stage::Capture)?;
            Ok(())
        })?;
        lap(device, &mut clock, Stage::Forward)?;
        // Scale search on the captured inputs of the unmodified block.
        let mut scales: Vec<Option<Vec<f32>>> = Vec::new();
        for (g, cap) in GROUPS.iter().zip(&caps) {
            if g.input == LinearInput::O && layer.v_proj.shape() != layer.o_proj.shape() {
                scales.push(None);
                continue;
            }
            let ws: Vec<(Vec<f32>, usize)> = g
                .linears
                .iter()
                .map(|n| {
                    let (w, m, _) = dense_f32(layer, n);
                    (w, m)
                })
                .collect();
            let p = AwqParams::of(cfg, linear_mut(layer, g.linears[0]).shape().1);
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
            let search = || -> Result<Vec<f32>> {
                let x_mean = device.channel_mean(cap)?;
                let errors = device.scale_errors(cap, &x_mean, &ws, inspect, &p)?;
                let alpha = best_alpha(&errors, &p)?;
                tracing::debug!("awq: {prefix}{:?} alpha {alpha}", g.input);
                Ok(scales_for(&x_mean, alpha))
            };
            scales.push(Some(search().with_context(|| {
                format!("AWQ scale search of {prefix}{}", g.linears[0])
            })?));
        }
        lap(device, &mut clock, Stage::Scales)?;
        // Fold: W·diag(s) for the group, 1/s into the preceding op.
        for (g, s) in GROUPS.iter().zip(&scales) {
            let Some(s) = s else { continue };
            for n in g.linears {
                let (w, m, k) = dense_f32(layer, n);
                set_dense(layer, n, scale_columns(&w, k, s), m, k)?;
            }
            fold_inverse(layer, g.input, s)?;
        }
        lap(device, &mut clock, Stage::Pack)?;
        // Clip (not q/k) on the scaled inputs, then quantize.
        for ((g, cap), s) in GROUPS.iter().zip(&caps).zip(&scales) {
            let mut tokens = None;
            for n in g.linears {
                let name = format!("{prefix}{n}");
                if is_skipped(&name, &cfg.skip_modules) {
                    continue;
                }
                let (mut w, m, k) = dense_f32(layer, n);
                let p = AwqParams::of(cfg, k);
                if cfg.clip && !n.ends_with("q_proj") && !n.ends_with("k_proj") {
                    let x = match &mut tokens {
                        Some(x) => x,
                        None => tokens.insert(device.clip_tokens(cap, s.as_deref())?),
                    };
                    let maxes = device
                        .search_clip(x, &w, m, k, &p)
                        .with_context(|| format!("AWQ clipping search of {name}"))?;
                    lap(device, &mut clock, Stage::Clip)?;
                    apply_clip(&mut w, k, p.group_size, &maxes);
                }
                let q = quantize_groups(&w, m, k, p.format(), "awq")
                    .with_context(|| format!("AWQ of {name}"))?;
                *linear_mut(layer, n) = LinearWeight::Quantized(Arc::new(q));
                lap(device, &mut clock, Stage::Pack)?;
            }
        }
        drop(caps);
        // Scales were folded into norms and linears: take the whole block again.
        cal.begin_block(&weights.layers[l])?;
        cal.advance()?;
        lap(device, &mut clock, Stage::Forward)?;
        tracing::info!("awq: block {}/{layers}: {}", l + 1, clock.end_block());
        progress.block_done();
    }
    progress.finish(total);
    eprintln!("awq on {}: {}", device.backend().describe(), clock.totals());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU capture keeps every `stride`-th token across batches and
    /// averages `|x|` over all of them.
    #[test]
    fn capture_strides_across_batches() {
        let dev = CpuAwq;
        let mut cap = dev.capture(2, 5, keep_stride(5, 3)).unwrap();
        assert_eq!(cap.stride, 2);
        let batch = |rows: Vec<f32>| CpuTensor {
            rows: rows.len() / 2,
            cols: 2,
            data: rows,
        };
        dev.add_batch(&mut cap, &batch(vec![1.0, -2.0, 3.0, 4.0, -5.0, 6.0]))
            .unwrap();
        dev.add_batch(&mut cap, &batch(vec![7.0, 8.0, 9.0, -10.0]))
            .unwrap();
        assert_eq!(cap.kept, vec![1.0, -2.0, -5.0, 6.0, 9.0, -10.0]);
        assert_eq!(dev.channel_mean(&cap).unwrap(), vec![5.0, 6.0]);
        let (x, rows) = dev.clip_tokens(&cap, Some(&[2.0, 0.5])).unwrap();
        assert_eq!((x, rows), (vec![0.5, -4.0, -2.5, 12.0, 4.5, -20.0], 3));
        assert!(
            dev.add_batch(
                &mut cap,
                &CpuTensor {
                    rows: 1,
                    cols: 3,
                    data: vec![0.0; 3],
                }
            )
            .is_err()
        );
    }
}
