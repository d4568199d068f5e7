//! The Llama architecture: configuration, weights, forward pass, generation.

pub mod config;
pub mod forward;
pub mod generate;
pub mod rope;
pub mod synth;
pub mod weights;

pub use config::LlamaConfig;
pub use forward::{LinearInput, Model};
pub use generate::{Generation, GenerationConfig, StopReason, generate};
pub use weights::LlamaWeights;
