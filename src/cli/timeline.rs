//! `quantbench timeline FILE`: when the blocks of each launch of the last
//! recorded GPU step entered, waited and finished (a file written by a run
//! with `QUANTBENCH_CUDA_TRACE=FILE`, see `bench::timeline`).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;

use crate::bench::timeline::{decode, kernel_spans, last_step, render};

/// Arguments of `quantbench timeline`.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Timeline file written by a run with QUANTBENCH_CUDA_TRACE=FILE.
    pub file: PathBuf,
}

/// `quantbench timeline`.
pub fn run(args: Args) -> Result<()> {
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("cannot read the timeline {}", args.file.display()))?;
    let events = decode(&bytes).with_context(|| format!("{}", args.file.display()))?;
    if events.is_empty() {
        bail!(
            "{} holds no events: were the kernels of that run compiled with QUANTBENCH_CUDA_TRACE set?",
            args.file.display()
        );
    }
    let step = last_step(&events);
    println!(
        "{} events in the file, {} in the last step; times in microseconds from its first event",
        events.len(),
        step.len()
    );
    print!("{}", render(&kernel_spans(&step)));
    Ok(())
}
