//! Local scale-out through the binary: `sweep --devices cpu,cpu` runs a
//! sweep with two worker processes sharing one run directory; a worker that
//! crashes gets its experiment retried once, then recorded as failed.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

fn quantbench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quantbench"))
}

/// Four experiments: NF4 block size × double quantization, one CoQA document.
const GRID: &str = r#"base = "bnb_4bit_nf4"
[set]
"eval.limit" = 1
[grid]
"quant.block_size" = [64, 128]
"quant.double_quant" = [true, false]
"#;

const NAMES: [&str; 4] = [
    "bnb_4bit_nf4__block_size=64__double_quant=true",
    "bnb_4bit_nf4__block_size=64__double_quant=false",
    "bnb_4bit_nf4__block_size=128__double_quant=true",
    "bnb_4bit_nf4__block_size=128__double_quant=false",
];

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("valid JSON")
}

fn result(run: &Path, name: &str) -> serde_json::Value {
    json(&run.join(format!("{name}.json")))
}

fn claim(run: &Path, name: &str, attempt: u32) -> serde_json::Value {
    json(&run.join(format!("scaleout/claims/{name}.attempt-{attempt}.claim")))
}

/// Runs `sweep GRID --devices cpu,cpu` on synth:tiny into `run`.
fn sweep(grid: &Path, run: &Path, extra: &[&str], crash: Option<&str>) -> Output {
    let mut cmd = quantbench();
    cmd.args(["sweep", grid.to_str().unwrap(), "--model", "synth:tiny"])
        .args(["--devices", "cpu,cpu", "--run-dir", run.to_str().unwrap()])
        .args(extra)
        .env_remove("QUANTBENCH_CRASH_EXPERIMENT")
        // Where core dumps of the aborted workers would land, if enabled.
        .current_dir(run.parent().unwrap());
    if let Some(spec) = crash {
        cmd.env("QUANTBENCH_CRASH_EXPERIMENT", spec);
    }
    cmd.output().expect("binary runs")
}

fn status(run: &Path) -> String {
    let out = quantbench()
        .args(["status", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pids of the workers the supervisor reports starting.
fn started_pids(stderr: &str) -> Vec<u32> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("sweep: worker pid "))
        .filter_map(|l| l.strip_suffix(" started on cpu"))
        .map(|pid| pid.parse().expect("pid"))
        .collect()
}

#[test]
fn two_workers_share_a_four_experiment_sweep() {
    let tmp = tempfile::tempdir().unwrap();
    let grid = tmp.path().join("grid.toml");
    std::fs::write(&grid, GRID).unwrap();
    let run = tmp.path().join("run");
    // Full benchmarks make each experiment take long enough (seconds) that
    // both workers are running before the first one could take everything.
    let out = sweep(&grid, &run, &["--full-bench"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    let pids = started_pids(&stderr);
    assert_eq!(pids.len(), 2, "two workers, none restarted:\n{stderr}");
    assert_ne!(pids[0], pids[1]);
    let mut holders = BTreeSet::new();
    for name in NAMES {
        let r = result(&run, name);
        assert_eq!(r["status"], "ok", "{name}: {r}");
        assert!(r["bench"]["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
        let c = claim(&run, name, 1);
        assert_eq!(c["ended"]["outcome"], "finished", "{c}");
        let pid = c["holder"]["process"]["pid"].as_u64().unwrap() as u32;
        assert!(
            pids.contains(&pid),
            "{name} ran in pid {pid}, not a worker: {pids:?}"
        );
        assert!(
            stderr.contains(&format!("[worker pid {pid} on cpu] {name}: done")),
            "{stderr}"
        );
        holders.insert(pid);
    }
    assert_eq!(holders.len(), 2, "both workers ran experiments:\n{stderr}");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert_eq!(summary.matches(" ok ").count(), 4, "{summary}");
    let st = status(&run);
    assert!(
        st.contains("4 experiments: 4 finished, 0 running, 0 failed"),
        "{st}"
    );

    // Rerunning finds everything finished and starts no experiment.
    let again = sweep(&grid, &run, &["--full-bench"], None);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(!stderr.contains("attempt 1 started"), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&again.stdout)
            .matches("cached")
            .count(),
        4
    );
}

#[test]
fn a_crashed_experiment_is_retried_once_then_recorded_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let grid = tmp.path().join("grid.toml");
    std::fs::write(&grid, GRID).unwrap();
    let run = tmp.path().join("run");
    let [always, first_only, ..] = NAMES;
    // `always` aborts its worker in every attempt; `first_only` in attempt 1.
    let crash = format!("{always},{first_only}@1");
    let out = sweep(&grid, &run, &["--quick"], Some(&crash));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a failed experiment fails the sweep");
    assert!(
        stderr.contains("error: 1 of 4 experiments failed"),
        "{stderr}"
    );
    // Three crashes, each followed by a replacement worker.
    assert_eq!(stderr.matches("killed by signal 6").count(), 3, "{stderr}");
    assert_eq!(started_pids(&stderr).len(), 5, "{stderr}");

    // Attempts 1 and 2 of `always` crashed; the third claim recorded the failure.
    for attempt in [1, 2] {
        let c = claim(&run, always, attempt);
        assert_eq!(c["ended"]["outcome"], "crashed", "{c}");
    }
    assert_eq!(claim(&run, always, 3)["ended"]["outcome"], "failed");
    let r = result(&run, always);
    assert_eq!(r["status"], "failed");
    let err = r["error"].as_str().unwrap();
    assert!(err.starts_with("crashed in all 2 attempts"), "{err}");
    assert!(
        err.contains("attempt 1 (") && err.contains("attempt 2 ("),
        "{err}"
    );
    assert!(err.contains("killed by signal 6"), "{err}");

    // `first_only` crashed once and succeeded on its retry.
    assert_eq!(claim(&run, first_only, 1)["ended"]["outcome"], "crashed");
    assert_eq!(claim(&run, first_only, 2)["ended"]["outcome"], "finished");
    assert_eq!(result(&run, first_only)["status"], "ok");
    for name in &NAMES[2..] {
        assert_eq!(result(&run, name)["status"], "ok", "{name}");
    }
    let st = status(&run);
    assert!(
        st.contains("4 experiments: 3 finished, 0 running, 1 failed"),
        "{st}"
    );
    assert!(st.contains("crashed in all 2 attempts"), "{st}");

    // A rerun gives the failed experiment a fresh retry budget; without the
    // injected crash it finishes, and only it runs.
    let again = sweep(&grid, &run, &["--quick"], None);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert_eq!(stderr.matches("attempt 1 started").count(), 1, "{stderr}");
    assert_eq!(result(&run, always)["status"], "ok");
}

#[test]
fn bad_scaleout_input_is_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let grid = tmp.path().join("grid.toml");
    std::fs::write(&grid, GRID).unwrap();
    let run = tmp.path().join("run");
    let err = |args: &[&str]| {
        let out = quantbench().args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let e = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!e.contains("panicked"), "{e}");
        e
    };
    let g = grid.to_str().unwrap();
    let e = err(&["sweep", g, "--devices", "cpu,gpu0"]);
    assert!(
        e.contains("unknown device 'gpu0': expected cpu, cuda or cuda:N"),
        "{e}"
    );
    let e = err(&["sweep", g, "--devices", "cpu", "--slurm"]);
    assert!(e.contains("cannot be used with"), "{e}");
    let e = err(&["sweep", g, "--partition", "gpu"]);
    assert!(e.contains("--slurm"), "{e}");
    let e = err(&["worker", "--run-dir", run.to_str().unwrap()]);
    assert!(e.contains("no sweep plan"), "{e}");
    let e = err(&["run", "--task", "0"]);
    assert!(e.contains("--task needs --run-dir"), "{e}");
    let e = err(&["status", run.to_str().unwrap()]);
    assert!(e.contains("not a quantbench run directory"), "{e}");
    if cfg!(feature = "cuda") {
        let e = err(&["sweep", g, "--devices", "cuda:0,cuda:0"]);
        assert!(e.contains("lists cuda:0 twice"), "{e}");
    } else {
        let e = err(&["sweep", g, "--devices", "cpu,cuda:1"]);
        assert!(e.contains("built without CUDA"), "{e}");
    }
}
