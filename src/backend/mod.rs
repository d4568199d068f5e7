//! The compute seam. A [`Backend`] owns device memory and implements the dozen
//! ops a Llama forward pass needs; model code is generic over it and never
//! branches on the device.
//!
//! A forward step processes a ragged batch laid out flat: the new tokens of
//! every sequence one after another, no padding anywhere ([`StepLayout`]).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod layout;

use anyhow::Result;

pub use device::Device;
pub use layout::{SeqChunk, StepLayout};

use crate::quant::LinearWeight;

/// Dimensions of a KV cache: `slots` independent sequences of up to `max_len` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheShape {
    pub layers: usize,
    pub slots: usize,
    pub max_len: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Attention geometry shared by the rope and attention ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadShape {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// One forward step run by [`Backend::run_step`] on a device layout and cache.
pub type StepFn<'a, L, C, T> = dyn FnMut(&L, &mut C) -> Result<T> + 'a;

/// A device that can run the Llama forward pass.
pub trait Backend: Send + Sync {
    /// Activations: a row-major `[rows, cols]` matrix on the device.
    type Tensor;
    /// A linear (or embedding) weight uploaded in its own format.
    type Weight;
    /// A small f32 vector (norm weights, RoPE inverse frequencies).
    type Vector;
    /// The KV cache of all layers and slots.
    type Cache;
    /// A [`StepLayout`] made available to device code.
    type Layout;

    /// Human-readable description (device name, memory).
    fn describe(&self) -> String;
    /// Uploads a weight; quantized formats stay quantized on the device.
    fn upload_weight(&self, w: &LinearWeight) -> Result<Self::Weight>;
    /// Uploads a vector.
    fn upload_vector(&self, v: &[f32]) -> Result<Self::Vector>;
    /// Uploads a step's token ids, positions and sequence boundaries.
    fn upload_layout(&self, layout: &StepLayout) -> Result<Self::Layout>;
    /// Allocates a KV cache.
    fn new_cache(&self, shape: CacheShape) -> Result<Self::Cache>;

    /// Rows of `table` (`[vocab, hidden]`) for the layout's tokens.
    fn embedding(&self, table: &Self::Weight, layout: &Self::Layout) -> Result<Self::Tensor>;
    /// `x / sqrt(mean(x²) + eps) * w` per row.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Vector, eps: f32) -> Result<Self::Tensor>;
    /// `x[n, in] · Wᵀ` → `[n, out]`.
    fn matmul(&self, x: &Self::Tensor, w: &Self::Weight) -> Result<Self::Tensor>;
    /// Rotates each head of `x` (`[n, heads*head_dim]`, HF "rotate half"
    /// convention) by its token's position.
    fn rope(
        &self,
        x: &mut Self::Tensor,
        heads: usize,
        head_dim: usize,
        inv_freq: &Self::Vector,
        layout: &Self::Layout,
    ) -> Result<()>;
    /// Appends `k`, `v` to the cache of `layer` at each token's position, then
    /// computes causal grouped-query attention of every query row over its own
    /// sequence's cache. Returns `[n, q_heads*head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        cache: &mut Self::Cache,
        layer: usize,
        heads: HeadShape,
        layout: &Self::Layout,
    ) -> Result<Self::Tensor>;
    /// `silu(gate) * up`, elementwise.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    /// `x += y`, elementwise.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// `x += a·Wᵀ`: a projection added to the residual stream; backends may
    /// fuse the two.
    fn matmul_add(&self, x: &mut Self::Tensor, a: &Self::Tensor, w: &Self::Weight) -> Result<()> {
        let y = self.matmul(a, w)?;
        self.add_assign(x, &y)
    }
    /// [`Backend::rope`] on `q` (`q_heads`) and `k` (`kv_heads`), then
    /// [`Backend::attention`]; backends may fuse them, so `q` and `k` are
    /// left rotated or not and must not be read afterwards.
    #[allow(clippy::too_many_arguments)]
    fn rope_attention(
        &self,
        q: &mut Self::Tensor,
        k: &mut Self::Tensor,
        v: &Self::Tensor,
        inv_freq: &Self::Vector,
        cache: &mut Self::Cache,
        layer: usize,
        heads: HeadShape,
        layout: &Self::Layout,
    ) -> Result<Self::Tensor> {
        self.rope(q, heads.q_heads, heads.head_dim, inv_freq, layout)?;
        self.rope(k, heads.kv_heads, heads.head_dim, inv_freq, layout)?;
        self.attention(q, k, v, cache, layer, heads, layout)
    }
    /// `rms_norm(x, norm)·Wᵀ` for each weight of `ws` (a block's Q, K and V
    /// projections); backends may fuse the norm and the products.
    fn norm_matmuls(
        &self,
        x: &Self::Tensor,
        norm: &Self::Vector,
        eps: f32,
        ws: &[&Self::Weight],
    ) -> Result<Vec<Self::Tensor>> {
        let h = self.rms_norm(x, norm, eps)?;
        ws.iter().map(|w| self.matmul(&h, w)).collect()
    }
    /// [`Backend::gate_up_silu`] of `rms_norm(x, norm)`; backends may fuse
    /// the norm into the products.
    fn norm_gate_up_silu(
        &self,
        x: &Self::Tensor,
        norm: &Self::Vector,
        eps: f32,
        gate: &Self::Weight,
        up: &Self::Weight,
    ) -> Result<Self::Tensor> {
        let h = self.rms_norm(x, norm, eps)?;
        self.gate_up_silu(&h, gate, up)
    }
    /// `silu(x·Gᵀ) * (x·Uᵀ)`: the MLP's gate and up projections and its
    /// activation; backends may fuse them.
    fn gate_up_silu(
        &self,
        x: &Self::Tensor,
        gate: &Self::Weight,
        up: &Self::Weight,
    ) -> Result<Self::Tensor> {
        let g = self.matmul(x, gate)?;
        let u = self.matmul(x, up)?;
        self.silu_mul(&g, &u)
    }
    /// The row of each sequence's last token in this step: `x` itself when
    /// every sequence has one token (a decode step).
    fn last_rows(&self, x: Self::Tensor, layout: &Self::Layout) -> Result<Self::Tensor>;
    /// Index of the largest value of each row (first one on ties), as a
    /// `[rows, 1]` tensor of f32 values, exact for rows of up to 2^24
    /// columns (longer rows are an error): it stays on the device, so that
    /// a captured decode step can end with it.
    fn argmax_ids(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// [`Backend::argmax_ids`] copied to the host.
    fn argmax_rows(&self, x: &Self::Tensor) -> Result<Vec<u32>> {
        self.ids_to_host(&self.argmax_ids(x)?)
    }
    /// Copies ids as [`Backend::argmax_ids`] returns them to the host.
    fn ids_to_host(&self, ids: &Self::Tensor) -> Result<Vec<u32>> {
        Ok(self.to_host(ids)?.2.into_iter().map(|i| i as u32).collect())
    }
    /// Copies a tensor to the host as `(rows, cols, values)`.
    fn to_host(&self, x: &Self::Tensor) -> Result<(usize, usize, Vec<f32>)>;
    /// Waits for all queued device work (for honest timing).
    fn synchronize(&self) -> Result<()>;
    /// Peak device memory in bytes since the backend was created, for devices
    /// with their own memory (`None` on the CPU).
    fn peak_memory_bytes(&self) -> Option<u64> {
        None
    }
    /// Runs one forward step: uploads `layout` and calls `step` with it. A
    /// backend may instead capture the device work of a decode step (one new
    /// token per sequence) once and replay it for later steps of the same
    /// shape (CUDA graphs); `variant` tells apart closures that do different
    /// work on layouts of the same shape.
    fn run_step(
        &self,
        layout: &StepLayout,
        cache: &mut Self::Cache,
        variant: u32,
        step: &mut StepFn<'_, Self::Layout, Self::Cache, Self::Tensor>,
    ) -> Result<Self::Tensor> {
        let _ = variant;
        let dev_layout = self.upload_layout(layout)?;
        step(&dev_layout, cache)
    }
}

/// Fails with `{op}: shapes RxC and RxC differ` unless `a` and `b` (rows,
/// columns) are equal: the check of the backends' elementwise ops.
pub fn check_same_shape(op: &str, a: (usize, usize), b: (usize, usize)) -> Result<()> {
    if a != b {
        anyhow::bail!("{op}: shapes {}x{} and {}x{} differ", a.0, a.1, b.0, b.1);
    }
    Ok(())
}

/// Fails unless every column index of rows of `cols` columns is an exact
/// f32 value, as [`Backend::argmax_ids`] returns them.
pub fn exact_ids(cols: usize) -> Result<()> {
    if cols > 1 << 24 {
        anyhow::bail!(
            "argmax: rows of {cols} columns are longer than the 2^24 whose indices f32 ids hold exactly"
        );
    }
    Ok(())
}
