//! `quantbench status RUN_DIR`: finished, running, failed and pending experiments.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args as ClapArgs;

use crate::runner::status::collect;

/// Arguments of `quantbench status`.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Run directory.
    pub run_dir: PathBuf,
}

/// `quantbench status`.
pub fn run(args: Args) -> Result<()> {
    print!("{}", collect(&args.run_dir)?.render());
    Ok(())
}
