//! Fused dequantize-matmul for any [`QuantizedMatrix`]: each worker
//! dequantizes a block of weight rows into a small scratch buffer and
//! multiplies it against all activation rows, so no full-size f32 copy of the
//! weight ever exists.

use super::matmul::matmul_by_row_blocks;
use crate::quant::QuantizedMatrix;

/// `y[n, out] = x[n, in] · Wᵀ` with `W` dequantized row block by row block.
pub fn fused_dequant_matmul<Q: QuantizedMatrix + ?Sized>(
    w: &Q,
    x: &[f32],
    n: usize,
    y: &mut [f32],
) {
    let (out_f, in_f) = w.shape();
    matmul_by_row_blocks(x, n, in_f, out_f, y, |r0, rows, buf| {
        buf.resize(rows * in_f, 0.0);
        for (i, row) in buf.chunks_mut(in_f).enumerate() {
            w.dequantize_row(r0 + i, row);
        }
        None
    });
}
