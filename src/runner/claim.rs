//! Claiming experiments across processes and machines that share a run
//! directory.
//!
//! A claim is a file `<run dir>/scaleout/claims/<experiment>.attempt-<k>.claim`
//! that says who is running attempt `k` of an experiment: host, boot id, pid
//! (with the process start time, so a reused pid is not mistaken for the
//! holder), the supervising process, device and Slurm task. It is created
//! exclusively and complete: the JSON is written to a private temporary file
//! that is then hard-linked to the claim name, which fails when the name
//! exists (this works on NFS too). So exactly one process gets each attempt.
//!
//! While it runs, the holder touches the file every [`HEARTBEAT_EVERY`]; when
//! done it rewrites the claim (temporary file, rename) with how it ended.
//! A claim is stale when its holder is gone: on the same host (and boot) the
//! process no longer runs; on another host no heartbeat came for
//! [`STALE_AFTER`]. Taking over a stale claim means creating attempt `k + 1`,
//! so two processes that both find the stale claim cannot both take it.
//! After [`MAX_RUN_ATTEMPTS`] crashed attempts the next claimer records a
//! failed result with every attempt's crash instead of running it again.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::plan::{Plan, SCALEOUT_DIR};
use super::store::RunStore;

/// Attempts to run an experiment before a crash is recorded as its failure
/// (the first run plus one retry).
pub const MAX_RUN_ATTEMPTS: u32 = 2;

/// How often a running holder touches its claim file.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(30);

/// A claim from another host without a heartbeat for this long is stale.
pub const STALE_AFTER: Duration = Duration::from_secs(300);

/// Environment variable a supervisor sets for its worker processes to its pid,
/// so their claims name it (see [`ClaimState::Live`]).
pub const SUPERVISOR_ENV: &str = "QUANTBENCH_SUPERVISOR_PID";

/// A process, identified well enough to tell whether it still runs: the pid
/// plus its start time (clock ticks after boot, from `/proc/PID/stat`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: u32,
    pub start_ticks: Option<u64>,
}

/// Start time of `pid` in clock ticks after boot; `None` when it does not run.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3;
    // the start time is field 22.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl ProcessId {
    /// This process.
    pub fn current() -> ProcessId {
        let pid = std::process::id();
        ProcessId {
            pid,
            start_ticks: start_ticks(pid),
        }
    }

    /// The running process `pid`, if there is one.
    pub fn of(pid: u32) -> Option<ProcessId> {
        start_ticks(pid).map(|t| ProcessId {
            pid,
            start_ticks: Some(t),
        })
    }

    /// Whether this very process (not a later one that reuses the pid) runs
    /// on this machine.
    pub fn is_running(&self) -> bool {
        match (start_ticks(self.pid), self.start_ticks) {
            (None, _) => false,
            (Some(now), Some(then)) => now == then,
            (Some(_), None) => true,
        }
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// This machine's host name (the kernel's, which containers set per pod).
pub fn hostname() -> String {
    read_trimmed("/proc/sys/kernel/hostname")
        .or_else(|| read_trimmed("/etc/hostname"))
        .unwrap_or_else(|| "unknown-host".to_string())
}

fn boot_id() -> Option<String> {
    read_trimmed("/proc/sys/kernel/random/boot_id")
}

/// Who holds a claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub host: String,
    /// Distinguishes boots of `host`: after a reboot every old pid is dead.
    pub boot_id: Option<String>,
    pub process: ProcessId,
    /// The process that started the holder and reports its crash.
    pub supervisor: Option<ProcessId>,
}

/// Whether a claim's holder still runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// Gone, and why we think so.
    Gone(String),
}

impl Holder {
    /// This process, with the supervisor named by [`SUPERVISOR_ENV`] when it
    /// is this process's parent.
    pub fn current() -> Holder {
        let supervisor = std::env::var(SUPERVISOR_ENV)
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|&pid| parent_pid() == Some(pid))
            .and_then(ProcessId::of);
        Holder {
            host: hostname(),
            boot_id: boot_id(),
            process: ProcessId::current(),
            supervisor,
        }
    }

    /// Whether the holder is on this machine (same host name, same boot).
    pub fn is_local(&self) -> bool {
        self.host == hostname() && (self.boot_id.is_none() || self.boot_id == boot_id())
    }

    /// Whether the holder still runs; `heartbeat` is the claim file's
    /// modification time (used for holders on other hosts).
    pub fn liveness(&self, heartbeat: SystemTime, now: SystemTime) -> Liveness {
        if self.host == hostname() {
            if self.boot_id.is_some() && boot_id().is_some() && self.boot_id != boot_id() {
                return Liveness::Gone(format!("{} rebooted since the claim", self.host));
            }
            if self.process.is_running() {
                return Liveness::Alive;
            }
            return Liveness::Gone(format!(
                "process {} on {} is gone",
                self.process.pid, self.host
            ));
        }
        let age = now.duration_since(heartbeat).unwrap_or_default();
        if age > STALE_AFTER {
            Liveness::Gone(format!(
                "no heartbeat from {} for {}s",
                self.host,
                age.as_secs()
            ))
        } else {
            Liveness::Alive
        }
    }
}

fn parent_pid() -> Option<u32> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndKind {
    /// The result file says ok.
    Finished,
    /// The result file says failed (an error, or crashes recorded).
    Failed,
    /// The holder died before writing a result.
    Crashed,
}

/// The end of an attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ending {
    /// RFC 3339 UTC.
    pub at: String,
    pub outcome: EndKind,
    /// Error or crash description.
    pub detail: Option<String>,
}

/// Contents of a claim file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub experiment: String,
    /// Position in the sweep plan.
    pub index: usize,
    /// 1 for the first run; [`MAX_RUN_ATTEMPTS`]` + 1` records the failure.
    pub attempt: u32,
    pub holder: Holder,
    /// Compute device of the attempt.
    pub device: String,
    /// `JOB_TASK` of the Slurm array task, when run by Slurm.
    pub slurm_task: Option<String>,
    /// RFC 3339 UTC.
    pub claimed_at: String,
    pub ended: Option<Ending>,
}

impl Claim {
    /// A claim of `attempt` of `experiment` by this process.
    pub fn new(experiment: &str, index: usize, attempt: u32, device: &str) -> Claim {
        let slurm_task = match (
            std::env::var("SLURM_ARRAY_JOB_ID"),
            std::env::var("SLURM_ARRAY_TASK_ID"),
        ) {
            (Ok(j), Ok(t)) => Some(format!("{j}_{t}")),
            _ => std::env::var("SLURM_JOB_ID").ok(),
        };
        Claim {
            experiment: experiment.to_string(),
            index,
            attempt,
            holder: Holder::current(),
            device: device.to_string(),
            slurm_task,
            claimed_at: chrono::Utc::now().to_rfc3339(),
            ended: None,
        }
    }

    /// `pid 12 on host, cpu, slurm 7_1`.
    pub fn whereabouts(&self) -> String {
        let mut s = format!(
            "pid {} on {}, {}",
            self.holder.process.pid, self.holder.host, self.device
        );
        if let Some(t) = &self.slurm_task {
            s.push_str(&format!(", slurm {t}"));
        }
        s
    }
}

/// A claim file as read, with its modification time (the last heartbeat).
#[derive(Clone, Debug)]
pub struct ClaimFile {
    pub claim: Claim,
    pub modified: SystemTime,
}

/// The state of an experiment's latest attempt.
#[derive(Clone, Debug)]
pub enum ClaimState {
    Unclaimed,
    /// The holder runs. Also a holder that died moments ago while its
    /// supervisor (which will record the crash) still runs.
    Live(ClaimFile),
    /// Finished or failed; the result file is written.
    Ended(ClaimFile),
    /// The holder died without a result.
    Crashed {
        file: ClaimFile,
        reason: String,
    },
}

/// Judges a claim file.
pub fn assess(file: ClaimFile, now: SystemTime) -> ClaimState {
    match &file.claim.ended {
        Some(Ending {
            outcome: EndKind::Crashed,
            detail,
            ..
        }) => {
            let reason = detail.clone().unwrap_or_else(|| "crashed".to_string());
            ClaimState::Crashed { file, reason }
        }
        Some(_) => ClaimState::Ended(file),
        None => match file.claim.holder.liveness(file.modified, now) {
            Liveness::Alive => ClaimState::Live(file),
            Liveness::Gone(reason) => {
                let h = &file.claim.holder;
                let age = now.duration_since(file.modified).unwrap_or_default();
                let reporting =
                    h.is_local() && h.supervisor.as_ref().is_some_and(ProcessId::is_running);
                if reporting && age < STALE_AFTER {
                    ClaimState::Live(file)
                } else {
                    ClaimState::Crashed {
                        file,
                        reason: format!("{reason}, no result written"),
                    }
                }
            }
        },
    }
}

/// Writes `bytes` to a temporary file next to `path`, unique to this process.
fn write_temp(path: &Path, bytes: &[u8]) -> Result<PathBuf> {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let name = path
        .file_name()
        .expect("claim path has a file name")
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    Ok(tmp)
}

/// The claims of one run directory.
#[derive(Clone, Debug)]
pub struct ClaimDir {
    dir: PathBuf,
}

impl ClaimDir {
    /// Claims of `run_dir` (the directory is created on first claim).
    pub fn new(run_dir: &Path) -> ClaimDir {
        ClaimDir {
            dir: run_dir.join(SCALEOUT_DIR).join("claims"),
        }
    }

    /// File of `attempt` of `experiment`.
    pub fn path(&self, experiment: &str, attempt: u32) -> PathBuf {
        self.dir
            .join(format!("{experiment}.attempt-{attempt}.claim"))
    }

    fn read(&self, path: &Path) -> Result<Option<ClaimFile>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("{}: cannot read claim", path.display()));
            }
        };
        let claim: Claim = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not a quantbench claim; delete it if no worker uses it",
                path.display()
            )
        })?;
        let modified = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .unwrap_or_else(|_| SystemTime::now());
        Ok(Some(ClaimFile { claim, modified }))
    }

    /// Every attempt of `experiment`, oldest first.
    pub fn attempts(&self, experiment: &str) -> Result<Vec<ClaimFile>> {
        let mut out = vec![];
        for attempt in 1.. {
            match self.read(&self.path(experiment, attempt))? {
                Some(f) => out.push(f),
                None => break,
            }
        }
        Ok(out)
    }

    /// The state of the latest attempt of `experiment`.
    pub fn state(&self, experiment: &str) -> Result<ClaimState> {
        Ok(match self.attempts(experiment)?.pop() {
            None => ClaimState::Unclaimed,
            Some(f) => assess(f, SystemTime::now()),
        })
    }

    /// Creates `claim`'s file if no process has; `Ok(false)` when one has.
    pub fn try_create(&self, claim: &Claim) -> Result<bool> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("{}: cannot create", self.dir.display()))?;
        let path = self.path(&claim.experiment, claim.attempt);
        let tmp = write_temp(&path, serde_json::to_string_pretty(claim)?.as_bytes())?;
        let linked = std::fs::hard_link(&tmp, &path);
        // Over NFS a retried link request can report "exists" for our own
        // link; the temporary file's link count tells.
        let ours = match &linked {
            Ok(()) => true,
            Err(_) => {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata(&tmp)
                    .map(|m| m.nlink() == 2)
                    .unwrap_or(false)
            }
        };
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Err(e) if !ours && e.kind() != std::io::ErrorKind::AlreadyExists => Err(e)
                .with_context(|| {
                    format!(
                        "{}: cannot create claim (the run directory needs hard links)",
                        path.display()
                    )
                }),
            _ => Ok(ours),
        }
    }

    /// Replaces the file of `claim` atomically.
    pub fn rewrite(&self, claim: &Claim) -> Result<()> {
        let path = self.path(&claim.experiment, claim.attempt);
        let tmp = write_temp(&path, serde_json::to_string_pretty(claim)?.as_bytes())?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("{}: cannot update claim", path.display()))
    }

    /// Records a crash on every unended claim that `process` holds on this
    /// machine; returns how many.
    pub fn mark_crashed(&self, process: &ProcessId, detail: &str) -> Result<usize> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("{}: cannot list claims", self.dir.display()));
            }
        };
        let mut marked = 0;
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_none_or(|x| x != "claim") {
                continue;
            }
            let Some(mut file) = self.read(&path)? else {
                continue;
            };
            let h = &file.claim.holder;
            if file.claim.ended.is_some() || h.process != *process || !h.is_local() {
                continue;
            }
            file.claim.ended = Some(Ending {
                at: chrono::Utc::now().to_rfc3339(),
                outcome: EndKind::Crashed,
                detail: Some(detail.to_string()),
            });
            self.rewrite(&file.claim)?;
            marked += 1;
        }
        Ok(marked)
    }

    /// Deletes every attempt of `experiment` unless a live process holds it.
    pub fn clear_if_not_live(&self, experiment: &str) -> Result<()> {
        if matches!(self.state(experiment)?, ClaimState::Live(_)) {
            return Ok(());
        }
        for f in self.attempts(experiment)? {
            let path = self.path(experiment, f.claim.attempt);
            std::fs::remove_file(&path)
                .with_context(|| format!("{}: cannot remove stale claim", path.display()))?;
        }
        Ok(())
    }

    /// One line per crashed attempt: what ran where and how it ended.
    pub fn crash_history(&self, experiment: &str) -> Result<String> {
        let now = SystemTime::now();
        let lines: Vec<String> = self
            .attempts(experiment)?
            .into_iter()
            .filter_map(|f| {
                let attempt = f.claim.attempt;
                let place = f.claim.whereabouts();
                match assess(f, now) {
                    ClaimState::Crashed { reason, .. } => {
                        Some(format!("attempt {attempt} ({place}): {reason}"))
                    }
                    _ => None,
                }
            })
            .collect();
        Ok(lines.join("; "))
    }

    /// Takes `claim` and starts its heartbeat; `None` when another process
    /// took that attempt first.
    pub fn take(&self, claim: Claim) -> Result<Option<Held>> {
        if !self.try_create(&claim)? {
            return Ok(None);
        }
        let path = self.path(&claim.experiment, claim.attempt);
        let (stop, rx) = mpsc::channel::<()>();
        let beat_path = path.clone();
        let beat = std::thread::spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(HEARTBEAT_EVERY) {
                let touched = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&beat_path)
                    .and_then(|f| f.set_modified(SystemTime::now()));
                if let Err(e) = touched {
                    tracing::warn!("{}: heartbeat failed: {e}", beat_path.display());
                }
            }
        });
        Ok(Some(Held {
            dir: self.clone(),
            claim,
            heartbeat: Some((stop, beat)),
        }))
    }
}

/// A claim this process holds, kept fresh by a heartbeat thread until
/// [`Held::finish`] (or drop, which leaves it unended: a crash).
#[derive(Debug)]
pub struct Held {
    dir: ClaimDir,
    claim: Claim,
    heartbeat: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

impl Held {
    /// The claim as written.
    pub fn claim(&self) -> &Claim {
        &self.claim
    }

    fn stop_heartbeat(&mut self) {
        if let Some((stop, beat)) = self.heartbeat.take() {
            drop(stop);
            let _ = beat.join();
        }
    }

    /// Records how the attempt ended.
    pub fn finish(mut self, outcome: EndKind, detail: Option<String>) -> Result<()> {
        self.stop_heartbeat();
        self.claim.ended = Some(Ending {
            at: chrono::Utc::now().to_rfc3339(),
            outcome,
            detail,
        });
        self.dir.rewrite(&self.claim)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.stop_heartbeat();
    }
}

/// What a worker should do next.
#[derive(Debug)]
pub enum Work {
    /// Run the experiment at `index` under `held`.
    Run { held: Held, index: usize },
    /// Every run attempt crashed: write a failed result with `history`.
    RecordFailure {
        held: Held,
        index: usize,
        history: String,
    },
}

/// Claims the next experiment of `plan` (only `only`, when given) that is
/// neither finished nor ended nor held by a live process; `None` when there is
/// nothing left to claim.
pub fn next_work(
    plan: &Plan,
    store: &RunStore,
    claims: &ClaimDir,
    only: Option<usize>,
    device: &str,
) -> Result<Option<Work>> {
    let indices: Vec<usize> = match only {
        Some(i) => {
            plan.get(i)?;
            vec![i]
        }
        None => (0..plan.experiments.len()).collect(),
    };
    for index in indices {
        let exp = &plan.experiments[index];
        if store.is_done(&exp.name, &serde_json::to_value(exp)?)? {
            continue;
        }
        let attempt = match claims.state(&exp.name)? {
            ClaimState::Unclaimed => 1,
            ClaimState::Live(_) | ClaimState::Ended(_) => continue,
            ClaimState::Crashed { file, .. } => file.claim.attempt + 1,
        };
        let Some(held) = claims.take(Claim::new(&exp.name, index, attempt, device))? else {
            continue;
        };
        if attempt > MAX_RUN_ATTEMPTS {
            let history = claims.crash_history(&exp.name)?;
            return Ok(Some(Work::RecordFailure {
                held,
                index,
                history,
            }));
        }
        return Ok(Some(Work::Run { held, index }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_running_and_a_reused_pid_is_not() {
        let me = ProcessId::current();
        assert!(me.start_ticks.is_some() && me.is_running());
        let reused = ProcessId {
            pid: me.pid,
            start_ticks: me.start_ticks.map(|t| t + 1),
        };
        assert!(!reused.is_running());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(ProcessId::of(pid).is_none());
    }

    #[test]
    fn an_attempt_is_claimed_once_and_a_dead_holder_is_a_crash() {
        let tmp = tempfile::tempdir().unwrap();
        let claims = ClaimDir::new(tmp.path());
        let claim = Claim::new("exp", 0, 1, "cpu");
        assert!(claims.try_create(&claim).unwrap());
        assert!(!claims.try_create(&claim).unwrap(), "the name exists");
        assert!(matches!(claims.state("exp").unwrap(), ClaimState::Live(_)));
        // A holder process that has exited, with no supervisor: crashed.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = ProcessId::of(child.id()).unwrap();
        child.wait().unwrap();
        let mut dead = Claim::new("exp", 0, 2, "cpu");
        dead.holder.process = gone.clone();
        dead.holder.supervisor = None;
        assert!(claims.try_create(&dead).unwrap());
        let ClaimState::Crashed { reason, .. } = claims.state("exp").unwrap() else {
            panic!("a dead holder's claim is a crash")
        };
        assert!(reason.contains("is gone, no result written"), "{reason}");
        assert_eq!(claims.mark_crashed(&gone, "killed by signal 9").unwrap(), 1);
        assert!(
            claims
                .crash_history("exp")
                .unwrap()
                .contains("attempt 2 (pid")
        );
    }

    #[test]
    fn foreign_holders_are_judged_by_heartbeat() {
        let h = Holder {
            host: "elsewhere.example".into(),
            boot_id: None,
            process: ProcessId {
                pid: 1,
                start_ticks: None,
            },
            supervisor: None,
        };
        let now = SystemTime::now();
        assert_eq!(
            h.liveness(now - Duration::from_secs(10), now),
            Liveness::Alive
        );
        let Liveness::Gone(why) = h.liveness(now - STALE_AFTER - Duration::from_secs(1), now)
        else {
            panic!("old heartbeat must be stale")
        };
        assert!(why.contains("no heartbeat from elsewhere.example"), "{why}");
    }

    #[test]
    fn a_reboot_ends_local_claims() {
        let mut h = Holder::current();
        assert_eq!(
            h.liveness(SystemTime::now(), SystemTime::now()),
            Liveness::Alive
        );
        if h.boot_id.is_some() {
            h.boot_id = Some("another-boot".into());
            assert!(
                matches!(h.liveness(SystemTime::now(), SystemTime::now()), Liveness::Gone(w) if w.contains("rebooted"))
            );
        }
    }
}
