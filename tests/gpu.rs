//! The CUDA backend on a real device. Tests that need a GPU are `#[ignore = "needs a CUDA
//! device"]`, so that `cargo test` lists them as ignored instead of passing them silently;
//! `scripts/gpu-check.sh` builds them and runs them with `--include-ignored` on a GPU machine
//! (also under compute-sanitizer). The same backend code runs on the simulated device in
//! `tests/kernel_conformance.rs`, which CI runs.
//! The first test runs everywhere: without a driver or device the backend must return a
//! clean error, never panic.
#![cfg(feature = "cuda")]

mod common;

use common::*;
use spectral_step::cpu::KernelPath;
use spectral_step::cuda::{
    self, BackendChoice, Cuda, CudaDevice, JitReason, LoadedFrom, cudarc::driver::CudaSlice,
};
use spectral_step::half::{bf16, f16};
use spectral_step::kernels::{self, KernelId};
use spectral_step::{
    Element, Error, MatrixShape, MatrixStatus, MomentumKind, Schedule, SpectralSgd,
    SpectralSgdConfig, UpdateRule,
};

#[test]
fn without_a_driver_or_device_the_backend_is_a_clean_error() {
    let shapes = [MatrixShape::new(8, 8)];
    let result = SpectralSgd::<Cuda>::with_backend(&shapes, SpectralSgdConfig::default());
    let choice = cuda::choose_backend();
    eprintln!("backend choice here: {choice}");
    if cuda::driver_available() {
        match (&result, &choice) {
            (Ok(_), BackendChoice::Cuda(_)) => {}
            (
                Err(Error::NoDevice(_)),
                BackendChoice::Cpu {
                    reason: Error::NoDevice(_),
                },
            ) => {}
            other => panic!("driver present: unexpected {other:?}"),
        }
    } else {
        assert!(matches!(result, Err(Error::NoCudaDriver(_))), "{result:?}");
        assert!(matches!(
            choice,
            BackendChoice::Cpu {
                reason: Error::NoCudaDriver(_)
            }
        ));
        assert!(matches!(CudaDevice::open(0), Err(Error::NoCudaDriver(_))));
    }
}

fn device() -> CudaDevice {
    CudaDevice::open(0).expect("a CUDA device (run with --ignored only on a GPU machine)")
}

fn upload<T: Element + spectral_step::cuda::cudarc::driver::DeviceRepr>(
    device: &CudaDevice,
    values: &[Vec<T>],
) -> Vec<CudaSlice<T>> {
    values
        .iter()
        .map(|v| device.stream().clone_htod(v).expect("upload"))
        .collect()
}

fn download<T: Element + spectral_step::cuda::cudarc::driver::DeviceRepr>(
    device: &CudaDevice,
    values: &[CudaSlice<T>],
) -> Vec<Vec<T>> {
    values
        .iter()
        .map(|v| device.stream().clone_dtoh(v).expect("download"))
        .collect()
}

/// The simulator suite's ragged shapes plus GPT-2-sized ones (several CTAs per matrix under
/// the CUDA block policy) and a large bias.
fn shapes() -> Vec<MatrixShape> {
    let mut shapes = ragged_shapes();
    shapes.extend([(768, 3072), (3072, 768), (50, 768), (768, 1)].map(MatrixShape::from));
    shapes
}

/// Three steps on the device against the CPU path, with the simulator suite's tolerances.
fn device_matches_cpu<T: Element + spectral_step::cuda::cudarc::driver::DeviceRepr>() {
    let shapes = shapes();
    let config = SpectralSgdConfig {
        learning_rate: 0.05,
        momentum_kind: MomentumKind::Ema,
        nesterov: true,
        weight_decay: 0.1,
        ..SpectralSgdConfig::default()
    };
    let mut cpu = SpectralSgd::new(&shapes, config).unwrap();
    let exact_momentum = KernelPath::Avx2Fma.is_supported();
    if exact_momentum {
        cpu.set_kernel_path(KernelPath::Avx2Fma).unwrap();
    }
    let device = device();
    eprintln!("device: {}", device.info());
    let mut gpu = SpectralSgd::<Cuda>::on_device(&shapes, config, device).unwrap();
    let mut weights: Vec<Vec<T>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 0.5, j as u64))
        .collect();
    let mut device_weights = upload(gpu.device(), &weights);
    for step in 0..3u64 {
        let grads: Vec<Vec<T>> = shapes
            .iter()
            .enumerate()
            .map(|(j, &s)| random_matrix(s, 1.0, 100 * step + j as u64))
            .collect();
        let device_grads = upload(gpu.device(), &grads);
        let before = weights.clone();
        let cpu_report = cpu.step(&mut weights, &grads).unwrap();
        let pending = gpu.step(&mut device_weights, &device_grads).unwrap();
        assert_eq!(pending.step, step + 1);
        let report = gpu.report().unwrap();
        let got = download(gpu.device(), &device_weights);
        for (j, shape) in shapes.iter().enumerate() {
            let what = format!(
                "{} step {step} matrix {j} ({}x{})",
                T::DTYPE.name(),
                shape.fan_out,
                shape.fan_in
            );
            assert_eq!(
                report.matrices[j].status, cpu_report.matrices[j].status,
                "{what}"
            );
            let (s, c) = (
                report.matrices[j].sigma.unwrap(),
                cpu_report.matrices[j].sigma.unwrap(),
            );
            assert_close(
                &format!("{what} sigma"),
                f64::from(s),
                f64::from(c),
                2e-5 * f64::from(c),
            );
            let momentum = gpu.momentum_to_host(j).unwrap();
            for (k, (&g, &c)) in momentum.iter().zip(cpu.momentum(j)).enumerate() {
                let tolerance = if exact_momentum {
                    0.0
                } else {
                    2.0 * f64::from(f32::EPSILON) * f64::from(c.abs())
                };
                assert_close(
                    &format!("{what} momentum[{k}]"),
                    f64::from(g),
                    f64::from(c),
                    tolerance,
                );
            }
            let largest = weights[j].iter().zip(&before[j]).fold(0.0f64, |m, (a, b)| {
                m.max((f64::from(a.to_f32()) - f64::from(b.to_f32())).abs())
            });
            for (k, ((&g, &c), &b)) in got[j].iter().zip(&weights[j]).zip(&before[j]).enumerate() {
                let (g, c, b) = (
                    f64::from(g.to_f32()),
                    f64::from(c.to_f32()),
                    f64::from(b.to_f32()),
                );
                assert_close(
                    &format!("{what} weight step[{k}]"),
                    g - b,
                    c - b,
                    1e-4 * largest + epsilon::<T>() * c.abs() + smallest_step::<T>(),
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn device_step_f32_matches_cpu() {
    device_matches_cpu::<f32>();
}

#[test]
#[ignore = "needs a CUDA device"]
fn device_step_bf16_matches_cpu() {
    device_matches_cpu::<bf16>();
}

#[test]
#[ignore = "needs a CUDA device"]
fn device_step_f16_matches_cpu() {
    device_matches_cpu::<f16>();
}

/// Stochastic rounding on the GPU gives the CPU path's bits exactly ([`RoundingCase`]): the
/// hardware's `mul.hi`, shifts and conversions do what the simulator does.
fn device_rounds_like_the_cpu<T: Element + spectral_step::cuda::cudarc::driver::DeviceRepr>() {
    let case = RoundingCase::<T>::new();
    let device = device();
    let mut gpu = SpectralSgd::<Cuda>::on_device(&case.shapes, case.config, device).unwrap();
    let mut weights = upload(gpu.device(), &case.initial);
    for grads in &case.grads {
        gpu.set_state(exact_state(gpu.layout())).unwrap();
        let grads = upload(gpu.device(), grads);
        gpu.step(&mut weights, &grads).unwrap();
    }
    case.check("CUDA", &download(gpu.device(), &weights));
}

#[test]
#[ignore = "needs a CUDA device"]
fn device_stochastic_rounding_bf16_is_bitwise_the_cpu_path() {
    device_rounds_like_the_cpu::<bf16>();
}

#[test]
#[ignore = "needs a CUDA device"]
fn device_stochastic_rounding_f16_is_bitwise_the_cpu_path() {
    device_rounds_like_the_cpu::<f16>();
}

/// `f32` master weights with 16-bit gradients on the GPU: bit for bit the `f32` step on the
/// widened gradients, and every copy its weights rounded ([`MasterWeightsCase`]).
fn device_master_weights<G: Element + spectral_step::cuda::cudarc::driver::DeviceRepr>() {
    let case = MasterWeightsCase::<G>::new(shapes());
    case.check("CUDA", |case, mode| {
        let device = device();
        let mut gpu = SpectralSgd::<Cuda>::on_device(&case.shapes, case.config, device).unwrap();
        let mut weights = upload(gpu.device(), &case.initial);
        let (mut after, mut copies_after, mut reports) = (Vec::new(), Vec::new(), Vec::new());
        for t in 0..case.grads.len() {
            let mut copies = upload(gpu.device(), &case.stale_copies);
            match mode {
                MasterMode::Widened => {
                    let grads = upload(gpu.device(), &case.widened(t));
                    gpu.step(&mut weights, &grads).unwrap();
                }
                MasterMode::Mixed => {
                    let grads = upload(gpu.device(), &case.grads[t]);
                    gpu.step(&mut weights, &grads).unwrap();
                }
                MasterMode::MixedWithCopy => {
                    let grads = upload(gpu.device(), &case.grads[t]);
                    gpu.step_with_copy(&mut weights, &grads, &mut copies)
                        .unwrap();
                }
            }
            reports.push(gpu.report().unwrap().matrices);
            after.push(download(gpu.device(), &weights));
            copies_after.push(download(gpu.device(), &copies));
        }
        MasterOutcome {
            momentum: (0..case.shapes.len())
                .map(|j| gpu.momentum_to_host(j).unwrap())
                .collect(),
            weights: after,
            reports,
            copies: (mode == MasterMode::MixedWithCopy).then_some(copies_after),
        }
    });
}

#[test]
#[ignore = "needs a CUDA device"]
fn device_master_weights_bf16_step_as_f32_on_widened_gradients() {
    device_master_weights::<bf16>();
}

#[test]
#[ignore = "needs a CUDA device"]
fn device_master_weights_f16_step_as_f32_on_widened_gradients() {
    device_master_weights::<f16>();
}

/// Wrong lengths and counts are errors before anything is launched; a NaN skips one matrix.
#[test]
#[ignore = "needs a CUDA device"]
fn device_errors_and_skips() {
    let shapes = [MatrixShape::new(16, 8), MatrixShape::new(4, 4)];
    let mut gpu =
        SpectralSgd::<Cuda>::on_device(&shapes, SpectralSgdConfig::default(), device()).unwrap();
    let mut weights = upload(gpu.device(), &[vec![0.5f32; 128], vec![0.5f32; 16]]);
    let short = upload(gpu.device(), &[vec![1.0f32; 128], vec![1.0f32; 15]]);
    assert!(matches!(
        gpu.step(&mut weights, &short),
        Err(Error::LengthMismatch { index: 1, .. })
    ));
    assert!(matches!(
        gpu.step(&mut weights[..1], &short[..1]),
        Err(Error::MatrixCountMismatch { .. })
    ));
    assert!(
        matches!(gpu.report(), Err(Error::InvalidArgument(_))),
        "no step taken yet"
    );
    let mut grads = vec![vec![1.0f32; 128], vec![0.25f32; 16]];
    grads[0][7] = f32::NAN;
    let device_grads = upload(gpu.device(), &grads);
    gpu.step(&mut weights, &device_grads).unwrap();
    let report = gpu.report().unwrap();
    assert_eq!(report.matrices[0].status, MatrixStatus::SkippedNonFinite);
    assert_eq!(report.matrices[1].status, MatrixStatus::Updated);
    assert_eq!(download(gpu.device(), &weights)[0], vec![0.5f32; 128]);
}

/// A state saved on the device loads into the CPU optimizer and the next steps agree.
#[test]
#[ignore = "needs a CUDA device"]
fn device_state_round_trips_through_the_cpu_format() {
    let shapes = [
        MatrixShape::new(33, 17),
        MatrixShape::new(64, 64),
        MatrixShape::new(9, 1),
    ];
    let config = SpectralSgdConfig::default();
    let mut gpu = SpectralSgd::<Cuda>::on_device(&shapes, config, device()).unwrap();
    let weights: Vec<Vec<f32>> = shapes.iter().map(|&s| random_matrix(s, 0.5, 1)).collect();
    let grads: Vec<Vec<f32>> = shapes.iter().map(|&s| random_matrix(s, 1.0, 2)).collect();
    let mut device_weights = upload(gpu.device(), &weights);
    gpu.step(&mut device_weights, &upload(gpu.device(), &grads))
        .unwrap();
    let bytes = gpu.state_to_bytes().unwrap();
    let mut cpu = SpectralSgd::new(&shapes, config).unwrap();
    cpu.load_state_from_bytes(&bytes).unwrap();
    for j in 0..shapes.len() {
        assert_eq!(cpu.momentum(j), gpu.momentum_to_host(j).unwrap().as_slice());
        assert_eq!(
            cpu.power_vector(j),
            gpu.power_vector_to_host(j).unwrap().as_slice()
        );
        assert!(cpu.is_warm(j));
    }
    let mut other = SpectralSgd::<Cuda>::on_device(&shapes, config, device()).unwrap();
    other
        .load_state_from_bytes(&cpu.state_to_bytes().unwrap())
        .unwrap();
    assert_eq!(other.state().unwrap(), gpu.state().unwrap());
}

/// Where each module was loaded from: with a build that assembled cubins (CI's), a device
/// of compute capability 8.x or 9.x runs every kernel from its cubin, never the JIT; a newer
/// major goes through the JIT and says why.
#[test]
#[ignore = "needs a CUDA device"]
fn every_module_loads_from_its_cubin() {
    let device = device();
    let arch = device.info().arch;
    for id in KernelId::ALL {
        let from = device.loaded_from(id);
        eprintln!("{}: {from}", id.entry_name());
        let expected = match kernels::module(id).cubin_for(arch) {
            Some(cubin) => LoadedFrom::Cubin(cubin.arch),
            None if kernels::ptxas_version().is_none() => LoadedFrom::Jit(JitReason::PtxOnlyBuild),
            None => LoadedFrom::Jit(JitReason::NoCubinFor(arch)),
        };
        assert_eq!(from, &expected, "{}", id.entry_name());
    }
    if (80..100).contains(&arch) {
        assert!(
            kernels::ptxas_version().is_some(),
            "the GPU bundle is built with ptxas, so no kernel should need the JIT"
        );
    }
}

/// A short workload for compute-sanitizer (scripts/gpu-check.sh runs it under memcheck,
/// racecheck, initcheck and synccheck): cold and warm steps of every element type on ragged
/// shapes that take both the 4-wide and the scalar paths and span several blocks, a skipped
/// matrix, and a plain power iteration.
#[test]
#[ignore = "needs a CUDA device"]
fn sanitizer_workload() {
    let shapes = ragged_shapes();
    fn steps<T: Element + spectral_step::cuda::cudarc::driver::DeviceRepr>(shapes: &[MatrixShape]) {
        let config = SpectralSgdConfig {
            cold_iterations: 3,
            nesterov: true,
            ..SpectralSgdConfig::default()
        };
        let mut gpu = SpectralSgd::<Cuda>::on_device(shapes, config, device()).unwrap();
        let weights: Vec<Vec<T>> = shapes.iter().map(|&s| random_matrix(s, 0.5, 1)).collect();
        let mut grads: Vec<Vec<T>> = shapes.iter().map(|&s| random_matrix(s, 1.0, 2)).collect();
        let mut device_weights = upload(gpu.device(), &weights);
        let device_grads = upload(gpu.device(), &grads);
        gpu.step(&mut device_weights, &device_grads).unwrap();
        gpu.step(&mut device_weights, &device_grads).unwrap();
        grads[3][0] = T::from_f32_rne(f32::NAN);
        let device_grads = upload(gpu.device(), &grads);
        gpu.step(&mut device_weights, &device_grads).unwrap();
        let report = gpu.report().unwrap();
        assert_eq!(report.matrices[3].status, MatrixStatus::SkippedNonFinite);
        let mut power = cuda::PowerIteration::new(shapes, device()).unwrap();
        let matrices = upload(power.device(), &weights);
        power.iterate(&matrices, 2).unwrap();
        assert!(power.report().unwrap().all_updated());
        // The orthogonalised rule: its kernels and cuBLAS's products on the same stream.
        let config = SpectralSgdConfig {
            update: UpdateRule::MUON,
            ..config
        };
        let mut gpu = SpectralSgd::<Cuda>::on_device(shapes, config, device()).unwrap();
        let mut device_weights = upload(gpu.device(), &weights);
        gpu.step(&mut device_weights, &device_grads).unwrap();
        let report = gpu.report().unwrap();
        assert_eq!(report.matrices[3].status, MatrixStatus::SkippedNonFinite);
    }
    steps::<f32>(&shapes);
    steps::<bf16>(&shapes);
    steps::<f16>(&shapes);
}

/// Buffers allocated through another handle of the same device (another `CudaDevice::open(0)`,
/// which opens the same primary context) are accepted: the same-device check compares the
/// driver context, not the handle.
#[test]
#[ignore = "needs a CUDA device"]
fn buffers_of_another_handle_of_the_same_device_are_accepted() {
    let shapes = [MatrixShape::new(16, 8)];
    let mut gpu =
        SpectralSgd::<Cuda>::on_device(&shapes, SpectralSgdConfig::default(), device()).unwrap();
    let other = device();
    let mut weights = upload(&other, &[vec![0.5f32; 128]]);
    let grads = upload(&other, &[random_matrix::<f32>(shapes[0], 1.0, 3)]);
    gpu.step(&mut weights, &grads).unwrap();
    assert!(gpu.report().unwrap().all_updated());
    assert_ne!(download(&other, &weights)[0], vec![0.5f32; 128]);
}

/// cuBLAS loads (CUDA 13's name first, then CUDA 12's) or the error names every file tried.
/// Runs everywhere: a machine without cuBLAS must get the typed error, not a panic.
#[test]
fn cublas_loads_or_names_every_library_file_it_tried() {
    use spectral_step::cuda::cublas::{self, CUBLAS_LIBRARY_NAMES};
    match cublas::load() {
        Ok(name) => {
            eprintln!("cuBLAS from {name}");
            assert!(CUBLAS_LIBRARY_NAMES.contains(&name), "{name}");
        }
        Err(Error::NoCublas { tried, message }) => {
            eprintln!("no cuBLAS here: {message}");
            for name in CUBLAS_LIBRARY_NAMES {
                assert!(tried.contains(name), "{tried:?} lacks {name}");
            }
        }
        Err(other) => panic!("unexpected error {other:?}"),
    }
}

/// The Newton–Schulz products of math §5b on cuBLAS (`bf16` in and out, `f32` accumulation,
/// one strided batch per shape) against the same products in `f64` on the host from the
/// same `bf16` inputs: every element within a `bf16` rounding (2^-8 relative) plus `f32`
/// accumulation error (1e-4 of the row's scale). A wrongly sized buffer is refused.
#[test]
#[ignore = "needs a CUDA device"]
fn cublas_bf16_batched_products_match_a_plain_product() {
    use spectral_step::cuda::cublas::{Cublas, GemmBatch};
    let device = device();
    let stream = device.stream().clone();
    let cublas = Cublas::new(stream.clone()).expect("cuBLAS on a GPU machine");
    eprintln!("cuBLAS from {}", cublas.library_name());
    // X Xᵀ of a 768 x 2304 iterate, A·A of its Gram matrix, and B X: (m, n, k, A^T, B^T).
    let cases = [
        (768, 768, 2304, false, true),
        (768, 768, 768, false, false),
        (768, 2304, 768, false, false),
        (37, 5, 301, true, false),
    ];
    for (seed, &(m, n, k, transpose_a, transpose_b)) in cases.iter().enumerate() {
        let batch = GemmBatch {
            m,
            n,
            k,
            batch: 3,
            transpose_a,
            transpose_b,
            alpha: 0.75,
            beta: -0.5,
        };
        let a: Vec<bf16> = random_matrix(MatrixShape::new(3 * m, k), 1.0, 10 + seed as u64);
        let b: Vec<bf16> = random_matrix(MatrixShape::new(3 * k, n), 1.0, 20 + seed as u64);
        let c: Vec<bf16> = random_matrix(MatrixShape::new(3 * m, n), 1.0, 30 + seed as u64);
        let (a_dev, b_dev) = (
            stream.clone_htod(&a).unwrap(),
            stream.clone_htod(&b).unwrap(),
        );
        let mut c_dev = stream.clone_htod(&c).unwrap();
        cublas
            .gemm_bf16(&batch, &a_dev, &b_dev, &mut c_dev)
            .unwrap();
        let got = stream.clone_dtoh(&c_dev).unwrap();
        let (a, b, c) = (to_f64(&a), to_f64(&b), to_f64(&c));
        for i in 0..3 {
            for row in 0..m {
                for col in 0..n {
                    let (mut sum, mut scale) = (0.0, 0.0);
                    for inner in 0..k {
                        let a_value = if transpose_a {
                            a[i * m * k + inner * m + row]
                        } else {
                            a[i * m * k + row * k + inner]
                        };
                        let b_value = if transpose_b {
                            b[i * k * n + col * k + inner]
                        } else {
                            b[i * k * n + inner * n + col]
                        };
                        sum += a_value * b_value;
                        scale += (a_value * b_value).abs();
                    }
                    let index = i * m * n + row * n + col;
                    let expected = 0.75 * sum - 0.5 * c[index];
                    let actual = f64::from(got[index].to_f32());
                    let tolerance = expected.abs() / 256.0 + 1e-4 * (scale + c[index].abs());
                    assert!(
                        (actual - expected).abs() <= tolerance,
                        "case {seed} product {i} ({row}, {col}): {actual} vs {expected}"
                    );
                }
            }
        }
        let short = stream.clone_htod(&vec![bf16::ZERO; 3]).unwrap();
        assert!(matches!(
            cublas.gemm_bf16(&batch, &short, &b_dev, &mut c_dev),
            Err(Error::InvalidArgument(_))
        ));
    }
}

/// The orthogonalised rule (math §5b) on the GPU, cuBLAS's products and the crate's kernels,
/// against the CPU path (`f32` iterates) with the simulator suite's bounds: two steps of Muon
/// and of Polar Express x8 on ragged and GPT-2-sized shapes, and a zero and a non-finite
/// gradient treated as on the CPU.
#[test]
#[ignore = "needs a CUDA device"]
fn device_orthogonalised_step_matches_cpu() {
    let mut shapes: Vec<MatrixShape> = [(1, 1), (1, 17), (17, 1), (13, 7), (7, 13), (97, 3)]
        .into_iter()
        .map(MatrixShape::from)
        .collect();
    shapes.extend([(768, 2304), (768, 768), (768, 3072), (3072, 768)].map(MatrixShape::from));
    shapes.extend([(8, 12), (12, 8)].map(MatrixShape::from));
    let last = shapes.len() - 1;
    for schedule in [Schedule::MUON, Schedule::PolarExpress { iterations: 8 }] {
        let config = SpectralSgdConfig {
            learning_rate: 0.02,
            weight_decay: 0.1,
            update: UpdateRule::Orthogonalised(schedule),
            ..SpectralSgdConfig::default()
        };
        let mut cpu = SpectralSgd::new(&shapes, config).unwrap();
        let exact_momentum = KernelPath::Avx2Fma.is_supported();
        if exact_momentum {
            cpu.set_kernel_path(KernelPath::Avx2Fma).unwrap();
        }
        let device = device();
        let mut gpu = SpectralSgd::<Cuda>::on_device(&shapes, config, device).unwrap();
        let initial: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(j, &s)| random_matrix(s, 0.05, j as u64))
            .collect();
        let mut weights = initial.clone();
        let mut device_weights = upload(gpu.device(), &weights);
        let mut grads: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(j, &s)| random_matrix(s, 1.0, 500 + j as u64))
            .collect();
        grads[last - 1].fill(0.0);
        grads[last][5] = f32::NAN;
        let device_grads = upload(gpu.device(), &grads);
        let mut cpu_report = None;
        for _ in 0..2 {
            cpu_report = Some(cpu.step(&mut weights, &grads).unwrap());
            gpu.step(&mut device_weights, &device_grads).unwrap();
        }
        let cpu_report = cpu_report.unwrap();
        let report = gpu.report().unwrap();
        let got = download(gpu.device(), &device_weights);
        for (j, &shape) in shapes.iter().enumerate() {
            let what = format!("{schedule:?} {}x{}", shape.fan_out, shape.fan_in);
            assert_eq!(
                report.matrices[j].status, cpu_report.matrices[j].status,
                "{what}"
            );
            let momentum = gpu.momentum_to_host(j).unwrap();
            if exact_momentum {
                assert_same_bits(&format!("{what} momentum"), &momentum, cpu.momentum(j));
            }
            if report.matrices[j].status != MatrixStatus::Updated {
                assert_same_bits(&format!("{what} weights"), &got[j], &initial[j]);
                continue;
            }
            let distance = relative_distance(
                &change(&got[j], &initial[j]),
                &change(&weights[j], &initial[j]),
            );
            eprintln!("{what}: GPU vs CPU change {distance:.2e}");
            assert!(
                distance < orthogonal_change_bound(shape),
                "{what}: {distance:.3e}"
            );
        }
        assert_eq!(
            report.matrices[last - 1].status,
            MatrixStatus::ZeroDirection
        );
        assert_eq!(report.matrices[last].status, MatrixStatus::SkippedNonFinite);
    }
}
