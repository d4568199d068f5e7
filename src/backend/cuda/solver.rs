//! The Cholesky factor of an inverse with cuSOLVER (f64), for GPTQ.
//!
//! cuSOLVER is loaded at run time like the other CUDA libraries; a machine
//! without it has no [`Solver`], and GPTQ factors on the host instead.

use anyhow::{Context, Result};
use cudarc::cusolver::safe::DnHandle;
use cudarc::cusolver::sys;
use cudarc::driver::sys::CUdeviceptr;

use super::gpu::Gpu;

/// A cuSOLVER dense handle on the GPU's stream.
pub struct Solver {
    handle: DnHandle,
}

impl Solver {
    /// A solver on `gpu`'s stream, or `None` when libcusolver cannot be loaded.
    pub fn new(gpu: &Gpu) -> Result<Option<Solver>> {
        if !unsafe { sys::is_culib_present() } {
            return Ok(None);
        }
        gpu.bind()?;
        let handle = DnHandle::new(gpu.stream.clone())
            .map_err(|e| anyhow::anyhow!("cannot create a cuSOLVER handle: {e}"))?;
        Ok(Some(Solver { handle }))
    }

    /// Replaces the symmetric `n`×`n` f64 matrix at `a` (only its lower
    /// triangle in column-major order is read) by the lower Cholesky factor
    /// `L` of its inverse (`A⁻¹ = L Lᵀ`), in the lower triangle. Returns
    /// `false`, leaving `a` undefined, when `A` is not positive definite.
    pub fn inverse_cholesky(&self, gpu: &Gpu, a: CUdeviceptr, n: usize) -> Result<bool> {
        gpu.bind()?;
        let h = self.handle.cu();
        let lower = sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
        let ni = n as i32;
        let ap = a as *mut f64;
        let (mut lw_trf, mut lw_tri) = (0i32, 0i32);
        unsafe {
            sys::cusolverDnDpotrf_bufferSize(h, lower, ni, ap, ni, &mut lw_trf)
                .result()
                .context("cusolverDnDpotrf_bufferSize")?;
            sys::cusolverDnDpotri_bufferSize(h, lower, ni, ap, ni, &mut lw_tri)
                .result()
                .context("cusolverDnDpotri_bufferSize")?;
        }
        let work = gpu.alloc(lw_trf.max(lw_tri).max(1) as usize * 8)?;
        let info = gpu.alloc(4)?;
        let (wp, ip) = (work.ptr() as *mut f64, info.ptr() as *mut i32);
        let ok = |what: &str| -> Result<bool> {
            let mut v = [0i32];
            gpu.download(&mut v, info.ptr())
                .with_context(|| format!("{what} failed"))?;
            Ok(v[0] == 0)
        };
        unsafe { sys::cusolverDnDpotrf(h, lower, ni, ap, ni, wp, lw_trf, ip) }
            .result()
            .context("cusolverDnDpotrf")?;
        if !ok("cusolverDnDpotrf")? {
            return Ok(false);
        }
        unsafe { sys::cusolverDnDpotri(h, lower, ni, ap, ni, wp, lw_tri, ip) }
            .result()
            .context("cusolverDnDpotri")?;
        if !ok("cusolverDnDpotri")? {
            return Ok(false);
        }
        unsafe { sys::cusolverDnDpotrf(h, lower, ni, ap, ni, wp, lw_trf, ip) }
            .result()
            .context("cusolverDnDpotrf of the inverse")?;
        ok("cusolverDnDpotrf of the inverse")
    }
}
