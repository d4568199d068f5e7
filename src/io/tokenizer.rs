//! Text ↔ token ids. Wraps the `tokenizers` crate; builds tokenizers from an
//! HF `tokenizer.json`, from GGUF vocab/merges, or byte-level for synthetic models.

use std::path::Path;

use anyhow::{Result, anyhow};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer as HfTokenizer,
};

/// The word-splitting rule applied before byte-level BPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BpeSplit {
    /// GPT-2's regex (the `tokenizers` ByteLevel pre-tokenizer).
    Gpt2,
    /// Every digit on its own, then GPT-2's regex (SmolLM, StarCoder).
    DigitsThenGpt2,
    /// Llama 3's regex (digits in groups of up to three), merges ignored for
    /// words that are whole tokens.
    Llama3,
}

/// Llama 3's pre-tokenizer regex (from its tokenizer.json).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl BpeSplit {
    fn pre_tokenizer(self) -> Result<PreTokenizerWrapper> {
        Ok(match self {
            BpeSplit::Gpt2 => ByteLevel::new(false, true, true).into(),
            BpeSplit::DigitsThenGpt2 => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            BpeSplit::Llama3 => Sequence::new(vec![
                Split::new(
                    SplitPattern::Regex(LLAMA3_SPLIT.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| anyhow!("invalid Llama 3 split regex: {e}"))?
                .into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into(),
        })
    }
}

/// A tokenizer plus the special ids generation needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: HfTokenizer,
    /// Prepended by `encode(_, true)` when set.
    pub bos_id: Option<u32>,
    /// Any of these ends generation.
    pub eos_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

impl Tokenizer {
    /// Wraps an already-built `tokenizers` tokenizer.
    pub fn new(inner: HfTokenizer, bos_id: Option<u32>, eos_ids: Vec<u32>) -> Self {
        Tokenizer {
            inner,
            bos_id,
            eos_ids,
        }
    }

    /// Loads an HF `tokenizer.json`.
    pub fn from_file(path: &Path, bos_id: Option<u32>, eos_ids: Vec<u32>) -> Result<Self> {
        let inner = HfTokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        Ok(Self::new(inner, bos_id, eos_ids))
    }

    /// A GPT-2 style byte-level BPE from a vocabulary (token strings in id
    /// order) and merge rules; `specials` are matched verbatim before BPE.
    pub fn byte_level_bpe(
        tokens: &[String],
        merges: &[(String, String)],
        specials: &[String],
        bos_id: Option<u32>,
        eos_ids: Vec<u32>,
    ) -> Result<Self> {
        Self::byte_level_bpe_with(tokens, merges, specials, BpeSplit::Gpt2, bos_id, eos_ids)
    }

    /// [`Tokenizer::byte_level_bpe`] with the given word-splitting rule.
    pub fn byte_level_bpe_with(
        tokens: &[String],
        merges: &[(String, String)],
        specials: &[String],
        split: BpeSplit,
        bos_id: Option<u32>,
        eos_ids: Vec<u32>,
    ) -> Result<Self> {
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges.to_vec())
            .ignore_merges(split == BpeSplit::Llama3)
            .build()
            .map_err(|e| anyhow!("invalid BPE vocabulary: {e}"))?;
        let mut inner = HfTokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(split.pre_tokenizer()?));
        inner.with_decoder(Some(ByteLevel::default()));
        let specials: Vec<AddedToken> = specials
            .iter()
            .map(|s| AddedToken::from(s.clone(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| anyhow!("invalid special tokens: {e}"))?;
        Ok(Self::new(inner, bos_id, eos_ids))
    }

    /// A byte-level tokenizer with one token per byte (ids 0..256) and the
    /// specials `<|bos|>` = 256, `<|eos|>` = 257; used by synthetic models.
    pub fn bytes_only() -> Result<Self> {
        let byte_chars = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet();
        let mut chars: Vec<char> = byte_chars.into_iter().collect();
        chars.sort_by_key(|c| byte_of_char(*c));
        let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        tokens.push("<|bos|>".into());
        tokens.push("<|eos|>".into());
        let specials = vec!["<|bos|>".to_string(), "<|eos|>".to_string()];
        Self::byte_level_bpe(&tokens, &[], &specials, Some(256), vec![257])
    }

    /// Encodes text; prepends the BOS id when `add_bos` and one is known.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizer failed to encode: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && let Some(b) = self.bos_id {
            ids.push(b);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text, dropping special tokens and ids the vocabulary lacks.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let size = self.vocab_size() as u32;
        let known: Vec<u32> = ids.iter().copied().filter(|&i| i < size).collect();
        self.inner
            .decode(&known, true)
            .map_err(|e| anyhow!("tokenizer failed to decode: {e}"))
    }

    /// Number of ids the tokenizer knows, specials included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers` object (for saving as tokenizer.json).
    pub fn inner(&self) -> &HfTokenizer {
        &self.inner
    }
}

/// Inverse of GPT-2's byte → printable-char map.
fn byte_of_char(c: char) -> u32 {
    let cp = c as u32;
    let direct =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    if direct(cp) {
        return cp;
    }
    // Non-printable bytes were mapped to 256, 257, ... in byte order.
    let mut n = 0;
    for b in 0..256u32 {
        if !direct(b) {
            if cp == 256 + n {
                return b;
            }
            n += 1;
        }
    }
    unreachable!("character {c:?} is not in the byte-level alphabet")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_only_round_trips_any_text() {
        let t = Tokenizer::bytes_only().unwrap();
        for text in ["hello world", "Q: ünïcödé\n\nA: 42!", "  spaces  ", ""] {
            let ids = t.encode(text, true).unwrap();
            assert_eq!(ids.first(), Some(&256));
            assert_eq!(ids.len(), text.len() + 1, "one token per byte");
            assert_eq!(t.decode(&ids).unwrap(), text);
        }
        assert_eq!(t.encode("A", false).unwrap(), vec![65]);
    }
}
