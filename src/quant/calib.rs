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
//! in batches of at most [`BATCH_TOKENS`] tokens through the CPU backend.

use std::path::Path;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::LinearWeight;
use super::spec::CalibConfig;
use crate::backend::cpu::{CpuBackend, CpuKvCache, CpuTensor};
use crate::backend::{CacheShape, StepLayout};
use crate::io::tokenizer::Tokenizer;
use crate::model::LlamaWeights;
use crate::model::forward::{LinearInput, Model};
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

/// A progress bar over `blocks` decoder blocks (hidden when stderr is not a terminal).
pub fn progress_bar(blocks: usize, method: &str) -> ProgressBar {
    let bar = ProgressBar::new(blocks as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} block {pos}/{len} [{elapsed_precise}] {wide_bar}")
    {
        bar.set_style(style);
    }
    bar.set_prefix(method.to_string());
    bar
}

/// A batch of calibration windows and their hidden states at the current block.
struct Batch {
    layout: StepLayout,
    hidden: CpuTensor,
    cache: CacheShape,
}

/// A KV cache in which only layer `l` holds memory (a block reads and writes
/// only its own layer, so calibration never keeps all layers' caches).
fn layer_cache(shape: CacheShape, l: usize) -> CpuKvCache {
    let per_layer = shape.slots * shape.max_len * shape.kv_heads * shape.head_dim;
    let buf = |i: usize| {
        if i == l {
            vec![0f32; per_layer]
        } else {
            Vec::new()
        }
    };
    CpuKvCache {
        shape,
        k: (0..shape.layers).map(buf).collect(),
        v: (0..shape.layers).map(buf).collect(),
    }
}

/// Marker error: the observer has what it needs, the rest of the block is skipped.
#[derive(Debug)]
struct StopBlock;

impl std::fmt::Display for StopBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("capture finished")
    }
}

impl std::error::Error for StopBlock {}

fn order(i: LinearInput) -> u8 {
    match i {
        LinearInput::Qkv => 0,
        LinearInput::O => 1,
        LinearInput::GateUp => 2,
        LinearInput::Down => 3,
    }
}

/// Hidden states of the calibration windows, advanced block by block.
pub struct Calibrator {
    model: Model<CpuBackend>,
    batches: Vec<Batch>,
    tokens: usize,
}

impl Calibrator {
    /// Embeds `samples` with `weights`' embedding table (on the CPU backend).
    pub fn new(weights: &LlamaWeights, samples: &[Vec<u32>]) -> Result<Self> {
        if samples.is_empty() || samples.iter().any(|s| s.is_empty()) {
            bail!("calibration needs at least one non-empty sample");
        }
        let model = Model::new(CpuBackend::new(), weights)?;
        let mut batches = Vec::new();
        let mut start = 0;
        while start < samples.len() {
            let mut end = start + 1;
            let mut count = samples[start].len();
            while end < samples.len() && count + samples[end].len() <= BATCH_TOKENS {
                count += samples[end].len();
                end += 1;
            }
            let group = &samples[start..end];
            let layout = StepLayout::new(
                group
                    .iter()
                    .enumerate()
                    .map(|(slot, s)| (slot, 0, s.as_slice())),
            )?;
            let max_len = group.iter().map(Vec::len).max().unwrap_or(1);
            let c = &weights.config;
            let cache = CacheShape {
                layers: c.num_hidden_layers,
                slots: group.len(),
                max_len,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
            };
            let hidden = model.embed(&layout)?;
            batches.push(Batch {
                layout,
                hidden,
                cache,
            });
            start = end;
        }
        Ok(Calibrator {
            model,
            batches,
            tokens: samples.iter().map(Vec::len).sum(),
        })
    }

    /// Total calibration tokens.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Runs block `l` as it currently is on every batch and hands the inputs
    /// named in `which` to `f`, batch by batch. The block is cut short after
    /// the last input needed; the hidden states are not changed.
    pub fn observe(
        &mut self,
        l: usize,
        which: &[LinearInput],
        f: &mut dyn FnMut(LinearInput, &CpuTensor) -> Result<()>,
    ) -> Result<()> {
        let Some(last) = which.iter().map(|&w| order(w)).max() else {
            return Ok(());
        };
        for b in &self.batches {
            let mut x = b.hidden.clone();
            let mut cache = layer_cache(b.cache, l);
            let result =
                self.model
                    .block_observed(l, &mut x, &mut cache, &b.layout, &mut |input, t| {
                        if which.contains(&input) {
                            f(input, t)?;
                        }
                        if order(input) == last {
                            return Err(StopBlock.into());
                        }
                        Ok(())
                    });
            match result {
                Ok(()) => {}
                Err(e) if e.is::<StopBlock>() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Replaces block `l`'s weights in the calibration model.
    pub fn set_layer(&mut self, l: usize, weights: &LayerWeights) -> Result<()> {
        self.model.set_layer(l, weights)
    }

    /// Runs block `l` (with its current weights) on every batch, so the hidden
    /// states become the inputs of block `l + 1`.
    pub fn advance(&mut self, l: usize) -> Result<()> {
        for b in &mut self.batches {
            let mut cache = layer_cache(b.cache, l);
            self.model.block(l, &mut b.hidden, &mut cache, &b.layout)?;
        }
        Ok(())
    }

    /// The hidden states of every batch (`[tokens, hidden]` each).
    pub fn hidden_states(&self) -> impl Iterator<Item = &CpuTensor> {
        self.batches.iter().map(|b| &b.hidden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::synth_tokenizer;
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
        cal.observe(0, &[LinearInput::O], &mut |i, t| {
            seen.push((i, t.rows, t.cols));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(LinearInput::O, 8, c.q_dim())]);
        for l in 0..c.num_hidden_layers {
            cal.advance(l).unwrap();
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
}
