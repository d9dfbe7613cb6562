//! Simulated device memory and the launch API.
//!
//! Global memory is a sparse 64-bit address space: each allocation starts on a 256-byte
//! boundary and is followed by an unmapped guard gap, so that an access just past the end of
//! one buffer never lands in the next.

use crate::error::{Result, SimError};
use crate::exec;
use crate::ir::{Kernel, Type};
use crate::limits::{
    DEFAULT_MEMORY_LIMIT, DEFAULT_STEP_LIMIT, MAX_BLOCK, MAX_BLOCK_THREADS, MAX_GRID,
    MAX_SHARED_BYTES,
};

const FIRST_BASE: u64 = 0x1_0000_0000;
const BASE_ALIGN: u64 = 256;
const GUARD_BYTES: u64 = 4096;

/// Per-byte launch flags, for the `.nc` check.
pub(crate) const WRITTEN: u8 = 1;
pub(crate) const NC_READ: u8 = 2;

/// A byte address in simulated global memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevicePtr(pub u64);

impl DevicePtr {
    /// The address `bytes` further on. Saturates at `u64::MAX` instead of wrapping: no
    /// allocation reaches that address, so any access through a saturated pointer is an error.
    pub fn offset(self, bytes: u64) -> DevicePtr {
        DevicePtr(self.0.saturating_add(bytes))
    }
}

pub(crate) struct Allocation {
    pub base: u64,
    pub bytes: Vec<u8>,
    /// [`WRITTEN`] / [`NC_READ`] per byte, cleared at each launch.
    pub flags: Vec<u8>,
}

/// A kernel argument, checked against the parameter's declared size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// `.u32` / `.s32` / `.b32`
    U32(u32),
    /// `.u64` / `.s64` / `.b64`
    U64(u64),
    /// `.f32`
    F32(f32),
    /// A device pointer (`.u64`).
    Ptr(DevicePtr),
}

impl Arg {
    fn bytes(self) -> Vec<u8> {
        match self {
            Arg::U32(v) => v.to_le_bytes().to_vec(),
            Arg::U64(v) => v.to_le_bytes().to_vec(),
            Arg::F32(v) => v.to_le_bytes().to_vec(),
            Arg::Ptr(p) => p.0.to_le_bytes().to_vec(),
        }
    }
}

/// Grid and block shape of a launch, and its options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    /// CTAs per dimension.
    pub grid: [u32; 3],
    /// Threads per CTA per dimension.
    pub block: [u32; 3],
    /// Bytes of dynamic (`extern .shared`) memory per CTA.
    pub dynamic_shared_bytes: u32,
    /// Run the CTAs in an order shuffled by this seed (deterministic kernels must give the
    /// same bits in any order); `None` runs them in linear order. The order is generated as
    /// the CTAs run, so a launch never holds a list of its CTAs (a Fisher–Yates shuffle of
    /// the CTA indices for grids of up to 2^20 CTAs, a keyed permutation beyond).
    pub shuffle_seed: Option<u64>,
    /// Give up after this many steps with a [`Fault::RunAway`](crate::Fault::RunAway) fault (a runaway loop is an
    /// error, not a hang). A step is one warp-instruction; setting up a CTA costs one step
    /// plus one per [`SETUP_BYTES_PER_STEP`](crate::limits::SETUP_BYTES_PER_STEP) bytes of
    /// its state, so that a huge grid of short CTAs is bounded too.
    /// [`LaunchConfig::linear`] sets [`DEFAULT_STEP_LIMIT`] (2^22).
    pub step_limit: u64,
}

impl LaunchConfig {
    /// A one-dimensional launch of `grid` CTAs of `block` threads, without dynamic shared
    /// memory, in linear CTA order, with the step limit [`DEFAULT_STEP_LIMIT`] (2^22
    /// warp-instructions: a runaway loop fails within seconds, see its documentation).
    pub fn linear(grid: u32, block: u32) -> Self {
        Self {
            grid: [grid, 1, 1],
            block: [block, 1, 1],
            dynamic_shared_bytes: 0,
            shuffle_seed: None,
            step_limit: DEFAULT_STEP_LIMIT,
        }
    }
}

/// What a launch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchStats {
    /// Instructions issued, counted once per warp.
    pub warp_instructions: u64,
    /// Instructions executed, counted once per thread.
    pub thread_instructions: u64,
    /// Global-memory loads and stores of two or four elements (`.v2`, `.v4`), counted once
    /// per thread that executed one: how a test tells a kernel's vector path from its
    /// scalar one.
    pub global_vector_accesses: u64,
}

/// Simulated global memory plus the ability to launch kernels on it.
///
/// ```
/// use ptx_sim::{Arg, Device, LaunchConfig};
/// let module = ptx_sim::parse(r#"
///     .version 7.0
///     .target sm_80
///     .address_size 64
///     .visible .entry double_it(.param .u64 data) {
///         .reg .b64 %rd<4>;
///         .reg .b32 %r<2>;
///         .reg .f32 %f<2>;
///         ld.param.u64 %rd1, [data];
///         mov.u32 %r1, %tid.x;
///         mul.wide.u32 %rd2, %r1, 4;
///         add.s64 %rd3, %rd1, %rd2;
///         ld.global.f32 %f1, [%rd3];
///         add.rn.f32 %f1, %f1, %f1;
///         st.global.f32 [%rd3], %f1;
///         ret;
///     }
/// "#)?;
/// let mut device = Device::new();
/// let data = device.alloc_f32(&[1.0, 2.0, 3.0]);
/// device.launch(module.kernel("double_it").unwrap(), &LaunchConfig::linear(1, 3), &[Arg::Ptr(data)])?;
/// assert_eq!(device.read_f32(data, 3)?, vec![2.0, 4.0, 6.0]);
/// # Ok::<(), ptx_sim::SimError>(())
/// ```
pub struct Device {
    pub(crate) allocations: Vec<Allocation>,
    next_base: u64,
    /// Bytes held by live allocations.
    live_bytes: u64,
    memory_limit: Option<u64>,
}

impl Default for Device {
    fn default() -> Self {
        Self::new()
    }
}

/// A zero-filled `Vec` of `len` bytes, or an error if the allocator refuses it.
fn zeroed(len: usize) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(len).map_err(|error| {
        SimError::Memory(format!(
            "cannot allocate {len} bytes of host memory: {error}"
        ))
    })?;
    bytes.resize(len, 0);
    Ok(bytes)
}

impl Device {
    /// Empty device memory, with the memory limit
    /// [`DEFAULT_MEMORY_LIMIT`](crate::limits::DEFAULT_MEMORY_LIMIT) (4 GiB).
    pub fn new() -> Self {
        Self::with_memory_limit(Some(DEFAULT_MEMORY_LIMIT))
    }

    /// Empty device memory that holds at most `limit` bytes in live allocations (`None`: as
    /// much as the host's allocator grants; note that the simulator keeps two host bytes per
    /// device byte).
    pub fn with_memory_limit(limit: Option<u64>) -> Self {
        Self {
            allocations: Vec::new(),
            next_base: FIRST_BASE,
            live_bytes: 0,
            memory_limit: limit,
        }
    }

    /// The memory limit: at most this many bytes in live allocations (`None`: no limit but
    /// the host's allocator).
    pub fn memory_limit(&self) -> Option<u64> {
        self.memory_limit
    }

    /// Changes the memory limit. Allocations already made stay, even past a lower limit; the
    /// next allocation is checked against it.
    pub fn set_memory_limit(&mut self, limit: Option<u64>) {
        self.memory_limit = limit;
    }

    /// A zero-filled allocation of `bytes` bytes, or a [`SimError::Memory`] if it would pass
    /// the [memory limit](Device::memory_limit), the simulated address space, or what the
    /// host's allocator grants.
    pub fn try_alloc(&mut self, bytes: usize) -> Result<DevicePtr> {
        let size = u64::try_from(bytes)
            .map_err(|_| SimError::Memory(format!("{bytes} bytes do not fit a 64-bit size")))?;
        let live = self.live_bytes.checked_add(size);
        if let (Some(limit), live) = (self.memory_limit, live)
            && live.is_none_or(|live| live > limit)
        {
            return Err(SimError::Memory(format!(
                "allocating {bytes} bytes would pass the device's memory limit of {limit} bytes ({} bytes are allocated)",
                self.live_bytes
            )));
        }
        let live = live.ok_or_else(|| {
            SimError::Memory(format!("allocating {bytes} bytes overflows the byte count"))
        })?;
        let base = self.next_base;
        let next_base = base
            .checked_add(size)
            .and_then(|end| end.checked_add(GUARD_BYTES))
            .and_then(|end| end.checked_next_multiple_of(BASE_ALIGN))
            .ok_or_else(|| {
                SimError::Memory(format!(
                    "allocating {bytes} bytes at {base:#x} runs past the 64-bit address space"
                ))
            })?;
        let contents = zeroed(bytes)?;
        let flags = zeroed(bytes)?;
        self.allocations.push(Allocation {
            base,
            bytes: contents,
            flags,
        });
        self.next_base = next_base;
        self.live_bytes = live;
        Ok(DevicePtr(base))
    }

    /// An allocation holding `data`, or a [`SimError::Memory`] as for [`Device::try_alloc`].
    pub fn try_alloc_bytes(&mut self, data: &[u8]) -> Result<DevicePtr> {
        let ptr = self.try_alloc(data.len())?;
        self.allocations
            .last_mut()
            .expect("try_alloc just pushed this allocation")
            .bytes
            .copy_from_slice(data);
        Ok(ptr)
    }

    /// A zero-filled allocation of `bytes` bytes.
    ///
    /// # Panics
    ///
    /// Where [`Device::try_alloc`] fails: past the [memory limit](Device::memory_limit) or
    /// what the host grants. This and the other infallible `alloc*` are conveniences for tests
    /// with sizes they control; take [`Device::try_alloc`] for sizes from elsewhere.
    pub fn alloc(&mut self, bytes: usize) -> DevicePtr {
        self.try_alloc(bytes)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Frees the allocation that starts at `ptr`. Errors if none does (a double free, or a
    /// pointer into the middle of an allocation). The address is not reused.
    pub fn free(&mut self, ptr: DevicePtr) -> Result<()> {
        let index = self
            .allocations
            .binary_search_by_key(&ptr.0, |a| a.base)
            .map_err(|_| {
                SimError::Memory(format!("{:#x} is not the start of an allocation", ptr.0))
            })?;
        let freed = self.allocations.remove(index);
        // The live count is the sum of the live allocations' sizes, so this cannot underflow.
        self.live_bytes -= freed.bytes.len() as u64;
        Ok(())
    }

    /// Bytes held by live allocations.
    pub fn allocated_bytes(&self) -> usize {
        self.allocations.iter().map(|a| a.bytes.len()).sum()
    }

    /// An allocation holding `data`.
    ///
    /// # Panics
    ///
    /// As [`Device::alloc`]; [`Device::try_alloc_bytes`] returns the error instead.
    pub fn alloc_bytes(&mut self, data: &[u8]) -> DevicePtr {
        self.try_alloc_bytes(data)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// An allocation holding `values` (little-endian).
    ///
    /// # Panics
    ///
    /// As [`Device::alloc`].
    pub fn alloc_f32(&mut self, values: &[f32]) -> DevicePtr {
        self.alloc_bytes(
            &values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>(),
        )
    }

    /// An allocation holding `values` (little-endian).
    ///
    /// # Panics
    ///
    /// As [`Device::alloc`].
    pub fn alloc_u32(&mut self, values: &[u32]) -> DevicePtr {
        self.alloc_bytes(
            &values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>(),
        )
    }

    /// The allocation and offset holding `[address, address + len)`, if one does.
    pub(crate) fn locate(&self, address: u64, len: u64) -> Option<(usize, usize)> {
        let index = self
            .allocations
            .partition_point(|a| a.base <= address)
            .checked_sub(1)?;
        let allocation = &self.allocations[index];
        // partition_point found the last allocation with base <= address.
        let offset = address - allocation.base;
        offset
            .checked_add(len)
            .is_some_and(|end| end <= allocation.bytes.len() as u64)
            .then_some((index, offset as usize))
    }

    fn host_range(&self, ptr: DevicePtr, len: usize) -> Result<(usize, usize)> {
        // usize is at most 64 bits on every target Rust supports; saturate if not.
        let len64 = u64::try_from(len).unwrap_or(u64::MAX);
        self.locate(ptr.0, len64).ok_or_else(|| {
            SimError::Memory(format!(
                "{len} bytes at {:#x} are not inside one allocation",
                ptr.0
            ))
        })
    }

    /// Copies `data` to `ptr`.
    pub fn write(&mut self, ptr: DevicePtr, data: &[u8]) -> Result<()> {
        let (index, offset) = self.host_range(ptr, data.len())?;
        self.allocations[index].bytes[offset..offset + data.len()].copy_from_slice(data);
        Ok(())
    }

    /// Reads `len` bytes at `ptr`.
    pub fn read(&self, ptr: DevicePtr, len: usize) -> Result<Vec<u8>> {
        let (index, offset) = self.host_range(ptr, len)?;
        Ok(self.allocations[index].bytes[offset..offset + len].to_vec())
    }

    /// Reads `count` little-endian `f32` at `ptr`.
    pub fn read_f32(&self, ptr: DevicePtr, count: usize) -> Result<Vec<f32>> {
        let bytes = self.read(ptr, words(count)?)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// Reads `count` little-endian `u32` at `ptr`.
    pub fn read_u32(&self, ptr: DevicePtr, count: usize) -> Result<Vec<u32>> {
        let bytes = self.read(ptr, words(count)?)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// Runs `kernel` over the grid. Arguments are checked against the parameters first, and
    /// the shape against CUDA's limits (see [`limits`](crate::limits)), before anything is
    /// allocated; the first fault stops the launch and is returned (memory written before it
    /// stays written).
    ///
    /// `kernel` is one [`parse`](crate::parse) decoded: a hand-built [`Kernel`] whose register
    /// ids, branch targets or shared offsets break the parser's invariants is outside this
    /// contract.
    pub fn launch(
        &mut self,
        kernel: &Kernel,
        config: &LaunchConfig,
        args: &[Arg],
    ) -> Result<LaunchStats> {
        let launch_error = |message: String| SimError::Launch {
            kernel: kernel.name.clone(),
            message,
        };
        if args.len() != kernel.params.len() {
            return Err(launch_error(format!(
                "{} arguments for {} parameters",
                args.len(),
                kernel.params.len()
            )));
        }
        let shape = check_shape(kernel, config).map_err(launch_error)?;
        let mut params = zeroed(kernel.param_bytes as usize)?;
        for (arg, param) in args.iter().zip(&kernel.params) {
            let bytes = arg.bytes();
            let fits = bytes.len() as u32 == param.ty.bytes()
                && (param.ty.is_float() == matches!(arg, Arg::F32(_)))
                && param.ty != Type::Pred;
            if !fits {
                return Err(launch_error(format!(
                    "argument {arg:?} does not fit parameter {} ({})",
                    param.name, param.ty
                )));
            }
            let start = param.offset as usize;
            params
                .get_mut(start..start + bytes.len())
                .ok_or_else(|| {
                    launch_error(format!(
                        "parameter {} lies outside the kernel's parameter block",
                        param.name
                    ))
                })?
                .copy_from_slice(&bytes);
        }
        for allocation in &mut self.allocations {
            allocation.flags.fill(0);
        }
        let order = CtaOrder::new(config.grid, config.shuffle_seed);
        let mut stats = LaunchStats::default();
        let mut steps = 0u64;
        for index in 0..order.total {
            let cta = order.cta(index);
            exec::run_cta(
                self, kernel, config, &params, cta, shape, &mut steps, &mut stats,
            )?;
        }
        Ok(stats)
    }
}

/// Reads of `count` 4-byte words, in bytes.
fn words(count: usize) -> Result<usize> {
    count
        .checked_mul(4)
        .ok_or_else(|| SimError::Memory(format!("{count} words do not fit the address space")))
}

/// A launch's shape, checked against CUDA's limits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    /// Threads per CTA, 1 to 1024.
    pub threads: usize,
    /// Bytes of shared memory per CTA (static, padding, dynamic), at most
    /// [`MAX_SHARED_BYTES`].
    pub shared_bytes: usize,
}

/// Checks `config` against CUDA's launch limits and the kernel, before anything is allocated.
fn check_shape(kernel: &Kernel, config: &LaunchConfig) -> std::result::Result<Shape, String> {
    let LaunchConfig { grid, block, .. } = *config;
    if grid.contains(&0) || grid.iter().zip(MAX_GRID).any(|(&n, max)| n > max) {
        return Err(format!(
            "bad shape: grid {grid:?} is outside CUDA's limits (1 to {} x {} x {} CTAs)",
            MAX_GRID[0], MAX_GRID[1], MAX_GRID[2]
        ));
    }
    // Each dimension first: then the product is at most 1024 x 1024 x 64.
    let dimensions_fit =
        !block.contains(&0) && block.iter().zip(MAX_BLOCK).all(|(&n, max)| n <= max);
    let threads = if dimensions_fit {
        block.iter().map(|&d| u64::from(d)).product::<u64>()
    } else {
        u64::MAX
    };
    if threads > u64::from(MAX_BLOCK_THREADS) {
        return Err(format!(
            "bad shape: block {block:?} is outside CUDA's limits (1 to {} x {} x {} threads, at most {MAX_BLOCK_THREADS} in all)",
            MAX_BLOCK[0], MAX_BLOCK[1], MAX_BLOCK[2]
        ));
    }
    let dynamic = kernel.shared.iter().find(|s| s.size == 0);
    if config.dynamic_shared_bytes > 0 && dynamic.is_none() {
        return Err(
            "dynamic shared memory requested, but the kernel declares no extern .shared".into(),
        );
    }
    // In u64: a u32 offset plus a u32 size cannot overflow it.
    let shared_bytes = match dynamic {
        Some(var) => u64::from(var.offset) + u64::from(config.dynamic_shared_bytes),
        None => u64::from(kernel.static_shared_bytes),
    };
    if shared_bytes > u64::from(MAX_SHARED_BYTES) {
        return Err(format!(
            "{shared_bytes} bytes of shared memory per CTA ({} static, {} dynamic, with padding) exceed the {MAX_SHARED_BYTES} bytes (227 KiB) CUDA allows",
            kernel.static_shared_bytes, config.dynamic_shared_bytes
        ));
    }
    Ok(Shape {
        threads: threads as usize,
        shared_bytes: shared_bytes as usize,
    })
}

/// Grids of up to this many CTAs are shuffled by a Fisher–Yates table of their indices (4 MiB
/// at most); larger ones by a keyed permutation computed per CTA.
const SHUFFLE_TABLE_CTAS: u64 = 1 << 20;

/// The order a launch runs its CTAs in, generated one CTA at a time.
struct CtaOrder {
    grid: [u32; 3],
    /// CTAs in the grid: at most (2^31 - 1) * 65535 * 65535 < 2^63.
    total: u64,
    kind: OrderKind,
}

enum OrderKind {
    Linear,
    /// A shuffled table of linear indices.
    Table(Vec<u32>),
    /// A Feistel permutation of `2 * half_bits`-bit numbers, restricted to `0..total` by
    /// cycle walking.
    Feistel {
        half_bits: u32,
        keys: [u64; 4],
    },
}

impl CtaOrder {
    /// `grid` must be within [`MAX_GRID`].
    fn new(grid: [u32; 3], seed: Option<u64>) -> Self {
        let total = grid.iter().map(|&n| u64::from(n)).product::<u64>();
        let kind = match seed {
            None => OrderKind::Linear,
            Some(seed) if total <= SHUFFLE_TABLE_CTAS => {
                // The same permutation as shuffling the list of CTAs in linear order.
                let mut table: Vec<u32> = (0..total as u32).collect();
                shuffle(&mut table, seed);
                OrderKind::Table(table)
            }
            Some(seed) => {
                let bits = 64 - (total - 1).leading_zeros();
                let mut next = splitmix(seed);
                OrderKind::Feistel {
                    half_bits: bits.div_ceil(2),
                    keys: [next(), next(), next(), next()],
                }
            }
        };
        Self { grid, total, kind }
    }

    /// The `index`-th CTA to run, `index < total`.
    fn cta(&self, index: u64) -> [u32; 3] {
        let linear = match &self.kind {
            OrderKind::Linear => index,
            OrderKind::Table(table) => u64::from(table[index as usize]),
            OrderKind::Feistel { half_bits, keys } => {
                // A bijection of 0..2^(2 * half_bits) that returns to `index` along its
                // cycle; walking it until a value below `total` is a bijection of 0..total.
                let mut value = feistel(index, *half_bits, keys);
                while value >= self.total {
                    value = feistel(value, *half_bits, keys);
                }
                value
            }
        };
        let [x, y, _] = self.grid.map(u64::from);
        // Each part is below its grid dimension, so fits a u32.
        [
            (linear % x) as u32,
            (linear / x % y) as u32,
            (linear / (x * y)) as u32,
        ]
    }
}

/// Four Feistel rounds on the two `half_bits`-bit halves of `value` (`half_bits` 1 to 32).
fn feistel(value: u64, half_bits: u32, keys: &[u64; 4]) -> u64 {
    let mask = (1u64 << half_bits) - 1;
    let (mut left, mut right) = (value >> half_bits, value & mask);
    for &key in keys {
        let round = splitmix(right ^ key)() & mask;
        (left, right) = (right, left ^ round);
    }
    (left << half_bits) | right
}

/// SplitMix64 from `seed`: a stream of well-mixed numbers, no dependency needed.
fn splitmix(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Fisher–Yates with SplitMix64: a fixed permutation per seed.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut next = splitmix(seed);
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cta_order_is_a_permutation() {
        for grid in [
            [1, 1, 1],
            [3, 1, 1],
            [7, 5, 3],
            [1 << 10, 1 << 10, 1],
            [4097, 257, 1],
        ] {
            for seed in [None, Some(0), Some(42)] {
                let order = CtaOrder::new(grid, seed);
                let mut seen = vec![false; order.total as usize];
                for index in 0..order.total {
                    let [x, y, z] = order.cta(index);
                    assert!(x < grid[0] && y < grid[1] && z < grid[2]);
                    let linear = (u64::from(z) * u64::from(grid[1]) + u64::from(y))
                        * u64::from(grid[0])
                        + u64::from(x);
                    assert!(!std::mem::replace(&mut seen[linear as usize], true));
                }
            }
        }
        // Above the table size the order is the keyed permutation.
        let order = CtaOrder::new([4097, 257, 1], Some(1));
        assert!(matches!(order.kind, OrderKind::Feistel { .. }));
        assert_ne!(order.cta(0), [0, 0, 0]);
    }

    #[test]
    fn small_shuffles_keep_their_order() {
        // The order the simulator has always used for these: a Fisher-Yates shuffle of the
        // CTAs in linear order.
        let grid = [5, 3, 2];
        let mut expected: Vec<[u32; 3]> = (0..2)
            .flat_map(|z| (0..3).flat_map(move |y| (0..5).map(move |x| [x, y, z])))
            .collect();
        shuffle(&mut expected, 9);
        let order = CtaOrder::new(grid, Some(9));
        let got: Vec<[u32; 3]> = (0..order.total).map(|i| order.cta(i)).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn allocation_addresses_cannot_overflow() {
        let mut device = Device::with_memory_limit(None);
        device.next_base = u64::MAX - 8192;
        let error = device.try_alloc(8192).unwrap_err();
        assert!(matches!(error, SimError::Memory(_)), "{error}");
        assert!(device.allocations.is_empty());
        assert_eq!(device.live_bytes, 0);
        let ptr = device
            .try_alloc(16)
            .expect("room for 16 bytes and the guard");
        assert_eq!(ptr.0, u64::MAX - 8192);
        assert!(device.try_alloc(0).is_err());
        assert_eq!(device.read(ptr, 16).unwrap(), vec![0; 16]);
        assert!(device.read(ptr, 17).is_err());
        assert!(device.read(ptr.offset(15), 2).is_err());
    }
}
