//! The experiment runner: runs experiments into a run directory, skipping
//! finished ones, recording failures, and summarizing at the end.

pub mod claim;
pub mod evaluate;
pub mod execute;
pub mod local;
pub mod plan;
pub mod provenance;
pub mod result;
pub mod slurm;
pub mod status;
pub mod store;
pub mod worker;

use std::path::PathBuf;

use anyhow::{Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::Device;
use crate::config::Experiment;
use crate::with_backend;
use result::{ExperimentResult, Status};
use store::RunStore;

/// Settings that apply to every experiment of one run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Model for experiments that do not name one (and for all, when `force_model`).
    pub model: String,
    /// Whether `model` overrides the experiments' own models.
    pub force_model: bool,
    pub device: Device,
    /// Overrides every experiment's CoQA document limit.
    pub limit: Option<usize>,
    /// Continue after a failing experiment (its error is recorded).
    pub keep_going: bool,
    pub run_dir: PathBuf,
    /// The command line, recorded in run.json.
    pub command: String,
}

/// Applies the run's overrides to an experiment.
pub fn resolve(mut exp: Experiment, opts: &RunOptions) -> Experiment {
    if opts.force_model || exp.model.is_none() {
        exp.model = Some(opts.model.clone());
    }
    if opts.limit.is_some() {
        exp.eval.limit = opts.limit;
    }
    exp
}

/// What happened to one experiment in this invocation.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Already finished in an earlier invocation.
    Skipped,
    Finished,
    Failed(String),
}

/// Writes one formatted line to stderr in a single write: worker processes
/// of a sweep share the stream, and `eprintln!` writes a line in several
/// pieces that another process's line can land between.
macro_rules! log_line {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!("{}\n", format_args!($($arg)*));
        // A log line that cannot be written is not worth failing the run for.
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}
pub(crate) use log_line;

/// Prints a progress line above the bar, or to stderr when the bar is hidden
/// (not a terminal), so logs always show what happened.
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        log_line!("{line}");
    } else {
        bar.println(line);
    }
}

/// Runs one resolved experiment on `device` and returns its result, status
/// ok or failed with the error (not yet saved). `Err` only when the result
/// skeleton cannot be built.
pub fn run_one(exp: &Experiment, device: Device, store: &RunStore) -> Result<ExperimentResult> {
    let model = exp
        .model
        .clone()
        .expect("resolved experiments name their model");
    let mut result = execute::new_result(exp, &model, &device.to_string())?;
    let run = with_backend!(device, |backend| {
        result.provenance.device = crate::backend::Backend::describe(&backend);
        execute::execute(backend, device, exp, &model, store, &mut result)
    });
    result.finished_at = chrono::Utc::now().to_rfc3339();
    match run {
        Ok(()) => result.status = Status::Ok,
        Err(e) => result.error = Some(format!("{e:#}")),
    }
    Ok(result)
}

/// Runs `experiments` in order; returns each one's saved result and outcome.
pub fn run_experiments(
    experiments: Vec<Experiment>,
    opts: &RunOptions,
) -> Result<Vec<(ExperimentResult, Outcome)>> {
    if experiments.is_empty() {
        bail!("no experiments to run");
    }
    let store = RunStore::open(&opts.run_dir, &opts.command)?;
    let bar = ProgressBar::new(experiments.len() as u64).with_style(
        ProgressStyle::with_template("[{pos}/{len}] {elapsed_precise} {msg}")
            .expect("valid template"),
    );
    let mut out = vec![];
    for exp in experiments {
        let exp = resolve(exp, opts);
        let config = serde_json::to_value(&exp)?;
        if store.is_done(&exp.name, &config)? {
            say(&bar, format!("{}: already finished, skipped", exp.name));
            out.push((
                store.load(&exp.name)?.expect("finished result exists"),
                Outcome::Skipped,
            ));
            bar.inc(1);
            continue;
        }
        bar.set_message(format!("{} on {}", exp.name, opts.device));
        let result = run_one(&exp, opts.device, &store)?;
        let outcome = match &result.error {
            None => Outcome::Finished,
            Some(e) => Outcome::Failed(e.clone()),
        };
        store.save(&result)?;
        bar.inc(1);
        if let Outcome::Failed(msg) = &outcome {
            say(&bar, format!("{}: FAILED: {msg}", exp.name));
            if !opts.keep_going {
                bar.finish_and_clear();
                bail!(
                    "experiment '{}' failed: {msg}\n(results so far are in {}; rerun to resume, or pass --keep-going)",
                    exp.name,
                    opts.run_dir.display()
                );
            }
        } else {
            say(
                &bar,
                format!("{}: done in {:.1}s", exp.name, result.timings.total_s),
            );
        }
        out.push((result, outcome));
    }
    bar.finish_and_clear();
    Ok(out)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".to_string(), |x| format!("{x:.digits$}"))
}

/// The end-of-run summary table.
pub fn summary_table(results: &[(ExperimentResult, Outcome)]) -> String {
    let mut s = format!(
        "{:<34} {:>8} {:>9} {:>7} {:>7} {:>8} {:>7} {:>10} {:>9}\n",
        "experiment", "status", "bits/par", "MiB", "F1", "KL", "top1", "ms/token", "tok/s b1"
    );
    for (r, outcome) in results {
        let status = match outcome {
            Outcome::Skipped => "cached",
            Outcome::Finished => "ok",
            Outcome::Failed(_) => "FAILED",
        };
        let st = r.storage.as_ref();
        let b = r.bench.as_ref();
        s.push_str(&format!(
            "{:<34} {:>8} {:>9} {:>7} {:>7} {:>8} {:>7} {:>10} {:>9}\n",
            r.experiment,
            status,
            opt(st.map(|s| s.bits_per_parameter), 3),
            opt(st.map(|s| s.weight_bytes as f64 / 1048576.0), 1),
            opt(r.accuracy.coqa_f1, 3),
            opt(r.accuracy.kl_divergence, 4),
            opt(r.accuracy.top1_agreement, 3),
            opt(b.map(|b| b.decode_ms_per_token.mean), 2),
            opt(b.map(|b| b.decode_tokens_per_s), 1),
        ));
    }
    s
}
