//! Device memory: owned driver allocations that report out-of-memory with
//! the bytes asked for and free, peak tracking, and a caching pool so that
//! steady-state steps take nothing new from the driver.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Result, bail};
use cudarc::driver::sys::{CUdeviceptr, CUresult};
use cudarc::driver::{CudaContext, result};

/// Bytes held by this backend's allocations, now and at most.
#[derive(Debug)]
pub struct MemStats {
    ctx: Arc<CudaContext>,
    current: AtomicU64,
    peak: AtomicU64,
}

impl MemStats {
    /// Counters for allocations in `ctx`.
    pub fn new(ctx: Arc<CudaContext>) -> Arc<Self> {
        Arc::new(MemStats {
            ctx,
            current: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        })
    }

    /// Largest number of bytes held at once since creation.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Bytes held now.
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::Relaxed)
    }

    fn add(&self, bytes: usize) {
        let now = self.current.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&self, bytes: usize) {
        self.current.fetch_sub(bytes as u64, Ordering::Relaxed);
    }

    /// The device context these allocations live in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

/// One driver allocation, freed on drop.
#[derive(Debug)]
pub struct RawAlloc {
    ptr: CUdeviceptr,
    bytes: usize,
    stats: Arc<MemStats>,
}

impl RawAlloc {
    /// Allocates `bytes` (at least one) on the device. Out of memory is an
    /// error naming the bytes asked for, free and total.
    pub fn new(stats: &Arc<MemStats>, bytes: usize) -> Result<RawAlloc> {
        stats.ctx.bind_to_thread()?;
        let bytes = bytes.max(1);
        match unsafe { result::malloc_sync(bytes) } {
            Ok(ptr) => {
                stats.add(bytes);
                Ok(RawAlloc {
                    ptr,
                    bytes,
                    stats: stats.clone(),
                })
            }
            Err(e) if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY => Err(oom_error(stats, bytes)),
            Err(e) => bail!("cuMemAlloc of {bytes} bytes failed: {e:?}"),
        }
    }

    /// Device address.
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for RawAlloc {
    fn drop(&mut self) {
        let _ = self.stats.ctx.bind_to_thread();
        // cuMemFree waits for work that may still use the memory.
        let _ = unsafe { result::free_sync(self.ptr) };
        self.stats.sub(self.bytes);
    }
}

/// The error for a failed allocation: what was asked for and what is free.
pub fn oom_error(stats: &MemStats, bytes: usize) -> anyhow::Error {
    let (free, total) = result::mem_get_info().unwrap_or((0, 0));
    anyhow::anyhow!(
        "CUDA out of memory on cuda:{}: asked for {bytes} bytes ({:.1} MiB), {free} bytes ({:.1} MiB) free of {total} ({:.1} MiB held by quantbench)",
        stats.ctx.ordinal(),
        bytes as f64 / 1048576.0,
        free as f64 / 1048576.0,
        stats.current() as f64 / 1048576.0,
    )
}

/// Rounds a request up to its size class: multiples of 256 bytes below
/// 64 KiB, else four classes per power of two (at most 25% waste).
fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(256);
    if bytes <= 65536 {
        return bytes.div_ceil(256) * 256;
    }
    let step = (bytes.next_power_of_two() / 8).max(256);
    bytes.div_ceil(step) * step
}

/// A caching allocator: freed buffers wait in per-size free lists for the
/// next request of their class. All users share one stream, so a buffer freed
/// on the host may be reused by later work right away (stream order keeps
/// the earlier readers first).
#[derive(Debug)]
pub struct Pool {
    stats: Arc<MemStats>,
    free: Mutex<HashMap<usize, Vec<RawAlloc>>>,
}

impl Pool {
    /// An empty pool.
    pub fn new(stats: Arc<MemStats>) -> Arc<Pool> {
        Arc::new(Pool {
            stats,
            free: Mutex::new(HashMap::new()),
        })
    }

    /// A buffer of at least `bytes` bytes, from the free list when possible.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DevBuf> {
        let class = size_class(bytes);
        let cached = self
            .free
            .lock()
            .expect("pool lock")
            .get_mut(&class)
            .and_then(Vec::pop);
        let raw = match cached {
            Some(raw) => raw,
            None => match RawAlloc::new(&self.stats, class) {
                Ok(raw) => raw,
                Err(_) => {
                    // Give cached blocks back to the driver and try once more.
                    self.release_cached();
                    RawAlloc::new(&self.stats, class)?
                }
            },
        };
        Ok(DevBuf {
            raw: Some(raw),
            pool: self.clone(),
        })
    }

    /// Frees every cached (unused) block.
    pub fn release_cached(&self) {
        self.free.lock().expect("pool lock").clear();
    }

    fn give_back(&self, raw: RawAlloc) {
        let class = raw.bytes;
        self.free
            .lock()
            .expect("pool lock")
            .entry(class)
            .or_default()
            .push(raw);
    }
}

/// A buffer borrowed from a [`Pool`]; returns there on drop.
#[derive(Debug)]
pub struct DevBuf {
    raw: Option<RawAlloc>,
    pool: Arc<Pool>,
}

impl DevBuf {
    /// Device address.
    pub fn ptr(&self) -> CUdeviceptr {
        self.raw.as_ref().expect("live buffer").ptr
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            self.pool.give_back(raw);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_requests_with_bounded_waste() {
        assert_eq!(size_class(1), 256);
        assert_eq!(size_class(257), 512);
        assert_eq!(size_class(65536), 65536);
        for bytes in [65537, 100_000, 1 << 20, (1 << 20) + 1, 123_456_789] {
            let c = size_class(bytes);
            assert!(c >= bytes && (c - bytes) * 4 <= bytes, "{bytes} -> {c}");
            assert_eq!(c % 256, 0);
        }
    }
}
