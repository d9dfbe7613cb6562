//! The orthogonalised rule (math §5b) on the device backend, run on the simulated device: the
//! same orchestration as on a GPU (the element-wise PTX kernels, and the Newton–Schulz
//! products through the device's GEMM, which the simulator computes on the host in `bf16`
//! with `f32` accumulation as cuBLAS does). Checked against the CPU path, which iterates in
//! `f32`: the same statuses and momentum to the bit, weights within the bound that `bf16`
//! iterates allow, the corner cases (zero, non-finite, a diverging schedule, copies, 16-bit
//! weights) as the CPU path treats them.

mod common;

use common::{
    assert_same_bits, change, orthogonal_change_bound as change_bound, random_matrix,
    relative_distance,
};
use spectral_step::cpu::KernelPath;
use spectral_step::half::bf16;
use spectral_step::newton_schulz::Coefficients;
use spectral_step::sim::{CtaOrder, SimDevice, SimOptions, Simulated};
use spectral_step::{
    Element, MatrixShape, MatrixStatus, Rounding, Schedule, SpectralSgd, SpectralSgdConfig,
    UpdateRule,
};

fn shapes() -> Vec<MatrixShape> {
    [
        (1, 1),
        (1, 17),
        (17, 1),
        (13, 7),
        (7, 13),
        (13, 7),
        (97, 3),
        (3, 97),
        (31, 31),
        (48, 160),
        (160, 48),
    ]
    .into_iter()
    .map(|(fan_out, fan_in)| MatrixShape::new(fan_out, fan_in))
    .collect()
}

fn config(schedule: Schedule) -> SpectralSgdConfig {
    SpectralSgdConfig {
        learning_rate: 0.05,
        weight_decay: 0.1,
        update: UpdateRule::Orthogonalised(schedule),
        ..SpectralSgdConfig::default()
    }
}

fn cubic() -> Schedule {
    Schedule::Custom(Coefficients::new(&[(1.5, -0.5, 0.0); 12]).unwrap())
}

struct Outcome<T> {
    weights: Vec<Vec<T>>,
    momentum: Vec<Vec<f32>>,
    statuses: Vec<MatrixStatus>,
}

/// `steps` steps of `config` from `weights` on `grads` (the same every step) on the CPU and
/// on a simulated device.
fn both<T: Element + bytemuck::Pod>(
    config: SpectralSgdConfig,
    shapes: &[MatrixShape],
    weights: &[Vec<T>],
    grads: &[Vec<T>],
    steps: usize,
    device: &SimDevice,
) -> (Outcome<T>, Outcome<T>) {
    let mut cpu = SpectralSgd::new(shapes, config).unwrap();
    // The device's momentum is the FMA sequence of math §5.3: the CPU's FMA path is the same
    // to the bit.
    cpu.set_kernel_path(KernelPath::Avx2Fma)
        .expect("these tests compare momentum bit for bit with the CPU's FMA path (AVX2+FMA)");
    let mut cpu_weights = weights.to_vec();
    let mut report = None;
    for _ in 0..steps {
        report = Some(cpu.step(&mut cpu_weights, grads).unwrap());
    }
    let cpu_outcome = Outcome {
        momentum: (0..shapes.len())
            .map(|j| cpu.momentum(j).to_vec())
            .collect(),
        statuses: report.unwrap().matrices.iter().map(|m| m.status).collect(),
        weights: cpu_weights,
    };
    let mut on_device =
        SpectralSgd::<Simulated>::on_device(shapes, config, device.clone()).unwrap();
    let mut device_weights: Vec<_> = weights.iter().map(|w| device.upload(w).unwrap()).collect();
    let device_grads: Vec<_> = grads.iter().map(|g| device.upload(g).unwrap()).collect();
    for _ in 0..steps {
        on_device.step(&mut device_weights, &device_grads).unwrap();
    }
    let report = on_device.report().unwrap();
    assert!(
        report
            .matrices
            .iter()
            .all(|m| m.sigma.is_none() || m.sigma == Some(0.0))
    );
    let device_outcome = Outcome {
        weights: device_weights
            .iter()
            .map(|w| device.download(w).unwrap())
            .collect(),
        momentum: (0..shapes.len())
            .map(|j| on_device.momentum_to_host(j).unwrap())
            .collect(),
        statuses: report.matrices.iter().map(|m| m.status).collect(),
    };
    (cpu_outcome, device_outcome)
}

#[test]
fn one_device_step_matches_the_cpu_step_within_bf16_iterates() {
    let shapes = shapes();
    let weights: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 0.1, 100 + j as u64))
        .collect();
    let grads: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 1.0, 200 + j as u64))
        .collect();
    let device = SimDevice::new().unwrap();
    for (name, schedule) in [
        ("Muon", Schedule::MUON),
        ("Polar Express x8", Schedule::PolarExpress { iterations: 8 }),
        ("cubic x12", cubic()),
    ] {
        let (cpu, on_device) = both(config(schedule), &shapes, &weights, &grads, 2, &device);
        assert_eq!(on_device.statuses, cpu.statuses, "{name}");
        assert!(cpu.statuses.iter().all(|&s| s == MatrixStatus::Updated));
        for (j, shape) in shapes.iter().enumerate() {
            assert_same_bits("momentum", &on_device.momentum[j], &cpu.momentum[j]);
            let device_change = change(&on_device.weights[j], &weights[j]);
            let cpu_change = change(&cpu.weights[j], &weights[j]);
            let distance = relative_distance(&device_change, &cpu_change);
            let (m, n) = (shape.fan_out, shape.fan_in);
            eprintln!("{name} {m}x{n}: device vs CPU change {distance:.2e}");
            assert!(
                distance < change_bound(*shape),
                "{name} {m}x{n}: device and CPU changes differ by {distance:.3e}"
            );
        }
    }
}

#[test]
fn zero_and_non_finite_directions_and_a_diverging_schedule_are_treated_as_on_the_cpu() {
    let shapes = [
        MatrixShape::new(8, 12),
        MatrixShape::new(12, 8),
        MatrixShape::new(5, 5),
        MatrixShape::new(6, 4),
    ];
    let weights: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 0.1, 300 + j as u64))
        .collect();
    let mut grads: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 1.0, 400 + j as u64))
        .collect();
    grads[0].fill(0.0);
    grads[1][17] = f32::NAN;
    grads[2][3] = f32::INFINITY;
    let device = SimDevice::new().unwrap();
    let (cpu, on_device) = both(
        config(Schedule::MUON),
        &shapes,
        &weights,
        &grads,
        1,
        &device,
    );
    assert_eq!(
        cpu.statuses,
        [
            MatrixStatus::ZeroDirection,
            MatrixStatus::SkippedNonFinite,
            MatrixStatus::SkippedNonFinite,
            MatrixStatus::Updated
        ]
    );
    assert_eq!(on_device.statuses, cpu.statuses);
    for (j, initial) in weights.iter().enumerate().take(3) {
        assert_same_bits("weights not updated", &on_device.weights[j], initial);
        assert_same_bits("momentum", &on_device.momentum[j], &cpu.momentum[j]);
    }
    assert!(on_device.momentum[1].iter().all(|&m| m == 0.0), "M kept");

    // Iterates that grow past f32's range: the matrix is skipped on both paths.
    let diverging = Schedule::Custom(Coefficients::new(&[(1000.0, 0.0, 0.0); 16]).unwrap());
    let (cpu, on_device) = both(
        config(diverging),
        &shapes[3..],
        &weights[3..],
        &grads[3..],
        1,
        &device,
    );
    assert_eq!(cpu.statuses, [MatrixStatus::SkippedNonFinite]);
    assert_eq!(on_device.statuses, cpu.statuses);
    assert_same_bits("skipped weights", &on_device.weights[0], &weights[3]);
    assert_same_bits("skipped momentum", &on_device.momentum[0], &cpu.momentum[0]);
}

#[test]
fn sixteen_bit_weights_and_master_copies_follow_the_cpu_path() {
    let shapes = [MatrixShape::new(24, 40), MatrixShape::new(40, 24)];
    let device = SimDevice::new().unwrap();
    for rounding in [Rounding::Nearest, Rounding::Stochastic] {
        let config = SpectralSgdConfig {
            rounding,
            ..config(Schedule::MUON)
        };
        let weights: Vec<Vec<bf16>> = shapes
            .iter()
            .enumerate()
            .map(|(j, &s)| random_matrix(s, 0.1, 500 + j as u64))
            .collect();
        let grads: Vec<Vec<bf16>> = shapes
            .iter()
            .enumerate()
            .map(|(j, &s)| random_matrix(s, 1.0, 600 + j as u64))
            .collect();
        let (cpu, on_device) = both(config, &shapes, &weights, &grads, 1, &device);
        assert_eq!(on_device.statuses, cpu.statuses);
        for j in 0..shapes.len() {
            assert_same_bits("momentum", &on_device.momentum[j], &cpu.momentum[j]);
            let distance = relative_distance(
                &change(&on_device.weights[j], &weights[j]),
                &change(&cpu.weights[j], &weights[j]),
            );
            eprintln!("bf16 weights, {rounding:?}: device vs CPU change {distance:.2e}");
            // One bf16 rounding of W on top of the iterates' difference.
            assert!(
                distance < 2.0 * change_bound(shapes[j]),
                "{rounding:?}: {distance:.3e}"
            );
        }
    }

    // f32 master weights with bf16 gradients: the copy is the weights rounded to nearest.
    let master: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 0.1, 700 + j as u64))
        .collect();
    let grads: Vec<Vec<bf16>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 1.0, 800 + j as u64))
        .collect();
    let mut optimizer =
        SpectralSgd::<Simulated>::on_device(&shapes, config(Schedule::MUON), device.clone())
            .unwrap();
    let mut weights: Vec<_> = master.iter().map(|w| device.upload(w).unwrap()).collect();
    let device_grads: Vec<_> = grads.iter().map(|g| device.upload(g).unwrap()).collect();
    let mut copies: Vec<_> = shapes
        .iter()
        .map(|s| device.alloc_zeros::<bf16>(s.len()).unwrap())
        .collect();
    optimizer
        .step_with_copy(&mut weights, &device_grads, &mut copies)
        .unwrap();
    let mut cpu = SpectralSgd::new(&shapes, config(Schedule::MUON)).unwrap();
    let mut cpu_weights = master.clone();
    let mut cpu_copies: Vec<Vec<bf16>> = shapes.iter().map(|s| vec![bf16::ZERO; s.len()]).collect();
    cpu.step_with_copy(&mut cpu_weights, &grads, &mut cpu_copies)
        .unwrap();
    for j in 0..shapes.len() {
        let updated = device.download(&weights[j]).unwrap();
        let copy = device.download(&copies[j]).unwrap();
        let expected: Vec<bf16> = updated.iter().map(|&w| bf16::from_f32(w)).collect();
        assert_same_bits("copy = rne(W)", &copy, &expected);
        let distance = relative_distance(
            &change(&updated, &master[j]),
            &change(&cpu_weights[j], &master[j]),
        );
        assert!(
            distance < change_bound(shapes[j]),
            "master weights: {distance:.3e}"
        );
    }
}

#[test]
fn steps_are_deterministic_under_any_cta_order_and_allocate_nothing_after_the_first() {
    let shapes = [
        MatrixShape::new(32, 48),
        MatrixShape::new(48, 32),
        MatrixShape::new(32, 48),
    ];
    let weights: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 0.1, 900 + j as u64))
        .collect();
    let grads: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 1.0, 1000 + j as u64))
        .collect();
    let run = |order: CtaOrder| {
        let device = SimDevice::with_options(SimOptions {
            cta_order: order,
            ..SimOptions::default()
        })
        .unwrap();
        let mut optimizer =
            SpectralSgd::<Simulated>::on_device(&shapes, config(Schedule::MUON), device.clone())
                .unwrap();
        let mut device_weights: Vec<_> =
            weights.iter().map(|w| device.upload(w).unwrap()).collect();
        let device_grads: Vec<_> = grads.iter().map(|g| device.upload(g).unwrap()).collect();
        optimizer.step(&mut device_weights, &device_grads).unwrap();
        let allocated = device.allocated_bytes().unwrap();
        let before = device.stats();
        optimizer.step(&mut device_weights, &device_grads).unwrap();
        optimizer.step(&mut device_weights, &device_grads).unwrap();
        assert_eq!(
            device.allocated_bytes().unwrap(),
            allocated,
            "no allocation"
        );
        let stats = device.stats();
        // Two steps of 5 iterations over 2 shape groups, 3 products each.
        assert_eq!(stats.gemms - before.gemms, 2 * 5 * 2 * 3);
        // Per step: norm, start, 5 x 2 polynomials, check, update.
        assert_eq!(stats.launches - before.launches, 2 * (2 + 5 * 2 + 2));
        assert_eq!(
            stats.backend_uploads, before.backend_uploads,
            "no table upload"
        );
        device_weights
            .iter()
            .map(|w| device.download(w).unwrap())
            .collect::<Vec<Vec<f32>>>()
    };
    let linear = run(CtaOrder::Linear);
    for seed in [1, 2] {
        let shuffled = run(CtaOrder::Shuffled { seed });
        for (a, b) in shuffled.iter().zip(&linear) {
            assert_same_bits("shuffled CTA order", a, b);
        }
    }
}

#[test]
fn a_device_optimizer_that_loads_an_orthogonalised_state_steps_with_that_rule() {
    let shapes = [MatrixShape::new(8, 12)];
    let rule = UpdateRule::Orthogonalised(Schedule::Custom(
        Coefficients::new(&[(3.4445, -4.775, 2.0315), (1.875, -1.25, 0.375)]).unwrap(),
    ));
    let config = SpectralSgdConfig {
        update: rule,
        ..SpectralSgdConfig::default()
    };
    let bytes = SpectralSgd::new(&shapes, config)
        .unwrap()
        .state_to_bytes()
        .unwrap();
    let device = SimDevice::new().unwrap();
    let grads_host = random_matrix::<f32>(shapes[0], 1.0, 7);
    let run = |optimizer: &mut SpectralSgd<Simulated>| {
        let mut weights = vec![device.upload(&[0.25f32; 96]).unwrap()];
        let grads = vec![device.upload(&grads_host).unwrap()];
        optimizer.step(&mut weights, &grads).unwrap();
        let report = optimizer.report().unwrap();
        assert_eq!(report.matrices[0].status, MatrixStatus::Updated);
        assert_eq!(report.matrices[0].sigma, None, "the rule forms no sigma");
        device.download(&weights[0]).unwrap()
    };
    let mut made_orthogonal =
        SpectralSgd::<Simulated>::on_device(&shapes, config, device.clone()).unwrap();
    let mut loaded =
        SpectralSgd::<Simulated>::on_device(&shapes, SpectralSgdConfig::default(), device.clone())
            .unwrap();
    loaded.load_state_from_bytes(&bytes).unwrap();
    assert_eq!(loaded.config().update, rule);
    assert_same_bits("loaded rule", &run(&mut loaded), &run(&mut made_orthogonal));
}
