//! Feature learning at every width, on the CPU: a first, small version of the paper's width
//! sweep (SPEC 7.1).
//!
//! A 3-layer ReLU MLP (`16 -> width -> width -> 4`) learns a fixed random teacher at several
//! widths with the *same* hyper-parameters. Every layer is initialised with
//! [`spectral_init`](spectral_step::scaling::spectral_init) and trained with
//! [`SpectralSgd`]. Per width it prints the loss, the hidden layer's relative feature change
//! `||h2 - h2_0|| / ||h2_0||`, the relative weight change `||W2 - W2_0||_* / ||W2_0||_*`, and
//! SPEC 6's ratios `||W2||_* / s` and `||ΔW2||_* / s` for the last step. Under the spectral
//! condition all of them stay of order one as the width grows.
//!
//! ```text
//! cargo run --release --example feature_learning -- [--widths 64,256,1024] [--steps 200]
//! ```

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use spectral_step::diagnostics::{self, LayerDiagnostics};
use spectral_step::scaling::spectral_init;
use spectral_step::{MatrixShape, Scale, SpectralSgd, SpectralSgdConfig};

const INPUTS: usize = 16;
const OUTPUTS: usize = 4;
const BATCH: usize = 64;

/// `c = a · b` for row-major `a` (`m x k`) and `b` (`k x n`), each given with its row and
/// column strides, so that transposes need no copy.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: (&[f32], isize, isize),
    b: (&[f32], isize, isize),
    c: &mut [f32],
) {
    let extent = |rows: usize, cols: usize, (data, rs, cs): (&[f32], isize, isize)| {
        assert!(
            data.len() > (rows - 1) * rs as usize + (cols - 1) * cs as usize,
            "operand too short"
        );
    };
    extent(m, k, a);
    extent(k, n, b);
    assert_eq!(c.len(), m * n);
    // SAFETY: the asserts above keep every element sgemm reads inside `a` and `b`, and `c` is
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

/// `x · W^T` for a batch `x` (`rows x fan_in`) and a layer `W` (`fan_out x fan_in`).
fn forward(x: &[f32], rows: usize, w: &[f32], shape: MatrixShape) -> Vec<f32> {
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

/// `dW = delta^T · x`: the gradient of a layer from its output error and its input.
fn weight_gradient(delta: &[f32], x: &[f32], rows: usize, shape: MatrixShape) -> Vec<f32> {
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
fn backward(delta: &[f32], rows: usize, w: &[f32], shape: MatrixShape) -> Vec<f32> {
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

fn relu(values: &mut [f32]) {
    values.iter_mut().for_each(|v| *v = v.max(0.0));
}

fn norm(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|&v| f64::from(v).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn gaussian(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

struct Mlp {
    shapes: [MatrixShape; 3],
    weights: Vec<Vec<f32>>,
}

/// Activations of one forward pass, kept for the backward pass.
struct Pass {
    h1: Vec<f32>,
    h2: Vec<f32>,
    out: Vec<f32>,
}

impl Mlp {
    fn new(width: usize, seed: u64) -> spectral_step::Result<Self> {
        let shapes = [
            MatrixShape::new(width, INPUTS),
            MatrixShape::new(width, width),
            MatrixShape::new(OUTPUTS, width),
        ];
        let mut weights = Vec::new();
        for (layer, &shape) in shapes.iter().enumerate() {
            let mut w = vec![0.0; shape.len()];
            spectral_init(
                &mut w,
                shape,
                1.0,
                Scale::Spectral,
                seed * 10 + layer as u64,
            )?;
            weights.push(w);
        }
        Ok(Self { shapes, weights })
    }

    fn forward(&self, x: &[f32], rows: usize) -> Pass {
        let mut h1 = forward(x, rows, &self.weights[0], self.shapes[0]);
        relu(&mut h1);
        let mut h2 = forward(&h1, rows, &self.weights[1], self.shapes[1]);
        relu(&mut h2);
        let out = forward(&h2, rows, &self.weights[2], self.shapes[2]);
        Pass { h1, h2, out }
    }

    /// Mean squared error / 2 and the gradients of all three layers.
    fn loss_and_gradients(&self, x: &[f32], target: &[f32]) -> (f64, Vec<Vec<f32>>) {
        let pass = self.forward(x, BATCH);
        let delta_out: Vec<f32> = pass
            .out
            .iter()
            .zip(target)
            .map(|(y, t)| (y - t) / BATCH as f32)
            .collect();
        let loss = pass
            .out
            .iter()
            .zip(target)
            .map(|(y, t)| f64::from(y - t).powi(2))
            .sum::<f64>()
            / (2 * BATCH) as f64;
        let mut delta2 = backward(&delta_out, BATCH, &self.weights[2], self.shapes[2]);
        delta2
            .iter_mut()
            .zip(&pass.h2)
            .for_each(|(d, &h)| *d *= f32::from(u8::from(h > 0.0)));
        let mut delta1 = backward(&delta2, BATCH, &self.weights[1], self.shapes[1]);
        delta1
            .iter_mut()
            .zip(&pass.h1)
            .for_each(|(d, &h)| *d *= f32::from(u8::from(h > 0.0)));
        let grads = vec![
            weight_gradient(&delta1, x, BATCH, self.shapes[0]),
            weight_gradient(&delta2, &pass.h1, BATCH, self.shapes[1]),
            weight_gradient(&delta_out, &pass.h2, BATCH, self.shapes[2]),
        ];
        (loss, grads)
    }
}

struct Teacher {
    weights: Vec<f32>,
}

impl Teacher {
    /// `t = tanh(A x)` with a fixed Gaussian `A` (`4 x 16`).
    fn targets(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut t = forward(x, rows, &self.weights, MatrixShape::new(OUTPUTS, INPUTS));
        t.iter_mut()
            .for_each(|v| *v = (*v / (INPUTS as f32).sqrt()).tanh());
        t
    }
}

fn run_width(width: usize, steps: usize, teacher: &Teacher) -> spectral_step::Result<()> {
    let mut model = Mlp::new(width, 1)?;
    let config = SpectralSgdConfig {
        learning_rate: 0.05,
        momentum: 0.9,
        ..SpectralSgdConfig::default()
    };
    let mut optimizer = SpectralSgd::new(&model.shapes, config)?;
    let mut data_rng = ChaCha8Rng::seed_from_u64(7);
    let probe = gaussian(BATCH * INPUTS, &mut ChaCha8Rng::seed_from_u64(99));
    let h2_initial = model.forward(&probe, BATCH).h2;
    let w2_initial = model.weights[1].clone();

    let (mut first_loss, mut last_loss, mut previous_w2) = (0.0, 0.0, w2_initial.clone());
    for step in 0..steps {
        let x = gaussian(BATCH * INPUTS, &mut data_rng);
        let (loss, grads) = model.loss_and_gradients(&x, &teacher.targets(&x, BATCH));
        if step == 0 {
            first_loss = loss;
        }
        last_loss = loss;
        if step + 1 == steps {
            previous_w2.clone_from(&model.weights[1]);
        }
        let report = optimizer.step(&mut model.weights, &grads)?;
        if let Some(skipped) = report.skipped().next() {
            eprintln!("width {width}, step {step}: layer {skipped} skipped (non-finite gradient)");
        }
    }
    let h2 = model.forward(&probe, BATCH).h2;
    let feature_change = norm(
        &h2.iter()
            .zip(&h2_initial)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>(),
    ) / norm(&h2_initial);
    let w2_change: Vec<f32> = model.weights[1]
        .iter()
        .zip(&w2_initial)
        .map(|(a, b)| a - b)
        .collect();
    let weight_change = f64::from(diagnostics::spectral_norm(&w2_change, model.shapes[1])?)
        / f64::from(diagnostics::spectral_norm(&w2_initial, model.shapes[1])?);
    let last_step = LayerDiagnostics::measure(
        &previous_w2,
        &model.weights[1],
        model.shapes[1],
        Scale::Spectral,
    )?;
    println!(
        "{width:>6} {first_loss:>10.4} {last_loss:>10.4} {feature_change:>12.3} {weight_change:>12.3} {:>10.3} {:>11.4} {:>9.2}",
        last_step.weight_ratio, last_step.update_ratio, last_step.update_stable_rank
    );
    Ok(())
}

fn parse_args() -> Result<(Vec<usize>, usize), String> {
    let (mut widths, mut steps) = (vec![64, 256, 1024], 200);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--widths" => {
                widths = value
                    .split(',')
                    .map(|w| w.trim().parse().ok().filter(|&w| w > 0))
                    .collect::<Option<_>>()
                    .ok_or(format!(
                        "--widths takes positive integers separated by commas, got {value:?}"
                    ))?
            }
            "--steps" => {
                steps = value
                    .parse()
                    .ok()
                    .filter(|&s| s > 0)
                    .ok_or(format!("--steps takes a positive integer, got {value:?}"))?
            }
            _ => {
                return Err(format!(
                    "unknown flag {flag}; flags: --widths 64,256,1024 --steps 200"
                ));
            }
        }
    }
    Ok((widths, steps))
}

fn main() {
    let (widths, steps) = parse_args().unwrap_or_else(|message| {
        eprintln!("{message}");
        std::process::exit(2);
    });
    let teacher = Teacher {
        weights: gaussian(OUTPUTS * INPUTS, &mut ChaCha8Rng::seed_from_u64(3)),
    };
    println!(
        "3-layer ReLU MLP, spectral init + SpectralSgd (lr 0.05, momentum 0.9), {steps} steps of batch {BATCH}"
    );
    println!(
        "hidden layer W2: relative changes since init, and SPEC 6 ratios for the last step (s = 1)"
    );
    println!(
        "{:>6} {:>10} {:>10} {:>12} {:>12} {:>10} {:>11} {:>9}",
        "width", "loss@0", "loss@end", "Δh2/h2", "ΔW2/W2", "|W2|/s", "|ΔW2|/s", "srank ΔW2"
    );
    for width in widths {
        if let Err(error) = run_width(width, steps, &teacher) {
            eprintln!("width {width}: {error}");
            std::process::exit(1);
        }
    }
}
