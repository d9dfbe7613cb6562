//! Loading the kernel modules into a CUDA context: the cubin for the device's architecture
//! when the build assembled one, else the PTX through the driver's JIT, and a record of which.

use std::fmt;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::Ptx;

use super::cuda_error;
use crate::error::Result;
use crate::kernels::{self, KernelId, KernelModule};

/// How a kernel module was loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadedFrom {
    /// The cubin ptxas built for this architecture (compute capability times ten; for an
    /// sm_87 device, say, the sm_86 cubin).
    Cubin(u32),
    /// The PTX, compiled by the driver's JIT, and why.
    Jit(JitReason),
}

/// Why a module went through the driver's JIT instead of a cubin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JitReason {
    /// The build embedded no cubins (ptxas was not found at build time).
    PtxOnlyBuild,
    /// No cubin runs natively on this architecture (a newer major, such as sm_100).
    NoCubinFor(u32),
    /// The driver refused the cubin (its message).
    CubinRejected(String),
}

impl fmt::Display for LoadedFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadedFrom::Cubin(arch) => write!(f, "cubin sm_{arch}"),
            LoadedFrom::Jit(JitReason::PtxOnlyBuild) => {
                write!(f, "PTX through the driver's JIT (a PTX-only build)")
            }
            LoadedFrom::Jit(JitReason::NoCubinFor(arch)) => {
                write!(f, "PTX through the driver's JIT (no cubin for sm_{arch})")
            }
            LoadedFrom::Jit(JitReason::CubinRejected(message)) => {
                write!(
                    f,
                    "PTX through the driver's JIT (the cubin was refused: {message})"
                )
            }
        }
    }
}

/// The loaded kernels of one context, indexed by [`KernelId::index`].
#[derive(Debug)]
pub(super) struct LoadedKernels {
    functions: Vec<(CudaFunction, LoadedFrom)>,
}

impl LoadedKernels {
    /// Loads every module for a device of compute capability `arch`. Modules that fall back
    /// to the JIT are named on stderr, once per device opened, with the reason: the JIT costs start-up time
    /// and its code is not what CI assembled and checked for spills.
    pub fn load(context: &Arc<CudaContext>, arch: u32) -> Result<Self> {
        let functions = KernelId::ALL
            .iter()
            .map(|&id| load_module(context, kernels::module(id), arch))
            .collect::<Result<Vec<_>>>()?;
        let jitted: Vec<String> = KernelId::ALL
            .iter()
            .zip(&functions)
            .filter(|(_, (_, from))| matches!(from, LoadedFrom::Jit(_)))
            .map(|(id, (_, from))| format!("{}: {from}", id.entry_name()))
            .collect();
        if !jitted.is_empty() {
            eprintln!(
                "spectral-step: {} of {} kernel modules use the driver's JIT on sm_{arch}: {}",
                jitted.len(),
                functions.len(),
                jitted.join("; ")
            );
        }
        Ok(Self { functions })
    }

    pub fn function(&self, id: KernelId) -> &CudaFunction {
        &self.functions[id.index()].0
    }

    pub fn loaded_from(&self, id: KernelId) -> &LoadedFrom {
        &self.functions[id.index()].1
    }
}

fn load_module(
    context: &Arc<CudaContext>,
    module: &KernelModule,
    arch: u32,
) -> Result<(CudaFunction, LoadedFrom)> {
    let reason = match module.cubin_for(arch) {
        None if module.cubins.is_empty() => JitReason::PtxOnlyBuild,
        None => JitReason::NoCubinFor(arch),
        Some(cubin) => {
            let loaded = context
                .load_module(Ptx::from_binary(cubin.image.to_vec()))
                .and_then(|loaded| loaded.load_function(module.name));
            match loaded {
                Ok(function) => return Ok((function, LoadedFrom::Cubin(cubin.arch))),
                Err(error) => JitReason::CubinRejected(error.to_string()),
            }
        }
    };
    let function = context
        .load_module(Ptx::from_src(module.ptx))
        .map_err(cuda_error("loading PTX"))?
        .load_function(module.name)
        .map_err(cuda_error("finding a kernel"))?;
    Ok((function, LoadedFrom::Jit(reason)))
}
