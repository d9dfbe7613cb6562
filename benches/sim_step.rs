//! How fast the simulated device is: warm optimizer steps of `SpectralSgd<Simulated>` (the
//! device backend on `ptx-sim`) on a small batch, in parameters stepped per second and
//! simulated thread-instructions per second, beside the same steps on the CPU backend; for
//! `f32` weights and for `bf16` weights with stochastic rounding (the default), whose update
//! computes Philox per element (math §5a).
//!
//! Run: `cargo bench --bench sim_step -- [--rounds N]`.

mod common;

use std::time::Instant;

use common::{hashed_batch, median, rounds_arg};
use spectral_step::half::bf16;
use spectral_step::sim::{SimDevice, Simulated};
use spectral_step::{Element, MatrixShape, SpectralSgd, SpectralSgdConfig};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return Ok(());
    }
    let rounds = rounds_arg(5);
    bench::<f32>(rounds)?;
    bench::<bf16>(rounds)
}

fn bench<T: Element>(rounds: usize) -> Result<()> {
    // A small transformer-like batch: 0.2M parameters.
    let shapes = [
        MatrixShape::new(384, 128),
        MatrixShape::new(128, 128),
        MatrixShape::new(512, 128),
        MatrixShape::new(128, 512),
        MatrixShape::new(128, 1),
    ];
    let parameters: usize = shapes.iter().map(|s| s.len()).sum();
    let config = SpectralSgdConfig::default();
    let device = SimDevice::new()?;
    let mut optimizer = SpectralSgd::<Simulated>::on_device(&shapes, config, device.clone())?;
    let host_weights = hashed_batch::<T>(&shapes, 1);
    let host_grads = hashed_batch::<T>(&shapes, 1000);
    let mut weights = host_weights
        .iter()
        .map(|w| device.upload(w))
        .collect::<spectral_step::Result<Vec<_>>>()?;
    let grads = host_grads
        .iter()
        .map(|g| device.upload(g))
        .collect::<spectral_step::Result<Vec<_>>>()?;
    optimizer.step(&mut weights, &grads)?; // the cold step is not what is measured
    let mut cpu = SpectralSgd::new(&shapes, config)?;
    let mut cpu_weights = host_weights.clone();
    cpu.step(&mut cpu_weights, &host_grads)?;

    let (mut sim_seconds, mut cpu_seconds, mut instructions) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        device.reset_stats()?;
        let start = Instant::now();
        optimizer.step(&mut weights, &grads)?;
        optimizer.synchronize()?;
        sim_seconds.push(start.elapsed().as_secs_f64());
        instructions.push(device.stats().thread_instructions as f64);
        let start = Instant::now();
        cpu.step(&mut cpu_weights, &host_grads)?;
        cpu_seconds.push(start.elapsed().as_secs_f64());
    }
    assert!(optimizer.report()?.all_updated());
    let sim = median(&mut sim_seconds);
    let cpu_time = median(&mut cpu_seconds);
    let per_step = median(&mut instructions);
    println!(
        "simulated device, warm {} step of {parameters} parameters ({} matrices), median of {rounds}:",
        T::DTYPE.name(),
        shapes.len()
    );
    println!(
        "  {:.3} s per step = {:.2} M parameters/s, {:.1} M simulated thread-instructions/s ({:.0} per parameter)",
        sim,
        parameters as f64 / sim / 1e6,
        per_step / sim / 1e6,
        per_step / parameters as f64
    );
    println!(
        "  CPU backend on the same step: {:.3} ms (the simulated device is {:.0}x slower)",
        cpu_time * 1e3,
        sim / cpu_time
    );
    Ok(())
}
