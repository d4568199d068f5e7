//! `quantbench bench`: storage, memory, prefill, decode and throughput of one model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;

use super::common::{load_quantized, parse_quant};
use crate::backend::Device;
use crate::bench::{BenchConfig, BenchResult, run};
use crate::model::Model;
use crate::quant::QuantSpec;
use crate::quant::storage::{total_usage, usage_by_format};
use crate::with_backend;

/// Arguments of `quantbench bench`.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model: smollm2-135m, synth:<name>, a local directory, a .gguf file or a hub id.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Quantization, e.g. `nf4`, `none,dtype=f16`, `gptq,bits=4,group_size=128`.
    #[arg(long, value_parser = parse_quant)]
    pub quant: Option<QuantSpec>,
    /// Prompt lengths for prefill latency (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "512")]
    pub prompt_lens: Vec<usize>,
    /// Prompt length before the decode measurement.
    #[arg(long, default_value_t = 512)]
    pub decode_prompt_len: usize,
    /// Timed decode tokens at batch 1.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Batch sizes for throughput (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub batch_sizes: Vec<usize>,
    /// Prompt length per sequence in throughput runs.
    #[arg(long, default_value_t = 128)]
    pub throughput_prompt_len: usize,
    /// Timed decode steps per throughput run.
    #[arg(long, default_value_t = 32)]
    pub throughput_tokens: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed prefill repetitions.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Also write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl Args {
    fn config(&self) -> BenchConfig {
        BenchConfig {
            prompt_lens: self.prompt_lens.clone(),
            decode_prompt_len: self.decode_prompt_len,
            decode_tokens: self.decode_tokens,
            warmup: self.warmup,
            repeats: self.repeats,
            batch_sizes: self.batch_sizes.clone(),
            throughput_prompt_len: self.throughput_prompt_len,
            throughput_tokens: self.throughput_tokens,
            seed: 0,
        }
    }
}

/// Prints a human-readable summary of a benchmark.
pub fn print_result(r: &BenchResult) {
    for p in &r.prefill {
        println!(
            "prefill {:>5} tokens: {:>9.3} ms (std {:.3}, p50 {:.3}, p95 {:.3})",
            p.prompt_len, p.ms.mean, p.ms.std, p.ms.p50, p.ms.p95
        );
    }
    let d = &r.decode_ms_per_token;
    println!(
        "decode batch 1: {:>9.3} ms/token (std {:.3}, p50 {:.3}, p95 {:.3}) = {:.1} tokens/s",
        d.mean, d.std, d.p50, d.p95, r.decode_tokens_per_s
    );
    for t in &r.throughput {
        println!(
            "throughput batch {:>3}: {:>10.1} tokens/s ({:.3} ms/step)",
            t.batch_size, t.tokens_per_s, t.ms_per_step.mean
        );
    }
    if let Some(p) = r.peak_memory_bytes {
        println!(
            "peak memory ({}): {:.1} MiB",
            r.peak_memory_kind,
            p as f64 / 1048576.0
        );
    }
}

/// Loads, quantizes, measures and prints.
pub fn run_cmd(args: Args) -> Result<()> {
    let loaded = load_quantized(&args.model, args.quant.as_ref(), args.device)?;
    let total = total_usage(&usage_by_format(&loaded.weights));
    let (bytes, params) = (total.bytes, total.parameters);
    println!(
        "model {} on {}: {} parameters, {:.1} MiB of weights, {:.3} bits/parameter",
        loaded.source,
        args.device,
        params,
        bytes as f64 / 1048576.0,
        8.0 * bytes as f64 / params as f64
    );
    let cfg = args.config();
    let result = with_backend!(args.device, |backend| {
        let model = Model::new(backend, &loaded.weights)?;
        drop(loaded);
        run(&model, &cfg)?
    });
    print_result(&result);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("{}: cannot write benchmark result", path.display()))?;
    }
    if let Some(e) = &result.error {
        anyhow::bail!("{e} (the results above were measured before it)");
    }
    Ok(())
}
