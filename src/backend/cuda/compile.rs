//! Run-time compilation of the CUDA C kernels with NVRTC, cached on disk
//! (keyed by source, target architecture, NVRTC version and whether block
//! timelines are recorded) so that only the first run on a machine pays for
//! it.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Result, bail};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};

use super::kernels::SOURCE;

/// 64-bit FNV-1a: a stable hash for cache file names.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Where compiled kernels are kept: `$QUANTBENCH_CACHE/cuda`, else
/// `$XDG_CACHE_HOME/quantbench/cuda`, else `~/.cache/quantbench/cuda`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("QUANTBENCH_CACHE") {
        return Some(PathBuf::from(d).join("cuda"));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("quantbench").join("cuda"))
}

fn nvrtc_version() -> String {
    let (mut major, mut minor) = (0, 0);
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        format!("{major}.{minor}")
    } else {
        "unknown".into()
    }
}

/// Whether the NVRTC library can be loaded on this machine.
pub fn nvrtc_available() -> bool {
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles the kernel source for compute capability `major.minor` to PTX,
/// with block timelines recorded when `trace` (`QB_TRACE` in common.cuh),
/// once per process, reusing a result cached on disk when one exists.
pub fn compile_kernels(major: i32, minor: i32, trace: bool) -> Result<String> {
    type Compiled = Vec<((i32, i32, bool), String)>;
    static COMPILED: Mutex<Compiled> = Mutex::new(Vec::new());
    let mut compiled = COMPILED.lock().expect("kernel cache lock");
    if let Some((_, ptx)) = compiled.iter().find(|(k, _)| *k == (major, minor, trace)) {
        return Ok(ptx.clone());
    }
    let ptx = compile_or_load(major, minor, trace)?;
    compiled.push(((major, minor, trace), ptx.clone()));
    Ok(ptx)
}

fn compile_or_load(major: i32, minor: i32, trace: bool) -> Result<String> {
    if !nvrtc_available() {
        bail!(
            "the NVRTC library (libnvrtc.so) was not found; put the CUDA toolkit's lib directory on LD_LIBRARY_PATH"
        );
    }
    let arch = format!("compute_{major}{minor}");
    let version = nvrtc_version();
    let defines: &[&str] = if trace { &["QB_TRACE"] } else { &[] };
    let key = fnv1a(&[
        SOURCE.as_bytes(),
        arch.as_bytes(),
        version.as_bytes(),
        defines.join(",").as_bytes(),
    ]);
    let path = cache_dir().map(|d| d.join(format!("kernels-{arch}-{key:016x}.ptx")));
    if let Some(p) = &path
        && let Ok(ptx) = std::fs::read_to_string(p)
        && ptx.contains(".entry")
    {
        return Ok(ptx);
    }
    let ptx = compile_source(SOURCE, &arch, defines)?;
    if let Some(p) = &path {
        // A cache that cannot be written only costs the next run a compile.
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        let written = p
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| std::fs::write(&tmp, &ptx))
            .and_then(|_| std::fs::rename(&tmp, p));
        if let Err(e) = written {
            tracing::debug!("could not cache compiled kernels at {}: {e}", p.display());
        }
    }
    Ok(ptx)
}

/// Compiles `source` for the virtual architecture `arch` (e.g. `compute_90`)
/// with the preprocessor macros `defines` set.
pub fn compile_source(source: &str, arch: &str, defines: &[&str]) -> Result<String> {
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--restrict".into(),
    ];
    options.extend(defines.iter().map(|d| format!("-D{d}")));
    let opts = CompileOptions {
        options,
        name: Some("quantbench_kernels.cu".into()),
        ..Default::default()
    };
    let ptx: Ptx = compile_ptx_with_opts(source, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            anyhow::anyhow!(
                "NVRTC failed to compile the CUDA kernels:\n{}",
                log.to_string_lossy()
            )
        }
        other => anyhow::anyhow!("NVRTC error: {other:?}"),
    })?;
    Ok(ptx.to_src())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_change_with_every_part() {
        let a = fnv1a(&[b"src", b"compute_90", b"13.0"]);
        assert_ne!(a, fnv1a(&[b"src", b"compute_80", b"13.0"]));
        assert_ne!(a, fnv1a(&[b"src2", b"compute_90", b"13.0"]));
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_eq!(a, fnv1a(&[b"src", b"compute_90", b"13.0"]));
    }
}
