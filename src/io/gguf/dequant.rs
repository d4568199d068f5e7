//! ggml tensor types and their dequantization to f32.
//!
//! Block formats (32 values per block, little-endian, `d`/`m` are f16):
//! - Q4_0 (18 bytes): `d`, 16 bytes of nibbles; value j < 16 is
//!   `(low nibble of byte j − 8)·d`, value j + 16 is `(high nibble − 8)·d`.
//! - Q4_1 (20 bytes): `d`, `m`, 16 bytes of nibbles; `nibble·d + m`, same order.
//! - Q8_0 (34 bytes): `d`, 32 signed bytes; `q·d`.

use anyhow::{Result, bail};
use half::{bf16, f16};
use rayon::prelude::*;

/// Values per block of the 32-element block formats.
pub const QK: usize = 32;

/// A ggml tensor storage type, by its numeric id in GGUF files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// 4-bit blocks of 32 with an f16 scale, offset −8.
    Q4_0,
    /// 4-bit blocks of 32 with f16 scale and minimum.
    Q4_1,
    /// 8-bit blocks of 32 with an f16 scale.
    Q8_0,
    /// bfloat16.
    BF16,
    /// Any other id (K-quants, i-quants, integer types, ...): not readable here.
    Other(u32),
}

impl GgmlType {
    /// The types [`dequantize`] reads, for error messages.
    pub const SUPPORTED: &'static str = "F32, F16, BF16, Q4_0, Q4_1, Q8_0";

    /// The type with ggml id `id`.
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    /// The ggml id written in GGUF files.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    /// (values per block, bytes per block) of a readable type.
    fn block(self) -> Option<(usize, usize)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 | GgmlType::BF16 => Some((1, 2)),
            GgmlType::Q4_0 => Some((QK, 18)),
            GgmlType::Q4_1 => Some((QK, 20)),
            GgmlType::Q8_0 => Some((QK, 34)),
            GgmlType::Other(_) => None,
        }
    }

    /// Bytes that `n` values occupy; `None` for unreadable types or when `n`
    /// is not a whole number of blocks.
    pub fn byte_size(self, n: usize) -> Option<usize> {
        let (per, bytes) = self.block()?;
        n.is_multiple_of(per).then(|| n / per * bytes)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GgmlType::Other(id) => match other_type_name(*id) {
                Some(name) => write!(f, "{name} (id {id})"),
                None => write!(f, "unknown type id {id}"),
            },
            known => write!(f, "{known:?}"),
        }
    }
}

/// Names of the ggml types quantbench does not read, for error messages.
fn other_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        6 => "Q5_0",
        7 => "Q5_1",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// Dequantizes `n` values of type `kind` stored in `bytes`.
pub fn dequantize(kind: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let Some((per, block_bytes)) = kind.block() else {
        bail!(
            "ggml type {kind} is not supported (supported: {})",
            GgmlType::SUPPORTED
        );
    };
    match kind.byte_size(n) {
        Some(len) if len == bytes.len() => {}
        Some(len) => bail!(
            "{kind} data of {n} values needs {len} bytes, got {}",
            bytes.len()
        ),
        None => bail!("{n} values are not a whole number of {kind} blocks of {per}"),
    }
    let mut out = vec![0f32; n];
    let decode: fn(&[u8], &mut [f32]) = match kind {
        GgmlType::F32 => |b, o| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, o| o[0] = f16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::BF16 => |b, o| o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => block_q4_0,
        GgmlType::Q4_1 => block_q4_1,
        GgmlType::Q8_0 => block_q8_0,
        GgmlType::Other(_) => unreachable!("rejected above"),
    };
    // Blocks are independent: decode them in parallel, a few thousand per task.
    let group = 4096;
    out.par_chunks_mut(per * group)
        .zip(bytes.par_chunks(block_bytes * group))
        .for_each(|(o, b)| {
            o.chunks_exact_mut(per)
                .zip(b.chunks_exact(block_bytes))
                .for_each(|(o, b)| decode(b, o));
        });
    Ok(out)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// One Q4_0 block (18 bytes) → 32 values.
fn block_q4_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        out[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// One Q4_1 block (20 bytes) → 32 values.
fn block_q4_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        out[j] = (q & 0x0f) as f32 * d + m;
        out[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// One Q8_0 block (34 bytes) → 32 values.
fn block_q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = q as i8 as f32 * d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn q4_0_block_by_hand() {
        // d = 0.5; byte j holds low nibble j % 16 and high nibble 15 - j % 16.
        let mut b = f16_bytes(0.5).to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let v = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!(v[0], -4.0); // (0 - 8) * 0.5
        assert_eq!(v[15], 3.5); // (15 - 8) * 0.5
        assert_eq!(v[16], 3.5); // high nibble of byte 0 = 15
        assert_eq!(v[31], -4.0); // high nibble of byte 15 = 0
        assert_eq!(v[9], 0.5);
    }

    #[test]
    fn q4_1_block_by_hand() {
        // d = 0.25, m = -1; byte j = 0x3j → low j, high 3.
        let mut b = f16_bytes(0.25).to_vec();
        b.extend(f16_bytes(-1.0));
        b.extend((0..16u8).map(|j| j | 0x30));
        let v = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!(v[0], -1.0);
        assert_eq!(v[4], 0.0);
        assert_eq!(v[15], 2.75);
        assert!(v[16..].iter().all(|&x| x == -0.25), "{v:?}");
    }

    #[test]
    fn q8_0_blocks_by_hand() {
        // Two blocks: d = 0.125 with q = -16..16, then d = 2 with q = 127 everywhere.
        let mut b = f16_bytes(0.125).to_vec();
        b.extend((-16i8..16).map(|q| q as u8));
        b.extend(f16_bytes(2.0));
        b.extend([127u8; 32]);
        let v = dequantize(GgmlType::Q8_0, &b, 64).unwrap();
        assert_eq!(v[0], -2.0);
        assert_eq!(v[16], 0.0);
        assert_eq!(v[31], 1.875);
        assert!(v[32..].iter().all(|&x| x == 254.0));
    }

    #[test]
    fn wrong_sizes_and_unknown_types_are_errors() {
        assert!(dequantize(GgmlType::Q8_0, &[0; 33], 32).is_err());
        assert!(dequantize(GgmlType::Q4_0, &[0; 18], 31).is_err());
        let e = dequantize(GgmlType::from_id(14), &[0; 210], 256).unwrap_err();
        assert!(e.to_string().contains("Q6_K"), "{e}");
        assert_eq!(GgmlType::from_id(8).id(), 8);
    }
}
