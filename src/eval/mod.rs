//! Evaluation of models: so far, the divergence of a quantized model from its base.

pub mod divergence;
