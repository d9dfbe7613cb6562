//! The example's three figures, from the results: the width sweep, the learning-rate
//! transfer and the low-rank updates (drawn by `plots`).

use std::path::Path;

use crate::feature_learning::experiments::{LowRankResult, RunResult};
use crate::feature_learning::model::Activation;
use crate::feature_learning::parametrisation::Parametrisation;
use crate::plots::{self, Panel, Series};

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

/// Draws `width_sweep`, `lr_transfer` and `low_rank`, each as PNG and SVG, into `dir`.
pub fn draw(
    dir: &Path,
    sweep: &[RunResult],
    lr: &[RunResult],
    low: &[LowRankResult],
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
                log_y: true,
                x_base: 2.0,
            },
            Panel {
                title: "hidden weights: |W2 - W2_0|* / |W2_0|*".into(),
                x_label: "width".into(),
                y_label: "relative change".into(),
                series: per_param(|r| r.weight_change),
                log_y: true,
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
        log_y: true,
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
                log_y: false,
                x_base: 10.0,
            },
            Panel {
                title: "alignment |dW h| / (|dW|_* |h|)".into(),
                x_label: "batch size".into(),
                y_label: "alignment".into(),
                series: by_activation(|r| r.alignment),
                log_y: false,
                x_base: 10.0,
            },
        ],
    )
}
