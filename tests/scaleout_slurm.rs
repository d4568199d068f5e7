//! Slurm scale-out through the binary: the job-array script of
//! `sweep --slurm --dry-run`, a clear error without sbatch, and a real
//! 3-experiment job array on a one-node Slurm cluster that
//! scripts/slurm-localhost.sh installs (Debian packages) and starts on this
//! machine, stopped again when the test ends, passing or not.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn quantbench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quantbench"))
}

/// Three experiments: NF4 at three block sizes, one CoQA document.
const GRID: &str = r#"base = "bnb_4bit_nf4"
[set]
"eval.limit" = 1
[grid]
"quant.block_size" = [32, 64, 128]
"#;

const NAMES: [&str; 3] = [
    "bnb_4bit_nf4__block_size=32",
    "bnb_4bit_nf4__block_size=64",
    "bnb_4bit_nf4__block_size=128",
];

fn write_grid(dir: &Path) -> PathBuf {
    let grid = dir.join("three.toml");
    std::fs::write(&grid, GRID).unwrap();
    grid
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn dry_run_prints_the_job_array_script() {
    let tmp = tempfile::tempdir().unwrap();
    let grid = write_grid(tmp.path());
    let run = tmp.path().join("run");
    let out = quantbench()
        .args(["sweep", grid.to_str().unwrap(), "--model", "synth:tiny"])
        .args(["--run-dir", run.to_str().unwrap(), "--slurm", "--dry-run"])
        .args([
            "--partition",
            "gpu-a100",
            "--gres",
            "gpu:1",
            "--time",
            "2:00:00",
        ])
        .args(["--account", "quant-lab", "--device", "cuda:0"])
        .output()
        .unwrap();
    let (script, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("dry run: nothing submitted"), "{stderr}");
    let lines: Vec<&str> = script.lines().collect();
    assert_eq!(lines[0], "#!/bin/bash");
    let slurm_dir = run.join("scaleout/slurm");
    for expected in [
        "#SBATCH --job-name=quantbench-sweep-three".to_string(),
        "#SBATCH --array=0-2".to_string(),
        format!("#SBATCH --output={}/%A_%a.out", slurm_dir.display()),
        "#SBATCH --partition=gpu-a100".to_string(),
        "#SBATCH --gres=gpu:1".to_string(),
        "#SBATCH --time=2:00:00".to_string(),
        "#SBATCH --account=quant-lab".to_string(),
        format!(
            "exec '{}' run --run-dir '{}' --device cuda:0 --task \"$SLURM_ARRAY_TASK_ID\"",
            env!("CARGO_BIN_EXE_quantbench"),
            run.display()
        ),
    ] {
        assert!(
            lines.contains(&expected.as_str()),
            "missing {expected}:\n{script}"
        );
    }
    // The script is kept for submitting by hand; nothing was submitted.
    let kept = std::fs::read_to_string(slurm_dir.join("sweep.sbatch")).unwrap();
    assert_eq!(kept, script);
    assert!(!slurm_dir.join("jobs").exists());
    let plan = std::fs::read_to_string(run.join("scaleout/plan.json")).unwrap();
    for name in NAMES {
        assert!(plan.contains(name), "{plan}");
    }
    // Without --gres/--time/... those lines are left out.
    let plain = tmp.path().join("plain");
    let out = quantbench()
        .args(["sweep", grid.to_str().unwrap(), "--model", "synth:tiny"])
        .args(["--run-dir", plain.to_str().unwrap(), "--slurm", "--dry-run"])
        .output()
        .unwrap();
    let (script, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    for absent in ["--partition", "--gres", "--time", "--account"] {
        assert!(!script.contains(&format!("#SBATCH {absent}")), "{script}");
    }
}

#[test]
fn submitting_without_sbatch_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let grid = write_grid(tmp.path());
    let run = tmp.path().join("run");
    let empty_path = tmp.path().join("no-bin");
    std::fs::create_dir(&empty_path).unwrap();
    let out = quantbench()
        .args(["sweep", grid.to_str().unwrap(), "--model", "synth:tiny"])
        .args(["--run-dir", run.to_str().unwrap(), "--slurm"])
        .env("PATH", &empty_path)
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains(
            "error: sbatch not found on PATH: run on a Slurm submit host, or pass --dry-run"
        ),
        "{stderr}"
    );
    let e = quantbench()
        .args(["sweep", grid.to_str().unwrap(), "--slurm", "--dry-run"])
        .args(["--run-dir", run.to_str().unwrap(), "--partition", "a b"])
        .args(["--model", "synth:tiny"])
        .output()
        .unwrap();
    let (_, stderr) = text(&e);
    assert!(
        stderr.contains("--partition 'a b': must be a single word"),
        "{stderr}"
    );
    let spaced = tmp.path().join("run dir");
    let e = quantbench()
        .args(["sweep", grid.to_str().unwrap(), "--slurm", "--dry-run"])
        .args([
            "--run-dir",
            spaced.to_str().unwrap(),
            "--model",
            "synth:tiny",
        ])
        .output()
        .unwrap();
    let (_, stderr) = text(&e);
    assert!(!e.status.success());
    assert!(stderr.contains("contains whitespace"), "{stderr}");
}

/// The repository's cluster script, for `cluster`'s state directory and port.
fn cluster_script(dir: &Path, port: u16) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm-localhost.sh"))
        .env("QB_SLURM_DIR", dir)
        .env("QB_SLURM_PORT", port.to_string());
    cmd
}

/// A started localhost cluster; dropping it stops its daemons and removes
/// their state, also when the test fails.
struct Cluster {
    dir: PathBuf,
    port: u16,
    conf: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        match cluster_script(&self.dir, self.port).arg("stop").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "stopping the test cluster failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("stopping the test cluster failed: {e}"),
        }
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// Why a Slurm cluster cannot be installed here, if it cannot.
fn cannot_install() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not running as root (the test cluster's daemons and apt need root)".into());
    }
    let installed = ["slurmctld", "slurmd", "sbatch", "munged"]
        .iter()
        .all(|p| on_path(p) || Path::new("/usr/sbin").join(p).is_file());
    if !installed && !on_path("apt-get") {
        return Some("Slurm is not installed and apt-get is not available to install it".into());
    }
    None
}

/// Two consecutive free TCP ports (slurmctld, slurmd).
fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port < 65000
            && TcpListener::bind(("0.0.0.0", port)).is_ok()
            && TcpListener::bind(("0.0.0.0", port + 1)).is_ok()
        {
            return port;
        }
    }
    panic!("no two consecutive free TCP ports");
}

fn start_cluster() -> Cluster {
    let dir = PathBuf::from(format!(
        "/var/tmp/quantbench-slurm-test-{}",
        std::process::id()
    ));
    let port = free_port_pair();
    // Constructed before starting, so a half-started cluster is stopped too.
    let cluster = Cluster {
        conf: dir.join("etc/slurm.conf"),
        dir,
        port,
    };
    let out = cluster_script(&cluster.dir, port)
        .arg("start")
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(
        out.status.success(),
        "scripts/slurm-localhost.sh start failed:\n{stderr}\n{}",
        logs(&cluster.dir.join("log"))
    );
    cluster
}

/// Every file of `dir`, for failure messages.
fn logs(dir: &Path) -> String {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return format!("({} missing)", dir.display());
    };
    entries
        .flatten()
        .map(|e| {
            let body = std::fs::read_to_string(e.path()).unwrap_or_default();
            format!("== {}\n{body}", e.path().display())
        })
        .collect()
}

#[test]
fn a_three_experiment_job_array_runs_on_a_localhost_cluster() {
    if let Some(reason) = cannot_install() {
        println!("SKIPPED a_three_experiment_job_array_runs_on_a_localhost_cluster: {reason}");
        return;
    }
    let cluster = start_cluster();
    let tmp = tempfile::tempdir().unwrap();
    let grid = write_grid(tmp.path());
    // Slurm runs the tasks as the submitting user in their own working
    // directory; the run directory is an absolute path both sides see.
    let run = tmp.path().join("run");
    let out = quantbench()
        .args(["sweep", grid.to_str().unwrap(), "--model", "synth:tiny"])
        .args(["--run-dir", run.to_str().unwrap(), "--slurm", "--quick"])
        .args(["--partition", "debug", "--time", "10"])
        .env("SLURM_CONF", &cluster.conf)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("3 array task(s)"), "{stdout}");
    let job = std::fs::read_to_string(run.join("scaleout/slurm/jobs")).unwrap();
    let job = job.trim().to_string();
    assert!(job.chars().all(|c| c.is_ascii_digit()), "{job}");

    let status = || {
        let out = quantbench()
            .args(["status", run.to_str().unwrap()])
            .env("SLURM_CONF", &cluster.conf)
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        stdout
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last = status();
    while !last.contains("3 experiments: 3 finished") {
        assert!(
            last.contains(" 0 failed, 0 crashed"),
            "an array task failed:\n{last}\n{}",
            logs(&run.join("scaleout/slurm"))
        );
        assert!(
            Instant::now() < deadline,
            "the job array did not finish in 10 minutes:\n{last}\n{}\n{}",
            logs(&run.join("scaleout/slurm")),
            logs(&cluster.dir.join("log"))
        );
        std::thread::sleep(Duration::from_secs(1));
        last = status();
    }
    assert!(last.contains("slurm: "), "{last}");
    for (index, name) in NAMES.iter().enumerate() {
        let r: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join(format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(r["status"], "ok", "{name}: {r}");
        assert!(
            last.lines()
                .any(|l| l.starts_with(name) && l.contains(" finished "))
        );
        // Each experiment ran as its own array task, as the claim records.
        let claim: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join(format!("scaleout/claims/{name}.attempt-1.claim")))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claim["slurm_task"], format!("{job}_{index}"), "{claim}");
        let log =
            std::fs::read_to_string(run.join(format!("scaleout/slurm/{job}_{index}.out"))).unwrap();
        assert!(log.contains(&format!("{name}: done")), "{log}");
    }
    drop(cluster);
}
