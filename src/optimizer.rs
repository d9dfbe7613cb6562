//! [`SpectralSgd`]: the optimizer users hold.

use std::borrow::{Borrow, BorrowMut};
use std::path::Path;

use crate::backend::{Backend, HostState};
use crate::config::SpectralSgdConfig;
use crate::cpu::{Cpu, KernelPath};
use crate::element::Element;
use crate::error::Result;
use crate::layout::{BatchLayout, MatrixShape};

/// Momentum SGD whose every update has spectral norm `learning_rate * s` (math §3a, §5).
///
/// Per matrix and step: `M <- beta M + G` (or the EMA / Nesterov variants),
/// `sigma` = power-iteration estimate of `||U||_*`, `W <- (1 - eta lambda) W - (eta s / sigma) U`.
///
/// Built once from the shapes of all weight matrices; each [`step`](Self::step) takes the
/// weights and gradients in that order. The backend `B` decides where the state lives;
/// [`Cpu`] is the default.
///
/// ```
/// use spectral_step::{MatrixShape, SpectralSgd, SpectralSgdConfig};
///
/// let shapes = [MatrixShape::new(64, 32), MatrixShape::new(10, 64)];
/// let mut optimizer = SpectralSgd::new(&shapes, SpectralSgdConfig::default())?;
/// let mut weights: Vec<Vec<f32>> = shapes.iter().map(|s| vec![0.0; s.len()]).collect();
/// // A batch-1 gradient is an outer product: (output error) x (input activation).
/// let grads: Vec<Vec<f32>> = shapes
///     .iter()
///     .map(|s| (0..s.len()).map(|i| ((i / s.fan_in) % 5) as f32 * ((i % s.fan_in) as f32 - 7.5)).collect())
///     .collect();
///
/// let report = optimizer.step(&mut weights, &grads)?;
/// assert!(report.all_updated());
/// // The update has spectral norm learning_rate * sqrt(fan_out / fan_in).
/// let update_norm = spectral_step::diagnostics::spectral_norm(&weights[0], shapes[0])?;
/// assert!((update_norm / (0.02 * 2f32.sqrt()) - 1.0).abs() < 1e-4);
/// # Ok::<(), spectral_step::Error>(())
/// ```
#[derive(Debug)]
pub struct SpectralSgd<B: Backend = Cpu> {
    config: SpectralSgdConfig,
    backend: B,
    steps: u64,
}

impl SpectralSgd<Cpu> {
    /// An optimizer for matrices of these shapes, on the CPU. Errors on an invalid config,
    /// an empty batch, a zero dimension, or a batch too large to address.
    pub fn new(shapes: &[MatrixShape], config: SpectralSgdConfig) -> Result<Self> {
        Self::with_backend(shapes, config)
    }

    /// The momentum buffer of matrix `index`. Panics if `index` is not below the number of
    /// matrices, like slice indexing.
    pub fn momentum(&self, index: usize) -> &[f32] {
        self.backend.momentum(index)
    }

    /// The current power vector of matrix `index` (unit length, `fan_in` long). Panics if
    /// `index` is out of range.
    pub fn power_vector(&self, index: usize) -> &[f32] {
        self.backend.power_vector(index)
    }

    /// Whether matrix `index`'s power vector is warm (next step uses `warm_iterations`).
    /// Panics if `index` is out of range.
    pub fn is_warm(&self, index: usize) -> bool {
        self.backend.is_warm(index)
    }

    /// The compiled form of the CPU loops in use ([`KernelPath::detect`]'s, by default).
    pub fn kernel_path(&self) -> KernelPath {
        self.backend.kernel_path()
    }

    /// Chooses the compiled form of the CPU loops; errors if this CPU cannot run it. The
    /// portable path and the fused ones differ in the last bits (a fused multiply-add rounds
    /// once); `Avx2Fma` and `Avx512` give the same bits; each is deterministic.
    pub fn set_kernel_path(&mut self, path: KernelPath) -> Result<()> {
        self.backend.set_kernel_path(path)
    }
}

impl<B: Backend> SpectralSgd<B> {
    /// An optimizer on backend `B`, with the backend's block policy.
    pub fn with_backend(shapes: &[MatrixShape], config: SpectralSgdConfig) -> Result<Self> {
        Self::with_layout(BatchLayout::new(shapes, B::BLOCK_POLICY)?, config)
    }

    /// An optimizer on backend `B` for a layout built by the caller (another block size, or
    /// alignment gaps on the CPU). Errors if the backend cannot run it.
    pub fn with_layout(layout: BatchLayout, config: SpectralSgdConfig) -> Result<Self> {
        Self::from_backend(layout, config, B::create)
    }

    /// One step over the whole batch: `weights[j]` and `grads[j]` are matrix `j`, row-major
    /// `(fan_out, fan_in)`. All lengths are checked before anything is written. A matrix
    /// whose update direction is not finite is skipped and reported, not an error.
    ///
    /// Weights and gradients have one element type, or the weights are `f32` master weights
    /// and the gradients `f16` or `bf16` ([`StepTypes`](crate::StepTypes)); any other
    /// pairing is [`Error::ElementTypes`](crate::Error::ElementTypes). New 16-bit weights
    /// are rounded as [`SpectralSgdConfig::rounding`] says (math §5a).
    pub fn step<TW, TG, W, G>(&mut self, weights: &mut [W], grads: &[G]) -> Result<B::Report>
    where
        TW: Element,
        TG: Element,
        W: BorrowMut<B::Storage<TW>> + Send,
        G: Borrow<B::Storage<TG>> + Sync,
    {
        self.step_inner(weights, grads, None::<&mut [&mut B::Storage<TG>]>)
    }

    /// A step on `f32` master weights with 16-bit gradients that also writes the new weights,
    /// rounded to nearest, into `copies` (of the gradients' type): the weights the next
    /// forward pass reads, written in the update pass itself (math §5a). Every matrix's copy
    /// is written, skipped matrices' too, so after a step that returns `Ok` each copy is
    /// its weights rounded. Errors, changing nothing, for other element types and on a
    /// count or length mismatch.
    ///
    /// ```
    /// use spectral_step::half::bf16;
    /// use spectral_step::{MatrixShape, SpectralSgd, SpectralSgdConfig};
    ///
    /// let shapes = [MatrixShape::new(8, 4)];
    /// let mut optimizer = SpectralSgd::new(&shapes, SpectralSgdConfig::default())?;
    /// let mut master = vec![vec![0.25f32; 32]];
    /// let mut forward = vec![vec![bf16::ZERO; 32]];
    /// let grads = vec![(0..32).map(|i| bf16::from_f32((i % 5) as f32 - 2.0)).collect::<Vec<_>>()];
    /// optimizer.step_with_copy(&mut master, &grads, &mut forward)?;
    /// for (copy, weight) in forward[0].iter().zip(&master[0]) {
    ///     assert_eq!(*copy, bf16::from_f32(*weight));
    /// }
    /// # Ok::<(), spectral_step::Error>(())
    /// ```
    pub fn step_with_copy<TG, W, G, C>(
        &mut self,
        weights: &mut [W],
        grads: &[G],
        copies: &mut [C],
    ) -> Result<B::Report>
    where
        TG: Element,
        W: BorrowMut<B::Storage<f32>> + Send,
        G: Borrow<B::Storage<TG>> + Sync,
        C: BorrowMut<B::Storage<TG>>,
    {
        self.step_inner(weights, grads, Some(copies))
    }

    fn step_inner<TW, TG, W, G, C>(
        &mut self,
        weights: &mut [W],
        grads: &[G],
        copies: Option<&mut [C]>,
    ) -> Result<B::Report>
    where
        TW: Element,
        TG: Element,
        W: BorrowMut<B::Storage<TW>> + Send,
        G: Borrow<B::Storage<TG>> + Sync,
        C: BorrowMut<B::Storage<TG>>,
    {
        self.step_counted(|backend, config, step| {
            backend.step(config, step, weights, grads, copies)
        })
    }

    /// Runs `step_fn` with the backend, the config and the next step's number, and counts
    /// the step when it succeeds.
    pub(crate) fn step_counted<R>(
        &mut self,
        step_fn: impl FnOnce(&mut B, &SpectralSgdConfig, u64) -> Result<R>,
    ) -> Result<R> {
        let step = self.steps.checked_add(1).ok_or_else(|| {
            crate::Error::InvalidArgument("the step counter is at its maximum".into())
        })?;
        let report = step_fn(&mut self.backend, &self.config, step)?;
        self.steps = step;
        Ok(report)
    }

    /// An optimizer around a backend built by the caller (for backends that need more than
    /// the layout, such as a chosen CUDA device).
    pub(crate) fn from_backend(
        layout: BatchLayout,
        config: SpectralSgdConfig,
        create: impl FnOnce(BatchLayout, &SpectralSgdConfig) -> Result<B>,
    ) -> Result<Self> {
        // Before `create`: a bad config is that error, not whatever opening a device says.
        config.validate()?;
        let backend = create(layout, &config)?;
        Ok(Self {
            config,
            backend,
            steps: 0,
        })
    }

    /// Replaces configuration, step count and state at once, as loading a state file does;
    /// the values were checked by the caller ([`crate::state::check_values`]).
    #[cfg(feature = "candle")]
    pub(crate) fn resume(
        &mut self,
        config: SpectralSgdConfig,
        steps: u64,
        state: HostState,
    ) -> Result<()> {
        config.validate_for(self.backend.layout())?;
        self.backend.import_state(state)?;
        self.config = config;
        self.steps = steps;
        Ok(())
    }

    /// The backend (its state and device).
    pub(crate) fn backend(&self) -> &B {
        &self.backend
    }

    /// The configuration.
    pub fn config(&self) -> &SpectralSgdConfig {
        &self.config
    }

    /// Changes the learning rate (for schedules). Errors, changing nothing, if it is not
    /// finite and `>= 0`, or if `learning_rate * s` overflows `f32` for some matrix.
    pub fn set_learning_rate(&mut self, learning_rate: f32) -> Result<()> {
        let config = SpectralSgdConfig {
            learning_rate,
            ..self.config
        };
        config.validate_for(self.backend.layout())?;
        self.config = config;
        Ok(())
    }

    /// The batch layout (shapes, offsets, blocks).
    pub fn layout(&self) -> &BatchLayout {
        self.backend.layout()
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Re-seeds the power vectors from the config's seed: the next step is a cold start.
    pub fn reset_power_vectors(&mut self) -> Result<()> {
        self.backend.reset_power_vectors(self.config.seed)
    }

    /// The optimizer state (momentum, power vectors, warm flags), copied to the host without
    /// the backend's alignment gaps: what [`save_state`](Self::save_state) writes besides the
    /// configuration and step count. On a device this waits for the steps enqueued so far.
    pub fn state(&self) -> Result<HostState> {
        self.backend.export_state()
    }

    /// Replaces the optimizer state (momentum, power vectors, warm flags) with `state`, laid
    /// out as [`state`](Self::state) returns it: the same state moves between backends. The
    /// next step cold-starts the matrices whose vectors are not warm. Errors, changing
    /// nothing, if a length does not fit this optimizer's shapes
    /// ([`Error::StateShapeMismatch`](crate::Error::StateShapeMismatch)) or a value is out of
    /// range: non-finite momentum, or power vectors that are not finite unit vectors
    /// ([`Error::StateFormat`](crate::Error::StateFormat)). A driver error while copying to
    /// a device is the exception: see [`Backend::import_state`].
    pub fn set_state(&mut self, state: HostState) -> Result<()> {
        crate::state::check_values(self.backend.layout(), &state)?;
        self.backend.import_state(state)
    }

    /// The whole state as a safetensors byte buffer (see [`save_state`](Self::save_state)).
    pub fn state_to_bytes(&self) -> Result<Vec<u8>> {
        crate::state::encode(
            self.backend.layout(),
            &self.config,
            self.steps,
            &self.backend.export_state()?,
        )
    }

    /// Restores a state written by [`state_to_bytes`](Self::state_to_bytes) or
    /// [`save_state`](Self::save_state): configuration, step count, momentum and power
    /// vectors. The shapes must match this optimizer's. On error nothing is changed, but for
    /// a driver error while copying to a device ([`Backend::import_state`]).
    pub fn load_state_from_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let (config, steps, state): (SpectralSgdConfig, u64, HostState) =
            crate::state::decode(bytes, self.backend.layout())?;
        self.backend.import_state(state)?;
        self.config = config;
        self.steps = steps;
        Ok(())
    }

    /// Saves the state (momentum, power vectors, step count, configuration, shapes) as a
    /// safetensors file. The file is written beside `path` and renamed into place, so a crash
    /// never leaves a half-written state under `path`.
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::state::write_atomically(path.as_ref(), &self.state_to_bytes()?)
    }

    /// Loads a state saved by [`save_state`](Self::save_state). A file for other shapes is
    /// [`Error::StateShapeMismatch`](crate::Error::StateShapeMismatch); a truncated, corrupted
    /// or foreign file, one larger than any state for these shapes, or one whose values are
    /// out of range (non-finite momentum, power vectors not of unit length) is
    /// [`Error::StateFormat`](crate::Error::StateFormat). On error nothing is changed.
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let limit = crate::state::max_file_bytes(self.layout());
        let bytes = crate::state::read_bounded(path.as_ref(), limit)?;
        self.load_state_from_bytes(&bytes)
    }
}
