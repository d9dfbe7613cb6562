//! The fused pass over stored `bf16` rows on AVX2, widening sixteen values per load.
//!
//! A 256-bit load holds sixteen `bf16` values, two per 32-bit lane: element `2j` in the low
//! half of lane `j`, element `2j + 1` in the high half. A `bf16` is the top half of its `f32`,
//! so one shift gives the even elements as `f32` and one mask the odd ones: two operations per
//! sixteen elements, where widening eight at a time (`vpmovzxwd`, then a shift) takes four.
//!
//! The price is the order: the vectors hold elements `0, 2, ..., 14` and `1, 3, ..., 15`. So
//! that the results stay bit for bit those of the in-order path ([`super::rows`]):
//!
//! - the dot products run against a copy of `v` in the same even-odd order, so every
//!   accumulator lane still sums one fixed set of elements (`k ≡ lane (mod 32)`) in row
//!   order; the lanes are put back in order before the tail and the fixed reduction tree;
//! - the block's partial `w` is kept in even-odd order while its rows are added (each element
//!   still receives `t_i u_i` in row order) and put back in order at the end of the block.
//!
//! Only whole blocks of sixteen (of 32, for the dot products) are reordered; the tails run
//! in order, as in the in-order path.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::{
    __m256, __m256i, _mm256_and_si256, _mm256_castsi256_ps, _mm256_fmadd_ps,
    _mm256_permute2f128_ps, _mm256_set1_epi32, _mm256_set1_ps, _mm256_slli_epi32,
    _mm256_unpackhi_ps, _mm256_unpacklo_ps,
};

use super::rows::{Ahead, LANES, RowSums, Rows, SIMD_WIDTH, accumulate_lanes, reduce_lanes_avx2};
use crate::layout::RowBlock;

/// Elements per even-odd block: one 256-bit load of `bf16`.
const BLOCK: usize = 2 * SIMD_WIDTH;

thread_local! {
    /// Each worker's buffer for `v` in even-odd order, refilled for every block and kept
    /// allocated between blocks and passes.
    static V_EVEN_ODD: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Sixteen stored `bf16` values (`&[u16; 16]`) widened to `f32`: `[even, odd]`, the elements
/// `0, 2, ..., 14`, then `1, 3, ..., 15`. Exact, as [`crate::Element::to_f32`]. A macro, not a
/// function: LLVM does not inline the function form into the loops (measured: half the speed).
macro_rules! widen_even_odd {
    ($bits:expr) => {{
        let packed: __m256i = bytemuck::cast(*$bits);
        let even = _mm256_slli_epi32::<16>(packed);
        let odd = _mm256_and_si256(packed, _mm256_set1_epi32(0xFFFF_0000_u32 as i32));
        [_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd)]
    }};
}

/// The even and odd vectors of one block back in element order: elements 0-7, then 8-15.
#[target_feature(enable = "avx2,fma")]
fn in_order([even, odd]: [__m256; 2]) -> [__m256; 2] {
    // unpacklo: elements 0-3 | 8-11; unpackhi: 4-7 | 12-15.
    let low = _mm256_unpacklo_ps(even, odd);
    let high = _mm256_unpackhi_ps(even, odd);
    [
        _mm256_permute2f128_ps::<0x20>(low, high),
        _mm256_permute2f128_ps::<0x31>(low, high),
    ]
}

/// `values` with each whole block of sixteen stored as its even, then its odd elements.
fn to_even_odd(values: &[f32], out: &mut [f32]) {
    let (blocks, tail) = values.as_chunks::<BLOCK>();
    let (out_blocks, out_tail) = out.as_chunks_mut::<BLOCK>();
    for (block, out) in blocks.iter().zip(out_blocks) {
        for pair in 0..SIMD_WIDTH {
            out[pair] = block[2 * pair];
            out[SIMD_WIDTH + pair] = block[2 * pair + 1];
        }
    }
    out_tail.copy_from_slice(tail);
}

/// Undoes [`to_even_odd`] in place.
fn from_even_odd(values: &mut [f32]) {
    let (blocks, _) = values.as_chunks_mut::<BLOCK>();
    for block in blocks {
        let copy = *block;
        for pair in 0..SIMD_WIDTH {
            block[2 * pair] = copy[pair];
            block[2 * pair + 1] = copy[SIMD_WIDTH + pair];
        }
    }
}

/// `(<u, v>, ||u||^2)` of one stored `bf16` row; `v_even_odd` is `v` after [`to_even_odd`].
/// Bit for bit [`super::rows::row_sums`] on the FMA path.
#[target_feature(enable = "avx2,fma")]
fn even_odd_row_sums(bits: &[u16], v: &[f32], v_even_odd: &[f32], ahead: &mut Ahead) -> RowSums {
    let (u_blocks, u_tail) = bits.as_chunks::<LANES>();
    let v_blocks = v_even_odd.as_chunks::<LANES>().0;
    let mut dot = [_mm256_set1_ps(0.0); 4];
    let mut sum_sq = [_mm256_set1_ps(0.0); 4];
    for (index, (u_block, v_block)) in u_blocks.iter().zip(v_blocks).enumerate() {
        ahead.cover(index, LANES * size_of::<u16>());
        let halves: [[u16; BLOCK]; 2] = bytemuck::cast(*u_block);
        let [even_low, odd_low] = widen_even_odd!(&halves[0]);
        let [even_high, odd_high] = widen_even_odd!(&halves[1]);
        let u = [even_low, odd_low, even_high, odd_high];
        let v: [__m256; 4] = bytemuck::cast(*v_block);
        for vector in 0..4 {
            dot[vector] = _mm256_fmadd_ps(u[vector], v[vector], dot[vector]);
            sum_sq[vector] = _mm256_fmadd_ps(u[vector], u[vector], sum_sq[vector]);
        }
    }
    let lanes_in_order = |[a, b, c, d]: [__m256; 4]| -> [f32; LANES] {
        let [l0, l1] = in_order([a, b]);
        let [l2, l3] = in_order([c, d]);
        bytemuck::cast([l0, l1, l2, l3])
    };
    let (mut dot, mut sum_sq) = (lanes_in_order(dot), lanes_in_order(sum_sq));
    if !u_tail.is_empty() {
        let (mut u_pad, mut v_pad) = ([0.0f32; LANES], [0.0f32; LANES]);
        for (dst, &b) in u_pad.iter_mut().zip(u_tail) {
            *dst = f32::from_bits(u32::from(b) << 16);
        }
        let tail_start = bits.len() - u_tail.len();
        v_pad[..u_tail.len()].copy_from_slice(&v[tail_start..]);
        accumulate_lanes::<true>(&mut dot, &mut sum_sq, &u_pad, &v_pad);
    }
    RowSums {
        dot: reduce_lanes_avx2(bytemuck::cast(dot)),
        sum_sq: reduce_lanes_avx2(bytemuck::cast(sum_sq)),
    }
}

/// `partial += t[0] u[0] + ... + t[N-1] u[N-1]` element by element in row order, with the
/// whole blocks of `partial` in even-odd order; fetches `ahead` as it goes.
#[target_feature(enable = "avx2,fma")]
fn add_rows<const N: usize>(
    u: [&[u16]; N],
    t: [f32; N],
    partial_even_odd: &mut [f32],
    ahead: &mut Ahead,
) {
    let (blocks, tail) = partial_even_odd.as_chunks_mut::<BLOCK>();
    let tail_start = blocks.len() * BLOCK;
    // Every row is as long as the partial; cutting them to its block count lets the indexing
    // below go unchecked.
    let rows = u.map(|row| &row.as_chunks::<BLOCK>().0[..blocks.len()]);
    let scale = t.map(|t| _mm256_set1_ps(t));
    for (index, block) in blocks.iter_mut().enumerate() {
        ahead.cover(index, N * BLOCK * size_of::<u16>());
        let [mut even, mut odd]: [__m256; 2] = bytemuck::cast(*block);
        for (row, &scale) in rows.iter().zip(&scale) {
            let [row_even, row_odd] = widen_even_odd!(&row[index]);
            even = _mm256_fmadd_ps(scale, row_even, even);
            odd = _mm256_fmadd_ps(scale, row_odd, odd);
        }
        *block = bytemuck::cast([even, odd]);
    }
    for (offset, acc) in tail.iter_mut().enumerate() {
        for (row, &t) in u.iter().zip(&t) {
            *acc = t.mul_add(
                f32::from_bits(u32::from(row[tail_start + offset]) << 16),
                *acc,
            );
        }
    }
}

/// The fused pass over one block of stored `bf16` rows (math §4): per tile of `dots.len()`
/// rows, `t_i = <u_i, v>` into `dots`, then `partial += Σ t_i u_i`, both sweeps fetching the
/// next tile as they go. Returns the block's `sum of u^2`. The same bits as the in-order path with `FMA`
/// (NaN payloads aside: they only ever mark the matrix non-finite). `partial` must be zeroed.
///
/// Every row of the block must be a stored `bf16` row (`rows.stored_bf16(row)` is `Some`; a
/// source answers alike for all its rows), else this panics.
///
/// # Safety
///
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn fused_block<R: Rows>(
    rows: &R,
    block: &RowBlock,
    v: &[f32],
    partial: &mut [f32],
    dots: &mut [f32],
) -> f32 {
    V_EVEN_ODD.with_borrow_mut(|v_even_odd| {
        v_even_odd.resize(v.len(), 0.0);
        to_even_odd(v, v_even_odd);
        let row = |index| {
            rows.stored_bf16(index)
                .expect("a source that stores one row as bf16 stores all of them")
        };
        let tile_rows = dots.len();
        let mut sum_sq = 0.0f32;
        let mut tile_start = block.row_start;
        while tile_start < block.row_end {
            let tile_end = (tile_start + tile_rows).min(block.row_end);
            let dots = &mut dots[..tile_end - tile_start];
            let next_end = (tile_end + tile_rows).min(block.row_end);
            let mut ahead = rows.ahead(tile_end * v.len(), next_end * v.len());
            for (dot, index) in dots.iter_mut().zip(tile_start..tile_end) {
                let sums = even_odd_row_sums(row(index), v, v_even_odd, &mut ahead);
                *dot = sums.dot;
                sum_sq += sums.sum_sq;
            }
            // Four rows per sweep over the partial, then one, in row order (eight measured
            // slower here: the sixteen registers no longer hold the scales and accumulators).
            let (fours, ones) = dots.as_chunks::<4>();
            for (group, &t) in fours.iter().enumerate() {
                let first = tile_start + 4 * group;
                add_rows(
                    std::array::from_fn(|k| row(first + k)),
                    t,
                    partial,
                    &mut ahead,
                );
            }
            let first_one = tile_start + 4 * fours.len();
            for (offset, &t) in ones.iter().enumerate() {
                add_rows([row(first_one + offset)], [t], partial, &mut ahead);
            }
            tile_start = tile_end;
        }
        from_even_odd(partial);
        sum_sq
    })
}
