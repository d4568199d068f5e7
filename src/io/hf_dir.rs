//! HF model directories: config.json + model.safetensors (+ tokenizer.json).

use std::path::Path;

use anyhow::{Context, Result};

use super::safetensors_io::{RawTensor, write_safetensors};
use super::tokenizer::Tokenizer;
use crate::model::LlamaWeights;

/// Writes `weights` (dequantized where quantized) as an HF checkpoint
/// directory; the tokenizer is saved as tokenizer.json when given.
pub fn write_hf_dir(dir: &Path, weights: &LlamaWeights, tokenizer: Option<&Tokenizer>) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create directory", dir.display()))?;
    let config = serde_json::to_string_pretty(&weights.config.to_hf_json())?;
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, config).with_context(|| format!("{}: cannot write", cfg_path.display()))?;
    let tensors: Vec<(String, RawTensor)> = weights
        .to_dense_tensors()
        .iter()
        .map(|(n, t)| (n.clone(), RawTensor::from(t)))
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors, Some([("format".to_string(), "pt".to_string())].into()))?;
    if let Some(tok) = tokenizer {
        let path = dir.join("tokenizer.json");
        tok.inner()
            .save(&path, false)
            .map_err(|e| anyhow::anyhow!("{}: cannot write tokenizer: {e}", path.display()))?;
    }
    Ok(())
}
