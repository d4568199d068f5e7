//! AWQ checkpoints in AutoAWQ's GEMM layout, written and read.
//!
//! Per quantized linear `P` (4 bits only):
//! - `P.qweight` int32 `[in, out/8]`: word `j` of input row `c` holds the
//!   codes of output columns `8j + ORDER[i]` in nibble `i` (bits `4i..4i+4`),
//!   with the interleaved order `ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`;
//! - `P.qzeros` int32 `[groups, out/8]`: zero points (not minus one), packed alike;
//! - `P.scales` fp16 `[groups, out]`.
//!
//! `config.json` carries `quantization_config` `{quant_method: "awq", bits,
//! group_size, zero_point: true, version: "gemm"}`. AWQ's folded scales live
//! in the (fp16) norm and producer weights, which are written as they are.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::gptq_checkpoint::{
    common_format, f16_tensor, f16_values, i32_tensor, i32_words, load_packed_dir,
    take_packed_parts, write_quantized_dir,
};
use super::hf_dir::CONFIG_FILE;
use super::safetensors_io::RawTensor;
use super::tokenizer::Tokenizer;
use crate::model::{LlamaConfig, LlamaWeights};
use crate::quant::packed::PackedIntMatrix;

/// Nibble `i` of a GEMM word holds column `8j + AWQ_ORDER[i]`.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// Packs `[rows, cols]` 4-bit values (cols a multiple of 8) in the GEMM order.
fn pack_gemm(values: &[u8], cols: usize) -> Vec<u32> {
    values
        .chunks(cols)
        .flat_map(|row| {
            row.chunks(8).map(|eight| {
                AWQ_ORDER
                    .iter()
                    .enumerate()
                    .fold(0u32, |w, (i, &c)| w | ((eight[c] as u32 & 0xF) << (4 * i)))
            })
        })
        .collect()
}

/// Inverse of [`pack_gemm`].
fn unpack_gemm(words: &[u32], cols: usize) -> Vec<u8> {
    let mut out = vec![0u8; words.len() * 8];
    for (j, &w) in words.iter().enumerate() {
        for (i, &c) in AWQ_ORDER.iter().enumerate() {
            out[j * 8 + c] = ((w >> (4 * i)) & 0xF) as u8;
        }
    }
    debug_assert!(out.len().is_multiple_of(cols.max(1)));
    out
}

/// The three AWQ GEMM tensors of one matrix (names relative to the layer).
pub fn awq_tensors(m: &PackedIntMatrix) -> Result<Vec<(&'static str, RawTensor)>> {
    let (o, i) = (m.out_features, m.in_features);
    if m.bits != 4 {
        bail!(
            "the AWQ GEMM format holds 4-bit codes; this matrix has {} bits",
            m.bits
        );
    }
    if m.g_idx.is_some() {
        bail!("the AWQ format has no g_idx; act-order (desc_act) matrices need the GPTQ format");
    }
    if !o.is_multiple_of(8) {
        bail!(
            "AWQ GEMM packs 8 output columns per int32; {o} output features is not a multiple of 8"
        );
    }
    if m.zeros.iter().any(|&z| z > 15) {
        bail!("zero points above 15 do not fit the AWQ format");
    }
    // Codes transposed to [in, out].
    let codes = m.codes();
    let mut t = vec![0u8; i * o];
    for r in 0..o {
        for c in 0..i {
            t[c * o + r] = codes[r * i + c];
        }
    }
    let zeros: Vec<u8> = m.zeros.iter().map(|&z| z as u8).collect();
    let groups = m.groups();
    Ok(vec![
        ("qweight", i32_tensor(vec![i, o / 8], &pack_gemm(&t, o))),
        (
            "qzeros",
            i32_tensor(vec![groups, o / 8], &pack_gemm(&zeros, o)),
        ),
        ("scales", f16_tensor(vec![groups, o], &m.scales)),
    ])
}

/// Rebuilds a matrix from its AWQ GEMM tensors.
pub fn matrix_from_awq(
    name: &str,
    tensors: &mut std::collections::HashMap<String, RawTensor>,
    out: usize,
    inp: usize,
    group_size: i64,
) -> Result<PackedIntMatrix> {
    if !out.is_multiple_of(8) {
        bail!("{name}: {out} output features is not a multiple of 8 (AWQ GEMM)");
    }
    let gs = crate::quant::rtn::resolve_group_size(group_size, inp);
    let groups = inp.div_ceil(gs).max(1);
    let (qw, qz, sc) = take_packed_parts(tensors, name)?;
    let qweight = i32_words(&format!("{name}.qweight"), &qw, &[inp, out / 8])?;
    let qzeros = i32_words(&format!("{name}.qzeros"), &qz, &[groups, out / 8])?;
    let scales = f16_values(&format!("{name}.scales"), &sc, &[groups, out])?;
    let t = unpack_gemm(&qweight, out);
    let mut codes = vec![0u8; out * inp];
    for c in 0..inp {
        for r in 0..out {
            codes[r * inp + c] = t[c * out + r];
        }
    }
    let zeros = unpack_gemm(&qzeros, out)
        .iter()
        .map(|&z| z as u16)
        .collect();
    PackedIntMatrix::from_codes(out, inp, 4, gs, &codes, scales, zeros, None, false, "awq")
        .with_context(|| format!("{name}: inconsistent AWQ tensors"))
}

/// Writes `weights` (4-bit packed integer block linears without act-order) as
/// an AWQ GEMM checkpoint directory.
pub fn write_awq_dir(
    dir: &Path,
    weights: &LlamaWeights,
    tokenizer: Option<&Tokenizer>,
) -> Result<()> {
    let (bits, group_size, _, act) = common_format(weights)?;
    if bits != 4 {
        bail!("the AWQ GEMM format holds 4-bit weights; the model is quantized to {bits} bits");
    }
    if act {
        bail!("the AWQ format has no g_idx; act-order (desc_act) models need --format gptq");
    }
    let qc = json!({
        "quant_method": "awq",
        "bits": bits,
        "group_size": group_size,
        "zero_point": true,
        "version": "gemm",
    });
    write_quantized_dir(dir, weights, tokenizer, qc, &|name, m| {
        Ok(awq_tensors(m)?
            .into_iter()
            .map(|(s, t)| (format!("{name}.{s}"), t))
            .collect())
    })
}

/// Loads an AWQ GEMM checkpoint directory (`quant_method: "awq"`).
pub fn load_awq(dir: &Path, config: LlamaConfig, qc: &serde_json::Value) -> Result<LlamaWeights> {
    let origin = dir.join(CONFIG_FILE).display().to_string();
    let bits = qc.get("bits").and_then(|b| b.as_u64()).unwrap_or(4);
    if bits != 4 {
        bail!("{origin}: AWQ with {bits} bits is not supported; only 4-bit GEMM");
    }
    let version = qc.get("version").and_then(|v| v.as_str()).unwrap_or("gemm");
    if !version.eq_ignore_ascii_case("gemm") {
        bail!("{origin}: AWQ version '{version}' is not supported; only 'gemm'");
    }
    if qc.get("zero_point").and_then(|z| z.as_bool()) == Some(false) {
        bail!("{origin}: AWQ without zero points is not supported");
    }
    let group_size = qc.get("group_size").and_then(|g| g.as_i64()).unwrap_or(128);
    load_packed_dir(dir, config, "AWQ", &|t, prefix, o, i| {
        matrix_from_awq(prefix, t, o, i, group_size)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published GEMM order: nibble i holds column ORDER[i].
    #[test]
    fn gemm_packing_interleaves_columns() {
        let cols: Vec<u8> = (0..8).collect();
        let w = pack_gemm(&cols, 8);
        assert_eq!(w, vec![0x7531_6420]);
        assert_eq!(unpack_gemm(&w, 8), cols);
    }
}
