//! Per-shape kernel benchmarks with criterion (statistics, history, and throughput in bytes/s):
//! one GPT-2-small matrix of each shape, `f32` and `bf16`, for the fused power pass, the
//! two-matvec power pass, a same-size copy, and the full warm step. Useful when tuning one
//! kernel's arithmetic: one matrix (at most 9.4 MB) stays in a 32 MB L3 between iterations,
//! so these runs measure cache-resident speed, where the fused and two-matvec forms do the
//! same work. The memory-bound, whole-model ratios the README quotes come from
//! `benches/gpt2_small.rs`.
//!
//! Run: `cargo bench --bench kernels` (filter with e.g. `-- power/bf16`).

mod common;

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use spectral_step::cpu::BatchPowerIteration;
use spectral_step::half::bf16;
use spectral_step::{
    BatchLayout, BlockPolicy, Element, MatrixShape, SpectralSgd, SpectralSgdConfig,
};

use common::{gpt2_small_layer, hashed as values};

fn power<T: Element>(c: &mut Criterion) {
    let mut group = c.benchmark_group(format!("power/{}", T::DTYPE.name()));
    for shape in gpt2_small_layer() {
        let MatrixShape { fan_out, fan_in } = shape;
        let matrix = values::<T>(shape.len(), 1);
        let bytes = (shape.len() * T::DTYPE.size_bytes()) as u64;
        group.throughput(Throughput::Bytes(bytes));
        let layout = BatchLayout::new(&[shape], BlockPolicy::CPU).unwrap();
        let mut power = BatchPowerIteration::new(layout).unwrap();
        let mut v = power.cold_vectors(0).unwrap();
        let id = format!("{fan_out}x{fan_in}");
        group.bench_function(BenchmarkId::new("fused", &id), |b| {
            b.iter(|| black_box(power.fused(&[&matrix[..]], &mut v).unwrap()))
        });
        group.bench_function(BenchmarkId::new("two-matvec", &id), |b| {
            b.iter(|| black_box(power.two_pass(&[&matrix[..]], &mut v).unwrap()))
        });
        // Reads and writes half the bytes each: the same traffic as one read of the matrix.
        let source = vec![1u8; bytes as usize / 2];
        let mut destination = vec![0u8; bytes as usize / 2];
        group.bench_function(BenchmarkId::new("copy", &id), |b| {
            b.iter(|| destination.copy_from_slice(black_box(&source)))
        });
    }
    group.finish();
}

fn step<T: Element>(c: &mut Criterion) {
    let mut group = c.benchmark_group(format!("step/{}", T::DTYPE.name()));
    for shape in gpt2_small_layer() {
        let MatrixShape { fan_out, fan_in } = shape;
        // math §5's traffic model for a heavy-ball step: N (3b + 12) bytes.
        let bytes = (shape.len() * (3 * T::DTYPE.size_bytes() + 12)) as u64;
        group.throughput(Throughput::Bytes(bytes));
        let mut optimizer = SpectralSgd::new(&[shape], SpectralSgdConfig::default()).unwrap();
        let mut weights = vec![values::<T>(shape.len(), 2)];
        let grads = vec![values::<T>(shape.len(), 3)];
        optimizer.step(&mut weights, &grads).unwrap();
        group.bench_function(
            BenchmarkId::new("warm", format!("{fan_out}x{fan_in}")),
            |b| b.iter(|| black_box(optimizer.step(&mut weights, &grads).unwrap())),
        );
    }
    group.finish();
}

fn all(c: &mut Criterion) {
    power::<f32>(c);
    power::<bf16>(c);
    step::<f32>(c);
    step::<bf16>(c);
}

criterion_group! {
    name = kernels;
    // No plots: criterion's plotting backend panics on machines without fonts (seen on a
    // 2-core CI-class machine), and the numbers are what this bench is for.
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1)).without_plots();
    targets = all
}
criterion_main!(kernels);
