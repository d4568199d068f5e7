//! The CUDA backend (feature `cuda`): cudarc over the driver API, cuBLAS for
//! larger dense products, and CUDA C kernels compiled at run time by NVRTC
//! (cached on disk) for everything else: RMSNorm, RoPE, KV-cache append,
//! tiled prefill and split-K decode attention, SiLU·mul, residual add,
//! argmax, and GEMV kernels that read each weight format directly. Decode
//! steps are captured as CUDA graphs and replayed (see [`graph`]).
//!
//! Activations are f32 and so is the KV cache; weights stay in their storage
//! format. All work goes through one stream.

mod attention;
mod attention_tc;
pub mod awq;
pub mod compile;
pub mod gptq;
mod gpu;
mod graph;
mod int8_gemm;
mod kernels;
mod layout;
mod matmul;
pub mod memory;
mod ops;
mod solver;
mod tensor;
mod weights;

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;

pub use layout::CudaLayout;
pub use tensor::{CudaKvCache, CudaTensor};
pub use weights::CudaWeight;

use super::{Backend, CacheShape, HeadShape, StepLayout};
use crate::quant::LinearWeight;
use gpu::Gpu;
use matmul::FusedNorm;

/// A CUDA device running the Llama forward pass.
pub struct CudaBackend {
    gpu: Gpu,
    /// Bumped by every upload, so that graphs captured against replaced
    /// weights are never replayed.
    epoch: AtomicU64,
}

impl CudaBackend {
    /// Opens `cuda:{ordinal}` and compiles (or loads cached) kernels.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        Ok(CudaBackend {
            gpu: Gpu::new(ordinal)?,
            epoch: AtomicU64::new(0),
        })
    }

    /// Uploads a host matrix as an activation tensor.
    pub fn tensor_from_host(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CudaTensor> {
        self.gpu.bind()?;
        CudaTensor::from_host(&self.gpu, rows, cols, data)
    }

    /// Bytes of device memory held by this backend now.
    pub fn current_memory_bytes(&self) -> u64 {
        self.gpu.stats.current()
    }

    fn bump_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type Vector = CudaTensor;
    type Cache = CudaKvCache;
    type Layout = CudaLayout;

    fn describe(&self) -> String {
        format!(
            "cuda:{} {} ({:.1} GiB, {} SMs)",
            self.gpu.ctx.ordinal(),
            self.gpu.name,
            self.gpu.total_mem as f64 / (1u64 << 30) as f64,
            self.gpu.sm_count
        )
    }

    fn upload_weight(&self, w: &LinearWeight) -> Result<CudaWeight> {
        self.gpu.bind()?;
        self.bump_epoch();
        weights::upload_weight(&self.gpu, w)
    }

    fn upload_vector(&self, v: &[f32]) -> Result<CudaTensor> {
        self.gpu.bind()?;
        self.bump_epoch();
        CudaTensor::from_host(&self.gpu, 1, v.len(), v)
    }

    fn upload_layout(&self, layout: &StepLayout) -> Result<CudaLayout> {
        self.gpu.bind()?;
        CudaLayout::new(&self.gpu, layout)
    }

    fn new_cache(&self, shape: CacheShape) -> Result<CudaKvCache> {
        self.gpu.bind()?;
        CudaKvCache::new(&self.gpu, shape)
    }

    fn embedding(&self, table: &CudaWeight, layout: &CudaLayout) -> Result<CudaTensor> {
        self.gpu.bind()?;
        ops::embedding(&self.gpu, table, layout)
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        self.gpu.bind()?;
        ops::rms_norm(&self.gpu, x, w, eps)
    }

    fn matmul(&self, x: &CudaTensor, w: &CudaWeight) -> Result<CudaTensor> {
        self.gpu.bind()?;
        matmul::matmul(&self.gpu, x, w)
    }

    fn gate_up_silu(
        &self,
        x: &CudaTensor,
        gate: &CudaWeight,
        up: &CudaWeight,
    ) -> Result<CudaTensor> {
        self.gpu.bind()?;
        if let Some(y) = matmul::gate_up_silu(&self.gpu, x, gate, up, None)? {
            return Ok(y);
        }
        let g = matmul::matmul(&self.gpu, x, gate)?;
        let u = matmul::matmul(&self.gpu, x, up)?;
        ops::silu_mul(&self.gpu, &g, &u)
    }

    fn norm_matmuls(
        &self,
        x: &CudaTensor,
        norm: &CudaTensor,
        eps: f32,
        ws: &[&CudaWeight],
    ) -> Result<Vec<CudaTensor>> {
        self.gpu.bind()?;
        let fused = FusedNorm { weight: norm, eps };
        if let Some(ys) = matmul::norm_matmuls(&self.gpu, x, fused, ws)? {
            return Ok(ys);
        }
        let h = ops::rms_norm(&self.gpu, x, norm, eps)?;
        ws.iter()
            .map(|w| matmul::matmul(&self.gpu, &h, w))
            .collect()
    }

    fn norm_gate_up_silu(
        &self,
        x: &CudaTensor,
        norm: &CudaTensor,
        eps: f32,
        gate: &CudaWeight,
        up: &CudaWeight,
    ) -> Result<CudaTensor> {
        self.gpu.bind()?;
        let fused = FusedNorm { weight: norm, eps };
        if let Some(y) = matmul::gate_up_silu(&self.gpu, x, gate, up, Some(fused))? {
            return Ok(y);
        }
        let h = ops::rms_norm(&self.gpu, x, norm, eps)?;
        self.gate_up_silu(&h, gate, up)
    }

    fn matmul_add(&self, x: &mut CudaTensor, a: &CudaTensor, w: &CudaWeight) -> Result<()> {
        self.gpu.bind()?;
        matmul::matmul_add(&self.gpu, x, a, w)
    }

    fn rope_attention(
        &self,
        q: &mut CudaTensor,
        k: &mut CudaTensor,
        v: &CudaTensor,
        inv_freq: &CudaTensor,
        cache: &mut CudaKvCache,
        layer: usize,
        heads: HeadShape,
        layout: &CudaLayout,
    ) -> Result<CudaTensor> {
        self.gpu.bind()?;
        // Decode attention rotates Q and K itself.
        let fused = attention::is_decode(layout);
        if !fused {
            let (g, d) = (&self.gpu, heads.head_dim);
            ops::rope(g, q, heads.q_heads, d, inv_freq, layout)?;
            ops::rope(g, k, heads.kv_heads, d, inv_freq, layout)?;
        }
        attention::attention(
            &self.gpu,
            q,
            k,
            v,
            cache,
            layer,
            heads,
            layout,
            fused.then_some(inv_freq),
        )
    }

    fn rope(
        &self,
        x: &mut CudaTensor,
        heads: usize,
        head_dim: usize,
        inv_freq: &CudaTensor,
        layout: &CudaLayout,
    ) -> Result<()> {
        self.gpu.bind()?;
        ops::rope(&self.gpu, x, heads, head_dim, inv_freq, layout)
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        cache: &mut CudaKvCache,
        layer: usize,
        heads: HeadShape,
        layout: &CudaLayout,
    ) -> Result<CudaTensor> {
        self.gpu.bind()?;
        attention::attention(&self.gpu, q, k, v, cache, layer, heads, layout, None)
    }

    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        self.gpu.bind()?;
        ops::silu_mul(&self.gpu, gate, up)
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        self.gpu.bind()?;
        ops::add_assign(&self.gpu, x, y)
    }

    fn last_rows(&self, x: CudaTensor, layout: &CudaLayout) -> Result<CudaTensor> {
        if x.rows == layout.host.seqs.len() && x.rows == layout.n() {
            return Ok(x);
        }
        self.gpu.bind()?;
        ops::last_rows(&self.gpu, &x, layout)
    }

    fn argmax_ids(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.gpu.bind()?;
        ops::argmax_ids(&self.gpu, x)
    }

    fn to_host(&self, x: &CudaTensor) -> Result<(usize, usize, Vec<f32>)> {
        self.gpu.bind()?;
        Ok((x.rows, x.cols, ops::to_host(&self.gpu, x)?))
    }

    fn synchronize(&self) -> Result<()> {
        self.gpu.sync()
    }

    fn peak_memory_bytes(&self) -> Option<u64> {
        Some(self.gpu.stats.peak())
    }

    fn run_step(
        &self,
        layout: &StepLayout,
        cache: &mut CudaKvCache,
        variant: u32,
        step: &mut graph::StepFn<'_>,
    ) -> Result<CudaTensor> {
        graph::run_step(
            &self.gpu,
            self.epoch.load(Ordering::Relaxed),
            layout,
            cache,
            variant,
            step,
        )
    }
}
