//! Llama architecture hyper-parameters, read from an HF `config.json`, GGUF
//! metadata, or a named synthetic shape.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// llama3-style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Everything the forward pass needs to know about a Llama-family model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// The subset of an HF `config.json` that quantbench reads.
#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<serde_json::Value>,
    hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    2048
}

impl LlamaConfig {
    /// Parses an HF `config.json` document; `origin` names the file in errors.
    pub fn from_hf_json(text: &str, origin: &str) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text)
            .with_context(|| format!("{origin}: not a valid Llama config.json"))?;
        let archs = raw.architectures.clone().unwrap_or_default();
        let is_llama = raw.model_type.as_deref() == Some("llama")
            || archs.iter().any(|a| a == "LlamaForCausalLM");
        if !is_llama {
            bail!(
                "{origin}: unsupported architecture {:?} (model_type {:?}); quantbench runs Llama-family models (LlamaForCausalLM)",
                archs,
                raw.model_type.unwrap_or_default()
            );
        }
        if let Some(act) = &raw.hidden_act
            && act != "silu"
        {
            bail!("{origin}: unsupported hidden_act '{act}'; Llama uses silu");
        }
        let rope_scaling = match &raw.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                if kind != "llama3" {
                    bail!(
                        "{origin}: unsupported rope_scaling type '{kind}'; only llama3 scaling is implemented"
                    );
                }
                Some(
                    serde_json::from_value(v.clone())
                        .with_context(|| format!("{origin}: malformed llama3 rope_scaling"))?,
                )
            }
        };
        let eos_token_ids = match raw.eos_token_id {
            None | Some(serde_json::Value::Null) => vec![],
            Some(v) => {
                serde_json::from_value::<EosIds>(v)
                    .with_context(|| format!("{origin}: malformed eos_token_id"))?
                    .0
            }
        };
        let cfg = LlamaConfig {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
        };
        cfg.validate().with_context(|| origin.to_string())?;
        Ok(cfg)
    }

    /// Serializes to an HF-compatible `config.json` document.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids,
            "torch_dtype": "float32",
        });
        if let Some(s) = &self.rope_scaling {
            v["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            });
        }
        v
    }

    /// Checks the shape constraints the engine relies on.
    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            bail!("num_attention_heads and num_key_value_heads must be positive");
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            bail!("head_dim ({}) must be even and positive", self.head_dim);
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.num_hidden_layers == 0 {
            bail!("hidden_size, vocab_size and num_hidden_layers must be positive");
        }
        Ok(())
    }

    /// Width of the concatenated query heads.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Total parameter count (embeddings counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let h = self.hidden_size;
        let per_layer = h * self.q_dim()
            + 2 * h * self.kv_dim()
            + self.q_dim() * h
            + 3 * h * self.intermediate_size
            + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * per_layer + h + head
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }
}

/// `eos_token_id` is either one id or a list.
#[derive(Deserialize)]
struct EosIds(#[serde(deserialize_with = "one_or_many")] Vec<u32>);

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(x) => vec![x],
        OneOrMany::Many(v) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_3_2_1b_config_parses_and_counts_parameters() {
        let text = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":2048,
        "intermediate_size":8192,"num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,
        "head_dim":64,"vocab_size":128256,"rms_norm_eps":1e-5,"rope_theta":500000.0,
        "rope_scaling":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
        "original_max_position_embeddings":8192,"rope_type":"llama3"},"max_position_embeddings":131072,
        "tie_word_embeddings":true,"bos_token_id":128000,"eos_token_id":128001,"hidden_act":"silu"}"#;
        let c = LlamaConfig::from_hf_json(text, "config.json").unwrap();
        assert_eq!(c.parameter_count(), 1_235_814_400);
        assert_eq!(c.eos_token_ids, vec![128001]);
        assert_eq!(c.rope_scaling.as_ref().unwrap().factor, 32.0);
        let back = LlamaConfig::from_hf_json(&c.to_hf_json().to_string(), "x").unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let text = r#"{"architectures":["MistralForCausalLM"],"model_type":"mistral","hidden_size":8,
        "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"vocab_size":8}"#;
        let e = LlamaConfig::from_hf_json(text, "m/config.json").unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("m/config.json") && msg.contains("MistralForCausalLM"),
            "{msg}"
        );
    }
}
