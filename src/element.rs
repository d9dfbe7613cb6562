//! Element types for weights and gradients (math §5: `f32`, `f16`, `bf16`). Momentum and power
//! vectors are always `f32`, and every sum is accumulated in `f32`.

use half::{bf16, f16};

/// The storage type of a weight or gradient element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (the upper half of a binary32).
    Bf16,
}

impl Dtype {
    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    /// Whether this is a 16-bit type, whose new weights the step rounds as
    /// [`Rounding`](crate::Rounding) says.
    pub const fn is_low_precision(self) -> bool {
        !matches!(self, Dtype::F32)
    }

    /// Short lower-case name (`"f32"`, `"f16"`, `"bf16"`), as used in benchmark ids.
    pub const fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// The element types of one step's weights and gradients (math §5a): both the same type, or
/// `f32` master weights with 16-bit gradients (mixed precision). A 16-bit weight with
/// gradients of another type is refused: its update would be rounded to the weights' grid
/// anyway, so the wider gradient buys nothing, and no kernel is built for it.
///
/// ```
/// use spectral_step::{Dtype, StepTypes};
/// let mixed = StepTypes::new(Dtype::F32, Dtype::Bf16)?;
/// assert!(mixed.is_mixed());
/// assert!(StepTypes::new(Dtype::Bf16, Dtype::F32).is_err());
/// # Ok::<(), spectral_step::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StepTypes {
    weights: Dtype,
    grads: Dtype,
}

impl StepTypes {
    /// Every supported pair, in a fixed order (the update kernels are built for these).
    pub const ALL: [StepTypes; 5] = [
        StepTypes::same(Dtype::F32),
        StepTypes::same(Dtype::F16),
        StepTypes::same(Dtype::Bf16),
        StepTypes {
            weights: Dtype::F32,
            grads: Dtype::F16,
        },
        StepTypes {
            weights: Dtype::F32,
            grads: Dtype::Bf16,
        },
    ];

    /// Weights and gradients of one type.
    pub const fn same(dtype: Dtype) -> Self {
        Self {
            weights: dtype,
            grads: dtype,
        }
    }

    /// The pair, or [`Error::ElementTypes`](crate::Error::ElementTypes) when it is not one of
    /// [`ALL`](Self::ALL).
    pub fn new(weights: Dtype, grads: Dtype) -> crate::Result<Self> {
        let types = Self { weights, grads };
        if Self::ALL.contains(&types) {
            Ok(types)
        } else {
            Err(crate::Error::ElementTypes(format!(
                "{} weights with {} gradients: the weights and gradients must have one type, \
                 or the weights must be f32 (master weights) with f16 or bf16 gradients",
                weights.name(),
                grads.name()
            )))
        }
    }

    /// The pair of two element types, checked as [`new`](Self::new) does.
    pub fn of<W: Element, G: Element>() -> crate::Result<Self> {
        Self::new(W::DTYPE, G::DTYPE)
    }

    /// The weights' type.
    pub const fn weights(self) -> Dtype {
        self.weights
    }

    /// The gradients' type (also that of the low-precision copy of the weights).
    pub const fn grads(self) -> Dtype {
        self.grads
    }

    /// `f32` master weights with 16-bit gradients: the pairing that may write a 16-bit copy
    /// of the new weights in the update pass.
    pub const fn is_mixed(self) -> bool {
        self.weights as u8 != self.grads as u8
    }

    /// Position in [`ALL`](Self::ALL).
    pub const fn index(self) -> usize {
        let mut index = 0;
        while index < Self::ALL.len() {
            let pair = Self::ALL[index];
            if pair.weights as u8 == self.weights as u8 && pair.grads as u8 == self.grads as u8 {
                return index;
            }
            index += 1;
        }
        // The fields are private and every constructor yields a pair of ALL.
        panic!("StepTypes holds a pair of StepTypes::ALL")
    }

    /// Errors unless a copy of the new weights can be written: `f32` weights with 16-bit
    /// gradients, the copy having the gradients' type.
    pub(crate) fn check_copy(self) -> crate::Result<()> {
        if self.is_mixed() {
            Ok(())
        } else {
            Err(crate::Error::ElementTypes(format!(
                "a low-precision copy needs f32 weights with f16 or bf16 gradients (the copy \
                 has the gradients' type), not {} weights with {} gradients",
                self.weights.name(),
                self.grads.name()
            )))
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A weight or gradient element: `f32`, [`half::f16`] or [`half::bf16`].
///
/// Values are widened to `f32` for arithmetic and narrowed back with round-to-nearest-even
/// or stochastic rounding ([`Rounding`](crate::Rounding)).
///
/// ```
/// use spectral_step::Element;
/// let x = half::bf16::from_f32_rne(1.0);
/// assert_eq!(x.to_f32(), 1.0);
/// ```
pub trait Element:
    bytemuck::Pod + Default + Send + Sync + std::fmt::Debug + PartialEq + sealed::Sealed + 'static
{
    /// The runtime tag of this type.
    const DTYPE: Dtype;
    /// Exact widening to `f32`.
    fn to_f32(self) -> f32;
    /// Narrowing from `f32`, round to nearest, ties to even.
    fn from_f32_rne(value: f32) -> Self;
    /// Narrowing from `f32` with stochastic rounding (math §5a), `random` being 16 uniform
    /// random bits; exact (`value` itself) for `f32`.
    #[doc(hidden)]
    fn from_f32_stochastic(value: f32, random: u16) -> Self;
    /// The slice itself when the element type is `f32` (so hot loops read it in place),
    /// `None` otherwise.
    #[inline(always)]
    fn as_f32_slice(values: &[Self]) -> Option<&[f32]> {
        let _ = values;
        None
    }
    /// The raw bits when the element type is `bf16` (so SIMD code can widen in registers),
    /// `None` otherwise.
    #[inline(always)]
    fn as_bf16_bits(values: &[Self]) -> Option<&[u16]> {
        let _ = values;
        None
    }
    /// The slice itself when the element type is `f16` (so SIMD code can widen it in
    /// registers), `None` otherwise.
    #[inline(always)]
    fn as_f16_slice(values: &[Self]) -> Option<&[f16]> {
        let _ = values;
        None
    }
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32_rne(value: f32) -> Self {
        value
    }
    #[inline(always)]
    fn from_f32_stochastic(value: f32, _random: u16) -> Self {
        value
    }
    #[inline(always)]
    fn as_f32_slice(values: &[Self]) -> Option<&[f32]> {
        Some(values)
    }
}

impl Element for f16 {
    const DTYPE: Dtype = Dtype::F16;
    #[inline(always)]
    fn as_f16_slice(values: &[Self]) -> Option<&[f16]> {
        Some(values)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_bits_to_f32(self.to_bits())
    }
    #[inline(always)]
    fn from_f32_rne(value: f32) -> Self {
        f16::from_bits(f32_to_f16_bits_rne(value))
    }
    #[inline(always)]
    fn from_f32_stochastic(value: f32, random: u16) -> Self {
        f16::from_bits(crate::rounding::f16_stochastic(value, random))
    }
}

/// Exact widening of `f16` bits, the value `half::f16::to_f32` gives (NaNs quieted, payload
/// kept, as F16C's `vcvtph2ps` does), written without branches so that the hot loops
/// vectorise: `half` picks F16C or its software form at run time for every element, which
/// measured 40 times slower than `bf16`'s shift in the power pass.
#[inline(always)]
fn f16_bits_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits & 0x8000) << 16;
    let magnitude = u32::from(bits & 0x7fff);
    let exponent = magnitude & 0x7c00;
    let shifted = magnitude << 13;
    // Normal: the exponent rebiased from 15 to 127.
    let normal = shifted + ((127 - 15) << 23);
    // Subnormal (and zero): magnitude * 2^-24, exact in f32.
    let subnormal = (magnitude as f32 * f32::from_bits(0x3380_0000)).to_bits();
    // Infinity, or NaN with the quiet bit set.
    let quiet = if magnitude & 0x03ff != 0 {
        0x0040_0000
    } else {
        0
    };
    let special = 0x7f80_0000 | shifted | quiet;
    let value = if exponent == 0x7c00 {
        special
    } else if exponent == 0 {
        subnormal
    } else {
        normal
    };
    f32::from_bits(sign | value)
}

/// `f16` bits nearest to `value`, ties to even: the value `half::f16::from_f32` and F16C's
/// `vcvtps2ph` give (overflow to infinity, NaNs quieted with the top of their payload kept),
/// written without branches so that the step's update loop vectorises, as
/// [`f16_bits_to_f32`] for the other direction.
#[inline(always)]
fn f32_to_f16_bits_rne(value: f32) -> u16 {
    let bits = value.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let magnitude = bits & 0x7fff_ffff;
    // Normal: round the 13 dropped mantissa bits to nearest even (a carry moves into the
    // exponent, as it should), rebias from 127 to 15; anything from 65520 up becomes
    // infinity (0x7c00).
    let lowest_kept = (magnitude >> 13) & 1;
    let normal = ((magnitude + 0x0fff + lowest_kept) >> 13)
        .wrapping_sub((127 - 15) << 10)
        .min(0x7c00);
    // Subnormal (below 2^-14): the count of 2^-24 units, |value| 2^24 (exact), rounded to an
    // integer to nearest even; 1024 units is the smallest normal, whose bits are 0x0400.
    let units = f32::from_bits(magnitude) * 16_777_216.0;
    let subnormal = crate::rounding::nearest_integer(units);
    let nan = 0x7e00 | ((magnitude & 0x007f_ffff) >> 13);
    let out = if magnitude > 0x7f80_0000 {
        nan
    } else if magnitude >= 0x3880_0000 {
        normal
    } else {
        subnormal
    };
    (sign | out) as u16
}

impl Element for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    #[inline(always)]
    fn as_bf16_bits(values: &[Self]) -> Option<&[u16]> {
        Some(bytemuck::cast_slice(values))
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // A bf16 is the upper 16 bits of an f32, so widening is a shift (exact, NaN payloads kept).
        // Written out so that the hot loops vectorise.
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[inline(always)]
    fn from_f32_rne(value: f32) -> Self {
        bf16::from_f32(value)
    }
    #[inline(always)]
    fn from_f32_stochastic(value: f32, random: u16) -> Self {
        bf16::from_bits(crate::rounding::bf16_stochastic(value, random))
    }
}

#[cfg(test)]
mod tests {
    /// Narrowing matches `half` (F16C's `vcvtps2ph` where the CPU has it) on every `f32`
    /// that decides a rounding: each `f16` value, each midpoint between neighbours, one unit
    /// either side of both, and a stride through all 2^32 bit patterns.
    #[test]
    fn f16_narrowing_matches_half() {
        let check = |value: f32| {
            let ours = super::f32_to_f16_bits_rne(value);
            let theirs = half::f16::from_f32(value).to_bits();
            assert_eq!(ours, theirs, "f32 bits {:#010x}", value.to_bits());
        };
        for bits in 0..=u16::MAX {
            let low = half::f16::from_bits(bits).to_f32();
            let high = half::f16::from_bits(bits.wrapping_add(1)).to_f32();
            let midpoint = ((f64::from(low) + f64::from(high)) / 2.0) as f32;
            for value in [low, midpoint] {
                for ulps in [-1i32, 0, 1] {
                    let shifted = f32::from_bits(value.to_bits().wrapping_add_signed(ulps));
                    check(shifted);
                    check(-shifted);
                }
            }
        }
        for bits in (0..=u32::MAX).step_by(997) {
            check(f32::from_bits(bits));
        }
        // Around 65520, the overflow threshold (the midpoint between 65504 and the next step,
        // whose f16 is infinity, so the loop above never forms it), and the extremes.
        for bits in [
            0x477f_efff,
            0x477f_f000,
            0x477f_f001,
            0x3880_0000,
            0x387f_ffff,
            1,
            0,
        ] {
            check(f32::from_bits(bits));
            check(-f32::from_bits(bits));
        }
        for value in [f32::MAX, f32::MIN_POSITIVE, f32::INFINITY, f32::NAN] {
            check(value);
            check(-value);
        }
    }

    /// Every one of the 65536 `f16` values widens to `half`'s `f32`, bit for bit.
    #[test]
    fn f16_widening_matches_half_on_every_value() {
        for bits in 0..=u16::MAX {
            let ours = super::f16_bits_to_f32(bits);
            let theirs = half::f16::from_bits(bits).to_f32();
            assert_eq!(ours.to_bits(), theirs.to_bits(), "f16 bits {bits:#06x}");
        }
    }
}
