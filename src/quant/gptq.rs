//! GPTQ (Frantar et al., 2022) for one linear layer: Hessian accumulation and
//! the blocked, error-compensating column-by-column quantization.
//!
//! For `W[out, in]` and inputs `X[n, in]`: `H = 2/n · XᵀX`; dead inputs
//! (`H_ii = 0`) get `H_ii = 1` and zero weight; optional act-order permutes
//! columns by decreasing `H_ii`; `H += λ·mean(diag H)·I`; `U` = upper Cholesky
//! factor of `H⁻¹`. Columns are quantized left to right in blocks of
//! `block_size`: column `j`'s rounding error `e = (w_j − q_j) / U_jj` is
//! spread over the block's remaining columns (`w_k −= e·U_jk`), and each
//! finished block's errors update all later columns in one matrix product.
//! Every output row runs this independently, so rows are split across threads.
//!
//! Group scales/zeros follow [`GridRule::MinMaxWithZero`]; a group's grid is
//! fitted when the loop reaches its first column, on the values as updated so
//! far (with `static_groups`, on the original weights in original column
//! order, before any update). The linear algebra (Gram matrix, Cholesky,
//! inverse, block updates) goes through faer.

use anyhow::{Result, bail};
use faer::linalg::matmul::matmul;
use faer::linalg::solvers::DenseSolveCore;
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};
use rayon::prelude::*;

use super::packed::{PackedIntMatrix, check_bits};
use super::rtn::{GridRule, GroupGrid, IntFormat, assemble, resolve_group_size};
use super::spec::GptqConfig;

/// Running sum of `XᵀX` over calibration inputs of one linear layer.
#[derive(Clone, Debug)]
pub struct Hessian {
    /// Input features.
    pub dim: usize,
    /// `Σ x xᵀ`, row-major `[dim, dim]`.
    pub sum: Vec<f64>,
    /// Rows (tokens) added.
    pub rows: usize,
}

impl Hessian {
    /// An empty accumulator for inputs of `dim` features.
    pub fn new(dim: usize) -> Self {
        Hessian {
            dim,
            sum: vec![0.0; dim * dim],
            rows: 0,
        }
    }

    /// Adds the rows of `x` (`[rows, dim]`, row-major): one f32 GEMM per
    /// thread over a slice of rows, summed in f64.
    pub fn add_batch(&mut self, x: &[f32], rows: usize) -> Result<()> {
        let d = self.dim;
        if x.len() != rows * d {
            bail!(
                "Hessian of {d} features given {} values for {rows} rows",
                x.len()
            );
        }
        if rows == 0 {
            return Ok(());
        }
        let threads = rayon::current_num_threads().clamp(1, rows.div_ceil(64));
        let per = rows.div_ceil(threads);
        let partials: Vec<Mat<f32>> = x
            .par_chunks(per * d)
            .map(|chunk| {
                let n = chunk.len() / d;
                let xm = MatRef::from_row_major_slice(chunk, n, d);
                let mut g = Mat::<f32>::zeros(d, d);
                matmul(
                    g.as_mut(),
                    Accum::Replace,
                    xm.transpose(),
                    xm,
                    1.0,
                    Par::Seq,
                );
                g
            })
            .collect();
        for g in partials {
            for (i, row) in self.sum.chunks_mut(d).enumerate() {
                for (j, s) in row.iter_mut().enumerate() {
                    *s += g[(i, j)] as f64;
                }
            }
        }
        self.rows += rows;
        Ok(())
    }

    /// `H = 2/n · Σ x xᵀ` (GPTQ's normalisation; the algorithm is invariant to it).
    pub fn matrix(&self) -> Result<Vec<f64>> {
        if self.rows == 0 {
            bail!("no calibration inputs reached this layer");
        }
        let f = 2.0 / self.rows as f64;
        Ok(self.sum.iter().map(|v| v * f).collect())
    }
}

/// GPTQ settings for one matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqParams {
    pub bits: u32,
    /// Columns per group; -1 = one group per row.
    pub group_size: i64,
    pub sym: bool,
    /// Act-order: quantize columns by decreasing Hessian diagonal.
    pub desc_act: bool,
    /// With act-order: fit group grids on the original column groups first.
    pub static_groups: bool,
    /// λ: dampening as a fraction of the mean Hessian diagonal.
    pub damp_percent: f64,
    /// Columns per lazy-update block.
    pub block_size: usize,
}

impl Default for GptqParams {
    fn default() -> Self {
        GptqParams {
            bits: 4,
            group_size: 128,
            sym: false,
            desc_act: false,
            static_groups: false,
            damp_percent: 0.01,
            block_size: 128,
        }
    }
}

impl From<&GptqConfig> for GptqParams {
    fn from(c: &GptqConfig) -> Self {
        GptqParams {
            bits: c.bits,
            group_size: c.group_size,
            sym: c.sym,
            desc_act: c.desc_act,
            static_groups: c.static_groups,
            damp_percent: c.damp_percent,
            block_size: c.block_size,
        }
    }
}

impl GptqParams {
    /// Checks ranges and combinations.
    pub fn validate(&self) -> Result<()> {
        check_bits(self.bits)?;
        if self.group_size == 0 || self.group_size < -1 {
            bail!("group_size {} must be -1 or positive", self.group_size);
        }
        if self.static_groups && !self.desc_act {
            bail!("static_groups only applies with desc_act = true");
        }
        if !(self.damp_percent > 0.0 && self.damp_percent < 1.0) {
            bail!("damp_percent {} must be in (0, 1)", self.damp_percent);
        }
        if self.block_size == 0 {
            bail!("block_size must be positive");
        }
        Ok(())
    }
}

/// Upper Cholesky factor of `(H + damp·I)⁻¹`, row-major f32, retrying with
/// ten times more dampening (up to three times) when `H` is not positive definite.
fn inverse_cholesky_upper(h: &[f64], n: usize, damp_percent: f64) -> Result<Vec<f32>> {
    let mean_diag = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
    let mut damp = damp_percent;
    for attempt in 0..4 {
        let hm = Mat::<f64>::from_fn(n, n, |i, j| {
            h[i * n + j] + if i == j { damp * mean_diag } else { 0.0 }
        });
        let factor = hm
            .llt(Side::Lower)
            .ok()
            .and_then(|llt| llt.inverse().llt(Side::Lower).ok());
        if let Some(l) = factor {
            let l = l.L();
            // U = Lᵀ: U[i, j] = L[j, i].
            let mut u = vec![0f32; n * n];
            for i in 0..n {
                for j in i..n {
                    u[i * n + j] = l[(j, i)] as f32;
                }
            }
            if attempt > 0 {
                tracing::warn!("GPTQ: Hessian needed damp_percent {damp} to be positive definite");
            }
            return Ok(u);
        }
        damp *= 10.0;
    }
    bail!(
        "GPTQ: the Hessian is not positive definite even with damp_percent {damp}; calibrate on more tokens"
    )
}

/// Quantizes `w` (`[out, in]`, row-major) with GPTQ given the Hessian `h`
/// (`[in, in]`, row-major, as [`Hessian::matrix`] returns).
pub fn gptq_quantize(
    w: &[f32],
    out_features: usize,
    in_features: usize,
    h: &[f64],
    p: &GptqParams,
) -> Result<PackedIntMatrix> {
    p.validate()?;
    let n = in_features;
    if w.len() != out_features * n || h.len() != n * n {
        bail!(
            "GPTQ: weight {} and Hessian {} values do not fit a {out_features}x{n} layer",
            w.len(),
            h.len()
        );
    }
    let gs = resolve_group_size(p.group_size, n);
    let rule = GridRule::MinMaxWithZero { sym: p.sym };
    let mut w = w.to_vec();
    let mut h = h.to_vec();
    for i in 0..n {
        if h[i * n + i] == 0.0 {
            h[i * n + i] = 1.0;
            for r in 0..out_features {
                w[r * n + i] = 0.0;
            }
        }
    }
    // Grids of the original column groups, for static groups.
    let static_grids: Option<Vec<Vec<GroupGrid>>> = p.static_groups.then(|| {
        w.par_chunks(n)
            .map(|row| {
                row.chunks(gs)
                    .map(|c| GroupGrid::fit(c, p.bits, rule))
                    .collect()
            })
            .collect()
    });
    let perm: Vec<usize> = if p.desc_act {
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|&a, &b| h[b * n + b].total_cmp(&h[a * n + a]));
        idx
    } else {
        (0..n).collect()
    };
    if p.desc_act {
        w = w
            .chunks(n)
            .flat_map(|row| perm.iter().map(|&c| row[c]).collect::<Vec<_>>())
            .collect();
        h = (0..n * n)
            .map(|k| h[perm[k / n] * n + perm[k % n]])
            .collect();
    }
    let hinv = inverse_cholesky_upper(&h, n, p.damp_percent)?;
    let groups = n.div_ceil(gs).max(1);

    const ROWS: usize = 16;
    let results: Vec<(Vec<u8>, Vec<Vec<GroupGrid>>)> = w
        .par_chunks_mut(ROWS * n)
        .enumerate()
        .map(|(chunk, wc)| {
            let statics = static_grids
                .as_ref()
                .map(|s| &s[chunk * ROWS..chunk * ROWS + wc.len() / n]);
            quantize_rows(wc, n, &hinv, p, gs, groups, &perm, statics)
        })
        .collect();

    let mut rows = Vec::with_capacity(out_features);
    for (codes, grids) in results {
        for (r, g) in grids.into_iter().enumerate() {
            let permuted = &codes[r * n..(r + 1) * n];
            let mut row = vec![0u8; n];
            for (j, &c) in perm.iter().enumerate() {
                row[c] = permuted[j];
            }
            rows.push((row, g));
        }
    }
    let g_idx = (p.desc_act && !p.static_groups && groups > 1).then(|| {
        let mut g = vec![0u32; n];
        for (j, &c) in perm.iter().enumerate() {
            g[c] = (j / gs) as u32;
        }
        g
    });
    let fmt = IntFormat {
        bits: p.bits,
        group_size: gs,
        rule,
    };
    assemble(out_features, n, fmt, &rows, g_idx, "gptq")
}

/// GPTQ on a chunk of rows `wc` (`[rows, n]`, columns already permuted).
/// Returns the codes in permuted column order and each row's group grids.
#[allow(clippy::too_many_arguments)]
fn quantize_rows(
    wc: &mut [f32],
    n: usize,
    hinv: &[f32],
    p: &GptqParams,
    gs: usize,
    groups: usize,
    perm: &[usize],
    statics: Option<&[Vec<GroupGrid>]>,
) -> (Vec<u8>, Vec<Vec<GroupGrid>>) {
    let rows = wc.len() / n;
    let rule = GridRule::MinMaxWithZero { sym: p.sym };
    let placeholder = GroupGrid::fit(&[], p.bits, rule);
    let mut grids: Vec<Vec<GroupGrid>> = match statics {
        Some(s) => s.to_vec(),
        None => vec![vec![placeholder; groups]; rows],
    };
    let mut codes = vec![0u8; rows * n];
    let bs = p.block_size;
    let mut err = vec![0f32; rows * bs];
    for i1 in (0..n).step_by(bs) {
        let i2 = (i1 + bs).min(n);
        let count = i2 - i1;
        for (r, row) in wc.chunks_mut(n).enumerate() {
            for j in i1..i2 {
                let grid = match statics {
                    Some(_) => grids[r][perm[j] / gs],
                    None => {
                        if j % gs == 0 {
                            grids[r][j / gs] =
                                GroupGrid::fit(&row[j..(j + gs).min(n)], p.bits, rule);
                        }
                        grids[r][j / gs]
                    }
                };
                let v = row[j];
                let q = grid.code(v);
                codes[r * n + j] = q;
                let e = (v - grid.value(q)) / hinv[j * n + j];
                let hrow = &hinv[j * n + j + 1..j * n + i2];
                for (x, &hv) in row[j + 1..i2].iter_mut().zip(hrow) {
                    *x -= e * hv;
                }
                err[r * count + (j - i1)] = e;
            }
        }
        if i2 < n {
            // W[:, i2..] −= Err · U[i1..i2, i2..]
            let e = MatRef::from_row_major_slice(&err[..rows * count], rows, count);
            let u =
                MatRef::from_row_major_slice_with_stride(&hinv[i1 * n + i2..], count, n - i2, n);
            let dst = MatMut::from_row_major_slice_with_stride_mut(&mut wc[i2..], rows, n - i2, n);
            matmul(dst, Accum::Add, e, u, -1.0f32, Par::Seq);
        }
    }
    (codes, grids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantizedMatrix;

    /// With a diagonal Hessian there is nothing to compensate: GPTQ is RTN.
    #[test]
    fn diagonal_hessian_reduces_to_round_to_nearest() {
        let (o, n) = (5, 48);
        let w: Vec<f32> = (0..o * n)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 31.0)
            .collect();
        let mut h = vec![0f64; n * n];
        for i in 0..n {
            h[i * n + i] = 1.0 + i as f64;
        }
        let p = GptqParams {
            group_size: 16,
            block_size: 8,
            ..Default::default()
        };
        let g = gptq_quantize(&w, o, n, &h, &p).unwrap();
        let r = crate::quant::rtn::rtn_quantize(&w, o, n, 4, 16, false).unwrap();
        assert_eq!(g.codes(), r.codes());
        assert_eq!(g.scales, r.scales);
    }

    #[test]
    fn dead_inputs_get_zero_weight() {
        let (o, n) = (3, 8);
        let w = vec![0.5f32; o * n];
        let mut h = vec![0f64; n * n];
        for i in 1..n {
            h[i * n + i] = 2.0;
        }
        let q = gptq_quantize(
            &w,
            o,
            n,
            &h,
            &GptqParams {
                group_size: -1,
                ..Default::default()
            },
        )
        .unwrap();
        let mut row = vec![0f32; n];
        q.dequantize_row(0, &mut row);
        assert_eq!(row[0], 0.0);
        assert!((row[1] - 0.5).abs() < 0.05);
    }

    #[test]
    fn hessian_is_two_over_n_xtx() {
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut h = Hessian::new(2);
        h.add_batch(&x, 3).unwrap();
        let m = h.matrix().unwrap();
        let want = [
            1.0 + 9.0 + 25.0,
            2.0 + 12.0 + 30.0,
            2.0 + 12.0 + 30.0,
            4.0 + 16.0 + 36.0,
        ];
        for (a, b) in m.iter().zip(want) {
            assert!((a - 2.0 / 3.0 * b).abs() < 1e-9);
        }
        assert!(Hessian::new(2).matrix().is_err());
    }
}
