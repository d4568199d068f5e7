//! GGUF Llama models (`general.architecture = "llama"`) → [`LlamaWeights`]
//! and a [`Tokenizer`].
//!
//! Hyper-parameters come from the `llama.*` metadata keys, tensors are renamed
//! from llama.cpp's names (`blk.N.attn_q.weight`, ...) to HF names, and the
//! row permutation that llama.cpp's converter applies to `attn_q`/`attn_k`
//! (interleaved rotary pairs) is undone so the weights match the HF layout
//! (rotate-half pairs) that the engine uses.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::{GgufFile, GgufHeader, GgufValue};
use crate::io::LoadedModel;
use crate::io::tokenizer::{BpeSplit, Tokenizer};
use crate::model::config::Llama3RopeScaling;
use crate::model::rope::llama3_scaled;
use crate::model::{LlamaConfig, LlamaWeights};
use crate::tensor::HostTensor;

/// Loads a GGUF Llama checkpoint: config, tokenizer and dequantized weights.
pub fn load_gguf(path: &Path) -> Result<LoadedModel> {
    let file = GgufFile::open(path)?;
    let origin = path.display().to_string();
    let mut config = config_from_gguf(&file.header).with_context(|| origin.clone())?;
    let tokenizer = tokenizer_from_gguf(&file.header).with_context(|| origin.clone())?;
    if config.bos_token_id.is_none() {
        config.bos_token_id = tokenizer.bos_id;
    }
    let weights = weights_from_gguf(&file, config)?;
    Ok(LoadedModel {
        weights,
        tokenizer,
        source: origin,
    })
}

fn require<'a>(h: &'a GgufHeader, key: &str) -> Result<&'a GgufValue> {
    h.get(key).with_context(|| {
        format!("GGUF metadata lacks '{key}'; the file is not a complete llama.cpp Llama model")
    })
}

fn require_usize(h: &GgufHeader, key: &str) -> Result<usize> {
    let v = require(h, key)?;
    v.as_u64()
        .map(|v| v as usize)
        .with_context(|| format!("GGUF metadata '{key}' is {v:?}, expected an unsigned integer"))
}

fn optional_usize(h: &GgufHeader, key: &str) -> Result<Option<usize>> {
    match h.get(key) {
        None => Ok(None),
        Some(_) => require_usize(h, key).map(Some),
    }
}

fn optional_f64(h: &GgufHeader, key: &str) -> Result<Option<f64>> {
    match h.get(key) {
        None => Ok(None),
        // An f32 value reads back as the shortest decimal that round-trips
        // (1e-5, not 9.999999747378752e-6): what the converter was given.
        Some(GgufValue::F32(v)) => Ok(Some(v.to_string().parse()?)),
        Some(v) => v
            .as_f64()
            .map(Some)
            .with_context(|| format!("GGUF metadata '{key}' is {v:?}, expected a number")),
    }
}

fn optional_u32(h: &GgufHeader, key: &str) -> Result<Option<u32>> {
    Ok(optional_usize(h, key)?.map(|v| v as u32))
}

/// The [`LlamaConfig`] a GGUF file's metadata describes. The vocabulary size
/// is `llama.vocab_size` or, when absent, the length of the token list.
pub fn config_from_gguf(h: &GgufHeader) -> Result<LlamaConfig> {
    let arch = require(h, "general.architecture")?
        .as_str()
        .context("GGUF metadata 'general.architecture' is not a string")?;
    if arch != "llama" {
        bail!(
            "GGUF architecture '{arch}' is not supported; quantbench runs Llama-family models (general.architecture = llama)"
        );
    }
    let hidden = require_usize(h, "llama.embedding_length")?;
    let heads = require_usize(h, "llama.attention.head_count")?;
    let kv_heads = optional_usize(h, "llama.attention.head_count_kv")?.unwrap_or(heads);
    if heads == 0 {
        bail!("GGUF metadata 'llama.attention.head_count' is 0");
    }
    let head_dim = optional_usize(h, "llama.attention.key_length")?.unwrap_or(hidden / heads);
    if let Some(v) = optional_usize(h, "llama.attention.value_length")?
        && v != head_dim
    {
        bail!("GGUF value_length {v} differs from key_length {head_dim}; not a Llama model");
    }
    if let Some(rot) = optional_usize(h, "llama.rope.dimension_count")?
        && rot != head_dim
    {
        bail!(
            "GGUF rope.dimension_count {rot} differs from the head size {head_dim}; partial rotary embeddings are not supported"
        );
    }
    let n_tokens = h
        .get("tokenizer.ggml.tokens")
        .and_then(GgufValue::as_array)
        .map(|t| t.len());
    let vocab_size = match (optional_usize(h, "llama.vocab_size")?, n_tokens) {
        (Some(v), _) => v,
        (None, Some(n)) => n,
        (None, None) => bail!(
            "GGUF metadata has neither 'llama.vocab_size' nor 'tokenizer.ggml.tokens'; cannot tell the vocabulary size"
        ),
    };
    if let Some(kind) = h.get("llama.rope.scaling.type") {
        let kind = kind.as_str().unwrap_or("");
        let factor = optional_f64(h, "llama.rope.scaling.factor")?.unwrap_or(1.0);
        if kind != "none" && factor != 1.0 {
            bail!(
                "GGUF rope scaling '{kind}' (factor {factor}) is not supported; only llama3 scaling is implemented"
            );
        }
    }
    let eos = optional_u32(h, "tokenizer.ggml.eos_token_id")?;
    let eot = optional_u32(h, "tokenizer.ggml.eot_token_id")?;
    let mut eos_token_ids: Vec<u32> = eos.into_iter().collect();
    if let Some(t) = eot
        && !eos_token_ids.contains(&t)
    {
        eos_token_ids.push(t);
    }
    let config = LlamaConfig {
        hidden_size: hidden,
        intermediate_size: require_usize(h, "llama.feed_forward_length")?,
        num_hidden_layers: require_usize(h, "llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        vocab_size,
        rms_norm_eps: optional_f64(h, "llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        rope_theta: optional_f64(h, "llama.rope.freq_base")?.unwrap_or(10000.0),
        // Filled in from `rope_freqs.weight` when the file has it.
        rope_scaling: None,
        max_position_embeddings: optional_usize(h, "llama.context_length")?.unwrap_or(2048),
        // Decided by the presence of `output.weight`.
        tie_word_embeddings: !h.tensors.iter().any(|t| t.name == "output.weight"),
        bos_token_id: optional_u32(h, "tokenizer.ggml.bos_token_id")?,
        eos_token_ids,
    };
    config.validate()?;
    Ok(config)
}

/// The per-frequency divisors llama3 rope scaling applies (what llama.cpp's
/// converter stores as `rope_freqs.weight`).
fn llama3_rope_factors(theta: f64, head_dim: usize, s: &Llama3RopeScaling) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| {
            let freq = theta.powf(-(2.0 * i as f64) / head_dim as f64);
            freq / llama3_scaled(freq, s)
        })
        .collect()
}

/// Recovers llama3 rope scaling from `rope_freqs.weight`: the factor is the
/// largest divisor; the other parameters are Llama 3's (low 1, high 4) with
/// the original context from `llama.rope.scaling.original_context_length`
/// (default 8192), accepted only if they reproduce every stored divisor.
fn rope_scaling_from_freqs(
    h: &GgufHeader,
    config: &LlamaConfig,
    freqs: &[f32],
) -> Result<Llama3RopeScaling> {
    if freqs.len() != config.head_dim / 2 {
        bail!(
            "rope_freqs.weight has {} values, expected head_dim / 2 = {}",
            freqs.len(),
            config.head_dim / 2
        );
    }
    let factor = freqs.iter().fold(1f32, |m, &v| m.max(v)) as f64;
    let original = optional_usize(h, "llama.rope.scaling.original_context_length")?.unwrap_or(8192);
    let candidate = Llama3RopeScaling {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: original,
    };
    let expected = llama3_rope_factors(config.rope_theta, config.head_dim, &candidate);
    let matches = expected
        .iter()
        .zip(freqs)
        .all(|(&e, &f)| (e - f as f64).abs() <= 1e-3 * e.abs());
    if !matches {
        bail!(
            "rope_freqs.weight does not match llama3 rope scaling (factor {factor}, low 1, high 4, original context {original}); this rope scaling is not supported"
        );
    }
    Ok(candidate)
}

/// Undoes llama.cpp's q/k permutation for `heads` heads: within each head,
/// GGUF row `2j + half` holds HF row `half · head_dim/2 + j`.
pub fn unpermute_rows(t: &HostTensor, heads: usize) -> Result<HostTensor> {
    reorder_head_rows(t, heads, true)
}

/// The inverse of [`unpermute_rows`]: what llama.cpp's converter does to HF
/// q/k weights (used to write GGUF files in tests).
pub fn permute_rows(t: &HostTensor, heads: usize) -> Result<HostTensor> {
    reorder_head_rows(t, heads, false)
}

/// Moves each head's rows between the GGUF order (`2j + half`) and the HF
/// order (`half · head_dim/2 + j`), towards HF when `to_hf`.
fn reorder_head_rows(t: &HostTensor, heads: usize, to_hf: bool) -> Result<HostTensor> {
    let (rows, cols) = t.dims2()?;
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        bail!("cannot split {rows} rows into {heads} heads of even size");
    }
    let hd = rows / heads;
    let mut data = vec![0f32; t.data.len()];
    for h in 0..heads {
        for half in 0..2 {
            for j in 0..hd / 2 {
                let gguf = h * hd + 2 * j + half;
                let hf = h * hd + half * (hd / 2) + j;
                let (src, dst) = if to_hf { (gguf, hf) } else { (hf, gguf) };
                data[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&t.data[src * cols..(src + 1) * cols]);
            }
        }
    }
    HostTensor::new(t.shape.clone(), t.dtype, data)
}

/// The HF name of a llama.cpp tensor name, or `None` for tensors the model
/// does not use (`rope_freqs.weight` is handled separately).
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match suffix {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Reads, renames and un-permutes every tensor and assembles the weights.
fn weights_from_gguf(file: &GgufFile, mut config: LlamaConfig) -> Result<LlamaWeights> {
    let origin = file.path().display().to_string();
    let mut tensors = HashMap::new();
    for info in &file.header.tensors {
        if info.name == "rope_freqs.weight" {
            let t = file.read_tensor(info)?;
            config.rope_scaling = Some(
                rope_scaling_from_freqs(&file.header, &config, &t.data)
                    .with_context(|| origin.clone())?,
            );
            continue;
        }
        let Some(name) = hf_name(&info.name) else {
            bail!(
                "{origin}: unexpected tensor '{}' for a Llama model (a different architecture?)",
                info.name
            );
        };
        let mut t = file.read_tensor(info)?;
        if info.name.ends_with(".attn_q.weight") {
            t = unpermute_rows(&t, config.num_attention_heads)
                .with_context(|| format!("{origin}: tensor '{}'", info.name))?;
        } else if info.name.ends_with(".attn_k.weight") {
            t = unpermute_rows(&t, config.num_key_value_heads)
                .with_context(|| format!("{origin}: tensor '{}'", info.name))?;
        }
        tensors.insert(name, t);
    }
    LlamaWeights::from_tensors(config, tensors).with_context(|| {
        format!("{origin}: tensors do not match the GGUF metadata; re-download the file")
    })
}

/// llama.cpp token types that are matched verbatim (control, user-defined).
const SPECIAL_TOKEN_TYPES: [i64; 2] = [3, 4];

fn string_array(h: &GgufHeader, key: &str) -> Result<Vec<String>> {
    require(h, key)?
        .as_array()
        .with_context(|| format!("GGUF metadata '{key}' is not an array"))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .with_context(|| format!("GGUF metadata '{key}' holds a non-string"))
        })
        .collect()
}

/// The tokenizer stored in GGUF metadata. Only `tokenizer.ggml.model = gpt2`
/// (byte-level BPE) is supported; BOS is prepended when
/// `tokenizer.ggml.add_bos_token` is true (the default when absent).
pub fn tokenizer_from_gguf(h: &GgufHeader) -> Result<Tokenizer> {
    let model = require(h, "tokenizer.ggml.model")?
        .as_str()
        .context("GGUF metadata 'tokenizer.ggml.model' is not a string")?;
    if model != "gpt2" {
        bail!(
            "GGUF tokenizer model '{model}' is not supported (only 'gpt2' byte-level BPE); use the model's HF directory with tokenizer.json instead"
        );
    }
    let tokens = string_array(h, "tokenizer.ggml.tokens")?;
    let merges = match h.get("tokenizer.ggml.merges") {
        None => vec![],
        Some(_) => string_array(h, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .with_context(|| format!("GGUF merge rule '{m}' is not two tokens"))
            })
            .collect::<Result<Vec<_>>>()?,
    };
    let types: Vec<i64> = match h.get("tokenizer.ggml.token_type") {
        None => vec![],
        Some(v) => v
            .as_array()
            .context("GGUF metadata 'tokenizer.ggml.token_type' is not an array")?
            .iter()
            .map(|t| t.as_f64().map(|t| t as i64).unwrap_or(1))
            .collect(),
    };
    let specials: Vec<String> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, t)| SPECIAL_TOKEN_TYPES.contains(t))
        .map(|(s, _)| s.clone())
        .collect();
    let split = match h.get("tokenizer.ggml.pre").and_then(GgufValue::as_str) {
        Some("smollm" | "starcoder" | "refact") => BpeSplit::DigitsThenGpt2,
        Some("llama-bpe" | "llama3") => BpeSplit::Llama3,
        Some("gpt-2" | "gpt2" | "default") | None => BpeSplit::Gpt2,
        Some(other) => {
            tracing::warn!(
                "GGUF pre-tokenizer '{other}' is not known; splitting words with GPT-2's rule"
            );
            BpeSplit::Gpt2
        }
    };
    let bos = optional_u32(h, "tokenizer.ggml.bos_token_id")?;
    let add_bos = h
        .get("tokenizer.ggml.add_bos_token")
        .and_then(GgufValue::as_bool)
        .unwrap_or(true);
    let mut eos_ids: Vec<u32> = optional_u32(h, "tokenizer.ggml.eos_token_id")?
        .into_iter()
        .collect();
    if let Some(t) = optional_u32(h, "tokenizer.ggml.eot_token_id")?
        && !eos_ids.contains(&t)
    {
        eos_ids.push(t);
    }
    for id in bos.iter().chain(&eos_ids) {
        if *id as usize >= tokens.len() {
            bail!(
                "GGUF special token id {id} is outside the {}-token vocabulary",
                tokens.len()
            );
        }
    }
    Tokenizer::byte_level_bpe_with(
        &tokens,
        &merges,
        &specials,
        split,
        if add_bos { bos } else { None },
        eos_ids,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    #[test]
    fn permutation_round_trips_and_pairs_rotary_halves() {
        // 2 heads of head_dim 4, 1 column: HF rows 0..8.
        let t =
            HostTensor::new(vec![8, 1], DType::F32, (0..8).map(|v| v as f32).collect()).unwrap();
        let g = permute_rows(&t, 2).unwrap();
        // Head 0: HF pairs (0, 2) and (1, 3) become adjacent rows.
        assert_eq!(g.data, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        assert_eq!(unpermute_rows(&g, 2).unwrap(), t);
        assert!(unpermute_rows(&t, 3).is_err());
    }

    #[test]
    fn tensor_names_map_to_hf() {
        assert_eq!(
            hf_name("blk.12.attn_k.weight").as_deref(),
            Some("model.layers.12.self_attn.k_proj.weight")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.x.attn_k.weight"), None);
        assert_eq!(hf_name("blk.0.ssm_conv.weight"), None);
    }

    #[test]
    fn llama3_rope_factors_are_recognised() {
        let s = Llama3RopeScaling {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let f = llama3_rope_factors(500000.0, 64, &s);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[31], 32.0);
        let header = GgufHeader {
            version: 3,
            metadata: Default::default(),
            tensors: vec![],
            alignment: 32,
            data_offset: 0,
        };
        let (mut cfg, _) = crate::model::synth::synth_config("llama-3.2-1b").unwrap();
        cfg.rope_scaling = None;
        let freqs: Vec<f32> = f.iter().map(|&v| v as f32).collect();
        assert_eq!(rope_scaling_from_freqs(&header, &cfg, &freqs).unwrap(), s);
        let mut wrong = freqs.clone();
        wrong[20] *= 1.5;
        assert!(rope_scaling_from_freqs(&header, &cfg, &wrong).is_err());
    }
}
