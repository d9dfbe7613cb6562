//! The power passes' loops over stored rows and kept tiles on AVX-512: sixteen `f32` lanes per
//! instruction, half the instructions of the AVX2 loops of [`super::rows`].
//!
//! The arithmetic is theirs, bit for bit, NaN payloads aside (math §4.2; a NaN only ever marks
//! its matrix non-finite):
//!
//! - a row's sums `<u, v>` and `||u||²` keep 32 accumulator lanes, as two 512-bit vectors
//!   instead of four 256-bit ones: element `k` of the row still lands in lane `k % 32`, the
//!   tail is zero-padded the same way, and the lanes are added in the same fixed tree
//!   ([`reduce`]);
//! - `partial += Σ t_i u_i` is one `fma` per element per row, in row order, whatever the
//!   vector width or the number of rows per sweep.
//!
//! Every stored type is widened in element order: `f32` as it is, `f16` by `vcvtph2ps`, and
//! `bf16` by `vpmovzxwd` and a shift (no reordering of `v` or the partial, unlike the AVX2
//! path's even-odd loops, which it matched in speed on a Zen 4 EPYC). `vdpbf16ps`,
//! AVX-512's `bf16` dot product, is not used: it adds each pair of products before
//! accumulating and flushes subnormals, which would change the bits.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::{
    __m256, __m256i, __m512, _mm512_castsi512_ps, _mm512_cvtepu16_epi32, _mm512_cvtph_ps,
    _mm512_fmadd_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_slli_epi32,
};

use half::{bf16, f16};

use super::rows::{Ahead, LANES, RowSums, RowSweep, reduce_lanes_avx2};
use crate::element::Element;

/// `f32` values per 512-bit vector.
const WIDTH: usize = 16;

/// A stored element type that this path widens sixteen at a time into a register, exactly as
/// [`Element::to_f32`] does.
pub(crate) trait Widen16: Element {
    /// Sixteen elements as sixteen `f32` lanes.
    ///
    /// # Safety
    ///
    /// The CPU has AVX-512F (the caller runs under [`super::KernelPath::Avx512`]'s check).
    unsafe fn widen16(values: &[Self; WIDTH]) -> __m512;
}

impl Widen16 for f32 {
    #[inline(always)]
    unsafe fn widen16(values: &[f32; WIDTH]) -> __m512 {
        bytemuck::cast(*values)
    }
}

impl Widen16 for f16 {
    #[inline(always)]
    unsafe fn widen16(values: &[f16; WIDTH]) -> __m512 {
        let packed: __m256i = bytemuck::cast(*values);
        // SAFETY: the caller promises AVX-512F, the one requirement of `vcvtph2ps` on 512 bits.
        unsafe { _mm512_cvtph_ps(packed) }
    }
}

impl Widen16 for bf16 {
    #[inline(always)]
    unsafe fn widen16(values: &[bf16; WIDTH]) -> __m512 {
        let packed: __m256i = bytemuck::cast(*values);
        // A `bf16` is the upper half of its `f32`: zero-extend each to 32 bits, shift it up.
        // SAFETY: the caller promises AVX-512F, the one requirement of these instructions.
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(packed))) }
    }
}

/// The 32 lanes held as two 512-bit vectors (lanes 0-15, 16-31), added in
/// [`super::rows::reduce_lanes`]'s tree: as the AVX2 path's four 256-bit quarters.
#[target_feature(enable = "avx512f,avx2,fma")]
fn reduce([low, high]: [__m512; 2]) -> f32 {
    let [q0, q1]: [__m256; 2] = bytemuck::cast(low);
    let [q2, q3]: [__m256; 2] = bytemuck::cast(high);
    reduce_lanes_avx2([q0, q1, q2, q3])
}

/// `(<u, v>, ||u||²)` for a whole stored row; `v.len() == u.len()`. The bits of
/// [`super::rows::row_sums`] on the AVX2 path. Fetches `ahead` as it goes.
///
/// # Safety
///
/// The CPU has AVX-512F, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn row_sums<E: Widen16>(u: &[E], v: &[f32], ahead: &mut Ahead) -> RowSums {
    debug_assert_eq!(u.len(), v.len());
    let (u_blocks, u_tail) = u.as_chunks::<LANES>();
    let (v_blocks, v_tail) = v.as_chunks::<LANES>();
    let mut dot = [_mm512_setzero_ps(); 2];
    let mut sum_sq = [_mm512_setzero_ps(); 2];
    let mut accumulate = |x: [__m512; 2], v_block: &[f32; LANES]| {
        let y: [__m512; 2] = bytemuck::cast(*v_block);
        for half in 0..2 {
            dot[half] = _mm512_fmadd_ps(x[half], y[half], dot[half]);
            sum_sq[half] = _mm512_fmadd_ps(x[half], x[half], sum_sq[half]);
        }
    };
    for (index, (u_block, v_block)) in u_blocks.iter().zip(v_blocks).enumerate() {
        ahead.cover(index, LANES * size_of::<E>());
        let halves: &[[E; WIDTH]; 2] = bytemuck::cast_ref(u_block);
        // SAFETY: compiled for AVX-512F, called only where the CPU has it.
        let x = [0, 1].map(|half| unsafe { E::widen16(&halves[half]) });
        accumulate(x, v_block);
    }
    if !u_tail.is_empty() {
        // Zero padding adds 0 * 0 to the lanes past the row's end: they keep their value.
        let (mut u_pad, mut v_pad) = ([0.0f32; LANES], [0.0f32; LANES]);
        for (dst, &value) in u_pad.iter_mut().zip(u_tail) {
            *dst = value.to_f32();
        }
        v_pad[..v_tail.len()].copy_from_slice(v_tail);
        accumulate(bytemuck::cast(u_pad), &v_pad);
    }
    RowSums {
        dot: reduce(dot),
        sum_sq: reduce(sum_sq),
    }
}

/// `partial += t[0] u[0] + ... + t[N-1] u[N-1]` element by element in row order (each row as
/// long as `partial`), the partial loaded and stored once per `N` rows. One cache line
/// `ahead` per 128 bytes of rows added.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn add_rows<E: Widen16, const N: usize>(
    u: [&[E]; N],
    t: [f32; N],
    partial: &mut [f32],
    ahead: &mut Ahead,
) {
    debug_assert!(u.iter().all(|row| row.len() == partial.len()));
    let tail_start = partial.len() / WIDTH * WIDTH;
    let (partial_lanes, partial_tail) = partial.as_chunks_mut::<WIDTH>();
    // Cut to the partial's length, so that the indexing below goes unchecked.
    let rows = u.map(|row| &row.as_chunks::<WIDTH>().0[..partial_lanes.len()]);
    let scale = t.map(|t| _mm512_set1_ps(t));
    for (index, acc) in partial_lanes.iter_mut().enumerate() {
        ahead.cover(index, N * WIDTH * size_of::<E>());
        let mut lanes: __m512 = bytemuck::cast(*acc);
        for (row, &scale) in rows.iter().zip(&scale) {
            // SAFETY: compiled for AVX-512F, called only where the CPU has it.
            let x = unsafe { E::widen16(&row[index]) };
            lanes = _mm512_fmadd_ps(scale, x, lanes);
        }
        *acc = bytemuck::cast(lanes);
    }
    for (offset, acc) in partial_tail.iter_mut().enumerate() {
        for (row, &t) in u.iter().zip(&t) {
            *acc = t.mul_add(row[tail_start + offset].to_f32(), *acc);
        }
    }
}

/// Rows added per sweep over the partial: eight scales, eight rows' vectors and the
/// accumulator fit AVX-512's 32 registers with room to spare.
pub(crate) const GROUP: usize = 8;

/// [`add_rows`] as a [`RowSweep`].
pub(crate) struct WideSweep;

impl<E: Widen16> RowSweep<E> for WideSweep {
    #[inline(always)]
    unsafe fn sweep<const N: usize>(
        u: [&[E]; N],
        t: [f32; N],
        partial: &mut [f32],
        ahead: &mut Ahead,
    ) {
        // SAFETY: the caller promises AVX-512F, AVX2, FMA and F16C.
        unsafe { add_rows(u, t, partial, ahead) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::KernelPath;

    /// Widening sixteen at a time gives `Element::to_f32`'s bits for every one of the 65536
    /// `f16` and `bf16` values, in every lane position (NaN payloads included).
    fn widening_matches_to_f32<E: Widen16>(from_bits: fn(u16) -> E) {
        if !KernelPath::Avx512.is_supported() {
            eprintln!("NOT RUN: AVX-512 widening (the CPU lacks AVX-512F)");
            return;
        }
        // SAFETY: `is_supported` has just confirmed AVX-512F.
        crate::cpu::rows::tests::widening_matches_to_f32(from_bits, |group| {
            bytemuck::cast(unsafe { E::widen16(group) })
        });
    }

    #[test]
    fn f16_widening_matches_to_f32_on_every_value() {
        widening_matches_to_f32(f16::from_bits);
    }

    #[test]
    fn bf16_widening_matches_to_f32_on_every_value() {
        widening_matches_to_f32(bf16::from_bits);
    }
}
