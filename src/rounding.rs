//! How a new weight is narrowed to its storage type (math §5a): round to nearest, or
//! stochastic rounding with random bits from Philox4x32-10 keyed on
//! `(seed, step, matrix, element)`.
//!
//! Everything here is integer arithmetic or exact `f32` operations, so the update kernel
//! (`kernels/update.ptx`, which states the same steps in PTX) produces the same bits on every
//! device, thread count and CTA order.

use crate::kernels::records::{
    BF16_MAX_BITS, F16_MAX_BITS, F16_MIN_NORMAL_BITS, PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS,
    PHILOX_W0, PHILOX_W1, ROUNDING_GROUP,
};

/// How the step writes `f16` and `bf16` weights (math §5a). `f32` weights are stored as
/// computed either way.
///
/// ```
/// use spectral_step::{Rounding, SpectralSgdConfig};
/// assert_eq!(SpectralSgdConfig::default().rounding, Rounding::Stochastic);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Rounding {
    /// Round up or down with probability proportional to the distance, so that the stored
    /// weight equals the computed one in expectation and small updates survive on average.
    /// The random bits are a pure function of the config's seed, the step, the matrix index
    /// and the element index. A finite weight beyond the largest finite value of its type
    /// saturates to it. The default.
    #[default]
    Stochastic,
    /// Round to nearest, ties to even (IEEE): an update far below half a unit in the last
    /// place of a weight is lost entirely, and a weight beyond the largest finite value
    /// becomes infinite.
    Nearest,
}

impl Rounding {
    /// The name used in state files (`"stochastic"`, `"nearest"`).
    pub const fn name(self) -> &'static str {
        match self {
            Rounding::Stochastic => "stochastic",
            Rounding::Nearest => "nearest",
        }
    }

    /// The rounding named `name` ([`name`](Self::name)), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        [Rounding::Stochastic, Rounding::Nearest]
            .into_iter()
            .find(|rounding| rounding.name() == name)
    }
}

/// Philox4x32-10, a keyed bijection on 128-bit counters, on `L` counters side by side:
/// `counters[w][lane]` is word `w` of counter `lane` (so that the multiplications of the
/// lanes run as vector instructions).
#[inline(always)]
fn philox_lanes<const L: usize>(counters: [[u32; L]; 4], key: [u32; 2]) -> [[u32; L]; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = counters;
    let [mut k0, mut k1] = key;
    for round in 0..PHILOX_ROUNDS {
        if round > 0 {
            k0 = k0.wrapping_add(PHILOX_W0);
            k1 = k1.wrapping_add(PHILOX_W1);
        }
        for lane in 0..L {
            let product0 = u64::from(PHILOX_M0) * u64::from(c0[lane]);
            let product1 = u64::from(PHILOX_M1) * u64::from(c2[lane]);
            c0[lane] = (product1 >> 32) as u32 ^ c1[lane] ^ k0;
            c1[lane] = product1 as u32;
            c2[lane] = (product0 >> 32) as u32 ^ c3[lane] ^ k1;
            c3[lane] = product0 as u32;
        }
    }
    [c0, c1, c2, c3]
}

/// Philox4x32-10 on one counter.
#[cfg(test)]
fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    philox_lanes(counter.map(|word| [word]), key).map(|[word]| word)
}

/// Groups per [`RoundingStream::batch`]: eight Philox calls side by side. (Sixteen, four
/// independent chains of vectors in the AVX2 form instead of two, measured no faster: the
/// AVX2 form is bound by instruction throughput, not by the multiplies' latency.)
pub(crate) const BATCH_GROUPS: usize = 8;

/// Elements per [`RoundingStream::batch`].
pub(crate) const BATCH: usize = ROUNDING_GROUP * BATCH_GROUPS;

/// The key and the step's part of the counter of the rounding stream of one step: what the
/// update kernel takes as its `key0`, `key1` and `step_lo` parameters.
///
/// Element `e` of matrix `matrix` at step `step` takes 16 bits of
/// `philox4x32_10([g_lo, g_hi, matrix, step_lo], [seed_lo, seed_hi ^ step_hi])` with
/// `g = e / 8`: word `(e % 8) / 2`, its low half for even `e`, its high half for odd `e`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RoundingKey {
    /// `[seed_lo, seed_hi ^ step_hi]`.
    pub key: [u32; 2],
    pub step_lo: u32,
}

impl RoundingKey {
    pub(crate) fn new(seed: u64, step: u64) -> Self {
        Self {
            key: [seed as u32, (seed >> 32) as u32 ^ (step >> 32) as u32],
            step_lo: step as u32,
        }
    }

    /// The stream of matrix `matrix` (its index in the layout).
    pub(crate) fn stream(self, matrix: u32) -> RoundingStream {
        RoundingStream { key: self, matrix }
    }
}

/// The rounding stream of one matrix in one step ([`RoundingKey`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RoundingStream {
    key: RoundingKey,
    matrix: u32,
}

impl RoundingStream {
    /// The Philox counters of groups `g .. g + BATCH_GROUPS`, `[word][group]`.
    #[inline(always)]
    fn counters(&self, first_group: u64) -> [[u32; BATCH_GROUPS]; 4] {
        let groups: [u64; BATCH_GROUPS] = std::array::from_fn(|i| first_group + i as u64);
        [
            groups.map(|g| g as u32),
            groups.map(|g| (g >> 32) as u32),
            [self.matrix; BATCH_GROUPS],
            [self.key.step_lo; BATCH_GROUPS],
        ]
    }

    /// [`batch`](Self::batch) in AVX2 instructions where the CPU has them (and `VECTOR`
    /// says to try), else in plain Rust: the same bits either way.
    #[inline(always)]
    pub(crate) fn batch_on<const VECTOR: bool>(&self, first_group: u64) -> [u16; BATCH] {
        #[cfg(target_arch = "x86_64")]
        if VECTOR && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the line above has just confirmed that this CPU has AVX2, which is all
            // that calling a function compiled for it requires.
            return unsafe { avx2::batch(self.counters(first_group), self.key.key) };
        }
        self.batch(first_group)
    }

    /// The 16-bit random numbers of elements `8 g .. 8 g + BATCH` (groups
    /// `g .. g + BATCH_GROUPS`), in element order.
    #[inline(always)]
    pub(crate) fn batch(&self, first_group: u64) -> [u16; BATCH] {
        let [w0, w1, w2, w3] = philox_lanes(self.counters(first_group), self.key.key);
        // Element 8 i + 2 w + h is half h (0 low, 1 high) of word w of group i.
        let halves: [[[u16; 2]; 4]; BATCH_GROUPS] = std::array::from_fn(|i| {
            [w0[i], w1[i], w2[i], w3[i]].map(|word| [word as u16, (word >> 16) as u16])
        });
        bytemuck::cast(halves)
    }
}

/// [`RoundingStream::batch`] in AVX2 instructions, the same bits (a unit test compares them).
///
/// Each word of the counters is carried in vectors of four 64-bit lanes. A lane keeps its
/// 32-bit word in its low half, and `_mm256_mul_epu32` reads only that half, so the high halves
/// may hold anything: each round is two multiplies, two shifts and four exclusive ors per
/// vector, with no masking or repacking between rounds.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m128i, __m256i, _mm256_and_si256, _mm256_cvtepu32_epi64, _mm256_mul_epu32,
        _mm256_or_si256, _mm256_permute2x128_si256, _mm256_set1_epi64x, _mm256_slli_epi64,
        _mm256_srli_epi64, _mm256_unpackhi_epi64, _mm256_unpacklo_epi64, _mm256_xor_si256,
    };

    use super::{BATCH, BATCH_GROUPS, PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1};

    /// Vectors of four counters per batch.
    const VECTORS: usize = BATCH_GROUPS / 4;

    /// One word of every counter of a batch: vector `q` holds counters `4 q .. 4 q + 4`.
    type Word = [__m256i; VECTORS];

    #[target_feature(enable = "avx2")]
    fn widen(word: [u32; BATCH_GROUPS]) -> Word {
        let quarters: [__m128i; VECTORS] = bytemuck::cast(word);
        quarters.map(|quarter| _mm256_cvtepu32_epi64(quarter))
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn batch(counters: [[u32; BATCH_GROUPS]; 4], key: [u32; 2]) -> [u16; BATCH] {
        let [mut c0, mut c1, mut c2, mut c3] = counters.map(|word| widen(word));
        let m0 = _mm256_set1_epi64x(i64::from(PHILOX_M0));
        let m1 = _mm256_set1_epi64x(i64::from(PHILOX_M1));
        let [mut k0, mut k1] = key;
        for round in 0..PHILOX_ROUNDS {
            if round > 0 {
                k0 = k0.wrapping_add(PHILOX_W0);
                k1 = k1.wrapping_add(PHILOX_W1);
            }
            let key0 = _mm256_set1_epi64x(i64::from(k0));
            let key1 = _mm256_set1_epi64x(i64::from(k1));
            for q in 0..VECTORS {
                let product0 = _mm256_mul_epu32(c0[q], m0);
                let product1 = _mm256_mul_epu32(c2[q], m1);
                c0[q] = _mm256_xor_si256(
                    _mm256_xor_si256(_mm256_srli_epi64::<32>(product1), c1[q]),
                    key0,
                );
                c1[q] = product1;
                c2[q] = _mm256_xor_si256(
                    _mm256_xor_si256(_mm256_srli_epi64::<32>(product0), c3[q]),
                    key1,
                );
                c3[q] = product0;
            }
        }
        // Element 8 i + 2 w + h is half h of word w of counter i: per counter its four words
        // in order, the 64-bit pairs (w0, w1) and (w2, w3) one after the other.
        let low = _mm256_set1_epi64x(0xFFFF_FFFF);
        let pair = |a: __m256i, b: __m256i| {
            _mm256_or_si256(_mm256_and_si256(a, low), _mm256_slli_epi64::<32>(b))
        };
        let mut out = [[0u16; 16]; 2 * VECTORS];
        for q in 0..VECTORS {
            let first = pair(c0[q], c1[q]);
            let second = pair(c2[q], c3[q]);
            let even = _mm256_unpacklo_epi64(first, second);
            let odd = _mm256_unpackhi_epi64(first, second);
            out[2 * q] = bytemuck::cast(_mm256_permute2x128_si256::<0x20>(even, odd));
            out[2 * q + 1] = bytemuck::cast(_mm256_permute2x128_si256::<0x31>(even, odd));
        }
        bytemuck::cast(out)
    }
}

/// The bf16 rounding of `value` with 16 random bits `random`.
///
/// A bf16 is the upper half of an `f32`: adding `random` to the lower half and truncating
/// rounds the magnitude up with probability `lower half / 2^16`, which is the distance to the
/// grid point below over the grid spacing, exactly. NaN keeps its sign and upper payload with
/// the quiet bit set (as round-to-nearest does); a finite value never rounds to infinity.
#[inline(always)]
pub(crate) fn bf16_stochastic(value: f32, random: u16) -> u16 {
    // Written with selects rather than early returns, so that the update loop vectorises.
    let bits = value.to_bits();
    let magnitude = bits & 0x7FFF_FFFF;
    let sign = (bits >> 16) & 0x8000;
    let rounded = bits.wrapping_add(u32::from(random)) >> 16;
    // Carried into the exponent of infinity: the largest finite bf16 instead.
    let saturated = magnitude < 0x7F80_0000 && rounded & 0x7FFF == 0x7F80;
    let rounded = if saturated {
        sign | BF16_MAX_BITS
    } else {
        rounded
    };
    let out = if magnitude > 0x7F80_0000 {
        (bits >> 16) | 0x0040
    } else {
        rounded
    };
    out as u16
}

/// `2^23`: added to `0 <= x < 2^23`, it rounds `x` to an integer, to nearest even, and leaves
/// that integer in the low mantissa bits.
const INTEGER_SHIFT: f32 = 8_388_608.0;

/// The integer nearest `x` (ties to even) for `0 <= x < 2^23`, without a float-to-integer
/// conversion (which does not vectorise).
#[inline(always)]
pub(crate) fn nearest_integer(x: f32) -> u32 {
    (x + INTEGER_SHIFT).to_bits() - INTEGER_SHIFT.to_bits()
}

/// `2^24`: one unit of the f16 subnormal grid is `2^-24`.
const F16_SUBNORMAL_UNITS: f32 = 16_777_216.0;

/// The f16 rounding of `value` with 16 random bits `random`.
///
/// At or above `2^-14` an f16 keeps the top 10 of the 23 mantissa bits of an `f32` with the
/// same exponent: adding the top 13 random bits to the 13 discarded ones and truncating rounds
/// up with probability exactly distance over spacing, as for bf16. Below, the grid is
/// `k 2^-24`: with `x = |value| 2^24` (exact), `k = floor(x) + [random < 2^16 (x - floor(x))]`,
/// which rounds up with probability within `2^-16` of the distance. Values beyond 65504 round
/// to 65504 (never to infinity); infinities stay; NaN keeps its sign and upper
/// payload with the quiet bit set (as round-to-nearest does).
#[inline(always)]
pub(crate) fn f16_stochastic(value: f32, random: u16) -> u16 {
    let bits = value.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let magnitude = bits & 0x7FFF_FFFF;
    let half_magnitude = if magnitude >= 0x7F80_0000 {
        let quiet = if magnitude > 0x7F80_0000 { 0x0200 } else { 0 };
        0x7C00 | quiet | ((magnitude & 0x007F_FFFF) >> 13)
    } else if magnitude >= F16_MIN_NORMAL_BITS {
        // f16 exponent = f32 exponent - 112: subtract 112 << 10 from the shifted bits.
        let shifted = ((magnitude + u32::from(random >> 3)) >> 13) - (112 << 10);
        shifted.min(F16_MAX_BITS)
    } else {
        // `units < 1024`: every step below is exact. `floor(units)` from the nearest integer
        // (adding 2^23 rounds to one and leaves it in the low mantissa bits), less one where
        // that rounded up: selects and integer arithmetic that vectorise, where a
        // float-to-integer conversion does not.
        let units = f32::from_bits(magnitude) * F16_SUBNORMAL_UNITS;
        let nearest = (units + INTEGER_SHIFT) - INTEGER_SHIFT;
        let below = if nearest > units {
            nearest - 1.0
        } else {
            nearest
        };
        let threshold = (units - below) * 65_536.0;
        nearest_integer(below) + u32::from(f32::from(random) < threshold)
    };
    (sign | half_magnitude) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Below `2^-14` the stored count of `2^-24` units is `floor(u) + [r < 2^16 (u - floor(u))]`
    /// (math §5a): the branch-free form equals that formula written with float-to-integer
    /// conversions, on a stride through every subnormal-range `f32` and random words at and
    /// either side of each threshold.
    #[test]
    fn f16_subnormal_stochastic_rounding_is_the_documented_formula() {
        let formula = |value: f32, random: u16| {
            let units = value.abs() * F16_SUBNORMAL_UNITS;
            let below = units as u32;
            let threshold = (units - below as f32) * 65_536.0;
            below + u32::from(f32::from(random) < threshold)
        };
        for bits in (0..F16_MIN_NORMAL_BITS)
            .step_by(101)
            .chain([F16_MIN_NORMAL_BITS - 1])
        {
            let value = f32::from_bits(bits);
            let units = value * F16_SUBNORMAL_UNITS;
            let threshold = (units - units.floor()) * 65_536.0;
            let near = threshold as u16;
            let randoms = [
                0,
                1,
                0x7FFF,
                0x8000,
                0xFFFF,
                near.saturating_sub(1),
                near,
                near.saturating_add(1),
            ];
            for random in randoms {
                for signed in [value, -value] {
                    let ours = f16_stochastic(signed, random);
                    assert_eq!(
                        u32::from(ours & 0x7FFF),
                        formula(signed, random),
                        "f32 bits {bits:#010x}, random {random}"
                    );
                    assert_eq!(ours & 0x8000 != 0, signed.is_sign_negative());
                }
            }
        }
    }

    #[test]
    fn the_avx2_batch_gives_the_portable_bits() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            for (seed, step, matrix) in [
                (0, 1, 0),
                (0x5EED_0000_0000_0007, 1 << 33, 7),
                (u64::MAX, u64::MAX, u32::MAX),
            ] {
                let stream = RoundingKey::new(seed, step).stream(matrix);
                for group in [0, 8, 1 << 20, (1 << 32) - 4, u64::MAX - 7] {
                    assert_eq!(
                        stream.batch_on::<true>(group),
                        stream.batch(group),
                        "{seed} {step} {matrix} {group}"
                    );
                }
            }
            return;
        }
        eprintln!("NOT RUN: the AVX2 rounding batch (this CPU has no AVX2)");
    }

    /// The three `philox4x32 10` lines of Random123's `tests/kat_vectors`
    /// (github.com/DEShawResearch/random123): counter, key, expected output.
    #[test]
    fn philox_matches_the_random123_known_answers() {
        let cases: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            (
                [0; 4],
                [0; 2],
                [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
            ),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (counter, key, expected) in cases {
            assert_eq!(
                philox4x32_10(counter, key),
                expected,
                "counter {counter:x?}"
            );
        }
    }

    /// The random numbers of element `element` as the documentation of [`RoundingStream`]
    /// states them, one Philox call per element.
    fn documented_bits(seed: u64, step: u64, matrix: u32, element: u64) -> u32 {
        let group = element / 8;
        let words = philox4x32_10(
            [group as u32, (group >> 32) as u32, matrix, step as u32],
            [seed as u32, (seed >> 32) as u32 ^ (step >> 32) as u32],
        );
        let lane = (element % 8) as usize;
        (words[lane / 2] >> (16 * (lane % 2))) & 0xFFFF
    }

    #[test]
    fn batches_hold_the_documented_bits() {
        let (seed, step, matrix) = (0xDEAD_BEEF_0123, 1 << 33 | 9, 4);
        let stream = RoundingKey::new(seed, step).stream(matrix);
        for first in [0u64, 8, (1 << 32) - 3] {
            let batch = stream.batch(first);
            for (k, &bits) in batch.iter().enumerate() {
                let element = 8 * first + k as u64;
                assert_eq!(
                    u32::from(bits),
                    documented_bits(seed, step, matrix, element),
                    "element {element}"
                );
            }
        }
    }

    #[test]
    fn stream_depends_on_every_key_part() {
        let base = RoundingKey::new(7, 3).stream(2).batch(5);
        for other in [
            RoundingKey::new(8, 3).stream(2).batch(5),
            RoundingKey::new(7 | 1 << 40, 3).stream(2).batch(5),
            RoundingKey::new(7, 4).stream(2).batch(5),
            RoundingKey::new(7, 3 | 1 << 33).stream(2).batch(5),
            RoundingKey::new(7, 3).stream(1).batch(5),
            RoundingKey::new(7, 3).stream(2).batch(6),
            RoundingKey::new(7, 3).stream(2).batch(5 | 1 << 32),
        ] {
            assert_ne!(base, other);
        }
    }

    /// The grid neighbours `lower <= value <= upper` of a finite `value`, from `nearest`
    /// (the `half` crate's round-to-nearest) and one step along the grid's bit patterns:
    /// independent of the functions under test.
    fn neighbours(value: f32, nearest: fn(f32) -> u16, widen: fn(u16) -> f64) -> (f64, f64) {
        let bits = nearest(value);
        let near = widen(bits);
        let x = f64::from(value);
        if near == x {
            return (x, x);
        }
        // One grid step away from zero is `bits + 1`, towards zero `bits - 1` (sign and
        // magnitude); towards zero is only taken from a nonzero `near`.
        let negative = bits & 0x8000 != 0;
        let other = if (near < x) != negative {
            widen(bits + 1)
        } else {
            widen(bits - 1)
        };
        (near.min(other), near.max(other))
    }

    /// Over all 2^16 random values the result is one of the two grid neighbours of `value`,
    /// and it is the upper one for `(value - lower) / (upper - lower) * 2^16` of them (to
    /// within one).
    fn check_exact_probability(
        value: f32,
        round: fn(f32, u16) -> u16,
        nearest: fn(f32) -> u16,
        widen: fn(u16) -> f64,
    ) {
        let (lower, upper) = neighbours(value, nearest, widen);
        let mut ups = 0u32;
        for random in 0..=u16::MAX {
            let rounded = widen(round(value, random));
            assert!(
                rounded == lower || rounded == upper,
                "{value} with {random}: {rounded} is not {lower} or {upper}"
            );
            ups += u32::from(rounded == upper && upper != lower);
        }
        let value = f64::from(value);
        let expected_ups = if upper == lower {
            0.0
        } else {
            (value - lower) / (upper - lower) * 65536.0
        };
        assert!(
            (f64::from(ups) - expected_ups).abs() <= 1.0,
            "{value}: {ups} of 65536 round to {upper}, expected {expected_ups}"
        );
    }

    fn nearest_bf16(value: f32) -> u16 {
        half::bf16::from_f32(value).to_bits()
    }

    fn nearest_f16(value: f32) -> u16 {
        half::f16::from_f32(value).to_bits()
    }

    fn widen_bf16(bits: u16) -> f64 {
        f64::from(half::bf16::from_bits(bits).to_f32())
    }

    fn widen_f16(bits: u16) -> f64 {
        f64::from(half::f16::from_bits(bits).to_f32())
    }

    #[test]
    fn bf16_rounds_up_with_probability_proportional_to_distance() {
        for value in [
            1.0f32 + 3.0 / 1024.0,
            -0.3,
            1e-3,
            2.5e-39,
            -7.0e30,
            1.0,
            0.0,
        ] {
            check_exact_probability(value, bf16_stochastic, nearest_bf16, widen_bf16);
        }
    }

    #[test]
    fn f16_rounds_up_with_probability_proportional_to_distance() {
        for value in [
            1.0f32 + 3.0 / 8192.0,
            -0.3,
            1e-3,
            6.2e-5,
            3.0e-6,
            -4.0e-8,
            65000.3,
            0.0,
        ] {
            check_exact_probability(value, f16_stochastic, nearest_f16, widen_f16);
        }
    }

    #[test]
    fn special_values_match_round_to_nearest() {
        for value in [
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            0.0,
            -0.0,
        ] {
            for random in [0, 0x7FFF, 0xFFFF] {
                assert_eq!(
                    bf16_stochastic(value, random),
                    half::bf16::from_f32(value).to_bits(),
                    "bf16 {value}"
                );
                assert_eq!(
                    f16_stochastic(value, random),
                    half::f16::from_f32(value).to_bits(),
                    "f16 {value}"
                );
            }
        }
        let payload = f32::from_bits(0x7F80_0001);
        assert!(half::bf16::from_bits(bf16_stochastic(payload, 0xFFFF)).is_nan());
        assert!(half::f16::from_bits(f16_stochastic(payload, 0xFFFF)).is_nan());
    }

    #[test]
    fn finite_values_never_round_to_infinity() {
        assert_eq!(bf16_stochastic(f32::MAX, 0xFFFF), 0x7F7F);
        assert_eq!(bf16_stochastic(-f32::MAX, 0xFFFF), 0xFF7F);
        assert_eq!(f16_stochastic(65519.0, 0xFFFF), 0x7BFF);
        assert_eq!(f16_stochastic(-1.0e9, 0), 0xFBFF);
    }

    #[test]
    fn grid_values_are_kept() {
        for bits in [0x3F80u16, 0x0001, 0xC2F7, 0x7F7F] {
            let value = half::bf16::from_bits(bits).to_f32();
            assert_eq!(bf16_stochastic(value, 0xFFFF), bits);
        }
        for bits in [0x3C00u16, 0x0001, 0x03FF, 0x0400, 0xC2F7, 0x7BFF] {
            let value = half::f16::from_bits(bits).to_f32();
            assert_eq!(f16_stochastic(value, 0xFFFF), bits, "{value}");
        }
    }
}
