//! The short hot loops of the CPU path.
//!
//! A power pass sees the update direction `U` one row at a time through [`Rows`]: a source
//! widens a chunk of a row to `f32` into a small buffer (for the optimizer step it also applies
//! the momentum rule, so `U` is never stored), and the math runs on that buffer with
//! [`LANES`] independent accumulators (four vectors' worth, so the fused multiply-adds of a sum
//! do not wait on each other: with one vector, its 4-cycle latency bounded the bf16 pass). Element `k` of a row always lands in lane `k % LANES`
//! and lanes are combined in a fixed tree, so every sum is bitwise reproducible whatever the
//! thread count.
//!
//! Every loop is generic over `FMA`: `true` fuses `a * b + c` into one rounding (compiled
//! inside `#[target_feature(enable = "avx2,fma,f16c")]` wrappers, or with AVX-512F added, see
//! [`KernelPath`]); `false` is the portable form. The portable and fused forms differ in the
//! last bits, each is deterministic. The power passes' loops also take `WIDE`, the AVX-512
//! form ([`super::wide`]), which gives the AVX2 form's bits. Where
//! LLVM does not vectorise the AVX2 form on its own, or vectorises it with the lanes spilled to
//! memory between chunks, it is written with intrinsics that compute exactly what the scalar
//! form does, lane by lane: whole stored `f32` rows read in place and stored `f16` rows widened
//! in registers by F16C ([`InRegister`]), with the lanes and their reduction tree in registers,
//! groups of rows added into a partial, stored `bf16` rows widened in registers (and, in the
//! fused pass, sixteen at a time: [`super::even_odd`]).
//!
//! Both sweeps of the fused pass fetch the next tile as they go ([`Ahead`]), so that the memory
//! system does not sit idle while the core computes (math §4.2).

use crate::config::MomentumRule;
use crate::element::Element;
#[cfg(target_arch = "x86_64")]
use half::bf16;
use half::f16;

/// Which compiled form of the hot loops runs.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// Plain Rust, vectorised for the baseline target (SSE2 on x86-64), `a * b + c` in two
    /// roundings. Runs everywhere.
    Portable,
    /// x86-64 with AVX2 and FMA: 256-bit vectors and fused multiply-adds (and F16C's
    /// widening of `f16`, which every CPU with AVX2 and FMA has; it is checked all the same).
    Avx2Fma,
    /// x86-64 with AVX-512F besides AVX2, FMA and F16C: the power passes' loops over stored
    /// rows and kept tiles on 512-bit vectors, sixteen lanes per instruction; every other
    /// loop as [`Avx2Fma`](Self::Avx2Fma). The same bits as `Avx2Fma`: the 32 accumulator
    /// lanes of a sum are two 512-bit vectors instead of four 256-bit ones. Not chosen by
    /// [`detect`](Self::detect).
    Avx512,
}

impl KernelPath {
    /// The path to run by default: [`Avx2Fma`](Self::Avx2Fma) where this CPU supports it,
    /// else [`Portable`](Self::Portable).
    ///
    /// [`Avx512`](Self::Avx512) is never chosen here: on the one AVX-512 machine it was
    /// measured on (a Zen 4 EPYC), its power passes ran no faster than the AVX2 loops with
    /// two threads (README, "The AVX-512 path"), and on one thread `bf16` from main memory
    /// ran 1-22% faster, `f32` 2-12% slower and `f16` 0.92-1.01 times as fast (README, "One
    /// core against the memory"). Choose it explicitly where it measures faster.
    pub fn detect() -> Self {
        if Self::Avx2Fma.is_supported() {
            Self::Avx2Fma
        } else {
            Self::Portable
        }
    }

    /// Whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2Fma => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => Self::Avx2Fma.is_supported() && is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx2Fma | Self::Avx512 => false,
        }
    }

    /// Whether the path fuses `a * b + c` into one rounding (every path but
    /// [`Portable`](Self::Portable)); those paths give the same bits, NaN payloads aside.
    pub fn fuses_multiply_add(self) -> bool {
        self != Self::Portable
    }
}

/// `a * b + c`, in one rounding when `FMA`.
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `f32` values per 256-bit vector.
pub(crate) const SIMD_WIDTH: usize = 8;

/// Independent accumulators per sum: four 256-bit vectors, so that four fused multiply-adds
/// are in flight per sum instead of one chain waiting on its own latency.
pub(crate) const LANES: usize = 4 * SIMD_WIDTH;

/// Row elements widened per chunk (a multiple of [`LANES`]; 1 KiB of `f32` stays in L1).
pub(crate) const CHUNK: usize = 256;

/// The sums of one row `u` against the power vector `v` (math §4 first half of the fused pass).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct RowSums {
    /// `t = <u, v>`.
    pub dot: f32,
    /// `||u||^2`: the zero test, the Frobenius floor on `sigma` (the exact norm of vectors),
    /// and the non-finite test (a NaN or infinite `u` makes it non-finite; so does an
    /// overflowing `u^2`, and then `w = U^T U v` would overflow too).
    pub sum_sq: f32,
}

/// Row access to a matrix `U` of `fan_in` columns, widened to `f32`.
pub(crate) trait Rows: Sync {
    /// Writes `U[row, col_start .. col_start + out.len()]` into `out`.
    fn load<const FMA: bool>(&self, row: usize, col_start: usize, out: &mut [f32]);

    /// The source bytes of elements `[start, end)` (row-major indices, clamped to the
    /// matrix), for the sweeps over a tile to fetch ahead ([`Ahead`]).
    #[inline(always)]
    fn ahead(&self, start: usize, end: usize) -> Ahead<'_> {
        let _ = (start, end);
        Ahead::default()
    }

    /// Whether the fused pass should keep each tile's `U` as `f32` between its two sweeps
    /// rather than form it again. Measured on the GPT-2-small bench: worth it when `U` comes
    /// from `G` and `M` (two streams and the momentum rule), not for a stored matrix (an `f32`
    /// one is read in place; re-widening 16-bit data beats re-reading 32-bit data).
    const KEEP_TILE: bool;

    /// `U[row, col_start .. col_start + len]` in place when `U` is a stored `f32` matrix,
    /// `None` otherwise.
    #[inline(always)]
    fn stored_f32(&self, row: usize, col_start: usize, len: usize) -> Option<&[f32]> {
        let _ = (row, col_start, len);
        None
    }

    /// Row `row` as raw bf16 bits when `U` is a stored bf16 matrix (the AVX2 and AVX-512
    /// paths widen those in registers), `None` otherwise. A source answers alike for all its rows.
    #[inline(always)]
    fn stored_bf16(&self, row: usize) -> Option<&[u16]> {
        let _ = row;
        None
    }

    /// `U[row, 0 .. len]` in place when `U` is a stored `f16` matrix (the AVX2 and AVX-512
    /// paths widen it in registers), `None` otherwise. A source answers alike for all its rows.
    #[inline(always)]
    fn stored_f16(&self, row: usize, len: usize) -> Option<&[f16]> {
        let _ = (row, len);
        None
    }

    /// `U[row, col_start .. col_start + len]` as `f32`: computed into `buffer`, or, where `U`
    /// is stored as `f32` already, a view of it (no copy).
    #[inline(always)]
    fn chunk<'a, const FMA: bool>(
        &'a self,
        row: usize,
        col_start: usize,
        len: usize,
        buffer: &'a mut [f32; CHUNK],
    ) -> &'a [f32] {
        if let Some(stored) = self.stored_f32(row, col_start, len) {
            return stored;
        }
        let out = &mut buffer[..len];
        self.load::<FMA>(row, col_start, out);
        out
    }
}

/// A stored matrix: `U` is the matrix itself.
pub(crate) struct PlainRows<'a, T> {
    pub data: &'a [T],
    pub fan_in: usize,
}

impl<'a, T> PlainRows<'a, T> {
    /// Every matrix of a batch as rows, `matrices[i]` shaped as the layout's matrix `i`.
    pub(crate) fn of_batch(layout: &crate::layout::BatchLayout, matrices: &[&'a [T]]) -> Vec<Self> {
        layout
            .matrices()
            .iter()
            .zip(matrices)
            .map(|(entry, data)| PlainRows {
                data,
                fan_in: entry.shape.fan_in,
            })
            .collect()
    }
}

impl<T: Element> Rows for PlainRows<'_, T> {
    const KEEP_TILE: bool = false;

    #[inline(always)]
    fn ahead(&self, start: usize, end: usize) -> Ahead<'_> {
        Ahead::new([bytes_of(self.data, start, end), &[]])
    }

    #[inline(always)]
    fn stored_f32(&self, row: usize, col_start: usize, len: usize) -> Option<&[f32]> {
        let start = row * self.fan_in + col_start;
        T::as_f32_slice(&self.data[start..start + len])
    }

    #[inline(always)]
    fn stored_bf16(&self, row: usize) -> Option<&[u16]> {
        let start = row * self.fan_in;
        T::as_bf16_bits(&self.data[start..start + self.fan_in])
    }

    #[inline(always)]
    fn stored_f16(&self, row: usize, len: usize) -> Option<&[f16]> {
        let start = row * self.fan_in;
        T::as_f16_slice(&self.data[start..start + len])
    }

    #[inline(always)]
    fn load<const FMA: bool>(&self, row: usize, col_start: usize, out: &mut [f32]) {
        let start = row * self.fan_in + col_start;
        let source = &self.data[start..start + out.len()];
        for (dst, &value) in out.iter_mut().zip(source) {
            *dst = value.to_f32();
        }
    }
}

/// The momentum rule (math §5.1) per element, in `f32`: PyTorch's `G + beta * M_new` for
/// heavy-ball Nesterov, Muon's `lerp(G, M_new, beta)` for EMA Nesterov.
impl MomentumRule {
    /// `(M_new, U)` for one element.
    #[inline(always)]
    pub fn apply<const NESTEROV: bool, const FMA: bool>(
        self,
        momentum: f32,
        grad: f32,
    ) -> (f32, f32) {
        let scaled_grad = self.grad_coef * grad;
        let new_momentum = madd::<FMA>(self.beta, momentum, scaled_grad);
        let direction = if NESTEROV {
            madd::<FMA>(self.beta, new_momentum, scaled_grad)
        } else {
            new_momentum
        };
        (new_momentum, direction)
    }
}

/// The optimizer's update direction `U`, computed on the fly from `G` and the old `M`.
pub(crate) struct DirectionRows<'a, T> {
    pub grads: &'a [T],
    pub momentum: &'a [f32],
    pub fan_in: usize,
    pub rule: MomentumRule,
}

impl<T: Element> DirectionRows<'_, T> {
    #[inline(always)]
    fn load_with<const NESTEROV: bool, const FMA: bool>(&self, start: usize, out: &mut [f32]) {
        let grads = &self.grads[start..start + out.len()];
        let momentum = &self.momentum[start..start + out.len()];
        #[cfg(target_arch = "x86_64")]
        if FMA && let Some(grads) = T::as_f16_slice(grads) {
            // `f16` gradients widened eight at a time by F16C: the same values as `to_f32`.
            let (grad_lanes, grad_tail) = grads.as_chunks::<SIMD_WIDTH>();
            let (out_lanes, out_tail) = out.as_chunks_mut::<SIMD_WIDTH>();
            let (momentum_lanes, momentum_tail) = momentum.as_chunks::<SIMD_WIDTH>();
            for ((dst, grad), old) in out_lanes.iter_mut().zip(grad_lanes).zip(momentum_lanes) {
                // SAFETY: `FMA = true` code runs only inside `on_path`'s `Avx2Fma` and `Avx512`
                // branches, compiled for (at least) AVX2, FMA and F16C after checking that the
                // CPU has them.
                let grad: [f32; SIMD_WIDTH] = bytemuck::cast(unsafe { f16::widen8(grad) });
                *dst = std::array::from_fn(|lane| {
                    self.rule.apply::<NESTEROV, FMA>(old[lane], grad[lane]).1
                });
            }
            for ((dst, &grad), &old) in out_tail.iter_mut().zip(grad_tail).zip(momentum_tail) {
                *dst = self
                    .rule
                    .apply::<NESTEROV, FMA>(old, Element::to_f32(grad))
                    .1;
            }
            return;
        }
        for ((dst, &grad), &old) in out.iter_mut().zip(grads).zip(momentum) {
            *dst = self.rule.apply::<NESTEROV, FMA>(old, grad.to_f32()).1;
        }
    }
}

impl<T: Element> Rows for DirectionRows<'_, T> {
    const KEEP_TILE: bool = true;

    #[inline(always)]
    fn ahead(&self, start: usize, end: usize) -> Ahead<'_> {
        Ahead::new([
            bytes_of(self.grads, start, end),
            bytes_of(self.momentum, start, end),
        ])
    }

    #[inline(always)]
    fn load<const FMA: bool>(&self, row: usize, col_start: usize, out: &mut [f32]) {
        let start = row * self.fan_in + col_start;
        if self.rule.nesterov {
            self.load_with::<true, FMA>(start, out);
        } else {
            self.load_with::<false, FMA>(start, out);
        }
    }
}

/// Bytes per cache line, the prefetch granularity.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const CACHE_LINE: usize = 64;

/// `data[start..end]` (clamped) as bytes.
#[inline(always)]
fn bytes_of<T: bytemuck::Pod>(data: &[T], start: usize, end: usize) -> &[u8] {
    let end = end.min(data.len());
    bytemuck::cast_slice(&data[start.min(end)..end])
}

/// Source bytes that the sweeps over a tile ask the CPU to start fetching, one cache line per
/// stream at each [`step`](Self::step) (one step per 128 bytes of the tile covered): while the
/// core computes, the memory system stays busy with the next tile (math §4.2). A hint only:
/// results do not depend on it, and it never reads what it points at.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Ahead<'a> {
    next: [*const u8; 2],
    end: [*const u8; 2],
    source: std::marker::PhantomData<&'a [u8]>,
}

impl Default for Ahead<'_> {
    fn default() -> Self {
        Ahead::new([&[], &[]])
    }
}

impl<'a> Ahead<'a> {
    pub(crate) fn new(streams: [&'a [u8]; 2]) -> Self {
        Ahead {
            next: streams.map(|stream| stream.as_ptr()),
            end: streams.map(|stream| stream.as_ptr_range().end),
            source: std::marker::PhantomData,
        }
    }

    /// The fetches for step `index` of a sweep that covers `bytes` of its tile per step: one
    /// cache line per 128 bytes covered, so a step of fewer bytes fetches every few steps.
    #[inline(always)]
    pub(crate) fn cover(&mut self, index: usize, bytes: usize) {
        if bytes >= 128 {
            for _ in 0..bytes / 128 {
                self.step();
            }
        } else if index.is_multiple_of(128 / bytes) {
            self.step();
        }
    }

    /// Prefetches the next cache line of each stream that has one left.
    #[inline(always)]
    pub(crate) fn step(&mut self) {
        #[cfg(target_arch = "x86_64")]
        for (next, &end) in self.next.iter_mut().zip(&self.end) {
            if *next < end {
                // Into L2, not L1: the tile being computed on (tens of KiB) and the vectors
                // and partials it meets fill L1, which the next tile's lines would evict
                // (math §4.2 gives the measured difference).
                // SAFETY: a prefetch is a hint that never faults and reads nothing the program
                // can observe; `next` lies inside the stream it was made from.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                        next.cast(),
                    )
                };
                *next = next.wrapping_add(CACHE_LINE);
            }
        }
    }
}

/// Sum of the lanes (`N` a power of two) in a fixed pairwise order.
#[inline(always)]
pub(crate) fn reduce_lanes<const N: usize>(mut lanes: [f32; N]) -> f32 {
    // Fold the upper half onto the lower half until one lane is left: a fixed tree.
    let mut width = N;
    while width > 1 {
        width /= 2;
        for lane in 0..width {
            lanes[lane] += lanes[lane + width];
        }
    }
    lanes[0]
}

/// `dot += u * v`, `sum_sq += u * u`, lane by lane.
#[inline(always)]
pub(crate) fn accumulate_lanes<const FMA: bool>(
    dot: &mut [f32; LANES],
    sum_sq: &mut [f32; LANES],
    u: &[f32; LANES],
    v: &[f32; LANES],
) {
    *dot = std::array::from_fn(|lane| madd::<FMA>(u[lane], v[lane], dot[lane]));
    *sum_sq = std::array::from_fn(|lane| madd::<FMA>(u[lane], u[lane], sum_sq[lane]));
}

/// [`accumulate_lanes`] over whole runs of lanes. LLVM does not turn the eight scalar lanes
/// into one 256-bit register here, so the AVX2 path states it with intrinsics; each lane still
/// computes `fma(u, v, acc)`, exactly as the scalar form.
#[inline(always)]
fn accumulate_rows<const FMA: bool>(
    dot: &mut [f32; LANES],
    sum_sq: &mut [f32; LANES],
    u: &[[f32; LANES]],
    v: &[[f32; LANES]],
) {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: `FMA = true` code runs only inside `on_path`'s `Avx2Fma` and `Avx512`
        // branches (the only places that instantiate it), both of which have checked that
        // the CPU has AVX2 and FMA: the one requirement of calling `accumulate_avx2_fma`.
        unsafe { accumulate_avx2_fma(dot, sum_sq, u, v) };
        return;
    }
    for (u8, v8) in u.iter().zip(v) {
        accumulate_lanes::<FMA>(dot, sum_sq, u8, v8);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn accumulate_avx2_fma(
    dot: &mut [f32; LANES],
    sum_sq: &mut [f32; LANES],
    u: &[[f32; LANES]],
    v: &[[f32; LANES]],
) {
    use std::arch::x86_64::{__m256, _mm256_fmadd_ps};
    let mut dot_lanes: [__m256; 4] = bytemuck::cast(*dot);
    let mut sum_sq_lanes: [__m256; 4] = bytemuck::cast(*sum_sq);
    for (u_block, v_block) in u.iter().zip(v) {
        let u_block: [__m256; 4] = bytemuck::cast(*u_block);
        let v_block: [__m256; 4] = bytemuck::cast(*v_block);
        for vector in 0..4 {
            dot_lanes[vector] =
                _mm256_fmadd_ps(u_block[vector], v_block[vector], dot_lanes[vector]);
            sum_sq_lanes[vector] =
                _mm256_fmadd_ps(u_block[vector], u_block[vector], sum_sq_lanes[vector]);
        }
    }
    *dot = bytemuck::cast(dot_lanes);
    *sum_sq = bytemuck::cast(sum_sq_lanes);
}

/// Adds one chunk (at most [`CHUNK`] elements, starting at a multiple of [`CHUNK`] in the
/// row) to the lane sums: element `k` of the row lands in lane `k % LANES`.
#[inline(always)]
fn accumulate_chunk<const FMA: bool>(
    dot: &mut [f32; LANES],
    sum_sq: &mut [f32; LANES],
    u_chunk: &[f32],
    v_chunk: &[f32],
) {
    let (u_lanes, u_tail) = u_chunk.as_chunks::<LANES>();
    let (v_lanes, v_tail) = v_chunk.as_chunks::<LANES>();
    accumulate_rows::<FMA>(dot, sum_sq, u_lanes, v_lanes);
    if !u_tail.is_empty() {
        // A row's tail (< LANES elements) only occurs in its last chunk, and CHUNK is a
        // multiple of LANES, so element k still lands in lane k % LANES. Zero padding adds
        // 0 * 0 to the other lanes, which leaves them unchanged, and keeps every lane index
        // static so that the accumulators stay in vector registers.
        let (mut u_pad, mut v_pad) = ([0.0f32; LANES], [0.0f32; LANES]);
        u_pad[..u_tail.len()].copy_from_slice(u_tail);
        v_pad[..v_tail.len()].copy_from_slice(v_tail);
        accumulate_lanes::<FMA>(dot, sum_sq, &u_pad, &v_pad);
    }
}

/// [`reduce_lanes`] of four 256-bit accumulators (lanes 0-7, 8-15, 16-23, 24-31) in
/// registers: the same pairs added in the same order, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn reduce_lanes_avx2(lanes: [std::arch::x86_64::__m256; 4]) -> f32 {
    use std::arch::x86_64::*;
    // Width 32 -> 16: lanes[i] += lanes[i + 16]; 16 -> 8: lanes[i] += lanes[i + 8].
    let eight = _mm256_add_ps(
        _mm256_add_ps(lanes[0], lanes[2]),
        _mm256_add_ps(lanes[1], lanes[3]),
    );
    // 8 -> 4, 4 -> 2, 2 -> 1.
    let four = _mm_add_ps(
        _mm256_castps256_ps128(eight),
        _mm256_extractf128_ps::<1>(eight),
    );
    let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)))
}

/// A stored element type that the AVX2 path loads eight at a time straight into a register,
/// exactly as [`Element::to_f32`] widens it: `f32` as it is, `f16` by F16C's `vcvtph2ps`
/// (exact; NaNs quieted with their payload kept, as `to_f32` does).
#[cfg(target_arch = "x86_64")]
pub(crate) trait InRegister: Element {
    /// Eight elements as eight `f32` lanes.
    ///
    /// # Safety
    ///
    /// The CPU has AVX2 and F16C (the caller runs under [`KernelPath::Avx2Fma`]'s or
    /// [`KernelPath::Avx512`]'s check).
    unsafe fn widen8(values: &[Self; SIMD_WIDTH]) -> std::arch::x86_64::__m256;
}

#[cfg(target_arch = "x86_64")]
impl InRegister for f32 {
    #[inline(always)]
    unsafe fn widen8(values: &[f32; SIMD_WIDTH]) -> std::arch::x86_64::__m256 {
        bytemuck::cast(*values)
    }
}

#[cfg(target_arch = "x86_64")]
impl InRegister for f16 {
    #[inline(always)]
    unsafe fn widen8(values: &[f16; SIMD_WIDTH]) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller promises F16C, the one requirement of `vcvtph2ps`.
        unsafe { std::arch::x86_64::_mm256_cvtph_ps(bytemuck::cast(*values)) }
    }
}

#[cfg(target_arch = "x86_64")]
impl InRegister for bf16 {
    #[inline(always)]
    unsafe fn widen8(values: &[bf16; SIMD_WIDTH]) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::{_mm256_castsi256_ps, _mm256_cvtepu16_epi32, _mm256_slli_epi32};
        // A `bf16` is the upper half of its `f32`: zero-extend each to 32 bits, shift it up.
        // SAFETY: the caller promises AVX2, the one requirement of these instructions.
        unsafe {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                bytemuck::cast(*values),
            )))
        }
    }
}

/// [`slice_sums`] in registers for a whole stored row (`f32` read in place, `f16` widened
/// eight per instruction): the same lanes, the same `fma` per lane, the same zero-padded tail
/// and the same reduction tree as the buffered path, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn stored_sums_avx2_fma<E: InRegister>(u: &[E], v: &[f32], ahead: &mut Ahead) -> RowSums {
    use std::arch::x86_64::*;
    let (u_blocks, u_tail) = u.as_chunks::<LANES>();
    let (v_blocks, v_tail) = v.as_chunks::<LANES>();
    let mut dot = [_mm256_setzero_ps(); 4];
    let mut sum_sq = [_mm256_setzero_ps(); 4];
    let mut accumulate = |x: [__m256; 4], v_block: &[f32; LANES]| {
        let y: [__m256; 4] = bytemuck::cast(*v_block);
        for vector in 0..4 {
            dot[vector] = _mm256_fmadd_ps(x[vector], y[vector], dot[vector]);
            sum_sq[vector] = _mm256_fmadd_ps(x[vector], x[vector], sum_sq[vector]);
        }
    };
    for (index, (u_block, v_block)) in u_blocks.iter().zip(v_blocks).enumerate() {
        ahead.cover(index, LANES * size_of::<E>());
        let parts: &[[E; SIMD_WIDTH]; 4] = bytemuck::cast_ref(u_block);
        // SAFETY: this function is compiled for AVX2 and F16C, and only called where the CPU
        // has them.
        let x = parts.map(|part| unsafe { E::widen8(&part) });
        accumulate(x, v_block);
    }
    if !u_tail.is_empty() {
        let (mut u_pad, mut v_pad) = ([0.0f32; LANES], [0.0f32; LANES]);
        for (dst, &value) in u_pad.iter_mut().zip(u_tail) {
            *dst = value.to_f32();
        }
        v_pad[..v_tail.len()].copy_from_slice(v_tail);
        accumulate(bytemuck::cast(u_pad), &v_pad);
    }
    RowSums {
        dot: reduce_lanes_avx2(dot),
        sum_sq: reduce_lanes_avx2(sum_sq),
    }
}

/// `partial += t[0] u[0] + ... + t[N-1] u[N-1]` for `N` stored rows in registers, element by
/// element in row order: [`add_scaled_group`]'s roundings, the partial loaded and stored once
/// per `N` rows. One cache line `ahead` per 128 bytes of rows added.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn add_rows_avx2_fma<E: InRegister, const N: usize>(
    u: [&[E]; N],
    t: [f32; N],
    partial: &mut [f32],
    ahead: &mut Ahead,
) {
    use std::arch::x86_64::*;
    debug_assert!(u.iter().all(|row| row.len() == partial.len()));
    let tail_start = partial.len() / SIMD_WIDTH * SIMD_WIDTH;
    let (partial_lanes, partial_tail) = partial.as_chunks_mut::<SIMD_WIDTH>();
    // Cut to the partial's length, so that the indexing below goes unchecked.
    let rows = u.map(|row| &row.as_chunks::<SIMD_WIDTH>().0[..partial_lanes.len()]);
    let scale = t.map(|t| _mm256_set1_ps(t));
    for (index, acc) in partial_lanes.iter_mut().enumerate() {
        ahead.cover(index, N * SIMD_WIDTH * size_of::<E>());
        let mut lanes: __m256 = bytemuck::cast(*acc);
        for (row, &scale) in rows.iter().zip(&scale) {
            // SAFETY: compiled for AVX2 and F16C, called only where the CPU has them.
            let x = unsafe { E::widen8(&row[index]) };
            lanes = _mm256_fmadd_ps(scale, x, lanes);
        }
        *acc = bytemuck::cast(lanes);
    }
    for (offset, acc) in partial_tail.iter_mut().enumerate() {
        for (row, &t) in u.iter().zip(&t) {
            *acc = t.mul_add(row[tail_start + offset].to_f32(), *acc);
        }
    }
}

/// One sweep of `N` stored rows into a partial, `partial += t[0] u[0] + ... + t[N-1] u[N-1]`
/// element by element in row order, in one compiled form (AVX2 here, AVX-512 in
/// [`super::wide`]).
#[cfg(target_arch = "x86_64")]
pub(crate) trait RowSweep<E> {
    /// # Safety
    ///
    /// The CPU has the features the form is compiled for.
    unsafe fn sweep<const N: usize>(
        u: [&[E]; N],
        t: [f32; N],
        partial: &mut [f32],
        ahead: &mut Ahead,
    );
}

/// [`add_rows_avx2_fma`] as a [`RowSweep`].
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx2Sweep;

#[cfg(target_arch = "x86_64")]
impl<E: InRegister> RowSweep<E> for Avx2Sweep {
    #[inline(always)]
    unsafe fn sweep<const N: usize>(
        u: [&[E]; N],
        t: [f32; N],
        partial: &mut [f32],
        ahead: &mut Ahead,
    ) {
        // SAFETY: the caller promises AVX2, FMA and F16C.
        unsafe { add_rows_avx2_fma(u, t, partial, ahead) }
    }
}

/// [`add_scaled_rows`] for stored rows (`row(i)` is row `i`, whole): `GROUP` rows per sweep
/// over the partial, then four, then one, all in row order, each sweep in the form `S`.
///
/// # Safety
///
/// The CPU has the features `S` is compiled for.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn add_stored_rows<'a, E: 'a, S: RowSweep<E>, const GROUP: usize>(
    row: impl Fn(usize) -> &'a [E],
    first_row: usize,
    dots: &[f32],
    partial: &mut [f32],
    ahead: &mut Ahead,
) {
    let (groups, rest) = dots.as_chunks::<GROUP>();
    // SAFETY (every sweep): the caller promises the features `S` needs.
    for (group, &t) in groups.iter().enumerate() {
        let first = first_row + GROUP * group;
        unsafe { S::sweep::<GROUP>(std::array::from_fn(|k| row(first + k)), t, partial, ahead) };
    }
    let first_rest = first_row + GROUP * groups.len();
    let (fours, ones) = rest.as_chunks::<4>();
    for (group, &t) in fours.iter().enumerate() {
        let first = first_rest + 4 * group;
        unsafe { S::sweep::<4>(std::array::from_fn(|k| row(first + k)), t, partial, ahead) };
    }
    let first_one = first_rest + 4 * fours.len();
    for (offset, &t) in ones.iter().enumerate() {
        unsafe { S::sweep::<1>([row(first_one + offset)], [t], partial, ahead) };
    }
}

/// `(<u, v>, ||u||^2)` for row `row` of `rows`; `v.len()` is `fan_in`. Fetches `ahead` as it
/// goes on the AVX2 and AVX-512 (`WIDE`) paths of stored rows.
#[inline(always)]
pub(crate) fn row_sums<R: Rows, const FMA: bool, const WIDE: bool>(
    rows: &R,
    row: usize,
    v: &[f32],
    buffer: &mut [f32; CHUNK],
    ahead: &mut Ahead,
) -> RowSums {
    const { assert!(FMA || !WIDE, "the AVX-512 path fuses multiply-adds") };
    #[cfg(target_arch = "x86_64")]
    if WIDE {
        let len = v.len();
        // SAFETY (all three): `WIDE = true` code runs only inside `on_path`'s `Avx512` branch,
        // which has checked that the CPU has AVX-512F, AVX2, FMA and F16C.
        if let Some(u) = rows.stored_f32(row, 0, len) {
            return unsafe { super::wide::row_sums(u, v, ahead) };
        }
        if let Some(u) = rows.stored_f16(row, len) {
            return unsafe { super::wide::row_sums(u, v, ahead) };
        }
        if let Some(bits) = rows.stored_bf16(row) {
            return unsafe { super::wide::row_sums::<bf16>(bytemuck::cast_slice(bits), v, ahead) };
        }
    }
    #[cfg(target_arch = "x86_64")]
    if FMA {
        let len = v.len();
        // SAFETY (all three): `FMA = true` code runs only inside `on_path`'s `Avx2Fma` and
        // `Avx512` branches, both of which have checked that the CPU has AVX2, FMA and F16C.
        if let Some(u) = rows.stored_f32(row, 0, len) {
            return unsafe { stored_sums_avx2_fma(u, v, ahead) };
        }
        if let Some(u) = rows.stored_f16(row, len) {
            return unsafe { stored_sums_avx2_fma(u, v, ahead) };
        }
        if let Some(bits) = rows.stored_bf16(row) {
            return unsafe { stored_sums_avx2_fma::<bf16>(bytemuck::cast_slice(bits), v, ahead) };
        }
    }
    let (mut dot, mut sum_sq) = ([0.0f32; LANES], [0.0f32; LANES]);
    for (chunk_index, v_chunk) in v.chunks(CHUNK).enumerate() {
        let u_chunk = rows.chunk::<FMA>(row, chunk_index * CHUNK, v_chunk.len(), buffer);
        accumulate_chunk::<FMA>(&mut dot, &mut sum_sq, u_chunk, v_chunk);
    }
    RowSums {
        dot: reduce_lanes(dot),
        sum_sq: reduce_lanes(sum_sq),
    }
}

/// [`row_sums`] of a row already widened to `f32`; bitwise the same result. Fetches `ahead`
/// as it goes on the AVX2 and AVX-512 paths.
#[inline(always)]
pub(crate) fn slice_sums<const FMA: bool, const WIDE: bool>(
    u: &[f32],
    v: &[f32],
    ahead: &mut Ahead,
) -> RowSums {
    const { assert!(FMA || !WIDE, "the AVX-512 path fuses multiply-adds") };
    #[cfg(target_arch = "x86_64")]
    if WIDE {
        // SAFETY: `WIDE = true` code runs only after the `Avx512` check.
        return unsafe { super::wide::row_sums(u, v, ahead) };
    }
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: as in `row_sums`: `FMA = true` code runs only after the `Avx2Fma` or `Avx512` check.
        return unsafe { stored_sums_avx2_fma(u, v, ahead) };
    }
    let (mut dot, mut sum_sq) = ([0.0f32; LANES], [0.0f32; LANES]);
    for (u_chunk, v_chunk) in u.chunks(CHUNK).zip(v.chunks(CHUNK)) {
        accumulate_chunk::<FMA>(&mut dot, &mut sum_sq, u_chunk, v_chunk);
    }
    RowSums {
        dot: reduce_lanes(dot),
        sum_sq: reduce_lanes(sum_sq),
    }
}

/// `partial += t * u` for a row already widened to `f32`.
#[inline(always)]
pub(crate) fn add_scaled_slice<const FMA: bool>(u: &[f32], t: f32, partial: &mut [f32]) {
    for (acc, &value) in partial.iter_mut().zip(u) {
        *acc = madd::<FMA>(t, value, *acc);
    }
}

/// Rows added per sweep over a partial in [`add_scaled_rows`].
pub(crate) const ROW_GROUP: usize = 4;

/// `partial += t[0] u[0] + t[1] u[1] + ...`, element by element in row order: the same
/// roundings as one [`add_scaled_slice`] per row, with `partial` loaded and stored once per
/// group instead of once per row.
#[inline(always)]
pub(crate) fn add_scaled_group<const FMA: bool>(
    u: [&[f32]; ROW_GROUP],
    t: [f32; ROW_GROUP],
    partial: &mut [f32],
) {
    let [u0, u1, u2, u3] = u;
    for ((((acc, &x0), &x1), &x2), &x3) in partial.iter_mut().zip(u0).zip(u1).zip(u2).zip(u3) {
        *acc = madd::<FMA>(
            t[3],
            x3,
            madd::<FMA>(t[2], x2, madd::<FMA>(t[1], x1, madd::<FMA>(t[0], x0, *acc))),
        );
    }
}

/// `partial += Σ_i dots[i] u_{first_row + i}` over consecutive rows of `rows`, in row order,
/// fetching `ahead` as it goes (for stored `f32` and `f16` rows on the AVX2 path and every
/// stored row on the AVX-512 path, eight rows per sweep).
#[inline(always)]
pub(crate) fn add_scaled_rows<R: Rows, const FMA: bool, const WIDE: bool>(
    rows: &R,
    first_row: usize,
    dots: &[f32],
    partial: &mut [f32],
    buffers: &mut [[f32; CHUNK]; ROW_GROUP],
    ahead: &mut Ahead,
) {
    const { assert!(FMA || !WIDE, "the AVX-512 path fuses multiply-adds") };
    // SAFETY (both): `WIDE = true` code runs only after the `Avx512` check (AVX-512F, AVX2,
    // FMA and F16C), `FMA = true` code only after the `Avx2Fma` or `Avx512` check.
    #[cfg(target_arch = "x86_64")]
    if WIDE
        && unsafe {
            add_stored::<R, super::wide::WideSweep, { super::wide::GROUP }>(
                rows, first_row, dots, partial, ahead,
            )
        }
    {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if FMA && unsafe { add_stored::<R, Avx2Sweep, 8>(rows, first_row, dots, partial, ahead) } {
        return;
    }
    let (groups, rest) = dots.as_chunks::<ROW_GROUP>();
    for (group_index, &t) in groups.iter().enumerate() {
        let row = first_row + group_index * ROW_GROUP;
        for (chunk_index, partial_chunk) in partial.chunks_mut(CHUNK).enumerate() {
            let (start, len) = (chunk_index * CHUNK, partial_chunk.len());
            let [b0, b1, b2, b3] = &mut *buffers;
            let u = [
                rows.chunk::<FMA>(row, start, len, b0),
                rows.chunk::<FMA>(row + 1, start, len, b1),
                rows.chunk::<FMA>(row + 2, start, len, b2),
                rows.chunk::<FMA>(row + 3, start, len, b3),
            ];
            add_scaled_group::<FMA>(u, t, partial_chunk);
        }
    }
    let first_rest = first_row + groups.len() * ROW_GROUP;
    for (offset, &t) in rest.iter().enumerate() {
        add_scaled_row::<R, FMA, false>(rows, first_rest + offset, t, partial, &mut buffers[0]);
    }
}

/// [`add_scaled_rows`] in the compiled form `S`, `GROUP` rows per sweep, when `rows` is a
/// stored matrix of any type (then `true`); `false`, having done nothing, for any other source.
///
/// # Safety
///
/// The CPU has the features `S` is compiled for.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn add_stored<R: Rows, S, const GROUP: usize>(
    rows: &R,
    first_row: usize,
    dots: &[f32],
    partial: &mut [f32],
    ahead: &mut Ahead,
) -> bool
where
    S: RowSweep<f32> + RowSweep<f16> + RowSweep<bf16>,
{
    let len = partial.len();
    const SAME: &str = "a source answers alike for all its rows";
    // SAFETY (all three): the caller promises the features `S` needs.
    if rows.stored_f32(first_row, 0, len).is_some() {
        let row = |index| rows.stored_f32(index, 0, len).expect(SAME);
        unsafe { add_stored_rows::<_, S, GROUP>(row, first_row, dots, partial, ahead) };
    } else if rows.stored_f16(first_row, len).is_some() {
        let row = |index| rows.stored_f16(index, len).expect(SAME);
        unsafe { add_stored_rows::<_, S, GROUP>(row, first_row, dots, partial, ahead) };
    } else if rows.stored_bf16(first_row).is_some() {
        let row = |index| -> &[bf16] { bytemuck::cast_slice(rows.stored_bf16(index).expect(SAME)) };
        unsafe { add_stored_rows::<_, S, GROUP>(row, first_row, dots, partial, ahead) };
    } else {
        return false;
    }
    true
}

/// [`add_scaled_rows`] for rows already widened to `f32`, stored back to back in `tile`
/// (fetching `ahead` as it goes on the AVX2 and AVX-512 paths).
#[inline(always)]
pub(crate) fn add_scaled_tile<const FMA: bool, const WIDE: bool>(
    tile: &[f32],
    fan_in: usize,
    dots: &[f32],
    partial: &mut [f32],
    ahead: &mut Ahead,
) {
    const { assert!(FMA || !WIDE, "the AVX-512 path fuses multiply-adds") };
    #[cfg(target_arch = "x86_64")]
    if WIDE {
        let row = |index: usize| &tile[index * fan_in..(index + 1) * fan_in];
        // SAFETY: `WIDE = true` code runs only after the `Avx512` check.
        unsafe {
            add_stored_rows::<_, super::wide::WideSweep, { super::wide::GROUP }>(
                row, 0, dots, partial, ahead,
            )
        };
        return;
    }
    let (groups, rest) = dots.as_chunks::<ROW_GROUP>();
    let mut rows = tile.chunks_exact(fan_in);
    for &t in groups {
        let mut next = || rows.next().unwrap_or_default();
        let u = [next(), next(), next(), next()];
        #[cfg(target_arch = "x86_64")]
        if FMA {
            // SAFETY: as in `row_sums`: `FMA = true` code runs only after the `Avx2Fma` or `Avx512` check.
            unsafe { add_rows_avx2_fma(u, t, partial, ahead) };
            continue;
        }
        add_scaled_group::<FMA>(u, t, partial);
    }
    for (&t, u) in rest.iter().zip(rows) {
        add_scaled_slice::<FMA>(u, t, partial);
    }
}

/// `partial += t * u` for row `row` of `rows` (math §4 second half of the fused pass).
#[inline(always)]
pub(crate) fn add_scaled_row<R: Rows, const FMA: bool, const WIDE: bool>(
    rows: &R,
    row: usize,
    t: f32,
    partial: &mut [f32],
    buffer: &mut [f32; CHUNK],
) {
    const { assert!(FMA || !WIDE, "the AVX-512 path fuses multiply-adds") };
    #[cfg(target_arch = "x86_64")]
    {
        let ahead = &mut Ahead::default();
        // SAFETY (both): as in `add_scaled_rows`.
        if WIDE
            && unsafe {
                add_stored::<R, super::wide::WideSweep, 1>(rows, row, &[t], partial, ahead)
            }
        {
            return;
        }
        // A stored `f32` row takes the plain loop below, which LLVM vectorises: on the AVX2
        // path this sweep's intrinsics ran the two-matvec form at 37-39% of a read instead of
        // 45-50% (`gpt2_small`, a Zen 4 EPYC). The bits are the same.
        let stored_f32 = rows.stored_f32(row, 0, partial.len()).is_some();
        if FMA
            && !stored_f32
            && unsafe { add_stored::<R, Avx2Sweep, 1>(rows, row, &[t], partial, ahead) }
        {
            return;
        }
    }
    for (chunk_index, partial_chunk) in partial.chunks_mut(CHUNK).enumerate() {
        let u_chunk = rows.chunk::<FMA>(row, chunk_index * CHUNK, partial_chunk.len(), buffer);
        add_scaled_slice::<FMA>(u_chunk, t, partial_chunk);
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) mod tests {
    use super::*;

    /// `widen` gives `Element::to_f32`'s bits for every one of the 65536 16-bit values, in
    /// every lane position of its `WIDTH` lanes (NaN payloads included).
    pub(crate) fn widening_matches_to_f32<E: Element, const WIDTH: usize>(
        from_bits: fn(u16) -> E,
        widen: impl Fn(&[E; WIDTH]) -> [f32; WIDTH],
    ) {
        let values: Vec<E> = (0..=u16::MAX).map(from_bits).collect();
        for offset in 0..WIDTH {
            let (groups, _) = values[offset..].as_chunks::<WIDTH>();
            for group in groups {
                for (&value, lane) in group.iter().zip(widen(group)) {
                    assert_eq!(
                        lane.to_bits(),
                        value.to_f32().to_bits(),
                        "{} value {value:?} (offset {offset}, {WIDTH} lanes)",
                        E::DTYPE.name()
                    );
                }
            }
        }
    }

    /// Widening eight at a time (F16C's `vcvtph2ps` for `f16`, a zero-extension and a shift
    /// for `bf16`) is `to_f32`'s, on every value.
    fn widen8_matches_to_f32<E: InRegister>(from_bits: fn(u16) -> E) {
        if !KernelPath::Avx2Fma.is_supported() {
            eprintln!("NOT RUN: widening in registers (the CPU lacks AVX2, FMA or F16C)");
            return;
        }
        // SAFETY: `is_supported` has just confirmed AVX2, FMA and F16C.
        widening_matches_to_f32(from_bits, |group| {
            bytemuck::cast(unsafe { E::widen8(group) })
        });
    }

    #[test]
    fn f16c_widening_matches_to_f32_on_every_value() {
        widen8_matches_to_f32(f16::from_bits);
    }

    #[test]
    fn bf16_widening_matches_to_f32_on_every_value() {
        widen8_matches_to_f32(bf16::from_bits);
    }
}
