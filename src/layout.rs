//! One description of a batch of matrices: shapes, where each matrix lives in a flat buffer,
//! and how its rows are cut into blocks of parallel work (math §4 "split the rows into tiles").
//!
//! The CPU path, the CUDA path and the simulator tests all read this one type. A backend only
//! chooses the [`BlockPolicy`] (how many elements a block should hold); everything else is
//! derived here, with overflow checked once when the layout is built.

use crate::error::{Error, Result};

/// The shape of one weight matrix, stored row-major as `(fan_out, fan_in)` (math §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatrixShape {
    /// Rows: the layer's number of outputs.
    pub fan_out: usize,
    /// Columns: the layer's number of inputs.
    pub fan_in: usize,
}

impl MatrixShape {
    /// A `fan_out x fan_in` matrix. A bias of `n` outputs is `MatrixShape::new(n, 1)` (math §2).
    pub const fn new(fan_out: usize, fan_in: usize) -> Self {
        Self { fan_out, fan_in }
    }

    /// `fan_out * fan_in`, or `None` on overflow.
    pub const fn checked_len(self) -> Option<usize> {
        self.fan_out.checked_mul(self.fan_in)
    }

    /// `fan_out * fan_in` (saturating; a validated layout never saturates).
    pub const fn len(self) -> usize {
        self.fan_out.saturating_mul(self.fan_in)
    }

    /// True when either dimension is zero.
    pub const fn is_empty(self) -> bool {
        self.fan_out == 0 || self.fan_in == 0
    }

    /// A row or column vector: its spectral norm is its Euclidean norm (math §4).
    pub const fn is_vector(self) -> bool {
        self.fan_out == 1 || self.fan_in == 1
    }
}

impl From<(usize, usize)> for MatrixShape {
    /// `(fan_out, fan_in)`.
    fn from((fan_out, fan_in): (usize, usize)) -> Self {
        Self::new(fan_out, fan_in)
    }
}

/// How a backend wants rows grouped into blocks. Each block produces one partial power vector,
/// so fewer, larger blocks mean less partial traffic and more, smaller blocks more parallelism.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockPolicy {
    /// Target number of elements per block; a block always holds at least one row.
    pub target_elements: usize,
    /// Every matrix's element, vector and partial offset is a multiple of this (at least 1).
    /// The CUDA path uses 4, so that each matrix's `f32` state starts on a 16-byte boundary
    /// and can be moved with vector loads; the gaps are never read.
    pub align_elements: usize,
}

impl BlockPolicy {
    /// The CPU backend's policy: 2^18 elements (1 MiB of `f32`), so that a GPT-2-sized batch
    /// gives hundreds of blocks for the thread pool while the partials stay near 1% of the data.
    pub const CPU: BlockPolicy = BlockPolicy {
        target_elements: 1 << 18,
        align_elements: 1,
    };

    /// The CUDA kernels' policy: 2^16 elements per block (one CTA each), so that a
    /// GPT-2-sized batch gives over a thousand CTAs (several per SM on an H200) while the
    /// partials stay near 1% of the data; offsets aligned to 4 elements (16 bytes of `f32`).
    pub const CUDA: BlockPolicy = BlockPolicy {
        target_elements: 1 << 16,
        align_elements: 4,
    };
}

/// Where one matrix lives and which blocks cover it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatrixEntry {
    /// The matrix's shape.
    pub shape: MatrixShape,
    /// Offset, in elements, of the matrix in a flat buffer holding the whole batch
    /// (momentum uses this; so do device buffers).
    pub element_offset: usize,
    /// Offset of the matrix's power vector (length `fan_in`) in the flat vector buffer.
    pub vector_offset: usize,
    /// Offset of the matrix's first block's partial in the flat partial buffer; its blocks'
    /// partials follow one another, `fan_in` each.
    pub partial_offset: usize,
    /// Index of the matrix's first block in [`BatchLayout::blocks`].
    pub first_block: usize,
    /// Number of blocks covering the matrix's rows, in row order.
    pub block_count: usize,
    /// Rows per block (the last block may hold fewer).
    pub rows_per_block: usize,
}

impl MatrixEntry {
    /// Range of this matrix in a flat element buffer.
    pub fn element_range(&self) -> std::ops::Range<usize> {
        self.element_offset..self.element_offset + self.shape.len()
    }

    /// Range of this matrix's power vector in the flat vector buffer.
    pub fn vector_range(&self) -> std::ops::Range<usize> {
        self.vector_offset..self.vector_offset + self.shape.fan_in
    }

    /// Range of this matrix's blocks in [`BatchLayout::blocks`].
    pub fn block_range(&self) -> std::ops::Range<usize> {
        self.first_block..self.first_block + self.block_count
    }

    /// Range of all of this matrix's block partials in the flat partial buffer.
    pub fn partial_range(&self) -> std::ops::Range<usize> {
        self.partial_offset..self.partial_offset + self.block_count * self.shape.fan_in
    }
}

/// A run of consecutive rows of one matrix: the unit of parallel work in a power pass.
/// Its partial `w` (length `fan_in`) lives at `partial_offset` in the flat partial buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowBlock {
    /// Index of the matrix in the batch.
    pub matrix: usize,
    /// First row (inclusive).
    pub row_start: usize,
    /// Last row (exclusive).
    pub row_end: usize,
    /// Offset of this block's partial vector in the flat partial buffer.
    pub partial_offset: usize,
}

/// A validated batch of matrices: shapes, flat-buffer offsets, row blocks.
///
/// ```
/// use spectral_step::{BatchLayout, BlockPolicy, MatrixShape};
/// let layout = BatchLayout::new(
///     &[MatrixShape::new(3072, 768), MatrixShape::new(768, 1)],
///     BlockPolicy::CPU,
/// )?;
/// assert_eq!(layout.total_elements(), 3072 * 768 + 768);
/// assert_eq!(layout.matrix(1).element_offset, 3072 * 768);
/// # Ok::<(), spectral_step::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchLayout {
    matrices: Vec<MatrixEntry>,
    blocks: Vec<RowBlock>,
    total_elements: usize,
    total_vector_len: usize,
    total_partial_len: usize,
    policy: BlockPolicy,
}

impl BatchLayout {
    /// Builds and validates the layout. Errors: an empty batch, more than `2^32 - 1` matrices,
    /// a zero dimension, any size
    /// or offset that overflows (in elements, or in bytes of `f32` state), or a block table
    /// too large to allocate ([`Error::OutOfMemory`]). Every count is checked before
    /// anything proportional to it is allocated.
    pub fn new(shapes: &[MatrixShape], policy: BlockPolicy) -> Result<Self> {
        if shapes.is_empty() {
            return Err(Error::EmptyBatch);
        }
        // Matrix indices are 32-bit wherever they key something (the kernels' descriptors, the
        // re-seed hash, the rounding stream).
        if u32::try_from(shapes.len()).is_err() {
            return Err(Error::LayoutOverflow {
                index: u32::MAX as usize,
                what: "number of matrices (at most 2^32 - 1)",
            });
        }
        let target = policy.target_elements.max(1);
        let align = policy.align_elements.max(1);
        let mut matrices = crate::memory::with_capacity(shapes.len(), "the layout's matrix table")?;
        let (mut element_offset, mut vector_offset, mut partial_offset) = (0usize, 0usize, 0usize);
        let mut total_blocks = 0usize;
        for (index, &shape) in shapes.iter().enumerate() {
            if shape.is_empty() {
                return Err(Error::ZeroDimension {
                    index,
                    fan_out: shape.fan_out,
                    fan_in: shape.fan_in,
                });
            }
            let overflow = |what| Error::LayoutOverflow { index, what };
            let aligned = |offset: usize| {
                offset
                    .checked_next_multiple_of(align)
                    .ok_or(overflow("aligned offset"))
            };
            element_offset = aligned(element_offset)?;
            vector_offset = aligned(vector_offset)?;
            partial_offset = aligned(partial_offset)?;
            let len = shape.checked_len().ok_or(overflow("element count"))?;
            let rows_per_block = (target / shape.fan_in).clamp(1, shape.fan_out);
            let block_count = shape.fan_out.div_ceil(rows_per_block);
            let partial_len = block_count
                .checked_mul(shape.fan_in)
                .ok_or(overflow("partial length"))?;
            matrices.push(MatrixEntry {
                shape,
                element_offset,
                vector_offset,
                partial_offset,
                first_block: total_blocks,
                block_count,
                rows_per_block,
            });
            total_blocks = total_blocks
                .checked_add(block_count)
                .ok_or(overflow("block count"))?;
            element_offset = element_offset
                .checked_add(len)
                .ok_or(overflow("element offset"))?;
            vector_offset = vector_offset
                .checked_add(shape.fan_in)
                .ok_or(overflow("vector offset"))?;
            partial_offset = partial_offset
                .checked_add(partial_len)
                .ok_or(overflow("partial offset"))?;
        }
        // Every buffer of the batch holds f32 state, addressed in bytes: 4 bytes per element,
        // vector entry and partial entry must fit as well.
        let last = shapes.len() - 1;
        for (total, what) in [
            (element_offset, "element bytes"),
            (vector_offset, "vector bytes"),
            (partial_offset, "partial bytes"),
        ] {
            total
                .checked_mul(4)
                .ok_or(Error::LayoutOverflow { index: last, what })?;
        }
        let mut blocks = crate::memory::with_capacity(total_blocks, "the layout's block table")?;
        for (index, entry) in matrices.iter().enumerate() {
            let shape = entry.shape;
            for block in 0..entry.block_count {
                // No overflow: block * rows_per_block < fan_out, block * fan_in <
                // partial_len, and fan_out <= usize::MAX / 4 (its elements' bytes fit), so
                // row_start + rows_per_block < 2 fan_out fits too.
                let row_start = block * entry.rows_per_block;
                blocks.push(RowBlock {
                    matrix: index,
                    row_start,
                    row_end: (row_start + entry.rows_per_block).min(shape.fan_out),
                    partial_offset: entry.partial_offset + block * shape.fan_in,
                });
            }
        }
        Ok(Self {
            matrices,
            blocks,
            total_elements: element_offset,
            total_vector_len: vector_offset,
            total_partial_len: partial_offset,
            policy,
        })
    }

    /// Number of matrices.
    pub fn len(&self) -> usize {
        self.matrices.len()
    }

    /// Always false: a layout holds at least one matrix.
    pub fn is_empty(&self) -> bool {
        self.matrices.is_empty()
    }

    /// Entry `index`. Panics if `index >= len()`, like slice indexing.
    pub fn matrix(&self, index: usize) -> &MatrixEntry {
        &self.matrices[index]
    }

    /// All matrix entries, in batch order.
    pub fn matrices(&self) -> &[MatrixEntry] {
        &self.matrices
    }

    /// The shapes, in batch order.
    pub fn shapes(&self) -> impl ExactSizeIterator<Item = MatrixShape> + '_ {
        self.matrices.iter().map(|entry| entry.shape)
    }

    /// All row blocks: grouped by matrix, in row order.
    pub fn blocks(&self) -> &[RowBlock] {
        &self.blocks
    }

    /// Length of a flat buffer holding the whole batch (a momentum buffer): the elements of
    /// every matrix, plus alignment gaps when the policy asks for them.
    pub fn total_elements(&self) -> usize {
        self.total_elements
    }

    /// Sum of `fan_in` over the batch (length of the flat power-vector buffer).
    pub fn total_vector_len(&self) -> usize {
        self.total_vector_len
    }

    /// Length of the flat partial buffer: `fan_in` per block.
    pub fn total_partial_len(&self) -> usize {
        self.total_partial_len
    }

    /// The policy the blocks were cut with.
    pub fn policy(&self) -> BlockPolicy {
        self.policy
    }

    /// The range of `block`'s partial in the flat partial buffer.
    pub fn block_partial_range(&self, block: &RowBlock) -> std::ops::Range<usize> {
        block.partial_offset..block.partial_offset + self.matrices[block.matrix].shape.fan_in
    }

    /// `product = Σ` matrix `index`'s block partials in `partials`, in `f32`, in block order
    /// (math §4.2): the order that makes a pass's result independent of the thread count.
    pub(crate) fn sum_block_partials(&self, index: usize, partials: &[f32], product: &mut [f32]) {
        product.fill(0.0);
        for block in &self.blocks[self.matrices[index].block_range()] {
            let partial = &partials[self.block_partial_range(block)];
            product.iter_mut().zip(partial).for_each(|(w, &p)| *w += p);
        }
    }

    /// Elements of the batch without alignment gaps: the sum of `fan_out * fan_in` (the
    /// length of momentum in a [`HostState`](crate::HostState) and a state file).
    pub fn packed_elements(&self) -> usize {
        self.matrices.iter().map(|e| e.shape.len()).sum()
    }

    /// Sum of `fan_in` without alignment gaps (the length of the power vectors in a
    /// [`HostState`](crate::HostState) and a state file).
    pub fn packed_vector_len(&self) -> usize {
        self.matrices.iter().map(|e| e.shape.fan_in).sum()
    }

    /// Drops the alignment gaps of a flat element buffer (`total_elements()` long): matrix
    /// after matrix, `packed_elements()` long. Errors on a buffer of the wrong length.
    pub fn pack_elements(&self, padded: &[f32]) -> Result<Vec<f32>> {
        pack(
            padded,
            self.total_elements,
            self.packed_elements(),
            self.element_ranges(),
            "element",
        )
    }

    /// The inverse of [`pack_elements`](Self::pack_elements): gaps filled with zeros.
    pub fn unpack_elements(&self, packed: &[f32]) -> Result<Vec<f32>> {
        unpack(
            packed,
            self.packed_elements(),
            self.total_elements,
            self.element_ranges(),
            "element",
        )
    }

    /// Drops the alignment gaps of a flat power-vector buffer (`total_vector_len()` long).
    pub fn pack_vectors(&self, padded: &[f32]) -> Result<Vec<f32>> {
        pack(
            padded,
            self.total_vector_len,
            self.packed_vector_len(),
            self.vector_ranges(),
            "power-vector",
        )
    }

    /// The inverse of [`pack_vectors`](Self::pack_vectors): gaps filled with zeros.
    pub fn unpack_vectors(&self, packed: &[f32]) -> Result<Vec<f32>> {
        unpack(
            packed,
            self.packed_vector_len(),
            self.total_vector_len,
            self.vector_ranges(),
            "power-vector",
        )
    }

    fn element_ranges(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        self.matrices.iter().map(MatrixEntry::element_range)
    }

    fn vector_ranges(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        self.matrices.iter().map(MatrixEntry::vector_range)
    }

    /// Matrix `j`'s piece of a flat element buffer (`total_elements()` long), for every `j`.
    pub(crate) fn split_elements_mut<'a, T>(&self, buffer: &'a mut [T]) -> Vec<&'a mut [T]> {
        split_mut(buffer, self.element_ranges())
    }

    /// Matrix `j`'s power vector in a flat vector buffer, for every `j`.
    pub(crate) fn split_vectors_mut<'a, T>(&self, buffer: &'a mut [T]) -> Vec<&'a mut [T]> {
        split_mut(buffer, self.vector_ranges())
    }

    /// Matrix `j`'s block partials in a flat partial buffer, for every `j`.
    pub(crate) fn split_matrix_partials_mut<'a, T>(&self, buffer: &'a mut [T]) -> Vec<&'a mut [T]> {
        split_mut(buffer, self.matrices.iter().map(MatrixEntry::partial_range))
    }

    /// Block `b`'s partial in a flat partial buffer, for every block `b`.
    pub(crate) fn split_block_partials_mut<'a, T>(&self, buffer: &'a mut [T]) -> Vec<&'a mut [T]> {
        split_mut(
            buffer,
            self.blocks.iter().map(|b| self.block_partial_range(b)),
        )
    }

    /// Rows of the whole batch: the sum of `fan_out` (the length of a buffer holding one
    /// value per row, such as the two-matvec form's `U v`).
    pub fn total_rows(&self) -> usize {
        self.matrices.iter().map(|e| e.shape.fan_out).sum()
    }

    /// Block `b`'s rows in a buffer of [`total_rows`](Self::total_rows) values (matrix after
    /// matrix, row after row), for every block `b`.
    pub(crate) fn split_block_rows_mut<'a, T>(&self, buffer: &'a mut [T]) -> Vec<&'a mut [T]> {
        let mut matrix_rows = Vec::with_capacity(self.matrices.len());
        let mut rows = 0;
        for entry in &self.matrices {
            matrix_rows.push(rows);
            rows += entry.shape.fan_out;
        }
        split_mut(
            buffer,
            self.blocks.iter().map(|b| {
                let start = matrix_rows[b.matrix];
                start + b.row_start..start + b.row_end
            }),
        )
    }

    /// How the batch lies in caller buffers that each hold several consecutive matrices
    /// back to back (a stack of experts, a convolution kernel cut into matrices):
    /// `matrices_per_buffer[b]` matrices in buffer `b`, in batch order. Errors unless the
    /// counts are all at least 1 and add up to the batch.
    ///
    /// ```
    /// use spectral_step::{BatchLayout, BlockPolicy, MatrixShape};
    ///
    /// let shapes = [MatrixShape::new(4, 3), MatrixShape::new(4, 3), MatrixShape::new(2, 4)];
    /// let layout = BatchLayout::new(&shapes, BlockPolicy::CPU)?;
    /// let packing = layout.buffer_packing(&[2, 1])?;
    /// assert_eq!(packing.place(1), (0, 12)); // the second matrix starts 12 elements into buffer 0
    /// assert_eq!(packing.buffer_len(0), 24);
    /// # Ok::<(), spectral_step::Error>(())
    /// ```
    pub fn buffer_packing(&self, matrices_per_buffer: &[usize]) -> Result<BufferPacking> {
        let total: usize = matrices_per_buffer
            .iter()
            .try_fold(0usize, |sum, &count| sum.checked_add(count))
            .unwrap_or(usize::MAX);
        if total != self.len() || matrices_per_buffer.contains(&0) {
            return Err(Error::InvalidArgument(format!(
                "buffers holding {matrices_per_buffer:?} matrices do not cover a batch of {} \
                 matrices (every buffer holds at least one)",
                self.len()
            )));
        }
        let mut places = Vec::with_capacity(self.len());
        let mut buffer_lens = Vec::with_capacity(matrices_per_buffer.len());
        let mut matrices = self.matrices.iter();
        for (buffer, &count) in matrices_per_buffer.iter().enumerate() {
            let mut offset = 0usize;
            for entry in matrices.by_ref().take(count) {
                places.push((buffer, offset));
                // The layout's total of elements fits in usize, so every partial sum does.
                offset += entry.shape.len();
            }
            buffer_lens.push(offset);
        }
        Ok(BufferPacking {
            places,
            buffer_lens,
        })
    }

    /// Checks that there is one buffer per matrix and that each has its matrix's length;
    /// `what` names the buffers in the error ("weight", "gradient", ...).
    pub fn check_lengths<L>(&self, what: &'static str, lengths: L) -> Result<()>
    where
        L: ExactSizeIterator<Item = usize>,
    {
        let got = lengths.len();
        if got != self.len() {
            return Err(Error::MatrixCountMismatch {
                what,
                expected: self.len(),
                got,
            });
        }
        for (index, (entry, got)) in self.matrices.iter().zip(lengths).enumerate() {
            if got != entry.shape.len() {
                return Err(Error::LengthMismatch {
                    what,
                    index,
                    fan_out: entry.shape.fan_out,
                    fan_in: entry.shape.fan_in,
                    expected: entry.shape.len(),
                    got,
                });
            }
        }
        Ok(())
    }
}

/// Splits `buffer` into the given ranges, which must be in increasing order and must not
/// overlap (a layout's ranges are; the gaps between them are skipped). Panics otherwise, or
/// if a range ends past the buffer: both are bugs of this crate, not of its input.
fn split_mut<T>(
    mut buffer: &mut [T],
    ranges: impl Iterator<Item = std::ops::Range<usize>>,
) -> Vec<&mut [T]> {
    let mut pieces = Vec::with_capacity(ranges.size_hint().0);
    let mut consumed = 0;
    for range in ranges {
        let rest = std::mem::take(&mut buffer);
        let (_, rest) = rest.split_at_mut(range.start - consumed);
        let (piece, rest) = rest.split_at_mut(range.len());
        pieces.push(piece);
        buffer = rest;
        consumed = range.end;
    }
    pieces
}

fn pack(
    padded: &[f32],
    padded_len: usize,
    packed_len: usize,
    ranges: impl Iterator<Item = std::ops::Range<usize>>,
    what: &str,
) -> Result<Vec<f32>> {
    if padded.len() != padded_len {
        return Err(Error::InvalidArgument(format!(
            "a laid-out {what} buffer has {padded_len} values, got {}",
            padded.len()
        )));
    }
    let mut packed = crate::memory::with_capacity(packed_len, "packed state")?;
    for range in ranges {
        packed.extend_from_slice(&padded[range]);
    }
    Ok(packed)
}

fn unpack(
    packed: &[f32],
    packed_len: usize,
    padded_len: usize,
    ranges: impl Iterator<Item = std::ops::Range<usize>>,
    what: &str,
) -> Result<Vec<f32>> {
    if packed.len() != packed_len {
        return Err(Error::InvalidArgument(format!(
            "a packed {what} buffer for this batch has {packed_len} values, got {}",
            packed.len()
        )));
    }
    let mut padded = crate::memory::zeroed(padded_len, "laid-out state")?;
    let mut start = 0;
    for range in ranges {
        let len = range.len();
        padded[range].copy_from_slice(&packed[start..start + len]);
        start += len;
    }
    Ok(padded)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layout with alignment gaps: packing and unpacking move every value to its place and
    /// back, the splits hand out exactly the layout's ranges.
    #[test]
    fn packing_and_splitting_follow_the_offsets_around_alignment_gaps() {
        let shapes = [
            MatrixShape::new(3, 5),
            MatrixShape::new(1, 1),
            MatrixShape::new(7, 2),
        ];
        let policy = BlockPolicy {
            target_elements: 4,
            align_elements: 4,
        };
        let layout = BatchLayout::new(&shapes, policy).unwrap();
        assert!(
            layout.total_elements() > layout.packed_elements(),
            "gaps here"
        );
        assert!(
            layout.total_partial_len() > layout.blocks().len(),
            "several blocks"
        );
        let packed: Vec<f32> = (0..layout.packed_elements())
            .map(|i| i as f32 + 1.0)
            .collect();
        let padded = layout.unpack_elements(&packed).unwrap();
        for (entry, start) in layout.matrices().iter().zip([0, 15, 16]) {
            assert_eq!(entry.element_offset % 4, 0);
            let expected: Vec<f32> = (start..start + entry.shape.len())
                .map(|i| i as f32 + 1.0)
                .collect();
            assert_eq!(&padded[entry.element_range()], expected.as_slice());
        }
        assert_eq!(layout.pack_elements(&padded).unwrap(), packed);
        let vectors: Vec<f32> = (0..layout.packed_vector_len()).map(|i| i as f32).collect();
        let padded_vectors = layout.unpack_vectors(&vectors).unwrap();
        assert_eq!(layout.pack_vectors(&padded_vectors).unwrap(), vectors);
        assert!(layout.unpack_elements(&packed[1..]).is_err());
        assert_ne!(layout.packed_vector_len(), layout.total_vector_len());
        assert!(layout.pack_vectors(&vectors).is_err());

        let mut marks = vec![0usize; layout.total_partial_len()];
        for (block, piece) in layout
            .blocks()
            .iter()
            .zip(layout.split_block_partials_mut(&mut marks))
        {
            assert_eq!(piece.len(), layout.matrix(block.matrix).shape.fan_in);
            piece.fill(block.partial_offset + 1);
        }
        for block in layout.blocks() {
            assert!(
                marks[layout.block_partial_range(block)]
                    .iter()
                    .all(|&m| m == block.partial_offset + 1)
            );
        }
        let mut elements = vec![0u8; layout.total_elements()];
        let pieces = layout.split_elements_mut(&mut elements);
        assert_eq!(
            pieces.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [15, 1, 14]
        );
        let mut partials = vec![0u8; layout.total_partial_len()];
        for (entry, piece) in layout
            .matrices()
            .iter()
            .zip(layout.split_matrix_partials_mut(&mut partials))
        {
            assert_eq!(piece.len(), entry.block_count * entry.shape.fan_in);
        }
    }
}

/// Where each matrix of a batch lies when caller buffers hold several consecutive matrices
/// ([`BatchLayout::buffer_packing`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferPacking {
    /// Per matrix: its buffer and its first element in that buffer.
    places: Vec<(usize, usize)>,
    /// Per buffer: the elements its matrices occupy.
    buffer_lens: Vec<usize>,
}

impl BufferPacking {
    /// Number of buffers.
    pub fn buffers(&self) -> usize {
        self.buffer_lens.len()
    }

    /// Matrix `matrix`'s buffer and the element at which it starts there. Panics if `matrix`
    /// is out of range, like slice indexing.
    pub fn place(&self, matrix: usize) -> (usize, usize) {
        self.places[matrix]
    }

    /// The elements buffer `buffer` must hold. Panics if `buffer` is out of range.
    pub fn buffer_len(&self, buffer: usize) -> usize {
        self.buffer_lens[buffer]
    }

    /// Checks that there is one buffer per entry of the packing and that each holds exactly
    /// its matrices; `what` names the buffers in the error.
    pub fn check_lengths<L>(&self, what: &'static str, lengths: L) -> Result<()>
    where
        L: ExactSizeIterator<Item = usize>,
    {
        if lengths.len() != self.buffers() {
            return Err(Error::MatrixCountMismatch {
                what,
                expected: self.buffers(),
                got: lengths.len(),
            });
        }
        for (buffer, (got, &expected)) in lengths.zip(&self.buffer_lens).enumerate() {
            if got != expected {
                return Err(Error::InvalidArgument(format!(
                    "{what} buffer {buffer} holds {got} elements; its matrices need {expected}"
                )));
            }
        }
        Ok(())
    }
}
