//! Hugging Face hub downloads (hf-hub crate): config, tokenizer and
//! safetensors weights of a model repository into the hf-hub cache, then
//! loaded as an HF directory. `HF_TOKEN` authenticates (gated repositories
//! such as meta-llama need it); `HF_HUB_OFFLINE=1` uses the cache only.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo};

use super::LoadedModel;
use super::hf_dir::{CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, load_hf_dir};
use super::safetensors_io::{INDEX_FILE, SINGLE_FILE, read_index};

/// Short names for hub repositories.
pub const HUB_ALIASES: [(&str, &str); 1] = [("llama-3.2-1b", "meta-llama/Llama-3.2-1B")];

/// The hub id an alias stands for, if `name` is one.
pub fn resolve_alias(name: &str) -> Option<&'static str> {
    HUB_ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map(|(_, id)| *id)
}

/// Whether `HF_HUB_OFFLINE` asks for cache-only operation.
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// What to do when the hub cannot be used, for error messages.
fn offline_advice(id: &str) -> String {
    format!(
        "to use it offline, download it on a machine with network access (`huggingface-cli download {id} --local-dir DIR`, with HF_TOKEN set for gated repositories such as meta-llama) and pass the directory with --model DIR"
    )
}

/// Where files of one repository come from: the network (through the cache)
/// or, offline, the cache alone.
enum Source {
    Online(ApiRepo),
    Offline(hf_hub::CacheRepo),
}

impl Source {
    fn get(&self, id: &str, file: &str) -> Result<PathBuf> {
        match self {
            Source::Online(repo) => repo.get(file).map_err(|e| {
                anyhow::anyhow!(
                    "cannot download {file} of hub model '{id}' ({e}); if the repository is gated set HF_TOKEN; {}",
                    offline_advice(id)
                )
            }),
            Source::Offline(cache) => cache.get(file).with_context(|| {
                format!(
                    "HF_HUB_OFFLINE is set and {file} of '{id}' is not in the hf-hub cache; {}",
                    offline_advice(id)
                )
            }),
        }
    }

    /// `Ok(None)` when the file does not exist (online) or is not cached (offline).
    fn get_optional(&self, file: &str) -> Option<PathBuf> {
        match self {
            Source::Online(repo) => repo.get(file).ok(),
            Source::Offline(cache) => cache.get(file),
        }
    }
}

/// Downloads (or finds in the cache) a hub model and loads it.
pub fn load_hub(id: &str) -> Result<LoadedModel> {
    let dir = download_hub(id)?;
    let mut loaded = load_hf_dir(&dir)?;
    loaded.source = id.to_string();
    Ok(loaded)
}

/// Fetches config.json, tokenizer.json, tokenizer_config.json (if the repo
/// has one) and the safetensors weights (single file, or index + shards) of
/// `id` into the hf-hub cache; returns the snapshot directory holding them.
pub fn download_hub(id: &str) -> Result<PathBuf> {
    let source = if hub_offline() {
        Source::Offline(Cache::from_env().repo(Repo::model(id.to_string())))
    } else {
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
        let api = ApiBuilder::from_env()
            .with_token(token)
            .with_progress(true)
            .build()
            .with_context(|| {
                format!(
                    "cannot set up the hub client for '{id}'; {}",
                    offline_advice(id)
                )
            })?;
        Source::Online(api.model(id.to_string()))
    };
    let config = source.get(id, CONFIG_FILE)?;
    source.get(id, TOKENIZER_FILE)?;
    source.get_optional(TOKENIZER_CONFIG_FILE);
    if let Some(index) = source.get_optional(INDEX_FILE) {
        let mut shards: Vec<String> = read_index(&index)?.into_values().collect();
        shards.sort();
        shards.dedup();
        for shard in shards {
            source.get(id, &shard)?;
        }
    } else {
        source.get(id, SINGLE_FILE)?;
    }
    snapshot_dir(&config)
}

/// The directory of a downloaded file (hf-hub keeps one snapshot directory
/// per revision, holding every file of that revision).
fn snapshot_dir(file: &Path) -> Result<PathBuf> {
    file.parent()
        .map(Path::to_path_buf)
        .with_context(|| format!("{}: downloaded file has no directory", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_resolves() {
        assert_eq!(
            resolve_alias("llama-3.2-1b"),
            Some("meta-llama/Llama-3.2-1B")
        );
        assert_eq!(resolve_alias("llama-3.2-3b"), None);
    }
}
