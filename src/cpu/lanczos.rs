//! Cold-start spectral norms by block Lanczos on `U^T U`, built on the block fused pass.
//!
//! Power iteration converges at the rate `(σ2/σ1)^2` per pass, which is slow when the top
//! singular values crowd together (a Gaussian `n x n` matrix needs on the order of 170 passes
//! for `1e-3` at `n = 2048`). Lanczos builds the Krylov space `{V, A V, A^2 V, ...}` of
//! `A = U^T U` and takes the largest eigenvalue of `A` restricted to it, which converges
//! roughly at the square root of that rate (Kaniel-Paige). A block of up to
//! [`MAX_LANCZOS_BLOCK`] vectors per pass (math §4.9) still reads `U` once per pass, and
//! resolves clusters of up to that many top singular values, where a one-vector Krylov space
//! settles inside the cluster and its error estimate is fooled (math §4.9.1). On a CPU the
//! four-vector pass costs two to three one-vector passes (the core, not the read, bounds it;
//! math §4.9.2), so one vector stays available as the fast path.
//!
//! Per iteration `k` (one block pass for the whole batch; `Q_k` the block's orthonormal
//! columns, `Q` all columns so far):
//!
//! ```text
//! W = A Q_k;  H_kk = sym(Q_k^T W);  W -= Q (Q^T W) (twice)
//! Q_{k+1} R_k = W  (Gram-Schmidt, twice; columns that vanish are dropped);  H_{k+1,k} = R_k
//! ```
//!
//! `H = Q^T A Q` is then a symmetric band matrix (half-bandwidth the block size). The
//! estimate is `σ = sqrt(θ)`, `θ` the largest eigenvalue of `H`, and the run stops when the
//! residual `r = |W y_k|` of its Ritz pair (`y_k` the block-`k` part of the eigenvector),
//! tightened by Kato-Temple with the gap from θ to `θ2 + r2` (the second Ritz value plus its
//! residual), falls below `2 tolerance θ`.

use super::band_eigen::SymmetricBand;
use super::block_pass::{BLOCK_VECTORS, BlockProducts, block_pass};
use super::power::{BatchPowerIteration, Estimate};
use super::rows::PlainRows;
use crate::config::MAX_POWER_ITERATIONS;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::memory::{with_capacity, zeroed};

/// The outcome of a Lanczos run for one matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LanczosEstimate {
    /// The estimate: `Sigma` (a lower bound on `||U||_*`, within the tolerance when
    /// `converged` and the Krylov space has found the top of the spectrum: math §4.9.1 for
    /// when it has not), `Zero`, or `NonFinite`.
    pub estimate: Estimate,
    /// Fused passes this matrix took part in.
    pub iterations: u32,
    /// Whether the error estimate met the tolerance (or the Krylov space was exhausted).
    pub converged: bool,
}

/// Per-matrix block Lanczos state.
struct Krylov {
    /// Orthonormal columns `Q`, in order.
    basis: Vec<Vec<f64>>,
    /// The columns whose products the next pass computes (the last block of `basis`).
    block: std::ops::Range<usize>,
    /// `H = Q^T A Q` over `basis` (the last block's diagonal block is filled by the next pass).
    projection: SymmetricBand,
    result: Option<LanczosEstimate>,
}

impl BatchPowerIteration {
    /// `||U||_*` of every matrix to relative `tolerance`, from a seeded cold start, by block
    /// Lanczos on `U^T U` with `block_vectors` vectors per block (see the module docs). Each
    /// iteration is one fused pass over the matrices still running; at most `max_iterations`
    /// passes, which must lie between 1 and [`MAX_POWER_ITERATIONS`] (the Krylov basis keeps
    /// `block_vectors` `f64` vectors per pass, so the bound also bounds memory:
    /// `8 * block_vectors * fan_in` bytes per pass and matrix).
    ///
    /// `block_vectors` lies between 1 and [`MAX_LANCZOS_BLOCK`]. One vector runs the
    /// one-vector fused pass, the fastest per pass, but its stopping rule is fooled by a
    /// cluster of top singular values a few times the tolerance wide, and now and then by a
    /// start vector with little weight on the top singular vector, where the space settles
    /// on `σ2` first (math §4.9.1: on Gaussian matrices at `1e-3`, 3 of 120 runs above the
    /// tolerance). A block of four resolves clusters of up to four values (and in practice
    /// wider ones), met the tolerance in every such run, and needs fewer passes, each doing
    /// about three times the arithmetic; two or three vectors run the same four-vector pass.
    ///
    /// ```
    /// use spectral_step::{BatchLayout, BlockPolicy, MatrixShape};
    /// use spectral_step::cpu::{BatchPowerIteration, Estimate};
    ///
    /// // diag(3, 2.9, 1) in a 3x4 matrix: close top singular values, still few passes.
    /// let a = [3.0f32, 0.0, 0.0, 0.0, 0.0, 2.9, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0];
    /// let layout = BatchLayout::new(&[MatrixShape::new(3, 4)], BlockPolicy::CPU)?;
    /// let mut power = BatchPowerIteration::new(layout)?;
    /// for block_vectors in [1, 4] {
    ///     let result = power.lanczos(&[&a[..]], 7, 1e-4, 50, block_vectors)?;
    ///     let Estimate::Sigma(sigma) = result[0].estimate else { panic!() };
    ///     assert!((sigma - 3.0).abs() < 3e-4 && result[0].iterations <= 4);
    /// }
    /// # Ok::<(), spectral_step::Error>(())
    /// ```
    pub fn lanczos<T: Element>(
        &mut self,
        matrices: &[&[T]],
        seed: u64,
        tolerance: f64,
        max_iterations: u32,
        block_vectors: usize,
    ) -> Result<Vec<LanczosEstimate>> {
        check_lanczos_settings(tolerance, max_iterations, block_vectors)?;
        let layout = self.layout().clone();
        layout.check_lengths("input", matrices.iter().map(|m| m.len()))?;
        let start = self.cold_vectors(seed)?;
        let mut vectors: [Vec<f32>; BLOCK_VECTORS] = [
            zeroed(start.len(), "Lanczos vectors")?,
            zeroed(start.len(), "Lanczos vectors")?,
            zeroed(start.len(), "Lanczos vectors")?,
            zeroed(start.len(), "Lanczos vectors")?,
        ];
        let mut scratch = Scratch::new(&layout, block_vectors)?;
        let mut states: Vec<Krylov> = Vec::with_capacity(layout.len());
        for (index, entry) in layout.matrices().iter().enumerate() {
            let cold = &start[entry.vector_range()];
            let state = Krylov::start(cold, block_vectors, seed, index as u64);
            state.write_block(&mut vectors, entry.vector_range());
            states.push(state);
        }
        let mut active = vec![true; layout.len()];
        for iteration in 1..=max_iterations {
            let sums = self.block_product(matrices, &vectors, &mut scratch, &active)?;
            for (index, entry) in layout.matrices().iter().enumerate() {
                if !active[index] {
                    continue;
                }
                let state = &mut states[index];
                let products = scratch.products(&layout, index, state.block.len());
                let non_finite =
                    !sums[index].is_finite() || products.iter().flatten().any(|x| !x.is_finite());
                let outcome = if non_finite {
                    Some((Estimate::NonFinite, true))
                } else if sums[index] == 0.0 {
                    Some((Estimate::Zero, true))
                } else {
                    state.extend(products, tolerance, iteration == max_iterations)?
                };
                match outcome {
                    Some((estimate, converged)) => {
                        state.result = Some(LanczosEstimate {
                            estimate,
                            iterations: iteration,
                            converged,
                        });
                        active[index] = false;
                    }
                    None => state.write_block(&mut vectors, entry.vector_range()),
                }
            }
            if !active.contains(&true) {
                break;
            }
        }
        Ok(states
            .into_iter()
            .map(|state| {
                state
                    .result
                    .expect("every matrix ends with a result at max_iterations")
            })
            .collect())
    }

    /// `W = U^T U V` for every active matrix into `scratch`: the one-vector fused pass for a
    /// block of one, the four-vector pass otherwise. Returns each matrix's sum of squares.
    fn block_product<T: Element>(
        &mut self,
        matrices: &[&[T]],
        vectors: &[Vec<f32>; BLOCK_VECTORS],
        scratch: &mut Scratch,
        active: &[bool],
    ) -> Result<Vec<f32>> {
        let layout = self.layout().clone();
        match scratch {
            Scratch::One { products } => self.gram_product(matrices, &vectors[0], products, active),
            Scratch::Four { partials, sums } => {
                let rows = PlainRows::of_batch(&layout, matrices);
                block_pass(
                    self.kernel_path(),
                    &layout,
                    &rows,
                    active,
                    BlockProducts {
                        vectors,
                        partials,
                        sums,
                    },
                );
                Ok(layout
                    .matrices()
                    .iter()
                    .map(|entry| {
                        entry
                            .block_range()
                            .fold(0.0f32, |total, block| total + sums[block])
                    })
                    .collect())
            }
        }
    }
}

/// The largest block [`BatchPowerIteration::lanczos`] takes: the width of the block pass.
pub const MAX_LANCZOS_BLOCK: usize = BLOCK_VECTORS;

/// [`BatchPowerIteration::lanczos`]'s settings: a finite positive tolerance, 1 to
/// [`MAX_POWER_ITERATIONS`] passes, 1 to [`MAX_LANCZOS_BLOCK`] vectors per block.
pub(crate) fn check_lanczos_settings(
    tolerance: f64,
    max_iterations: u32,
    block_vectors: usize,
) -> Result<()> {
    let usable = tolerance.is_finite()
        && tolerance > 0.0
        && (1..=MAX_POWER_ITERATIONS).contains(&max_iterations)
        && (1..=MAX_LANCZOS_BLOCK).contains(&block_vectors);
    if usable {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "Lanczos needs a positive tolerance, between 1 and {MAX_POWER_ITERATIONS} \
             iterations and between 1 and {MAX_LANCZOS_BLOCK} vectors per block, got \
             {tolerance}, {max_iterations} and {block_vectors}"
        )))
    }
}

/// Where a Lanczos pass leaves its products.
enum Scratch {
    /// The one-vector pass: `w` of every matrix at the layout's vector offsets.
    One { products: Vec<f32> },
    /// The four-vector pass: every vector's block partials, and every block's sum of squares.
    Four {
        partials: [Vec<f32>; BLOCK_VECTORS],
        sums: Vec<f32>,
    },
}

impl Scratch {
    fn new(layout: &crate::layout::BatchLayout, block_vectors: usize) -> Result<Self> {
        if block_vectors == 1 {
            return Ok(Scratch::One {
                products: zeroed(layout.total_vector_len(), "Lanczos products")?,
            });
        }
        let partial_len = layout.total_partial_len();
        Ok(Scratch::Four {
            partials: [
                zeroed(partial_len, "Lanczos partials")?,
                zeroed(partial_len, "Lanczos partials")?,
                zeroed(partial_len, "Lanczos partials")?,
                zeroed(partial_len, "Lanczos partials")?,
            ],
            sums: zeroed(layout.blocks().len(), "Lanczos block sums")?,
        })
    }

    /// Matrix `index`'s first `width` products `A q_j`, widened to `f64` (the four-vector
    /// pass's block partials summed in block order, in `f32`, as the one-vector pass sums its
    /// own).
    fn products(
        &self,
        layout: &crate::layout::BatchLayout,
        index: usize,
        width: usize,
    ) -> Vec<Vec<f64>> {
        let entry = layout.matrix(index);
        match self {
            Scratch::One { products } => vec![
                products[entry.vector_range()]
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect(),
            ],
            Scratch::Four { partials, .. } => partials[..width]
                .iter()
                .map(|partial| {
                    let mut product = vec![0.0f32; entry.shape.fan_in];
                    layout.sum_block_partials(index, partial, &mut product);
                    product.into_iter().map(f64::from).collect()
                })
                .collect(),
        }
    }
}

impl Krylov {
    /// The first block: the cold vector (math §4.8) and up to `block_vectors - 1` further
    /// Gaussian vectors drawn after it from the same stream, orthonormalised in `f64`.
    fn start(cold: &[f32], block_vectors: usize, seed: u64, stream: u64) -> Self {
        let fan_in = cold.len();
        let width = block_vectors.min(fan_in);
        let mut draws = vec![0.0f32; width * fan_in];
        crate::random::fill_gaussian(seed, stream, &mut draws);
        let mut basis = vec![cold.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>()];
        for draw in draws.chunks_exact(fan_in).skip(1) {
            let mut column: Vec<f64> = draw.iter().map(|&x| f64::from(x)).collect();
            let norm = orthogonalise(&mut column, &basis);
            if norm > 0.0 {
                column.iter_mut().for_each(|x| *x /= norm);
                basis.push(column);
            }
        }
        // Block k + 1 couples to block k through the triangular R_k only, so H's entries
        // lie within `block_vectors` of the diagonal.
        let mut projection = SymmetricBand::new(block_vectors);
        for _ in 0..basis.len() {
            projection.push_row(&vec![0.0; block_vectors + 1]);
        }
        Self {
            block: 0..basis.len(),
            basis,
            projection,
            result: None,
        }
    }

    /// Writes the block's columns, rounded to `f32`, into the pass's vectors (zeros past the
    /// block's width).
    fn write_block(&self, vectors: &mut [Vec<f32>; BLOCK_VECTORS], range: std::ops::Range<usize>) {
        for (slot, vector) in vectors.iter_mut().enumerate() {
            let out = &mut vector[range.clone()];
            match self.basis.get(self.block.start + slot) {
                Some(column) if slot < self.block.len() => {
                    out.iter_mut().zip(column).for_each(|(x, &q)| *x = q as f32)
                }
                _ => out.fill(0.0),
            }
        }
    }

    /// Adds `W = A Q_k` (one product per column of the block) to the recurrence. Returns the
    /// final estimate when done, `None` when the next block was appended to the basis, or an
    /// error when the basis cannot grow (it is the one allocation that grows with the passes).
    fn extend(
        &mut self,
        mut products: Vec<Vec<f64>>,
        tolerance: f64,
        last: bool,
    ) -> Result<Option<(Estimate, bool)>> {
        let block = self.block.clone();
        // H_kk = Q_k^T W, symmetrised (it is symmetric up to the rounding of W).
        for (a, row) in block.clone().enumerate() {
            for (b, column) in block.clone().enumerate().take(a + 1) {
                let entry = 0.5
                    * (dot(&self.basis[row], &products[b])
                        + dot(&self.basis[column], &products[a]));
                self.projection.set(row, column, entry);
            }
        }
        // Full re-orthogonalisation against every column so far, twice ("twice is enough"),
        // also performs the block recurrence's subtractions.
        orthogonalise_block(&mut products, &self.basis);
        let (theta, second) = self.projection.top_two();
        let ritz_vector = self.projection.top_vector(theta);
        let residual = ritz_residual(&products, &ritz_vector[block.clone()]);
        let sigma = theta.max(0.0).sqrt() as f32;
        // θ is within r of an eigenvalue of A, and within r^2 / (θ - α) of λ1 when every other
        // eigenvalue is at most α < θ (Kato-Temple). α = θ2 + r2, the second Ritz value plus
        // its own residual: an eigenvalue lies within r2 of θ2, and the space is taken to
        // have found λ2 there (math §4.9.1). θ2 alone is a lower bound on λ2 (interlacing),
        // not the upper bound the theorem needs: with it, one vector stopped on Gaussian
        // matrices with θ still short of λ1 by more than the tolerance. Not on the first pass,
        // where the start block is a random subspace and nothing has found λ2.
        let ceiling = if block.start > 0 {
            self.projection
                .second_vector(second, &ritz_vector)
                .map_or(f64::NAN, |vector| {
                    second + ritz_residual(&products, &vector[block.clone()])
                })
        } else {
            f64::NAN
        };
        let gap = theta - ceiling;
        let bound = if gap.is_finite() && gap > 0.0 {
            residual.min(residual * residual / gap)
        } else {
            residual
        };
        let next = self.next_block(products, theta)?;
        let exhausted = next.is_empty();
        let converged = exhausted || bound <= 2.0 * tolerance * theta;
        if converged || last {
            return Ok(Some((Estimate::Sigma(sigma), converged)));
        }
        let first = self.basis.len();
        for (r, (column, couplings)) in next.into_iter().enumerate() {
            let row = first + r;
            let width = self.projection.width();
            let mut lower = vec![0.0f64; width + 1];
            for (c, coupling) in couplings.into_iter().enumerate() {
                let distance = row - (block.start + c);
                if distance <= width {
                    lower[distance] = coupling;
                }
            }
            self.projection.push_row(&lower);
            self.basis.push(column);
        }
        self.block = first..self.basis.len();
        Ok(None)
    }

    /// The next block `Q_{k+1}` from the re-orthogonalised products by Gram-Schmidt (twice),
    /// each new column with its couplings `<q_new, w_c>` to every product (`R_k`). A column
    /// whose remainder is at most `1e-12 θ` adds nothing to the Krylov space and is dropped;
    /// so is any past the dimension `fan_in`. Empty when the space is exhausted. (The `f32`
    /// products leave a remainder of rounding noise, about `1e-7 θ`, where the exact one is
    /// zero, so the threshold drops exact zeros only; a noise column is kept, and its
    /// couplings to `H` are of the size of that rounding.)
    fn next_block(&self, products: Vec<Vec<f64>>, theta: f64) -> Result<Vec<(Vec<f64>, Vec<f64>)>> {
        let room = products[0].len() - self.basis.len().min(products[0].len());
        let threshold = 1e-12 * theta.abs().max(f64::MIN_POSITIVE);
        let mut columns: Vec<Vec<f64>> = Vec::new();
        for product in &products {
            if columns.len() == room {
                break;
            }
            let mut column = with_capacity(product.len(), "the Lanczos basis")?;
            column.extend_from_slice(product);
            let norm = orthogonalise(&mut column, &columns);
            if norm > threshold {
                column.iter_mut().for_each(|x| *x /= norm);
                columns.push(column);
            }
        }
        Ok(columns
            .into_iter()
            .map(|column| {
                let couplings = products.iter().map(|w| dot(&column, w)).collect();
                (column, couplings)
            })
            .collect())
    }
}

/// `|W y_k|`, the norm of the residual `A Q y - θ Q y` of a Ritz pair `(Q y, θ)` of the
/// re-orthogonalised products `W` (`weights` the block-`k` part of `y`).
fn ritz_residual(products: &[Vec<f64>], weights: &[f64]) -> f64 {
    let mut residual = vec![0.0f64; products[0].len()];
    for (product, &weight) in products.iter().zip(weights) {
        residual
            .iter_mut()
            .zip(product)
            .for_each(|(r, &w)| *r += weight * w);
    }
    dot(&residual, &residual).sqrt()
}

/// Removes from `vector` its components along the orthonormal `basis`, sweeping twice
/// ("twice is enough"); returns the remainder's norm.
fn orthogonalise(vector: &mut [f64], basis: &[Vec<f64>]) -> f64 {
    for _ in 0..2 {
        for column in basis {
            let coefficient = dot(column, vector);
            vector
                .iter_mut()
                .zip(column)
                .for_each(|(x, &q)| *x -= coefficient * q);
        }
    }
    dot(vector, vector).sqrt()
}

/// [`orthogonalise`] for every vector. The vectors are independent, so they run in parallel
/// (the basis, a few MiB after a few dozen passes, is shared from L3); each vector's
/// arithmetic and its order are the same on any thread count.
fn orthogonalise_block(vectors: &mut [Vec<f64>], basis: &[Vec<f64>]) {
    use rayon::prelude::*;
    vectors.par_iter_mut().for_each(|vector| {
        orthogonalise(vector, basis);
    });
}

/// `<a, b>` in `f64` with eight independent partial sums (element `i` into sum `i % 8`,
/// combined in a fixed tree): vectorised and free of one long chain of dependent adds, and
/// the same bits on every run.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let (a_lanes, a_tail) = a.as_chunks::<8>();
    let (b_lanes, b_tail) = b.as_chunks::<8>();
    let mut sums = [0.0f64; 8];
    for (x, y) in a_lanes.iter().zip(b_lanes) {
        for lane in 0..8 {
            sums[lane] += x[lane] * y[lane];
        }
    }
    for (lane, (x, y)) in a_tail.iter().zip(b_tail).enumerate() {
        sums[lane] += x * y;
    }
    let [s0, s1, s2, s3, s4, s5, s6, s7] = sums;
    ((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7))
}
