//! Hostile input: PTX text, launch shapes and host calls chosen to break the simulator. Every
//! one must end in a typed error (or a correct result) quickly: never a panic, an abort, a
//! huge allocation or a hang.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use ptx_sim::limits::DEFAULT_MEMORY_LIMIT;
use ptx_sim::{Arg, DEFAULT_STEP_LIMIT, Device, DevicePtr, Fault, LaunchConfig, SimError, parse};

const HEADER: &str = ".version 7.8\n.target sm_80\n.address_size 64\n";

/// Runs `f` on its own thread and fails the test if it takes longer than `seconds` (the thread
/// is left behind; the test binary ends with the test run).
fn within<T: Send + 'static>(
    seconds: u64,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = send.send(f());
    });
    match receive.recv_timeout(Duration::from_secs(seconds)) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: still running after {seconds} s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

fn parse_error_line(result: ptx_sim::Result<ptx_sim::Module>) -> (usize, String) {
    match result {
        Err(SimError::Parse { line, message }) => (line, message),
        Err(other) => panic!("expected a parse error, got {other}"),
        Ok(_) => panic!("expected a parse error, but the text parsed"),
    }
}

/// `k(.param .u64 out)` with `decls` (from line 5) then `body` (on the line after them),
/// then `ret`.
fn kernel(decls: &str, body: &str) -> String {
    format!("{HEADER}.visible .entry k(.param .u64 out) {{\n{decls}\n{body}\n    ret;\n}}\n")
}

fn launch_one(text: &str, config: LaunchConfig) -> ptx_sim::Result<ptx_sim::LaunchStats> {
    let module = parse(text).unwrap_or_else(|e| panic!("test kernel does not parse: {e}"));
    let mut device = Device::new();
    let out = device.alloc(64);
    device.launch(&module.kernels[0], &config, &[Arg::Ptr(out)])
}

// 1. Register declarations.

#[test]
fn huge_register_ranges_are_parse_errors_naming_their_line() {
    for count in ["4000000000", "18446744073709551615", "1000000", "65537"] {
        let text = kernel(
            "    .reg .b32 %q<2>;\n    .reg .b32 %r<COUNT>;"
                .replace("COUNT", count)
                .as_str(),
            "",
        );
        let (line, message) = within(5, count, move || parse_error_line(parse(&text)));
        assert_eq!(line, 6, "{count}: {message}");
        assert!(message.contains("registers"), "{count}: {message}");
    }
    // The limit is on the kernel's total, however it is split.
    let decls: String = (0..3)
        .map(|i| format!("    .reg .b32 %r{i}_<30000>;\n"))
        .collect();
    let (line, message) = parse_error_line(parse(&kernel(&decls, "")));
    assert_eq!(line, 7, "{message}");
}

#[test]
fn many_registers_parse_in_linear_time() {
    // 65536 registers, the limit: the duplicate check used to compare every pair (seconds
    // here, minutes at 10^6).
    let text = kernel(
        "    .reg .b32 %r<32768>;\n    .reg .f32 %f<32766>;\n    .reg .pred %p<2>;",
        "    mov.u32 %r32767, 1;",
    );
    let module = within(1, "65536 registers", move || parse(&text));
    let module = module.expect("parses");
    assert_eq!(module.kernels[0].registers.len(), 65536);
    // Duplicates are still found, also across ranges (%r1 of <2> and %r1 of a later name).
    let (line, message) = parse_error_line(parse(&kernel(
        "    .reg .b32 %r<20>;\n    .reg .f32 %r1;",
        "",
    )));
    assert_eq!(line, 6, "{message}");
    assert!(message.contains("repeated register name %r1"), "{message}");
}

// 2. The default step limit.

#[test]
fn a_runaway_loop_fails_in_seconds_under_the_default_limit() {
    let text = kernel("", "$spin:\n    bra.uni $spin;");
    let error = within(
        10,
        "single-lane spin under LaunchConfig::linear",
        move || launch_one(&text, LaunchConfig::linear(1, 1)),
    )
    .expect_err("the loop never ends");
    assert_eq!(error.fault(), Some(Fault::RunAway), "{error}");
    assert!(error.to_string().contains("step limit"), "{error}");
}

// 3. Launch limits.

fn shared_kernel() -> String {
    format!(
        "{HEADER}.extern .shared .align 16 .b8 dyn[];\n.visible .entry k(.param .u64 out) {{\n    .shared .align 4 .b8 fixed[16];\n    ret;\n}}\n"
    )
}

fn launch_error(text: &str, config: LaunchConfig) -> String {
    match launch_one(text, config) {
        Err(SimError::Launch { message, .. }) => message,
        other => panic!("expected a launch error for {config:?}, got {other:?}"),
    }
}

#[test]
fn launches_beyond_cuda_limits_are_launch_errors() {
    let text = kernel("", "");
    let base = LaunchConfig::linear(1, 1);
    for (grid, block, needle) in [
        ([u32::MAX; 3], [1, 1, 1], "grid"),
        ([1 << 31, 1, 1], [1, 1, 1], "grid"),
        ([1, 65536, 1], [1, 1, 1], "grid"),
        ([1, 1, 65536], [1, 1, 1], "grid"),
        ([0, 1, 1], [1, 1, 1], "grid"),
        ([1, 1, 1], [1025, 1, 1], "block"),
        ([1, 1, 1], [1, 1025, 1], "block"),
        ([1, 1, 1], [1, 1, 65], "block"),
        ([1, 1, 1], [64, 32, 1], "block"),
        ([1, 1, 1], [u32::MAX, u32::MAX, u32::MAX], "block"),
        ([1, 1, 1], [0, 1, 1], "block"),
    ] {
        let config = LaunchConfig {
            grid,
            block,
            ..base
        };
        let message = within(5, needle, {
            let text = text.clone();
            move || launch_error(&text, config)
        });
        assert!(message.contains(needle), "{grid:?} {block:?}: {message}");
    }
    // The largest legal shapes are accepted.
    for block in [[1024, 1, 1], [1, 1024, 1], [16, 1, 64], [32, 32, 1]] {
        launch_one(&text, LaunchConfig { block, ..base }).expect("legal block");
    }
}

#[test]
fn shared_memory_beyond_227_kib_is_a_launch_error() {
    let text = shared_kernel();
    // The extern array starts at 16: 16 + 232432 is the limit exactly.
    let ok = LaunchConfig {
        dynamic_shared_bytes: 232_448 - 16,
        ..LaunchConfig::linear(1, 32)
    };
    launch_one(&text, ok).expect("227 KiB in all is allowed");
    for bytes in [232_448 - 15, 1 << 30, u32::MAX - 8, u32::MAX] {
        let config = LaunchConfig {
            dynamic_shared_bytes: bytes,
            ..ok
        };
        let message = within(5, "dynamic shared", {
            let text = text.clone();
            move || launch_error(&text, config)
        });
        assert!(message.contains("shared memory"), "{bytes}: {message}");
    }
    // Static shared memory alone.
    let text = kernel("    .shared .b8 big[300000];", "");
    let message = launch_error(&text, LaunchConfig::linear(1, 1));
    assert!(message.contains("shared memory"), "{message}");
}

#[test]
fn the_largest_grid_allocates_nothing_per_cta() {
    // 2^31-1 x 65535 x 65535 CTAs: the launch must run CTAs one by one (here until the step
    // limit), never build a list of them.
    let text = kernel("", "");
    for seed in [None, Some(7)] {
        let config = LaunchConfig {
            grid: [(1 << 31) - 1, 65535, 65535],
            shuffle_seed: seed,
            step_limit: 1000,
            ..LaunchConfig::linear(1, 1)
        };
        let text = text.clone();
        let error = within(5, "largest grid", move || launch_one(&text, config))
            .expect_err("the step limit stops it");
        assert_eq!(error.fault(), Some(Fault::RunAway), "{error}");
    }
}

// 4. Offsets past u32 / u64.

#[test]
fn shared_layouts_past_u32_are_parse_errors() {
    let (line, message) = parse_error_line(parse(&kernel(
        "    .shared .b8 a[4294967295];\n    .shared .b8 b[16];",
        "",
    )));
    assert_eq!(line, 6, "{message}");
    let (line, message) = parse_error_line(parse(&kernel(
        "    .shared .b8 a[4294967295];\n    .shared .align 16 .b8 b[1];",
        "",
    )));
    assert_eq!(line, 6, "{message}");
    let (line, message) = parse_error_line(parse(&format!(
        "{HEADER}.shared .b8 a[4294967295];\n.shared .b32 b[4];\n"
    )));
    assert_eq!(line, 5, "{message}");
    // A module-level array that fills u32 leaves no room for the kernel's own.
    let (line, message) = parse_error_line(parse(&format!(
        "{HEADER}.shared .b8 a[4294967290];\n.visible .entry k() {{\n    .shared .b32 b[4];\n    ret;\n}}\n"
    )));
    assert_eq!(line, 6, "{message}");
    // ... nor for the extern array after it.
    let (line, message) = parse_error_line(parse(&format!(
        "{HEADER}.shared .b8 a[4294967290];\n.extern .shared .align 16 .b8 d[];\n.visible .entry k() {{\n    ret;\n}}\n"
    )));
    assert!(line >= 4, "{message}");
}

#[test]
fn address_arithmetic_that_wraps_is_out_of_bounds() {
    // A register near 2^64 plus an offset that wraps it onto the first allocation: a GPU
    // address does not wrap into valid memory, so this is a fault, not a load.
    let text = kernel(
        "    .reg .b64 %rd<4>;\n    .reg .b32 %r<2>;",
        "    mov.u64 %rd1, 0xFFFFFFFF80000000;\n    ld.global.u32 %r1, [%rd1+6442450944];",
    );
    let error = launch_one(&text, LaunchConfig::linear(1, 1)).expect_err("wraps");
    assert_eq!(error.fault(), Some(Fault::OutOfBounds), "{error}");
    // Shared variables with offsets far past them.
    for address in [
        "s+9223372036854775807",
        "s-9223372036854775807",
        "s+4294967296",
    ] {
        let text = kernel(
            "    .reg .b32 %r<2>;\n    .shared .b32 s[4];",
            &format!("    st.shared.u32 [{address}], 1;\n    ld.shared.u32 %r1, [{address}];"),
        );
        let error = launch_one(&text, LaunchConfig::linear(1, 1)).expect_err(address);
        assert!(
            matches!(error.fault(), Some(Fault::OutOfBounds | Fault::Misaligned)),
            "{address}: {error}"
        );
    }
}

#[test]
fn host_reads_with_huge_counts_are_memory_errors() {
    let mut device = Device::new();
    let ptr = device.alloc(16);
    for len in [usize::MAX, usize::MAX - 8, 1 << 62, 17] {
        let error = device.read(ptr, len).expect_err("too long");
        assert!(matches!(error, SimError::Memory(_)), "{error}");
    }
    for count in [usize::MAX, usize::MAX / 4 + 1, 1 << 62, 5] {
        let error = device.read_f32(ptr, count).expect_err("too long");
        assert!(matches!(error, SimError::Memory(_)), "{error}");
        let error = device.read_u32(ptr, count).expect_err("too long");
        assert!(matches!(error, SimError::Memory(_)), "{error}");
    }
    assert!(device.write(ptr.offset(u64::MAX), &[1]).is_err());
    let far = DevicePtr(u64::MAX - 3).offset(100);
    assert_eq!(far, DevicePtr(u64::MAX));
    for ptr in [far, DevicePtr(u64::MAX - 3), DevicePtr(0)] {
        assert!(device.read(ptr, 4).is_err());
        assert!(device.write(ptr, &[0; 4]).is_err());
        assert!(device.free(ptr).is_err());
    }
    assert_eq!(device.read_f32(ptr, 4).expect("in bounds"), vec![0.0; 4]);
}

#[test]
fn linear_launches_use_the_documented_default_limit() {
    assert_eq!(LaunchConfig::linear(3, 64).step_limit, DEFAULT_STEP_LIMIT);
    assert_eq!(DEFAULT_STEP_LIMIT, 1 << 22);
    // A full warp spinning reaches it within seconds too (about 1.4 s in the test profile).
    let text = kernel(
        "    .reg .b32 %r<2>;",
        "$spin:\n    add.u32 %r1, %r1, 1;\n    bra.uni $spin;",
    );
    let start = Instant::now();
    let error = within(30, "full-warp spin", move || {
        launch_one(&text, LaunchConfig::linear(1, 32))
    })
    .expect_err("the loop never ends");
    assert_eq!(error.fault(), Some(Fault::RunAway), "{error}");
    eprintln!(
        "full-warp spin to the default limit: {:.2} s",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn cta_setup_counts_against_the_step_limit() {
    // Many CTAs that run nothing, and CTAs with 512 MiB of registers each: the step limit
    // stops both before they take long, and before the second allocates anything.
    let empty = format!("{HEADER}.visible .entry k(.param .u64 out) {{\n}}\n");
    let config = LaunchConfig {
        grid: [(1 << 31) - 1, 65535, 1],
        ..LaunchConfig::linear(1, 1024)
    };
    let error = within(10, "empty CTAs", move || launch_one(&empty, config)).expect_err("stops");
    assert_eq!(error.fault(), Some(Fault::RunAway), "{error}");
    let big = kernel("    .reg .b32 %r<65535>;", "");
    let error = within(10, "big CTAs", move || launch_one(&big, config)).expect_err("stops");
    assert_eq!(error.fault(), Some(Fault::RunAway), "{error}");
    assert!(error.to_string().contains("setting up"), "{error}");
}

#[test]
fn shuffled_grids_past_the_table_size_run_every_cta_once() {
    // 1025 x 1024 CTAs (more than 2^20, so the keyed permutation), each counting itself.
    let text = kernel(
        "    .reg .b32 %r<6>;\n    .reg .b64 %rd<4>;",
        "    ld.param.u64 %rd1, [out];\n    mov.u32 %r1, %ctaid.x;\n    mov.u32 %r2, %ctaid.y;\n    mov.u32 %r3, %nctaid.x;\n    mad.lo.u32 %r4, %r2, %r3, %r1;\n    mul.wide.u32 %rd2, %r4, 4;\n    add.s64 %rd3, %rd1, %rd2;\n    red.global.add.u32 [%rd3], 1;",
    );
    let module = parse(&text).expect("parses");
    let mut device = Device::new();
    let ctas = 1025 * 1024;
    let out = device.alloc(ctas * 4);
    let config = LaunchConfig {
        grid: [1025, 1024, 1],
        shuffle_seed: Some(5),
        step_limit: 1 << 28,
        ..LaunchConfig::linear(1, 1)
    };
    device
        .launch(&module.kernels[0], &config, &[Arg::Ptr(out)])
        .expect("runs");
    let counts = device.read_u32(out, ctas).unwrap();
    assert!(
        counts.iter().all(|&n| n == 1),
        "some CTA ran twice or never"
    );
}

// 5. Device memory.

#[test]
fn huge_allocations_are_memory_errors() {
    let mut device = Device::new();
    assert_eq!(device.memory_limit(), Some(DEFAULT_MEMORY_LIMIT));
    for bytes in [usize::MAX, usize::MAX / 2, 1 << 40, (4 << 30) + 1] {
        let error = device.try_alloc(bytes).expect_err("too big");
        assert!(matches!(error, SimError::Memory(_)), "{bytes}: {error}");
    }
    assert_eq!(device.allocated_bytes(), 0);
    // Under the limit, counted over live allocations only.
    let mut device = Device::with_memory_limit(Some(4096));
    let a = device.try_alloc(3000).expect("fits");
    assert!(device.try_alloc(1200).is_err());
    assert!(device.try_alloc_bytes(&[7; 1200]).is_err());
    device.free(a).unwrap();
    let b = device
        .try_alloc_bytes(&[7; 1200])
        .expect("fits after the free");
    assert_eq!(device.read(b, 3).unwrap(), vec![7; 3]);
    assert_eq!(device.allocated_bytes(), 1200);
    device.set_memory_limit(Some(1000));
    assert!(device.try_alloc(1).is_err());
    device.set_memory_limit(None);
    assert_eq!(device.memory_limit(), None);
    device.try_alloc(1 << 20).expect("no limit but the host");
    // Without a limit, the host's allocator refuses what no machine has.
    assert!(device.try_alloc(usize::MAX).is_err());
    assert!(device.try_alloc(1 << 62).is_err());
}

#[test]
#[should_panic(expected = "memory limit")]
fn infallible_allocations_panic_with_the_error() {
    Device::new().alloc(usize::MAX);
}

#[test]
fn kernels_that_break_module_wide_limits_are_parse_errors() {
    // 17 kernels of 65536 registers: over 2^20 in all, though each is within its limit.
    let one = ".visible .entry k{i}() {\n    .reg .b32 %r<65536>;\n    ret;\n}\n";
    let text: String = std::iter::once(HEADER.to_string())
        .chain((0..17).map(|i| one.replace("{i}", &i.to_string())))
        .collect();
    let (line, message) = within(10, "17 big kernels", move || parse_error_line(parse(&text)));
    assert_eq!(line, 3 + 16 * 4 + 2, "{message}");
    assert!(message.contains("registers"), "{message}");
    // 2048 module-level shared variables copied into 1024 kernels: over 2^20.
    let mut text = HEADER.to_string();
    for i in 0..2048 {
        text.push_str(&format!(".shared .b8 s{i}[1];\n"));
    }
    for i in 0..1024 {
        text.push_str(&format!(".entry k{i}() {{ ret; }}\n"));
    }
    let (line, message) = within(10, "shared product", move || parse_error_line(parse(&text)));
    assert!(line > 3 + 2048, "{message}");
    assert!(message.contains("shared variables"), "{message}");
}

#[test]
fn shared_declarations_keep_one_name_and_one_dynamic_array() {
    for (decls, needle) in [
        ("    .shared .b8 a[0];", "no elements"),
        (
            "    .shared .b8 a[4];\n    .extern .shared .b8 a[];",
            "declared twice",
        ),
        (
            "    .extern .shared .b8 a[];\n    .shared .b8 a[4];",
            "declared twice",
        ),
        (
            "    .extern .shared .b8 a[];\n    .extern .shared .b8 b[];",
            "only one extern",
        ),
    ] {
        let (_, message) = parse_error_line(parse(&kernel(decls, "")));
        assert!(message.contains(needle), "{decls}: {message}");
    }
}

// 6. Found in the audit.

#[test]
fn deeply_nested_braces_are_a_parse_error_not_a_stack_overflow() {
    let deep = "{".repeat(1_000_000);
    let text = kernel("    .reg .b32 %r<2>;", &format!("    mov.u32 %r1, {deep};"));
    let (line, _) = within(5, "nested braces", move || parse_error_line(parse(&text)));
    assert_eq!(line, 6);
}

#[test]
fn wide_multiplies_of_64_bit_operands_are_rejected() {
    for instruction in [
        "mul.wide.u64 %rd1, %rd2, %rd3;",
        "mul.wide.s64 %rd1, %rd2, %rd3;",
        "mad.wide.u64 %rd1, %rd2, %rd3, %rd1;",
        "mul.wide.u8 %rd1, %rd2, %rd3;",
    ] {
        let text = kernel("    .reg .b64 %rd<4>;", &format!("    {instruction}"));
        let (line, message) = parse_error_line(parse(&text));
        assert_eq!(line, 6, "{instruction}: {message}");
    }
}

#[test]
fn many_parameters_parse_in_linear_time_and_their_block_is_bounded() {
    // CUDA allows 32764 bytes of parameters.
    let params: Vec<String> = (0..4096).map(|i| format!(".param .u64 p{i}")).collect();
    let text = format!(
        "{HEADER}.visible .entry k({}) {{\n    ret;\n}}\n",
        params.join(", ")
    );
    let (line, message) = within(2, "4096 u64 parameters", move || {
        parse_error_line(parse(&text))
    });
    assert_eq!(line, 4, "{message}");
    assert!(message.contains("parameters"), "{message}");
    let params: Vec<String> = (0..32764).map(|i| format!(".param .u8 p{i}")).collect();
    let text = format!(
        "{HEADER}.visible .entry k({}) {{\n    ret;\n}}\n",
        params.join(", ")
    );
    let module = within(2, "32764 u8 parameters", move || parse(&text)).expect("at the limit");
    assert_eq!(module.kernels[0].param_bytes, 32764);
}

// 7. A mutation pass over the parser and the launcher.

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Byte ranges of the maximal runs of `text` that `is_part` accepts and `starts` may begin.
fn spans(
    text: &str,
    starts: impl Fn(char) -> bool,
    is_part: impl Fn(char) -> bool,
) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if starts(c) {
            let mut end = at + c.len_utf8();
            while let Some(&(next, d)) = chars.peek() {
                if !is_part(d) {
                    break;
                }
                end = next + d.len_utf8();
                chars.next();
            }
            found.push((at, end));
        }
    }
    found
}

fn replace_span(text: &str, (start, end): (usize, usize), with: &str) -> String {
    format!("{}{with}{}", &text[..start], &text[end..])
}

fn char_boundary(text: &str, rng: &mut Rng) -> usize {
    let boundaries: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .collect();
    *rng.pick(&boundaries)
}

const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1",
    "2147483648",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "340282366920938463463374607431768211456",
    "0xFFFFFFFFFFFFFFFF",
    "0f7F800000",
    "1e300",
];
const TYPES: &[&str] = &[
    ".u8", ".s8", ".b8", ".u16", ".s16", ".b16", ".f16", ".bf16", ".u32", ".s32", ".b32", ".f32",
    ".u64", ".s64", ".b64", ".f64", ".pred", ".v2", ".v4", ".nc", ".wide", ".lo", ".hi", ".rn",
];
const REGISTER_COUNTS: &[&str] = &[
    "0",
    "1",
    "65536",
    "65537",
    "4294967296",
    "18446744073709551615",
];

/// One mutation of `text`.
fn mutate(text: &str, rng: &mut Rng) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let join = |lines: Vec<&str>| lines.join("\n");
    match rng.below(9) {
        0 => {
            let mut lines = lines.clone();
            lines.remove(rng.below(lines.len()));
            join(lines)
        }
        1 => {
            let mut lines = lines.clone();
            let at = rng.below(lines.len());
            lines.insert(rng.below(lines.len()), lines[at]);
            join(lines)
        }
        2 => {
            let mut lines = lines.clone();
            let (a, b) = (rng.below(lines.len()), rng.below(lines.len()));
            lines.swap(a, b);
            join(lines)
        }
        3 => {
            let numbers = spans(text, |c| c.is_ascii_digit(), |c| c.is_ascii_alphanumeric());
            if numbers.is_empty() {
                text.to_string()
            } else {
                replace_span(text, *rng.pick(&numbers), rng.pick::<&str>(NUMBERS))
            }
        }
        4 => {
            let registers = spans(
                text,
                |c| c == '%',
                |c| c.is_ascii_alphanumeric() || c == '.',
            );
            if registers.is_empty() {
                return text.to_string();
            }
            let other = *rng.pick(&registers);
            let replacement = text[other.0..other.1].to_string();
            replace_span(text, *rng.pick(&registers), &replacement)
        }
        5 => text[..char_boundary(text, rng)].to_string(),
        6 => {
            let at = char_boundary(text, rng);
            let punctuation = ",;:[]{}()<>+-|@!.%";
            let c = punctuation.as_bytes()[rng.below(punctuation.len())] as char;
            format!("{}{c}{}", &text[..at], &text[at..])
        }
        7 => {
            let suffixes = spans(
                text,
                |c| c == '.',
                |c| c.is_ascii_alphanumeric() || c == '_',
            );
            if suffixes.is_empty() {
                text.to_string()
            } else {
                replace_span(text, *rng.pick(&suffixes), rng.pick::<&str>(TYPES))
            }
        }
        _ => {
            let counts = spans(text, |c| c == '<', |c| c.is_ascii_digit());
            if counts.is_empty() {
                text.to_string()
            } else {
                replace_span(
                    text,
                    *rng.pick(&counts),
                    &format!("<{}", rng.pick(REGISTER_COUNTS)),
                )
            }
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    mutants: usize,
    parsed: usize,
    launched: usize,
    ok: usize,
    faulted: usize,
    launch_errors: usize,
    parse_errors: usize,
    /// Faults and deadlocks by kind.
    kinds: std::collections::BTreeMap<String, usize>,
    panics: Vec<String>,
}

/// Arguments for `kernel`: the fixture's where the parameter still has its type, otherwise a
/// value of the declared type (so that more mutants get to run).
fn arguments(kernel: &ptx_sim::Kernel, wanted: &[Arg]) -> Vec<Arg> {
    use ptx_sim::ir::Type;
    kernel
        .params
        .iter()
        .enumerate()
        .map(|(i, param)| {
            let want = wanted.get(i).copied().unwrap_or(Arg::U32(1));
            let bits = |arg: Arg| match arg {
                Arg::U32(v) => u64::from(v),
                Arg::U64(v) => v,
                Arg::F32(v) => u64::from(v.to_bits()),
                Arg::Ptr(p) => p.0,
            };
            match param.ty {
                Type::F32 => Arg::F32(f32::from_bits(bits(want) as u32)),
                ty if ty.bytes() == 8 => match want {
                    Arg::Ptr(_) => want,
                    other => Arg::U64(bits(other)),
                },
                _ => Arg::U32(bits(want) as u32),
            }
        })
        .collect()
}

fn run_mutant(text: &str, counts: &mut Counts) {
    let lines = text.lines().count() + 1;
    let module = match parse(text) {
        Ok(module) => module,
        Err(SimError::Parse { line, message }) => {
            assert!(
                (1..=lines).contains(&line),
                "parse error on line {line} of {lines}: {message}"
            );
            counts.parse_errors += 1;
            return;
        }
        Err(other) => panic!("parse returned a non-parse error: {other}"),
    };
    counts.parsed += 1;
    let Some(kernel) = module.kernels.first() else {
        return;
    };
    let (rows, cols, rows_per_cta) = (3u32, 5u32, 2u32);
    let mut device = Device::new();
    let u = device.alloc_f32(&[0.5; 15]);
    let v = device.alloc_f32(&[0.25; 5]);
    let partials = device.alloc(2 * 5 * 4);
    let wanted = [
        Arg::Ptr(u),
        Arg::Ptr(v),
        Arg::Ptr(partials),
        Arg::U32(rows),
        Arg::U32(cols),
        Arg::U32(rows_per_cta),
    ];
    let has_dynamic = kernel.shared.iter().any(|s| s.size == 0);
    let config = LaunchConfig {
        grid: [2, 1, 1],
        block: [64, 1, 1],
        dynamic_shared_bytes: if has_dynamic { cols * 4 + 132 } else { 0 },
        shuffle_seed: Some(counts.mutants as u64),
        step_limit: 20_000,
    };
    counts.launched += 1;
    match device.launch(kernel, &config, &arguments(kernel, &wanted)) {
        Ok(_) => {
            counts.ok += 1;
            device
                .read_f32(partials, 10)
                .expect("the output stays readable");
        }
        Err(error @ SimError::Fault { line, fault, .. }) => {
            assert!(
                (1..=lines).contains(&line),
                "fault on line {line} of {lines}: {error}"
            );
            counts.faulted += 1;
            *counts.kinds.entry(format!("{fault:?}")).or_default() += 1;
        }
        Err(SimError::Deadlock { .. }) => {
            counts.faulted += 1;
            *counts.kinds.entry("Deadlock".into()).or_default() += 1;
        }
        Err(SimError::Launch { .. }) => counts.launch_errors += 1,
        Err(other) => panic!("unexpected error kind from a launch: {other}"),
    }
}

#[test]
fn mutants_of_a_real_kernel_never_panic() {
    const FIXTURE: &str = include_str!("fixtures/power_pass.ptx");
    const MUTANTS: usize = 4000;
    let start = Instant::now();
    let mut rng = Rng(0x5EED_F00D_CAFE_D00D);
    let mut counts = Counts::default();
    // The fixture itself first: it must run.
    run_mutant(FIXTURE, &mut counts);
    assert_eq!(counts.ok, 1, "the unmutated fixture runs: {counts:?}");
    for i in 0..MUTANTS {
        let mut text = FIXTURE.to_string();
        // One to three mutations on top of each other.
        for _ in 0..1 + rng.below(3) {
            text = mutate(&text, &mut rng);
        }
        counts.mutants += 1;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut local = Counts {
                mutants: counts.mutants,
                ..Counts::default()
            };
            run_mutant(&text, &mut local);
            local
        }));
        match outcome {
            Ok(local) => {
                counts.parsed += local.parsed;
                counts.launched += local.launched;
                counts.ok += local.ok;
                counts.faulted += local.faulted;
                counts.launch_errors += local.launch_errors;
                counts.parse_errors += local.parse_errors;
                for (kind, n) in local.kinds {
                    *counts.kinds.entry(kind).or_default() += n;
                }
            }
            Err(_) => counts.panics.push(format!("mutant {i}:\n{text}")),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    eprintln!(
        "mutation pass: {} mutants, {} parsed ({} parse errors), {} launched: {} ok, {} faulted {:?}, {} launch errors; {} panics; {seconds:.2} s",
        counts.mutants,
        counts.parsed - 1,
        counts.parse_errors,
        counts.launched - 1,
        counts.ok - 1,
        counts.faulted,
        counts.kinds,
        counts.launch_errors,
        counts.panics.len(),
    );
    assert!(
        counts.panics.is_empty(),
        "{} mutants panicked; the first:\n{}",
        counts.panics.len(),
        counts.panics[0]
    );
    assert!(
        counts.parsed > MUTANTS / 10,
        "too few mutants parse to test the launcher: {counts:?}"
    );
    assert!(seconds < 20.0, "the mutation pass took {seconds:.1} s");
}
