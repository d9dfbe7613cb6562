//! Cold-start spectral norms by Lanczos iteration on `U^T U`, built on the fused pass.
//!
//! Power iteration converges at the rate `(σ2/σ1)^2` per pass, which is slow when the top
//! singular values crowd together (a Gaussian `n x n` matrix needs on the order of 170 passes
//! for `1e-3` at `n = 2048`). Lanczos builds the Krylov space `{v, A v, A^2 v, ...}` of
//! `A = U^T U` from the same one-read pass, and the largest eigenvalue of its tridiagonal
//! projection `T_k` converges roughly at the square root of that rate (Kaniel-Paige).
//!
//! Per iteration `k` (one fused pass for the whole batch):
//!
//! ```text
//! w = A q_k;  α_k = <q_k, w>;  w -= α_k q_k + β_{k-1} q_{k-1};  w -= Q (Q^T w) (twice)
//! β_k = |w|;  q_{k+1} = w / β_k
//! ```
//!
//! with full re-orthogonalisation against every earlier `q` (cheap: `k n` against the pass's
//! `m n`). The estimate is `σ = sqrt(θ)`, `θ` the largest eigenvalue of `T_k`, and the run
//! stops when the residual bound `|β_k y_k|` (`y` the Ritz vector of `θ` in `T_k`) falls
//! below `2 tolerance θ`: then `θ` is within that of an eigenvalue of `A`, and `σ` within
//! `tolerance` relative.

use super::power::{BatchPowerIteration, Estimate};
use crate::config::MAX_POWER_ITERATIONS;
use crate::element::Element;
use crate::error::{Error, Result};

/// The outcome of a Lanczos run for one matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LanczosEstimate {
    /// The estimate: `Sigma` (a lower bound on `||U||_*`, within the tolerance when
    /// `converged`), `Zero`, or `NonFinite`.
    pub estimate: Estimate,
    /// Fused passes this matrix took part in.
    pub iterations: u32,
    /// Whether the residual bound met the tolerance (or the Krylov space was exhausted).
    pub converged: bool,
}

/// Per-matrix Lanczos state.
struct Krylov {
    basis: Vec<Vec<f64>>,
    alphas: Vec<f64>,
    betas: Vec<f64>,
    result: Option<LanczosEstimate>,
}

impl BatchPowerIteration {
    /// `||U||_*` of every matrix to relative `tolerance`, from a seeded cold start, by Lanczos
    /// on `U^T U` (see the module docs). Each iteration is one fused pass over the matrices
    /// still running; at most `max_iterations` passes, which must lie between 1 and
    /// [`MAX_POWER_ITERATIONS`] (the Krylov basis keeps one `f64` vector per pass, so the
    /// bound also bounds memory: `8 * fan_in` bytes per pass and matrix).
    ///
    /// ```
    /// use spectral_step::{BatchLayout, BlockPolicy, MatrixShape};
    /// use spectral_step::cpu::{BatchPowerIteration, Estimate};
    ///
    /// // diag(3, 2.9, 1) in a 3x4 matrix: close top singular values, still few passes.
    /// let a = [3.0f32, 0.0, 0.0, 0.0, 0.0, 2.9, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0];
    /// let layout = BatchLayout::new(&[MatrixShape::new(3, 4)], BlockPolicy::CPU)?;
    /// let mut power = BatchPowerIteration::new(layout)?;
    /// let result = power.lanczos(&[&a[..]], 7, 1e-4, 50)?;
    /// let Estimate::Sigma(sigma) = result[0].estimate else { panic!() };
    /// assert!((sigma - 3.0).abs() < 3e-4 && result[0].iterations <= 4);
    /// # Ok::<(), spectral_step::Error>(())
    /// ```
    pub fn lanczos<T: Element>(
        &mut self,
        matrices: &[&[T]],
        seed: u64,
        tolerance: f64,
        max_iterations: u32,
    ) -> Result<Vec<LanczosEstimate>> {
        let usable = tolerance.is_finite()
            && tolerance > 0.0
            && (1..=MAX_POWER_ITERATIONS).contains(&max_iterations);
        if !usable {
            return Err(Error::InvalidArgument(format!(
                "Lanczos needs a positive tolerance and between 1 and {MAX_POWER_ITERATIONS} \
                 iterations, got {tolerance} and {max_iterations}"
            )));
        }
        let start = self.cold_vectors(seed)?;
        let mut vectors = start.clone();
        let mut products = vec![0.0f32; start.len()];
        let layout = self.layout().clone();
        let mut states: Vec<Krylov> = layout
            .matrices()
            .iter()
            .map(|entry| Krylov {
                basis: vec![
                    start[entry.vector_range()]
                        .iter()
                        .map(|&x| f64::from(x))
                        .collect(),
                ],
                alphas: Vec::new(),
                betas: Vec::new(),
                result: None,
            })
            .collect();
        let mut active = vec![true; layout.len()];
        for iteration in 1..=max_iterations {
            let sums = self.gram_product(matrices, &vectors, &mut products, &active)?;
            for (index, entry) in layout.matrices().iter().enumerate() {
                if !active[index] {
                    continue;
                }
                let state = &mut states[index];
                let sum_sq = sums[index];
                let w: Vec<f64> = products[entry.vector_range()]
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect();
                let outcome = if !sum_sq.is_finite() || w.iter().any(|x| !x.is_finite()) {
                    Some((Estimate::NonFinite, true))
                } else if sum_sq == 0.0 {
                    Some((Estimate::Zero, true))
                } else {
                    state.extend(w, tolerance, iteration == max_iterations)
                };
                match outcome {
                    Some((estimate, converged)) => {
                        state.result = Some(LanczosEstimate {
                            estimate,
                            iterations: iteration,
                            converged,
                        });
                        active[index] = false;
                    }
                    None => {
                        let next = state.basis.last().expect("a Krylov basis is never empty");
                        for (v, &q) in vectors[entry.vector_range()].iter_mut().zip(next) {
                            *v = q as f32;
                        }
                    }
                }
            }
            if !active.contains(&true) {
                break;
            }
        }
        Ok(states
            .into_iter()
            .map(|state| {
                state
                    .result
                    .expect("every matrix ends with a result at max_iterations")
            })
            .collect())
    }
}

impl Krylov {
    /// Adds `w = A q_k` to the recurrence. Returns the final estimate when done, `None` when
    /// `q_{k+1}` was appended to the basis for another pass.
    fn extend(&mut self, mut w: Vec<f64>, tolerance: f64, last: bool) -> Option<(Estimate, bool)> {
        let k = self.basis.len();
        let q = &self.basis[k - 1];
        let alpha = dot(q, &w);
        self.alphas.push(alpha);
        // Full re-orthogonalisation, twice ("twice is enough"), covers the three-term
        // recurrence's subtractions as well.
        for _ in 0..2 {
            for basis in &self.basis {
                let c = dot(basis, &w);
                w.iter_mut().zip(basis).for_each(|(x, b)| *x -= c * b);
            }
        }
        let beta = dot(&w, &w).sqrt();
        let ritz = largest_ritz(&self.alphas, &self.betas);
        let theta = ritz.theta;
        let sigma = theta.max(0.0).sqrt() as f32;
        let exhausted = k == w.len() || beta <= 1e-12 * theta.abs().max(f64::MIN_POSITIVE);
        // Residual r = |β_k y_k|: θ is within r of an eigenvalue of A, and within r^2 / gap
        // when the gap to the rest of the spectrum is `gap` (Kato-Temple); the Ritz gap
        // θ1 - θ2 stands in for it.
        let residual = (beta * ritz.last_component).abs();
        let gap = theta - ritz.second;
        let bound = if gap.is_finite() && gap > 0.0 {
            residual.min(residual * residual / gap)
        } else {
            residual
        };
        let converged = exhausted || bound <= 2.0 * tolerance * theta;
        if converged || last {
            return Some((Estimate::Sigma(sigma), converged));
        }
        self.betas.push(beta);
        self.basis.push(w.iter().map(|x| x / beta).collect());
        None
    }
}

/// `<a, b>` in `f64` with eight independent partial sums (element `i` into sum `i % 8`,
/// combined in a fixed tree): vectorised and free of one long chain of dependent adds, and
/// the same bits on every run.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let (a_lanes, a_tail) = a.as_chunks::<8>();
    let (b_lanes, b_tail) = b.as_chunks::<8>();
    let mut sums = [0.0f64; 8];
    for (x, y) in a_lanes.iter().zip(b_lanes) {
        for lane in 0..8 {
            sums[lane] += x[lane] * y[lane];
        }
    }
    for (lane, (x, y)) in a_tail.iter().zip(b_tail).enumerate() {
        sums[lane] += x * y;
    }
    let [s0, s1, s2, s3, s4, s5, s6, s7] = sums;
    ((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7))
}

/// The two largest Ritz values and the last component of the top Ritz vector.
struct Ritz {
    theta: f64,
    second: f64,
    last_component: f64,
}

/// The largest eigenvalue `θ` of the symmetric tridiagonal matrix with diagonal `alphas` and
/// off-diagonal `betas` (one shorter), by Sturm-sequence bisection, the second largest, and
/// the last component of `θ`'s unit eigenvector.
fn largest_ritz(alphas: &[f64], betas: &[f64]) -> Ritz {
    let k = alphas.len();
    if k == 1 {
        return Ritz {
            theta: alphas[0],
            second: f64::NEG_INFINITY,
            last_component: 1.0,
        };
    }
    // Gershgorin bounds.
    let mut low = f64::INFINITY;
    let mut high = f64::NEG_INFINITY;
    for i in 0..k {
        let radius =
            betas.get(i).map_or(0.0, |b| b.abs()) + if i > 0 { betas[i - 1].abs() } else { 0.0 };
        low = low.min(alphas[i] - radius);
        high = high.max(alphas[i] + radius);
    }
    // Number of eigenvalues below x (Sturm count of the LDL^T pivots).
    let below = |x: f64| -> usize {
        let mut count = 0;
        let mut d = alphas[0] - x;
        for i in 0..k {
            if i > 0 {
                let pivot = if d == 0.0 { f64::MIN_POSITIVE } else { d };
                d = alphas[i] - x - betas[i - 1] * betas[i - 1] / pivot;
            }
            if d < 0.0 {
                count += 1;
            }
        }
        count
    };
    // The eigenvalue with `rank` eigenvalues below it (k - 1: the largest).
    let bisect = |rank: usize| {
        let (mut low, mut high) = (low, high);
        for _ in 0..200 {
            let middle = 0.5 * (low + high);
            if middle <= low || middle >= high {
                break;
            }
            if below(middle) > rank {
                high = middle;
            } else {
                low = middle;
            }
        }
        0.5 * (low + high)
    };
    let theta = bisect(k - 1);
    let second = bisect(k - 2);
    // Eigenvector by the forward recurrence of (T - θ I) y = 0, normalised as it goes.
    let mut y = vec![0.0f64; k];
    y[0] = 1.0;
    for i in 0..k - 1 {
        let previous = if i > 0 { betas[i - 1] * y[i - 1] } else { 0.0 };
        y[i + 1] = ((theta - alphas[i]) * y[i] - previous) / betas[i];
        let scale = y[i + 1].abs().max(y[i].abs());
        if scale > 1e100 {
            y.iter_mut().for_each(|v| *v /= scale);
        }
    }
    let norm = dot(&y, &y).sqrt();
    Ritz {
        theta,
        second,
        last_component: y[k - 1] / norm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_ritz_of_a_known_tridiagonal() {
        // [[2, 1], [1, 2]]: eigenvalues 1 and 3, eigenvector of 3 is (1, 1)/sqrt(2).
        let ritz = largest_ritz(&[2.0, 2.0], &[1.0]);
        assert!((ritz.theta - 3.0).abs() < 1e-12);
        assert!((ritz.second - 1.0).abs() < 1e-12);
        assert!((ritz.last_component.abs() - 0.5f64.sqrt()).abs() < 1e-12);
        // diag(1, 5, 2) coupled weakly: the two largest are near 5 and 2.
        let ritz = largest_ritz(&[1.0, 5.0, 2.0], &[1e-3, 1e-3]);
        assert!((ritz.theta - 5.0).abs() < 1e-5 && (ritz.second - 2.0).abs() < 1e-5);
    }
}
