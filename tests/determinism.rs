//! Results are bitwise identical for any number of threads (math §4: partials are summed in a
//! fixed order).

mod common;

use common::*;
use spectral_step::cpu::BatchPowerIteration;
use spectral_step::cpu::KernelPath;
use spectral_step::half::{bf16, f16};
use spectral_step::{
    BatchLayout, BlockPolicy, Element, MatrixShape, MomentumKind, SpectralSgd, SpectralSgdConfig,
    StepReport, UpdateRule,
};

fn shapes() -> Vec<MatrixShape> {
    vec![
        MatrixShape::new(1031, 300),
        MatrixShape::new(600, 500),
        MatrixShape::new(7, 1),
        MatrixShape::new(129, 33),
    ]
}

/// `work` on a rayon pool of `threads` threads.
fn on_threads<R: Send>(threads: usize, work: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(work)
}

type Run<T> = (Vec<Vec<T>>, Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<StepReport>);

fn run<T: Element>(threads: usize, config: SpectralSgdConfig) -> Run<T> {
    run_on::<T>(spectral_step::cpu::KernelPath::detect(), threads, config)
}

fn run_on<T: Element>(
    path: spectral_step::cpu::KernelPath,
    threads: usize,
    config: SpectralSgdConfig,
) -> Run<T> {
    on_threads(threads, || {
        let shapes = shapes();
        let mut optimizer = SpectralSgd::new(&shapes, config).unwrap();
        optimizer.set_kernel_path(path).unwrap();
        let mut weights: Vec<Vec<T>> = shapes
            .iter()
            .enumerate()
            .map(|(j, &s)| random_matrix(s, 0.1, j as u64))
            .collect();
        let mut reports = Vec::new();
        for step in 1..=3u64 {
            let grads: Vec<Vec<T>> = shapes
                .iter()
                .enumerate()
                .map(|(j, &s)| random_matrix(s, 1.0, 100 * step + j as u64))
                .collect();
            reports.push(optimizer.step(&mut weights, &grads).unwrap());
        }
        let momentum = (0..shapes.len())
            .map(|j| optimizer.momentum(j).to_vec())
            .collect();
        let vectors = (0..shapes.len())
            .map(|j| optimizer.power_vector(j).to_vec())
            .collect();
        (weights, momentum, vectors, reports)
    })
}

fn assert_identical<T: Element>(a: &Run<T>, b: &Run<T>) {
    assert_eq!(a.3, b.3, "reports differ");
    for j in 0..a.0.len() {
        assert_eq!(bits(&a.0[j]), bits(&b.0[j]), "weights {j}");
        assert_eq!(bits(&a.1[j]), bits(&b.1[j]), "momentum {j}");
        assert_eq!(bits(&a.2[j]), bits(&b.2[j]), "power vector {j}");
    }
}

#[test]
fn step_is_identical_for_1_2_and_5_threads() {
    let layout = BatchLayout::new(&shapes(), BlockPolicy::CPU).unwrap();
    assert!(
        layout.blocks().len() >= 4,
        "need several blocks to exercise the reduction"
    );
    for config in [
        SpectralSgdConfig::default(),
        SpectralSgdConfig {
            nesterov: true,
            weight_decay: 0.1,
            ..Default::default()
        },
    ] {
        let single = run::<f32>(1, config);
        assert_identical(&single, &run::<f32>(2, config));
        assert_identical(&single, &run::<f32>(5, config));
    }
    assert_identical(
        &run::<bf16>(1, SpectralSgdConfig::default()),
        &run::<bf16>(3, SpectralSgdConfig::default()),
    );
}

#[test]
fn power_iteration_is_identical_for_any_thread_count() {
    let shapes = shapes();
    let matrices: Vec<Vec<f32>> = random_batch(&shapes, 1.0, 7);
    let results: Vec<_> = [1, 2, 7]
        .iter()
        .map(|&threads| {
            on_threads(threads, || {
                let views: Vec<&[f32]> = matrices.iter().map(Vec::as_slice).collect();
                let mut power =
                    BatchPowerIteration::new(BatchLayout::new(&shapes, BlockPolicy::CPU).unwrap())
                        .unwrap();
                let mut vectors = power.cold_vectors(1).unwrap();
                let mut estimates = Vec::new();
                for _ in 0..4 {
                    estimates = power.fused(&views, &mut vectors).unwrap();
                }
                (estimates, bits(&vectors))
            })
        })
        .collect();
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0], results[2]);
}

/// Lanczos, one vector and a block of four (the block pass, the parallel re-orthogonalisation):
/// the same estimates and pass counts on 1, 2 and 7 threads.
#[test]
fn lanczos_is_identical_for_any_thread_count() {
    let shapes = shapes();
    let matrices: Vec<Vec<f32>> = random_batch(&shapes, 1.0, 11);
    for block_vectors in [1, spectral_step::cpu::MAX_LANCZOS_BLOCK] {
        let results: Vec<_> = [1, 2, 7]
            .iter()
            .map(|&threads| {
                on_threads(threads, || {
                    let views: Vec<&[f32]> = matrices.iter().map(Vec::as_slice).collect();
                    let mut power = BatchPowerIteration::new(
                        BatchLayout::new(&shapes, BlockPolicy::CPU).unwrap(),
                    )
                    .unwrap();
                    power.lanczos(&views, 3, 1e-6, 60, block_vectors).unwrap()
                })
            })
            .collect();
        assert_eq!(results[0], results[1], "a block of {block_vectors}");
        assert_eq!(results[0], results[2], "a block of {block_vectors}");
    }
}

#[test]
fn each_kernel_path_is_identical_across_thread_counts() {
    for path in kernel_paths() {
        let config = SpectralSgdConfig {
            nesterov: true,
            ..SpectralSgdConfig::default()
        };
        assert_identical(
            &run_on::<f32>(path, 1, config),
            &run_on::<f32>(path, 4, config),
        );
        assert_identical(
            &run_on::<bf16>(path, 1, config),
            &run_on::<bf16>(path, 3, config),
        );
    }
}

/// The AVX-512 path is the AVX2 path on wider registers: the same bits for every stored type,
/// for heavy-ball and EMA momentum with and without Nesterov, and for the orthogonalised rule
/// (whose loops are the AVX2 ones compiled with AVX-512F enabled). Row tails of every length
/// are in `tests/power_iteration.rs`.
#[test]
fn avx512_path_gives_the_avx2_paths_bits() {
    if !KernelPath::Avx512.is_supported() {
        eprintln!("NOT RUN: the AVX-512 path (this CPU lacks AVX-512F)");
        return;
    }
    let mut configs = Vec::new();
    for momentum_kind in [MomentumKind::HeavyBall, MomentumKind::Ema] {
        for nesterov in [false, true] {
            configs.push(SpectralSgdConfig {
                momentum_kind,
                nesterov,
                ..SpectralSgdConfig::default()
            });
        }
    }
    configs.push(SpectralSgdConfig {
        update: UpdateRule::MUON,
        ..SpectralSgdConfig::default()
    });
    for config in configs {
        assert_identical(
            &run_on::<f32>(KernelPath::Avx2Fma, 2, config),
            &run_on::<f32>(KernelPath::Avx512, 2, config),
        );
        assert_identical(
            &run_on::<bf16>(KernelPath::Avx2Fma, 2, config),
            &run_on::<bf16>(KernelPath::Avx512, 2, config),
        );
        assert_identical(
            &run_on::<f16>(KernelPath::Avx2Fma, 2, config),
            &run_on::<f16>(KernelPath::Avx512, 2, config),
        );
    }
}
