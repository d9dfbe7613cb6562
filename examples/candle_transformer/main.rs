//! Does the best learning rate transfer across width? A small decoder-only transformer
//! (GPT-2's block structure) trained with candle on the Book of Genesis, character by
//! character, at three widths, over a learning-rate sweep, with this crate's candle adapter
//! and with candle-nn's AdamW.
//!
//! ```text
//! cargo run --release --example candle_transformer -- [--quick] [--out DIR] [--steps N]
//! ```
//!
//! Every run of one width starts from the same seeded weights and sees the same seeded
//! batches; the final loss is the mean over fixed held-out batches (the last tenth of the
//! text). Writes `runs.csv`, `curves.csv`, `lr_transfer.png/svg` (held-out loss against
//! learning rate, one line per width, one panel per optimizer) and `loss_curves.png/svg`
//! (training loss at each width's best rate) into `--out` (default
//! `target/candle_transformer`), prints the best rate per width and optimizer, and shows a
//! progress bar.

mod data;
mod model;
#[path = "../feature_learning/plots.rs"]
mod plots;
mod sweep;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use data::Corpus;
use plots::{Panel, Series, YAxis};
use sweep::{Method, Run, Settings};

/// Learning-rate transfer across width for a candle transformer: this crate's optimizer
/// against candle-nn's AdamW.
#[derive(Debug, Parser)]
#[command(name = "candle_transformer", args_override_self = true)]
struct Args {
    /// The quick run: widths 32 and 64, 30 steps, three rates per optimizer
    #[arg(long)]
    quick: bool,

    /// Directory for the CSVs and figures
    #[arg(long, value_name = "DIR", default_value = "target/candle_transformer")]
    out: PathBuf,

    /// Training steps of every run [default: 100; 30 with --quick]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    steps: Option<u32>,
}

impl Args {
    fn settings(&self) -> Settings {
        let (widths, steps, spectral_rates, adamw_rates) = if self.quick {
            (
                vec![32, 64],
                30,
                vec![0.025, 0.05, 0.1],
                vec![0.002, 0.004, 0.008],
            )
        } else {
            (
                vec![64, 128, 256],
                100,
                vec![0.0125, 0.025, 0.05, 0.1, 0.2],
                vec![0.00075, 0.0015, 0.003, 0.006, 0.012],
            )
        };
        Settings {
            widths,
            layers: 2,
            head_width: 32,
            context: 64,
            batch: 8,
            steps: self.steps.map_or(steps, |s| s as usize),
            spectral_rates,
            adamw_rates,
            held_out_batches: 8,
            seed: 1,
        }
    }
}

fn main() {
    let args = Args::parse();
    if let Err(message) = run(&args) {
        eprintln!("candle_transformer: {message}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let started = Instant::now();
    let settings = args.settings();
    let corpus = Corpus::new(data::GENESIS, 0.1);
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    println!(
        "{} run: Genesis (KJV), {} characters ({} held out), vocabulary {}; widths {:?}, {} \
         layers, heads of width {}, context {}, batch {}, {} steps per run",
        if args.quick { "quick" } else { "default" },
        corpus.train.len() + corpus.held_out.len(),
        corpus.held_out.len(),
        corpus.vocabulary.len(),
        settings.widths,
        settings.layers,
        settings.head_width,
        settings.context,
        settings.batch,
        settings.steps
    );
    let mut jobs: Vec<(usize, Method, f64)> = Vec::new();
    for &width in &settings.widths {
        for method in Method::ALL {
            jobs.extend(
                settings
                    .rates(method)
                    .iter()
                    .map(|&rate| (width, method, rate)),
            );
        }
    }
    let bar = ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} runs {msg}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    let mut runs = Vec::with_capacity(jobs.len());
    for (width, method, rate) in jobs {
        bar.set_message(format!("width {width}, {}, rate {rate}", method.name()));
        let run = sweep::run(&corpus, &settings, width, method, rate).map_err(|e| e.to_string())?;
        runs.push(run);
        bar.inc(1);
    }
    bar.finish_and_clear();

    write_csvs(&args.out, &runs).map_err(|e| format!("writing CSVs: {e}"))?;
    plots::init_font()?;
    plots::save(&args.out, "lr_transfer", &transfer_panels(&settings, &runs))?;
    plots::save(&args.out, "loss_curves", &curve_panels(&settings, &runs))?;
    print!("{}", summary(&settings, &runs));
    println!(
        "wrote runs.csv, curves.csv, lr_transfer.png/svg, loss_curves.png/svg to {} in {:.1} s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The run of lowest held-out loss among `runs` (diverged runs, `NaN`, never win).
fn best<'a>(runs: impl Iterator<Item = &'a Run>) -> Option<&'a Run> {
    runs.filter(|run| run.held_out.is_finite())
        .min_by(|a, b| a.held_out.total_cmp(&b.held_out))
}

fn runs_of<'a>(
    runs: &'a [Run],
    width: usize,
    method: Method,
) -> impl Iterator<Item = &'a Run> + 'a {
    runs.iter()
        .filter(move |run| run.width == width && run.method == method)
}

/// Mean of the last ten training losses (the end of the curve, less noisy than one batch).
fn final_train_loss(run: &Run) -> f32 {
    let tail = &run.curve[run.curve.len().saturating_sub(10)..];
    tail.iter().sum::<f32>() / tail.len() as f32
}

fn write_csvs(dir: &Path, runs: &[Run]) -> std::io::Result<()> {
    let mut summary = String::from(
        "width,optimizer,learning_rate,parameters,held_out_loss,final_train_loss,seconds\n",
    );
    let mut curves = String::from("width,optimizer,learning_rate,step,train_loss\n");
    for run in runs {
        let _ = writeln!(
            summary,
            "{},{},{},{},{},{},{:.2}",
            run.width,
            run.method.name(),
            run.learning_rate,
            run.parameters,
            run.held_out,
            final_train_loss(run),
            run.seconds
        );
        for (step, loss) in run.curve.iter().enumerate() {
            let _ = writeln!(
                curves,
                "{},{},{},{},{loss}",
                run.width,
                run.method.name(),
                run.learning_rate,
                step + 1
            );
        }
    }
    std::fs::write(dir.join("runs.csv"), summary)?;
    std::fs::write(dir.join("curves.csv"), curves)
}

fn title(method: Method) -> &'static str {
    match method {
        Method::Spectral => "spectral-step (candle adapter)",
        Method::AdamW => "candle-nn AdamW",
    }
}

fn transfer_panels(settings: &Settings, runs: &[Run]) -> Vec<Panel> {
    Method::ALL
        .into_iter()
        .map(|method| Panel {
            title: title(method).into(),
            x_label: "learning rate".into(),
            y_label: "held-out loss".into(),
            series: settings
                .widths
                .iter()
                .map(|&width| Series {
                    label: format!("width {width}"),
                    points: runs_of(runs, width, method)
                        .map(|run| (run.learning_rate, f64::from(run.held_out)))
                        .collect(),
                })
                .collect(),
            y_axis: YAxis::Fitted,
            x_base: 2.0,
        })
        .collect()
}

fn curve_panels(settings: &Settings, runs: &[Run]) -> Vec<Panel> {
    Method::ALL
        .into_iter()
        .map(|method| Panel {
            title: format!("{}, best rate per width", title(method)),
            x_label: "step".into(),
            y_label: "training loss".into(),
            series: settings
                .widths
                .iter()
                .filter_map(|&width| best(runs_of(runs, width, method)))
                .map(|run| Series {
                    label: format!("width {}, rate {}", run.width, run.learning_rate),
                    points: run
                        .curve
                        .iter()
                        .enumerate()
                        .map(|(step, &loss)| ((step + 1) as f64, f64::from(loss)))
                        .collect(),
                })
                .collect(),
            y_axis: YAxis::Fitted,
            x_base: 10.0,
        })
        .collect()
}

/// The table: per optimizer and width, the best rate and its held-out loss, every rate's
/// loss, and the spread of the best rate across widths.
fn summary(settings: &Settings, runs: &[Run]) -> String {
    let mut text = String::new();
    for method in Method::ALL {
        let rates = settings.rates(method);
        let _ = writeln!(
            text,
            "\n{} (held-out loss per rate; * = best)",
            title(method)
        );
        let _ = write!(text, "{:>7} {:>10}", "width", "params");
        for rate in rates {
            let _ = write!(text, " {rate:>8}");
        }
        let _ = writeln!(text, " {:>9} {:>7}", "best rate", "seconds");
        let mut best_rates = Vec::new();
        for &width in &settings.widths {
            let width_runs: Vec<&Run> = runs_of(runs, width, method).collect();
            let winner = best(width_runs.iter().copied());
            let params = width_runs.first().map_or(0, |run| run.parameters);
            let _ = write!(text, "{width:>7} {params:>10}");
            for run in &width_runs {
                let mark = if winner.is_some_and(|w| std::ptr::eq(w, *run)) {
                    "*"
                } else {
                    " "
                };
                let _ = write!(text, " {:>7.3}{mark}", run.held_out);
            }
            let seconds: f64 = width_runs.iter().map(|run| run.seconds).sum();
            match winner {
                Some(run) => {
                    best_rates.push(run.learning_rate);
                    let _ = writeln!(text, " {:>9} {seconds:>7.1}", run.learning_rate);
                }
                None => {
                    let _ = writeln!(text, " {:>9} {seconds:>7.1}", "diverged");
                }
            }
        }
        if let (Some(low), Some(high)) = (
            best_rates.iter().copied().reduce(f64::min),
            best_rates.iter().copied().reduce(f64::max),
        ) {
            let _ = writeln!(
                text,
                "best rate spread across widths: {:.0}x (1x = the same rate at every width)",
                high / low
            );
        }
    }
    text
}
