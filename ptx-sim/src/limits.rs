//! The simulator's limits on what PTX text and launches may ask for.
//!
//! Every limit is checked before anything proportional to it is allocated, and exceeding one
//! is a typed error ([`SimError::Parse`](crate::SimError::Parse) naming the line,
//! [`SimError::Launch`](crate::SimError::Launch), [`SimError::Memory`](crate::SimError::Memory),
//! or a [`Fault::RunAway`](crate::Fault::RunAway) fault), never an abort or a hang. The launch
//! limits are CUDA's; the others are far above what real kernels use and only stop hostile or
//! broken input.

/// Registers (`.reg` names, ranges counted by their size) one kernel may declare: 65536.
///
/// PTX registers are virtual (ptxas maps them onto at most 255 per thread); hand-written
/// kernels such as spectral-step's declare under a hundred, and compiled ones hundreds to a
/// few thousand. The limit bounds each CTA's simulated register file, 8 bytes per register per
/// thread: at most 512 MiB for a CTA of 1024 threads. It is checked before a `%r<N>` range is
/// expanded into names.
pub const MAX_KERNEL_REGISTERS: u64 = 1 << 16;

/// Registers all the kernels of one module may declare together: 2^20 (16 kernels at
/// [`MAX_KERNEL_REGISTERS`]; spectral-step's modules declare a few thousand). Each declared
/// register keeps its name in the decoded kernel, so this bounds what a short text of many
/// kernels with `%r<65536>` ranges decodes into: about 50 MB and half a second of parsing.
pub const MAX_MODULE_REGISTERS: u64 = 1 << 20;

/// Shared-variable entries all the kernels of one module may hold together: 2^20. Every kernel
/// holds its own copy of the module-level `.shared` variables, so a text with many of both
/// would otherwise decode into their product.
pub const MAX_MODULE_SHARED_VARIABLES: u64 = 1 << 20;

/// Bytes of one kernel's parameter block: 32764, CUDA's limit for kernel parameters (since
/// CUDA 12.1 on Volta and later; 4096 before).
pub const MAX_PARAM_BYTES: u32 = 32764;

/// CTAs per grid dimension: CUDA's `2^31 - 1` in x and 65535 in y and z.
pub const MAX_GRID: [u32; 3] = [(1 << 31) - 1, 65535, 65535];

/// Threads per CTA dimension: CUDA's 1024 in x and y and 64 in z.
pub const MAX_BLOCK: [u32; 3] = [1024, 1024, 64];

/// Threads per CTA: CUDA's 1024.
pub const MAX_BLOCK_THREADS: u32 = 1024;

/// Static plus dynamic shared memory per CTA, in bytes: 232448 (227 KiB), the most any current
/// NVIDIA GPU grants a CTA (the H100's and H200's opt-in maximum; an A100 allows 163 KiB).
pub const MAX_SHARED_BYTES: u32 = 232_448;

/// The step limit [`LaunchConfig::linear`](crate::LaunchConfig::linear) sets: 2^22 (4.2 M)
/// warp-instructions per launch.
///
/// Measured on a 2-core Xeon (test and bench profiles), a runaway loop spends it in 0.07 s on
/// one lane (`L: bra L;`, 60 M warp-instructions/s), 1.3 to 1.4 s on a full warp of arithmetic
/// (3 M/s), and 4.6 to 5.3 s on the slowest mix measured, a full warp loading and storing 32
/// bytes of shared memory per lane (0.8 to 0.9 M/s, every access race-checked); `README.md`
/// has the table, and `cargo bench -p ptx-sim --bench sim_speed` measures it again. Real
/// kernels need far less: the largest launch of spectral-step's kernel conformance suite
/// issues 0.16 M warp-instructions, and the 512x512 fused power pass of this crate's
/// benchmark 0.27 M. Set [`LaunchConfig::step_limit`](crate::LaunchConfig::step_limit) for
/// bigger launches.
pub const DEFAULT_STEP_LIMIT: u64 = 1 << 22;

/// The device memory limit [`Device::new`](crate::Device::new) sets: 4 GiB of live
/// allocations.
///
/// The simulator keeps two host bytes per device byte (the contents and a per-byte flag for
/// the `.nc` check), so this is 8 GiB of host memory, which a CI runner has: a runaway size is
/// a [`SimError::Memory`](crate::SimError::Memory) from
/// [`Device::try_alloc`](crate::Device::try_alloc) instead of the process being killed for
/// memory. Tests that need more raise it with
/// [`Device::set_memory_limit`](crate::Device::set_memory_limit).
pub const DEFAULT_MEMORY_LIMIT: u64 = 4 << 30;

/// Bytes of per-CTA state (registers, program counters, shared memory and its shadow state)
/// that count as one step against a launch's step limit, so that a grid of many CTAs that each
/// run few instructions, or CTAs with large register files, are bounded in time by the step
/// limit too. Setting up that much state costs about what one warp-instruction does.
pub const SETUP_BYTES_PER_STEP: u64 = 256;
