//! `quantbench quantize`: quantize a model with a bitsandbytes format and
//! write it as an HF directory in bitsandbytes' serialization.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;

use crate::io::bnb_checkpoint::write_bnb_dir;
use crate::io::load_model;
use crate::quant::spec::{Bnb4Config, Int8Config, default_skip_modules};
use crate::quant::storage::quantized_usage;
use crate::quant::{QuantContext, QuantSpec, quantize_model};
use crate::tensor::DType;

/// Arguments of `quantbench quantize`.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model: smollm2-135m, synth:<name>, a local HF directory, a .gguf file or a hub id.
    #[arg(long)]
    pub model: String,
    /// nf4, fp4 or int8.
    #[arg(long)]
    pub method: String,
    /// 4-bit only: quantize the absmax values again; `--double-quant` alone
    /// means true, `--double-quant false` turns it off (default true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub double_quant: Option<bool>,
    /// 4-bit only: weights per absmax block, a power of two (default 64).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// 4-bit only: fp32, fp16 or bf16 (default fp32).
    #[arg(long)]
    pub compute_dtype: Option<String>,
    /// int8 only: outlier threshold, 0 disables (default 6.0).
    #[arg(long)]
    pub threshold: Option<f32>,
    /// Comma-separated module names left unquantized (default lm_head).
    #[arg(long, value_delimiter = ',')]
    pub skip_modules: Option<Vec<String>>,
    /// Output directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub out: PathBuf,
}

impl Args {
    /// The spec these flags describe; flags that do not apply to the method are errors.
    pub fn spec(&self) -> Result<QuantSpec> {
        let skip = self
            .skip_modules
            .clone()
            .unwrap_or_else(default_skip_modules);
        let spec = match self.method.as_str() {
            "nf4" | "fp4" => {
                if self.threshold.is_some() {
                    bail!("--threshold applies only to --method int8; remove it");
                }
                let compute_dtype = match &self.compute_dtype {
                    Some(s) => DType::parse(s).with_context(|| format!("--compute-dtype {s}"))?,
                    None => DType::F32,
                };
                let c = Bnb4Config {
                    block_size: self.block_size.unwrap_or(64),
                    double_quant: self.double_quant.unwrap_or(true),
                    compute_dtype,
                    skip_modules: skip,
                };
                if self.method == "nf4" {
                    QuantSpec::Nf4(c)
                } else {
                    QuantSpec::Fp4(c)
                }
            }
            "int8" => {
                for (given, flag) in [
                    (self.double_quant.is_some(), "--double-quant"),
                    (self.block_size.is_some(), "--block-size"),
                    (self.compute_dtype.is_some(), "--compute-dtype"),
                ] {
                    if given {
                        bail!(
                            "{flag} applies only to --method nf4|fp4; int8 computes in the model's dtype, remove it"
                        );
                    }
                }
                QuantSpec::Int8(Int8Config {
                    threshold: self.threshold.unwrap_or(6.0),
                    skip_modules: skip,
                })
            }
            other => bail!("--method {other}: expected nf4, fp4 or int8"),
        };
        spec.validate()
            .with_context(|| format!("--method {}", self.method))?;
        Ok(spec)
    }
}

/// Quantizes and writes the checkpoint.
pub fn run(args: Args) -> Result<()> {
    let spec = args.spec()?;
    let mut loaded = load_model(&args.model)?;
    let ctx = QuantContext {
        tokenizer: &loaded.tokenizer,
    };
    quantize_model(&mut loaded.weights, &spec, &ctx)?;
    write_bnb_dir(&args.out, &loaded.weights, Some(&loaded.tokenizer), &spec)?;
    let q = quantized_usage(&loaded.weights);
    println!(
        "wrote {} ({}) to {}: {} quantized tensors, {} parameters, {:.3} bits/param",
        loaded.source,
        spec.method(),
        args.out.display(),
        q.tensors,
        q.parameters,
        q.bits_per_parameter()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(method: &str) -> Args {
        Args {
            model: "synth:tiny".into(),
            method: method.into(),
            double_quant: None,
            block_size: None,
            compute_dtype: None,
            threshold: None,
            skip_modules: None,
            out: "unused".into(),
        }
    }

    #[test]
    fn flags_build_specs_and_misplaced_flags_fail() {
        let mut a = args("fp4");
        a.double_quant = Some(false);
        a.compute_dtype = Some("bf16".into());
        a.skip_modules = Some(vec!["lm_head".into(), "down_proj".into()]);
        let QuantSpec::Fp4(c) = a.spec().unwrap() else {
            panic!()
        };
        assert_eq!((c.double_quant, c.compute_dtype), (false, DType::BF16));
        assert_eq!(c.skip_modules, vec!["lm_head", "down_proj"]);
        let mut a = args("int8");
        a.block_size = Some(64);
        assert!(a.spec().unwrap_err().to_string().contains("--block-size"));
        let mut a = args("nf4");
        a.threshold = Some(3.0);
        assert!(a.spec().unwrap_err().to_string().contains("--threshold"));
        let mut a = args("nf4");
        a.block_size = Some(48);
        assert!(format!("{:#}", a.spec().unwrap_err()).contains("power of two"));
        assert!(
            args("gptq")
                .spec()
                .unwrap_err()
                .to_string()
                .contains("nf4, fp4 or int8")
        );
    }
}
