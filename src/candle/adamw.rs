//! The AdamW group: candle-nn's `AdamW` rule, computed in place (math §5c).

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// AdamW's settings, with candle-nn's `ParamsAdamW` defaults (`learning_rate` 0.001, betas
/// 0.9 and 0.999, `eps` 1e-8, `weight_decay` 0.01).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Step size `η`.
    pub learning_rate: f64,
    /// First-moment decay `β1`, in `[0, 1)`.
    pub beta1: f64,
    /// Second-moment decay `β2`, in `[0, 1)`.
    pub beta2: f64,
    /// Added to `sqrt(v̂)`, `> 0`.
    pub eps: f64,
    /// Decoupled decay `λ`: `θ <- (1 - ηλ) θ` before the update.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        let candle = candle_nn::ParamsAdamW::default();
        Self::from(candle)
    }
}

impl From<candle_nn::ParamsAdamW> for AdamWConfig {
    fn from(params: candle_nn::ParamsAdamW) -> Self {
        Self {
            learning_rate: params.lr,
            beta1: params.beta1,
            beta2: params.beta2,
            eps: params.eps,
            weight_decay: params.weight_decay,
        }
    }
}

impl AdamWConfig {
    /// Errors on a value out of its documented range.
    pub fn validate(&self) -> Result<()> {
        let invalid =
            |what: &str, value: f64| Err(Error::InvalidConfig(format!("AdamW {what} is {value}")));
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return invalid(
                "learning_rate (must be finite and >= 0)",
                self.learning_rate,
            );
        }
        for (what, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return invalid(&format!("{what} (must be in [0, 1))"), beta);
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return invalid("eps (must be finite and > 0)", self.eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return invalid("weight_decay (must be finite and >= 0)", self.weight_decay);
        }
        Ok(())
    }
}

/// One step's constants, rounded to `f32` where candle-nn rounds them: it computes them in
/// `f64` and its tensor-scalar operations cast the scalar to the element type.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Coefficients {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    /// `1 / (1 - β1^t)`.
    scale_m: f32,
    /// `1 / (1 - β2^t)`.
    scale_v: f32,
    /// `1 - ηλ`.
    decay: f32,
    learning_rate: f32,
    eps: f32,
}

impl Coefficients {
    /// The constants of step `step` (counted from 1).
    pub fn new(config: &AdamWConfig, step: u64) -> Self {
        // candle-nn passes the step as `i32`; beyond that every power is 0 anyway.
        let exponent = i32::try_from(step).unwrap_or(i32::MAX);
        Self {
            beta1: config.beta1 as f32,
            one_minus_beta1: (1.0 - config.beta1) as f32,
            beta2: config.beta2 as f32,
            one_minus_beta2: (1.0 - config.beta2) as f32,
            scale_m: (1.0 / (1.0 - config.beta1.powi(exponent))) as f32,
            scale_v: (1.0 / (1.0 - config.beta2.powi(exponent))) as f32,
            decay: (1.0 - config.learning_rate * config.weight_decay) as f32,
            learning_rate: config.learning_rate as f32,
            eps: config.eps as f32,
        }
    }

    /// One element: `m <- β1 m + (1-β1) g`, `v <- β2 v + (1-β2) g²`,
    /// `θ <- (1-ηλ) θ - η m̂ / (sqrt(v̂) + ε)`, in candle-nn's operation order. Each of its
    /// tensor-scalar products is an affine map `x * c + 0`; the `+ 0.0` turns `-0` into `+0`
    /// and is kept so that `f32` results are candle-nn's bit for bit.
    #[inline]
    fn update(&self, theta: f32, grad: f32, m: &mut f32, v: &mut f32) -> f32 {
        let next_m = (*m * self.beta1 + 0.0) + (grad * self.one_minus_beta1 + 0.0);
        let next_v = (*v * self.beta2 + 0.0) + ((grad * grad) * self.one_minus_beta2 + 0.0);
        let m_hat = next_m * self.scale_m + 0.0;
        let v_hat = next_v * self.scale_v + 0.0;
        let decayed = theta * self.decay + 0.0;
        let adjusted = m_hat / (v_hat.sqrt() + self.eps);
        *m = next_m;
        *v = next_v;
        decayed - (adjusted * self.learning_rate + 0.0)
    }
}

/// A parameter's element type, as the AdamW loop reads and writes it: `f32` is exact, a
/// 16-bit value is widened and the new value rounded to nearest (the moments stay `f32`).
pub(crate) trait AdamWElement: Copy + Send + Sync {
    fn widen(self) -> f32;
    fn narrow(value: f32) -> Self;
}

impl AdamWElement for f32 {
    fn widen(self) -> f32 {
        self
    }
    fn narrow(value: f32) -> Self {
        value
    }
}

impl AdamWElement for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(value: f32) -> Self {
        bf16::from_f32(value)
    }
}

impl AdamWElement for f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(value: f32) -> Self {
        f16::from_f32(value)
    }
}

/// Elements per rayon task: large enough that scheduling is noise, small enough that an
/// embedding table spreads over every core. Each element is independent, so the result does
/// not depend on the split.
const CHUNK: usize = 1 << 14;

/// Steps one parameter in place. `theta`, `grad`, `m` and `v` have one length (checked by
/// the caller).
pub(crate) fn step<T: AdamWElement, G: AdamWElement>(
    coefficients: &Coefficients,
    theta: &mut [T],
    grad: &[G],
    m: &mut [f32],
    v: &mut [f32],
) {
    debug_assert!(grad.len() == theta.len() && m.len() == theta.len() && v.len() == theta.len());
    theta
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((theta, grad), (m, v))| {
            for (((theta, grad), m), v) in theta.iter_mut().zip(grad).zip(m).zip(v) {
                *theta = T::narrow(coefficients.update(theta.widen(), grad.widen(), m, v));
            }
        });
}

/// Whether every gradient value is finite (a parameter with a non-finite gradient is skipped,
/// as the spectral step skips a matrix).
pub(crate) fn all_finite<G: AdamWElement>(grad: &[G]) -> bool {
    grad.par_chunks(CHUNK)
        .all(|chunk| chunk.iter().all(|g| g.widen().is_finite()))
}
