//! bitsandbytes-serialized checkpoints (the layout transformers writes with
//! `save_pretrained` for a model loaded with a `BitsAndBytesConfig`).
//!
//! A 4-bit linear `X` is stored as `X.weight` (uint8 `[ceil(n/2), 1]`, two
//! codes per byte, first element in the high nibble), `X.weight.absmax`,
//! `X.weight.quant_map` and, with double quantization,
//! `X.weight.nested_absmax` and `X.weight.nested_quant_map`, plus
//! `X.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): a uint8 tensor
//! holding the JSON of the non-tensor fields of bitsandbytes'
//! `QuantState.as_dict(packed=True)`. An LLM.int8() linear is `X.weight`
//! (int8 `[out, in]`), `X.SCB` (float32 `[out]`) and `X.weight_format`
//! (uint8 scalar 0 = row-major). `config.json` carries a transformers-style
//! `quantization_config`. See docs/bnb-format.md.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::{Value, json};

use super::hf_dir::{CONFIG_FILE, write_dir_metadata};
use super::safetensors_io::{RawTensor, checkpoint_files, decode, read_safetensors_raw};
use super::tokenizer::Tokenizer;
use crate::model::LlamaConfig;
use crate::model::LlamaWeights;
use crate::model::weights::LINEAR_NAMES;
use crate::quant::bnb4::{Absmax, Bnb4Matrix, Bnb4Type, NestedAbsmax};
use crate::quant::int8::Int8Matrix;
use crate::quant::{LinearWeight, QuantSpec};
use crate::tensor::{DType, HostTensor};

/// Prefix of the tensor holding a 4-bit layer's JSON quant state.
pub const QUANT_STATE_PREFIX: &str = "quant_state.bitsandbytes__";

/// The torch dtype name bitsandbytes and transformers write (`float16`, ...).
pub fn torch_dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
    }
}

/// Parses a torch dtype name (`float32`, `torch.float16`, `bfloat16`, ...).
fn parse_torch_dtype(s: &str) -> Result<DType> {
    DType::parse(s.strip_prefix("torch.").unwrap_or(s))
}

/// The transformers `quantization_config` (as `BitsAndBytesConfig.to_dict()`
/// writes it) for a bitsandbytes spec; other methods are an error.
pub fn quantization_config(spec: &QuantSpec) -> Result<Value> {
    let (four, quant_type, double_quant, compute, threshold, skip) = match spec {
        QuantSpec::Nf4(c) | QuantSpec::Fp4(c) => (
            true,
            spec.method(),
            c.double_quant,
            c.compute_dtype,
            6.0,
            &c.skip_modules,
        ),
        QuantSpec::Int8(c) => (
            false,
            "fp4",
            false,
            DType::F32,
            c.threshold,
            &c.skip_modules,
        ),
        other => bail!(
            "method '{}' is not a bitsandbytes format; use nf4, fp4 or int8",
            other.method()
        ),
    };
    Ok(json!({
        "quant_method": "bitsandbytes",
        "_load_in_4bit": four,
        "_load_in_8bit": !four,
        "load_in_4bit": four,
        "load_in_8bit": !four,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": torch_dtype_name(compute),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_threshold": threshold,
        "llm_int8_skip_modules": skip,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
    }))
}

fn raw(dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> RawTensor {
    RawTensor {
        dtype,
        shape,
        bytes,
    }
}

fn f32_tensor(v: &[f32]) -> RawTensor {
    raw(
        Dtype::F32,
        vec![v.len()],
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

/// The JSON quant state of a 4-bit weight, formatted as Python's
/// `json.dumps` formats bitsandbytes' dict (same keys, order and separators).
pub fn quant_state_json(m: &Bnb4Matrix) -> String {
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}, {}]",
        m.quant_type.name(),
        m.blocksize,
        torch_dtype_name(m.dtype),
        m.out_features,
        m.in_features
    );
    if let Absmax::Nested(n) = &m.absmax {
        s.push_str(&format!(
            ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            n.blocksize,
            json!(n.offset as f64)
        ));
    }
    s.push('}');
    s
}

/// The tensors bitsandbytes stores for a 4-bit weight named `name` (`X.weight`).
pub fn bnb4_tensors(name: &str, m: &Bnb4Matrix) -> Vec<(String, RawTensor)> {
    let mut out = vec![(
        name.to_string(),
        raw(Dtype::U8, vec![m.packed.len(), 1], m.packed.clone()),
    )];
    match &m.absmax {
        Absmax::Plain(a) => out.push((format!("{name}.absmax"), f32_tensor(a))),
        Absmax::Nested(n) => {
            out.push((
                format!("{name}.absmax"),
                raw(Dtype::U8, vec![n.codes.len()], n.codes.clone()),
            ));
            out.push((format!("{name}.nested_absmax"), f32_tensor(&n.absmax)));
            out.push((format!("{name}.nested_quant_map"), f32_tensor(&n.code)));
        }
    }
    out.push((format!("{name}.quant_map"), f32_tensor(&m.code)));
    let js = quant_state_json(m).into_bytes();
    out.push((
        format!("{name}.{QUANT_STATE_PREFIX}{}", m.quant_type.name()),
        raw(Dtype::U8, vec![js.len()], js),
    ));
    out
}

/// The tensors bitsandbytes stores for an LLM.int8() weight named `name` (`X.weight`).
pub fn int8_tensors(name: &str, m: &Int8Matrix) -> Vec<(String, RawTensor)> {
    let module = name.strip_suffix(".weight").unwrap_or(name);
    vec![
        (
            name.to_string(),
            raw(
                Dtype::I8,
                vec![m.out_features, m.in_features],
                m.cb.iter().map(|&v| v as u8).collect(),
            ),
        ),
        (format!("{module}.SCB"), f32_tensor(&m.scb)),
        (
            format!("{module}.weight_format"),
            raw(Dtype::U8, vec![], vec![0]),
        ),
    ]
}

/// Every tensor of a model quantized with bitsandbytes formats, under the
/// names bitsandbytes gives them; dense tensors keep their dtype.
pub fn checkpoint_tensors(weights: &LlamaWeights) -> Result<Vec<(String, RawTensor)>> {
    let dtype = weights.embed_tokens.dtype;
    let vector = |v: &[f32]| {
        RawTensor::from(&HostTensor {
            shape: vec![v.len()],
            dtype,
            data: v.to_vec(),
        })
    };
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        RawTensor::from(&weights.embed_tokens),
    )];
    let mut linear = |name: String, w: &LinearWeight| -> Result<()> {
        match w {
            LinearWeight::Dense(t) => out.push((name, RawTensor::from(t))),
            LinearWeight::Quantized(q) => {
                if let Some(m) = q.as_any().downcast_ref::<Bnb4Matrix>() {
                    out.extend(bnb4_tensors(&name, m));
                } else if let Some(m) = q.as_any().downcast_ref::<Int8Matrix>() {
                    out.extend(int8_tensors(&name, m));
                } else {
                    bail!(
                        "{name} is quantized as {}, which has no bitsandbytes serialization; quantize with nf4, fp4 or int8",
                        q.format_name()
                    );
                }
            }
        }
        Ok(())
    };
    let mut norms = Vec::new();
    for (l, layer) in weights.layers.iter().enumerate() {
        let p = format!("model.layers.{l}.");
        norms.push((
            format!("{p}input_layernorm.weight"),
            vector(&layer.input_layernorm),
        ));
        norms.push((
            format!("{p}post_attention_layernorm.weight"),
            vector(&layer.post_attention_layernorm),
        ));
        for (name, w) in layer.linears() {
            linear(format!("{p}{name}.weight"), w)?;
        }
    }
    if let Some(h) = &weights.lm_head {
        linear("lm_head.weight".to_string(), h)?;
    }
    out.extend(norms);
    out.push(("model.norm.weight".to_string(), vector(&weights.norm)));
    Ok(out)
}

/// Writes a bitsandbytes checkpoint directory: config.json with the
/// `quantization_config` of `spec`, model.safetensors, tokenizer.json.
pub fn write_bnb_dir(
    dir: &Path,
    weights: &LlamaWeights,
    tokenizer: Option<&Tokenizer>,
    spec: &QuantSpec,
) -> Result<()> {
    let mut config = weights.config.to_hf_json();
    config["torch_dtype"] = json!(torch_dtype_name(weights.embed_tokens.dtype));
    config["quantization_config"] = quantization_config(spec)?;
    let tensors = checkpoint_tensors(weights)?;
    write_dir_metadata(dir, &config, tokenizer)?;
    super::safetensors_io::write_safetensors(
        &dir.join("model.safetensors"),
        &tensors,
        Some([("format".to_string(), "pt".to_string())].into()),
    )
}

/// Settings read from a `quantization_config` that the tensors do not carry.
#[derive(Clone, Debug, PartialEq)]
pub struct BnbLoadConfig {
    /// `bnb_4bit_compute_dtype`.
    pub compute_dtype: DType,
    /// `llm_int8_threshold`.
    pub threshold: f32,
    /// The model's `torch_dtype`: the compute dtype of int8 layers.
    pub model_dtype: DType,
}

impl BnbLoadConfig {
    /// Reads the fields from config.json's document (`origin` names the file in errors).
    pub fn from_config(config: &Value, origin: &str) -> Result<Self> {
        let q = &config["quantization_config"];
        let dtype_field = |v: &Value, field: &str, default: DType| -> Result<DType> {
            match v.get(field) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::String(s)) => parse_torch_dtype(s).with_context(|| {
                    format!("{origin}: {field} '{s}' is not float32, float16 or bfloat16")
                }),
                Some(other) => {
                    bail!("{origin}: {field} is {other}; expected a dtype name such as \"float16\"")
                }
            }
        };
        let threshold = match q.get("llm_int8_threshold") {
            None | Some(Value::Null) => 6.0,
            Some(v) => v.as_f64().filter(|t| *t >= 0.0).with_context(|| {
                format!(
                    "{origin}: quantization_config.llm_int8_threshold is {v}; expected a number ≥ 0"
                )
            })? as f32,
        };
        Ok(BnbLoadConfig {
            compute_dtype: dtype_field(q, "bnb_4bit_compute_dtype", DType::F32)?,
            threshold,
            model_dtype: dtype_field(config, "torch_dtype", DType::F32)?,
        })
    }
}

/// Tensors of a checkpoint with the file each came from.
struct Tensors {
    map: HashMap<String, (PathBuf, RawTensor)>,
}

impl Tensors {
    fn read(dir: &Path) -> Result<Self> {
        let mut map = HashMap::new();
        for (path, _) in checkpoint_files(dir)? {
            for (name, t) in read_safetensors_raw(&path)? {
                map.insert(name, (path.clone(), t));
            }
        }
        Ok(Tensors { map })
    }

    fn take(&mut self, name: &str, owner: &str, file: &Path) -> Result<RawTensor> {
        self.map.remove(name).map(|(_, t)| t).with_context(|| {
            format!(
                "{}: tensor '{name}' is missing (needed by the quant state of '{owner}'); re-export the checkpoint",
                file.display()
            )
        })
    }
}

fn expect_dtype(t: &RawTensor, want: Dtype, name: &str, file: &Path) -> Result<()> {
    ensure!(
        t.dtype == want,
        "{}: tensor '{name}' has dtype {:?}, bitsandbytes stores it as {want:?}; re-export the checkpoint",
        file.display(),
        t.dtype
    );
    Ok(())
}

fn f32_values(t: &RawTensor, name: &str, file: &Path) -> Result<Vec<f32>> {
    expect_dtype(t, Dtype::F32, name, file)?;
    Ok(t.bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The fields of a 4-bit quant state JSON.
#[derive(serde::Deserialize)]
struct QuantStateJson {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    nested_blocksize: Option<usize>,
    nested_offset: Option<f64>,
    nested_dtype: Option<String>,
}

/// Rebuilds the 4-bit weight `name` (`X.weight`) whose state tensor is `state_name`.
fn read_bnb4(
    tensors: &mut Tensors,
    name: &str,
    state_name: &str,
    compute_dtype: DType,
) -> Result<Bnb4Matrix> {
    let (file, state) = tensors.map.remove(state_name).expect("caller checked");
    let err = |what: String| {
        anyhow::anyhow!(
            "{}: tensor '{state_name}': {what}; re-export the checkpoint",
            file.display()
        )
    };
    expect_dtype(&state, Dtype::U8, state_name, &file)?;
    let js: QuantStateJson = serde_json::from_slice(&state.bytes)
        .map_err(|e| err(format!("quant state is not valid JSON ({e})")))?;
    let ty = Bnb4Type::parse(&js.quant_type).map_err(|e| err(e.to_string()))?;
    ensure!(
        state_name.ends_with(&format!("__{}", ty.name())),
        err(format!(
            "quant_type '{}' differs from the tensor name",
            js.quant_type
        ))
    );
    let dtype = parse_torch_dtype(&js.dtype).map_err(|e| err(format!("dtype: {e}")))?;
    let &[out_features, in_features] = js.shape.as_slice() else {
        return Err(err(format!(
            "shape {:?} is not [out_features, in_features]",
            js.shape
        )));
    };
    let packed = tensors.take(name, state_name, &file)?;
    expect_dtype(&packed, Dtype::U8, name, &file)?;
    let n = out_features * in_features;
    ensure!(
        packed.bytes.len() == n.div_ceil(2),
        err(format!(
            "'{name}' holds {} bytes, shape {:?} needs {}",
            packed.bytes.len(),
            js.shape,
            n.div_ceil(2)
        ))
    );
    let absmax_name = format!("{name}.absmax");
    let absmax_t = tensors.take(&absmax_name, state_name, &file)?;
    let qmap_name = format!("{name}.quant_map");
    let code = f32_values(
        &tensors.take(&qmap_name, state_name, &file)?,
        &qmap_name,
        &file,
    )?;
    let code: [f32; 16] = code.try_into().map_err(|c: Vec<f32>| {
        err(format!(
            "'{qmap_name}' has {} entries, expected 16",
            c.len()
        ))
    })?;
    let absmax = match js.nested_blocksize {
        None => Absmax::Plain(f32_values(&absmax_t, &absmax_name, &file)?),
        Some(blocksize) => {
            expect_dtype(&absmax_t, Dtype::U8, &absmax_name, &file)?;
            let offset = js
                .nested_offset
                .ok_or_else(|| err("nested_blocksize without nested_offset".into()))?;
            if let Some(d) = &js.nested_dtype {
                ensure!(
                    parse_torch_dtype(d).ok() == Some(DType::F32),
                    err(format!("nested_dtype '{d}' is not float32"))
                );
            }
            let na = format!("{name}.nested_absmax");
            let nm = format!("{name}.nested_quant_map");
            NestedAbsmax {
                codes: absmax_t.bytes,
                absmax: f32_values(&tensors.take(&na, state_name, &file)?, &na, &file)?,
                code: f32_values(&tensors.take(&nm, state_name, &file)?, &nm, &file)?,
                offset: offset as f32,
                blocksize,
            }
            .into()
        }
    };
    let m = Bnb4Matrix {
        quant_type: ty,
        out_features,
        in_features,
        packed: packed.bytes,
        blocksize: js.blocksize,
        absmax,
        code,
        dtype,
        compute_dtype,
    };
    m.validate().map_err(|e| err(e.to_string()))?;
    Ok(m)
}

impl From<NestedAbsmax> for Absmax {
    fn from(n: NestedAbsmax) -> Self {
        Absmax::Nested(n)
    }
}

/// Rebuilds the LLM.int8() weight `name` (`X.weight`) from its tensors.
fn read_int8(
    tensors: &mut Tensors,
    name: &str,
    scb_name: &str,
    cfg: &BnbLoadConfig,
) -> Result<Int8Matrix> {
    let (file, scb_t) = tensors.map.remove(scb_name).expect("caller checked");
    let w = tensors.take(name, scb_name, &file)?;
    expect_dtype(&w, Dtype::I8, name, &file)?;
    let &[out_features, in_features] = w.shape.as_slice() else {
        bail!(
            "{}: tensor '{name}' has shape {:?}; an int8 weight is [out_features, in_features]",
            file.display(),
            w.shape
        );
    };
    let module = name.strip_suffix(".weight").unwrap_or(name);
    if let Some((_, f)) = tensors.map.remove(&format!("{module}.weight_format")) {
        ensure!(
            f.bytes.iter().all(|&b| b == 0),
            "{}: tensor '{module}.weight_format' is not 0 (row-major); only row-major int8 weights are supported",
            file.display()
        );
    }
    let m = Int8Matrix {
        out_features,
        in_features,
        cb: w.bytes.iter().map(|&b| b as i8).collect(),
        scb: f32_values(&scb_t, scb_name, &file)?,
        threshold: cfg.threshold,
        compute_dtype: cfg.model_dtype,
    };
    m.validate()
        .map_err(|e| anyhow::anyhow!("{}: tensor '{scb_name}': {e}", file.display()))?;
    Ok(m)
}

/// Loads the weights of a bitsandbytes checkpoint directory (the
/// `bitsandbytes` arm of [`super::hf_dir::load_quantized_dir`]).
pub fn read_bnb_weights(
    dir: &Path,
    config: LlamaConfig,
    raw_config: &Value,
) -> Result<LlamaWeights> {
    let origin = dir.join(CONFIG_FILE).display().to_string();
    let cfg = BnbLoadConfig::from_config(raw_config, &origin)?;
    let mut tensors = Tensors::read(dir)?;
    let mut names: Vec<String> = (0..config.num_hidden_layers)
        .flat_map(|l| LINEAR_NAMES.map(|n| format!("model.layers.{l}.{n}.weight")))
        .collect();
    names.push("lm_head.weight".to_string());
    let mut prebuilt: HashMap<String, LinearWeight> = HashMap::new();
    for name in names {
        let state = ["nf4", "fp4"]
            .map(|t| format!("{name}.{QUANT_STATE_PREFIX}{t}"))
            .into_iter()
            .find(|s| tensors.map.contains_key(s));
        let module = name.strip_suffix(".weight").unwrap_or(&name);
        let scb = format!("{module}.SCB");
        let w: Arc<dyn crate::quant::QuantizedMatrix> = if let Some(state) = state {
            Arc::new(read_bnb4(&mut tensors, &name, &state, cfg.compute_dtype)?)
        } else if tensors.map.contains_key(&scb) {
            Arc::new(read_int8(&mut tensors, &name, &scb, &cfg)?)
        } else {
            if let Some((file, t)) = tensors.map.get(&name)
                && !matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
            {
                bail!(
                    "{}: tensor '{name}' has dtype {:?} but no '{name}.{QUANT_STATE_PREFIX}nf4|fp4' or '{scb}' next to it; the quant state is missing, re-export the checkpoint",
                    file.display(),
                    t.dtype
                );
            }
            continue;
        };
        prebuilt.insert(name, LinearWeight::Quantized(w));
    }
    let dense = tensors
        .map
        .into_iter()
        .map(|(name, (file, t))| {
            let view = TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                .with_context(|| format!("{}: tensor '{name}' is corrupt", file.display()))?;
            let host = decode(&name, &view).with_context(|| {
                format!(
                    "{}: tensor '{name}' is neither a dense weight nor part of a bitsandbytes quant state",
                    file.display()
                )
            })?;
            Ok((name, host))
        })
        .collect::<Result<HashMap<_, _>>>()?;
    LlamaWeights::from_parts(config, dense, prebuilt).with_context(|| {
        format!(
            "{}: weights do not match config.json; re-export the checkpoint",
            dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::io::hf_dir::load_hf_dir;
    use crate::io::safetensors_io::write_safetensors;
    use crate::io::{load_model, synth_tokenizer};
    use crate::model::Model;
    use crate::quant::{QuantContext, quantize_model};

    fn quantized(spec: &str) -> (LlamaWeights, Tokenizer, QuantSpec) {
        let loaded = load_model("synth:tiny").unwrap();
        let mut w = loaded.weights;
        let spec = QuantSpec::parse(spec).unwrap();
        let tok = synth_tokenizer(&w.config).unwrap();
        quantize_model(&mut w, &spec, &QuantContext { tokenizer: &tok }).unwrap();
        (w, tok, spec)
    }

    fn logits(w: &LlamaWeights) -> Vec<f32> {
        let m = Model::new(CpuBackend::new(), w).unwrap();
        m.sequence_logits(&[1, 5, 9, 3, 7, 2]).unwrap()
    }

    #[test]
    fn round_trip_is_bit_exact() {
        for spec in [
            "nf4",
            "fp4,double_quant=false,compute_dtype=bf16",
            "int8",
            "int8,threshold=0.0",
        ] {
            let (w, tok, spec) = quantized(spec);
            let dir = tempfile::tempdir().unwrap();
            write_bnb_dir(dir.path(), &w, Some(&tok), &spec).unwrap();
            let back = load_hf_dir(dir.path()).unwrap().weights;
            let mut compared = 0;
            for (la, lb) in w.layers.iter().zip(&back.layers) {
                assert_eq!(la.input_layernorm, lb.input_layernorm);
                for ((name, a), (_, b)) in la.linears().into_iter().zip(lb.linears()) {
                    let (LinearWeight::Quantized(a), LinearWeight::Quantized(b)) = (a, b) else {
                        panic!("{name} not quantized on both sides")
                    };
                    if let Some(a) = a.as_any().downcast_ref::<Bnb4Matrix>() {
                        assert_eq!(Some(a), b.as_any().downcast_ref::<Bnb4Matrix>(), "{name}");
                    } else {
                        let a = a.as_any().downcast_ref::<Int8Matrix>().unwrap();
                        assert_eq!(Some(a), b.as_any().downcast_ref::<Int8Matrix>(), "{name}");
                    }
                    compared += 1;
                }
            }
            assert_eq!(compared, 7 * w.layers.len());
            assert_eq!(w.embed_tokens, back.embed_tokens);
            assert_eq!(logits(&w), logits(&back), "{spec:?}");
        }
    }

    #[test]
    fn tensor_names_dtypes_shapes_and_state_json_follow_bitsandbytes() {
        let (w, _, spec) = quantized("nf4");
        let t: HashMap<String, RawTensor> = checkpoint_tensors(&w).unwrap().into_iter().collect();
        let p = "model.layers.0.self_attn.q_proj.weight";
        let (o, i) = w.layers[0].q_proj.shape();
        let n = o * i;
        assert_eq!(
            (t[p].dtype, t[p].shape.clone()),
            (Dtype::U8, vec![n / 2, 1])
        );
        let a = &t[&format!("{p}.absmax")];
        assert_eq!((a.dtype, a.shape.clone()), (Dtype::U8, vec![n / 64]));
        assert_eq!(t[&format!("{p}.quant_map")].shape, vec![16]);
        assert_eq!(t[&format!("{p}.nested_quant_map")].shape, vec![256]);
        assert_eq!(
            t[&format!("{p}.nested_absmax")].shape,
            vec![(n / 64).div_ceil(256)]
        );
        let state = &t[&format!("{p}.quant_state.bitsandbytes__nf4")];
        let js: Value = serde_json::from_slice(&state.bytes).unwrap();
        assert_eq!(js["quant_type"], "nf4");
        assert_eq!(js["blocksize"], 64);
        assert_eq!(js["shape"], json!([o, i]));
        assert_eq!(js["nested_blocksize"], 256);
        assert_eq!(js["nested_dtype"], "float32");
        assert!(js["nested_offset"].is_f64());
        assert!(
            std::str::from_utf8(&state.bytes)
                .unwrap()
                .starts_with("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": ")
        );
        // The lm_head is tied here; embeddings and norms stay dense.
        assert_eq!(t["model.embed_tokens.weight"].dtype, Dtype::F32);
        let qc = quantization_config(&spec).unwrap();
        assert_eq!(qc["quant_method"], "bitsandbytes");
        assert_eq!(qc["load_in_4bit"], true);
        assert_eq!(qc["bnb_4bit_quant_type"], "nf4");
        assert_eq!(qc["bnb_4bit_use_double_quant"], true);
        assert_eq!(qc["llm_int8_skip_modules"], json!(["lm_head"]));

        let (w8, _, _) = quantized("int8");
        let t: HashMap<String, RawTensor> = checkpoint_tensors(&w8).unwrap().into_iter().collect();
        let m = "model.layers.0.mlp.down_proj";
        let (o, i) = w8.layers[0].down_proj.shape();
        assert_eq!(t[&format!("{m}.weight")].dtype, Dtype::I8);
        assert_eq!(t[&format!("{m}.weight")].shape, vec![o, i]);
        assert_eq!(
            (
                t[&format!("{m}.SCB")].dtype,
                t[&format!("{m}.SCB")].shape.clone()
            ),
            (Dtype::F32, vec![o])
        );
        assert_eq!(t[&format!("{m}.weight_format")].shape, Vec::<usize>::new());
    }

    /// Writes the nf4 checkpoint with one tensor changed (or removed) and returns the load error.
    fn corrupt(edit: impl Fn(&mut HashMap<String, RawTensor>)) -> String {
        let (w, tok, spec) = quantized("nf4");
        let dir = tempfile::tempdir().unwrap();
        write_bnb_dir(dir.path(), &w, Some(&tok), &spec).unwrap();
        let path = dir.path().join("model.safetensors");
        let mut t = read_safetensors_raw(&path).unwrap();
        edit(&mut t);
        let list: Vec<(String, RawTensor)> = t.into_iter().collect();
        write_safetensors(&path, &list, None).unwrap();
        format!("{:#}", load_hf_dir(dir.path()).unwrap_err())
    }

    #[test]
    fn corrupted_quant_state_gives_clear_errors() {
        let p = "model.layers.1.mlp.up_proj.weight";
        let state = format!("{p}.quant_state.bitsandbytes__nf4");
        let e = corrupt(|t| {
            let s = t.get_mut(&state).unwrap();
            s.bytes = b"{not json".to_vec();
            s.shape = vec![9];
        });
        assert!(
            e.contains(&state) && e.contains("not valid JSON") && e.contains("model.safetensors"),
            "{e}"
        );
        let e = corrupt(|t| {
            let s = t.get_mut(&state).unwrap();
            let text = String::from_utf8(s.bytes.clone()).unwrap();
            let mut js: Value = serde_json::from_str(&text).unwrap();
            js["shape"] = json!([3, 5]);
            s.bytes = js.to_string().into_bytes();
            s.shape = vec![s.bytes.len()];
        });
        assert!(e.contains(&state) && e.contains("needs"), "{e}");
        let e = corrupt(|t| {
            t.remove(&format!("{p}.absmax"));
        });
        assert!(
            e.contains(&format!("'{p}.absmax' is missing")) && e.contains("model.safetensors"),
            "{e}"
        );
        let e = corrupt(|t| {
            t.remove(&state);
        });
        assert!(e.contains(p) && e.contains("quant state is missing"), "{e}");
    }
}
