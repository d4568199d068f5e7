//! Exact storage of a model's weights, grouped by format.

use std::collections::BTreeMap;

use super::LinearWeight;
use crate::model::LlamaWeights;

/// Storage of the tensors of one format.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FormatUsage {
    pub tensors: usize,
    pub parameters: usize,
    pub bytes: usize,
}

impl FormatUsage {
    /// Counts one more tensor.
    pub fn add(&mut self, parameters: usize, bytes: usize) {
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
    let mut add =
        |name: String, params: usize, bytes: usize| by.entry(name).or_default().add(params, bytes);
    add(
        vec_dtype.to_string(),
        w.embed_tokens.numel(),
        w.embed_tokens.numel() * vec_dtype.size_bytes(),
    );
    add(
        vec_dtype.to_string(),
        w.norm.len(),
        w.norm.len() * vec_dtype.size_bytes(),
    );
    let linear = |lw: &LinearWeight| (lw.format_name(), lw.parameter_count(), lw.storage_bytes());
    for layer in &w.layers {
        for v in [&layer.input_layernorm, &layer.post_attention_layernorm] {
            add(
                vec_dtype.to_string(),
                v.len(),
                v.len() * vec_dtype.size_bytes(),
            );
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

/// Sum over all formats.
pub fn total_usage(by: &BTreeMap<String, FormatUsage>) -> FormatUsage {
    by.values().fold(FormatUsage::default(), |mut t, u| {
        t.tensors += u.tensors;
        t.parameters += u.parameters;
        t.bytes += u.bytes;
        t
    })
}
