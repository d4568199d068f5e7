//! GPTQ checkpoints in the AutoGPTQ / transformers layout, written and read.
//!
//! Per quantized linear `P` (e.g. `model.layers.0.self_attn.q_proj`):
//! - `P.qweight` int32 `[in·bits/32, out]`: each column is one output row's
//!   codes as an LSB-first bitstream along the input dimension (the 3-bit
//!   scheme lets codes straddle words);
//! - `P.qzeros` int32 `[groups, out·bits/32]`: `zero − 1` (the v1 format),
//!   packed the same way along the output dimension;
//! - `P.scales` fp16 `[groups, out]`;
//! - `P.g_idx` int32 `[in]`: each input column's group.
//!
//! Everything else (embeddings, norms, an lm_head, skipped linears) is fp16.
//! `config.json` carries `quantization_config` (`quant_method: "gptq"`) and
//! `quantize_config.json` the AutoGPTQ settings.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use half::f16;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::json;

use super::hf_dir::{CONFIG_FILE, write_dir_metadata};
use super::safetensors_io::{RawTensor, decode, read_checkpoint_raw, write_safetensors};
use super::tokenizer::Tokenizer;
use crate::model::weights::{LINEAR_NAMES, LayerWeights};
use crate::model::{LlamaConfig, LlamaWeights};
use crate::quant::packed::{PackedIntMatrix, pack_codes, unpack_codes};
use crate::quant::spec::GptqConfig;
use crate::quant::{LinearWeight, QuantizedMatrix};
use crate::tensor::{DType, HostTensor};

/// AutoGPTQ's settings file, written next to the weights.
pub const QUANTIZE_CONFIG_FILE: &str = "quantize_config.json";

/// An int32 tensor from u32 words.
pub(crate) fn i32_tensor(shape: Vec<usize>, words: &[u32]) -> RawTensor {
    RawTensor {
        dtype: Dtype::I32,
        shape,
        bytes: words.iter().flat_map(|w| w.to_le_bytes()).collect(),
    }
}

/// An fp16 tensor.
pub(crate) fn f16_tensor(shape: Vec<usize>, values: &[f16]) -> RawTensor {
    RawTensor {
        dtype: Dtype::F16,
        shape,
        bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// The words of an int32 tensor named `name`, checking its shape.
pub(crate) fn i32_words(name: &str, t: &RawTensor, shape: &[usize]) -> Result<Vec<u32>> {
    if t.dtype != Dtype::I32 {
        bail!("tensor '{name}' has dtype {:?}; expected I32", t.dtype);
    }
    if t.shape != shape {
        bail!(
            "tensor '{name}' has shape {:?}; expected {shape:?}",
            t.shape
        );
    }
    Ok(t.bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The values of an fp16 tensor named `name`, checking its shape.
pub(crate) fn f16_values(name: &str, t: &RawTensor, shape: &[usize]) -> Result<Vec<f16>> {
    if t.dtype != Dtype::F16 {
        bail!("tensor '{name}' has dtype {:?}; expected F16", t.dtype);
    }
    if t.shape != shape {
        bail!(
            "tensor '{name}' has shape {:?}; expected {shape:?}",
            t.shape
        );
    }
    Ok(t.bytes
        .chunks_exact(2)
        .map(|b| f16::from_le_bytes([b[0], b[1]]))
        .collect())
}

/// A float tensor of a checkpoint decoded to a host tensor.
pub(crate) fn raw_to_host(name: &str, t: &RawTensor) -> Result<HostTensor> {
    let view = TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
        .with_context(|| format!("tensor '{name}' has inconsistent shape and data"))?;
    decode(name, &view)
}

/// The packed matrix of a quantized linear, or an error naming the layer.
pub(crate) fn packed<'a>(name: &str, w: &'a LinearWeight) -> Result<Option<&'a PackedIntMatrix>> {
    match w {
        LinearWeight::Dense(_) => Ok(None),
        LinearWeight::Quantized(q) => q
            .as_any()
            .downcast_ref::<PackedIntMatrix>()
            .map(Some)
            .with_context(|| {
                format!(
                    "{name} is {}, not a group-wise integer format (rtn/gptq/awq)",
                    q.format_name()
                )
            }),
    }
}

/// Exports one quantized linear (by its full name) as its checkpoint tensors.
pub(crate) type LinearExporter<'a> =
    dyn Fn(&str, &PackedIntMatrix) -> Result<Vec<(String, RawTensor)>> + 'a;

/// Builds one block linear `(tensors, prefix, out, in)` from checkpoint tensors.
pub(crate) type LinearImporter<'a> = Importer<'a, LinearWeight>;

/// Builds one weight of type `T` from a checkpoint's tensors: `(tensors,
/// prefix, out features, in features)`.
pub(crate) type Importer<'a, T> =
    dyn Fn(&mut HashMap<String, RawTensor>, &str, usize, usize) -> Result<T> + 'a;

/// Writes a model whose linears are packed integer matrices (or dense) as
/// an HF directory: dense tensors in fp16, each quantized linear through
/// `linear(name, matrix)`, `config.json` with `quantization_config`, and the
/// tokenizer when given.
pub(crate) fn write_quantized_dir(
    dir: &Path,
    weights: &LlamaWeights,
    tokenizer: Option<&Tokenizer>,
    quantization_config: serde_json::Value,
    linear: &LinearExporter,
) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create directory", dir.display()))?;
    let half = |t: &HostTensor| RawTensor::from(&t.clone().cast(DType::F16));
    let vector = |v: &[f32]| {
        let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
        f16_tensor(vec![v.len()], &h)
    };
    let mut tensors = vec![(
        "model.embed_tokens.weight".to_string(),
        half(&weights.embed_tokens),
    )];
    for (l, layer) in weights.layers.iter().enumerate() {
        let p = format!("model.layers.{l}.");
        tensors.push((
            format!("{p}input_layernorm.weight"),
            vector(&layer.input_layernorm),
        ));
        tensors.push((
            format!("{p}post_attention_layernorm.weight"),
            vector(&layer.post_attention_layernorm),
        ));
        for (name, w) in layer.linears() {
            let full = format!("{p}{name}");
            match (packed(&full, w)?, w) {
                (Some(m), _) => tensors
                    .extend(linear(&full, m).with_context(|| format!("cannot export {full}"))?),
                (None, LinearWeight::Dense(t)) => tensors.push((format!("{full}.weight"), half(t))),
                (None, _) => unreachable!("packed() returns Some for quantized weights"),
            }
        }
    }
    tensors.push(("model.norm.weight".to_string(), vector(&weights.norm)));
    if let Some(head) = &weights.lm_head {
        match head {
            LinearWeight::Dense(t) => tensors.push(("lm_head.weight".to_string(), half(t))),
            LinearWeight::Quantized(q) => bail!(
                "lm_head is quantized ({}); these formats keep it in fp16: keep lm_head in skip_modules",
                q.format_name()
            ),
        }
    }
    write_safetensors(
        &dir.join("model.safetensors"),
        &tensors,
        Some([("format".to_string(), "pt".to_string())].into()),
    )?;
    let mut config = weights.config.to_hf_json();
    config["torch_dtype"] = json!("float16");
    config["quantization_config"] = quantization_config;
    write_dir_metadata(dir, &config, tokenizer)
}

/// Assembles weights from a checkpoint's tensors: `linear(prefix, out, in)`
/// builds each block linear (quantized or dense); everything else is a float tensor.
pub(crate) fn assemble_weights(
    config: LlamaConfig,
    tensors: &mut HashMap<String, RawTensor>,
    linear: &LinearImporter,
) -> Result<LlamaWeights> {
    fn take(
        tensors: &mut HashMap<String, RawTensor>,
        name: &str,
        shape: &[usize],
    ) -> Result<HostTensor> {
        let raw = tensors
            .remove(name)
            .with_context(|| format!("checkpoint has no tensor '{name}'"))?;
        let t = raw_to_host(name, &raw)?;
        if t.shape != shape {
            bail!(
                "tensor '{name}' has shape {:?}, the config implies {shape:?}",
                t.shape
            );
        }
        Ok(t)
    }
    let c = &config;
    let (h, inter, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let embed_tokens = take(tensors, "model.embed_tokens.weight", &[v, h])?;
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        let shapes = [
            (c.q_dim(), h),
            (c.kv_dim(), h),
            (c.kv_dim(), h),
            (h, c.q_dim()),
            (inter, h),
            (inter, h),
            (h, inter),
        ];
        let mut lin = Vec::with_capacity(7);
        for (name, (o, i)) in LINEAR_NAMES.iter().zip(shapes) {
            lin.push(linear(tensors, &format!("{p}{name}"), o, i)?);
        }
        let mut lin = lin.into_iter();
        let mut next = || lin.next().expect("seven linears");
        layers.push(LayerWeights {
            input_layernorm: take(tensors, &format!("{p}input_layernorm.weight"), &[h])?.data,
            q_proj: next(),
            k_proj: next(),
            v_proj: next(),
            o_proj: next(),
            post_attention_layernorm: take(
                tensors,
                &format!("{p}post_attention_layernorm.weight"),
                &[h],
            )?
            .data,
            gate_proj: next(),
            up_proj: next(),
            down_proj: next(),
        });
    }
    let norm = take(tensors, "model.norm.weight", &[h])?.data;
    let lm_head = if c.tie_word_embeddings {
        tensors.remove("lm_head.weight");
        None
    } else {
        Some(LinearWeight::Dense(take(
            tensors,
            "lm_head.weight",
            &[v, h],
        )?))
    };
    Ok(LlamaWeights {
        config,
        embed_tokens,
        layers,
        norm,
        lm_head,
    })
}

/// A dense linear `{prefix}.weight` of shape `[out, in]`.
pub(crate) fn dense_linear(
    tensors: &mut HashMap<String, RawTensor>,
    prefix: &str,
    out: usize,
    inp: usize,
) -> Result<LinearWeight> {
    let name = format!("{prefix}.weight");
    let raw = tensors
        .remove(&name)
        .with_context(|| format!("checkpoint has neither {prefix}.qweight nor {name}"))?;
    let t = raw_to_host(&name, &raw)?;
    if t.shape != [out, inp] {
        bail!(
            "tensor '{name}' has shape {:?}, the config implies [{out}, {inp}]",
            t.shape
        );
    }
    Ok(LinearWeight::Dense(t))
}

/// The four GPTQ tensors of one matrix (names relative to the layer: `qweight`, ...).
pub fn gptq_tensors(m: &PackedIntMatrix) -> Result<Vec<(&'static str, RawTensor)>> {
    let (o, i, bits) = (m.out_features, m.in_features, m.bits as usize);
    if (i * bits) % 32 != 0 || (o * bits) % 32 != 0 {
        bail!(
            "a {o}x{i} matrix at {bits} bits does not fill whole int32 words (GPTQ packs 32 values per {bits} words)"
        );
    }
    let wpr = m.words_per_row();
    let mut qweight = vec![0u32; wpr * o];
    for r in 0..o {
        for w in 0..wpr {
            qweight[w * o + r] = m.qweight[r * wpr + w];
        }
    }
    let groups = m.groups();
    let maxq = (1u32 << bits) - 1;
    let mut qzeros = Vec::with_capacity(groups * o * bits / 32);
    for g in 0..groups {
        let z = &m.zeros[g * o..(g + 1) * o];
        if z.contains(&0) {
            bail!("zero point 0 cannot be stored in the GPTQ v1 format (it stores zero - 1)");
        }
        let codes: Vec<u8> = z.iter().map(|&z| ((z as u32 - 1) & maxq) as u8).collect();
        qzeros.extend(pack_codes(&codes, m.bits));
    }
    let g_idx: Vec<u32> = (0..i).map(|c| m.group_of(c) as u32).collect();
    Ok(vec![
        ("qweight", i32_tensor(vec![i * bits / 32, o], &qweight)),
        ("qzeros", i32_tensor(vec![groups, o * bits / 32], &qzeros)),
        ("scales", f16_tensor(vec![groups, o], &m.scales)),
        ("g_idx", i32_tensor(vec![i], &g_idx)),
    ])
}

/// Removes a packed layer's `{name}.qweight`, `.qzeros` and `.scales` from
/// `tensors` (GPTQ and AWQ name them alike), naming the first one missing.
pub fn take_packed_parts(
    tensors: &mut HashMap<String, RawTensor>,
    name: &str,
) -> Result<(RawTensor, RawTensor, RawTensor)> {
    let mut take = |part: &str| {
        tensors
            .remove(&format!("{name}.{part}"))
            .with_context(|| format!("checkpoint has no tensor '{name}.{part}'"))
    };
    Ok((take("qweight")?, take("qzeros")?, take("scales")?))
}

/// Rebuilds a matrix from its GPTQ tensors (`zero = stored + 1`); `group_size`
/// as in `quantize_config` (-1 = whole rows). A `g_idx` equal to `c / group_size`
/// is dropped.
#[allow(clippy::too_many_arguments)]
pub fn matrix_from_gptq(
    name: &str,
    tensors: &mut HashMap<String, RawTensor>,
    out: usize,
    inp: usize,
    bits: u32,
    group_size: i64,
    sym: bool,
) -> Result<PackedIntMatrix> {
    let b = bits as usize;
    let gs = crate::quant::rtn::resolve_group_size(group_size, inp);
    let groups = inp.div_ceil(gs).max(1);
    let (qw, qz, sc) = take_packed_parts(tensors, name)?;
    let g_idx_raw = tensors.remove(&format!("{name}.g_idx"));
    let qweight = i32_words(&format!("{name}.qweight"), &qw, &[inp * b / 32, out])?;
    let qzeros = i32_words(&format!("{name}.qzeros"), &qz, &[groups, out * b / 32])?;
    let scales = f16_values(&format!("{name}.scales"), &sc, &[groups, out])?;
    let wpr = (inp * b).div_ceil(32);
    let mut words = vec![0u32; out * wpr];
    for r in 0..out {
        for w in 0..wpr {
            words[r * wpr + w] = qweight[w * out + r];
        }
    }
    let mut zeros = Vec::with_capacity(groups * out);
    for row in qzeros.chunks(out * b / 32) {
        zeros.extend(unpack_codes(row, bits, out).iter().map(|&z| z as u16 + 1));
    }
    let g_idx = match g_idx_raw {
        Some(t) => {
            let g = i32_words(&format!("{name}.g_idx"), &t, &[inp])?;
            let trivial = g.iter().enumerate().all(|(c, &x)| x as usize == c / gs);
            (!trivial).then_some(g)
        }
        None => None,
    };
    let m = PackedIntMatrix {
        out_features: out,
        in_features: inp,
        bits,
        group_size: gs,
        qweight: words,
        scales,
        zeros,
        g_idx,
        sym,
        method: "gptq".to_string(),
    };
    m.validate()
        .with_context(|| format!("{name}: inconsistent GPTQ tensors"))?;
    Ok(m)
}

/// Checks that every quantized block linear shares bits, group size and symmetry.
pub(crate) fn common_format(weights: &LlamaWeights) -> Result<(u32, i64, bool, bool)> {
    let mut found: Option<(u32, i64, bool)> = None;
    let mut act = false;
    for (l, layer) in weights.layers.iter().enumerate() {
        for (name, w) in layer.linears() {
            let full = format!("model.layers.{l}.{name}");
            let Some(m) = packed(&full, w)? else { continue };
            let group = if m.groups() == 1 {
                -1
            } else {
                m.group_size as i64
            };
            let this = (m.bits, group, m.sym);
            match found {
                None => found = Some(this),
                Some(f) if f != this => bail!(
                    "{full} is {}, other layers differ; one checkpoint holds one format",
                    m.format_name()
                ),
                _ => {}
            }
            act |= m.g_idx.is_some();
        }
    }
    let (bits, group, sym) =
        found.context("no quantized linear layers to export; quantize the model first")?;
    Ok((bits, group, sym, act))
}

/// Writes `weights` (block linears quantized with RTN/GPTQ/AWQ's packed
/// integer format) as a GPTQ checkpoint directory. `spec` supplies the
/// settings that the matrices do not record (damp_percent, true_sequential,
/// static_groups); without it they are written as 0.01, false, false.
pub fn write_gptq_dir(
    dir: &Path,
    weights: &LlamaWeights,
    tokenizer: Option<&Tokenizer>,
    spec: Option<&GptqConfig>,
) -> Result<()> {
    let (bits, group_size, sym, act) = common_format(weights)?;
    let qc = json!({
        "bits": bits,
        "group_size": group_size,
        "desc_act": spec.map_or(act, |s| s.desc_act),
        "sym": sym,
        "damp_percent": spec.map_or(0.01, |s| s.damp_percent),
        "static_groups": spec.is_some_and(|s| s.static_groups),
        "true_sequential": spec.is_some_and(|s| s.true_sequential),
        "checkpoint_format": "gptq",
        "quant_method": "gptq",
    });
    write_quantized_dir(dir, weights, tokenizer, qc.clone(), &|name, m| {
        Ok(gptq_tensors(m)?
            .into_iter()
            .map(|(s, t)| (format!("{name}.{s}"), t))
            .collect())
    })?;
    let path = dir.join(QUANTIZE_CONFIG_FILE);
    let mut file_qc = qc;
    file_qc
        .as_object_mut()
        .expect("object")
        .remove("quant_method");
    std::fs::write(&path, serde_json::to_string_pretty(&file_qc)?)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

/// Loads a GPTQ checkpoint directory (`quantization_config` of config.json
/// with `quant_method: "gptq"`); linears without `qweight` are read dense.
pub fn load_gptq(dir: &Path, config: LlamaConfig, qc: &serde_json::Value) -> Result<LlamaWeights> {
    let origin = dir.join(CONFIG_FILE).display().to_string();
    let bits = qc
        .get("bits")
        .and_then(|b| b.as_u64())
        .with_context(|| format!("{origin}: quantization_config has no integer 'bits'"))?
        as u32;
    crate::quant::packed::check_bits(bits).with_context(|| origin.clone())?;
    let group_size = qc.get("group_size").and_then(|g| g.as_i64()).unwrap_or(128);
    let sym = qc.get("sym").and_then(|s| s.as_bool()).unwrap_or(true);
    if let Some(f) = qc.get("checkpoint_format").and_then(|f| f.as_str())
        && f != "gptq"
    {
        bail!("{origin}: GPTQ checkpoint_format '{f}' is not supported; only 'gptq' (v1)");
    }
    load_packed_dir(dir, config, "GPTQ", &|t, prefix, o, i| {
        matrix_from_gptq(prefix, t, o, i, bits, group_size, sym)
    })
}

/// Reads a packed-integer checkpoint directory (GPTQ or AWQ, named `what`
/// in errors): linears with `{prefix}.qweight` through `matrix`, the others
/// dense.
pub(crate) fn load_packed_dir(
    dir: &Path,
    config: LlamaConfig,
    what: &str,
    matrix: &Importer<PackedIntMatrix>,
) -> Result<LlamaWeights> {
    let mut tensors = read_checkpoint_raw(dir)?;
    assemble_weights(config, &mut tensors, &|t, prefix, o, i| {
        if t.contains_key(&format!("{prefix}.qweight")) {
            Ok(LinearWeight::Quantized(Arc::new(matrix(t, prefix, o, i)?)))
        } else {
            dense_linear(t, prefix, o, i)
        }
    })
    .with_context(|| format!("{}: not a loadable {what} checkpoint", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::awq_checkpoint::{awq_tensors, write_awq_dir};
    use crate::io::hf_dir::load_hf_dir;
    use crate::io::safetensors_io::read_safetensors_raw;
    use crate::io::synth_tokenizer;
    use crate::model::synth::{synth_config, synth_weights};
    use crate::quant::{QuantContext, QuantSpec, quantize_model};

    fn tiny_quantized(spec: &str) -> (LlamaWeights, Tokenizer) {
        let (c, d) = synth_config("tiny").unwrap();
        let mut w = synth_weights(&c, d, 2).unwrap();
        let tok = synth_tokenizer(&c).unwrap();
        let spec = QuantSpec::parse(&format!("{spec},calib_samples=2,calib_seq_len=64")).unwrap();
        quantize_model(&mut w, &spec, &QuantContext { tokenizer: &tok }).unwrap();
        (w, tok)
    }

    fn matrices(w: &LlamaWeights) -> Vec<PackedIntMatrix> {
        w.layers
            .iter()
            .flat_map(|l| {
                l.linears()
                    .map(|(n, w)| packed(n, w).unwrap().unwrap().clone())
            })
            .collect()
    }

    #[test]
    fn gptq_export_has_published_shapes_and_reloads_identically() {
        let (w, tok) = tiny_quantized("gptq,bits=4,group_size=32,desc_act=true");
        let dir = tempfile::tempdir().unwrap();
        let spec = GptqConfig {
            desc_act: true,
            ..match QuantSpec::parse("gptq,desc_act=true").unwrap() {
                QuantSpec::Gptq(c) => c,
                _ => unreachable!(),
            }
        };
        write_gptq_dir(dir.path(), &w, Some(&tok), Some(&spec)).unwrap();
        let raw = read_safetensors_raw(&dir.path().join("model.safetensors")).unwrap();
        let p = "model.layers.0.mlp.down_proj";
        // down_proj: in 176, out 64, groups ceil(176/32) = 6.
        let t = &raw[&format!("{p}.qweight")];
        assert_eq!(
            (t.dtype, t.shape.clone()),
            (Dtype::I32, vec![176 * 4 / 32, 64])
        );
        let t = &raw[&format!("{p}.qzeros")];
        assert_eq!(
            (t.dtype, t.shape.clone()),
            (Dtype::I32, vec![6, 64 * 4 / 32])
        );
        let t = &raw[&format!("{p}.scales")];
        assert_eq!((t.dtype, t.shape.clone()), (Dtype::F16, vec![6, 64]));
        let t = &raw[&format!("{p}.g_idx")];
        assert_eq!((t.dtype, t.shape.clone()), (Dtype::I32, vec![176]));
        assert_eq!(raw["model.norm.weight"].dtype, Dtype::F16);
        let qc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(QUANTIZE_CONFIG_FILE)).unwrap(),
        )
        .unwrap();
        assert_eq!(qc["bits"], 4);
        assert_eq!(qc["group_size"], 32);
        assert_eq!(qc["desc_act"], true);
        assert_eq!(qc["checkpoint_format"], "gptq");
        let loaded = load_hf_dir(dir.path()).unwrap();
        assert_eq!(matrices(&loaded.weights), matrices(&w));
        assert!(matrices(&w).iter().any(|m| m.g_idx.is_some()));
    }

    #[test]
    fn awq_export_has_published_shapes_and_reloads_identically() {
        let (w, tok) = tiny_quantized("awq,bits=4,group_size=32");
        let dir = tempfile::tempdir().unwrap();
        write_awq_dir(dir.path(), &w, Some(&tok)).unwrap();
        let raw = read_safetensors_raw(&dir.path().join("model.safetensors")).unwrap();
        let p = "model.layers.1.mlp.gate_proj";
        // gate_proj: in 64, out 176.
        let t = &raw[&format!("{p}.qweight")];
        assert_eq!((t.dtype, t.shape.clone()), (Dtype::I32, vec![64, 176 / 8]));
        let t = &raw[&format!("{p}.qzeros")];
        assert_eq!((t.dtype, t.shape.clone()), (Dtype::I32, vec![2, 176 / 8]));
        let t = &raw[&format!("{p}.scales")];
        assert_eq!((t.dtype, t.shape.clone()), (Dtype::F16, vec![2, 176]));
        assert!(!raw.contains_key(&format!("{p}.g_idx")));
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap())
                .unwrap();
        let qc = &cfg["quantization_config"];
        assert_eq!(
            (
                qc["quant_method"].as_str(),
                qc["version"].as_str(),
                qc["zero_point"].as_bool()
            ),
            (Some("awq"), Some("gemm"), Some(true))
        );
        let loaded = load_hf_dir(dir.path()).unwrap();
        assert_eq!(matrices(&loaded.weights), matrices(&w));
        // The folded AWQ scales live in the norms, stored as fp16.
        let n0 = &w.layers[0].input_layernorm;
        let r0 = &loaded.weights.layers[0].input_layernorm;
        for (a, b) in n0.iter().zip(r0) {
            assert_eq!(f16::from_f32(*a).to_f32(), *b);
        }
    }

    #[test]
    fn gptq_tensors_round_trip_every_bit_width() {
        for bits in [2u32, 3, 4, 8] {
            let (o, i, gs) = (32usize, 64usize, 32usize);
            let codes: Vec<u8> = (0..o * i)
                .map(|k| ((k * 7 + k / 5) % (1 << bits)) as u8)
                .collect();
            let groups = i / gs;
            let scales = (0..groups * o)
                .map(|k| f16::from_f32(0.01 * (k + 1) as f32))
                .collect();
            let zeros = (0..groups * o)
                .map(|k| 1 + (k % ((1 << bits) - 1)) as u16)
                .collect();
            let g_idx: Vec<u32> = (0..i).map(|c| ((c * 5) % groups) as u32).collect();
            let m = PackedIntMatrix::from_codes(
                o,
                i,
                bits,
                gs,
                &codes,
                scales,
                zeros,
                Some(g_idx),
                false,
                "gptq",
            )
            .unwrap();
            let mut t: HashMap<String, RawTensor> = gptq_tensors(&m)
                .unwrap()
                .into_iter()
                .map(|(s, r)| (format!("x.{s}"), r))
                .collect();
            assert_eq!(t["x.qweight"].shape, vec![i * bits as usize / 32, o]);
            let back = matrix_from_gptq("x", &mut t, o, i, bits, gs as i64, false).unwrap();
            assert_eq!(back, m, "bits {bits}");
        }
    }

    #[test]
    fn exports_refuse_what_the_formats_cannot_hold() {
        let m = PackedIntMatrix::from_codes(
            32,
            32,
            3,
            32,
            &[0; 1024],
            vec![f16::ONE; 32],
            vec![0; 32],
            None,
            false,
            "rtn",
        )
        .unwrap();
        let e = format!("{:#}", gptq_tensors(&m).unwrap_err());
        assert!(e.contains("zero point 0"), "{e}");
        let e = format!("{:#}", awq_tensors(&m).unwrap_err());
        assert!(e.contains("4-bit"), "{e}");
        let m = PackedIntMatrix::from_codes(
            8,
            24,
            3,
            24,
            &[0; 192],
            vec![f16::ONE; 8],
            vec![1; 8],
            None,
            false,
            "rtn",
        )
        .unwrap();
        let e = format!("{:#}", gptq_tensors(&m).unwrap_err());
        assert!(e.contains("whole int32 words"), "{e}");
        let (c, d) = synth_config("tiny").unwrap();
        let dense = synth_weights(&c, d, 2).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = format!(
            "{:#}",
            write_gptq_dir(dir.path(), &dense, None, None).unwrap_err()
        );
        assert!(e.contains("no quantized linear layers"), "{e}");
    }
}
