//! GPTQ and AWQ through the binary: `export` quantizes with calibration
//! (per-block progress, wall time) and writes GPTQ / AWQ checkpoints that
//! `inspect` and `generate` reload; the runner runs calibrated experiments
//! and records their divergence; bad calibration input fails with one clear
//! error line.

use std::path::Path;
mod common;

use common::{error_line, ok};

fn export(out: &Path, quant: &str, format: &str) -> String {
    let o = ok(&[
        "export",
        "--model",
        "synth:tiny",
        "--quant",
        quant,
        "--format",
        format,
        "--out",
        out.to_str().unwrap(),
        "--calib-samples",
        "3",
        "--calib-seq-len",
        "48",
    ]);
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn exports_reload_through_inspect_and_generate() {
    let dir = tempfile::tempdir().unwrap();
    let gptq = dir.path().join("gptq");
    let log = export(&gptq, "gptq,bits=4,group_size=32,desc_act=true", "gptq");
    assert!(log.contains("gptq: block 1/2 quantized in"), "{log}");
    assert!(
        log.contains("gptq: 2 blocks on 144 calibration tokens in"),
        "{log}"
    );
    let qc = json(&gptq.join("quantize_config.json"));
    assert_eq!(
        (
            qc["bits"].as_u64(),
            qc["group_size"].as_i64(),
            qc["desc_act"].as_bool()
        ),
        (Some(4), Some(32), Some(true))
    );
    let cfg = json(&gptq.join("config.json"));
    assert_eq!(cfg["quantization_config"]["quant_method"], "gptq");
    let inspect = ok(&["inspect", "--model", gptq.to_str().unwrap()]);
    let inspect = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.contains("gptq-4bit-g32-act"), "{inspect}");

    let awq = dir.path().join("awq");
    let log = export(&awq, "awq,group_size=32", "awq");
    assert!(log.contains("awq: block 2/2 quantized in"), "{log}");
    let cfg = json(&awq.join("config.json"));
    assert_eq!(cfg["quantization_config"]["quant_method"], "awq");
    assert_eq!(cfg["quantization_config"]["version"], "gemm");
    let inspect = ok(&["inspect", "--model", awq.to_str().unwrap()]);
    let inspect = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.contains("awq-4bit-g32"), "{inspect}");
    for model in [&gptq, &awq] {
        let g = ok(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "one two",
            "--max-tokens",
            "4",
        ]);
        assert!(!g.stdout.is_empty());
    }
}

#[test]
fn calibrated_experiments_run_through_the_runner() {
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("calib.jsonl");
    let line = "{\"text\": \"the boat left the harbour before dawn and came back at noon\"}\n";
    std::fs::write(&calib, line.repeat(40)).unwrap();
    let config = dir.path().join("exp.toml");
    let table = |name: &str, quant: &str| {
        format!(
            "[experiments.{name}]\nquant = {quant}\neval = {{ sanity = false, coqa = false, divergence = true }}\nbenchmark = false\n"
        )
    };
    std::fs::write(
        &config,
        [
            "[defaults]\ndtype = \"f32\"\n".to_string(),
            table(
                "g",
                "{ method = \"gptq\", bits = 3, group_size = 32, calib = { samples = 2, seq_len = 64 } }",
            ),
            table(
                "a",
                "{ method = \"awq\", group_size = 32, calib = { samples = 2, seq_len = 64 } }",
            ),
        ]
        .concat(),
    )
    .unwrap();
    let run_dir = dir.path().join("run");
    let out = ok(&[
        "run",
        "g",
        "a",
        "--model",
        "synth:tiny",
        "--config",
        config.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--run-dir",
        run_dir.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("gptq: block 2/2 quantized in"), "{stderr}");
    for (name, format) in [("g", "gptq-3bit-g32"), ("a", "awq-4bit-g32")] {
        let r = json(&run_dir.join(format!("{name}.json")));
        let text = r.to_string();
        assert!(text.contains(format), "{name}: {text}");
        assert!(text.contains("calib.jsonl"), "{name}: {text}");
        let kl = r["accuracy"]["kl_divergence"].as_f64().unwrap();
        assert!(kl > 0.0 && kl.is_finite(), "{name}: KL {kl}");
        assert!(r["timings"]["quantize_s"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn bad_calibration_input_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "far too short").unwrap();
    let base = |quant: &'static str, format: &'static str| {
        vec![
            "export",
            "--model",
            "synth:tiny",
            "--quant",
            quant,
            "--format",
            format,
            "--out",
            out,
        ]
    };
    let with_calib = |file: &Path| {
        let mut a = base("gptq", "gptq");
        a.extend(["--calib", file.to_str().unwrap()]);
        error_line(&a)
    };
    let e = with_calib(&empty);
    assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
    let e = with_calib(&short);
    assert!(
        e.contains("short.txt") && e.contains("fewer than one sample"),
        "{e}"
    );
    let e = error_line(&base("gptq,bits=5", "gptq"));
    assert!(e.contains("bits 5"), "{e}");
    let e = error_line(&base("gptq,group_size=0", "gptq"));
    assert!(e.contains("group_size 0"), "{e}");
    let e = error_line(&base("gptq,static_groups=true", "gptq"));
    assert!(e.contains("static_groups") && e.contains("desc_act"), "{e}");
    let mut a = base("gptq,desc_act=true,group_size=32", "awq");
    a.extend(["--calib-samples", "2", "--calib-seq-len", "32"]);
    let e = error_line(&a);
    assert!(e.contains("act-order"), "{e}");
}
