//! Hardware benchmarks of a loaded model: storage, peak memory, prefill
//! latency, per-token decode latency and batched decode throughput. Every
//! timing synchronizes the device before reading the clock, after warm-up
//! runs, over repeated measurements.

pub mod memory;
pub mod stats;
pub mod timeline;

use std::time::Instant;

use anyhow::{Result, bail};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, StepLayout};
use crate::model::Model;
pub use stats::Summary;

/// What to measure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BenchConfig {
    /// Prompt lengths for prefill latency.
    pub prompt_lens: Vec<usize>,
    /// Prompt length before the timed decode steps.
    pub decode_prompt_len: usize,
    /// Timed decode steps (after `warmup` untimed ones).
    pub decode_tokens: usize,
    /// Untimed runs before measuring.
    pub warmup: usize,
    /// Timed prefill repetitions.
    pub repeats: usize,
    /// Batch sizes for decode throughput.
    pub batch_sizes: Vec<usize>,
    /// Prompt length of each sequence in the throughput runs.
    pub throughput_prompt_len: usize,
    /// Timed decode steps per throughput run.
    pub throughput_tokens: usize,
    /// Seed of the random prompt tokens.
    pub seed: u64,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            prompt_lens: vec![512],
            decode_prompt_len: 512,
            decode_tokens: 64,
            warmup: 3,
            repeats: 5,
            batch_sizes: vec![1, 4, 16, 64],
            throughput_prompt_len: 128,
            throughput_tokens: 32,
            seed: 0,
        }
    }
}

/// Prefill latency at one prompt length.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrefillResult {
    pub prompt_len: usize,
    /// Milliseconds per prefill.
    pub ms: Summary,
}

/// Decode throughput at one batch size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThroughputResult {
    pub batch_size: usize,
    /// Generated tokens per second over all sequences.
    pub tokens_per_s: f64,
    /// Milliseconds per decode step (all sequences advance one token).
    pub ms_per_step: Summary,
}

/// Everything `run` measures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    pub device: String,
    pub prefill: Vec<PrefillResult>,
    /// Milliseconds per decoded token at batch 1.
    pub decode_ms_per_token: Summary,
    pub decode_tokens_per_s: f64,
    pub throughput: Vec<ThroughputResult>,
    /// Peak device memory (GPU) or peak resident memory of the process (CPU).
    pub peak_memory_bytes: Option<u64>,
    /// `device` or `process_rss`.
    pub peak_memory_kind: String,
    /// Why the throughput measurements stopped early (e.g. out of memory at
    /// a batch size); the results before it stand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn random_prompt(rng: &mut StdRng, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect()
}

fn timed<B: Backend>(backend: &B, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    backend.synchronize()?;
    let start = Instant::now();
    f()?;
    backend.synchronize()?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

/// Decodes `steps` tokens for every sequence of `prompts` (already prefilled
/// into `cache` slots 0..) feeding back argmax tokens; returns ms per step.
fn decode_steps<B: Backend>(
    model: &Model<B>,
    cache: &mut B::Cache,
    prompt_len: usize,
    first: Vec<u32>,
    steps: usize,
) -> Result<Vec<f64>> {
    let mut next = first;
    let mut times = Vec::with_capacity(steps);
    for step in 0..steps {
        let pos = prompt_len + step;
        let layout = StepLayout::new(
            next.iter()
                .enumerate()
                .map(|(slot, t)| (slot, pos, std::slice::from_ref(t))),
        )?;
        let mut out = vec![];
        times.push(timed(model.backend(), || {
            out = model.greedy(&layout, cache)?;
            Ok(())
        })?);
        next = out;
    }
    Ok(times)
}

/// Prefills `prompts` into a fresh cache with room for `extra` more tokens;
/// returns the cache and each sequence's first generated token.
fn prefill<B: Backend>(
    model: &Model<B>,
    prompts: &[Vec<u32>],
    extra: usize,
) -> Result<(B::Cache, Vec<u32>)> {
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut cache = model.new_cache(prompts.len(), len + extra)?;
    let layout = StepLayout::new(
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| (i, 0, p.as_slice())),
    )?;
    let first = model.greedy(&layout, &mut cache)?;
    Ok((cache, first))
}

/// Runs all measurements on `model`. Peak memory is the backend's device peak,
/// or the process's peak resident memory on the CPU during the measurements
/// (the peak is reset first where Linux allows).
pub fn run<B: Backend>(model: &Model<B>, cfg: &BenchConfig) -> Result<BenchResult> {
    if cfg.repeats == 0 || cfg.decode_tokens == 0 {
        bail!("bench needs repeats ≥ 1 and decode_tokens ≥ 1");
    }
    if model.backend().peak_memory_bytes().is_none() {
        memory::reset_peak_rss();
    }
    let vocab = model.config.vocab_size;
    let max_pos = model.config.max_position_embeddings;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut prefill_results = vec![];
    for &len in &cfg.prompt_lens {
        if len == 0 || len > max_pos {
            bail!("prompt length {len} must be in 1..={max_pos}");
        }
        let prompt = random_prompt(&mut rng, len, vocab);
        let mut times = vec![];
        for run in 0..cfg.warmup + cfg.repeats {
            let mut cache = model.new_cache(1, len)?;
            let layout = StepLayout::new([(0, 0, prompt.as_slice())])?;
            let ms = timed(model.backend(), || {
                model.greedy(&layout, &mut cache)?;
                Ok(())
            })?;
            if run >= cfg.warmup {
                times.push(ms);
            }
        }
        prefill_results.push(PrefillResult {
            prompt_len: len,
            ms: Summary::of(&times),
        });
    }
    let prompt = random_prompt(&mut rng, cfg.decode_prompt_len, vocab);
    let steps = cfg.warmup + cfg.decode_tokens;
    let (mut cache, first) = prefill(model, &[prompt], steps)?;
    let times = decode_steps(model, &mut cache, cfg.decode_prompt_len, first, steps)?;
    drop(cache);
    let decode = Summary::of(&times[cfg.warmup..]);
    let mut throughput = vec![];
    let mut error = None;
    for &b in &cfg.batch_sizes {
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|_| random_prompt(&mut rng, cfg.throughput_prompt_len, vocab))
            .collect();
        let steps = cfg.warmup + cfg.throughput_tokens;
        let measured = prefill(model, &prompts, steps).and_then(|(mut cache, first)| {
            decode_steps(model, &mut cache, cfg.throughput_prompt_len, first, steps)
        });
        let times = match measured {
            Ok(t) => t,
            Err(e) => {
                error = Some(format!("throughput at batch size {b} failed: {e:#}"));
                break;
            }
        };
        let timed = &times[cfg.warmup..];
        let total_s = timed.iter().sum::<f64>() / 1e3;
        throughput.push(ThroughputResult {
            batch_size: b,
            tokens_per_s: (b * timed.len()) as f64 / total_s,
            ms_per_step: Summary::of(timed),
        });
    }
    let (peak, kind) = match model.backend().peak_memory_bytes() {
        Some(p) => (Some(p), "device"),
        None => (memory::peak_rss_bytes(), "process_rss"),
    };
    Ok(BenchResult {
        device: model.backend().describe(),
        prefill: prefill_results,
        decode_tokens_per_s: 1e3 / decode.mean,
        decode_ms_per_token: decode,
        throughput,
        peak_memory_bytes: peak,
        peak_memory_kind: kind.to_string(),
        error,
    })
}
