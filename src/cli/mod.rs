//! Subcommands of the `quantbench` binary: each module holds one command's
//! arguments (`Args`) and its `run` function.

pub mod bench;
pub mod common;
pub mod divergence;
pub mod eval;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod quantize;
pub mod report;
pub mod run;
pub mod scaleout;
pub mod status;
pub mod synth;
pub mod timeline;
pub mod worker;
