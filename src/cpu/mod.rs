//! The CPU backend: the fused power iteration (math §4) and the fused step (math §5), parallel over row
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
//! turns out non-finite must leave `M` untouched (math §4.5.1), and that is only known once all of
//! its blocks are read. Storing `M` in pass B instead costs one extra read of `G` for
//! heavy-ball (7 element passes against the 6 of a pass A that stores `M`) and nothing for Nesterov (7 either way);
//! the write of `M` in pass B hits cache lines that pass B has just read, so it needs no extra
//! read-for-ownership.

mod band_eigen;
mod block_pass;
mod even_odd;
mod lanczos;
mod orthogonal;
mod power;
mod rows;
mod step;
mod wide;

pub(crate) use lanczos::check_lanczos_settings;
pub use lanczos::{LanczosEstimate, MAX_LANCZOS_BLOCK};
pub use power::{BatchPowerIteration, Estimate};
pub use rows::KernelPath;

use crate::backend::{Backend, HostState, check_step};
use crate::config::SpectralSgdConfig;
use crate::element::Element;
use crate::error::Result;
use crate::kernels::records::MatrixResult;
use crate::layout::{BatchLayout, BlockPolicy};
use crate::memory::zeroed;
use crate::newton_schulz::UpdateRule;
use crate::report::StepReport;
use power::BlockSums;

/// The CPU backend. Its state is plain host memory laid out by its [`BatchLayout`] (alignment
/// gaps included, when the layout asks for them); scratch space is allocated when the
/// optimizer is built, and each worker thread keeps its own cache tile after its first pass.
pub struct Cpu {
    layout: BatchLayout,
    momentum: Vec<f32>,
    power_vectors: Vec<f32>,
    warm: Vec<bool>,
    /// The host knows that some power vector is cold (first step, reset, state load): the
    /// next step runs the cold rounds (math §4.7), exactly as the device path decides it.
    host_knows_cold: bool,
    path: KernelPath,
    scratch: Scratch,
}

/// Per-step working space, sized by the layout.
struct Scratch {
    partials: Vec<f32>,
    sums: Vec<BlockSums>,
    results: Vec<MatrixResult>,
    active: Vec<bool>,
}

impl std::fmt::Debug for Cpu {
    /// A summary: the state itself can be gigabytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cpu")
            .field("matrices", &self.layout.len())
            .field("elements", &self.layout.packed_elements())
            .field("warm", &self.warm.iter().filter(|&&w| w).count())
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Cpu {
    /// Momentum of matrix `index` (layout order). Panics if `index` is out of range.
    pub fn momentum(&self, index: usize) -> &[f32] {
        &self.momentum[self.layout.matrix(index).element_range()]
    }

    /// Current power vector of matrix `index`. Panics if `index` is out of range.
    pub fn power_vector(&self, index: usize) -> &[f32] {
        &self.power_vectors[self.layout.matrix(index).vector_range()]
    }

    /// Whether matrix `index`'s power vector is warm. Panics if `index` is out of range.
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
}

/// A step's buffers, borrowed once and checked ([`check_step`]): the slices whose lengths
/// are checked are the slices the step uses, whatever the caller's `Borrow` impls do.
struct Borrowed<'a, TW, TG> {
    weights: Vec<&'a mut [TW]>,
    grads: Vec<&'a [TG]>,
    copies: Option<Vec<&'a mut [TG]>>,
}

fn borrow_checked<'a, TW, TG, W, G, C>(
    config: &SpectralSgdConfig,
    layout: &BatchLayout,
    weights: &'a mut [W],
    grads: &'a [G],
    copies: Option<&'a mut [C]>,
) -> Result<Borrowed<'a, TW, TG>>
where
    TW: Element,
    TG: Element,
    W: std::borrow::BorrowMut<[TW]>,
    G: std::borrow::Borrow<[TG]>,
    C: std::borrow::BorrowMut<[TG]>,
{
    use std::borrow::{Borrow, BorrowMut};
    let weights: Vec<&mut [TW]> = weights.iter_mut().map(BorrowMut::borrow_mut).collect();
    let grads: Vec<&[TG]> = grads.iter().map(Borrow::borrow).collect();
    let copies: Option<Vec<&mut [TG]>> =
        copies.map(|copies| copies.iter_mut().map(BorrowMut::borrow_mut).collect());
    check_step::<TW, TG>(
        config,
        layout,
        weights.iter().map(|w| w.len()),
        grads.iter().map(|g| g.len()),
        copies.as_ref().map(|c| c.iter().map(|c| c.len())),
    )?;
    Ok(Borrowed {
        weights,
        grads,
        copies,
    })
}

impl Backend for Cpu {
    type Storage<T: Element> = [T];
    type Report = StepReport;
    const BLOCK_POLICY: BlockPolicy = BlockPolicy::CPU;

    /// Any layout works on the CPU, aligned or not.
    fn create(layout: BatchLayout, config: &SpectralSgdConfig) -> Result<Self> {
        config.validate_for(&layout)?;
        let matrices = layout.len();
        Ok(Cpu {
            momentum: zeroed(layout.total_elements(), "momentum")?,
            power_vectors: crate::random::cold_power_vectors(&layout, config.seed)?,
            warm: zeroed(matrices, "warm flags")?,
            host_knows_cold: true,
            path: KernelPath::detect(),
            scratch: Scratch {
                partials: zeroed(layout.total_partial_len(), "partials")?,
                sums: zeroed(layout.blocks().len(), "block sums")?,
                results: zeroed(matrices, "results")?,
                active: zeroed(matrices, "scratch flags")?,
            },
            layout,
        })
    }

    fn layout(&self) -> &BatchLayout {
        &self.layout
    }

    fn step<TW, TG, W, G, C>(
        &mut self,
        config: &SpectralSgdConfig,
        step: u64,
        weights: &mut [W],
        grads: &[G],
        copies: Option<&mut [C]>,
    ) -> Result<StepReport>
    where
        TW: Element,
        TG: Element,
        W: std::borrow::BorrowMut<[TW]> + Send,
        G: std::borrow::Borrow<[TG]> + Sync,
        C: std::borrow::BorrowMut<[TG]>,
    {
        match config.update {
            UpdateRule::PowerNormalised => step::run(self, config, step, weights, grads, copies),
            UpdateRule::Orthogonalised(schedule) => {
                orthogonal::run(self, config, schedule, step, weights, grads, copies)
            }
        }
    }

    fn export_state(&self) -> Result<HostState> {
        Ok(HostState {
            momentum: self.layout.pack_elements(&self.momentum)?,
            power_vectors: self.layout.pack_vectors(&self.power_vectors)?,
            warm: self.warm.clone(),
        })
    }

    fn import_state(&mut self, state: HostState) -> Result<()> {
        state.check(&self.layout)?;
        let momentum = self.layout.unpack_elements(&state.momentum)?;
        let power_vectors = self.layout.unpack_vectors(&state.power_vectors)?;
        self.host_knows_cold = state.warm.iter().any(|&warm| !warm);
        self.momentum = momentum;
        self.power_vectors = power_vectors;
        self.warm = state.warm;
        Ok(())
    }

    fn reset_power_vectors(&mut self, seed: u64) -> Result<()> {
        self.power_vectors = crate::random::cold_power_vectors(&self.layout, seed)?;
        self.warm.fill(false);
        self.host_knows_cold = true;
        Ok(())
    }
}
