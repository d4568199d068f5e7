//! A worker of a scaled-out sweep: claims the next unfinished experiment of
//! the run directory's plan, runs it, saves its result, and repeats until
//! nothing is left to claim. Local workers (`sweep --devices`) take any
//! experiment; a Slurm array task takes only its own index.

use std::path::Path;

use anyhow::Result;

use super::claim::{ClaimDir, EndKind, Held, MAX_RUN_ATTEMPTS, Work, next_work};
use super::log_line;
use super::plan::Plan;
use super::result::Status;
use super::store::RunStore;
use super::{execute, run_one};
use crate::backend::Device;

/// Fault injection for testing crash recovery: a comma-separated list of
/// `EXPERIMENT` (abort the worker process whenever it starts that experiment)
/// or `EXPERIMENT@K` (abort only in attempt `K`).
pub const CRASH_ENV: &str = "QUANTBENCH_CRASH_EXPERIMENT";

/// What one worker did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Experiments that finished with status ok.
    pub finished: usize,
    /// Experiments recorded as failed (an error, or every attempt crashed).
    pub failed: usize,
}

/// Whether [`CRASH_ENV`] (given as `spec`) asks to crash `attempt` of `experiment`.
fn crash_requested(spec: &str, experiment: &str, attempt: u32) -> bool {
    spec.split(',')
        .map(str::trim)
        .any(|item| match item.rsplit_once('@') {
            Some((name, k)) => name == experiment && k.parse() == Ok(attempt),
            None => item == experiment,
        })
}

/// Runs `plan`'s unfinished experiments (only the one at `only`, when given)
/// on `device`, until none is left to claim.
pub fn work(run_dir: &Path, device: Device, only: Option<usize>) -> Result<WorkerReport> {
    let plan = Plan::require(run_dir)?;
    let store = RunStore::open(run_dir, &plan.command)?;
    let claims = ClaimDir::new(run_dir);
    let tag = format!("[worker pid {} on {device}]", std::process::id());
    let crash_spec = std::env::var(CRASH_ENV).unwrap_or_default();
    let mut report = WorkerReport::default();
    while let Some(work) = next_work(&plan, &store, &claims, only, &device.to_string())? {
        let ok = match work {
            Work::Run { held, index } => {
                let exp = &plan.experiments[index];
                let attempt = held.claim().attempt;
                log_line!("{tag} {}: attempt {attempt} started", exp.name);
                if crash_requested(&crash_spec, &exp.name, attempt) {
                    log_line!("{tag} {}: {CRASH_ENV} asks for a crash; aborting", exp.name);
                    std::process::abort();
                }
                let result = run_one(exp, device, &store)?;
                store.save(&result)?;
                let ok = result.status == Status::Ok;
                match &result.error {
                    None => log_line!("{tag} {}: done in {:.1}s", exp.name, result.timings.total_s),
                    Some(e) => log_line!("{tag} {}: FAILED: {e}", exp.name),
                }
                let end = if ok {
                    EndKind::Finished
                } else {
                    EndKind::Failed
                };
                held.finish(end, result.error.clone())?;
                ok
            }
            Work::RecordFailure {
                held,
                index,
                history,
            } => {
                record_crashes(&plan, index, held, &history, device, &store)?;
                log_line!(
                    "{tag} {}: crashed in all {MAX_RUN_ATTEMPTS} attempts; recorded as failed",
                    plan.experiments[index].name
                );
                false
            }
        };
        if ok {
            report.finished += 1;
        } else {
            report.failed += 1;
        }
    }
    Ok(report)
}

/// Saves a failed result for an experiment whose every attempt crashed.
fn record_crashes(
    plan: &Plan,
    index: usize,
    held: Held,
    history: &str,
    device: Device,
    store: &RunStore,
) -> Result<()> {
    let exp = &plan.experiments[index];
    let model = exp.model.as_deref().unwrap_or_default();
    let mut result = execute::new_result(exp, model, &device.to_string())?;
    let error = format!("crashed in all {MAX_RUN_ATTEMPTS} attempts: {history}");
    result.error = Some(error.clone());
    result.finished_at = chrono::Utc::now().to_rfc3339();
    store.save(&result)?;
    held.finish(EndKind::Failed, Some(error))
}

#[cfg(test)]
mod tests {
    use super::crash_requested;

    #[test]
    fn crash_spec_names_experiments_and_attempts() {
        assert!(crash_requested("a,b", "b", 1));
        assert!(crash_requested("a, b", "b", 2));
        assert!(!crash_requested("a,b", "c", 1));
        assert!(crash_requested("a@1", "a", 1));
        assert!(!crash_requested("a@1", "a", 2));
        assert!(!crash_requested("", "a", 1));
    }
}
