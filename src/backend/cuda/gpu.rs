//! One CUDA device as the backend sees it: context, the single stream all
//! work goes through, cuBLAS, the compiled kernels, and memory accounting.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{self, CUdevice_attribute, CUdeviceptr};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, result};
use cudarc::nvrtc::Ptx;

use super::compile::compile_kernels;
use super::kernels::KERNEL_NAMES;
use super::memory::{DevBuf, MemStats, Pool, RawAlloc};

/// cuBLAS workspace, set explicitly so that cuBLAS allocates nothing while a
/// CUDA graph is being captured.
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Dynamic shared memory any kernel may take without raising its limit.
const DEFAULT_DYNAMIC_SMEM: u32 = 48 * 1024;

/// A launch argument: anything passed to a kernel by value.
pub type Arg = *mut c_void;

/// Builds a kernel argument from a reference to a plain value.
pub fn arg<T>(v: &T) -> Arg {
    v as *const T as *mut c_void
}

/// Grid of a grid-stride kernel over `n` items with 256-thread blocks: at
/// most 16 blocks per SM.
pub fn grid_for(gpu: &Gpu, n: usize) -> (u32, u32, u32) {
    (n.div_ceil(256).clamp(1, gpu.sm_count * 16) as u32, 1, 1)
}

/// The device, its stream, libraries and kernels.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    _blas_workspace: RawAlloc,
    funcs: HashMap<&'static str, CudaFunction>,
    pub stats: Arc<MemStats>,
    /// The pool outputs come from; swapped for a graph's own pool while a
    /// decode step is being captured.
    pools: Mutex<Vec<Arc<Pool>>>,
    pub name: String,
    pub sm_count: usize,
    pub total_mem: usize,
    /// Whether launches allow programmatic dependent launch.
    pdl: bool,
    /// The compiled kernels, whose block timeline ring `timeline` reads.
    module: Arc<CudaModule>,
    /// Where the block timeline goes when the device is closed
    /// (`QUANTBENCH_CUDA_TRACE`); the kernels record one only then.
    timeline: Option<PathBuf>,
}

// SAFETY: every driver handle here is used through the one stream with the
// context bound to the calling thread first; cuBLAS calls are serialised by
// the backend's single-stream use.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

impl Drop for Gpu {
    /// Writes the block timeline when one was asked for; a failure is
    /// reported, not raised, since the run's results are already out.
    fn drop(&mut self) {
        let Some(path) = self.timeline.take() else {
            return;
        };
        match self
            .timeline()
            .and_then(|bytes| Ok(std::fs::write(&path, bytes)?))
        {
            Ok(()) => eprintln!(
                "block timeline written to {0}; `quantbench timeline {0}` shows its last step",
                path.display()
            ),
            Err(e) => eprintln!(
                "warning: could not write the block timeline to {}: {e:#}",
                path.display()
            ),
        }
    }
}

impl Gpu {
    /// Opens device `ordinal`: context, stream, cuBLAS, compiled kernels.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!(
                "no CUDA driver (libcuda.so) was found on this machine; --device cuda needs an NVIDIA GPU and its driver"
            );
        }
        let count = CudaContext::device_count().context("cannot query CUDA devices")?;
        if ordinal >= count.max(0) as usize {
            bail!("cuda:{ordinal} does not exist: this machine has {count} CUDA device(s)");
        }
        let ctx =
            CudaContext::new(ordinal).with_context(|| format!("cannot open cuda:{ordinal}"))?;
        // One stream, no cross-stream event bookkeeping (it would break graph capture).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let stats = MemStats::new(ctx.clone());
        let blas = CudaBlas::new(stream.clone()).context("cannot create a cuBLAS handle")?;
        let workspace = RawAlloc::new(&stats, CUBLAS_WORKSPACE_BYTES)?;
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *blas.handle(),
                workspace.ptr() as *mut c_void,
                CUBLAS_WORKSPACE_BYTES,
            )
            .result()
            .context("cublasSetWorkspace")?;
        }
        let (major, minor) = ctx.compute_capability()?;
        let timeline = std::env::var_os("QUANTBENCH_CUDA_TRACE").map(PathBuf::from);
        let ptx = compile_kernels(major, minor, timeline.is_some())?;
        let module = ctx
            .load_module(Ptx::from_src(ptx))
            .context("cannot load the compiled kernels")?;
        let mut funcs = HashMap::new();
        for &name in KERNEL_NAMES {
            funcs.insert(
                name,
                module
                    .load_function(name)
                    .with_context(|| format!("kernel {name} is missing"))?,
            );
        }
        let sm_count =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let pool = Pool::new(stats.clone());
        Ok(Gpu {
            pdl: pdl_enabled(major),
            name: ctx.name()?,
            total_mem: ctx.total_mem()?,
            sm_count,
            ctx,
            stream,
            blas,
            _blas_workspace: workspace,
            funcs,
            stats,
            pools: Mutex::new(vec![pool]),
            module,
            timeline,
        })
    }

    /// The block timeline the kernels recorded (`trace_event` in
    /// common.cuh), as a `bench::timeline` file.
    fn timeline(&self) -> Result<Vec<u8>> {
        self.bind()?;
        self.stream.synchronize()?;
        // The 64-bit words of a device global, whatever its size.
        let read = |name: &str| -> Result<Vec<u64>> {
            let view = self.module.get_global(name, &self.stream)?;
            let mut host = vec![0u8; view.len()];
            let (ptr, _) = cudarc::driver::DevicePtr::device_ptr(&view, &self.stream);
            unsafe { result::memcpy_dtoh_sync(&mut host, ptr) }?;
            Ok(host
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
                .collect())
        };
        let recorded = read("qb_trace_recorded")?;
        let ring = read("qb_trace")?;
        if recorded.len() != 1 || ring.is_empty() || ring.len() % 3 != 0 {
            bail!(
                "the kernels' timeline globals have unexpected sizes ({} and {} words)",
                recorded.len(),
                ring.len()
            );
        }
        Ok(crate::bench::timeline::encode(recorded[0], &ring))
    }

    /// Makes the context current on this thread.
    pub fn bind(&self) -> Result<()> {
        Ok(self.ctx.bind_to_thread()?)
    }

    /// The pool new buffers come from now.
    pub fn pool(&self) -> Arc<Pool> {
        self.pools
            .lock()
            .expect("pool stack")
            .last()
            .expect("base pool")
            .clone()
    }

    /// Routes allocations to `pool` until [`Gpu::pop_pool`].
    pub fn push_pool(&self, pool: Arc<Pool>) {
        self.pools.lock().expect("pool stack").push(pool);
    }

    /// Undoes the last [`Gpu::push_pool`].
    pub fn pop_pool(&self) {
        let mut pools = self.pools.lock().expect("pool stack");
        if pools.len() > 1 {
            pools.pop();
        }
    }

    /// A buffer of `bytes` from the current pool.
    pub fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        self.pool().alloc(bytes)
    }

    /// Launches kernel `name` on the stream; with programmatic dependent
    /// launch (see `pdl_start` in common.cuh) its blocks may be scheduled
    /// before the previous kernel has finished.
    pub fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &mut [Arg],
    ) -> Result<()> {
        let f = self
            .funcs
            .get(name)
            .with_context(|| format!("unknown kernel {name}"))?;
        let mut attrs = [launch_attribute_pdl()];
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: self.stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: if self.pdl { 1 } else { 0 },
        };
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                f.cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
            .result()
        }
        .with_context(|| format!("launching {name} grid {grid:?} block {block} smem {smem}"))
    }

    /// At most `blocks`, and no more 256-thread blocks of kernel `name`
    /// (with `smem` bytes of dynamic shared memory) than the GPU holds at
    /// once: the grid of a kernel whose blocks loop over logical blocks.
    pub fn one_wave(&self, name: &str, blocks: usize, smem: u32) -> Result<usize> {
        let f = self
            .funcs
            .get(name)
            .with_context(|| format!("unknown kernel {name}"))?;
        let per_sm = unsafe {
            result::occupancy::max_active_block_per_multiprocessor(
                f.cu_function(),
                256,
                smem as usize,
            )
        }
        .with_context(|| format!("occupancy of {name}"))?;
        Ok(blocks.min(self.sm_count * per_sm.max(1) as usize))
    }

    /// Lets kernel `name` take `bytes` of dynamic shared memory: raises its
    /// limit when that and the kernel's static shared memory together exceed
    /// the 48 KiB every kernel may take by default.
    pub fn reserve_dynamic_smem(&self, name: &str, bytes: u32) -> Result<()> {
        let f = self
            .funcs
            .get(name)
            .with_context(|| format!("unknown kernel {name}"))?;
        // The default limit covers static and dynamic shared memory together.
        let static_bytes = unsafe {
            result::function::get_function_attribute(
                f.cu_function(),
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
            )
        }?;
        if bytes as u64 + static_bytes.max(0) as u64 <= DEFAULT_DYNAMIC_SMEM as u64 {
            return Ok(());
        }
        unsafe {
            result::function::set_function_attribute(
                f.cu_function(),
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }?;
        Ok(())
    }

    /// Copies host values to device memory at `dst` (queued on the stream).
    pub fn upload<T>(&self, dst: CUdeviceptr, src: &[T]) -> Result<()> {
        if !src.is_empty() {
            unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }?;
        }
        Ok(())
    }

    /// Copies device memory at `src` into `dst` and waits for it.
    pub fn download<T>(&self, dst: &mut [T], src: CUdeviceptr) -> Result<()> {
        if !dst.is_empty() {
            unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }?;
        }
        self.sync()
    }

    /// Device-to-device copy of `bytes` (queued).
    pub fn copy(&self, dst: CUdeviceptr, src: CUdeviceptr, bytes: usize) -> Result<()> {
        if bytes > 0 {
            unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }?;
        }
        Ok(())
    }

    /// Waits for all queued work; reports errors of earlier launches.
    pub fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .context("a CUDA kernel failed (reported at synchronization)")
    }
}

/// The launch attribute that allows programmatic dependent launch.
fn launch_attribute_pdl() -> sys::CUlaunchAttribute {
    let mut value = sys::CUlaunchAttributeValue { pad: [0; 64] };
    value.programmaticStreamSerializationAllowed = 1;
    sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value,
    }
}

/// Whether kernels use programmatic dependent launch: devices of compute
/// capability 9.0 and later, unless `QUANTBENCH_CUDA_PDL=0`.
fn pdl_enabled(major: i32) -> bool {
    major >= 9 && std::env::var("QUANTBENCH_CUDA_PDL").map_or(true, |v| v != "0")
}
