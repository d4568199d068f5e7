//! Pieces several subcommands share.

use anyhow::Result;

use crate::io::{LoadedModel, load_model};
use crate::quant::{QuantContext, QuantSpec, quantize_model};

/// Parses a `--quant` value (see [`QuantSpec::parse`]).
pub fn parse_quant(text: &str) -> Result<QuantSpec> {
    QuantSpec::parse(text)
}

/// Loads `model` and, when given, quantizes it as `quant` says.
pub fn load_quantized(model: &str, quant: Option<&QuantSpec>) -> Result<LoadedModel> {
    let mut loaded = load_model(model)?;
    if let Some(spec) = quant {
        let ctx = QuantContext {
            tokenizer: &loaded.tokenizer,
        };
        quantize_model(&mut loaded.weights, spec, &ctx)?;
    }
    Ok(loaded)
}
