//! Accuracy evaluation: CoQA exactly as lm-evaluation-harness runs it, the
//! original study's sanity prompts, and sliding-window perplexity.

pub mod coqa;
pub mod coqa_data;
pub mod coqa_parquet;
pub mod coqa_prompt;
pub mod coqa_source;
pub mod divergence;
pub mod encode;
pub mod metrics;
pub mod perplexity;
pub mod records;
pub mod sanity;
