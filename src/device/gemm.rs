//! Batched matrix products on a device: the shape of a strided batch ([`GemmBatch`]), one
//! product enqueued on a device's own buffers ([`Gemm`]), and the plain host product the
//! simulated device runs in place of cuBLAS.
//!
//! The Newton–Schulz iterations of the orthogonalised rule (math §5b) are these products:
//! `bf16` operands, `f32` accumulation, the result stored as `bf16` or `f32`, as cuBLAS's
//! `cublasGemmStridedBatchedEx` with `CUBLAS_COMPUTE_32F` computes them.

use half::bf16;

use crate::error::{Error, Result};

/// One strided batch of row-major products `C_i = alpha op(A_i) op(B_i) + beta C_i`, the
/// matrices of each operand packed one after another: `op(A_i)` is `m x k`, `op(B_i)` is
/// `k x n`, `C_i` is `m x n`, and `op` transposes where asked (`A_i` is then stored `k x m`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmBatch {
    /// Rows of `op(A_i)` and `C_i`.
    pub m: usize,
    /// Columns of `op(B_i)` and `C_i`.
    pub n: usize,
    /// Columns of `op(A_i)`, rows of `op(B_i)`.
    pub k: usize,
    /// Products in the batch.
    pub batch: usize,
    /// Use `A_iᵀ`.
    pub transpose_a: bool,
    /// Use `B_iᵀ`.
    pub transpose_b: bool,
    /// `alpha`.
    pub alpha: f32,
    /// `beta` (0: `C` is only written).
    pub beta: f32,
}

impl GemmBatch {
    /// Elements of (A, B, C): every dimension at least 1 and below `i32::MAX`, as cuBLAS
    /// takes them, and each operand's length exactly its matrices'.
    pub fn lengths(&self) -> Result<(usize, usize, usize)> {
        let dims = [self.m, self.n, self.k, self.batch];
        let bad = |why: &str| Error::InvalidArgument(format!("GEMM batch {self:?}: {why}"));
        if dims.iter().any(|&d| d == 0 || d > i32::MAX as usize) {
            return Err(bad("every dimension must be in 1..=i32::MAX"));
        }
        let product = |a: usize, b: usize| {
            a.checked_mul(b)
                .and_then(|size| size.checked_mul(self.batch))
                .filter(|&len| len <= i64::MAX as usize)
                .ok_or_else(|| bad("an operand overflows"))
        };
        Ok((
            product(self.m, self.k)?,
            product(self.k, self.n)?,
            product(self.m, self.n)?,
        ))
    }
}

/// How the result `C` of a [`Gemm`] is stored (the operands are always `bf16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmOutput {
    /// `bf16`, rounded to nearest even from the `f32` accumulator.
    Bf16,
    /// `f32`, the accumulator itself.
    F32,
}

impl GemmOutput {
    /// Bytes per element of `C`.
    pub const fn size_bytes(self) -> usize {
        match self {
            GemmOutput::Bf16 => 2,
            GemmOutput::F32 => 4,
        }
    }
}

/// One strided batch of products on a device's own buffers, by device address: `A` and `B`
/// `bf16`, `C` of type `output`, each packed as [`GemmBatch`] says.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    /// The products' shapes and scalars.
    pub batch: GemmBatch,
    /// Address of `A_0`.
    pub a: u64,
    /// Address of `B_0`.
    pub b: u64,
    /// Address of `C_0` (read when `beta != 0`, written).
    pub c: u64,
    /// `C`'s element type.
    pub output: GemmOutput,
}

impl Gemm {
    /// Bytes of (A, B, C) the batch reaches from their addresses.
    pub fn byte_lengths(&self) -> Result<(usize, usize, usize)> {
        let (a, b, c) = self.batch.lengths()?;
        let bytes = |len: usize, size: usize| {
            len.checked_mul(size).ok_or_else(|| {
                Error::InvalidArgument(format!("GEMM batch {:?}: an operand overflows", self.batch))
            })
        };
        Ok((
            bytes(a, 2)?,
            bytes(b, 2)?,
            bytes(c, self.output.size_bytes())?,
        ))
    }
}

/// `C_i <- alpha op(A_i) op(B_i) + beta C_i` on the host, in the order cuBLAS does not
/// promise but this function does: each element's sum over `k` in increasing `k`, in `f32`.
/// A product of two `bf16` values is exact in `f32` (8-bit significands), so fused and
/// separate multiply-adds agree. `c` holds the `C` values in `f32`; the caller rounds them to
/// the output type. Errors unless every slice has its operand's length.
pub fn host_gemm(batch: &GemmBatch, a: &[bf16], b: &[bf16], c: &mut [f32]) -> Result<()> {
    let (a_len, b_len, c_len) = batch.lengths()?;
    if (a.len(), b.len(), c.len()) != (a_len, b_len, c_len) {
        return Err(Error::InvalidArgument(format!(
            "GEMM batch {batch:?} needs {a_len}, {b_len} and {c_len} elements, got {}, {} and {}",
            a.len(),
            b.len(),
            c.len()
        )));
    }
    let GemmBatch { m, n, k, .. } = *batch;
    // Element (row, inner) of op(A_i), (inner, column) of op(B_i), in their packed storage.
    let a_at = |row: usize, inner: usize| {
        if batch.transpose_a {
            inner * m + row
        } else {
            row * k + inner
        }
    };
    let b_at = |inner: usize, column: usize| {
        if batch.transpose_b {
            column * k + inner
        } else {
            inner * n + column
        }
    };
    for ((a, b), c) in a
        .chunks_exact(m * k)
        .zip(b.chunks_exact(k * n))
        .zip(c.chunks_exact_mut(m * n))
    {
        for row in 0..m {
            for column in 0..n {
                let mut sum = 0.0f32;
                for inner in 0..k {
                    sum += a[a_at(row, inner)].to_f32() * b[b_at(inner, column)].to_f32();
                }
                let out = &mut c[row * n + column];
                *out = if batch.beta == 0.0 {
                    batch.alpha * sum
                } else {
                    batch.alpha * sum + batch.beta * *out
                };
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(list: &[f32]) -> Vec<bf16> {
        list.iter().map(|&v| bf16::from_f32(v)).collect()
    }

    /// A 2x3 by 3x2 product worked by hand, plain and with each operand stored transposed.
    #[test]
    fn host_products_match_a_product_worked_by_hand() {
        // A = [[1, 2, 3], [4, 5, 6]], B = [[1, 0], [0, 1], [2, -1]]:
        // A B = [[1 + 6, 2 - 3], [4 + 12, 5 - 6]] = [[7, -1], [16, -1]].
        let a = values(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let a_t = values(&[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let b = values(&[1.0, 0.0, 0.0, 1.0, 2.0, -1.0]);
        let b_t = values(&[1.0, 0.0, 2.0, 0.0, 1.0, -1.0]);
        for (transpose_a, transpose_b) in
            [(false, false), (true, false), (false, true), (true, true)]
        {
            let batch = GemmBatch {
                m: 2,
                n: 2,
                k: 3,
                batch: 1,
                transpose_a,
                transpose_b,
                alpha: 1.0,
                beta: 0.0,
            };
            let mut c = vec![f32::NAN; 4];
            let a = if transpose_a { &a_t } else { &a };
            let b = if transpose_b { &b_t } else { &b };
            host_gemm(&batch, a, b, &mut c).unwrap();
            assert_eq!(c, [7.0, -1.0, 16.0, -1.0], "{transpose_a} {transpose_b}");
        }
        // alpha 2, beta -1 on C = 1: 2 A B - 1; a batch of two, the second A doubled.
        let batch = GemmBatch {
            m: 2,
            n: 2,
            k: 3,
            batch: 2,
            transpose_a: false,
            transpose_b: false,
            alpha: 2.0,
            beta: -1.0,
        };
        let twice: Vec<bf16> = a
            .iter()
            .chain(&a)
            .enumerate()
            .map(|(i, &v)| {
                if i < 6 {
                    v
                } else {
                    bf16::from_f32(2.0 * v.to_f32())
                }
            })
            .collect();
        let both_b: Vec<bf16> = b.iter().chain(&b).copied().collect();
        let mut c = vec![1.0; 8];
        host_gemm(&batch, &twice, &both_b, &mut c).unwrap();
        assert_eq!(c, [13.0, -3.0, 31.0, -3.0, 27.0, -5.0, 63.0, -5.0]);
        assert!(matches!(
            host_gemm(&batch, &a, &both_b, &mut c),
            Err(Error::InvalidArgument(_))
        ));
    }
}
