//! HF model directories: config.json + model.safetensors (or shards + index)
//! + tokenizer.json. Loading and writing.

use std::path::Path;

use anyhow::{Context, Result, bail};

use super::LoadedModel;
use super::safetensors_io::{RawTensor, read_checkpoint, write_safetensors};
use super::tokenizer::Tokenizer;
use crate::model::{LlamaConfig, LlamaWeights};

/// The model configuration file of an HF directory.
pub const CONFIG_FILE: &str = "config.json";
/// The tokenizer file of an HF directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Optional tokenizer settings (read for `add_bos_token`).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// Loads an HF checkpoint directory: its config, tokenizer and weights.
/// A config with a `quantization_config` goes through [`load_quantized_dir`].
pub fn load_hf_dir(dir: &Path) -> Result<LoadedModel> {
    let (config, raw) = read_config(dir)?;
    let tokenizer = load_tokenizer(dir, &config)?;
    let weights = match raw.get("quantization_config") {
        Some(q) if !q.is_null() => load_quantized_dir(dir, config, &raw)?,
        _ => load_dense_weights(dir, config)?,
    };
    Ok(LoadedModel {
        weights,
        tokenizer,
        source: dir.display().to_string(),
    })
}

/// Reads `config.json`: the Llama config and the raw JSON document (for
/// fields such as `quantization_config` that the config does not model).
pub fn read_config(dir: &Path) -> Result<(LlamaConfig, serde_json::Value)> {
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        bail!(
            "{}: missing; an HF checkpoint directory needs config.json next to the weights",
            path.display()
        );
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let origin = path.display().to_string();
    let raw: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{origin}: not valid JSON; re-download it"))?;
    let config = LlamaConfig::from_hf_json(&text, &origin)?;
    Ok((config, raw))
}

/// Loads `tokenizer.json` with the config's BOS/EOS ids. BOS is prepended on
/// encoding unless `tokenizer_config.json` says `"add_bos_token": false`.
pub fn load_tokenizer(dir: &Path, config: &LlamaConfig) -> Result<Tokenizer> {
    let path = dir.join(TOKENIZER_FILE);
    if !path.is_file() {
        bail!(
            "{}: missing; copy the model's tokenizer.json into {} (e.g. `huggingface-cli download ID tokenizer.json --local-dir {0}`)",
            path.display(),
            dir.display()
        );
    }
    let bos = if adds_bos(dir)? {
        config.bos_token_id
    } else {
        None
    };
    Tokenizer::from_file(&path, bos, config.eos_token_ids.clone())
}

/// `add_bos_token` from tokenizer_config.json; true when the file or the key is absent.
fn adds_bos(dir: &Path) -> Result<bool> {
    let path = dir.join(TOKENIZER_CONFIG_FILE);
    if !path.is_file() {
        return Ok(true);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON; re-download it", path.display()))?;
    Ok(v.get("add_bos_token")
        .and_then(|b| b.as_bool())
        .unwrap_or(true))
}

/// Reads unquantized (F32/F16/BF16) weights, single-file or sharded.
fn load_dense_weights(dir: &Path, config: LlamaConfig) -> Result<LlamaWeights> {
    let tensors = read_checkpoint(dir)?;
    LlamaWeights::from_tensors(config, tensors).with_context(|| {
        format!(
            "{}: weights do not match config.json; re-download the checkpoint",
            dir.display()
        )
    })
}

/// Loads a pre-quantized checkpoint: one arm per `quant_method` of the
/// config's `quantization_config` (bitsandbytes, gptq, awq, ...);
/// `raw_config` is the whole config.json document.
pub fn load_quantized_dir(
    dir: &Path,
    config: LlamaConfig,
    raw_config: &serde_json::Value,
) -> Result<LlamaWeights> {
    let method = raw_config["quantization_config"]
        .get("quant_method")
        .and_then(|m| m.as_str())
        .with_context(|| {
            format!(
                "{}: quantization_config has no quant_method string",
                dir.join(CONFIG_FILE).display()
            )
        })?;
    match method {
        "gptq" => {
            super::gptq_checkpoint::load_gptq(dir, config, &raw_config["quantization_config"])
        }
        "awq" => super::awq_checkpoint::load_awq(dir, config, &raw_config["quantization_config"]),
        "bitsandbytes" => super::bnb_checkpoint::read_bnb_weights(dir, config, raw_config),
        other => bail!(
            "{}: quantized checkpoint with unknown quant_method {other}; supported: bitsandbytes, gptq, awq",
            dir.display()
        ),
    }
}

/// Creates `dir` and writes `config` as its config.json and, when given, the
/// tokenizer as tokenizer.json: what every checkpoint directory quantbench
/// writes has besides its tensors.
pub fn write_dir_metadata(
    dir: &Path,
    config: &serde_json::Value,
    tokenizer: Option<&Tokenizer>,
) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create directory", dir.display()))?;
    let cfg_path = dir.join(CONFIG_FILE);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(config)?)
        .with_context(|| format!("{}: cannot write", cfg_path.display()))?;
    if let Some(tok) = tokenizer {
        let path = dir.join(TOKENIZER_FILE);
        tok.inner()
            .save(&path, false)
            .map_err(|e| anyhow::anyhow!("{}: cannot write tokenizer: {e}", path.display()))?;
    }
    Ok(())
}

/// Writes `weights` (dequantized where quantized) as an HF checkpoint
/// directory; the tokenizer is saved as tokenizer.json when given.
pub fn write_hf_dir(
    dir: &Path,
    weights: &LlamaWeights,
    tokenizer: Option<&Tokenizer>,
) -> Result<()> {
    write_dir_metadata(dir, &weights.config.to_hf_json(), tokenizer)?;
    let tensors: Vec<(String, RawTensor)> = weights
        .to_dense_tensors()
        .iter()
        .map(|(n, t)| (n.clone(), RawTensor::from(t)))
        .collect();
    write_safetensors(
        &dir.join("model.safetensors"),
        &tensors,
        Some([("format".to_string(), "pt".to_string())].into()),
    )
}
