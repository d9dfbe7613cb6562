//! Conformance of the device path: the real device backend (`SpectralSgd<Simulated>`, the
//! same code as `SpectralSgd<Cuda>`) runs every kernel variant in the simulated device on
//! ragged batches, and is compared with the CPU path (`SpectralSgd<Cpu>`) and the f64
//! reference.
//!
//! Tolerances, and why:
//! - momentum: bit-identical to the CPU path's FMA kernels (same operations in the same order);
//!   with the portable CPU path, within 2 f32 ulps.
//! - sigma: relative 2e-5 against the CPU path (same start vector and iteration count; only
//!   the summation order differs), 1e-4 against the f64 reference.
//! - weights: the step `W_new - W_old` within 1e-4 of the largest step element (sigma's last
//!   bits), plus one rounding of the element type.
//! - power vectors: 1e-4 absolute (unit vectors).
//! - statuses, warm flags, re-seeded vectors and launch counts: exact.

mod common;

use common::*;
use spectral_step::cpu::{BatchPowerIteration, KernelPath};
use spectral_step::half::{bf16, f16};
use spectral_step::kernels::{self, KernelId, plan};
use spectral_step::sim::{CtaOrder, SimDevice, SimOptions, SimPowerIteration, SimSlice, Simulated};
use spectral_step::{
    BatchLayout, BlockPolicy, Element, Error, HostState, MatrixReport, MatrixShape, MatrixStatus,
    MomentumKind, Scale, SpectralSgd, SpectralSgdConfig, StepReport,
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

fn sim_optimizer(
    device: &SimDevice,
    shapes: &[MatrixShape],
    config: SpectralSgdConfig,
) -> SpectralSgd<Simulated> {
    let layout = BatchLayout::new(shapes, SMALL_BLOCKS).unwrap();
    SpectralSgd::on_device_with_layout(layout, config, device.clone()).unwrap()
}

fn upload<T: Element>(device: &SimDevice, values: &[Vec<T>]) -> Vec<SimSlice<T>> {
    values.iter().map(|v| device.upload(v).unwrap()).collect()
}

fn download<T: Element>(device: &SimDevice, slices: &[SimSlice<T>]) -> Vec<Vec<T>> {
    slices.iter().map(|s| device.download(s).unwrap()).collect()
}

/// One step on the simulated device: uploads the gradients, steps `weights` in place (they
/// stay on the device), returns the report and the number of launches the step made.
fn sim_step<T: Element>(
    device: &SimDevice,
    optimizer: &mut SpectralSgd<Simulated>,
    weights: &mut [SimSlice<T>],
    grads: &[Vec<T>],
) -> (StepReport, u64) {
    let grads = upload(device, grads);
    let before = device.stats().launches;
    let pending = optimizer.step(weights, &grads).unwrap();
    let report = optimizer.report().unwrap();
    assert_eq!(report.step, pending.step);
    (report, device.stats().launches - before)
}

fn compare_reports(what: &str, sim: &[MatrixReport], cpu: &[MatrixReport]) {
    assert_eq!(sim.len(), cpu.len());
    for (j, (s, c)) in sim.iter().zip(cpu).enumerate() {
        assert_eq!(s.status, c.status, "{what}: matrix {j} status");
        match (s.sigma, c.sigma) {
            (Some(s), Some(c)) => assert_relative(
                &format!("{what}: matrix {j} sigma"),
                f64::from(s),
                f64::from(c),
                2e-5,
            ),
            (None, None) => {}
            other => panic!("{what}: matrix {j} sigma {other:?}"),
        }
    }
}

fn compare_state<T: Element>(
    what: &str,
    sim: &SpectralSgd<Simulated>,
    cpu: &SpectralSgd,
    before: &[Vec<T>],
    sim_weights: &[Vec<T>],
    cpu_weights: &[Vec<T>],
) {
    let exact_momentum = cpu.kernel_path().fuses_multiply_add();
    let sim_state = sim.state().unwrap();
    let cpu_state = cpu.state().unwrap();
    assert_eq!(sim_state.warm, cpu_state.warm, "{what}: warm flags");
    for j in 0..cpu.layout().len() {
        let (sim_m, cpu_m) = (sim.momentum_to_host(j).unwrap(), cpu.momentum(j));
        for (k, (&s, &c)) in sim_m.iter().zip(cpu_m).enumerate() {
            if exact_momentum {
                assert_eq!(s.to_bits(), c.to_bits(), "{what}: matrix {j} momentum[{k}]");
            } else {
                assert_relative(
                    &format!("{what}: matrix {j} momentum[{k}]"),
                    f64::from(s),
                    f64::from(c),
                    2.0 * f64::from(f32::EPSILON),
                );
            }
        }
        let sim_v = sim.power_vector_to_host(j).unwrap();
        for (k, (&s, &c)) in sim_v.iter().zip(cpu.power_vector(j)).enumerate() {
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

/// One step on both backends with the same gradients (`sim_weights` on the device,
/// `cpu_weights` on the host), compared with [`compare_reports`] and [`compare_state`];
/// returns the number of launches the device step made.
fn step_both<T: Element>(
    what: &str,
    device: &SimDevice,
    sim: &mut SpectralSgd<Simulated>,
    sim_weights: &mut [SimSlice<T>],
    cpu: &mut SpectralSgd,
    cpu_weights: &mut [Vec<T>],
    grads: &[Vec<T>],
) -> u64 {
    let before = cpu_weights.to_vec();
    let cpu_report = cpu.step(cpu_weights, grads).unwrap();
    let (report, launches) = sim_step(device, sim, sim_weights, grads);
    compare_reports(what, &report.matrices, &cpu_report.matrices);
    compare_state(
        what,
        sim,
        cpu,
        &before,
        &download(device, sim_weights),
        cpu_weights,
    );
    launches
}

/// The cold step's sigma of every matrix from the f64 reference, from the CPU optimizer's
/// start vectors.
fn reference_sigmas<T: Element>(
    cpu: &SpectralSgd,
    config: &SpectralSgdConfig,
    weights: &[Vec<T>],
    grads: &[Vec<T>],
) -> Vec<f64> {
    cpu.layout()
        .shapes()
        .enumerate()
        .map(|(j, shape)| {
            let mut w = to_f64(&weights[j]);
            let mut m = vec![0.0; shape.len()];
            let mut v: Vec<f64> = cpu.power_vector(j).iter().map(|&x| f64::from(x)).collect();
            let iterations = if shape.is_vector() {
                1
            } else {
                config.cold_iterations
            };
            let params = reference_params(config, shape, iterations);
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
                other => panic!("matrix {j}: reference outcome {other:?}"),
            }
        })
        .collect()
}

/// Three steps (one cold, two warm) of every step-kernel variant on the device backend
/// against the CPU path, and the cold step's sigma against the f64 reference.
fn step_conformance<T: Element>() {
    let shapes = ragged_shapes();
    let device = SimDevice::new().unwrap();
    for (c, config) in configs().into_iter().enumerate() {
        let mut cpu = cpu_optimizer(&shapes, config);
        let mut sim = sim_optimizer(&device, &shapes, config);
        let mut weights: Vec<Vec<T>> = random_batch(&shapes, 0.5, 100);
        let mut sim_weights = upload(&device, &weights);
        for step in 0..3u64 {
            let what = format!("{} config {c} step {step}", T::DTYPE.name());
            let grads: Vec<Vec<T>> = random_batch(&shapes, 1.0, 1000 * step);
            let before = weights.clone();
            let expected_sigmas = if step == 0 {
                reference_sigmas(&cpu, &config, &weights, &grads)
            } else {
                Vec::new()
            };
            let cpu_report = cpu.step(&mut weights, &grads).unwrap();
            let (sim_report, launches) = sim_step(&device, &mut sim, &mut sim_weights, &grads);
            let rounds = if step == 0 {
                config.cold_iterations.max(config.warm_iterations)
            } else {
                config.warm_iterations
            };
            assert_eq!(launches, u64::from(2 * rounds + 1), "{what}: launches");
            compare_reports(&what, &sim_report.matrices, &cpu_report.matrices);
            for (j, sigma) in expected_sigmas.iter().enumerate() {
                let got = f64::from(sim_report.matrices[j].sigma.unwrap());
                assert_relative(
                    &format!("{what}: matrix {j} sigma vs reference"),
                    got,
                    *sigma,
                    1e-4,
                );
            }
            compare_state(
                &what,
                &sim,
                &cpu,
                &before,
                &download(&device, &sim_weights),
                &weights,
            );
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

/// Global vector accesses (per thread) a one-round step makes for a matrix on the 4-wide
/// path, counted from the kernels: the power step pass loads `G`, `M` and `v` per quad per
/// row in its first sweep and `G`, `M` in its second (5), and stores its partial per quad
/// (1 per block); the update loads `G`, `M`, `W` and stores `M`, `W` per quad (5). The finish
/// has no vector accesses.
fn step_vector_accesses(layout: &BatchLayout, matrix: usize) -> u64 {
    let entry = layout.matrix(matrix);
    let quads_per_row = (entry.shape.fan_in / 4) as u64;
    let rows = entry.shape.fan_out as u64;
    5 * quads_per_row * rows + quads_per_row * entry.block_count as u64 + 5 * quads_per_row * rows
}

/// The same for one plain power iteration: `W` and `v` per quad per row, then `W` again, and
/// the partial's store per quad per block.
fn plain_vector_accesses(layout: &BatchLayout, matrix: usize) -> u64 {
    let entry = layout.matrix(matrix);
    let quads_per_row = (entry.shape.fan_in / 4) as u64;
    3 * quads_per_row * entry.shape.fan_out as u64 + quads_per_row * entry.block_count as u64
}

/// The kernels take their 4-wide path exactly when a matrix allows it: `fan_in % 4 == 0` and
/// `W`, `G` (16 bytes for `f32`, 8 for 16-bit types) and the state aligned for it. The
/// simulator counts vector loads and stores per thread, and the count must be exactly what
/// the eligible matrices' 4-wide code makes, in the step (power pass and update) and in the
/// plain power pass; misaligned buffers take the scalar path and give the same result
/// within 1e-6 (only the per-thread order of the sums differs).
#[test]
fn the_four_wide_path_is_taken_exactly_when_the_buffers_allow_it() {
    let config = SpectralSgdConfig {
        cold_iterations: 1,
        ..SpectralSgdConfig::default()
    };
    // 40x36 and 9x64 are eligible, 40x35 is not (fan_in % 4 != 0).
    let shapes = [
        MatrixShape::new(40, 36),
        MatrixShape::new(9, 64),
        MatrixShape::new(40, 35),
    ];
    let layout = BatchLayout::new(&shapes, SMALL_BLOCKS).unwrap();
    let eligible = [0, 1];
    fn run<T: Element>(
        shapes: &[MatrixShape],
        config: SpectralSgdConfig,
        weight_offset: usize,
        grad_offset: usize,
    ) -> (StepReport, Vec<Vec<T>>, u64, u64) {
        let device = SimDevice::new().unwrap();
        let mut sim = sim_optimizer(&device, shapes, config);
        let place = |values: &[Vec<T>], offset: usize| -> Vec<SimSlice<T>> {
            values
                .iter()
                .map(|v| device.upload_at_offset(v, offset).unwrap())
                .collect()
        };
        let mut weights = place(&random_batch(shapes, 0.5, 6), weight_offset);
        let grads = place(&random_batch(shapes, 1.0, 5), grad_offset);
        sim.step(&mut weights, &grads).unwrap();
        let step_vectors = device.stats().global_vector_accesses;
        let layout = BatchLayout::new(shapes, SMALL_BLOCKS).unwrap();
        let mut power = SimPowerIteration::with_layout(layout, device.clone()).unwrap();
        device.reset_stats().unwrap();
        power.iterate(&weights, 1).unwrap();
        let plain_vectors = device.stats().global_vector_accesses;
        (
            sim.report().unwrap(),
            download(&device, &weights),
            step_vectors,
            plain_vectors,
        )
    }
    let expected_step: u64 = eligible
        .iter()
        .map(|&j| step_vector_accesses(&layout, j))
        .sum();
    let expected_plain: u64 = eligible
        .iter()
        .map(|&j| plain_vector_accesses(&layout, j))
        .sum();
    let (aligned_report, aligned_weights, step, plain) = run::<f32>(&shapes, config, 0, 0);
    assert_eq!(
        (step, plain),
        (expected_step, expected_plain),
        "f32, aligned"
    );
    let (misaligned_report, misaligned_weights, step, plain) = run::<f32>(&shapes, config, 4, 4);
    assert_eq!((step, plain), (0, 0), "f32, 4 bytes off: scalar path only");
    let (_, _, step, plain) = run::<f32>(&shapes, config, 0, 4);
    assert_eq!((step, plain), (0, expected_plain), "f32, only G misaligned");
    let (_, _, step, plain) = run::<bf16>(&shapes, config, 8, 8);
    assert_eq!(
        (step, plain),
        (expected_step, expected_plain),
        "bf16, 8-byte aligned"
    );
    let (_, _, step, plain) = run::<bf16>(&shapes, config, 4, 4);
    assert_eq!(
        (step, plain),
        (0, 0),
        "bf16, 4 bytes off an 8-byte boundary"
    );
    compare_reports(
        "misaligned",
        &misaligned_report.matrices,
        &aligned_report.matrices,
    );
    for (j, (a, m)) in aligned_weights.iter().zip(&misaligned_weights).enumerate() {
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
    let device = SimDevice::new().unwrap();
    let mut cpu = cpu_optimizer(&shapes, config);
    let mut sim = sim_optimizer(&device, &shapes, config);
    let warm_up: Vec<Vec<f32>> = random_batch(&shapes, 1.0, 0);
    let mut weights: Vec<Vec<f32>> = random_batch(&shapes, 0.5, 50);
    let mut sim_weights = upload(&device, &weights);
    cpu.step(&mut weights, &warm_up).unwrap();
    sim_step(&device, &mut sim, &mut sim_weights, &warm_up);

    let mut grads: Vec<Vec<f32>> = random_batch(&shapes, 1.0, 70);
    grads[8][100] = f32::NAN;
    grads[4][3] = f32::INFINITY;
    grads[9].fill(0.0);
    grads[2].fill(0.0);
    let before_w = download(&device, &sim_weights);
    let before_m: Vec<Vec<f32>> = (0..shapes.len())
        .map(|j| sim.momentum_to_host(j).unwrap())
        .collect();
    let before_v: Vec<Vec<f32>> = (0..shapes.len())
        .map(|j| sim.power_vector_to_host(j).unwrap())
        .collect();
    let before = weights.clone();
    let cpu_report = cpu.step(&mut weights, &grads).unwrap();
    let (report, _) = sim_step(&device, &mut sim, &mut sim_weights, &grads);
    compare_reports("non-finite", &report.matrices, &cpu_report.matrices);
    let after_w = download(&device, &sim_weights);
    for j in [4, 8] {
        assert_eq!(report.matrices[j].status, MatrixStatus::SkippedNonFinite);
        assert_eq!(bits(&after_w[j]), bits(&before_w[j]), "matrix {j} weights");
        assert_eq!(
            bits(&sim.momentum_to_host(j).unwrap()),
            bits(&before_m[j]),
            "matrix {j} momentum"
        );
        assert_eq!(
            bits(&sim.power_vector_to_host(j).unwrap()),
            bits(&before_v[j]),
            "matrix {j} v"
        );
    }
    // Momentum decays with a zero gradient, so U is not zero here: that is an ordinary
    // update. A zero U needs zero momentum too; that case is the next test.
    for j in [2, 9] {
        assert_eq!(
            report.matrices[j].status,
            MatrixStatus::Updated,
            "matrix {j}"
        );
    }
    compare_state("non-finite", &sim, &cpu, &before, &after_w, &weights);
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
    let device = SimDevice::new().unwrap();
    let mut sim = sim_optimizer(&device, &shapes, config);
    let mut cpu = cpu_optimizer(&shapes, config);
    let before: Vec<Vec<bf16>> = shapes.iter().map(|&s| random_matrix(s, 0.5, 3)).collect();
    let mut grads: Vec<Vec<bf16>> = shapes.iter().map(|&s| random_matrix(s, 1.0, 4)).collect();
    grads[0].fill(bf16::ZERO);
    grads[1].fill(bf16::ZERO);
    let mut weights = upload(&device, &before);
    let mut cpu_weights = before.clone();
    step_both(
        "zero",
        &device,
        &mut sim,
        &mut weights,
        &mut cpu,
        &mut cpu_weights,
        &grads,
    );
    let report = sim.report().unwrap();
    let after = download(&device, &weights);
    for j in [0, 1] {
        assert_eq!(
            report.matrices[j].status,
            MatrixStatus::ZeroDirection,
            "matrix {j}"
        );
        assert_eq!(report.matrices[j].sigma, Some(0.0));
        assert_eq!(bits(&after[j]), bits(&before[j]), "matrix {j} weights");
        assert_eq!(
            bits(&cpu_weights[j]),
            bits(&before[j]),
            "matrix {j} CPU weights"
        );
    }
    assert_eq!(report.matrices[2].status, MatrixStatus::Updated);
    assert_eq!(
        sim.state().unwrap().warm,
        vec![false, false, true],
        "only the updated matrix is warm"
    );
    assert_eq!(cpu.state().unwrap().warm, vec![false, false, true]);
}

/// The kernels use no atomics and sum partials in a fixed order: every output is
/// bit-identical whatever order the CTAs run in.
#[test]
fn identical_bits_under_shuffled_cta_order() {
    let shapes = ragged_shapes();
    let config = configs()[1];
    let grads: Vec<Vec<f16>> = random_batch(&shapes, 1.0, 30);
    let mut runs = Vec::new();
    for order in [
        CtaOrder::Linear,
        CtaOrder::Shuffled { seed: 1 },
        CtaOrder::Shuffled { seed: 2 },
    ] {
        let device = SimDevice::with_options(SimOptions {
            cta_order: order,
            ..SimOptions::default()
        })
        .unwrap();
        let mut sim = sim_optimizer(&device, &shapes, config);
        let mut weights = upload(&device, &random_batch::<f16>(&shapes, 0.5, 40));
        for _ in 0..2 {
            sim_step(&device, &mut sim, &mut weights, &grads);
        }
        let weight_bits: Vec<Vec<u8>> = download(&device, &weights)
            .iter()
            .map(|w| bits(w))
            .collect();
        let state = sim.state().unwrap();
        let sigmas: Vec<Option<u32>> = sim
            .report()
            .unwrap()
            .matrices
            .iter()
            .map(|r| r.sigma.map(f32::to_bits))
            .collect();
        runs.push((
            weight_bits,
            bits(&state.momentum),
            bits(&state.power_vectors),
            sigmas,
        ));
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
    let shapes = ragged_shapes();
    let iterations = 4;
    fn run<T: Element>(shapes: &[MatrixShape], iterations: u32) {
        let cpu_layout = BatchLayout::new(shapes, BlockPolicy::CPU).unwrap();
        let mut power = BatchPowerIteration::new(cpu_layout).unwrap();
        // The device's power iteration seeds its vectors with seed 0.
        let mut cpu_vectors = power.cold_vectors(0).unwrap();
        let matrices: Vec<Vec<T>> = random_batch(shapes, 1.0, 200);
        let views: Vec<&[T]> = matrices.iter().map(Vec::as_slice).collect();
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
        let device = SimDevice::new().unwrap();
        let layout = BatchLayout::new(shapes, SMALL_BLOCKS).unwrap();
        let mut sim = SimPowerIteration::with_layout(layout, device.clone()).unwrap();
        assert!(
            matches!(sim.report(), Err(Error::InvalidArgument(_))),
            "no report yet"
        );
        let slices = upload(&device, &matrices);
        sim.iterate(&slices, iterations).unwrap();
        let report = sim.report().unwrap();
        for (j, shape) in shapes.iter().enumerate() {
            let what = format!("{} plain power, matrix {j}", T::DTYPE.name());
            let cpu_sigma = f64::from(estimates[j].sigma());
            assert_relative(
                &what,
                f64::from(report.matrices[j].sigma.unwrap()),
                cpu_sigma,
                2e-5,
            );
            if shape.is_vector() {
                continue;
            }
            let range = power.layout().matrix(j).vector_range();
            let sim_v = sim.power_vector_to_host(j).unwrap();
            for (k, (&s, &c)) in sim_v.iter().zip(&cpu_vectors[range]).enumerate() {
                assert_close(&format!("{what} v[{k}]"), f64::from(s), f64::from(c), 1e-4);
            }
        }
    }
    run::<f32>(&shapes, iterations);
    run::<f16>(&shapes, iterations);
    run::<bf16>(&shapes, iterations);
}

/// Every module the build produced parses in the simulator, and every module was assembled
/// for all four architectures when ptxas was available at build time.
#[test]
fn every_module_parses_and_was_assembled() {
    let modules = kernels::modules();
    assert_eq!(modules.len(), KernelId::ALL.len());
    SimDevice::new().expect("every module parses in the simulator");
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

/// Layout checks happen before anything is launched: a partial too large for the device's
/// shared memory and a policy without the kernels' alignment are clear errors; a partial
/// above 48 KiB runs where the device allows it (CUDA's opt-in, modelled by the simulator).
#[test]
fn layouts_the_kernels_cannot_run_are_errors() {
    let device = SimDevice::with_options(SimOptions {
        max_shared_bytes: 64 * 1024,
        ..SimOptions::default()
    })
    .unwrap();
    let config = SpectralSgdConfig::default();
    let too_wide = [MatrixShape::new(2, 20_000)];
    let error = SpectralSgd::<Simulated>::on_device(&too_wide, config, device.clone()).unwrap_err();
    assert!(matches!(error, Error::DeviceLimit(_)), "{error}");
    assert!(error.to_string().contains("shared memory"), "{error}");
    let cpu_policy = BatchLayout::new(&[MatrixShape::new(4, 4)], BlockPolicy::CPU).unwrap();
    let error = SpectralSgd::<Simulated>::on_device_with_layout(cpu_policy, config, device.clone())
        .unwrap_err();
    assert!(error.to_string().contains("align"), "{error}");
    assert_eq!(device.stats().launches, 0, "nothing was launched");

    // 13000 columns: 52 KiB of partial, above the default 48 KiB.
    let wide = [MatrixShape::new(2, 13_000)];
    assert!(
        plan::power_shared_bytes(&BatchLayout::new(&wide, BlockPolicy::CUDA).unwrap()).unwrap()
            > 48 * 1024
    );
    let mut sim = SpectralSgd::<Simulated>::on_device(&wide, config, device.clone()).unwrap();
    let mut weights = upload(&device, &random_batch::<f32>(&wide, 0.5, 1));
    let grads = upload(&device, &random_batch::<f32>(&wide, 1.0, 2));
    sim.step(&mut weights, &grads).unwrap();
    assert!(sim.report().unwrap().all_updated());
}

/// Wrong lengths, counts and a buffer of another device are errors before anything is
/// launched; no report exists before the first step.
#[test]
fn bad_buffers_are_errors_before_any_launch() {
    let shapes = [MatrixShape::new(16, 8), MatrixShape::new(4, 4)];
    let device = SimDevice::new().unwrap();
    let other = SimDevice::new().unwrap();
    let mut sim = sim_optimizer(&device, &shapes, SpectralSgdConfig::default());
    assert!(
        matches!(sim.report(), Err(Error::InvalidArgument(_))),
        "no step taken yet"
    );
    let mut weights = upload(&device, &[vec![0.5f32; 128], vec![0.5f32; 16]]);
    let short = upload(&device, &[vec![1.0f32; 128], vec![1.0f32; 15]]);
    assert!(matches!(
        sim.step(&mut weights, &short),
        Err(Error::LengthMismatch { index: 1, .. })
    ));
    assert!(matches!(
        sim.step(&mut weights[..1], &short[..1]),
        Err(Error::MatrixCountMismatch { .. })
    ));
    let foreign = upload(&other, &[vec![1.0f32; 128], vec![1.0f32; 16]]);
    assert!(matches!(
        sim.step(&mut weights, &foreign),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(device.stats().launches, 0);
    assert_eq!(sim.steps(), 0, "failed steps do not count");
    assert_eq!(download(&device, &weights)[0], vec![0.5f32; 128]);
}

/// `U v == 0` with `U != 0` (a start vector orthogonal to every row): both backends re-seed
/// `v` with the same `±1/sqrt(n)` vector, bit for bit, mark it cold, store M and leave W
/// alone; the next step (warm rounds only: the host does not know about the re-seed) updates
/// the matrix from the new vector, again alike.
#[test]
fn orthogonal_start_vector_is_reseeded_alike_on_both_backends() {
    let shapes = vec![MatrixShape::new(6, 8), MatrixShape::new(5, 4)];
    let config = SpectralSgdConfig {
        cold_iterations: 2,
        ..SpectralSgdConfig::default()
    };
    let mut first = vec![0.0f32; 8];
    first[0] = 1.0;
    let start = HostState {
        momentum: vec![0.0; 6 * 8 + 5 * 4],
        power_vectors: [first, vec![0.5f32; 4]].concat(),
        warm: vec![false, false],
    };
    let device = SimDevice::new().unwrap();
    let mut sim = sim_optimizer(&device, &shapes, config);
    let mut cpu = cpu_optimizer(&shapes, config);
    sim.set_state(start.clone()).unwrap();
    cpu.set_state(start).unwrap();
    let before: Vec<Vec<f32>> = shapes.iter().map(|&s| random_matrix(s, 0.5, 8)).collect();
    let mut grads: Vec<Vec<f32>> = shapes.iter().map(|&s| random_matrix(s, 1.0, 9)).collect();
    // Column 0 of matrix 0 is zero, so U e_0 = 0 while U != 0.
    grads[0].iter_mut().step_by(8).for_each(|g| *g = 0.0);
    let mut weights = upload(&device, &before);
    let mut cpu_weights = before.clone();
    step_both(
        "re-seed",
        &device,
        &mut sim,
        &mut weights,
        &mut cpu,
        &mut cpu_weights,
        &grads,
    );
    let report = sim.report().unwrap();
    assert_eq!(report.matrices[0].status, MatrixStatus::Reseeded);
    assert_eq!(report.matrices[1].status, MatrixStatus::Updated);
    assert_eq!(
        bits(&download(&device, &weights)[0]),
        bits(&before[0]),
        "weights untouched"
    );
    assert_eq!(bits(&cpu_weights[0]), bits(&before[0]));
    assert_eq!(
        bits(&sim.momentum_to_host(0).unwrap()),
        bits(cpu.momentum(0)),
        "momentum stored"
    );
    assert!(cpu.momentum(0).iter().any(|&m| m != 0.0));
    let v = sim.power_vector_to_host(0).unwrap();
    assert_eq!(
        bits(&v),
        bits(cpu.power_vector(0)),
        "the same re-seeded vector"
    );
    let expected = 1.0 / 8f32.sqrt();
    assert!(v.iter().all(|x| x.abs() == expected), "{v:?}");
    assert!(
        v.iter().any(|&x| x > 0.0) && v.iter().any(|&x| x < 0.0),
        "mixed signs: {v:?}"
    );
    assert_eq!(sim.state().unwrap().warm, vec![false, true]);
    assert_eq!(cpu.state().unwrap().warm, vec![false, true]);

    let what = "after re-seed";
    let launches = step_both(
        what,
        &device,
        &mut sim,
        &mut weights,
        &mut cpu,
        &mut cpu_weights,
        &grads,
    );
    assert_eq!(launches, u64::from(2 * config.warm_iterations + 1));
    assert_eq!(
        sim.report().unwrap().matrices[0].status,
        MatrixStatus::Updated
    );
}

/// The state moves between backends: a device state saved after two steps loads into the
/// CPU optimizer (and back, bit for bit), and the next steps on both agree.
#[test]
fn state_round_trips_between_the_device_and_the_cpu() {
    let shapes = ragged_shapes();
    let config = configs()[2];
    let device = SimDevice::new().unwrap();
    let mut sim = sim_optimizer(&device, &shapes, config);
    let mut weights: Vec<Vec<f32>> = random_batch(&shapes, 0.5, 1);
    let mut sim_weights = upload(&device, &weights);
    for step in 0..2 {
        sim_step(
            &device,
            &mut sim,
            &mut sim_weights,
            &random_batch(&shapes, 1.0, 10 * step),
        );
    }
    let bytes = sim.state_to_bytes().unwrap();
    let mut cpu = cpu_optimizer(&shapes, config);
    cpu.load_state_from_bytes(&bytes).unwrap();
    assert_eq!(cpu.steps(), 2);
    assert_eq!(
        cpu.state().unwrap(),
        sim.state().unwrap(),
        "identical state"
    );
    // Back from the CPU to a fresh device optimizer, bit for bit (the files' metadata order
    // may differ from save to save; their contents may not).
    let mut other = sim_optimizer(&device, &shapes, SpectralSgdConfig::default());
    other
        .load_state_from_bytes(&cpu.state_to_bytes().unwrap())
        .unwrap();
    assert_eq!(
        other.state().unwrap(),
        sim.state().unwrap(),
        "CPU to device, bit for bit"
    );
    assert_eq!((other.steps(), other.config()), (2, &config));

    weights = download(&device, &sim_weights);
    for step in 2..4 {
        let grads = random_batch(&shapes, 1.0, 10 * step);
        let what = format!("after the round trip, step {step}");
        let launches = step_both(
            &what,
            &device,
            &mut sim,
            &mut sim_weights,
            &mut cpu,
            &mut weights,
            &grads,
        );
        assert_eq!(
            launches,
            u64::from(2 * config.warm_iterations + 1),
            "{what}: warm"
        );
    }
    let wrong = HostState {
        momentum: vec![0.0; 3],
        ..sim.state().unwrap()
    };
    let kept = sim.state().unwrap();
    assert!(matches!(
        sim.set_state(wrong),
        Err(Error::StateShapeMismatch(_))
    ));
    assert_eq!(
        sim.state().unwrap(),
        kept,
        "a failed import changes nothing"
    );
}

/// A reset re-seeds every vector from the config's seed and the next step cold-starts, with
/// the cold rounds launched again; a state with some cold vectors does the same, the warm
/// matrices taking only their warm iterations; both as on the CPU.
#[test]
fn resets_and_partly_cold_states_run_the_cold_rounds() {
    let shapes = ragged_shapes();
    let config = SpectralSgdConfig {
        cold_iterations: 4,
        ..configs()[0]
    };
    let device = SimDevice::new().unwrap();
    let mut sim = sim_optimizer(&device, &shapes, config);
    let mut cpu = cpu_optimizer(&shapes, config);
    let fresh = sim.state().unwrap();
    let mut weights: Vec<Vec<f32>> = random_batch(&shapes, 0.5, 2);
    let mut sim_weights = upload(&device, &weights);
    let mut step = |sim: &mut SpectralSgd<Simulated>, cpu: &mut SpectralSgd, seed: u64| {
        let grads = random_batch(&shapes, 1.0, seed);
        let what = format!("seed {seed}");
        step_both(
            &what,
            &device,
            sim,
            &mut sim_weights,
            cpu,
            &mut weights,
            &grads,
        )
    };
    let cold = u64::from(2 * config.cold_iterations + 1);
    let warm = u64::from(2 * config.warm_iterations + 1);
    assert_eq!(step(&mut sim, &mut cpu, 1), cold);
    assert_eq!(step(&mut sim, &mut cpu, 2), warm);
    sim.reset_power_vectors().unwrap();
    cpu.reset_power_vectors().unwrap();
    let reset = sim.state().unwrap();
    assert_eq!(
        bits(&reset.power_vectors),
        bits(&fresh.power_vectors),
        "seeded as at creation"
    );
    assert!(reset.warm.iter().all(|&w| !w));
    assert_eq!(step(&mut sim, &mut cpu, 3), cold);
    assert_eq!(step(&mut sim, &mut cpu, 4), warm);

    let mut partly_cold = sim.state().unwrap();
    for flag in partly_cold.warm.iter_mut().step_by(3) {
        *flag = false;
    }
    sim.set_state(partly_cold.clone()).unwrap();
    cpu.set_state(partly_cold).unwrap();
    assert_eq!(step(&mut sim, &mut cpu, 5), cold);
    assert_eq!(step(&mut sim, &mut cpu, 6), warm);
}

/// The matrix table is rebuilt when the caller's buffers move (new allocations, another
/// element type), and only then: the steps stay correct, and steps on the same buffers
/// allocate nothing on the device.
#[test]
fn the_matrix_table_follows_moved_buffers() {
    let shapes = ragged_shapes();
    let config = configs()[1];
    let device = SimDevice::new().unwrap();
    let mut sim = sim_optimizer(&device, &shapes, config);
    let mut cpu = cpu_optimizer(&shapes, config);
    let mut weights: Vec<Vec<f32>> = random_batch(&shapes, 0.5, 3);
    let mut sim_weights = upload(&device, &weights);
    let mut grads = upload(&device, &random_batch::<f32>(&shapes, 1.0, 0));
    sim.step(&mut sim_weights, &grads).unwrap();
    cpu.step(&mut weights, &download(&device, &grads)).unwrap();
    let held = device.allocated_bytes().unwrap();
    let uploads = device.stats().backend_uploads;
    for step in 1..3 {
        let before = weights.clone();
        let host_grads = random_batch::<f32>(&shapes, 1.0, 100 * step);
        // Overwritten in place: the same addresses, so the matrix table stays valid.
        for (slice, values) in grads.iter_mut().zip(&host_grads) {
            device.write(slice, values).unwrap();
        }
        let cpu_report = cpu.step(&mut weights, &host_grads).unwrap();
        sim.step(&mut sim_weights, &grads).unwrap();
        let what = format!("same buffers, step {step}");
        compare_reports(&what, &sim.report().unwrap().matrices, &cpu_report.matrices);
        compare_state(
            &what,
            &sim,
            &cpu,
            &before,
            &download(&device, &sim_weights),
            &weights,
        );
    }
    assert_eq!(
        device.allocated_bytes().unwrap(),
        held,
        "no device allocation per step"
    );
    assert_eq!(
        device.stats().backend_uploads,
        uploads,
        "no table upload for unchanged buffers"
    );

    // New weight buffers holding the same values: the kernels must write the new ones.
    let mut sim_weights = upload(&device, &download(&device, &sim_weights));
    let host_grads = random_batch::<f32>(&shapes, 1.0, 999);
    let what = "moved buffers";
    let uploads = device.stats().backend_uploads;
    step_both(
        what,
        &device,
        &mut sim,
        &mut sim_weights,
        &mut cpu,
        &mut weights,
        &host_grads,
    );
    assert_eq!(
        device.stats().backend_uploads,
        uploads + 1,
        "one table upload for moved buffers"
    );

    // The same optimizer stepping bf16 buffers: the table is rebuilt for the element type.
    let mut cpu_bf16: Vec<Vec<bf16>> = weights
        .iter()
        .map(|w| w.iter().map(|&x| bf16::from_f32(x)).collect())
        .collect();
    let mut sim_bf16 = upload(&device, &cpu_bf16);
    let host_grads = random_batch::<bf16>(&shapes, 1.0, 555);
    let what = "bf16 buffers";
    step_both(
        what,
        &device,
        &mut sim,
        &mut sim_bf16,
        &mut cpu,
        &mut cpu_bf16,
        &host_grads,
    );
}

/// A caller's buffer type whose `Borrow` and `BorrowMut` disagree (a large buffer one way, a
/// small one the other).
struct TwoFaced<B> {
    large: B,
    small: B,
}

impl<B> std::borrow::Borrow<B> for TwoFaced<B> {
    fn borrow(&self) -> &B {
        &self.large
    }
}

impl<B> std::borrow::BorrowMut<B> for TwoFaced<B> {
    fn borrow_mut(&mut self) -> &mut B {
        &mut self.small
    }
}

impl std::borrow::Borrow<[f32]> for TwoFaced<Vec<f32>> {
    fn borrow(&self) -> &[f32] {
        &self.large
    }
}

impl std::borrow::BorrowMut<[f32]> for TwoFaced<Vec<f32>> {
    fn borrow_mut(&mut self) -> &mut [f32] {
        &mut self.small
    }
}

/// Disagreeing borrows cannot make a step touch more than the buffer it writes: both
/// backends check the lengths of the very borrows whose memory they use, and refuse before
/// anything runs.
#[test]
fn inconsistent_borrows_are_length_errors_not_overruns() {
    let shapes = [MatrixShape::new(16, 8)];
    let device = SimDevice::new().unwrap();
    let mut sim = sim_optimizer(&device, &shapes, SpectralSgdConfig::default());
    let mut weights = vec![TwoFaced {
        large: device.upload(&[0.5f32; 128]).unwrap(),
        small: device.upload(&[0.5f32; 16]).unwrap(),
    }];
    let grads = upload(&device, &[vec![1.0f32; 128]]);
    assert!(matches!(
        sim.step(&mut weights, &grads),
        Err(Error::LengthMismatch { got: 16, .. })
    ));
    assert_eq!(device.stats().launches, 0);
    let mut cpu = cpu_optimizer(&shapes, SpectralSgdConfig::default());
    let mut cpu_weights = vec![TwoFaced {
        large: vec![0.5f32; 128],
        small: vec![0.5f32; 16],
    }];
    assert!(matches!(
        cpu.step(&mut cpu_weights, &[vec![1.0f32; 128]]),
        Err(Error::LengthMismatch { got: 16, .. })
    ));
    assert_eq!(cpu.steps(), 0);
}

/// `eta s / sigma` overflowing `f32` (a huge learning rate on a tiny direction): both
/// backends skip the matrix with its `sigma`, leave `W` and `M` untouched, and keep the
/// normalised power vector, warm (math §5.4).
#[test]
fn an_overflowing_coefficient_skips_the_matrix_alike_on_both_backends() {
    let shapes = vec![MatrixShape::new(12, 8), MatrixShape::new(6, 4)];
    let config = SpectralSgdConfig {
        learning_rate: 1e30,
        cold_iterations: 3,
        ..SpectralSgdConfig::default()
    };
    let device = SimDevice::new().unwrap();
    let mut sim = sim_optimizer(&device, &shapes, config);
    let mut cpu = cpu_optimizer(&shapes, config);
    let before: Vec<Vec<f32>> = random_batch(&shapes, 0.5, 20);
    let mut grads: Vec<Vec<f32>> = random_batch(&shapes, 1e-12, 21);
    // The second matrix's direction is large enough that eta s / sigma stays finite (and small
    // enough that its squares do too): it updates.
    grads[1] = random_batch(&shapes[1..], 1e15, 22).remove(0);
    let mut weights = upload(&device, &before);
    let mut cpu_weights = before.clone();
    step_both(
        "overflow",
        &device,
        &mut sim,
        &mut weights,
        &mut cpu,
        &mut cpu_weights,
        &grads,
    );
    let report = sim.report().unwrap();
    assert_eq!(report.matrices[0].status, MatrixStatus::SkippedNonFinite);
    assert!(
        report.matrices[0].sigma.is_some_and(|s| s > 0.0),
        "sigma reported"
    );
    assert_eq!(report.matrices[1].status, MatrixStatus::Updated);
    assert_eq!(
        bits(&download(&device, &weights)[0]),
        bits(&before[0]),
        "W untouched"
    );
    assert_eq!(bits(&cpu_weights[0]), bits(&before[0]));
    assert!(
        sim.momentum_to_host(0).unwrap().iter().all(|&m| m == 0.0),
        "M untouched"
    );
    assert!(cpu.momentum(0).iter().all(|&m| m == 0.0));
    assert_eq!(
        sim.state().unwrap().warm,
        vec![true, true],
        "normalised, so warm"
    );
    assert_eq!(cpu.state().unwrap().warm, vec![true, true]);
    let v = sim.power_vector_to_host(0).unwrap();
    for (k, (&s, &c)) in v.iter().zip(cpu.power_vector(0)).enumerate() {
        assert_close(&format!("v[{k}]"), f64::from(s), f64::from(c), 1e-4);
    }
}

/// Stochastic rounding in the update kernel gives the CPU path's bits exactly, element for
/// element, on the 4-wide and the scalar path, with blocks that start inside a rounding
/// group, under linear and shuffled CTA order, over several steps (each step a different
/// stream); [`RoundingCase`] says why the comparison is exact and not vacuous.
fn stochastic_rounding_conformance<T: Element>() {
    let case = RoundingCase::<T>::new();
    for order in [CtaOrder::Linear, CtaOrder::Shuffled { seed: 3 }] {
        let device = SimDevice::with_options(SimOptions {
            cta_order: order,
            ..SimOptions::default()
        })
        .unwrap();
        let mut sim = sim_optimizer(&device, &case.shapes, case.config);
        let mut weights = upload(&device, &case.initial);
        for grads in &case.grads {
            sim.set_state(exact_state(sim.layout())).unwrap();
            sim_step(&device, &mut sim, &mut weights, grads);
        }
        case.check(&format!("{order:?}"), &download(&device, &weights));
    }
}

#[test]
#[cfg_attr(
    not(target_arch = "x86_64"),
    ignore = "needs an x86-64 CPU with AVX2+FMA"
)]
fn stochastic_rounding_bf16_is_bitwise_the_cpu_path() {
    stochastic_rounding_conformance::<bf16>();
}

#[test]
#[cfg_attr(
    not(target_arch = "x86_64"),
    ignore = "needs an x86-64 CPU with AVX2+FMA"
)]
fn stochastic_rounding_f16_is_bitwise_the_cpu_path() {
    stochastic_rounding_conformance::<f16>();
}

/// Buffers that hold several matrices each (a stack, a convolution kernel): the packed step
/// is the matrix-by-matrix step bit for bit (weights, copies, reports) when every matrix that
/// could move 4-wide starts at a multiple of 4 elements in its buffer (as in a stack of equal
/// matrices); one that starts elsewhere moves one element at a time, within rounding of the
/// 4-wide result. Bad packings and lengths are errors before any launch.
#[test]
fn packed_buffers_step_as_one_matrix_per_buffer() {
    // Three matrices 4-wide in one buffer (offsets 0, 32, 64), 3- and 9-column ones that
    // move one element at a time anyway, at odd offsets.
    let aligned = [
        MatrixShape::new(4, 8),
        MatrixShape::new(4, 8),
        MatrixShape::new(4, 8),
        MatrixShape::new(5, 3),
        MatrixShape::new(7, 9),
        MatrixShape::new(7, 9),
    ];
    packed_matches_one_by_one(&aligned, &[3, 1, 2], true);
    // A 4-wide matrix 30 elements into its buffer.
    let misaligned = [
        MatrixShape::new(5, 3),
        MatrixShape::new(5, 3),
        MatrixShape::new(4, 8),
        MatrixShape::new(16, 8),
    ];
    packed_matches_one_by_one(&misaligned, &[3, 1], false);
    packed_step_errors();
}

fn assert_matches(what: &str, packed: &[f32], single: &[f32], exact: bool) {
    if exact {
        assert_same_bits(what, packed, single);
        return;
    }
    let largest = single.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (index, (p, s)) in packed.iter().zip(single).enumerate() {
        assert!(
            (p - s).abs() <= 1e-5 * largest,
            "{what}[{index}]: packed {p}, one by one {s}"
        );
    }
}

fn packed_matches_one_by_one(shapes: &[MatrixShape], counts: &[usize], exact: bool) {
    let config = SpectralSgdConfig {
        weight_decay: 0.1,
        ..configs()[0]
    };
    let weights: Vec<Vec<f32>> = random_batch(shapes, 0.5, 71);
    let steps: Vec<Vec<Vec<f32>>> = (0..3).map(|t| random_batch(shapes, 1.0, 72 + t)).collect();
    let concat = |matrices: &[Vec<f32>]| -> Vec<Vec<f32>> {
        let mut at = 0;
        counts
            .iter()
            .map(|&count| {
                let buffer = matrices[at..at + count].concat();
                at += count;
                buffer
            })
            .collect()
    };
    let sigmas = |report: StepReport| -> Vec<f32> {
        report.matrices.iter().map(|m| m.sigma.unwrap()).collect()
    };

    // f32 in place.
    let device = SimDevice::new().unwrap();
    let mut one_by_one = sim_optimizer(&device, shapes, config);
    let mut packed = sim_optimizer(&device, shapes, config);
    let mut single = upload(&device, &weights);
    let mut buffers = upload(&device, &concat(&weights));
    for (step, grads) in steps.iter().enumerate() {
        let single_grads = upload(&device, grads);
        one_by_one.step(&mut single, &single_grads).unwrap();
        let packed_grads = upload(&device, &concat(grads));
        let grad_refs: Vec<&SimSlice<f32>> = packed_grads.iter().collect();
        let mut weight_refs: Vec<&mut SimSlice<f32>> = buffers.iter_mut().collect();
        packed
            .step_packed(counts, &mut weight_refs, &grad_refs)
            .unwrap();
        assert_matches(
            &format!("sigma, step {step}"),
            &sigmas(packed.report().unwrap()),
            &sigmas(one_by_one.report().unwrap()),
            exact,
        );
    }
    for (buffer, (packed, single)) in download(&device, &buffers)
        .iter()
        .zip(concat(&download(&device, &single)))
        .enumerate()
    {
        assert_matches(&format!("f32 buffer {buffer}"), packed, &single, exact);
    }
    assert_eq!(packed.steps(), 3);

    // f32 master weights, bf16 gradients, bf16 copies.
    let narrow = |matrices: &[Vec<f32>]| -> Vec<Vec<bf16>> {
        matrices
            .iter()
            .map(|m| m.iter().map(|&v| bf16::from_f32(v)).collect())
            .collect()
    };
    let mut one_by_one = sim_optimizer(&device, shapes, config);
    let mut packed = sim_optimizer(&device, shapes, config);
    let mut single = upload(&device, &weights);
    let mut single_copies = upload(&device, &narrow(&weights));
    let mut buffers = upload(&device, &concat(&weights));
    let mut copies = upload(&device, &narrow(&concat(&weights)));
    for grads in &steps {
        let single_grads = upload(&device, &narrow(grads));
        one_by_one
            .step_with_copy(&mut single, &single_grads, &mut single_copies)
            .unwrap();
        let packed_grads = upload(&device, &narrow(&concat(grads)));
        let grad_refs: Vec<&SimSlice<bf16>> = packed_grads.iter().collect();
        let mut weight_refs: Vec<&mut SimSlice<f32>> = buffers.iter_mut().collect();
        let mut copy_refs: Vec<&mut SimSlice<bf16>> = copies.iter_mut().collect();
        packed
            .step_packed_with_copy(counts, &mut weight_refs, &grad_refs, &mut copy_refs)
            .unwrap();
    }
    let single_weights = concat(&download(&device, &single));
    for (buffer, packed) in download(&device, &buffers).iter().enumerate() {
        assert_matches(
            &format!("master buffer {buffer}"),
            packed,
            &single_weights[buffer],
            exact,
        );
    }
    // Each copy is its own buffer's weights rounded to nearest, whatever its alignment.
    for (copy, weights) in download(&device, &copies)
        .iter()
        .zip(download(&device, &buffers))
    {
        let rounded: Vec<bf16> = weights.iter().map(|&w| bf16::from_f32(w)).collect();
        assert_same_bits("copy", copy, &rounded);
    }
}

fn packed_step_errors() {
    let shapes = [
        MatrixShape::new(5, 3),
        MatrixShape::new(5, 3),
        MatrixShape::new(4, 8),
        MatrixShape::new(16, 8),
    ];
    let device = SimDevice::new().unwrap();
    let mut packed = sim_optimizer(&device, &shapes, SpectralSgdConfig::default());
    let mut buffers = upload(&device, &[vec![0.5f32; 62], vec![0.5f32; 128]]);
    let grads = upload(&device, &[vec![1.0f32; 62], vec![1.0f32; 128]]);
    let grad_refs: Vec<&SimSlice<f32>> = grads.iter().collect();
    let mut weight_refs: Vec<&mut SimSlice<f32>> = buffers.iter_mut().collect();
    for bad_counts in [&[3, 0][..], &[2, 1], &[4], &[1, 1], &[3, 1, 0]] {
        let error = packed
            .step_packed(bad_counts, &mut weight_refs, &grad_refs)
            .unwrap_err();
        assert!(
            matches!(
                error,
                Error::InvalidArgument(_) | Error::MatrixCountMismatch { .. }
            ),
            "{bad_counts:?}: {error}"
        );
    }
    let short = upload(&device, &[vec![0.0f32; 61], vec![0.0f32; 128]]);
    let short_refs: Vec<&SimSlice<f32>> = short.iter().collect();
    let error = packed
        .step_packed(&[3, 1], &mut weight_refs, &short_refs)
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("gradient buffer 0 holds 61 elements; its matrices need 62"),
        "{error}"
    );
    assert_eq!(device.stats().launches, 0);
    assert_eq!(packed.steps(), 0);
    assert_eq!(download(&device, &buffers)[0], vec![0.5f32; 62]);
}
