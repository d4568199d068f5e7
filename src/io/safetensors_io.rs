//! Reading and writing `.safetensors` files as [`HostTensor`]s.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use half::{bf16, f16};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::tensor::{DType, HostTensor};

/// Encodes a host tensor's values in its storage dtype.
pub fn encode(t: &HostTensor) -> (Dtype, Vec<u8>) {
    match t.dtype {
        DType::F32 => (Dtype::F32, t.data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::F16 => (
            Dtype::F16,
            t.data.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
        ),
        DType::BF16 => (
            Dtype::BF16,
            t.data.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
        ),
    }
}

/// A tensor already in serialized form (any safetensors dtype, e.g. packed
/// integer codes of a quantized format).
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl From<&HostTensor> for RawTensor {
    fn from(t: &HostTensor) -> Self {
        let (dtype, bytes) = encode(t);
        RawTensor {
            dtype,
            shape: t.shape.clone(),
            bytes,
        }
    }
}

/// Writes tensors to one `.safetensors` file with optional string metadata.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, RawTensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, t)| {
            TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                .map(|v| (name.clone(), v))
                .with_context(|| format!("tensor '{name}' has inconsistent shape and data"))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, metadata, path)
        .with_context(|| format!("{}: cannot write safetensors file", path.display()))
}

/// Reads every floating-point tensor of a file into a name → tensor map is
/// provided by the checkpoint loader; this helper decodes one view.
pub fn decode(name: &str, view: &TensorView<'_>) -> Result<HostTensor> {
    let bytes = view.data();
    let (dtype, data): (DType, Vec<f32>) = match view.dtype() {
        Dtype::F32 => (
            DType::F32,
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        ),
        Dtype::F16 => (
            DType::F16,
            bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        ),
        Dtype::BF16 => (
            DType::BF16,
            bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        ),
        other => anyhow::bail!("tensor '{name}' has dtype {other:?}; expected F32, F16 or BF16"),
    };
    HostTensor::new(view.shape().to_vec(), dtype, data)
}
