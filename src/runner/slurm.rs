//! Slurm scale-out (`sweep --slurm`): an sbatch job-array script with one
//! array task per unfinished experiment of the plan; each task runs
//! `quantbench run --task N` into the shared run directory. Submitted job ids
//! are kept next to the script so `quantbench status` can ask Slurm about
//! the tasks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::plan::SCALEOUT_DIR;
use crate::backend::Device;

/// What the `#SBATCH` lines ask for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlurmOptions {
    pub job_name: String,
    pub partition: Option<String>,
    /// Generic resources per task, e.g. `gpu:1`.
    pub gres: Option<String>,
    /// Time limit per task in a form sbatch accepts (`30`, `2:00:00`, `1-0`).
    pub time: Option<String>,
    pub account: Option<String>,
    /// Device each task runs on (`cuda:0` is the task's first allocated GPU).
    pub device: Device,
}

impl SlurmOptions {
    /// Refuses values that would break an `#SBATCH` line.
    pub fn validate(&self) -> Result<()> {
        let fields = [
            ("--partition", &self.partition),
            ("--gres", &self.gres),
            ("--time", &self.time),
            ("--account", &self.account),
        ];
        for (flag, value) in fields {
            if let Some(v) = value
                && (v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                bail!("{flag} '{v}': must be a single word without spaces");
            }
        }
        Ok(())
    }
}

/// `<run dir>/scaleout/slurm`: script, task logs, submitted job ids.
pub fn slurm_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(SCALEOUT_DIR).join("slurm")
}

/// The job-array script of `run_dir`.
pub fn script_path(run_dir: &Path) -> PathBuf {
    slurm_dir(run_dir).join("sweep.sbatch")
}

fn jobs_path(run_dir: &Path) -> PathBuf {
    slurm_dir(run_dir).join("jobs")
}

/// Sbatch's `--array` value for `indices` (sorted): `0-2`, `1,3-5`.
pub fn array_spec(indices: &[usize]) -> String {
    let mut parts: Vec<String> = vec![];
    let mut i = 0;
    while i < indices.len() {
        let mut j = i;
        while j + 1 < indices.len() && indices[j + 1] == indices[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            indices[i].to_string()
        } else {
            format!("{}-{}", indices[i], indices[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// `s` quoted for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The job-array script: array tasks `indices` each run `exe run --task
/// $SLURM_ARRAY_TASK_ID` on `run_dir` (both absolute paths on storage the
/// compute nodes share).
pub fn script(run_dir: &Path, exe: &Path, indices: &[usize], opts: &SlurmOptions) -> String {
    let dir = run_dir.display();
    let mut s = String::from("#!/bin/bash\n");
    s.push_str(&format!(
        "# Written by `quantbench sweep --slurm`: one array task per unfinished experiment\n\
         # of {dir}/{SCALEOUT_DIR}/plan.json (the task id is the plan index).\n"
    ));
    s.push_str(&format!("#SBATCH --job-name={}\n", opts.job_name));
    s.push_str(&format!("#SBATCH --array={}\n", array_spec(indices)));
    s.push_str(&format!(
        "#SBATCH --output={}/%A_%a.out\n",
        slurm_dir(run_dir).display()
    ));
    let optional = [
        ("partition", &opts.partition),
        ("gres", &opts.gres),
        ("time", &opts.time),
        ("account", &opts.account),
    ];
    for (key, value) in optional {
        if let Some(v) = value {
            s.push_str(&format!("#SBATCH --{key}={v}\n"));
        }
    }
    s.push_str("set -euo pipefail\n");
    s.push_str(&format!(
        "exec {} run --run-dir {} --device {} --task \"$SLURM_ARRAY_TASK_ID\"\n",
        shell_quote(&exe.display().to_string()),
        shell_quote(&dir.to_string()),
        opts.device
    ));
    s
}

/// A tool's error output as one line.
fn one_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines.join("; ")
}

/// Submits `script` with `sbatch --parsable`, records the job id in the run
/// directory, and returns it.
pub fn submit(run_dir: &Path, script: &Path) -> Result<String> {
    let out = Command::new("sbatch")
        .arg("--parsable")
        .arg(script)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow::anyhow!(
                "sbatch not found on PATH: run on a Slurm submit host, or pass --dry-run to only write the script"
            ),
            _ => anyhow::anyhow!("cannot run sbatch: {e}"),
        })?;
    if !out.status.success() {
        bail!(
            "sbatch {} failed ({}): {}",
            script.display(),
            out.status,
            one_line(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    // `--parsable` prints `JOBID` or `JOBID;CLUSTER`.
    let id = stdout
        .trim()
        .split(';')
        .next()
        .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("sbatch printed no job id: '{}'", stdout.trim()))?
        .to_string();
    let path = jobs_path(run_dir);
    let mut jobs = std::fs::read_to_string(&path).unwrap_or_default();
    jobs.push_str(&format!("{id}\n"));
    std::fs::write(&path, jobs).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(id)
}

/// Job ids submitted for `run_dir`, oldest first.
pub fn job_ids(run_dir: &Path) -> Result<Vec<String>> {
    let path = jobs_path(run_dir);
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(t.split_whitespace().map(str::to_string).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
}

/// Array task ids in a Slurm job id: `7_3` → [3]; `7_[1-3,5%2]` → [1, 2, 3, 5].
fn task_ids(job_id: &str) -> Vec<usize> {
    let Some((_, tasks)) = job_id.split_once('_') else {
        return vec![];
    };
    let tasks = tasks.trim_start_matches('[').trim_end_matches(']');
    let tasks = tasks.split('%').next().unwrap_or_default();
    let mut out = vec![];
    for part in tasks.split(',') {
        let range = match part.split_once('-') {
            Some((a, b)) => a.parse::<usize>().ok().zip(b.parse::<usize>().ok()),
            None => part.parse::<usize>().ok().map(|a| (a, a)),
        };
        if let Some((a, b)) = range {
            out.extend(a..=b);
        }
    }
    out
}

/// What Slurm says about the array tasks of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskStates {
    /// Plan index → `JOB_TASK STATE` (the latest job that ran the index).
    pub by_index: BTreeMap<usize, String>,
    /// Why Slurm could not be asked, or which tool answered.
    pub source: String,
}

/// Parses `JOBID|STATE` lines into `states`.
fn parse_states(text: &str, states: &mut BTreeMap<usize, String>) {
    for line in text.lines() {
        let mut cols = line.split('|');
        let (Some(id), Some(state)) = (cols.next(), cols.next()) else {
            continue;
        };
        let state = state.split_whitespace().next().unwrap_or_default();
        for t in task_ids(id.trim()) {
            states.insert(t, format!("{} {state}", id.trim()));
        }
    }
}

fn query(program: &str, args: &[&str]) -> std::result::Result<String, String> {
    match Command::new(program).args(args).output() {
        Err(e) => Err(format!("{program}: {e}")),
        Ok(out) if !out.status.success() => Err(format!("{program}: {}", one_line(&out.stderr))),
        Ok(out) => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
    }
}

/// Asks `sacct` about `jobs`' array tasks; without Slurm accounting, asks
/// `squeue` (which knows only queued and running tasks).
pub fn task_states(jobs: &[String]) -> TaskStates {
    let mut out = TaskStates::default();
    if jobs.is_empty() {
        out.source = "no Slurm job submitted for this run".to_string();
        return out;
    }
    let list = jobs.join(",");
    let sacct = query(
        "sacct",
        &["-X", "-n", "-P", "-o", "JobID,State", "-j", &list],
    );
    let squeue = || query("squeue", &["-h", "-r", "-o", "%i|%T", "-j", &list]);
    match sacct {
        Ok(text) => {
            parse_states(&text, &mut out.by_index);
            out.source = format!("sacct (jobs {list})");
        }
        Err(sacct_err) => match squeue() {
            Ok(text) => {
                parse_states(&text, &mut out.by_index);
                out.source = format!("squeue (jobs {list}; {sacct_err})");
            }
            Err(squeue_err) => {
                out.source = format!("Slurm not reachable: {sacct_err}; {squeue_err}");
            }
        },
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_specs_compress_runs() {
        assert_eq!(array_spec(&[0, 1, 2]), "0-2");
        assert_eq!(array_spec(&[1, 3, 4, 5, 9]), "1,3-5,9");
        assert_eq!(array_spec(&[4]), "4");
    }

    #[test]
    fn task_ids_of_job_ids() {
        assert_eq!(task_ids("7_3"), vec![3]);
        assert_eq!(task_ids("7_[1-3,5%2]"), vec![1, 2, 3, 5]);
        assert!(task_ids("7").is_empty());
        let mut states = BTreeMap::new();
        parse_states(
            "12_0|COMPLETED\n12_[1-2]|PENDING\n12_3|CANCELLED by 0\n",
            &mut states,
        );
        assert_eq!(states[&0], "12_0 COMPLETED");
        assert_eq!(states[&2], "12_[1-2] PENDING");
        assert_eq!(states[&3], "12_3 CANCELLED");
    }

    #[test]
    fn paths_are_shell_quoted_and_bad_values_refused() {
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
        let bad = SlurmOptions {
            partition: Some("gpu queue".into()),
            ..Default::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("--partition 'gpu queue'"), "{err}");
    }
}
