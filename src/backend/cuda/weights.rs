//! Weights on the device, each in its storage format.

use anyhow::Result;
use half::{bf16, f16};
use rayon::prelude::*;

use super::gpu::Gpu;
use super::memory::RawAlloc;
use crate::quant::{LinearWeight, QuantizedMatrix};
use crate::tensor::{DType, HostTensor};

/// A linear or embedding weight `[rows = out features, cols = in features]`.
#[derive(Debug)]
pub enum CudaWeight {
    /// Unquantized values at their checkpoint precision.
    Dense {
        rows: usize,
        cols: usize,
        dtype: DType,
        buf: RawAlloc,
    },
}

impl CudaWeight {
    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            CudaWeight::Dense { rows, cols, .. } => (*rows, *cols),
        }
    }
}

/// Uploads `values` (exactly representable in `dtype`) stored as `dtype`.
pub fn upload_dense(
    gpu: &Gpu,
    rows: usize,
    cols: usize,
    dtype: DType,
    values: &[f32],
) -> Result<CudaWeight> {
    anyhow::ensure!(
        values.len() == rows * cols,
        "weight of {rows}x{cols} has {} values",
        values.len()
    );
    let buf = RawAlloc::new(&gpu.stats, values.len() * dtype.size_bytes())?;
    match dtype {
        DType::F32 => gpu.upload(buf.ptr(), values)?,
        DType::F16 => {
            let h: Vec<f16> = values.par_iter().map(|&v| f16::from_f32(v)).collect();
            gpu.upload(buf.ptr(), &h)?;
        }
        DType::BF16 => {
            let h: Vec<bf16> = values.par_iter().map(|&v| bf16::from_f32(v)).collect();
            gpu.upload(buf.ptr(), &h)?;
        }
    }
    Ok(CudaWeight::Dense {
        rows,
        cols,
        dtype,
        buf,
    })
}

fn upload_host_tensor(gpu: &Gpu, t: &HostTensor) -> Result<CudaWeight> {
    let (rows, cols) = t.dims2()?;
    upload_dense(gpu, rows, cols, t.dtype, &t.data)
}

/// Uploads a format without a native kernel as its dequantized f32 values,
/// so results match the CPU backend exactly (at 4 bytes per weight).
fn upload_dequantized(gpu: &Gpu, q: &dyn QuantizedMatrix) -> Result<CudaWeight> {
    let (rows, cols) = q.shape();
    tracing::warn!(
        "weight format {} has no CUDA kernel yet: running it dequantized to f32",
        q.format_name()
    );
    let mut values = vec![0f32; rows * cols];
    values
        .par_chunks_mut(cols)
        .enumerate()
        .for_each(|(r, row)| q.dequantize_row(r, row));
    upload_dense(gpu, rows, cols, DType::F32, &values)
}

/// Uploads any weight: dense at its dtype, quantized formats natively where
/// a kernel exists.
pub fn upload_weight(gpu: &Gpu, w: &LinearWeight) -> Result<CudaWeight> {
    match w {
        LinearWeight::Dense(t) => upload_host_tensor(gpu, t),
        LinearWeight::Quantized(q) => upload_dequantized(gpu, q.as_ref()),
    }
}
