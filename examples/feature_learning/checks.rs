//! The science checks of the quick mode, run by `tests/feature_learning.rs`.

use super::experiments::{LowRankResult, RunResult};
use super::parametrisation::Parametrisation;
use super::precision::{Precision, PrecisionRun, mean_final_losses};
use super::statistics::slopes;

/// The checks the test suite runs on the quick mode: spectral slopes flat, NTK slope clearly
/// negative, low-rank updates, and SpectralSgd's updates at their target size. Returns every
/// failed check.
pub fn check_science(sweep: &[RunResult], low: &[LowRankResult]) -> Result<(), Vec<String>> {
    let mut failures = Vec::new();
    for slope in slopes(sweep) {
        let (low_bound, high_bound) = match slope.parametrisation {
            Parametrisation::SpectralNormalised | Parametrisation::SpectralParametrisation => {
                (-0.15, 0.15)
            }
            Parametrisation::Ntk => (f64::NEG_INFINITY, -0.3),
            Parametrisation::Standard => continue,
        };
        if !(low_bound..=high_bound).contains(&slope.mean) {
            failures.push(format!(
                "{} {} slope {:+.3} (seeds {:?}) outside [{low_bound}, {high_bound}]",
                slope.parametrisation.name(),
                slope.quantity,
                slope.mean,
                slope.per_seed
            ));
        }
    }
    for r in low.iter().filter(|r| r.batch == 1000) {
        let low_rank = r.stable_rank < 5.0;
        if !low_rank {
            failures.push(format!(
                "{} batch-1000 update has stable rank {:.2}, not below 5",
                r.activation.name(),
                r.stable_rank
            ));
        }
    }
    for r in sweep
        .iter()
        .filter(|r| r.parametrisation == Parametrisation::SpectralNormalised)
    {
        let relative = r.last_update_ratio / f64::from(r.learning_rate);
        let on_target = (relative - 1.0).abs() <= 0.1;
        if !on_target {
            failures.push(format!(
                "width {} seed {}: |dW2|_* / s = {:.4}, not within 10% of eta = {}",
                r.width, r.seed, r.last_update_ratio, r.learning_rate
            ));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures)
    }
}

/// The bf16 checks of the quick mode (math §5a): with stochastic rounding and with `f32`
/// master weights the final training loss is within 1% of the `f32` run's, and with
/// round-to-nearest it is not (more than 5% above), so the first check can fail. Returns
/// every failed check.
pub fn check_precision(runs: &[PrecisionRun]) -> Result<(), Vec<String>> {
    let finals = mean_final_losses(runs);
    let f32_loss = finals
        .iter()
        .find(|(p, _)| *p == Precision::F32)
        .map_or(f64::NAN, |&(_, loss)| loss);
    let mut failures = Vec::new();
    for &(precision, loss) in &finals {
        let excess = loss / f32_loss - 1.0;
        let (holds, claim) = match precision {
            Precision::F32 => continue,
            Precision::Bf16Nearest => (excess > 0.05, "more than 5% above"),
            Precision::Bf16Stochastic | Precision::MasterWeights => {
                (excess.abs() <= 0.01, "within 1% of")
            }
        };
        if !holds {
            failures.push(format!(
                "{}: final loss {loss:.5} is {:+.2}% from f32's {f32_loss:.5}, not {claim} it",
                precision.name(),
                100.0 * excess
            ));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures)
    }
}
