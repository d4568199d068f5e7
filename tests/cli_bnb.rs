//! bitsandbytes formats through the binary: `quantize` writes a checkpoint
//! that `inspect` reloads and accounts for, `divergence` measures KL/top-1,
//! and bad input (method, block size, corrupted quant state) fails with one
//! clear error line.

use std::path::Path;

mod common;

use common::{error_line, stdout_ok};
use quantbench::io::safetensors_io::{RawTensor, read_safetensors_raw, write_safetensors};

fn quantize(out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["quantize", "--model", "synth:tiny", "--out"];
    args.push(out.to_str().unwrap());
    args.extend_from_slice(extra);
    stdout_ok(&args)
}

/// The `bits/param` column of `inspect`'s row for `format`.
fn bits_of(inspect: &str, format: &str) -> f64 {
    let line = inspect
        .lines()
        .find(|l| l.split_whitespace().next() == Some(format))
        .unwrap_or_else(|| panic!("no {format} row in\n{inspect}"));
    line.split_whitespace().last().unwrap().parse().unwrap()
}

#[test]
fn quantized_checkpoints_reload_and_report_their_storage() {
    let tmp = tempfile::tempdir().unwrap();
    for (method, extra, format) in [
        ("nf4", vec!["--method", "nf4"], "nf4-dq-b64"),
        (
            "nf4-nodq",
            vec!["--method", "nf4", "--double-quant", "false"],
            "nf4-b64",
        ),
        (
            "fp4",
            vec!["--method", "fp4", "--block-size", "128"],
            "fp4-dq-b128",
        ),
        ("int8", vec!["--method", "int8"], "int8-t6"),
    ] {
        let dir = tmp.path().join(method);
        quantize(&dir, &extra);
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["quantization_config"]["quant_method"], "bitsandbytes");
        let inspect = stdout_ok(&["inspect", "--model", dir.to_str().unwrap()]);
        // 2 layers × 7 linears quantized; embeddings and norms stay f32.
        let row = inspect
            .lines()
            .find(|l| l.starts_with(format))
            .unwrap_or_else(|| panic!("{method}: no {format} row in\n{inspect}"));
        assert_eq!(row.split_whitespace().nth(1), Some("14"), "{row}");
        assert_eq!(bits_of(&inspect, "f32"), 32.0);
        let q = inspect
            .lines()
            .find(|l| l.starts_with("quantized layers only"))
            .unwrap_or_else(|| panic!("{inspect}"));
        let q_bits: f64 = q
            .split(", ")
            .last()
            .unwrap()
            .trim_end_matches(" bits/param")
            .parse()
            .unwrap();
        assert_eq!(q_bits, bits_of(&inspect, format), "{inspect}");
        assert!(bits_of(&inspect, "total") > q_bits, "{inspect}");
    }
}

#[test]
fn divergence_of_an_identical_model_is_zero() {
    let out = stdout_ok(&[
        "divergence",
        "--model",
        "synth:tiny",
        "--quant",
        "none",
        "--tokens",
        "48",
        "--window",
        "20",
    ]);
    assert!(out.contains("tokens: 48 (3 windows"), "{out}");
    assert!(out.contains("mean KL(base||quant): 0.000000"), "{out}");
    assert!(out.contains("top-1 agreement: 1.0000"), "{out}");
    let out = stdout_ok(&[
        "divergence",
        "--model",
        "synth:tiny",
        "--quant",
        "bnb_4bit_nf4",
        "--tokens",
        "48",
    ]);
    assert!(out.contains("base dtype: f16"), "{out}");
    let kl: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("mean KL(base||quant): "))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(kl > 0.0, "{out}");
}

#[test]
fn bad_methods_and_block_sizes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let o = out.to_str().unwrap();
    let base = ["quantize", "--model", "synth:tiny", "--out", o];
    let run = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        error_line(&a)
    };
    let e = run(&["--method", "nf5"]);
    assert!(
        e.contains("--method nf5") && e.contains("nf4, fp4 or int8"),
        "{e}"
    );
    let e = run(&["--method", "nf4", "--block-size", "48"]);
    assert!(e.contains("48") && e.contains("power of two"), "{e}");
    // synth:tiny's MLP matrices hold 64 × 176 = 11264 = 2^10 · 11 weights.
    let e = run(&["--method", "fp4", "--block-size", "2048"]);
    assert!(
        e.contains("2048") && e.contains("does not divide") && e.contains(".mlp."),
        "{e}"
    );
    let e = error_line(&["divergence", "--model", "synth:tiny", "--quant", "q3"]);
    assert!(e.contains("'q3'") && e.contains("preset"), "{e}");
    assert!(!out.exists(), "nothing is written on bad input");
}

/// Rewrites tensor `name` of `dir`'s model.safetensors.
fn edit_tensor(dir: &Path, name: &str, edit: impl Fn(&mut RawTensor)) {
    let path = dir.join("model.safetensors");
    let mut t = read_safetensors_raw(&path).unwrap();
    edit(t.get_mut(name).unwrap());
    let list: Vec<_> = t.into_iter().collect();
    write_safetensors(&path, &list, None).unwrap();
}

#[test]
fn corrupted_quant_state_names_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let state = "model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4";

    let dir = tmp.path().join("bad-json");
    quantize(&dir, &["--method", "nf4"]);
    edit_tensor(&dir, state, |t| {
        t.bytes = b"{\"quant_type\": \"nf4\", \"blocksize\"".to_vec();
        t.shape = vec![t.bytes.len()];
    });
    let e = error_line(&["inspect", "--model", dir.to_str().unwrap()]);
    assert!(
        e.contains("model.safetensors") && e.contains(state) && e.contains("not valid JSON"),
        "{e}"
    );

    // Without double quantization the absmax is f32; drop its last block.
    let dir = tmp.path().join("short-absmax");
    quantize(&dir, &["--method", "nf4", "--double-quant", "false"]);
    edit_tensor(&dir, "model.layers.1.mlp.up_proj.weight.absmax", |t| {
        t.bytes.truncate(t.bytes.len() - 4);
        t.shape = vec![t.bytes.len() / 4];
    });
    let e = error_line(&["inspect", "--model", dir.to_str().unwrap()]);
    assert!(
        e.contains("model.safetensors") && e.contains(state) && e.contains("absmax has"),
        "{e}"
    );
}
