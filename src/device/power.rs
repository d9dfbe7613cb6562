//! Batched power iteration on stored matrices on a device (math §4.2; the plain power pass).

use super::backend::Tables;
use super::{Device, download_f32};
use crate::config::MAX_POWER_ITERATIONS;
use crate::element::{Element, StepTypes};
use crate::error::{Error, Result};
use crate::kernels::plan::{self, MatrixPointers};
use crate::layout::{BatchLayout, BlockPolicy, MatrixShape};
use crate::report::StepReport;
use crate::scaling::Scale;

/// Batched power iteration on stored matrices on a device: `sigma` estimates of weight
/// matrices for diagnostics, and the kernel the GPU benchmark times. Its power vectors are
/// its own, seeded like the optimizer's (seed 0).
pub struct PowerIteration<D: Device> {
    device: D,
    layout: BatchLayout,
    tables: Tables<D>,
    iterated: bool,
}

impl<D: Device> std::fmt::Debug for PowerIteration<D> {
    /// A summary, without the buffers.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerIteration")
            .field("device", &self.device.describe())
            .field("matrices", &self.layout.len())
            .finish_non_exhaustive()
    }
}

impl<D: Device> PowerIteration<D> {
    /// Buffers for matrices of these shapes on `device` ([`BlockPolicy::CUDA`]).
    pub fn new(shapes: &[MatrixShape], device: D) -> Result<Self> {
        Self::with_layout(BatchLayout::new(shapes, BlockPolicy::CUDA)?, device)
    }

    /// Buffers for a layout built by the caller (its alignment a multiple of 4 elements).
    pub fn with_layout(layout: BatchLayout, device: D) -> Result<Self> {
        let mut tables = Tables::new(&device, &layout)?;
        tables.reset_power_vectors(&device, &layout, 0)?;
        Ok(Self {
            device,
            layout,
            tables,
            iterated: false,
        })
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The layout.
    pub fn layout(&self) -> &BatchLayout {
        &self.layout
    }

    /// Enqueues `iterations` power iterations on `matrices` (one per shape, row-major),
    /// continuing from the current vectors, at most [`MAX_POWER_ITERATIONS`]; a matrix stops
    /// early once its estimate has converged (math §4.7). Does not wait. A vector orthogonal
    /// to its matrix is re-seeded (math §4.6) and reported as such.
    pub fn iterate<T: Element>(&mut self, matrices: &[D::Slice<T>], iterations: u32) -> Result<()> {
        self.layout
            .check_lengths("matrix", matrices.iter().map(D::slice_len))?;
        if !(1..=MAX_POWER_ITERATIONS).contains(&iterations) {
            return Err(Error::InvalidArgument(format!(
                "iterations must be between 1 and {MAX_POWER_ITERATIONS}, got {iterations}"
            )));
        }
        let device = &self.device;
        let mut guards = Vec::with_capacity(self.layout.len());
        let mut addresses = Vec::with_capacity(self.layout.len());
        for matrix in matrices {
            let (address, guard) = device.read_address(matrix)?;
            addresses.push(MatrixPointers {
                weights: address,
                grads: address,
                copy: 0,
            });
            guards.push(guard);
        }
        self.tables.upload_matrix_table(
            device,
            &self.layout,
            Scale::Spectral,
            StepTypes::same(T::DTYPE),
            addresses,
            None,
        )?;
        let launches =
            plan::power_launches(&self.layout, T::DTYPE, self.tables.pointers, iterations)?;
        for launch in &launches {
            // SAFETY: as in `DeviceBackend::step`: the launches and the tables come from
            // `self.layout`, the tables were allocated for it, and every matrix was checked
            // to hold its shape's elements on this device. The plain kernels never read the
            // momentum address, which is 0 here.
            unsafe { device.launch(launch)? };
        }
        drop(guards);
        self.iterated = true;
        Ok(())
    }

    /// The estimates of the last [`iterate`](Self::iterate), per matrix (`step` 0). Waits.
    pub fn report(&self) -> Result<StepReport> {
        if !self.iterated {
            return Err(Error::InvalidArgument(
                "no iteration has run yet, so there is no report".into(),
            ));
        }
        self.tables.report(&self.device, &self.layout, 0, false)
    }

    /// The power vector of matrix `index`, copied to the host (waits). Panics if `index` is
    /// out of range.
    pub fn power_vector_to_host(&self, index: usize) -> Result<Vec<f32>> {
        let range = self.layout.matrix(index).vector_range();
        download_f32(&self.device, &self.tables.power_vectors, range)
    }
}
