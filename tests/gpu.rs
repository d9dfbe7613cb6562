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
    Element, Error, MatrixShape, MatrixStatus, MomentumKind, SpectralSgd, SpectralSgdConfig,
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
