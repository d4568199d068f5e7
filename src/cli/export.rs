//! `quantbench export`: quantize a model with RTN, GPTQ or AWQ and write it as
//! a GPTQ or AWQ (GEMM) checkpoint directory that other tools load.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::{Args as ClapArgs, ValueEnum};

use crate::io::{awq_checkpoint, gptq_checkpoint, load_model};
use crate::quant::spec::CalibConfig;
use crate::quant::{QuantContext, QuantSpec, quantize_model};

/// Checkpoint layouts `export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// AutoGPTQ / transformers GPTQ (v1: qzeros store zero − 1).
    Gptq,
    /// AutoAWQ GEMM (4 bits, interleaved nibbles).
    Awq,
}

/// Arguments of `quantbench export`.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model: synth:<name>, or any spec the loader accepts.
    #[arg(long)]
    pub model: String,
    /// Quantization: rtn|gptq|awq[,key=value...], e.g. `gptq,bits=4,group_size=128,desc_act=true`.
    #[arg(long)]
    pub quant: String,
    /// Checkpoint layout to write.
    #[arg(long, value_enum)]
    pub format: Format,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Calibration text: plain text or JSONL with a "text" field (default: built-in text).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration windows (the reference setting is 128).
    #[arg(long, default_value_t = 16)]
    pub calib_samples: usize,
    /// Tokens per calibration window (the reference setting is 2048).
    #[arg(long, default_value_t = 512)]
    pub calib_seq_len: usize,
    /// Seed of the calibration windows.
    #[arg(long, default_value_t = 0)]
    pub calib_seed: u64,
}

/// Loads, quantizes (timing it) and writes the checkpoint.
pub fn run(args: Args) -> Result<()> {
    let mut spec = QuantSpec::parse(&args.quant)?;
    let calib = CalibConfig {
        path: args.calib.clone(),
        samples: args.calib_samples,
        seq_len: args.calib_seq_len,
        seed: args.calib_seed,
    };
    match &mut spec {
        QuantSpec::Gptq(c) => c.calib = calib,
        QuantSpec::Awq(c) => c.calib = calib,
        QuantSpec::Rtn(_) => {}
        other => bail!(
            "export writes GPTQ/AWQ checkpoints of rtn, gptq or awq quantization, not {}",
            other.method()
        ),
    }
    spec.validate()?;
    let mut loaded = load_model(&args.model)?;
    let started = Instant::now();
    let ctx = QuantContext {
        tokenizer: &loaded.tokenizer,
    };
    quantize_model(&mut loaded.weights, &spec, &ctx)?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "quantized {} with {} in {secs:.1} s",
        loaded.source, args.quant
    );
    match args.format {
        Format::Gptq => {
            let cfg = match &spec {
                QuantSpec::Gptq(c) => Some(c),
                _ => None,
            };
            gptq_checkpoint::write_gptq_dir(
                &args.out,
                &loaded.weights,
                Some(&loaded.tokenizer),
                cfg,
            )?
        }
        Format::Awq => {
            awq_checkpoint::write_awq_dir(&args.out, &loaded.weights, Some(&loaded.tokenizer))?
        }
    }
    println!(
        "wrote {} ({} bytes of weights) to {}",
        args.quant,
        loaded.weights.storage_bytes(),
        args.out.display()
    );
    Ok(())
}
