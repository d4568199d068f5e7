//! KV-cache append and causal grouped-query attention on the device.

use anyhow::{Result, bail};

use super::attention_tc;
use super::gpu::{Gpu, arg};
use super::layout::CudaLayout;
use super::tensor::{CudaKvCache, CudaTensor};
use crate::backend::HeadShape;

/// Head sizes with a tiled prefill kernel.
const PREFILL_HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// Keys per tile of the decode kernel (`ATT_TK` in attention.cu).
const DECODE_TILE: usize = 32;
/// Most key ranges a decode token's keys are split into (the merge in
/// attention.cu weighs one range per lane).
const DECODE_MAX_SPLITS: usize = 32;
/// Largest head size of the decode kernel (one float4 of a key per lane).
const DECODE_MAX_HEAD_DIM: usize = 128;
/// Warps per decode block: one per query head of the group, at least 4 (the
/// tile copies and RoPE use the whole block), at most 8 (`__launch_bounds__`).
const DECODE_MIN_WARPS: usize = 4;
const DECODE_MAX_WARPS: usize = 8;

/// Dynamic shared memory of a decode block: the group's queries, the new
/// key and value, and `buffers` tiles of keys (rows padded to an odd number
/// of float4s) and values.
fn decode_smem(group: usize, d: usize, buffers: usize) -> usize {
    let key_row = ((d / 4) | 1) * 4;
    4 * (group * d + 2 * d + buffers * DECODE_TILE * (key_row + d))
}

/// Whether `layout` is a decode step: one new token per sequence.
pub fn is_decode(layout: &CudaLayout) -> bool {
    layout.host.seqs.iter().all(|c| c.len == 1)
}

/// Appends the step's K/V rows to `layer` of the cache, then attends every
/// query row to positions `0..=pos` of its own slot. With `inv_freq`, decode
/// steps apply RoPE to `q` and `k` inside the attention kernel (the caller
/// rotates them itself for prefill steps).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    gpu: &Gpu,
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    cache: &mut CudaKvCache,
    layer: usize,
    heads: HeadShape,
    layout: &CudaLayout,
    inv_freq: Option<&CudaTensor>,
) -> Result<CudaTensor> {
    let HeadShape {
        q_heads,
        kv_heads,
        head_dim: d,
    } = heads;
    let s = cache.shape;
    let kv_dim = kv_heads * d;
    if kv_heads != s.kv_heads || d != s.head_dim || layer >= s.layers || q_heads % kv_heads != 0 {
        bail!("attention: heads {heads:?} / layer {layer} do not match the cache {s:?}");
    }
    if q.cols != q_heads * d || k.cols != kv_dim || v.cols != kv_dim {
        bail!("attention: q/k/v widths do not match {heads:?}");
    }
    let n = layout.n();
    if q.rows != n || k.rows != n || v.rows != n {
        bail!("attention: {} query rows for a step of {n} tokens", q.rows);
    }
    for c in &layout.host.seqs {
        if c.slot >= s.slots || c.start + c.len > s.max_len {
            bail!(
                "KV cache overflow: slot {} positions {}..{} exceed {} slots x {} tokens",
                c.slot,
                c.start,
                c.start + c.len,
                s.slots,
                s.max_len
            );
        }
    }
    let (kc, vc) = (cache.k(layer), cache.v(layer));
    let (kp, vp, slots, pos) = (k.ptr(), v.ptr(), layout.slots(), layout.positions());
    let (kvd, ml) = (kv_dim as i32, s.max_len as i32);
    let out = CudaTensor::empty(gpu, n, q_heads * d)?;
    let scale = 1.0f32 / (d as f32).sqrt();
    let (qp, op) = (q.ptr(), out.ptr());
    let (qh, kvh) = (q_heads as i32, kv_heads as i32);
    let prefill = !is_decode(layout);
    if prefill && inv_freq.is_some() {
        bail!("attention: fused RoPE is for decode steps only");
    }
    if prefill {
        // Decode steps append inside `attn_decode`.
        gpu.launch(
            "kv_append",
            (n as u32, 1, 1),
            128,
            0,
            &mut [
                arg(&kp),
                arg(&vp),
                arg(&kc),
                arg(&vc),
                arg(&slots),
                arg(&pos),
                arg(&kvd),
                arg(&ml),
            ],
        )?;
    }
    if prefill && attention_tc::supported(gpu, d)? {
        let args = attention_tc::PrefillArgs {
            q: qp,
            k_cache: kc,
            v_cache: vc,
            out: op,
            max_len: s.max_len,
        };
        attention_tc::prefill(gpu, &args, heads, layout)?;
        return Ok(out);
    }
    if prefill && PREFILL_HEAD_DIMS.contains(&d) {
        let name = format!("attn_prefill_d{d}");
        let tiles = layout.tile_table();
        gpu.launch(
            &name,
            (layout.tiles as u32, q_heads as u32, 1),
            128,
            0,
            &mut [
                arg(&qp),
                arg(&kc),
                arg(&vc),
                arg(&tiles),
                arg(&op),
                arg(&qh),
                arg(&kvh),
                arg(&ml),
                arg(&scale),
            ],
        )?;
        return Ok(out);
    }
    // Split-K decode: keys 0..=pos of each token in as many ranges as the
    // cache length has 32-key tiles, at most 32. Up to 1024 positions every
    // range fits one tile, so each block stages its keys once and its warps
    // attend without block-wide syncs; more ranges would mean more partials
    // for the last block to merge. Longer caches give ranges of several
    // tiles, copied through two buffers.
    if d == 0 || d % 4 != 0 || d > DECODE_MAX_HEAD_DIM {
        bail!(
            "attention: the decode kernel needs a head size that is a multiple of 4 up to \
             {DECODE_MAX_HEAD_DIM}, not {d}"
        );
    }
    let group = q_heads / kv_heads;
    let splits = s.max_len.div_ceil(DECODE_TILE).clamp(1, DECODE_MAX_SPLITS);
    let buffers = if s.max_len.div_ceil(splits) > DECODE_TILE {
        2
    } else {
        1
    };
    let smem = decode_smem(group, d, buffers);
    gpu.reserve_dynamic_smem("attn_decode", smem as u32)?;
    let threads = 32 * group.clamp(DECODE_MIN_WARPS, DECODE_MAX_WARPS);
    let part = gpu.alloc(n * q_heads * splits * (d + 4) * 4)?;
    let (pp, cp) = (part.ptr(), cache.counters());
    let fp = inv_freq.map_or(0, |f| f.ptr());
    let (di, sp) = (d as i32, splits as i32);
    gpu.launch(
        "attn_decode",
        (splits as u32, kv_heads as u32, n as u32),
        threads as u32,
        smem as u32,
        &mut [
            arg(&qp),
            arg(&kp),
            arg(&vp),
            arg(&kc),
            arg(&vc),
            arg(&slots),
            arg(&pos),
            arg(&fp),
            arg(&pp),
            arg(&cp),
            arg(&op),
            arg(&qh),
            arg(&kvh),
            arg(&di),
            arg(&ml),
            arg(&sp),
            arg(&scale),
        ],
    )?;
    Ok(out)
}
