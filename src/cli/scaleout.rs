//! `quantbench sweep --devices ...` and `sweep --slurm`: a sweep's
//! experiments run in parallel by worker processes or Slurm array tasks.

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;

use super::run::{RunArgs, run_options, sanitize};
use crate::backend::Device;
use crate::config::Experiment;
use crate::runner::plan::{Prepared, prepare};
use crate::runner::result::Status;
use crate::runner::{Outcome, local, slurm, summary_table};

/// How a sweep is spread out.
#[derive(ClapArgs, Debug, Clone)]
pub struct ScaleArgs {
    /// One worker process per listed device, sharing the experiments:
    /// cpu,cpu or cuda:0,cuda:1,...
    #[arg(long, value_delimiter = ',', conflicts_with = "slurm")]
    pub devices: Vec<Device>,
    /// Submit the sweep to Slurm as a job array, one task per experiment
    /// (tasks run on --device; the run directory must be on shared storage).
    #[arg(long)]
    pub slurm: bool,
    /// Slurm partition.
    #[arg(long, requires = "slurm")]
    pub partition: Option<String>,
    /// Slurm generic resources per task, e.g. gpu:1.
    #[arg(long, requires = "slurm")]
    pub gres: Option<String>,
    /// Slurm time limit per task, e.g. 2:00:00.
    #[arg(long, requires = "slurm")]
    pub time: Option<String>,
    /// Slurm account to charge.
    #[arg(long, requires = "slurm")]
    pub account: Option<String>,
    /// With --slurm: write and print the job script, submit nothing.
    #[arg(long, requires = "slurm")]
    pub dry_run: bool,
}

impl ScaleArgs {
    /// Whether the sweep runs outside this process.
    pub fn is_scaled(&self) -> bool {
        self.slurm || !self.devices.is_empty()
    }
}

/// Runs (or submits) a sweep's experiments through worker processes or Slurm.
pub fn sweep(
    cmd: &str,
    mut exps: Vec<Experiment>,
    args: &RunArgs,
    scale: &ScaleArgs,
) -> Result<()> {
    let mut run = args.clone();
    if !scale.devices.is_empty() {
        local::check_devices(&scale.devices)?;
        // Names the run directory and picks quick benchmarks when all are CPUs.
        run.device = scale
            .devices
            .iter()
            .copied()
            .find(|d| *d != Device::Cpu)
            .unwrap_or(Device::Cpu);
    }
    let mut opts = run_options(cmd, &mut exps, &run);
    opts.run_dir = std::path::absolute(&opts.run_dir)
        .with_context(|| format!("{}: cannot resolve", opts.run_dir.display()))?;
    let prepared = prepare(exps, &opts)?;
    if scale.slurm {
        submit(cmd, &prepared, &opts.run_dir, run.device, scale)
    } else {
        run_local(&prepared, &opts.run_dir, &scale.devices)
    }
}

fn run_local(prepared: &Prepared, run_dir: &std::path::Path, devices: &[Device]) -> Result<()> {
    let broken = local::run_workers(run_dir, devices)?;
    let mut rows = vec![];
    let mut missing = vec![];
    for (exp, done_before) in prepared.plan.experiments.iter().zip(&prepared.done_before) {
        match prepared.store.load(&exp.name)? {
            Some(r) => {
                let outcome = match (&r.status, done_before) {
                    (Status::Ok, true) => Outcome::Skipped,
                    (Status::Ok, false) => Outcome::Finished,
                    (Status::Failed, _) => Outcome::Failed(r.error.clone().unwrap_or_default()),
                };
                rows.push((r, outcome));
            }
            None => missing.push(exp.name.clone()),
        }
    }
    print!("{}", summary_table(&rows));
    println!("results: {} (quantbench report {0})", run_dir.display());
    let failed = rows
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
        .count();
    if !missing.is_empty() {
        bail!(
            "{} experiment(s) not run ({}): {}",
            missing.len(),
            missing.join(", "),
            if broken.is_empty() {
                "no worker took them".to_string()
            } else {
                broken.join("; ")
            }
        );
    }
    if failed > 0 {
        bail!(
            "{failed} of {} experiments failed; their errors are in their result files (quantbench status {})",
            rows.len(),
            run_dir.display()
        );
    }
    Ok(())
}

fn submit(
    cmd: &str,
    prepared: &Prepared,
    run_dir: &std::path::Path,
    device: Device,
    scale: &ScaleArgs,
) -> Result<()> {
    let opts = slurm::SlurmOptions {
        job_name: format!("quantbench-{}", sanitize(cmd)),
        partition: scale.partition.clone(),
        gres: scale.gres.clone(),
        time: scale.time.clone(),
        account: scale.account.clone(),
        device,
    };
    opts.validate()?;
    if run_dir.to_string_lossy().chars().any(char::is_whitespace) {
        bail!(
            "--run-dir {}: contains whitespace, which #SBATCH lines cannot hold; pick a path without spaces",
            run_dir.display()
        );
    }
    let pending: Vec<usize> = (0..prepared.plan.experiments.len())
        .filter(|&i| !prepared.done_before[i])
        .collect();
    if pending.is_empty() {
        println!(
            "all {} experiments of {} are finished; nothing to submit",
            prepared.plan.experiments.len(),
            run_dir.display()
        );
        return Ok(());
    }
    let exe = std::env::current_exe().context("cannot locate the quantbench binary")?;
    let text = slurm::script(run_dir, &exe, &pending, &opts);
    let path = slurm::script_path(run_dir);
    std::fs::create_dir_all(slurm::slurm_dir(run_dir))
        .with_context(|| format!("{}: cannot create", slurm::slurm_dir(run_dir).display()))?;
    std::fs::write(&path, &text).with_context(|| format!("{}: cannot write", path.display()))?;
    if scale.dry_run {
        print!("{text}");
        eprintln!(
            "dry run: nothing submitted; the script is {} (submit it with sbatch)",
            path.display()
        );
        return Ok(());
    }
    let job = slurm::submit(run_dir, &path)?;
    println!(
        "submitted Slurm job {job}: {} array task(s); follow with `quantbench status {}`",
        pending.len(),
        run_dir.display()
    );
    Ok(())
}
