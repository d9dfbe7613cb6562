//! The PTX kernels (SPEC 4 and 5) as built by `build.rs`, and the host-side description of how
//! they are launched: descriptor tables, launch shapes and the launch sequence of a step.
//!
//! Everything here is plain data, shared by the CUDA backend ([`crate::cuda`]) and by the
//! simulator tests, which run the same kernel text in `ptx-sim` on machines without a GPU.
//! The batch itself is described once, by [`BatchLayout`] with [`BlockPolicy::CUDA`](crate::BlockPolicy::CUDA): one CTA
//! per [`RowBlock`](crate::RowBlock) in the power pass and the update, one CTA per matrix in
//! the finish.
//!
//! | kernel | module | grid | SPEC |
//! | --- | --- | --- | --- |
//! | `power_step_{T}` | fused power pass on `U = f(G, M)` | blocks | 4, 5 (pass A) |
//! | `power_plain_{T}` | fused power pass on a stored matrix | blocks | 4 |
//! | `power_finish` | partials → `sigma`, `v`, coefficients | matrices | 4 |
//! | `update_{T}` | `M <- M_new`, `W <- decay W - coefficient U` | blocks | 5 (pass B) |
//!
//! ```
//! use spectral_step::kernels;
//! let module = kernels::module("update_bf16").expect("built by build.rs");
//! assert!(module.ptx.contains(".entry update_bf16"));
//! // Cubins are present when ptxas was found at build time.
//! for cubin in module.cubins {
//!     assert!([80, 86, 89, 90].contains(&cubin.arch));
//! }
//! ```

use crate::config::{MomentumKind, SpectralSgdConfig};
use crate::element::Dtype;
use crate::error::{Error, Result};
use crate::layout::BatchLayout;
use crate::report::{MatrixReport, MatrixStatus};
use crate::scaling::Scale;

/// A cubin: the module assembled by ptxas for one architecture.
#[derive(Clone, Copy, Debug)]
pub struct Cubin {
    /// Compute capability times ten: 80, 86, 89 or 90.
    pub arch: u32,
    /// The ELF image, as ptxas wrote it.
    pub image: &'static [u8],
}

/// One kernel module: its expanded PTX text and the cubins assembled from it.
#[derive(Clone, Copy, Debug)]
pub struct KernelModule {
    /// The module's single `.entry`, e.g. `power_step_f32`.
    pub name: &'static str,
    /// The expanded PTX (what the simulator runs and the driver JITs when no cubin fits).
    pub ptx: &'static str,
    /// Cubins for sm_80, sm_86, sm_89 and sm_90; empty when ptxas was not found at build time.
    pub cubins: &'static [Cubin],
}

impl KernelModule {
    /// The cubin for compute capability `arch` (e.g. 90), if one was assembled.
    pub fn cubin(&self, arch: u32) -> Option<&'static [u8]> {
        self.cubins.iter().find(|c| c.arch == arch).map(|c| c.image)
    }
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Every module the build produced.
pub fn modules() -> &'static [KernelModule] {
    MODULES
}

/// The module whose entry is `name`.
pub fn module(name: &str) -> Option<&'static KernelModule> {
    MODULES.iter().find(|m| m.name == name)
}

/// The ptxas release line (e.g. `Cuda compilation tools, release 13.5, V13.5.37`) when the
/// kernels were assembled at build time, `None` for a PTX-only build.
pub fn ptxas_version() -> Option<&'static str> {
    PTXAS_VERSION
}

/// ptxas's `-v` output for every module and architecture: registers, shared memory, spills.
pub fn ptxas_report() -> &'static str {
    PTXAS_REPORT
}

/// Threads per CTA of every kernel (8 warps).
pub const THREADS_PER_BLOCK: u32 = 256;
/// Fixed part of the power pass's dynamic shared memory (dots, `t_i`, warp sums).
pub const POWER_SHARED_FIXED_BYTES: u32 = 1280;
/// Bytes per matrix descriptor.
pub const MATRIX_DESCRIPTOR_BYTES: usize = 64;
/// Bytes per block descriptor.
pub const BLOCK_DESCRIPTOR_BYTES: usize = 16;
/// Bytes per matrix in the results table.
pub const RESULT_BYTES: usize = 32;

/// Descriptor flag: rows (and the update's elements) move as 4-element vectors.
const FLAG_QUADS: u32 = 1;
/// Descriptor flag: the matrix is a row or column vector (`sigma` exact after one pass).
const FLAG_VECTOR: u32 = 2;

/// Status codes the finish kernel writes.
const STATUS_UPDATED: u32 = 0;
const STATUS_ZERO: u32 = 1;
const STATUS_NON_FINITE: u32 = 2;
const STATUS_SIGMA_TOO_SMALL: u32 = 3;

/// The entry name of a kernel for element type `dtype`.
pub fn power_step_kernel(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "power_step_f32",
        Dtype::F16 => "power_step_f16",
        Dtype::Bf16 => "power_step_bf16",
    }
}

/// The plain power pass (on a stored matrix) for `dtype`.
pub fn power_plain_kernel(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "power_plain_f32",
        Dtype::F16 => "power_plain_f16",
        Dtype::Bf16 => "power_plain_bf16",
    }
}

/// The finish kernel (one for all element types).
pub const FINISH_KERNEL: &str = "power_finish";

/// The update (pass B) for `dtype`.
pub fn update_kernel(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "update_f32",
        Dtype::F16 => "update_f16",
        Dtype::Bf16 => "update_bf16",
    }
}

/// Checks that `layout` fits the kernels: [`BlockPolicy::CUDA`](crate::BlockPolicy::CUDA)'s alignment, dimensions and
/// counts in 32 bits, and a partial that fits in `max_shared_bytes` of shared memory per CTA.
pub fn check_layout(layout: &BatchLayout, max_shared_bytes: u32) -> Result<()> {
    if !layout.policy().align_elements.is_multiple_of(4) {
        return Err(Error::DeviceLimit(
            "the layout must align offsets to 4 elements (BlockPolicy::CUDA)".into(),
        ));
    }
    let limit = (i32::MAX as usize).min(u32::MAX as usize);
    if layout.blocks().len() > limit || layout.len() > limit {
        return Err(Error::DeviceLimit(format!(
            "{} matrices in {} blocks: at most {limit} of each (CUDA grid size)",
            layout.len(),
            layout.blocks().len()
        )));
    }
    for (index, entry) in layout.matrices().iter().enumerate() {
        let shape = entry.shape;
        if shape.fan_out > u32::MAX as usize || shape.fan_in > u32::MAX as usize {
            return Err(Error::DeviceLimit(format!(
                "matrix {index} is {}x{}: both dimensions must fit in 32 bits",
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

/// Dynamic shared memory of the power pass: the fixed part plus the largest partial.
pub fn power_shared_bytes(layout: &BatchLayout) -> Result<u32> {
    let max_fan_in = layout.shapes().map(|s| s.fan_in).max().unwrap_or(1);
    u32::try_from(max_fan_in)
        .ok()
        .and_then(|n| n.checked_mul(4))
        .and_then(|n| n.checked_add(POWER_SHARED_FIXED_BYTES))
        .ok_or_else(|| Error::DeviceLimit(format!("fan_in {max_fan_in} is too large")))
}

/// Device addresses of the optimizer state, flat buffers laid out by the [`BatchLayout`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatePointers {
    /// `f32` momentum, `layout.total_elements()` long (unused by the plain power pass).
    pub momentum: u64,
    /// `f32` power vectors, `layout.total_vector_len()` long.
    pub power_vectors: u64,
    /// `f32` partials, `layout.total_partial_len()` long.
    pub partials: u64,
}

/// The matrix descriptor table (see `kernels/power_pass.ptx`): per matrix the device
/// addresses of `W` (`weights[j]`, or the stored matrix for the plain pass), `G`
/// (`grads[j]`), its momentum, power vector and partials, its shape, blocks, scale and flags.
///
/// A matrix moves in 4-element vectors only when `fan_in` is a multiple of 4 and every one of
/// its addresses is aligned for that (16 bytes for `f32`, 8 for 16-bit elements).
pub fn matrix_descriptors(
    layout: &BatchLayout,
    scale: Scale,
    dtype: Dtype,
    state: StatePointers,
    weights: &[u64],
    grads: &[u64],
) -> Result<Vec<u8>> {
    if weights.len() != layout.len() || grads.len() != layout.len() {
        return Err(Error::MatrixCountMismatch {
            what: "pointer",
            expected: layout.len(),
            got: weights.len().min(grads.len()),
        });
    }
    let element_bytes = dtype.size_bytes() as u64;
    let mut table = Vec::with_capacity(layout.len() * MATRIX_DESCRIPTOR_BYTES);
    for (entry, (&weight, &grad)) in layout.matrices().iter().zip(weights.iter().zip(grads)) {
        let shape = entry.shape;
        let partial_offset = layout.blocks()[entry.first_block].partial_offset;
        let momentum = state.momentum + 4 * entry.element_offset as u64;
        let vector = state.power_vectors + 4 * entry.vector_offset as u64;
        let partials = state.partials + 4 * partial_offset as u64;
        let quads = shape.fan_in % 4 == 0
            && weight % (4 * element_bytes) == 0
            && grad % (4 * element_bytes) == 0
            && [momentum, vector, partials].iter().all(|p| p % 16 == 0);
        let flags =
            if quads { FLAG_QUADS } else { 0 } | if shape.is_vector() { FLAG_VECTOR } else { 0 };
        for pointer in [weight, grad, momentum, vector, partials] {
            table.extend_from_slice(&pointer.to_le_bytes());
        }
        for word in [
            shape.fan_out as u32,
            shape.fan_in as u32,
            entry.first_block as u32,
            entry.block_count as u32,
        ] {
            table.extend_from_slice(&word.to_le_bytes());
        }
        table.extend_from_slice(&scale.factor(shape).to_le_bytes());
        table.extend_from_slice(&flags.to_le_bytes());
    }
    Ok(table)
}

/// The block descriptor table: per row block its matrix and row range.
pub fn block_descriptors(layout: &BatchLayout) -> Vec<u8> {
    let mut table = Vec::with_capacity(layout.blocks().len() * BLOCK_DESCRIPTOR_BYTES);
    for block in layout.blocks() {
        for word in [
            block.matrix as u32,
            block.row_start as u32,
            block.row_end as u32,
            0,
        ] {
            table.extend_from_slice(&word.to_le_bytes());
        }
    }
    table
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
    /// [`RESULT_BYTES`] per matrix: what the finish kernel decided.
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

/// One kernel launch: which entry, its grid, and its arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    /// Entry name (also the module name).
    pub kernel: &'static str,
    /// `grid.x` (CTAs).
    pub grid: u32,
    /// `block.x` (threads per CTA).
    pub block: u32,
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
    /// Arguments, in `.param` order.
    pub args: Vec<LaunchArg>,
}

/// The momentum rule as the kernels take it: `M_new = beta M + grad_coef G`.
fn momentum_args(config: &SpectralSgdConfig) -> [LaunchArg; 3] {
    let grad_coef = match config.momentum_kind {
        MomentumKind::HeavyBall => 1.0,
        MomentumKind::Ema => 1.0 - config.momentum,
    };
    [
        LaunchArg::F32(config.momentum),
        LaunchArg::F32(grad_coef),
        LaunchArg::U32(u32::from(config.nesterov)),
    ]
}

/// The launches of one optimizer step (SPEC 5): `iterations` rounds of power pass and finish,
/// then the update. A warm step (`iterations == warm_iterations == 1`) is three launches.
/// Matrices that need fewer iterations than were launched (warm ones in a step that also
/// cold-starts others, vectors, skipped ones) sit the extra rounds out on the device.
pub fn step_launches(
    layout: &BatchLayout,
    config: &SpectralSgdConfig,
    dtype: Dtype,
    tables: TablePointers,
    iterations: u32,
    step: u64,
) -> Result<Vec<Launch>> {
    let blocks = layout.blocks().len() as u32;
    let shared = power_shared_bytes(layout)?;
    let momentum = momentum_args(config);
    let mut launches = Vec::with_capacity(2 * iterations as usize + 1);
    for iteration in 0..iterations {
        let mut args = vec![
            LaunchArg::U64(tables.matrices),
            LaunchArg::U64(tables.blocks),
            LaunchArg::U64(tables.block_sums),
            LaunchArg::U64(tables.results),
            LaunchArg::U32(iteration),
        ];
        args.extend(momentum);
        launches.push(Launch {
            kernel: power_step_kernel(dtype),
            grid: blocks,
            block: THREADS_PER_BLOCK,
            shared_bytes: shared,
            args,
        });
        launches.push(finish_launch(layout, config, tables, iteration, step));
    }
    let mut args = vec![
        LaunchArg::U64(tables.matrices),
        LaunchArg::U64(tables.blocks),
        LaunchArg::U64(tables.results),
    ];
    args.extend(momentum);
    launches.push(Launch {
        kernel: update_kernel(dtype),
        grid: blocks,
        block: THREADS_PER_BLOCK,
        shared_bytes: 0,
        args,
    });
    Ok(launches)
}

/// The launches of `iterations` power iterations on stored matrices (descriptor word 0):
/// plain power pass and finish per iteration. `warm` decides nothing here: every matrix gets
/// all `iterations` unless its estimate ends early (vector, zero, non-finite).
pub fn power_launches(
    layout: &BatchLayout,
    dtype: Dtype,
    tables: TablePointers,
    iterations: u32,
) -> Result<Vec<Launch>> {
    let blocks = layout.blocks().len() as u32;
    let shared = power_shared_bytes(layout)?;
    let config = SpectralSgdConfig {
        learning_rate: 0.0,
        warm_iterations: iterations,
        cold_iterations: iterations,
        ..SpectralSgdConfig::default()
    };
    let mut launches = Vec::with_capacity(2 * iterations as usize);
    for iteration in 0..iterations {
        launches.push(Launch {
            kernel: power_plain_kernel(dtype),
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

fn finish_launch(
    layout: &BatchLayout,
    config: &SpectralSgdConfig,
    tables: TablePointers,
    iteration: u32,
    step: u64,
) -> Launch {
    Launch {
        kernel: FINISH_KERNEL,
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
            LaunchArg::U32(step as u32),
        ],
    }
}

/// Reads the results table ([`RESULT_BYTES`] per matrix) into per-matrix reports, with the
/// same meaning as the CPU path's.
pub fn decode_results(results: &[u8]) -> Result<Vec<MatrixReport>> {
    if !results.len().is_multiple_of(RESULT_BYTES) {
        return Err(Error::InvalidArgument(format!(
            "a results table is {RESULT_BYTES} bytes per matrix, got {} bytes",
            results.len()
        )));
    }
    results
        .chunks_exact(RESULT_BYTES)
        .enumerate()
        .map(|(index, record)| {
            let word = |k: usize| {
                u32::from_le_bytes([
                    record[4 * k],
                    record[4 * k + 1],
                    record[4 * k + 2],
                    record[4 * k + 3],
                ])
            };
            let sigma = f32::from_bits(word(0));
            Ok(match word(1) {
                STATUS_UPDATED => MatrixReport {
                    sigma: Some(sigma),
                    status: MatrixStatus::Updated,
                },
                STATUS_ZERO => MatrixReport {
                    sigma: Some(0.0),
                    status: MatrixStatus::ZeroDirection,
                },
                STATUS_NON_FINITE => MatrixReport {
                    sigma: None,
                    status: MatrixStatus::SkippedNonFinite,
                },
                STATUS_SIGMA_TOO_SMALL => MatrixReport {
                    sigma: Some(sigma),
                    status: MatrixStatus::SkippedNonFinite,
                },
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "results table: matrix {index} has unknown status {other}"
                    )));
                }
            })
        })
        .collect()
}

/// How many power iterations a step launches: `warm_iterations`, or the larger of the two
/// counts when the host knows that some power vector is cold (first step, after a reset or a
/// state load). The host never reads device state inside a step, so a vector the finish
/// kernel re-seeds on the device gets `warm_iterations` on its next step; the Frobenius floor
/// keeps that step's update within `sqrt(min(m, n))` of its target.
pub fn iterations_to_launch(config: &SpectralSgdConfig, any_cold: bool) -> u32 {
    if any_cold {
        config.warm_iterations.max(config.cold_iterations)
    } else {
        config.warm_iterations
    }
}
