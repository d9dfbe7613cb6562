//! How the kernels are launched over a batch: the descriptor tables built from a
//! [`BatchLayout`], the layout checks, and the launch sequence of a step (math §5.2).

use crate::config::SpectralSgdConfig;
use crate::device::{Gemm, GemmBatch, GemmOutput};
use crate::element::{Dtype, StepTypes};
use crate::error::{Error, Result};
use crate::kernels::KernelId;
use crate::kernels::iterate::IterateLayout;
use crate::kernels::records::{
    BlockDescriptor, Flag, MAX_THREADS, MatrixDescriptor, POWER_PARTIAL_OFFSET,
};
use crate::layout::BatchLayout;
use crate::newton_schulz::{NORM_EPSILON, Schedule};
use crate::rounding::RoundingKey;
use crate::scaling::Scale;

/// Threads per CTA of every launch (8 warps).
pub const THREADS_PER_BLOCK: u32 = 256;
const _: () =
    assert!(THREADS_PER_BLOCK as usize <= MAX_THREADS && THREADS_PER_BLOCK.is_multiple_of(32));

/// The largest dimension, and the most elements of one row block, the kernels take: their
/// loop counters are 32-bit and step by up to `MAX_THREADS` past their bound, so the bound
/// must stay that far below 2^32; 2^31 - 1 leaves ample room.
pub const MAX_DIMENSION: usize = i32::MAX as usize;

/// Checks that `layout` fits the kernels: offsets aligned to 4 elements (as
/// [`BlockPolicy::CUDA`](crate::BlockPolicy::CUDA) does), dimensions and each block's
/// element count at most [`MAX_DIMENSION`], counts within a CUDA grid, and a partial that
/// fits in `max_shared_bytes` of shared memory per CTA.
pub fn check_layout(layout: &BatchLayout, max_shared_bytes: u32) -> Result<()> {
    if !layout.policy().align_elements.max(1).is_multiple_of(4) {
        return Err(Error::DeviceLimit(
            "the layout must align offsets to a multiple of 4 elements (BlockPolicy::CUDA)".into(),
        ));
    }
    let limit = i32::MAX as usize;
    if layout.blocks().len() > limit || layout.len() > limit {
        return Err(Error::DeviceLimit(format!(
            "{} matrices in {} blocks: at most {limit} of each (CUDA grid size)",
            layout.len(),
            layout.blocks().len()
        )));
    }
    for (index, entry) in layout.matrices().iter().enumerate() {
        let shape = entry.shape;
        let block_elements = entry.rows_per_block.checked_mul(shape.fan_in);
        if shape.fan_out > MAX_DIMENSION
            || shape.fan_in > MAX_DIMENSION
            || block_elements.is_none_or(|n| n > MAX_DIMENSION)
        {
            return Err(Error::DeviceLimit(format!(
                "matrix {index} is {}x{}: dimensions and the elements of one row block must \
                 be at most {MAX_DIMENSION}",
                shape.fan_out, shape.fan_in
            )));
        }
    }
    let needed = power_shared_bytes(layout)?;
    if needed > max_shared_bytes {
        return Err(Error::DeviceLimit(format!(
            "the largest fan_in needs {needed} bytes of shared memory per CTA for its partial, \
             the device allows {max_shared_bytes}"
        )));
    }
    Ok(())
}

/// Dynamic shared memory of the power pass: the `PowerShared` record plus the largest
/// partial (`4 * fan_in` bytes).
pub fn power_shared_bytes(layout: &BatchLayout) -> Result<u32> {
    let max_fan_in = layout.shapes().map(|s| s.fan_in).max().unwrap_or(1);
    u32::try_from(max_fan_in)
        .ok()
        .and_then(|n| n.checked_mul(4))
        .and_then(|n| n.checked_add(POWER_PARTIAL_OFFSET as u32))
        .ok_or_else(|| Error::DeviceLimit(format!("fan_in {max_fan_in} is too large")))
}

/// Device addresses of the optimizer state: flat `f32` buffers laid out by the
/// [`BatchLayout`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatePointers {
    /// Momentum, `layout.total_elements()` long (0 where no kernel reads it: the plain
    /// power pass).
    pub momentum: u64,
    /// Power vectors, `layout.total_vector_len()` long.
    pub power_vectors: u64,
    /// Partials, `layout.total_partial_len()` long.
    pub partials: u64,
}

/// The caller's buffers of one matrix, as device addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatrixPointers {
    /// `W` (for the plain power pass, the matrix whose norm is estimated).
    pub weights: u64,
    /// `G` (for the plain power pass, the same matrix again).
    pub grads: u64,
    /// The low-precision copy of the new weights (math §5a), or 0 for none.
    pub copy: u64,
}

/// The matrix descriptor table: per matrix the device addresses of its buffers
/// (`pointers[j]`), its momentum, power vector and partials (at the layout's offsets into
/// `state`), its shape, blocks, scale and flags. `types` are the element types of the
/// weights and of the gradients and copy.
///
/// A matrix moves in 4-element vectors ([`Flag::Quads`]) only when `fan_in` is a multiple of
/// 4 and every one of its addresses is aligned for that (16 bytes for `f32`, 8 for 16-bit
/// elements); the copy's alignment is a flag of its own ([`Flag::CopyQuads`]), which only
/// the update reads. `iterates` places each matrix's Newton–Schulz iterate (the
/// orthogonalised rule; `iterate` is 0 without it).
pub fn matrix_descriptors(
    layout: &BatchLayout,
    scale: Scale,
    types: StepTypes,
    state: StatePointers,
    pointers: &[MatrixPointers],
    iterates: Option<&IterateLayout>,
) -> Result<Vec<MatrixDescriptor>> {
    if pointers.len() != layout.len() {
        return Err(Error::MatrixCountMismatch {
            what: "pointer",
            expected: layout.len(),
            got: pointers.len(),
        });
    }
    let quad_bytes = |dtype: Dtype| 4 * dtype.size_bytes() as u64;
    let f32_address = |base: u64, offset: usize| {
        if base == 0 {
            0
        } else {
            base + 4 * offset as u64
        }
    };
    let table = layout
        .matrices()
        .iter()
        .zip(pointers)
        .enumerate()
        .map(|(index, (entry, buffers))| {
            let shape = entry.shape;
            let momentum = f32_address(state.momentum, entry.element_offset);
            let power_vector = f32_address(state.power_vectors, entry.vector_offset);
            let partials = f32_address(state.partials, entry.partial_offset);
            let quads = shape.fan_in.is_multiple_of(4)
                && buffers.weights.is_multiple_of(quad_bytes(types.weights()))
                && buffers.grads.is_multiple_of(quad_bytes(types.grads()))
                && [momentum, power_vector, partials]
                    .iter()
                    .all(|p| p.is_multiple_of(16));
            let mut flags = 0;
            if quads {
                flags |= Flag::Quads as u32;
            }
            if shape.is_vector() {
                flags |= Flag::Vector as u32;
            }
            if buffers.copy.is_multiple_of(quad_bytes(types.grads())) {
                flags |= Flag::CopyQuads as u32;
            }
            // check_layout has confirmed that every count below fits in 32 bits.
            MatrixDescriptor {
                weights: buffers.weights,
                grads: buffers.grads,
                copy: buffers.copy,
                momentum,
                power_vector,
                partials,
                iterate: iterates.map_or(0, |iterates| iterates.iterate_offset(index) as u64),
                fan_out: shape.fan_out as u32,
                fan_in: shape.fan_in as u32,
                first_block: entry.first_block as u32,
                block_count: entry.block_count as u32,
                scale: scale.factor(shape),
                flags,
            }
        })
        .collect();
    Ok(table)
}

/// The block descriptor table: per row block its matrix and row range.
pub fn block_descriptors(layout: &BatchLayout) -> Vec<BlockDescriptor> {
    layout
        .blocks()
        .iter()
        .map(|block| BlockDescriptor {
            matrix: block.matrix as u32,
            row_start: block.row_start as u32,
            row_end: block.row_end as u32,
        })
        .collect()
}

/// Device addresses of the tables and per-step buffers every launch reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TablePointers {
    /// Matrix descriptors ([`matrix_descriptors`]).
    pub matrices: u64,
    /// Block descriptors ([`block_descriptors`]).
    pub blocks: u64,
    /// `f32` per block: sums of `U^2`.
    pub block_sums: u64,
    /// One [`MatrixResult`](crate::kernels::records::MatrixResult) per matrix.
    pub results: u64,
    /// `u32` per matrix: 1 when the power vector is warm.
    pub warm: u64,
}

/// A kernel argument, in the order of the kernel's `.param` list.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LaunchArg {
    /// `.u64` (device addresses).
    U64(u64),
    /// `.u32`.
    U32(u32),
    /// `.f32`.
    F32(f32),
}

/// One kernel launch: which kernel, its grid, and its arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    /// The kernel.
    pub kernel: KernelId,
    /// `grid.x` (CTAs).
    pub grid: u32,
    /// `block.x` (threads per CTA).
    pub block: u32,
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
    /// Arguments, in `.param` order.
    pub args: Vec<LaunchArg>,
}

/// The momentum rule as the kernels take it (`beta`, `grad_coef`, `nesterov`; math §5.1).
fn momentum_args(config: &SpectralSgdConfig) -> [LaunchArg; 3] {
    let rule = config.momentum_rule();
    [
        LaunchArg::F32(rule.beta),
        LaunchArg::F32(rule.grad_coef),
        LaunchArg::U32(u32::from(rule.nesterov)),
    ]
}

/// The rounding of the new weights as both update kernels take it (`key0`, `key1`,
/// `step_lo`, `stochastic`; math §5a).
fn rounding_args(config: &SpectralSgdConfig, types: StepTypes, step: u64) -> [LaunchArg; 4] {
    let rounding = RoundingKey::new(config.seed, step);
    [
        LaunchArg::U32(rounding.key[0]),
        LaunchArg::U32(rounding.key[1]),
        LaunchArg::U32(rounding.step_lo),
        LaunchArg::U32(u32::from(config.rounds_stochastically(types.weights()))),
    ]
}

/// The launches of one optimizer step (math §5.2): `rounds` rounds of power pass and finish,
/// then the update. A warm step (`rounds == warm_iterations == 1`) is three launches.
/// Matrices that need fewer iterations than were launched (warm ones in a step that also
/// cold-starts others, vectors, skipped ones) sit the extra rounds out on the device
/// (math §4.7). The power passes read gradients of `types.grads()`; the update is the one
/// for `types`.
pub fn step_launches(
    layout: &BatchLayout,
    config: &SpectralSgdConfig,
    types: StepTypes,
    tables: TablePointers,
    rounds: u32,
    step: u64,
) -> Result<Vec<Launch>> {
    let blocks = layout.blocks().len() as u32;
    let shared = power_shared_bytes(layout)?;
    let momentum = momentum_args(config);
    let mut launches = Vec::with_capacity(2 * rounds as usize + 1);
    for round in 0..rounds {
        let mut args = vec![
            LaunchArg::U64(tables.matrices),
            LaunchArg::U64(tables.blocks),
            LaunchArg::U64(tables.block_sums),
            LaunchArg::U64(tables.results),
            LaunchArg::U32(round),
        ];
        args.extend(momentum);
        launches.push(Launch {
            kernel: KernelId::PowerStep(types.grads()),
            grid: blocks,
            block: THREADS_PER_BLOCK,
            shared_bytes: shared,
            args,
        });
        launches.push(finish_launch(layout, config, tables, round, step));
    }
    let mut args = vec![
        LaunchArg::U64(tables.matrices),
        LaunchArg::U64(tables.blocks),
        LaunchArg::U64(tables.results),
    ];
    args.extend(momentum);
    args.extend(rounding_args(config, types, step));
    launches.push(Launch {
        kernel: KernelId::Update(types),
        grid: blocks,
        block: THREADS_PER_BLOCK,
        shared_bytes: 0,
        args,
    });
    Ok(launches)
}

/// Device addresses of the orthogonalised rule's buffers, laid out by an [`IterateLayout`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IteratePointers {
    /// Two `bf16` iterate buffers, used in turn; the last iterate is always in `iterates[0]`.
    pub iterates: [u64; 2],
    /// `A` (`bf16`), one Gram buffer.
    pub gram: u64,
    /// `A^2` (`f32`), one Gram buffer.
    pub gram_square: u64,
    /// `P` (`bf16`), one Gram buffer.
    pub polynomial: u64,
    /// `f64` per block: the blocks' `||U||_F^2`.
    pub block_norms: u64,
}

/// One enqueued operation of a step: a kernel launch or a batch of products.
#[derive(Clone, Debug, PartialEq)]
pub enum Operation {
    /// A kernel of this crate.
    Launch(Launch),
    /// A strided batch of `bf16` products (cuBLAS on a GPU).
    Gemm(Gemm),
}

/// CTAs of an element-wise launch over `elements` elements (each thread loops past the grid).
fn element_grid(elements: usize) -> u32 {
    elements
        .div_ceil(THREADS_PER_BLOCK as usize)
        .clamp(1, 65_535) as u32
}

/// The operations of one orthogonalised step (math §5b), in order: `orth_norm` and
/// `orth_start` (the decision and `X_0`), per iteration and per shape group the products
/// `A = X Xᵀ` (`Xᵀ X` for a tall group), `A^2`, the polynomial `P = a I + b A + c A^2` and
/// `X <- P X` (`X Pᵀ`), then `orth_check` and the update. The start goes to the iterate
/// buffer that makes the last iterate land in `buffers.iterates[0]`.
#[allow(clippy::too_many_arguments)]
pub fn orthogonal_step_operations(
    layout: &BatchLayout,
    iterates: &IterateLayout,
    config: &SpectralSgdConfig,
    schedule: &Schedule,
    types: StepTypes,
    tables: TablePointers,
    buffers: IteratePointers,
    step: u64,
) -> Result<Vec<Operation>> {
    let coefficients = schedule.coefficients()?;
    let triples = coefficients.as_slice();
    let blocks = layout.blocks().len() as u32;
    let momentum = momentum_args(config);
    let mut operations = Vec::new();
    let per_block = |kernel: KernelId, args: Vec<LaunchArg>| {
        Operation::Launch(Launch {
            kernel,
            grid: blocks,
            block: THREADS_PER_BLOCK,
            shared_bytes: 0,
            args,
        })
    };
    let mut args = vec![
        LaunchArg::U64(tables.matrices),
        LaunchArg::U64(tables.blocks),
        LaunchArg::U64(buffers.block_norms),
    ];
    args.extend(momentum);
    operations.push(per_block(KernelId::OrthNorm(types.grads()), args));
    let mut current = triples.len() % 2;
    let mut args = vec![
        LaunchArg::U64(tables.matrices),
        LaunchArg::U64(tables.blocks),
        LaunchArg::U64(buffers.block_norms),
        LaunchArg::U64(tables.results),
        LaunchArg::U64(buffers.iterates[current]),
        LaunchArg::F32(schedule.norm_factor()),
        LaunchArg::F32(NORM_EPSILON),
        LaunchArg::F32(config.learning_rate),
        LaunchArg::F32(crate::policy::decay(
            config.learning_rate,
            config.weight_decay,
        )),
    ];
    args.extend(momentum);
    operations.push(per_block(KernelId::OrthStart(types.grads()), args));
    for &(a, b, c) in triples {
        let (from, to) = (buffers.iterates[current], buffers.iterates[1 - current]);
        for group in iterates.groups() {
            let (short, long, count) =
                (group.short_side(), group.long_side(), group.matrices.len());
            let tall = group.is_tall();
            let x = from + 2 * group.iterate_offset as u64;
            let next = to + 2 * group.iterate_offset as u64;
            let gram = buffers.gram + 2 * group.gram_offset as u64;
            let gram_square = buffers.gram_square + 4 * group.gram_offset as u64;
            let polynomial = buffers.polynomial + 2 * group.gram_offset as u64;
            let batch = |m, n, k, transpose_a, transpose_b| GemmBatch {
                m,
                n,
                k,
                batch: count,
                transpose_a,
                transpose_b,
                alpha: 1.0,
                beta: 0.0,
            };
            // A = X Xᵀ (wide: X is short x long) or Xᵀ X (tall: X is long x short).
            operations.push(Operation::Gemm(Gemm {
                batch: batch(short, short, long, tall, !tall),
                a: x,
                b: x,
                c: gram,
                output: GemmOutput::Bf16,
            }));
            operations.push(Operation::Gemm(Gemm {
                batch: batch(short, short, short, false, false),
                a: gram,
                b: gram,
                c: gram_square,
                output: GemmOutput::F32,
            }));
            operations.push(Operation::Launch(Launch {
                kernel: KernelId::OrthPolynomial,
                grid: element_grid(group.gram_elements()),
                block: THREADS_PER_BLOCK,
                shared_bytes: 0,
                args: vec![
                    LaunchArg::U64(gram),
                    LaunchArg::U64(gram_square),
                    LaunchArg::U64(polynomial),
                    LaunchArg::U32(short as u32),
                    LaunchArg::U32(group.gram_elements() as u32),
                    LaunchArg::F32(a),
                    LaunchArg::F32(b),
                    LaunchArg::F32(c),
                ],
            }));
            // X <- P X (wide) or X Pᵀ (tall).
            operations.push(Operation::Gemm(if tall {
                Gemm {
                    batch: batch(long, short, short, false, true),
                    a: x,
                    b: polynomial,
                    c: next,
                    output: GemmOutput::Bf16,
                }
            } else {
                Gemm {
                    batch: batch(short, long, short, false, false),
                    a: polynomial,
                    b: x,
                    c: next,
                    output: GemmOutput::Bf16,
                }
            }));
        }
        current = 1 - current;
    }
    debug_assert_eq!(current, 0, "the last iterate is in iterates[0]");
    operations.push(per_block(
        KernelId::OrthCheck,
        vec![
            LaunchArg::U64(tables.matrices),
            LaunchArg::U64(tables.blocks),
            LaunchArg::U64(tables.results),
            LaunchArg::U64(buffers.iterates[0]),
        ],
    ));
    let mut args = vec![
        LaunchArg::U64(tables.matrices),
        LaunchArg::U64(tables.blocks),
        LaunchArg::U64(tables.results),
        LaunchArg::U64(buffers.iterates[0]),
    ];
    args.extend(momentum);
    args.extend(rounding_args(config, types, step));
    operations.push(per_block(KernelId::OrthUpdate(types), args));
    Ok(operations)
}

/// The launches of `iterations` power iterations on stored matrices (the descriptors'
/// `weights`): plain power pass and finish per iteration, with every matrix taking part in
/// all of them unless its estimate ends early (vector, zero, non-finite, re-seeded).
pub fn power_launches(
    layout: &BatchLayout,
    dtype: Dtype,
    tables: TablePointers,
    iterations: u32,
) -> Result<Vec<Launch>> {
    let blocks = layout.blocks().len() as u32;
    let shared = power_shared_bytes(layout)?;
    let config = plain_power_config(iterations);
    let mut launches = Vec::with_capacity(2 * iterations as usize);
    for iteration in 0..iterations {
        launches.push(Launch {
            kernel: KernelId::PowerPlain(dtype),
            grid: blocks,
            block: THREADS_PER_BLOCK,
            shared_bytes: shared,
            args: vec![
                LaunchArg::U64(tables.matrices),
                LaunchArg::U64(tables.blocks),
                LaunchArg::U64(tables.block_sums),
                LaunchArg::U64(tables.results),
                LaunchArg::U32(iteration),
                LaunchArg::F32(0.0),
                LaunchArg::F32(1.0),
                LaunchArg::U32(0),
            ],
        });
        launches.push(finish_launch(layout, &config, tables, iteration, 0));
    }
    Ok(launches)
}

/// The finish's settings for plain power iteration: every matrix takes `iterations`, warm or
/// not, and no update coefficient is needed (`eta = 0`).
fn plain_power_config(iterations: u32) -> SpectralSgdConfig {
    SpectralSgdConfig {
        learning_rate: 0.0,
        warm_iterations: iterations,
        cold_iterations: iterations,
        ..SpectralSgdConfig::default()
    }
}

fn finish_launch(
    layout: &BatchLayout,
    config: &SpectralSgdConfig,
    tables: TablePointers,
    iteration: u32,
    step: u64,
) -> Launch {
    Launch {
        kernel: KernelId::Finish,
        grid: layout.len() as u32,
        block: THREADS_PER_BLOCK,
        shared_bytes: 0,
        args: vec![
            LaunchArg::U64(tables.matrices),
            LaunchArg::U64(tables.block_sums),
            LaunchArg::U64(tables.results),
            LaunchArg::U64(tables.warm),
            LaunchArg::U32(iteration),
            LaunchArg::U32(config.warm_iterations),
            LaunchArg::U32(config.cold_iterations),
            LaunchArg::F32(config.learning_rate),
            LaunchArg::F32(config.weight_decay),
            LaunchArg::U32(crate::policy::reseed_step(step)),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{BlockPolicy, MatrixShape};

    /// The 4-wide path is chosen exactly when `fan_in % 4 == 0` and every address allows it.
    #[test]
    fn quads_flag_needs_a_multiple_of_four_and_aligned_addresses() {
        let shapes = [
            MatrixShape::new(8, 12),
            MatrixShape::new(8, 10),
            MatrixShape::new(5, 1),
        ];
        let layout = BatchLayout::new(&shapes, BlockPolicy::CUDA).unwrap();
        let state = StatePointers {
            momentum: 0x1000,
            power_vectors: 0x2000,
            partials: 0x3000,
        };
        let flags = |dtype: Dtype, weights: u64, grads: u64| -> Vec<u32> {
            let pointers = MatrixPointers {
                weights,
                grads,
                copy: 0,
            };
            matrix_descriptors(
                &layout,
                Scale::Spectral,
                StepTypes::same(dtype),
                state,
                &[pointers; 3],
                None,
            )
            .unwrap()
            .iter()
            .map(|d| d.flags)
            .collect()
        };
        // No copy (address 0) counts as aligned.
        let copy = Flag::CopyQuads as u32;
        let (quads, vector) = (Flag::Quads as u32 | copy, Flag::Vector as u32 | copy);
        assert_eq!(flags(Dtype::F32, 0x100, 0x200), [quads, copy, vector]);
        assert_eq!(
            flags(Dtype::F32, 0x108, 0x200),
            [copy, copy, vector],
            "W not 16-byte aligned"
        );
        assert_eq!(
            flags(Dtype::Bf16, 0x108, 0x208),
            [quads, copy, vector],
            "8 bytes suffice"
        );
        assert_eq!(flags(Dtype::Bf16, 0x104, 0x208), [copy, copy, vector]);
        // f32 master weights with bf16 gradients and copy: each aligned for its own size.
        let mixed = |weights: u64, copy: u64| -> Vec<u32> {
            let pointers = MatrixPointers {
                weights,
                grads: 0x208,
                copy,
            };
            let types = StepTypes::new(Dtype::F32, Dtype::Bf16).unwrap();
            matrix_descriptors(&layout, Scale::Spectral, types, state, &[pointers; 3], None)
                .unwrap()
                .iter()
                .map(|d| d.flags)
                .collect()
        };
        assert_eq!(mixed(0x100, 0x308), [quads, copy, vector]);
        assert_eq!(
            mixed(0x108, 0x308),
            [copy, copy, vector],
            "f32 W needs 16 bytes"
        );
        let (only_quads, only_vector) = (Flag::Quads as u32, Flag::Vector as u32);
        assert_eq!(
            mixed(0x100, 0x304),
            [only_quads, 0, only_vector],
            "a copy not 8-byte aligned leaves the power pass's flags alone"
        );
    }

    #[test]
    fn descriptors_point_at_the_layout_offsets() {
        let shapes = [MatrixShape::new(3, 5), MatrixShape::new(7, 2)];
        let layout = BatchLayout::new(&shapes, BlockPolicy::CUDA).unwrap();
        let state = StatePointers {
            momentum: 1 << 20,
            power_vectors: 2 << 20,
            partials: 3 << 20,
        };
        let pointers = |weights: [u64; 2], grads: [u64; 2]| -> Vec<MatrixPointers> {
            weights
                .iter()
                .zip(grads)
                .map(|(&weights, grads)| MatrixPointers {
                    weights,
                    grads,
                    copy: 0,
                })
                .collect()
        };
        let f32_step = StepTypes::same(Dtype::F32);
        let table = matrix_descriptors(
            &layout,
            Scale::Spectral,
            f32_step,
            state,
            &pointers([8, 16], [24, 32]),
            None,
        )
        .unwrap();
        for (entry, descriptor) in layout.matrices().iter().zip(&table) {
            assert_eq!(
                descriptor.momentum,
                state.momentum + 4 * entry.element_offset as u64
            );
            assert_eq!(
                descriptor.power_vector,
                state.power_vectors + 4 * entry.vector_offset as u64
            );
            assert_eq!(
                descriptor.partials,
                state.partials + 4 * entry.partial_offset as u64
            );
            assert_eq!(descriptor.first_block as usize, entry.first_block);
        }
        assert_eq!((table[1].weights, table[1].grads), (16, 32));
        let no_momentum = StatePointers {
            momentum: 0,
            ..state
        };
        let table = matrix_descriptors(
            &layout,
            Scale::Spectral,
            f32_step,
            no_momentum,
            &pointers([8, 16], [8, 16]),
            None,
        )
        .unwrap();
        assert!(table.iter().all(|d| d.momentum == 0));
        assert!(matches!(
            matrix_descriptors(
                &layout,
                Scale::Spectral,
                f32_step,
                state,
                &pointers([8, 16], [8, 16])[..1],
                None,
            ),
            Err(Error::MatrixCountMismatch { .. })
        ));
    }
}
