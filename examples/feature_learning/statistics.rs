//! Measurements of the runs: vector norms and the log-log slopes of the changes against
//! width.

use super::experiments::RunResult;
use super::parametrisation::Parametrisation;

/// Euclidean norm, accumulated in f64.
pub fn norm(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|&v| f64::from(v).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// `a - b`, elementwise.
pub(super) fn difference(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// Least-squares slope of `log2(y)` against `log2(x)`.
pub fn log_log_slope(points: &[(f64, f64)]) -> f64 {
    let logs: Vec<(f64, f64)> = points.iter().map(|&(x, y)| (x.log2(), y.log2())).collect();
    let n = logs.len() as f64;
    let (mx, my) = (
        logs.iter().map(|p| p.0).sum::<f64>() / n,
        logs.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxy: f64 = logs.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = logs.iter().map(|p| (p.0 - mx).powi(2)).sum();
    sxy / sxx
}

/// A slope per seed, and their mean and standard deviation.
#[derive(Clone, Debug)]
pub struct Slope {
    /// The runs' parametrisation.
    pub parametrisation: Parametrisation,
    /// `feature_change` or `weight_change`.
    pub quantity: &'static str,
    /// The slope of each seed, in seed order.
    pub per_seed: Vec<f64>,
    /// Mean of `per_seed`.
    pub mean: f64,
    /// Sample standard deviation of `per_seed` (0 for one seed).
    pub std: f64,
}

/// Slopes of feature and weight change against width, per parametrisation, over seeds
/// (none for a parametrisation trained at fewer than two widths).
pub fn slopes(results: &[RunResult]) -> Vec<Slope> {
    let mut out = Vec::new();
    for parametrisation in Parametrisation::ALL {
        // The distinct values of `key` over the runs of `parametrisation`, in order.
        let distinct = |key: fn(&RunResult) -> u64| {
            let mut values: Vec<u64> = results
                .iter()
                .filter(|r| r.parametrisation == parametrisation)
                .map(key)
                .collect();
            values.sort_unstable();
            values.dedup();
            values
        };
        if distinct(|r| r.width as u64).len() < 2 {
            continue;
        }
        let seeds = distinct(|r| r.seed);
        for quantity in ["feature_change", "weight_change"] {
            let per_seed: Vec<f64> = seeds
                .iter()
                .map(|&seed| {
                    let points: Vec<(f64, f64)> = results
                        .iter()
                        .filter(|r| r.parametrisation == parametrisation && r.seed == seed)
                        .map(|r| {
                            (
                                r.width as f64,
                                if quantity == "feature_change" {
                                    r.feature_change
                                } else {
                                    r.weight_change
                                },
                            )
                        })
                        .collect();
                    log_log_slope(&points)
                })
                .collect();
            if per_seed.is_empty() {
                continue;
            }
            let n = per_seed.len() as f64;
            let mean = per_seed.iter().sum::<f64>() / n;
            let std = (per_seed.iter().map(|s| (s - mean).powi(2)).sum::<f64>()
                / (n - 1.0).max(1.0))
            .sqrt();
            out.push(Slope {
                parametrisation,
                quantity,
                per_seed,
                mean,
                std,
            });
        }
    }
    out
}
