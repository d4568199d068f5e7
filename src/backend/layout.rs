//! The flat, padding-free layout of one forward step.

use anyhow::{Result, bail};

/// The new tokens of one sequence within a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqChunk {
    /// KV-cache slot holding this sequence.
    pub slot: usize,
    /// Position of the chunk's first token (= tokens already in the cache).
    pub start: usize,
    /// Number of new tokens.
    pub len: usize,
}

/// Token ids and sequence boundaries of a step; tokens of `seqs[0]` come
/// first, then those of `seqs[1]`, and so on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepLayout {
    pub tokens: Vec<u32>,
    pub seqs: Vec<SeqChunk>,
}

impl StepLayout {
    /// Builds a layout from per-sequence `(slot, start, new tokens)`.
    pub fn new<'a>(parts: impl IntoIterator<Item = (usize, usize, &'a [u32])>) -> Result<Self> {
        let mut layout = StepLayout::default();
        for (slot, start, toks) in parts {
            if toks.is_empty() {
                bail!("sequence in slot {slot} has no tokens in this step");
            }
            if layout.seqs.iter().any(|s| s.slot == slot) {
                bail!("slot {slot} appears twice in one step");
            }
            layout.seqs.push(SeqChunk {
                slot,
                start,
                len: toks.len(),
            });
            layout.tokens.extend_from_slice(toks);
        }
        Ok(layout)
    }

    /// Number of tokens in the step.
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// For every token: `(slot, position)`.
    pub fn token_positions(&self) -> Vec<(usize, usize)> {
        self.seqs
            .iter()
            .flat_map(|s| (0..s.len).map(move |i| (s.slot, s.start + i)))
            .collect()
    }

    /// Row index of each sequence's last token.
    pub fn last_rows(&self) -> Vec<usize> {
        let mut row = 0;
        self.seqs
            .iter()
            .map(|s| {
                row += s.len;
                row - 1
            })
            .collect()
    }

    /// Longest context any sequence reaches after this step.
    pub fn max_end(&self) -> usize {
        self.seqs.iter().map(|s| s.start + s.len).max().unwrap_or(0)
    }
}
