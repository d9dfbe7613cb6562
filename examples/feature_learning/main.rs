//! Does spectral scaling make a network learn features at every width, and do its
//! hyper-parameters transfer? The paper's experiments (math §7), reproduced with this crate.
//!
//! ```text
//! cargo run --release --example feature_learning -- [--quick] [--out DIR] [--max-width N]
//!     [--widths 64,128,...] [--seeds N] [--steps N] [--device auto|cpu|cuda]
//! ```
//!
//! 1. **Width sweep.** 3-layer ReLU MLPs (`16 -> n -> n -> 4`) learn a fixed random teacher at
//!    widths 2^6..2^11 (`--max-width` extends it), 3 seeds, under five parametrisations:
//!    NTK (`N(0, 1/fan_in)`, SGD with `eta ∝ 1/fan_in`), standard (PyTorch's default init, one
//!    SGD rate), spectral by normalisation (math §3a: `spectral_init` + `SpectralSgd`), the
//!    spectral parametrisation (math §3b), and spectral init with `SpectralSgd`'s
//!    orthogonalised rule (math §5b, Muon's iteration; up to width 1024, 512 with `--quick`,
//!    `--orthogonalised-max-width` changes it). Measured: `||h2 - h2_0|| / ||h2_0||`,
//!    `||W2 - W2_0||_* / ||W2_0||_*`, the training loss, and log-log slopes against width.
//!    Expected: spectral flat, NTK slope about -1/2, standard growing.
//! 2. **Learning-rate transfer.** Loss against learning rate at several widths, for standard
//!    scaling and both spectral rules: the optimum should stay put under spectral scaling.
//! 3. **Low-rank updates** (math §7.2). The stable rank of a one-step gradient update of the
//!    hidden layer against batch size, ReLU and tanh, and its alignment with the layer input.
//! 4. **Training in bf16** (math §5a). The spectral (3a) MLP at width 1024 (512 with
//!    `--quick`) with bf16 weights rounded to nearest or stochastically, and with `f32` master
//!    weights and a bf16 copy, against `f32`: the training loss step by step.
//!
//! Writes CSVs and PNG/SVG figures into `--out` (default `target/feature_learning`), prints a
//! table, and shows a progress bar. The spectral (3a) runs step on the GPU when a CUDA device
//! works (`--device auto`), else on the CPU. `--help` describes every flag.

mod cli;
mod csv;
#[path = "lib.rs"]
mod feature_learning;
mod figures;
mod plots;
mod tables;

use std::fs;
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use cli::Args;
use feature_learning::experiments::{self, BATCH};
use feature_learning::precision::{self, Precision};
use feature_learning::statistics;

fn main() {
    let args = Args::parse();
    if let Err(message) = run(&args) {
        eprintln!("feature_learning: {message}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let started = Instant::now();
    let settings = &args.settings();
    let use_cuda = args.device.resolve()?;
    fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    println!(
        "{} run: widths {:?}, {} seeds, {} steps of batch {}; spectral (3a) steps on {}",
        if args.quick { "quick" } else { "default" },
        settings.widths,
        settings.seeds,
        settings.steps,
        BATCH,
        use_cuda.as_deref().unwrap_or("the CPU")
    );
    let total = settings.width_sweep_runs().len()
        + settings.learning_rate_sweep_runs().len()
        + 2 * settings.batch_sizes.len()
        + Precision::ALL.len() * settings.seeds as usize;
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} runs {msg}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    let tick = || bar.inc(1);
    let cuda = use_cuda.is_some();
    bar.set_message("width sweep");
    let sweep =
        experiments::width_sweep(settings, false, cuda, &tick).map_err(|e| e.to_string())?;
    bar.set_message("learning-rate sweep");
    let lr = experiments::learning_rate_sweep(settings, cuda, &tick).map_err(|e| e.to_string())?;
    bar.set_message("low-rank updates");
    let low = experiments::low_rank(settings, &tick).map_err(|e| e.to_string())?;
    bar.set_message("bf16 training");
    let bf16 = precision::precision_runs(
        settings.precision_width,
        settings.precision_steps,
        settings.seeds,
        &tick,
    )
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();

    let slopes = statistics::slopes(&sweep);
    csv::write(&args.out, &sweep, &slopes, &lr, &low, &bf16)
        .map_err(|e| format!("writing CSVs: {e}"))?;
    figures::draw(&args.out, &sweep, &lr, &low, &bf16)?;
    tables::print(settings, &sweep, &slopes, &lr, &low, &bf16);
    println!(
        "\nWrote {}/{{width_sweep,slopes,lr_sweep,low_rank,bf16_training}}.csv and {{width_sweep,lr_transfer,low_rank,bf16_training}}.{{png,svg}} in {:.1} s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
