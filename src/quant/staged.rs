//! One decoder block on the CPU backend, run step by step for calibration.
//!
//! The block's intermediate values are computed in a fixed order: the normed
//! stream (input of q/k/v), the attention output (input of o), the residual
//! stream after attention, its norm (input of gate/up) and `silu(gate)·up`
//! (input of down). A [`StagedRun`] keeps the prefix of these values that is
//! still valid for the block's current weights, so after quantizing the
//! linears that read one input only the later steps are recomputed: GPTQ's
//! true-sequential order then runs the attention once per block instead of
//! once per stage. The arithmetic is the same sequence of backend calls as
//! `Model::block`, so results are identical.

use anyhow::Result;

use crate::backend::cpu::{CpuBackend, CpuTensor, CpuWeight};
use crate::backend::{Backend, CacheShape, HeadShape, StepLayout};
use crate::model::LlamaConfig;
use crate::model::forward::LinearInput;
use crate::model::weights::LayerWeights;

/// One decoder block's weights uploaded to the CPU backend.
pub struct BlockWeights {
    input_layernorm: Vec<f32>,
    q_proj: CpuWeight,
    k_proj: CpuWeight,
    v_proj: CpuWeight,
    o_proj: CpuWeight,
    post_attention_layernorm: Vec<f32>,
    gate_proj: CpuWeight,
    up_proj: CpuWeight,
    down_proj: CpuWeight,
}

impl BlockWeights {
    /// Uploads `layer` (quantized linears stay quantized).
    pub fn upload(backend: &CpuBackend, layer: &LayerWeights) -> Result<Self> {
        Ok(BlockWeights {
            input_layernorm: layer.input_layernorm.clone(),
            q_proj: backend.upload_weight(&layer.q_proj)?,
            k_proj: backend.upload_weight(&layer.k_proj)?,
            v_proj: backend.upload_weight(&layer.v_proj)?,
            o_proj: backend.upload_weight(&layer.o_proj)?,
            post_attention_layernorm: layer.post_attention_layernorm.clone(),
            gate_proj: backend.upload_weight(&layer.gate_proj)?,
            up_proj: backend.upload_weight(&layer.up_proj)?,
            down_proj: backend.upload_weight(&layer.down_proj)?,
        })
    }
}

/// What every block shares: the backend, head shapes, RoPE frequencies, norm epsilon.
pub struct BlockContext {
    backend: CpuBackend,
    heads: HeadShape,
    inv_freq: Vec<f32>,
    eps: f32,
}

impl BlockContext {
    /// The context of `config`'s blocks.
    pub fn new(config: &LlamaConfig) -> Self {
        BlockContext {
            backend: CpuBackend::new(),
            heads: HeadShape {
                q_heads: config.num_attention_heads,
                kv_heads: config.num_key_value_heads,
                head_dim: config.head_dim,
            },
            inv_freq: crate::model::rope::inv_freq(config),
            eps: config.rms_norm_eps as f32,
        }
    }

    /// The backend blocks run on.
    pub fn backend(&self) -> &CpuBackend {
        &self.backend
    }
}

/// Index in the step order of the value that `input` is.
fn step_of(input: LinearInput) -> usize {
    match input {
        LinearInput::Qkv => 0,
        LinearInput::O => 1,
        LinearInput::GateUp => 3,
        LinearInput::Down => 4,
    }
}

/// Number of intermediate steps (the block output is computed from the last two).
const STEPS: usize = 5;

/// A batch of sequences at one block: its input and the valid prefix of the
/// block's intermediate values.
pub struct StagedRun {
    layout: StepLayout,
    input: CpuTensor,
    values: Vec<CpuTensor>,
}

impl StagedRun {
    /// A run of the block whose input (residual stream) is `input`.
    pub fn new(layout: StepLayout, input: CpuTensor) -> Self {
        StagedRun {
            layout,
            input,
            values: Vec::with_capacity(STEPS),
        }
    }

    /// The block input (`[tokens, hidden]`).
    pub fn input(&self) -> &CpuTensor {
        &self.input
    }

    /// The value of `input`, computing the missing steps with `w`.
    pub fn value(
        &mut self,
        input: LinearInput,
        w: &BlockWeights,
        ctx: &BlockContext,
    ) -> Result<&CpuTensor> {
        let step = step_of(input);
        self.fill(step + 1, w, ctx)?;
        Ok(&self.values[step])
    }

    /// Forgets the values that depend on the weights of the linears reading
    /// `input` (the values up to and including `input` stay); `None` forgets all.
    pub fn invalidate_after(&mut self, input: Option<LinearInput>) {
        self.values.truncate(input.map_or(0, |i| step_of(i) + 1));
    }

    /// Computes the block output with `w` and makes it the new input; the
    /// kept values are dropped.
    pub fn advance(&mut self, w: &BlockWeights, ctx: &BlockContext) -> Result<()> {
        self.fill(STEPS, w, ctx)?;
        let down = ctx.backend.matmul(&self.values[4], &w.down_proj)?;
        let mut out = self.values.swap_remove(2);
        ctx.backend.add_assign(&mut out, &down)?;
        self.input = out;
        self.values.clear();
        Ok(())
    }

    fn fill(&mut self, upto: usize, w: &BlockWeights, ctx: &BlockContext) -> Result<()> {
        let b = &ctx.backend;
        while self.values.len() < upto {
            let v = &self.values;
            let next = match v.len() {
                0 => b.rms_norm(&self.input, &w.input_layernorm, ctx.eps)?,
                1 => self.attention(w, ctx)?,
                2 => {
                    let o = b.matmul(&v[1], &w.o_proj)?;
                    let mut x = self.input.clone();
                    b.add_assign(&mut x, &o)?;
                    x
                }
                3 => b.rms_norm(&v[2], &w.post_attention_layernorm, ctx.eps)?,
                _ => {
                    let gate = b.matmul(&v[3], &w.gate_proj)?;
                    let up = b.matmul(&v[3], &w.up_proj)?;
                    b.silu_mul(&gate, &up)?
                }
            };
            self.values.push(next);
        }
        Ok(())
    }

    /// q/k/v of the normed stream, RoPE, causal attention over a fresh cache.
    fn attention(&self, w: &BlockWeights, ctx: &BlockContext) -> Result<CpuTensor> {
        let (b, heads) = (&ctx.backend, ctx.heads);
        let h = &self.values[0];
        let mut q = b.matmul(h, &w.q_proj)?;
        let mut k = b.matmul(h, &w.k_proj)?;
        let v = b.matmul(h, &w.v_proj)?;
        b.rope(
            &mut q,
            heads.q_heads,
            heads.head_dim,
            &ctx.inv_freq,
            &self.layout,
        )?;
        b.rope(
            &mut k,
            heads.kv_heads,
            heads.head_dim,
            &ctx.inv_freq,
            &self.layout,
        )?;
        let mut cache = b.new_cache(CacheShape {
            layers: 1,
            slots: self.layout.seqs.len(),
            max_len: self.layout.max_end(),
            kv_heads: heads.kv_heads,
            head_dim: heads.head_dim,
        })?;
        b.attention(&q, &k, &v, &mut cache, 0, heads, &self.layout)
    }
}
