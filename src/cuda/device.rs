//! Opening a device and loading the kernels: the thin layer over cudarc's driver API.
//!
//! cudarc is built with dynamic loading, so this crate links no CUDA library; the driver is
//! looked up at run time. Every entry point first checks that the driver library loads at all
//! ([`driver_available`]), because cudarc's lazy loader panics when it does not.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use crate::error::{Error, Result};
use crate::kernels::{self, Launch, LaunchArg};

/// True when the CUDA driver library (`libcuda.so`, `nvcuda.dll`) can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library by its usual names
    // and drops the handle; loading runs the library's initialisers, which is what any CUDA
    // program does. It calls no driver function.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

pub(crate) fn cuda_error(context: &'static str) -> impl Fn(DriverError) -> Error {
    move |error| Error::Cuda {
        context,
        message: error.to_string(),
    }
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

/// How a kernel module was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadedFrom {
    /// The cubin ptxas built for this architecture (compute capability times ten).
    Cubin(u32),
    /// The PTX, compiled by the driver's JIT (no matching cubin, or the driver refused it).
    Jit,
}

/// A device with the crate's kernels loaded, and the stream the optimizer works on.
#[derive(Debug)]
pub struct CudaDevice {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    max_shared_bytes: u32,
    functions: HashMap<&'static str, (CudaFunction, LoadedFrom)>,
}

impl CudaDevice {
    /// Opens device `ordinal` and loads every kernel (cubin for its architecture, else PTX).
    /// Errors: [`Error::NoCudaDriver`] without a driver, [`Error::NoDevice`] without that
    /// device or for one older than sm_80, [`Error::Cuda`] when loading fails.
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
        let stream = context
            .new_stream()
            .map_err(cuda_error("creating a stream"))?;
        let mut functions = HashMap::new();
        for module in kernels::modules() {
            functions.insert(module.name, load(&context, module, arch)?);
        }
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
            functions,
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

    /// Dynamic shared memory one CTA may use (with the opt-in attribute).
    pub fn max_shared_bytes(&self) -> u32 {
        self.max_shared_bytes
    }

    /// How module `name` was loaded, if it exists.
    pub fn loaded_from(&self, name: &str) -> Option<LoadedFrom> {
        self.functions.get(name).map(|(_, from)| *from)
    }

    /// Allows `bytes` of dynamic shared memory for the power kernels (above the default 48 KiB
    /// a function must opt in).
    pub(crate) fn reserve_power_shared(&self, bytes: u32) -> Result<()> {
        if bytes <= 48 * 1024 {
            return Ok(());
        }
        for (name, (function, _)) in &self.functions {
            if name.starts_with("power_") && *name != kernels::FINISH_KERNEL {
                function
                    .set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        bytes as i32,
                    )
                    .map_err(cuda_error("raising the shared memory limit"))?;
            }
        }
        Ok(())
    }

    /// Enqueues `launches` on the stream, in order. Does not wait for them.
    pub(crate) fn launch_all(&self, launches: &[Launch]) -> Result<()> {
        for launch in launches {
            let (function, _) = self.functions.get(launch.kernel).ok_or(Error::Cuda {
                context: "launching",
                message: format!("kernel {} is not loaded", launch.kernel),
            })?;
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
            // SAFETY: `kernels::step_launches` / `power_launches` build each argument list in
            // the `.param` order and types of the kernel it names (checked in CI by the
            // simulator, which rejects a mismatched list). Every address in them is a live
            // allocation of this context: the optimizer's own buffers, or the caller's
            // weights and gradients, which the step borrows until its launches are enqueued
            // and whose stream dependencies cudarc's guards record.
            unsafe { builder.launch(config) }.map_err(cuda_error("launching a kernel"))?;
        }
        Ok(())
    }
}

/// Loads one module: the cubin for `arch` (or for an earlier minor of the same major, which
/// the device runs natively), else the PTX through the driver's JIT.
fn load(
    context: &Arc<CudaContext>,
    module: &kernels::KernelModule,
    arch: u32,
) -> Result<(CudaFunction, LoadedFrom)> {
    let cubin = module
        .cubins
        .iter()
        .filter(|c| c.arch / 10 == arch / 10 && c.arch <= arch)
        .max_by_key(|c| c.arch);
    if let Some(cubin) = cubin
        && let Ok(loaded) = context.load_module(Ptx::from_binary(cubin.image.to_vec()))
        && let Ok(function) = loaded.load_function(module.name)
    {
        return Ok((function, LoadedFrom::Cubin(cubin.arch)));
    }
    let loaded = context
        .load_module(Ptx::from_src(module.ptx))
        .map_err(cuda_error("loading PTX"))?;
    let function = loaded
        .load_function(module.name)
        .map_err(cuda_error("finding a kernel"))?;
    Ok((function, LoadedFrom::Jit))
}
