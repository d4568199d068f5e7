//! Activations and the KV cache in device memory.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::{Result, bail};
use cudarc::driver::CudaStream;
use cudarc::driver::result;
use cudarc::driver::sys::CUdeviceptr;

use super::gpu::Gpu;
use super::graph::{GraphEntry, GraphKey};
use super::memory::{DevBuf, RawAlloc};
use crate::backend::CacheShape;

/// A row-major `[rows, cols]` f32 matrix on the device.
#[derive(Debug)]
pub struct CudaTensor {
    pub rows: usize,
    pub cols: usize,
    buf: DevBuf,
}

impl CudaTensor {
    /// An uninitialised `[rows, cols]` tensor from the GPU's current pool.
    pub fn empty(gpu: &Gpu, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            rows,
            cols,
            buf: gpu.alloc(rows * cols * 4)?,
        })
    }

    /// Uploads host values.
    pub fn from_host(gpu: &Gpu, rows: usize, cols: usize, data: &[f32]) -> Result<CudaTensor> {
        if data.len() != rows * cols {
            bail!("{rows}x{cols} tensor cannot hold {} values", data.len());
        }
        let t = CudaTensor::empty(gpu, rows, cols)?;
        gpu.upload(t.ptr(), data)?;
        Ok(t)
    }

    /// A copy in a fresh buffer of the current pool.
    pub fn duplicate(&self, gpu: &Gpu) -> Result<CudaTensor> {
        let t = CudaTensor::empty(gpu, self.rows, self.cols)?;
        gpu.copy(t.ptr(), self.ptr(), self.len() * 4)?;
        Ok(t)
    }

    /// Device address of the first value.
    pub fn ptr(&self) -> CUdeviceptr {
        self.buf.ptr()
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Whether the tensor holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// K and V of every layer and slot, `[slots, max_len, kv_heads, head_dim]`
/// f32 per layer, plus the decode steps captured against this cache.
pub struct CudaKvCache {
    pub shape: CacheShape,
    pub(super) graphs: HashMap<GraphKey, GraphEntry>,
    /// Step shapes whose capture failed; they run eagerly.
    pub(super) eager: HashSet<GraphKey>,
    stream: Arc<CudaStream>,
    buf: RawAlloc,
    /// Per (slot, KV head): decode blocks finished in the running attention
    /// kernel; the last one resets it to zero.
    counters: RawAlloc,
}

impl std::fmt::Debug for CudaKvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKvCache")
            .field("shape", &self.shape)
            .field("graphs", &self.graphs.len())
            .finish()
    }
}

impl CudaKvCache {
    /// Allocates a zeroed cache.
    pub fn new(gpu: &Gpu, shape: CacheShape) -> Result<CudaKvCache> {
        let per_layer = shape.slots * shape.max_len * shape.kv_heads * shape.head_dim;
        let bytes = shape
            .layers
            .checked_mul(2 * per_layer * 4)
            .ok_or_else(|| anyhow::anyhow!("KV cache {shape:?} is too large to address"))?;
        let buf = RawAlloc::new(&gpu.stats, bytes)?;
        unsafe { result::memset_d8_async(buf.ptr(), 0, buf.bytes(), gpu.stream.cu_stream()) }?;
        let counters = RawAlloc::new(&gpu.stats, (shape.slots * shape.kv_heads).max(1) * 4)?;
        let stream = gpu.stream.cu_stream();
        unsafe { result::memset_d8_async(counters.ptr(), 0, counters.bytes(), stream) }?;
        Ok(CudaKvCache {
            shape,
            graphs: HashMap::new(),
            eager: HashSet::new(),
            stream: gpu.stream.clone(),
            buf,
            counters,
        })
    }

    fn per_layer_bytes(&self) -> u64 {
        let s = self.shape;
        (s.slots * s.max_len * s.kv_heads * s.head_dim * 4) as u64
    }

    /// Keys of `layer`.
    pub fn k(&self, layer: usize) -> CUdeviceptr {
        self.buf.ptr() + 2 * layer as u64 * self.per_layer_bytes()
    }

    /// The decode attention's completion counters (zero between launches).
    pub fn counters(&self) -> CUdeviceptr {
        self.counters.ptr()
    }

    /// Values of `layer`.
    pub fn v(&self, layer: usize) -> CUdeviceptr {
        self.k(layer) + self.per_layer_bytes()
    }
}

impl Drop for CudaKvCache {
    fn drop(&mut self) {
        // Captured graphs and the cache memory must outlive queued work.
        let _ = self.stream.synchronize();
        self.graphs.clear();
    }
}
