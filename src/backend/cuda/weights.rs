//! Weights on the device, each in its storage format.

use anyhow::Result;
use half::{bf16, f16};
use rayon::prelude::*;

use super::gpu::Gpu;
use super::memory::RawAlloc;
use crate::quant::bnb4::{Absmax, Bnb4Matrix};
use crate::quant::int8::Int8Matrix;
use crate::quant::packed::PackedIntMatrix;
use crate::quant::{LinearWeight, QuantizedMatrix};
use crate::tensor::{DType, HostTensor};

/// A bitsandbytes 4-bit weight on the device, fields as stored on the host.
#[derive(Debug)]
pub struct CudaBnb4 {
    pub rows: usize,
    pub cols: usize,
    /// Two 4-bit indices per byte, first element in the high nibble.
    pub packed: RawAlloc,
    /// Plain f32 absmax per block, or the nested f32 absmax with double quant.
    pub absmax: RawAlloc,
    /// Double quant: one u8 code per block into `code2`.
    pub codes: Option<RawAlloc>,
    /// The 256-entry dynamic map (double quant; a 1-value dummy otherwise).
    pub code2: RawAlloc,
    /// The 16-entry NF4/FP4 code.
    pub code16: RawAlloc,
    /// The same code on the host (the 4-bit GEMVs take it as an argument).
    pub code16_values: [f32; 16],
    pub offset: f32,
    pub bs_log2: u32,
    pub nested_bs_log2: u32,
    /// Dtype dequantized values are rounded to.
    pub dtype: DType,
    /// Dtype activations, weights and products meet in.
    pub compute_dtype: DType,
}

/// A group-wise packed integer weight (RTN/GPTQ/AWQ) on the device.
#[derive(Debug)]
pub struct CudaPacked {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    pub group_size: usize,
    pub words_per_row: usize,
    pub qweight: RawAlloc,
    pub scales: RawAlloc,
    pub zeros: RawAlloc,
    pub g_idx: Option<RawAlloc>,
}

/// An LLM.int8() weight on the device.
#[derive(Debug)]
pub struct CudaInt8 {
    pub rows: usize,
    pub cols: usize,
    /// Row-major int8 codes.
    pub cb: RawAlloc,
    /// Per-row absmax (f32).
    pub scb: RawAlloc,
    pub threshold: f32,
    pub compute_dtype: DType,
}

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
    /// NF4/FP4, with or without double quantization.
    Bnb4(CudaBnb4),
    /// Group-wise packed integers.
    Packed(CudaPacked),
    /// LLM.int8() with outlier decomposition.
    Int8(CudaInt8),
}

impl CudaWeight {
    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            CudaWeight::Dense { rows, cols, .. } => (*rows, *cols),
            CudaWeight::Bnb4(w) => (w.rows, w.cols),
            CudaWeight::Packed(w) => (w.rows, w.cols),
            CudaWeight::Int8(w) => (w.rows, w.cols),
        }
    }
}

/// Copies a host slice into a fresh device allocation.
fn upload_slice<T>(gpu: &Gpu, data: &[T]) -> Result<RawAlloc> {
    let buf = RawAlloc::new(&gpu.stats, std::mem::size_of_val(data))?;
    gpu.upload(buf.ptr(), data)?;
    Ok(buf)
}

/// A second-level code table of exactly 256 entries (zeros past the end of
/// a shorter one; no u8 code reaches past 256).
fn padded_code2(code: &[f32]) -> Vec<f32> {
    let mut c = code.to_vec();
    c.resize(256, 0.0);
    c
}

fn upload_bnb4(gpu: &Gpu, m: &Bnb4Matrix) -> Result<CudaWeight> {
    let packed = upload_slice(gpu, &m.packed)?;
    let (absmax, codes, code2, offset, nbs) = match &m.absmax {
        Absmax::Plain(a) => (
            upload_slice(gpu, a)?,
            None,
            upload_slice(gpu, &[0f32])?,
            0.0,
            1,
        ),
        Absmax::Nested(n) => (
            upload_slice(gpu, &n.absmax)?,
            Some(upload_slice(gpu, &n.codes)?),
            // The 4-bit kernels copy all 256 entries a u8 code can name.
            upload_slice(gpu, &padded_code2(&n.code))?,
            n.offset,
            n.blocksize,
        ),
    };
    Ok(CudaWeight::Bnb4(CudaBnb4 {
        rows: m.out_features,
        cols: m.in_features,
        packed,
        absmax,
        codes,
        code2,
        code16: upload_slice(gpu, &m.code)?,
        code16_values: m.code,
        offset,
        bs_log2: m.blocksize.trailing_zeros(),
        nested_bs_log2: nbs.trailing_zeros(),
        dtype: m.dtype,
        compute_dtype: m.compute_dtype,
    }))
}

fn upload_packed(gpu: &Gpu, m: &PackedIntMatrix) -> Result<CudaWeight> {
    Ok(CudaWeight::Packed(CudaPacked {
        rows: m.out_features,
        cols: m.in_features,
        bits: m.bits,
        group_size: m.group_size,
        words_per_row: m.words_per_row(),
        qweight: upload_slice(gpu, &m.qweight)?,
        scales: upload_slice(gpu, &m.scales)?,
        zeros: upload_slice(gpu, &m.zeros)?,
        g_idx: m.g_idx.as_ref().map(|g| upload_slice(gpu, g)).transpose()?,
    }))
}

fn upload_int8(gpu: &Gpu, m: &Int8Matrix) -> Result<CudaWeight> {
    Ok(CudaWeight::Int8(CudaInt8 {
        rows: m.out_features,
        cols: m.in_features,
        cb: upload_slice(gpu, &m.cb)?,
        scb: upload_slice(gpu, &m.scb)?,
        threshold: m.threshold,
        compute_dtype: m.compute_dtype,
    }))
}

/// Uploads `q` in its own format when a kernel reads it (shapes with
/// `in_features % 8 == 0`, 4-bit blocks of at least 8, groups of a multiple
/// of 8 columns), else dequantized.
fn upload_quantized(gpu: &Gpu, q: &dyn QuantizedMatrix) -> Result<CudaWeight> {
    let any = q.as_any();
    let (_, cols) = q.shape();
    if cols % 8 == 0 {
        if let Some(m) = any.downcast_ref::<Bnb4Matrix>()
            && m.blocksize >= 8
        {
            return upload_bnb4(gpu, m);
        }
        if let Some(m) = any.downcast_ref::<PackedIntMatrix>()
            && (m.g_idx.is_some() || m.group_size % 8 == 0)
        {
            return upload_packed(gpu, m);
        }
        if let Some(m) = any.downcast_ref::<Int8Matrix>() {
            return upload_int8(gpu, m);
        }
    }
    upload_dequantized(gpu, q)
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
/// a kernel reads them.
pub fn upload_weight(gpu: &Gpu, w: &LinearWeight) -> Result<CudaWeight> {
    match w {
        LinearWeight::Dense(t) => upload_host_tensor(gpu, t),
        LinearWeight::Quantized(q) => upload_quantized(gpu, q.as_ref()),
    }
}
