//! The decode kernels without a GPU: the CUDA sources are compiled as C++
//! against a CPU emulation of the CUDA subset they use
//! (tests/cuda_emu/prelude.h) and run by
//! tests/cuda_emu/decode_block_vs_definition.cpp: the five kernels of a
//! single-sequence 4-bit decoder block (their work loops, block and warp
//! reductions, shared-memory staging and the attention's cross-block merge)
//! must match the block computed in double precision from its definition.
//! The GPU tests in cuda_backend.rs check the kernels against the CPU backend
//! on the hardware. Needs a C++20 compiler (`c++`, or `$CXX`), which the
//! build already needs for the tokenizer crate, with UBSan's alignment
//! check (`-fsanitize=alignment`: g++ with libubsan, or clang).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel files the decode path uses, in the order kernels.rs joins them.
const SOURCES: [&str; 5] = [
    "common.cuh",
    "attention.cu",
    "gemv.cu",
    "gemv_q4.cu",
    "gemv_mma.cu",
];

/// Helpers written in inline PTX; prelude.h defines CPU versions.
const PTX_HELPERS: [&str; 14] = [
    "h2f",
    "hfma2",
    "f2h",
    "f2bf",
    "ld_cg2",
    "ld_cg4",
    "pdl_wait",
    "pdl_release",
    "trace_event",
    "cp_async16",
    "cp_async_wait_all",
    "prefetch_l2",
    "mma_pack2",
    "mma_16816",
];

/// Removes the definition of device function `name` (through its closing
/// brace and the rest of that line).
fn strip_function(src: &str, name: &str) -> String {
    let head = src
        .match_indices("__device__ __forceinline__ ")
        .map(|(i, _)| i)
        .find(|&i| {
            let rest = &src[i..];
            let open = rest.find('(').unwrap_or(rest.len());
            rest[..open].split_whitespace().last() == Some(name)
        })
        .unwrap_or_else(|| panic!("no device function {name} in the kernel sources"));
    let body = head + src[head..].find('{').expect("function body");
    let mut depth = 0;
    let mut end = body;
    for (i, c) in src[body..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    end = body + i + 1;
                    break;
                }
            }
            _ => {}
        }
    }
    let line_end = src[end..].find('\n').map_or(src.len(), |j| end + j + 1);
    format!("{}{}", &src[..head], &src[line_end..])
}

/// The kernel sources as one C++ file for the emulation.
fn emulated_source(kernels: &Path) -> String {
    let mut src: String = SOURCES
        .iter()
        .map(|f| std::fs::read_to_string(kernels.join(f)).expect("kernel source") + "\n")
        .collect();
    for name in PTX_HELPERS {
        src = strip_function(&src, name);
    }
    src = src
        .replace(
            "extern __shared__ __align__(16) float sm[];",
            "float* sm = emu_dyn_smem;",
        )
        .replace(
            "extern __shared__ float xsm[];",
            "float* xsm = emu_dyn_smem;",
        )
        .replace("extern \"C\" ", "");
    let code: String = src
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect();
    assert!(
        !code.contains("asm"),
        "inline PTX left in the emulated source"
    );
    format!("#include \"prelude.h\"\n{src}")
}

#[test]
fn decode_kernels_match_the_definition_on_a_cpu_emulation() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let emu = root.join("tests/cuda_emu");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kernels.cpp"),
        emulated_source(&root.join("src/backend/cuda/kernels")),
    )
    .unwrap();
    let bin = dir.path().join("decode_block_vs_definition");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O2",
            "-pthread",
            "-Wno-unknown-pragmas",
            // On a GPU a vector access (float2/uint2, float4/uint4) through
            // a pointer not aligned to its size faults; prelude.h aligns the
            // types as CUDA does, and this makes such an access abort the
            // run with a report (on stderr) instead of passing on the CPU.
            "-fsanitize=alignment",
            "-fno-sanitize-recover=alignment",
            "-I",
        ])
        .arg(&emu)
        .arg("-I")
        .arg(dir.path())
        .arg(emu.join("decode_block_vs_definition.cpp"))
        .arg("-o")
        .arg(&bin)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cxx:?}: {e}"));
    assert!(
        out.status.success(),
        "compiling the emulation failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&bin).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    println!("{stdout}");
    assert!(
        run.status.success() && stdout.contains("ALL WITHIN"),
        "decode kernels differ from the definition:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(stdout.matches(": RAN;").count(), 29, "every case ran");
    assert_eq!(stdout.matches(": WITHIN").count(), 29, "every case checked");
}
