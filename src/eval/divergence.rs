//! How far a quantized model's next-token distributions move from the base
//! model's on the same tokens: mean KL(base‖quantized) per token (log-softmax
//! in f64) and the fraction of positions where both pick the same top-1 token.

use anyhow::{Result, bail, ensure};

use crate::backend::Backend;
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

/// Splits `tokens` into consecutive windows of at most `window` tokens.
pub fn windows(tokens: &[u32], window: usize) -> Result<Vec<&[u32]>> {
    if window == 0 {
        bail!("window length must be at least 1 token");
    }
    Ok(tokens.chunks(window).collect())
}

/// Runs both models on every window and compares their logits at every position.
pub fn divergence<B: Backend, C: Backend>(
    base: &Model<B>,
    quant: &Model<C>,
    windows: &[&[u32]],
    vocab: usize,
) -> Result<Divergence> {
    let mut total = Divergence::default();
    for w in windows {
        let b = base.sequence_logits(w)?;
        let q = quant.sequence_logits(w)?;
        total.merge(compare_logits(&b, &q, vocab)?);
    }
    Ok(total)
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
        use crate::model::synth::{synth_config, synth_weights};
        let (cfg, dtype) = synth_config("tiny").unwrap();
        let w = synth_weights(&cfg, dtype, 3).unwrap();
        let a = Model::new(CpuBackend::new(), &w).unwrap();
        let b = Model::new(CpuBackend::new(), &w).unwrap();
        let tokens: Vec<u32> = (0..40).map(|i| (i * 7 % cfg.vocab_size) as u32).collect();
        let win = windows(&tokens, 16).unwrap();
        assert_eq!(
            win.iter().map(|w| w.len()).collect::<Vec<_>>(),
            vec![16, 16, 8]
        );
        let d = divergence(&a, &b, &win, cfg.vocab_size).unwrap();
        assert_eq!(d.tokens, 40);
        assert_eq!(d.top1_matches, 40);
        assert!(d.mean_kl().abs() < 1e-12, "{}", d.mean_kl());
        assert!(windows(&tokens, 0).is_err());
    }
}
