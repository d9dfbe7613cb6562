//! One description of a batch of matrices: shapes, where each matrix lives in a flat buffer,
//! and how its rows are cut into blocks of parallel work (SPEC 4 "split the rows into tiles").
//!
//! The CPU path, the CUDA path and the simulator tests all read this one type. A backend only
//! chooses the [`BlockPolicy`] (how many elements a block should hold); everything else is
//! derived here, with overflow checked once when the layout is built.

use crate::error::{Error, Result};

/// The shape of one weight matrix, stored row-major as `(fan_out, fan_in)` (SPEC 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatrixShape {
    /// Rows: the layer's number of outputs.
    pub fan_out: usize,
    /// Columns: the layer's number of inputs.
    pub fan_in: usize,
}

impl MatrixShape {
    /// A `fan_out x fan_in` matrix. A bias of `n` outputs is `MatrixShape::new(n, 1)` (SPEC 2).
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

    /// A row or column vector: its spectral norm is its Euclidean norm (SPEC 4).
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
    /// Builds and validates the layout. Errors: an empty batch, a zero dimension, or any size
    /// or offset that overflows `usize`.
    pub fn new(shapes: &[MatrixShape], policy: BlockPolicy) -> Result<Self> {
        if shapes.is_empty() {
            return Err(Error::EmptyBatch);
        }
        let target = policy.target_elements.max(1);
        let align = policy.align_elements.max(1);
        let aligned = |offset: usize, index: usize| {
            offset
                .checked_next_multiple_of(align)
                .ok_or(Error::LayoutOverflow {
                    index,
                    what: "aligned offset",
                })
        };
        let mut matrices = Vec::with_capacity(shapes.len());
        let mut blocks = Vec::new();
        let (mut element_offset, mut vector_offset, mut partial_offset) = (0usize, 0usize, 0usize);
        for (index, &shape) in shapes.iter().enumerate() {
            if shape.is_empty() {
                return Err(Error::ZeroDimension {
                    index,
                    fan_out: shape.fan_out,
                    fan_in: shape.fan_in,
                });
            }
            let overflow = |what| Error::LayoutOverflow { index, what };
            element_offset = aligned(element_offset, index)?;
            vector_offset = aligned(vector_offset, index)?;
            partial_offset = aligned(partial_offset, index)?;
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
                first_block: blocks.len(),
                block_count,
                rows_per_block,
            });
            for block in 0..block_count {
                let row_start = block * rows_per_block;
                blocks.push(RowBlock {
                    matrix: index,
                    row_start,
                    row_end: (row_start + rows_per_block).min(shape.fan_out),
                    partial_offset: partial_offset + block * shape.fan_in,
                });
            }
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
        // Device code addresses elements in bytes with 64-bit offsets; 4 bytes per f32 element
        // must fit as well.
        element_offset.checked_mul(4).ok_or(Error::LayoutOverflow {
            index: shapes.len() - 1,
            what: "byte offset",
        })?;
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
