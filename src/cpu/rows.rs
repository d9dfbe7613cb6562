//! The short hot loops of the CPU path.
//!
//! A power pass sees the update direction `U` one row at a time through [`Rows`]: a source
//! widens a chunk of a row to `f32` into a small buffer (for the optimizer step it also applies
//! the momentum rule, so `U` is never stored), and the math runs on that buffer with
//! [`LANES`] independent accumulators. Element `k` of a row always lands in lane `k % LANES`
//! and lanes are combined in a fixed tree, so every sum is bitwise reproducible whatever the
//! thread count.

use crate::element::Element;

/// Independent accumulators per sum: wide enough for 256-bit vectors.
pub(crate) const LANES: usize = 8;

/// Row elements widened per chunk (a multiple of [`LANES`]; 1 KiB of `f32` stays in L1).
pub(crate) const CHUNK: usize = 256;

/// The sums of one row `u` against the power vector `v` (SPEC 4 first half of the fused pass).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct RowSums {
    /// `t = <u, v>`.
    pub dot: f32,
    /// `||u||^2`, for the Frobenius norm (zero test, exact norm of vectors).
    pub sum_sq: f32,
    /// `Σ u * 0`: NaN exactly when some `u` is NaN or infinite, zero otherwise.
    pub probe: f32,
}

/// Row access to a matrix `U` of `fan_in` columns, widened to `f32`.
pub(crate) trait Rows: Sync {
    /// Writes `U[row, col_start .. col_start + out.len()]` into `out`.
    fn load(&self, row: usize, col_start: usize, out: &mut [f32]);
}

/// A stored matrix: `U` is the matrix itself.
pub(crate) struct PlainRows<'a, T> {
    pub data: &'a [T],
    pub fan_in: usize,
}

impl<T: Element> Rows for PlainRows<'_, T> {
    #[inline(always)]
    fn load(&self, row: usize, col_start: usize, out: &mut [f32]) {
        let start = row * self.fan_in + col_start;
        let source = &self.data[start..start + out.len()];
        for (dst, &value) in out.iter_mut().zip(source) {
            *dst = value.to_f32();
        }
    }
}

/// The momentum rule of SPEC 5, per element, in `f32`.
///
/// `M_new = beta * M + grad_coef * G` (`grad_coef` is 1 for heavy-ball, `1 - beta` for EMA);
/// `U = M_new`, or with Nesterov the rule applied once more, `U = beta * M_new + grad_coef * G`
/// (PyTorch's `G + beta * M_new` for heavy-ball, Muon's `lerp(G, M_new, beta)` for EMA).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct MomentumRule {
    pub beta: f32,
    pub grad_coef: f32,
    pub nesterov: bool,
}

impl MomentumRule {
    /// `(M_new, U)` for one element.
    #[inline(always)]
    pub fn apply<const NESTEROV: bool>(self, momentum: f32, grad: f32) -> (f32, f32) {
        let new_momentum = self.beta * momentum + self.grad_coef * grad;
        let direction = if NESTEROV {
            self.beta * new_momentum + self.grad_coef * grad
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
    fn load_with<const NESTEROV: bool>(&self, start: usize, out: &mut [f32]) {
        let grads = &self.grads[start..start + out.len()];
        let momentum = &self.momentum[start..start + out.len()];
        for ((dst, &grad), &old) in out.iter_mut().zip(grads).zip(momentum) {
            *dst = self.rule.apply::<NESTEROV>(old, grad.to_f32()).1;
        }
    }
}

impl<T: Element> Rows for DirectionRows<'_, T> {
    #[inline(always)]
    fn load(&self, row: usize, col_start: usize, out: &mut [f32]) {
        let start = row * self.fan_in + col_start;
        if self.rule.nesterov {
            self.load_with::<true>(start, out);
        } else {
            self.load_with::<false>(start, out);
        }
    }
}

/// Sum of the lanes in a fixed pairwise order.
#[inline(always)]
fn reduce_lanes(lanes: [f32; LANES]) -> f32 {
    ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
        + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]))
}

/// `(<u, v>, ||u||^2, Σ u*0)` for row `row` of `rows`; `v.len()` is `fan_in`.
#[inline]
pub(crate) fn row_sums<R: Rows>(
    rows: &R,
    row: usize,
    v: &[f32],
    buffer: &mut [f32; CHUNK],
) -> RowSums {
    let mut dot = [0.0f32; LANES];
    let mut sum_sq = [0.0f32; LANES];
    let mut probe = [0.0f32; LANES];
    for (chunk_index, v_chunk) in v.chunks(CHUNK).enumerate() {
        let u_chunk = &mut buffer[..v_chunk.len()];
        rows.load(row, chunk_index * CHUNK, u_chunk);
        let mut u_lanes = u_chunk.chunks_exact(LANES);
        let mut v_lanes = v_chunk.chunks_exact(LANES);
        for (u8, v8) in (&mut u_lanes).zip(&mut v_lanes) {
            for lane in 0..LANES {
                dot[lane] += u8[lane] * v8[lane];
                sum_sq[lane] += u8[lane] * u8[lane];
                probe[lane] += u8[lane] * 0.0;
            }
        }
        // A row's tail (< LANES elements) only occurs in its last chunk, and CHUNK is a
        // multiple of LANES, so element k still lands in lane k % LANES.
        for (lane, (&u, &vk)) in u_lanes
            .remainder()
            .iter()
            .zip(v_lanes.remainder())
            .enumerate()
        {
            dot[lane] += u * vk;
            sum_sq[lane] += u * u;
            probe[lane] += u * 0.0;
        }
    }
    RowSums {
        dot: reduce_lanes(dot),
        sum_sq: reduce_lanes(sum_sq),
        probe: reduce_lanes(probe),
    }
}

/// `partial += t * u` for row `row` of `rows` (SPEC 4 second half of the fused pass).
#[inline]
pub(crate) fn add_scaled_row<R: Rows>(
    rows: &R,
    row: usize,
    t: f32,
    partial: &mut [f32],
    buffer: &mut [f32; CHUNK],
) {
    for (chunk_index, partial_chunk) in partial.chunks_mut(CHUNK).enumerate() {
        let u_chunk = &mut buffer[..partial_chunk.len()];
        rows.load(row, chunk_index * CHUNK, u_chunk);
        for (acc, &u) in partial_chunk.iter_mut().zip(u_chunk.iter()) {
            *acc += t * u;
        }
    }
}
