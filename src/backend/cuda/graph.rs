//! Decode steps as CUDA graphs: the first decode step of a shape runs once
//! eagerly (filling a private memory pool), then is captured with the same
//! allocations into a graph kept with the KV cache; later steps of that shape
//! only rewrite the layout words and replay the graph. Nothing is allocated
//! from the driver on the replay path.

use std::sync::Arc;

use anyhow::{Context, Result};
use cudarc::driver::CudaGraph;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};

use super::gpu::Gpu;
use super::layout::CudaLayout;
use super::memory::Pool;
use super::tensor::{CudaKvCache, CudaTensor};
use crate::backend::StepLayout;

/// Most sequences in a captured decode step.
pub const MAX_GRAPH_SEQS: usize = 512;

/// What makes two decode steps replayable by the same graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GraphKey {
    /// Number of sequences (one new token each).
    pub seqs: usize,
    /// The caller's variant tag (e.g. all logits or last rows only).
    pub variant: u32,
}

/// A captured step and everything its kernels address.
pub struct GraphEntry {
    graph: CudaGraph,
    layout: CudaLayout,
    output: CudaTensor,
    /// Weight generation the graph was captured against.
    epoch: u64,
    _pool: Arc<Pool>,
}

/// The step closure a backend runs.
pub type StepFn<'a> = dyn FnMut(&CudaLayout, &mut CudaKvCache) -> Result<CudaTensor> + 'a;

/// Whether CUDA graphs are used (`QUANTBENCH_CUDA_GRAPHS=0` turns them off).
pub fn graphs_enabled() -> bool {
    std::env::var("QUANTBENCH_CUDA_GRAPHS")
        .map(|v| v != "0")
        .unwrap_or(true)
}

/// Whether `layout` is a decode step that may run as a graph.
pub fn is_decode_step(layout: &StepLayout) -> bool {
    !layout.seqs.is_empty()
        && layout.seqs.len() <= MAX_GRAPH_SEQS
        && layout.seqs.iter().all(|s| s.len == 1)
}

/// Runs `step` for `layout`, through a captured graph for decode steps.
pub fn run_step(
    gpu: &Gpu,
    epoch: u64,
    layout: &StepLayout,
    cache: &mut CudaKvCache,
    variant: u32,
    step: &mut StepFn<'_>,
) -> Result<CudaTensor> {
    gpu.bind()?;
    let key = GraphKey {
        seqs: layout.seqs.len(),
        variant,
    };
    if !graphs_enabled() || !is_decode_step(layout) || cache.eager.contains(&key) {
        let l = CudaLayout::new(gpu, layout)?;
        return step(&l, cache);
    }
    let s = cache.shape;
    for c in &layout.seqs {
        anyhow::ensure!(
            c.slot < s.slots && c.start < s.max_len,
            "KV cache overflow: slot {} position {} exceed {} slots x {} tokens",
            c.slot,
            c.start,
            s.slots,
            s.max_len
        );
    }
    if let Some(entry) = cache.graphs.get_mut(&key) {
        if entry.epoch == epoch {
            entry.layout.rewrite(gpu, layout)?;
            entry
                .graph
                .launch()
                .context("replaying a captured decode step")?;
            return entry.output.duplicate(gpu);
        }
        cache.graphs.remove(&key);
    }
    // First step of this shape: run it eagerly in a private pool...
    let pool = Pool::new(gpu.stats.clone());
    gpu.push_pool(pool.clone());
    let eager = CudaLayout::new(gpu, layout).and_then(|l| step(&l, cache).map(|out| (l, out)));
    gpu.pop_pool();
    let (dev_layout, out) = eager?;
    let result = out.duplicate(gpu)?;
    drop(out);
    // ...then capture the same work, which now finds every buffer cached.
    gpu.push_pool(pool.clone());
    let captured = capture(gpu, &dev_layout, cache, step);
    gpu.pop_pool();
    match captured {
        Ok((graph, output)) => {
            cache.graphs.insert(
                key,
                GraphEntry {
                    graph,
                    layout: dev_layout,
                    output,
                    epoch,
                    _pool: pool,
                },
            );
        }
        Err(e) => {
            tracing::warn!(
                "decode step could not be captured as a CUDA graph ({e:#}); running it eagerly"
            );
            cache.eager.insert(key);
        }
    }
    Ok(result)
}

fn capture(
    gpu: &Gpu,
    layout: &CudaLayout,
    cache: &mut CudaKvCache,
    step: &mut StepFn<'_>,
) -> Result<(CudaGraph, CudaTensor)> {
    gpu.stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .context("cuStreamBeginCapture")?;
    let out = step(layout, cache);
    let graph = gpu.stream.end_capture(CUgraphInstantiate_flags(0));
    let out = out?;
    let graph = graph
        .context("cuStreamEndCapture")?
        .context("captured an empty graph")?;
    graph.upload().context("cuGraphUpload")?;
    Ok((graph, out))
}
