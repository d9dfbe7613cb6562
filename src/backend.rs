//! The seam between the optimizer and the hardware that runs its passes.
//!
//! [`SpectralSgd`](crate::SpectralSgd) owns the configuration and the step count; a
//! [`Backend`] owns the batch layout it was created for and the optimizer state (momentum,
//! power vectors) where the parameters live, and runs math §5's passes there. The CPU
//! backend is [`Cpu`](crate::cpu::Cpu); the device backend
//! [`DeviceBackend`](crate::device::DeviceBackend) runs the PTX kernels on a CUDA GPU or on
//! the simulated device, with device buffers as storage and a report read back without a
//! host sync inside the step.

use std::borrow::{Borrow, BorrowMut};

use crate::config::SpectralSgdConfig;
use crate::element::{Element, StepTypes};
use crate::error::{Error, Result};
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

impl HostState {
    /// Checks the lengths against `layout`: momentum [`packed_elements`], power vectors
    /// [`packed_vector_len`], one warm flag per matrix.
    ///
    /// [`packed_elements`]: BatchLayout::packed_elements
    /// [`packed_vector_len`]: BatchLayout::packed_vector_len
    pub fn check(&self, layout: &BatchLayout) -> Result<()> {
        let mismatch = |what: &str, expected: usize, got: usize| {
            Err(Error::StateShapeMismatch(format!(
                "{what}: this batch needs {expected} values, the state has {got}"
            )))
        };
        if self.momentum.len() != layout.packed_elements() {
            return mismatch("momentum", layout.packed_elements(), self.momentum.len());
        }
        if self.power_vectors.len() != layout.packed_vector_len() {
            return mismatch(
                "power vectors",
                layout.packed_vector_len(),
                self.power_vectors.len(),
            );
        }
        if self.warm.len() != layout.len() {
            return mismatch("warm flags", layout.len(), self.warm.len());
        }
        Ok(())
    }
}

/// What every backend checks before a step writes anything, in this order: the element types
/// pair ([`StepTypes`]), the configuration fits the layout, and the weights, the gradients and
/// the copies (which need mixed types, [`StepTypes::check_copy`]) hold one matrix each, given
/// their lengths. Returns the pair.
pub(crate) fn check_step<TW: Element, TG: Element>(
    config: &SpectralSgdConfig,
    layout: &BatchLayout,
    weights: impl ExactSizeIterator<Item = usize>,
    grads: impl ExactSizeIterator<Item = usize>,
    copies: Option<impl ExactSizeIterator<Item = usize>>,
) -> Result<StepTypes> {
    let types = StepTypes::of::<TW, TG>()?;
    config.validate_for(layout)?;
    layout.check_lengths("weight", weights)?;
    layout.check_lengths("gradient", grads)?;
    if let Some(copies) = copies {
        types.check_copy()?;
        layout.check_lengths("copy", copies)?;
    }
    Ok(types)
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::cpu::Cpu {}
    impl<D: crate::device::Device> Sealed for crate::device::DeviceBackend<D> {}
}

/// Where the optimizer's passes run. Implemented by this crate's backends only.
///
/// A backend is created for one [`BatchLayout`] and keeps it: every step, state import and
/// reset works on that layout, so no call can address state that was not allocated for it.
pub trait Backend: Sized + sealed::Sealed {
    /// How one matrix is stored: `[T]` on the CPU, a device buffer on a device.
    type Storage<T: Element>: ?Sized;
    /// What a step returns.
    type Report;
    /// How this backend cuts rows into blocks of parallel work by default.
    const BLOCK_POLICY: BlockPolicy;

    /// Fresh state (zero momentum, cold seeded power vectors) for `layout`. Errors if the
    /// backend cannot run this layout.
    fn create(layout: BatchLayout, config: &SpectralSgdConfig) -> Result<Self>;

    /// The layout the backend was created for.
    fn layout(&self) -> &BatchLayout;

    /// One optimizer step (math §5) over the whole batch. `step` is the 1-based index of this
    /// step. With `copies`, the update also writes each matrix's new weights, rounded to
    /// nearest, into its copy (f32 master weights with 16-bit gradients only, math §5a).
    /// Element types, counts and lengths are checked before anything is written.
    fn step<TW, TG, W, G, C>(
        &mut self,
        config: &SpectralSgdConfig,
        step: u64,
        weights: &mut [W],
        grads: &[G],
        copies: Option<&mut [C]>,
    ) -> Result<Self::Report>
    where
        TW: Element,
        TG: Element,
        W: BorrowMut<Self::Storage<TW>> + Send,
        G: Borrow<Self::Storage<TG>> + Sync,
        C: BorrowMut<Self::Storage<TG>>;

    /// Copies the state to the host, without alignment gaps.
    fn export_state(&self) -> Result<HostState>;

    /// Replaces the state. Errors, changing nothing, if its lengths do not fit the layout
    /// ([`HostState::check`]). On a device, a driver error while copying is returned as it
    /// is and leaves the state partly replaced (the device cannot copy atomically); the next
    /// step then cold-starts every matrix.
    fn import_state(&mut self, state: HostState) -> Result<()>;

    /// Re-seeds every power vector from `seed` (cold start on the next step).
    fn reset_power_vectors(&mut self, seed: u64) -> Result<()>;
}
