//! 4-bit indices packed two per byte, the first element in the high nibble
//! (bitsandbytes' order), and their decoding through a 16-entry table, with
//! an AVX2 path (detected at run time) that decodes 16 elements per step.
//! Both paths are plain table lookups, so they give identical results.

/// Packs 4-bit indices two per byte, the first in the high nibble.
pub fn pack_nibbles(indices: &[u8]) -> Vec<u8> {
    indices
        .chunks(2)
        .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0))
        .collect()
}

/// Writes `lut[index]` of flattened elements `f..f + out.len()` of `packed`
/// into `out`.
#[inline]
pub fn decode_nibbles(packed: &[u8], f: usize, out: &mut [f32], lut: &[f32; 16]) {
    let (f, out) = match out.split_first_mut() {
        Some((first, rest)) if !f.is_multiple_of(2) => {
            *first = lut[(packed[f / 2] & 0x0F) as usize];
            (f + 1, rest)
        }
        _ => (f, out),
    };
    let (pairs, tail) = out.as_chunks_mut::<2>();
    let bytes = &packed[f / 2..f / 2 + pairs.len()];
    decode_pairs(bytes, pairs, lut);
    if let [last] = tail {
        *last = lut[(packed[f / 2 + pairs.len()] >> 4) as usize];
    }
}

/// `pairs[i] = [lut[bytes[i] >> 4], lut[bytes[i] & 15]]`.
#[inline]
fn decode_pairs(bytes: &[u8], pairs: &mut [[f32; 2]], lut: &[f32; 16]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { avx2::decode_pairs(bytes, pairs, lut) };
    }
    decode_pairs_scalar(bytes, pairs, lut);
}

fn decode_pairs_scalar(bytes: &[u8], pairs: &mut [[f32; 2]], lut: &[f32; 16]) {
    for (p, &byte) in pairs.iter_mut().zip(bytes) {
        p[0] = lut[(byte >> 4) as usize];
        p[1] = lut[(byte & 0x0F) as usize];
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Eight bytes (16 elements) per step: the nibbles are interleaved high
    /// first, widened to 32-bit indices, and looked up in the two halves of
    /// the table with a blend on index ≥ 8; the rest goes through the scalar loop.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn decode_pairs(bytes: &[u8], pairs: &mut [[f32; 2]], lut: &[f32; 16]) {
        let n = bytes.len().min(pairs.len());
        let steps = n / 8;
        // SAFETY (whole block): step s reads bytes[8s..8s+8] and writes
        // pairs[8s..8s+8] (16 f32), both within the first n ≤ len entries;
        // the table loads read lut[0..8] and lut[8..16].
        unsafe {
            let lo_half = _mm256_loadu_ps(lut.as_ptr());
            let hi_half = _mm256_loadu_ps(lut.as_ptr().add(8));
            let low_nibble = _mm_set1_epi8(0x0F);
            let seven = _mm256_set1_epi32(7);
            let out = pairs.as_mut_ptr() as *mut f32;
            for s in 0..steps {
                let b = _mm_loadl_epi64(bytes.as_ptr().add(8 * s) as *const __m128i);
                let hi = _mm_and_si128(_mm_srli_epi16(b, 4), low_nibble);
                let lo = _mm_and_si128(b, low_nibble);
                let idx = _mm_unpacklo_epi8(hi, lo);
                for (half, shifted) in [(0, idx), (1, _mm_srli_si128(idx, 8))] {
                    let i = _mm256_cvtepu8_epi32(shifted);
                    let a = _mm256_permutevar8x32_ps(lo_half, i);
                    let c = _mm256_permutevar8x32_ps(hi_half, i);
                    let upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, seven));
                    _mm256_storeu_ps(out.add(16 * s + 8 * half), _mm256_blendv_ps(a, c, upper));
                }
            }
        }
        super::decode_pairs_scalar(&bytes[8 * steps..n], &mut pairs[8 * steps..n], lut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_element_goes_in_the_high_nibble() {
        assert_eq!(
            pack_nibbles(&[0x1, 0x2, 0xA, 0xF, 0x3]),
            vec![0x12, 0xAF, 0x30]
        );
    }

    #[test]
    fn decoding_matches_the_nibble_order_at_any_offset_and_length() {
        let indices: Vec<u8> = (0..77u32).map(|i| ((i * 7 + 3) % 16) as u8).collect();
        let packed = pack_nibbles(&indices);
        let lut: [f32; 16] = std::array::from_fn(|i| i as f32 * 0.5 - 3.0);
        for start in 0..6 {
            for len in 0..indices.len() - start {
                let mut out = vec![f32::NAN; len];
                decode_nibbles(&packed, start, &mut out, &lut);
                let want: Vec<f32> = indices[start..start + len]
                    .iter()
                    .map(|&i| lut[i as usize])
                    .collect();
                assert_eq!(out, want, "start {start}, len {len}");
            }
        }
    }

    #[test]
    fn every_byte_decodes_the_same_on_both_paths() {
        let bytes: Vec<u8> = (0..=255).chain((0..=255).rev()).collect();
        let lut: [f32; 16] = std::array::from_fn(|i| (i as f32 - 7.5) / 3.0);
        let mut fast = vec![[f32::NAN; 2]; bytes.len()];
        let mut slow = fast.clone();
        decode_pairs(&bytes, &mut fast, &lut);
        decode_pairs_scalar(&bytes, &mut slow, &lut);
        assert_eq!(fast, slow);
        assert_eq!(fast[0x3C], [lut[3], lut[12]]);
    }
}
