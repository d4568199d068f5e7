//! Round-to-nearest group-wise integer quantization, and the per-group
//! scale/zero fitting that GPTQ and AWQ share.
//!
//! Two fitting rules, each as its reference implementation defines it:
//! - [`GridRule::MinMaxWithZero`] (GPTQ's quantizer, also used for RTN): the
//!   range is `[min(x_min, 0), max(x_max, 0)]`, `s = range / maxq`,
//!   `z = round(−min / s)`; symmetric mode uses `[−m, m]` with `m = max|x|`
//!   and `z = 2^(bits−1)`. One deviation, for the exported format's sake: the
//!   GPTQ v1 checkpoint format stores `z − 1`, so `z = 0` cannot be written;
//!   when the rule gives `z = 0` it uses `z = 1` and `s = x_max / (maxq − 1)`,
//!   which still covers the group's range.
//! - [`GridRule::MinMax`] (AWQ's): `s = max(x_max − x_min, 1e-5) / maxq`,
//!   `z = clamp(−round(x_min / s), 0, maxq)`.
//!
//! Scales are rounded to f16 before codes are computed (the formats store f16
//! scales), and codes are `clamp(round(x / s) + z, 0, maxq)` with ties to even.

use anyhow::Result;
use half::f16;
use rayon::prelude::*;

use super::packed::{PackedIntMatrix, check_bits};

/// How a group's scale and zero point are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GridRule {
    /// GPTQ's min-max over a range that includes 0; `sym` fixes the zero point.
    MinMaxWithZero { sym: bool },
    /// AWQ's asymmetric min-max.
    MinMax,
}

/// Scale and zero point of one group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupGrid {
    /// f16-representable scale (stored as f32).
    pub scale: f32,
    /// Integer zero point in `0..=maxq`.
    pub zero: u16,
    /// Largest code, `2^bits − 1`.
    pub maxq: u16,
}

impl GroupGrid {
    /// Fits the grid of one group of values.
    pub fn fit(values: &[f32], bits: u32, rule: GridRule) -> GroupGrid {
        let maxq = ((1u32 << bits) - 1) as u16;
        let mq = maxq as f32;
        let (lo, hi) = values
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let (lo, hi) = if values.is_empty() {
            (0.0, 0.0)
        } else {
            (lo, hi)
        };
        match rule {
            GridRule::MinMaxWithZero { sym } => {
                let (mut lo, mut hi) = (lo.min(0.0), hi.max(0.0));
                if sym {
                    hi = hi.max(-lo);
                    if lo < 0.0 {
                        lo = -hi;
                    }
                }
                if lo == 0.0 && hi == 0.0 {
                    (lo, hi) = (-1.0, 1.0);
                }
                if sym {
                    let scale = to_f16_scale((hi - lo) / mq);
                    return GroupGrid {
                        scale,
                        zero: maxq.div_ceil(2),
                        maxq,
                    };
                }
                let scale = to_f16_scale((hi - lo) / mq);
                let zero = (-lo / scale).round_ties_even();
                if zero < 1.0 {
                    // Keep z ≥ 1 so GPTQ v1 (which stores z − 1) can hold it.
                    return GroupGrid {
                        scale: to_f16_scale(hi / (mq - 1.0)),
                        zero: 1,
                        maxq,
                    };
                }
                GroupGrid {
                    scale,
                    zero: zero.min(mq) as u16,
                    maxq,
                }
            }
            GridRule::MinMax => {
                let scale = to_f16_scale((hi - lo).max(1e-5) / mq);
                let zero = (-(lo / scale).round_ties_even()).clamp(0.0, mq);
                GroupGrid {
                    scale,
                    zero: zero as u16,
                    maxq,
                }
            }
        }
    }

    /// The code of `v`.
    #[inline]
    pub fn code(&self, v: f32) -> u8 {
        ((v / self.scale).round_ties_even() + self.zero as f32).clamp(0.0, self.maxq as f32) as u8
    }

    /// The value a code stands for, `(q − z) · s` (exact in f32).
    #[inline]
    pub fn value(&self, code: u8) -> f32 {
        (code as f32 - self.zero as f32) * self.scale
    }

    /// `v` rounded onto the grid.
    #[inline]
    pub fn round(&self, v: f32) -> f32 {
        self.value(self.code(v))
    }
}

/// Rounds a scale to the nearest positive, finite f16 value.
fn to_f16_scale(s: f32) -> f32 {
    let h = f16::from_f32(s).to_f32();
    if h.is_finite() && h > 0.0 {
        h
    } else if h > 0.0 {
        f16::MAX.to_f32()
    } else {
        f16::from_bits(1).to_f32()
    }
}

/// Columns per group for a config's `group_size` (-1 = the whole row).
pub fn resolve_group_size(group_size: i64, in_features: usize) -> usize {
    if group_size <= 0 {
        in_features.max(1)
    } else {
        group_size as usize
    }
}

/// Group-wise settings of a plain (non-act-order) quantization.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IntFormat {
    pub bits: u32,
    /// Columns per group (already resolved, see [`resolve_group_size`]).
    pub group_size: usize,
    pub rule: GridRule,
}

/// Quantizes a row-major `[out, in]` matrix group by group, each value to its
/// nearest grid point. `method` names the result's format.
pub fn quantize_groups(
    w: &[f32],
    out_features: usize,
    in_features: usize,
    fmt: IntFormat,
    method: &str,
) -> Result<PackedIntMatrix> {
    check_bits(fmt.bits)?;
    anyhow::ensure!(
        w.len() == out_features * in_features,
        "{} values for a {out_features}x{in_features} matrix",
        w.len()
    );
    let gs = fmt.group_size.max(1);
    let groups = in_features.div_ceil(gs).max(1);
    let per_row: Vec<(Vec<u8>, Vec<GroupGrid>)> = w
        .par_chunks(in_features.max(1))
        .map(|row| {
            let mut codes = Vec::with_capacity(in_features);
            let mut grids = Vec::with_capacity(groups);
            for chunk in row.chunks(gs) {
                let g = GroupGrid::fit(chunk, fmt.bits, fmt.rule);
                codes.extend(chunk.iter().map(|&v| g.code(v)));
                grids.push(g);
            }
            (codes, grids)
        })
        .collect();
    assemble(out_features, in_features, fmt, &per_row, None, method)
}

/// Builds a [`PackedIntMatrix`] from per-row codes and grids (`grids[g]` of each row).
pub fn assemble(
    out_features: usize,
    in_features: usize,
    fmt: IntFormat,
    rows: &[(Vec<u8>, Vec<GroupGrid>)],
    g_idx: Option<Vec<u32>>,
    method: &str,
) -> Result<PackedIntMatrix> {
    let groups = in_features.div_ceil(fmt.group_size.max(1)).max(1);
    let mut scales = vec![f16::ZERO; groups * out_features];
    let mut zeros = vec![0u16; groups * out_features];
    let mut codes = Vec::with_capacity(out_features * in_features);
    for (r, (row_codes, grids)) in rows.iter().enumerate() {
        anyhow::ensure!(
            grids.len() == groups,
            "row {r} has {} groups, expected {groups}",
            grids.len()
        );
        for (g, grid) in grids.iter().enumerate() {
            scales[g * out_features + r] = f16::from_f32(grid.scale);
            zeros[g * out_features + r] = grid.zero;
        }
        codes.extend_from_slice(row_codes);
    }
    let sym = matches!(fmt.rule, GridRule::MinMaxWithZero { sym: true });
    PackedIntMatrix::from_codes(
        out_features,
        in_features,
        fmt.bits,
        fmt.group_size,
        &codes,
        scales,
        zeros,
        g_idx,
        sym,
        method,
    )
}

/// RTN with the GPTQ grid rule: the baseline GPTQ and AWQ are measured against.
pub fn rtn_quantize(
    w: &[f32],
    out_features: usize,
    in_features: usize,
    bits: u32,
    group_size: i64,
    sym: bool,
) -> Result<PackedIntMatrix> {
    let fmt = IntFormat {
        bits,
        group_size: resolve_group_size(group_size, in_features),
        rule: GridRule::MinMaxWithZero { sym },
    };
    quantize_groups(w, out_features, in_features, fmt, "rtn")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantizedMatrix;

    #[test]
    fn gptq_rule_covers_range_and_keeps_zero_representable() {
        let g = GroupGrid::fit(
            &[-1.0, 0.5, 2.0],
            4,
            GridRule::MinMaxWithZero { sym: false },
        );
        assert_eq!(g.scale, f16::from_f32(0.2).to_f32());
        assert_eq!(g.zero, 5);
        assert_eq!(g.round(0.0), 0.0);
        assert!((g.round(2.0) - 2.0).abs() <= g.scale / 2.0 + 1e-6);
        // All-positive group: z would be 0; kept at 1 with a wider scale.
        let g = GroupGrid::fit(&[0.1, 0.7, 1.4], 4, GridRule::MinMaxWithZero { sym: false });
        assert_eq!(g.zero, 1);
        assert!((g.round(1.4) - 1.4).abs() <= g.scale / 2.0 + 1e-6);
        let g = GroupGrid::fit(&[-3.0, 1.0], 4, GridRule::MinMaxWithZero { sym: true });
        assert_eq!((g.zero, g.scale), (8, f16::from_f32(0.4).to_f32()));
        let g = GroupGrid::fit(&[0.0, 0.0], 3, GridRule::MinMaxWithZero { sym: false });
        assert!(g.scale > 0.0 && g.round(0.0) == 0.0);
    }

    #[test]
    fn awq_rule_is_plain_min_max() {
        let g = GroupGrid::fit(&[0.5, 2.0], 4, GridRule::MinMax);
        assert_eq!(g.scale, f16::from_f32(0.1).to_f32());
        assert_eq!(g.zero, 0, "AWQ clamps a negative zero point to 0");
        let g = GroupGrid::fit(&[-1.5, 1.5], 4, GridRule::MinMax);
        assert_eq!(g.zero, 8);
    }

    #[test]
    fn rtn_error_is_within_one_step() {
        // Rounding the zero point shifts the grid by up to half a step, so a
        // value at the edge of its group may clamp: the bound is one step.
        let w: Vec<f32> = (0..4 * 64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        for bits in [2, 3, 4, 8] {
            let q = rtn_quantize(&w, 4, 64, bits, 32, false).unwrap();
            let mut row = vec![0f32; 64];
            for r in 0..4 {
                q.dequantize_row(r, &mut row);
                for (c, (&a, &b)) in w[r * 64..(r + 1) * 64].iter().zip(&row).enumerate() {
                    let (s, _) = q.group_params(c / 32, r);
                    assert!(
                        (a - b).abs() <= s + 1e-5,
                        "bits {bits} r {r} c {c}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
