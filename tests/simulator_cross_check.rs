//! The PTX simulator against the CPU path: a plain fused power-pass kernel (the simulator's
//! fixture) and `cpu::BatchPowerIteration` must agree on `w = U^T (U v)`, from the same start
//! vector. A first instance of the kernel-vs-CPU checks that issue 4's kernels will get.

mod common;

use common::*;
use ptx_sim::{Arg, Device, LaunchConfig};
use spectral_step::cpu::BatchPowerIteration;
use spectral_step::{BatchLayout, BlockPolicy, MatrixShape};

const KERNEL: &str = include_str!("../ptx-sim/tests/fixtures/power_pass.ptx");

#[test]
fn simulated_power_pass_matches_the_cpu_path() {
    let module = ptx_sim::parse(KERNEL).expect("fixture parses");
    let kernel = module.kernel("power_pass").expect("fixture kernel");
    for (rows, cols, rows_per_cta) in [(100, 257, 16), (37, 64, 8), (5, 300, 2)] {
        let shape = MatrixShape::new(rows, cols);
        let matrix: Vec<f32> = random_matrix(shape, 1.0, rows as u64);
        let mut power =
            BatchPowerIteration::new(BatchLayout::new(&[shape], BlockPolicy::CPU).unwrap());
        let start = power.cold_vectors(9);
        let mut cpu_vector = start.clone();
        power.fused(&[&matrix[..]], &mut cpu_vector).unwrap();

        let ctas = rows.div_ceil(rows_per_cta);
        let mut device = Device::new();
        let (u, v) = (device.alloc_f32(&matrix), device.alloc_f32(&start));
        let partials = device.alloc(ctas * cols * 4);
        let config = LaunchConfig {
            grid: [ctas as u32, 1, 1],
            block: [64, 1, 1],
            dynamic_shared_bytes: (cols * 4 + 132) as u32,
            shuffle_seed: Some(rows as u64),
            step_limit: 1 << 40,
        };
        let args = [
            Arg::Ptr(u),
            Arg::Ptr(v),
            Arg::Ptr(partials),
            Arg::U32(rows as u32),
            Arg::U32(cols as u32),
            Arg::U32(rows_per_cta as u32),
        ];
        device
            .launch(kernel, &config, &args)
            .expect("simulated launch succeeds");
        let partials = device.read_f32(partials, ctas * cols).unwrap();
        let w: Vec<f64> = (0..cols)
            .map(|c| (0..ctas).map(|b| f64::from(partials[b * cols + c])).sum())
            .collect();
        let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        for (k, (&got, &want)) in w.iter().zip(&cpu_vector).enumerate() {
            assert_close(
                &format!("{rows}x{cols} v[{k}]"),
                got / norm,
                f64::from(want),
                2e-5,
            );
        }
    }
}
