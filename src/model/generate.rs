//! Greedy generation over ragged batches, with stop strings and EOS.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::forward::Model;
use crate::backend::{Backend, StepLayout};
use crate::io::tokenizer::Tokenizer;

/// How long to generate and when to stop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// At most this many new tokens per prompt.
    pub max_new_tokens: usize,
    /// Generation ends when the decoded continuation contains one of these;
    /// the returned text is cut before it.
    pub stop_strings: Vec<String>,
    /// Whether an EOS id ends generation (the EOS token is not part of the text).
    pub stop_at_eos: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 32,
            stop_strings: vec![],
            stop_at_eos: true,
        }
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
}

/// One prompt's continuation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Generated ids (EOS excluded).
    pub tokens: Vec<u32>,
    /// Decoded continuation, cut before the first stop string.
    pub text: String,
    pub stop: StopReason,
}

struct Running {
    slot: usize,
    prompt_len: usize,
    tokens: Vec<u32>,
}

/// Greedy continuation of every prompt (token ids, BOS included if wanted),
/// all sequences advancing together; each sequence's result is independent of
/// the others in the batch.
pub fn generate<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Vec<Option<Generation>>> {
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        bail!("prompt {i} is empty: it needs at least one token (a BOS token will do)");
    }
    let mut results: Vec<Option<Generation>> = vec![None; prompts.len()];
    if prompts.is_empty() || cfg.max_new_tokens == 0 {
        for r in &mut results {
            *r = Some(Generation {
                tokens: vec![],
                text: String::new(),
                stop: StopReason::MaxTokens,
            });
        }
        return Ok(results);
    }
    let max_prompt = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_len = max_prompt + cfg.max_new_tokens;
    if max_len > model.config.max_position_embeddings {
        bail!(
            "prompt of {max_prompt} tokens + {} new tokens exceeds the model's {} positions",
            cfg.max_new_tokens,
            model.config.max_position_embeddings
        );
    }
    let mut cache = model.new_cache(prompts.len(), max_len)?;
    let mut running: Vec<Running> = prompts
        .iter()
        .enumerate()
        .map(|(slot, p)| Running {
            slot,
            prompt_len: p.len(),
            tokens: vec![],
        })
        .collect();
    let mut layout = StepLayout::new(
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| (i, 0, p.as_slice())),
    )?;
    while !running.is_empty() {
        let next = model.greedy(&layout, &mut cache)?;
        let mut still = Vec::with_capacity(running.len());
        for (mut seq, id) in running.into_iter().zip(next) {
            match finish(&mut seq, id, tokenizer, cfg)? {
                Some(done) => results[seq.slot] = Some(done),
                None => still.push(seq),
            }
        }
        running = still;
        let parts: Vec<(usize, usize, Vec<u32>)> = running
            .iter()
            .map(|s| {
                (
                    s.slot,
                    s.prompt_len + s.tokens.len() - 1,
                    vec![*s.tokens.last().expect("one token generated")],
                )
            })
            .collect();
        layout = StepLayout::new(
            parts
                .iter()
                .map(|(slot, start, t)| (*slot, *start, t.as_slice())),
        )?;
    }
    Ok(results)
}

/// Appends `id` to `seq` and returns its result if generation ends here.
fn finish(
    seq: &mut Running,
    id: u32,
    tokenizer: &Tokenizer,
    cfg: &GenerationConfig,
) -> Result<Option<Generation>> {
    if cfg.stop_at_eos && tokenizer.eos_ids.contains(&id) {
        let text = tokenizer.decode(&seq.tokens)?;
        return Ok(Some(Generation {
            tokens: std::mem::take(&mut seq.tokens),
            text,
            stop: StopReason::Eos,
        }));
    }
    seq.tokens.push(id);
    let text = if cfg.stop_strings.is_empty() && seq.tokens.len() < cfg.max_new_tokens {
        None
    } else {
        Some(tokenizer.decode(&seq.tokens)?)
    };
    if let Some(text) = &text
        && let Some(cut) = cfg
            .stop_strings
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
    {
        return Ok(Some(Generation {
            tokens: std::mem::take(&mut seq.tokens),
            text: text[..cut].to_string(),
            stop: StopReason::StopString,
        }));
    }
    if seq.tokens.len() >= cfg.max_new_tokens {
        return Ok(Some(Generation {
            tokens: std::mem::take(&mut seq.tokens),
            text: text.unwrap_or_default(),
            stop: StopReason::MaxTokens,
        }));
    }
    Ok(None)
}
