//! `quantbench synth`: write seeded random weights of a named shape as an HF directory.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args as ClapArgs;

use crate::io::{SYNTH_SEED, hf_dir, synth_tokenizer};
use crate::model::synth::{synth_config, synth_weights};

/// Arguments of `quantbench synth`.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Shape name: tiny, tiny-untied, smollm2-135m, llama-3.2-1b.
    pub name: String,
    /// Output directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub out: PathBuf,
    /// Random seed.
    #[arg(long, default_value_t = SYNTH_SEED)]
    pub seed: u64,
}

/// Generates the weights and writes them.
pub fn run(args: Args) -> Result<()> {
    let (config, dtype) = synth_config(&args.name)?;
    let weights = synth_weights(&config, dtype, args.seed)?;
    let tokenizer = synth_tokenizer(&config)?;
    hf_dir::write_hf_dir(&args.out, &weights, Some(&tokenizer))?;
    println!(
        "wrote synth:{} ({} parameters, {dtype}) to {}",
        args.name,
        config.parameter_count(),
        args.out.display()
    );
    Ok(())
}
