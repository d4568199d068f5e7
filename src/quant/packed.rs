//! The packed group-wise integer format shared by RTN, GPTQ and AWQ.
//!
//! A weight `W[out, in]` is stored as `bits`-bit codes `q` with one f16 scale
//! `s` and one integer zero point `z` per (group of input columns, output
//! row). Dequantization is `w = (q − z) · s`, evaluated in f32; because `q − z`
//! is a small integer and `s` an f16 value, that product is exact in f32, so
//! every implementation (CPU, CUDA, a reloaded checkpoint) reproduces the same
//! weights bit for bit.
//!
//! Layout, chosen so a device kernel can upload the fields as they are:
//! - `qweight`: row-major by output feature; row `r` is an LSB-first bitstream
//!   of its `in_features` codes in `words_per_row()` u32 words (code `c` starts
//!   at bit `c · bits` of the row). This is the bit order of GPTQ's `qweight`
//!   (including its 3-bit scheme, where codes straddle word boundaries);
//!   GPTQ's tensor is this one transposed.
//! - `scales`, `zeros`: `[groups, out_features]`, group-major like GPTQ's and
//!   AWQ's `scales`.
//! - `g_idx`: the group of each input column when GPTQ act-order quantized
//!   columns out of order; `None` means column `c` is in group `c / group_size`.

use std::any::Any;

use anyhow::{Result, bail};
use half::f16;

use super::QuantizedMatrix;

/// Bit widths the format supports.
pub const SUPPORTED_BITS: [u32; 4] = [2, 3, 4, 8];

/// A group-wise integer-quantized `[out_features, in_features]` matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedIntMatrix {
    /// Rows of `W` (output features).
    pub out_features: usize,
    /// Columns of `W` (input features).
    pub in_features: usize,
    /// Bits per code: 2, 3, 4 or 8.
    pub bits: u32,
    /// Input columns per group; `in_features` when the whole row is one group
    /// (GPTQ's `group_size = -1`). The last group may be shorter.
    pub group_size: usize,
    /// Codes, `[out_features, words_per_row()]`, LSB-first bitstream per row.
    pub qweight: Vec<u32>,
    /// Scales, `[groups, out_features]`.
    pub scales: Vec<f16>,
    /// Zero points, `[groups, out_features]`. Codes and zeros are `bits` wide
    /// (`0..=2^bits − 1`), except that a GPTQ v1 checkpoint written by other
    /// tools may decode to `2^bits` (its stored `zero − 1` field wrapped).
    pub zeros: Vec<u16>,
    /// Group of each input column, `[in_features]`, when act-order permuted
    /// the columns; `None`: column `c` belongs to group `c / group_size`.
    pub g_idx: Option<Vec<u32>>,
    /// Symmetric quantization (zero point fixed at `2^(bits−1)`).
    pub sym: bool,
    /// The method that produced the matrix (`rtn`, `gptq`, `awq`); names the format.
    pub method: String,
}

impl PackedIntMatrix {
    /// Builds a matrix from unpacked codes `[out, in]` (each `< 2^bits`), checking every size.
    #[allow(clippy::too_many_arguments)]
    pub fn from_codes(
        out_features: usize,
        in_features: usize,
        bits: u32,
        group_size: usize,
        codes: &[u8],
        scales: Vec<f16>,
        zeros: Vec<u16>,
        g_idx: Option<Vec<u32>>,
        sym: bool,
        method: &str,
    ) -> Result<Self> {
        check_bits(bits)?;
        if codes.len() != out_features * in_features {
            bail!(
                "{} codes for a {out_features}x{in_features} matrix",
                codes.len()
            );
        }
        let maxq = (1u32 << bits) - 1;
        if let Some(c) = codes.iter().find(|&&c| c as u32 > maxq) {
            bail!("code {c} does not fit in {bits} bits");
        }
        let qweight: Vec<u32> = if in_features == 0 {
            Vec::new()
        } else {
            codes
                .chunks(in_features)
                .flat_map(|row| pack_codes(row, bits))
                .collect()
        };
        let m = PackedIntMatrix {
            out_features,
            in_features,
            bits,
            group_size,
            qweight,
            scales,
            zeros,
            g_idx,
            sym,
            method: method.to_string(),
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks that every field has the size the dimensions imply.
    pub fn validate(&self) -> Result<()> {
        check_bits(self.bits)?;
        if self.group_size == 0 {
            bail!("group_size must be positive");
        }
        let (o, i) = (self.out_features, self.in_features);
        if self.qweight.len() != o * self.words_per_row() {
            bail!(
                "qweight holds {} words; {o} rows of {} expected",
                self.qweight.len(),
                self.words_per_row()
            );
        }
        let groups = self.groups();
        if self.scales.len() != groups * o || self.zeros.len() != groups * o {
            bail!(
                "scales/zeros hold {}/{} values; {groups} groups x {o} rows expected",
                self.scales.len(),
                self.zeros.len()
            );
        }
        if let Some(g) = &self.g_idx {
            if g.len() != i {
                bail!("g_idx has {} entries for {i} input columns", g.len());
            }
            if let Some(bad) = g.iter().find(|&&x| x as usize >= groups) {
                bail!("g_idx names group {bad}, the matrix has {groups}");
            }
        }
        let max_zero = 1u16 << self.bits;
        if let Some(z) = self.zeros.iter().find(|&&z| z > max_zero) {
            bail!("zero point {z} is out of range for {} bits", self.bits);
        }
        Ok(())
    }

    /// Number of groups per row.
    pub fn groups(&self) -> usize {
        self.in_features.div_ceil(self.group_size).max(1)
    }

    /// u32 words holding one row's codes.
    pub fn words_per_row(&self) -> usize {
        (self.in_features * self.bits as usize).div_ceil(32)
    }

    /// Group of input column `c`.
    pub fn group_of(&self, c: usize) -> usize {
        match &self.g_idx {
            Some(g) => g[c] as usize,
            None => c / self.group_size,
        }
    }

    /// The codes of row `r`, unpacked.
    pub fn row_codes(&self, r: usize) -> Vec<u8> {
        let w = self.words_per_row();
        unpack_codes(
            &self.qweight[r * w..(r + 1) * w],
            self.bits,
            self.in_features,
        )
    }

    /// All codes `[out, in]`, unpacked.
    pub fn codes(&self) -> Vec<u8> {
        (0..self.out_features)
            .flat_map(|r| self.row_codes(r))
            .collect()
    }

    /// `(scale, zero)` of group `g` of row `r`.
    pub fn group_params(&self, g: usize, r: usize) -> (f32, u16) {
        let at = g * self.out_features + r;
        (self.scales[at].to_f32(), self.zeros[at])
    }
}

impl QuantizedMatrix for PackedIntMatrix {
    fn shape(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let n = self.in_features;
        let w = self.words_per_row();
        unpack_codes_f32(
            &self.qweight[row * w..(row + 1) * w],
            self.bits,
            &mut out[..n],
        );
        match &self.g_idx {
            None => {
                for (g, chunk) in out[..n].chunks_mut(self.group_size).enumerate() {
                    let (s, z) = self.group_params(g, row);
                    let z = z as f32;
                    for v in chunk {
                        *v = (*v - z) * s;
                    }
                }
            }
            Some(g_idx) => {
                for (v, &g) in out[..n].iter_mut().zip(g_idx) {
                    let (s, z) = self.group_params(g as usize, row);
                    *v = (*v - z as f32) * s;
                }
            }
        }
    }

    fn storage_bytes(&self) -> usize {
        // Zero points are held as u16 for kernels' convenience; every export
        // stores them packed at `bits` each, which is what is counted.
        self.qweight.len() * 4
            + self.scales.len() * 2
            + (self.zeros.len() * self.bits as usize).div_ceil(8)
            + self.g_idx.as_ref().map_or(0, |g| g.len() * 4)
    }

    fn format_name(&self) -> String {
        let group = if self.group_size >= self.in_features && self.groups() == 1 {
            "-1".to_string()
        } else {
            self.group_size.to_string()
        };
        let mut name = format!("{}-{}bit-g{group}", self.method, self.bits);
        if self.g_idx.is_some() {
            name.push_str("-act");
        }
        if self.sym {
            name.push_str("-sym");
        }
        name
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Errors unless `bits` is one of [`SUPPORTED_BITS`].
pub fn check_bits(bits: u32) -> Result<()> {
    if !SUPPORTED_BITS.contains(&bits) {
        bail!("bits {bits} not supported: use 2, 3, 4 or 8");
    }
    Ok(())
}

/// Packs `bits`-bit codes into an LSB-first bitstream of u32 words: code `i`
/// occupies bits `i·bits .. (i+1)·bits` of the stream, straddling a word
/// boundary when it must (3 bits). Codes must be `< 2^bits`.
pub fn pack_codes(codes: &[u8], bits: u32) -> Vec<u32> {
    let b = bits as usize;
    let mut words = vec![0u32; (codes.len() * b).div_ceil(32)];
    for (i, &c) in codes.iter().enumerate() {
        let (w, o) = ((i * b) / 32, (i * b) % 32);
        let c = c as u32;
        words[w] |= c << o;
        if o + b > 32 {
            words[w + 1] |= c >> (32 - o);
        }
    }
    words
}

/// Inverse of [`pack_codes`]: the first `n` codes of the stream.
pub fn unpack_codes(words: &[u32], bits: u32, n: usize) -> Vec<u8> {
    let mut out = vec![0f32; n];
    unpack_codes_f32(words, bits, &mut out);
    out.into_iter().map(|v| v as u8).collect()
}

/// Unpacks `out.len()` codes of the stream into `out` as f32 values.
pub fn unpack_codes_f32(words: &[u32], bits: u32, out: &mut [f32]) {
    let b = bits as usize;
    let mask = (1u64 << b) - 1;
    if 32 % b == 0 {
        let per = 32 / b;
        for (chunk, &word) in out.chunks_mut(per).zip(words) {
            for (k, v) in chunk.iter_mut().enumerate() {
                *v = ((word >> (k * b)) as u64 & mask) as f32;
            }
        }
    } else {
        // General bitstream: keep up to 64 pending bits.
        let mut acc = 0u64;
        let mut have = 0usize;
        let mut next = words.iter();
        for v in out.iter_mut() {
            if have < b {
                acc |= (*next.next().unwrap_or(&0) as u64) << have;
                have += 32;
            }
            *v = (acc & mask) as f32;
            acc >>= b;
            have -= b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_bit_stream_straddles_words_like_gptq() {
        // Codes 0..31 of value 7 except code 10 (straddles words 0/1) = 0b101.
        let mut codes = vec![0u8; 32];
        codes[10] = 0b101;
        let w = pack_codes(&codes, 3);
        assert_eq!(w.len(), 3);
        assert_eq!(
            w[0],
            0b01 << 30,
            "low two bits of code 10 at the top of word 0"
        );
        assert_eq!(w[1], 0b1, "its high bit at the bottom of word 1");
        assert_eq!(unpack_codes(&w, 3, 32), codes);
    }

    #[test]
    fn dequantizes_with_groups_and_g_idx() {
        // 2 rows x 4 columns, 2-bit codes, groups of 2.
        let codes = [0u8, 1, 2, 3, 3, 2, 1, 0];
        let scales = [0.5f32, 1.0, 2.0, 4.0].map(f16::from_f32).to_vec();
        let zeros = vec![1, 2, 0, 3];
        let m = PackedIntMatrix::from_codes(2, 4, 2, 2, &codes, scales, zeros, None, false, "rtn")
            .unwrap();
        let mut row = [0f32; 4];
        m.dequantize_row(0, &mut row);
        // group 0 of row 0: s=0.5, z=1; group 1: s=2, z=0.
        assert_eq!(row, [-0.5, 0.0, 4.0, 6.0]);
        m.dequantize_row(1, &mut row);
        // row 1: group 0 s=1, z=2; group 1 s=4, z=3.
        assert_eq!(row, [1.0, 0.0, -8.0, -12.0]);
        let mut with_idx = m.clone();
        with_idx.g_idx = Some(vec![1, 0, 1, 0]);
        with_idx.dequantize_row(0, &mut row);
        assert_eq!(row, [0.0, 0.0, 4.0, 1.0]);
        assert_eq!(m.storage_bytes(), 2 * 4 + 4 * 2 + 1);
        assert_eq!(m.format_name(), "rtn-2bit-g2");
    }

    #[test]
    fn rejects_inconsistent_fields() {
        let bad = PackedIntMatrix::from_codes(
            1,
            4,
            4,
            2,
            &[0, 1, 2, 16],
            vec![],
            vec![],
            None,
            false,
            "rtn",
        );
        assert!(format!("{:#}", bad.unwrap_err()).contains("does not fit in 4 bits"));
        let bad =
            PackedIntMatrix::from_codes(1, 4, 5, 2, &[0; 4], vec![], vec![], None, false, "rtn");
        assert!(format!("{:#}", bad.unwrap_err()).contains("bits 5"));
        let bad = PackedIntMatrix::from_codes(
            1,
            4,
            4,
            2,
            &[0; 4],
            vec![f16::ONE],
            vec![0],
            None,
            false,
            "rtn",
        );
        assert!(format!("{:#}", bad.unwrap_err()).contains("groups"));
    }
}
