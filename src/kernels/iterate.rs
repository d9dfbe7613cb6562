//! Where the orthogonalised rule keeps its Newton–Schulz iterates on a device (math §5b): the
//! matrices of a [`BatchLayout`] grouped by shape, so that each group's iterates lie back to
//! back at a constant stride and one strided-batched GEMM covers the group.
//!
//! Each iterate `X` is laid out as its `W` (`fan_out x fan_in`, row-major): a wide matrix
//! (`fan_out <= fan_in`) iterates `X <- P X` with `A = X Xᵀ`, a tall one `X <- X Pᵀ` with
//! `A = Xᵀ X`, so that `A` is always the smaller square and no kernel transposes anything.
//! This is the CPU path's iteration on `Uᵀ` for a tall matrix, transposed.

use crate::error::{Error, Result};
use crate::kernels::plan::MAX_DIMENSION;
use crate::layout::{BatchLayout, MatrixShape};

/// Elements every group starts at a multiple of (128 bytes of `bf16`, 256 of `f32`): aligned
/// for 4-element vectors in the update, and for cuBLAS's fast paths.
pub const GROUP_ALIGN_ELEMENTS: usize = 64;

/// Matrices of one shape: their iterates, back to back, and their Gram matrices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeGroup {
    /// The shape every matrix of the group has.
    pub shape: MatrixShape,
    /// The group's matrices, by index in the layout, in layout order.
    pub matrices: Vec<usize>,
    /// Element offset of the group's first iterate in an iterate buffer.
    pub iterate_offset: usize,
    /// Element offset of the group's first Gram matrix in a Gram buffer.
    pub gram_offset: usize,
}

impl ShapeGroup {
    /// `fan_out > fan_in`: the iteration multiplies from the right.
    pub fn is_tall(&self) -> bool {
        self.shape.fan_out > self.shape.fan_in
    }

    /// `min(fan_out, fan_in)`: the side of each Gram matrix.
    pub fn short_side(&self) -> usize {
        self.shape.fan_out.min(self.shape.fan_in)
    }

    /// `max(fan_out, fan_in)`.
    pub fn long_side(&self) -> usize {
        self.shape.fan_out.max(self.shape.fan_in)
    }

    /// Elements of the group's Gram matrices: `count * short_side^2`.
    pub fn gram_elements(&self) -> usize {
        self.matrices.len() * self.short_side() * self.short_side()
    }
}

/// The iterate and Gram buffers of a batch: the one description of where each matrix's
/// iterate lies (the descriptors' `iterate` field) and of the GEMM batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IterateLayout {
    groups: Vec<ShapeGroup>,
    /// Per matrix of the layout, its iterate's element offset.
    offsets: Vec<usize>,
    iterate_elements: usize,
    gram_elements: usize,
}

impl IterateLayout {
    /// Groups `layout`'s matrices by shape, in order of first appearance. Errors when a
    /// group's Gram matrices reach [`MAX_DIMENSION`] elements (the polynomial kernel's
    /// 32-bit count) or a buffer overflows.
    pub fn new(layout: &BatchLayout) -> Result<Self> {
        let mut groups: Vec<ShapeGroup> = Vec::new();
        for (index, shape) in layout.shapes().enumerate() {
            match groups.iter_mut().find(|group| group.shape == shape) {
                Some(group) => group.matrices.push(index),
                None => groups.push(ShapeGroup {
                    shape,
                    matrices: vec![index],
                    iterate_offset: 0,
                    gram_offset: 0,
                }),
            }
        }
        let overflow = || Error::DeviceLimit("the Newton-Schulz buffers overflow".into());
        let mut offsets = vec![0; layout.len()];
        let (mut iterate_elements, mut gram_elements) = (0usize, 0usize);
        for group in &mut groups {
            let gram = group.gram_elements();
            if gram > MAX_DIMENSION {
                return Err(Error::DeviceLimit(format!(
                    "{} matrices of {}x{}: their Gram matrices hold {gram} elements, at most \
                     {MAX_DIMENSION} for the orthogonalised rule",
                    group.matrices.len(),
                    group.shape.fan_out,
                    group.shape.fan_in
                )));
            }
            group.iterate_offset = iterate_elements;
            group.gram_offset = gram_elements;
            for (position, &matrix) in group.matrices.iter().enumerate() {
                offsets[matrix] = position
                    .checked_mul(group.shape.len())
                    .and_then(|offset| offset.checked_add(iterate_elements))
                    .ok_or_else(overflow)?;
            }
            let end = |offset: usize, len: usize| {
                offset
                    .checked_add(len)
                    .and_then(|end| end.checked_next_multiple_of(GROUP_ALIGN_ELEMENTS))
                    .ok_or_else(overflow)
            };
            let group_len = group
                .matrices
                .len()
                .checked_mul(group.shape.len())
                .ok_or_else(overflow)?;
            iterate_elements = end(iterate_elements, group_len)?;
            gram_elements = end(gram_elements, gram)?;
        }
        Ok(Self {
            groups,
            offsets,
            iterate_elements,
            gram_elements,
        })
    }

    /// The shape groups, in order of first appearance.
    pub fn groups(&self) -> &[ShapeGroup] {
        &self.groups
    }

    /// Element offset of matrix `index`'s iterate. Panics if `index` is out of range.
    pub fn iterate_offset(&self, index: usize) -> usize {
        self.offsets[index]
    }

    /// Elements of one iterate buffer.
    pub fn iterate_elements(&self) -> usize {
        self.iterate_elements
    }

    /// Elements of one Gram buffer (`A`, `A^2` and `P` each have one).
    pub fn gram_elements(&self) -> usize {
        self.gram_elements
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::BlockPolicy;

    #[test]
    fn matrices_of_one_shape_lie_back_to_back_at_aligned_group_starts() {
        let shapes = [
            MatrixShape::new(3, 5),
            MatrixShape::new(7, 2),
            MatrixShape::new(3, 5),
            MatrixShape::new(1, 1),
            MatrixShape::new(7, 2),
        ];
        let layout = BatchLayout::new(&shapes, BlockPolicy::CUDA).unwrap();
        let iterates = IterateLayout::new(&layout).unwrap();
        let groups = iterates.groups();
        assert_eq!(groups.len(), 3);
        assert_eq!(groups[0].matrices, [0, 2]);
        assert_eq!(groups[1].matrices, [1, 4]);
        assert_eq!(groups[2].matrices, [3]);
        assert!(!groups[0].is_tall() && groups[1].is_tall());
        assert_eq!((groups[1].short_side(), groups[1].long_side()), (2, 7));
        assert_eq!(
            (0..5)
                .map(|j| iterates.iterate_offset(j))
                .collect::<Vec<_>>(),
            [0, 64, 15, 128, 78]
        );
        assert_eq!(
            groups.iter().map(|g| g.gram_offset).collect::<Vec<_>>(),
            [0, 64, 128]
        );
        assert_eq!(iterates.iterate_elements(), 192);
        assert_eq!(iterates.gram_elements(), 192);
        assert_eq!(groups[0].gram_elements(), 18);
    }
}
