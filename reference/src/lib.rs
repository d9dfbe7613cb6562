//! The naive oracle for `spectral-step`: plain loops in `f64`, written from docs/math.md without
//! looking at the crate's code, and an exact SVD (one-sided Jacobi) for small matrices.
//!
//! Used only by tests: of the CPU path now, of the PTX kernels (through the simulator) later.
//! Nothing here is fast; everything here is obvious.

// Index loops are the point of a naive oracle: they read like the formulas.
#![allow(clippy::needless_range_loop)]

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// `n` independent `N(0, 1)` samples from `seed`.
pub fn gaussian(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
}

/// Euclidean norm of a slice (Frobenius norm of a matrix).
pub fn norm(values: &[f64]) -> f64 {
    values.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Singular values of the row-major `rows x cols` matrix `a`, largest first, by one-sided
/// Jacobi (Hestenes): rotate pairs of columns until all are orthogonal; the singular values
/// are then the column norms. Exact to about `1e-13` relative; meant for matrices up to a few
/// hundred on a side.
pub fn singular_values(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    assert_eq!(
        a.len(),
        rows * cols,
        "matrix length does not match its shape"
    );
    // Work on the orientation with fewer columns; A and A^T share singular values.
    let (columns, length) = if cols <= rows {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let mut vectors: Vec<Vec<f64>> = (0..columns)
        .map(|c| {
            (0..length)
                .map(|r| {
                    if cols <= rows {
                        a[r * cols + c]
                    } else {
                        a[c * cols + r]
                    }
                })
                .collect()
        })
        .collect();
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..columns {
            for q in p + 1..columns {
                let alpha: f64 = vectors[p].iter().map(|x| x * x).sum();
                let beta: f64 = vectors[q].iter().map(|x| x * x).sum();
                let gamma: f64 = vectors[p].iter().zip(&vectors[q]).map(|(x, y)| x * y).sum();
                if gamma == 0.0 || gamma.abs() <= 1e-15 * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for k in 0..length {
                    let (x, y) = (vectors[p][k], vectors[q][k]);
                    vectors[p][k] = c * x - s * y;
                    vectors[q][k] = s * x + c * y;
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let mut values: Vec<f64> = vectors.iter().map(|v| norm(v)).collect();
    values.sort_by(|x, y| y.total_cmp(x));
    values
}

/// The exact spectral norm `||A||_*` (largest singular value).
pub fn spectral_norm(a: &[f64], rows: usize, cols: usize) -> f64 {
    singular_values(a, rows, cols)[0]
}

/// Stable rank `||A||_F^2 / ||A||_*^2`.
pub fn stable_rank(a: &[f64], rows: usize, cols: usize) -> f64 {
    let sigma = spectral_norm(a, rows, cols);
    norm(a).powi(2) / (sigma * sigma)
}

/// A random `n x n` orthogonal matrix (row-major): Gram-Schmidt, done twice, on the columns
/// of a Gaussian matrix.
pub fn random_orthogonal(n: usize, seed: u64) -> Vec<f64> {
    let draw = gaussian(n * n, seed);
    let mut columns: Vec<Vec<f64>> = (0..n)
        .map(|c| (0..n).map(|r| draw[r * n + c]).collect())
        .collect();
    for c in 0..n {
        for _ in 0..2 {
            for previous in 0..c {
                let projection: f64 = columns[c]
                    .iter()
                    .zip(&columns[previous])
                    .map(|(x, y)| x * y)
                    .sum();
                for r in 0..n {
                    columns[c][r] -= projection * columns[previous][r];
                }
            }
        }
        let length = norm(&columns[c]);
        columns[c].iter_mut().for_each(|x| *x /= length);
    }
    let mut q = vec![0.0; n * n];
    for r in 0..n {
        for c in 0..n {
            q[r * n + c] = columns[c][r];
        }
    }
    q
}

/// `Q1 diag(singular) Q2^T` with random orthogonal `Q1` (`rows x rows`) and `Q2`
/// (`cols x cols`): a row-major matrix whose singular values are exactly `singular`
/// (`min(rows, cols)` of them, padded with zeros if fewer are given).
pub fn matrix_with_spectrum(rows: usize, cols: usize, singular: &[f64], seed: u64) -> Vec<f64> {
    let left = random_orthogonal(rows, seed);
    let right = random_orthogonal(cols, seed.wrapping_add(0x9e37_79b9));
    let mut a = vec![0.0; rows * cols];
    for (k, &s) in singular.iter().enumerate().take(rows.min(cols)) {
        for r in 0..rows {
            for c in 0..cols {
                a[r * cols + c] += left[r * rows + k] * s * right[c * cols + k];
            }
        }
    }
    a
}

/// One power iteration on `U^T U` (math §4): `w = U^T (U v)`, `v <- w / ||w||`, returns
/// `sqrt(||w||)`. Leaves `v` alone and returns 0 if `w == 0`.
pub fn power_iteration_step(u: &[f64], rows: usize, cols: usize, v: &mut [f64]) -> f64 {
    let uv: Vec<f64> = (0..rows)
        .map(|r| (0..cols).map(|c| u[r * cols + c] * v[c]).sum())
        .collect();
    let w: Vec<f64> = (0..cols)
        .map(|c| (0..rows).map(|r| u[r * cols + c] * uv[r]).sum())
        .collect();
    let length = norm(&w);
    if length > 0.0 {
        for (vc, wc) in v.iter_mut().zip(&w) {
            *vc = wc / length;
        }
    }
    length.sqrt()
}

/// `||U||_F / sqrt(min(m, n))`, a lower bound on `||U||_*` (the Frobenius norm squared is the
/// sum of at most `min(m, n)` squared singular values). For a vector it is the exact norm.
pub fn frobenius_floor(u: &[f64], rows: usize, cols: usize) -> f64 {
    norm(u) / (rows.min(cols) as f64).sqrt()
}

/// Hyper-parameters of one reference step (math §5).
#[derive(Clone, Copy, Debug)]
pub struct StepParams {
    /// `eta`.
    pub learning_rate: f64,
    /// `beta`.
    pub momentum: f64,
    /// EMA momentum `M <- beta M + (1 - beta) G` instead of heavy-ball `M <- beta M + G`.
    pub ema: bool,
    /// `U = beta M_new + c G` instead of `U = M_new` (`c` the gradient's coefficient above).
    pub nesterov: bool,
    /// `lambda`.
    pub weight_decay: f64,
    /// The target factor `s` of this matrix.
    pub scale_factor: f64,
    /// Power iterations this step (from the given `v`).
    pub iterations: u32,
}

/// What the reference step did to a matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Outcome {
    /// Updated, normalised by this sigma.
    Updated(f64),
    /// `U == 0`: momentum stored, weights untouched.
    Zero,
    /// `U` not finite: nothing touched.
    NonFinite,
}

/// One step of math §5 for one matrix, in `f64`, straight from the formulas:
///
/// ```text
/// M_new = beta M + c G               (c = 1, or 1 - beta for EMA)
/// U     = M_new, or beta M_new + c G (Nesterov)
/// sigma = max(sqrt(||U^T U v||) after `iterations` power iterations from v,
///             ||U||_F / sqrt(min(m, n)))   (both lower bounds on ||U||_*; for a row or
///                                          column vector the second is its exact norm)
/// W     = (1 - eta lambda) W - eta s / sigma U
/// ```
#[allow(clippy::too_many_arguments)]
pub fn step(
    weights: &mut [f64],
    momentum: &mut [f64],
    vector: &mut [f64],
    grads: &[f64],
    rows: usize,
    cols: usize,
    params: &StepParams,
) -> Outcome {
    let c = if params.ema {
        1.0 - params.momentum
    } else {
        1.0
    };
    let new_momentum: Vec<f64> = momentum
        .iter()
        .zip(grads)
        .map(|(m, g)| params.momentum * m + c * g)
        .collect();
    let direction: Vec<f64> = if params.nesterov {
        new_momentum
            .iter()
            .zip(grads)
            .map(|(m, g)| params.momentum * m + c * g)
            .collect()
    } else {
        new_momentum.clone()
    };
    if direction.iter().any(|x| !x.is_finite()) {
        return Outcome::NonFinite;
    }
    momentum.copy_from_slice(&new_momentum);
    if direction.iter().all(|&x| x == 0.0) {
        return Outcome::Zero;
    }
    let mut sigma = 0.0;
    for _ in 0..params.iterations {
        sigma = power_iteration_step(&direction, rows, cols, vector);
    }
    sigma = sigma.max(frobenius_floor(&direction, rows, cols));
    let decay = 1.0 - params.learning_rate * params.weight_decay;
    let coefficient = params.learning_rate * params.scale_factor / sigma;
    for (w, u) in weights.iter_mut().zip(&direction) {
        *w = decay * *w - coefficient * u;
    }
    Outcome::Updated(sigma)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance
    }

    #[test]
    fn singular_values_of_hand_computed_matrices() {
        // [[3, 0], [4, 5]]: A^T A = [[25, 20], [20, 25]], eigenvalues 45 and 5.
        let s = singular_values(&[3.0, 0.0, 4.0, 5.0], 2, 2);
        assert!(
            close(s[0], 45f64.sqrt(), 1e-12) && close(s[1], 5f64.sqrt(), 1e-12),
            "{s:?}"
        );
        // Rank one: u v^T has the single singular value ||u|| ||v||, in both orientations.
        let (u, v) = ([1.0, 2.0, 2.0], [3.0, 4.0]);
        let outer: Vec<f64> = u
            .iter()
            .flat_map(|a| v.iter().map(move |b| a * b))
            .collect();
        for (rows, cols, data) in [(3, 2, outer.clone()), (2, 3, transpose(&outer, 3, 2))] {
            let s = singular_values(&data, rows, cols);
            assert!(
                close(s[0], 15.0, 1e-12) && s[1].abs() < 1e-12,
                "{rows}x{cols}: {s:?}"
            );
        }
        assert_eq!(singular_values(&[0.0; 6], 2, 3), vec![0.0, 0.0]);
        assert!(close(spectral_norm(&[-7.0], 1, 1), 7.0, 0.0));
    }

    fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
        (0..cols)
            .flat_map(|c| (0..rows).map(move |r| a[r * cols + c]))
            .collect()
    }

    #[test]
    fn random_orthogonal_is_orthogonal_and_spectra_are_exact() {
        let n = 9;
        let q = random_orthogonal(n, 4);
        for i in 0..n {
            for j in 0..n {
                let dot: f64 = (0..n).map(|k| q[k * n + i] * q[k * n + j]).sum();
                assert!(
                    close(dot, f64::from(u8::from(i == j)), 1e-12),
                    "Q^T Q [{i}][{j}] = {dot}"
                );
            }
        }
        let spectrum = [4.0, 2.5, 1.0, 0.5];
        let a = matrix_with_spectrum(7, 4, &spectrum, 2);
        for (got, want) in singular_values(&a, 7, 4).iter().zip(spectrum) {
            assert!(close(*got, want, 1e-12), "{got} vs {want}");
        }
        assert!(close(
            stable_rank(&a, 7, 4),
            (16.0 + 6.25 + 1.0 + 0.25) / 16.0,
            1e-12
        ));
    }

    #[test]
    fn reference_step_follows_the_formulas() {
        // diag(2, 1): one power iteration from v = (1, 0) gives w = (4, 0), sigma = 2.
        let params = StepParams {
            learning_rate: 0.5,
            momentum: 0.5,
            ema: false,
            nesterov: false,
            weight_decay: 0.2,
            scale_factor: 1.0,
            iterations: 1,
        };
        let (mut w, mut m, mut v) = (vec![1.0, 1.0, 1.0, 1.0], vec![0.0; 4], vec![1.0, 0.0]);
        let outcome = step(&mut w, &mut m, &mut v, &[2.0, 0.0, 0.0, 1.0], 2, 2, &params);
        assert_eq!(outcome, Outcome::Updated(2.0));
        // W = (1 - 0.1) W - (0.5 / 2) U
        assert_eq!(w, vec![0.9 - 0.5, 0.9, 0.9, 0.9 - 0.25]);
        assert_eq!(m, vec![2.0, 0.0, 0.0, 1.0]);
        assert_eq!(v, vec![1.0, 0.0]);
        // A second step, Nesterov and EMA: M = 0.5 M + 0.5 G, U = 0.5 M + 0.5 G.
        let params = StepParams {
            ema: true,
            nesterov: true,
            weight_decay: 0.0,
            ..params
        };
        let before = w.clone();
        let outcome = step(&mut w, &mut m, &mut v, &[0.0; 4], 2, 2, &params);
        assert_eq!(m, vec![1.0, 0.0, 0.0, 0.5]);
        // U = diag(0.5, 0.25): sigma 0.5 from v = (1, 0).
        assert_eq!(outcome, Outcome::Updated(0.5));
        assert_eq!(
            w,
            vec![before[0] - 0.5, before[1], before[2], before[3] - 0.25]
        );
        // Zero direction and non-finite input.
        let (mut w0, mut m0, mut v0) = (vec![1.0; 4], vec![0.0; 4], vec![1.0, 0.0]);
        assert_eq!(
            step(&mut w0, &mut m0, &mut v0, &[0.0; 4], 2, 2, &params),
            Outcome::Zero
        );
        assert_eq!(w0, vec![1.0; 4]);
        assert_eq!(
            step(
                &mut w0,
                &mut m0,
                &mut v0,
                &[f64::NAN, 0.0, 0.0, 0.0],
                2,
                2,
                &params
            ),
            Outcome::NonFinite
        );
        assert_eq!((w0, m0), (vec![1.0; 4], vec![0.0; 4]));
    }
}
