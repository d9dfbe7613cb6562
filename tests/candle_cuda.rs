//! The candle adapter on CUDA tensors (feature `candle-cuda`): the spectral step in the
//! crate's kernels on candle's buffers equals the CUDA slice API's step bit for bit, the AdamW
//! group equals candle-nn's AdamW on the device bit for bit, a model trains, and the state
//! file round-trips (and moves to a CPU model).
//!
//! Every test needs a CUDA device, so each is ignored by default ("needs a CUDA device") and
//! listed as such by `cargo test`; `scripts/gpu-check.sh` bundles this file's tests for a GPU
//! machine, which runs them with `--include-ignored`.

mod candle_model;
mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_model::{
    SPECTRAL_PARAMS, assert_same_vars, gradients, named_vars, seeded, spectral_shapes, values,
};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use common::assert_same_bits;
use spectral_step::candle::{OptimizerConfig, ParameterUpdate, Route, Routing, SpectralOptimizer};
use spectral_step::cuda::cudarc::driver::{CudaSlice, DeviceRepr};
use spectral_step::cuda::{Cuda, CudaDevice};
use spectral_step::half::{bf16, f16};
use spectral_step::{Element, Rounding, SpectralSgd, SpectralSgdConfig};

fn cuda() -> Device {
    Device::new_cuda(0).expect("CUDA device 0 (this test runs only with --include-ignored)")
}

/// Copies of `vars` on `device`.
fn on_device(vars: &[(String, Var)], device: &Device) -> Vec<(String, Var)> {
    vars.iter()
        .map(|(name, var)| {
            let tensor = var.as_tensor().to_device(device).unwrap();
            (name.clone(), Var::from_tensor(&tensor).unwrap())
        })
        .collect()
}

/// The gradients of `cpu_grads` (keyed by `cpu_vars`), on the device, keyed by `device_vars`.
fn grads_on_device(
    cpu_grads: &GradStore,
    cpu_vars: &[(String, Var)],
    device_vars: &[(String, Var)],
) -> GradStore {
    let mut grads = GradStore::default();
    for ((_, cpu), (_, device)) in cpu_vars.iter().zip(device_vars) {
        if let Some(grad) = cpu_grads.get(cpu.as_tensor()) {
            grads.insert(device.as_tensor(), grad.to_device(device.device()).unwrap());
        }
    }
    grads
}

/// Each spectral parameter's matrices, one host vector per matrix, in the adapter's order.
fn spectral_matrices<T: candle_core::WithDType>(tensors: &[&Tensor]) -> Vec<Vec<T>> {
    let mut matrices = Vec::new();
    for (&index, tensor) in SPECTRAL_PARAMS.iter().zip(tensors) {
        let all = values::<T>(tensor);
        let per_matrix = all.len() / if index == 3 { 3 } else { 1 };
        matrices.extend(all.chunks(per_matrix).map(<[T]>::to_vec));
    }
    matrices
}

fn upload<T: DeviceRepr>(device: &CudaDevice, matrices: &[Vec<T>]) -> Vec<CudaSlice<T>> {
    matrices
        .iter()
        .map(|matrix| device.stream().clone_htod(matrix).unwrap())
        .collect()
}

fn download<T: DeviceRepr + Default + Clone>(
    device: &CudaDevice,
    buffers: &[CudaSlice<T>],
) -> Vec<Vec<T>> {
    buffers
        .iter()
        .map(|buffer| device.stream().clone_dtoh(buffer).unwrap())
        .collect()
}

/// The adapter over the test model on the GPU, and the CUDA slice API over copies of its
/// spectral matrices (one buffer per matrix, where the adapter steps a stack of three in
/// one of candle's buffers), take three steps on the same gradients: every weight and every
/// report is equal bit for bit.
fn cuda_adapter_matches_cuda_slice_api<T>(config: OptimizerConfig)
where
    T: Element + candle_core::WithDType + DeviceRepr + Default,
{
    let gpu = cuda();
    let cpu_vars = named_vars::<T>(10);
    let vars = on_device(&cpu_vars, &gpu);
    let mut adapter = SpectralOptimizer::from_named(vars.clone(), config.clone()).unwrap();
    assert!(adapter.is_on_cuda());
    let mut reference = SpectralSgd::<Cuda>::on_device(
        &spectral_shapes(),
        config.spectral,
        CudaDevice::open(0).unwrap(),
    )
    .unwrap();
    let spectral_tensors: Vec<&Tensor> = SPECTRAL_PARAMS
        .iter()
        .map(|&index| cpu_vars[index].1.as_tensor())
        .collect();
    let host = spectral_matrices::<T>(&spectral_tensors);
    let with_master = config.master_weights && <T as Element>::DTYPE.is_low_precision();
    let mut weights = upload(reference.device(), &host);
    let widened: Vec<Vec<f32>> = host
        .iter()
        .map(|m| m.iter().map(|v| Element::to_f32(*v)).collect())
        .collect();
    let mut master = upload(reference.device(), &widened);
    for step in 0..3 {
        let cpu_grads = gradients::<T>(&cpu_vars, 100 + 10 * step);
        let report = adapter
            .step_report(&grads_on_device(&cpu_grads, &cpu_vars, &vars))
            .unwrap();
        let grad_tensors: Vec<&Tensor> = SPECTRAL_PARAMS
            .iter()
            .map(|&index| cpu_grads.get(cpu_vars[index].1.as_tensor()).unwrap())
            .collect();
        let grads = upload(reference.device(), &spectral_matrices::<T>(&grad_tensors));
        if with_master {
            reference
                .step_with_copy(&mut master, &grads, &mut weights)
                .unwrap();
        } else {
            reference.step::<T, T, _, _>(&mut weights, &grads).unwrap();
        }
        let expected_reports = reference.report().unwrap().matrices;
        let expected = download(reference.device(), &weights);
        let mut matrix = 0;
        for &index in &SPECTRAL_PARAMS {
            let ParameterUpdate::Spectral(reports) = &report.parameters[index].update else {
                panic!(
                    "{} was not stepped spectrally",
                    report.parameters[index].name
                );
            };
            assert_eq!(
                reports.as_slice(),
                &expected_reports[matrix..matrix + reports.len()]
            );
            let stepped = values::<T>(vars[index].1.as_tensor());
            assert_same_bits(
                &format!("{} after step {step}", vars[index].0),
                &stepped,
                &expected[matrix..matrix + reports.len()].concat(),
            );
            matrix += reports.len();
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_cuda_adapter_steps_what_the_cuda_slice_api_steps_bit_for_bit() {
    cuda_adapter_matches_cuda_slice_api::<f32>(OptimizerConfig::default());
    let nearest = OptimizerConfig {
        spectral: SpectralSgdConfig {
            rounding: Rounding::Nearest,
            ..SpectralSgdConfig::default()
        },
        ..OptimizerConfig::default()
    };
    cuda_adapter_matches_cuda_slice_api::<bf16>(nearest);
    cuda_adapter_matches_cuda_slice_api::<bf16>(OptimizerConfig::default());
    cuda_adapter_matches_cuda_slice_api::<f16>(OptimizerConfig::default());
    let master = OptimizerConfig {
        master_weights: true,
        ..OptimizerConfig::default()
    };
    cuda_adapter_matches_cuda_slice_api::<bf16>(master.clone());
    cuda_adapter_matches_cuda_slice_api::<f16>(master);
}

/// On the GPU the adapter's step is the CPU adapter's within rounding (different reduction
/// orders): every parameter of the test model, f32, after three steps.
#[test]
#[ignore = "needs a CUDA device"]
fn the_cuda_adapter_steps_what_the_cpu_adapter_steps_within_rounding() {
    let gpu = cuda();
    let cpu_vars = named_vars::<f32>(20);
    let gpu_vars = on_device(&cpu_vars, &gpu);
    let mut on_cpu =
        SpectralOptimizer::from_named(cpu_vars.clone(), OptimizerConfig::default()).unwrap();
    let mut on_gpu =
        SpectralOptimizer::from_named(gpu_vars.clone(), OptimizerConfig::default()).unwrap();
    for step in 0..3 {
        let grads = gradients::<f32>(&cpu_vars, 200 + 10 * step);
        on_cpu.step(&grads).unwrap();
        on_gpu
            .step(&grads_on_device(&grads, &cpu_vars, &gpu_vars))
            .unwrap();
    }
    for ((name, cpu), (_, gpu)) in cpu_vars.iter().zip(&gpu_vars) {
        let cpu = values::<f32>(cpu.as_tensor());
        let gpu = values::<f32>(gpu.as_tensor());
        let scale = cpu.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (index, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
            assert!(
                (c - g).abs() <= 1e-5 * scale,
                "{name}[{index}]: CPU {c}, GPU {g} (largest |value| {scale})"
            );
        }
    }
}

/// The AdamW group on the GPU is candle-nn's AdamW on the GPU bit for bit (f32; a parameter
/// without a gradient on two steps is left alone by both).
#[test]
#[ignore = "needs a CUDA device"]
fn the_cuda_adamw_group_is_candle_nn_adamw_bit_for_bit() {
    let gpu = cuda();
    let params = candle_nn::ParamsAdamW {
        lr: 0.01,
        weight_decay: 0.1,
        ..Default::default()
    };
    let cpu_vars = named_vars::<f32>(30);
    let ours = on_device(&cpu_vars, &gpu);
    let theirs = on_device(&cpu_vars, &gpu);
    let config = OptimizerConfig {
        adamw: params.clone().into(),
        routing: Routing::muon()
            .rank(2, Route::AdamW)
            .rank(3, Route::AdamW)
            .rank(4, Route::AdamW),
        ..OptimizerConfig::default()
    };
    let mut adapter = SpectralOptimizer::from_named(ours.clone(), config).unwrap();
    let mut adamw =
        candle_nn::AdamW::new(theirs.iter().map(|(_, var)| var.clone()).collect(), params).unwrap();
    for step in 0..6 {
        let mut grads = gradients::<f32>(&cpu_vars, 300 + 10 * step);
        if step == 2 || step == 3 {
            grads.remove(cpu_vars[1].1.as_tensor());
        }
        let report = adapter
            .step_report(&grads_on_device(&grads, &cpu_vars, &ours))
            .unwrap();
        adamw
            .step(&grads_on_device(&grads, &cpu_vars, &theirs))
            .unwrap();
        let expected = if step == 2 || step == 3 {
            ParameterUpdate::NoGradient
        } else {
            ParameterUpdate::AdamW
        };
        assert_eq!(report.parameters[1].update, expected);
        for ((name, a), (_, b)) in ours.iter().zip(&theirs) {
            assert_same_bits(
                &format!("{name} after step {step}"),
                &values::<f32>(a.as_tensor()),
                &values::<f32>(b.as_tensor()),
            );
        }
    }
}

/// The tensors `names` of a state file, as bytes.
fn state_tensors(bytes: &[u8], names: &[String]) -> Vec<Vec<u8>> {
    let file = safetensors::SafeTensors::deserialize(bytes).unwrap();
    names
        .iter()
        .map(|name| file.tensor(name).unwrap().data().to_vec())
        .collect()
}

/// A gradient with an infinity leaves its AdamW parameter, moments and master weights
/// unchanged on the GPU, and the report says so; the other parameters step. f32, and bf16
/// with master weights.
fn non_finite_adamw_gradient<T: Element + candle_core::WithDType>(master: bool) {
    let gpu = cuda();
    let cpu_vars = named_vars::<T>(40);
    let vars = on_device(&cpu_vars, &gpu);
    let config = OptimizerConfig {
        master_weights: master,
        ..OptimizerConfig::default()
    };
    let mut adapter = SpectralOptimizer::from_named(vars.clone(), config).unwrap();
    // One ordinary step first, so that the moments are not zero.
    adapter
        .step(&grads_on_device(
            &gradients::<T>(&cpu_vars, 390),
            &cpu_vars,
            &vars,
        ))
        .unwrap();
    let mut grads = gradients::<T>(&cpu_vars, 400);
    let bias = cpu_vars[1].1.as_tensor();
    let widened = grads.get(bias).unwrap().to_dtype(DType::F32).unwrap();
    let mut poisoned = values::<f32>(&widened);
    poisoned[3] = f32::INFINITY;
    let poisoned = Tensor::from_vec(poisoned, bias.dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(bias.dtype())
        .unwrap();
    grads.insert(bias, poisoned);
    let mut kept: Vec<String> = ["adamw.m", "adamw.v"]
        .iter()
        .map(|kind| format!("{kind}/blocks.0.fc.bias"))
        .collect();
    if master {
        kept.push("master/blocks.0.fc.bias".into());
    }
    let before = values::<T>(vars[1].1.as_tensor());
    let state_before = state_tensors(&adapter.state_to_bytes().unwrap(), &kept);
    let norm_before = values::<T>(vars[6].1.as_tensor());
    let report = adapter
        .step_report(&grads_on_device(&grads, &cpu_vars, &vars))
        .unwrap();
    assert_eq!(
        report.parameters[1].update,
        ParameterUpdate::SkippedNonFinite
    );
    assert_eq!(report.parameters[6].update, ParameterUpdate::AdamW);
    assert_same_bits(
        "the skipped bias",
        &values::<T>(vars[1].1.as_tensor()),
        &before,
    );
    assert_eq!(
        state_tensors(&adapter.state_to_bytes().unwrap(), &kept),
        state_before,
        "the skipped bias's moments (and master weights)"
    );
    assert_ne!(
        common::bits(&values::<T>(vars[6].1.as_tensor())),
        common::bits(&norm_before),
        "the norm gain stepped"
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_non_finite_adamw_gradient_changes_nothing_on_the_gpu() {
    non_finite_adamw_gradient::<f32>(false);
    non_finite_adamw_gradient::<bf16>(true);
}

/// An MLP built with candle-nn on the GPU trains: the loss falls below a quarter of its
/// start in 60 steps (as on the CPU).
#[test]
#[ignore = "needs a CUDA device"]
fn an_mlp_trains_on_the_gpu() {
    let gpu = cuda();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &gpu);
    let hidden = candle_nn::linear(8, 64, vb.pp("hidden")).unwrap();
    let output = candle_nn::linear(64, 3, vb.pp("output")).unwrap();
    let mut optimizer =
        SpectralOptimizer::from_varmap(&varmap, OptimizerConfig::default()).unwrap();
    let inputs = seeded::<f32>(&[128, 8], 1.0, 3).to_device(&gpu).unwrap();
    let map = seeded::<f32>(&[8, 3], 0.5, 4).to_device(&gpu).unwrap();
    let targets = inputs.matmul(&map).unwrap().tanh().unwrap();
    let loss = || {
        let prediction = output
            .forward(&hidden.forward(&inputs).unwrap().relu().unwrap())
            .unwrap();
        (prediction - &targets)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let first = loss().to_scalar::<f32>().unwrap();
    for _ in 0..60 {
        optimizer.backward_step(&loss()).unwrap();
    }
    let last = loss().to_scalar::<f32>().unwrap();
    assert!(last < 0.25 * first, "MLP loss on the GPU {first} -> {last}");
}

/// Six steps straight, or three, a save, a fresh optimizer, a load and three more, on the
/// GPU in bf16 with stochastic rounding and master weights: bitwise the same parameters and
/// state. The saved file also loads into a CPU model of the same parameters, which writes
/// it back byte for byte.
#[test]
#[ignore = "needs a CUDA device"]
fn a_gpu_state_file_resumes_bitwise_and_moves_to_the_cpu() {
    let gpu = cuda();
    let config = OptimizerConfig {
        master_weights: true,
        ..OptimizerConfig::default()
    };
    let cpu_vars = named_vars::<bf16>(50);
    let straight_vars = on_device(&cpu_vars, &gpu);
    let stopped_vars = on_device(&cpu_vars, &gpu);
    let mut straight =
        SpectralOptimizer::from_named(straight_vars.clone(), config.clone()).unwrap();
    let mut stopped = SpectralOptimizer::from_named(stopped_vars.clone(), config.clone()).unwrap();
    let grads = |step: u64| gradients::<bf16>(&cpu_vars, 500 + 10 * step);
    for step in 0..3 {
        straight
            .step(&grads_on_device(&grads(step), &cpu_vars, &straight_vars))
            .unwrap();
        stopped
            .step(&grads_on_device(&grads(step), &cpu_vars, &stopped_vars))
            .unwrap();
    }
    let bytes = stopped.state_to_bytes().unwrap();
    let resumed_vars: Vec<(String, Var)> = stopped_vars
        .iter()
        .map(|(name, var)| {
            (
                name.clone(),
                Var::from_tensor(&var.as_tensor().copy().unwrap()).unwrap(),
            )
        })
        .collect();
    let host_vars: Vec<(String, Var)> = on_device(&stopped_vars, &Device::Cpu);
    drop(stopped);
    let mut resumed = SpectralOptimizer::from_named(resumed_vars.clone(), config.clone()).unwrap();
    resumed.load_state_from_bytes(&bytes).unwrap();
    assert_eq!(resumed.state_to_bytes().unwrap(), bytes);
    let mut on_cpu = SpectralOptimizer::from_named(host_vars, config).unwrap();
    on_cpu.load_state_from_bytes(&bytes).unwrap();
    assert_eq!(on_cpu.state_to_bytes().unwrap(), bytes);
    for step in 3..6 {
        straight
            .step(&grads_on_device(&grads(step), &cpu_vars, &straight_vars))
            .unwrap();
        resumed
            .step(&grads_on_device(&grads(step), &cpu_vars, &resumed_vars))
            .unwrap();
    }
    assert_same_vars::<bf16>(&straight_vars, &resumed_vars);
    assert_eq!(
        resumed.state_to_bytes().unwrap(),
        straight.state_to_bytes().unwrap()
    );
}

/// A gradient on the CPU for a parameter on the GPU, and parameters on two devices, are
/// errors naming the parameter; nothing is stepped.
#[test]
#[ignore = "needs a CUDA device"]
fn mixed_devices_are_errors_naming_the_parameter() {
    let gpu = cuda();
    let cpu_vars = named_vars::<f32>(60);
    let vars = on_device(&cpu_vars, &gpu);
    let mut adapter =
        SpectralOptimizer::from_named(vars.clone(), OptimizerConfig::default()).unwrap();
    let mut grads = grads_on_device(&gradients::<f32>(&cpu_vars, 600), &cpu_vars, &vars);
    let head = &vars[5].1;
    grads.insert(
        head.as_tensor(),
        Tensor::zeros(head.dims(), DType::F32, &Device::Cpu).unwrap(),
    );
    let error = adapter.step_report(&grads).unwrap_err();
    assert!(error.to_string().contains("head.weight"), "{error}");
    assert_eq!(adapter.steps(), 0);

    let mut mixed = vars.clone();
    mixed[2] = cpu_vars[2].clone();
    let error = SpectralOptimizer::from_named(mixed, OptimizerConfig::default()).unwrap_err();
    assert!(error.to_string().contains("conv.weight"), "{error}");
}

/// `Optimizer::step` only enqueues: behind a long queue of matrix products on candle's
/// stream, a step (on gradients in new buffers, so that the matrix table is uploaded again)
/// returns while the products are still running. First a model whose parameters all take the
/// spectral step (this crate's kernels alone), then the test model with its AdamW group
/// (candle's tensor operations too).
#[test]
#[ignore = "needs a CUDA device"]
fn a_step_returns_before_the_device_has_run_it() {
    let gpu = cuda();
    let stream = gpu.as_cuda_device().unwrap().cuda_stream();
    let all_spectral = OptimizerConfig {
        routing: Routing::paper(),
        ..OptimizerConfig::default()
    };
    for (what, config) in [
        ("every parameter spectral", all_spectral),
        ("the default routing", OptimizerConfig::default()),
    ] {
        let cpu_vars = named_vars::<f32>(70);
        let vars = on_device(&cpu_vars, &gpu);
        let mut optimizer = SpectralOptimizer::from_named(vars.clone(), config).unwrap();
        // Both gradient stores stay alive, so the second lies in new buffers and the step
        // uploads its matrix table again.
        let first = grads_on_device(&gradients::<f32>(&cpu_vars, 700), &cpu_vars, &vars);
        optimizer.step(&first).unwrap();
        let grads = grads_on_device(&gradients::<f32>(&cpu_vars, 710), &cpu_vars, &vars);
        let product = Tensor::randn(0f32, 1.0, (4096, 4096), &gpu).unwrap();
        stream.synchronize().unwrap();
        let mut queue = product.clone();
        for _ in 0..100 {
            queue = product.matmul(&queue).unwrap().affine(1e-2, 0.0).unwrap();
        }
        let marker = stream.record_event(None).unwrap();
        optimizer.step(&grads).unwrap();
        let still_running = !marker.is_complete();
        stream.synchronize().unwrap();
        assert!(
            still_running,
            "{what}: the step returned only after the work queued before it had run"
        );
        assert_eq!(optimizer.steps(), 2);
        drop((queue, first));
    }
}

/// A model of 130 parameters (more than the nest holds on the caller's thread, so the nest
/// runs on a thread of its own, whose candle default stream is another): bit for bit the
/// CUDA slice API's step, over two steps.
#[test]
#[ignore = "needs a CUDA device"]
fn a_model_of_many_parameters_steps_in_order_on_candles_stream() {
    let gpu = cuda();
    let shape = spectral_step::MatrixShape::new(6, 4);
    let cpu_vars: Vec<(String, Var)> = (0..130)
        .map(|index| {
            let tensor = seeded::<f32>(&[6, 4], 0.5, 800 + index);
            (
                format!("layer{index:03}.weight"),
                Var::from_tensor(&tensor).unwrap(),
            )
        })
        .collect();
    let vars = on_device(&cpu_vars, &gpu);
    let mut adapter =
        SpectralOptimizer::from_named(vars.clone(), OptimizerConfig::default()).unwrap();
    let mut reference = SpectralSgd::<Cuda>::on_device(
        &vec![shape; 130],
        SpectralSgdConfig::default(),
        CudaDevice::open(0).unwrap(),
    )
    .unwrap();
    let host: Vec<Vec<f32>> = cpu_vars
        .iter()
        .map(|(_, var)| values::<f32>(var.as_tensor()))
        .collect();
    let mut weights = upload(reference.device(), &host);
    for step in 0..2 {
        let cpu_grads = gradients::<f32>(&cpu_vars, 900 + 200 * step);
        let grads = grads_on_device(&cpu_grads, &cpu_vars, &vars);
        adapter.step(&grads).unwrap();
        let host_grads: Vec<Vec<f32>> = cpu_vars
            .iter()
            .map(|(_, var)| values::<f32>(cpu_grads.get(var.as_tensor()).unwrap()))
            .collect();
        let grad_buffers = upload(reference.device(), &host_grads);
        reference.step(&mut weights, &grad_buffers).unwrap();
    }
    let expected = download(reference.device(), &weights);
    for ((name, var), expected) in vars.iter().zip(&expected) {
        assert_same_bits(name, &values::<f32>(var.as_tensor()), expected);
    }
}

/// Eight steps enqueued behind a long queue of matrix products, each on gradients of its
/// own kept alive (so every step uploads its matrix table, and the host runs more steps
/// ahead than the four staging buffers): bit for bit the same steps taken one at a time,
/// waiting for the device after each. bf16 with master weights under the paper's routing
/// (two spectral groups with masters: ratio 1, and the transposed embedding's).
#[test]
#[ignore = "needs a CUDA device"]
fn steps_queued_far_ahead_are_the_steps_taken_one_at_a_time() {
    let gpu = cuda();
    let stream = gpu.as_cuda_device().unwrap().cuda_stream();
    let config = OptimizerConfig {
        routing: Routing::paper(),
        master_weights: true,
        ..OptimizerConfig::default()
    };
    let cpu_vars = named_vars::<bf16>(80);
    let queued_vars = on_device(&cpu_vars, &gpu);
    let waited_vars = on_device(&cpu_vars, &gpu);
    let mut queued = SpectralOptimizer::from_named(queued_vars.clone(), config.clone()).unwrap();
    let mut waited = SpectralOptimizer::from_named(waited_vars.clone(), config).unwrap();
    let grads: Vec<GradStore> = (0..8)
        .map(|step| gradients::<bf16>(&cpu_vars, 1000 + 10 * step))
        .collect();
    let queued_grads: Vec<GradStore> = grads
        .iter()
        .map(|g| grads_on_device(g, &cpu_vars, &queued_vars))
        .collect();
    for g in &grads {
        waited
            .step(&grads_on_device(g, &cpu_vars, &waited_vars))
            .unwrap();
        stream.synchronize().unwrap();
    }
    let product = Tensor::randn(0f32, 1.0, (4096, 4096), &gpu).unwrap();
    stream.synchronize().unwrap();
    let mut queue = product.clone();
    for _ in 0..100 {
        queue = product.matmul(&queue).unwrap().affine(1e-2, 0.0).unwrap();
    }
    for g in &queued_grads {
        queued.step(g).unwrap();
    }
    stream.synchronize().unwrap();
    drop(queue);
    assert_same_vars::<bf16>(&queued_vars, &waited_vars);
    assert_eq!(
        queued.state_to_bytes().unwrap(),
        waited.state_to_bytes().unwrap()
    );
}
