//! Does spectral scaling make a network learn features at every width, and do its
//! hyper-parameters transfer? The paper's experiments (SPEC 7), reproduced with this crate.
//!
//! ```text
//! cargo run --release --example feature_learning -- [--quick] [--out DIR] [--max-width N]
//!     [--widths 64,128,...] [--seeds N] [--steps N] [--device auto|cpu|cuda]
//! ```
//!
//! 1. **Width sweep.** 3-layer ReLU MLPs (`16 -> n -> n -> 4`) learn a fixed random teacher at
//!    widths 2^6..2^11 (`--max-width` extends it), 3 seeds, under four parametrisations:
//!    NTK (`N(0, 1/fan_in)`, SGD with `eta ∝ 1/fan_in`), standard (PyTorch's default init, one
//!    SGD rate), spectral by normalisation (SPEC 3a: `spectral_init` + `SpectralSgd`) and the
//!    spectral parametrisation (SPEC 3b). Measured: `||h2 - h2_0|| / ||h2_0||`,
//!    `||W2 - W2_0||_* / ||W2_0||_*`, the training loss, and log-log slopes against width.
//!    Expected: spectral flat, NTK slope about -1/2, standard growing.
//! 2. **Learning-rate transfer.** Loss against learning rate at several widths, for standard
//!    and spectral scaling: the optimum should stay put under spectral scaling.
//! 3. **Low-rank updates** (SPEC 7.2). The stable rank of a one-step gradient update of the
//!    hidden layer against batch size, ReLU and tanh, and its alignment with the layer input.
//!
//! Writes CSVs and PNG/SVG figures into `--out` (default `target/feature_learning`), prints a
//! table, and shows a progress bar. The spectral (3a) runs step on the GPU when a CUDA device
//! works (`--device auto`), else on the CPU.

mod experiment;
mod plots;

use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use experiment::{Activation, LowRankResult, Parametrisation, RunResult, Settings, Slope};
use indicatif::{ProgressBar, ProgressStyle};
use plots::{Panel, Series};

struct Options {
    settings: Settings,
    out: PathBuf,
    quick: bool,
    device: String,
}

fn parse_args() -> Result<Options, String> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    args.retain(|a| a != "--quick");
    let mut settings = if quick {
        Settings::quick()
    } else {
        Settings::default_run()
    };
    let mut out = PathBuf::from("target/feature_learning");
    let mut device = "auto".to_string();
    let mut args = args.into_iter();
    let positive = |flag: &str, value: &str| -> Result<usize, String> {
        value
            .parse()
            .ok()
            .filter(|&v: &usize| v > 0)
            .ok_or(format!("{flag} takes a positive integer, got {value:?}"))
    };
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value (flags: --quick --out DIR --max-width N --widths 64,128 --seeds N --steps N --device auto|cpu|cuda)"))?;
        match flag.as_str() {
            "--out" => out = PathBuf::from(value),
            "--max-width" => {
                let max = positive(&flag, &value)?;
                if max < 64 {
                    return Err("--max-width must be at least 64".into());
                }
                settings.widths = (6..)
                    .map(|k| 1usize << k)
                    .take_while(|&w| w <= max)
                    .collect();
            }
            "--widths" => {
                settings.widths = value
                    .split(',')
                    .map(|w| positive(&flag, w.trim()))
                    .collect::<Result<_, _>>()?;
                if settings.widths.len() < 2 {
                    return Err("--widths needs at least two widths to fit a slope".into());
                }
            }
            "--seeds" => settings.seeds = positive(&flag, &value)? as u64,
            "--steps" => {
                settings.steps = positive(&flag, &value)?;
                settings.sweep_steps = settings.steps;
            }
            "--device" if ["auto", "cpu", "cuda"].contains(&value.as_str()) => device = value,
            _ => return Err(format!("unknown flag or value: {flag} {value}")),
        }
    }
    Ok(Options {
        settings,
        out,
        quick,
        device,
    })
}

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

fn write_csvs(
    dir: &std::path::Path,
    sweep: &[RunResult],
    slopes: &[Slope],
    lr: &[RunResult],
    low: &[LowRankResult],
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
    )
}

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

fn figures(
    dir: &std::path::Path,
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

fn main() {
    let options = parse_args().unwrap_or_else(|message| {
        eprintln!("{message}");
        std::process::exit(2);
    });
    if let Err(message) = run(options) {
        eprintln!("feature_learning: {message}");
        std::process::exit(1);
    }
}

fn run(options: Options) -> Result<(), String> {
    let started = Instant::now();
    let settings = &options.settings;
    let use_cuda = experiment::use_cuda(&options.device)?;
    fs::create_dir_all(&options.out)
        .map_err(|e| format!("cannot create {}: {e}", options.out.display()))?;
    println!(
        "{} run: widths {:?}, {} seeds, {} steps of batch {}; spectral (3a) steps on {}",
        if options.quick { "quick" } else { "default" },
        settings.widths,
        settings.seeds,
        settings.steps,
        experiment::BATCH,
        use_cuda.as_deref().unwrap_or("the CPU")
    );
    let total = (Parametrisation::ALL.len() * settings.widths.len() * settings.seeds as usize)
        + 2 * settings.sweep_widths.len() * settings.sweep_exponents.len()
        + 2 * settings.batch_sizes.len();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} runs {msg}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    let tick = || bar.inc(1);
    let cuda = use_cuda.is_some();
    bar.set_message("width sweep");
    let sweep = experiment::width_sweep(settings, false, cuda, &tick).map_err(|e| e.to_string())?;
    bar.set_message("learning-rate sweep");
    let lr = experiment::learning_rate_sweep(settings, cuda, &tick).map_err(|e| e.to_string())?;
    bar.set_message("low-rank updates");
    let low = experiment::low_rank(settings, &tick).map_err(|e| e.to_string())?;
    bar.finish_and_clear();

    let slopes = experiment::slopes(&sweep);
    write_csvs(&options.out, &sweep, &slopes, &lr, &low)
        .map_err(|e| format!("writing CSVs: {e}"))?;
    figures(&options.out, &sweep, &lr, &low)?;

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
    for s in &slopes {
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
    for (p, width, rate, loss) in experiment::best_learning_rates(&lr) {
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
    for r in &low {
        println!(
            "{:>6} batch {:>6}: {:>6.2} ({:.3})",
            r.activation.name(),
            r.batch,
            r.stable_rank,
            r.alignment
        );
    }
    let spectral_updates: Vec<f64> = sweep
        .iter()
        .filter(|r| r.parametrisation == Parametrisation::SpectralNormalised)
        .map(|r| r.last_update_ratio / f64::from(r.learning_rate))
        .collect();
    let (low_ratio, high_ratio) = spectral_updates
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
    println!(
        "\nSpectralSgd: last update |dW2|_* / (eta s) in [{low_ratio:.3}, {high_ratio:.3}] over all widths and seeds"
    );
    println!(
        "\nWrote {}/{{width_sweep,slopes,lr_sweep,low_rank}}.csv and {{width_sweep,lr_transfer,low_rank}}.{{png,svg}} in {:.0} s",
        options.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
