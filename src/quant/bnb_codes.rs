//! The code tables of bitsandbytes' blockwise formats and the nearest-code
//! searches its CUDA kernels perform (checked against bitsandbytes 0.50.2:
//! `get_4bit_type`, `create_dynamic_map`, `dQuantizeNF4`, `dQuantizeFP4` and
//! the 8-bit `dQuantize` binary search).

/// The NF4 code as bitsandbytes publishes it (f32 values printed in f64).
#[allow(clippy::excessive_precision)]
pub(crate) const NF4_PUBLISHED: [f64; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The NF4 code, index 0..15 (bitsandbytes' `get_4bit_type("nf4")`).
pub const NF4_CODE: [f32; 16] = {
    let mut c = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        c[i] = NF4_PUBLISHED[i] as f32;
        i += 1;
    }
    c
};

/// The FP4 (e2m1, bias 3) values before normalisation, index 0..15: bit 3 is
/// the sign, the rest follow bitsandbytes' `get_4bit_type("fp4")` order.
pub const FP4_RAW: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

/// The FP4 code: [`FP4_RAW`] divided by its largest magnitude (12) in f32.
pub const FP4_CODE: [f32; 16] = {
    let mut c = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        c[i] = FP4_RAW[i] / 12.0;
        i += 1;
    }
    c
};

/// Magnitude thresholds of bitsandbytes' FP4 quantizer (`dQuantizeFP4`), in
/// increasing order: `|x|` above the k-th threshold maps past the k-th code.
const FP4_THRESHOLDS: [f64; 7] = [
    0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333,
];

/// FP4 magnitude codes (indices 0..7) in increasing order of magnitude.
const FP4_BY_MAGNITUDE: [u8; 8] = [0, 1, 6, 7, 4, 5, 2, 3];

/// Decision thresholds of bitsandbytes' NF4 quantizer (`dQuantizeNF4`): the
/// midpoints of adjacent NF4 codes, computed in f64 and rounded to f32.
pub fn nf4_thresholds() -> [f32; 15] {
    std::array::from_fn(|i| ((NF4_CODE[i] as f64 + NF4_CODE[i + 1] as f64) / 2.0) as f32)
}

/// NF4 index of a value already divided by its block's absmax: the nearest
/// code, ties going to the lower index, NaN to index 0 (as the CUDA kernel).
pub fn quantize_nf4(x: f32, thresholds: &[f32; 15]) -> u8 {
    thresholds.iter().filter(|&&t| x > t).count() as u8
}

/// FP4 index of a value already divided by its block's absmax, with the
/// CUDA kernel's sign handling (`-0.0` and NaN map to index 0).
pub fn quantize_fp4(x: f32) -> u8 {
    let sign = if x < 0.0 { 8 } else { 0 };
    let a = x.abs();
    let k = FP4_THRESHOLDS.iter().filter(|&&t| a > t as f32).count();
    FP4_BY_MAGNITUDE[k] + sign
}

/// torch.linspace(start, end, steps) in f32 as PyTorch's CPU kernel computes
/// it: the first half from `start`, the second half back from `end`.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - 1 - i) as f32
            }
        })
        .collect()
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True,
/// max_exponent_bits=7, total_bits=8)`), used for the nested absmax of double
/// quantization: 127 negative and 127 positive values with exponents
/// 10⁻⁶..10⁰ and fractions in (0.1, 1), plus 0 and 1.0, sorted ascending.
pub fn dynamic_map_signed() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7 {
        let bounds = linspace_f32(0.1, 1.0, (1usize << i) + 1);
        let scale = [1e-6f64, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0][i] as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data.try_into().expect("127 + 127 + 2 values")
}

/// Index of the nearest entry of a sorted 256-entry `code` to `x`, by the
/// binary search of bitsandbytes' 8-bit blockwise quantizer (`dQuantize`):
/// exact midpoints resolve to the last probed pivot.
pub fn quantize_dynamic(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot = 127usize;
    let (mut lower_pivot, mut upper_pivot) = (0usize, 255usize);
    let (mut lower, mut upper) = (-1.0f32, 1.0f32);
    let mut val = code[pivot];
    let mut step = 64;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[255];
    }
    if lower_pivot == 0 {
        lower = code[0];
    }
    let chosen = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    chosen as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nearest code by exhaustive search, ties to the lower index.
    fn nearest(code: &[f32], x: f32) -> usize {
        let mut best = 0;
        for (i, c) in code.iter().enumerate() {
            if (x - c).abs() < (x - code[best]).abs() {
                best = i;
            }
        }
        best
    }

    #[test]
    fn nf4_thresholds_equal_the_kernel_constants() {
        let t = nf4_thresholds();
        // The literals of bitsandbytes' `dQuantizeNF4` decision tree.
        assert_eq!(t[7], 0.03979014977812767_f64 as f32);
        assert_eq!(t[14], 0.8614784181118011_f64 as f32);
        assert_eq!(t[0], -0.8480964004993439_f64 as f32);
        assert_eq!(t[3], -0.33967943489551544_f64 as f32);
        assert_eq!(t[10], 0.2920137718319893_f64 as f32);
    }

    #[test]
    fn four_bit_quantizers_pick_the_nearest_code() {
        let t = nf4_thresholds();
        for k in -1000..=1000 {
            let x = k as f32 / 1000.0;
            let q = quantize_nf4(x, &t) as usize;
            let d = (x - NF4_CODE[q]).abs();
            assert!(
                d <= (x - NF4_CODE[nearest(&NF4_CODE, x)]).abs() + 1e-7,
                "nf4 {x}"
            );
            let q = quantize_fp4(x) as usize;
            let d = (x - FP4_CODE[q]).abs();
            assert!(
                d <= (x - FP4_CODE[nearest(&FP4_CODE, x)]).abs() + 1e-6,
                "fp4 {x}"
            );
        }
        assert_eq!(quantize_fp4(-0.0), 0);
        assert_eq!(quantize_fp4(-1.0), 0b1011);
        assert_eq!(quantize_nf4(0.0, &t), 7);
        assert_eq!(quantize_nf4(f32::NAN, &t), 0);
    }

    #[test]
    fn dynamic_search_is_nearest() {
        let code = dynamic_map_signed();
        let mut x = -1.0f32;
        while x <= 1.0 {
            let q = quantize_dynamic(&code, x) as usize;
            let best = nearest(&code, x);
            assert!(
                (x - code[q]).abs() <= (x - code[best]).abs(),
                "{x}: chose {q} ({}), nearest {best} ({})",
                code[q],
                code[best]
            );
            x += 0.000_37;
        }
        assert_eq!(quantize_dynamic(&code, 1.0), 255);
        assert_eq!(quantize_dynamic(&code, 0.0), 127);
    }
}
