//! Checkpoint readers and writers, hub downloads, tokenizers.

pub mod awq_checkpoint;
pub mod gptq_checkpoint;
pub mod hf_dir;
pub mod safetensors_io;
pub mod tokenizer;

use anyhow::{Result, bail};

use crate::model::LlamaWeights;
use crate::model::synth::{synth_config, synth_weights};
use tokenizer::Tokenizer;

/// Seed used for `synth:<name>` weights.
pub const SYNTH_SEED: u64 = 0x5eed;

/// A model ready to run: weights, tokenizer, and where they came from.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    pub weights: LlamaWeights,
    pub tokenizer: Tokenizer,
    /// The spec the model was loaded from, resolved (path, hub id, synth name).
    pub source: String,
}

/// The byte-level tokenizer of synthetic models, with the config's special ids.
pub fn synth_tokenizer(config: &crate::model::LlamaConfig) -> Result<Tokenizer> {
    let bytes = Tokenizer::bytes_only()?;
    Ok(Tokenizer::new(
        bytes.inner().clone(),
        config.bos_token_id,
        config.eos_token_ids.clone(),
    ))
}

/// Loads a model from a spec: `synth:<name>`, a named model (`smollm2-135m`),
/// a local HF directory, a `.gguf` file, or a hub id (`org/name`).
pub fn load_model(spec: &str) -> Result<LoadedModel> {
    if let Some(name) = spec.strip_prefix("synth:") {
        let (config, dtype) = synth_config(name)?;
        let weights = synth_weights(&config, dtype, SYNTH_SEED)?;
        let tokenizer = synth_tokenizer(&config)?;
        return Ok(LoadedModel {
            weights,
            tokenizer,
            source: spec.to_string(),
        });
    }
    bail!("unknown model '{spec}'")
}
