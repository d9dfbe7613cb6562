//! Simulated device memory and the launch API.
//!
//! Global memory is a sparse 64-bit address space: each allocation starts on a 256-byte
//! boundary and is followed by an unmapped guard gap, so that an access just past the end of
//! one buffer never lands in the next.

use crate::error::{Result, SimError};
use crate::exec;
use crate::ir::{Kernel, Type};

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
    /// The address `bytes` further on.
    pub fn offset(self, bytes: u64) -> DevicePtr {
        DevicePtr(self.0 + bytes)
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
    /// same bits in any order); `None` runs them in linear order.
    pub shuffle_seed: Option<u64>,
    /// Give up after this many warp-instructions (a runaway loop is an error, not a hang).
    pub step_limit: u64,
}

impl LaunchConfig {
    /// A one-dimensional launch of `grid` CTAs of `block` threads.
    pub fn linear(grid: u32, block: u32) -> Self {
        Self {
            grid: [grid, 1, 1],
            block: [block, 1, 1],
            dynamic_shared_bytes: 0,
            shuffle_seed: None,
            step_limit: 1 << 32,
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
}

impl Default for Device {
    fn default() -> Self {
        Self::new()
    }
}

impl Device {
    /// Empty device memory.
    pub fn new() -> Self {
        Self {
            allocations: Vec::new(),
            next_base: FIRST_BASE,
        }
    }

    /// A zero-filled allocation of `bytes` bytes.
    pub fn alloc(&mut self, bytes: usize) -> DevicePtr {
        let base = self.next_base;
        self.next_base = (base + bytes as u64 + GUARD_BYTES).div_ceil(BASE_ALIGN) * BASE_ALIGN;
        self.allocations.push(Allocation {
            base,
            bytes: vec![0; bytes],
            flags: vec![0; bytes],
        });
        DevicePtr(base)
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
        self.allocations.remove(index);
        Ok(())
    }

    /// Bytes held by live allocations.
    pub fn allocated_bytes(&self) -> usize {
        self.allocations.iter().map(|a| a.bytes.len()).sum()
    }

    /// An allocation holding `data`.
    pub fn alloc_bytes(&mut self, data: &[u8]) -> DevicePtr {
        let ptr = self.alloc(data.len());
        self.allocations
            .last_mut()
            .expect("just allocated")
            .bytes
            .copy_from_slice(data);
        ptr
    }

    /// An allocation holding `values` (little-endian).
    pub fn alloc_f32(&mut self, values: &[f32]) -> DevicePtr {
        self.alloc_bytes(
            &values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>(),
        )
    }

    /// An allocation holding `values` (little-endian).
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
        let offset = address - allocation.base;
        (offset + len <= allocation.bytes.len() as u64).then_some((index, offset as usize))
    }

    fn host_range(&self, ptr: DevicePtr, len: usize) -> Result<(usize, usize)> {
        self.locate(ptr.0, len as u64).ok_or_else(|| {
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
        let bytes = self.read(ptr, count * 4)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// Reads `count` little-endian `u32` at `ptr`.
    pub fn read_u32(&self, ptr: DevicePtr, count: usize) -> Result<Vec<u32>> {
        let bytes = self.read(ptr, count * 4)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// Runs `kernel` over the grid. Arguments are checked against the parameters first; the
    /// first fault stops the launch and is returned (memory written before it stays written).
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
        let mut params = vec![0u8; kernel.param_bytes as usize];
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
            params[param.offset as usize..param.offset as usize + bytes.len()]
                .copy_from_slice(&bytes);
        }
        let threads = config.block.iter().map(|&d| u64::from(d)).product::<u64>();
        if threads == 0 || threads > 1024 || config.grid.contains(&0) {
            return Err(launch_error(format!(
                "bad shape: grid {:?}, block {:?}",
                config.grid, config.block
            )));
        }
        let has_dynamic = kernel.shared.iter().any(|s| s.size == 0);
        if config.dynamic_shared_bytes > 0 && !has_dynamic {
            return Err(launch_error(
                "dynamic shared memory requested, but the kernel declares no extern .shared".into(),
            ));
        }
        for allocation in &mut self.allocations {
            allocation.flags.fill(0);
        }
        let mut ctas: Vec<[u32; 3]> = (0..config.grid[2])
            .flat_map(|z| {
                (0..config.grid[1]).flat_map(move |y| (0..config.grid[0]).map(move |x| [x, y, z]))
            })
            .collect();
        if let Some(seed) = config.shuffle_seed {
            shuffle(&mut ctas, seed);
        }
        let mut stats = LaunchStats::default();
        for cta in ctas {
            exec::run_cta(self, kernel, config, &params, cta, &mut stats)?;
        }
        Ok(stats)
    }
}

/// Fisher–Yates with SplitMix64: a fixed permutation per seed, no dependency needed.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}
