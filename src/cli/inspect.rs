//! `quantbench inspect`: configuration, parameter count and storage by format.

use anyhow::Result;
use clap::Args as ClapArgs;

use crate::io::load_model;
use crate::quant::storage::{quantized_usage, total_usage, usage_by_format};

/// Arguments of `quantbench inspect`.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model: smollm2-135m, synth:<name>, a local HF or quantized directory, a .gguf file or a hub id.
    #[arg(long)]
    pub model: String,
}

/// Prints the report.
pub fn run(args: Args) -> Result<()> {
    let loaded = load_model(&args.model)?;
    let w = &loaded.weights;
    println!("model: {}", loaded.source);
    println!(
        "config: {}",
        serde_json::to_string_pretty(&w.config.to_hf_json())?
    );
    let by = usage_by_format(w);
    let total = total_usage(&by);
    println!("parameters: {}", total.parameters);
    println!(
        "{:<24} {:>8} {:>14} {:>14} {:>10}",
        "format", "tensors", "parameters", "bytes", "bits/param"
    );
    for (name, u) in by.iter().chain([(&"total".to_string(), &total)]) {
        println!(
            "{:<24} {:>8} {:>14} {:>14} {:>10.3}",
            name,
            u.tensors,
            u.parameters,
            u.bytes,
            u.bits_per_parameter()
        );
    }
    let q = quantized_usage(w);
    if q.tensors > 0 {
        println!(
            "quantized layers only: {} tensors, {} parameters, {} bytes, {:.3} bits/param",
            q.tensors,
            q.parameters,
            q.bytes,
            q.bits_per_parameter()
        );
    }
    Ok(())
}
