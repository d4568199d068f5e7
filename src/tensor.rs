//! Host-side tensors: the currency between checkpoint readers, quantizers and
//! backends. Values are held as f32; `dtype` records the storage precision the
//! values came from (and are exactly representable in).

use anyhow::{Result, bail};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// Storage precision of a dense tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes one element occupies when stored in this precision.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Rounds `v` to the nearest value representable in this precision.
    #[inline]
    pub fn round(self, v: f32) -> f32 {
        match self {
            DType::F32 => v,
            DType::F16 => f16::from_f32(v).to_f32(),
            DType::BF16 => bf16::from_f32(v).to_f32(),
        }
    }

    /// Parses `f32`, `f16`/`fp16`/`float16`, `bf16`/`bfloat16`.
    pub fn parse(s: &str) -> Result<DType> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => DType::F32,
            "f16" | "fp16" | "float16" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            other => bail!("unknown dtype '{other}': expected one of f32, f16, bf16"),
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

/// A dense row-major tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Precision the values are stored in on disk / in a checkpoint.
    pub dtype: DType,
    /// Row-major values, exactly representable in `dtype`.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Builds a tensor, checking that `data` fills `shape`.
    pub fn new(shape: Vec<usize>, dtype: DType, data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            bail!(
                "tensor of shape {shape:?} needs {n} values, got {}",
                data.len()
            );
        }
        Ok(HostTensor { shape, dtype, data })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Rounds every value to `dtype` and records it as the storage precision.
    pub fn cast(mut self, dtype: DType) -> Self {
        self.round_to(dtype);
        self
    }

    /// [`HostTensor::cast`] in place.
    pub fn round_to(&mut self, dtype: DType) {
        if dtype != DType::F32 {
            for v in &mut self.data {
                *v = dtype.round(*v);
            }
        }
        self.dtype = dtype;
    }

    /// Rows and columns of a 2-D tensor.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self.shape.as_slice() {
            [r, c] => Ok((*r, *c)),
            s => bail!("expected a 2-D tensor, got shape {s:?}"),
        }
    }
}
