//! One training run: a transformer of one width, one optimizer, one learning rate.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use spectral_step::SpectralSgdConfig;
use spectral_step::candle::{AdamWConfig, OptimizerConfig, Routing, SpectralOptimizer};

use crate::data::{Batches, Corpus};
use crate::model::{Transformer, TransformerShape};

/// The two optimizers compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// This crate's adapter with its defaults: every matrix gets the spectral step at the
    /// swept rate; vectors and embeddings get its AdamW group at candle-nn's default rate
    /// (0.001), not swept (the split Muon's users follow).
    Spectral,
    /// candle-nn's `AdamW` over every parameter.
    AdamW,
}

impl Method {
    pub const ALL: [Method; 2] = [Method::Spectral, Method::AdamW];

    pub fn name(self) -> &'static str {
        match self {
            Method::Spectral => "spectral",
            Method::AdamW => "adamw",
        }
    }
}

/// What every run shares.
#[derive(Clone, Debug)]
pub struct Settings {
    pub widths: Vec<usize>,
    pub layers: usize,
    pub head_width: usize,
    pub context: usize,
    pub batch: usize,
    pub steps: usize,
    /// Learning rates per method.
    pub spectral_rates: Vec<f64>,
    pub adamw_rates: Vec<f64>,
    /// Held-out batches the final loss averages over.
    pub held_out_batches: usize,
    pub seed: u64,
}

impl Settings {
    pub fn rates(&self, method: Method) -> &[f64] {
        match method {
            Method::Spectral => &self.spectral_rates,
            Method::AdamW => &self.adamw_rates,
        }
    }
}

/// One run's outcome.
#[derive(Clone, Debug)]
pub struct Run {
    pub width: usize,
    pub method: Method,
    pub learning_rate: f64,
    /// Training loss at every step.
    pub curve: Vec<f32>,
    /// Mean loss on the held-out batches after the last step (`NaN` when training diverged).
    pub held_out: f32,
    pub parameters: usize,
    pub seconds: f64,
}

enum Stepper {
    Spectral(Box<SpectralOptimizer>),
    AdamW(candle_nn::AdamW),
}

fn error(message: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(message.to_string())
}

/// Trains one model from the seeded initialisation on the seeded batches.
pub fn run(
    corpus: &Corpus,
    settings: &Settings,
    width: usize,
    method: Method,
    learning_rate: f64,
) -> Result<Run> {
    let started = std::time::Instant::now();
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let shape = TransformerShape {
        vocab: corpus.vocabulary.len(),
        context: settings.context,
        width,
        heads: (width / settings.head_width).max(1),
        layers: settings.layers,
    };
    let transformer = Transformer::new(shape, vb)?;
    crate::model::seed_parameters(&varmap, settings.seed)?;
    let parameters = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    let mut stepper = match method {
        Method::Spectral => {
            let config = OptimizerConfig {
                spectral: SpectralSgdConfig {
                    learning_rate: learning_rate as f32,
                    ..SpectralSgdConfig::default()
                },
                adamw: AdamWConfig::default(),
                routing: Routing::muon(),
                master_weights: false,
            };
            Stepper::Spectral(Box::new(
                SpectralOptimizer::from_varmap(&varmap, config).map_err(error)?,
            ))
        }
        Method::AdamW => Stepper::AdamW(candle_nn::AdamW::new(
            varmap.all_vars(),
            candle_nn::ParamsAdamW {
                lr: learning_rate,
                ..Default::default()
            },
        )?),
    };
    let mut batches = Batches::new(settings.seed, settings.batch, settings.context + 1);
    let mut curve = Vec::with_capacity(settings.steps);
    for _ in 0..settings.steps {
        let tokens = batches.next(&corpus.train, &device)?;
        let loss = transformer.loss(&tokens)?;
        let value = loss.to_scalar::<f32>()?;
        curve.push(value);
        if !value.is_finite() {
            break;
        }
        let grads = loss.backward()?;
        match &mut stepper {
            Stepper::Spectral(optimizer) => optimizer.step(&grads)?,
            Stepper::AdamW(optimizer) => optimizer.step(&grads)?,
        }
    }
    let held_out = if curve.last().is_some_and(|loss| loss.is_finite()) {
        held_out_loss(&transformer, corpus, settings)?
    } else {
        f32::NAN
    };
    Ok(Run {
        width,
        method,
        learning_rate,
        curve,
        held_out,
        parameters,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The mean loss over the same held-out batches for every run.
fn held_out_loss(transformer: &Transformer, corpus: &Corpus, settings: &Settings) -> Result<f32> {
    let mut batches = Batches::new(
        u64::MAX - settings.seed,
        settings.batch,
        settings.context + 1,
    );
    let mut total = 0.0;
    for _ in 0..settings.held_out_batches {
        let tokens: Tensor = batches.next(&corpus.held_out, &Device::Cpu)?;
        total += transformer.loss(&tokens)?.to_scalar::<f32>()?;
    }
    Ok(total / settings.held_out_batches as f32)
}
