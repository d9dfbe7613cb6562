//! GPT-2-small matrix set (12 layers x {2304x768, 768x768, 3072x768, 768x3072}, 85M
//! parameters): one warm power iteration (fused and two-matvec) and the full warm step, in
//! `f32`, `bf16` and `f16`, each beside a memory-copy baseline of the same byte count.
//!
//! For 16-bit weights the warm step runs twice per round, with stochastic rounding (the
//! default) and with round-to-nearest, and the cost of stochastic rounding is printed as the
//! median of their per-round time ratios (math §5a: it adds no memory traffic, only the
//! Philox arithmetic).
//!
//! Last, `f32` master weights with `bf16` gradients (math §5a), without and with the `bf16`
//! copy of the weights, beside the `f32` step in the same rounds.
//!
//! Run: `cargo bench --bench gpt2_small` (add `-- --rounds 15` for more rounds).
//!
//! Variants are measured in interleaved rounds (copy, fused, two-pass, step, copy, ...) and
//! each is summarised by its median, so a slow patch on a shared machine hits all variants
//! alike; the ratios are the result, the absolute times are only context.
//!
//! Bytes (`N` parameters, `b` bytes per weight or gradient element, momentum in f32; math
//! §5.5):
//! * power iteration: reads `U` once, `N b` bytes;
//! * step (heavy-ball): the least a two-pass step can move is `N (3b + 12)` bytes (pass A
//!   reads `G`, `M` and writes `M`; pass B reads `M`, `W` and writes `W`), which the GB/s and
//!   "vs copy" columns count. This crate's step stores `M` in pass B instead (math §5.2), which
//!   moves `N (4b + 12)` bytes; both figures are printed.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use spectral_step::cpu::BatchPowerIteration;
use spectral_step::half::{bf16, f16};
use spectral_step::{BatchLayout, BlockPolicy, Element, Rounding, SpectralSgd, SpectralSgdConfig};

use common::{gpt2_small, hashed};

fn copy_parallel(dst: &mut [u8], src: &[u8]) {
    dst.par_chunks_mut(1 << 20)
        .zip(src.par_chunks(1 << 20))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

struct Variant<'a> {
    name: &'static str,
    /// Bytes the GB/s column counts (for the step, the two-pass minimum).
    model_bytes: f64,
    run: Box<dyn FnMut() + 'a>,
    times: Vec<Duration>,
}

fn median(times: &[Duration]) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2].as_secs_f64()
}

/// Per round, the time of `numerator` over that of `denominator` (which ran beside it in the
/// same round, so that slow drifts of the machine's load cancel), sorted: `[len / 2]` is the
/// median, the ends the range.
fn per_round_ratios(numerator: &Variant, denominator: &Variant) -> Vec<f64> {
    common::per_round_ratios(&numerator.times, &denominator.times)
}

/// Runs the variants in interleaved rounds and prints median time, GB/s, and the ratio of
/// each variant's bandwidth to the first (baseline) variants'.
fn compare(title: &str, rounds: usize, variants: &mut [Variant], baselines: usize) {
    for variant in variants.iter_mut() {
        (variant.run)(); // warm-up: page faults, caches, thread pool
    }
    for _ in 0..rounds {
        for variant in variants.iter_mut() {
            let start = Instant::now();
            (variant.run)();
            variant.times.push(start.elapsed());
        }
    }
    println!("\n{title}  ({rounds} interleaved rounds, medians)");
    println!(
        "  {:<34} {:>10} {:>10} {:>12}",
        "variant", "ms", "GB/s", "vs copy"
    );
    let mut rows = Vec::new();
    for variant in variants.iter_mut() {
        let seconds = median(&variant.times);
        rows.push((variant.name, seconds, variant.model_bytes / seconds / 1e9));
    }
    let copy_bandwidth = rows[..baselines].iter().map(|r| r.2).fold(0.0, f64::max);
    for (name, seconds, bandwidth) in &rows {
        println!(
            "  {name:<34} {:>10.2} {bandwidth:>10.2} {:>11.1}%",
            seconds * 1e3,
            100.0 * bandwidth / copy_bandwidth
        );
    }
}

fn bench_dtype<T: Element>(rounds: usize) {
    let shapes = gpt2_small();
    let layout = BatchLayout::new(&shapes, BlockPolicy::CPU).unwrap();
    let n = layout.total_elements();
    let b = T::DTYPE.size_bytes();
    let dtype = T::DTYPE.name();
    println!(
        "\n=== {dtype}: {} matrices, {n} parameters, {} threads ===",
        shapes.len(),
        rayon::current_num_threads()
    );

    let mut weights: Vec<Vec<T>> = Vec::with_capacity(shapes.len());
    let mut grads: Vec<Vec<T>> = Vec::with_capacity(shapes.len());
    for (j, shape) in shapes.iter().enumerate() {
        let mut w: Vec<T> = hashed(shape.len(), 2 * j as u64);
        w.iter_mut()
            .for_each(|x| *x = T::from_f32_rne(x.to_f32() * 0.02));
        weights.push(w);
        grads.push(hashed(shape.len(), 2 * j as u64 + 1));
    }

    // Power iteration: one warm iteration over the whole set.
    {
        let power_bytes = (n * b) as f64;
        let mut src = vec![1u8; n * b / 2];
        let (mut dst, mut dst_parallel) = (vec![0u8; n * b / 2], vec![0u8; n * b / 2]);
        let views: Vec<&[T]> = grads.iter().map(Vec::as_slice).collect();
        let mut fused = BatchPowerIteration::new(layout.clone()).unwrap();
        let mut fused_vectors = fused.cold_vectors(0).unwrap();
        let mut two_pass = BatchPowerIteration::new(layout.clone()).unwrap();
        let mut two_pass_vectors = two_pass.cold_vectors(0).unwrap();
        src.iter_mut().enumerate().for_each(|(i, x)| *x = i as u8);
        let (src, dst, dst_parallel) = (&src, &mut dst, &mut dst_parallel);
        let mut variants = vec![
            Variant {
                name: "copy, 1 thread (baseline)",
                model_bytes: power_bytes,
                run: Box::new(|| dst.copy_from_slice(black_box(src))),
                times: Vec::new(),
            },
            Variant {
                name: "copy, rayon (baseline)",
                model_bytes: power_bytes,
                run: Box::new(|| copy_parallel(dst_parallel, black_box(src))),
                times: Vec::new(),
            },
            Variant {
                name: "power iteration, fused (math §4)",
                model_bytes: power_bytes,
                run: Box::new(|| {
                    black_box(fused.fused(&views, &mut fused_vectors).unwrap());
                }),
                times: Vec::new(),
            },
            Variant {
                name: "power iteration, two-matvec",
                model_bytes: power_bytes,
                run: Box::new(|| {
                    black_box(two_pass.two_pass(&views, &mut two_pass_vectors).unwrap());
                }),
                times: Vec::new(),
            },
        ];
        compare(
            &format!(
                "{dtype} power iteration: {:.0} MB read per iteration",
                power_bytes / 1e6
            ),
            rounds,
            &mut variants,
            2,
        );
        let fused_time = median(&variants[2].times);
        let two_pass_time = median(&variants[3].times);
        let ratios = per_round_ratios(&variants[3], &variants[2]);
        println!(
            "  fused speed-up over two-matvec: {:.2}x (ratio of medians), {:.2}x (median of per-round ratios, range {:.2}x to {:.2}x)",
            two_pass_time / fused_time,
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1]
        );
    }

    // Full warm step (heavy-ball, the defaults).
    {
        let model_bytes = (n * (3 * b + 12)) as f64;
        let actual_bytes = (n * (4 * b + 12)) as f64;
        let low_precision = T::DTYPE.is_low_precision();
        let mut optimizer = SpectralSgd::new(&shapes, SpectralSgdConfig::default()).unwrap();
        // The round-to-nearest twin, for 16-bit weights only.
        let mut nearest = low_precision.then(|| {
            let config = SpectralSgdConfig {
                rounding: Rounding::Nearest,
                ..SpectralSgdConfig::default()
            };
            let mut twin = SpectralSgd::new(&shapes, config).unwrap();
            let mut twin_weights = weights.clone();
            twin.step(&mut twin_weights, &grads).unwrap();
            (twin, twin_weights)
        });
        // The cold start is not what is measured.
        optimizer.step(&mut weights, &grads).unwrap();
        let half = (model_bytes / 2.0) as usize;
        let mut src = vec![1u8; half];
        let (mut dst, mut dst_parallel) = (vec![0u8; half], vec![0u8; half]);
        src.iter_mut().enumerate().for_each(|(i, x)| *x = i as u8);
        let (src, dst, dst_parallel) = (&src, &mut dst, &mut dst_parallel);
        let (weights, grads, optimizer) = (&mut weights, &grads, &mut optimizer);
        let mut variants = vec![
            Variant {
                name: "copy, 1 thread (baseline)",
                model_bytes,
                run: Box::new(|| dst.copy_from_slice(black_box(src))),
                times: Vec::new(),
            },
            Variant {
                name: "copy, rayon (baseline)",
                model_bytes,
                run: Box::new(|| copy_parallel(dst_parallel, black_box(src))),
                times: Vec::new(),
            },
        ];
        variants.push(Variant {
            name: if low_precision {
                "step, warm, stochastic rounding"
            } else {
                "step, warm (math §5)"
            },
            model_bytes,
            run: Box::new(|| {
                black_box(optimizer.step(weights, grads).unwrap());
            }),
            times: Vec::new(),
        });
        if let Some((twin, twin_weights)) = &mut nearest {
            variants.push(Variant {
                name: "step, warm, round to nearest",
                model_bytes,
                run: Box::new(|| {
                    black_box(twin.step(twin_weights, grads).unwrap());
                }),
                times: Vec::new(),
            });
        }
        compare(
            &format!(
                "{dtype} step: {:.0} MB at the two-pass minimum, {:.0} MB actually moved",
                model_bytes / 1e6,
                actual_bytes / 1e6
            ),
            rounds,
            &mut variants,
            2,
        );
        let step_time = median(&variants[2].times);
        println!(
            "  step bandwidth counting the bytes it actually moves: {:.2} GB/s",
            actual_bytes / step_time / 1e9
        );
        if low_precision {
            let ratios = per_round_ratios(&variants[2], &variants[3]);
            println!(
                "  stochastic rounding / round to nearest, warm step: {:.3}x (median of per-round ratios, range {:.3}x to {:.3}x)",
                ratios[ratios.len() / 2],
                ratios[0],
                ratios[ratios.len() - 1]
            );
        }
    }
}

/// `f32` master weights with `bf16` gradients, with and without the copy, and the `f32` step,
/// in the same rounds. Bytes actually moved per parameter (pass B storing `M`): 24 and 26
/// against the `f32` step's 28.
fn bench_master_weights(rounds: usize) {
    let shapes = gpt2_small();
    let n: usize = shapes.iter().map(|s| s.len()).sum();
    println!("\n=== f32 master weights, bf16 gradients: {n} parameters ===");
    let master: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, s)| {
            hashed::<f32>(s.len(), 2 * j as u64)
                .into_iter()
                .map(|x| x * 0.02)
                .collect()
        })
        .collect();
    let grads: Vec<Vec<bf16>> = shapes
        .iter()
        .enumerate()
        .map(|(j, s)| hashed(s.len(), 2 * j as u64 + 1))
        .collect();
    let wide_grads: Vec<Vec<f32>> = grads
        .iter()
        .map(|g| g.iter().map(|x| x.to_f32()).collect())
        .collect();
    let mut copies: Vec<Vec<bf16>> = shapes.iter().map(|s| vec![bf16::ZERO; s.len()]).collect();
    let new = || SpectralSgd::new(&shapes, SpectralSgdConfig::default()).unwrap();
    let (mut mixed, mut with_copy, mut plain) = (new(), new(), new());
    let (mut mixed_w, mut copy_w, mut plain_w) = (master.clone(), master.clone(), master);
    // The cold start is not what is measured.
    mixed.step(&mut mixed_w, &grads).unwrap();
    with_copy
        .step_with_copy(&mut copy_w, &grads, &mut copies)
        .unwrap();
    plain.step(&mut plain_w, &wide_grads).unwrap();
    let bytes = |per_parameter: usize| (n * per_parameter) as f64;
    let half = (bytes(26) / 2.0) as usize;
    let src: Vec<u8> = (0..half).map(|i| i as u8).collect();
    let mut dst = vec![0u8; half];
    let (src, dst) = (&src, &mut dst);
    let grads = &grads;
    let copies = &mut copies;
    let wide_grads = &wide_grads;
    let mut variants = vec![
        Variant {
            name: "copy of 26 B/param, rayon (baseline)",
            model_bytes: bytes(26),
            run: Box::new(|| copy_parallel(dst, black_box(src))),
            times: Vec::new(),
        },
        Variant {
            name: "step, f32 W, f32 G",
            model_bytes: bytes(28),
            run: Box::new(|| {
                black_box(plain.step(&mut plain_w, wide_grads).unwrap());
            }),
            times: Vec::new(),
        },
        Variant {
            name: "step, f32 W, bf16 G",
            model_bytes: bytes(24),
            run: Box::new(|| {
                black_box(mixed.step(&mut mixed_w, grads).unwrap());
            }),
            times: Vec::new(),
        },
        Variant {
            name: "step, f32 W, bf16 G, bf16 copy",
            model_bytes: bytes(26),
            run: Box::new(|| {
                black_box(
                    with_copy
                        .step_with_copy(&mut copy_w, grads, copies)
                        .unwrap(),
                );
            }),
            times: Vec::new(),
        },
    ];
    compare(
        "f32 master weights: bytes actually moved (28, 24 and 26 per parameter)",
        rounds,
        &mut variants,
        1,
    );
    let per_round = |a: usize, b: usize| {
        let ratios = per_round_ratios(&variants[a], &variants[b]);
        ratios[ratios.len() / 2]
    };
    println!(
        "  time / f32 step (median of per-round ratios): bf16 G {:.3}x, bf16 G + copy {:.3}x (bytes: {:.3}x, {:.3}x)",
        per_round(2, 1),
        per_round(3, 1),
        24.0 / 28.0,
        26.0 / 28.0
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut rounds = 9;
    while let Some(arg) = args.next() {
        if arg == "--rounds" {
            rounds = args
                .next()
                .and_then(|r| r.parse().ok())
                .expect("--rounds needs a number");
        }
        // Other arguments (cargo bench passes `--bench`) are ignored.
    }
    bench_dtype::<f32>(rounds);
    bench_dtype::<bf16>(rounds);
    bench_dtype::<f16>(rounds);
    bench_master_weights(rounds);
}
