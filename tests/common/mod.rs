//! Running the quantbench binary from the integration tests.
// Each test binary compiles this module and uses a subset of it.
#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs `quantbench ARGS` offline (no hub access) and returns its output.
pub fn quantbench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quantbench"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run quantbench")
}

/// Runs `quantbench ARGS`, which must succeed.
pub fn ok(args: &[&str]) -> Output {
    let out = quantbench(args);
    assert!(
        out.status.success(),
        "quantbench {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The standard output of `quantbench ARGS`, which must succeed.
pub fn stdout_ok(args: &[&str]) -> String {
    String::from_utf8_lossy(&ok(args).stdout).to_string()
}

/// The single `error: ...` line of a failing command (no panic, nothing else).
pub fn error_line(args: &[&str]) -> String {
    let out = quantbench(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?}: expected failure");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one line, got {stderr:?}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_string()
}
