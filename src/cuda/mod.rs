//! The CUDA GPU: [`CudaDevice`] behind the [`Device`](crate::device::Device) seam, and
//! [`Cuda`], the device backend on it. The same [`SpectralSgd`] API on device buffers
//! (`cudarc::driver::CudaSlice`, the buffer type candle's CUDA tensors use), running the PTX
//! kernels of `kernels/`.
//!
//! Everything above the [`Device`](crate::device::Device) implementation is [`DeviceBackend`], the code CI runs on the
//! simulated device ([`crate::sim`]): a warm step is three launches for the whole model,
//! enqueued on the device's stream without waiting, and nothing is allocated after the first
//! step, so a step can be captured in a CUDA graph. Reading what happened is a separate
//! call, [`SpectralSgd::report`], which waits for the stream. The orthogonalised rule
//! (math §5b) adds cuBLAS's strided-batched products ([`cublas`]) on the same stream, between
//! its element-wise kernels.
//!
//! Without a driver or a device every entry point returns [`Error::NoCudaDriver`] or
//! [`Error::NoDevice`]; [`choose_backend`] tells a program which path it can take.
//!
//! ```
//! use spectral_step::cuda::{self, BackendChoice};
//! match cuda::choose_backend() {
//!     BackendChoice::Cuda(device) => println!("running on {device}"),
//!     BackendChoice::Cpu { reason } => println!("running on the CPU: {reason}"),
//! }
//! ```

pub mod cublas;
mod device;
mod loader;

use std::fmt;

use cudarc::driver::DriverError;

pub use cudarc;
pub use device::{CudaDevice, DeviceInfo, StagingRing, driver_available};
pub use loader::{JitReason, LoadedFrom};

use crate::device::DeviceBackend;
pub use crate::device::PendingReport;
use crate::error::Error;
#[cfg(doc)]
use crate::optimizer::SpectralSgd;

/// The device backend on a CUDA GPU: `SpectralSgd<Cuda>`.
pub type Cuda = DeviceBackend<CudaDevice>;

/// Batched power iteration on stored matrices on a CUDA GPU.
pub type PowerIteration = crate::device::PowerIteration<CudaDevice>;

pub(crate) fn cuda_error(context: &'static str) -> impl Fn(DriverError) -> Error {
    move |error| Error::Cuda {
        context,
        message: error.to_string(),
    }
}

/// Which backend a program can use here.
#[derive(Debug)]
pub enum BackendChoice {
    /// A CUDA device that the kernels run on.
    Cuda(DeviceInfo),
    /// The CPU path, and why not CUDA.
    Cpu {
        /// Why CUDA is not usable (no driver, no device, too old, ...).
        reason: Error,
    },
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendChoice::Cuda(device) => write!(f, "{device}"),
            BackendChoice::Cpu { reason } => write!(f, "CPU ({reason})"),
        }
    }
}

/// Opens device 0 and loads the kernels to see whether the CUDA path works; otherwise says
/// why the CPU path is the one to use. Never panics.
pub fn choose_backend() -> BackendChoice {
    match CudaDevice::open(0) {
        Ok(device) => BackendChoice::Cuda(device.info().clone()),
        Err(reason) => BackendChoice::Cpu { reason },
    }
}
