//! `quantbench divergence`: mean KL(base‖quantized) per token and top-1
//! agreement of a quantized model against its base on the same text.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;

use crate::backend::Device;
use crate::config::Registry;
use crate::eval::divergence::{DEFAULT_TEXT, Reference, text_windows};
use crate::io::load_model;
use crate::model::Model;
use crate::quant::{QuantContext, QuantSpec, cast_dense, quantize_model_on};
use crate::tensor::DType;
use crate::with_backend;

/// Arguments of `quantbench divergence`.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Base model: smollm2-135m, synth:<name>, a local HF directory, a .gguf file or a hub id.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// A preset of the experiment registry (e.g. `bnb_4bit_nf4`: its dtype is
    /// the base, its quantization the compared model) or a method spec (e.g.
    /// `nf4`, `nf4,double_quant=false`, `fp4`, `int8`: compared with the model as loaded).
    #[arg(long)]
    pub quant: String,
    /// Experiment registry holding the presets (default: the built-in one).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Plain-text file to evaluate on (default: a built-in English text).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Use at most this many tokens of the text.
    #[arg(long, default_value_t = 512)]
    pub tokens: usize,
    /// Tokens per window; each window is run from an empty cache.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

/// The base dtype (`None`: as loaded) and quantization `--quant` names.
fn resolve(quant: &str, config: Option<&std::path::Path>) -> Result<(Option<DType>, QuantSpec)> {
    let registry = Registry::load(config)?;
    if let Some(exp) = registry.experiments.get(quant) {
        return Ok((Some(exp.dtype), exp.quant.clone()));
    }
    let spec = QuantSpec::parse(quant).with_context(|| {
        format!(
            "--quant '{quant}' is neither a preset ({}) nor a method spec",
            registry.known()
        )
    })?;
    Ok((None, spec))
}

/// Prints the mean KL and top-1 agreement.
pub fn run(args: Args) -> Result<()> {
    let (dtype, spec) = resolve(&args.quant, args.config.as_deref())?;
    let text = match &args.text {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("{}: cannot read the --text file", p.display()))?,
        None => DEFAULT_TEXT.to_string(),
    };
    let mut loaded = load_model(&args.model)?;
    if let Some(d) = dtype {
        cast_dense(&mut loaded.weights, d);
    }
    let window = args
        .window
        .min(loaded.weights.config.max_position_embeddings);
    let windows = text_windows(&loaded.tokenizer, &text, args.tokens, window)?;
    let (reference, d) = with_backend!(args.device, |backend| {
        let base = Model::new(backend, &loaded.weights)?;
        let reference = Reference::compute(&base, windows)?;
        let backend = base.into_backend();
        let ctx = QuantContext {
            tokenizer: &loaded.tokenizer,
        };
        quantize_model_on(&mut loaded.weights, &spec, &ctx, args.device)?;
        let quant = Model::new(backend, &loaded.weights)?;
        let d = reference.compare(&quant)?;
        (reference, d)
    });
    println!(
        "model: {}  base dtype: {}  quant: {}  tokens: {} ({} windows of ≤{window})",
        loaded.source,
        dtype.map_or("as loaded".to_string(), |d| d.to_string()),
        serde_json::to_string(&spec)?,
        d.tokens,
        reference.windows()
    );
    println!("mean KL(base||quant): {:.6} nats/token", d.mean_kl());
    println!("top-1 agreement: {:.4}", d.top1_agreement());
    Ok(())
}
