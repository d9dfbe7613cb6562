//! The per-matrix decisions of a step, written once (math §4.4–4.7): what the sums of a
//! power iteration mean for a matrix, what happens to its power vector and warm flag, how
//! many iterations it takes, and how the resulting record reads as a report.
//!
//! The CPU path calls these functions; the device's finish kernel (`kernels/finish.ptx`)
//! implements [`decide`] and [`reseed_vector`] instruction for instruction, in the same order,
//! and writes the same [`MatrixResult`] record, which both backends turn into a
//! [`MatrixReport`] with [`report_of`]. The simulator conformance suite checks that the two
//! agree on every branch.

use crate::config::SpectralSgdConfig;
use crate::error::{Error, Result};
use crate::kernels::records::{
    MatrixResult, RESEED_COLUMN, RESEED_MATRIX, RESEED_MIX, RESEED_STEP, Status, VectorAction,
};
use crate::report::{MatrixReport, MatrixStatus};

/// The sums one power iteration produced for one matrix.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IterationSums {
    /// `||U||_F^2`, summed in `f32`.
    pub sum_sq: f32,
    /// `|w| = |U^T U v|`, in `f64`.
    pub w_norm: f64,
    /// `min(fan_out, fan_in)`.
    pub min_dim: usize,
}

/// What the step does with a matrix after a power iteration: the record the update pass
/// and the report read, and what to do with the power vector.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Decision {
    pub result: MatrixResult,
    pub vector: VectorAction,
}

/// The decision (math §4.4–4.6), in this order:
///
/// 1. `||U||_F^2` or `|w|` not finite: [`Status::NonFinite`], `sigma = NaN`, `v` kept.
/// 2. `||U||_F^2 == 0`: [`Status::ZeroDirection`], `sigma = 0`, `v` kept.
/// 3. `|w| == 0` with `min(m, n) > 1`: [`Status::Reseeded`], `v` re-seeded.
/// 4. Otherwise `sigma = max(sqrt(|w|), ||U||_F / sqrt(min(m, n)))` (the Frobenius floor),
///    `v <- w / |w|` when `|w| > 0`, `coefficient = eta s / sigma` in `f64` rounded once:
///    [`Status::Updated`], or [`Status::SigmaTooSmall`] when the coefficient overflows `f32`.
///
/// `decay = 1 - eta lambda` (in `f64`, rounded once) is written in every case.
pub(crate) fn decide(
    sums: IterationSums,
    learning_rate: f32,
    scale: f32,
    weight_decay: f32,
    iterations_needed: u32,
) -> Decision {
    let eta = f64::from(learning_rate);
    let decay = decay(learning_rate, weight_decay);
    let record = |sigma: f32, status: Status, coefficient: f32| MatrixResult {
        sigma,
        power_estimate: 0.0,
        status: status as u32,
        decay,
        coefficient,
        iterations_needed,
    };
    let keep = |result| Decision {
        result,
        vector: VectorAction::Keep,
    };
    if !sums.sum_sq.is_finite() || !sums.w_norm.is_finite() {
        return keep(record(f32::NAN, Status::NonFinite, 0.0));
    }
    if sums.sum_sq == 0.0 {
        return keep(record(0.0, Status::ZeroDirection, 0.0));
    }
    let vector = if sums.w_norm > 0.0 {
        VectorAction::Normalise
    } else if sums.min_dim > 1 {
        return Decision {
            result: record(0.0, Status::Reseeded, 0.0),
            vector: VectorAction::Reseed,
        };
    } else {
        VectorAction::Keep
    };
    let floor = (f64::from(sums.sum_sq) / sums.min_dim as f64).sqrt();
    let power = sums.w_norm.sqrt();
    let sigma = power.max(floor) as f32;
    let coefficient = (eta * f64::from(scale) / f64::from(sigma)) as f32;
    let mut result = if coefficient.is_finite() {
        record(sigma, Status::Updated, coefficient)
    } else {
        record(sigma, Status::SigmaTooSmall, 0.0)
    };
    result.power_estimate = power as f32;
    Decision { result, vector }
}

/// The warm flag after `action`: warm once normalised, cold once re-seeded.
pub(crate) fn warm_after(action: VectorAction, warm: bool) -> bool {
    match action {
        VectorAction::Keep => warm,
        VectorAction::Normalise => true,
        VectorAction::Reseed => false,
    }
}

/// The step number the re-seeding hash takes (the kernels' `u32`: it wraps after 2^32 steps,
/// which only changes which signs a re-seeded vector gets).
pub(crate) fn reseed_step(step: u64) -> u32 {
    step as u32
}

/// The replacement for a power vector orthogonal to `U` (math §4.6): `±1/sqrt(n)` in every
/// component, the sign of component `c` from a hash of `(step, matrix, c)`. Deterministic,
/// so every backend writes the same bits, and dense, so no row of `U` is orthogonal to it
/// unless that row sums to zero under these signs.
pub(crate) fn reseed_vector(step: u32, matrix: usize, vector: &mut [f32]) {
    let magnitude = 1.0 / (vector.len() as f32).sqrt();
    for (column, value) in vector.iter_mut().enumerate() {
        let mut hash = (column as u32)
            .wrapping_mul(RESEED_COLUMN)
            .wrapping_add((matrix as u32).wrapping_mul(RESEED_MATRIX))
            .wrapping_add(step.wrapping_mul(RESEED_STEP));
        hash ^= hash >> 15;
        hash = hash.wrapping_mul(RESEED_MIX);
        hash ^= hash >> 12;
        *value = if hash & 1 == 0 { magnitude } else { -magnitude };
    }
}

/// Power iterations a matrix takes in a step (math §4.7): `warm_iterations` when its vector
/// is warm, `cold_iterations` when not (fixed on the step's first round).
pub(crate) fn iterations_needed(config: &SpectralSgdConfig, warm: bool) -> u32 {
    if warm {
        config.warm_iterations
    } else {
        config.cold_iterations
    }
}

/// Rounds of power pass and finish a step runs (math §4.7): `warm_iterations`, or the larger
/// of the two counts when the host knows that some power vector is cold (first step, after a
/// reset or a state load). The device path never reads device state inside a step, so a
/// vector the finish re-seeds gets `min(cold_iterations, rounds)` on its next step; the CPU
/// path follows the same rule, so that both compute the same thing. The Frobenius floor
/// keeps such a step's update within `sqrt(min(m, n))` of its target.
pub(crate) fn rounds_to_launch(config: &SpectralSgdConfig, host_knows_cold: bool) -> u32 {
    if host_knows_cold {
        config.warm_iterations.max(config.cold_iterations)
    } else {
        config.warm_iterations
    }
}

/// The iteration count a matrix's record keeps after round `round` (math §4.7): its count as
/// fixed on the first round, cut short to `round + 1` once an update's power estimate
/// `sqrt(|w|)` comes out bitwise equal to the previous round's (it has converged in `f32`),
/// so that the later rounds skip it. The floored `sigma` would not do: while the Frobenius
/// floor dominates, it stays the same from round to round however far `v` is from converged.
pub(crate) fn iterations_after(round: u32, previous: &MatrixResult, decided: &MatrixResult) -> u32 {
    let converged = round > 0
        && decided.status == Status::Updated as u32
        && decided.power_estimate.to_bits() == previous.power_estimate.to_bits();
    if converged {
        decided.iterations_needed.min(round + 1)
    } else {
        decided.iterations_needed
    }
}

/// Whether a matrix takes part in round `round > 0` of a step, given the record the previous
/// round left: only matrices still converging (updated so far and short of their iteration
/// count); a vector's estimate is exact after one pass (math §4.3).
pub(crate) fn continues(round: u32, is_vector: bool, previous: &MatrixResult) -> bool {
    !is_vector && previous.status == Status::Updated as u32 && round < previous.iterations_needed
}

/// `1 - eta lambda`, in `f64` and rounded once: the weight decay factor of every rule.
pub(crate) fn decay(learning_rate: f32, weight_decay: f32) -> f32 {
    (1.0 - f64::from(learning_rate) * f64::from(weight_decay)) as f32
}

/// The report line of a result record, with the same meaning on every backend. Errors on a
/// status code no kernel writes.
pub(crate) fn report_of(result: &MatrixResult) -> Result<MatrixReport> {
    let status = Status::from_code(result.status).ok_or_else(|| {
        Error::InvalidArgument(format!("unknown status code {} in a result", result.status))
    })?;
    Ok(match status {
        Status::Updated => MatrixReport {
            sigma: Some(result.sigma),
            status: MatrixStatus::Updated,
        },
        Status::ZeroDirection => MatrixReport {
            sigma: Some(0.0),
            status: MatrixStatus::ZeroDirection,
        },
        Status::Reseeded => MatrixReport {
            sigma: None,
            status: MatrixStatus::Reseeded,
        },
        Status::NonFinite => MatrixReport {
            sigma: None,
            status: MatrixStatus::SkippedNonFinite,
        },
        Status::SigmaTooSmall => MatrixReport {
            sigma: Some(result.sigma),
            status: MatrixStatus::SkippedNonFinite,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums(sum_sq: f32, w_norm: f64, min_dim: usize) -> IterationSums {
        IterationSums {
            sum_sq,
            w_norm,
            min_dim,
        }
    }

    fn status(decision: &Decision) -> Status {
        Status::from_code(decision.result.status).unwrap()
    }

    #[test]
    fn decisions_follow_the_documented_order() {
        let decide = |s| decide(s, 0.1, 2.0, 0.5, 3);
        let non_finite = decide(sums(f32::INFINITY, 0.0, 4));
        assert_eq!(status(&non_finite), Status::NonFinite);
        assert!(non_finite.result.sigma.is_nan());
        assert_eq!(non_finite.vector, VectorAction::Keep);
        assert_eq!(status(&decide(sums(1.0, f64::NAN, 4))), Status::NonFinite);
        // Non-finite wins over zero, zero over a zero |w|.
        assert_eq!(status(&decide(sums(f32::NAN, 0.0, 4))), Status::NonFinite);
        let zero = decide(sums(0.0, 0.0, 4));
        assert_eq!(
            (status(&zero), zero.result.sigma),
            (Status::ZeroDirection, 0.0)
        );
        let reseed = decide(sums(1.0, 0.0, 4));
        assert_eq!(
            (status(&reseed), reseed.vector),
            (Status::Reseeded, VectorAction::Reseed)
        );
        // A vector (min_dim 1) with w = 0 still has its exact norm: the floor.
        let vector = decide(sums(4.0, 0.0, 1));
        assert_eq!(
            (status(&vector), vector.vector, vector.result.sigma),
            (Status::Updated, VectorAction::Keep, 2.0)
        );
        for decision in [non_finite, zero, reseed, vector] {
            assert_eq!(decision.result.decay, 0.95);
            assert_eq!(decision.result.iterations_needed, 3);
        }
    }

    #[test]
    fn sigma_is_the_larger_lower_bound_and_the_coefficient_is_rounded_once() {
        // sqrt(|w|) = 3, floor = sqrt(16 / 4) = 2.
        let power = decide(sums(16.0, 9.0, 4), 0.1, 2.0, 0.0, 1);
        assert_eq!(power.result.sigma, 3.0);
        assert_eq!(power.result.power_estimate, 3.0);
        assert_eq!(power.result.coefficient, (0.1f32 as f64 * 2.0 / 3.0) as f32);
        assert_eq!(power.vector, VectorAction::Normalise);
        // sqrt(|w|) = 1, floor = 2: the floor wins.
        let floored = decide(sums(16.0, 1.0, 4), 0.1, 2.0, 0.0, 1);
        assert_eq!(floored.result.sigma, 2.0);
        assert_eq!(floored.result.power_estimate, 1.0, "before the floor");
        let tiny = decide(sums(1e-40, 1e-80, 2), 1.0, 1e30, 0.0, 1);
        assert_eq!(status(&tiny), Status::SigmaTooSmall);
        assert_eq!(tiny.result.coefficient, 0.0);
        assert_eq!(tiny.vector, VectorAction::Normalise);
    }

    #[test]
    fn reports_read_every_status_and_reject_unknown_codes() {
        let record = |status: Status, sigma: f32| MatrixResult {
            sigma,
            status: status as u32,
            ..MatrixResult::default()
        };
        let report = |status, sigma| report_of(&record(status, sigma)).unwrap();
        assert_eq!(report(Status::Updated, 2.5).sigma, Some(2.5));
        assert_eq!(
            report(Status::ZeroDirection, 0.0).status,
            MatrixStatus::ZeroDirection
        );
        assert_eq!(report(Status::Reseeded, 0.0).status, MatrixStatus::Reseeded);
        assert_eq!(report(Status::NonFinite, f32::NAN).sigma, None);
        let too_small = report(Status::SigmaTooSmall, 1e-30);
        assert_eq!(
            (too_small.status, too_small.sigma),
            (MatrixStatus::SkippedNonFinite, Some(1e-30))
        );
        let unknown = MatrixResult {
            status: 99,
            ..MatrixResult::default()
        };
        assert!(report_of(&unknown).is_err());
    }

    #[test]
    fn statuses_order_what_the_update_pass_writes() {
        for status in Status::ALL {
            assert_eq!(Status::from_code(status as u32), Some(status));
            let expected = matches!(
                status,
                Status::Updated | Status::ZeroDirection | Status::Reseeded
            );
            assert_eq!(status.stores_momentum(), expected, "{status:?}");
            assert_eq!(status.writes_weights(), status == Status::Updated);
        }
    }

    #[test]
    fn reseeded_vectors_are_unit_with_mixed_signs_and_depend_on_step_and_matrix() {
        let mut first = vec![0.0f32; 64];
        reseed_vector(5, 2, &mut first);
        let norm: f64 = first.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        assert!((norm - 1.0).abs() < 1e-6);
        assert!(first.iter().any(|&x| x > 0.0) && first.iter().any(|&x| x < 0.0));
        let mut other_step = vec![0.0f32; 64];
        reseed_vector(6, 2, &mut other_step);
        let mut other_matrix = vec![0.0f32; 64];
        reseed_vector(5, 3, &mut other_matrix);
        assert_ne!(first, other_step);
        assert_ne!(first, other_matrix);
    }

    #[test]
    fn a_converged_estimate_ends_the_iterations() {
        let record = |power_estimate: f32, status: Status| MatrixResult {
            sigma: 3.0,
            power_estimate,
            status: status as u32,
            iterations_needed: 8,
            ..MatrixResult::default()
        };
        let previous = record(2.5, Status::Updated);
        assert_eq!(
            iterations_after(3, &previous, &record(2.5, Status::Updated)),
            4
        );
        assert_eq!(
            iterations_after(3, &previous, &record(2.500001, Status::Updated)),
            8
        );
        assert_eq!(
            iterations_after(0, &previous, &record(2.5, Status::Updated)),
            8,
            "round 0"
        );
        assert_eq!(
            iterations_after(3, &previous, &record(2.5, Status::SigmaTooSmall)),
            8,
            "only updates converge"
        );
    }

    #[test]
    fn rounds_and_iteration_counts() {
        let config = SpectralSgdConfig {
            warm_iterations: 2,
            cold_iterations: 5,
            ..SpectralSgdConfig::default()
        };
        assert_eq!(rounds_to_launch(&config, true), 5);
        assert_eq!(rounds_to_launch(&config, false), 2);
        assert_eq!(iterations_needed(&config, true), 2);
        assert_eq!(iterations_needed(&config, false), 5);
        let updated = MatrixResult {
            status: Status::Updated as u32,
            iterations_needed: 3,
            ..MatrixResult::default()
        };
        assert!(continues(2, false, &updated));
        assert!(!continues(3, false, &updated));
        assert!(
            !continues(1, true, &updated),
            "vectors are exact after one pass"
        );
        let zero = MatrixResult {
            status: Status::ZeroDirection as u32,
            ..updated
        };
        assert!(!continues(1, false, &zero));
        assert!(warm_after(VectorAction::Normalise, false));
        assert!(!warm_after(VectorAction::Reseed, true));
        assert!(warm_after(VectorAction::Keep, true));
    }
}
