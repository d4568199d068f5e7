//! Seeded random weights for named model shapes (`synth:<name>`), for tests
//! and for speed/memory measurement where real weights cannot travel.

use std::collections::HashMap;

use anyhow::{Result, bail};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

use super::config::{Llama3RopeScaling, LlamaConfig};
use super::weights::LlamaWeights;
use crate::tensor::{DType, HostTensor};

/// Names accepted by [`synth_config`].
pub const SYNTH_NAMES: [&str; 4] = ["tiny", "tiny-untied", "smollm2-135m", "llama-3.2-1b"];

/// The shape and storage dtype of a named synthetic model.
pub fn synth_config(name: &str) -> Result<(LlamaConfig, DType)> {
    let tiny = LlamaConfig {
        hidden_size: 64,
        intermediate_size: 176,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        vocab_size: 320,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: Some(Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        }),
        max_position_embeddings: 4096,
        tie_word_embeddings: true,
        bos_token_id: Some(256),
        eos_token_ids: vec![257],
    };
    Ok(match name {
        "tiny" => (tiny, DType::F32),
        "tiny-untied" => (
            LlamaConfig {
                tie_word_embeddings: false,
                rope_scaling: None,
                ..tiny
            },
            DType::F32,
        ),
        "smollm2-135m" => (
            LlamaConfig {
                hidden_size: 576,
                intermediate_size: 1536,
                num_hidden_layers: 30,
                num_attention_heads: 9,
                num_key_value_heads: 3,
                head_dim: 64,
                vocab_size: 49152,
                rms_norm_eps: 1e-5,
                rope_theta: 100000.0,
                rope_scaling: None,
                max_position_embeddings: 8192,
                tie_word_embeddings: true,
                bos_token_id: Some(1),
                eos_token_ids: vec![2],
            },
            DType::BF16,
        ),
        "llama-3.2-1b" => (
            LlamaConfig {
                hidden_size: 2048,
                intermediate_size: 8192,
                num_hidden_layers: 16,
                num_attention_heads: 32,
                num_key_value_heads: 8,
                head_dim: 64,
                vocab_size: 128256,
                rms_norm_eps: 1e-5,
                rope_theta: 500000.0,
                rope_scaling: Some(Llama3RopeScaling {
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                }),
                max_position_embeddings: 131072,
                tie_word_embeddings: true,
                bos_token_id: Some(128000),
                eos_token_ids: vec![128001],
            },
            DType::BF16,
        ),
        other => bail!(
            "unknown synthetic model 'synth:{other}'; known: {}",
            SYNTH_NAMES.map(|n| format!("synth:{n}")).join(", ")
        ),
    })
}

/// Deterministic seed for one tensor, so tensors can be generated in parallel.
fn tensor_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(seed ^ 0x9E37_79B9_7F4A_7C15, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01B3)
    })
}

fn random_tensor(shape: Vec<usize>, mean: f32, std: f32, seed: u64, dtype: DType) -> HostTensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(mean, std).expect("std is positive");
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|_| dtype.round(normal.sample(&mut rng)))
        .collect();
    HostTensor { shape, dtype, data }
}

/// Random weights for `config`: linears ~ N(0, 1/in), embeddings ~ N(0, 1),
/// norm weights ~ N(1, 0.1²); values rounded to `dtype`.
pub fn synth_weights(config: &LlamaConfig, dtype: DType, seed: u64) -> Result<LlamaWeights> {
    let c = config;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let mut specs: Vec<(String, Vec<usize>, f32, f32)> = vec![
        (
            "model.embed_tokens.weight".into(),
            vec![c.vocab_size, h],
            0.0,
            1.0,
        ),
        ("model.norm.weight".into(), vec![h], 1.0, 0.1),
    ];
    if !c.tie_word_embeddings {
        let std = 1.0 / (h as f32).sqrt();
        specs.push(("lm_head.weight".into(), vec![c.vocab_size, h], 0.0, std));
    }
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        for (name, out, inp) in [
            ("self_attn.q_proj", c.q_dim(), h),
            ("self_attn.k_proj", c.kv_dim(), h),
            ("self_attn.v_proj", c.kv_dim(), h),
            ("self_attn.o_proj", h, c.q_dim()),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            let std = 1.0 / (inp as f32).sqrt();
            specs.push((format!("{p}{name}.weight"), vec![out, inp], 0.0, std));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            specs.push((format!("{p}{norm}.weight"), vec![h], 1.0, 0.1));
        }
    }
    let tensors: HashMap<String, HostTensor> = specs
        .into_par_iter()
        .map(|(name, shape, mean, std)| {
            let t = random_tensor(shape, mean, std, tensor_seed(seed, &name), dtype);
            (name, t)
        })
        .collect();
    LlamaWeights::from_tensors(config.clone(), tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synth_is_seeded_and_shaped() {
        let (cfg, dtype) = synth_config("tiny").unwrap();
        let a = synth_weights(&cfg, dtype, 7).unwrap();
        let b = synth_weights(&cfg, dtype, 7).unwrap();
        let c = synth_weights(&cfg, dtype, 8).unwrap();
        assert_eq!(a.embed_tokens, b.embed_tokens);
        assert_ne!(a.embed_tokens, c.embed_tokens);
        assert_eq!(a.layers.len(), 2);
        assert!(a.embed_tokens.data.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn llama_1b_shape_has_reference_parameter_count() {
        let (cfg, _) = synth_config("llama-3.2-1b").unwrap();
        assert_eq!(cfg.parameter_count(), 1_235_814_400);
        assert!(
            synth_config("nope")
                .unwrap_err()
                .to_string()
                .contains("synth:tiny")
        );
    }
}
