//! The CUDA backend loads its kernels by the names listed in
//! src/backend/cuda/kernels.rs (`KERNEL_NAMES`); a kernel missing from that
//! list fails only when a GPU first launches it. This test, which needs no
//! GPU, checks the list against the entry points of the kernel sources
//! after the C preprocessor has expanded the macros that define several
//! instances (`c++ -E`, or `$CXX -E`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

/// The quoted strings between `start` and the next `end` of `text`.
fn quoted_between<'a>(text: &'a str, start: &str, end: &str) -> Vec<&'a str> {
    let from = text.find(start).unwrap_or_else(|| panic!("no {start:?}")) + start.len();
    let body = &text[from..from + text[from..].find(end).expect("list end")];
    body.split('"').skip(1).step_by(2).collect()
}

#[test]
fn kernel_name_list_matches_the_entry_points_of_the_sources() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/backend/cuda");
    let listing = std::fs::read_to_string(root.join("kernels.rs")).unwrap();
    let files = quoted_between(&listing, "pub const SOURCE", ");");
    let files: Vec<&str> = files
        .into_iter()
        .filter(|f| f.starts_with("kernels/"))
        .collect();
    assert!(files.len() >= 5, "kernel files: {files:?}");
    let source: String = files
        .iter()
        .map(|f| std::fs::read_to_string(root.join(f)).expect("kernel source") + "\n")
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kernels.cu");
    std::fs::write(&path, source).unwrap();
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args(["-E", "-P", "-x", "c++"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ preprocessor {cxx:?}: {e}"));
    assert!(
        out.status.success(),
        "preprocessing the kernels failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expanded = String::from_utf8_lossy(&out.stdout);
    // An entry point: `extern "C" __global__ void [__launch_bounds__(..)] name(`.
    let mut defined = BTreeSet::new();
    for (at, _) in expanded.match_indices("extern \"C\" __global__ void") {
        let rest = &expanded[at..];
        let head = &rest[..rest.find('(').expect("parameter list")];
        let head = if head.ends_with("__launch_bounds__") {
            let close = rest.find(')').expect("launch bounds");
            &rest[..close + 1 + rest[close + 1..].find('(').expect("parameter list")]
        } else {
            head
        };
        let name = head.split_whitespace().last().expect("kernel name");
        defined.insert(name.to_string());
    }
    let listed: BTreeSet<String> = quoted_between(&listing, "pub const KERNEL_NAMES", "];")
        .into_iter()
        .map(String::from)
        .collect();
    let unlisted: Vec<_> = defined.difference(&listed).collect();
    let missing: Vec<_> = listed.difference(&defined).collect();
    assert!(
        unlisted.is_empty() && missing.is_empty(),
        "kernels defined but not in KERNEL_NAMES: {unlisted:?}; listed but not defined: {missing:?}"
    );
    assert!(defined.len() > 80, "{} entry points found", defined.len());
}
