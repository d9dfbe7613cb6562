//! The fused power pass on one core: per stored type, kernel path and matrix, its rate in
//! elements per second beside a one-thread read-only pass over the same bytes, in the same
//! shuffled rounds ([`common::round_order`]).
//!
//! It separates the two things that can bound the pass (README, "One core against the
//! memory"): matrices that stay in L2 or L3 show what the core's arithmetic allows (there the
//! read runs several times faster than the pass); the ones far larger than a 32 MiB L3, how
//! much of that survives main memory. If one core alone runs at a share `f` of the one-thread
//! read from main memory, `c` cores can reach the `c`-thread read only where that read is at
//! most `c f` times the one-thread read: on a machine where one core nearly saturates the
//! memory, `f` must be close to `1 / c`.
//!
//! Run: `cargo bench --bench one_core` (`-- --rounds N`, default 7). Each measurement repeats
//! the pass for at least 50 ms; the table gives the best and the median round.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use spectral_step::cpu::{BatchPowerIteration, KernelPath};
use spectral_step::half::{bf16, f16};
use spectral_step::{BatchLayout, BlockPolicy, Element, MatrixShape};

use common::{hashed, read_pieces, read_serial};

/// `(fan_out, fan_in)`: one that stays in a 1 MiB L2 in every type (768 KiB in `f32`), one
/// that stays in a 32 MiB L3 (6 MiB in `f32`), and two far larger than a 32 MiB L3 (192 and
/// 256 MiB in `f32`, half that in 16 bits): rows of 768, the GPT-2-small set's commonest
/// length, and of 4096.
const SHAPES: [(usize, usize); 4] = [(256, 768), (2048, 768), (65536, 768), (16384, 4096)];

/// The least time one measurement repeats its work for.
const MEASUREMENT: Duration = Duration::from_millis(50);

struct Variant<'a> {
    name: String,
    elements: usize,
    bytes: usize,
    run: Box<dyn FnMut() + Send + 'a>,
    /// Seconds per pass, one per round.
    times: Vec<f64>,
}

/// Seconds per call of `run`, repeated for at least [`MEASUREMENT`].
fn seconds_per_call(run: &mut dyn FnMut()) -> f64 {
    let start = Instant::now();
    let mut calls = 0u32;
    while start.elapsed() < MEASUREMENT {
        run();
        calls += 1;
    }
    start.elapsed().as_secs_f64() / f64::from(calls)
}

fn bench_type<T: Element>(rounds: usize, one_core: &rayon::ThreadPool) {
    // The default path, and the AVX-512 path beside it where the CPU has it.
    let default = KernelPath::detect();
    let mut paths = vec![default];
    if KernelPath::Avx512.is_supported() && default != KernelPath::Avx512 {
        paths.push(KernelPath::Avx512);
    }
    let dtype = T::DTYPE.name();
    for (index, &(fan_out, fan_in)) in SHAPES.iter().enumerate() {
        let shape = MatrixShape::new(fan_out, fan_in);
        let matrix: Vec<T> = hashed(shape.len(), 7 + index as u64);
        let layout = BatchLayout::new(&[shape], BlockPolicy::CPU).unwrap();
        let bytes: &[u8] = bytemuck::cast_slice(&matrix);
        let pieces = read_pieces(&[bytes]);
        let elements = shape.len();
        let mut variants = vec![Variant {
            name: format!("{dtype} {fan_out}x{fan_in}, read (baseline)"),
            elements,
            bytes: bytes.len(),
            run: Box::new(move || {
                black_box(read_serial(black_box(&pieces)));
            }),
            times: Vec::new(),
        }];
        for &path in &paths {
            let mut power = BatchPowerIteration::new(layout.clone()).unwrap();
            power.set_kernel_path(path).unwrap();
            let mut vectors = power.cold_vectors(0).unwrap();
            let matrix = &matrix;
            variants.push(Variant {
                name: format!("{dtype} {fan_out}x{fan_in}, fused, {path:?}"),
                elements,
                bytes: bytes.len(),
                run: Box::new(move || {
                    black_box(power.fused(&[&matrix[..]], &mut vectors).unwrap());
                }),
                times: Vec::new(),
            });
        }
        one_core.install(|| {
            for variant in variants.iter_mut() {
                (variant.run)(); // warm-up
            }
            for round in 0..rounds {
                for index in common::round_order(round, variants.len()) {
                    let variant = &mut variants[index];
                    variant.times.push(seconds_per_call(&mut *variant.run));
                }
            }
        });
        let best_read = variants[0].times.iter().copied().fold(f64::MAX, f64::min);
        for variant in &mut variants {
            let best = variant.times.iter().copied().fold(f64::MAX, f64::min);
            let median = common::median(&mut variant.times);
            println!(
                "  {:<40} {:>9.2} {:>9.2} {:>9.1} {:>9.1}%",
                variant.name,
                variant.elements as f64 / best / 1e9,
                variant.elements as f64 / median / 1e9,
                variant.bytes as f64 / best / 1e9,
                100.0 * best_read / best,
            );
        }
    }
}

fn main() {
    let rounds = common::rounds_arg(7);
    let one_core = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a one-thread pool");
    println!("CPU: {}", common::cpu_model());
    println!("\nThe fused power pass on one thread ({rounds} shuffled rounds)");
    println!(
        "  {:<40} {:>9} {:>9} {:>9} {:>10}",
        "variant", "Gelem/s", "median", "GB/s", "vs read"
    );
    println!("  (Gelem/s and GB/s: best round; median: median round; vs read: best against best)");
    bench_type::<f32>(rounds, &one_core);
    bench_type::<bf16>(rounds, &one_core);
    bench_type::<f16>(rounds, &one_core);
}
