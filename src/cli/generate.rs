//! `quantbench generate`: greedy continuation of a prompt.

use anyhow::Result;
use clap::Args as ClapArgs;

use crate::backend::Device;
use crate::io::load_model;
use crate::model::{GenerationConfig, Model, generate};
use crate::with_backend;

/// Arguments of `quantbench generate`.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model: smollm2-135m, synth:<name>, a local HF directory, a .gguf file or a hub id.
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Prompt text (a BOS token is prepended when the model has one).
    #[arg(long)]
    pub prompt: String,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    /// Stop when the continuation contains this string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

/// Prints the prompt followed by its greedy continuation.
pub fn run(args: Args) -> Result<()> {
    let loaded = load_model(&args.model)?;
    let prompt = loaded.tokenizer.encode(&args.prompt, true)?;
    let cfg = GenerationConfig {
        max_new_tokens: args.max_tokens,
        stop_strings: args.stop.clone(),
        stop_at_eos: true,
    };
    let out = with_backend!(args.device, |backend| {
        let model = Model::new(backend, &loaded.weights)?;
        let start = std::time::Instant::now();
        let out = generate(&model, &loaded.tokenizer, &[prompt], &cfg)?;
        let elapsed = start.elapsed();
        let g = out
            .into_iter()
            .next()
            .flatten()
            .expect("one prompt, one result");
        eprintln!(
            "[{} tokens in {:.2}s, {:.1} tokens/s, stop: {:?}]",
            g.tokens.len(),
            elapsed.as_secs_f64(),
            g.tokens.len() as f64 / elapsed.as_secs_f64(),
            g.stop
        );
        g
    });
    println!("{}{}", args.prompt, out.text);
    Ok(())
}
