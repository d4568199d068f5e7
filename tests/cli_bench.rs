//! `quantbench bench` end to end on a tiny synthetic model.

use std::process::Command;

#[test]
fn bench_writes_consistent_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .args([
            "bench",
            "--model",
            "synth:tiny",
            "--prompt-lens",
            "8,32",
            "--decode-prompt-len",
            "16",
            "--decode-tokens",
            "6",
            "--batch-sizes",
            "1,3",
            "--throughput-prompt-len",
            "8",
            "--throughput-tokens",
            "4",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("32.000 bits/parameter"), "{stdout}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let prefill = r["prefill"].as_array().unwrap();
    assert_eq!(prefill.len(), 2);
    assert_eq!(prefill[1]["prompt_len"], 32);
    assert_eq!(prefill[0]["ms"]["n"], 2);
    assert_eq!(r["decode_ms_per_token"]["n"], 6);
    let mean = r["decode_ms_per_token"]["mean"].as_f64().unwrap();
    let tps = r["decode_tokens_per_s"].as_f64().unwrap();
    assert!(mean > 0.0 && (tps - 1e3 / mean).abs() < 1e-6 * tps);
    let tp = r["throughput"].as_array().unwrap();
    assert_eq!(tp[1]["batch_size"], 3);
    assert!(tp[1]["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(r["peak_memory_kind"], "process_rss");
    assert!(r["peak_memory_bytes"].as_u64().unwrap() > 1 << 20);
}
