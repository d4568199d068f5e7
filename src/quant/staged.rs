//! One decoder block on any backend, run step by step for calibration.
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

use crate::backend::{Backend, CacheShape, HeadShape, StepLayout};
use crate::model::LlamaConfig;
use crate::model::forward::{DeviceLayer, LinearInput};

/// What every block shares: the backend, head shapes, RoPE frequencies, norm epsilon.
pub struct BlockContext<'a, B: Backend> {
    backend: &'a B,
    heads: HeadShape,
    inv_freq: B::Vector,
    eps: f32,
}

impl<'a, B: Backend> BlockContext<'a, B> {
    /// The context of `config`'s blocks on `backend`.
    pub fn new(backend: &'a B, config: &LlamaConfig) -> Result<Self> {
        Ok(BlockContext {
            backend,
            heads: HeadShape {
                q_heads: config.num_attention_heads,
                kv_heads: config.num_key_value_heads,
                head_dim: config.head_dim,
            },
            inv_freq: backend.upload_vector(&crate::model::rope::inv_freq(config))?,
            eps: config.rms_norm_eps as f32,
        })
    }

    /// The backend blocks run on.
    pub fn backend(&self) -> &'a B {
        self.backend
    }
}

/// Index in the step order of the value that `input` is.
pub fn step_of(input: LinearInput) -> usize {
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
pub struct StagedRun<B: Backend> {
    /// Slots and lengths of the batch's sequences (sizes its attention cache).
    cache: CacheShape,
    layout: B::Layout,
    input: B::Tensor,
    values: Vec<B::Tensor>,
}

impl<B: Backend> StagedRun<B> {
    /// A run of the block whose input (residual stream) is `input`, for the
    /// sequences of `layout` (`device_layout` is its upload).
    pub fn new(
        layout: &StepLayout,
        device_layout: B::Layout,
        input: B::Tensor,
        ctx: &BlockContext<'_, B>,
    ) -> Self {
        StagedRun {
            cache: CacheShape {
                layers: 1,
                slots: layout.seqs.len(),
                max_len: layout.max_end(),
                kv_heads: ctx.heads.kv_heads,
                head_dim: ctx.heads.head_dim,
            },
            layout: device_layout,
            input,
            values: Vec::with_capacity(STEPS),
        }
    }

    /// The block input (`[tokens, hidden]`).
    pub fn input(&self) -> &B::Tensor {
        &self.input
    }

    /// The value of `input`, computing the missing steps with `w`.
    pub fn value(
        &mut self,
        input: LinearInput,
        w: &DeviceLayer<B>,
        ctx: &BlockContext<'_, B>,
    ) -> Result<&B::Tensor> {
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
    pub fn advance(&mut self, w: &DeviceLayer<B>, ctx: &BlockContext<'_, B>) -> Result<()> {
        self.fill(STEPS, w, ctx)?;
        let down = ctx.backend.matmul(&self.values[4], &w.down_proj)?;
        let mut out = self.values.swap_remove(2);
        ctx.backend.add_assign(&mut out, &down)?;
        self.input = out;
        self.values.clear();
        Ok(())
    }

    fn fill(&mut self, upto: usize, w: &DeviceLayer<B>, ctx: &BlockContext<'_, B>) -> Result<()> {
        let b = &ctx.backend;
        while self.values.len() < upto {
            let v = &self.values;
            let next = match v.len() {
                0 => b.rms_norm(&self.input, &w.input_layernorm, ctx.eps)?,
                1 => self.attention(w, ctx)?,
                2 => {
                    // o + input: the residual sum (addition commutes exactly).
                    let mut x = b.matmul(&v[1], &w.o_proj)?;
                    b.add_assign(&mut x, &self.input)?;
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
    fn attention(&self, w: &DeviceLayer<B>, ctx: &BlockContext<'_, B>) -> Result<B::Tensor> {
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
        let mut cache = b.new_cache(self.cache)?;
        b.attention(&q, &k, &v, &mut cache, 0, heads, &self.layout)
    }
}
