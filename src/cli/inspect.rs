//! `quantbench inspect`: configuration, parameter count and storage by format.

use std::collections::BTreeMap;

use anyhow::Result;
use clap::Args as ClapArgs;

use crate::io::load_model;
use crate::model::LlamaWeights;
use crate::quant::LinearWeight;

/// Arguments of `quantbench inspect`.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model: smollm2-135m, synth:<name>, a local HF or quantized directory, a .gguf file or a hub id.
    #[arg(long)]
    pub model: String,
}

/// Storage of the tensors of one format.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FormatUsage {
    pub tensors: usize,
    pub parameters: usize,
    pub bytes: usize,
}

impl FormatUsage {
    fn add(&mut self, parameters: usize, bytes: usize) {
        self.tensors += 1;
        self.parameters += parameters;
        self.bytes += bytes;
    }

    /// Average stored bits per parameter.
    pub fn bits_per_parameter(&self) -> f64 {
        8.0 * self.bytes as f64 / self.parameters.max(1) as f64
    }
}

/// Storage of every tensor grouped by format name (`f16`, `nf4-dq-b64`, ...).
pub fn usage_by_format(w: &LlamaWeights) -> BTreeMap<String, FormatUsage> {
    let mut by: BTreeMap<String, FormatUsage> = BTreeMap::new();
    let vec_dtype = w.embed_tokens.dtype;
    let mut add = |name: String, params: usize, bytes: usize| by.entry(name).or_default().add(params, bytes);
    add(
        vec_dtype.to_string(),
        w.embed_tokens.numel(),
        w.embed_tokens.numel() * vec_dtype.size_bytes(),
    );
    add(vec_dtype.to_string(), w.norm.len(), w.norm.len() * vec_dtype.size_bytes());
    let linear = |lw: &LinearWeight| (lw.format_name(), lw.parameter_count(), lw.storage_bytes());
    for layer in &w.layers {
        for v in [&layer.input_layernorm, &layer.post_attention_layernorm] {
            add(vec_dtype.to_string(), v.len(), v.len() * vec_dtype.size_bytes());
        }
        for (_, lw) in layer.linears() {
            let (f, p, b) = linear(lw);
            add(f, p, b);
        }
    }
    if let Some(head) = &w.lm_head {
        let (f, p, b) = linear(head);
        add(f, p, b);
    }
    by
}

/// Storage of the quantized linear layers only.
pub fn quantized_usage(w: &LlamaWeights) -> FormatUsage {
    let mut u = FormatUsage::default();
    let layers = w.layers.iter().flat_map(|l| l.linears().map(|(_, lw)| lw));
    for lw in layers.chain(w.lm_head.as_ref()) {
        if matches!(lw, LinearWeight::Quantized(_)) {
            u.add(lw.parameter_count(), lw.storage_bytes());
        }
    }
    u
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
    let total = by.values().fold(FormatUsage::default(), |mut t, u| {
        t.tensors += u.tensors;
        t.parameters += u.parameters;
        t.bytes += u.bytes;
        t
    });
    println!("parameters: {}", total.parameters);
    println!("{:<24} {:>8} {:>14} {:>14} {:>10}", "format", "tensors", "parameters", "bytes", "bits/param");
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
