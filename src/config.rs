//! The optimizer's settings (math §5) with documented defaults.

use crate::error::{Error, Result};
use crate::newton_schulz::UpdateRule;
use crate::rounding::Rounding;
use crate::scaling::Scale;

/// The most power iterations a step (or a device power iteration) may run for one matrix. A
/// step also stops iterating a matrix as soon as its estimate stops changing (math §4.7), so
/// a large count costs only what convergence needs.
pub const MAX_POWER_ITERATIONS: u32 = 1024;

/// How the momentum buffer accumulates gradients (math §5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MomentumKind {
    /// `M <- beta * M + G` (PyTorch SGD's momentum). The default.
    #[default]
    HeavyBall,
    /// `M <- beta * M + (1 - beta) * G`, an exponential moving average (Muon's form).
    Ema,
}

/// Settings of [`SpectralSgd`](crate::SpectralSgd). Build with struct-update syntax over
/// [`Default`]:
///
/// ```
/// use spectral_step::{MomentumKind, Scale, SpectralSgdConfig};
/// let config = SpectralSgdConfig {
///     learning_rate: 0.05,
///     nesterov: true,
///     momentum_kind: MomentumKind::Ema,
///     scale: Scale::RmsMatch(0.2),
///     ..SpectralSgdConfig::default()
/// };
/// config.validate()?;
/// # Ok::<(), spectral_step::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpectralSgdConfig {
    /// `eta`: the width-independent learning rate. Each update has spectral norm
    /// `eta * s` (math §3a). Default `0.02`.
    pub learning_rate: f32,
    /// `beta`, in `[0, 1)`. Default `0.95`.
    pub momentum: f32,
    /// Heavy-ball or EMA accumulation. Default heavy-ball.
    pub momentum_kind: MomentumKind,
    /// Use the Nesterov direction `U = beta * M_new + c * G` instead of `U = M_new`
    /// (`c` = 1 for heavy-ball, `1 - beta` for EMA). Default `false`.
    pub nesterov: bool,
    /// `lambda`: decoupled weight decay, `W <- (1 - eta * lambda) W` each step. Default `0`.
    pub weight_decay: f32,
    /// The target factor `s` of each matrix (math §3a table). Default [`Scale::Spectral`].
    pub scale: Scale,
    /// Power iterations per step once a matrix's power vector is warm, at most
    /// [`MAX_POWER_ITERATIONS`]. Default 1.
    pub warm_iterations: u32,
    /// Power iterations on a cold start (first step, after a reset), at most
    /// [`MAX_POWER_ITERATIONS`]; fewer run once the estimate has converged. Default 8.
    pub cold_iterations: u32,
    /// Seed of the cold-start power vectors and of the stochastic-rounding stream. Default 0.
    pub seed: u64,
    /// How new `f16`/`bf16` weights are rounded (math §5a). Default
    /// [`Rounding::Stochastic`]; no effect on `f32` weights.
    pub rounding: Rounding,
    /// How the update direction becomes the weights' change: divided by its power-iteration
    /// `σ` (the default), or orthogonalised by Newton–Schulz iterations (Muon's rule,
    /// math §5b; CPU only for now).
    pub update: UpdateRule,
}

impl Default for SpectralSgdConfig {
    fn default() -> Self {
        Self {
            learning_rate: 0.02,
            momentum: 0.95,
            momentum_kind: MomentumKind::HeavyBall,
            nesterov: false,
            weight_decay: 0.0,
            scale: Scale::Spectral,
            warm_iterations: 1,
            cold_iterations: 8,
            seed: 0,
            rounding: Rounding::Stochastic,
            update: UpdateRule::PowerNormalised,
        }
    }
}

/// The momentum rule as both backends apply it (math §5.1):
/// `M_new = beta M + grad_coef G`, and `U = beta M_new + grad_coef G` with Nesterov, else
/// `U = M_new`. `grad_coef` is 1 for heavy-ball and `1 - beta` for the EMA.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct MomentumRule {
    pub beta: f32,
    pub grad_coef: f32,
    pub nesterov: bool,
}

impl SpectralSgdConfig {
    /// The momentum rule these settings describe.
    pub(crate) fn momentum_rule(&self) -> MomentumRule {
        let grad_coef = match self.momentum_kind {
            MomentumKind::HeavyBall => 1.0,
            MomentumKind::Ema => 1.0 - self.momentum,
        };
        MomentumRule {
            beta: self.momentum,
            grad_coef,
            nesterov: self.nesterov,
        }
    }

    /// Whether pass B rounds new weights of type `dtype` stochastically (math §5a): 16-bit
    /// weights under [`Rounding::Stochastic`].
    pub(crate) fn rounds_stochastically(&self, dtype: crate::element::Dtype) -> bool {
        dtype.is_low_precision() && self.rounding == Rounding::Stochastic
    }

    /// [`validate`](Self::validate), and then, for every matrix of `layout`, that its target
    /// factor `s` is finite and positive and that `learning_rate * s` is finite in `f32` (an
    /// update of that spectral norm can be written at all).
    pub(crate) fn validate_for(&self, layout: &crate::layout::BatchLayout) -> Result<()> {
        self.validate()?;
        for (index, shape) in layout.shapes().enumerate() {
            let s = self.scale.factor(shape);
            let step = f64::from(self.learning_rate) * f64::from(s);
            if !(s.is_finite() && s > 0.0 && step <= f64::from(f32::MAX)) {
                return Err(Error::InvalidConfig(format!(
                    "matrix {index} ({}x{}): the scale {} gives s = {s:e} and \
                     learning_rate * s = {step:e}; both must be finite in f32",
                    shape.fan_out, shape.fan_in, self.scale
                )));
            }
        }
        Ok(())
    }

    /// Checks every field against its documented range.
    pub fn validate(&self) -> Result<()> {
        let invalid = |message: String| Err(Error::InvalidConfig(message));
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return invalid(format!(
                "learning_rate must be finite and >= 0, got {}",
                self.learning_rate
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return invalid(format!("momentum must be in [0, 1), got {}", self.momentum));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return invalid(format!(
                "weight_decay must be finite and >= 0, got {}",
                self.weight_decay
            ));
        }
        if self.learning_rate * self.weight_decay > 1.0 {
            return invalid(format!(
                "learning_rate * weight_decay must be at most 1 (it shrinks W by 1 - eta*lambda), got {}",
                self.learning_rate * self.weight_decay
            ));
        }
        for (name, count) in [
            ("warm_iterations", self.warm_iterations),
            ("cold_iterations", self.cold_iterations),
        ] {
            if !(1..=MAX_POWER_ITERATIONS).contains(&count) {
                return invalid(format!(
                    "{name} must be between 1 and {MAX_POWER_ITERATIONS}, got {count}"
                ));
            }
        }
        self.update.validate()?;
        self.scale.validate()
    }
}
