//! Weight formats and the methods that produce them.
//!
//! A linear layer's weight is either dense ([`LinearWeight::Dense`]) or a
//! [`QuantizedMatrix`]: a format that knows its exact storage and can
//! reproduce its rows in f32, which is all the CPU backend's fused
//! dequantize-matmul needs. Backends with format-specific kernels downcast
//! through [`QuantizedMatrix::as_any`].

use std::any::Any;
use std::sync::Arc;

use crate::tensor::HostTensor;

pub mod apply;
pub mod awq;
pub mod awq_model;
pub mod bnb4;
pub mod bnb_codes;
pub mod calib;
pub mod gptq;
pub mod int8;
pub mod nibbles;
pub mod packed;
pub mod rtn;
pub mod spec;
pub mod stage_clock;
pub mod staged;
pub mod storage;

pub use apply::{
    QuantContext, cast_dense, convert_linears, is_skipped, quantize_model, quantize_model_on,
};
pub use spec::QuantSpec;

/// A quantized weight matrix of shape `[out_features, in_features]`.
pub trait QuantizedMatrix: Send + Sync + std::fmt::Debug {
    /// `(out_features, in_features)`.
    fn shape(&self) -> (usize, usize);
    /// Writes row `row` (one output feature, `in_features` values) dequantized to f32.
    fn dequantize_row(&self, row: usize, out: &mut [f32]);
    /// Exact bytes this format stores: codes, scales, zeros, nested scales, indices, tables.
    fn storage_bytes(&self) -> usize;
    /// Short format name, e.g. `nf4-dq-b64`, `gptq-4bit-g128`.
    fn format_name(&self) -> String;
    /// Computes `y[n, out] = x[n, in] · Wᵀ` on the CPU. The default fuses row
    /// dequantization into the product (see `backend::cpu::fused`); formats
    /// whose arithmetic differs (LLM.int8 outlier decomposition) override it.
    fn matmul_cpu(&self, x: &[f32], n: usize, y: &mut [f32]) {
        crate::backend::cpu::fused::fused_dequant_matmul(self, x, n, y)
    }
    /// For backends that implement this format natively.
    fn as_any(&self) -> &dyn Any;
}

/// The weight of one linear layer (rows = output features).
#[derive(Clone, Debug)]
pub enum LinearWeight {
    /// Unquantized `[out, in]` matrix at its checkpoint precision.
    Dense(HostTensor),
    /// Any quantized format.
    Quantized(Arc<dyn QuantizedMatrix>),
}

impl LinearWeight {
    /// `(out_features, in_features)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            LinearWeight::Dense(t) => (t.shape[0], t.shape[1]),
            LinearWeight::Quantized(q) => q.shape(),
        }
    }

    /// Exact storage in bytes.
    pub fn storage_bytes(&self) -> usize {
        match self {
            LinearWeight::Dense(t) => t.numel() * t.dtype.size_bytes(),
            LinearWeight::Quantized(q) => q.storage_bytes(),
        }
    }

    /// Number of weights (parameters) the matrix represents.
    pub fn parameter_count(&self) -> usize {
        let (o, i) = self.shape();
        o * i
    }

    /// Format name: the dtype for dense weights, the quantized format's name otherwise.
    pub fn format_name(&self) -> String {
        match self {
            LinearWeight::Dense(t) => t.dtype.to_string(),
            LinearWeight::Quantized(q) => q.format_name(),
        }
    }

    /// Full f32 matrix (for reference computations and export; allocates `out*in`).
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            LinearWeight::Dense(t) => t.data.clone(),
            LinearWeight::Quantized(q) => {
                let (o, i) = q.shape();
                let mut out = vec![0f32; o * i];
                for (r, row) in out.chunks_mut(i).enumerate() {
                    q.dequantize_row(r, row);
                }
                out
            }
        }
    }
}
