//! How fast the simulator runs a realistic kernel: the plain fused power pass of
//! `tests/fixtures/power_pass.ptx` over a 512x512 matrix (it should take well under a
//! second). Prints the median of 5 runs and the simulated instruction rate.
//!
//! Run: `cargo bench -p ptx-sim --bench sim_speed`.

use std::time::Instant;

use ptx_sim::{Arg, Device, LaunchConfig, parse};

fn main() {
    let module = parse(include_str!("../tests/fixtures/power_pass.ptx")).expect("fixture parses");
    let kernel = module.kernel("power_pass").expect("kernel present");
    let (rows, cols, rows_per_cta) = (512usize, 512usize, 64usize);
    let matrix: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let vector: Vec<f32> = (0..cols)
        .map(|i| ((i * 104_729) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let mut device = Device::new();
    let (u, v) = (device.alloc_f32(&matrix), device.alloc_f32(&vector));
    let ctas = rows / rows_per_cta;
    let partials = device.alloc(ctas * cols * 4);
    let config = LaunchConfig {
        grid: [ctas as u32, 1, 1],
        block: [128, 1, 1],
        dynamic_shared_bytes: (cols * 4 + 132) as u32,
        shuffle_seed: None,
        step_limit: 1 << 40,
    };
    let args = [
        Arg::Ptr(u),
        Arg::Ptr(v),
        Arg::Ptr(partials),
        Arg::U32(512),
        Arg::U32(512),
        Arg::U32(64),
    ];
    let mut times = Vec::new();
    let mut stats = Default::default();
    for _ in 0..5 {
        let start = Instant::now();
        stats = device
            .launch(kernel, &config, &args)
            .expect("launch succeeds");
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[2];
    println!(
        "fused power pass, 512x512 f32, 8 CTAs x 128 threads: {:.3} s (median of 5); {} warp-instructions, {} thread-instructions, {:.1} M thread-instructions/s",
        median,
        stats.warp_instructions,
        stats.thread_instructions,
        stats.thread_instructions as f64 / median / 1e6
    );
}
