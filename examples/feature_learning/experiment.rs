//! The computations of the feature-learning example (SPEC 7): a small MLP in plain Rust,
//! four parametrisations, and the three experiments (width sweep, learning-rate transfer,
//! low-rank updates). No plotting or printing here, so that the test suite can run the quick
//! mode and check the science (`tests/feature_learning.rs`).
#![allow(dead_code)]

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal, Uniform};
use rayon::prelude::*;
use spectral_step::cuda::cudarc::driver::CudaSlice;
use spectral_step::cuda::{Cuda, CudaDevice};
use spectral_step::diagnostics;
use spectral_step::scaling::{init_std, sgd_learning_rate_multiplier, spectral_init};
use spectral_step::{MatrixShape, Scale, SpectralSgd, SpectralSgdConfig};

/// Input dimension of the synthetic task.
pub const INPUTS: usize = 16;
/// Output dimension (the teacher's).
pub const OUTPUTS: usize = 4;
/// Training batch size.
pub const BATCH: usize = 64;
/// Width at which the NTK learning rate is `eta` for a hidden layer (`eta * BASE / fan_in`).
pub const BASE_WIDTH: usize = 64;

/// How weights are initialised and updated. (The last variant's name is the paper's term,
/// hence the allow.)
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Parametrisation {
    /// `W ~ N(0, 1/fan_in)`, plain SGD with `eta_l = eta * BASE_WIDTH / fan_in`.
    Ntk,
    /// PyTorch's default `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, plain SGD with one `eta`.
    Standard,
    /// SPEC 3a: spectral init, and `SpectralSgd` normalising every update to `eta * s`.
    SpectralNormalised,
    /// SPEC 3b: `N(0, sigma_l^2)` with `sigma_l = init_std(shape, 1)`, plain SGD with
    /// `eta_l = eta * fan_out / fan_in`.
    SpectralParametrisation,
}

impl Parametrisation {
    /// All four, in plotting order.
    pub const ALL: [Parametrisation; 4] = [
        Parametrisation::Ntk,
        Parametrisation::Standard,
        Parametrisation::SpectralNormalised,
        Parametrisation::SpectralParametrisation,
    ];

    /// Short name for tables and files.
    pub fn name(self) -> &'static str {
        match self {
            Parametrisation::Ntk => "ntk",
            Parametrisation::Standard => "standard",
            Parametrisation::SpectralNormalised => "spectral-3a",
            Parametrisation::SpectralParametrisation => "spectral-3b",
        }
    }

    /// The learning rate of the width sweep: one fixed value per parametrisation, for every
    /// width (the point of the experiment). Chosen at width 64 so that training makes
    /// progress while the relative changes stay moderate; the learning-rate sweep finds the
    /// loss-optimal rates separately.
    pub fn default_learning_rate(self) -> f32 {
        match self {
            Parametrisation::Ntk => 0.1,
            Parametrisation::Standard => 0.05,
            Parametrisation::SpectralNormalised => 0.01,
            Parametrisation::SpectralParametrisation => 0.5,
        }
    }
}

/// The hidden activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `max(0, x)`.
    Relu,
    /// `tanh(x)`.
    Tanh,
}

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Tanh => "tanh",
        }
    }

    fn apply(self, values: &mut [f32]) {
        match self {
            Activation::Relu => values.iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Tanh => values.iter_mut().for_each(|v| *v = v.tanh()),
        }
    }

    /// Multiplies `delta` by the derivative, given the activation's output `h`.
    fn backprop(self, delta: &mut [f32], h: &[f32]) {
        match self {
            Activation::Relu => delta
                .iter_mut()
                .zip(h)
                .for_each(|(d, &h)| *d *= f32::from(u8::from(h > 0.0))),
            Activation::Tanh => delta
                .iter_mut()
                .zip(h)
                .for_each(|(d, &h)| *d *= 1.0 - h * h),
        }
    }
}

/// `c = a · b` for row-major `a` (`m x k`) and `b` (`k x n`) given with row and column strides,
/// so that transposes need no copy.
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: (&[f32], isize, isize),
    b: (&[f32], isize, isize),
    c: &mut [f32],
) {
    let fits = |rows: usize, cols: usize, (data, rs, cs): (&[f32], isize, isize)| {
        rows > 0 && cols > 0 && data.len() > (rows - 1) * rs as usize + (cols - 1) * cs as usize
    };
    assert!(
        fits(m, k, a) && fits(k, n, b) && c.len() == m * n,
        "gemm operands do not match"
    );
    // SAFETY: the assert keeps every element sgemm reads inside `a` and `b`, and `c` is
    // exactly `m x n` with row stride `n`; the three slices are distinct borrows.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.0.as_ptr(),
            a.1,
            a.2,
            b.0.as_ptr(),
            b.1,
            b.2,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// `x · W^T`: a layer applied to a batch `x` (`rows x fan_in`).
fn layer_forward(x: &[f32], rows: usize, w: &[f32], shape: MatrixShape) -> Vec<f32> {
    let mut out = vec![0.0; rows * shape.fan_out];
    let fan_in = shape.fan_in as isize;
    gemm(
        rows,
        shape.fan_in,
        shape.fan_out,
        (x, fan_in, 1),
        (w, 1, fan_in),
        &mut out,
    );
    out
}

/// `delta^T · x`: a layer's gradient from its output error and its input.
fn layer_gradient(delta: &[f32], x: &[f32], rows: usize, shape: MatrixShape) -> Vec<f32> {
    let mut grad = vec![0.0; shape.len()];
    let (fan_out, fan_in) = (shape.fan_out as isize, shape.fan_in as isize);
    gemm(
        shape.fan_out,
        rows,
        shape.fan_in,
        (delta, 1, fan_out),
        (x, fan_in, 1),
        &mut grad,
    );
    grad
}

/// `delta · W`: the error at a layer's input.
fn layer_backward(delta: &[f32], rows: usize, w: &[f32], shape: MatrixShape) -> Vec<f32> {
    let mut out = vec![0.0; rows * shape.fan_in];
    let (fan_out, fan_in) = (shape.fan_out as isize, shape.fan_in as isize);
    gemm(
        rows,
        shape.fan_out,
        shape.fan_in,
        (delta, fan_out, 1),
        (w, fan_in, 1),
        &mut out,
    );
    out
}

pub fn norm(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|&v| f64::from(v).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn difference(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

pub fn gaussian(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

/// The synthetic task: inputs `x ~ N(0, I)`, targets `tanh(A x / sqrt(d))` from a fixed
/// Gaussian teacher `A` (`OUTPUTS x INPUTS`).
pub struct Teacher {
    weights: Vec<f32>,
}

impl Teacher {
    pub fn new(seed: u64) -> Self {
        Self {
            weights: gaussian(OUTPUTS * INPUTS, &mut ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    pub fn targets(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut t = layer_forward(x, rows, &self.weights, MatrixShape::new(OUTPUTS, INPUTS));
        t.iter_mut()
            .for_each(|v| *v = (*v / (INPUTS as f32).sqrt()).tanh());
        t
    }
}

/// A 3-layer MLP `INPUTS -> width -> width -> OUTPUTS`; `h2` is the second hidden layer.
pub struct Mlp {
    pub shapes: [MatrixShape; 3],
    pub weights: Vec<Vec<f32>>,
    pub activation: Activation,
}

/// Activations of one forward pass.
pub struct Pass {
    pub h1: Vec<f32>,
    pub h2: Vec<f32>,
    pub out: Vec<f32>,
}

impl Mlp {
    pub fn new(
        width: usize,
        parametrisation: Parametrisation,
        activation: Activation,
        seed: u64,
    ) -> spectral_step::Result<Self> {
        let shapes = [
            MatrixShape::new(width, INPUTS),
            MatrixShape::new(width, width),
            MatrixShape::new(OUTPUTS, width),
        ];
        let mut weights = Vec::with_capacity(3);
        for (layer, &shape) in shapes.iter().enumerate() {
            let mut rng =
                ChaCha8Rng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(layer as u64));
            let fan_in = shape.fan_in as f32;
            let w = match parametrisation {
                Parametrisation::Ntk => gaussian(shape.len(), &mut rng)
                    .into_iter()
                    .map(|v| v / fan_in.sqrt())
                    .collect(),
                Parametrisation::Standard => {
                    let bound = 1.0 / fan_in.sqrt();
                    let uniform = Uniform::new(-bound, bound).expect("a non-empty range");
                    (0..shape.len()).map(|_| uniform.sample(&mut rng)).collect()
                }
                Parametrisation::SpectralNormalised => {
                    let mut w = vec![0.0; shape.len()];
                    spectral_init(
                        &mut w,
                        shape,
                        1.0,
                        Scale::Spectral,
                        seed.wrapping_mul(31).wrapping_add(layer as u64),
                    )?;
                    w
                }
                Parametrisation::SpectralParametrisation => {
                    let std = init_std(shape, 1.0);
                    gaussian(shape.len(), &mut rng)
                        .into_iter()
                        .map(|v| v * std)
                        .collect()
                }
            };
            weights.push(w);
        }
        Ok(Self {
            shapes,
            weights,
            activation,
        })
    }

    pub fn forward(&self, x: &[f32], rows: usize) -> Pass {
        let mut h1 = layer_forward(x, rows, &self.weights[0], self.shapes[0]);
        self.activation.apply(&mut h1);
        let mut h2 = layer_forward(&h1, rows, &self.weights[1], self.shapes[1]);
        self.activation.apply(&mut h2);
        let out = layer_forward(&h2, rows, &self.weights[2], self.shapes[2]);
        Pass { h1, h2, out }
    }

    /// Mean squared error / 2 over the batch, the gradients of the three layers, and the pass.
    pub fn loss_and_gradients(
        &self,
        x: &[f32],
        target: &[f32],
        rows: usize,
    ) -> (f64, Vec<Vec<f32>>, Pass) {
        let pass = self.forward(x, rows);
        let delta_out: Vec<f32> = pass
            .out
            .iter()
            .zip(target)
            .map(|(y, t)| (y - t) / rows as f32)
            .collect();
        let loss = pass
            .out
            .iter()
            .zip(target)
            .map(|(y, t)| f64::from(y - t).powi(2))
            .sum::<f64>()
            / (2 * rows) as f64;
        let mut delta2 = layer_backward(&delta_out, rows, &self.weights[2], self.shapes[2]);
        self.activation.backprop(&mut delta2, &pass.h2);
        let mut delta1 = layer_backward(&delta2, rows, &self.weights[1], self.shapes[1]);
        self.activation.backprop(&mut delta1, &pass.h1);
        let grads = vec![
            layer_gradient(&delta1, x, rows, self.shapes[0]),
            layer_gradient(&delta2, &pass.h1, rows, self.shapes[1]),
            layer_gradient(&delta_out, &pass.h2, rows, self.shapes[2]),
        ];
        (loss, grads, pass)
    }
}

/// Updates the weights from gradients, per parametrisation. `planted_bug` multiplies every
/// update by an extra `1/sqrt(fan_in)`: a deliberately wrong scaling, which the tests use to
/// check that their science checks can fail.
pub struct Trainer {
    parametrisation: Parametrisation,
    learning_rate: f32,
    spectral: Option<SpectralSgd>,
    device: Option<DeviceEngine>,
    pub planted_bug: bool,
}

/// `SpectralSgd` on a CUDA device: gradients go up, the step runs there, weights come back
/// (the model's forward and backward passes stay on the CPU).
struct DeviceEngine {
    optimizer: SpectralSgd<Cuda>,
    weights: Vec<CudaSlice<f32>>,
    grads: Vec<CudaSlice<f32>>,
}

impl DeviceEngine {
    fn new(
        shapes: &[MatrixShape],
        config: SpectralSgdConfig,
        weights: &[Vec<f32>],
    ) -> spectral_step::Result<Self> {
        let optimizer = SpectralSgd::<Cuda>::on_device(shapes, config, CudaDevice::open(0)?)?;
        let stream = optimizer.device().stream().clone();
        let upload = |values: &[Vec<f32>]| -> spectral_step::Result<Vec<CudaSlice<f32>>> {
            values
                .iter()
                .map(|v| {
                    stream
                        .clone_htod(v)
                        .map_err(|e| spectral_step::Error::Cuda {
                            context: "uploading",
                            message: e.to_string(),
                        })
                })
                .collect()
        };
        let (weights, grads) = (upload(weights)?, upload(weights)?);
        Ok(Self {
            optimizer,
            weights,
            grads,
        })
    }

    fn step(&mut self, weights: &mut [Vec<f32>], grads: &[Vec<f32>]) -> spectral_step::Result<()> {
        let stream = self.optimizer.device().stream().clone();
        let error =
            |e: spectral_step::cuda::cudarc::driver::DriverError| spectral_step::Error::Cuda {
                context: "copying",
                message: e.to_string(),
            };
        for (device, host) in self.grads.iter_mut().zip(grads) {
            stream.memcpy_htod(host, device).map_err(error)?;
        }
        self.optimizer.step(&mut self.weights, &self.grads)?;
        for (device, host) in self.weights.iter().zip(weights.iter_mut()) {
            stream.memcpy_dtoh(device, host).map_err(error)?;
        }
        Ok(())
    }
}

/// Which device the spectral (3a) runs step on: `Ok(None)` for the CPU, `Ok(Some(name))` for
/// a CUDA device. `auto` takes CUDA when it works; `cuda` insists on it.
pub fn use_cuda(device: &str) -> Result<Option<String>, String> {
    if device == "cpu" {
        return Ok(None);
    }
    match spectral_step::cuda::choose_backend() {
        spectral_step::cuda::BackendChoice::Cuda(info) => Ok(Some(info.to_string())),
        spectral_step::cuda::BackendChoice::Cpu { reason } if device == "cuda" => {
            Err(format!("--device cuda: {reason}"))
        }
        spectral_step::cuda::BackendChoice::Cpu { .. } => Ok(None),
    }
}

impl Trainer {
    pub fn new(
        parametrisation: Parametrisation,
        learning_rate: f32,
        model: &Mlp,
        cuda: bool,
    ) -> spectral_step::Result<Self> {
        let config = SpectralSgdConfig {
            learning_rate,
            momentum: 0.9,
            ..SpectralSgdConfig::default()
        };
        let normalised = parametrisation == Parametrisation::SpectralNormalised;
        let (spectral, device) = match (normalised, cuda) {
            (true, true) => (
                None,
                Some(DeviceEngine::new(&model.shapes, config, &model.weights)?),
            ),
            (true, false) => (Some(SpectralSgd::new(&model.shapes, config)?), None),
            _ => (None, None),
        };
        Ok(Self {
            parametrisation,
            learning_rate,
            spectral,
            device,
            planted_bug: false,
        })
    }

    pub fn step(&mut self, model: &mut Mlp, grads: &[Vec<f32>]) -> spectral_step::Result<()> {
        if let Some(engine) = &mut self.device {
            return engine.step(&mut model.weights, grads);
        }
        let bug = |shape: MatrixShape| {
            if self.planted_bug {
                1.0 / (shape.fan_in as f32).sqrt()
            } else {
                1.0
            }
        };
        if let Some(optimizer) = &mut self.spectral {
            let before = self.planted_bug.then(|| model.weights.clone());
            optimizer.step(&mut model.weights, grads)?;
            if let Some(before) = before {
                for ((w, b), &shape) in model.weights.iter_mut().zip(&before).zip(&model.shapes) {
                    let factor = bug(shape);
                    w.iter_mut()
                        .zip(b)
                        .for_each(|(w, b)| *w = b + factor * (*w - b));
                }
            }
            return Ok(());
        }
        for (layer, grad) in grads.iter().enumerate() {
            let shape = model.shapes[layer];
            let rate = bug(shape)
                * match self.parametrisation {
                    Parametrisation::Ntk => {
                        self.learning_rate * BASE_WIDTH as f32 / shape.fan_in as f32
                    }
                    Parametrisation::Standard => self.learning_rate,
                    Parametrisation::SpectralParametrisation => {
                        self.learning_rate * sgd_learning_rate_multiplier(shape)
                    }
                    Parametrisation::SpectralNormalised => unreachable!("handled above"),
                };
            model.weights[layer]
                .iter_mut()
                .zip(grad)
                .for_each(|(w, g)| *w -= rate * g);
        }
        Ok(())
    }
}

/// What one training run measured.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub parametrisation: Parametrisation,
    pub width: usize,
    pub seed: u64,
    pub learning_rate: f32,
    /// `||h2 - h2_0|| / ||h2_0||` on a fixed probe batch.
    pub feature_change: f64,
    /// `||W2 - W2_0||_* / ||W2_0||_*`.
    pub weight_change: f64,
    /// Mean training loss over the last 10 steps (NaN if training diverged).
    pub final_loss: f64,
    /// `||ΔW2||_* / s` of the last step (SPEC 6; `s = 1` for the square hidden layer).
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

/// Least-squares slope of `log2(y)` against `log2(x)`.
pub fn log_log_slope(points: &[(f64, f64)]) -> f64 {
    let logs: Vec<(f64, f64)> = points.iter().map(|&(x, y)| (x.log2(), y.log2())).collect();
    let n = logs.len() as f64;
    let (mx, my) = (
        logs.iter().map(|p| p.0).sum::<f64>() / n,
        logs.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxy: f64 = logs.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = logs.iter().map(|p| (p.0 - mx).powi(2)).sum();
    sxy / sxx
}

/// A slope per seed, and their mean and standard deviation.
#[derive(Clone, Debug)]
pub struct Slope {
    pub parametrisation: Parametrisation,
    pub quantity: &'static str,
    pub per_seed: Vec<f64>,
    pub mean: f64,
    pub std: f64,
}

/// Slopes of feature and weight change against width, per parametrisation, over seeds.
pub fn slopes(results: &[RunResult]) -> Vec<Slope> {
    let mut out = Vec::new();
    for parametrisation in Parametrisation::ALL {
        for quantity in ["feature_change", "weight_change"] {
            let mut seeds: Vec<u64> = results
                .iter()
                .filter(|r| r.parametrisation == parametrisation)
                .map(|r| r.seed)
                .collect();
            seeds.sort_unstable();
            seeds.dedup();
            let per_seed: Vec<f64> = seeds
                .iter()
                .map(|&seed| {
                    let points: Vec<(f64, f64)> = results
                        .iter()
                        .filter(|r| r.parametrisation == parametrisation && r.seed == seed)
                        .map(|r| {
                            (
                                r.width as f64,
                                if quantity == "feature_change" {
                                    r.feature_change
                                } else {
                                    r.weight_change
                                },
                            )
                        })
                        .collect();
                    log_log_slope(&points)
                })
                .collect();
            if per_seed.is_empty() {
                continue;
            }
            let n = per_seed.len() as f64;
            let mean = per_seed.iter().sum::<f64>() / n;
            let std = (per_seed.iter().map(|s| (s - mean).powi(2)).sum::<f64>()
                / (n - 1.0).max(1.0))
            .sqrt();
            out.push(Slope {
                parametrisation,
                quantity,
                per_seed,
                mean,
                std,
            });
        }
    }
    out
}

/// Settings of one run of the whole experiment.
#[derive(Clone, Debug)]
pub struct Settings {
    pub widths: Vec<usize>,
    pub seeds: u64,
    pub steps: usize,
    /// Widths of the learning-rate sweep, and its rates as powers of two per parametrisation.
    pub sweep_widths: Vec<usize>,
    pub sweep_exponents: Vec<i32>,
    pub sweep_steps: usize,
    /// Width and batch sizes of the low-rank experiment.
    pub low_rank_width: usize,
    pub batch_sizes: Vec<usize>,
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
        }
    }
}

/// The width sweep: every parametrisation at every width and seed, in parallel.
pub fn width_sweep(
    settings: &Settings,
    planted_bug: bool,
    cuda: bool,
    progress: &(dyn Fn() + Sync),
) -> spectral_step::Result<Vec<RunResult>> {
    let jobs: Vec<(Parametrisation, usize, u64)> = Parametrisation::ALL
        .iter()
        .flat_map(|&p| {
            settings
                .widths
                .iter()
                .flat_map(move |&w| (0..settings.seeds).map(move |s| (p, w, s)))
        })
        .collect();
    jobs.into_par_iter()
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

/// The learning-rate sweep for standard and spectral (3a) scaling.
pub fn learning_rate_sweep(
    settings: &Settings,
    cuda: bool,
    progress: &(dyn Fn() + Sync),
) -> spectral_step::Result<Vec<RunResult>> {
    let jobs: Vec<(Parametrisation, usize, i32)> = [
        Parametrisation::Standard,
        Parametrisation::SpectralNormalised,
    ]
    .iter()
    .flat_map(|&p| {
        settings
            .sweep_widths
            .iter()
            .flat_map(move |&w| settings.sweep_exponents.iter().map(move |&e| (p, w, e)))
    })
    .collect();
    jobs.into_par_iter()
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

/// One point of the low-rank experiment (SPEC 7.2).
#[derive(Clone, Debug)]
pub struct LowRankResult {
    pub activation: Activation,
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

/// The checks the test suite runs on the quick mode (issue 5): spectral slopes flat, NTK
/// slope clearly negative, low-rank updates, and SpectralSgd's updates at their target size.
/// Returns every failed check.
pub fn check_science(sweep: &[RunResult], low: &[LowRankResult]) -> Result<(), Vec<String>> {
    let mut failures = Vec::new();
    for slope in slopes(sweep) {
        let (low_bound, high_bound) = match slope.parametrisation {
            Parametrisation::SpectralNormalised | Parametrisation::SpectralParametrisation => {
                (-0.15, 0.15)
            }
            Parametrisation::Ntk => (f64::NEG_INFINITY, -0.3),
            Parametrisation::Standard => continue,
        };
        if !(low_bound..=high_bound).contains(&slope.mean) {
            failures.push(format!(
                "{} {} slope {:+.3} (seeds {:?}) outside [{low_bound}, {high_bound}]",
                slope.parametrisation.name(),
                slope.quantity,
                slope.mean,
                slope.per_seed
            ));
        }
    }
    for r in low.iter().filter(|r| r.batch == 1000) {
        let low_rank = r.stable_rank < 5.0;
        if !low_rank {
            failures.push(format!(
                "{} batch-1000 update has stable rank {:.2}, not below 5",
                r.activation.name(),
                r.stable_rank
            ));
        }
    }
    for r in sweep
        .iter()
        .filter(|r| r.parametrisation == Parametrisation::SpectralNormalised)
    {
        let relative = r.last_update_ratio / f64::from(r.learning_rate);
        let on_target = (relative - 1.0).abs() <= 0.1;
        if !on_target {
            failures.push(format!(
                "width {} seed {}: |dW2|_* / s = {:.4}, not within 10% of eta = {}",
                r.width, r.seed, r.last_update_ratio, r.learning_rate
            ));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures)
    }
}
