//! Local scale-out (`sweep --devices cpu,cuda:0,...`): one worker process per
//! device, each this same binary running `quantbench worker`. The supervisor
//! only starts workers and watches them; the workers share the experiments
//! through claim files. When a worker dies, the supervisor marks its claim
//! crashed and starts a new worker on that device, which retries the
//! experiment (or records it failed once its attempts are used up).

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::claim::{ClaimDir, ProcessId, SUPERVISOR_ENV};
use super::log_line;
use crate::backend::Device;

/// How often the supervisor looks at its workers.
const POLL: Duration = Duration::from_millis(100);

/// Checks a `--devices` list: not empty, and no GPU twice (CPU workers may
/// repeat; they share the cores).
pub fn check_devices(devices: &[Device]) -> Result<()> {
    if devices.is_empty() {
        bail!("--devices needs at least one device (cpu, cuda or cuda:N)");
    }
    for (i, d) in devices.iter().enumerate() {
        if matches!(d, Device::Cuda(_)) && devices[..i].contains(d) {
            bail!("--devices lists {d} twice; one worker per GPU");
        }
        if matches!(d, Device::Cuda(_)) && !cfg!(feature = "cuda") {
            bail!(
                "--devices {d}: this quantbench was built without CUDA; rebuild with `cargo build --release --features cuda`"
            );
        }
    }
    Ok(())
}

/// A running worker.
struct Worker {
    child: Child,
    id: ProcessId,
    device: Device,
}

/// `exited with status 1`, `killed by signal 6`.
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "ended abnormally".to_string(),
    }
}

/// Starts `exe worker` on `device` for `run_dir`. CPU workers get an equal
/// share of the cores (unless RAYON_NUM_THREADS is set).
fn spawn(exe: &Path, run_dir: &Path, device: Device, cpu_workers: usize) -> Result<Worker> {
    let mut cmd = Command::new(exe);
    cmd.arg("worker")
        .arg("--run-dir")
        .arg(run_dir)
        .arg("--device")
        .arg(device.to_string())
        .env(SUPERVISOR_ENV, std::process::id().to_string());
    if device == Device::Cpu && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cmd.env(
            "RAYON_NUM_THREADS",
            (cores / cpu_workers).max(1).to_string(),
        );
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("{}: cannot start a worker", exe.display()))?;
    let id = ProcessId::of(child.id()).unwrap_or(ProcessId {
        pid: child.id(),
        start_ticks: None,
    });
    log_line!("sweep: worker pid {} started on {device}", id.pid);
    Ok(Worker { child, id, device })
}

/// Runs workers on `devices` over the plan in `run_dir` until none has work
/// left. A worker that dies while holding an experiment is replaced; one that
/// fails before claiming anything is not (its error is on stderr), and the
/// returned list names it.
pub fn run_workers(run_dir: &Path, devices: &[Device]) -> Result<Vec<String>> {
    let exe = std::env::current_exe().context("cannot locate the quantbench binary")?;
    let claims = ClaimDir::new(run_dir);
    let cpu_workers = devices.iter().filter(|d| **d == Device::Cpu).count();
    let mut slots = devices
        .iter()
        .map(|&d| spawn(&exe, run_dir, d, cpu_workers).map(Some))
        .collect::<Result<Vec<_>>>()?;
    let mut broken = vec![];
    while slots.iter().any(Option::is_some) {
        std::thread::sleep(POLL);
        for slot in &mut slots {
            let Some(w) = slot else { continue };
            let Some(status) = w.child.try_wait().context("cannot wait for a worker")? else {
                continue;
            };
            if status.success() {
                log_line!("sweep: worker pid {} on {} finished", w.id.pid, w.device);
                *slot = None;
                continue;
            }
            let how = format!(
                "worker pid {} on {} {}",
                w.id.pid,
                w.device,
                describe(status)
            );
            let crashed = claims.mark_crashed(&w.id, &how)?;
            if crashed > 0 {
                log_line!("sweep: {how}; its experiment will be retried or recorded as failed");
                *slot = Some(spawn(&exe, run_dir, w.device, cpu_workers)?);
            } else {
                log_line!("sweep: {how} without holding an experiment; not restarted");
                broken.push(how);
                *slot = None;
            }
        }
    }
    Ok(broken)
}
