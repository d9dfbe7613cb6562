//! The CPU backend: SPEC 4's fused power iteration and SPEC 5's fused step, parallel over row
//! blocks with rayon, bitwise reproducible for any number of threads.
//!
//! Memory passes of one warm step (`N` parameters, `b` bytes per weight/gradient element):
//!
//! | pass | reads | writes |
//! | --- | --- | --- |
//! | A: power iteration on `U = f(G, M)` | `G`, `M` | — |
//! | finish: partials → `sigma`, `v` | partials (about 1% of `N`) | `v` |
//! | B: momentum and update | `G`, `M`, `W` | `M`, `W` |
//!
//! Pass A computes the momentum rule on the fly but does not store `M`: a matrix whose `U`
//! turns out non-finite must leave `M` untouched (SPEC 4), and that is only known once all of
//! its blocks are read. Storing `M` in pass B instead costs one extra read of `G` for
//! heavy-ball (7 element passes against SPEC 5's 6) and nothing for Nesterov (7 either way);
//! the write of `M` in pass B hits cache lines that pass B has just read, so it needs no extra
//! read-for-ownership.

mod lanczos;
mod power;
mod rows;
mod step;

pub use lanczos::LanczosEstimate;
pub use power::{BatchPowerIteration, Estimate};
pub use rows::KernelPath;

use crate::backend::{Backend, HostState};
use crate::config::SpectralSgdConfig;
use crate::element::Element;
use crate::error::Result;
use crate::layout::{BatchLayout, BlockPolicy};
use crate::report::StepReport;
use power::BlockSums;

/// The CPU backend. Its state is plain host memory; scratch space is allocated once, when the
/// optimizer is built.
#[derive(Debug)]
pub struct Cpu {
    momentum: Vec<f32>,
    power_vectors: Vec<f32>,
    warm: Vec<bool>,
    path: KernelPath,
    scratch: Scratch,
}

/// Per-step working space, sized by the layout.
#[derive(Debug)]
struct Scratch {
    partials: Vec<f32>,
    sums: Vec<BlockSums>,
    estimates: Vec<Estimate>,
    active: Vec<bool>,
    remaining: Vec<u32>,
    reseeded: Vec<bool>,
}

impl Cpu {
    /// Momentum of matrix `index` (layout order).
    pub fn momentum(&self, layout: &BatchLayout, index: usize) -> &[f32] {
        &self.momentum[layout.matrix(index).element_range()]
    }

    /// Current power vector of matrix `index`.
    pub fn power_vector(&self, layout: &BatchLayout, index: usize) -> &[f32] {
        &self.power_vectors[layout.matrix(index).vector_range()]
    }

    /// Whether matrix `index`'s power vector is warm.
    pub fn is_warm(&self, index: usize) -> bool {
        self.warm[index]
    }

    /// The compiled form of the loops in use.
    pub fn kernel_path(&self) -> KernelPath {
        self.path
    }

    /// Chooses the compiled form of the loops; errors if this CPU cannot run it.
    pub fn set_kernel_path(&mut self, path: KernelPath) -> Result<()> {
        self.path = power::checked_path(path)?;
        Ok(())
    }

    fn seed_vectors(&mut self, layout: &BatchLayout, seed: u64) {
        for (index, entry) in layout.matrices().iter().enumerate() {
            crate::random::fill_unit_vector(
                seed,
                index as u64,
                &mut self.power_vectors[entry.vector_range()],
            );
        }
        self.warm.fill(false);
    }
}

impl Backend for Cpu {
    type Storage<T: Element> = [T];
    type Report = StepReport;
    const BLOCK_POLICY: BlockPolicy = BlockPolicy::CPU;

    fn create(layout: &BatchLayout, config: &SpectralSgdConfig) -> Result<Self> {
        let matrices = layout.len();
        let mut cpu = Cpu {
            momentum: vec![0.0; layout.total_elements()],
            power_vectors: vec![0.0; layout.total_vector_len()],
            warm: vec![false; matrices],
            path: KernelPath::detect(),
            scratch: Scratch {
                partials: vec![0.0; layout.total_partial_len()],
                sums: vec![BlockSums::default(); layout.blocks().len()],
                estimates: vec![Estimate::Zero; matrices],
                active: vec![false; matrices],
                remaining: vec![0; matrices],
                reseeded: vec![false; matrices],
            },
        };
        cpu.seed_vectors(layout, config.seed);
        Ok(cpu)
    }

    fn step<T, W, G>(
        &mut self,
        layout: &BatchLayout,
        config: &SpectralSgdConfig,
        step: u64,
        weights: &mut [W],
        grads: &[G],
    ) -> Result<StepReport>
    where
        T: Element,
        W: std::borrow::BorrowMut<[T]> + Send,
        G: std::borrow::Borrow<[T]> + Sync,
    {
        step::run(self, layout, config, step, weights, grads)
    }

    fn export_state(&self) -> Result<HostState> {
        Ok(HostState {
            momentum: self.momentum.clone(),
            power_vectors: self.power_vectors.clone(),
            warm: self.warm.clone(),
        })
    }

    fn import_state(&mut self, state: HostState) -> Result<()> {
        self.momentum = state.momentum;
        self.power_vectors = state.power_vectors;
        self.warm = state.warm;
        Ok(())
    }

    fn reset_power_vectors(&mut self, layout: &BatchLayout, seed: u64) -> Result<()> {
        self.seed_vectors(layout, seed);
        Ok(())
    }
}
