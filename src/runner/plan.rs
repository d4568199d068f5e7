//! The frozen experiment list of a scaled-out sweep.
//!
//! `quantbench sweep --devices ...` and `--slurm` resolve the sweep's
//! experiments once (model, `--limit`, `--quick` applied) and write them to
//! `<run dir>/scaleout/plan.json`. Worker processes and Slurm array tasks read
//! the plan instead of re-expanding the grid, so an experiment's index (the
//! array task id) means the same thing to every process, whatever happens to
//! the grid file meanwhile.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::RunOptions;
use super::claim::ClaimDir;
use super::store::{RunStore, write_atomic};
use crate::config::Experiment;

/// Subdirectory of a run directory that holds the scale-out bookkeeping
/// (plan, claims, Slurm scripts and logs); results stay in the run directory.
pub const SCALEOUT_DIR: &str = "scaleout";

/// Version of the plan file layout.
pub const PLAN_VERSION: u32 = 1;

/// `<run dir>/scaleout/plan.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub plan_version: u32,
    /// The command line that wrote the plan.
    pub command: String,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// Fully resolved experiments; the position is the experiment's index.
    pub experiments: Vec<Experiment>,
}

impl Plan {
    /// A plan of already resolved experiments.
    pub fn new(command: &str, experiments: Vec<Experiment>) -> Plan {
        Plan {
            plan_version: PLAN_VERSION,
            command: command.to_string(),
            created_at: chrono::Utc::now().to_rfc3339(),
            experiments,
        }
    }

    /// Where the plan of `run_dir` lives.
    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join(SCALEOUT_DIR).join("plan.json")
    }

    /// The plan of `run_dir`, if one was written.
    pub fn load(run_dir: &Path) -> Result<Option<Plan>> {
        let path = Plan::path(run_dir);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let plan: Plan = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not a quantbench sweep plan (version {PLAN_VERSION})",
                path.display()
            )
        })?;
        if plan.plan_version != PLAN_VERSION {
            bail!(
                "{}: plan version {} but this quantbench reads version {PLAN_VERSION}",
                path.display(),
                plan.plan_version
            );
        }
        Ok(Some(plan))
    }

    /// The plan a worker needs: an error that says how to get one when absent.
    pub fn require(run_dir: &Path) -> Result<Plan> {
        Plan::load(run_dir)?.with_context(|| {
            format!(
                "{}: no sweep plan; start workers through `quantbench sweep GRID --devices ...` or `--slurm`, which write it",
                Plan::path(run_dir).display()
            )
        })
    }

    /// Writes the plan, or keeps an existing plan with the same experiments
    /// (a resumed sweep). A different existing plan is an error: workers or
    /// array tasks may still be reading it by index.
    pub fn save_or_check(&self, run_dir: &Path) -> Result<()> {
        if let Some(old) = Plan::load(run_dir)? {
            if old.experiments == self.experiments {
                return Ok(());
            }
            let differs = match old
                .experiments
                .iter()
                .zip(&self.experiments)
                .position(|(a, b)| a != b)
            {
                Some(i) => format!(
                    "experiment #{i} '{}' has other settings",
                    old.experiments[i].name
                ),
                None => format!(
                    "it has {} experiments, this sweep {}",
                    old.experiments.len(),
                    self.experiments.len()
                ),
            };
            bail!(
                "{}: this run directory holds a different sweep ({differs}); use another --run-dir, \
                 or delete that file once no worker or Slurm task of the old sweep is running",
                Plan::path(run_dir).display()
            );
        }
        let path = Plan::path(run_dir);
        std::fs::create_dir_all(path.parent().expect("plan path has a parent"))
            .with_context(|| format!("{}: cannot create", path.display()))?;
        write_atomic(&path, serde_json::to_string_pretty(self)?.as_bytes())
    }

    /// The experiment at `index`, with an error naming the valid range.
    pub fn get(&self, index: usize) -> Result<&Experiment> {
        self.experiments.get(index).with_context(|| {
            format!(
                "no experiment #{index}: the sweep plan has {} (0..={})",
                self.experiments.len(),
                self.experiments.len().saturating_sub(1)
            )
        })
    }
}

/// A run directory made ready for worker processes.
pub struct Prepared {
    pub store: RunStore,
    pub plan: Plan,
    /// Per plan index: finished before this invocation.
    pub done_before: Vec<bool>,
}

/// Resolves `experiments` with `opts`, opens the run directory (creating
/// run.json before any worker starts, so workers never race to write it),
/// checks finished results against the settings (a finished experiment with
/// other settings is an error, as in a one-process run), writes the plan, and
/// clears the claims of unfinished experiments that no live process holds, so
/// they get a fresh retry budget.
pub fn prepare(experiments: Vec<Experiment>, opts: &RunOptions) -> Result<Prepared> {
    if experiments.is_empty() {
        bail!("no experiments to run");
    }
    let resolved: Vec<Experiment> = experiments
        .into_iter()
        .map(|e| super::resolve(e, opts))
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for e in &resolved {
        if !seen.insert(e.name.as_str()) {
            bail!(
                "experiment '{}' appears twice in the sweep; names must be unique",
                e.name
            );
        }
    }
    let store = RunStore::open(&opts.run_dir, &opts.command)?;
    let mut done_before = vec![];
    for e in &resolved {
        done_before.push(store.is_done(&e.name, &serde_json::to_value(e)?)?);
    }
    let plan = Plan::new(&opts.command, resolved);
    plan.save_or_check(&opts.run_dir)?;
    let claims = ClaimDir::new(&opts.run_dir);
    for (e, done) in plan.experiments.iter().zip(&done_before) {
        if !done {
            claims.clear_if_not_live(&e.name)?;
        }
    }
    Ok(Prepared {
        store,
        plan,
        done_before,
    })
}
