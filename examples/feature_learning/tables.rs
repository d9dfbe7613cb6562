//! The summary printed after a run: the width sweep's means, the slopes, the best learning
//! rates, the low-rank updates and SpectralSgd's update sizes.

use crate::feature_learning::experiments::{self, LowRankResult, RunResult, Settings};
use crate::feature_learning::parametrisation::Parametrisation;
use crate::feature_learning::precision::{self, PrecisionRun};
use crate::feature_learning::statistics::Slope;

/// Prints the summary tables of a run.
pub fn print(
    settings: &Settings,
    sweep: &[RunResult],
    slopes: &[Slope],
    lr: &[RunResult],
    low: &[LowRankResult],
    bf16: &[PrecisionRun],
) {
    println!("\nWidth sweep: mean over seeds (feature change | weight change | final loss)");
    print!("{:>12}", "width");
    for p in Parametrisation::ALL {
        print!(" | {:^26}", p.name());
    }
    println!();
    for &width in &settings.widths {
        print!("{width:>12}");
        for p in Parametrisation::ALL {
            let runs: Vec<&RunResult> = sweep
                .iter()
                .filter(|r| r.parametrisation == p && r.width == width)
                .collect();
            if runs.is_empty() {
                print!(" | {:^26}", "not trained");
                continue;
            }
            let mean = |f: fn(&RunResult) -> f64| {
                runs.iter().map(|r| f(r)).sum::<f64>() / runs.len() as f64
            };
            print!(
                " | {:>8.3} {:>8.3} {:>8.4}",
                mean(|r| r.feature_change),
                mean(|r| r.weight_change),
                mean(|r| r.final_loss)
            );
        }
        println!();
    }
    println!(
        "\nLog-log slope against width (mean ± std over {} seeds)",
        settings.seeds
    );
    for s in slopes {
        println!(
            "{:>14} {:>15}: {:+.3} ± {:.3}",
            s.parametrisation.name(),
            s.quantity,
            s.mean,
            s.std
        );
    }
    println!(
        "\nBest learning rate per width (lowest loss after {} steps)",
        settings.sweep_steps
    );
    for (p, width, rate, loss) in experiments::best_learning_rates(lr) {
        println!(
            "{:>14} width {width:>5}: eta = 2^{:<3} (loss {loss:.4})",
            p.name(),
            rate.log2().round() as i32
        );
    }
    println!(
        "\nLow-rank updates at width {}: stable rank (alignment)",
        settings.low_rank_width
    );
    for r in low {
        println!(
            "{:>6} batch {:>6}: {:>6.2} ({:.3})",
            r.activation.name(),
            r.batch,
            r.stable_rank,
            r.alignment
        );
    }
    println!("\nSpectralSgd: last update |dW2|_* / (eta s) over all widths and seeds");
    for parametrisation in [
        Parametrisation::SpectralNormalised,
        Parametrisation::SpectralOrthogonalised,
    ] {
        let (low_ratio, high_ratio) = sweep
            .iter()
            .filter(|r| r.parametrisation == parametrisation)
            .map(|r| r.last_update_ratio / f64::from(r.learning_rate))
            .fold((f64::INFINITY, 0.0f64), |(a, b), x| (a.min(x), b.max(x)));
        println!(
            "{:>14}: [{low_ratio:.3}, {high_ratio:.3}]",
            parametrisation.name()
        );
    }
    println!(
        "\nbf16 training at width {}, {} steps: final loss (last 10 steps, mean over {} seeds)",
        settings.precision_width, settings.precision_steps, settings.seeds
    );
    let finals = precision::mean_final_losses(bf16);
    let f32_loss = finals.first().map_or(f64::NAN, |&(_, loss)| loss);
    for (p, loss) in finals {
        println!(
            "{:>16}: {loss:.5} ({:+.2}% from f32)",
            p.name(),
            100.0 * (loss / f32_loss - 1.0)
        );
    }
}
