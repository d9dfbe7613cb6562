//! The results as CSV files, one per experiment plus the slopes.

use std::fs;
use std::path::{Path, PathBuf};

use crate::feature_learning::experiments::{LowRankResult, RunResult};
use crate::feature_learning::precision::PrecisionRun;
use crate::feature_learning::statistics::Slope;

/// Writes `header` and one line per row.
fn write_csv(
    path: PathBuf,
    header: &str,
    rows: impl Iterator<Item = String>,
) -> std::io::Result<()> {
    let mut text = format!("{header}\n");
    for row in rows {
        text.push_str(&row);
        text.push('\n');
    }
    fs::write(path, text)
}

/// Writes `width_sweep.csv`, `slopes.csv`, `lr_sweep.csv`, `low_rank.csv` and
/// `bf16_training.csv` into `dir`.
pub fn write(
    dir: &Path,
    sweep: &[RunResult],
    slopes: &[Slope],
    lr: &[RunResult],
    low: &[LowRankResult],
    bf16: &[PrecisionRun],
) -> std::io::Result<()> {
    write_csv(
        dir.join("width_sweep.csv"),
        "parametrisation,width,seed,learning_rate,feature_change,weight_change,final_loss,last_update_ratio",
        sweep.iter().map(|r| {
            format!(
                "{},{},{},{},{},{},{},{}",
                r.parametrisation.name(),
                r.width,
                r.seed,
                r.learning_rate,
                r.feature_change,
                r.weight_change,
                r.final_loss,
                r.last_update_ratio
            )
        }),
    )?;
    write_csv(
        dir.join("slopes.csv"),
        "parametrisation,quantity,slope_mean,slope_std,slopes_per_seed",
        slopes.iter().map(|s| {
            let per_seed: Vec<String> = s.per_seed.iter().map(|v| format!("{v:.4}")).collect();
            let name = s.parametrisation.name();
            format!(
                "{name},{},{:.4},{:.4},{}",
                s.quantity,
                s.mean,
                s.std,
                per_seed.join(";")
            )
        }),
    )?;
    write_csv(
        dir.join("lr_sweep.csv"),
        "parametrisation,width,learning_rate,final_loss",
        lr.iter().map(|r| {
            let name = r.parametrisation.name();
            format!("{name},{},{},{}", r.width, r.learning_rate, r.final_loss)
        }),
    )?;
    write_csv(
        dir.join("low_rank.csv"),
        "activation,batch,stable_rank,alignment",
        low.iter().map(|r| {
            let name = r.activation.name();
            format!("{name},{},{},{}", r.batch, r.stable_rank, r.alignment)
        }),
    )?;
    write_csv(
        dir.join("bf16_training.csv"),
        "precision,seed,step,loss",
        bf16.iter().flat_map(|r| {
            r.losses.iter().enumerate().map(move |(step, loss)| {
                format!("{},{},{},{loss}", r.precision.name(), r.seed, step + 1)
            })
        }),
    )
}
