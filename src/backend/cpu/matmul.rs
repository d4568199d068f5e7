//! Batch-invariant `y = x · Wᵀ` on the CPU.
//!
//! Every output element is the dot product of one activation row and one
//! weight row computed in one fixed order (8 interleaved partial sums, a fixed
//! pairwise reduction, then the tail), whatever the number of rows in the
//! batch. A general GEMM re-blocks the reduction dimension depending on the
//! matrix sizes, which makes a sequence's logits depend on which other
//! sequences share its batch; here they never do. Register blocking (4
//! activation rows × 3 weight rows) and rayon over weight-row blocks keep it
//! fast; with AVX2+FMA (detected at run time) the partial sums use fused
//! multiply-adds. On one machine one path is always taken, so a row's result
//! never depends on its batch (`cargo bench --bench cpu_kernels` compares
//! with the `gemm` crate).

use rayon::prelude::*;

/// Weight rows one rayon task handles.
pub const ROWS_PER_TASK: usize = 16;
const T: usize = 4;
const R: usize = 3;
const LANES: usize = 8;

/// Dot products of `T2` activation rows with `R2` weight rows (portable path).
#[inline(always)]
fn micro<const T2: usize, const R2: usize>(xs: [&[f32]; T2], ws: [&[f32]; R2]) -> [[f32; R2]; T2] {
    let k = xs[0].len();
    let chunks = k / LANES;
    let mut acc = [[[0f32; LANES]; R2]; T2];
    for c in 0..chunks {
        let o = c * LANES;
        let wv: [[f32; LANES]; R2] =
            std::array::from_fn(|j| ws[j][o..o + LANES].try_into().expect("8 lanes"));
        for i in 0..T2 {
            let xv: [f32; LANES] = xs[i][o..o + LANES].try_into().expect("8 lanes");
            for j in 0..R2 {
                for l in 0..LANES {
                    acc[i][j][l] += xv[l] * wv[j][l];
                }
            }
        }
    }
    let mut out = [[0f32; R2]; T2];
    for i in 0..T2 {
        for j in 0..R2 {
            let a = acc[i][j];
            let mut s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
            for kk in chunks * LANES..k {
                s += xs[i][kk] * ws[j][kk];
            }
            out[i][j] = s;
        }
    }
    out
}

/// `out[t * rows + r] = x_t · w_r` for `n` activation rows of length `k` and
/// `rows` weight rows, tiled by the given micro-kernels (full tile, one weight
/// row, one activation row), which must share their per-element arithmetic.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block_with(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[f32],
    rows: usize,
    out: &mut [f32],
    full: impl Fn([&[f32]; T], [&[f32]; R]) -> [[f32; R]; T],
    one_row: impl Fn([&[f32]; T], [&[f32]; 1]) -> [[f32; 1]; T],
    single: impl Fn([&[f32]; 1], [&[f32]; 1]) -> [[f32; 1]; 1],
) {
    let xr = |t: usize| &x[t * k..(t + 1) * k];
    let wr = |r: usize| &w[r * k..(r + 1) * k];
    let mut t = 0;
    while t < n {
        let full_t = t + T <= n;
        let mut r = 0;
        while r < rows {
            if full_t && r + R <= rows {
                let o = full(
                    std::array::from_fn(|i| xr(t + i)),
                    std::array::from_fn(|j| wr(r + j)),
                );
                for (i, row) in o.iter().enumerate() {
                    out[(t + i) * rows + r..][..R].copy_from_slice(row);
                }
                r += R;
            } else if full_t {
                let o = one_row(std::array::from_fn(|i| xr(t + i)), [wr(r)]);
                for (i, row) in o.iter().enumerate() {
                    out[(t + i) * rows + r] = row[0];
                }
                r += 1;
            } else {
                out[t * rows + r] = single([xr(t)], [wr(r)])[0][0];
                r += 1;
            }
        }
        t += if full_t { T } else { 1 };
    }
}

/// AVX2+FMA version of [`micro`]: same blocking, fused multiply-adds.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::LANES;

    #[inline(always)]
    unsafe fn micro<const T2: usize, const R2: usize>(
        xs: [&[f32]; T2],
        ws: [&[f32]; R2],
    ) -> [[f32; R2]; T2] {
        let k = xs[0].len();
        let chunks = k / LANES;
        // SAFETY (whole function): callers pass rows of length k; every load
        // reads 8 floats at offset o with o + 8 <= chunks * 8 <= k.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); R2]; T2];
            for c in 0..chunks {
                let o = c * LANES;
                let wv: [__m256; R2] =
                    std::array::from_fn(|j| _mm256_loadu_ps(ws[j].as_ptr().add(o)));
                for i in 0..T2 {
                    let xv = _mm256_loadu_ps(xs[i].as_ptr().add(o));
                    for j in 0..R2 {
                        acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
                    }
                }
            }
            let mut out = [[0f32; R2]; T2];
            for i in 0..T2 {
                for j in 0..R2 {
                    let mut a = [0f32; LANES];
                    _mm256_storeu_ps(a.as_mut_ptr(), acc[i][j]);
                    let mut s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
                    for kk in chunks * LANES..k {
                        s = xs[i][kk].mul_add(ws[j][kk], s);
                    }
                    out[i][j] = s;
                }
            }
            out
        }
    }

    /// [`super::block_body`] with the FMA micro-kernel.
    #[target_feature(enable = "avx2,fma")]
    pub fn block(x: &[f32], n: usize, k: usize, w: &[f32], rows: usize, out: &mut [f32]) {
        // SAFETY: the target features are enabled on this function.
        super::block_with(
            x,
            n,
            k,
            w,
            rows,
            out,
            |a, b| unsafe { micro::<{ super::T }, { super::R }>(a, b) },
            |a, b| unsafe { micro::<{ super::T }, 1>(a, b) },
            |a, b| unsafe { micro::<1, 1>(a, b) },
        );
    }
}

/// Products of `n` activation rows with a block of `rows` weight rows,
/// written `[n, rows]` into `out`.
pub fn block(x: &[f32], n: usize, k: usize, w: &[f32], rows: usize, out: &mut [f32]) {
    debug_assert_eq!(x.len(), n * k);
    debug_assert_eq!(w.len(), rows * k);
    debug_assert_eq!(out.len(), n * rows);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA, checked just above.
        return unsafe { avx2::block(x, n, k, w, rows, out) };
    }
    block_with(
        x,
        n,
        k,
        w,
        rows,
        out,
        micro::<T, R>,
        micro::<T, 1>,
        micro::<1, 1>,
    )
}

/// `y[n, out] = x[n, in] · Wᵀ` where `fill(r0, rows, buf)` writes weight rows
/// `r0..r0+rows` (f32, row-major) into `buf`, or returns them borrowed.
pub fn matmul_by_row_blocks<'w, F>(
    x: &[f32],
    n: usize,
    in_f: usize,
    out_f: usize,
    y: &mut [f32],
    rows_of: F,
) where
    F: Fn(usize, usize, &mut Vec<f32>) -> Option<&'w [f32]> + Sync,
{
    assert_eq!(x.len(), n * in_f);
    assert_eq!(y.len(), n * out_f);
    if n == 0 || out_f == 0 {
        return;
    }
    let parts: Vec<(usize, usize, Vec<f32>)> = (0..out_f.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .map(|b| {
            let r0 = b * ROWS_PER_TASK;
            let rows = ROWS_PER_TASK.min(out_f - r0);
            let mut scratch = Vec::new();
            let w = match rows_of(r0, rows, &mut scratch) {
                Some(borrowed) => borrowed,
                None => &scratch[..],
            };
            let mut part = vec![0f32; n * rows];
            block(x, n, in_f, w, rows, &mut part);
            (r0, rows, part)
        })
        .collect();
    for (r0, rows, part) in parts {
        for t in 0..n {
            y[t * out_f + r0..t * out_f + r0 + rows]
                .copy_from_slice(&part[t * rows..(t + 1) * rows]);
        }
    }
}

/// Dense `y[n, out] = x[n, in] · Wᵀ` for a row-major `W[out, in]`.
pub fn dense_matmul(x: &[f32], n: usize, w: &[f32], out_f: usize, in_f: usize, y: &mut [f32]) {
    assert_eq!(w.len(), out_f * in_f);
    matmul_by_row_blocks(x, n, in_f, out_f, y, |r0, rows, _| {
        Some(&w[r0 * in_f..(r0 + rows) * in_f])
    });
}
