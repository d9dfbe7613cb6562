//! [`CudaDevice`]: a CUDA GPU behind the [`Device`] seam, the thin layer over cudarc's
//! driver API.
//!
//! cudarc loads the driver at run time (dynamic loading), so this crate links no CUDA library,
//! unless another crate of the build asks cudarc to link them (candle-core's `cuda` feature
//! does); this code is the same under both. Every entry point first checks that the driver
//! library loads at all ([`driver_available`]), because cudarc's lazy loader panics when it
//! does not.

use std::fmt;
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PinnedHostSlice, PushKernelArg, SyncOnDrop,
};

use super::cublas::Cublas;
use super::cuda_error;
use super::loader::{LoadedFrom, LoadedKernels};
use crate::device::{Device, Gemm, checked_end, sealed};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::kernels::{KernelId, Launch, LaunchArg};

use crate::kernels::records::DEFAULT_SHARED_BYTES;

/// True when the CUDA driver library (`libcuda.so`, `libcuda.so.1`, `nvcuda.dll`) can be
/// loaded. cudarc's loader tries these names among others, so where one loads, cudarc's
/// does. (A program that links the CUDA libraries does not start without the driver, so
/// there it is always true.)
pub fn driver_available() -> bool {
    use std::env::consts::{DLL_PREFIX, DLL_SUFFIX};
    [
        format!("{DLL_PREFIX}cuda{DLL_SUFFIX}"),
        format!("{DLL_PREFIX}cuda{DLL_SUFFIX}.1"),
        format!("{DLL_PREFIX}nvcuda{DLL_SUFFIX}"),
    ]
    .into_iter()
    .any(|candidate| {
        // SAFETY: loading the driver library runs its initialisers, which is what any CUDA
        // program does; no symbol is called, and the handle is dropped at once.
        unsafe { libloading::Library::new(candidate) }.is_ok()
    })
}

/// What a device is: for reports and for choosing a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// The driver's name for it, e.g. `NVIDIA H200`.
    pub name: String,
    /// Compute capability times ten (90 for sm_90).
    pub arch: u32,
    /// Global memory in bytes.
    pub memory_bytes: usize,
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CUDA device {} ({}, sm_{}, {:.0} GiB)",
            self.ordinal,
            self.name,
            self.arch,
            self.memory_bytes as f64 / f64::from(1u32 << 30)
        )
    }
}

/// Page-locked buffers a step's table uploads go through in turn (CUDA copies from pageable
/// memory may wait for the stream; from page-locked memory they do not), each with the event
/// recorded after its last copy. The events are this ring's own: cudarc records the events of
/// its page-locked buffers only on contexts with several streams, and a candle device's
/// per-thread stream is not one.
#[derive(Debug)]
pub struct StagingRing {
    slots: Vec<(PinnedHostSlice<u8>, CudaEvent)>,
    bytes: usize,
    next: usize,
}

impl Drop for StagingRing {
    /// The page-locked memory is freed only after every copy from it has run.
    fn drop(&mut self) {
        for (_, copied) in &self.slots {
            // A failure here is the device's, reported by the next call that reaches it.
            let _ = copied.synchronize();
        }
    }
}

/// Uploads in flight before one waits: a step uploads at most one table.
const STAGING_SLOTS: usize = 4;

/// A CUDA device with the crate's kernels loaded, and the stream the optimizer works on.
#[derive(Debug)]
pub struct CudaDevice {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    max_shared_bytes: u32,
    kernels: LoadedKernels,
    /// cuBLAS on `stream`, made by the first [`Device::prepare_gemm`].
    cublas: OnceLock<Cublas>,
}

impl CudaDevice {
    /// Opens device `ordinal` and loads every kernel (the cubin for its architecture, else
    /// the PTX). Errors: [`Error::NoCudaDriver`] without a driver, [`Error::NoDevice`]
    /// without that device or for one older than sm_80, [`Error::Cuda`] when loading fails.
    pub fn open(ordinal: usize) -> Result<Self> {
        if !driver_available() {
            return Err(Error::NoCudaDriver(
                "the driver library (libcuda.so / nvcuda.dll) could not be loaded".into(),
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| Error::NoDevice(format!("the driver reports: {e}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoDevice(format!(
                "device {ordinal} asked for, {count} present"
            )));
        }
        let context = CudaContext::new(ordinal).map_err(cuda_error("creating a context"))?;
        Self::with_context(context)
    }

    /// Uses an existing context (for example the one a candle `CudaDevice` holds), on a new
    /// stream of it.
    pub fn with_context(context: Arc<CudaContext>) -> Result<Self> {
        let stream = context
            .new_stream()
            .map_err(cuda_error("creating a stream"))?;
        Self::on_stream(stream)
    }

    /// Runs every kernel of this crate on `stream`, in order with the other work enqueued
    /// there: on a candle `CudaDevice`'s `cuda_stream()`, a step follows the backward pass
    /// that wrote the gradients and precedes the next forward pass with no synchronisation
    /// and no event.
    pub fn on_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let context = stream.context().clone();
        let (major, minor) = context
            .compute_capability()
            .map_err(cuda_error("reading the compute capability"))?;
        let arch = (major * 10 + minor) as u32;
        let name = context
            .name()
            .map_err(cuda_error("reading the device name"))?;
        if arch < 80 {
            return Err(Error::NoDevice(format!(
                "{name} is sm_{arch}; the kernels need sm_80 or newer (bf16)"
            )));
        }
        let memory_bytes = context
            .total_mem()
            .map_err(cuda_error("reading the memory size"))?;
        let max_shared_bytes = context
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(cuda_error("reading the shared memory limit"))?
            .max(0) as u32;
        let kernels = LoadedKernels::load(&context, arch)?;
        Ok(Self {
            info: DeviceInfo {
                ordinal: context.ordinal(),
                name,
                arch,
                memory_bytes,
            },
            context,
            stream,
            max_shared_bytes,
            kernels,
            cublas: OnceLock::new(),
        })
    }

    /// The device.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The context (to allocate buffers on this device).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }

    /// The stream every kernel of this crate runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// How kernel `id` was loaded: a cubin, or the JIT and why.
    pub fn loaded_from(&self, id: KernelId) -> &LoadedFrom {
        self.kernels.loaded_from(id)
    }

    fn check_same_context<T>(&self, slice: &CudaSlice<T>) -> Result<()> {
        // The same driver context, even through another `CudaContext` handle of it
        // (`CudaContext::new` returns a new handle each time it opens the primary context).
        if **slice.context() == *self.context {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "a buffer of CUDA device {} was passed to an optimizer on another context ({})",
                slice.ordinal(),
                self.info
            )))
        }
    }
}

impl sealed::Sealed for CudaDevice {}

impl Device for CudaDevice {
    type Slice<T: Element> = CudaSlice<T>;
    type Buffer = CudaSlice<u8>;
    type Guard<'a> = SyncOnDrop<'a>;

    /// Device 0.
    fn open_default() -> Result<Self> {
        Self::open(0)
    }

    fn describe(&self) -> String {
        self.info.to_string()
    }

    fn max_shared_bytes(&self) -> u32 {
        self.max_shared_bytes
    }

    fn prepare_power_shared(&self, bytes: u32) -> Result<()> {
        if bytes <= DEFAULT_SHARED_BYTES {
            return Ok(());
        }
        for id in KernelId::ALL
            .into_iter()
            .filter(|id| id.uses_power_shared_memory())
        {
            self.kernels
                .function(id)
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .map_err(cuda_error("raising the shared memory limit"))?;
        }
        Ok(())
    }

    fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        self.stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(cuda_error("allocating device memory"))
    }

    type Staging = StagingRing;

    fn alloc_staging(&self, bytes: usize) -> Result<StagingRing> {
        let slots = (0..STAGING_SLOTS)
            .map(|_| {
                // SAFETY: the memory is uninitialised; `u8` has no invalid bit patterns, and
                // `upload_staged` writes every byte of a slot before the slot is copied.
                let slot = unsafe { self.context.alloc_pinned::<u8>(bytes.max(1)) }
                    .map_err(cuda_error("allocating page-locked host memory"))?;
                let copied = self
                    .context
                    .new_event(None)
                    .map_err(cuda_error("creating an event"))?;
                Ok((slot, copied))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StagingRing {
            slots,
            bytes,
            next: 0,
        })
    }

    fn upload_staged(
        &self,
        staging: &mut StagingRing,
        buffer: &mut CudaSlice<u8>,
        bytes: &[u8],
    ) -> Result<()> {
        if bytes.len() != staging.bytes || bytes.is_empty() {
            return self.upload(buffer, 0, bytes);
        }
        let end = checked_end(buffer.len(), 0, bytes.len())?;
        let (slot, copied) = &mut staging.slots[staging.next];
        staging.next = (staging.next + 1) % STAGING_SLOTS;
        // Waits only for this slot's previous copy, STAGING_SLOTS uploads ago.
        copied
            .synchronize()
            .map_err(cuda_error("waiting for a staging buffer"))?;
        slot.as_mut_slice()
            .map_err(cuda_error("waiting for a staging buffer"))?
            .copy_from_slice(bytes);
        self.stream
            .memcpy_htod(slot, &mut buffer.slice_mut(0..end))
            .map_err(cuda_error("copying a table to the device"))?;
        copied
            .record(&self.stream)
            .map_err(cuda_error("recording an event"))
    }

    fn upload(&self, buffer: &mut CudaSlice<u8>, offset: usize, bytes: &[u8]) -> Result<()> {
        let end = checked_end(buffer.len(), offset, bytes.len())?;
        self.stream
            .memcpy_htod(bytes, &mut buffer.slice_mut(offset..end))
            .map_err(cuda_error("copying to the device"))
    }

    fn download(&self, buffer: &CudaSlice<u8>, offset: usize, len: usize) -> Result<Vec<u8>> {
        let end = checked_end(buffer.len(), offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        self.stream
            .clone_dtoh(&buffer.slice(offset..end))
            .map_err(cuda_error("copying from the device"))
    }

    fn buffer_address(&self, buffer: &CudaSlice<u8>) -> u64 {
        // The guard is dropped at once: the device's own buffers are only used on its own
        // stream, which orders them, so no event needs recording.
        let (address, _guard) = buffer.device_ptr(&self.stream);
        address
    }

    fn slice_len<T: Element>(slice: &CudaSlice<T>) -> usize {
        slice.len()
    }

    fn read_address<'a, T: Element>(
        &'a self,
        slice: &'a CudaSlice<T>,
    ) -> Result<(u64, SyncOnDrop<'a>)> {
        self.check_same_context(slice)?;
        Ok(slice.device_ptr(&self.stream))
    }

    fn write_address<'a, T: Element>(
        &'a self,
        slice: &'a mut CudaSlice<T>,
    ) -> Result<(u64, SyncOnDrop<'a>)> {
        self.check_same_context(slice)?;
        Ok(slice.device_ptr_mut(&self.stream))
    }

    unsafe fn launch(&self, launch: &Launch) -> Result<()> {
        let function = self.kernels.function(launch.kernel);
        let mut builder = self.stream.launch_builder(function);
        for arg in &launch.args {
            match arg {
                LaunchArg::U64(value) => builder.arg(value),
                LaunchArg::U32(value) => builder.arg(value),
                LaunchArg::F32(value) => builder.arg(value),
            };
        }
        let config = LaunchConfig {
            grid_dim: (launch.grid, 1, 1),
            block_dim: (launch.block, 1, 1),
            shared_mem_bytes: launch.shared_bytes,
        };
        // SAFETY: the caller guarantees (this function's contract) that the arguments match
        // the kernel's parameters and that every address the kernel reaches is live and
        // large enough; `function` is the module `launch.kernel` names, loaded at creation.
        unsafe { builder.launch(config) }.map_err(cuda_error("launching a kernel"))?;
        Ok(())
    }

    fn prepare_gemm(&self) -> Result<()> {
        if self.cublas.get().is_none() {
            // Two threads racing here each make a handle; one is kept, the other dropped.
            let _ = self.cublas.set(Cublas::new(self.stream.clone())?);
        }
        Ok(())
    }

    unsafe fn gemm(&self, gemm: &Gemm) -> Result<()> {
        let cublas = self.cublas.get().ok_or_else(|| {
            Error::InvalidArgument("a GEMM was enqueued before prepare_gemm".into())
        })?;
        // SAFETY: the caller guarantees what `Cublas::gemm` asks: live allocations of this
        // device (whose context the handle's stream belongs to) large enough for the batch,
        // C overlapping neither input.
        unsafe { cublas.gemm(gemm) }
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(cuda_error("waiting for the stream"))
    }
}
