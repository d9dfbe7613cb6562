//! The candle adapter's optimizer step on the GPT-2-small matrix set (48 matrices, 85M
//! parameters, `f32`, CPU): against the slice API on the same matrices (the adapter's
//! overhead: checks, locks and the nest of in-place calls; target at most 5%; the slice API
//! runs on buffers allocated before and after the candle tensors, since placement alone
//! moves a step's time by more than that), against candle-nn's `AdamW`
//! on the same parameters (what a candle user runs today), and the adapter's own AdamW group
//! (every parameter routed to AdamW) against candle-nn's, beside a copy of the parameters'
//! bytes.
//!
//! Run: `cargo bench --bench candle_step` (add `-- --rounds 15` for more rounds).
//!
//! Variants run in interleaved rounds, each round starting at the next variant, and each
//! ratio is the median of per-round ratios, so that a slow patch on a shared machine hits
//! both sides alike and no variant always runs after the same one; absolute times are
//! context.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use spectral_step::candle::{OptimizerConfig, Route, Routing, SpectralOptimizer};
use spectral_step::{MatrixShape, SpectralSgd, SpectralSgdConfig};

use common::{cpu_model, gpt2_small, hashed, median, per_round_ratios, rounds_arg};

/// Matrices of these shapes as candle variables (named `h.{j}.weight`), each a fresh copy
/// of the hashed values.
fn variables(shapes: &[MatrixShape], values: &[Vec<f32>]) -> Vec<(String, Var)> {
    shapes
        .iter()
        .zip(values)
        .enumerate()
        .map(|(index, (shape, values))| {
            let tensor = Tensor::from_slice(values, (shape.fan_out, shape.fan_in), &Device::Cpu)
                .expect("a tensor");
            (
                format!("h.{index:02}.weight"),
                Var::from_tensor(&tensor).expect("a var"),
            )
        })
        .collect()
}

fn gradients(vars: &[(String, Var)], grads: &[Tensor]) -> GradStore {
    let mut store = GradStore::default();
    for ((_, var), grad) in vars.iter().zip(grads) {
        store.insert(var.as_tensor(), grad.clone());
    }
    store
}

struct Variant<'a> {
    name: &'static str,
    run: Box<dyn FnMut() + 'a>,
    times: Vec<Duration>,
}

fn main() {
    let rounds = rounds_arg(10);
    println!(
        "candle adapter step, f32, CPU: {} ({} threads)",
        cpu_model(),
        rayon::current_num_threads()
    );
    let shapes = gpt2_small();
    measure("GPT-2-small matrix set", &shapes, rounds);
    // The same 48 matrices at 1/8 of each side: cache-sized steps, so that the adapter's
    // fixed cost per step (checks, locks, the nest) is not lost in memory traffic.
    let shrunk: Vec<MatrixShape> = shapes
        .iter()
        .map(|s| MatrixShape::new(s.fan_out / 8, s.fan_in / 8))
        .collect();
    measure("the same set at 1/8 of each side", &shrunk, 20 * rounds);
}

fn measure(title: &str, shapes: &[MatrixShape], rounds: usize) {
    let parameters: usize = shapes.iter().map(|s| s.len()).sum();
    println!(
        "\n{title}: {} matrices, {:.2}M parameters",
        shapes.len(),
        parameters as f64 / 1e6
    );
    let shapes = shapes.to_vec();
    let weights: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, s)| hashed::<f32>(s.len(), 1000 + j as u64))
        .collect();
    let grad_values: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, s)| hashed::<f32>(s.len(), 2000 + j as u64))
        .collect();
    let grads: Vec<Tensor> = shapes
        .iter()
        .zip(&grad_values)
        .map(|(shape, values)| {
            Tensor::from_slice(values, (shape.fan_out, shape.fan_in), &Device::Cpu)
                .expect("a tensor")
        })
        .collect();

    let config = SpectralSgdConfig::default();
    // The slice API twice: on buffers allocated before the candle tensors and after them.
    // Where buffers lie in memory moves a step's time by more than the adapter costs, so
    // the two bracket the comparison.
    let mut early_weights = weights.clone();
    let early_grads = grad_values.clone();
    let mut early = SpectralSgd::new(&shapes, config).expect("an optimizer");

    let adapter_vars = variables(&shapes, &weights);
    let adapter_grads = gradients(&adapter_vars, &grads);
    let mut adapter = SpectralOptimizer::from_named(
        adapter_vars.clone(),
        OptimizerConfig {
            spectral: config,
            ..OptimizerConfig::default()
        },
    )
    .expect("an adapter");

    let adamw_vars = variables(&shapes, &weights);
    let adamw_grads = gradients(&adamw_vars, &grads);
    let mut candle_adamw = candle_nn::AdamW::new(
        adamw_vars.iter().map(|(_, v)| v.clone()).collect(),
        candle_nn::ParamsAdamW::default(),
    )
    .expect("candle-nn's AdamW");

    let group_vars = variables(&shapes, &weights);
    let group_grads = gradients(&group_vars, &grads);
    let mut adapter_adamw = SpectralOptimizer::from_named(
        group_vars.clone(),
        OptimizerConfig {
            routing: Routing::muon().rank(2, Route::AdamW),
            ..OptimizerConfig::default()
        },
    )
    .expect("an all-AdamW adapter");

    let mut late_weights = weights.clone();
    let late_grads = grad_values.clone();
    let mut late = SpectralSgd::new(&shapes, config).expect("an optimizer");
    let source: Vec<f32> = weights.concat();
    let mut copy_target = vec![0f32; source.len()];

    let mut variants = [
        Variant {
            name: "copy of the parameters' bytes",
            run: Box::new(|| {
                copy_target.copy_from_slice(black_box(&source));
                black_box(&copy_target);
            }),
            times: Vec::new(),
        },
        Variant {
            name: "slice API, buffers allocated first",
            run: Box::new(|| {
                early
                    .step::<f32, f32, _, _>(&mut early_weights, &early_grads)
                    .expect("a slice step");
            }),
            times: Vec::new(),
        },
        Variant {
            name: "slice API, buffers allocated last",
            run: Box::new(|| {
                late.step::<f32, f32, _, _>(&mut late_weights, &late_grads)
                    .expect("a slice step");
            }),
            times: Vec::new(),
        },
        Variant {
            name: "candle adapter (spectral)",
            run: Box::new(|| adapter.step(&adapter_grads).expect("an adapter step")),
            times: Vec::new(),
        },
        Variant {
            name: "candle-nn AdamW",
            run: Box::new(|| candle_adamw.step(&adamw_grads).expect("an AdamW step")),
            times: Vec::new(),
        },
        Variant {
            name: "candle adapter (all AdamW)",
            run: Box::new(|| {
                adapter_adamw
                    .step(&group_grads)
                    .expect("an AdamW-group step")
            }),
            times: Vec::new(),
        },
    ];
    // Warm-up: the spectral steps' cold start, page faults, the thread pool.
    for variant in variants.iter_mut() {
        (variant.run)();
    }
    // Each round in its own order, so that no variant always follows the same one (what ran
    // before, such as the copy's sweep over memory, changes what the caches and the page
    // tables hold).
    for round in 0..rounds {
        for index in common::round_order(round, variants.len()) {
            let variant = &mut variants[index];
            let start = Instant::now();
            (variant.run)();
            variant.times.push(start.elapsed());
        }
    }
    println!("{rounds} interleaved rounds (each in its own shuffled order), warm steps, medians:");
    for variant in &variants {
        let mut seconds: Vec<f64> = variant.times.iter().map(Duration::as_secs_f64).collect();
        println!(
            "  {:<34} {:>8.1} ms",
            variant.name,
            median(&mut seconds) * 1e3
        );
    }
    println!("median of per-round ratios [range]:");
    for (what, numerator, denominator) in [
        ("adapter / slice API, allocated first", 3, 1),
        ("adapter / slice API, allocated last", 3, 2),
        ("candle-nn AdamW / adapter (spectral)", 4, 3),
        ("candle-nn AdamW / adapter (all AdamW)", 4, 5),
        ("adapter (spectral) / copy", 3, 0),
    ] {
        let ratios = per_round_ratios(&variants[numerator].times, &variants[denominator].times);
        println!(
            "  {what:<40} {:.3}  [{:.3} .. {:.3}]",
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1]
        );
    }
}
