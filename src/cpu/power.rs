//! Batched power iteration on the CPU (math §4).
//!
//! One iteration computes, per matrix, `w = U^T (U v)`, `sigma = max(sqrt(||w||), ||U||_F /
//! sqrt(min(m, n)))` (the Frobenius floor, math §4.4), `v <- w / ||w||`.
//! The fused pass reads each row block of `U` from memory once: it walks the block in small
//! row tiles that fit in L2, first forming `t_i = <u_i, v>` for the tile's rows, then adding
//! `Σ t_i u_i` into the block's partial `w` while those rows are still cached. Blocks run in
//! parallel (rayon); [`finish`] sums each matrix's partials in block order, so results are
//! bitwise identical for any number of threads.

use rayon::prelude::*;

use super::rows::{
    CHUNK, KernelPath, PlainRows, ROW_GROUP, Rows, add_scaled_row, add_scaled_rows,
    add_scaled_tile, row_sums, slice_sums,
};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::kernels::records::{MatrixResult, Status, VectorAction};
use crate::layout::{BatchLayout, RowBlock};
use crate::memory::zeroed;
use crate::policy::{self, IterationSums};
use crate::scaling::Scale;

/// Elements of `U` per cache tile: 64 KiB of `f32`, so that a tile's sources (gradient and
/// momentum) stay in the 1 MiB-class L2 between the two sweeps, with room for `v` and `w`.
const CACHE_TILE_ELEMENTS: usize = 16 * 1024;
/// Upper bound on rows per cache tile (the `t_i` live in a stack array).
const MAX_TILE_ROWS: usize = 64;

/// Per-block sums the finish step needs besides the partial `w`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct BlockSums {
    sum_sq: f32,
}

/// The result of one power iteration for one matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Estimate {
    /// `sigma = max(sqrt(||U^T U v||), ||U||_F / sqrt(min(m, n)))` (math §4.4): a lower bound
    /// on `||U||_*`, equal at convergence. For a row or column vector it is the exact
    /// Euclidean norm.
    Sigma(f32),
    /// `U` is zero (its Frobenius norm underflows to zero): `sigma = 0`.
    Zero,
    /// `U` holds a NaN or an infinity, or `||U||_*` is too large for `f32` arithmetic
    /// (around `1e19`). The power vector is left untouched.
    NonFinite,
    /// `U` is not zero but `U^T U v` is: `v` is orthogonal to the row space of `U` or the
    /// product underflows. `v` has been re-seeded with the deterministic `±1/sqrt(n)` vector
    /// of math §4.6; iterate again.
    Degenerate,
}

impl Estimate {
    /// The estimate a finish record describes.
    fn of(result: &MatrixResult) -> Self {
        match Status::from_code(result.status) {
            Some(Status::Updated | Status::SigmaTooSmall) => Estimate::Sigma(result.sigma),
            Some(Status::ZeroDirection) => Estimate::Zero,
            Some(Status::Reseeded) => Estimate::Degenerate,
            Some(Status::NonFinite) | None => Estimate::NonFinite,
        }
    }

    /// The estimate as a number: `sigma`, `0` for [`Estimate::Zero`] and
    /// [`Estimate::Degenerate`], NaN for [`Estimate::NonFinite`].
    pub fn sigma(self) -> f32 {
        match self {
            Estimate::Sigma(sigma) => sigma,
            Estimate::Zero | Estimate::Degenerate => 0.0,
            Estimate::NonFinite => f32::NAN,
        }
    }
}

/// One fused pass over every block of the active matrices: fills each block's partial `w` and
/// its sums. `rows[j]` is matrix `j`'s `U`; `vectors` holds every `v` (layout vector offsets).
pub(crate) fn fused_pass<R: Rows>(
    path: KernelPath,
    layout: &BatchLayout,
    rows: &[R],
    active: &[bool],
    vectors: &[f32],
    partials: &mut [f32],
    sums: &mut [BlockSums],
) {
    let blocks = layout.blocks();
    let block_partials = layout.split_block_partials_mut(partials);
    blocks
        .par_iter()
        .zip(block_partials)
        .zip(sums.par_iter_mut())
        .filter(|((block, _), _)| active[block.matrix])
        .for_each(|((block, partial), block_sums)| {
            let (rows, v) = (
                &rows[block.matrix],
                &vectors[layout.matrix(block.matrix).vector_range()],
            );
            // The worker's own tile, allocated on its first pass and kept: no allocation per
            // step. `FusedBlock` starts no rayon work, so the borrow cannot be re-entered.
            TILE.with_borrow_mut(|tile| {
                if R::KEEP_TILE && tile.is_empty() {
                    tile.resize(CACHE_TILE_ELEMENTS, 0.0);
                }
                let tile: &mut [f32] = if R::KEEP_TILE { tile } else { &mut [] };
                *block_sums = on_path(
                    path,
                    FusedBlock {
                        rows,
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
    /// Each worker thread's cache tile for [`Rows::KEEP_TILE`] sources.
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A hot loop with its arguments, runnable in each compiled form: `FMA = false` is the
/// portable code, `FMA = true` the AVX2+FMA code, [`run_avx512`](Self::run_avx512) the
/// AVX-512 code. Both must be `#[inline(always)]`, so that the fused forms are inlined into,
/// and compiled for, [`on_path`]'s feature-enabled functions rather than falling back to
/// library calls for `mul_add`.
pub(crate) trait Kernel: Sized {
    type Output;
    fn run<const FMA: bool>(self) -> Self::Output;

    /// The AVX-512 form: the AVX2+FMA code compiled with AVX-512F enabled, unless the kernel
    /// has 512-bit loops of its own (the power passes, [`super::wide`]). The same bits.
    #[inline(always)]
    fn run_avx512(self) -> Self::Output {
        self.run::<true>()
    }
}

/// Runs `kernel` in the compiled form `path` names (the portable one when this CPU lacks the
/// features).
#[inline(always)]
pub(crate) fn on_path<K: Kernel>(path: KernelPath, kernel: K) -> K::Output {
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2Fma if path.is_supported() => {
            #[target_feature(enable = "avx2,fma,f16c")]
            fn with_avx2_fma<K: Kernel>(kernel: K) -> K::Output {
                kernel.run::<true>()
            }
            // SAFETY: the match guard has just confirmed that this CPU has AVX2, FMA and F16C,
            // which is all that calling a function compiled for those features requires.
            unsafe { with_avx2_fma(kernel) }
        }
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512 if path.is_supported() => {
            #[target_feature(enable = "avx512f,avx2,fma,f16c")]
            fn with_avx512<K: Kernel>(kernel: K) -> K::Output {
                kernel.run_avx512()
            }
            // SAFETY: the match guard has just confirmed that this CPU has AVX-512F, AVX2, FMA
            // and F16C, which is all that calling a function compiled for those requires.
            unsafe { with_avx512(kernel) }
        }
        _ => kernel.run::<false>(),
    }
}

/// `path` if this CPU supports it, else an error naming it.
pub(crate) fn checked_path(path: KernelPath) -> Result<KernelPath> {
    if path.is_supported() {
        Ok(path)
    } else {
        Err(Error::InvalidArgument(format!(
            "this CPU cannot run kernel path {path:?}"
        )))
    }
}

/// The fused pass over one block (math §4): per cache tile, `t_i = <u_i, v>`, then
/// `partial += Σ t_i u_i` re-reading the tile from cache while the next tile is fetched. Where
/// forming `U` costs more than reading it back (the step's `U = f(G, M)`, see
/// [`Rows::KEEP_TILE`]), the first sweep keeps the tile's `U` in `tile` and the second sweep
/// reads it; stored `bf16` rows on the AVX2 path go to [`super::even_odd`]. The arithmetic,
/// and so the result, is the same either way.
struct FusedBlock<'a, R> {
    rows: &'a R,
    block: &'a RowBlock,
    v: &'a [f32],
    partial: &'a mut [f32],
    tile: &'a mut [f32],
}

impl<R: Rows> Kernel for FusedBlock<'_, R> {
    type Output = BlockSums;
    #[inline(always)]
    fn run<const FMA: bool>(self) -> BlockSums {
        self.fused::<FMA, false>()
    }
    #[inline(always)]
    fn run_avx512(self) -> BlockSums {
        self.fused::<true, true>()
    }
}

impl<R: Rows> FusedBlock<'_, R> {
    /// The pass in the form `FMA` and `WIDE` (AVX-512) name.
    #[inline(always)]
    fn fused<const FMA: bool, const WIDE: bool>(self) -> BlockSums {
        let FusedBlock {
            rows,
            block,
            v,
            partial,
            tile,
        } = self;
        partial.fill(0.0);
        let fan_in = v.len();
        let tile_rows = (CACHE_TILE_ELEMENTS / fan_in).clamp(1, MAX_TILE_ROWS);
        let keep_tile = R::KEEP_TILE && tile_rows * fan_in <= tile.len();
        let mut row_dots = [0.0f32; MAX_TILE_ROWS];
        // On the AVX-512 path stored `bf16` rows are widened in order like the other types
        // (as fast as the even-odd loops on a Zen 4 EPYC, README).
        #[cfg(target_arch = "x86_64")]
        if FMA && !WIDE && rows.stored_bf16(block.row_start).is_some() {
            // SAFETY: `FMA = true` code runs only inside `on_path`'s `Avx2Fma` and `Avx512`
            // branches, both of which have checked that the CPU has AVX2 and FMA.
            let sum_sq = unsafe {
                super::even_odd::fused_block(rows, block, v, partial, &mut row_dots[..tile_rows])
            };
            return BlockSums { sum_sq };
        }
        let mut buffer = [0.0f32; CHUNK];
        let mut group_buffers = [[0.0f32; CHUNK]; ROW_GROUP];
        let mut sums = BlockSums::default();
        let mut tile_start = block.row_start;
        while tile_start < block.row_end {
            let tile_end = (tile_start + tile_rows).min(block.row_end);
            let dots = &mut row_dots[..tile_end - tile_start];
            // Both sweeps fetch the next tile of the block as they go, one cache line for
            // every 128 bytes of this tile they cover, so that the memory system keeps
            // streaming while the core computes (a hint: the bits do not depend on it).
            let next_end = (tile_end + tile_rows).min(block.row_end);
            let mut ahead = rows.ahead(tile_end * fan_in, next_end * fan_in);
            if keep_tile {
                let rows_u = tile.chunks_exact_mut(fan_in);
                for ((dot, row), u) in dots.iter_mut().zip(tile_start..tile_end).zip(rows_u) {
                    rows.load::<FMA>(row, 0, u);
                    let row_sums = slice_sums::<FMA, WIDE>(u, v, &mut ahead);
                    *dot = row_sums.dot;
                    sums.sum_sq += row_sums.sum_sq;
                }
                add_scaled_tile::<FMA, WIDE>(tile, fan_in, dots, partial, &mut ahead);
            } else {
                for (dot, row) in dots.iter_mut().zip(tile_start..tile_end) {
                    let row_sums = row_sums::<R, FMA, WIDE>(rows, row, v, &mut buffer, &mut ahead);
                    *dot = row_sums.dot;
                    sums.sum_sq += row_sums.sum_sq;
                }
                add_scaled_rows::<R, FMA, WIDE>(
                    rows,
                    tile_start,
                    dots,
                    partial,
                    &mut group_buffers,
                    &mut ahead,
                );
            }
            tile_start = tile_end;
        }
        sums
    }
}

/// The settings the finish of a power iteration needs besides the sums.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FinishSettings {
    /// `eta` (0 for plain power iteration: no update coefficient is needed).
    pub learning_rate: f32,
    /// `lambda`.
    pub weight_decay: f32,
    /// The target factors `s`.
    pub scale: Scale,
    /// The step number the re-seeding hash takes (math §4.6).
    pub reseed_step: u32,
}

/// Per active matrix: sums its block partials in block order into `w` (in `f32`, kept in the
/// first partial), `|w|` in `f64`, then [`policy::decide`] and its effect on `v` and the warm
/// flag, as the finish kernel does, in round `round` of a step. Inactive matrices keep their
/// vector, flag and record; each record keeps its `iterations_needed` unless the estimate
/// has converged ([`policy::iterations_after`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish(
    layout: &BatchLayout,
    settings: &FinishSettings,
    round: u32,
    active: &[bool],
    partials: &mut [f32],
    sums: &[BlockSums],
    vectors: &mut [f32],
    warm: &mut [bool],
    results: &mut [MatrixResult],
) {
    let entries = layout.matrices();
    let matrix_partials = layout.split_matrix_partials_mut(partials);
    let matrix_vectors = layout.split_vectors_mut(vectors);
    entries
        .par_iter()
        .zip(matrix_partials)
        .zip(matrix_vectors)
        .zip(warm.par_iter_mut())
        .zip(results.par_iter_mut())
        .enumerate()
        .filter(|(index, _)| active[*index])
        .for_each(|(index, ((((entry, partials), vector), warm), result))| {
            let shape = entry.shape;
            let sum_sq = sums[entry.block_range()]
                .iter()
                .fold(0.0f32, |total, s| total + s.sum_sq);
            let (w, rest) = partials.split_at_mut(shape.fan_in);
            for partial in rest.chunks_exact(shape.fan_in) {
                w.iter_mut().zip(partial).for_each(|(acc, &p)| *acc += p);
            }
            let w_norm = w
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt();
            let sums = IterationSums {
                sum_sq,
                w_norm,
                min_dim: shape.fan_out.min(shape.fan_in),
            };
            let decision = policy::decide(
                sums,
                settings.learning_rate,
                settings.scale.factor(shape),
                settings.weight_decay,
                result.iterations_needed,
            );
            match decision.vector {
                VectorAction::Keep => {}
                VectorAction::Normalise => vector
                    .iter_mut()
                    .zip(w.iter())
                    .for_each(|(v, &x)| *v = (f64::from(x) / w_norm) as f32),
                VectorAction::Reseed => policy::reseed_vector(settings.reseed_step, index, vector),
            }
            *warm = policy::warm_after(decision.vector, *warm);
            let mut decided = decision.result;
            decided.iterations_needed = policy::iterations_after(round, result, &decided);
            *result = decided;
        });
}

/// Batched power iteration over stored matrices, with its scratch buffers allocated once.
///
/// Both forms compute the same iteration; [`fused`](Self::fused) reads each matrix once,
/// [`two_pass`](Self::two_pass) is the textbook `U v` then `U^T (U v)` kept as the baseline to
/// beat (it reads each matrix twice).
///
/// ```
/// use spectral_step::{BatchLayout, BlockPolicy, MatrixShape};
/// use spectral_step::cpu::BatchPowerIteration;
///
/// // diag(3, 1) embedded in a 2x3 matrix: ||A||_* = 3.
/// let a = [3.0f32, 0.0, 0.0, 0.0, 1.0, 0.0];
/// let layout = BatchLayout::new(&[MatrixShape::new(2, 3)], BlockPolicy::CPU)?;
/// let mut power = BatchPowerIteration::new(layout)?;
/// let mut v = power.cold_vectors(7)?;
/// let mut estimates = Vec::new();
/// for _ in 0..30 {
///     estimates = power.fused(&[&a[..]], &mut v)?;
/// }
/// assert!((estimates[0].sigma() - 3.0).abs() < 1e-5);
/// # Ok::<(), spectral_step::Error>(())
/// ```
pub struct BatchPowerIteration {
    layout: BatchLayout,
    partials: Vec<f32>,
    sums: Vec<BlockSums>,
    row_products: Vec<f32>,
    active: Vec<bool>,
    warm: Vec<bool>,
    results: Vec<MatrixResult>,
    path: KernelPath,
}

/// Plain power iteration needs no update coefficient and runs no optimizer step.
const PLAIN_FINISH: FinishSettings = FinishSettings {
    learning_rate: 0.0,
    weight_decay: 0.0,
    scale: Scale::Spectral,
    reseed_step: 0,
};

impl std::fmt::Debug for BatchPowerIteration {
    /// A summary, without the scratch buffers.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchPowerIteration")
            .field("matrices", &self.layout.len())
            .field("elements", &self.layout.packed_elements())
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl BatchPowerIteration {
    /// Scratch space for `layout`, running [`KernelPath::detect`]'s path.
    /// Errors ([`Error::OutOfMemory`]) if the scratch space cannot be allocated.
    pub fn new(layout: BatchLayout) -> Result<Self> {
        let mut active = zeroed(layout.len(), "scratch flags")?;
        active.fill(true);
        Ok(Self {
            path: KernelPath::detect(),
            partials: zeroed(layout.total_partial_len(), "partials")?,
            sums: zeroed(layout.blocks().len(), "block sums")?,
            row_products: Vec::new(),
            active,
            warm: zeroed(layout.len(), "warm flags")?,
            results: zeroed(layout.len(), "results")?,
            layout,
        })
    }

    /// The batch this was built for.
    pub fn layout(&self) -> &BatchLayout {
        &self.layout
    }

    /// The compiled form of the loops in use.
    pub fn kernel_path(&self) -> KernelPath {
        self.path
    }

    /// Chooses the compiled form of the loops; errors if this CPU cannot run it.
    pub fn set_kernel_path(&mut self, path: KernelPath) -> Result<()> {
        self.path = checked_path(path)?;
        Ok(())
    }

    /// Seeded random unit vectors for every matrix (the cold start), concatenated in layout
    /// order (at the layout's vector offsets). Matrix `j`'s vector depends only on `(seed, j)`.
    pub fn cold_vectors(&self, seed: u64) -> Result<Vec<f32>> {
        crate::random::cold_power_vectors(&self.layout, seed)
    }

    fn check<T>(&self, matrices: &[&[T]], vectors: &[f32]) -> Result<()> {
        self.layout
            .check_lengths("input", matrices.iter().map(|m| m.len()))?;
        if vectors.len() != self.layout.total_vector_len() {
            return Err(Error::InvalidArgument(format!(
                "power vectors have {} elements, the batch needs {} (sum of fan_in)",
                vectors.len(),
                self.layout.total_vector_len()
            )));
        }
        Ok(())
    }

    /// The fused pass over stored matrices: fills the partials and block sums of the active
    /// ones.
    fn pass_over<T: Element>(
        &mut self,
        matrices: &[&[T]],
        vectors: &[f32],
        active: &[bool],
    ) -> Result<()> {
        self.check(matrices, vectors)?;
        let rows = PlainRows::of_batch(&self.layout, matrices);
        fused_pass(
            self.path,
            &self.layout,
            &rows,
            active,
            vectors,
            &mut self.partials,
            &mut self.sums,
        );
        Ok(())
    }

    /// One fused iteration for every matrix (math §4.2): `vectors` is updated in place and the
    /// estimates are returned in batch order.
    pub fn fused<T: Element>(
        &mut self,
        matrices: &[&[T]],
        vectors: &mut [f32],
    ) -> Result<Vec<Estimate>> {
        // The all-true mask lives in `self`; it is lent out for the pass, which borrows `self`.
        let active = std::mem::take(&mut self.active);
        let pass = self.pass_over(matrices, vectors, &active);
        self.active = active;
        pass?;
        Ok(self.finish_all(vectors))
    }

    /// The finish of an iteration over every matrix, with the optimizer's decisions
    /// (math §4.4–4.6): a vector orthogonal to its matrix is re-seeded.
    fn finish_all(&mut self, vectors: &mut [f32]) -> Vec<Estimate> {
        finish(
            &self.layout,
            &PLAIN_FINISH,
            0,
            &self.active,
            &mut self.partials,
            &self.sums,
            vectors,
            &mut self.warm,
            &mut self.results,
        );
        self.results.iter().map(Estimate::of).collect()
    }

    /// `w = U^T (U v)` for every matrix marked `active`, into `products` (layout vector
    /// offsets), without normalising: the fused pass and the block-order sum of its partials.
    /// Returns each matrix's `sum of U^2` (0 for inactive ones).
    pub(crate) fn gram_product<T: Element>(
        &mut self,
        matrices: &[&[T]],
        vectors: &[f32],
        products: &mut [f32],
        active: &[bool],
    ) -> Result<Vec<f32>> {
        self.pass_over(matrices, vectors, active)?;
        let mut sums = vec![0.0f32; self.layout.len()];
        for (index, entry) in self.layout.matrices().iter().enumerate() {
            if !active[index] {
                continue;
            }
            self.layout.sum_block_partials(
                index,
                &self.partials,
                &mut products[entry.vector_range()],
            );
            sums[index] = self.sums[entry.block_range()]
                .iter()
                .fold(0.0f32, |total, s| total + s.sum_sq);
        }
        Ok(sums)
    }

    /// The same iteration as two full passes: `p = U v` for every matrix, then
    /// `w = U^T p`. Kept as the baseline the fused pass is measured against.
    pub fn two_pass<T: Element>(
        &mut self,
        matrices: &[&[T]],
        vectors: &mut [f32],
    ) -> Result<Vec<Estimate>> {
        self.check(matrices, vectors)?;
        let layout = &self.layout;
        let blocks = layout.blocks();
        if self.row_products.len() != layout.total_rows() {
            self.row_products = zeroed(layout.total_rows(), "row products")?;
        }
        let rows = PlainRows::of_batch(layout, matrices);
        let vectors_read: &[f32] = vectors;
        let path = self.path;
        // Pass 1: p = U v (and the per-block sums), over the whole batch.
        let block_products = layout.split_block_rows_mut(&mut self.row_products);
        blocks
            .par_iter()
            .zip(block_products)
            .zip(self.sums.par_iter_mut())
            .for_each(|((block, products), block_sums)| {
                let (rows, v) = (
                    &rows[block.matrix],
                    &vectors_read[layout.matrix(block.matrix).vector_range()],
                );
                *block_sums = on_path(
                    path,
                    RowProducts {
                        rows,
                        block,
                        v,
                        products,
                    },
                );
            });
        // Pass 2: w = U^T p, as per-block partials.
        let block_products = layout.split_block_rows_mut(&mut self.row_products);
        let block_partials = layout.split_block_partials_mut(&mut self.partials);
        blocks
            .par_iter()
            .zip(block_products)
            .zip(block_partials)
            .for_each(|((block, products), partial)| {
                let rows = &rows[block.matrix];
                on_path(
                    path,
                    TransposedProduct {
                        rows,
                        block,
                        products,
                        partial,
                    },
                );
            });
        Ok(self.finish_all(vectors))
    }
}

/// Two-matvec pass 1 over a block: `products[i] = <u_i, v>`.
struct RowProducts<'a, R> {
    rows: &'a R,
    block: &'a RowBlock,
    v: &'a [f32],
    products: &'a mut [f32],
}

impl<R: Rows> Kernel for RowProducts<'_, R> {
    type Output = BlockSums;
    #[inline(always)]
    fn run<const FMA: bool>(self) -> BlockSums {
        self.products::<FMA, false>()
    }
    #[inline(always)]
    fn run_avx512(self) -> BlockSums {
        self.products::<true, true>()
    }
}

impl<R: Rows> RowProducts<'_, R> {
    #[inline(always)]
    fn products<const FMA: bool, const WIDE: bool>(self) -> BlockSums {
        let mut buffer = [0.0f32; CHUNK];
        let mut sums = BlockSums::default();
        let rows = self.block.row_start..self.block.row_end;
        for (product, row) in self.products.iter_mut().zip(rows) {
            let row_sums = row_sums::<R, FMA, WIDE>(
                self.rows,
                row,
                self.v,
                &mut buffer,
                &mut Default::default(),
            );
            *product = row_sums.dot;
            sums.sum_sq += row_sums.sum_sq;
        }
        sums
    }
}

/// Two-matvec pass 2 over a block: `partial = Σ_i products[i] u_i`.
struct TransposedProduct<'a, R> {
    rows: &'a R,
    block: &'a RowBlock,
    products: &'a [f32],
    partial: &'a mut [f32],
}

impl<R: Rows> Kernel for TransposedProduct<'_, R> {
    type Output = ();
    #[inline(always)]
    fn run<const FMA: bool>(self) {
        self.product::<FMA, false>()
    }
    #[inline(always)]
    fn run_avx512(self) {
        self.product::<true, true>()
    }
}

impl<R: Rows> TransposedProduct<'_, R> {
    #[inline(always)]
    fn product<const FMA: bool, const WIDE: bool>(self) {
        // Row by row: the grouped form the fused pass uses on cached rows measured slower here,
        // where the rows stream from memory, and the baseline should be its own best.
        let mut buffer = [0.0f32; CHUNK];
        self.partial.fill(0.0);
        let rows = self.block.row_start..self.block.row_end;
        for (&product, row) in self.products.iter().zip(rows) {
            add_scaled_row::<R, FMA, WIDE>(self.rows, row, product, self.partial, &mut buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MomentumRule;
    use crate::cpu::rows::DirectionRows;
    use half::bf16;

    /// A stored matrix seen only through the generic row interface: no in-place `f32` view,
    /// no `bf16` shortcut, so every row is widened into a buffer chunk by chunk.
    struct Generic<'a, T>(PlainRows<'a, T>);

    impl<T: Element> Rows for Generic<'_, T> {
        const KEEP_TILE: bool = false;
        fn load<const FMA: bool>(&self, row: usize, col_start: usize, out: &mut [f32]) {
            self.0.load::<FMA>(row, col_start, out)
        }
    }

    /// The AVX2 path reads stored `f32` rows in place, widens stored `f16` rows in registers
    /// with F16C and stored `bf16` rows with shifts (sixteen at a time, in even-odd order, in
    /// the fused pass), the AVX-512 path all three sixteen per instruction in order; each
    /// must give the same bits as the buffered path, in the fused and the two-matvec forms
    /// alike, on rows with and without tails and on tiles with and without a remainder of rows.
    fn in_register_matches_the_buffered_path<T: Element>() {
        for path in [KernelPath::Avx2Fma, KernelPath::Avx512] {
            if path.is_supported() {
                in_register_matches_on::<T>(path);
            } else {
                eprintln!("NOT RUN: the in-register loops of {path:?} (this CPU lacks it)");
            }
        }
    }

    fn in_register_matches_on<T: Element>(path: KernelPath) {
        for (fan_out, fan_in) in [(45, 517), (70, 768), (9, 16), (40, 33), (5, 3072), (20, 1)] {
            let mut values = vec![0.0f32; fan_out * fan_in];
            crate::random::fill_gaussian(3, fan_in as u64, &mut values);
            let data: Vec<T> = values.iter().map(|&x| T::from_f32_rne(x)).collect();
            let mut v = vec![0.0f32; fan_in];
            crate::random::fill_unit_vector(3, 1, &mut v);
            let block = RowBlock {
                matrix: 0,
                row_start: 2,
                row_end: fan_out - 2,
                partial_offset: 0,
            };
            let rows = block.row_end - block.row_start;
            let stored = PlainRows {
                data: &data[..],
                fan_in,
            };
            let generic = Generic(PlainRows {
                data: &data[..],
                fan_in,
            });
            let fused = |rows: &dyn Fn(&mut [f32]) -> BlockSums| {
                let mut partial = vec![0.0f32; fan_in];
                let sums = rows(&mut partial);
                (
                    sums,
                    partial.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                )
            };
            let fast = fused(&|partial| {
                on_path(
                    path,
                    FusedBlock {
                        rows: &stored,
                        block: &block,
                        v: &v,
                        partial,
                        tile: &mut [],
                    },
                )
            });
            let slow = fused(&|partial| {
                on_path(
                    path,
                    FusedBlock {
                        rows: &generic,
                        block: &block,
                        v: &v,
                        partial,
                        tile: &mut [],
                    },
                )
            });
            let shape = format!("{path:?} {} {fan_out}x{fan_in}", T::DTYPE.name());
            assert_eq!(fast, slow, "fused, {shape}");
            let mut products = vec![0.0f32; rows];
            let fast_sums = on_path(
                path,
                RowProducts {
                    rows: &stored,
                    block: &block,
                    v: &v,
                    products: &mut products,
                },
            );
            let mut generic_products = vec![0.0f32; rows];
            let slow_sums = on_path(
                path,
                RowProducts {
                    rows: &generic,
                    block: &block,
                    v: &v,
                    products: &mut generic_products,
                },
            );
            assert_eq!(
                (fast_sums, &products),
                (slow_sums, &generic_products),
                "{shape}"
            );
            let (mut fast_w, mut slow_w) = (vec![0.0f32; fan_in], vec![0.0f32; fan_in]);
            on_path(
                path,
                TransposedProduct {
                    rows: &stored,
                    block: &block,
                    products: &products,
                    partial: &mut fast_w,
                },
            );
            on_path(
                path,
                TransposedProduct {
                    rows: &generic,
                    block: &block,
                    products: &products,
                    partial: &mut slow_w,
                },
            );
            assert_eq!(fast_w, slow_w, "{shape}");
            assert_eq!(
                fast.1,
                fast_w.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "fused and two-matvec differ, {shape}"
            );
            assert!(fast_w.iter().any(|&x| x != 0.0), "{shape}");
        }
    }

    #[test]
    fn f32_in_place_rows_match_the_buffered_path() {
        in_register_matches_the_buffered_path::<f32>();
    }

    #[test]
    fn bf16_in_register_widening_matches_the_buffered_path() {
        in_register_matches_the_buffered_path::<bf16>();
    }

    #[test]
    fn f16_in_register_widening_matches_the_buffered_path() {
        in_register_matches_the_buffered_path::<half::f16>();
    }

    /// `f16` gradients widened eight at a time by F16C give the step's directions bit for bit
    /// as the per-element form: every one of the 65536 `f16` values, in chunks that start off
    /// the eight-element grid and end in a tail, both momentum rules.
    #[test]
    fn f16_gradients_widened_in_registers_give_the_per_element_directions() {
        struct Load<'a> {
            rows: &'a DirectionRows<'a, half::f16>,
            row: usize,
            col_start: usize,
            out: &'a mut [f32],
        }
        impl Kernel for Load<'_> {
            type Output = ();
            #[inline(always)]
            fn run<const FMA: bool>(self) {
                self.rows.load::<FMA>(self.row, self.col_start, self.out)
            }
        }
        if !KernelPath::Avx2Fma.is_supported() {
            eprintln!("NOT RUN: F16C widening of gradients (the CPU lacks AVX2, FMA or F16C)");
            return;
        }
        let fan_in = 256;
        let grads: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        let mut momentum = vec![0.0f32; grads.len()];
        crate::random::fill_gaussian(5, 0, &mut momentum);
        for nesterov in [false, true] {
            let rule = MomentumRule {
                beta: 0.9,
                grad_coef: 0.5,
                nesterov,
            };
            let rows = DirectionRows {
                grads: &grads[..],
                momentum: &momentum,
                fan_in,
                rule,
            };
            let col_start = 3;
            for row in 0..grads.len() / fan_in {
                let mut out = vec![0.0f32; fan_in - col_start - 2];
                let len = out.len();
                on_path(
                    KernelPath::Avx2Fma,
                    Load {
                        rows: &rows,
                        row,
                        col_start,
                        out: &mut out,
                    },
                );
                let start = row * fan_in + col_start;
                for (offset, &got) in out.iter().enumerate() {
                    let index = start + offset;
                    let grad = Element::to_f32(grads[index]);
                    let (_, expected) = if nesterov {
                        rule.apply::<true, true>(momentum[index], grad)
                    } else {
                        rule.apply::<false, true>(momentum[index], grad)
                    };
                    // A NaN gradient gives a NaN direction; its payload comes from whichever
                    // `fma` computed it (the expected side may be the C library's).
                    let same =
                        got.to_bits() == expected.to_bits() || (got.is_nan() && expected.is_nan());
                    assert!(
                        same,
                        "f16 bits {:#06x}, nesterov {nesterov}, {len} elements: {got} vs {expected}",
                        grads[index].to_bits()
                    );
                }
            }
        }
    }

    /// Keeping the tile between the sweeps is a memory-traffic choice only: both forms must
    /// give the same bits, on every kernel path.
    #[test]
    fn kept_tile_and_recomputed_tile_agree_bit_for_bit() {
        let (fan_out, fan_in) = (70, 301);
        let mut grads = vec![0.0f32; fan_out * fan_in];
        let mut momentum = vec![0.0f32; fan_out * fan_in];
        let mut v = vec![0.0f32; fan_in];
        crate::random::fill_gaussian(1, 0, &mut grads);
        crate::random::fill_gaussian(1, 1, &mut momentum);
        crate::random::fill_unit_vector(1, 2, &mut v);
        let block = RowBlock {
            matrix: 0,
            row_start: 3,
            row_end: 67,
            partial_offset: 0,
        };
        for nesterov in [false, true] {
            let rows = DirectionRows {
                grads: &grads[..],
                momentum: &momentum,
                fan_in,
                rule: MomentumRule {
                    beta: 0.9,
                    grad_coef: 1.0,
                    nesterov,
                },
            };
            for path in [
                KernelPath::Portable,
                KernelPath::Avx2Fma,
                KernelPath::Avx512,
            ] {
                if !path.is_supported() {
                    eprintln!("NOT RUN: kept and recomputed tiles on {path:?} (this CPU lacks it)");
                    continue;
                }
                let mut kept = vec![0.0f32; fan_in];
                let mut tile = vec![0.0f32; CACHE_TILE_ELEMENTS];
                let kept_sums = on_path(
                    path,
                    FusedBlock {
                        rows: &rows,
                        block: &block,
                        v: &v,
                        partial: &mut kept,
                        tile: &mut tile,
                    },
                );
                let mut recomputed = vec![0.0f32; fan_in];
                let recomputed_sums = on_path(
                    path,
                    FusedBlock {
                        rows: &rows,
                        block: &block,
                        v: &v,
                        partial: &mut recomputed,
                        tile: &mut [],
                    },
                );
                assert_eq!(kept_sums, recomputed_sums, "{path:?}");
                assert_eq!(
                    kept.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    recomputed.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "{path:?} nesterov={nesterov}"
                );
                assert!(kept.iter().any(|&x| x != 0.0));
            }
        }
    }
}
