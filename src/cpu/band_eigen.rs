//! The two largest eigenvalues and their eigenvectors of the symmetric band matrix that block
//! Lanczos builds: bisection on inertia counts, then shifted inverse iteration, each in
//! O(order * width^2) time and O(order * width) memory.

/// Bound on bisection steps per eigenvalue: about 60 reach f64 resolution, the rest only keeps
/// non-finite input from looping forever.
const MAX_BISECTION_STEPS: usize = 200;
/// Inverse iteration steps in `top_vector` and `second_vector`.
const INVERSE_ITERATIONS: usize = 3;
/// Shifts `top_vector` tries before it gives up; 1e-10 * 16^11 exceeds the Gershgorin width.
const SHIFT_ATTEMPTS: usize = 12;
/// Growth of the shift offset between attempts.
const SHIFT_GROWTH: f64 = 16.0;

/// A symmetric band matrix: entry (i, j) is zero when |i - j| > width. Stores the lower band
/// row by row: `lower[i * (width + 1) + d]` is entry (i, i - d).
#[derive(Clone, Debug)]
pub(crate) struct SymmetricBand {
    width: usize,
    order: usize,
    lower: Vec<f64>,
}

impl SymmetricBand {
    /// An empty matrix (order 0) of half-bandwidth `width`.
    pub(crate) fn new(width: usize) -> Self {
        Self {
            width,
            order: 0,
            lower: Vec::new(),
        }
    }

    /// Number of rows (and columns).
    #[cfg(test)]
    pub(crate) fn order(&self) -> usize {
        self.order
    }

    /// Half-bandwidth.
    pub(crate) fn width(&self) -> usize {
        self.width
    }

    /// Appends row/column `order`: `lower_row[d]` is entry (order, order - d), d = 0..=width;
    /// entries with d > order are ignored. Length must be width + 1 (debug_assert).
    pub(crate) fn push_row(&mut self, lower_row: &[f64]) {
        debug_assert_eq!(lower_row.len(), self.width + 1);
        let row = self.order;
        self.lower
            .extend((0..=self.width).map(|offset| match lower_row.get(offset) {
                Some(&entry) if offset <= row => entry,
                _ => 0.0,
            }));
        self.order += 1;
    }

    /// Position of entry (i, j) in `lower`, `None` outside the band.
    fn position(&self, i: usize, j: usize) -> Option<usize> {
        let (row, column) = (i.max(j), i.min(j));
        (row - column <= self.width).then(|| row * (self.width + 1) + row - column)
    }

    /// Entry (i, j), symmetric, zero outside the band.
    #[cfg(test)]
    pub(crate) fn get(&self, i: usize, j: usize) -> f64 {
        debug_assert!(i < self.order && j < self.order);
        self.position(i, j)
            .map_or(0.0, |position| self.lower[position])
    }

    /// Sets entry (i, j) (and (j, i)); debug_assert that it lies in the band and i, j < order.
    /// Release builds ignore an entry outside the band.
    pub(crate) fn set(&mut self, i: usize, j: usize, value: f64) {
        debug_assert!(i < self.order && j < self.order);
        let position = self.position(i, j);
        debug_assert!(position.is_some(), "entry ({i}, {j}) lies outside the band");
        if let Some(position) = position {
            self.lower[position] = value;
        }
    }

    /// The Gershgorin interval `(low, high)`, which holds every eigenvalue.
    fn gershgorin(&self) -> (f64, f64) {
        let stride = self.width + 1;
        let mut radius = vec![0.0; self.order];
        for (row, entries) in self.lower.chunks_exact(stride).enumerate() {
            for (offset, entry) in entries.iter().enumerate().skip(1).take(row) {
                radius[row] += entry.abs();
                radius[row - offset] += entry.abs();
            }
        }
        let rows = self.lower.chunks_exact(stride).zip(&radius);
        rows.fold(
            (f64::INFINITY, f64::NEG_INFINITY),
            |(low, high), (entries, radius)| {
                (low.min(entries[0] - radius), high.max(entries[0] + radius))
            },
        )
    }

    /// How many eigenvalues exceed `x`: the number of positive pivots of the LDL^T
    /// factorisation of `H - x I` (Sylvester's law of inertia), band elimination without
    /// pivoting; a pivot that comes out exactly zero (or underflows) is replaced by a tiny
    /// negative number, as in the tridiagonal Sturm count.
    #[cfg(test)]
    pub(crate) fn count_above(&self, x: f64) -> usize {
        let (low, high) = self.gershgorin();
        self.count_above_with(x, pivot_floor(low.abs().max(high.abs())))
    }

    /// `count_above` with pivots smaller than `floor` in magnitude replaced by `-floor`. Without
    /// pivoting this is stable where `top_two` converges: for `x` above the top eigenvalue of
    /// every leading block (Cauchy interlacing), `H - x I` is negative definite.
    fn count_above_with(&self, x: f64, floor: f64) -> usize {
        let stride = self.width + 1;
        // Rows step..=step+width of the Schur complement in a ring of `stride` slots, entry
        // (i, i - d) at offset d of its slot; elimination never reaches further down.
        let mut ring = vec![0.0; stride * stride];
        let load = |ring: &mut [f64], row: usize| {
            let slot = &mut ring[(row % stride) * stride..][..stride];
            slot.copy_from_slice(&self.lower[row * stride..][..stride]);
            slot[0] -= x;
        };
        (0..self.order.min(stride)).for_each(|row| load(&mut ring, row));
        // starts[t]: where row step + t begins in the ring.
        let mut starts: Vec<usize> = (0..stride).map(|slot| slot * stride).collect();
        let mut column = vec![0.0; self.width];
        let mut positive = 0;
        for step in 0..self.order {
            let mut pivot = ring[starts[0]];
            if pivot.abs() < floor {
                pivot = -floor;
            }
            if pivot > 0.0 {
                positive += 1;
            }
            let column = &mut column[..self.width.min(self.order - 1 - step)];
            for (below, entry) in column.iter_mut().enumerate() {
                *entry = ring[starts[below + 1] + below + 1];
            }
            // Schur complement: entry (step + 1 + r, step + 1 + c) -= l_r * l_c / pivot.
            let reciprocal = 1.0 / pivot;
            for (row, &row_entry) in column.iter().enumerate() {
                let multiplier = row_entry * reciprocal;
                let targets = &mut ring[starts[row + 1]..][..=row];
                for (target, &column_entry) in targets.iter_mut().rev().zip(&column[..=row]) {
                    *target -= multiplier * column_entry;
                }
            }
            if step + stride < self.order {
                load(&mut ring, step + stride);
            }
            starts.rotate_left(1);
        }
        positive
    }

    /// The two largest eigenvalues by bisection on `count_above` inside the Gershgorin
    /// interval, each bracketed to 4 f64 ulps of the interval's magnitude (rounding in the
    /// counts adds a few more); `theta2` is `f64::NEG_INFINITY` when the order is 1, both are
    /// when it is 0. The largest is exact for order 1.
    pub(crate) fn top_two(&self) -> (f64, f64) {
        match self.order {
            0 => return (f64::NEG_INFINITY, f64::NEG_INFINITY),
            1 => return (self.lower[0], f64::NEG_INFINITY),
            _ => {}
        }
        let (low, high) = self.gershgorin();
        let magnitude = low.abs().max(high.abs());
        let floor = pivot_floor(magnitude);
        // Counts at the interval's ends may be off by rounding of order eps * order * magnitude,
        // so widen it as LAPACK's dstebz does.
        let margin = 2.0 * f64::EPSILON * magnitude * (self.order + self.width) as f64;
        let tolerance = 4.0 * f64::EPSILON * magnitude;
        // brackets[rank] = (below, above) with count_above(below) > rank >= count_above(above);
        // every count narrows both brackets.
        let mut brackets = [(low - margin - 2.0 * floor, high + margin + 2.0 * floor); 2];
        for rank in [0, 1] {
            for _ in 0..MAX_BISECTION_STEPS {
                let (below, above) = brackets[rank];
                let middle = 0.5 * below + 0.5 * above;
                if above - below <= tolerance || middle <= below || middle >= above {
                    break;
                }
                let count = self.count_above_with(middle, floor);
                for (rank, bracket) in brackets.iter_mut().enumerate() {
                    if count > rank {
                        bracket.0 = bracket.0.max(middle);
                    } else {
                        bracket.1 = bracket.1.min(middle);
                    }
                }
            }
        }
        let [first, second] = brackets.map(|(below, above)| 0.5 * below + 0.5 * above);
        (first, second)
    }

    /// A unit eigenvector of the largest eigenvalue `theta1` (from `top_two`): inverse iteration
    /// with `(s I - H)`, `s = theta1 + max(1e-10 * scale, f64::MIN_POSITIVE)` where `scale` is
    /// the Gershgorin magnitude, so `s I - H` is positive definite and its band Cholesky is
    /// stable; 3 iterations from a fixed start, deterministic. If the Cholesky fails, the offset
    /// grows 16-fold, up to 12 tries; if all fail (theta1 NaN or far below the spectrum), the
    /// normalised start vector comes back. Empty for order 0.
    pub(crate) fn top_vector(&self, theta1: f64) -> Vec<f64> {
        // A Weyl sequence around 1: not orthogonal by symmetry to any eigenvector.
        let mut start: Vec<f64> = (1..=self.order)
            .map(|index| 0.5 + (index as f64 * 0.618_033_988_749_894_8).fract())
            .collect();
        if normalise(&mut start).is_none() {
            return start;
        }
        let (low, high) = self.gershgorin();
        let mut offset = (1e-10 * low.abs().max(high.abs())).max(f64::MIN_POSITIVE);
        for _ in 0..SHIFT_ATTEMPTS {
            if let Some(vector) = self.inverse_iteration(theta1 + offset, &start) {
                return vector;
            }
            offset *= SHIFT_GROWTH;
        }
        start
    }

    /// A unit eigenvector of the second largest eigenvalue `theta2` (from `top_two`), orthogonal
    /// to `top` (from `top_vector`): inverse iteration with `s I - H`, `s = theta2 + 1e-10 scale`
    /// (`scale` the Gershgorin magnitude). `s I - H` is indefinite there, so it is factored by
    /// band LU with partial pivoting (`L` keeps `width` sub-diagonals, `U` gains up to `2 width`
    /// super-diagonals); each iterate is made orthogonal to `top`, so a repeated top eigenvalue
    /// gives the other vector of its eigenspace. 3 iterations from a fixed start,
    /// deterministic. `None` when the order is below 2, `theta2` is not finite, or a solve
    /// overflows.
    pub(crate) fn second_vector(&self, theta2: f64, top: &[f64]) -> Option<Vec<f64>> {
        if self.order < 2 || !theta2.is_finite() || top.len() != self.order {
            return None;
        }
        let (low, high) = self.gershgorin();
        let scale = low.abs().max(high.abs());
        let offset = (1e-10 * scale).max(f64::MIN_POSITIVE);
        let floor = (f64::EPSILON * scale).max(f64::MIN_POSITIVE);
        let factor = BandLu::of_shifted(self, theta2 + offset, floor)?;
        let mut vector: Vec<f64> = (1..=self.order)
            .map(|index| 0.5 + (index as f64 * 0.618_033_988_749_894_8).fract())
            .collect();
        remove_component(&mut vector, top);
        normalise(&mut vector)?;
        for _ in 0..INVERSE_ITERATIONS {
            factor.solve(&mut vector);
            // Twice: when θ2 lies within the shift's offset of θ1, the solve amplifies the
            // remnant along `top` as much as the wanted direction.
            remove_component(&mut vector, top);
            remove_component(&mut vector, top);
            normalise(&mut vector)?;
        }
        Some(vector)
    }

    /// `INVERSE_ITERATIONS` normalised solves with `shift I - H` from `start`; `None` when its
    /// Cholesky fails or a solve overflows.
    fn inverse_iteration(&self, shift: f64, start: &[f64]) -> Option<Vec<f64>> {
        let factor = self.shifted_cholesky(shift)?;
        let stride = self.width + 1;
        let mut vector = start.to_vec();
        for _ in 0..INVERSE_ITERATIONS {
            // Forward substitution L u = v, then back substitution L^T w = u by columns.
            for (row, entries) in factor.chunks_exact(stride).enumerate() {
                let first = row.saturating_sub(self.width);
                let known = entries[1..=row - first]
                    .iter()
                    .rev()
                    .zip(&vector[first..row]);
                let dot: f64 = known.map(|(entry, value)| entry * value).sum();
                vector[row] = (vector[row] - dot) / entries[0];
            }
            for (row, entries) in factor.chunks_exact(stride).enumerate().rev() {
                let first = row.saturating_sub(self.width);
                let value = vector[row] / entries[0];
                vector[row] = value;
                let pending = vector[first..row]
                    .iter_mut()
                    .zip(entries[1..=row - first].iter().rev());
                pending.for_each(|(target, entry)| *target -= entry * value);
            }
            normalise(&mut vector)?;
        }
        Some(vector)
    }

    /// Band Cholesky factor L of `shift I - H` in the layout of `lower`; `None` when a pivot is
    /// not positive.
    fn shifted_cholesky(&self, shift: f64) -> Option<Vec<f64>> {
        let stride = self.width + 1;
        let mut factor = vec![0.0; self.lower.len()];
        for row in 0..self.order {
            let first = row.saturating_sub(self.width);
            for column in first..=row {
                // L(r, c) = (G(r, c) - sum_{k < c} L(r, k) L(c, k)) / L(c, c), G = shift I - H.
                let row_part =
                    &factor[row * stride + row - column + 1..=row * stride + row - first];
                let column_part = &factor[column * stride + 1..=column * stride + column - first];
                let dot: f64 = row_part
                    .iter()
                    .zip(column_part)
                    .map(|(left, right)| left * right)
                    .sum();
                let diagonal = if row == column { shift } else { 0.0 };
                let remainder = diagonal - self.lower[row * stride + row - column] - dot;
                factor[row * stride + row - column] = if row == column {
                    if remainder.is_nan() || remainder <= 0.0 {
                        return None;
                    }
                    remainder.sqrt()
                } else {
                    remainder / factor[column * stride]
                };
            }
        }
        Some(factor)
    }
}

/// `P (s I - H) = L U` for a symmetric band `H` of half-bandwidth `w`, partial pivoting within
/// the band (LAPACK's `gbtrf` without blocking). Row `r` is stored densely over columns
/// `r - w ..= r + 2w` (index `column + w - r`): the row interchanges of step `j` only move
/// entries of columns `j ..= j + 2w` between rows `j ..= j + w`, which keeps every row inside
/// its window; the multipliers of step `j` stay where they were computed, and `solve` applies
/// the interchanges and eliminations in the same interleaved order (`gbtrs`).
struct BandLu {
    width: usize,
    order: usize,
    rows: Vec<f64>,
    pivots: Vec<usize>,
}

impl BandLu {
    /// Entries per stored row.
    fn stride(width: usize) -> usize {
        3 * width + 1
    }

    /// Position of entry (row, column), `row - width <= column <= row + 2 width`, in the
    /// row-window storage of a matrix of half-bandwidth `width`.
    fn at(width: usize, row: usize, column: usize) -> usize {
        row * Self::stride(width) + column + width - row
    }

    /// Factors `shift I - H`; a pivot smaller than `floor` in magnitude becomes `floor` (the
    /// matrix is singular to working precision there, which inverse iteration wants). `None`
    /// when an entry is not finite.
    fn of_shifted(band: &SymmetricBand, shift: f64, floor: f64) -> Option<Self> {
        let (width, order) = (band.width, band.order);
        let at = |row: usize, column: usize| Self::at(width, row, column);
        let mut rows = vec![0.0; order * Self::stride(width)];
        for row in 0..order {
            let first = row.saturating_sub(width);
            let last = (row + width).min(order - 1);
            for column in first..=last {
                let entry = band.lower[band.position(row, column)?];
                let diagonal = if row == column { shift } else { 0.0 };
                rows[at(row, column)] = diagonal - entry;
            }
        }
        if rows.iter().any(|entry| !entry.is_finite()) {
            return None;
        }
        let mut pivots = vec![0; order];
        for step in 0..order {
            let below = (step + width).min(order - 1);
            let right = (step + 2 * width).min(order - 1);
            let pivot = (step..=below)
                .max_by(|&one, &other| {
                    rows[at(one, step)]
                        .abs()
                        .total_cmp(&rows[at(other, step)].abs())
                })
                .unwrap_or(step);
            pivots[step] = pivot;
            if pivot != step {
                for column in step..=right {
                    rows.swap(at(step, column), at(pivot, column));
                }
            }
            if rows[at(step, step)].abs() < floor {
                rows[at(step, step)] = floor;
            }
            let diagonal = rows[at(step, step)];
            for row in step + 1..=below {
                let multiplier = rows[at(row, step)] / diagonal;
                rows[at(row, step)] = multiplier;
                if multiplier != 0.0 {
                    for column in step + 1..=right {
                        rows[at(row, column)] -= multiplier * rows[at(step, column)];
                    }
                }
            }
        }
        Some(Self {
            width,
            order,
            rows,
            pivots,
        })
    }

    /// Overwrites `vector` (length `order`) with `(s I - H)^-1 vector`.
    fn solve(&self, vector: &mut [f64]) {
        let (width, order) = (self.width, self.order);
        let at = |row: usize, column: usize| Self::at(width, row, column);
        for step in 0..order {
            vector.swap(step, self.pivots[step]);
            let value = vector[step];
            let below = (step + width).min(order - 1);
            for (offset, target) in vector[step + 1..=below].iter_mut().enumerate() {
                *target -= self.rows[at(step + 1 + offset, step)] * value;
            }
        }
        for row in (0..order).rev() {
            let right = (row + 2 * width).min(order - 1);
            let known: f64 = (row + 1..=right)
                .map(|column| self.rows[at(row, column)] * vector[column])
                .sum();
            vector[row] = (vector[row] - known) / self.rows[at(row, row)];
        }
    }
}

/// Removes from `vector` its component along the unit vector `direction`.
fn remove_component(vector: &mut [f64], direction: &[f64]) {
    let along: f64 = vector.iter().zip(direction).map(|(x, d)| x * d).sum();
    vector
        .iter_mut()
        .zip(direction)
        .for_each(|(x, d)| *x -= along * d);
}

/// Replacement for vanishing pivots: `f64::MIN_POSITIVE * max(1, magnitude)^2`, so that
/// `entry^2 / pivot` cannot overflow (LAPACK's `pivmin`).
fn pivot_floor(magnitude: f64) -> f64 {
    f64::MIN_POSITIVE * magnitude.max(1.0) * magnitude.max(1.0)
}

/// Scales `vector` to unit length, guarding against overflow; `None` when it is zero or not
/// finite.
fn normalise(vector: &mut [f64]) -> Option<()> {
    let largest = vector
        .iter()
        .fold(0.0_f64, |largest, value| largest.max(value.abs()));
    if largest == 0.0 || !vector.iter().all(|value| value.is_finite()) {
        return None;
    }
    vector.iter_mut().for_each(|value| *value /= largest);
    let norm = vector.iter().map(|value| value * value).sum::<f64>().sqrt();
    vector.iter_mut().for_each(|value| *value /= norm);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::{BandLu, SymmetricBand};

    /// Xorshift64 generator for test matrices.
    struct Xorshift(u64);

    impl Xorshift {
        /// Uniform in [-1, 1).
        fn next_signed(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        }
    }

    /// A matrix of `order` rows, row `i` given to `push_row` as `lower_row(i)`.
    fn banded(
        width: usize,
        order: usize,
        lower_row: impl FnMut(usize) -> Vec<f64>,
    ) -> SymmetricBand {
        let mut band = SymmetricBand::new(width);
        (0..order)
            .map(lower_row)
            .for_each(|row| band.push_row(&row));
        band
    }

    /// A band matrix with entries uniform in [-1, 1).
    fn random_band(width: usize, order: usize, random: &mut Xorshift) -> SymmetricBand {
        banded(width, order, |_| {
            (0..=width).map(|_| random.next_signed()).collect()
        })
    }

    /// A tridiagonal matrix stored with half-bandwidth `width`, the band beyond it zero.
    fn tridiagonal(
        width: usize,
        order: usize,
        diagonal: impl Fn(usize) -> f64,
        off_diagonal: f64,
    ) -> SymmetricBand {
        let row = |i| [vec![diagonal(i), off_diagonal], vec![0.0; width - 1]].concat();
        banded(width, order, row)
    }

    /// Block-diagonal copies of `block` (order at most width + 1), copy `c` shifted by `c * step`.
    fn block_diagonal(block: &SymmetricBand, copies: usize, step: f64) -> SymmetricBand {
        let size = block.order();
        let mut band = banded(block.width(), size * copies, |_| {
            vec![0.0; block.width() + 1]
        });
        for copy in 0..copies {
            for (i, j) in (0..size).flat_map(|i| (0..=i).map(move |j| (i, j))) {
                let shift = if i == j { copy as f64 * step } else { 0.0 };
                band.set(copy * size + i, copy * size + j, block.get(i, j) + shift);
            }
        }
        band
    }

    /// Euclidean norm.
    fn norm(vector: &[f64]) -> f64 {
        vector.iter().map(|value| value * value).sum::<f64>().sqrt()
    }

    /// All eigenvalues, largest first, by cyclic Jacobi on the dense copy.
    fn jacobi_eigenvalues(band: &SymmetricBand) -> Vec<f64> {
        let order = band.order();
        let mut dense: Vec<f64> = (0..order * order)
            .map(|k| band.get(k / order, k % order))
            .collect();
        for _ in 0..100 {
            let off_diagonal = (0..order * order).filter(|k| k / order != k % order);
            if norm(&off_diagonal.map(|k| dense[k]).collect::<Vec<_>>()) <= 1e-15 * norm(&dense) {
                break;
            }
            for p in 0..order {
                for q in p + 1..order {
                    let coupling = dense[p * order + q];
                    if coupling == 0.0 {
                        continue;
                    }
                    // Rotation that zeroes (p, q): Numerical Recipes (11.1.8)-(11.1.10).
                    let theta = (dense[q * order + q] - dense[p * order + p]) / (2.0 * coupling);
                    let tangent = theta.signum() / (theta.abs() + theta.hypot(1.0));
                    let cosine = 1.0 / tangent.hypot(1.0);
                    let sine = tangent * cosine;
                    for (stride, step) in [(order, 1), (1, order)] {
                        for k in 0..order {
                            let (at_p, at_q) = (k * stride + p * step, k * stride + q * step);
                            let (on_p, on_q) = (dense[at_p], dense[at_q]);
                            dense[at_p] = cosine * on_p - sine * on_q;
                            dense[at_q] = sine * on_p + cosine * on_q;
                        }
                    }
                }
            }
        }
        let mut eigenvalues: Vec<f64> = (0..order).map(|k| dense[k * order + k]).collect();
        eigenvalues.sort_by(|left, right| right.total_cmp(left));
        eigenvalues
    }

    /// Checks that `vector` is a unit eigenvector of `theta`: |H y - theta y| <= 1e-10 max|H|.
    fn check_eigenpair(band: &SymmetricBand, theta: f64, vector: &[f64]) {
        let order = band.order();
        let entries = (0..order * order).map(|k| band.get(k / order, k % order).abs());
        let largest = entries.fold(0.0_f64, f64::max);
        let product = |i: usize| (0..order).map(|j| band.get(i, j) * vector[j]).sum::<f64>();
        let residual = norm(
            &(0..order)
                .map(|i| product(i) - theta * vector[i])
                .collect::<Vec<_>>(),
        );
        assert!(
            residual <= 1e-10 * largest,
            "eigenvalue {theta}: residual {residual:e}, max|H| {largest:e}"
        );
        assert!((norm(vector) - 1.0).abs() <= 1e-12);
    }

    /// Checks `top_vector(theta1)` with `check_eigenpair`.
    fn check_vector(band: &SymmetricBand, theta1: f64) -> Vec<f64> {
        let vector = band.top_vector(theta1);
        check_eigenpair(band, theta1, &vector);
        vector
    }

    /// Checks `second_vector(theta2, top)` with `check_eigenpair`, and that it is orthogonal
    /// to `top`.
    fn check_second_vector(band: &SymmetricBand, theta2: f64, top: &[f64]) {
        let vector = band
            .second_vector(theta2, top)
            .expect("a second vector of a finite matrix");
        check_eigenpair(band, theta2, &vector);
        let overlap: f64 = vector.iter().zip(top).map(|(a, b)| a * b).sum();
        assert!(
            overlap.abs() <= 1e-12,
            "overlap with the top vector {overlap:e}"
        );
    }

    /// Checks `top_two`, `count_above` between well separated eigenvalues, `top_vector` and
    /// `second_vector` against Jacobi. Both are backward stable, so eigenvalues agree to a multiple of
    /// eps * |H| (Weyl): the tolerance is absolute, relative to the spectral norm. The residual
    /// bound holds for close top eigenvalues too: a gap g leaves a residual of at most
    /// g * (d / (d + g))^3 * |start's ratio| <= 0.15 d * |ratio|, with d = 1e-10 * scale.
    fn check_against_jacobi(band: &SymmetricBand) {
        let eigenvalues = jacobi_eigenvalues(band);
        let norm = eigenvalues
            .iter()
            .fold(0.0_f64, |largest, value| largest.max(value.abs()));
        let (theta1, theta2) = band.top_two();
        let tolerance = 1e-12 * norm;
        assert!(
            (theta1 - eigenvalues[0]).abs() <= tolerance,
            "{theta1} vs {}",
            eigenvalues[0]
        );
        match eigenvalues.get(1) {
            Some(&second) => assert!((theta2 - second).abs() <= tolerance, "{theta2} vs {second}"),
            None => assert_eq!(theta2, f64::NEG_INFINITY),
        }
        for (above, pair) in eigenvalues.windows(2).enumerate() {
            if pair[0] - pair[1] > 1e-8 * norm {
                assert_eq!(band.count_above(0.5 * (pair[0] + pair[1])), above + 1);
            }
        }
        let top = check_vector(band, theta1);
        if eigenvalues.len() > 1 {
            check_second_vector(band, theta2, &top);
        } else {
            assert!(band.second_vector(theta2, &top).is_none());
        }
    }

    /// Random band matrices of every width and a range of orders.
    #[test]
    fn random_bands_match_jacobi() {
        let mut random = Xorshift(0x9e37_79b9_7f4a_7c15);
        for width in [1, 2, 4, 8] {
            for order in [1, 2, 3, 7, 40, 150] {
                check_against_jacobi(&random_band(width, order, &mut random));
            }
        }
    }

    /// `BandLu::solve` against the product: a small backward error, `|M x - b| <= 1e-12 |M| |x|`
    /// (max norms, times the order), for shifts at the first diagonal entry, where the first
    /// pivot vanishes and only row interchanges keep the factors small, and at random points.
    #[test]
    fn band_lu_solves_with_row_interchanges() {
        let mut random = Xorshift(0x5851_f42d_4c95_7f2d);
        for width in [1, 2, 4] {
            for order in [2, 3, 9, 40] {
                let band = random_band(width, order, &mut random);
                for shift in [band.get(0, 0), random.next_signed()] {
                    let factor = BandLu::of_shifted(&band, shift, f64::EPSILON).unwrap();
                    let right: Vec<f64> = (0..order).map(|_| random.next_signed()).collect();
                    let mut solution = right.clone();
                    factor.solve(&mut solution);
                    let entry =
                        |i: usize, j: usize| (if i == j { shift } else { 0.0 }) - band.get(i, j);
                    let largest = (0..order * order)
                        .map(|k| entry(k / order, k % order).abs())
                        .fold(0.0_f64, f64::max);
                    let size = solution.iter().fold(0.0_f64, |m, x| m.max(x.abs()));
                    for (i, value) in right.iter().enumerate() {
                        let product: f64 = (0..order).map(|j| entry(i, j) * solution[j]).sum();
                        assert!(
                            (product - value).abs() <= 1e-12 * order as f64 * largest * size,
                            "width {width}, order {order}, row {i}: {product} vs {value}"
                        );
                    }
                }
            }
        }
    }

    /// Block-diagonal copies of one block: the top eigenvalue is repeated.
    #[test]
    fn repeated_top_eigenvalue() {
        let mut random = Xorshift(0x2545_f491_4f6c_dd1d);
        for width in [1, 2, 4, 8] {
            let band = block_diagonal(&random_band(width, width + 1, &mut random), 4, 0.0);
            let (theta1, theta2) = band.top_two();
            assert!((theta1 - theta2).abs() <= 1e-14 * theta1.abs());
            check_against_jacobi(&band);
        }
    }

    /// Top eigenvalues 1e-9 apart (relative), and Wilkinson's W21+ (about 7e-14 apart).
    #[test]
    fn close_top_eigenvalues() {
        let mut random = Xorshift(0xdead_beef_cafe_f00d);
        for width in [1, 2, 4, 8] {
            let block = random_band(width, width + 1, &mut random);
            let step = 1e-9 * jacobi_eigenvalues(&block)[0].abs();
            check_against_jacobi(&block_diagonal(&block, 2, step));
        }
        for width in [1, 3] {
            let band = tridiagonal(width, 21, |i| (10.0 - i as f64).abs(), 1.0);
            let (theta1, theta2) = band.top_two();
            assert!(theta1 > theta2 && theta1 - theta2 < 1e-12);
            check_against_jacobi(&band);
        }
    }

    /// The second difference matrix [-1, 2, -1] of order n: eigenvalues 2 - 2 cos(k pi/(n+1)),
    /// top eigenvector sin(n i pi / (n + 1)), i = 1..=n.
    #[test]
    fn second_difference_known_spectrum() {
        for width in [1, 3] {
            for order in [1, 2, 3, 10, 101, 1000] {
                let band = tridiagonal(width, order, |_| 2.0, -1.0);
                let angle = std::f64::consts::PI / (order + 1) as f64;
                let (theta1, theta2) = band.top_two();
                assert!((theta1 - (2.0 + 2.0 * angle.cos())).abs() <= 4e-12);
                if order > 1 {
                    assert!((theta2 - (2.0 + 2.0 * (2.0 * angle).cos())).abs() <= 4e-12);
                }
                // Eigenvector k (k = order for the top) is sin(k i pi / (order + 1)).
                let aligned = |vector: &[f64], k: usize| {
                    let exact: Vec<f64> = (1..=order)
                        .map(|i| (k as f64 * i as f64 * angle).sin())
                        .collect();
                    let cosine: f64 = exact.iter().zip(vector).map(|(e, v)| e * v).sum();
                    assert!(
                        1.0 - cosine.abs() / norm(&exact) <= 1e-12,
                        "order {order}, k {k}"
                    );
                };
                let vector = check_vector(&band, theta1);
                aligned(&vector, order);
                if order > 1 {
                    aligned(&band.second_vector(theta2, &vector).unwrap(), order - 1);
                }
            }
        }
    }

    /// Empty and zero matrices, exactly zero pivots, NaN entries and a wrong `theta1`.
    #[test]
    fn degenerate_inputs() {
        let empty = SymmetricBand::new(2);
        assert_eq!(empty.top_two(), (f64::NEG_INFINITY, f64::NEG_INFINITY));
        assert!(empty.top_vector(0.0).is_empty());
        let zero = banded(2, 5, |_| vec![0.0; 3]);
        assert_eq!(zero.count_above(0.0), 0);
        let (theta1, theta2) = zero.top_two();
        assert!(theta1.abs() < 1e-300 && theta2.abs() < 1e-300);
        assert!((norm(&zero.top_vector(theta1)) - 1.0).abs() < 1e-12);
        // Eigenvalues sqrt(2), 0, -sqrt(2): the first and last pivots of H - 0 I vanish, and
        // with them the first pivot of `s I - H` at the shift of `second_vector` (about
        // 1e-10): without row interchanges its factors grow by 1e10.
        assert_eq!(tridiagonal(2, 3, |_| 0.0, 1.0).count_above(0.0), 1);
        for width in [1, 2] {
            check_against_jacobi(&tridiagonal(width, 3, |_| 0.0, 1.0));
        }
        let mut band = random_band(3, 30, &mut Xorshift(7));
        let (theta1, _) = band.top_two();
        for wrong in [theta1 - 10.0, f64::NAN] {
            assert!((norm(&band.top_vector(wrong)) - 1.0).abs() < 1e-12);
        }
        let top = band.top_vector(theta1);
        assert!(band.second_vector(f64::NAN, &top).is_none());
        assert!(band.second_vector(theta1, &top[1..]).is_none());
        let single = banded(3, 1, |_| vec![2.0, 0.0, 0.0, 0.0]);
        assert!(single.second_vector(2.0, &[1.0]).is_none());
        band.set(5, 4, f64::NAN);
        let _ = band.top_two();
        assert!((norm(&band.top_vector(f64::NAN)) - 1.0).abs() < 1e-12);
        assert!(band.second_vector(0.0, &top).is_none());
    }

    /// `push_row` stores zeros left of column 0; `get` and `set` are symmetric.
    #[test]
    fn storage_layout() {
        let mut band = banded(2, 3, |i| {
            [[1.0, 9.0, 9.0], [2.0, 3.0, 9.0], [4.0, 5.0, 6.0]][i].to_vec()
        });
        assert_eq!((band.order(), band.width()), (3, 2));
        assert_eq!(band.lower[..6], [1.0, 0.0, 0.0, 2.0, 3.0, 0.0]);
        assert_eq!(
            [
                band.get(0, 1),
                band.get(1, 0),
                band.get(2, 0),
                band.get(0, 2)
            ],
            [3.0, 3.0, 6.0, 6.0]
        );
        band.set(0, 2, 7.0);
        assert_eq!(band.get(2, 0), 7.0);
        let positive = jacobi_eigenvalues(&band)
            .iter()
            .filter(|value| **value > 0.0)
            .count();
        assert_eq!(band.count_above(0.0), positive);
    }
}
