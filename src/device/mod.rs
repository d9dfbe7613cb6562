//! One backend, two devices: the code that runs the PTX kernels, written once over a small
//! [`Device`] trait, with a CUDA GPU ([`CudaDevice`](crate::cuda::CudaDevice), feature
//! `cuda`) and the simulated device ([`SimDevice`](crate::sim::SimDevice), feature `sim`)
//! behind it.
//!
//! [`DeviceBackend`] is the [`Backend`](crate::Backend) of [`SpectralSgd`](crate::SpectralSgd)
//! on a device: it owns the layout, allocates the state and the descriptor tables on the
//! device, re-uploads the matrix table when the caller's buffers move, and enqueues each step
//! as one launch per pass for the whole batch ([`crate::kernels::plan`]). Because the CUDA
//! path and the simulated path are the same code, a test suite that runs on the simulator
//! (as this crate's CI does) runs the GPU path's orchestration too; only the
//! implementations of the trait differ.
//!
//! ```
//! # #[cfg(feature = "sim")] {
//! use spectral_step::sim::{SimDevice, Simulated};
//! use spectral_step::{MatrixShape, MatrixStatus, SpectralSgd, SpectralSgdConfig};
//!
//! let device = SimDevice::new()?;
//! let shapes = [MatrixShape::new(16, 8)];
//! let mut optimizer =
//!     SpectralSgd::<Simulated>::on_device(&shapes, SpectralSgdConfig::default(), device.clone())?;
//! let mut weights = vec![device.upload(&vec![0.5f32; 128])?];
//! let grads = vec![device.upload(&(0..128).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<_>>())?];
//! optimizer.step(&mut weights, &grads)?; // enqueued; nothing waits
//! assert_eq!(optimizer.report()?.matrices[0].status, MatrixStatus::Updated);
//! let updated = device.download(&weights[0])?;
//! assert!(updated.iter().any(|&w| w != 0.5));
//! # }
//! # Ok::<(), spectral_step::Error>(())
//! ```

mod backend;
mod gemm;
mod power;

pub use backend::{DeviceBackend, PendingReport};
pub use gemm::{Gemm, GemmBatch, GemmOutput, host_gemm};
pub use power::PowerIteration;

use std::fmt;

use crate::element::Element;
use crate::error::Result;
use crate::kernels::Launch;

pub(crate) mod sealed {
    pub trait Sealed {}
}

/// What the device backend needs from a device: memory, the addresses of the caller's
/// buffers, and kernel launches in order on one stream. Implemented by this crate's devices
/// only.
///
/// Every call is enqueued in order; a read ([`download`](Self::download)) waits for the work
/// before it. Nothing here hands out device memory to safe code except through the device's
/// own buffer types, whose lengths the backend checks against its layout.
pub trait Device: sealed::Sealed + fmt::Debug + Sized {
    /// A caller's buffer of `T` on this device (what a step takes as weights and gradients).
    type Slice<T: Element>;
    /// The device's own byte buffers (optimizer state and tables).
    type Buffer: fmt::Debug;
    /// Held while enqueued work may still use a caller's buffer; dropping it, once that work
    /// is enqueued, records the use (cudarc's stream ordering). `()` where nothing is needed.
    type Guard<'a>
    where
        Self: 'a;

    /// The device a backend opens when none is given (CUDA device 0, a new simulator).
    fn open_default() -> Result<Self>;

    /// What the device is, for messages.
    fn describe(&self) -> String;

    /// Dynamic shared memory one CTA may use (with the opt-in above 48 KiB).
    fn max_shared_bytes(&self) -> u32;

    /// Lets the power kernels use `bytes` of dynamic shared memory per CTA (CUDA needs an
    /// opt-in above 48 KiB). `bytes` is at most [`max_shared_bytes`](Self::max_shared_bytes).
    fn prepare_power_shared(&self, bytes: u32) -> Result<()>;

    /// A zero-filled buffer of `bytes` bytes, aligned to at least 256 bytes.
    fn alloc(&self, bytes: usize) -> Result<Self::Buffer>;

    /// Copies `bytes` into `buffer` at byte `offset`. Errors if that does not fit. (On a
    /// CUDA device a copy from pageable memory may wait for the stream: for set-up and state
    /// loads, not for steps.)
    fn upload(&self, buffer: &mut Self::Buffer, offset: usize, bytes: &[u8]) -> Result<()>;

    /// Host memory through which a step uploads a table without waiting for the device.
    type Staging: fmt::Debug;

    /// Staging for uploads of exactly `bytes` bytes.
    fn alloc_staging(&self, bytes: usize) -> Result<Self::Staging>;

    /// Copies `bytes` (as many as `staging` was made for) to the start of `buffer`, enqueued
    /// in order like every call, and without waiting for the device: on CUDA through one of
    /// a few page-locked buffers used in turn, so that only an upload whose buffer's previous
    /// copy has not yet run (the host several uploads ahead of the device) waits for it.
    fn upload_staged(
        &self,
        staging: &mut Self::Staging,
        buffer: &mut Self::Buffer,
        bytes: &[u8],
    ) -> Result<()>;

    /// Reads `len` bytes of `buffer` at byte `offset`, after all enqueued work. Errors if
    /// that does not fit.
    fn download(&self, buffer: &Self::Buffer, offset: usize, len: usize) -> Result<Vec<u8>>;

    /// The device address of one of the device's own buffers.
    fn buffer_address(&self, buffer: &Self::Buffer) -> u64;

    /// Elements in a caller's buffer.
    fn slice_len<T: Element>(slice: &Self::Slice<T>) -> usize;

    /// The device address of a caller's buffer that kernels will read, and the guard that
    /// orders that use. Errors if the buffer belongs to another device.
    fn read_address<'a, T: Element>(
        &'a self,
        slice: &'a Self::Slice<T>,
    ) -> Result<(u64, Self::Guard<'a>)>;

    /// As [`read_address`](Self::read_address), for a buffer kernels will write.
    fn write_address<'a, T: Element>(
        &'a self,
        slice: &'a mut Self::Slice<T>,
    ) -> Result<(u64, Self::Guard<'a>)>;

    /// Enqueues `launch`.
    ///
    /// # Safety
    ///
    /// `launch.args` must match the `.param` list of `launch.kernel` in order and type, and
    /// every address the kernel can reach through them (the descriptor tables included) must
    /// be a live allocation of this device large enough for the accesses the kernel makes
    /// for the grid and layout it was built for, until the launch has run.
    unsafe fn launch(&self, launch: &Launch) -> Result<()>;

    /// Readies [`gemm`](Self::gemm): on CUDA loads cuBLAS and binds a handle to the
    /// device's stream ([`Error::NoCublas`](crate::Error::NoCublas) where no cuBLAS loads:
    /// what needs products cannot run on this device, the rest can). Idempotent.
    fn prepare_gemm(&self) -> Result<()>;

    /// Enqueues `gemm` in order with the launches: `bf16` operands, `f32` accumulation, `C`
    /// stored as `gemm.output` (cuBLAS on CUDA, [`host_gemm`] on the simulator). Errors
    /// unless [`prepare_gemm`](Self::prepare_gemm) succeeded.
    ///
    /// # Safety
    ///
    /// `gemm.a`, `gemm.b` and `gemm.c` must be addresses of live allocations of this device
    /// holding at least [`Gemm::byte_lengths`] bytes from those addresses until the batch has
    /// run, and `C` must not overlap `A` or `B`.
    unsafe fn gemm(&self, gemm: &Gemm) -> Result<()>;

    /// Waits until everything enqueued has run.
    fn synchronize(&self) -> Result<()>;
}

/// `offset + len` when `[offset, offset + len)` lies inside a buffer of `buffer_len` bytes:
/// the bounds check of every device's `upload` and `download`.
#[cfg(any(feature = "cuda", feature = "sim"))]
pub(crate) fn checked_end(buffer_len: usize, offset: usize, len: usize) -> Result<usize> {
    offset
        .checked_add(len)
        .filter(|&end| end <= buffer_len)
        .ok_or_else(|| {
            crate::error::Error::InvalidArgument(format!(
                "{len} bytes at offset {offset} do not fit a device buffer of {buffer_len} bytes"
            ))
        })
}

/// `f32` values `range` (in values, not bytes) of one of `device`'s own buffers, after all
/// enqueued work.
pub(crate) fn download_f32<D: Device>(
    device: &D,
    buffer: &D::Buffer,
    range: std::ops::Range<usize>,
) -> Result<Vec<f32>> {
    let bytes = device.download(buffer, 4 * range.start, 4 * range.len())?;
    Ok(bytemuck::pod_collect_to_vec(&bytes))
}
