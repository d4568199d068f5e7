//! The MLP of one decode row in one launch: RMS norm, gate/up, SiLU and the
//! down projection added to the residual stream (`gemv_q4bnb_*_mlp` in
//! gemv_q4.cu), for NF4/FP4 weights.

use anyhow::Result;

use super::gpu::{Gpu, arg};
use super::matmul::{
    FusedNorm, GEMV_WARPS, Q4BnbArgs, dtype_mode, q4_bnb_ok, q4_half, q4_staged_floats,
};
use super::tensor::CudaTensor;
use super::weights::CudaWeight;

/// Activations per chunk: each block multiplies 32 of them by the matching
/// columns of the down projection (one 16-byte word per row).
const CHUNK: usize = 32;

/// `x += down(silu(gate(n)) ⊙ up(n))` with `n = rms_norm(x)`, for a single
/// row whose three weights are NF4/FP4 of one compute dtype that the 4-bit
/// GEMVs take; `false` (nothing done) for any other case. The down
/// projection is split along its input over the blocks, which add their
/// partial sums to `x` atomically: their order varies from run to run
/// within f32 rounding, and the projection is not rounded to a 16-bit
/// compute dtype before the residual add.
pub fn norm_mlp_add(
    gpu: &Gpu,
    x: &mut CudaTensor,
    norm: FusedNorm,
    gate: &CudaWeight,
    up: &CudaWeight,
    down: &CudaWeight,
) -> Result<bool> {
    let (CudaWeight::Bnb4(g), CudaWeight::Bnb4(u), CudaWeight::Bnb4(d)) = (gate, up, down) else {
        return Ok(false);
    };
    let (inter, hidden) = (g.rows, g.cols);
    let shapes_fit = x.rows == 1
        && x.cols == hidden
        && norm.weight.len() == hidden
        && (u.rows, u.cols) == (inter, hidden)
        && (d.rows, d.cols) == (hidden, inter)
        && inter.is_multiple_of(CHUNK)
        && hidden.is_multiple_of(4);
    let formats_fit = g.compute_dtype == u.compute_dtype
        && g.compute_dtype == d.compute_dtype
        && [g, u, d].iter().all(|q| q4_bnb_ok(q));
    if !shapes_fit || !formats_fit {
        return Ok(false);
    }
    let cd = dtype_mode(g.compute_dtype);
    let half = q4_half(cd);
    let name = if half {
        "gemv_q4bnb_h1_mlp"
    } else {
        "gemv_q4bnb_b1_mlp"
    };
    // The staged row and code-pair tables, then per down row a word and two
    // scale words, then the chunk's activations.
    let floats = q4_staged_floats(hidden, half).next_multiple_of(4) + 6 * hidden + CHUNK;
    let smem = (floats * 4) as u32;
    gpu.reserve_dynamic_smem(name, smem)?;
    let chunks = inter / CHUNK;
    let grid = gpu.one_wave(name, chunks, smem)?;
    if grid == 0 {
        return Ok(false);
    }
    let h = CudaTensor::empty(gpu, 1, inter)?;
    let (qg, qu, qd) = (Q4BnbArgs::of(g), Q4BnbArgs::of(u), Q4BnbArgs::of(d));
    let (xp, hp, np, counter) = (x.ptr(), h.ptr(), norm.weight.ptr(), gpu.arrivals());
    let (ii, hi, eps) = (inter as i32, hidden as i32, norm.eps);
    gpu.launch(
        name,
        (grid as u32, 1, 1),
        (GEMV_WARPS * 32) as u32,
        smem,
        &mut [
            arg(&qg),
            arg(&qu),
            arg(&qd),
            arg(&xp),
            arg(&hp),
            arg(&ii),
            arg(&hi),
            arg(&cd),
            arg(&np),
            arg(&eps),
            arg(&counter),
        ],
    )?;
    Ok(true)
}
