//! Pieces several subcommands share.

use anyhow::Result;

use crate::backend::Device;
use crate::io::{LoadedModel, load_model};
use crate::quant::{QuantContext, QuantSpec, quantize_model_on};

/// Parses a `--quant` value (see [`QuantSpec::parse`]).
pub fn parse_quant(text: &str) -> Result<QuantSpec> {
    QuantSpec::parse(text)
}

/// Loads `model` and, when given, quantizes it as `quant` says (GPTQ on
/// `device`, see [`quantize_model_on`]).
pub fn load_quantized(
    model: &str,
    quant: Option<&QuantSpec>,
    device: Device,
) -> Result<LoadedModel> {
    let mut loaded = load_model(model)?;
    if let Some(spec) = quant {
        let ctx = QuantContext {
            tokenizer: &loaded.tokenizer,
        };
        quantize_model_on(&mut loaded.weights, spec, &ctx, device)?;
    }
    Ok(loaded)
}
