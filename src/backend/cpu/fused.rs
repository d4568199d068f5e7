//! Fused dequantize-matmul for any [`QuantizedMatrix`]: each worker
//! dequantizes a few weight rows into a small scratch buffer and multiplies
//! them against all activation rows, so no full-size f32 copy of the weight
//! ever exists.

use rayon::prelude::*;

use crate::quant::QuantizedMatrix;

/// Weight rows a worker dequantizes at a time.
const ROWS_PER_TASK: usize = 16;

/// `y[n, out] = x[n, in] · Wᵀ` with `W` dequantized row block by row block.
pub fn fused_dequant_matmul<Q: QuantizedMatrix + ?Sized>(w: &Q, x: &[f32], n: usize, y: &mut [f32]) {
    let (out_f, in_f) = w.shape();
    assert_eq!(x.len(), n * in_f);
    assert_eq!(y.len(), n * out_f);
    let blocks: Vec<(usize, Vec<f32>)> = (0..out_f.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .map(|b| {
            let r0 = b * ROWS_PER_TASK;
            let rows = ROWS_PER_TASK.min(out_f - r0);
            let mut wbuf = vec![0.0f32; rows * in_f];
            for (i, row) in wbuf.chunks_mut(in_f).enumerate() {
                w.dequantize_row(r0 + i, row);
            }
            let mut part = vec![0.0f32; n * rows];
            for t in 0..n {
                let xr = &x[t * in_f..(t + 1) * in_f];
                for (i, wr) in wbuf.chunks(in_f).enumerate() {
                    part[t * rows + i] = dot(xr, wr);
                }
            }
            (r0, part)
        })
        .collect();
    for (r0, part) in blocks {
        let rows = part.len() / n.max(1);
        for t in 0..n {
            y[t * out_f + r0..t * out_f + r0 + rows].copy_from_slice(&part[t * rows..(t + 1) * rows]);
        }
    }
}

/// Dot product with 8 independent accumulators (vectorizes well).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}
