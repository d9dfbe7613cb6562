//! A spectral group's optimizer on the device its parameters live on: the CPU backend for
//! CPU tensors, the CUDA backend on candle's stream for CUDA tensors (feature `candle-cuda`).

use crate::backend::HostState;
use crate::config::SpectralSgdConfig;
use crate::error::Result;
use crate::layout::BatchLayout;
use crate::optimizer::SpectralSgd;

/// The [`SpectralSgd`] of one spectral group. (A model has a group or two, one per element
/// type and target ratio, so the variants' sizes do not matter.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum GroupStep {
    Cpu(SpectralSgd),
    #[cfg(feature = "candle-cuda")]
    Cuda(SpectralSgd<crate::cuda::Cuda>),
}

/// Runs the same expression on whichever optimizer the group holds.
macro_rules! on_group {
    ($group:expr, $optimizer:ident => $body:expr) => {
        match $group {
            GroupStep::Cpu($optimizer) => $body,
            #[cfg(feature = "candle-cuda")]
            GroupStep::Cuda($optimizer) => $body,
        }
    };
}

impl GroupStep {
    /// The CPU optimizer, when the group is on the CPU.
    pub fn cpu_mut(&mut self) -> Option<&mut SpectralSgd> {
        match self {
            GroupStep::Cpu(optimizer) => Some(optimizer),
            #[cfg(feature = "candle-cuda")]
            GroupStep::Cuda(_) => None,
        }
    }

    /// The CUDA optimizer, when the group is on a CUDA device.
    #[cfg(feature = "candle-cuda")]
    pub fn cuda_mut(&mut self) -> Option<&mut SpectralSgd<crate::cuda::Cuda>> {
        match self {
            GroupStep::Cuda(optimizer) => Some(optimizer),
            GroupStep::Cpu(_) => None,
        }
    }

    pub fn layout(&self) -> &BatchLayout {
        on_group!(self, optimizer => optimizer.layout())
    }

    pub fn config(&self) -> &SpectralSgdConfig {
        on_group!(self, optimizer => optimizer.config())
    }

    pub fn steps(&self) -> u64 {
        on_group!(self, optimizer => optimizer.steps())
    }

    /// The state on the host (on a device, this waits for the steps enqueued so far).
    pub fn state(&self) -> Result<HostState> {
        on_group!(self, optimizer => optimizer.state())
    }

    pub fn set_learning_rate(&mut self, learning_rate: f32) -> Result<()> {
        on_group!(self, optimizer => optimizer.set_learning_rate(learning_rate))
    }

    pub fn resume(
        &mut self,
        config: SpectralSgdConfig,
        steps: u64,
        state: HostState,
    ) -> Result<()> {
        on_group!(self, optimizer => optimizer.resume(config, steps, state))
    }
}
