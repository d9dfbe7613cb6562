//! Checking the spectral condition during training (math §6): spectral norms, their ratio to
//! the target `s`, and stable ranks.
//!
//! In the feature-learning regime `||W||_* / s` and `||ΔW||_* / s` stay `Θ(1)` as width grows,
//! and the stable rank of a gradient update stays small.

use crate::cpu::{BatchPowerIteration, Estimate, MAX_LANCZOS_BLOCK, check_lanczos_settings};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::{BatchLayout, BlockPolicy, MatrixShape};
use crate::scaling::Scale;

/// When to stop an iteration run to convergence (Lanczos, see [`spectral_norm`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Convergence {
    /// Relative accuracy of `sigma` to reach, as the Lanczos stopping rule estimates it (math
    /// §4.9.1). Default `1e-6`; values below a few `f32` epsilons are raised to that.
    pub tolerance: f32,
    /// Give up refining after this many passes (the estimate is then a lower bound that may
    /// be short of the tolerance), at most
    /// [`MAX_POWER_ITERATIONS`](crate::MAX_POWER_ITERATIONS). Default 1000.
    pub max_iterations: u32,
    /// Seed of the starting vectors. Default 0.
    pub seed: u64,
    /// Vectors per Lanczos block, 1 to [`MAX_LANCZOS_BLOCK`]
    /// (see [`BatchPowerIteration::lanczos`]). Default 4: top singular values that crowd
    /// within the tolerance are resolved rather than missed, and a start with little weight
    /// on the top singular vector rarely ends the run at `σ2` (none of the 120 Gaussian runs
    /// of math §4.9.1), at 1.4 to 2.5 times the time of one vector (measured on a 2-core AMD
    /// EPYC, math §4.9.2).
    pub block_vectors: usize,
}

impl Default for Convergence {
    fn default() -> Self {
        Self {
            tolerance: 1e-6,
            max_iterations: 1000,
            seed: 0,
            block_vectors: MAX_LANCZOS_BLOCK,
        }
    }
}

fn check_matrix<T>(matrix: &[T], shape: MatrixShape) -> Result<BatchLayout> {
    let layout = BatchLayout::new(&[shape], BlockPolicy::CPU)?;
    layout.check_lengths("input", std::iter::once(matrix.len()))?;
    Ok(layout)
}

/// `||A||_*` of a row-major `fan_out x fan_in` matrix, by block Lanczos on `A^T A` from a
/// seeded cold start (the fused one-read pass per iteration; see
/// [`BatchPowerIteration::lanczos`]), to [`Convergence::default`]'s tolerance, for entries of
/// any finite magnitude (matrices whose entries are very small or very large are scaled by
/// a power of two first, exactly). Errors on a wrong length, a non-finite entry, or a norm
/// beyond the range of `f32`.
///
/// ```
/// use spectral_step::{MatrixShape, diagnostics::spectral_norm};
/// let a = [1.0f32, 2.0, 2.0, 4.0]; // rank one: sigma = ||(1,2)|| * ||(1,2)|| = 5
/// assert!((spectral_norm(&a, MatrixShape::new(2, 2))? - 5.0).abs() < 1e-5);
/// # Ok::<(), spectral_step::Error>(())
/// ```
pub fn spectral_norm<T: Element>(matrix: &[T], shape: MatrixShape) -> Result<f32> {
    spectral_norm_with(matrix, shape, Convergence::default())
}

/// [`spectral_norm`] with explicit stopping rules: relative `tolerance` on `sigma`, at most
/// `max_iterations` passes (the result is then a lower bound short of the tolerance).
pub fn spectral_norm_with<T: Element>(
    matrix: &[T],
    shape: MatrixShape,
    convergence: Convergence,
) -> Result<f32> {
    let layout = check_matrix(matrix, shape)?;
    // f32 products limit the attainable accuracy to a few units of f32 rounding.
    let tolerance = f64::from(convergence.tolerance).max(4.0 * f64::from(f32::EPSILON));
    let iterations = convergence.max_iterations.max(1);
    // Checked before the data, so that a zero matrix does not hide a bad setting.
    check_lanczos_settings(tolerance, iterations, convergence.block_vectors)?;
    let mut largest = 0.0f32;
    for value in matrix {
        let magnitude = value.to_f32().abs();
        if !magnitude.is_finite() {
            return Err(Error::InvalidArgument(
                "the matrix holds a NaN or an infinity".into(),
            ));
        }
        largest = largest.max(magnitude);
    }
    if largest == 0.0 {
        return Ok(0.0);
    }
    let mut power = BatchPowerIteration::new(layout)?;
    // The fused pass sums squares in f32: entries far from 1 are scaled by a power of two
    // first (exactly), so that neither the squares underflow nor the sums overflow.
    let (estimate, exponent) = if (SAFE_MAGNITUDE.recip()..=SAFE_MAGNITUDE).contains(&largest) {
        let result = power.lanczos(
            &[matrix],
            convergence.seed,
            tolerance,
            iterations,
            convergence.block_vectors,
        )?;
        (result[0].estimate, 0)
    } else {
        let exponent = f64::from(largest).log2().floor() as i32;
        // In f64: 2^-exponent may lie outside f32's normal range.
        let factor = 2f64.powi(-exponent);
        let mut scaled: Vec<f32> = crate::memory::zeroed(matrix.len(), "a scaled copy")?;
        for (scaled, value) in scaled.iter_mut().zip(matrix) {
            *scaled = (f64::from(value.to_f32()) * factor) as f32;
        }
        let result = power.lanczos(
            &[&scaled[..]],
            convergence.seed,
            tolerance,
            iterations,
            convergence.block_vectors,
        )?;
        (result[0].estimate, exponent)
    };
    match estimate {
        Estimate::NonFinite => Err(Error::InvalidArgument(
            "the matrix's spectral norm cannot be formed in f32".into(),
        )),
        Estimate::Zero | Estimate::Degenerate => Ok(0.0),
        Estimate::Sigma(sigma) => {
            let sigma = f64::from(sigma) * 2f64.powi(exponent);
            if sigma > f64::from(f32::MAX) {
                return Err(Error::InvalidArgument(format!(
                    "the spectral norm ({sigma:e}) is beyond the range of f32"
                )));
            }
            Ok(sigma as f32)
        }
    }
}

/// Largest entries in `[1/SAFE_MAGNITUDE, SAFE_MAGNITUDE]` go through the fused pass as they
/// are: their squares (`2^-80` to `2^80`) are normal `f32` values and sums of `2^40` of them
/// stay finite. Others are scaled into `[1, 2)` first.
const SAFE_MAGNITUDE: f32 = (1u64 << 40) as f32;

/// `||A||_F`, accumulated in `f64`.
pub fn frobenius_norm<T: Element>(matrix: &[T]) -> f32 {
    matrix
        .iter()
        .map(|&x| f64::from(x.to_f32()).powi(2))
        .sum::<f64>()
        .sqrt() as f32
}

/// Stable rank `||A||_F^2 / ||A||_*^2`, between 1 and `min(fan_out, fan_in)`; 0 for a zero
/// matrix.
///
/// ```
/// use spectral_step::{MatrixShape, diagnostics::stable_rank};
/// let identity = [1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
/// assert!((stable_rank(&identity, MatrixShape::new(3, 3))? - 3.0).abs() < 1e-4);
/// # Ok::<(), spectral_step::Error>(())
/// ```
pub fn stable_rank<T: Element>(matrix: &[T], shape: MatrixShape) -> Result<f32> {
    let sigma = spectral_norm(matrix, shape)?;
    if sigma == 0.0 {
        return Ok(0.0);
    }
    let frobenius = f64::from(frobenius_norm(matrix));
    Ok((frobenius * frobenius / (f64::from(sigma) * f64::from(sigma))) as f32)
}

/// `||A||_* / s`: how far a matrix is from its spectral target (math §6). `Θ(1)` is healthy.
pub fn ratio_to_target<T: Element>(matrix: &[T], shape: MatrixShape, scale: Scale) -> Result<f32> {
    scale.validate()?;
    Ok(spectral_norm(matrix, shape)? / scale.factor(shape))
}

/// The math §6 report for one layer and one update `ΔW = W_after - W_before`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerDiagnostics {
    /// `||W_after||_* / s`.
    pub weight_ratio: f32,
    /// `||ΔW||_* / s`.
    pub update_ratio: f32,
    /// Stable rank of `ΔW` (0 when the update is zero).
    pub update_stable_rank: f32,
}

impl LayerDiagnostics {
    /// Measures a layer before and after an update.
    ///
    /// ```
    /// use spectral_step::{MatrixShape, Scale, diagnostics::LayerDiagnostics};
    /// let shape = MatrixShape::new(2, 2);
    /// let before = [1.0f32, 0.0, 0.0, 1.0];
    /// let after = [1.5f32, 0.0, 0.0, 1.0]; // a rank-one update of norm 0.5
    /// let report = LayerDiagnostics::measure(&before, &after, shape, Scale::Spectral)?;
    /// assert!((report.update_ratio - 0.5).abs() < 1e-5);
    /// assert!((report.update_stable_rank - 1.0).abs() < 1e-5);
    /// # Ok::<(), spectral_step::Error>(())
    /// ```
    pub fn measure<T: Element>(
        before: &[T],
        after: &[T],
        shape: MatrixShape,
        scale: Scale,
    ) -> Result<Self> {
        check_matrix(before, shape)?;
        check_matrix(after, shape)?;
        let update: Vec<f32> = before
            .iter()
            .zip(after)
            .map(|(&b, &a)| a.to_f32() - b.to_f32())
            .collect();
        Ok(Self {
            weight_ratio: ratio_to_target(after, shape, scale)?,
            update_ratio: ratio_to_target(&update, shape, scale)?,
            update_stable_rank: stable_rank(&update, shape)?,
        })
    }
}
