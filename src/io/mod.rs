//! Checkpoint readers and writers, hub downloads, tokenizers.

pub mod tokenizer;
