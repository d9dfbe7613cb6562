//! An end-to-end kernel: a plain fused power pass (tests/fixtures/power_pass.ptx) against
//! the same sums in f64, on odd shapes, under shuffled CTA orders.

use ptx_sim::{Arg, Device, LaunchConfig, parse};

const KERNEL: &str = include_str!("fixtures/power_pass.ptx");

/// Deterministic values in [-1, 1).
fn values(count: usize, salt: u64) -> Vec<f32> {
    (0..count as u64)
        .map(|i| {
            let h = (i ^ salt).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            h as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn run(
    rows: usize,
    cols: usize,
    rows_per_cta: usize,
    block: u32,
    seed: Option<u64>,
) -> (Vec<f32>, Vec<f64>) {
    let module = parse(KERNEL).expect("fixture parses");
    let u = values(rows * cols, 1);
    let v = values(cols, 2);
    let ctas = rows.div_ceil(rows_per_cta);
    let mut device = Device::new();
    let (u_ptr, v_ptr) = (device.alloc_f32(&u), device.alloc_f32(&v));
    let partials = device.alloc(ctas * cols * 4);
    let config = LaunchConfig {
        grid: [ctas as u32, 1, 1],
        block: [block, 1, 1],
        dynamic_shared_bytes: (cols * 4 + 132) as u32,
        shuffle_seed: seed,
        step_limit: 1 << 40,
    };
    let args = [
        Arg::Ptr(u_ptr),
        Arg::Ptr(v_ptr),
        Arg::Ptr(partials),
        Arg::U32(rows as u32),
        Arg::U32(cols as u32),
        Arg::U32(rows_per_cta as u32),
    ];
    device
        .launch(module.kernel("power_pass").unwrap(), &config, &args)
        .expect("launch succeeds");
    let got = device.read_f32(partials, ctas * cols).unwrap();
    // w = U^T (U v), per CTA's rows, in f64.
    let mut expected = vec![0.0f64; ctas * cols];
    for row in 0..rows {
        let t: f64 = (0..cols)
            .map(|c| f64::from(u[row * cols + c]) * f64::from(v[c]))
            .sum();
        for c in 0..cols {
            expected[(row / rows_per_cta) * cols + c] += t * f64::from(u[row * cols + c]);
        }
    }
    (got, expected)
}

#[test]
fn fused_power_pass_matches_f64_sums() {
    for (rows, cols, rows_per_cta, block) in [
        (37, 29, 8, 64),
        (100, 257, 16, 128),
        (3, 1, 1, 32),
        (64, 64, 64, 96),
    ] {
        let (got, expected) = run(rows, cols, rows_per_cta, block, None);
        let scale = expected.iter().map(|x| x.abs()).fold(0.0, f64::max);
        for (k, (&g, &e)) in got.iter().zip(&expected).enumerate() {
            assert!(
                (f64::from(g) - e).abs() <= 1e-5 * scale.max(1.0),
                "{rows}x{cols} [{k}]: {g} vs {e}"
            );
        }
    }
}

#[test]
fn results_do_not_depend_on_cta_order() {
    let (first, _) = run(100, 257, 16, 128, None);
    for seed in [1, 2, 3] {
        let (shuffled, _) = run(100, 257, 16, 128, Some(seed));
        assert_eq!(
            first.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            shuffled.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "seed {seed}"
        );
    }
}
