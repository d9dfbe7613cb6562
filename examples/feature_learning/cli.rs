//! The command line: the flags, their validation, and the settings they select.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use spectral_step::cuda::BackendChoice;

use crate::feature_learning::experiments::Settings;

/// Does spectral scaling make a network learn features at every width, and do its
/// hyper-parameters transfer?
///
/// Reproduces the experiments of math §7: a width sweep of 3-layer ReLU MLPs under five
/// parametrisations (NTK, standard, spectral 3a and 3b, and spectral init with the
/// orthogonalised rule of math §5b), a learning-rate sweep at several
/// widths, and the stable rank of one-step gradient updates against batch size. Writes CSVs
/// and PNG/SVG figures into --out and prints a summary.
#[derive(Debug, Parser)]
#[command(
    name = "feature_learning",
    args_override_self = true,
    allow_negative_numbers = true
)]
pub struct Args {
    /// The quick run: widths 2^6..2^9, 40 steps, smaller learning-rate and batch-size sweeps
    #[arg(long)]
    pub quick: bool,

    /// Directory for the CSVs and figures
    #[arg(long, value_name = "DIR", default_value = "target/feature_learning")]
    pub out: PathBuf,

    /// Width sweep at widths 2^6, 2^7, ... up to N, at least 64 [default: 2048; 512 with
    /// --quick]
    #[arg(long, value_name = "N", value_parser = max_width, overrides_with = "widths")]
    pub max_width: Option<usize>,

    /// Width sweep at these widths, at least two [default: 64,128,...,2048; up to 512 with
    /// --quick]
    #[arg(
        long,
        value_name = "64,128,...",
        value_parser = widths,
        overrides_with = "max_width"
    )]
    pub widths: Option<Widths>,

    /// Seeds per width of the width sweep [default: 3]
    #[arg(long, value_name = "N", value_parser = positive)]
    pub seeds: Option<usize>,

    /// Training steps of every run of both sweeps [default: 100; 40 with --quick]
    #[arg(long, value_name = "N", value_parser = positive)]
    pub steps: Option<usize>,

    /// The orthogonalised rule trains at widths up to N in both sweeps; its step costs
    /// O(N^3) [default: 1024; 512 with --quick]
    #[arg(long, value_name = "N", value_parser = positive)]
    pub orthogonalised_max_width: Option<usize>,

    /// Where the spectral (3a) runs step
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
}

impl Args {
    /// The settings of the run: the quick or the default run, changed by the flags.
    pub fn settings(&self) -> Settings {
        let mut settings = if self.quick {
            Settings::quick()
        } else {
            Settings::default_run()
        };
        if let Some(max) = self.max_width {
            settings.widths = (6..usize::BITS)
                .map(|k| 1usize << k)
                .take_while(|&w| w <= max)
                .collect();
        }
        if let Some(Widths(widths)) = &self.widths {
            settings.widths.clone_from(widths);
        }
        if let Some(seeds) = self.seeds {
            settings.seeds = seeds as u64;
        }
        if let Some(steps) = self.steps {
            settings.steps = steps;
            settings.sweep_steps = steps;
        }
        if let Some(max) = self.orthogonalised_max_width {
            settings.orthogonalised_max_width = max;
        }
        settings
    }
}

/// The widths of `--widths`: positive, and at least two, so that a slope can be fitted.
#[derive(Clone, Debug)]
pub struct Widths(pub Vec<usize>);

/// Where the spectral (3a) runs step; the other parametrisations always step on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// A CUDA device if one works, else the CPU
    Auto,
    /// The CPU
    Cpu,
    /// A CUDA device; an error if none works
    Cuda,
}

impl Device {
    /// `Ok(None)` for the CPU, `Ok(Some(name))` for a CUDA device, `Err` when `cuda` finds
    /// none.
    pub fn resolve(self) -> Result<Option<String>, String> {
        if self == Device::Cpu {
            return Ok(None);
        }
        match spectral_step::cuda::choose_backend() {
            BackendChoice::Cuda(info) => Ok(Some(info.to_string())),
            BackendChoice::Cpu { reason } if self == Device::Cuda => {
                Err(format!("--device cuda: {reason}"))
            }
            BackendChoice::Cpu { .. } => Ok(None),
        }
    }
}

fn positive(value: &str) -> Result<usize, String> {
    value
        .parse()
        .ok()
        .filter(|&v: &usize| v > 0)
        .ok_or(format!("{value:?} is not a positive integer"))
}

fn max_width(value: &str) -> Result<usize, String> {
    let max = positive(value)?;
    if max < 64 {
        return Err("must be at least 64".into());
    }
    Ok(max)
}

fn widths(value: &str) -> Result<Widths, String> {
    let widths = value
        .split(',')
        .map(|w| positive(w.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    if widths.len() < 2 {
        return Err("needs at least two widths to fit a slope".into());
    }
    Ok(Widths(widths))
}
