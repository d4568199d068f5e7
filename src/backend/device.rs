//! Device selection (`--device cpu | cuda[:N]`).

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};

/// Where a model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

impl FromStr for Device {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => bail!("unknown device '{s}': expected cpu, cuda or cuda:N"),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Runs `$body` with `$b` bound to the backend for `$device`: the one place
/// that turns a runtime device choice into a concrete backend type.
#[macro_export]
macro_rules! with_backend {
    ($device:expr, |$b:ident| $body:expr) => {{
        match $device {
            $crate::backend::Device::Cpu => {
                let $b = $crate::backend::cpu::CpuBackend::new();
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::backend::Device::Cuda(ordinal) => {
                let $b = $crate::backend::cuda::CudaBackend::new(ordinal)?;
                $body
            }
            #[cfg(not(feature = "cuda"))]
            $crate::backend::Device::Cuda(_) => {
                anyhow::bail!("this quantbench was built without CUDA; rebuild with `cargo build --release --features cuda`")
            }
        }
    }};
}
