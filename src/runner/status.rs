//! `quantbench status RUN_DIR`: where each experiment of a run stands, from
//! its result file, its claim (who runs it) and, for Slurm runs, what Slurm
//! says about its array task.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::claim::{ClaimDir, ClaimState};
use super::plan::Plan;
use super::result::{ExperimentResult, Status};
use super::slurm;

/// Where an experiment stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Finished,
    Failed,
    Running,
    /// Its holder died; the next worker retries it or records the failure.
    Crashed,
    /// Not started.
    Pending,
}

impl State {
    fn label(&self) -> &'static str {
        match self {
            State::Finished => "finished",
            State::Failed => "failed",
            State::Running => "running",
            State::Crashed => "crashed",
            State::Pending => "pending",
        }
    }
}

/// One experiment's line.
#[derive(Clone, Debug)]
pub struct Row {
    pub experiment: String,
    pub state: State,
    /// Error, holder, or crash reason.
    pub detail: String,
    /// Slurm's view of the experiment's array task, when known.
    pub slurm: Option<String>,
}

/// The status of a run directory.
#[derive(Clone, Debug)]
pub struct RunStatus {
    pub rows: Vec<Row>,
    /// How Slurm was asked (absent for runs without Slurm jobs).
    pub slurm_source: Option<String>,
}

fn read_result(path: &Path) -> Result<ExperimentResult> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a quantbench result file", path.display()))
}

/// Experiment names of a run: the plan's, in plan order, or else those of
/// the result files, sorted.
fn experiment_names(run_dir: &Path) -> Result<Vec<String>> {
    if let Some(plan) = Plan::load(run_dir)? {
        return Ok(plan.experiments.into_iter().map(|e| e.name).collect());
    }
    let mut names = vec![];
    let entries = std::fs::read_dir(run_dir)
        .with_context(|| format!("{}: not a run directory", run_dir.display()))?;
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".json")
            && stem != "run"
        {
            names.push(stem.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Collects the status of every experiment of `run_dir`.
pub fn collect(run_dir: &Path) -> Result<RunStatus> {
    if !run_dir.join("run.json").exists() {
        anyhow::bail!(
            "{}: not a quantbench run directory (no run.json)",
            run_dir.display()
        );
    }
    let claims = ClaimDir::new(run_dir);
    let jobs = slurm::job_ids(run_dir)?;
    let tasks = (!jobs.is_empty()).then(|| slurm::task_states(&jobs));
    let mut rows = vec![];
    for (index, name) in experiment_names(run_dir)?.into_iter().enumerate() {
        let path = run_dir.join(format!("{name}.json"));
        let (state, detail) = if path.exists() {
            let r = read_result(&path)?;
            match r.status {
                Status::Ok => (State::Finished, format!("{:.1}s", r.timings.total_s)),
                Status::Failed => (
                    State::Failed,
                    r.error
                        .unwrap_or_default()
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                ),
            }
        } else {
            match claims.state(&name)? {
                ClaimState::Live(f) => (
                    State::Running,
                    format!("attempt {}, {}", f.claim.attempt, f.claim.whereabouts()),
                ),
                ClaimState::Crashed { file, reason } => (
                    State::Crashed,
                    format!("attempt {}: {reason}", file.claim.attempt),
                ),
                ClaimState::Ended(_) | ClaimState::Unclaimed => (State::Pending, String::new()),
            }
        };
        let slurm = tasks.as_ref().and_then(|t| t.by_index.get(&index).cloned());
        rows.push(Row {
            experiment: name,
            state,
            detail,
            slurm,
        });
    }
    Ok(RunStatus {
        rows,
        slurm_source: tasks.map(|t| t.source),
    })
}

impl RunStatus {
    /// Experiments in `state`.
    pub fn count(&self, state: &State) -> usize {
        self.rows.iter().filter(|r| &r.state == state).count()
    }

    /// The table `quantbench status` prints, with a totals line.
    pub fn render(&self) -> String {
        let width = self
            .rows
            .iter()
            .map(|r| r.experiment.len())
            .max()
            .unwrap_or(10)
            .max(10);
        let mut s = format!(
            "{:<width$}  {:<8}  {:<24}  detail\n",
            "experiment", "state", "slurm"
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "{:<width$}  {:<8}  {:<24}  {}",
                r.experiment,
                r.state.label(),
                r.slurm.as_deref().unwrap_or("-"),
                r.detail
            );
        }
        let states = [
            State::Finished,
            State::Running,
            State::Failed,
            State::Crashed,
            State::Pending,
        ];
        let totals: Vec<String> = states
            .iter()
            .map(|st| format!("{} {}", self.count(st), st.label()))
            .collect();
        let _ = writeln!(s, "{} experiments: {}", self.rows.len(), totals.join(", "));
        if let Some(src) = &self.slurm_source {
            let _ = writeln!(s, "slurm: {src}");
        }
        s
    }
}
