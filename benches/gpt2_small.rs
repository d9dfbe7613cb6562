//! GPT-2-small matrix set (12 layers x {2304x768, 768x768, 3072x768, 768x3072}, 85M
//! parameters): one warm power iteration (fused and two-matvec) and the full warm step, in
//! `f32`, `bf16` and `f16`, each beside two baselines of the same byte count: a memory copy,
//! and a read-only pass (a reduction over the bytes, the real limit of a pass that only
//! reads). Every row reports its bandwidth "vs read" and "vs copy". The fused power pass also
//! runs on a one-thread pool, beside the one-thread read: whether one core's arithmetic or
//! the memory bounds the pass.
//!
//! For 16-bit weights the warm step runs twice per round, with stochastic rounding (the
//! default) and with round-to-nearest, and the cost of stochastic rounding is printed as the
//! median of their per-round time ratios (math §5a: it adds no memory traffic, only the
//! Philox arithmetic).
//!
//! Last, `f32` master weights with `bf16` gradients (math §5a), without and with the `bf16`
//! copy of the weights, beside the `f32` step in the same rounds.
//!
//! Run: `cargo bench --bench gpt2_small` (add `-- --rounds 15` for more rounds, `--power-only`
//! for the power iterations alone).
//!
//! Variants are measured in interleaved rounds, each variant once per round in the round's
//! own seeded order ([`common::round_order`]), and each is summarised by its median, so a slow
//! patch on a shared machine hits all variants alike; the ratios are the result, the absolute
//! times are only context.
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
use spectral_step::cpu::{BatchPowerIteration, KernelPath};
use spectral_step::half::{bf16, f16};
use spectral_step::{BatchLayout, BlockPolicy, Element, Rounding, SpectralSgd, SpectralSgdConfig};

use common::{gpt2_small, hashed, read_parallel, read_pieces, read_serial};

fn copy_parallel(dst: &mut [u8], src: &[u8]) {
    dst.par_chunks_mut(1 << 20)
        .zip(src.par_chunks(1 << 20))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// Index of the one-thread read among the [`baselines`].
const READ_SERIAL: usize = 2;
/// Index of the rayon read among the [`baselines`] (the faster read on a multi-core machine).
const READ_PARALLEL: usize = 3;
/// Index of the first measured variant: after the four [`baselines`].
const FIRST_MEASURED: usize = 4;

/// What a variant is to the table: a baseline of either kind, or a measured pass.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    CopyBaseline,
    ReadBaseline,
    Measured,
}

/// The four baselines over `model_bytes`: copies of `src` (half the bytes) into `dst` and
/// `dst_parallel`, and reads of `read` (every byte, cut by [`read_pieces`]), on one thread
/// and on the rayon pool.
fn baselines<'a>(
    model_bytes: f64,
    src: &'a [u8],
    dst: &'a mut [u8],
    dst_parallel: &'a mut [u8],
    read: &'a [&'a [u8]],
) -> Vec<Variant<'a>> {
    let variant = |name, role, run| Variant {
        name,
        role,
        model_bytes,
        run,
        times: Vec::new(),
    };
    vec![
        variant(
            "copy, 1 thread (baseline)",
            Role::CopyBaseline,
            Box::new(move || dst.copy_from_slice(black_box(src))),
        ),
        variant(
            "copy, rayon (baseline)",
            Role::CopyBaseline,
            Box::new(move || copy_parallel(dst_parallel, black_box(src))),
        ),
        variant(
            "read, 1 thread (baseline)",
            Role::ReadBaseline,
            Box::new(move || {
                black_box(read_serial(black_box(read)));
            }),
        ),
        variant(
            "read, rayon (baseline)",
            Role::ReadBaseline,
            Box::new(move || {
                black_box(read_parallel(black_box(read)));
            }),
        ),
    ]
}

/// A measured pass over `model_bytes`.
fn measured<'a>(name: &'static str, model_bytes: f64, run: impl FnMut() + 'a) -> Variant<'a> {
    Variant {
        name,
        role: Role::Measured,
        model_bytes,
        run: Box::new(run),
        times: Vec::new(),
    }
}

struct Variant<'a> {
    name: &'static str,
    role: Role,
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

/// Runs the variants in interleaved rounds and prints median time, GB/s, and each variant's
/// bandwidth against the faster read-only baseline and the faster copy baseline.
fn compare(title: &str, rounds: usize, variants: &mut [Variant]) {
    for variant in variants.iter_mut() {
        (variant.run)(); // warm-up: page faults, caches, thread pool
    }
    for round in 0..rounds {
        for index in common::round_order(round, variants.len()) {
            let variant = &mut variants[index];
            let start = Instant::now();
            (variant.run)();
            variant.times.push(start.elapsed());
        }
    }
    println!("\n{title}  ({rounds} interleaved rounds, medians)");
    println!(
        "  {:<36} {:>9} {:>9} {:>9} {:>9}",
        "variant", "ms", "GB/s", "vs read", "vs copy"
    );
    let bandwidth = |v: &Variant| v.model_bytes / median(&v.times) / 1e9;
    let best = |role| {
        variants
            .iter()
            .filter(|v| v.role == role)
            .map(bandwidth)
            .fold(f64::NAN, f64::max)
    };
    let (read, copy) = (best(Role::ReadBaseline), best(Role::CopyBaseline));
    for variant in variants.iter() {
        let gbs = bandwidth(variant);
        println!(
            "  {:<36} {:>9.2} {gbs:>9.2} {:>8.1}% {:>8.1}%",
            variant.name,
            median(&variant.times) * 1e3,
            100.0 * gbs / read,
            100.0 * gbs / copy
        );
    }
}

fn bench_dtype<T: Element>(rounds: usize, power_only: bool) {
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
        // The read-only baseline reads the very bytes the passes read.
        let read: Vec<&[u8]> = views.iter().map(|v| bytemuck::cast_slice(v)).collect();
        let read = read_pieces(&read);
        let mut fused = BatchPowerIteration::new(layout.clone()).unwrap();
        let mut fused_vectors = fused.cold_vectors(0).unwrap();
        let mut two_pass = BatchPowerIteration::new(layout.clone()).unwrap();
        let mut two_pass_vectors = two_pass.cold_vectors(0).unwrap();
        // Where the CPU has AVX-512, its loops (the same bits, not the default) beside them.
        let compare_avx512 = KernelPath::Avx512.is_supported();
        let mut avx512 = BatchPowerIteration::new(layout.clone()).unwrap();
        if compare_avx512 {
            avx512.set_kernel_path(KernelPath::Avx512).unwrap();
        }
        let mut avx512_vectors = avx512.cold_vectors(0).unwrap();
        // The default pass on one core, beside the one-core read: whether a core alone keeps up
        // with the memory it can read, or the arithmetic bounds it.
        let one_core = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let mut one_thread_pass = BatchPowerIteration::new(layout.clone()).unwrap();
        let mut one_thread_vectors = one_thread_pass.cold_vectors(0).unwrap();
        src.iter_mut().enumerate().for_each(|(i, x)| *x = i as u8);
        let mut variants = baselines(power_bytes, &src, &mut dst, &mut dst_parallel, &read);
        variants.push(measured(
            "power iteration, fused (math §4)",
            power_bytes,
            || {
                black_box(fused.fused(&views, &mut fused_vectors).unwrap());
            },
        ));
        variants.push(measured("power iteration, two-matvec", power_bytes, || {
            black_box(two_pass.two_pass(&views, &mut two_pass_vectors).unwrap());
        }));
        let one_thread_index = variants.len();
        variants.push(measured(
            "power iteration, fused, 1 thread",
            power_bytes,
            || {
                one_core.install(|| {
                    black_box(
                        one_thread_pass
                            .fused(&views, &mut one_thread_vectors)
                            .unwrap(),
                    )
                });
            },
        ));
        let avx512_index = variants.len();
        if compare_avx512 {
            variants.push(measured(
                "power iteration, fused, AVX-512",
                power_bytes,
                || {
                    black_box(avx512.fused(&views, &mut avx512_vectors).unwrap());
                },
            ));
        }
        compare(
            &format!(
                "{dtype} power iteration: {:.0} MB read per iteration",
                power_bytes / 1e6
            ),
            rounds,
            &mut variants,
        );
        let (fused, two_pass) = (&variants[FIRST_MEASURED], &variants[FIRST_MEASURED + 1]);
        let (fused_time, two_pass_time) = (median(&fused.times), median(&two_pass.times));
        let ratios = per_round_ratios(two_pass, fused);
        let fastest = |v: &Variant| v.times.iter().min().map_or(f64::NAN, |t| t.as_secs_f64());
        // A pass's bandwidth as a share of a read's, both measured in the same rounds.
        let share_of_read = |label: &str, read: &Variant, pass: &Variant| {
            let ratios = per_round_ratios(read, pass);
            println!(
                "  {label}: {:.1}% (median of per-round ratios, range {:.1}% to {:.1}%; fastest rounds {:.1}%)",
                100.0 * ratios[ratios.len() / 2],
                100.0 * ratios[0],
                100.0 * ratios[ratios.len() - 1],
                100.0 * fastest(read) / fastest(pass)
            );
        };
        share_of_read(
            "fused / read (rayon) bandwidth",
            &variants[READ_PARALLEL],
            fused,
        );
        println!(
            "  fused speed-up over two-matvec: {:.2}x (ratio of medians), {:.2}x (median of per-round ratios, range {:.2}x to {:.2}x)",
            two_pass_time / fused_time,
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1]
        );
        share_of_read(
            "fused / read on one core (1 thread each)",
            &variants[READ_SERIAL],
            &variants[one_thread_index],
        );
        if compare_avx512 {
            let ratios = per_round_ratios(fused, &variants[avx512_index]);
            println!(
                "  fused, AVX-512 path over the default path: {:.2}x (median of per-round ratios, range {:.2}x to {:.2}x)",
                ratios[ratios.len() / 2],
                ratios[0],
                ratios[ratios.len() - 1]
            );
        }
    }

    // Full warm step (heavy-ball, the defaults).
    if !power_only {
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
        // The read-only baseline reads `model_bytes`: another buffer of the copy's size.
        let read_half = src.clone();
        let read = read_pieces(&[&src[..], &read_half[..]]);
        let (weights, grads, optimizer) = (&mut weights, &grads, &mut optimizer);
        let mut variants = baselines(model_bytes, &src, &mut dst, &mut dst_parallel, &read);
        variants.push(measured(
            if low_precision {
                "step, warm, stochastic rounding"
            } else {
                "step, warm (math §5)"
            },
            model_bytes,
            || {
                black_box(optimizer.step(weights, grads).unwrap());
            },
        ));
        if let Some((twin, twin_weights)) = &mut nearest {
            variants.push(measured(
                "step, warm, round to nearest",
                model_bytes,
                || {
                    black_box(twin.step(twin_weights, grads).unwrap());
                },
            ));
        }
        compare(
            &format!(
                "{dtype} step: {:.0} MB at the two-pass minimum, {:.0} MB actually moved",
                model_bytes / 1e6,
                actual_bytes / 1e6
            ),
            rounds,
            &mut variants,
        );
        let step_time = median(&variants[FIRST_MEASURED].times);
        println!(
            "  step bandwidth counting the bytes it actually moves: {:.2} GB/s",
            actual_bytes / step_time / 1e9
        );
        if low_precision {
            let ratios = per_round_ratios(&variants[FIRST_MEASURED], &variants[FIRST_MEASURED + 1]);
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
    let read_half = src.clone();
    let read = read_pieces(&[&src[..], &read_half[..]]);
    let (mut dst, mut dst_parallel) = (vec![0u8; half], vec![0u8; half]);
    let grads = &grads;
    let copies = &mut copies;
    let wide_grads = &wide_grads;
    let mut variants = baselines(bytes(26), &src, &mut dst, &mut dst_parallel, &read);
    variants.push(measured("step, f32 W, f32 G", bytes(28), || {
        black_box(plain.step(&mut plain_w, wide_grads).unwrap());
    }));
    variants.push(measured("step, f32 W, bf16 G", bytes(24), || {
        black_box(mixed.step(&mut mixed_w, grads).unwrap());
    }));
    variants.push(measured(
        "step, f32 W, bf16 G, bf16 copy",
        bytes(26),
        || {
            black_box(
                with_copy
                    .step_with_copy(&mut copy_w, grads, copies)
                    .unwrap(),
            );
        },
    ));
    compare(
        "f32 master weights: bytes actually moved (28, 24 and 26 per parameter; baselines 26)",
        rounds,
        &mut variants,
    );
    let per_round = |a: usize, b: usize| {
        let ratios = per_round_ratios(&variants[a], &variants[b]);
        ratios[ratios.len() / 2]
    };
    println!(
        "  time / f32 step (median of per-round ratios): bf16 G {:.3}x, bf16 G + copy {:.3}x (bytes: {:.3}x, {:.3}x)",
        per_round(FIRST_MEASURED + 1, FIRST_MEASURED),
        per_round(FIRST_MEASURED + 2, FIRST_MEASURED),
        24.0 / 28.0,
        26.0 / 28.0
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut rounds = 9;
    let mut power_only = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|r| r.parse().ok())
                    .expect("--rounds needs a number")
            }
            "--power-only" => power_only = true,
            // Other arguments (cargo bench passes `--bench`) are ignored.
            _ => {}
        }
    }
    println!("CPU: {}", common::cpu_model());
    bench_dtype::<f32>(rounds, power_only);
    bench_dtype::<bf16>(rounds, power_only);
    bench_dtype::<f16>(rounds, power_only);
    if !power_only {
        bench_master_weights(rounds);
    }
}
