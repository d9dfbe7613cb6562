//! The orthogonalised rule's CPU step (math §5b) on one GPT-2-small layer (4 matrices, 7.1M
//! parameters), warm, in interleaved rounds beside
//!
//! * the same GEMMs alone (per matrix and iteration `X Xᵀ`, `A²` and `B X` through
//!   `matrixmultiply`, matrices in parallel as the step runs them): the step's cost over
//!   its products, i.e. what the momentum, normalisation and update passes add;
//! * the power-normalised step on the same matrices: what orthogonalising costs over §5.
//!
//! Prints the step's GFLOP/s by the flop model `K (4 m² n + 2 m³)` (`m <= n`) and the
//! per-round ratios (median and range). Run: `cargo bench --bench orthogonal_step -- [--rounds N]`.

mod common;

use std::time::{Duration, Instant};

use common::{cpu_model, gpt2_small_layer, hashed_batch, per_round_ratios, rounds_arg};
use rayon::prelude::*;
use spectral_step::{MatrixShape, Schedule, SpectralSgd, SpectralSgdConfig, UpdateRule};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const ITERATIONS: u32 = 5;

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let rounds = rounds_arg(5);
    let shapes = gpt2_small_layer();
    let weights = hashed_batch::<f32>(&shapes, 1);
    let grads = hashed_batch::<f32>(&shapes, 1000);
    let orthogonal_config = SpectralSgdConfig {
        update: UpdateRule::Orthogonalised(Schedule::Muon {
            iterations: ITERATIONS,
        }),
        ..SpectralSgdConfig::default()
    };
    let mut orthogonal = SpectralSgd::new(&shapes, orthogonal_config)?;
    let mut power = SpectralSgd::new(&shapes, SpectralSgdConfig::default())?;
    let (mut orthogonal_weights, mut power_weights) = (weights.clone(), weights.clone());
    // Warm: the power rule's cold start is not what is measured.
    orthogonal.step(&mut orthogonal_weights, &grads)?;
    power.step(&mut power_weights, &grads)?;
    let mut products = Products::new(&shapes);
    products.run();

    let (mut step_times, mut product_times, mut power_times) = (vec![], vec![], vec![]);
    for round in 0..rounds {
        // Each round in its own order, so that no side always meets a cold cache or always
        // follows the same other side.
        for turn in common::round_order(round, 3) {
            match turn {
                0 => step_times.push(time(|| {
                    orthogonal.step(&mut orthogonal_weights, &grads).map(drop)
                })?),
                1 => product_times.push(time(|| {
                    products.run();
                    Ok(())
                })?),
                _ => power_times.push(time(|| power.step(&mut power_weights, &grads).map(drop))?),
            }
        }
    }
    let flops: f64 = shapes.iter().map(|&shape| flop_model(shape)).sum();
    let mut seconds: Vec<f64> = step_times.iter().map(Duration::as_secs_f64).collect();
    seconds.sort_by(f64::total_cmp);
    let median = seconds[seconds.len() / 2];
    println!(
        "{}; one GPT-2-small layer ({} matrices, {:.1}M parameters), Muon x{ITERATIONS}, f32, \
         {rounds} rounds, {} threads",
        cpu_model(),
        shapes.len(),
        shapes.iter().map(|s| s.len()).sum::<usize>() as f64 / 1e6,
        rayon::current_num_threads()
    );
    println!(
        "orthogonalised step: {:.3} s median, {:.1} GFLOP/s by the flop model ({:.1} GFLOP)",
        median,
        flops / median / 1e9,
        flops / 1e9
    );
    let report = |what: &str, ratios: Vec<f64>| {
        println!(
            "{what}: {:.3} (median; {:.3} to {:.3})",
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1]
        );
    };
    report(
        "orthogonalised step / its GEMMs alone",
        per_round_ratios(&step_times, &product_times),
    );
    report(
        "orthogonalised step / power-normalised step",
        per_round_ratios(&step_times, &power_times),
    );
    Ok(())
}

fn time(work: impl FnOnce() -> spectral_step::Result<()>) -> Result<Duration> {
    let start = Instant::now();
    work()?;
    Ok(start.elapsed())
}

/// `K (4 m² n + 2 m³)` for `m = min(fan_out, fan_in)`, `n` the other side (math §5b).
fn flop_model(shape: MatrixShape) -> f64 {
    let (m, n) = (
        shape.fan_out.min(shape.fan_in) as f64,
        shape.fan_out.max(shape.fan_in) as f64,
    );
    f64::from(ITERATIONS) * (4.0 * m * m * n + 2.0 * m * m * m)
}

/// The step's GEMMs with the step's operand layouts (X short x long, A short x short, `Xᵀ`
/// read through swapped strides, accumulating outputs as the step's do), on buffers of their
/// own.
struct Products {
    matrices: Vec<Operands>,
}

/// One matrix's buffers: `x` and `next` short x long, `gram` and `polynomial` short x short.
struct Operands {
    short: usize,
    long: usize,
    x: Vec<f32>,
    gram: Vec<f32>,
    polynomial: Vec<f32>,
    next: Vec<f32>,
}

impl Products {
    fn new(shapes: &[MatrixShape]) -> Self {
        let matrices = shapes
            .iter()
            .map(|shape| {
                let short = shape.fan_out.min(shape.fan_in);
                let long = shape.fan_out.max(shape.fan_in);
                let x: Vec<f32> = (0..short * long)
                    .map(|i| ((i % 97) as f32 - 48.0) * 1e-4)
                    .collect();
                Operands {
                    short,
                    long,
                    x,
                    gram: vec![0.0; short * short],
                    polynomial: vec![0.0; short * short],
                    next: vec![0.0; short * long],
                }
            })
            .collect();
        Self { matrices }
    }

    fn run(&mut self) {
        self.matrices.par_iter_mut().for_each(|operands| {
            let Operands {
                short,
                long,
                x,
                gram,
                polynomial,
                next,
            } = operands;
            let (m, n) = (*short, *long);
            for _ in 0..ITERATIONS {
                // SAFETY: every operand is a live buffer of exactly the dimensions and
                // strides passed (x: m x n, gram and polynomial: m x m, next: m x n), and
                // the outputs are distinct buffers from the inputs.
                unsafe {
                    let xp = x.as_ptr();
                    let gp = gram.as_mut_ptr();
                    matrixmultiply::sgemm(
                        m, n, m, 1.0, xp, n as isize, 1, xp, 1, n as isize, 0.0, gp, m as isize, 1,
                    );
                    matrixmultiply::sgemm(
                        m,
                        m,
                        m,
                        1.0,
                        gram.as_ptr(),
                        m as isize,
                        1,
                        gram.as_ptr(),
                        m as isize,
                        1,
                        0.5,
                        polynomial.as_mut_ptr(),
                        m as isize,
                        1,
                    );
                    matrixmultiply::sgemm(
                        m,
                        m,
                        n,
                        1.0,
                        polynomial.as_ptr(),
                        m as isize,
                        1,
                        xp,
                        n as isize,
                        1,
                        0.5,
                        next.as_mut_ptr(),
                        n as isize,
                        1,
                    );
                }
            }
        });
    }
}
