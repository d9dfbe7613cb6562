//! The three experiments (math §7): the width sweep, the learning-rate sweep and the low-rank
//! updates, with their settings and results.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use spectral_step::{Scale, diagnostics};

use super::model::{Activation, INPUTS, Mlp, Teacher, gaussian, layer_forward};
use super::parametrisation::Parametrisation;
use super::statistics::{difference, norm};
use super::trainer::Trainer;

/// Training batch size.
pub const BATCH: usize = 64;

/// What one training run measured.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// How the model was initialised and updated.
    pub parametrisation: Parametrisation,
    /// Hidden width.
    pub width: usize,
    /// Seed of the initialisation and of the training data.
    pub seed: u64,
    /// The learning rate `eta` (per-layer rates follow from it and the parametrisation).
    pub learning_rate: f32,
    /// `||h2 - h2_0|| / ||h2_0||` on a fixed probe batch.
    pub feature_change: f64,
    /// `||W2 - W2_0||_* / ||W2_0||_*`.
    pub weight_change: f64,
    /// Mean training loss over the last 10 steps (NaN if training diverged).
    pub final_loss: f64,
    /// `||ΔW2||_* / s` of the last step (math §6; `s = 1` for the square hidden layer).
    pub last_update_ratio: f64,
}

/// Trains one model for `steps` steps of batch [`BATCH`] and measures it.
pub fn train(
    parametrisation: Parametrisation,
    width: usize,
    learning_rate: f32,
    steps: usize,
    seed: u64,
    planted_bug: bool,
    cuda: bool,
) -> spectral_step::Result<RunResult> {
    let teacher = Teacher::new(1);
    let mut model = Mlp::new(width, parametrisation, Activation::Relu, seed)?;
    let mut trainer = Trainer::new(parametrisation, learning_rate, &model, cuda)?;
    trainer.planted_bug = planted_bug;
    let probe = gaussian(BATCH * INPUTS, &mut ChaCha8Rng::seed_from_u64(99));
    let h2_initial = model.forward(&probe, BATCH).h2;
    let w2_initial = model.weights[1].clone();
    let mut data = ChaCha8Rng::seed_from_u64(1000 + seed);
    let mut losses = Vec::with_capacity(steps);
    let mut previous_w2 = w2_initial.clone();
    for step in 0..steps {
        let x = gaussian(BATCH * INPUTS, &mut data);
        let (loss, grads, _) = model.loss_and_gradients(&x, &teacher.targets(&x, BATCH), BATCH);
        losses.push(loss);
        if step + 1 == steps {
            previous_w2.clone_from(&model.weights[1]);
        }
        trainer.step(&mut model, &grads)?;
    }
    let tail = &losses[losses.len().saturating_sub(10)..];
    let final_loss = tail.iter().sum::<f64>() / tail.len() as f64;
    let h2 = model.forward(&probe, BATCH).h2;
    let finite = model.weights[1].iter().all(|w| w.is_finite());
    let (feature_change, weight_change, last_update_ratio) = if finite && final_loss.is_finite() {
        let shape = model.shapes[1];
        let change = difference(&model.weights[1], &w2_initial);
        let last = difference(&model.weights[1], &previous_w2);
        (
            norm(&difference(&h2, &h2_initial)) / norm(&h2_initial),
            f64::from(diagnostics::spectral_norm(&change, shape)?)
                / f64::from(diagnostics::spectral_norm(&w2_initial, shape)?),
            f64::from(diagnostics::spectral_norm(&last, shape)?)
                / f64::from(Scale::Spectral.factor(shape)),
        )
    } else {
        (f64::NAN, f64::NAN, f64::NAN)
    };
    Ok(RunResult {
        parametrisation,
        width,
        seed,
        learning_rate,
        feature_change,
        weight_change,
        final_loss: if finite { final_loss } else { f64::NAN },
        last_update_ratio,
    })
}

/// Settings of one run of the whole experiment.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Hidden widths of the width sweep.
    pub widths: Vec<usize>,
    /// Seeds per width of the width sweep: `0..seeds`.
    pub seeds: u64,
    /// Training steps of each width-sweep run.
    pub steps: usize,
    /// Widths of the learning-rate sweep.
    pub sweep_widths: Vec<usize>,
    /// The learning-rate sweep's rates, as powers of two, per parametrisation.
    pub sweep_exponents: Vec<i32>,
    /// Training steps of each learning-rate-sweep run.
    pub sweep_steps: usize,
    /// Hidden width of the low-rank experiment.
    pub low_rank_width: usize,
    /// Batch sizes of the low-rank experiment.
    pub batch_sizes: Vec<usize>,
    /// Hidden width of the bf16 training runs (math §5a).
    pub precision_width: usize,
    /// Training steps of each bf16 training run (seeds `0..seeds`).
    pub precision_steps: usize,
    /// The widest network of either sweep that the orthogonalised rule trains: its step
    /// costs `5 (4 n³ + 2 n³)` flops for the `n x n` hidden layer (math §5b), about 1.7 s at
    /// width 2048 on 2 cores, 100 times the power-normalised step.
    pub orthogonalised_max_width: usize,
}

impl Settings {
    /// The default run: widths 2^6..2^11, 3 seeds; under 5 minutes on 2 cores.
    pub fn default_run() -> Self {
        Self {
            widths: (6..=11).map(|k| 1 << k).collect(),
            seeds: 3,
            steps: 100,
            sweep_widths: vec![64, 256, 1024],
            sweep_exponents: (-8..=1).collect(),
            sweep_steps: 100,
            low_rank_width: 512,
            batch_sizes: vec![10, 30, 100, 300, 1000, 3000, 10000],
            precision_width: 1024,
            precision_steps: 200,
            orthogonalised_max_width: 1024,
        }
    }

    /// `--quick`: widths 2^6..2^9, fewer steps; well under a minute.
    pub fn quick() -> Self {
        Self {
            widths: (6..=9).map(|k| 1 << k).collect(),
            seeds: 3,
            steps: 40,
            sweep_widths: vec![64, 256],
            sweep_exponents: (-6..=0).step_by(2).collect(),
            sweep_steps: 40,
            low_rank_width: 256,
            batch_sizes: vec![10, 100, 1000],
            precision_width: 512,
            precision_steps: 60,
            orthogonalised_max_width: 512,
        }
    }
}

impl Settings {
    /// Whether `parametrisation` trains at `width` in the sweeps.
    fn trains(&self, parametrisation: Parametrisation, width: usize) -> bool {
        parametrisation != Parametrisation::SpectralOrthogonalised
            || width <= self.orthogonalised_max_width
    }

    /// The width sweep's runs: (parametrisation, width, seed).
    pub fn width_sweep_runs(&self) -> Vec<(Parametrisation, usize, u64)> {
        Parametrisation::ALL
            .iter()
            .flat_map(|&p| {
                self.widths
                    .iter()
                    .filter(move |&&w| self.trains(p, w))
                    .flat_map(move |&w| (0..self.seeds).map(move |s| (p, w, s)))
            })
            .collect()
    }

    /// The learning-rate sweep's runs: (parametrisation, width, exponent of the rate).
    pub fn learning_rate_sweep_runs(&self) -> Vec<(Parametrisation, usize, i32)> {
        LEARNING_RATE_SWEEP
            .iter()
            .flat_map(|&p| {
                self.sweep_widths
                    .iter()
                    .filter(move |&&w| self.trains(p, w))
                    .flat_map(move |&w| self.sweep_exponents.iter().map(move |&e| (p, w, e)))
            })
            .collect()
    }
}

/// The parametrisations of the learning-rate sweep, in plotting order.
pub const LEARNING_RATE_SWEEP: [Parametrisation; 3] = [
    Parametrisation::Standard,
    Parametrisation::SpectralNormalised,
    Parametrisation::SpectralOrthogonalised,
];

/// The width sweep: every parametrisation at every width and seed, in parallel (the
/// orthogonalised rule up to `Settings::orthogonalised_max_width`).
pub fn width_sweep(
    settings: &Settings,
    planted_bug: bool,
    cuda: bool,
    progress: &(dyn Fn() + Sync),
) -> spectral_step::Result<Vec<RunResult>> {
    settings
        .width_sweep_runs()
        .into_par_iter()
        .map(|(p, width, seed)| {
            let result = train(
                p,
                width,
                p.default_learning_rate(),
                settings.steps,
                seed,
                planted_bug,
                cuda,
            );
            progress();
            result
        })
        .collect()
}

/// The learning-rate sweep for standard scaling and both spectral rules (3a, orthogonalised).
pub fn learning_rate_sweep(
    settings: &Settings,
    cuda: bool,
    progress: &(dyn Fn() + Sync),
) -> spectral_step::Result<Vec<RunResult>> {
    settings
        .learning_rate_sweep_runs()
        .into_par_iter()
        .map(|(p, width, exponent)| {
            let result = train(
                p,
                width,
                2f32.powi(exponent),
                settings.sweep_steps,
                0,
                false,
                cuda,
            );
            progress();
            result
        })
        .collect()
}

/// The learning rate with the lowest final loss, per (parametrisation, width).
pub fn best_learning_rates(sweep: &[RunResult]) -> Vec<(Parametrisation, usize, f32, f64)> {
    let mut best: Vec<(Parametrisation, usize, f32, f64)> = Vec::new();
    for r in sweep.iter().filter(|r| r.final_loss.is_finite()) {
        match best
            .iter_mut()
            .find(|b| b.0 == r.parametrisation && b.1 == r.width)
        {
            Some(b) if r.final_loss < b.3 => {
                *b = (r.parametrisation, r.width, r.learning_rate, r.final_loss)
            }
            Some(_) => {}
            None => best.push((r.parametrisation, r.width, r.learning_rate, r.final_loss)),
        }
    }
    best.sort_by_key(|b| (b.0.name(), b.1));
    best
}

/// One point of the low-rank experiment (math §7.2).
#[derive(Clone, Debug)]
pub struct LowRankResult {
    /// The hidden activation.
    pub activation: Activation,
    /// Batch size of the gradient.
    pub batch: usize,
    /// Stable rank `||ΔW||_F^2 / ||ΔW||_*^2` of the one-step gradient of `W2`.
    pub stable_rank: f64,
    /// Mean over (up to 100) batch inputs of `||ΔW h|| / (||ΔW||_* ||h||)`, `h` = `h1`.
    pub alignment: f64,
}

/// The stable rank and alignment of a one-step update of the hidden layer at initialisation
/// (spectral init), against batch size, for ReLU and tanh.
pub fn low_rank(
    settings: &Settings,
    progress: &(dyn Fn() + Sync),
) -> spectral_step::Result<Vec<LowRankResult>> {
    let teacher = Teacher::new(1);
    let jobs: Vec<(Activation, usize)> = [Activation::Relu, Activation::Tanh]
        .iter()
        .flat_map(|&a| settings.batch_sizes.iter().map(move |&b| (a, b)))
        .collect();
    jobs.into_par_iter()
        .map(|(activation, batch)| {
            let model = Mlp::new(
                settings.low_rank_width,
                Parametrisation::SpectralNormalised,
                activation,
                5,
            )?;
            let x = gaussian(batch * INPUTS, &mut ChaCha8Rng::seed_from_u64(batch as u64));
            let (_, grads, pass) = model.loss_and_gradients(&x, &teacher.targets(&x, batch), batch);
            let shape = model.shapes[1];
            let update = &grads[1];
            let sigma = f64::from(diagnostics::spectral_norm(update, shape)?);
            let stable_rank = f64::from(diagnostics::stable_rank(update, shape)?);
            let samples = batch.min(100);
            let alignment = (0..samples)
                .map(|b| {
                    let h = &pass.h1[b * shape.fan_in..(b + 1) * shape.fan_in];
                    let image = layer_forward(h, 1, update, shape);
                    norm(&image) / (sigma * norm(h))
                })
                .sum::<f64>()
                / samples as f64;
            progress();
            Ok(LowRankResult {
                activation,
                batch,
                stable_rank,
                alignment,
            })
        })
        .collect()
}
