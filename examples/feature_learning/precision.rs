//! Training in bf16 (math §5a): the spectral (3a) MLP trained with its weights stored in bf16,
//! rounded to nearest or stochastically, or kept as `f32` master weights with a bf16 copy
//! for the forward pass, against the same run in `f32`.
//!
//! In every bf16 mode the forward and backward passes read bf16 weights (widened to `f32`,
//! exactly) and the gradients are rounded to bf16 before the step, as in a trainer whose
//! tensors are bf16; the arithmetic of the passes stays `f32`.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use spectral_step::half::bf16;
use spectral_step::{Rounding, SpectralSgd, SpectralSgdConfig};

use super::experiments::BATCH;
use super::model::{Activation, INPUTS, Mlp, Teacher, gaussian};
use super::parametrisation::Parametrisation;

/// How the weights are stored and updated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// `f32` weights and gradients.
    F32,
    /// bf16 weights, new weights rounded to nearest even.
    Bf16Nearest,
    /// bf16 weights, new weights rounded stochastically (the default for 16-bit weights).
    Bf16Stochastic,
    /// `f32` master weights with bf16 gradients; the forward pass reads the bf16 copy the
    /// step writes.
    MasterWeights,
}

impl Precision {
    /// Every mode, in the order of tables and figures.
    pub const ALL: [Precision; 4] = [
        Precision::F32,
        Precision::Bf16Nearest,
        Precision::Bf16Stochastic,
        Precision::MasterWeights,
    ];

    /// Short name for tables, CSVs and legends.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16Nearest => "bf16-nearest",
            Precision::Bf16Stochastic => "bf16-stochastic",
            Precision::MasterWeights => "f32-master+bf16",
        }
    }
}

/// The training loss of one run, step by step.
#[derive(Clone, Debug)]
pub struct PrecisionRun {
    pub precision: Precision,
    pub seed: u64,
    /// Loss before each step.
    pub losses: Vec<f64>,
}

impl PrecisionRun {
    /// Mean loss over the last 10 steps.
    pub fn final_loss(&self) -> f64 {
        let tail = &self.losses[self.losses.len().saturating_sub(10)..];
        tail.iter().sum::<f64>() / tail.len() as f64
    }
}

fn to_bf16(values: &[Vec<f32>]) -> Vec<Vec<bf16>> {
    values
        .iter()
        .map(|v| v.iter().map(|&x| bf16::from_f32(x)).collect())
        .collect()
}

fn widen_into(model_weights: &mut [Vec<f32>], values: &[Vec<bf16>]) {
    for (w, v) in model_weights.iter_mut().zip(values) {
        for (w, v) in w.iter_mut().zip(v) {
            *w = v.to_f32();
        }
    }
}

/// Trains the spectral (3a) MLP of `width` for `steps` steps in `precision`, on the data and
/// initialisation of seed `seed` (the same for every mode).
pub fn train(
    precision: Precision,
    width: usize,
    learning_rate: f32,
    steps: usize,
    seed: u64,
) -> spectral_step::Result<PrecisionRun> {
    let teacher = Teacher::new(1);
    let parametrisation = Parametrisation::SpectralNormalised;
    let mut model = Mlp::new(width, parametrisation, Activation::Relu, seed)?;
    let rounding = match precision {
        Precision::Bf16Nearest => Rounding::Nearest,
        _ => Rounding::Stochastic,
    };
    let config = SpectralSgdConfig {
        learning_rate,
        momentum: 0.9,
        rounding,
        seed,
        ..SpectralSgdConfig::default()
    };
    let mut optimizer = SpectralSgd::new(&model.shapes, config)?;
    // The stored weights of each mode; the model's own f32 weights are what the passes read.
    let mut master = model.weights.clone();
    let mut stored = to_bf16(&model.weights);
    if precision != Precision::F32 {
        widen_into(&mut model.weights, &stored);
    }
    let mut data = ChaCha8Rng::seed_from_u64(1000 + seed);
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let x = gaussian(BATCH * INPUTS, &mut data);
        let (loss, grads, _) = model.loss_and_gradients(&x, &teacher.targets(&x, BATCH), BATCH);
        losses.push(loss);
        match precision {
            Precision::F32 => {
                optimizer.step(&mut model.weights, &grads)?;
            }
            Precision::Bf16Nearest | Precision::Bf16Stochastic => {
                optimizer.step(&mut stored, &to_bf16(&grads))?;
                widen_into(&mut model.weights, &stored);
            }
            Precision::MasterWeights => {
                optimizer.step_with_copy(&mut master, &to_bf16(&grads), &mut stored)?;
                widen_into(&mut model.weights, &stored);
            }
        }
    }
    Ok(PrecisionRun {
        precision,
        seed,
        losses,
    })
}

/// Every mode at `width`, seeds `0..seeds`, in parallel.
pub fn precision_runs(
    width: usize,
    steps: usize,
    seeds: u64,
    progress: &(dyn Fn() + Sync),
) -> spectral_step::Result<Vec<PrecisionRun>> {
    let learning_rate = Parametrisation::SpectralNormalised.default_learning_rate();
    let jobs: Vec<(Precision, u64)> = Precision::ALL
        .iter()
        .flat_map(|&p| (0..seeds).map(move |s| (p, s)))
        .collect();
    jobs.into_par_iter()
        .map(|(precision, seed)| {
            let run = train(precision, width, learning_rate, steps, seed);
            progress();
            run
        })
        .collect()
}

/// Mean over seeds of the final loss of each mode, in [`Precision::ALL`] order.
pub fn mean_final_losses(runs: &[PrecisionRun]) -> Vec<(Precision, f64)> {
    Precision::ALL
        .iter()
        .map(|&p| {
            let finals: Vec<f64> = runs
                .iter()
                .filter(|r| r.precision == p)
                .map(PrecisionRun::final_loss)
                .collect();
            (p, finals.iter().sum::<f64>() / finals.len() as f64)
        })
        .collect()
}
