//! Launches of the row-wise and elementwise kernels.

use anyhow::{Result, bail};

use super::gpu::{Gpu, arg};
use super::layout::CudaLayout;
use super::tensor::CudaTensor;
use super::weights::CudaWeight;
use crate::tensor::DType;

/// Grid for a grid-stride loop over `n` elements with 256-thread blocks.
fn grid_for(gpu: &Gpu, n: usize) -> u32 {
    n.div_ceil(256).clamp(1, gpu.sm_count * 16) as u32
}

/// Rows of `table` for the layout's tokens.
pub fn embedding(gpu: &Gpu, table: &CudaWeight, layout: &CudaLayout) -> Result<CudaTensor> {
    let CudaWeight::Dense {
        rows: vocab,
        cols: hidden,
        dtype,
        buf,
    } = table
    else {
        bail!("embedding tables must be dense on the CUDA backend");
    };
    if let Some(&bad) = layout.host.tokens.iter().find(|&&t| t as usize >= *vocab) {
        bail!("token id {bad} is outside the vocabulary of {vocab}");
    }
    let out = CudaTensor::empty(gpu, layout.n(), *hidden)?;
    let name = match dtype {
        DType::F32 => "embed_f32",
        DType::F16 => "embed_f16",
        DType::BF16 => "embed_bf16",
    };
    let (w, tok, o) = (buf.ptr(), layout.tokens(), out.ptr());
    let (h, v) = (*hidden as i32, *vocab as i32);
    gpu.launch(
        name,
        (layout.n() as u32, 1, 1),
        256,
        0,
        &mut [arg(&w), arg(&tok), arg(&o), arg(&h), arg(&v)],
    )?;
    Ok(out)
}

/// `x / sqrt(mean(x²) + eps) * w` per row.
pub fn rms_norm(gpu: &Gpu, x: &CudaTensor, w: &CudaTensor, eps: f32) -> Result<CudaTensor> {
    if w.len() != x.cols {
        bail!(
            "rms_norm: weight has {} values, rows have {}",
            w.len(),
            x.cols
        );
    }
    let y = CudaTensor::empty(gpu, x.rows, x.cols)?;
    let (xp, wp, yp, cols) = (x.ptr(), w.ptr(), y.ptr(), x.cols as i32);
    gpu.launch(
        "rms_norm",
        (x.rows as u32, 1, 1),
        norm_block(x.cols),
        0,
        &mut [arg(&xp), arg(&wp), arg(&yp), arg(&cols), arg(&eps)],
    )?;
    Ok(y)
}

/// Threads per block of the row-wise norm kernels.
fn norm_block(cols: usize) -> u32 {
    if cols >= 1024 { 512 } else { 128 }
}

/// Rotates every head of `x` in place by its token's position.
pub fn rope(
    gpu: &Gpu,
    x: &mut CudaTensor,
    heads: usize,
    head_dim: usize,
    inv_freq: &CudaTensor,
    layout: &CudaLayout,
) -> Result<()> {
    if x.cols != heads * head_dim || inv_freq.len() != head_dim / 2 || x.rows != layout.n() {
        bail!(
            "rope: tensor {}x{} does not match {} tokens x {heads} heads x {head_dim}",
            x.rows,
            x.cols,
            layout.n()
        );
    }
    let (xp, pos, f) = (x.ptr(), layout.positions(), inv_freq.ptr());
    let (h, d) = (heads as i32, head_dim as i32);
    gpu.launch(
        "rope",
        (x.rows as u32, 1, 1),
        256,
        0,
        &mut [arg(&xp), arg(&pos), arg(&f), arg(&h), arg(&d)],
    )
}

fn check_same(op: &str, a: &CudaTensor, b: &CudaTensor) -> Result<()> {
    crate::backend::check_same_shape(op, (a.rows, a.cols), (b.rows, b.cols))
}

/// `silu(gate) * up`.
pub fn silu_mul(gpu: &Gpu, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
    check_same("silu_mul", gate, up)?;
    let y = CudaTensor::empty(gpu, gate.rows, gate.cols)?;
    let (g, u, yp, n) = (gate.ptr(), up.ptr(), y.ptr(), gate.len());
    gpu.launch(
        "silu_mul",
        (grid_for(gpu, n), 1, 1),
        256,
        0,
        &mut [arg(&g), arg(&u), arg(&yp), arg(&n)],
    )?;
    Ok(y)
}

/// `x += y`.
pub fn add_assign(gpu: &Gpu, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
    check_same("add", x, y)?;
    let (xp, yp, n) = (x.ptr(), y.ptr(), x.len());
    gpu.launch(
        "add_assign",
        (grid_for(gpu, n), 1, 1),
        256,
        0,
        &mut [arg(&xp), arg(&yp), arg(&n)],
    )
}

/// Each sequence's last row.
pub fn last_rows(gpu: &Gpu, x: &CudaTensor, layout: &CudaLayout) -> Result<CudaTensor> {
    if x.rows != layout.n() {
        bail!(
            "last_rows: {} rows for a step of {} tokens",
            x.rows,
            layout.n()
        );
    }
    let s = layout.host.seqs.len();
    let y = CudaTensor::empty(gpu, s, x.cols)?;
    let (xp, rows, yp, cols) = (x.ptr(), layout.last_rows(), y.ptr(), x.cols as i32);
    gpu.launch(
        "gather_rows",
        (s as u32, 1, 1),
        256,
        0,
        &mut [arg(&xp), arg(&rows), arg(&yp), arg(&cols)],
    )?;
    Ok(y)
}

/// Index of each row's first largest value.
pub fn argmax_ids(gpu: &Gpu, x: &CudaTensor) -> Result<CudaTensor> {
    crate::backend::exact_ids(x.cols)?;
    let out = CudaTensor::empty(gpu, x.rows, 1)?;
    if x.rows == 0 {
        return Ok(out);
    }
    // Segments of at least 1024 columns, at most 128 per row.
    let parts = x.cols.div_ceil(1024).clamp(1, 128);
    let seg = x.cols.div_ceil(parts);
    let pv = gpu.alloc(x.rows * parts * 4)?;
    let pi = gpu.alloc(x.rows * parts * 4)?;
    let (xp, vp, ip, op) = (x.ptr(), pv.ptr(), pi.ptr(), out.ptr());
    let (cols, segi, partsi) = (x.cols as i32, seg as i32, parts as i32);
    gpu.launch(
        "argmax_partial",
        (parts as u32, x.rows as u32, 1),
        256,
        0,
        &mut [arg(&xp), arg(&vp), arg(&ip), arg(&cols), arg(&segi)],
    )?;
    gpu.launch(
        "argmax_final",
        (x.rows as u32, 1, 1),
        128,
        0,
        &mut [arg(&vp), arg(&ip), arg(&op), arg(&partsi)],
    )?;
    Ok(out)
}

/// Copies a tensor to the host.
pub fn to_host(gpu: &Gpu, x: &CudaTensor) -> Result<Vec<f32>> {
    let mut v = vec![0f32; x.len()];
    gpu.download(&mut v, x.ptr())?;
    Ok(v)
}
