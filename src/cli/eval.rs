//! `quantbench eval`: one accuracy task on one (optionally quantized) model.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args as ClapArgs, ValueEnum};

use super::common::{load_quantized, parse_quant};
use crate::backend::Device;
use crate::eval::coqa::{self, CoqaOptions};
use crate::eval::coqa_source::CoqaSource;
use crate::eval::encode::BosPolicy;
use crate::eval::perplexity::{PerplexityOptions, perplexity_of_file};
use crate::eval::sanity;
use crate::model::Model;
use crate::quant::QuantSpec;
use crate::with_backend;

/// The evaluation to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Task {
    /// CoQA as lm-evaluation-harness's `coqa` task (F1/EM).
    Coqa,
    /// Sliding-window perplexity of a text file.
    Perplexity,
    /// The original study's three sanity prompts.
    Sanity,
}

/// Arguments of `quantbench eval`.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model: smollm2-135m, synth:<name>, a local HF directory, a .gguf file or a hub id.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Quantize on load, e.g. `nf4`, `int8,threshold=6`, `gptq,bits=4,group_size=128`.
    #[arg(long, value_parser = parse_quant)]
    pub quant: Option<QuantSpec>,
    /// Which evaluation.
    #[arg(long, value_enum)]
    pub task: Task,
    /// Data: CoQA JSON/JSONL/parquet or `hf:EleutherAI/coqa` (default: the
    /// bundled fixture); the text file for perplexity (required).
    #[arg(long)]
    pub data: Option<String>,
    /// Evaluate only the first N CoQA documents.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Sequences generated together (CoQA); results do not depend on it.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Per-example records (JSONL), appended and resumed (CoQA).
    #[arg(long)]
    pub records: Option<PathBuf>,
    /// Perplexity window length in tokens.
    #[arg(long, default_value_t = 1024)]
    pub context: usize,
    /// Perplexity window stride in tokens.
    #[arg(long, default_value_t = 512)]
    pub stride: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

/// Runs `quantbench eval` and prints the result as JSON.
pub fn run(args: Args) -> Result<()> {
    let loaded = load_quantized(&args.model, args.quant.as_ref(), args.device)?;
    let quant = match &args.quant {
        Some(q) => serde_json::to_string(q)?,
        None => "none".to_string(),
    };
    let json = with_backend!(args.device, |backend| {
        let model = Model::new(backend, &loaded.weights)?;
        match args.task {
            Task::Coqa => {
                let source = args
                    .data
                    .as_deref()
                    .map_or(CoqaSource::Fixture, CoqaSource::parse);
                let docs = source.load()?;
                let docs = coqa::limit_docs(&docs, args.limit);
                let opts = CoqaOptions {
                    batch_size: args.batch_size,
                    model: format!("{} quant={quant}", loaded.source),
                    ..CoqaOptions::default()
                };
                eprintln!("CoQA: {} documents from {source}", docs.len());
                let r = coqa::evaluate_with_progress(
                    &model,
                    &loaded.tokenizer,
                    docs,
                    &opts,
                    args.records.as_deref(),
                    &mut |p| eprintln!("  {}/{} documents ({:.1}s)", p.done, p.total, p.elapsed_s),
                )?;
                serde_json::to_value(&r)?
            }
            Task::Perplexity => {
                let Some(path) = &args.data else {
                    bail!("--task perplexity needs --data TEXT_FILE");
                };
                let opts = PerplexityOptions {
                    context: args.context,
                    stride: args.stride,
                    ..PerplexityOptions::default()
                };
                let r = perplexity_of_file(&model, &loaded.tokenizer, path.as_ref(), &opts)?;
                serde_json::to_value(&r)?
            }
            Task::Sanity => {
                let r = sanity::run(
                    &model,
                    &loaded.tokenizer,
                    &sanity::PROMPTS,
                    sanity::DEFAULT_NEW_TOKENS,
                    BosPolicy::Auto,
                )?;
                serde_json::to_value(&r)?
            }
        }
    });
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}
