//! `quantbench worker` (a worker process of `sweep --devices`) and
//! `quantbench run --task N` (one Slurm array task).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;

use super::run::RunArgs;
use crate::backend::Device;
use crate::runner::log_line;
use crate::runner::worker::work;

/// Arguments of `quantbench worker`.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Run directory holding the sweep plan.
    #[arg(long)]
    pub run_dir: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

/// `quantbench worker`: runs unfinished experiments of the plan until none is left.
pub fn run(args: Args) -> Result<()> {
    let r = work(&args.run_dir, args.device, None)?;
    log_line!(
        "[worker pid {} on {}] no experiment left: {} finished, {} failed by this worker",
        std::process::id(),
        args.device,
        r.finished,
        r.failed
    );
    Ok(())
}

/// `quantbench run --task N`: the plan's experiment N, on `--device`, into `--run-dir`.
pub fn run_task(task: usize, args: &RunArgs) -> Result<()> {
    let run_dir = args
        .run_dir
        .as_deref()
        .context("--task needs --run-dir (the run directory of the sweep plan)")?;
    if args.model.is_some() || args.limit.is_some() || args.config.is_some() {
        bail!(
            "--task runs the experiment as the sweep plan resolved it; --model, --limit and --config do not apply"
        );
    }
    let r = work(run_dir, args.device, Some(task))?;
    if r.failed > 0 {
        bail!(
            "experiment #{task} failed; its error is in its result file in {}",
            run_dir.display()
        );
    }
    if r.finished == 0 {
        log_line!(
            "experiment #{task}: nothing to do (already finished, or another process runs it)"
        );
    }
    Ok(())
}
