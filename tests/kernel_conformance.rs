//! Simulator conformance of the PTX kernels (issue 4): every kernel variant runs in `ptx-sim`
//! on ragged batches, with the same descriptor tables and launch sequence as the CUDA backend,
//! and is compared with the CPU path (`SpectralSgd<Cpu>`) and the f64 reference.
//!
//! Tolerances, and why:
//! - momentum: bit-identical to the CPU path's FMA kernels (same operations in the same order);
//!   with the portable CPU path, within 2 f32 ulps.
//! - sigma: relative 2e-5 against the CPU path (same start vector and iteration count; only
//!   the summation order differs), 1e-4 against the f64 reference.
//! - weights: the step `W_new - W_old` within 1e-4 of the largest step element (sigma's last
//!   bits), plus one rounding of the element type.
//! - power vectors: 1e-4 absolute (unit vectors).

mod common;
#[path = "common/sim.rs"]
mod sim;

use common::*;
use sim::SimOptimizer;
use spectral_step::cpu::KernelPath;
use spectral_step::half::{bf16, f16};
use spectral_step::kernels;
use spectral_step::{
    BatchLayout, BlockPolicy, Element, MatrixReport, MatrixShape, MatrixStatus, MomentumKind,
    Scale, SpectralSgd, SpectralSgdConfig,
};
use spectral_step_reference as reference;

/// Small blocks, so that the larger test matrices span several CTAs and exercise the
/// partial sums; the CUDA alignment.
const SMALL_BLOCKS: BlockPolicy = BlockPolicy {
    target_elements: 600,
    align_elements: 4,
};

fn configs() -> Vec<SpectralSgdConfig> {
    let base = SpectralSgdConfig {
        learning_rate: 0.05,
        cold_iterations: 3,
        seed: 11,
        ..SpectralSgdConfig::default()
    };
    vec![
        base,
        SpectralSgdConfig {
            momentum_kind: MomentumKind::Ema,
            nesterov: true,
            weight_decay: 0.1,
            scale: Scale::MuonMax1,
            ..base
        },
        SpectralSgdConfig {
            nesterov: true,
            weight_decay: 0.01,
            scale: Scale::RmsMatch(0.2),
            warm_iterations: 2,
            ..base
        },
    ]
}

fn cpu_optimizer(shapes: &[MatrixShape], config: SpectralSgdConfig) -> SpectralSgd {
    let mut cpu = SpectralSgd::new(shapes, config).unwrap();
    if KernelPath::Avx2Fma.is_supported() {
        cpu.set_kernel_path(KernelPath::Avx2Fma).unwrap();
    } else {
        eprintln!("NOT RUN: bitwise momentum comparison (the CPU lacks AVX2+FMA)");
    }
    cpu
}

fn start_vectors(cpu: &SpectralSgd) -> Vec<Vec<f32>> {
    (0..cpu.layout().len())
        .map(|j| cpu.power_vector(j).to_vec())
        .collect()
}

fn compare_reports(what: &str, sim: &[MatrixReport], cpu: &[MatrixReport]) {
    assert_eq!(sim.len(), cpu.len());
    for (j, (s, c)) in sim.iter().zip(cpu).enumerate() {
        assert_eq!(s.status, c.status, "{what}: matrix {j} status");
        match (s.sigma, c.sigma) {
            (Some(s), Some(c)) => assert_close(
                &format!("{what}: matrix {j} sigma"),
                f64::from(s),
                f64::from(c),
                2e-5 * f64::from(c.abs()),
            ),
            (None, None) => {}
            other => panic!("{what}: matrix {j} sigma {other:?}"),
        }
    }
}

fn compare_state<T: Element>(
    what: &str,
    sim: &SimOptimizer,
    cpu: &SpectralSgd,
    before: &[Vec<T>],
    sim_weights: &[Vec<T>],
    cpu_weights: &[Vec<T>],
) {
    let exact_momentum = cpu.kernel_path() == KernelPath::Avx2Fma;
    for j in 0..cpu.layout().len() {
        let (sim_m, cpu_m) = (sim.momentum(j), cpu.momentum(j));
        for (k, (&s, &c)) in sim_m.iter().zip(cpu_m).enumerate() {
            if exact_momentum {
                assert_eq!(s.to_bits(), c.to_bits(), "{what}: matrix {j} momentum[{k}]");
            } else {
                assert_close(
                    &format!("{what}: matrix {j} momentum[{k}]"),
                    f64::from(s),
                    f64::from(c),
                    2.0 * f64::from(f32::EPSILON) * f64::from(c.abs()),
                );
            }
        }
        for (k, (&s, &c)) in sim
            .power_vector(j)
            .iter()
            .zip(cpu.power_vector(j))
            .enumerate()
        {
            assert_close(
                &format!("{what}: matrix {j} v[{k}]"),
                f64::from(s),
                f64::from(c),
                1e-4,
            );
        }
        let step_of = |after: &[T]| -> Vec<f64> {
            after
                .iter()
                .zip(&before[j])
                .map(|(a, b)| f64::from(a.to_f32()) - f64::from(b.to_f32()))
                .collect()
        };
        let (sim_step, cpu_step) = (step_of(&sim_weights[j]), step_of(&cpu_weights[j]));
        let largest = cpu_step.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        for (k, (s, c)) in sim_step.iter().zip(&cpu_step).enumerate() {
            let w = f64::from(cpu_weights[j][k].to_f32()).abs();
            assert_close(
                &format!("{what}: matrix {j} weight step[{k}]"),
                *s,
                *c,
                1e-4 * largest + epsilon::<T>() * w + smallest_step::<T>(),
            );
        }
    }
}

/// Three steps (one cold, two warm) of every step-kernel variant against the CPU path, and
/// the cold step's sigma against the f64 reference.
fn step_conformance<T: Element>() {
    let shapes = ragged_shapes();
    for (c, config) in configs().into_iter().enumerate() {
        let mut cpu = cpu_optimizer(&shapes, config);
        let mut sim = SimOptimizer::new(&shapes, SMALL_BLOCKS, config, &start_vectors(&cpu));
        let mut weights: Vec<Vec<T>> = shapes
            .iter()
            .enumerate()
            .map(|(j, &s)| random_matrix(s, 0.5, 100 + j as u64))
            .collect();
        let mut sim_weights = weights.clone();
        for step in 0..3u64 {
            let what = format!("{} config {c} step {step}", T::DTYPE.name());
            let grads: Vec<Vec<T>> = shapes
                .iter()
                .enumerate()
                .map(|(j, &s)| random_matrix(s, 1.0, 1000 * step + j as u64))
                .collect();
            let before = weights.clone();
            let reference_sigmas: Vec<f64> = if step == 0 {
                shapes
                    .iter()
                    .enumerate()
                    .map(|(j, &shape)| {
                        let mut w = to_f64(&weights[j]);
                        let mut m = vec![0.0; shape.len()];
                        let mut v: Vec<f64> =
                            cpu.power_vector(j).iter().map(|&x| f64::from(x)).collect();
                        let iterations = if shape.is_vector() {
                            1
                        } else {
                            config.cold_iterations
                        };
                        let params = reference_params(&config, shape, iterations);
                        match reference::step(
                            &mut w,
                            &mut m,
                            &mut v,
                            &to_f64(&grads[j]),
                            shape.fan_out,
                            shape.fan_in,
                            &params,
                        ) {
                            reference::Outcome::Updated(sigma) => sigma,
                            other => panic!("{what}: reference outcome {other:?}"),
                        }
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let cpu_report = cpu.step(&mut weights, &grads).unwrap();
            let (sim_report, launches) = sim.step(&mut sim_weights, &grads, 0);
            let expected_launches = if step == 0 {
                2 * config.cold_iterations.max(config.warm_iterations) + 1
            } else {
                2 * config.warm_iterations + 1
            };
            assert_eq!(launches as u32, expected_launches, "{what}: launches");
            compare_reports(&what, &sim_report, &cpu_report.matrices);
            for (j, sigma) in reference_sigmas.iter().enumerate() {
                let got = f64::from(sim_report[j].sigma.unwrap());
                assert_close(
                    &format!("{what}: matrix {j} sigma vs reference"),
                    got,
                    *sigma,
                    1e-4 * sigma,
                );
            }
            compare_state(&what, &sim, &cpu, &before, &sim_weights, &weights);
        }
    }
}

#[test]
fn step_kernels_f32_match_cpu_and_reference() {
    step_conformance::<f32>();
}

#[test]
fn step_kernels_f16_match_cpu_and_reference() {
    step_conformance::<f16>();
}

#[test]
fn step_kernels_bf16_match_cpu_and_reference() {
    step_conformance::<bf16>();
}

/// Buffers that are not 16-byte aligned take the scalar path and give the same result as
/// aligned ones (up to the CTA-local summation order, which the path does not change).
#[test]
fn misaligned_buffers_take_the_scalar_path() {
    let shapes = vec![MatrixShape::new(40, 36), MatrixShape::new(9, 64)];
    let config = SpectralSgdConfig {
        cold_iterations: 2,
        ..SpectralSgdConfig::default()
    };
    let cpu = cpu_optimizer(&shapes, config);
    let grads: Vec<Vec<f32>> = shapes.iter().map(|&s| random_matrix(s, 1.0, 5)).collect();
    let mut outcomes = Vec::new();
    for offset in [0u64, 4] {
        let mut sim = SimOptimizer::new(&shapes, SMALL_BLOCKS, config, &start_vectors(&cpu));
        let mut weights: Vec<Vec<f32>> = shapes.iter().map(|&s| random_matrix(s, 0.5, 6)).collect();
        let (report, _) = sim.step(&mut weights, &grads, offset);
        outcomes.push((report, weights));
    }
    let (aligned, misaligned) = (&outcomes[0], &outcomes[1]);
    compare_reports("misaligned", &misaligned.0, &aligned.0);
    for (j, (a, m)) in aligned.1.iter().zip(&misaligned.1).enumerate() {
        for (k, (&a, &m)) in a.iter().zip(m).enumerate() {
            assert_close(
                &format!("matrix {j} weight[{k}]"),
                f64::from(m),
                f64::from(a),
                1e-6,
            );
        }
    }
}

/// A NaN, an infinity and a zero gradient in a batch: the non-finite matrices are skipped
/// with W, M and v bitwise untouched; the zero one stores M and leaves W; the rest update;
/// all as on the CPU path.
#[test]
fn non_finite_and_zero_gradients() {
    let shapes = ragged_shapes();
    let config = SpectralSgdConfig {
        cold_iterations: 2,
        weight_decay: 0.1,
        ..SpectralSgdConfig::default()
    };
    let mut cpu = cpu_optimizer(&shapes, config);
    let mut sim = SimOptimizer::new(&shapes, SMALL_BLOCKS, config, &start_vectors(&cpu));
    let warm_up: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 1.0, j as u64))
        .collect();
    let mut weights: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 0.5, 50 + j as u64))
        .collect();
    let mut sim_weights = weights.clone();
    cpu.step(&mut weights, &warm_up).unwrap();
    sim.step(&mut sim_weights, &warm_up, 0);

    let mut grads: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 1.0, 70 + j as u64))
        .collect();
    grads[8][100] = f32::NAN;
    grads[4][3] = f32::INFINITY;
    grads[9].fill(0.0);
    grads[2].fill(0.0);
    let before_w = sim_weights.clone();
    let before_m: Vec<Vec<f32>> = (0..shapes.len()).map(|j| sim.momentum(j)).collect();
    let before_v: Vec<Vec<f32>> = (0..shapes.len()).map(|j| sim.power_vector(j)).collect();
    let before = weights.clone();
    let cpu_report = cpu.step(&mut weights, &grads).unwrap();
    let (report, _) = sim.step(&mut sim_weights, &grads, 0);
    compare_reports("non-finite", &report, &cpu_report.matrices);
    for j in [4, 8] {
        assert_eq!(report[j].status, MatrixStatus::SkippedNonFinite);
        assert_eq!(
            bits(&sim_weights[j]),
            bits(&before_w[j]),
            "matrix {j} weights"
        );
        assert_eq!(
            bits(&sim.momentum(j)),
            bits(&before_m[j]),
            "matrix {j} momentum"
        );
        assert_eq!(
            bits(&sim.power_vector(j)),
            bits(&before_v[j]),
            "matrix {j} v"
        );
    }
    // Momentum decays with a zero gradient, so U is not zero here: that is an ordinary
    // update. A zero U needs zero momentum too; that case is the next test.
    for j in [2, 9] {
        assert_eq!(report[j].status, MatrixStatus::Updated, "matrix {j}");
    }
    compare_state("non-finite", &sim, &cpu, &before, &sim_weights, &weights);
}

/// U == 0 (zero gradient, zero momentum): sigma = 0, W untouched even with weight decay,
/// momentum stored (zero), and the matrix reported as a zero direction.
#[test]
fn zero_direction_leaves_weights_untouched() {
    let shapes = vec![
        MatrixShape::new(31, 17),
        MatrixShape::new(13, 1),
        MatrixShape::new(8, 8),
    ];
    let config = SpectralSgdConfig {
        cold_iterations: 2,
        weight_decay: 0.5,
        ..SpectralSgdConfig::default()
    };
    let cpu = cpu_optimizer(&shapes, config);
    let mut sim = SimOptimizer::new(&shapes, SMALL_BLOCKS, config, &start_vectors(&cpu));
    let mut weights: Vec<Vec<bf16>> = shapes.iter().map(|&s| random_matrix(s, 0.5, 3)).collect();
    let mut grads: Vec<Vec<bf16>> = shapes.iter().map(|&s| random_matrix(s, 1.0, 4)).collect();
    grads[0].fill(bf16::ZERO);
    grads[1].fill(bf16::ZERO);
    let before = weights.clone();
    let (report, _) = sim.step(&mut weights, &grads, 0);
    for j in [0, 1] {
        assert_eq!(report[j].status, MatrixStatus::ZeroDirection, "matrix {j}");
        assert_eq!(report[j].sigma, Some(0.0));
        assert_eq!(bits(&weights[j]), bits(&before[j]), "matrix {j} weights");
    }
    assert_eq!(report[2].status, MatrixStatus::Updated);
    assert_eq!(
        sim.warm_flags(),
        vec![0, 0, 1],
        "only the updated matrix is warm"
    );
}

/// The kernels use no atomics and sum partials in a fixed order: every output is
/// bit-identical whatever order the CTAs run in.
#[test]
fn identical_bits_under_shuffled_cta_order() {
    let shapes = ragged_shapes();
    let config = configs()[1];
    let cpu = cpu_optimizer(&shapes, config);
    let grads: Vec<Vec<f16>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 1.0, 30 + j as u64))
        .collect();
    let mut runs = Vec::new();
    for shuffle in [None, Some(1), Some(2)] {
        let mut sim = SimOptimizer::new(&shapes, SMALL_BLOCKS, config, &start_vectors(&cpu));
        sim.shuffle_seed = shuffle;
        let mut weights: Vec<Vec<f16>> = shapes
            .iter()
            .enumerate()
            .map(|(j, &s)| random_matrix(s, 0.5, 40 + j as u64))
            .collect();
        for _ in 0..2 {
            sim.step(&mut weights, &grads, 0);
        }
        let state: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = (0..shapes.len())
            .map(|j| {
                (
                    bits(&weights[j]),
                    bits(&sim.momentum(j)),
                    bits(&sim.power_vector(j)),
                )
            })
            .collect();
        let sigmas: Vec<Option<u32>> = sim
            .report()
            .iter()
            .map(|r| r.sigma.map(f32::to_bits))
            .collect();
        runs.push((state, sigmas));
    }
    assert!(
        runs.windows(2).all(|pair| pair[0] == pair[1]),
        "results depend on CTA order"
    );
}

/// The plain power pass (on stored matrices, every element type) against the CPU's fused
/// power iteration from the same start vectors.
#[test]
fn plain_power_kernels_match_the_cpu_power_iteration() {
    use spectral_step::cpu::BatchPowerIteration;
    let shapes = ragged_shapes();
    let iterations = 4;
    let cpu_layout = BatchLayout::new(&shapes, BlockPolicy::CPU).unwrap();
    let mut power = BatchPowerIteration::new(cpu_layout.clone());
    let start = power.cold_vectors(21);
    let starts: Vec<Vec<f32>> = cpu_layout
        .matrices()
        .iter()
        .map(|e| start[e.vector_range()].to_vec())
        .collect();
    fn run<T: Element>(
        shapes: &[MatrixShape],
        starts: &[Vec<f32>],
        power: &mut BatchPowerIteration,
        start: &[f32],
        iterations: u32,
    ) {
        let matrices: Vec<Vec<T>> = shapes
            .iter()
            .enumerate()
            .map(|(j, &s)| random_matrix(s, 1.0, 200 + j as u64))
            .collect();
        let views: Vec<&[T]> = matrices.iter().map(Vec::as_slice).collect();
        let mut cpu_vectors = start.to_vec();
        let mut estimates = Vec::new();
        for k in 0..iterations {
            // The CPU API iterates every matrix each time; vectors are exact after one.
            let e = power.fused(&views, &mut cpu_vectors).unwrap();
            if k == 0 {
                estimates = e;
            } else {
                for (j, shape) in shapes.iter().enumerate() {
                    if !shape.is_vector() {
                        estimates[j] = e[j];
                    }
                }
            }
        }
        let mut sim = SimOptimizer::new(shapes, SMALL_BLOCKS, SpectralSgdConfig::default(), starts);
        let report = sim.power(&matrices, iterations);
        for (j, shape) in shapes.iter().enumerate() {
            let what = format!("{} plain power, matrix {j}", T::DTYPE.name());
            let cpu_sigma = f64::from(estimates[j].sigma());
            assert_close(
                &what,
                f64::from(report[j].sigma.unwrap()),
                cpu_sigma,
                2e-5 * cpu_sigma,
            );
            if shape.is_vector() {
                continue;
            }
            let range = power.layout().matrix(j).vector_range();
            for (k, (&s, &c)) in sim
                .power_vector(j)
                .iter()
                .zip(&cpu_vectors[range])
                .enumerate()
            {
                assert_close(&format!("{what} v[{k}]"), f64::from(s), f64::from(c), 1e-4);
            }
        }
    }
    run::<f32>(&shapes, &starts, &mut power, &start, iterations);
    run::<f16>(&shapes, &starts, &mut power, &start, iterations);
    run::<bf16>(&shapes, &starts, &mut power, &start, iterations);
}

/// Every module the build produced parses in the simulator, and every module was assembled
/// for all four architectures when ptxas was available at build time.
#[test]
fn every_module_parses_and_was_assembled() {
    let modules = kernels::modules();
    assert_eq!(
        modules.len(),
        10,
        "3 power_step, 3 power_plain, finish, 3 update"
    );
    for module in modules {
        let parsed = ptx_sim::parse(module.ptx).unwrap_or_else(|e| panic!("{}: {e}", module.name));
        assert!(parsed.kernel(module.name).is_some(), "{}", module.name);
    }
    match kernels::ptxas_version() {
        Some(version) => {
            for module in modules {
                let arches: Vec<u32> = module.cubins.iter().map(|c| c.arch).collect();
                assert_eq!(arches, vec![80, 86, 89, 90], "{} ({version})", module.name);
                assert!(
                    module
                        .cubins
                        .iter()
                        .all(|c| c.image.starts_with(b"\x7fELF"))
                );
            }
            let spilling: Vec<&str> = kernels::ptxas_report()
                .lines()
                .filter(|l| {
                    l.contains("spill stores")
                        && !l.contains(" 0 bytes spill stores, 0 bytes spill loads")
                })
                .collect();
            assert!(spilling.is_empty(), "kernels spill registers: {spilling:?}");
        }
        None => eprintln!("NOT RUN: cubin checks (built without ptxas; PTX only)"),
    }
}

/// Layout checks happen before anything is launched: a partial too large for shared memory
/// and a policy without the kernels' alignment are clear errors.
#[test]
fn layouts_the_kernels_cannot_run_are_errors() {
    let wide = BatchLayout::new(&[MatrixShape::new(4, 20_000)], BlockPolicy::CUDA).unwrap();
    let error = kernels::check_layout(&wide, 48 * 1024).unwrap_err();
    assert!(error.to_string().contains("shared memory"), "{error}");
    let cpu = BatchLayout::new(&[MatrixShape::new(4, 4)], BlockPolicy::CPU).unwrap();
    let error = kernels::check_layout(&cpu, 48 * 1024).unwrap_err();
    assert!(error.to_string().contains("align"), "{error}");
    assert!(kernels::decode_results(&[0u8; 31]).is_err());
    let mut bad_status = vec![0u8; kernels::RESULT_BYTES];
    bad_status[4] = 9;
    assert!(kernels::decode_results(&bad_status).is_err());
}

/// `U v == 0` with `U != 0` (a start vector orthogonal to every row): the finish kernel
/// re-seeds `v` with a `±1/sqrt(n)` vector, marks it cold, and the matrix takes a
/// zero-direction step (W untouched), as README describes for the device path.
#[test]
fn orthogonal_start_vector_is_reseeded_on_the_device() {
    let shapes = vec![MatrixShape::new(6, 8), MatrixShape::new(5, 4)];
    let config = SpectralSgdConfig {
        cold_iterations: 2,
        ..SpectralSgdConfig::default()
    };
    let mut first = vec![0.0f32; 8];
    first[0] = 1.0;
    let starts = vec![first, vec![0.5f32; 4]];
    let mut sim = SimOptimizer::new(&shapes, SMALL_BLOCKS, config, &starts);
    let mut weights: Vec<Vec<f32>> = shapes.iter().map(|&s| random_matrix(s, 0.5, 8)).collect();
    let mut grads: Vec<Vec<f32>> = shapes.iter().map(|&s| random_matrix(s, 1.0, 9)).collect();
    // Column 0 of matrix 0 is zero, so U e_0 = 0 while U != 0.
    grads[0].iter_mut().step_by(8).for_each(|g| *g = 0.0);
    let before = weights.clone();
    let (report, _) = sim.step(&mut weights, &grads, 0);
    assert_eq!(report[0].status, MatrixStatus::ZeroDirection);
    assert_eq!(bits(&weights[0]), bits(&before[0]), "weights untouched");
    assert_eq!(report[1].status, MatrixStatus::Updated);
    assert_eq!(sim.warm_flags(), vec![0, 1]);
    let v = sim.power_vector(0);
    let expected = 1.0 / 8f32.sqrt();
    assert!(v.iter().all(|x| (x.abs() - expected).abs() < 1e-6), "{v:?}");
    assert!(
        v.iter().any(|&x| x > 0.0) && v.iter().any(|&x| x < 0.0),
        "mixed signs: {v:?}"
    );
    // The next step iterates from the new vector and updates the matrix.
    let (report, _) = sim.step(&mut weights, &grads, 0);
    assert_eq!(report[0].status, MatrixStatus::Updated);
}
