//! The CPU backend: f32 activations, rayon parallelism, the `gemm` crate for
//! dense products and fused dequantize-matmul for quantized formats.

mod attention;
pub mod fused;
pub mod matmul;
mod ops;

use std::sync::Arc;

use anyhow::{Result, bail};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::{Backend, CacheShape, HeadShape, StepLayout, exact_ids};
use crate::quant::{LinearWeight, QuantizedMatrix};
use crate::tensor::{DType, HostTensor};

/// Row-major f32 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuTensor {
    /// Wraps `data` as a `[rows, cols]` matrix.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self> {
        if rows * cols != data.len() {
            bail!("{rows}x{cols} tensor cannot hold {} values", data.len());
        }
        Ok(CpuTensor { rows, cols, data })
    }
}

/// Dense weight values at their storage precision (half-precision weights
/// stay half precision in memory and are widened block by block).
#[derive(Clone, Debug)]
pub enum DenseData {
    F32(Arc<Vec<f32>>),
    F16(Arc<Vec<f16>>),
    BF16(Arc<Vec<bf16>>),
}

impl DenseData {
    fn from_tensor(t: &HostTensor) -> DenseData {
        match t.dtype {
            DType::F32 => DenseData::F32(Arc::new(t.data.clone())),
            DType::F16 => {
                DenseData::F16(Arc::new(t.data.iter().map(|&v| f16::from_f32(v)).collect()))
            }
            DType::BF16 => DenseData::BF16(Arc::new(
                t.data.iter().map(|&v| bf16::from_f32(v)).collect(),
            )),
        }
    }

    /// Values `start..start + out.len()` as f32.
    fn widen(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            DenseData::F32(d) => out.copy_from_slice(&d[start..end]),
            DenseData::F16(d) => d[start..end].convert_to_f32_slice(out),
            DenseData::BF16(d) => d[start..end].convert_to_f32_slice(out),
        }
    }
}

/// A weight held by the CPU backend.
#[derive(Clone, Debug)]
pub enum CpuWeight {
    /// `[rows, cols]` dense values.
    Dense {
        rows: usize,
        cols: usize,
        data: DenseData,
    },
    /// A quantized format; products go through its fused CPU kernel.
    Quantized(Arc<dyn QuantizedMatrix>),
}

impl CpuWeight {
    fn shape(&self) -> (usize, usize) {
        match self {
            CpuWeight::Dense { rows, cols, .. } => (*rows, *cols),
            CpuWeight::Quantized(q) => q.shape(),
        }
    }
}

/// Per-layer K and V of every slot: `[slots, max_len, kv_heads, head_dim]`.
#[derive(Clone, Debug)]
pub struct CpuKvCache {
    pub shape: CacheShape,
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

/// The CPU compute backend.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    /// A CPU backend using rayon's global thread pool.
    pub fn new() -> Self {
        CpuBackend
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type Vector = Vec<f32>;
    type Cache = CpuKvCache;
    type Layout = StepLayout;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload_weight(&self, w: &LinearWeight) -> Result<CpuWeight> {
        Ok(match w {
            LinearWeight::Dense(t) => {
                let (rows, cols) = t.dims2()?;
                CpuWeight::Dense {
                    rows,
                    cols,
                    data: DenseData::from_tensor(t),
                }
            }
            LinearWeight::Quantized(q) => CpuWeight::Quantized(q.clone()),
        })
    }

    fn upload_vector(&self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }

    fn upload_layout(&self, layout: &StepLayout) -> Result<StepLayout> {
        Ok(layout.clone())
    }

    fn new_cache(&self, shape: CacheShape) -> Result<CpuKvCache> {
        let per_layer = shape.slots * shape.max_len * shape.kv_heads * shape.head_dim;
        Ok(CpuKvCache {
            shape,
            k: vec![vec![0.0; per_layer]; shape.layers],
            v: vec![vec![0.0; per_layer]; shape.layers],
        })
    }

    fn embedding(&self, table: &CpuWeight, layout: &StepLayout) -> Result<CpuTensor> {
        let (vocab, hidden) = table.shape();
        let mut out = vec![0.0; layout.num_tokens() * hidden];
        for (row, &id) in out.chunks_mut(hidden).zip(&layout.tokens) {
            if id as usize >= vocab {
                bail!("token id {id} is outside the vocabulary of {vocab}");
            }
            match table {
                CpuWeight::Dense { data, .. } => data.widen(id as usize * hidden, row),
                CpuWeight::Quantized(q) => q.dequantize_row(id as usize, row),
            }
        }
        CpuTensor::new(layout.num_tokens(), hidden, out)
    }

    fn rms_norm(&self, x: &CpuTensor, w: &Vec<f32>, eps: f32) -> Result<CpuTensor> {
        ops::rms_norm(x, w, eps)
    }

    fn matmul(&self, x: &CpuTensor, w: &CpuWeight) -> Result<CpuTensor> {
        let (out_f, in_f) = w.shape();
        if x.cols != in_f {
            bail!(
                "matmul: input has {} columns, weight expects {in_f}",
                x.cols
            );
        }
        let mut y = vec![0.0; x.rows * out_f];
        match w {
            CpuWeight::Dense {
                data: DenseData::F32(w),
                ..
            } => matmul::dense_matmul(&x.data, x.rows, w, out_f, in_f, &mut y),
            CpuWeight::Dense { data, .. } => matmul::matmul_by_row_blocks(
                &x.data,
                x.rows,
                in_f,
                out_f,
                &mut y,
                |r0, rows, buf| {
                    buf.resize(rows * in_f, 0.0);
                    data.widen(r0 * in_f, buf);
                    None
                },
            ),
            CpuWeight::Quantized(q) => q.matmul_cpu(&x.data, x.rows, &mut y),
        }
        CpuTensor::new(x.rows, out_f, y)
    }

    fn rope(
        &self,
        x: &mut CpuTensor,
        heads: usize,
        head_dim: usize,
        inv_freq: &Vec<f32>,
        layout: &StepLayout,
    ) -> Result<()> {
        ops::rope(x, heads, head_dim, inv_freq, layout)
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        cache: &mut CpuKvCache,
        layer: usize,
        heads: HeadShape,
        layout: &StepLayout,
    ) -> Result<CpuTensor> {
        attention::attention(q, k, v, cache, layer, heads, layout)
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        ops::silu_mul(gate, up)
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        ops::add_assign(x, y)
    }

    fn last_rows(&self, x: CpuTensor, layout: &StepLayout) -> Result<CpuTensor> {
        let rows = layout.last_rows();
        if rows.len() == x.rows {
            return Ok(x);
        }
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for r in &rows {
            data.extend_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        CpuTensor::new(rows.len(), x.cols, data)
    }

    fn argmax_ids(&self, x: &CpuTensor) -> Result<CpuTensor> {
        exact_ids(x.cols)?;
        let ids = x
            .data
            .chunks(x.cols)
            .map(|r| ops::argmax(r) as f32)
            .collect();
        CpuTensor::new(x.rows, 1, ids)
    }

    fn to_host(&self, x: &CpuTensor) -> Result<(usize, usize, Vec<f32>)> {
        Ok((x.rows, x.cols, x.data.clone()))
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
