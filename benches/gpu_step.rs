//! GPU benchmark: the fused step and the plain power pass on the GPT-2-small matrix
//! set (48 matrices, 85M parameters), `f32` and `bf16`, against a device-to-device copy of
//! the same bytes measured in the same run, interleaved round by round.
//!
//! Bandwidth counts the bytes each kernel must move at least once:
//! - step (warm: power pass + finish + update, 3 launches): power pass reads G and M, the
//!   update reads G, M, W and writes M, W; `f32`: 28 bytes per parameter, `bf16`: 20.
//! - power pass (one iteration on stored W: plain pass + finish): W once; 4 or 2 bytes.
//! - copy: reads and writes N bytes: 2N.
//!
//! Targets on an H200: step >= 85% and power pass >= 80% of the copy's bandwidth.
//!
//! Then the orthogonalised step (Muon's rule, 5 Newton–Schulz iterations, `f32` parameters)
//! on the same set, against the step's own cuBLAS products run alone on buffers of the same
//! layout, interleaved: throughput by the flop model `5 (4 m^2 n + 2 m^3)` per matrix
//! (`m <= n` its sides), and the step's time over the products' (what the crate's kernels,
//! the polynomial and the launches add).
//! Without a driver or a device it prints NOT RUN and why, and exits 0 (it is a benchmark,
//! not a test); any other error is FAILED and exit status 1.
//!
//! Run: `cargo bench --bench gpu_step -- [--rounds N] [--json FILE]` (`--json` writes the
//! step's median times for `bench/peers/peers.py gpu-step`).

mod common;

use std::sync::Arc;
use std::time::Instant;

use spectral_step::cuda::cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr, sys::CUevent_flags,
};
use spectral_step::cuda::{Cuda, CudaDevice, PowerIteration};
use spectral_step::device::Device;
use spectral_step::half::bf16;
use spectral_step::kernels::iterate::IterateLayout;
use spectral_step::kernels::plan::{self, IteratePointers, Operation, TablePointers};
use spectral_step::{
    BatchLayout, BlockPolicy, Element, Schedule, SpectralSgd, SpectralSgdConfig, StepTypes,
    UpdateRule,
};

use common::{gpt2_small, hashed as fill, median, rounds_arg};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Milliseconds of `work` on the device's stream, by CUDA events.
fn timed(
    context: &Arc<CudaContext>,
    stream: &CudaStream,
    work: &mut dyn FnMut() -> Result<()>,
) -> Result<f64> {
    let start = context.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = context.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    start.record(stream)?;
    work()?;
    end.record(stream)?;
    end.synchronize()?;
    Ok(f64::from(start.elapsed_ms(&end)?))
}

/// Times the warm step and one power iteration of element type `T`; returns the step's
/// median milliseconds.
fn run<T: Element + DeviceRepr>(rounds: usize) -> Result<f64> {
    let shapes = gpt2_small();
    let params: usize = shapes.iter().map(|s| s.len()).sum();
    let size = std::mem::size_of::<T>();
    let device = CudaDevice::open(0)?;
    let context = device.context().clone();
    eprintln!("{} | {}", device.info(), T::DTYPE.name());
    let config = SpectralSgdConfig::default();
    let mut optimizer = SpectralSgd::<Cuda>::on_device(&shapes, config, device)?;
    let stream = optimizer.device().stream().clone();
    let upload = |salt: u64| -> Result<Vec<CudaSlice<T>>> {
        shapes
            .iter()
            .enumerate()
            .map(|(j, s)| Ok(stream.clone_htod(&fill::<T>(s.len(), salt + j as u64))?))
            .collect()
    };
    let mut weights = upload(1)?;
    let grads = upload(1000)?;
    // Warm-up: the cold first step (8 iterations), then one warm step.
    optimizer.step(&mut weights, &grads)?;
    optimizer.step(&mut weights, &grads)?;
    let report = optimizer.report()?;
    assert!(
        report.all_updated(),
        "warm-up step skipped a matrix: {report:?}"
    );

    // Its own stream on the same context, so that it can read the optimizer's buffers.
    let mut power = PowerIteration::new(&shapes, CudaDevice::with_context(context)?)?;
    power.iterate(&weights, 1)?;

    let step_bytes = params * (size * 2 + 4) + params * (size * 2 + 4 * 2 + size);
    let power_bytes = params * size;
    let copy_of = |bytes: usize| -> Result<(CudaSlice<u8>, CudaSlice<u8>)> {
        Ok((
            stream.alloc_zeros::<u8>(bytes)?,
            stream.alloc_zeros::<u8>(bytes)?,
        ))
    };
    let (step_src, mut step_dst) = copy_of(step_bytes / 2)?;
    let (power_src, mut power_dst) = copy_of(power_bytes)?;
    let context = optimizer.device().context().clone();
    let power_context = power.device().context().clone();
    let power_stream = power.device().stream().clone();

    let (mut step_ratio, mut power_ratio, mut step_times) = (Vec::new(), Vec::new(), Vec::new());
    let (mut step_gbs, mut power_gbs, mut copy_gbs) = (Vec::new(), Vec::new(), Vec::new());
    let wall = Instant::now();
    for _ in 0..rounds {
        let copy_ms = timed(&context, &stream, &mut || {
            stream.memcpy_dtod(&step_src, &mut step_dst)?;
            Ok(())
        })?;
        let step_ms = timed(&context, &stream, &mut || {
            optimizer.step(&mut weights, &grads)?;
            Ok(())
        })?;
        let copy_small_ms = timed(&power_context, &power_stream, &mut || {
            power_stream.memcpy_dtod(&power_src, &mut power_dst)?;
            Ok(())
        })?;
        let power_ms = timed(&power_context, &power_stream, &mut || {
            power.iterate(&weights, 1)?;
            Ok(())
        })?;
        step_times.push(step_ms);
        let gbs = |bytes: usize, ms: f64| bytes as f64 / (ms * 1e6);
        let copy = gbs(step_bytes, copy_ms);
        let copy_small = gbs(2 * power_bytes, copy_small_ms);
        step_gbs.push(gbs(step_bytes, step_ms));
        power_gbs.push(gbs(power_bytes, power_ms));
        copy_gbs.push(copy);
        step_ratio.push(gbs(step_bytes, step_ms) / copy);
        power_ratio.push(gbs(power_bytes, power_ms) / copy_small);
    }
    let report = optimizer.report()?;
    assert!(report.all_updated(), "a timed step skipped a matrix");
    println!(
        "{:>5} | step {:7.1} GB/s = {:5.1}% of copy ({:7.1} GB/s) | power pass {:7.1} GB/s = {:5.1}% of copy | {} rounds in {:.1} s",
        T::DTYPE.name(),
        median(&mut step_gbs),
        100.0 * median(&mut step_ratio),
        median(&mut copy_gbs),
        median(&mut power_gbs),
        100.0 * median(&mut power_ratio),
        rounds,
        wall.elapsed().as_secs_f64()
    );
    let step_ms = median(&mut step_times);
    println!("      | step {step_ms:.3} ms (median)");
    println!(
        "      | step ratio min {:.1}% max {:.1}% | power ratio min {:.1}% max {:.1}% (targets: step >= 85%, power >= 80%)",
        100.0 * step_ratio.first().copied().unwrap_or(0.0),
        100.0 * step_ratio.last().copied().unwrap_or(0.0),
        100.0 * power_ratio.first().copied().unwrap_or(0.0),
        100.0 * power_ratio.last().copied().unwrap_or(0.0),
    );
    Ok(step_ms)
}

/// The device address of `buffer` (the benchmark's own buffers, alive while it uses them).
fn address<T>(buffer: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    buffer.device_ptr(stream).0
}

/// Times the orthogonalised step beside its products alone; returns the step's median ms.
fn orthogonal(rounds: usize) -> Result<f64> {
    let shapes = gpt2_small();
    let device = CudaDevice::open(0)?;
    let config = SpectralSgdConfig {
        learning_rate: 0.02,
        weight_decay: 0.1,
        update: UpdateRule::MUON,
        ..SpectralSgdConfig::default()
    };
    let mut optimizer = SpectralSgd::<Cuda>::on_device(&shapes, config, device)?;
    let stream = optimizer.device().stream().clone();
    let context = optimizer.device().context().clone();
    let upload = |salt: u64| -> Result<Vec<CudaSlice<f32>>> {
        shapes
            .iter()
            .enumerate()
            .map(|(j, s)| Ok(stream.clone_htod(&fill::<f32>(s.len(), salt + j as u64))?))
            .collect()
    };
    let mut weights = upload(1)?;
    let grads = upload(1000)?;
    optimizer.step(&mut weights, &grads)?;
    assert!(
        optimizer.report()?.all_updated(),
        "warm-up step skipped a matrix"
    );

    // The step's own products, on buffers laid out as the step's.
    let layout = BatchLayout::new(&shapes, BlockPolicy::CUDA)?;
    let iterates = IterateLayout::new(&layout)?;
    let bf16_buffer = |elements: usize| stream.alloc_zeros::<bf16>(elements);
    let x = [
        bf16_buffer(iterates.iterate_elements())?,
        bf16_buffer(iterates.iterate_elements())?,
    ];
    let gram = bf16_buffer(iterates.gram_elements())?;
    let gram_square = stream.alloc_zeros::<f32>(iterates.gram_elements())?;
    let polynomial = bf16_buffer(iterates.gram_elements())?;
    let pointers = IteratePointers {
        iterates: [address(&x[0], &stream), address(&x[1], &stream)],
        gram: address(&gram, &stream),
        gram_square: address(&gram_square, &stream),
        polynomial: address(&polynomial, &stream),
        block_norms: 0,
    };
    let products: Vec<_> = plan::orthogonal_step_operations(
        &layout,
        &iterates,
        &config,
        &Schedule::MUON,
        StepTypes::same(spectral_step::Dtype::F32),
        TablePointers::default(),
        pointers,
        1,
    )?
    .into_iter()
    .filter_map(|operation| match operation {
        Operation::Gemm(gemm) => Some(gemm),
        Operation::Launch(_) => None,
    })
    .collect();
    let gemm_device = CudaDevice::on_stream(stream.clone())?;
    gemm_device.prepare_gemm()?;
    let flops: f64 = shapes
        .iter()
        .map(|s| {
            let (m, n) = (
                s.fan_out.min(s.fan_in) as f64,
                s.fan_out.max(s.fan_in) as f64,
            );
            5.0 * (4.0 * m * m * n + 2.0 * m * m * m)
        })
        .sum();
    let (mut step_times, mut product_times, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let wall = Instant::now();
    for _ in 0..rounds {
        let step_ms = timed(&context, &stream, &mut || {
            optimizer.step(&mut weights, &grads)?;
            Ok(())
        })?;
        let products_ms = timed(&context, &stream, &mut || {
            for gemm in &products {
                // SAFETY: every product's operands are the shape groups' iterates and Gram
                // matrices at the offsets of `iterates`, the layout these buffers were
                // allocated from, alive until the end of this function (the last `timed`
                // waits for the stream); A, A^2, P and the iterate buffers are distinct.
                unsafe { gemm_device.gemm(gemm)? };
            }
            Ok(())
        })?;
        step_times.push(step_ms);
        product_times.push(products_ms);
        ratios.push(step_ms / products_ms);
    }
    assert!(
        optimizer.report()?.all_updated(),
        "a timed step skipped a matrix"
    );
    let (step_ms, products_ms) = (median(&mut step_times), median(&mut product_times));
    let tflops = |ms: f64| flops / (ms * 1e9);
    println!(
        "  orth | step {step_ms:7.3} ms = {:6.1} TFLOP/s | its {} cuBLAS products alone {products_ms:7.3} ms = {:6.1} TFLOP/s | step / products {:.3} (min {:.3} max {:.3}) | {} rounds in {:.1} s",
        tflops(step_ms),
        products.len(),
        tflops(products_ms),
        median(&mut ratios),
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().copied().fold(0.0, f64::max),
        rounds,
        wall.elapsed().as_secs_f64()
    );
    Ok(step_ms)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds = rounds_arg(21);
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    println!(
        "GPT-2-small set, warm step and one power iteration vs device-to-device copy (median of {rounds} interleaved rounds)"
    );
    let mut lines = String::new();
    let cases = [
        ("f32", run::<f32>(rounds)),
        ("bf16", run::<bf16>(rounds)),
        ("orth_f32", orthogonal(rounds.min(11))),
    ];
    for (name, result) in cases {
        match result {
            Ok(ms) => lines.push_str(&format!(
                "{{\"side\": \"crate\", \"task\": \"gpu_step\", \"case\": \"{name}\", \"median_ms\": {ms:.4}}}\n"
            )),
            Err(error) => {
                let no_device = matches!(
                    error.downcast_ref::<spectral_step::Error>(),
                    Some(spectral_step::Error::NoCudaDriver(_) | spectral_step::Error::NoDevice(_))
                );
                if no_device {
                    println!("NOT RUN: {error}");
                    return;
                }
                println!("FAILED: {error}");
                std::process::exit(1);
            }
        }
    }
    if let Some(path) = json
        && let Err(error) = std::fs::write(&path, lines)
    {
        println!("cannot write {path}: {error}");
        std::process::exit(1);
    }
}
