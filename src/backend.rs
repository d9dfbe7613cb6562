//! The seam between the optimizer and the hardware that runs its passes.
//!
//! [`SpectralSgd`](crate::SpectralSgd) owns the configuration, the batch layout and the step
//! count; a [`Backend`] owns the optimizer state (momentum, power vectors) where the
//! parameters live and runs SPEC 5's passes there. The CPU backend is [`Cpu`](crate::cpu::Cpu);
//! a CUDA backend slots in beside it with its own storage type (device buffers) and its own
//! report type (read back without a host sync inside the step).

use std::borrow::{Borrow, BorrowMut};

use crate::config::SpectralSgdConfig;
use crate::element::Element;
use crate::error::Result;
use crate::layout::{BatchLayout, BlockPolicy};

/// Optimizer state in host memory, matrix after matrix in batch order with no gaps (whatever
/// alignment a backend uses on its side): what a state file holds besides the configuration,
/// shapes and step count. The same state loads into any backend.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostState {
    /// Momentum of every matrix, concatenated, `f32`.
    pub momentum: Vec<f32>,
    /// Power vector of every matrix, concatenated, unit length.
    pub power_vectors: Vec<f32>,
    /// Per matrix: whether its power vector is warm (one iteration per step suffices).
    pub warm: Vec<bool>,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::cpu::Cpu {}
    #[cfg(feature = "cuda")]
    impl Sealed for crate::cuda::Cuda {}
}

/// Where the optimizer's passes run. Implemented by this crate's backends only.
pub trait Backend: Sized + sealed::Sealed {
    /// How one matrix is stored: `[T]` on the CPU.
    type Storage<T: Element>: ?Sized;
    /// What a step returns.
    type Report;
    /// How this backend cuts rows into blocks of parallel work.
    const BLOCK_POLICY: BlockPolicy;

    /// Fresh state (zero momentum, cold seeded power vectors) for `layout`.
    fn create(layout: &BatchLayout, config: &SpectralSgdConfig) -> Result<Self>;

    /// One optimizer step (SPEC 5) over the whole batch. `step` is the 1-based index of this
    /// step. Shapes are checked before anything is written.
    fn step<T, W, G>(
        &mut self,
        layout: &BatchLayout,
        config: &SpectralSgdConfig,
        step: u64,
        weights: &mut [W],
        grads: &[G],
    ) -> Result<Self::Report>
    where
        T: Element,
        W: BorrowMut<Self::Storage<T>> + Send,
        G: Borrow<Self::Storage<T>> + Sync;

    /// Copies the state to the host.
    fn export_state(&self) -> Result<HostState>;

    /// Replaces the state; lengths were checked against the layout by the caller.
    fn import_state(&mut self, state: HostState) -> Result<()>;

    /// Re-seeds every power vector (cold start on the next step).
    fn reset_power_vectors(&mut self, layout: &BatchLayout, seed: u64) -> Result<()>;
}
