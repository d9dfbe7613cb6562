//! The paper's math: target spectral norms and the parametrisation that meets them
//! (math §2 and 3; Yang, Simon & Bernstein, "A Spectral Condition for Feature Learning", 2023).
//!
//! Feature learning at every width needs, for every layer `W` of shape `(fan_out, fan_in)`,
//!
//! ```text
//! ||W||_*  = Θ(sqrt(fan_out / fan_in))      ||ΔW||_* = Θ(sqrt(fan_out / fan_in))
//! ```
//!
//! This module gives the target factor `s` ([`Scale`]), an initialisation that meets it
//! exactly ([`spectral_init`]), and, for users who keep their own optimizer, the per-layer
//! init scale and learning-rate multipliers of math §3b.

use std::fmt;
use std::str::FromStr;

use crate::diagnostics::{Convergence, spectral_norm_with};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::MatrixShape;

/// The target factor `s` for a matrix's spectral norm (math §3a). Every update of
/// [`SpectralSgd`](crate::SpectralSgd) has spectral norm `learning_rate * s`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Scale {
    /// `s = sqrt(fan_out / fan_in)`: the spectral condition itself. The default.
    #[default]
    Spectral,
    /// `s = sqrt(max(1, fan_out / fan_in))`: Muon's reference implementation.
    MuonMax1,
    /// `s = c * sqrt(max(fan_out, fan_in))`: Moonlight-style, matching AdamW's update RMS
    /// (`c = 0.2` is typical).
    RmsMatch(f32),
}

impl Scale {
    /// The factor `s` for a matrix of this shape.
    ///
    /// ```
    /// use spectral_step::{MatrixShape, Scale};
    /// let hidden_to_wide = MatrixShape::new(3072, 768);
    /// assert_eq!(Scale::Spectral.factor(hidden_to_wide), 2.0);
    /// assert_eq!(Scale::MuonMax1.factor(MatrixShape::new(768, 3072)), 1.0);
    /// assert!((Scale::RmsMatch(0.2).factor(hidden_to_wide) - 0.2 * 3072f32.sqrt()).abs() < 1e-5);
    /// ```
    pub fn factor(self, shape: MatrixShape) -> f32 {
        let (fan_out, fan_in) = (shape.fan_out as f64, shape.fan_in as f64);
        let s = match self {
            Scale::Spectral => (fan_out / fan_in).sqrt(),
            Scale::MuonMax1 => (fan_out / fan_in).max(1.0).sqrt(),
            Scale::RmsMatch(c) => f64::from(c) * fan_out.max(fan_in).sqrt(),
        };
        s as f32
    }

    /// `RmsMatch(c)` needs a finite `c > 0`.
    pub fn validate(self) -> Result<()> {
        match self {
            Scale::RmsMatch(c) if !(c.is_finite() && c > 0.0) => Err(Error::InvalidConfig(
                format!("Scale::RmsMatch needs a finite c > 0, got {c}"),
            )),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Scale {
    /// `spectral`, `muon_max1`, or `rms_match:C` (the form [`FromStr`] reads back exactly).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scale::Spectral => f.write_str("spectral"),
            Scale::MuonMax1 => f.write_str("muon_max1"),
            Scale::RmsMatch(c) => write!(f, "rms_match:{c:?}"),
        }
    }
}

impl FromStr for Scale {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "spectral" => Ok(Scale::Spectral),
            "muon_max1" => Ok(Scale::MuonMax1),
            _ => {
                let c = text
                    .strip_prefix("rms_match:")
                    .and_then(|c| c.parse::<f32>().ok())
                    .ok_or_else(|| Error::InvalidConfig(format!("unknown scale {text:?}")))?;
                let scale = Scale::RmsMatch(c);
                scale.validate()?;
                Ok(scale)
            }
        }
    }
}

/// Spectral initialisation (math §3a): `W = sigma0 * s * W' / ||W'||_*` with `W'` Gaussian,
/// drawn from `seed`. `||W'||_*` is found by Lanczos iteration to convergence, so
/// `||W||_* = sigma0 * s` up to that tolerance (and the rounding of `T`). Errors, writing
/// nothing, on a wrong length, a `sigma0` that is negative or not finite, an invalid scale,
/// or a target whose entries would not fit `T`.
///
/// ```
/// use spectral_step::{MatrixShape, Scale, diagnostics, scaling::spectral_init};
/// let shape = MatrixShape::new(64, 16);
/// let mut weights = vec![0.0f32; shape.len()];
/// spectral_init(&mut weights, shape, 1.0, Scale::Spectral, 42)?;
/// let sigma = diagnostics::spectral_norm(&weights, shape)?;
/// assert!((sigma - 2.0).abs() < 1e-3); // sqrt(64 / 16)
/// # Ok::<(), spectral_step::Error>(())
/// ```
pub fn spectral_init<T: Element>(
    weights: &mut [T],
    shape: MatrixShape,
    sigma0: f32,
    scale: Scale,
    seed: u64,
) -> Result<()> {
    if shape.is_empty() {
        return Err(Error::ZeroDimension {
            index: 0,
            fan_out: shape.fan_out,
            fan_in: shape.fan_in,
        });
    }
    if weights.len() != shape.len() {
        return Err(Error::LengthMismatch {
            what: "weight",
            index: 0,
            fan_out: shape.fan_out,
            fan_in: shape.fan_in,
            expected: shape.len(),
            got: weights.len(),
        });
    }
    if !(sigma0.is_finite() && sigma0 >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "sigma0 must be finite and >= 0, got {sigma0}"
        )));
    }
    scale.validate()?;
    let mut draw: Vec<f32> = crate::memory::zeroed(shape.len(), "the initial draw")?;
    crate::random::fill_gaussian(seed, 0, &mut draw);
    let sigma = spectral_norm_with(
        &draw,
        shape,
        Convergence {
            seed,
            ..Convergence::default()
        },
    )?;
    let factor = f64::from(sigma0) * f64::from(scale.factor(shape)) / f64::from(sigma);
    // Checked before anything is written: the largest entry must fit the element type.
    let largest = draw.iter().fold(0.0f64, |m, &x| m.max(f64::from(x).abs())) * factor;
    if !T::from_f32_rne(largest as f32).to_f32().is_finite() {
        return Err(Error::InvalidArgument(format!(
            "sigma0 * s = {:e} gives entries up to {largest:e}, beyond the range of {}",
            f64::from(sigma0) * f64::from(scale.factor(shape)),
            T::DTYPE.name()
        )));
    }
    for (weight, &value) in weights.iter_mut().zip(&draw) {
        *weight = T::from_f32_rne((f64::from(value) * factor) as f32);
    }
    Ok(())
}

/// math §3b, for plain SGD without normalisation: the standard deviation of a Gaussian init,
/// `sigma_l = c / sqrt(fan_in) * min(1, sqrt(fan_out / fan_in))`.
///
/// ```
/// use spectral_step::{MatrixShape, scaling::init_std};
/// assert_eq!(init_std(MatrixShape::new(256, 256), 1.0), 1.0 / 16.0);
/// ```
pub fn init_std(shape: MatrixShape, c: f32) -> f32 {
    let (fan_out, fan_in) = (shape.fan_out as f64, shape.fan_in as f64);
    (f64::from(c) / fan_in.sqrt() * (fan_out / fan_in).sqrt().min(1.0)) as f32
}

/// math §3b, plain SGD: the per-layer learning rate is `eta * fan_out / fan_in`; this returns
/// the multiplier `fan_out / fan_in`.
///
/// ```
/// use spectral_step::{MatrixShape, scaling::sgd_learning_rate_multiplier};
/// assert_eq!(sgd_learning_rate_multiplier(MatrixShape::new(10, 1000)), 0.01);
/// ```
pub fn sgd_learning_rate_multiplier(shape: MatrixShape) -> f32 {
    (shape.fan_out as f64 / shape.fan_in as f64) as f32
}

/// math §3b, Adam-type optimizers: the per-layer learning rate is `eta / fan_in` (Adam's
/// entries have size `eta`, and a low-rank update of that entry size has spectral norm about
/// `eta * sqrt(fan_out * fan_in)`); this returns the multiplier `1 / fan_in`.
pub fn adam_learning_rate_multiplier(shape: MatrixShape) -> f32 {
    (1.0 / shape.fan_in as f64) as f32
}
