//! Turning evaluation text into prompt ids: whether a BOS token goes first,
//! and lm-eval's left truncation of over-long contexts.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::io::tokenizer::Tokenizer;

/// Whether prompts start with the BOS token.
///
/// lm-evaluation-harness (HF models, since its PR #3347, October 2025) leaves this to
/// the tokenizer: a Llama-3 tokenizer adds `<|begin_of_text|>`, a GPT-2 style
/// one (SmolLM2) adds nothing. `Auto` does the same; the two others force it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BosPolicy {
    /// Add BOS exactly when the tokenizer adds it when encoding with special tokens.
    #[default]
    Auto,
    /// Always prepend the BOS id (error if the tokenizer has none).
    Always,
    /// Never prepend it (lm-eval before v0.4.10 for every model but Gemma).
    Never,
}

impl FromStr for BosPolicy {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(BosPolicy::Auto),
            "always" | "yes" => Ok(BosPolicy::Always),
            "never" | "no" => Ok(BosPolicy::Never),
            _ => bail!("unknown BOS policy '{s}': expected auto, always or never"),
        }
    }
}

impl fmt::Display for BosPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BosPolicy::Auto => "auto",
            BosPolicy::Always => "always",
            BosPolicy::Never => "never",
        })
    }
}

/// Whether the tokenizer's own post-processing (what HF `tokenizer(text)`
/// does) puts its BOS id first.
pub fn tokenizer_adds_bos(tokenizer: &Tokenizer) -> Result<bool> {
    let Some(bos) = tokenizer.bos_id else {
        return Ok(false);
    };
    let enc = tokenizer
        .inner()
        .encode("a", true)
        .map_err(|e| anyhow!("tokenizer failed to encode a probe: {e}"))?;
    Ok(enc.get_ids().first() == Some(&bos))
}

/// Resolves `policy` for `tokenizer`: `true` when prompts get a BOS id.
pub fn resolve_bos(policy: BosPolicy, tokenizer: &Tokenizer) -> Result<bool> {
    match policy {
        BosPolicy::Auto => tokenizer_adds_bos(tokenizer),
        BosPolicy::Never => Ok(false),
        BosPolicy::Always if tokenizer.bos_id.is_some() => Ok(true),
        BosPolicy::Always => {
            bail!("--bos always: this model's tokenizer has no BOS token; use --bos auto or never")
        }
    }
}

/// Encodes `text` (with BOS when `add_bos`) and keeps at most the last
/// `max_tokens` ids, as lm-eval cuts a generation context to
/// `max_length − max_gen_toks` from the left. Returns the ids and whether
/// anything was cut.
pub fn encode_prompt(
    tokenizer: &Tokenizer,
    text: &str,
    add_bos: bool,
    max_tokens: usize,
) -> Result<(Vec<u32>, bool)> {
    if max_tokens == 0 {
        bail!("no room for a prompt: the generation budget uses every position of the model");
    }
    let mut ids = tokenizer.encode(text, add_bos)?;
    if ids.len() <= max_tokens {
        return Ok((ids, false));
    }
    ids.drain(..ids.len() - max_tokens);
    Ok((ids, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_resolve_for_a_tokenizer_without_post_processing() {
        let t = Tokenizer::bytes_only().unwrap();
        assert!(!resolve_bos(BosPolicy::Auto, &t).unwrap());
        assert!(resolve_bos(BosPolicy::Always, &t).unwrap());
        assert!(!resolve_bos(BosPolicy::Never, &t).unwrap());
        let no_bos = Tokenizer::new(t.inner().clone(), None, vec![257]);
        let err = resolve_bos(BosPolicy::Always, &no_bos).unwrap_err();
        assert!(err.to_string().contains("no BOS token"), "{err}");
        assert_eq!("never".parse::<BosPolicy>().unwrap(), BosPolicy::Never);
        assert!("maybe".parse::<BosPolicy>().is_err());
    }

    #[test]
    fn auto_follows_a_template_post_processor() {
        use tokenizers::processors::template::TemplateProcessing;
        let mut t = Tokenizer::bytes_only().unwrap();
        let mut inner = t.inner().clone();
        let tp = TemplateProcessing::builder()
            .try_single("<|bos|> $A")
            .unwrap()
            .special_tokens(vec![("<|bos|>", 256)])
            .build()
            .unwrap();
        inner.with_post_processor(Some(tp));
        t = Tokenizer::new(inner, t.bos_id, t.eos_ids.clone());
        assert!(resolve_bos(BosPolicy::Auto, &t).unwrap());
    }

    #[test]
    fn long_prompts_lose_their_beginning() {
        let t = Tokenizer::bytes_only().unwrap();
        let (ids, cut) = encode_prompt(&t, "abcdef", true, 4).unwrap();
        assert_eq!((ids, cut), (vec![99, 100, 101, 102], true));
        let (ids, cut) = encode_prompt(&t, "ab", true, 4).unwrap();
        assert_eq!((ids, cut), (vec![256, 97, 98], false));
        assert!(encode_prompt(&t, "ab", true, 0).is_err());
    }
}
