//! Bad `--model` input through the binary: a non-zero exit and exactly one
//! clear error line on stderr, never a panic.

use std::path::Path;
use std::process::Command;

/// Runs `quantbench inspect --model <model>` and returns its single stderr line.
fn inspect_error(model: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .args(["inspect", "--model", model])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run quantbench");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "{model}: expected failure, got {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{model}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{model}: expected one error line, got {stderr:?}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_string()
}

/// Writes the tiny synthetic model as an HF directory.
fn tiny_dir(dir: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .args(["synth", "tiny", "--out"])
        .arg(dir)
        .output()
        .expect("run quantbench synth");
    assert!(status.status.success(), "{status:?}");
}

#[test]
fn missing_directory_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("no-such-model");
    let e = inspect_error(dir.to_str().unwrap());
    assert!(
        e.contains("no-such-model") && e.contains("no such file or directory"),
        "{e}"
    );
    let file = tmp.path().join("absent.gguf");
    let e = inspect_error(file.to_str().unwrap());
    assert!(
        e.contains("absent.gguf") && e.contains("no such file"),
        "{e}"
    );
}

#[test]
fn unknown_model_name_lists_accepted_forms() {
    let e = inspect_error("gpt-5");
    assert!(e.contains("unknown model 'gpt-5'"), "{e}");
    assert!(
        e.contains("synth:") && e.contains(".gguf") && e.contains("org/name"),
        "{e}"
    );
}

#[test]
fn hub_id_offline_says_what_to_do() {
    let e = inspect_error("nobody-here/no-such-model");
    assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
    assert!(
        e.contains("huggingface-cli download nobody-here/no-such-model"),
        "{e}"
    );
    assert!(e.contains("--model DIR") && e.contains("HF_TOKEN"), "{e}");
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    tiny_dir(&dir);
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = inspect_error(dir.to_str().unwrap());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );
    assert!(e.contains("re-download"), "{e}");
}

#[test]
fn unsupported_architecture_and_model_type() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    tiny_dir(&dir);
    let cfg_path = dir.join("config.json");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();

    let mut mistral = cfg.clone();
    mistral["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    mistral["model_type"] = serde_json::json!("mistral");
    std::fs::write(&cfg_path, mistral.to_string()).unwrap();
    let e = inspect_error(dir.to_str().unwrap());
    assert!(
        e.contains("config.json") && e.contains("MistralForCausalLM"),
        "{e}"
    );
    assert!(e.contains("unsupported architecture"), "{e}");

    let mut gpt2 = cfg.clone();
    gpt2.as_object_mut().unwrap().remove("architectures");
    gpt2["model_type"] = serde_json::json!("gpt2");
    std::fs::write(&cfg_path, gpt2.to_string()).unwrap();
    let e = inspect_error(dir.to_str().unwrap());
    assert!(e.contains("config.json") && e.contains("gpt2"), "{e}");
}

#[test]
fn not_a_gguf_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("fake.gguf");
    std::fs::write(&path, b"this is not a model").unwrap();
    let e = inspect_error(path.to_str().unwrap());
    assert!(
        e.contains("fake.gguf") && e.contains("not a GGUF file"),
        "{e}"
    );
}
