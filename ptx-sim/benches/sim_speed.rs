//! How fast the simulator runs a realistic kernel: the plain fused power pass of
//! `tests/fixtures/power_pass.ptx` over a 512x512 matrix (it should take well under a
//! second). Prints the median of 5 runs and the simulated instruction rate. Then how long
//! runaway loops take to reach the default step limit (`ptx_sim::DEFAULT_STEP_LIMIT`), from
//! the cheapest warp-instruction (one lane branching) to the dearest measured (a full warp
//! loading and storing 32 bytes of shared memory per lane).
//!
//! Run: `cargo bench -p ptx-sim --bench sim_speed`.

use std::time::Instant;

use ptx_sim::{Arg, DEFAULT_STEP_LIMIT, Device, Fault, LaunchConfig, parse};

fn main() {
    power_pass();
    runaway_loops();
}

/// Each loop under `LaunchConfig::linear`: the time to its `RunAway` fault.
fn runaway_loops() {
    let loops = [
        ("one lane, bra", 1, "$L:\n bra $L;"),
        (
            "full warp, add + bra",
            32,
            "$L:\n add.u32 %r1, %r1, 1;\n bra $L;",
        ),
        (
            "full warp, shfl.sync + bra",
            32,
            "$L:\n shfl.sync.bfly.b32 %r1, %r1, 1, 31, -1;\n bra $L;",
        ),
        (
            "full warp, 16-byte global ld + st + bra",
            32,
            "$L:\n ld.global.v4.f32 {%f1, %f2, %f3, %f4}, [%rd3];\n st.global.v4.f32 [%rd3], {%f1, %f2, %f3, %f4};\n bra $L;",
        ),
        (
            "full warp, 32-byte shared ld + st + bra",
            32,
            "st.shared.v4.b64 [%rd6], {%rd1, %rd1, %rd1, %rd1};\n$L:\n ld.shared.v4.b64 {%rd8, %rd9, %rd10, %rd11}, [%rd6];\n st.shared.v4.b64 [%rd6], {%rd8, %rd9, %rd10, %rd11};\n bra $L;",
        ),
    ];
    println!(
        "runaway loops under the default step limit ({DEFAULT_STEP_LIMIT} warp-instructions):"
    );
    for (name, block, body) in loops {
        let text = format!(
            ".version 7.8\n.target sm_80\n.address_size 64\n.visible .entry spin(.param .u64 out) {{\n\
             .reg .b32 %r<4>;\n.reg .b64 %rd<12>;\n.reg .f32 %f<5>;\n.shared .align 32 .b8 sh[1024];\n\
             ld.param.u64 %rd1, [out];\nmov.u32 %r3, %tid.x;\nmul.wide.u32 %rd5, %r3, 16;\n\
             add.s64 %rd3, %rd1, %rd5;\nmul.wide.u32 %rd5, %r3, 32;\nmov.u64 %rd6, sh;\n\
             add.s64 %rd6, %rd6, %rd5;\n{body}\nret;\n}}\n"
        );
        let module = parse(&text).expect("loop parses");
        let mut device = Device::new();
        let out = device.alloc(32 * 16);
        let start = Instant::now();
        let error = device
            .launch(
                &module.kernels[0],
                &LaunchConfig::linear(1, block),
                &[Arg::Ptr(out)],
            )
            .expect_err("the loop never ends");
        let seconds = start.elapsed().as_secs_f64();
        assert_eq!(error.fault(), Some(Fault::RunAway), "{error}");
        println!(
            "  {name}: {seconds:.2} s, {:.1} M warp-instructions/s",
            DEFAULT_STEP_LIMIT as f64 / seconds / 1e6
        );
    }
}

fn power_pass() {
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
