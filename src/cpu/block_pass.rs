//! The fused pass for a block of vectors: `W = U^T U V` for [`BLOCK_VECTORS`] vectors `V` at
//! once, reading `U` from memory once (math §4.9, block Lanczos).
//!
//! Per row block and cache tile of rows `u_i`, as in the one-vector pass (§4.2):
//!
//! ```text
//! t_ij = <u_i, v_j>                 for every row i of the tile and every vector j
//! w_j += Σ_i t_ij u_i               in row order, while the tile is still in cache
//! ```
//!
//! Each row is read from memory once and from cache again by the second sweep. The dot
//! products of a row run eight lanes per sum (element `k` into lane `k % 8`, lanes combined
//! in a fixed tree) and the rows are added into each `w_j` in row order, so the result does
//! not depend on the number of threads. Blocks run in parallel; the caller sums each matrix's
//! partials in block order.

use rayon::prelude::*;

use super::power::{Kernel, on_path};
use super::rows::{Ahead, KernelPath, Rows, SIMD_WIDTH, madd, reduce_lanes};
use crate::layout::{BatchLayout, RowBlock};

/// Vectors per block pass: the largest block of block Lanczos (math §4.9). Four resolves
/// clusters of up to four top singular values; a pass does nine multiply-adds per element of
/// `U`, three times the one-vector pass (math §4.9.2).
pub(crate) const BLOCK_VECTORS: usize = 4;

/// Rows of `U` per cache tile: about 64 KiB of `f32`, re-read from L2 by the second sweep.
const TILE_ELEMENTS: usize = 16 * 1024;

/// The products of one block pass.
pub(crate) struct BlockProducts<'a> {
    /// `vectors[j]`: every matrix's `v_j` at the layout's vector offsets.
    pub vectors: &'a [Vec<f32>; BLOCK_VECTORS],
    /// `partials[j]`: the block partials of `w_j`, laid out like the layout's partials.
    pub partials: &'a mut [Vec<f32>; BLOCK_VECTORS],
    /// Per row block: the sum of the squares of its rows' elements.
    pub sums: &'a mut [f32],
}

/// Fills the partials and block sums of every active matrix.
pub(crate) fn block_pass<R: Rows>(
    path: KernelPath,
    layout: &BatchLayout,
    rows: &[R],
    active: &[bool],
    products: BlockProducts<'_>,
) {
    let BlockProducts {
        vectors,
        partials,
        sums,
    } = products;
    let mut splits = partials
        .each_mut()
        .map(|partial| layout.split_block_partials_mut(partial).into_iter());
    let block_partials: Vec<[&mut [f32]; BLOCK_VECTORS]> = layout
        .blocks()
        .iter()
        .map(|_| {
            splits
                .each_mut()
                .map(|split| split.next().expect("one partial per block and vector"))
        })
        .collect();
    layout
        .blocks()
        .par_iter()
        .zip(block_partials)
        .zip(sums.par_iter_mut())
        .filter(|((block, _), _)| active[block.matrix])
        .for_each(|((block, partial), sum_sq)| {
            let range = layout.matrix(block.matrix).vector_range();
            let v = vectors.each_ref().map(|v| &v[range.clone()]);
            TILE.with_borrow_mut(|tile| {
                *sum_sq = on_path(
                    path,
                    BlockTile {
                        rows: &rows[block.matrix],
                        block,
                        v,
                        partial,
                        tile,
                    },
                );
            });
        });
}

thread_local! {
    /// Each worker's tile of rows widened to `f32` (sources not stored as `f32`).
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The pass over one row block; returns the block's sum of squares.
struct BlockTile<'a, R> {
    rows: &'a R,
    block: &'a RowBlock,
    v: [&'a [f32]; BLOCK_VECTORS],
    partial: [&'a mut [f32]; BLOCK_VECTORS],
    tile: &'a mut Vec<f32>,
}

impl<R: Rows> Kernel for BlockTile<'_, R> {
    type Output = f32;
    #[inline(always)]
    fn run<const FMA: bool>(self) -> f32 {
        let BlockTile {
            rows,
            block,
            v,
            mut partial,
            tile,
        } = self;
        partial.iter_mut().for_each(|w| w.fill(0.0));
        let fan_in = v[0].len();
        let tile_rows = (TILE_ELEMENTS / fan_in).max(1);
        let in_place = rows.stored_f32(block.row_start, 0, fan_in).is_some();
        if !in_place && tile.len() < tile_rows * fan_in {
            tile.resize(tile_rows * fan_in, 0.0);
        }
        let mut dots = Vec::with_capacity(tile_rows);
        // The AVX2 tile's running sums, one per row, kept across tiles (no allocation per tile).
        #[cfg(target_arch = "x86_64")]
        let mut lanes = Vec::with_capacity(tile_rows);
        let mut sum_sq = 0.0f32;
        let mut tile_start = block.row_start;
        while tile_start < block.row_end {
            let tile_end = (tile_start + tile_rows).min(block.row_end);
            if !in_place {
                for (row, out) in (tile_start..tile_end).zip(tile.chunks_exact_mut(fan_in)) {
                    rows.load::<FMA>(row, 0, out);
                }
            }
            let view = TileView {
                rows,
                tile,
                tile_start,
                fan_in,
            };
            // The AVX2 sweeps fetch the next tile as they go (a hint: the bits do not depend
            // on it), so that memory keeps streaming while the core computes.
            let next_end = (tile_end + tile_rows).min(block.row_end);
            let mut ahead = rows.ahead(tile_end * fan_in, next_end * fan_in);
            dots.clear();
            #[cfg(target_arch = "x86_64")]
            if FMA {
                // SAFETY: `FMA = true` code runs only inside `on_path`'s `Avx2Fma` and `Avx512`
                // branches, both of which have checked that the CPU has AVX2 and FMA.
                unsafe {
                    tile_avx2_fma(
                        &view,
                        tile_end,
                        v,
                        &mut partial,
                        (&mut lanes, &mut dots),
                        &mut ahead,
                    )
                };
                sum_sq = dots.iter().fold(sum_sq, |total, sums| total + sums.1);
                tile_start = tile_end;
                continue;
            }
            for row in tile_start..tile_end {
                dots.push(block_row_sums::<FMA>(view.row(row), v));
            }
            sum_sq = dots.iter().fold(sum_sq, |total, sums| total + sums.1);
            for (vector, w) in partial.iter_mut().enumerate() {
                add_tile_rows::<R, FMA>(&view, tile_start, &dots, vector, w);
            }
            let _ = &mut ahead;
            tile_start = tile_end;
        }
        sum_sq
    }
}

/// The rows of one tile as `f32`: a stored `f32` matrix in place, any other in `tile`.
struct TileView<'a, R> {
    rows: &'a R,
    tile: &'a [f32],
    tile_start: usize,
    fan_in: usize,
}

impl<'a, R: Rows> TileView<'a, R> {
    #[inline(always)]
    fn row(&self, row: usize) -> &'a [f32] {
        match self.rows.stored_f32(row, 0, self.fan_in) {
            Some(stored) => stored,
            None => &self.tile[(row - self.tile_start) * self.fan_in..][..self.fan_in],
        }
    }
}

/// A row's `(<u, v_j> for every j, ||u||^2)`.
type RowDots = ([f32; BLOCK_VECTORS], f32);

/// `(<u, v_j> for every j, ||u||^2)`: element `k` into lane `k % 8` of each sum, a tail
/// shorter than eight padded with zeros (which add `0 * 0`), lanes combined in a fixed tree.
#[inline(always)]
fn block_row_sums<const FMA: bool>(u: &[f32], v: [&[f32]; BLOCK_VECTORS]) -> RowDots {
    let (u_lanes, u_tail) = u.as_chunks::<SIMD_WIDTH>();
    let v_lanes = v.map(|v| &v.as_chunks::<SIMD_WIDTH>().0[..u_lanes.len()]);
    let mut dots = [[0.0f32; SIMD_WIDTH]; BLOCK_VECTORS];
    let mut sum_sq = [0.0f32; SIMD_WIDTH];
    let mut accumulate = |x: &[f32; SIMD_WIDTH], y: [&[f32; SIMD_WIDTH]; BLOCK_VECTORS]| {
        for (dot, y) in dots.iter_mut().zip(y) {
            *dot = std::array::from_fn(|lane| madd::<FMA>(x[lane], y[lane], dot[lane]));
        }
        sum_sq = std::array::from_fn(|lane| madd::<FMA>(x[lane], x[lane], sum_sq[lane]));
    };
    for (index, x) in u_lanes.iter().enumerate() {
        accumulate(x, v_lanes.map(|v| &v[index]));
    }
    if !u_tail.is_empty() {
        let start = u.len() - u_tail.len();
        let mut x = [0.0f32; SIMD_WIDTH];
        x[..u_tail.len()].copy_from_slice(u_tail);
        let y = v.map(|v| {
            let mut padded = [0.0f32; SIMD_WIDTH];
            padded[..u_tail.len()].copy_from_slice(&v[start..]);
            padded
        });
        accumulate(&x, y.each_ref());
    }
    (dots.map(reduce_lanes), reduce_lanes(sum_sq))
}

/// Rows added per sweep over a partial: the partial is loaded and stored once per group.
const ROW_GROUP: usize = 4;

/// `w += Σ_i dots[i][vector] u_{first_row + i}`, element by element in row order (one
/// rounding per row and element, however the rows are grouped).
#[inline(always)]
fn add_tile_rows<R: Rows, const FMA: bool>(
    view: &TileView<'_, R>,
    first_row: usize,
    dots: &[RowDots],
    vector: usize,
    w: &mut [f32],
) {
    let (groups, rest) = dots.as_chunks::<ROW_GROUP>();
    for (group, group_dots) in groups.iter().enumerate() {
        let first = first_row + group * ROW_GROUP;
        let u: [&[f32]; ROW_GROUP] = std::array::from_fn(|k| &view.row(first + k)[..w.len()]);
        let t = group_dots.map(|dots| dots.0[vector]);
        for (index, acc) in w.iter_mut().enumerate() {
            let mut sum = *acc;
            for (u, &t) in u.iter().zip(&t) {
                sum = madd::<FMA>(t, u[index], sum);
            }
            *acc = sum;
        }
    }
    let first_rest = first_row + groups.len() * ROW_GROUP;
    for (offset, dots) in rest.iter().enumerate() {
        let u = &view.row(first_rest + offset)[..w.len()];
        for (acc, &x) in w.iter_mut().zip(u) {
            *acc = madd::<FMA>(dots.0[vector], x, *acc);
        }
    }
}

/// Columns per stretch of the AVX2 sweeps: the four vectors' and the four partials'
/// stretches (16 KiB) stay in L1 while every row of the tile passes over them.
const COLUMN_STRETCH: usize = 512;

/// A row's running sums in the dot sweep: four dot products and the sum of squares, eight
/// lanes each.
type RowLanes = [[f32; SIMD_WIDTH]; BLOCK_VECTORS + 1];

/// One tile on AVX2: [`block_row_sums`] and [`add_tile_rows`] in registers, two rows at a
/// time (the vectors' loads shared by both rows' sums; the four partials loaded and stored
/// once per two rows), in stretches of [`COLUMN_STRETCH`] columns, so that the vectors and
/// the partials are read from L1 rather than L2. Every lane computes the same `fma`s in the
/// same order as the portable form, and the lanes are combined in the same tree: the same
/// bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn tile_avx2_fma<R: Rows>(
    view: &TileView<'_, R>,
    tile_end: usize,
    v: [&[f32]; BLOCK_VECTORS],
    partial: &mut [&mut [f32]; BLOCK_VECTORS],
    (lanes, dots): (&mut Vec<RowLanes>, &mut Vec<RowDots>),
    ahead: &mut Ahead,
) {
    let tile_start = view.tile_start;
    let rows = tile_end - tile_start;
    let fan_in = view.fan_in;
    let whole = fan_in / SIMD_WIDTH * SIMD_WIDTH;
    lanes.clear();
    lanes.resize(rows, RowLanes::default());
    let stretches = (0..whole)
        .step_by(COLUMN_STRETCH)
        .map(|start| start..(start + COLUMN_STRETCH).min(whole));
    for columns in stretches.clone() {
        let v = v.map(|vector| &vector[columns.clone()]);
        let (pairs, odd) = lanes.as_chunks_mut::<2>();
        for (pair, pair_lanes) in pairs.iter_mut().enumerate() {
            let first = tile_start + 2 * pair;
            let u = [view.row(first), view.row(first + 1)].map(|row| &row[columns.clone()]);
            sums_avx2_fma(u, v, pair_lanes, ahead);
        }
        if let [last] = odd {
            let u = [&view.row(tile_end - 1)[columns.clone()]];
            sums_avx2_fma(
                u,
                v,
                std::slice::from_mut(last).try_into().expect("one row"),
                ahead,
            );
        }
    }
    for (row, row_lanes) in (tile_start..tile_end).zip(lanes.iter_mut()) {
        if whole < fan_in {
            let pad = |values: &[f32]| {
                let mut padded = [0.0f32; SIMD_WIDTH];
                padded[..fan_in - whole].copy_from_slice(&values[whole..fan_in]);
                padded
            };
            let y = v.map(pad);
            sums_avx2_fma(
                [&pad(view.row(row))[..]],
                y.each_ref().map(|y| &y[..]),
                std::slice::from_mut(row_lanes).try_into().expect("one row"),
                ahead,
            );
        }
        let [d0, d1, d2, d3, squares] = *row_lanes;
        dots.push(([d0, d1, d2, d3].map(reduce_lanes), reduce_lanes(squares)));
    }
    for columns in stretches {
        let mut w = partial.each_mut().map(|w| &mut w[columns.clone()]);
        let (pairs, odd) = dots.as_chunks::<2>();
        for (pair, pair_dots) in pairs.iter().enumerate() {
            let first = tile_start + 2 * pair;
            let u = [view.row(first), view.row(first + 1)].map(|row| &row[columns.clone()]);
            add_rows_avx2_fma(u, pair_dots.map(|dots| dots.0), &mut w, ahead);
        }
        if let [last] = odd {
            let u = [&view.row(tile_end - 1)[columns.clone()]];
            add_rows_avx2_fma(u, [last.0], &mut w, ahead);
        }
    }
    for (row, row_dots) in (tile_start..tile_end).zip(dots.iter()) {
        let u = &view.row(row)[whole..];
        for (w, &t) in partial.iter_mut().zip(&row_dots.0) {
            for (acc, &x) in w[whole..].iter_mut().zip(u) {
                *acc = t.mul_add(x, *acc);
            }
        }
    }
}

/// Adds a stretch of `N` rows (a whole number of eight-lane groups) to their running sums:
/// lane `l` of each sum takes `fma(u[k], v_j[k], sum)` for the stretch's `k ≡ l (mod 8)`
/// in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn sums_avx2_fma<const N: usize>(
    u: [&[f32]; N],
    v: [&[f32]; BLOCK_VECTORS],
    lanes: &mut [RowLanes; N],
    ahead: &mut Ahead,
) {
    use std::arch::x86_64::*;
    let groups = u[0].len() / SIMD_WIDTH;
    let u_lanes = u.map(|row| &row.as_chunks::<SIMD_WIDTH>().0[..groups]);
    let [v0, v1, v2, v3] = v.map(|vector| &vector.as_chunks::<SIMD_WIDTH>().0[..groups]);
    let mut sums: [[__m256; BLOCK_VECTORS + 1]; N] = lanes.map(|row| row.map(bytemuck::cast));
    for (index, (((y0, y1), y2), y3)) in v0.iter().zip(v1).zip(v2).zip(v3).enumerate() {
        ahead.cover(index, N * SIMD_WIDTH * size_of::<f32>());
        let x = u_lanes.map(|row| bytemuck::cast::<_, __m256>(row[index]));
        // One vector's lanes loaded at a time: with N = 2, the ten sums, two rows and one
        // vector fit the sixteen registers.
        for (vector, y) in [y0, y1, y2, y3].into_iter().enumerate() {
            let y: __m256 = bytemuck::cast(*y);
            for row in 0..N {
                sums[row][vector] = _mm256_fmadd_ps(x[row], y, sums[row][vector]);
            }
        }
        for row in 0..N {
            sums[row][BLOCK_VECTORS] = _mm256_fmadd_ps(x[row], x[row], sums[row][BLOCK_VECTORS]);
        }
    }
    *lanes = sums.map(|row| row.map(bytemuck::cast));
}

/// `w_j += Σ_r t[r][j] u_r` over a stretch (a whole number of eight-lane groups) of `N` rows
/// and every vector, element by element in row order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn add_rows_avx2_fma<const N: usize>(
    u: [&[f32]; N],
    t: [[f32; BLOCK_VECTORS]; N],
    w: &mut [&mut [f32]; BLOCK_VECTORS],
    ahead: &mut Ahead,
) {
    use std::arch::x86_64::*;
    let groups = u[0].len() / SIMD_WIDTH;
    let u_lanes = u.map(|row| &row.as_chunks::<SIMD_WIDTH>().0[..groups]);
    let scale = t.map(|row| row.map(|t| _mm256_set1_ps(t)));
    let [w0, w1, w2, w3] = w
        .each_mut()
        .map(|w| &mut w.as_chunks_mut::<SIMD_WIDTH>().0[..groups]);
    let add = |vector: usize, w: &mut [f32; SIMD_WIDTH], x: &[__m256; N]| {
        let mut lanes: __m256 = bytemuck::cast(*w);
        for row in 0..N {
            lanes = _mm256_fmadd_ps(scale[row][vector], x[row], lanes);
        }
        *w = bytemuck::cast(lanes);
    };
    for (index, (((w0, w1), w2), w3)) in w0.iter_mut().zip(w1).zip(w2).zip(w3).enumerate() {
        ahead.cover(index, N * SIMD_WIDTH * size_of::<f32>());
        let x = u_lanes.map(|row| bytemuck::cast::<_, __m256>(row[index]));
        add(0, w0, &x);
        add(1, w1, &x);
        add(2, w2, &x);
        add(3, w3, &x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::rows::PlainRows;
    use crate::element::Element;
    use crate::layout::BlockPolicy;
    use crate::layout::MatrixShape;
    use half::{bf16, f16};

    /// Small blocks, so that every matrix spans several and their partials are summed.
    const POLICY: BlockPolicy = BlockPolicy {
        target_elements: 3000,
        align_elements: 1,
    };

    /// Shapes with and without tails of eight, tiles with and without a remainder of rows, a
    /// row longer than a tile, a single column.
    const SHAPES: [(usize, usize); 6] =
        [(45, 517), (9, 16), (40, 33), (3, 20000), (20, 1), (300, 64)];

    struct Run {
        products: Vec<[Vec<f32>; BLOCK_VECTORS]>,
        sums: Vec<f32>,
    }

    fn run<T: Element>(
        path: KernelPath,
        data: &[Vec<T>],
        vectors: &[Vec<f32>; BLOCK_VECTORS],
    ) -> Run {
        let shapes: Vec<MatrixShape> = SHAPES
            .iter()
            .map(|&(rows, cols)| MatrixShape::new(rows, cols))
            .collect();
        let layout = BatchLayout::new(&shapes, POLICY).unwrap();
        let views: Vec<&[T]> = data.iter().map(Vec::as_slice).collect();
        let rows = PlainRows::of_batch(&layout, &views);
        let mut partials: [Vec<f32>; BLOCK_VECTORS] =
            std::array::from_fn(|_| vec![f32::NAN; layout.total_partial_len()]);
        let mut sums = vec![0.0f32; layout.blocks().len()];
        block_pass(
            path,
            &layout,
            &rows,
            &vec![true; shapes.len()],
            BlockProducts {
                vectors,
                partials: &mut partials,
                sums: &mut sums,
            },
        );
        let products = layout
            .matrices()
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                partials.each_ref().map(|partial| {
                    let mut product = vec![0.0f32; entry.shape.fan_in];
                    layout.sum_block_partials(index, partial, &mut product);
                    product
                })
            })
            .collect();
        let sums = layout
            .matrices()
            .iter()
            .map(|entry| entry.block_range().map(|b| sums[b]).sum())
            .collect();
        Run { products, sums }
    }

    fn inputs<T: Element>() -> (Vec<Vec<T>>, [Vec<f32>; BLOCK_VECTORS]) {
        let data = SHAPES
            .iter()
            .enumerate()
            .map(|(index, &(rows, cols))| {
                let mut values = vec![0.0f32; rows * cols];
                crate::random::fill_gaussian(11, index as u64, &mut values);
                values.iter().map(|&x| T::from_f32_rne(x)).collect()
            })
            .collect();
        let total: usize = SHAPES.iter().map(|&(_, cols)| cols).sum();
        let vectors = std::array::from_fn(|j| {
            let mut v = vec![0.0f32; total];
            // The last vector stays zero, as an unused slot of a narrower block does.
            if j + 1 < BLOCK_VECTORS {
                crate::random::fill_gaussian(12, j as u64, &mut v);
            }
            v
        });
        (data, vectors)
    }

    /// Every product `U^T U v_j` and `||U||_F^2` against the same sums in `f64`, on both
    /// kernel paths, for each stored type; a zero vector gives a zero product.
    fn matches_f64<T: Element>() {
        let (data, vectors) = inputs::<T>();
        for path in [KernelPath::Portable, KernelPath::Avx2Fma] {
            if !path.is_supported() {
                eprintln!("NOT RUN: {path:?} on this CPU");
                continue;
            }
            let got = run(path, &data, &vectors);
            let mut offset = 0;
            for (index, &(rows, cols)) in SHAPES.iter().enumerate() {
                let u: Vec<f64> = data[index].iter().map(|x| f64::from(x.to_f32())).collect();
                let frobenius_sq: f64 = u.iter().map(|x| x * x).sum();
                let sum_error = (f64::from(got.sums[index]) - frobenius_sq).abs();
                assert!(
                    sum_error <= 1e-5 * frobenius_sq,
                    "{path:?} matrix {index}: sum {sum_error:e}"
                );
                for (j, vector) in vectors.iter().enumerate() {
                    let v: Vec<f64> = vector[offset..offset + cols]
                        .iter()
                        .map(|&x| f64::from(x))
                        .collect();
                    let v_norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
                    let mut exact = vec![0.0f64; cols];
                    for row in u.chunks_exact(cols).take(rows) {
                        let t: f64 = row.iter().zip(&v).map(|(a, b)| a * b).sum();
                        exact.iter_mut().zip(row).for_each(|(w, &a)| *w += t * a);
                    }
                    let error = got.products[index][j]
                        .iter()
                        .zip(&exact)
                        .map(|(&w, e)| (f64::from(w) - e).powi(2))
                        .sum::<f64>()
                        .sqrt();
                    assert!(
                        error <= 1e-5 * frobenius_sq * v_norm.max(1.0),
                        "{path:?} matrix {index} vector {j}: error {error:e}"
                    );
                    if v_norm == 0.0 {
                        assert!(got.products[index][j].iter().all(|&w| w == 0.0));
                    }
                }
                offset += cols;
            }
        }
    }

    #[test]
    fn f32_block_products_match_f64() {
        matches_f64::<f32>();
    }

    #[test]
    fn bf16_block_products_match_f64() {
        matches_f64::<bf16>();
    }

    #[test]
    fn f16_block_products_match_f64() {
        matches_f64::<f16>();
    }

    /// The same bits with one worker thread as with three.
    #[test]
    fn block_products_do_not_depend_on_the_thread_count() {
        let (data, vectors) = inputs::<bf16>();
        let path = KernelPath::detect();
        let with_threads = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let result = pool.install(|| run(path, &data, &vectors));
            let bits = |values: &[f32]| values.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            (
                result
                    .products
                    .iter()
                    .flatten()
                    .map(|p| bits(p))
                    .collect::<Vec<_>>(),
                bits(&result.sums),
            )
        };
        assert_eq!(with_threads(1), with_threads(3));
    }

    /// The AVX2 tile gives the same bits as the portable loops with fused multiply-adds: rows
    /// with and without a tail of eight, longer and shorter than a stretch of columns, odd
    /// and even numbers of rows, partials that already hold sums.
    #[test]
    fn avx2_tile_matches_the_portable_loops_bit_for_bit() {
        if !KernelPath::Avx2Fma.is_supported() {
            eprintln!("NOT RUN: the AVX2 tile needs AVX2 and FMA");
            return;
        }
        for (rows, fan_in) in [(5, 1037), (4, 512), (3, 13), (2, 8), (1, 2050), (7, 1)] {
            let mut data = vec![0.0f32; rows * fan_in];
            crate::random::fill_gaussian(5, fan_in as u64, &mut data);
            let source = PlainRows {
                data: &data[..],
                fan_in,
            };
            let view = TileView {
                rows: &source,
                tile: &[],
                tile_start: 0,
                fan_in,
            };
            let vectors: [Vec<f32>; BLOCK_VECTORS] = std::array::from_fn(|j| {
                let mut v = vec![0.0f32; fan_in];
                crate::random::fill_gaussian(6, j as u64, &mut v);
                v
            });
            let v = vectors.each_ref().map(|v| &v[..]);
            let start: [Vec<f32>; BLOCK_VECTORS] = std::array::from_fn(|j| {
                let mut w = vec![0.0f32; fan_in];
                crate::random::fill_gaussian(7, j as u64, &mut w);
                w
            });
            let mut portable = start.clone();
            let portable_dots: Vec<RowDots> = (0..rows)
                .map(|row| block_row_sums::<true>(view.row(row), v))
                .collect();
            for (vector, w) in portable.iter_mut().enumerate() {
                add_tile_rows::<_, true>(&view, 0, &portable_dots, vector, w);
            }
            let mut fast = start.clone();
            let mut fast_dots = Vec::new();
            let mut partial = fast.each_mut().map(|w| &mut w[..]);
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe {
                tile_avx2_fma(
                    &view,
                    rows,
                    v,
                    &mut partial,
                    (&mut Vec::new(), &mut fast_dots),
                    &mut Ahead::default(),
                )
            };
            let bits = |values: &[f32]| values.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for (fast, portable) in fast_dots.iter().zip(&portable_dots) {
                assert_eq!(bits(&fast.0), bits(&portable.0), "{rows}x{fan_in} dots");
                assert_eq!(
                    fast.1.to_bits(),
                    portable.1.to_bits(),
                    "{rows}x{fan_in} sum"
                );
            }
            assert_eq!(fast_dots.len(), rows);
            for (fast, portable) in fast.iter().zip(&portable) {
                assert_eq!(bits(fast), bits(portable), "{rows}x{fan_in} partials");
            }
        }
    }
}
