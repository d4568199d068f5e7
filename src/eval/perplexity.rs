//! Perplexity of a text with a sliding window, as in the Hugging Face
//! perplexity guide: windows of `context` tokens start every `stride` tokens,
//! and each window scores only the tokens no earlier window scored, with the
//! rest of the window as their context. Log-softmax in f64.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::encode::{BosPolicy, resolve_bos};
use crate::backend::{Backend, StepLayout};
use crate::io::tokenizer::Tokenizer;
use crate::model::Model;

/// Tokens per forward step inside a window (bounds the logits held at once).
const CHUNK: usize = 256;

/// Window settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PerplexityOptions {
    /// Tokens per window (the model sees at most this much context).
    pub context: usize,
    /// Start of one window to the next; at most `context`.
    pub stride: usize,
    /// Whether the text starts with BOS.
    pub bos: BosPolicy,
    /// Score only the first this many tokens of the text.
    pub max_tokens: Option<usize>,
}

impl Default for PerplexityOptions {
    fn default() -> Self {
        PerplexityOptions {
            context: 1024,
            stride: 512,
            bos: BosPolicy::Auto,
            max_tokens: None,
        }
    }
}

/// Result of a perplexity run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PerplexityResult {
    /// exp(mean negative log-likelihood per scored token).
    pub perplexity: f64,
    /// Mean negative log-likelihood per scored token, in nats.
    pub nll_mean: f64,
    /// Tokens predicted and scored (the first token has no context and is not).
    pub scored_tokens: usize,
    /// Tokens of the text (BOS included when added).
    pub total_tokens: usize,
    pub windows: usize,
    pub context: usize,
    pub stride: usize,
    pub bos_added: bool,
    pub seconds: f64,
}

/// One window: tokens `begin..end`, scoring targets `score_from..end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub begin: usize,
    pub end: usize,
    pub score_from: usize,
}

/// The windows over `n` tokens. A target needs at least one token of context
/// inside its window, so a window never scores its own first token.
pub fn windows(n: usize, context: usize, stride: usize) -> Vec<Window> {
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < n && context > 0 && stride > 0 {
        let end = (begin + context).min(n);
        let score_from = prev_end.max(begin + 1);
        if score_from < end {
            out.push(Window {
                begin,
                end,
                score_from,
            });
        }
        prev_end = end;
        if end == n {
            break;
        }
        begin += stride;
    }
    out
}

/// Perplexity of the UTF-8 text file at `path`.
pub fn perplexity_of_file<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    path: &Path,
    opts: &PerplexityOptions,
) -> Result<PerplexityResult> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "{}: cannot read the text for perplexity (UTF-8 expected)",
            path.display()
        )
    })?;
    perplexity(model, tokenizer, &text, opts)
        .with_context(|| format!("perplexity of {}", path.display()))
}

/// Perplexity of `text`.
pub fn perplexity<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    text: &str,
    opts: &PerplexityOptions,
) -> Result<PerplexityResult> {
    let add_bos = resolve_bos(opts.bos, tokenizer)?;
    let mut ids = tokenizer.encode(text, add_bos)?;
    if let Some(m) = opts.max_tokens {
        ids.truncate(m);
    }
    let mut r = perplexity_of_tokens(model, &ids, opts)?;
    r.bos_added = add_bos;
    Ok(r)
}

/// Perplexity of a token sequence (`bos_added` is left false).
pub fn perplexity_of_tokens<B: Backend>(
    model: &Model<B>,
    ids: &[u32],
    opts: &PerplexityOptions,
) -> Result<PerplexityResult> {
    if opts.context < 2 || opts.stride == 0 || opts.stride > opts.context {
        bail!(
            "need context ≥ 2 and 1 ≤ stride ≤ context (got context {}, stride {})",
            opts.context,
            opts.stride
        );
    }
    if opts.context > model.config.max_position_embeddings {
        bail!(
            "context {} exceeds the model's {} positions",
            opts.context,
            model.config.max_position_embeddings
        );
    }
    if ids.len() < 2 {
        bail!(
            "the text has {} token(s); perplexity needs at least 2",
            ids.len()
        );
    }
    let start = Instant::now();
    let plan = windows(ids.len(), opts.context, opts.stride);
    let mut nll_sum = 0.0f64;
    let mut scored = 0usize;
    for w in &plan {
        let (sum, n) = window_nll(model, &ids[w.begin..w.end], w.score_from - w.begin)?;
        nll_sum += sum;
        scored += n;
    }
    let nll_mean = nll_sum / scored as f64;
    Ok(PerplexityResult {
        perplexity: nll_mean.exp(),
        nll_mean,
        scored_tokens: scored,
        total_tokens: ids.len(),
        windows: plan.len(),
        context: opts.context,
        stride: opts.stride,
        bos_added: false,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Sum of −log p(tokens[t] | tokens[..t]) for `t` in `from..len`, and the count.
pub fn window_nll<B: Backend>(
    model: &Model<B>,
    tokens: &[u32],
    from: usize,
) -> Result<(f64, usize)> {
    if from == 0 || from > tokens.len() {
        bail!("first scored token {from} must be in 1..={}", tokens.len());
    }
    let mut cache = model.new_cache(1, tokens.len())?;
    let mut sum = 0.0f64;
    let mut count = 0usize;
    let mut pos = 0;
    while pos < tokens.len() {
        let end = (pos + CHUNK).min(tokens.len());
        // Rows pos..end predict tokens pos+1..end+1; only some are targets.
        let needed = end > from - 1;
        let layout = StepLayout::new([(0, pos, &tokens[pos..end])])?;
        let logits = model.forward(&layout, &mut cache, needed)?;
        if needed {
            let (rows, vocab, values) = model.backend().to_host(&logits)?;
            debug_assert_eq!(rows, end - pos);
            for p in pos.max(from - 1)..end {
                let Some(&target) = tokens.get(p + 1) else {
                    break;
                };
                let row = &values[(p - pos) * vocab..(p - pos + 1) * vocab];
                sum += nll_of(row, target as usize)?;
                count += 1;
            }
        }
        pos = end;
    }
    Ok((sum, count))
}

/// −log softmax(row)[target] in f64.
pub fn nll_of(row: &[f32], target: usize) -> Result<f64> {
    let Some(&x) = row.get(target) else {
        bail!(
            "token id {target} is outside the model's {} logits",
            row.len()
        );
    };
    let max = row
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    let sum: f64 = row.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    Ok(max + sum.ln() - f64::from(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_score_each_token_once() {
        // 10 tokens, context 4, stride 2: windows 0..4 (scores 1..4),
        // 2..6 (4..6), 4..8 (6..8), 6..10 (8..10).
        let w = windows(10, 4, 2);
        let spans: Vec<_> = w.iter().map(|w| (w.begin, w.end, w.score_from)).collect();
        assert_eq!(spans, vec![(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]);
        // Stride = context: disjoint windows, each first token unscored.
        let spans: Vec<_> = windows(10, 4, 4)
            .iter()
            .map(|w| (w.begin, w.end, w.score_from))
            .collect();
        assert_eq!(spans, vec![(0, 4, 1), (4, 8, 5), (8, 10, 9)]);
        // Context covers everything: one window scoring 1..n.
        assert_eq!(
            windows(5, 8, 3),
            vec![Window {
                begin: 0,
                end: 5,
                score_from: 1
            }]
        );
        let total: usize = windows(1000, 128, 32)
            .iter()
            .map(|w| w.end - w.score_from)
            .sum();
        assert_eq!(total, 999);
    }

    #[test]
    fn nll_is_log_sum_exp_minus_logit() {
        // logits (0, ln 3): softmax (1/4, 3/4).
        let row = [0.0f32, 3f32.ln()];
        assert!((nll_of(&row, 1).unwrap() - (4.0f64 / 3.0).ln()).abs() < 1e-6);
        assert!((nll_of(&row, 0).unwrap() - 4f64.ln()).abs() < 1e-6);
        assert!(nll_of(&row, 2).is_err());
    }
}
