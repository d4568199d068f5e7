//! quantbench: how few bits can a language model be stored in, and what does
//! each choice cost in accuracy, memory and speed?
//!
//! Data flows one way: a checkpoint is loaded ([`io`]) into host weights
//! ([`model::LlamaWeights`]), optionally quantized ([`quant`]), uploaded to a
//! compute [`backend::Backend`] and run by the Llama engine ([`model`]).

pub mod backend;
pub mod bench;
pub mod cli;
pub mod config;
pub mod eval;
pub mod io;
pub mod model;
pub mod quant;
pub mod report;
pub mod runner;
pub mod tensor;
