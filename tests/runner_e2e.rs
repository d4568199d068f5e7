//! The experiment harness end to end through the binary: compare → result
//! files → report; an interrupted run resumed; bad input refused clearly.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::ok;

fn quantbench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quantbench"))
}

fn run_err(args: &[&str]) -> String {
    let out = quantbench().args(args).output().expect("binary runs");
    assert!(!out.status.success(), "quantbench {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    err
}

const TRIO: [&str; 3] = ["fp16_baseline", "bnb_4bit_nf4", "bnb_4bit_fp4"];

fn result_json(dir: &Path, name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).expect("result file");
    serde_json::from_str(&text).expect("valid JSON")
}

#[test]
fn compare_then_report() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = ok(&[
        "compare",
        "--model",
        "synth:tiny",
        "--limit",
        "2",
        "--quick",
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    let summary = String::from_utf8_lossy(&out.stdout);
    for name in TRIO {
        assert!(summary.contains(name), "{summary}");
        let r = result_json(&run, name);
        assert_eq!(r["status"], "ok", "{name}: {r}");
        assert_eq!(r["schema_version"], 1);
        assert_eq!(r["accuracy"]["coqa_docs"], 2, "{name}");
        assert_eq!(r["sanity"].as_array().unwrap().len(), 3);
        assert!(
            r["bench"]["decode_ms_per_token"]["mean"].as_f64().unwrap() > 0.0,
            "{r}"
        );
        assert!(r["storage"]["weight_bytes"].as_u64().unwrap() > 0);
        assert!(!r["provenance"]["tool_version"].as_str().unwrap().is_empty());
        // Records of both documents, after the header line.
        let records = std::fs::read_to_string(run.join(format!("{name}.coqa.jsonl"))).unwrap();
        assert_eq!(records.lines().count(), 3, "{records}");
    }
    let fp16 = result_json(&run, "fp16_baseline")["storage"]["bits_per_parameter"].as_f64();
    let nf4 = result_json(&run, "bnb_4bit_nf4")["storage"]["bits_per_parameter"].as_f64();
    assert_eq!(fp16, Some(16.0));
    assert!(nf4.unwrap() < 16.0);
    // Divergence from the unquantized model at the experiment's dtype: the
    // baseline is that model (KL 0, full agreement), the 4-bit ones are not.
    let acc = |name: &str| result_json(&run, name)["accuracy"].clone();
    let base = acc("fp16_baseline");
    assert_eq!(base["kl_divergence"].as_f64(), Some(0.0), "{base}");
    assert_eq!(base["top1_agreement"].as_f64(), Some(1.0), "{base}");
    assert!(base["divergence_tokens"].as_u64().unwrap() >= 100, "{base}");
    for name in ["bnb_4bit_nf4", "bnb_4bit_fp4"] {
        let a = acc(name);
        let kl = a["kl_divergence"].as_f64().unwrap();
        let top1 = a["top1_agreement"].as_f64().unwrap();
        assert!(kl > 0.0 && kl.is_finite(), "{name}: {a}");
        assert!((0.0..=1.0).contains(&top1), "{name}: {a}");
    }

    let report = tmp.path().join("report");
    ok(&[
        "report",
        run.to_str().unwrap(),
        "--out",
        report.to_str().unwrap(),
    ]);
    for f in [
        "report.html",
        "report.md",
        "accuracy_vs_bits.png",
        "accuracy_vs_bits.svg",
        "memory.png",
        "decode_latency.png",
        "throughput.png",
    ] {
        let len = std::fs::metadata(report.join(f))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 500, "{f} missing or empty ({len} bytes)");
    }
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    for name in TRIO {
        assert!(md.contains(name), "{md}");
    }
    assert!(
        md.contains("100.0%"),
        "the baseline's top-1 agreement: {md}"
    );
    let png = std::fs::read(report.join("accuracy_vs_bits.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn interrupted_run_resumes_only_missing_experiments() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let args = [
        "compare",
        "--model",
        "synth:tiny",
        "--limit",
        "2",
        "--full-bench",
        "--run-dir",
        run.to_str().unwrap(),
    ];
    // Full (non-quick) benchmarks make each experiment take a while; kill the
    // run as soon as the first result file lands.
    let mut child = quantbench()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first = run.join("fp16_baseline.json");
    let start = Instant::now();
    while !first.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "first result never appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "run ended before the first result"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !run.join("bnb_4bit_fp4.json").exists(),
        "the run finished before it could be interrupted"
    );
    let before = std::fs::read(&first).unwrap();

    let out = ok(&args);
    let summary = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("fp16_baseline: already finished, skipped"),
        "{log}"
    );
    assert!(!log.contains("bnb_4bit_fp4: already finished"), "{log}");
    assert!(summary.contains("cached"), "{summary}");
    assert_eq!(
        std::fs::read(&first).unwrap(),
        before,
        "a finished result was rewritten"
    );
    for name in TRIO {
        assert_eq!(result_json(&run, name)["status"], "ok");
    }
}

#[test]
fn bad_input_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let err = run_err(&["run", "no_such_experiment", "--model", "synth:tiny"]);
    assert!(err.contains("no_such_experiment"), "{err}");
    assert!(
        err.contains("fp16_baseline") && err.contains("awq_4bit_g128"),
        "{err}"
    );

    let grid = tmp.path().join("grid.toml");
    std::fs::write(
        &grid,
        "base = \"bnb_4bit_nf4\"\n[grid]\n\"quant.block_size\" = [64, 48]\n",
    )
    .unwrap();
    let err = run_err(&["sweep", grid.to_str().unwrap(), "--model", "synth:tiny"]);
    assert!(err.contains("quant.block_size = 48"), "{err}");

    let run = tmp.path().join("old");
    std::fs::create_dir_all(&run).unwrap();
    let info = "{\"schema_version\": 0, \"command\": \"old\"}";
    std::fs::write(run.join("run.json"), info).unwrap();
    let err = run_err(&[
        "compare",
        "--model",
        "synth:tiny",
        "--limit",
        "1",
        "--quick",
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    assert!(err.contains("schema version 0"), "{err}");
    assert_eq!(std::fs::read_to_string(run.join("run.json")).unwrap(), info);
    assert_eq!(
        std::fs::read_dir(&run).unwrap().count(),
        1,
        "nothing else written"
    );
}
