//! `quantbench report`: plots, report.md and report.html from run directories.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args as ClapArgs;

use crate::report;

/// Arguments of `quantbench report`.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Run directories holding experiment result files (`<experiment>.json`).
    #[arg(required = true, value_name = "RUN_DIR")]
    pub run_dirs: Vec<PathBuf>,
    /// Output directory (default: RUN_DIR/report; required with several run directories).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

impl Args {
    /// Where the report goes.
    pub fn out_dir(&self) -> Result<PathBuf> {
        match (&self.out, self.run_dirs.as_slice()) {
            (Some(out), _) => Ok(out.clone()),
            (None, [one]) => Ok(one.join("report")),
            (None, _) => bail!("several run directories: say where the report goes with --out DIR"),
        }
    }
}

/// Runs `quantbench report`.
pub fn run(args: Args) -> Result<()> {
    let out = args.out_dir()?;
    let written = report::generate(&args.run_dirs, &out)?;
    println!("{}", written.report.summary_line());
    println!("wrote {}", written.markdown.display());
    println!("wrote {}", written.html.display());
    for p in &written.plots {
        println!("wrote {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_output_directory() {
        let one = Args {
            run_dirs: vec!["results/a".into()],
            out: None,
        };
        assert_eq!(one.out_dir().unwrap(), PathBuf::from("results/a/report"));
        let two = Args {
            run_dirs: vec!["a".into(), "b".into()],
            out: None,
        };
        assert!(two.out_dir().unwrap_err().to_string().contains("--out"));
        let given = Args {
            run_dirs: vec!["a".into(), "b".into()],
            out: Some("r".into()),
        };
        assert_eq!(given.out_dir().unwrap(), PathBuf::from("r"));
    }
}
