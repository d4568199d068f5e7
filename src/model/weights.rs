//! Host-side weights of a Llama model, named as in HF checkpoints.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};

use super::config::LlamaConfig;
use crate::quant::LinearWeight;
use crate::tensor::HostTensor;

/// The seven linear layers of a decoder block, in HF order.
pub const LINEAR_NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Weights of one decoder block.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub input_layernorm: Vec<f32>,
    pub q_proj: LinearWeight,
    pub k_proj: LinearWeight,
    pub v_proj: LinearWeight,
    pub o_proj: LinearWeight,
    pub post_attention_layernorm: Vec<f32>,
    pub gate_proj: LinearWeight,
    pub up_proj: LinearWeight,
    pub down_proj: LinearWeight,
}

impl LayerWeights {
    /// The linear layers paired with their names (see [`LINEAR_NAMES`]).
    pub fn linears(&self) -> [(&'static str, &LinearWeight); 7] {
        [
            (LINEAR_NAMES[0], &self.q_proj),
            (LINEAR_NAMES[1], &self.k_proj),
            (LINEAR_NAMES[2], &self.v_proj),
            (LINEAR_NAMES[3], &self.o_proj),
            (LINEAR_NAMES[4], &self.gate_proj),
            (LINEAR_NAMES[5], &self.up_proj),
            (LINEAR_NAMES[6], &self.down_proj),
        ]
    }

    /// Mutable access to the linear layers, paired with their names.
    pub fn linears_mut(&mut self) -> [(&'static str, &mut LinearWeight); 7] {
        [
            (LINEAR_NAMES[0], &mut self.q_proj),
            (LINEAR_NAMES[1], &mut self.k_proj),
            (LINEAR_NAMES[2], &mut self.v_proj),
            (LINEAR_NAMES[3], &mut self.o_proj),
            (LINEAR_NAMES[4], &mut self.gate_proj),
            (LINEAR_NAMES[5], &mut self.up_proj),
            (LINEAR_NAMES[6], &mut self.down_proj),
        ]
    }
}

/// All weights of a Llama model on the host.
#[derive(Clone, Debug)]
pub struct LlamaWeights {
    pub config: LlamaConfig,
    /// `[vocab, hidden]`, also the lm_head when embeddings are tied.
    pub embed_tokens: HostTensor,
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<LinearWeight>,
}

/// Takes tensors out of a name → tensor map, checking shapes.
struct TensorTaker {
    tensors: HashMap<String, HostTensor>,
    /// Linear weights already built (quantized checkpoints), by tensor name.
    prebuilt: HashMap<String, LinearWeight>,
}

impl TensorTaker {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = self
            .tensors
            .remove(name)
            .with_context(|| format!("checkpoint has no tensor '{name}'"))?;
        if t.shape != shape {
            bail!(
                "tensor '{name}' has shape {:?}, the config implies {shape:?}",
                t.shape
            );
        }
        Ok(t)
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        Ok(self.take(name, &[len])?.data)
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<LinearWeight> {
        if let Some(w) = self.prebuilt.remove(name) {
            if w.shape() != (out, inp) {
                bail!(
                    "tensor '{name}' has shape {:?}, the config implies [{out}, {inp}]",
                    w.shape()
                );
            }
            return Ok(w);
        }
        Ok(LinearWeight::Dense(self.take(name, &[out, inp])?))
    }
}

impl LlamaWeights {
    /// Assembles a model from HF-named tensors (`model.layers.0.self_attn.q_proj.weight`, ...).
    pub fn from_tensors(config: LlamaConfig, tensors: HashMap<String, HostTensor>) -> Result<Self> {
        Self::from_parts(config, tensors, HashMap::new())
    }

    /// Like [`LlamaWeights::from_tensors`], with some linear layers already
    /// built (e.g. quantized), keyed by their weight name
    /// (`model.layers.0.self_attn.q_proj.weight`); those take precedence.
    pub fn from_parts(
        config: LlamaConfig,
        tensors: HashMap<String, HostTensor>,
        prebuilt: HashMap<String, LinearWeight>,
    ) -> Result<Self> {
        let c = &config;
        let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let mut tk = TensorTaker { tensors, prebuilt };
        let embed_tokens = tk.take("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            layers.push(LayerWeights {
                input_layernorm: tk.vector(&format!("{p}input_layernorm.weight"), h)?,
                q_proj: tk.linear(&format!("{p}self_attn.q_proj.weight"), c.q_dim(), h)?,
                k_proj: tk.linear(&format!("{p}self_attn.k_proj.weight"), c.kv_dim(), h)?,
                v_proj: tk.linear(&format!("{p}self_attn.v_proj.weight"), c.kv_dim(), h)?,
                o_proj: tk.linear(&format!("{p}self_attn.o_proj.weight"), h, c.q_dim())?,
                post_attention_layernorm: tk
                    .vector(&format!("{p}post_attention_layernorm.weight"), h)?,
                gate_proj: tk.linear(&format!("{p}mlp.gate_proj.weight"), i, h)?,
                up_proj: tk.linear(&format!("{p}mlp.up_proj.weight"), i, h)?,
                down_proj: tk.linear(&format!("{p}mlp.down_proj.weight"), h, i)?,
            });
        }
        let norm = tk.vector("model.norm.weight", h)?;
        let lm_head = if c.tie_word_embeddings {
            // Some tied checkpoints still carry a copy; it is the same matrix.
            tk.tensors.remove("lm_head.weight");
            None
        } else {
            Some(tk.linear("lm_head.weight", v, h)?)
        };
        Ok(LlamaWeights {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// Every tensor under its HF name, dense weights as stored, quantized ones
    /// dequantized (for writing plain HF checkpoints and for comparisons).
    pub fn to_dense_tensors(&self) -> Vec<(String, HostTensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        let dense = |w: &LinearWeight| match w {
            LinearWeight::Dense(t) => t.clone(),
            q => {
                let (o, i) = q.shape();
                HostTensor::new(vec![o, i], crate::tensor::DType::F32, q.dequantize())
                    .expect("dequantized shape matches")
            }
        };
        let vector = |v: &Vec<f32>, dtype| HostTensor {
            shape: vec![v.len()],
            dtype,
            data: v.clone(),
        };
        let dtype = self.embed_tokens.dtype;
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}.");
            out.push((
                format!("{p}input_layernorm.weight"),
                vector(&layer.input_layernorm, dtype),
            ));
            out.push((
                format!("{p}post_attention_layernorm.weight"),
                vector(&layer.post_attention_layernorm, dtype),
            ));
            for (name, w) in layer.linears() {
                out.push((format!("{p}{name}.weight"), dense(w)));
            }
        }
        out.push(("model.norm.weight".to_string(), vector(&self.norm, dtype)));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), dense(head)));
        }
        out
    }

    /// Bytes of all weights at their stored formats.
    pub fn storage_bytes(&self) -> usize {
        let e = &self.embed_tokens;
        let vec_bytes = e.dtype.size_bytes();
        let mut total = e.numel() * vec_bytes + self.norm.len() * vec_bytes;
        for layer in &self.layers {
            total +=
                (layer.input_layernorm.len() + layer.post_attention_layernorm.len()) * vec_bytes;
            total += layer
                .linears()
                .iter()
                .map(|(_, w)| w.storage_bytes())
                .sum::<usize>();
        }
        total + self.lm_head.as_ref().map_or(0, |w| w.storage_bytes())
    }
}
