//! Calibration for GPTQ and AWQ: calibration text → token windows, and the
//! layer-by-layer capture of each decoder block's inputs.
//!
//! Text comes from a file (plain text, or JSONL whose lines carry a `"text"`
//! field) or from the built-in English prose in `data/calib.txt`. The text is
//! tokenized once and `samples` windows of `seq_len` tokens are drawn at
//! seeded random offsets (GPTQ's sampling of C4/WikiText-2).
//!
//! [`Calibrator`] holds the hidden states of every window at one block
//! boundary. Quantizing block `l` observes the inputs of its linear layers
//! (running the block as it currently is: earlier sub-layers may already be
//! quantized), and [`Calibrator::advance`] then runs the block, with its
//! quantized weights, to produce the inputs of block `l + 1`. Windows are run
//! in batches of at most [`BATCH_TOKENS`] tokens through a backend (the CPU
//! unless a GPU path hands its own).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::LinearWeight;
use super::spec::CalibConfig;
use super::staged::{BlockContext, StagedRun, step_of};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, StepLayout};
use crate::io::tokenizer::Tokenizer;
use crate::model::LlamaWeights;
use crate::model::forward::DeviceLayer;
use crate::model::forward::LinearInput;
use crate::model::weights::LayerWeights;

/// The built-in calibration text (original English prose), used when no file is given.
pub const BUILTIN_CALIB_TEXT: &str = include_str!("../../data/calib.txt");

/// Most tokens run through a block in one batch.
pub const BATCH_TOKENS: usize = 8192;

/// Reads calibration text: `None` gives [`BUILTIN_CALIB_TEXT`]; a file is
/// JSONL when its name ends in `.jsonl` or its first non-blank character is
/// `{` (the `"text"` fields of its lines are joined by blank lines), plain
/// text otherwise.
pub fn load_calib_text(path: Option<&Path>) -> Result<String> {
    let Some(path) = path else {
        return Ok(BUILTIN_CALIB_TEXT.to_string());
    };
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read calibration file", path.display()))?;
    if raw.trim().is_empty() {
        bail!("{}: calibration file is empty", path.display());
    }
    let jsonl = path.extension().is_some_and(|e| e == "jsonl") || raw.trim_start().starts_with('{');
    if !jsonl {
        return Ok(raw);
    }
    let mut texts = Vec::new();
    for (i, line) in raw.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON object (JSONL)", path.display(), i + 1))?;
        let text = v.get("text").and_then(|t| t.as_str()).with_context(|| {
            format!(
                "{}:{}: JSONL line has no \"text\" string",
                path.display(),
                i + 1
            )
        })?;
        texts.push(text.to_string());
    }
    let joined = texts.join("\n\n");
    if joined.trim().is_empty() {
        bail!("{}: calibration file holds no text", path.display());
    }
    Ok(joined)
}

/// Draws `cfg.samples` windows of `cfg.seq_len` tokens from the tokenized
/// calibration text at random offsets seeded by `cfg.seed`.
pub fn calibration_samples(tokenizer: &Tokenizer, cfg: &CalibConfig) -> Result<Vec<Vec<u32>>> {
    if cfg.samples == 0 || cfg.seq_len == 0 {
        bail!("calibration needs at least one sample of at least one token");
    }
    let text = load_calib_text(cfg.path.as_deref())?;
    let tokens = tokenizer.encode(&text, false)?;
    let origin = cfg
        .path
        .as_ref()
        .map_or("built-in calibration text".to_string(), |p| {
            p.display().to_string()
        });
    if tokens.len() < cfg.seq_len {
        bail!(
            "{origin}: {} tokens, fewer than one sample of seq_len {}; give a longer calibration text or a smaller seq_len",
            tokens.len(),
            cfg.seq_len
        );
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    Ok((0..cfg.samples)
        .map(|_| {
            let start = rng.random_range(0..=tokens.len() - cfg.seq_len);
            tokens[start..start + cfg.seq_len].to_vec()
        })
        .collect())
}

/// The linear layer of `layer` called `name` (one of `LINEAR_NAMES`).
pub fn linear_mut<'a>(layer: &'a mut LayerWeights, name: &str) -> &'a mut LinearWeight {
    layer
        .linears_mut()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, w)| w)
        .unwrap_or_else(|| panic!("no linear layer named {name}"))
}

/// Progress of a calibrated quantization over decoder blocks: a bar on a
/// terminal, and one line per finished block with its wall time on stderr
/// (above the bar), then the total.
pub struct BlockProgress {
    method: &'static str,
    blocks: usize,
    done: usize,
    bar: ProgressBar,
    started: Instant,
    block_started: Instant,
}

impl BlockProgress {
    /// Starts timing `blocks` blocks of `method` (e.g. "gptq").
    pub fn new(blocks: usize, method: &'static str) -> Self {
        let bar = ProgressBar::new(blocks as u64);
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix} block {pos}/{len} [{elapsed_precise}] {wide_bar}",
        ) {
            bar.set_style(style);
        }
        bar.set_prefix(method);
        BlockProgress {
            method,
            blocks,
            done: 0,
            bar,
            started: Instant::now(),
            block_started: Instant::now(),
        }
    }

    fn line(&self, text: String) {
        if self.bar.is_hidden() {
            eprintln!("{text}");
        } else {
            self.bar.println(text);
        }
    }

    /// Reports the block just finished.
    pub fn block_done(&mut self) {
        self.done += 1;
        self.line(format!(
            "{}: block {}/{} quantized in {:.1} s",
            self.method,
            self.done,
            self.blocks,
            self.block_started.elapsed().as_secs_f64()
        ));
        self.bar.inc(1);
        self.block_started = Instant::now();
    }

    /// Reports the total wall time over `tokens` calibration tokens.
    pub fn finish(&self, tokens: usize) {
        self.bar.finish_and_clear();
        self.line(format!(
            "{}: {} blocks on {tokens} calibration tokens in {:.1} s",
            self.method,
            self.blocks,
            self.started.elapsed().as_secs_f64()
        ));
    }
}

/// Most bytes of intermediate block values [`Calibrator`] keeps on the CPU
/// between observations; beyond this they are recomputed for every observation.
pub const KEEP_BYTES: usize = 2 << 30;

/// Hidden states of the calibration windows, advanced block by block.
pub struct Calibrator<'a, B: Backend> {
    ctx: BlockContext<'a, B>,
    runs: Vec<StagedRun<B>>,
    block: Option<DeviceLayer<B>>,
    keep: bool,
    tokens: usize,
}

impl Calibrator<'static, CpuBackend> {
    /// Embeds `samples` on the CPU backend, keeping intermediate values up
    /// to [`KEEP_BYTES`] (see [`Calibrator::on`]).
    pub fn new(weights: &LlamaWeights, samples: &[Vec<u32>]) -> Result<Self> {
        Calibrator::on(&CpuBackend, weights, samples, KEEP_BYTES)
    }
}

impl<'a, B: Backend> Calibrator<'a, B> {
    /// Embeds `samples` with `weights`' embedding table on `backend`, in
    /// batches of at most [`BATCH_TOKENS`] tokens. A block's intermediate
    /// values are kept between observations when all batches' values take at
    /// most `keep_bytes`, else recomputed for each observation.
    pub fn on(
        backend: &'a B,
        weights: &LlamaWeights,
        samples: &[Vec<u32>],
        keep_bytes: usize,
    ) -> Result<Self> {
        if samples.is_empty() || samples.iter().any(|s| s.is_empty()) {
            bail!("calibration needs at least one non-empty sample");
        }
        let c = &weights.config;
        let ctx = BlockContext::new(backend, c)?;
        let table = backend.upload_weight(&LinearWeight::Dense(weights.embed_tokens.clone()))?;
        let mut runs = Vec::new();
        let mut start = 0;
        while start < samples.len() {
            let mut end = start + 1;
            let mut count = samples[start].len();
            while end < samples.len() && count + samples[end].len() <= BATCH_TOKENS {
                count += samples[end].len();
                end += 1;
            }
            let layout = StepLayout::new(
                samples[start..end]
                    .iter()
                    .enumerate()
                    .map(|(slot, s)| (slot, 0, s.as_slice())),
            )?;
            let device_layout = backend.upload_layout(&layout)?;
            let hidden = backend.embedding(&table, &device_layout)?;
            runs.push(StagedRun::new(&layout, device_layout, hidden, &ctx));
            start = end;
        }
        let tokens: usize = samples.iter().map(Vec::len).sum();
        let per_token = (5 * c.hidden_size + c.intermediate_size) * std::mem::size_of::<f32>();
        Ok(Calibrator {
            ctx,
            runs,
            block: None,
            keep: tokens * per_token <= keep_bytes,
            tokens,
        })
    }

    /// Total calibration tokens.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Makes `layer` the block that observations and [`Calibrator::advance`] run.
    pub fn begin_block(&mut self, layer: &LayerWeights) -> Result<()> {
        self.block = Some(DeviceLayer::upload(self.ctx.backend(), layer)?);
        self.runs.iter_mut().for_each(|r| r.invalidate_after(None));
        Ok(())
    }

    /// Takes the linears named in `changed` (e.g. q/k/v after quantizing
    /// them) from `layer` into the current block; the values that depend on
    /// them are recomputed at the next observation. Norms and the other
    /// linears are kept: after any other change, begin the block again.
    pub fn update_block(&mut self, layer: &LayerWeights, changed: &[&str]) -> Result<()> {
        let block = self.block.as_mut().context("calibration: no block begun")?;
        let mut first: Option<LinearInput> = None;
        for &name in changed {
            block.replace(self.ctx.backend(), layer, name)?;
            let input =
                LinearInput::of(name).with_context(|| format!("{name} is not a block linear"))?;
            if first.is_none_or(|f| step_of(input) < step_of(f)) {
                first = Some(input);
            }
        }
        // Values up to and including the earliest changed linear's input stay.
        if let Some(first) = first {
            self.runs
                .iter_mut()
                .for_each(|r| r.invalidate_after(Some(first)));
        }
        Ok(())
    }

    /// Hands the inputs named in `which`, as the current block computes them
    /// from its current weights, to `f`, batch by batch.
    pub fn observe(
        &mut self,
        which: &[LinearInput],
        f: &mut dyn FnMut(LinearInput, &B::Tensor) -> Result<()>,
    ) -> Result<()> {
        let w = self.block.as_ref().context("calibration: no block begun")?;
        for run in &mut self.runs {
            for &input in which {
                f(input, run.value(input, w, &self.ctx)?)?;
            }
            if !self.keep {
                run.invalidate_after(None);
            }
        }
        Ok(())
    }

    /// Runs the current block on every batch, so the hidden states become the
    /// inputs of the next block.
    pub fn advance(&mut self) -> Result<()> {
        let w = self.block.as_ref().context("calibration: no block begun")?;
        for run in &mut self.runs {
            run.advance(w, &self.ctx)?;
        }
        self.block = None;
        Ok(())
    }

    /// The hidden states of every batch (`[tokens, hidden]` each).
    pub fn hidden_states(&self) -> impl Iterator<Item = &B::Tensor> {
        self.runs.iter().map(|r| r.input())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::io::synth_tokenizer;
    use crate::model::Model;
    use crate::model::synth::{synth_config, synth_weights};

    fn tok() -> Tokenizer {
        let (c, _) = synth_config("tiny").unwrap();
        synth_tokenizer(&c).unwrap()
    }

    #[test]
    fn samples_are_seeded_windows_of_the_text() {
        let t = tok();
        let cfg = CalibConfig {
            path: None,
            samples: 4,
            seq_len: 64,
            seed: 7,
        };
        let a = calibration_samples(&t, &cfg).unwrap();
        let b = calibration_samples(&t, &cfg).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 4);
        assert!(a.iter().all(|s| s.len() == 64));
        let all = t.encode(BUILTIN_CALIB_TEXT, false).unwrap();
        for s in &a {
            assert!(all.windows(64).any(|w| w == s.as_slice()));
        }
        let c = calibration_samples(&t, &CalibConfig { seed: 8, ..cfg }).unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn reads_jsonl_and_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("c.jsonl");
        std::fs::write(&jsonl, "{\"text\": \"one two\"}\n\n{\"text\": \"three\"}\n").unwrap();
        assert_eq!(load_calib_text(Some(&jsonl)).unwrap(), "one two\n\nthree");
        let empty = dir.path().join("e.txt");
        std::fs::write(&empty, " \n").unwrap();
        let err = format!("{:#}", load_calib_text(Some(&empty)).unwrap_err());
        assert!(err.contains("calibration file is empty"), "{err}");
        let bad = dir.path().join("b.jsonl");
        std::fs::write(&bad, "{\"txt\": \"x\"}\n").unwrap();
        let err = format!("{:#}", load_calib_text(Some(&bad)).unwrap_err());
        assert!(
            err.contains("b.jsonl:1: JSONL line has no \"text\""),
            "{err}"
        );
        let short = dir.path().join("s.txt");
        std::fs::write(&short, "too short").unwrap();
        let cfg = CalibConfig {
            path: Some(short),
            samples: 1,
            seq_len: 100,
            seed: 0,
        };
        let err = format!("{:#}", calibration_samples(&tok(), &cfg).unwrap_err());
        assert!(
            err.contains("fewer than one sample of seq_len 100"),
            "{err}"
        );
    }

    #[test]
    fn observing_and_advancing_match_the_full_forward() {
        let (c, d) = synth_config("tiny").unwrap();
        let w = synth_weights(&c, d, 1).unwrap();
        let samples = vec![vec![1u32, 5, 9, 200, 3], vec![7u32, 8, 9]];
        let mut cal = Calibrator::new(&w, &samples).unwrap();
        let mut seen = Vec::new();
        cal.begin_block(&w.layers[0]).unwrap();
        cal.observe(&[LinearInput::O, LinearInput::Down], &mut |i, t| {
            seen.push((i, t.rows, t.cols));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (LinearInput::O, 8, c.q_dim()),
                (LinearInput::Down, 8, c.intermediate_size)
            ]
        );
        for layer in &w.layers {
            cal.begin_block(layer).unwrap();
            cal.advance().unwrap();
        }
        // Final hidden states through the head give the model's logits.
        let model = Model::new(CpuBackend::new(), &w).unwrap();
        let h = cal.hidden_states().next().unwrap();
        let logits = model.head(h).unwrap();
        let want = model.sequence_logits(&samples[1]).unwrap();
        let got = &logits.data[5 * c.vocab_size..];
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
    }

    /// The inputs `which` of block 0 as `Model::block_observed` computes them.
    fn reference_inputs(w: &LlamaWeights, samples: &[Vec<u32>]) -> Vec<Vec<f32>> {
        let model = Model::new(CpuBackend::new(), w).unwrap();
        let mut out = Vec::new();
        for s in samples {
            let layout = StepLayout::new([(0, 0, s.as_slice())]).unwrap();
            let mut x = model.embed(&layout).unwrap();
            let mut cache = model.new_cache(1, s.len()).unwrap();
            model
                .block_observed(0, &mut x, &mut cache, &layout, &mut |i, t| {
                    if matches!(i, LinearInput::O | LinearInput::Down) {
                        out.push(t.data.clone());
                    }
                    Ok(())
                })
                .unwrap();
        }
        out
    }

    #[test]
    fn kept_values_follow_updated_weights() {
        let (c, d) = synth_config("tiny").unwrap();
        let mut w = synth_weights(&c, d, 3).unwrap();
        let samples = vec![vec![4u32, 8, 15, 16, 23, 42]];
        let mut cal = Calibrator::new(&w, &samples).unwrap();
        assert!(cal.keep);
        cal.begin_block(&w.layers[0]).unwrap();
        let mut before = Vec::new();
        cal.observe(&[LinearInput::Down], &mut |_, t| {
            before.push(t.data.clone());
            Ok(())
        })
        .unwrap();
        // Quantize q/k/v: the attention output and everything after it change.
        for name in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] {
            let lw = linear_mut(&mut w.layers[0], name);
            let (o, i) = lw.shape();
            let q = crate::quant::rtn::rtn_quantize(&lw.dequantize(), o, i, 2, 16, false).unwrap();
            *lw = LinearWeight::Quantized(std::sync::Arc::new(q));
        }
        cal.update_block(
            &w.layers[0],
            &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        )
        .unwrap();
        let mut after = Vec::new();
        cal.observe(&[LinearInput::O, LinearInput::Down], &mut |_, t| {
            after.push(t.data.clone());
            Ok(())
        })
        .unwrap();
        assert_ne!(before[0], after[1]);
        let want = reference_inputs(&w, &samples);
        for (got, want) in after.iter().zip(&want) {
            for (a, b) in got.iter().zip(want) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }
}
