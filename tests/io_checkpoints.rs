//! The same weights written as an HF safetensors directory and as a GGUF file
//! (with llama.cpp's q/k permutation and a mix of F32, F16, Q8_0, Q4_0, Q4_1
//! storage) load to identical tensors.

use std::collections::HashMap;
use std::path::Path;

use half::f16;
use quantbench::io::{hf_dir, load_model};
use quantbench::model::LlamaWeights;
use quantbench::model::synth::{synth_config, synth_weights};
use quantbench::tensor::{DType, HostTensor};

/// A metadata value of the test writer.
enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Meta {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Meta::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::F32(v) => {
                out.extend(6u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::Bool(v) => {
                out.extend(7u32.to_le_bytes());
                out.push(*v as u8);
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(out, s);
            }
            Meta::Strs(v) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((v.len() as u64).to_le_bytes());
                for s in v {
                    put_str(out, s);
                }
            }
            Meta::I32s(v) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((v.len() as u64).to_le_bytes());
                for x in v {
                    out.extend(x.to_le_bytes());
                }
            }
        }
    }
}

/// One tensor: GGUF name, shape outermost first, ggml type id, stored bytes.
struct GgufTensor {
    name: String,
    shape: Vec<usize>,
    kind: u32,
    bytes: Vec<u8>,
}

/// Writes a GGUF v3 file (alignment 32).
fn write_gguf(path: &Path, meta: &[(&str, Meta)], tensors: &[GgufTensor]) {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut out, k);
        v.write(&mut out);
    }
    let mut offset = 0u64;
    let mut offsets = vec![];
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend(t.kind.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.bytes.len() as u64).next_multiple_of(32);
    }
    let data_start = out.len().next_multiple_of(32);
    out.resize(data_start, 0);
    for (t, off) in tensors.iter().zip(offsets) {
        out.resize(data_start + off as usize, 0);
        out.extend(&t.bytes);
    }
    std::fs::write(path, out).unwrap();
}

/// How the test stores one tensor in the GGUF file.
#[derive(Clone, Copy, Debug)]
enum Store {
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4_1,
}

fn f16_le(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

/// Packs `values` in `store`'s format and returns the bytes together with
/// the values those bytes stand for (ggml's dequantization formulas written
/// out here: Q8_0 q·d; Q4_0 (q−8)·d; Q4_1 q·d + m; nibble j is value j of
/// the block's first half, the high nibble value j + 16).
fn pack(values: &[f32], store: Store) -> (Vec<u8>, Vec<f32>, DType) {
    match store {
        Store::F32 => (
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            values.to_vec(),
            DType::F32,
        ),
        Store::F16 => (
            values.iter().flat_map(|&v| f16_le(v)).collect(),
            values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
            DType::F16,
        ),
        Store::Q8_0 => {
            let (mut bytes, mut deq) = (vec![], vec![]);
            for block in values.chunks(32) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = f16::from_f32(amax / 127.0).to_f32();
                bytes.extend(f16_le(d));
                for &v in block {
                    let q = if d == 0.0 { 0 } else { (v / d).round() as i8 };
                    bytes.push(q as u8);
                    deq.push(q as f32 * d);
                }
            }
            (bytes, deq, DType::F32)
        }
        Store::Q4_0 => {
            let (mut bytes, mut deq) = (vec![], vec![0f32; values.len()]);
            for (b, block) in values.chunks(32).enumerate() {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = f16::from_f32(amax / 7.0).to_f32();
                bytes.extend(f16_le(d));
                let q = |v: f32| -> u8 {
                    if d == 0.0 {
                        8
                    } else {
                        ((v / d).round() as i32 + 8).clamp(0, 15) as u8
                    }
                };
                for j in 0..16 {
                    let (lo, hi) = (q(block[j]), q(block[j + 16]));
                    bytes.push(lo | (hi << 4));
                    deq[b * 32 + j] = (lo as f32 - 8.0) * d;
                    deq[b * 32 + j + 16] = (hi as f32 - 8.0) * d;
                }
            }
            (bytes, deq, DType::F32)
        }
        Store::Q4_1 => {
            let (mut bytes, mut deq) = (vec![], vec![0f32; values.len()]);
            for (b, block) in values.chunks(32).enumerate() {
                let min = block.iter().fold(f32::MAX, |m, &v| m.min(v));
                let max = block.iter().fold(f32::MIN, |m, &v| m.max(v));
                let d = f16::from_f32((max - min) / 15.0).to_f32();
                let m = f16::from_f32(min).to_f32();
                bytes.extend(f16_le(d));
                bytes.extend(f16_le(m));
                let q = |v: f32| -> u8 {
                    if d == 0.0 {
                        0
                    } else {
                        ((v - m) / d).round().clamp(0.0, 15.0) as u8
                    }
                };
                for j in 0..16 {
                    let (lo, hi) = (q(block[j]), q(block[j + 16]));
                    bytes.push(lo | (hi << 4));
                    deq[b * 32 + j] = lo as f32 * d + m;
                    deq[b * 32 + j + 16] = hi as f32 * d + m;
                }
            }
            (bytes, deq, DType::F32)
        }
    }
}

/// llama.cpp name of an HF tensor name.
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, suffix) = rest.split_once('.').unwrap();
    let short = match suffix {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        other => panic!("unexpected tensor {other}"),
    };
    format!("blk.{layer}.{short}.weight")
}

/// Storage of each tensor: norms F32, the embedding Q8_0 (as in SmolLM2),
/// and the linears cycling through every format.
fn store_for(hf: &str, index: usize) -> Store {
    if hf.ends_with("norm.weight") {
        return Store::F32;
    }
    if hf == "model.embed_tokens.weight" {
        return Store::Q8_0;
    }
    [
        Store::Q4_1,
        Store::F16,
        Store::Q4_0,
        Store::F32,
        Store::Q8_0,
    ][index % 5]
}

/// llama.cpp's converter permutation of q/k rows, written as the converter
/// does it: reshape to (heads, 2, head_dim / 2, cols), swap axes 1 and 2.
fn llama_cpp_permute(t: &HostTensor, heads: usize) -> HostTensor {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let half = rows / heads / 2;
    let mut out = vec![0f32; t.data.len()];
    for h in 0..heads {
        for j in 0..half {
            for two in 0..2 {
                let src = (h * 2 + two) * half + j; // index (h, two, j)
                let dst = (h * half + j) * 2 + two; // index (h, j, two)
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&t.data[src * cols..(src + 1) * cols]);
            }
        }
    }
    HostTensor::new(t.shape.clone(), t.dtype, out).unwrap()
}

/// llama3 rope divisors per frequency, as llama.cpp's converter stores them
/// in `rope_freqs.weight`.
fn llama3_rope_freqs(w: &LlamaWeights) -> Vec<f32> {
    let c = &w.config;
    let s = c.rope_scaling.as_ref().unwrap();
    let old = s.original_max_position_embeddings as f64;
    (0..c.head_dim / 2)
        .map(|i| {
            let freq = 1.0 / c.rope_theta.powf(2.0 * i as f64 / c.head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < old / s.high_freq_factor {
                1.0
            } else if wavelen > old / s.low_freq_factor {
                s.factor
            } else {
                let smooth =
                    (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                1.0 / ((1.0 - smooth) / s.factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// The tiny synthetic model, with every tensor replaced by the values its
/// GGUF storage represents; and the GGUF tensors (q/k permuted as
/// llama.cpp's converter does; rope_freqs.weight when the model has llama3
/// rope scaling).
fn gguf_case(shape: &str) -> (LlamaWeights, Vec<GgufTensor>) {
    let (config, dtype) = synth_config(shape).unwrap();
    let weights = synth_weights(&config, dtype, 11).unwrap();
    let mut stored: HashMap<String, HostTensor> = HashMap::new();
    let mut tensors = vec![];
    for (index, (name, t)) in weights.to_dense_tensors().into_iter().enumerate() {
        let store = store_for(&name, index);
        let (bytes, values, dtype) = pack(&t.data, store);
        let heads = if name.ends_with("q_proj.weight") {
            Some(config.num_attention_heads)
        } else if name.ends_with("k_proj.weight") {
            Some(config.num_key_value_heads)
        } else {
            None
        };
        // Rows hold whole blocks (64 columns), so packing the permuted rows
        // represents the permuted values of packing the original rows.
        let bytes = match heads {
            Some(h) => pack(&llama_cpp_permute(&t, h).data, store).0,
            None => bytes,
        };
        let kind = match store {
            Store::F32 => 0,
            Store::F16 => 1,
            Store::Q4_0 => 2,
            Store::Q4_1 => 3,
            Store::Q8_0 => 8,
        };
        tensors.push(GgufTensor {
            name: gguf_name(&name),
            shape: t.shape.clone(),
            kind,
            bytes,
        });
        stored.insert(
            name,
            HostTensor::new(t.shape.clone(), dtype, values).unwrap(),
        );
    }
    let expected = LlamaWeights::from_tensors(config, stored).unwrap();
    if expected.config.rope_scaling.is_some() {
        let freqs = llama3_rope_freqs(&expected);
        tensors.push(GgufTensor {
            name: "rope_freqs.weight".into(),
            shape: vec![freqs.len()],
            kind: 0,
            bytes: freqs.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
    }
    (expected, tensors)
}

/// Metadata of a tiny llama GGUF whose tokenizer is the byte-level one of
/// synthetic models padded to the vocabulary size.
fn tiny_meta(w: &LlamaWeights) -> Vec<(&'static str, Meta)> {
    let c = &w.config;
    let byte_tok = quantbench::io::tokenizer::Tokenizer::bytes_only().unwrap();
    let vocab = byte_tok.inner().get_vocab(true);
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id as usize] = t;
    }
    let mut types = vec![1i32; tokens.len()];
    types[256] = 3;
    types[257] = 3;
    while tokens.len() < c.vocab_size {
        tokens.push(format!("<|unused{}|>", tokens.len()));
        types.push(4);
    }
    vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.block_count", Meta::U32(c.num_hidden_layers as u32)),
        (
            "llama.context_length",
            Meta::U32(c.max_position_embeddings as u32),
        ),
        ("llama.embedding_length", Meta::U32(c.hidden_size as u32)),
        (
            "llama.feed_forward_length",
            Meta::U32(c.intermediate_size as u32),
        ),
        (
            "llama.attention.head_count",
            Meta::U32(c.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv",
            Meta::U32(c.num_key_value_heads as u32),
        ),
        ("llama.rope.freq_base", Meta::F32(c.rope_theta as f32)),
        ("llama.rope.dimension_count", Meta::U32(c.head_dim as u32)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Meta::F32(c.rms_norm_eps as f32),
        ),
        (
            "llama.rope.scaling.original_context_length",
            Meta::U32(
                c.rope_scaling
                    .as_ref()
                    .map_or(0, |s| s.original_max_position_embeddings) as u32,
            ),
        ),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str("gpt-2".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.merges", Meta::Strs(vec![])),
        ("tokenizer.ggml.bos_token_id", Meta::U32(256)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(257)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(true)),
    ]
}

fn assert_same_weights(a: &LlamaWeights, b: &LlamaWeights) {
    assert_eq!(a.config, b.config);
    let ta: HashMap<_, _> = a.to_dense_tensors().into_iter().collect();
    let tb: HashMap<_, _> = b.to_dense_tensors().into_iter().collect();
    assert_eq!(ta.len(), tb.len());
    for (name, x) in &ta {
        let y = &tb[name];
        assert_eq!(x.shape, y.shape, "{name}");
        assert_eq!(x.dtype, y.dtype, "{name}");
        let same = x
            .data
            .iter()
            .zip(&y.data)
            .all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "{name}: values differ");
    }
}

#[test]
fn gguf_and_safetensors_load_identical_tensors() {
    for shape in ["tiny", "tiny-untied"] {
        let dir = tempfile::tempdir().unwrap();
        let (expected, tensors) = gguf_case(shape);
        assert_eq!(expected.config.rope_scaling.is_some(), shape == "tiny");
        let hf = dir.path().join("hf");
        // An HF directory needs a tokenizer; use the synthetic one.
        let tok = quantbench::io::synth_tokenizer(&expected.config).unwrap();
        hf_dir::write_hf_dir(&hf, &expected, Some(&tok)).unwrap();
        let gguf = dir.path().join("tiny.gguf");
        write_gguf(&gguf, &tiny_meta(&expected), &tensors);

        let from_hf = load_model(hf.to_str().unwrap()).unwrap();
        let from_gguf = load_model(gguf.to_str().unwrap()).unwrap();
        assert_eq!(
            from_gguf.weights.config.tie_word_embeddings,
            shape == "tiny"
        );
        assert_same_weights(&from_hf.weights, &expected);
        assert_same_weights(&from_gguf.weights, &expected);

        // The GGUF tokenizer agrees with the byte-level one it was built from.
        let text = "Hello, wörld! 123";
        let ids = from_gguf.tokenizer.encode(text, true).unwrap();
        assert_eq!(ids, from_hf.tokenizer.encode(text, true).unwrap());
        assert_eq!(ids[0], 256);
        assert_eq!(from_gguf.tokenizer.decode(&ids).unwrap(), text);
    }
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (expected, tensors) = gguf_case("tiny");
    let path = dir.path().join("cut.gguf");
    write_gguf(&path, &tiny_meta(&expected), &tensors);
    let bytes = std::fs::read(&path).unwrap();
    for keep in [bytes.len() - 100, 200, 10] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let e = load_model(path.to_str().unwrap()).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("cut.gguf") && msg.contains("truncated or corrupt"),
            "{keep}: {msg}"
        );
    }
}

#[test]
fn gguf_with_other_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (expected, tensors) = gguf_case("tiny");
    let mut meta = tiny_meta(&expected);
    meta[0].1 = Meta::Str("mamba".into());
    let path = dir.path().join("m.gguf");
    write_gguf(&path, &meta, &tensors);
    let msg = format!("{:#}", load_model(path.to_str().unwrap()).unwrap_err());
    assert!(msg.contains("m.gguf") && msg.contains("'mamba'"), "{msg}");
}
