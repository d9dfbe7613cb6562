//! What the benchmarks share: the GPT-2-small shape set (defined once, in
//! `bench/shapes/gpt2_small.txt`, which the Python peers read too), the hashed inputs that
//! numpy reproduces bit for bit, the read-only baseline, the order of each round's variants,
//! medians and ratios, and the CPU label every table carries.
#![allow(dead_code)]

use rayon::prelude::*;
use spectral_step::{Element, MatrixShape};

const GPT2_SMALL: &str = include_str!("../../bench/shapes/gpt2_small.txt");

/// `(layers, one layer's shapes)` of `bench/shapes/gpt2_small.txt`.
fn parse_shape_set(text: &str) -> (usize, Vec<MatrixShape>) {
    let mut layers = 1;
    let mut shapes = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields[..] {
            ["layers", count] => layers = count.parse().expect("a layer count"),
            [fan_out, fan_in] => shapes.push(MatrixShape::new(
                fan_out.parse().expect("fan_out"),
                fan_in.parse().expect("fan_in"),
            )),
            _ => panic!("bench/shapes/gpt2_small.txt: bad line {line:?}"),
        }
    }
    (layers, shapes)
}

/// One GPT-2-small layer's weight matrices (4 shapes).
pub fn gpt2_small_layer() -> Vec<MatrixShape> {
    parse_shape_set(GPT2_SMALL).1
}

/// All 48 GPT-2-small weight matrices (85M parameters), layer after layer.
pub fn gpt2_small() -> Vec<MatrixShape> {
    let (layers, layer) = parse_shape_set(GPT2_SMALL);
    (0..layers).flat_map(|_| layer.iter().copied()).collect()
}

/// Element `index` of the hashed inputs, in `[-1, 1)`: `((h >> 40) / 2^24) * 2 - 1` with
/// `h = (index ^ salt) * 0x9E3779B97F4A7C15` (wrapping), which `bench/peers/peers.py`
/// computes the same way.
pub fn hashed_value<T: Element>(index: usize, salt: u64) -> T {
    let h = (index as u64 ^ salt).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    T::from_f32_rne(((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
}

/// `len` hashed values with salt `salt`, computed in parallel.
pub fn hashed<T: Element>(len: usize, salt: u64) -> Vec<T> {
    (0..len)
        .into_par_iter()
        .map(|i| hashed_value(i, salt))
        .collect()
}

/// One hashed matrix per shape; matrix `j` uses salt `salt + j`.
pub fn hashed_batch<T: Element>(shapes: &[MatrixShape], salt: u64) -> Vec<Vec<T>> {
    shapes
        .iter()
        .enumerate()
        .map(|(j, shape)| hashed(shape.len(), salt + j as u64))
        .collect()
}

/// The order of the variants in round `round`: a permutation of `0..count` drawn by a
/// Fisher-Yates shuffle from a splitmix64 stream seeded by the round, the same in every run.
///
/// What runs just before a pass changes its time, so no variant may always follow the same
/// one: on a Zen 4 EPYC two copies of identical code measured up to 1.33x apart with the
/// variants in a fixed order and up to 1.49x apart with the order rotated by one each round
/// (which keeps every variant's predecessor), and 0.97-1.02x in shuffled orders
/// (`bench/results/2026-12-07-1945-cpu-avx512-fixed-order.md`, `-2022-`, `-2024-`).
pub fn round_order(round: usize, count: usize) -> Vec<usize> {
    let mut state = 0x5EED_u64 ^ (round as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..count).collect();
    for last in (1..count).rev() {
        order.swap(last, (next() % (last as u64 + 1)) as usize);
    }
    order
}

/// Per round, the time of `numerator` over that of `denominator` (measured beside it in the
/// same round, so that slow drifts of the machine's load cancel), sorted: `[len / 2]` is the
/// median, the ends the range.
pub fn per_round_ratios(
    numerator: &[std::time::Duration],
    denominator: &[std::time::Duration],
) -> Vec<f64> {
    let mut ratios: Vec<f64> = numerator
        .iter()
        .zip(denominator)
        .map(|(n, d)| n.as_secs_f64() / d.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios
}

/// The read-only baseline: a wrapping sum of the bytes as 64-bit words in eight independent
/// lanes (so that LLVM keeps several vector accumulators and the loop waits on memory, not on
/// its own adds); nothing is written.
#[inline(always)]
fn read_sum_portable(bytes: &[u8]) -> u64 {
    let (head, words, tail) = bytemuck::pod_align_to::<u8, u64>(bytes);
    let (lanes, rest) = words.as_chunks::<8>();
    let sums = lanes.iter().fold([0u64; 8], |mut sums, lane| {
        sums.iter_mut()
            .zip(lane)
            .for_each(|(sum, &word)| *sum = sum.wrapping_add(word));
        sums
    });
    let edges = head.iter().chain(tail).map(|&b| u64::from(b));
    sums.into_iter()
        .chain(rest.iter().copied())
        .chain(edges)
        .fold(0, u64::wrapping_add)
}

/// [`read_sum_portable`] in 256-bit vectors where the CPU has AVX2: the fastest read this
/// machine does, so that "vs read" is against the real limit. (Compiled for AVX-512F, this
/// loop read the GPT-2-small set at 4.3-7.5 GB/s on a Zen 4 EPYC, against 20-27 GB/s for this
/// form: `bench/results/2026-12-07-1943-cpu-avx512-first-form.md`, run 1.)
pub fn read_sum(bytes: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        fn with_avx2(bytes: &[u8]) -> u64 {
            read_sum_portable(bytes)
        }
        // SAFETY: AVX2 was detected on this CPU just above.
        return unsafe { with_avx2(bytes) };
    }
    read_sum_portable(bytes)
}

/// The 1 MiB pieces of `buffers` that the read baselines sum, cut once, before timing.
pub fn read_pieces<'a>(buffers: &[&'a [u8]]) -> Vec<&'a [u8]> {
    buffers.iter().flat_map(|b| b.chunks(1 << 20)).collect()
}

/// [`read_sum`] over every piece, on one thread.
pub fn read_serial(pieces: &[&[u8]]) -> u64 {
    pieces
        .iter()
        .map(|b| read_sum(b))
        .fold(0, u64::wrapping_add)
}

/// [`read_sum`] over every piece, on the rayon pool.
pub fn read_parallel(pieces: &[&[u8]]) -> u64 {
    pieces
        .par_iter()
        .map(|b| read_sum(b))
        .reduce(|| 0, u64::wrapping_add)
}

/// The median of `values` (sorted in place).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The value of `--rounds N` on the command line, else `default` (other arguments, such as
/// the `--bench` that cargo passes, are left to the caller).
pub fn rounds_arg(default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// The CPU's model name (from `/proc/cpuinfo`), for the line every table is labelled with,
/// with its family and model numbers and whether it has AVX-512F: virtual machines often
/// report a bare "AMD EPYC" for different generations.
pub fn cpu_model() -> String {
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return "unknown CPU".into();
    };
    let field = |key: &str| {
        info.lines()
            .find(|line| line.split(':').next().map(str::trim) == Some(key))
            .and_then(|line| line.split_once(':'))
            .map(|(_, value)| value.trim().to_owned())
    };
    let name = field("model name").unwrap_or_else(|| "unknown CPU".into());
    let avx512 =
        field("flags").is_some_and(|flags| flags.split_whitespace().any(|f| f == "avx512f"));
    match (field("cpu family"), field("model")) {
        (Some(family), Some(model)) => format!(
            "{name} (family {family}, model {model}; {})",
            if avx512 { "AVX-512F" } else { "no AVX-512" }
        ),
        _ => name,
    }
}
