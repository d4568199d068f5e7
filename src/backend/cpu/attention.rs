//! Causal grouped-query attention over a KV cache, on the CPU.

use anyhow::{Result, bail};
use rayon::prelude::*;

use super::{CpuKvCache, CpuTensor};
use crate::backend::{HeadShape, StepLayout};

/// Writes the step's K/V rows into `layer`'s cache, then attends every query
/// row to positions `0..=pos` of its own slot.
pub fn attention(
    q: &CpuTensor,
    k: &CpuTensor,
    v: &CpuTensor,
    cache: &mut CpuKvCache,
    layer: usize,
    heads: HeadShape,
    layout: &StepLayout,
) -> Result<CpuTensor> {
    let HeadShape {
        q_heads,
        kv_heads,
        head_dim,
    } = heads;
    let s = cache.shape;
    let kv_dim = kv_heads * head_dim;
    if kv_heads != s.kv_heads || head_dim != s.head_dim || layer >= s.layers {
        bail!("attention: heads {heads:?} / layer {layer} do not match the cache {s:?}");
    }
    if q.cols != q_heads * head_dim || k.cols != kv_dim || v.cols != kv_dim {
        bail!("attention: q/k/v widths do not match {heads:?}");
    }
    let positions = layout.token_positions();
    if q.rows != positions.len() || k.rows != q.rows || v.rows != q.rows {
        bail!(
            "attention: {} query rows for a step of {} tokens",
            q.rows,
            positions.len()
        );
    }
    for &(slot, pos) in &positions {
        if slot >= s.slots || pos >= s.max_len {
            bail!(
                "KV cache overflow: slot {slot} position {pos} exceeds {} slots x {} tokens",
                s.slots,
                s.max_len
            );
        }
    }
    let slot_stride = s.max_len * kv_dim;
    let (kc, vc) = (&mut cache.k[layer], &mut cache.v[layer]);
    for (t, &(slot, pos)) in positions.iter().enumerate() {
        let at = slot * slot_stride + pos * kv_dim;
        kc[at..at + kv_dim].copy_from_slice(&k.data[t * kv_dim..(t + 1) * kv_dim]);
        vc[at..at + kv_dim].copy_from_slice(&v.data[t * kv_dim..(t + 1) * kv_dim]);
    }
    let (kc, vc) = (&cache.k[layer], &cache.v[layer]);
    let group = q_heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut out = vec![0.0; q.rows * q.cols];
    out.par_chunks_mut(head_dim)
        .enumerate()
        .for_each(|(idx, o)| {
            let (t, h) = (idx / q_heads, idx % q_heads);
            let (slot, pos) = positions[t];
            let g = h / group;
            let qh = &q.data[t * q.cols + h * head_dim..][..head_dim];
            let base = slot * slot_stride + g * head_dim;
            let mut scores: Vec<f32> = (0..=pos)
                .map(|j| {
                    let kj = &kc[base + j * kv_dim..][..head_dim];
                    qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut denom = 0.0;
            for sc in &mut scores {
                *sc = (*sc - max).exp();
                denom += *sc;
            }
            for (j, &p) in scores.iter().enumerate() {
                let vj = &vc[base + j * kv_dim..][..head_dim];
                let w = p / denom;
                for (acc, &x) in o.iter_mut().zip(vj) {
                    *acc += w * x;
                }
            }
        });
    CpuTensor::new(q.rows, q.cols, out)
}
