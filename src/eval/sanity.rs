//! The original study's sanity check: three short prompts continued greedily,
//! to see at a glance whether a quantized model still produces sense.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::encode::{BosPolicy, resolve_bos};
use crate::backend::Backend;
use crate::io::tokenizer::Tokenizer;
use crate::model::{GenerationConfig, Model, StopReason, generate};

/// The three prompts of the original study.
pub const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "def fibonacci(n):",
    "Question: What is 2 + 2?\nAnswer:",
];

/// New tokens per prompt by default.
pub const DEFAULT_NEW_TOKENS: usize = 32;

/// One prompt and its greedy continuation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SanitySample {
    pub prompt: String,
    /// The continuation (without the prompt).
    pub output: String,
    /// Generated tokens (EOS excluded).
    pub new_tokens: usize,
    pub stop: StopReason,
}

/// All samples of a sanity run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SanityResult {
    pub samples: Vec<SanitySample>,
    pub max_new_tokens: usize,
    pub bos_added: bool,
    pub generate_s: f64,
}

/// Continues each prompt greedily for up to `max_new_tokens` (stopping at
/// EOS), all prompts in one batch.
pub fn run<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    prompts: &[&str],
    max_new_tokens: usize,
    bos: BosPolicy,
) -> Result<SanityResult> {
    let add_bos = resolve_bos(bos, tokenizer)?;
    let ids = prompts
        .iter()
        .map(|p| {
            let ids = tokenizer.encode(p, add_bos)?;
            if ids.is_empty() {
                bail!("sanity prompt {p:?} encodes to no tokens and the model has no BOS to start from");
            }
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    let cfg = GenerationConfig {
        max_new_tokens,
        stop_strings: vec![],
        stop_at_eos: true,
    };
    let start = Instant::now();
    let gens = generate(model, tokenizer, &ids, &cfg)?;
    let generate_s = start.elapsed().as_secs_f64();
    let samples = prompts
        .iter()
        .zip(gens)
        .map(|(p, g)| {
            let g = g.context("generation returned no result for a sanity prompt")?;
            Ok(SanitySample {
                prompt: p.to_string(),
                output: g.text,
                new_tokens: g.tokens.len(),
                stop: g.stop,
            })
        })
        .collect::<Result<_>>()?;
    Ok(SanityResult {
        samples,
        max_new_tokens,
        bos_added: add_bos,
        generate_s,
    })
}
