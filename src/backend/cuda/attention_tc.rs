//! Tensor-core prefill attention (`attention_prefill_tc.cu`): f16 Q/K/V
//! tiles, f32 accumulation, for head sizes 64 and 128 on GPUs of compute
//! capability 8.0 and later. Outputs differ from the f32 kernel by the f16
//! rounding of the inputs (relative error about 1e-3).

use anyhow::Result;
use cudarc::driver::sys::CUdeviceptr;

use super::gpu::{Gpu, arg};
use super::layout::CudaLayout;
use crate::backend::HeadShape;

/// Head sizes with a tensor-core kernel.
const HEAD_DIMS: [usize; 2] = [64, 128];
/// Threads per block (`TC_THREADS` in the kernel): two query heads of 32
/// rows, one warp per 16 rows.
const THREADS: u32 = 128;
/// Query heads one block serves.
const HEADS_PER_BLOCK: usize = 2;

/// Whether [`prefill`] handles head size `head_dim` on `gpu`.
pub fn supported(gpu: &Gpu, head_dim: usize) -> Result<bool> {
    Ok(HEAD_DIMS.contains(&head_dim) && gpu.ctx.compute_capability()?.0 >= 8)
}

/// Device buffers of one prefill attention launch.
pub struct PrefillArgs {
    /// Queries `[n, q_heads * head_dim]`.
    pub q: CUdeviceptr,
    /// The layer's K cache `[slots, max_len, kv_heads * head_dim]`, already
    /// holding the step's keys.
    pub k_cache: CUdeviceptr,
    /// The layer's V cache, same layout.
    pub v_cache: CUdeviceptr,
    /// Output `[n, q_heads * head_dim]`.
    pub out: CUdeviceptr,
    /// Positions per cache slot.
    pub max_len: usize,
}

/// Causal grouped-query attention of every query tile of `layout` over its
/// slot's keys `0..=position`, scaled by `1/sqrt(head_dim)`.
pub fn prefill(gpu: &Gpu, a: &PrefillArgs, heads: HeadShape, layout: &CudaLayout) -> Result<()> {
    let HeadShape {
        q_heads,
        kv_heads,
        head_dim: d,
    } = heads;
    let group = q_heads / kv_heads;
    let blocks_per_group = group.div_ceil(HEADS_PER_BLOCK);
    let scale = 1.0f32 / (d as f32).sqrt();
    let tiles = layout.tile_table();
    let (qh, kvh, ml) = (q_heads as i32, kv_heads as i32, a.max_len as i32);
    gpu.launch(
        &format!("attn_prefill_tc_d{d}"),
        (layout.tiles as u32, (kv_heads * blocks_per_group) as u32, 1),
        THREADS,
        0,
        &mut [
            arg(&a.q),
            arg(&a.k_cache),
            arg(&a.v_cache),
            arg(&tiles),
            arg(&a.out),
            arg(&qh),
            arg(&kvh),
            arg(&ml),
            arg(&scale),
        ],
    )
}
