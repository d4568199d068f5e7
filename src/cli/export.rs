//! `quantbench export`: quantize a model with RTN, GPTQ or AWQ and write it as
//! a GPTQ or AWQ (GEMM) checkpoint directory that other tools load.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::{Args as ClapArgs, ValueEnum};

use crate::backend::Device;
use crate::io::{awq_checkpoint, gptq_checkpoint, load_model};
use crate::quant::{QuantContext, QuantSpec, quantize_model_on};

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
    /// Calibration windows (default 16; the GPTQ paper's setting is 128).
    #[arg(long)]
    pub calib_samples: Option<usize>,
    /// Tokens per calibration window (default 512; the GPTQ paper's setting is 2048).
    #[arg(long)]
    pub calib_seq_len: Option<usize>,
    /// Seed of the calibration windows (default 0).
    #[arg(long)]
    pub calib_seed: Option<u64>,
    /// Where GPTQ and AWQ compute: cpu, cuda or cuda:N (RTN runs on the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

/// Refuses, before any quantization work, settings `format` cannot hold.
fn check_format(spec: &QuantSpec, format: Format) -> Result<()> {
    if format != Format::Awq {
        return Ok(());
    }
    let (bits, act_order) = match spec {
        QuantSpec::Rtn(c) => (c.bits, false),
        QuantSpec::Gptq(c) => (c.bits, c.desc_act),
        QuantSpec::Awq(c) => (c.bits, false),
        _ => return Ok(()),
    };
    if bits != 4 {
        bail!("the AWQ GEMM format holds 4-bit weights; {bits} bits need --format gptq");
    }
    if act_order {
        bail!("the AWQ format has no g_idx, so act-order (desc_act) needs --format gptq");
    }
    Ok(())
}

/// Loads, quantizes (timing it) and writes the checkpoint.
pub fn run(args: Args) -> Result<()> {
    let mut spec = QuantSpec::parse(&args.quant)?;
    if !matches!(
        spec,
        QuantSpec::Rtn(_) | QuantSpec::Gptq(_) | QuantSpec::Awq(_)
    ) {
        bail!(
            "export writes GPTQ/AWQ checkpoints of rtn, gptq or awq quantization, not {}",
            spec.method()
        );
    }
    if let Some(c) = spec.calib_mut() {
        c.path = args.calib.clone().or(c.path.take());
        c.samples = args.calib_samples.unwrap_or(c.samples);
        c.seq_len = args.calib_seq_len.unwrap_or(c.seq_len);
        c.seed = args.calib_seed.unwrap_or(c.seed);
    }
    spec.validate()?;
    check_format(&spec, args.format)?;
    let mut loaded = load_model(&args.model)?;
    let started = Instant::now();
    let ctx = QuantContext {
        tokenizer: &loaded.tokenizer,
    };
    quantize_model_on(&mut loaded.weights, &spec, &ctx, args.device)?;
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
