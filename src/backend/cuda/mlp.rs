//! The MLP of one decode row in one launch: RMS norm, gate/up, SiLU and the
//! down projection added to the residual stream (`gemv_q4*_mlp` in
//! gemv_q4.cu), for NF4/FP4 and packed 4-bit (GPTQ/AWQ) weights.

use anyhow::Result;

use super::gpu::{Arg, Gpu, arg};
use super::matmul::{
    FusedNorm, GEMV_WARPS, Q4BnbArgs, Q4PackedArgs, dtype_mode, q4_bnb_ok, q4_half, q4_packed_ok,
    q4_staged_floats,
};
use super::tensor::CudaTensor;
use super::weights::CudaWeight;

/// Activations per chunk: each block multiplies 32 of them by the matching
/// columns of the down projection (one 16-byte word per row).
const CHUNK: usize = 32;

/// The three matrices of a fused launch as kernel arguments.
enum MlpWeights {
    Bnb4(Box<[Q4BnbArgs; 3]>, i32),
    Packed([Q4PackedArgs; 3]),
}

/// The fused kernel for `gate`, `up` and `down`, its arguments, and whether
/// it stages the row in half precision; `None` when the formats have none.
fn mlp_kernel(
    gate: &CudaWeight,
    up: &CudaWeight,
    down: &CudaWeight,
) -> Option<(&'static str, MlpWeights, bool)> {
    match (gate, up, down) {
        (CudaWeight::Bnb4(g), CudaWeight::Bnb4(u), CudaWeight::Bnb4(d))
            if [u, d].iter().all(|q| q.compute_dtype == g.compute_dtype)
                && [g, u, d].iter().all(|q| q4_bnb_ok(q)) =>
        {
            let cd = dtype_mode(g.compute_dtype);
            let half = q4_half(cd);
            let name = if half {
                "gemv_q4bnb_h1_mlp"
            } else {
                "gemv_q4bnb_b1_mlp"
            };
            let args = Box::new([g, u, d].map(Q4BnbArgs::of));
            Some((name, MlpWeights::Bnb4(args, cd), half))
        }
        (CudaWeight::Packed(g), CudaWeight::Packed(u), CudaWeight::Packed(d))
            if [g, u, d].iter().all(|q| q4_packed_ok(q)) =>
        {
            let args = [g, u, d].map(Q4PackedArgs::of);
            Some(("gemv_q4packed_b1_mlp", MlpWeights::Packed(args), false))
        }
        _ => None,
    }
}

/// `x += down(silu(gate(n)) ⊙ up(n))` with `n = rms_norm(x)`, for a single
/// row whose three weights are all NF4/FP4 of one compute dtype or all
/// packed 4-bit, in the layouts the 4-bit GEMVs take; `false` (nothing
/// done) for any other case. The down projection is split along its input
/// over the blocks, which add their partial sums to `x` atomically: their
/// order varies from run to run within f32 rounding, and the projection is
/// not rounded to a 16-bit compute dtype before the residual add.
pub fn norm_mlp_add(
    gpu: &Gpu,
    x: &mut CudaTensor,
    norm: FusedNorm,
    gate: &CudaWeight,
    up: &CudaWeight,
    down: &CudaWeight,
) -> Result<bool> {
    let ((inter, hidden), (u_rows, u_cols), (d_rows, d_cols)) =
        (gate.shape(), up.shape(), down.shape());
    let shapes_fit = x.rows == 1
        && x.cols == hidden
        && norm.weight.len() == hidden
        && (u_rows, u_cols) == (inter, hidden)
        && (d_rows, d_cols) == (hidden, inter)
        && inter.is_multiple_of(CHUNK)
        && hidden.is_multiple_of(4);
    if !shapes_fit {
        return Ok(false);
    }
    let Some((name, weights, half)) = mlp_kernel(gate, up, down) else {
        return Ok(false);
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
    let (xp, hp, np, counter) = (x.ptr(), h.ptr(), norm.weight.ptr(), gpu.arrivals());
    let (ii, hi, eps) = (inter as i32, hidden as i32, norm.eps);
    let mut args: Vec<Arg> = match &weights {
        MlpWeights::Bnb4(a, _) => a.iter().map(arg).collect(),
        MlpWeights::Packed(a) => a.iter().map(arg).collect(),
    };
    args.extend([arg(&xp), arg(&hp), arg(&ii), arg(&hi)]);
    if let MlpWeights::Bnb4(_, cd) = &weights {
        args.push(arg(cd));
    }
    args.extend([arg(&np), arg(&eps), arg(&counter)]);
    gpu.launch(
        name,
        (grid as u32, 1, 1),
        (GEMV_WARPS * 32) as u32,
        smem,
        &mut args,
    )?;
    Ok(true)
}
