//! Experiment configuration: [`Experiment`], the preset [`Registry`], sweep grids.

pub mod experiment;
pub mod registry;
pub mod sweep;

pub use experiment::{EvalConfig, Experiment};
pub use registry::Registry;
