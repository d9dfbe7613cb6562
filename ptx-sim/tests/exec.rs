//! The executor, on small programs whose results are known by hand, and on each fault the
//! simulator must catch.

use ptx_sim::{Arg, Device, DevicePtr, Fault, LaunchConfig, SimError, parse};

/// Wraps `body` in a kernel `k(out, in, n)` with plenty of registers and this prologue:
/// `%rd1` = out, `%rd2` = in, `%r1` = n, `%r2` = global linear thread id (x only),
/// `%rd3` = &out[gid] (u32/f32 elements), `%rd4` = &in[gid], `%r3` = %tid.x.
fn kernel(body: &str) -> String {
    kernel_with_shared("", body)
}

fn kernel_with_shared(shared: &str, body: &str) -> String {
    format!(
        r#".version 7.8
.target sm_80
.address_size 64
.visible .entry k(.param .u64 out, .param .u64 in, .param .u32 n) {{
    .reg .pred %p<8>;
    .reg .b32 %r<40>;
    .reg .b64 %rd<16>;
    .reg .f32 %f<16>;
    .reg .b16 %h<4>;
    {shared}
    ld.param.u64 %rd1, [out];
    ld.param.u64 %rd2, [in];
    ld.param.u32 %r1, [n];
    mov.u32 %r3, %tid.x;
    mov.u32 %r4, %ctaid.x;
    mov.u32 %r5, %ntid.x;
    mad.lo.u32 %r2, %r4, %r5, %r3;
    mul.wide.u32 %rd5, %r2, 4;
    add.s64 %rd3, %rd1, %rd5;
    add.s64 %rd4, %rd2, %rd5;
{body}
    ret;
}}
"#
    )
}

struct Run {
    device: Device,
    out: DevicePtr,
}

fn launch(
    text: &str,
    config: LaunchConfig,
    input: &[u32],
    out_words: usize,
) -> Result<Run, SimError> {
    let module = parse(text).unwrap_or_else(|e| panic!("test kernel does not parse: {e}"));
    let mut device = Device::new();
    let out = device.alloc(out_words * 4);
    let input = device.alloc_u32(input);
    device.launch(
        &module.kernels[0],
        &config,
        &[Arg::Ptr(out), Arg::Ptr(input), Arg::U32(out_words as u32)],
    )?;
    Ok(Run { device, out })
}

fn outputs(text: &str, config: LaunchConfig, input: &[u32], out_words: usize) -> Vec<u32> {
    let run =
        launch(text, config, input, out_words).unwrap_or_else(|e| panic!("launch failed: {e}"));
    run.device.read_u32(run.out, out_words).unwrap()
}

fn fault_of(text: &str, config: LaunchConfig, input: &[u32], out_words: usize) -> SimError {
    match launch(text, config, input, out_words) {
        Err(error) => error,
        Ok(_) => panic!("expected the launch to fail"),
    }
}

fn f32_bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn integer_arithmetic_and_clamped_shifts() {
    // out[tid] for tid 0..8: one operation each on in[tid] (a) and 3.
    let body = r#"
    ld.global.u32 %r10, [%rd4];
    setp.eq.u32 %p1, %r3, 0;
    @%p1 shl.b32 %r11, %r10, 40;      // shift past the width: 0
    setp.eq.u32 %p1, %r3, 1;
    @%p1 shr.s32 %r11, %r10, 40;      // arithmetic, clamped: all sign bits
    setp.eq.u32 %p1, %r3, 2;
    @%p1 mul.hi.u32 %r11, %r10, %r10;
    setp.eq.u32 %p1, %r3, 3;
    @%p1 div.s32 %r11, %r10, 3;
    setp.eq.u32 %p1, %r3, 4;
    @%p1 rem.s32 %r11, %r10, 3;
    setp.eq.u32 %p1, %r3, 5;
    @%p1 min.s32 %r11, %r10, 3;
    setp.eq.u32 %p1, %r3, 6;
    @%p1 max.u32 %r11, %r10, 3;
    setp.eq.u32 %p1, %r3, 7;
    @%p1 xor.b32 %r11, %r10, 0xF0F0F0F0;
    st.global.u32 [%rd3], %r11;
"#;
    let input = [
        1,
        0x8000_0000,
        0xFFFF_FFFF,
        (-7i32) as u32,
        (-7i32) as u32,
        (-5i32) as u32,
        (-5i32) as u32,
        0x0F0F_0F0F,
    ];
    let out = outputs(&kernel(body), LaunchConfig::linear(1, 8), &input, 8);
    let expected = [
        0,
        0xFFFF_FFFF,
        ((0xFFFF_FFFFu64 * 0xFFFF_FFFF) >> 32) as u32,
        (-2i32) as u32, // truncating division
        (-1i32) as u32,
        (-5i32) as u32,
        (-5i32) as u32, // unsigned max of 0xFFFFFFFB and 3
        0xFFFF_FFFF,
    ];
    assert_eq!(out, expected);
}

#[test]
fn wide_multiply_add_and_conversions() {
    let body = r#"
    ld.global.u32 %r10, [%rd4];
    mul.wide.s32 %rd6, %r10, 1000000;     // 64-bit product
    mad.wide.u32 %rd7, %r10, 3, %rd6;
    cvt.u32.u64 %r11, %rd7;               // low 32 bits
    shr.u64 %rd8, %rd7, 32;
    cvt.u32.u64 %r12, %rd8;
    st.global.u32 [%rd3], %r11;
    st.global.u32 [%rd3+32], %r12;
"#;
    let input = [5, (-5i32) as u32, 0x7FFF_FFFF, 0, 1, 2, 3, 4];
    let out = outputs(&kernel(body), LaunchConfig::linear(1, 8), &input, 16);
    for (i, &a) in input.iter().enumerate() {
        let wide = (a as i32 as i64 * 1_000_000) as u64;
        let total = wide.wrapping_add(u64::from(a) * 3);
        assert_eq!(out[i], total as u32, "low word {i}");
        assert_eq!(out[i + 8], (total >> 32) as u32, "high word {i}");
    }
}

#[test]
fn float_arithmetic_rounds_like_ieee() {
    // fma rounds once; mul then add rounds twice; div.rn, sqrt.rn and rcp.rn are exact-rounded.
    let body = r#"
    ld.global.f32 %f1, [%rd4];
    ld.global.f32 %f2, [%rd4+32];
    fma.rn.f32 %f3, %f1, %f2, 0fBF800000;   // a*b - 1 in one rounding
    mul.rn.f32 %f4, %f1, %f2;
    add.rn.f32 %f4, %f4, 0fBF800000;
    div.rn.f32 %f5, %f1, %f2;
    sqrt.rn.f32 %f6, %f2;
    rcp.rn.f32 %f7, %f2;
    max.f32 %f8, %f1, %f2;
    st.global.f32 [%rd3], %f3;
    st.global.f32 [%rd3+32], %f4;
    st.global.f32 [%rd3+64], %f5;
    st.global.f32 [%rd3+96], %f6;
    st.global.f32 [%rd3+128], %f7;
    st.global.f32 [%rd3+160], %f8;
"#;
    let a = [1.0 + f32::EPSILON, 3.0, -0.1, 7.5, 1e30, 0.0, f32::NAN, 2.0];
    let b = [
        1.0 - f32::EPSILON,
        0.7,
        2.5,
        -1.25,
        1e10,
        5.0,
        1.0,
        f32::NAN,
    ];
    let mut input = f32_bits(&a);
    input.extend(f32_bits(&b));
    let out = outputs(&kernel(body), LaunchConfig::linear(1, 8), &input, 48);
    let value = |k: usize, i: usize| f32::from_bits(out[k * 8 + i]);
    for i in 0..8 {
        let same = |got: f32, want: f32| {
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan())
        };
        assert!(same(value(0, i), a[i].mul_add(b[i], -1.0)), "fma {i}");
        assert!(same(value(1, i), a[i] * b[i] - 1.0), "mul+add {i}");
        assert!(same(value(2, i), a[i] / b[i]), "div {i}");
        assert!(same(value(3, i), b[i].sqrt()), "sqrt {i}");
        assert!(same(value(4, i), 1.0 / b[i]), "rcp {i}");
        assert!(same(value(5, i), a[i].max(b[i])), "max {i}");
    }
    // The one-rounding case really differs: (1+e)(1-e) - 1 = -e^2 exactly, 0 when rounded twice.
    assert_eq!(value(0, 0), -f32::EPSILON * f32::EPSILON);
    assert_eq!(value(1, 0), 0.0);
}

#[test]
fn half_precision_conversions_round_to_nearest_even() {
    let body = r#"
    ld.global.f32 %f1, [%rd4];
    cvt.rn.bf16.f32 %h1, %f1;
    cvt.rn.f16.f32 %h2, %f1;
    cvt.f32.bf16 %f2, %h1;
    cvt.f32.f16 %f3, %h2;
    cvt.rzi.s32.f32 %r10, %f1;
    cvt.rni.s32.f32 %r11, %f1;
    st.global.f32 [%rd3], %f2;
    st.global.f32 [%rd3+32], %f3;
    st.global.u32 [%rd3+64], %r10;
    st.global.u32 [%rd3+96], %r11;
"#;
    let values = [
        1.0f32 + 1.0 / 256.0,
        2.5,
        -3.5,
        1e20,
        f32::NAN,
        65519.0,
        1e-8,
        -2.5e9,
    ];
    let out = outputs(
        &kernel(body),
        LaunchConfig::linear(1, 8),
        &f32_bits(&values),
        32,
    );
    for (i, &x) in values.iter().enumerate() {
        let bf = half::bf16::from_f32(x).to_f32();
        let fp = half::f16::from_f32(x).to_f32();
        let same = |got: u32, want: f32| {
            got == want.to_bits() || (f32::from_bits(got).is_nan() && want.is_nan())
        };
        assert!(same(out[i], bf), "bf16 round trip of {x}");
        assert!(same(out[8 + i], fp), "f16 round trip of {x}");
        // Saturating, NaN to zero.
        let truncated = if x.is_nan() {
            0
        } else {
            x.trunc().clamp(i32::MIN as f32, i32::MAX as f32) as i32
        };
        let nearest = if x.is_nan() {
            0
        } else {
            x.round_ties_even().clamp(i32::MIN as f32, i32::MAX as f32) as i32
        };
        assert_eq!(out[16 + i] as i32, truncated, "rzi {x}");
        assert_eq!(out[24 + i] as i32, nearest, "rni {x}");
    }
}

/// `cvt.rn.bf16.f32` and `cvt.rn.f16.f32` on values whose dropped bits are just above,
/// at and just below half a unit, and on pseudo-random bit patterns, against the integer
/// form of round-to-nearest-even for bf16 (`(bits + 0x7FFF + lsb) >> 16`) and the `half`
/// crate's `f16::from_f32`.
#[test]
fn narrowing_conversions_round_once() {
    let body = r#"
    ld.global.f32 %f1, [%rd4];
    cvt.rn.bf16.f32 %h1, %f1;
    cvt.rn.f16.f32 %h2, %f1;
    cvt.u32.u16 %r10, %h1;
    cvt.u32.u16 %r11, %h2;
    st.global.u32 [%rd3], %r10;
    st.global.u32 [%rd3+4096], %r11;
"#;
    let mut values: Vec<u32> = Vec::new();
    for high in [0xBE46_u32, 0x3F80, 0x3F81, 0x0001, 0x7F7F, 0x4780, 0x3880] {
        for low in [0x8001_u32, 0x8000, 0x7FFF, 0x0001, 0xFFFF] {
            values.push(high << 16 | low);
            values.push((high | 0x8000) << 16 | low);
        }
    }
    let mut state = 0x9E37_79B9_u32;
    while values.len() < 1024 {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        if f32::from_bits(state).is_finite() {
            values.push(state);
        }
    }
    let out = outputs(&kernel(body), LaunchConfig::linear(4, 256), &values, 2048);
    for (i, &bits) in values.iter().enumerate() {
        let bf16 = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
        assert_eq!(out[i], bf16, "bf16 of {bits:#010x}");
        let f16 = u32::from(half::f16::from_f32(f32::from_bits(bits)).to_bits());
        assert_eq!(out[1024 + i], f16, "f16 of {bits:#010x}");
    }
}

#[test]
fn divergent_loops_reconverge() {
    // Each thread sums 1..=tid in a loop of tid iterations, then all lanes meet again.
    let body = r#"
    mov.u32 %r10, 0;
    mov.u32 %r11, 0;
$loop:
    setp.ge.u32 %p1, %r11, %r3;
    @%p1 bra $done;
    add.u32 %r11, %r11, 1;
    add.u32 %r10, %r10, %r11;
    bra.uni $loop;
$done:
    // After reconvergence, one shuffle needs every lane: it only works if they all arrive.
    shfl.sync.idx.b32 %r12, %r10, 31, 31, 0xffffffff;
    add.u32 %r10, %r10, %r12;
    st.global.u32 [%rd3], %r10;
"#;
    let out = outputs(&kernel(body), LaunchConfig::linear(1, 32), &[0; 32], 32);
    let lane31 = 31 * 32 / 2;
    for (t, &value) in out.iter().enumerate() {
        assert_eq!(value as usize, t * (t + 1) / 2 + lane31, "thread {t}");
    }
}

#[test]
fn every_shuffle_mode() {
    // value = lane * 10; each mode's result and predicate in separate output rows.
    let body = r#"
    mul.lo.u32 %r10, %r3, 10;
    shfl.sync.bfly.b32 %r11|%p1, %r10, 5, 31, 0xffffffff;
    shfl.sync.down.b32 %r12|%p2, %r10, 3, 31, 0xffffffff;
    shfl.sync.up.b32 %r13|%p3, %r10, 2, 0, 0xffffffff;
    shfl.sync.idx.b32 %r14|%p4, %r10, 7, 31, 0xffffffff;
    shfl.sync.bfly.b32 %r15, %r10, 1, 0x181f, 0xffffffff;   // width-8 segments
    shfl.sync.idx.b32 %r16, %r10, 2, 0x181f, 0xffffffff;    // lane 2 of each 8-lane segment
    selp.u32 %r17, 1, 0, %p1;
    selp.u32 %r18, 1, 0, %p2;
    selp.u32 %r19, 1, 0, %p3;
    selp.u32 %r20, 1, 0, %p4;
    st.global.u32 [%rd3], %r11;
    st.global.u32 [%rd3+128], %r12;
    st.global.u32 [%rd3+256], %r13;
    st.global.u32 [%rd3+384], %r14;
    st.global.u32 [%rd3+512], %r15;
    st.global.u32 [%rd3+640], %r16;
    st.global.u32 [%rd3+768], %r17;
    st.global.u32 [%rd3+896], %r18;
    st.global.u32 [%rd3+1024], %r19;
    st.global.u32 [%rd3+1152], %r20;
"#;
    let out = outputs(&kernel(body), LaunchConfig::linear(1, 32), &[0; 32], 320);
    let row = |r: usize| &out[r * 32..(r + 1) * 32];
    for lane in 0..32u32 {
        let l = lane as usize;
        assert_eq!(row(0)[l], (lane ^ 5) * 10, "bfly");
        let (down, down_ok) = if lane + 3 <= 31 {
            ((lane + 3) * 10, 1)
        } else {
            (lane * 10, 0)
        };
        assert_eq!((row(1)[l], row(7)[l]), (down, down_ok), "down lane {lane}");
        let (up, up_ok) = if lane >= 2 {
            ((lane - 2) * 10, 1)
        } else {
            (lane * 10, 0)
        };
        assert_eq!((row(2)[l], row(8)[l]), (up, up_ok), "up lane {lane}");
        assert_eq!((row(3)[l], row(9)[l]), (70, 1), "idx lane {lane}");
        assert_eq!(row(4)[l], (lane ^ 1) * 10, "segmented bfly");
        assert_eq!(row(5)[l], ((lane & !7) | 2) * 10, "segmented idx");
        assert_eq!(row(6)[l], 1, "bfly in range");
    }
}

#[test]
fn barriers_order_shared_memory_across_warps_and_ctas() {
    // 3 warps per CTA; each thread writes smem[tid], syncs, reads a word another warp wrote.
    let shared = ".shared .align 4 .u32 smem[96];";
    let body = r#"
    mul.wide.u32 %rd6, %r3, 4;
    mov.u64 %rd7, smem;
    add.s64 %rd8, %rd7, %rd6;
    mad.lo.u32 %r10, %r4, 1000, %r3;
    st.shared.u32 [%rd8], %r10;
    bar.sync 0;
    add.u32 %r11, %r3, 33;
    rem.u32 %r11, %r11, 96;
    mul.wide.u32 %rd9, %r11, 4;
    add.s64 %rd9, %rd7, %rd9;
    ld.shared.u32 %r12, [%rd9];
    st.global.u32 [%rd3], %r12;
"#;
    let text = kernel_with_shared(shared, body);
    let config = LaunchConfig {
        grid: [4, 1, 1],
        block: [96, 1, 1],
        ..LaunchConfig::linear(1, 1)
    };
    let out = outputs(&text, config, &[0; 384], 384);
    for cta in 0..4 {
        for t in 0..96 {
            assert_eq!(
                out[cta * 96 + t] as usize,
                cta * 1000 + (t + 33) % 96,
                "CTA {cta} thread {t}"
            );
        }
    }
    // Any CTA order gives the same bits.
    let shuffled = outputs(
        &text,
        LaunchConfig {
            shuffle_seed: Some(7),
            ..config
        },
        &[0; 384],
        384,
    );
    assert_eq!(out, shuffled);
}

#[test]
fn partial_last_warp_and_two_dimensional_grids() {
    // 40 threads: warp 1 has 8 lanes and reduces with an 8-lane mask.
    let body = r#"
    setp.lt.u32 %p1, %r3, 32;
    @%p1 bra $full;
    shfl.sync.bfly.b32 %r10, %r3, 4, 31, 0xff;
    bra.uni $store;
$full:
    shfl.sync.bfly.b32 %r10, %r3, 4, 31, 0xffffffff;
$store:
    mov.u32 %r11, %ctaid.y;
    mov.u32 %r12, %nctaid.x;
    mad.lo.u32 %r13, %r11, %r12, %r4;
    mad.lo.u32 %r13, %r13, 40, %r3;
    mul.wide.u32 %rd6, %r13, 4;
    add.s64 %rd6, %rd1, %rd6;
    st.global.u32 [%rd6], %r10;
"#;
    let config = LaunchConfig {
        grid: [2, 3, 1],
        block: [40, 1, 1],
        ..LaunchConfig::linear(1, 1)
    };
    let out = outputs(&kernel(body), config, &[0; 1], 240);
    for cta in 0..6 {
        for t in 0..40u32 {
            assert_eq!(out[cta * 40 + t as usize], t ^ 4, "CTA {cta} thread {t}");
        }
    }
}

#[test]
fn warp_sync_separates_shared_accesses_within_a_warp() {
    let shared = ".shared .align 4 .u32 smem[32];";
    let body = r#"
    mul.wide.u32 %rd6, %r3, 4;
    mov.u64 %rd7, smem;
    add.s64 %rd8, %rd7, %rd6;
    st.shared.u32 [%rd8], %r3;
    bar.warp.sync 0xffffffff;
    xor.b32 %r10, %r3, 1;
    mul.wide.u32 %rd9, %r10, 4;
    add.s64 %rd9, %rd7, %rd9;
    ld.shared.u32 %r11, [%rd9];
    st.global.u32 [%rd3], %r11;
"#;
    let out = outputs(
        &kernel_with_shared(shared, body),
        LaunchConfig::linear(1, 32),
        &[0; 32],
        32,
    );
    assert_eq!(out, (0..32u32).map(|t| t ^ 1).collect::<Vec<_>>());
}

#[test]
fn atomics_accumulate_across_the_grid() {
    let body = r#"
    red.global.add.u32 [%rd1], 1;
    atom.global.add.u32 %r10, [%rd1+4], %r2;
    cvt.rn.f32.u32 %f1, %r2;
    red.global.add.f32 [%rd1+8], %f1;
"#;
    let out = outputs(&kernel(body), LaunchConfig::linear(3, 64), &[0; 1], 3);
    assert_eq!(out[0], 192);
    assert_eq!(out[1], (0..192).sum::<u32>());
    assert_eq!(f32::from_bits(out[2]), (0..192).sum::<u32>() as f32);
}

fn expect_fault(error: SimError, fault: Fault, needle: &str, line: Option<usize>) {
    let message = error.to_string();
    assert_eq!(error.fault(), Some(fault), "{message}");
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    if let (Some(line), SimError::Fault { line: got, .. }) = (line, &error) {
        assert_eq!(*got, line, "{message}");
    }
}

/// The prologue has 10 instructions after the declarations; the body starts on line 21.
const BODY_LINE: usize = 21;

#[test]
fn out_of_bounds_loads_and_stores_are_caught() {
    // 8 threads over a 4-word input: thread 4 reads one word past the end (into the guard gap).
    let error = fault_of(
        &kernel("    ld.global.u32 %r10, [%rd4];"),
        LaunchConfig::linear(1, 8),
        &[1, 2, 3, 4],
        8,
    );
    expect_fault(
        error.clone(),
        Fault::OutOfBounds,
        "outside every allocation",
        Some(BODY_LINE),
    );
    assert!(error.to_string().contains("thread [4, 0, 0]"), "{error}");
    let error = fault_of(
        &kernel("    st.global.u32 [%rd3+4096], %r3;"),
        LaunchConfig::linear(1, 1),
        &[0],
        4,
    );
    expect_fault(
        error,
        Fault::OutOfBounds,
        "outside every allocation",
        Some(BODY_LINE),
    );
}

#[test]
fn misaligned_vector_access_is_caught() {
    let error = fault_of(
        &kernel("    ld.global.v4.f32 {%f1, %f2, %f3, %f4}, [%rd2+4];"),
        LaunchConfig::linear(1, 1),
        &[0; 8],
        4,
    );
    expect_fault(error, Fault::Misaligned, "16-byte access", Some(BODY_LINE));
}

#[test]
fn uninitialised_shared_read_is_caught() {
    let shared = ".shared .align 4 .u32 smem[32];";
    let error = fault_of(
        &kernel_with_shared(shared, "    ld.shared.u32 %r10, [smem+8];"),
        LaunchConfig::linear(1, 1),
        &[0],
        1,
    );
    expect_fault(
        error,
        Fault::UninitializedShared,
        "no thread has written",
        None,
    );
}

#[test]
fn shared_races_are_caught_in_both_orders() {
    // Every word is initialised before the barrier, so only the race can fault. Warp 0 runs
    // to its next barrier before warp 1 starts, which fixes the order of the two accesses.
    let shared = ".shared .align 4 .u32 smem[64];";
    let prologue = r#"
    mul.wide.u32 %rd6, %r3, 4;
    mov.u64 %rd7, smem;
    add.s64 %rd8, %rd7, %rd6;
    st.shared.u32 [%rd8], %r3;
    bar.sync 0;
    xor.b32 %r10, %r3, 32;
    mul.wide.u32 %rd9, %r10, 4;
    add.s64 %rd9, %rd7, %rd9;
"#;
    // Each thread writes its own word and reads its partner's in the other warp. Warp 0 goes
    // first: it reads words 32..63, which warp 1 then writes (a read, then a write).
    let write_then_read =
        format!("{prologue}    st.shared.u32 [%rd8], %r3;\n    ld.shared.u32 %r11, [%rd9];\n");
    let error = fault_of(
        &kernel_with_shared(shared, &write_then_read),
        LaunchConfig::linear(1, 64),
        &[0],
        64,
    );
    expect_fault(
        error.clone(),
        Fault::SharedRace,
        "write of shared word 0x80 races with a read by thread [0, 0, 0]",
        None,
    );
    assert!(error.to_string().contains("thread [32, 0, 0]"), "{error}");
    // Reads first: warp 0 writes words 0..31 after its reads, and warp 1 then reads them
    // (a write, then a read).
    let read_then_write =
        format!("{prologue}    ld.shared.u32 %r11, [%rd9];\n    st.shared.u32 [%rd8], %r3;\n");
    let error = fault_of(
        &kernel_with_shared(shared, &read_then_write),
        LaunchConfig::linear(1, 64),
        &[0],
        64,
    );
    expect_fault(
        error,
        Fault::SharedRace,
        "read of shared word 0x0 races with a write by thread [0, 0, 0]",
        None,
    );
    // The same accesses with a barrier between them are fine.
    let synced = format!(
        "{prologue}    ld.shared.u32 %r11, [%rd9];\n    bar.sync 0;\n    st.shared.u32 [%rd8], %r3;\n"
    );
    launch(
        &kernel_with_shared(shared, &synced),
        LaunchConfig::linear(1, 64),
        &[0],
        64,
    )
    .unwrap();
}

#[test]
fn divergent_barrier_and_deadlocks_are_caught() {
    // Half a warp reaches the barrier.
    let body = r#"
    setp.lt.u32 %p1, %r3, 16;
    @%p1 bar.sync 0;
"#;
    let error = fault_of(&kernel(body), LaunchConfig::linear(1, 32), &[0], 1);
    expect_fault(
        error,
        Fault::DivergentBarrier,
        "part of warp 0",
        Some(BODY_LINE + 2),
    );

    // A barrier skipped by a whole warp (its guard false everywhere) is not "part of a warp":
    // here warp 1 skips it and exits, so warp 0 waits with exited threads: a deadlock.
    let body = r#"
    setp.lt.u32 %p1, %r3, 32;
    @%p1 bar.sync 0;
"#;
    let error = fault_of(&kernel(body), LaunchConfig::linear(1, 64), &[0], 1);
    assert!(
        matches!(&error, SimError::Deadlock { message, .. } if message.contains("have exited")),
        "{error}"
    );

    // Two warps wait at different barriers.
    let body = r#"
    setp.lt.u32 %p1, %r3, 32;
    @%p1 bra $a;
    bar.sync 0;
    bra.uni $end;
$a:
    bar.sync 0;
$end:
"#;
    let error = fault_of(&kernel(body), LaunchConfig::linear(1, 64), &[0], 1);
    assert!(
        matches!(&error, SimError::Deadlock { message, .. } if message.contains("different bar.sync")),
        "{error}"
    );

    // One warp exits while the other waits.
    let body = r#"
    setp.lt.u32 %p1, %r3, 32;
    @%p1 ret;
    bar.sync 0;
"#;
    let error = fault_of(&kernel(body), LaunchConfig::linear(1, 64), &[0], 1);
    assert!(
        matches!(&error, SimError::Deadlock { message, .. } if message.contains("have exited")),
        "{error}"
    );
}

#[test]
fn bad_shuffle_masks_are_caught() {
    // A lane outside the mask executes the shuffle.
    let error = fault_of(
        &kernel("    shfl.sync.bfly.b32 %r10, %r3, 1, 31, 0xffff;"),
        LaunchConfig::linear(1, 32),
        &[0],
        1,
    );
    expect_fault(error, Fault::BadMask, "not in member mask", Some(BODY_LINE));
    // A full mask in a partial warp.
    let error = fault_of(
        &kernel("    shfl.sync.bfly.b32 %r10, %r3, 1, 31, -1;"),
        LaunchConfig::linear(1, 20),
        &[0],
        1,
    );
    expect_fault(
        error,
        Fault::BadMask,
        "past the end of a 20-lane warp",
        Some(BODY_LINE),
    );
    // A lane in the mask has exited.
    let body = r#"
    setp.eq.u32 %p1, %r3, 5;
    @%p1 ret;
    shfl.sync.bfly.b32 %r10, %r3, 1, 31, 0xffffffff;
"#;
    let error = fault_of(&kernel(body), LaunchConfig::linear(1, 32), &[0], 1);
    expect_fault(
        error,
        Fault::BadMask,
        "lane 5 is in member mask",
        Some(BODY_LINE + 3),
    );
}

#[test]
fn non_coherent_load_of_written_bytes_is_caught() {
    // Thread 0 writes out[0]; then every thread reads out[0] through the .nc path.
    let body = r#"
    setp.eq.u32 %p1, %r3, 0;
    @%p1 st.global.u32 [%rd1], 7;
    ld.global.nc.u32 %r10, [%rd1];
"#;
    let error = fault_of(&kernel(body), LaunchConfig::linear(1, 4), &[0], 1);
    expect_fault(
        error,
        Fault::NonCoherentConflict,
        "has written",
        Some(BODY_LINE + 3),
    );
}

#[test]
fn division_by_zero_and_runaway_code_are_caught() {
    let error = fault_of(
        &kernel("    div.u32 %r10, %r3, 0;"),
        LaunchConfig::linear(1, 1),
        &[0],
        1,
    );
    expect_fault(
        error,
        Fault::DivisionByZero,
        "division by zero",
        Some(BODY_LINE),
    );
    let text = kernel("$spin:\n    bra.uni $spin;");
    let config = LaunchConfig {
        step_limit: 10_000,
        ..LaunchConfig::linear(1, 1)
    };
    expect_fault(
        fault_of(&text, config, &[0], 1),
        Fault::RunAway,
        "step limit",
        None,
    );
}

#[test]
fn launches_that_do_not_fit_the_kernel_are_errors() {
    let module = parse(&kernel("")).unwrap();
    let kernel = &module.kernels[0];
    let mut device = Device::new();
    let buffer = device.alloc(16);
    let config = LaunchConfig::linear(1, 1);
    let error = device
        .launch(kernel, &config, &[Arg::Ptr(buffer)])
        .unwrap_err();
    assert!(matches!(error, SimError::Launch { .. }), "{error}");
    let error = device
        .launch(
            kernel,
            &config,
            &[Arg::Ptr(buffer), Arg::Ptr(buffer), Arg::F32(1.0)],
        )
        .unwrap_err();
    assert!(
        error.to_string().contains("does not fit parameter n"),
        "{error}"
    );
    let error = device
        .launch(
            kernel,
            &LaunchConfig::linear(1, 2048),
            &[Arg::Ptr(buffer), Arg::Ptr(buffer), Arg::U32(1)],
        )
        .unwrap_err();
    assert!(error.to_string().contains("bad shape"), "{error}");
    assert!(device.read(buffer.offset(8), 16).is_err());
}

#[test]
fn every_comparison_and_the_remaining_unary_forms() {
    // Each thread packs its comparison results into a bit mask (bit k = comparison k).
    let float_cmps = [
        "eq", "ne", "lt", "le", "gt", "ge", "equ", "neu", "ltu", "leu", "gtu", "geu", "num", "nan",
    ];
    let int_cmps = ["eq", "ne", "lt", "le", "gt", "ge", "lo", "ls", "hi", "hs"];
    let mut body = String::from(
        "    ld.global.f32 %f1, [%rd4];\n    ld.global.f32 %f2, [%rd4+32];\n    mov.u32 %r10, 0;\n    mov.u32 %r11, 0;\n",
    );
    for (k, cmp) in float_cmps.iter().enumerate() {
        body += &format!(
            "    setp.{cmp}.f32 %p1, %f1, %f2;\n    selp.u32 %r12, {}, 0, %p1;\n    or.b32 %r10, %r10, %r12;\n",
            1u32 << k
        );
    }
    body += "    cvt.rzi.s32.f32 %r13, %f1;\n    cvt.rzi.s32.f32 %r14, %f2;\n";
    for (k, cmp) in int_cmps.iter().enumerate() {
        body += &format!(
            "    setp.{cmp}.s32 %p1, %r13, %r14;\n    selp.u32 %r12, {}, 0, %p1;\n    or.b32 %r11, %r11, %r12;\n",
            1u32 << k
        );
    }
    body += r#"
    neg.s32 %r15, %r13;
    abs.s32 %r16, %r13;
    neg.f32 %f3, %f1;
    abs.f32 %f4, %f1;
    rsqrt.approx.f32 %f5, %f4;
    cvt.s64.s32 %rd6, %r13;
    shr.u64 %rd6, %rd6, 32;
    cvt.u32.u64 %r17, %rd6;
    st.global.u32 [%rd3], %r10;
    st.global.u32 [%rd3+32], %r11;
    st.global.u32 [%rd3+64], %r15;
    st.global.u32 [%rd3+96], %r16;
    st.global.f32 [%rd3+128], %f3;
    st.global.f32 [%rd3+160], %f4;
    st.global.f32 [%rd3+192], %f5;
    st.global.u32 [%rd3+224], %r17;
"#;
    let a = [1.0f32, 2.0, -3.0, f32::NAN, 5.0, -0.0, 7.0, -8.0];
    let b = [1.0f32, -2.0, 3.0, 1.0, f32::NAN, 0.0, 9.0, -9.0];
    let mut input = f32_bits(&a);
    input.extend(f32_bits(&b));
    let out = outputs(&kernel(&body), LaunchConfig::linear(1, 8), &input, 64);
    for i in 0..8 {
        let (x, y) = (a[i], b[i]);
        let unordered = x.is_nan() || y.is_nan();
        let float_truth = [
            x == y,
            !unordered && x != y,
            x < y,
            x <= y,
            x > y,
            x >= y,
            unordered || x == y,
            unordered || x != y,
            unordered || x < y,
            unordered || x <= y,
            unordered || x > y,
            unordered || x >= y,
            !unordered,
            unordered,
        ];
        let expected: u32 = float_truth
            .iter()
            .enumerate()
            .map(|(k, &t)| u32::from(t) << k)
            .sum();
        assert_eq!(out[i], expected, "float comparisons of {x} and {y}");
        let (p, q) = (
            if x.is_nan() { 0 } else { x as i32 },
            if y.is_nan() { 0 } else { y as i32 },
        );
        let (up, uq) = (p as u32, q as u32);
        let int_truth = [
            p == q,
            p != q,
            p < q,
            p <= q,
            p > q,
            p >= q,
            up < uq,
            up <= uq,
            up > uq,
            up >= uq,
        ];
        let expected: u32 = int_truth
            .iter()
            .enumerate()
            .map(|(k, &t)| u32::from(t) << k)
            .sum();
        assert_eq!(out[8 + i], expected, "integer comparisons of {p} and {q}");
        assert_eq!(out[16 + i] as i32, p.wrapping_neg(), "neg {p}");
        assert_eq!(out[24 + i] as i32, p.wrapping_abs(), "abs {p}");
        assert_eq!(out[32 + i], (-x).to_bits(), "neg.f32 {x}");
        assert_eq!(out[40 + i], x.abs().to_bits(), "abs.f32 {x}");
        let rsqrt = 1.0 / x.abs().sqrt();
        assert!(
            out[48 + i] == rsqrt.to_bits() || rsqrt.is_nan(),
            "rsqrt {x}"
        );
        assert_eq!(
            out[56 + i],
            if p < 0 { u32::MAX } else { 0 },
            "sign extension of {p}"
        );
    }
}

/// Vector accesses to global memory are counted per executing thread; scalar ones are not.
#[test]
fn global_vector_accesses_are_counted_per_thread() {
    let module = ptx_sim::parse(
        r#"
        .version 7.0
        .target sm_80
        .address_size 64
        .visible .entry copy4(.param .u64 data) {
            .reg .b64 %rd<4>;
            .reg .b32 %r<2>;
            .reg .f32 %f<5>;
            .reg .pred %p;
            ld.param.u64 %rd1, [data];
            mov.u32 %r1, %tid.x;
            mul.wide.u32 %rd2, %r1, 16;
            add.s64 %rd3, %rd1, %rd2;
            ld.global.v4.f32 {%f1, %f2, %f3, %f4}, [%rd3];
            setp.eq.u32 %p, %r1, 0;
            @%p st.global.v4.f32 [%rd3], {%f4, %f3, %f2, %f1};
            st.global.f32 [%rd3], %f1;
            ret;
        }
    "#,
    )
    .unwrap();
    let mut device = Device::new();
    let data = device.alloc_f32(&[1.0; 16]);
    let stats = device
        .launch(
            module.kernel("copy4").unwrap(),
            &LaunchConfig::linear(1, 4),
            &[Arg::Ptr(data)],
        )
        .unwrap();
    // Four threads load a vector, one of them stores one; the scalar stores do not count.
    assert_eq!(stats.global_vector_accesses, 5);
}

/// A freed buffer is gone (reads fault), its neighbours are intact, and a second free or a
/// pointer into the middle of an allocation is an error.
#[test]
fn freed_allocations_are_unmapped() {
    let mut device = Device::new();
    let first = device.alloc_f32(&[1.0, 2.0]);
    let second = device.alloc_f32(&[3.0, 4.0]);
    assert_eq!(device.allocated_bytes(), 16);
    device.free(first).unwrap();
    assert_eq!(device.allocated_bytes(), 8);
    assert!(device.read(first, 4).is_err());
    assert_eq!(device.read_f32(second, 2).unwrap(), vec![3.0, 4.0]);
    assert!(device.free(first).is_err(), "double free");
    assert!(device.free(second.offset(4)).is_err(), "not the start");
    let third = device.alloc_f32(&[5.0]);
    assert_ne!(third, first, "addresses are not reused");
}
