//! The feature-learning example's quick mode, asserting the science (math §7):
//! under spectral scaling (3a, 3b and the orthogonalised rule) the hidden layer's relative
//! feature and weight changes do not depend on width (log-log slope within ±0.15), under NTK
//! scaling they fall (slope below -0.3); a batch-1000 gradient update has stable rank below 5;
//! SpectralSgd's updates have `||ΔW||_* / s` within 10% of the learning rate, and within
//! `[0.68, 1.21]` of it with the orthogonalised rule. A planted wrong scaling must fail. Trained
//! in bf16 (math §5a), stochastic rounding and `f32` master weights reach the `f32` run's loss
//! within 1%, round-to-nearest falls more than 5% short.

#[path = "../examples/feature_learning/lib.rs"]
mod feature_learning;

use feature_learning::checks::{check_precision, check_science};
use feature_learning::experiments::{self, Settings};
use feature_learning::precision::{self, mean_final_losses};
use feature_learning::statistics::slopes;

#[test]
fn quick_mode_shows_width_independent_feature_learning() {
    let settings = Settings::quick();
    let sweep = experiments::width_sweep(&settings, false, false, &|| {}).unwrap();
    let low = experiments::low_rank(&settings, &|| {}).unwrap();
    for slope in slopes(&sweep) {
        eprintln!(
            "{:>12} {:>15}: {:+.3} ± {:.3}",
            slope.parametrisation.name(),
            slope.quantity,
            slope.mean,
            slope.std
        );
    }
    if let Err(failures) = check_science(&sweep, &low) {
        panic!("science checks failed:\n{}", failures.join("\n"));
    }
}

/// An extra `1/sqrt(fan_in)` on every update (a wrong width scaling) must be caught: the
/// spectral slopes go negative.
#[test]
fn a_wrong_scaling_fails_the_science_checks() {
    let settings = Settings::quick();
    let sweep = experiments::width_sweep(&settings, true, false, &|| {}).unwrap();
    let low = experiments::low_rank(&settings, &|| {}).unwrap();
    let failures = check_science(&sweep, &low).expect_err("the planted bug went unnoticed");
    eprintln!(
        "caught ({} failures):\n{}",
        failures.len(),
        failures.join("\n")
    );
    for rule in ["spectral-3a", "spectral-orth"] {
        assert!(
            failures.iter().any(|f| f.starts_with(rule)),
            "{rule} passed with the planted bug: {failures:?}"
        );
    }
}

#[test]
fn quick_mode_trains_in_bf16_as_in_f32_with_stochastic_rounding_or_master_weights() {
    let settings = Settings::quick();
    let runs = precision::precision_runs(
        settings.precision_width,
        settings.precision_steps,
        settings.seeds,
        &|| {},
    )
    .unwrap();
    for (precision, loss) in mean_final_losses(&runs) {
        eprintln!("{:>16}: final loss {loss:.5}", precision.name());
    }
    if let Err(failures) = check_precision(&runs) {
        panic!("bf16 checks failed:\n{}", failures.join("\n"));
    }
}
