//! The example's four figures, from the results: the width sweep, the learning-rate
//! transfer, the low-rank updates and the bf16 training (drawn by `plots`).

use std::path::Path;

use crate::feature_learning::experiments::{LowRankResult, RunResult};
use crate::feature_learning::model::Activation;
use crate::feature_learning::parametrisation::Parametrisation;
use crate::feature_learning::precision::{Precision, PrecisionRun};
use crate::plots::{self, Panel, Series, YAxis};

/// Mean over seeds, per (parametrisation, width).
fn seed_means(
    sweep: &[RunResult],
    parametrisation: Parametrisation,
    value: impl Fn(&RunResult) -> f64,
) -> Vec<(f64, f64)> {
    let mut widths: Vec<usize> = sweep.iter().map(|r| r.width).collect();
    widths.sort_unstable();
    widths.dedup();
    widths
        .into_iter()
        .map(|w| {
            let values: Vec<f64> = sweep
                .iter()
                .filter(|r| r.parametrisation == parametrisation && r.width == w)
                .map(&value)
                .collect();
            (w as f64, values.iter().sum::<f64>() / values.len() as f64)
        })
        .collect()
}

/// Steps `1..=steps` at about ten per decade (1, 2, 3, 4, 5, 6, 8, 10, 13, ...).
fn log_spaced_steps(steps: usize) -> Vec<usize> {
    let mut chosen: Vec<usize> = (0..)
        .map(|k| 10f64.powf(f64::from(k) / 10.0).round() as usize)
        .take_while(|&s| s <= steps)
        .collect();
    chosen.dedup();
    if chosen.last() != Some(&steps) {
        chosen.push(steps);
    }
    chosen
}

/// Per precision, the loss at the log-spaced steps, mean over seeds; with a `baseline`, the
/// percentage by which it exceeds `baseline`'s at the same step instead.
fn loss_curves(bf16: &[PrecisionRun], baseline: Option<Precision>) -> Vec<Series> {
    let steps = bf16.iter().map(|r| r.losses.len()).min().unwrap_or(0);
    let mean_at = |p: Precision, step: usize| {
        let losses: Vec<f64> = bf16
            .iter()
            .filter(|r| r.precision == p)
            .map(|r| r.losses[step - 1])
            .collect();
        losses.iter().sum::<f64>() / losses.len() as f64
    };
    Precision::ALL
        .iter()
        .map(|&p| Series {
            label: p.name().to_string(),
            points: log_spaced_steps(steps)
                .into_iter()
                .map(|step| {
                    let loss = mean_at(p, step);
                    let value = baseline.map_or(loss, |b| 100.0 * (loss / mean_at(b, step) - 1.0));
                    (step as f64, value)
                })
                .collect(),
        })
        .collect()
}

/// Draws `width_sweep`, `lr_transfer`, `low_rank` and `bf16_training`, each as PNG and SVG,
/// into `dir`.
pub fn draw(
    dir: &Path,
    sweep: &[RunResult],
    lr: &[RunResult],
    low: &[LowRankResult],
    bf16: &[PrecisionRun],
) -> Result<(), String> {
    plots::init_font()?;
    let per_param = |value: fn(&RunResult) -> f64| -> Vec<Series> {
        Parametrisation::ALL
            .iter()
            .map(|&p| Series {
                label: p.name().to_string(),
                points: seed_means(sweep, p, value),
            })
            .collect()
    };
    plots::save(
        dir,
        "width_sweep",
        &[
            Panel {
                title: "hidden features: |h2 - h2_0| / |h2_0|".into(),
                x_label: "width".into(),
                y_label: "relative change".into(),
                series: per_param(|r| r.feature_change),
                y_axis: YAxis::Log,
                x_base: 2.0,
            },
            Panel {
                title: "hidden weights: |W2 - W2_0|* / |W2_0|*".into(),
                x_label: "width".into(),
                y_label: "relative change".into(),
                series: per_param(|r| r.weight_change),
                y_axis: YAxis::Log,
                x_base: 2.0,
            },
        ],
    )?;
    let mut widths: Vec<usize> = lr.iter().map(|r| r.width).collect();
    widths.sort_unstable();
    widths.dedup();
    let lr_panel = |p: Parametrisation, title: &str| Panel {
        title: title.into(),
        x_label: "learning rate".into(),
        y_label: "training loss (last 10 steps)".into(),
        series: widths
            .iter()
            .map(|&w| Series {
                label: format!("width {w}"),
                points: lr
                    .iter()
                    .filter(|r| r.parametrisation == p && r.width == w)
                    .map(|r| (f64::from(r.learning_rate), r.final_loss.min(1.0)))
                    .collect(),
            })
            .collect(),
        y_axis: YAxis::Log,
        x_base: 2.0,
    };
    plots::save(
        dir,
        "lr_transfer",
        &[
            lr_panel(Parametrisation::Standard, "standard (one SGD rate)"),
            lr_panel(
                Parametrisation::SpectralNormalised,
                "spectral (SpectralSgd)",
            ),
            lr_panel(
                Parametrisation::SpectralOrthogonalised,
                "spectral, orthogonalised (Muon's iteration)",
            ),
        ],
    )?;
    let by_activation = |value: fn(&LowRankResult) -> f64| -> Vec<Series> {
        [Activation::Relu, Activation::Tanh]
            .iter()
            .map(|&a| Series {
                label: a.name().into(),
                points: low
                    .iter()
                    .filter(|r| r.activation == a)
                    .map(|r| (r.batch as f64, value(r)))
                    .collect(),
            })
            .collect()
    };
    plots::save(
        dir,
        "low_rank",
        &[
            Panel {
                title: "stable rank of a one-step update of W2".into(),
                x_label: "batch size".into(),
                y_label: "|dW|_F^2 / |dW|_*^2".into(),
                series: by_activation(|r| r.stable_rank),
                y_axis: YAxis::Linear,
                x_base: 10.0,
            },
            Panel {
                title: "alignment |dW h| / (|dW|_* |h|)".into(),
                x_label: "batch size".into(),
                y_label: "alignment".into(),
                series: by_activation(|r| r.alignment),
                y_axis: YAxis::Linear,
                x_base: 10.0,
            },
        ],
    )?;
    plots::save(
        dir,
        "bf16_training",
        &[
            Panel {
                title: "training loss, spectral (3a) MLP".into(),
                x_label: "step".into(),
                y_label: "loss (mean over seeds)".into(),
                series: loss_curves(bf16, None),
                y_axis: YAxis::Log,
                x_base: 10.0,
            },
            Panel {
                title: "loss above the f32 run's".into(),
                x_label: "step".into(),
                y_label: "excess loss (%)".into(),
                series: loss_curves(bf16, Some(Precision::F32)),
                y_axis: YAxis::Linear,
                x_base: 10.0,
            },
        ],
    )
}
