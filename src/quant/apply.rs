//! Applies a [`QuantSpec`] to a model's weights.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rayon::prelude::*;

use super::LinearWeight;
use super::calib::calibration_samples;
use super::rtn::rtn_quantize;
use super::spec::{QuantSpec, RtnConfig};
use crate::backend::Device;
use crate::model::LlamaWeights;

/// Everything a quantization method may need beyond the weights.
pub struct QuantContext<'a> {
    /// For calibration-based methods (GPTQ, AWQ).
    pub tokenizer: &'a crate::io::tokenizer::Tokenizer,
}

/// Whether the linear layer called `name` (e.g. `model.layers.3.mlp.up_proj`,
/// `lm_head`) is left unquantized by `skip_modules` (matched as name suffixes
/// or whole path components).
pub fn is_skipped(name: &str, skip_modules: &[String]) -> bool {
    skip_modules.iter().any(|s| {
        name == s || name.ends_with(&format!(".{s}")) || name.split('.').any(|part| part == s)
    })
}

/// Quantizes `weights` in place as `spec` says, on the CPU. GPTQ and AWQ
/// calibrate on windows of their `calib` text tokenized with `ctx.tokenizer`.
pub fn quantize_model(
    weights: &mut LlamaWeights,
    spec: &QuantSpec,
    ctx: &QuantContext,
) -> Result<()> {
    quantize_model_on(weights, spec, ctx, Device::Cpu)
}

/// [`quantize_model`] with GPTQ and AWQ computed on `device` (a CUDA device
/// runs the calibration forward, GPTQ's Hessians and column loops, AWQ's
/// input capture, scale and clipping searches on the GPU, with the same
/// results up to rounding); every other method runs on the CPU.
pub fn quantize_model_on(
    weights: &mut LlamaWeights,
    spec: &QuantSpec,
    ctx: &QuantContext,
    device: Device,
) -> Result<()> {
    spec.validate()?;
    match spec {
        QuantSpec::None { dtype } => {
            if let Some(dtype) = dtype {
                cast_dense(weights, *dtype);
            }
            Ok(())
        }
        QuantSpec::Nf4(c) => {
            super::bnb4::quantize_model_bnb4(weights, super::bnb4::Bnb4Type::Nf4, c)
        }
        QuantSpec::Fp4(c) => {
            super::bnb4::quantize_model_bnb4(weights, super::bnb4::Bnb4Type::Fp4, c)
        }
        QuantSpec::Int8(c) => super::int8::quantize_model_int8(weights, c),
        QuantSpec::Rtn(c) => quantize_model_rtn(weights, c),
        QuantSpec::Gptq(c) => {
            block_linears_only("gptq", &c.skip_modules, weights)?;
            let samples = calibration_samples(ctx.tokenizer, &c.calib)?;
            match device {
                Device::Cpu => {
                    with_large_stacks(|| super::gptq::quantize_model_gptq(weights, c, &samples))
                }
                #[cfg(feature = "cuda")]
                Device::Cuda(ordinal) => with_large_stacks(|| {
                    crate::backend::cuda::gptq::quantize_model_gptq(weights, c, &samples, ordinal)
                }),
                #[cfg(not(feature = "cuda"))]
                Device::Cuda(_) => bail!(
                    "GPTQ on {device}: this quantbench was built without CUDA; rebuild with `cargo build --release --features cuda`"
                ),
            }
        }
        QuantSpec::Awq(c) => {
            block_linears_only("awq", &c.skip_modules, weights)?;
            let samples = calibration_samples(ctx.tokenizer, &c.calib)?;
            match device {
                Device::Cpu => {
                    with_large_stacks(|| super::awq_model::quantize_model_awq(weights, c, &samples))
                }
                #[cfg(feature = "cuda")]
                Device::Cuda(ordinal) => with_large_stacks(|| {
                    crate::backend::cuda::awq::quantize_model_awq(weights, c, &samples, ordinal)
                }),
                #[cfg(not(feature = "cuda"))]
                Device::Cuda(_) => bail!(
                    "AWQ on {device}: this quantbench was built without CUDA; rebuild with `cargo build --release --features cuda`"
                ),
            }
        }
    }
}

/// Stack size of the worker threads that run calibrated quantization.
pub const CALIB_THREAD_STACK: usize = 256 << 20;

/// Runs `f` in a rayon pool whose threads have [`CALIB_THREAD_STACK`] bytes
/// of stack: faer's factorizations and products on large matrices (the
/// Hessians, `[in, in]`) use more stack than rayon's default threads have.
fn with_large_stacks<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let pool = rayon::ThreadPoolBuilder::new()
        .stack_size(CALIB_THREAD_STACK)
        .build()
        .context("cannot start the quantization thread pool")?;
    pool.install(f)
}

/// GPTQ and AWQ quantize decoder-block linears; an untied lm_head must be skipped.
fn block_linears_only(method: &str, skip: &[String], weights: &LlamaWeights) -> Result<()> {
    if weights.lm_head.is_some() && !is_skipped("lm_head", skip) {
        bail!("{method} quantizes decoder-block linears only; keep lm_head in skip_modules");
    }
    Ok(())
}

/// Runs `convert` on every decoder-block linear (layers in parallel), then
/// on an untied lm_head, each named as in transformers
/// (`model.layers.3.mlp.up_proj`, `lm_head`).
pub fn convert_linears(
    weights: &mut LlamaWeights,
    convert: impl Fn(&str, &mut LinearWeight) -> Result<()> + Sync,
) -> Result<()> {
    weights
        .layers
        .par_iter_mut()
        .enumerate()
        .try_for_each(|(l, layer)| {
            layer
                .linears_mut()
                .into_iter()
                .try_for_each(|(name, w)| convert(&format!("model.layers.{l}.{name}"), w))
        })?;
    if let Some(head) = &mut weights.lm_head {
        convert("lm_head", head)?;
    }
    Ok(())
}

/// Round-to-nearest (GPTQ's grid rule) for every linear not in `skip_modules`,
/// including an untied lm_head when it is not skipped.
pub fn quantize_model_rtn(weights: &mut LlamaWeights, c: &RtnConfig) -> Result<()> {
    convert_linears(weights, |name, w| {
        if is_skipped(name, &c.skip_modules) {
            return Ok(());
        }
        let (o, i) = w.shape();
        let q = rtn_quantize(&w.dequantize(), o, i, c.bits, c.group_size, c.sym)
            .with_context(|| format!("RTN of {name}"))?;
        *w = LinearWeight::Quantized(Arc::new(q));
        Ok(())
    })
}

/// Rounds every dense weight (embeddings, norms, linears) to `dtype`.
pub fn cast_dense(weights: &mut LlamaWeights, dtype: crate::tensor::DType) {
    let round = |v: &mut Vec<f32>| v.iter_mut().for_each(|x| *x = dtype.round(*x));
    weights.embed_tokens.round_to(dtype);
    round(&mut weights.norm);
    let cast = |w: &mut LinearWeight| {
        if let LinearWeight::Dense(t) = w {
            t.round_to(dtype);
        }
    };
    for layer in &mut weights.layers {
        round(&mut layer.input_layernorm);
        round(&mut layer.post_attention_layernorm);
        for (_, w) in layer.linears_mut() {
            cast(w);
        }
    }
    if let Some(h) = &mut weights.lm_head {
        cast(h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_modules_match_suffixes_and_components() {
        let skip = vec!["lm_head".to_string(), "down_proj".to_string()];
        assert!(is_skipped("lm_head", &skip));
        assert!(is_skipped("model.layers.0.mlp.down_proj", &skip));
        assert!(!is_skipped("model.layers.0.mlp.up_proj", &skip));
    }
}
