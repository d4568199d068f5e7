//! `quantbench divergence`: mean KL(base‖quantized) per token and top-1
//! agreement of a quantized model against its base on the same text.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;

use crate::backend::Device;
use crate::cli::common::parse_quant;
use crate::eval::divergence::{DEFAULT_TEXT, divergence, windows};
use crate::io::load_model;
use crate::model::Model;
use crate::quant::{QuantContext, quantize_model};
use crate::with_backend;

/// Arguments of `quantbench divergence`.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Base model: synth:<name> or a local HF directory.
    #[arg(long)]
    pub model: String,
    /// Quantization of the compared model, e.g. `nf4`, `nf4,double_quant=false`, `fp4`, `int8`.
    #[arg(long)]
    pub quant: String,
    /// Plain-text file to evaluate on (default: a built-in English text).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Use at most this many tokens of the text (default: all of it).
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Tokens per window; each window is run from an empty cache.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

/// Prints the mean KL and top-1 agreement.
pub fn run(args: Args) -> Result<()> {
    let spec = parse_quant(&args.quant)?;
    let text = match &args.text {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("{}: cannot read the --text file", p.display()))?,
        None => DEFAULT_TEXT.to_string(),
    };
    let base = load_model(&args.model)?;
    let mut tokens = base.tokenizer.encode(&text, true)?;
    if let Some(n) = args.tokens {
        tokens.truncate(n);
    }
    if tokens.len() < 2 {
        bail!(
            "the text gives {} tokens; divergence needs at least 2 (pass a longer --text or a larger --tokens)",
            tokens.len()
        );
    }
    let window = args.window.min(base.weights.config.max_position_embeddings);
    let wins = windows(&tokens, window)?;
    let mut quant = base.weights.clone();
    let ctx = QuantContext {
        tokenizer: &base.tokenizer,
    };
    quantize_model(&mut quant, &spec, &ctx)?;
    let vocab = base.weights.config.vocab_size;
    let d = with_backend!(args.device, |b1| {
        let base_model = Model::new(b1, &base.weights)?;
        with_backend!(args.device, |b2| {
            let quant_model = Model::new(b2, &quant)?;
            divergence(&base_model, &quant_model, &wins, vocab)?
        })
    });
    println!(
        "model: {}  quant: {}  tokens: {} ({} windows of ≤{window})",
        base.source,
        args.quant,
        d.tokens,
        wins.len()
    );
    println!("mean KL(base||quant): {:.6} nats/token", d.mean_kl());
    println!("top-1 agreement: {:.4}", d.top1_agreement());
    Ok(())
}
