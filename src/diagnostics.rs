//! Checking the spectral condition during training (SPEC 6): spectral norms, their ratio to
//! the target `s`, and stable ranks.
//!
//! In the feature-learning regime `||W||_* / s` and `||ΔW||_* / s` stay `Θ(1)` as width grows,
//! and the stable rank of a gradient update stays small.

use crate::cpu::{BatchPowerIteration, Estimate};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::{BatchLayout, BlockPolicy, MatrixShape};
use crate::scaling::Scale;

/// When to stop a power iteration run to convergence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Convergence {
    /// Stop when successive estimates differ by at most `tolerance * sigma`. Default `1e-6`.
    pub tolerance: f32,
    /// Give up refining after this many iterations (the estimate is then a lower bound that
    /// may be short by about the tolerance times the gap ratio). Default 1000.
    pub max_iterations: u32,
    /// Seed of the starting vector. Default 0.
    pub seed: u64,
}

impl Default for Convergence {
    fn default() -> Self {
        Self {
            tolerance: 1e-6,
            max_iterations: 1000,
            seed: 0,
        }
    }
}

fn check_matrix<T>(matrix: &[T], shape: MatrixShape) -> Result<BatchLayout> {
    let layout = BatchLayout::new(&[shape], BlockPolicy::CPU)?;
    layout.check_lengths("input", std::iter::once(matrix.len()))?;
    Ok(layout)
}

/// `||A||_*` of a row-major `fan_out x fan_in` matrix, by power iteration to convergence
/// with [`Convergence::default`]. Errors on a wrong length or a non-finite entry.
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

/// [`spectral_norm`] with explicit stopping rules.
pub fn spectral_norm_with<T: Element>(
    matrix: &[T],
    shape: MatrixShape,
    convergence: Convergence,
) -> Result<f32> {
    let layout = check_matrix(matrix, shape)?;
    let mut power = BatchPowerIteration::new(layout);
    let mut vector = power.cold_vectors(convergence.seed);
    let mut previous = f32::NAN;
    let mut reseeds = 0u64;
    for _ in 0..convergence.max_iterations.max(1) {
        match power.fused(&[matrix], &mut vector)?[0] {
            Estimate::NonFinite => {
                return Err(Error::InvalidArgument(
                    "matrix holds a NaN or an infinity (or its norm exceeds f32 range)".into(),
                ));
            }
            Estimate::Zero => return Ok(0.0),
            Estimate::Degenerate if reseeds < 3 => {
                reseeds += 1;
                vector = power.cold_vectors(convergence.seed.wrapping_add(reseeds));
            }
            // Still orthogonal after fresh random starts: U^T U v underflows f32.
            Estimate::Degenerate => return Ok(0.0),
            Estimate::Sigma(sigma) => {
                if shape.is_vector() || (sigma - previous).abs() <= convergence.tolerance * sigma {
                    return Ok(sigma);
                }
                previous = sigma;
            }
        }
    }
    Ok(previous)
}

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

/// `||A||_* / s`: how far a matrix is from its spectral target (SPEC 6). `Θ(1)` is healthy.
pub fn ratio_to_target<T: Element>(matrix: &[T], shape: MatrixShape, scale: Scale) -> Result<f32> {
    scale.validate()?;
    Ok(spectral_norm(matrix, shape)? / scale.factor(shape))
}

/// The SPEC 6 report for one layer and one update `ΔW = W_after - W_before`.
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
