//! The records that host code and the PTX kernels share, defined once.
//!
//! This file is compiled twice: into the crate (`spectral_step::kernels`), where the backends
//! build and read these records, and into the build script, which substitutes the offsets,
//! sizes and constants below for the named placeholders of the kernel templates
//! (`[%desc+{{MatrixDescriptor.fan_in}}]`, `{{Status.NonFinite}}`, ...). Moving or adding a
//! field here changes the kernels with it; no offset is written anywhere else.
//!
//! Every record is `#[repr(C)]` and derives `bytemuck::Pod`, which fails to compile if a
//! field order leaves padding, so a table is exactly its bytes. All fields are little-endian
//! on the device.

use bytemuck::{Pod, Zeroable};

/// Defines a `#[repr(C)]` `Pod` record and the table of its field offsets
/// (`Record::FIELDS`), which the build script turns into template placeholders.
macro_rules! record {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$field_meta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
        pub struct $name {
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        impl Default for $name {
            /// All zeros.
            fn default() -> Self {
                Zeroable::zeroed()
            }
        }

        impl $name {
            /// `(field name, byte offset)` of every field, in declaration order.
            pub const FIELDS: &'static [(&'static str, usize)] =
                &[$((stringify!($field), core::mem::offset_of!($name, $field)),)*];
            /// Size of the record in bytes.
            pub const SIZE: usize = core::mem::size_of::<$name>();
        }
    };
}

/// Warps a CTA can have at most (1024 threads).
pub const MAX_WARPS: usize = 32;

/// Rows the power pass takes per group: their dot products with `v` are formed together,
/// then the group's rows are re-read from cache for `w += t_i u_i` (math §4.2).
pub const ROW_GROUP: usize = 8;

/// Most threads per CTA any kernel supports (its shared-memory arrays are sized for it).
pub const MAX_THREADS: usize = 32 * MAX_WARPS;

record! {
    /// One matrix of the batch, as every kernel reads it: where its data and state live on
    /// the device, its shape, its blocks, its scale factor and its flags.
    pub struct MatrixDescriptor {
        /// `W` (or, for the plain power pass, the matrix whose norm is estimated).
        pub weights: u64,
        /// `G` (the plain power pass does not read it).
        pub grads: u64,
        /// The low-precision copy of the new weights, of `G`'s type, that the update of `f32`
        /// master weights with 16-bit gradients also writes (math §5a); 0 for none.
        pub copy: u64,
        /// `f32` momentum, `fan_out * fan_in` (0 where no kernel reads it).
        pub momentum: u64,
        /// `f32` power vector, `fan_in`.
        pub power_vector: u64,
        /// `f32` partials of the matrix's first block; block `b` of the matrix at
        /// `partials + 4 * b * fan_in`.
        pub partials: u64,
        /// Element offset of the matrix's Newton–Schulz iterate in each `bf16` iterate buffer
        /// of the orthogonalised rule (`IterateLayout`), laid out as `W` is; 0 where the rule
        /// is not run.
        pub iterate: u64,
        /// Rows.
        pub fan_out: u32,
        /// Columns.
        pub fan_in: u32,
        /// Index of the matrix's first row block in the block table.
        pub first_block: u32,
        /// Row blocks covering the matrix.
        pub block_count: u32,
        /// The target factor `s` (math §3a).
        pub scale: f32,
        /// [`Flag`] bits.
        pub flags: u32,
    }
}

record! {
    /// One row block: the unit of work of one CTA in the power pass and the update.
    pub struct BlockDescriptor {
        /// Index of the block's matrix.
        pub matrix: u32,
        /// First row (inclusive).
        pub row_start: u32,
        /// Last row (exclusive).
        pub row_end: u32,
    }
}

record! {
    /// What the finish kernel decided for one matrix (math §4.4–4.7): the update pass and
    /// the host read it; the CPU path writes the same record.
    pub struct MatrixResult {
        /// The estimate of `||U||_*` the update divides by (NaN when the matrix is skipped as
        /// non-finite).
        pub sigma: f32,
        /// The power-iteration estimate `sqrt(|w|)` before the Frobenius floor (0 where none
        /// was formed): what the convergence test compares between rounds.
        pub power_estimate: f32,
        /// A [`Status`] code.
        pub status: u32,
        /// `1 - eta lambda`, rounded once from `f64`.
        pub decay: f32,
        /// `eta s / sigma`, rounded once from `f64` (0 unless updated).
        pub coefficient: f32,
        /// Power iterations this matrix takes this step (fixed on the step's first round).
        pub iterations_needed: u32,
    }
}

record! {
    /// The power pass's shared memory before the partial `w` (which follows at
    /// [`POWER_PARTIAL_OFFSET`], `4 * fan_in` bytes).
    pub struct PowerShared {
        /// Per warp, its dot product `<u_i, v>` for each row of the current group:
        /// `[row][warp]`.
        pub dots: [[f32; MAX_WARPS]; ROW_GROUP],
        /// `t_i`: the group's dot products, summed over warps in warp order.
        pub row_dots: [f32; ROW_GROUP],
        /// Per warp, its sum of `U^2` over the block.
        pub warp_sums: [f32; MAX_WARPS],
    }
}

record! {
    /// The finish kernel's static shared memory.
    pub struct FinishShared {
        /// Per thread, its part of `|w|^2` (`f64`).
        pub thread_sums: [f64; MAX_THREADS],
        /// Per lane, the sum of the threads of that lane (`f64`).
        pub lane_sums: [f64; MAX_WARPS],
        /// `|w|` as thread 0 computed it, for every thread's normalisation.
        pub w_norm: f64,
        /// A [`VectorAction`] code from thread 0.
        pub vector_action: u32,
        /// Keeps the record a multiple of 8 bytes.
        pub reserved: u32,
    }
}

record! {
    /// The static shared memory of the orthogonalised rule's element-wise kernels
    /// (`orth_norm_{T}`, `orth_start_{T}`).
    pub struct OrthShared {
        /// Per thread, its part of the block's `||U||_F^2` (`f64`).
        pub thread_sums: [f64; MAX_THREADS],
        /// The start's factor `1 / (f ||U||_F + eps)` as thread 0 computed it.
        pub start: f32,
        /// The [`Status`] thread 0 decided.
        pub status: u32,
    }
}

// What the kernels assume of the records' sizes (the `Pod` derives already refuse padding):
// in a table of records every 8-byte field stays 8-byte aligned, and the finish's static
// shared memory fits the limit every device has.
const _: () = assert!(MatrixDescriptor::SIZE.is_multiple_of(8));
const _: () = assert!(BlockDescriptor::SIZE.is_multiple_of(4));
const _: () = assert!(MatrixResult::SIZE.is_multiple_of(4));
const _: () = assert!(FinishShared::SIZE.is_multiple_of(8));
const _: () = assert!(OrthShared::SIZE.is_multiple_of(8));
/// Shared memory a CTA may use without CUDA's opt-in (`cuFuncSetAttribute` with
/// `MAX_DYNAMIC_SHARED_SIZE_BYTES`), static and dynamic together.
pub const DEFAULT_SHARED_BYTES: u32 = 48 * 1024;
const _: () = assert!(
    FinishShared::SIZE <= DEFAULT_SHARED_BYTES as usize,
    "static shared memory limit"
);
const _: () = assert!(
    OrthShared::SIZE <= DEFAULT_SHARED_BYTES as usize,
    "static shared memory limit"
);

/// Byte offset of the power pass's partial `w` in its dynamic shared memory (16-byte aligned
/// for vector access).
pub const POWER_PARTIAL_OFFSET: usize = PowerShared::SIZE.next_multiple_of(16);
const _: () = assert!(POWER_PARTIAL_OFFSET.is_multiple_of(16));

/// Descriptor flag bits ([`MatrixDescriptor::flags`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Flag {
    /// Rows (and the update's elements) move as 4-element vectors: `fan_in % 4 == 0` and
    /// every address of the matrix is aligned for it.
    Quads = 1,
    /// The matrix is a row or column vector: `sigma` is exact after one pass (math §4.3).
    Vector = 2,
    /// The copy of the new weights (math §5a) is aligned for 4-element stores: with
    /// [`Flag::Quads`], the update moves the matrix 4 elements at a time. Kept apart from
    /// `Quads` so that where a copy lies cannot change the power pass's order of summation.
    CopyQuads = 4,
}

/// The per-matrix outcome of a power iteration (math §4.4–4.7), as the finish kernel writes
/// it to [`MatrixResult::status`]. The order is part of the contract: every status below
/// [`Status::NonFinite`] stores the new momentum in the update pass, and only
/// [`Status::Updated`] writes the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// `sigma` is usable: the update pass writes `W` and `M`.
    Updated = 0,
    /// `U == 0`: `sigma = 0`, `M` stored, `W` untouched (no weight decay either).
    ZeroDirection = 1,
    /// `U v == 0` while `U != 0`: the power vector was re-seeded and marked cold; `M`
    /// stored, `W` untouched this step.
    Reseeded = 2,
    /// `U` holds a NaN or an infinity (or its norms overflow): nothing is written.
    NonFinite = 3,
    /// `eta s / sigma` overflows `f32`: `W` and `M` are untouched, as for a non-finite `U`;
    /// the power vector keeps its normalised new value and is warm.
    SigmaTooSmall = 4,
}

impl Status {
    /// Every status, in code order.
    pub const ALL: [Status; 5] = [
        Status::Updated,
        Status::ZeroDirection,
        Status::Reseeded,
        Status::NonFinite,
        Status::SigmaTooSmall,
    ];

    /// The status with this code, if any.
    pub fn from_code(code: u32) -> Option<Status> {
        Self::ALL.into_iter().find(|status| *status as u32 == code)
    }

    /// Whether the update pass stores the new momentum.
    pub fn stores_momentum(self) -> bool {
        (self as u32) < Status::NonFinite as u32
    }

    /// Whether the update pass writes the weights.
    pub fn writes_weights(self) -> bool {
        self == Status::Updated
    }

    fn name(self) -> &'static str {
        match self {
            Status::Updated => "Updated",
            Status::ZeroDirection => "ZeroDirection",
            Status::Reseeded => "Reseeded",
            Status::NonFinite => "NonFinite",
            Status::SigmaTooSmall => "SigmaTooSmall",
        }
    }
}

/// What the finish does to a matrix's power vector (math §4.5, §4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum VectorAction {
    /// Leave `v` (and its warm flag) as it is.
    Keep = 0,
    /// `v <- w / |w|`, and mark it warm.
    Normalise = 1,
    /// Replace `v` by the seeded `±1/sqrt(n)` vector and mark it cold.
    Reseed = 2,
}

/// The multiplier and increments of the hash that picks the signs of a re-seeded power vector
/// (math §4.6): `h = column * RESEED_COLUMN + matrix * RESEED_MATRIX + step * RESEED_STEP`
/// (wrapping `u32`), then `h ^= h >> 15; h *= RESEED_MIX; h ^= h >> 12`; the sign is negative
/// when the low bit is set.
pub const RESEED_COLUMN: u32 = 0x9E37_79B1;
/// See [`RESEED_COLUMN`].
pub const RESEED_MATRIX: u32 = 40503;
/// See [`RESEED_COLUMN`].
pub const RESEED_STEP: u32 = 97;
/// See [`RESEED_COLUMN`].
pub const RESEED_MIX: u32 = 0x2C1B_3C6D;

/// Philox4x32 multipliers (Salmon et al., SC'11, table 2): the random bits of stochastic
/// rounding (math §5a, `src/rounding.rs`).
pub const PHILOX_M0: u32 = 0xD251_1F53;
/// See [`PHILOX_M0`].
pub const PHILOX_M1: u32 = 0xCD9E_8D57;
/// Philox4x32 key increments (Weyl sequence) per round.
pub const PHILOX_W0: u32 = 0x9E37_79B9;
/// See [`PHILOX_W0`].
pub const PHILOX_W1: u32 = 0xBB67_AE85;
/// Rounds of the Philox network (Random123's default, with a margin over the 7 that pass
/// BigCrush).
pub const PHILOX_ROUNDS: u32 = 10;
/// Elements sharing one Philox output: 128 bits, 16 per element (the update kernel's
/// `e / 8`, `e % 8`).
pub const ROUNDING_GROUP: usize = 8;
/// The smallest normal f16, `2^-14`, as `f32` bits: below it stochastic rounding to f16 works
/// on the subnormal grid.
pub const F16_MIN_NORMAL_BITS: u32 = 0x3880_0000;
/// The largest finite f16 (65504) as f16 bits: where a finite value saturates.
pub const F16_MAX_BITS: u32 = 0x7BFF;
/// The largest finite bf16 as bf16 bits: where a finite value saturates.
pub const BF16_MAX_BITS: u32 = 0x7F7F;

/// Every named value the kernel templates may use, as `(placeholder, value)`: record
/// offsets (`MatrixDescriptor.fan_in`), sizes (`MatrixDescriptor.SIZE`), status and flag
/// codes (`Status.NonFinite`, `Flag.Quads`, `VectorAction.Reseed`) and the constants
/// (`ROW_GROUP`, `MAX_WARPS`, `POWER_PARTIAL_OFFSET`, `RESEED_MIX`, ...).
pub fn template_values() -> Vec<(String, u64)> {
    let mut values = Vec::new();
    let mut record = |name: &str, fields: &[(&str, usize)], size: usize| {
        for (field, offset) in fields {
            values.push((format!("{name}.{field}"), *offset as u64));
        }
        values.push((format!("{name}.SIZE"), size as u64));
    };
    record(
        "MatrixDescriptor",
        MatrixDescriptor::FIELDS,
        MatrixDescriptor::SIZE,
    );
    record(
        "BlockDescriptor",
        BlockDescriptor::FIELDS,
        BlockDescriptor::SIZE,
    );
    record("MatrixResult", MatrixResult::FIELDS, MatrixResult::SIZE);
    record("PowerShared", PowerShared::FIELDS, PowerShared::SIZE);
    record("FinishShared", FinishShared::FIELDS, FinishShared::SIZE);
    record("OrthShared", OrthShared::FIELDS, OrthShared::SIZE);
    for status in Status::ALL {
        values.push((format!("Status.{}", status.name()), status as u64));
    }
    values.push(("Flag.Quads".into(), Flag::Quads as u64));
    values.push(("Flag.Vector".into(), Flag::Vector as u64));
    values.push(("Flag.CopyQuads".into(), Flag::CopyQuads as u64));
    values.push(("VectorAction.Keep".into(), VectorAction::Keep as u64));
    values.push((
        "VectorAction.Normalise".into(),
        VectorAction::Normalise as u64,
    ));
    values.push(("VectorAction.Reseed".into(), VectorAction::Reseed as u64));
    for (name, value) in [
        ("MAX_WARPS", MAX_WARPS as u64),
        ("MAX_THREADS", MAX_THREADS as u64),
        ("ROW_GROUP", ROW_GROUP as u64),
        ("POWER_PARTIAL_OFFSET", POWER_PARTIAL_OFFSET as u64),
        ("RESEED_COLUMN", u64::from(RESEED_COLUMN)),
        ("RESEED_MATRIX", u64::from(RESEED_MATRIX)),
        ("RESEED_STEP", u64::from(RESEED_STEP)),
        ("RESEED_MIX", u64::from(RESEED_MIX)),
        ("PHILOX_M0", u64::from(PHILOX_M0)),
        ("PHILOX_M1", u64::from(PHILOX_M1)),
        ("PHILOX_W0", u64::from(PHILOX_W0)),
        ("PHILOX_W1", u64::from(PHILOX_W1)),
        ("PHILOX_ROUNDS", u64::from(PHILOX_ROUNDS)),
        ("F16_MIN_NORMAL_BITS", u64::from(F16_MIN_NORMAL_BITS)),
        ("F16_MAX_BITS", u64::from(F16_MAX_BITS)),
        ("BF16_MAX_BITS", u64::from(BF16_MAX_BITS)),
    ] {
        values.push((name.into(), value));
    }
    values
}
