//! The Llama forward pass, generic over the compute [`Backend`].

use anyhow::{Context, Result, bail};

use super::config::LlamaConfig;
use super::rope::inv_freq;
use super::weights::{LayerWeights, LlamaWeights};
use crate::backend::{Backend, CacheShape, HeadShape, StepFn, StepLayout};
use crate::quant::LinearWeight;

/// The `run_step` variant of [`Model::greedy`] (`forward`'s are 0 and 1:
/// last rows or all logits).
const GREEDY_VARIANT: u32 = 2;

/// A callback handed the input of each group of a block's linear layers as
/// the block computes it.
pub type Observer<'a, T> = &'a mut dyn FnMut(LinearInput, &T) -> Result<()>;

/// The four distinct inputs of a block's linear layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinearInput {
    /// Input of q_proj, k_proj, v_proj (the normed residual stream).
    Qkv,
    /// Input of o_proj (the attention output).
    O,
    /// Input of gate_proj and up_proj (the post-attention normed stream).
    GateUp,
    /// Input of down_proj (`silu(gate) * up`).
    Down,
}

impl LinearInput {
    /// Which input feeds the linear layer named `name` (see `LINEAR_NAMES`).
    pub fn of(name: &str) -> Option<LinearInput> {
        Some(match name {
            "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" => LinearInput::Qkv,
            "self_attn.o_proj" => LinearInput::O,
            "mlp.gate_proj" | "mlp.up_proj" => LinearInput::GateUp,
            "mlp.down_proj" => LinearInput::Down,
            _ => return None,
        })
    }
}

/// One decoder block's weights on the device.
pub struct DeviceLayer<B: Backend> {
    pub(crate) input_layernorm: B::Vector,
    pub(crate) q_proj: B::Weight,
    pub(crate) k_proj: B::Weight,
    pub(crate) v_proj: B::Weight,
    pub(crate) o_proj: B::Weight,
    pub(crate) post_attention_layernorm: B::Vector,
    pub(crate) gate_proj: B::Weight,
    pub(crate) up_proj: B::Weight,
    pub(crate) down_proj: B::Weight,
}

impl<B: Backend> DeviceLayer<B> {
    /// Uploads `l` (quantized linears stay quantized).
    pub fn upload(backend: &B, l: &LayerWeights) -> Result<Self> {
        Ok(DeviceLayer {
            input_layernorm: backend.upload_vector(&l.input_layernorm)?,
            q_proj: backend.upload_weight(&l.q_proj)?,
            k_proj: backend.upload_weight(&l.k_proj)?,
            v_proj: backend.upload_weight(&l.v_proj)?,
            o_proj: backend.upload_weight(&l.o_proj)?,
            post_attention_layernorm: backend.upload_vector(&l.post_attention_layernorm)?,
            gate_proj: backend.upload_weight(&l.gate_proj)?,
            up_proj: backend.upload_weight(&l.up_proj)?,
            down_proj: backend.upload_weight(&l.down_proj)?,
        })
    }

    /// Uploads `layer`'s linear called `name` (one of `LINEAR_NAMES`) in
    /// place of the one held.
    pub fn replace(&mut self, backend: &B, layer: &LayerWeights, name: &str) -> Result<()> {
        let (_, w) = layer
            .linears()
            .into_iter()
            .find(|(n, _)| *n == name)
            .with_context(|| format!("no linear layer named {name}"))?;
        let slot = match name {
            "self_attn.q_proj" => &mut self.q_proj,
            "self_attn.k_proj" => &mut self.k_proj,
            "self_attn.v_proj" => &mut self.v_proj,
            "self_attn.o_proj" => &mut self.o_proj,
            "mlp.gate_proj" => &mut self.gate_proj,
            "mlp.up_proj" => &mut self.up_proj,
            _ => &mut self.down_proj,
        };
        *slot = backend.upload_weight(w)?;
        Ok(())
    }
}

/// A Llama model resident on a backend.
pub struct Model<B: Backend> {
    pub config: LlamaConfig,
    backend: B,
    embed_tokens: B::Weight,
    layers: Vec<DeviceLayer<B>>,
    norm: B::Vector,
    lm_head: Option<B::Weight>,
    inv_freq: B::Vector,
}

impl<B: Backend> Model<B> {
    /// Uploads `weights` to `backend`.
    pub fn new(backend: B, weights: &LlamaWeights) -> Result<Self> {
        let layers = weights
            .layers
            .iter()
            .map(|l| DeviceLayer::upload(&backend, l))
            .collect::<Result<Vec<_>>>()?;
        Ok(Model {
            config: weights.config.clone(),
            embed_tokens: backend
                .upload_weight(&LinearWeight::Dense(weights.embed_tokens.clone()))?,
            norm: backend.upload_vector(&weights.norm)?,
            lm_head: weights
                .lm_head
                .as_ref()
                .map(|w| backend.upload_weight(w))
                .transpose()?,
            inv_freq: backend.upload_vector(&inv_freq(&weights.config))?,
            layers,
            backend,
        })
    }

    /// Replaces block `l`'s weights (e.g. with their quantized versions).
    pub fn set_layer(&mut self, l: usize, weights: &LayerWeights) -> Result<()> {
        if l >= self.layers.len() {
            bail!("model has {} layers, no layer {l}", self.layers.len());
        }
        self.layers[l] = DeviceLayer::upload(&self.backend, weights)?;
        Ok(())
    }

    /// The backend the model lives on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Frees the model's weights and hands its backend back (to upload another model).
    pub fn into_backend(self) -> B {
        self.backend
    }

    /// A KV cache for `slots` sequences of up to `max_len` tokens each.
    pub fn new_cache(&self, slots: usize, max_len: usize) -> Result<B::Cache> {
        self.backend.new_cache(CacheShape {
            layers: self.config.num_hidden_layers,
            slots,
            max_len,
            kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim,
        })
    }

    fn heads(&self) -> HeadShape {
        HeadShape {
            q_heads: self.config.num_attention_heads,
            kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Hidden states `[tokens, hidden]` for the layout's token ids.
    pub fn embed(&self, layout: &B::Layout) -> Result<B::Tensor> {
        self.backend.embedding(&self.embed_tokens, layout)
    }

    /// Runs decoder block `l` on `x` in place, reading and extending the cache.
    pub fn block(
        &self,
        l: usize,
        x: &mut B::Tensor,
        cache: &mut B::Cache,
        layout: &B::Layout,
    ) -> Result<()> {
        self.block_with(l, x, cache, layout, None)
    }

    /// [`Model::block`], handing the input of each group of linear layers to
    /// `observe` as it is computed (calibration captures these).
    pub fn block_observed(
        &self,
        l: usize,
        x: &mut B::Tensor,
        cache: &mut B::Cache,
        layout: &B::Layout,
        observe: Observer<'_, B::Tensor>,
    ) -> Result<()> {
        self.block_with(l, x, cache, layout, Some(observe))
    }

    /// One block; without an observer the norms may fuse into the
    /// projections that follow them.
    fn block_with(
        &self,
        l: usize,
        x: &mut B::Tensor,
        cache: &mut B::Cache,
        layout: &B::Layout,
        mut observe: Option<Observer<'_, B::Tensor>>,
    ) -> Result<()> {
        let b = &self.backend;
        let layer = &self.layers[l];
        let heads = self.heads();
        let eps = self.config.rms_norm_eps as f32;
        let qkv = [&layer.q_proj, &layer.k_proj, &layer.v_proj];
        let qkv = match observe.as_mut() {
            Some(obs) => {
                let h = b.rms_norm(x, &layer.input_layernorm, eps)?;
                obs(LinearInput::Qkv, &h)?;
                qkv.iter()
                    .map(|w| b.matmul(&h, w))
                    .collect::<Result<Vec<_>>>()?
            }
            None => b.norm_matmuls(x, &layer.input_layernorm, eps, &qkv)?,
        };
        let Ok::<[B::Tensor; 3], _>([mut q, mut k, v]) = qkv.try_into() else {
            bail!("block {l}: the backend did not return three Q/K/V projections");
        };
        let attn = b.rope_attention(&mut q, &mut k, &v, &self.inv_freq, cache, l, heads, layout)?;
        let act = match observe.as_mut() {
            Some(obs) => {
                obs(LinearInput::O, &attn)?;
                b.matmul_add(x, &attn, &layer.o_proj)?;
                let h = b.rms_norm(x, &layer.post_attention_layernorm, eps)?;
                obs(LinearInput::GateUp, &h)?;
                let act = b.gate_up_silu(&h, &layer.gate_proj, &layer.up_proj)?;
                obs(LinearInput::Down, &act)?;
                act
            }
            None => {
                b.matmul_add(x, &attn, &layer.o_proj)?;
                let norm = &layer.post_attention_layernorm;
                b.norm_gate_up_silu(x, norm, eps, &layer.gate_proj, &layer.up_proj)?
            }
        };
        b.matmul_add(x, &act, &layer.down_proj)
    }

    /// Final norm and lm_head: logits `[rows, vocab]`.
    pub fn head(&self, x: &B::Tensor) -> Result<B::Tensor> {
        let h = self
            .backend
            .rms_norm(x, &self.norm, self.config.rms_norm_eps as f32)?;
        self.backend
            .matmul(&h, self.lm_head.as_ref().unwrap_or(&self.embed_tokens))
    }

    /// One forward step over a ragged batch. Returns the logits of every
    /// token when `all_logits`, else only of each sequence's last token.
    pub fn forward(
        &self,
        layout: &StepLayout,
        cache: &mut B::Cache,
        all_logits: bool,
    ) -> Result<B::Tensor> {
        self.step(layout, cache, all_logits as u32, &mut |l, c| {
            self.forward_on(l, c, all_logits)
        })
    }

    /// The greedy next token of each sequence: one forward step whose device
    /// work ends with the argmax, so that a captured decode step replays it
    /// too and only the token ids come back.
    pub fn greedy(&self, layout: &StepLayout, cache: &mut B::Cache) -> Result<Vec<u32>> {
        let ids = self.step(layout, cache, GREEDY_VARIANT, &mut |l, c| {
            let logits = self.forward_on(l, c, false)?;
            self.backend.argmax_ids(&logits)
        })?;
        self.backend.ids_to_host(&ids)
    }

    /// Runs `work` as the backend's step `variant` for a non-empty layout.
    fn step(
        &self,
        layout: &StepLayout,
        cache: &mut B::Cache,
        variant: u32,
        work: &mut StepFn<'_, B::Layout, B::Cache, B::Tensor>,
    ) -> Result<B::Tensor> {
        if layout.num_tokens() == 0 {
            bail!("forward step with no tokens");
        }
        self.backend.run_step(layout, cache, variant, work)
    }

    /// [`Model::forward`] with a layout already on the device.
    pub fn forward_on(
        &self,
        layout: &B::Layout,
        cache: &mut B::Cache,
        all_logits: bool,
    ) -> Result<B::Tensor> {
        let mut x = self.embed(layout)?;
        for l in 0..self.layers.len() {
            self.block(l, &mut x, cache, layout)?;
        }
        if all_logits {
            self.head(&x)
        } else {
            let last = self.backend.last_rows(x, layout)?;
            self.head(&last)
        }
    }

    /// Logits `[tokens.len(), vocab]` of one sequence, in a fresh cache.
    pub fn sequence_logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut cache = self.new_cache(1, tokens.len())?;
        let layout = StepLayout::new([(0, 0, tokens)])?;
        let logits = self.forward(&layout, &mut cache, true)?;
        Ok(self.backend.to_host(&logits)?.2)
    }
}
