//! How far a quantized model's next-token distributions move from the base
//! model's on the same tokens: mean KL(base‖quantized) per token (log-softmax
//! in f64) and the fraction of positions where both pick the same top-1 token.

use anyhow::{Result, bail, ensure};

use crate::backend::Backend;
use crate::io::tokenizer::Tokenizer;
use crate::model::Model;

/// The built-in English text used when no `--text` is given.
pub const DEFAULT_TEXT: &str = include_str!("../../data/divergence-text.txt");

/// Divergence of a quantized model from its base over some tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Divergence {
    /// Σ KL(base‖quant) over the positions, in nats.
    pub kl_sum: f64,
    /// Positions where both models' argmax agree.
    pub top1_matches: usize,
    /// Positions compared.
    pub tokens: usize,
}

impl Divergence {
    /// Mean KL(base‖quant) per token, in nats (0 when no tokens).
    pub fn mean_kl(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.kl_sum / self.tokens as f64
        }
    }

    /// Fraction of positions whose top-1 tokens agree (0 when no tokens).
    pub fn top1_agreement(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.top1_matches as f64 / self.tokens as f64
        }
    }

    /// Adds the positions of `other`.
    pub fn merge(&mut self, other: Divergence) {
        self.kl_sum += other.kl_sum;
        self.top1_matches += other.top1_matches;
        self.tokens += other.tokens;
    }
}

/// `log softmax(logits)` in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let lse = max
        + logits
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&v| v as f64 - lse).collect()
}

/// KL(p‖q) = Σ p (log p − log q) of the softmax distributions of two logit rows.
pub fn kl_divergence(base: &[f32], quant: &[f32]) -> f64 {
    let (lp, lq) = (log_softmax(base), log_softmax(quant));
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| {
            if a.is_finite() {
                a.exp() * (a - b)
            } else {
                0.0
            }
        })
        .sum()
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Compares two `[tokens, vocab]` logit matrices position by position.
pub fn compare_logits(base: &[f32], quant: &[f32], vocab: usize) -> Result<Divergence> {
    ensure!(vocab > 0, "vocabulary size must be positive");
    ensure!(
        base.len() == quant.len() && base.len().is_multiple_of(vocab),
        "logit matrices differ in size ({} vs {} values, vocab {vocab})",
        base.len(),
        quant.len()
    );
    let mut d = Divergence::default();
    for (b, q) in base.chunks(vocab).zip(quant.chunks(vocab)) {
        d.kl_sum += kl_divergence(b, q);
        d.top1_matches += (argmax(b) == argmax(q)) as usize;
        d.tokens += 1;
    }
    Ok(d)
}

/// Tokens the runner compares when an experiment does not say.
pub const DEFAULT_TOKENS: usize = 256;

/// Encodes `text` (with the BOS id when the tokenizer has one), keeps the
/// first `max_tokens` ids and splits them into consecutive windows of at most
/// `window` tokens, each run from an empty cache.
pub fn text_windows(
    tokenizer: &Tokenizer,
    text: &str,
    max_tokens: usize,
    window: usize,
) -> Result<Vec<Vec<u32>>> {
    if window == 0 {
        bail!("window length must be at least 1 token");
    }
    let mut tokens = tokenizer.encode(text, true)?;
    tokens.truncate(max_tokens);
    if tokens.len() < 2 {
        bail!(
            "the text gives {} tokens; divergence needs at least 2 (pass a longer text or more tokens)",
            tokens.len()
        );
    }
    Ok(tokens.chunks(window).map(<[u32]>::to_vec).collect())
}

/// The base model's logits on some token windows, kept so that quantized
/// models can be compared against them without the base model resident.
#[derive(Clone, Debug)]
pub struct Reference {
    windows: Vec<Vec<u32>>,
    logits: Vec<Vec<f32>>,
    vocab: usize,
}

impl Reference {
    /// Runs `base` on every window.
    pub fn compute<B: Backend>(base: &Model<B>, windows: Vec<Vec<u32>>) -> Result<Self> {
        let logits = windows
            .iter()
            .map(|w| base.sequence_logits(w))
            .collect::<Result<Vec<_>>>()?;
        Ok(Reference {
            windows,
            logits,
            vocab: base.config.vocab_size,
        })
    }

    /// Positions compared.
    pub fn tokens(&self) -> usize {
        self.windows.iter().map(Vec::len).sum()
    }

    /// Number of windows.
    pub fn windows(&self) -> usize {
        self.windows.len()
    }

    /// Runs `quant` on the same windows and compares position by position.
    pub fn compare<B: Backend>(&self, quant: &Model<B>) -> Result<Divergence> {
        ensure!(
            quant.config.vocab_size == self.vocab,
            "the compared model has a vocabulary of {}, the base model {}",
            quant.config.vocab_size,
            self.vocab
        );
        let mut total = Divergence::default();
        for (w, base) in self.windows.iter().zip(&self.logits) {
            let q = quant.sequence_logits(w)?;
            total.merge(compare_logits(base, &q, self.vocab)?);
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_kl_and_top1() {
        // p = softmax(0, ln 3) = (1/4, 3/4); q = softmax(0, 0) = (1/2, 1/2).
        // KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812035...
        let kl = kl_divergence(&[0.0, 3f32.ln()], &[0.0, 0.0]);
        let want = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        assert!((kl - want).abs() < 1e-7, "{kl} vs {want}");
        assert!((want - 0.130_812_035).abs() < 1e-8);
        // Two positions: the first as above (argmax 1 vs 0 on the tie: disagree),
        // the second identical up to a constant shift (KL 0, agree).
        let base = [0.0, 3f32.ln(), 1.0, 2.0];
        let quant = [0.0, 0.0, 11.0, 12.0];
        let d = compare_logits(&base, &quant, 2).unwrap();
        assert_eq!((d.tokens, d.top1_matches), (2, 1));
        assert!((d.mean_kl() - want / 2.0).abs() < 1e-7);
        assert_eq!(d.top1_agreement(), 0.5);
        let ls = log_softmax(&[1.0, 2.0, 3.0]);
        let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((ls[0] - (1.0 - lse)).abs() < 1e-12);
        assert!(compare_logits(&base, &quant[..2], 2).is_err());
    }

    #[test]
    fn a_model_against_itself_has_zero_kl_and_full_agreement() {
        use crate::backend::cpu::CpuBackend;
        use crate::io::synth_tokenizer;
        use crate::model::synth::{synth_config, synth_weights};
        let (cfg, dtype) = synth_config("tiny").unwrap();
        let w = synth_weights(&cfg, dtype, 3).unwrap();
        let tok = synth_tokenizer(&cfg).unwrap();
        let text = "The quick brown fox jumps over the lazy dog.";
        let win = text_windows(&tok, text, 40, 16).unwrap();
        // Byte tokens: BOS + 44 bytes, cut to 40, in windows of 16.
        assert_eq!(
            win.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![16, 16, 8]
        );
        assert_eq!(win[0][1], u32::from(b'T'));
        let reference =
            Reference::compute(&Model::new(CpuBackend::new(), &w).unwrap(), win).unwrap();
        assert_eq!((reference.tokens(), reference.windows()), (40, 3));
        let d = reference
            .compare(&Model::new(CpuBackend::new(), &w).unwrap())
            .unwrap();
        assert_eq!(d.tokens, 40);
        assert_eq!(d.top1_matches, 40);
        assert!(d.mean_kl().abs() < 1e-12, "{}", d.mean_kl());
        assert!(text_windows(&tok, text, 40, 0).is_err());
        assert!(text_windows(&tok, "", 40, 16).is_err());
    }

    #[test]
    fn a_quantized_model_diverges_a_little() {
        use crate::backend::cpu::CpuBackend;
        use crate::io::synth_tokenizer;
        use crate::model::synth::{synth_config, synth_weights};
        use crate::quant::{QuantContext, QuantSpec, quantize_model};
        let (cfg, dtype) = synth_config("tiny").unwrap();
        let w = synth_weights(&cfg, dtype, 3).unwrap();
        let tok = synth_tokenizer(&cfg).unwrap();
        let win = text_windows(&tok, DEFAULT_TEXT, 64, 32).unwrap();
        let reference =
            Reference::compute(&Model::new(CpuBackend::new(), &w).unwrap(), win).unwrap();
        let mut q = w.clone();
        let spec = QuantSpec::parse("nf4").unwrap();
        quantize_model(&mut q, &spec, &QuantContext { tokenizer: &tok }).unwrap();
        let d = reference
            .compare(&Model::new(CpuBackend::new(), &q).unwrap())
            .unwrap();
        assert_eq!(d.tokens, 64);
        assert!(d.mean_kl() > 0.0 && d.mean_kl().is_finite(), "{d:?}");
        assert!(d.top1_matches <= 64);
    }
}
