//! The simulated device (feature `sim`): the crate's PTX kernels run in `ptx-sim`, a strict
//! functional PTX simulator, behind the same [`Device`] seam as a CUDA GPU. The backend on
//! it, [`Simulated`], is the very code that drives a GPU ([`DeviceBackend`]), so a trainer's
//! CI without a GPU can run its GPU code path: `SpectralSgd<Simulated>` with
//! [`SimSlice`]s where a GPU run has `CudaSlice`s.
//!
//! What it checks on every launch, as a GPU sanitizer would and more strictly: bounds and
//! natural alignment of every global, shared and parameter access (with unmapped guard gaps
//! between allocations), reads of uninitialised shared memory, shared-memory races between
//! barriers, `.nc` loads of bytes the same launch writes, divergent barriers and deadlocks,
//! shuffle member masks, the kernel's parameter list against the arguments, the dynamic
//! shared memory against the device limit (and CUDA's 48 KiB opt-in), and a step limit
//! against runaway loops. A fault is an [`Error::Simulator`] naming the kernel, the
//! instruction and the thread.
//!
//! It is slow: it interprets every instruction of every thread (`README.md` gives measured
//! elements per second). Use small shapes in tests.
//!
//! ```
//! use spectral_step::sim::{SimDevice, Simulated};
//! use spectral_step::{MatrixShape, SpectralSgd, SpectralSgdConfig};
//!
//! let device = SimDevice::new()?;
//! let shapes = [MatrixShape::new(8, 12), MatrixShape::new(8, 1)];
//! let mut optimizer =
//!     SpectralSgd::<Simulated>::on_device(&shapes, SpectralSgdConfig::default(), device.clone())?;
//! let mut weights = vec![device.upload(&[0.25f32; 96])?, device.upload(&[0.0f32; 8])?];
//! let grads = vec![device.upload(&[1.0f32; 96])?, device.upload(&[2.0f32; 8])?];
//! optimizer.step(&mut weights, &grads)?;
//! assert!(optimizer.report()?.all_updated());
//! // The update of a rank-one gradient has spectral norm eta * s exactly.
//! let update: Vec<f32> = device.download(&weights[1])?;
//! let norm = update.iter().map(|x| x * x).sum::<f32>().sqrt();
//! assert!((norm - 0.02 * 8f32.sqrt()).abs() < 1e-6);
//! assert_eq!(device.stats().launches, 2 * 8 + 1, "cold start: 8 rounds, then the update");
//! # Ok::<(), spectral_step::Error>(())
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytemuck::Pod;
use ptx_sim::DevicePtr;

use crate::device::{Device, DeviceBackend, Gemm, GemmOutput, PowerIteration, checked_end, sealed};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::kernels::{self, KernelId, Launch, LaunchArg};

/// The device backend on the simulated device: `SpectralSgd<Simulated>`.
pub type Simulated = DeviceBackend<SimDevice>;

/// Batched power iteration on stored matrices on the simulated device.
pub type SimPowerIteration = PowerIteration<SimDevice>;

use crate::kernels::records::DEFAULT_SHARED_BYTES;

/// In which order the CTAs of a launch run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtaOrder {
    /// In linear order of their index.
    Linear,
    /// In an order shuffled by `seed` (a new order per launch): a kernel whose result depends
    /// on CTA order shows it as different bits.
    Shuffled {
        /// The seed of the first launch's order.
        seed: u64,
    },
}

/// Settings of a simulated device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimOptions {
    /// CTA order of every launch. Default [`CtaOrder::Linear`].
    pub cta_order: CtaOrder,
    /// Dynamic shared memory per CTA the device allows with the opt-in, in bytes. Default
    /// 232448 (227 KiB, an H100's or H200's).
    pub max_shared_bytes: u32,
    /// A launch that issues more warp-instructions than this is an error (a runaway loop).
    /// The crate's kernels issue one or two warp-instructions per element of the batch per
    /// launch (`cargo bench --bench sim_step`: 96 thread-instructions per parameter over a
    /// warm step's three launches with `f32` weights, 152 with `bf16` weights and stochastic
    /// rounding), so the default, 2^28, covers launches over some 100 million elements, and
    /// stops a runaway kernel within 1.4 to 5 minutes (at the
    /// 0.9 to 3.2 M warp-instructions/s of full-warp loops that
    /// `cargo bench -p ptx-sim --bench sim_speed` measures).
    pub step_limit: u64,
    /// Bytes the device's buffers (the optimizer's and the caller's) may hold in all; an
    /// allocation past it is an [`Error::OutOfMemory`]. `None`: what the host grants.
    /// Default 4 GiB (the simulator keeps two host bytes per device byte).
    pub memory_limit: Option<u64>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            cta_order: CtaOrder::Linear,
            max_shared_bytes: 227 * 1024,
            step_limit: 1 << 28,
            memory_limit: Some(ptx_sim::limits::DEFAULT_MEMORY_LIMIT),
        }
    }
}

/// What the simulated device has run so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Kernel launches.
    pub launches: u64,
    /// Instructions issued, once per warp.
    pub warp_instructions: u64,
    /// Instructions executed, once per thread.
    pub thread_instructions: u64,
    /// Global loads and stores of 2 or 4 elements, once per thread (the kernels' vector
    /// path).
    pub global_vector_accesses: u64,
    /// Host-to-device copies into the backend's buffers (tables and state), through the
    /// [`Device`] seam: a step on unchanged buffers makes none.
    pub backend_uploads: u64,
    /// Strided batches of products ([`Device::gemm`]), run on the host.
    pub gemms: u64,
}

struct SimState {
    memory: ptx_sim::Device,
    options: SimOptions,
    stats: SimStats,
    power_shared_bytes: u32,
}

struct Shared {
    /// Tells one device's buffers from another's.
    id: u64,
    /// Parsed once, indexed by [`KernelId::index`].
    kernels: Vec<ptx_sim::Kernel>,
    state: Mutex<SimState>,
}

/// A simulated GPU: device memory in the host and the crate's kernels parsed for the
/// simulator. A cheap handle: clones share the same device, so a test can keep one while the
/// optimizer holds another.
#[derive(Clone)]
pub struct SimDevice {
    shared: Arc<Shared>,
}

impl fmt::Debug for SimDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SimDevice({})", self.shared.id)
    }
}

/// A buffer of `T` in simulated device memory, the simulated counterpart of a `CudaSlice`.
/// Freed when dropped.
pub struct SimSlice<T> {
    shared: Arc<Shared>,
    ptr: DevicePtr,
    /// Where the allocation itself starts (the slice may start past it, see
    /// [`SimDevice::upload_at_offset`]).
    base: DevicePtr,
    len: usize,
    _element: PhantomData<T>,
}

impl<T> fmt::Debug for SimSlice<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SimSlice({} x {} at {:#x} on device {})",
            self.len,
            std::any::type_name::<T>(),
            self.ptr.0,
            self.shared.id
        )
    }
}

impl<T> SimSlice<T> {
    /// Elements in the buffer.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The simulated device address of the first element.
    pub fn address(&self) -> u64 {
        self.ptr.0
    }
}

impl<T> Drop for SimSlice<T> {
    fn drop(&mut self) {
        // A poisoned lock means a simulator panic is already unwinding; the memory goes with
        // the device.
        if let Ok(mut state) = self.shared.state.lock() {
            let _ = state.memory.free(self.base);
        }
    }
}

/// A zero-filled allocation, or [`Error::OutOfMemory`] past the memory limit or what the
/// host grants.
fn allocate(state: &mut SimState, bytes: usize) -> Result<DevicePtr> {
    state
        .memory
        .try_alloc(bytes)
        .map_err(|_| Error::OutOfMemory {
            what: "simulated device memory",
            bytes,
        })
}

fn sim_error(context: &'static str) -> impl Fn(ptx_sim::SimError) -> Error {
    move |error| Error::Simulator {
        context,
        message: error.to_string(),
    }
}

impl SimDevice {
    /// A device with default [`SimOptions`], every kernel parsed. Errors only if a kernel
    /// uses PTX the simulator does not implement (a bug of this crate).
    pub fn new() -> Result<Self> {
        Self::with_options(SimOptions::default())
    }

    /// A device with these options.
    pub fn with_options(options: SimOptions) -> Result<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let kernels = KernelId::ALL
            .iter()
            .map(|&id| {
                let module = kernels::module(id);
                let parsed = ptx_sim::parse(module.ptx).map_err(sim_error("parsing a kernel"))?;
                parsed
                    .kernel(id.entry_name())
                    .cloned()
                    .ok_or(Error::Simulator {
                        context: "parsing a kernel",
                        message: format!("module {} has no entry {}", module.name, id.entry_name()),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            shared: Arc::new(Shared {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                kernels,
                state: Mutex::new(SimState {
                    memory: ptx_sim::Device::with_memory_limit(options.memory_limit),
                    options,
                    stats: SimStats::default(),
                    power_shared_bytes: DEFAULT_SHARED_BYTES,
                }),
            }),
        })
    }

    fn state(&self) -> Result<MutexGuard<'_, SimState>> {
        self.shared.state.lock().map_err(|_| Error::Simulator {
            context: "locking the device",
            message: "a simulator thread panicked".into(),
        })
    }

    /// The options in force.
    pub fn options(&self) -> Result<SimOptions> {
        Ok(self.state()?.options)
    }

    /// Changes the options (for example the CTA order) for the launches and allocations
    /// that follow.
    pub fn set_options(&self, options: SimOptions) -> Result<()> {
        let mut state = self.state()?;
        state.memory.set_memory_limit(options.memory_limit);
        state.options = options;
        Ok(())
    }

    /// What the device has run since it was made or [`reset_stats`](Self::reset_stats).
    /// A poisoned device reports zeros.
    pub fn stats(&self) -> SimStats {
        self.state().map(|s| s.stats).unwrap_or_default()
    }

    /// Zeroes the counters of [`stats`](Self::stats).
    pub fn reset_stats(&self) -> Result<()> {
        self.state()?.stats = SimStats::default();
        Ok(())
    }

    /// Bytes of simulated memory held by live buffers (the optimizer's and the caller's).
    pub fn allocated_bytes(&self) -> Result<usize> {
        Ok(self.state()?.memory.allocated_bytes())
    }

    /// A new buffer holding `values`.
    pub fn upload<T: Pod>(&self, values: &[T]) -> Result<SimSlice<T>> {
        self.upload_at_offset(values, 0)
    }

    /// A new buffer holding `values`, starting `byte_offset` bytes past a 256-byte boundary
    /// (a multiple of `T`'s size): to test code on buffers that are not 16-byte aligned,
    /// which the kernels move one element at a time instead of four.
    pub fn upload_at_offset<T: Pod>(
        &self,
        values: &[T],
        byte_offset: usize,
    ) -> Result<SimSlice<T>> {
        let element = std::mem::size_of::<T>();
        if element == 0 || !byte_offset.is_multiple_of(element) || byte_offset >= 256 {
            return Err(Error::InvalidArgument(format!(
                "byte_offset {byte_offset} must be a multiple of the element size {element} \
                 below 256"
            )));
        }
        let bytes: &[u8] = bytemuck::cast_slice(values);
        let mut state = self.state()?;
        let base = allocate(&mut state, byte_offset + bytes.len())?;
        let ptr = base.offset(byte_offset as u64);
        state
            .memory
            .write(ptr, bytes)
            .map_err(sim_error("writing a buffer"))?;
        Ok(self.slice(base, ptr, values.len()))
    }

    fn slice<T>(&self, base: DevicePtr, ptr: DevicePtr, len: usize) -> SimSlice<T> {
        SimSlice {
            shared: Arc::clone(&self.shared),
            ptr,
            base,
            len,
            _element: PhantomData,
        }
    }

    /// A new zero-filled buffer of `len` elements.
    pub fn alloc_zeros<T: Pod>(&self, len: usize) -> Result<SimSlice<T>> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error::InvalidArgument(format!("{len} elements do not fit")))?;
        let base = allocate(&mut *self.state()?, bytes)?;
        Ok(self.slice(base, base, len))
    }

    /// The contents of `slice`.
    pub fn download<T: Pod>(&self, slice: &SimSlice<T>) -> Result<Vec<T>> {
        self.check_own(slice)?;
        let bytes = self
            .state()?
            .memory
            .read(slice.ptr, std::mem::size_of::<T>() * slice.len)
            .map_err(sim_error("reading a buffer"))?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Overwrites `slice` with `values` (of the same length).
    pub fn write<T: Pod>(&self, slice: &mut SimSlice<T>, values: &[T]) -> Result<()> {
        self.check_own(slice)?;
        if values.len() != slice.len {
            return Err(Error::InvalidArgument(format!(
                "{} values for a buffer of {}",
                values.len(),
                slice.len
            )));
        }
        self.state()?
            .memory
            .write(slice.ptr, bytemuck::cast_slice(values))
            .map_err(sim_error("writing a buffer"))
    }

    fn check_own<T>(&self, slice: &SimSlice<T>) -> Result<()> {
        if Arc::ptr_eq(&slice.shared, &self.shared) {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "a buffer of simulated device {} was passed to simulated device {}",
                slice.shared.id, self.shared.id
            )))
        }
    }
}

impl sealed::Sealed for SimDevice {}

impl Device for SimDevice {
    type Slice<T: Element> = SimSlice<T>;
    type Buffer = SimSlice<u8>;
    type Guard<'a> = ();

    /// A new simulated device.
    fn open_default() -> Result<Self> {
        Self::new()
    }

    fn describe(&self) -> String {
        format!("simulated device {}", self.shared.id)
    }

    fn max_shared_bytes(&self) -> u32 {
        self.state()
            .map(|s| s.options.max_shared_bytes)
            .unwrap_or(0)
    }

    fn prepare_power_shared(&self, bytes: u32) -> Result<()> {
        let mut state = self.state()?;
        if bytes > state.options.max_shared_bytes {
            return Err(Error::DeviceLimit(format!(
                "{bytes} bytes of shared memory asked for, the device allows {}",
                state.options.max_shared_bytes
            )));
        }
        state.power_shared_bytes = state.power_shared_bytes.max(bytes);
        Ok(())
    }

    fn alloc(&self, bytes: usize) -> Result<SimSlice<u8>> {
        self.alloc_zeros(bytes)
    }

    /// The simulator runs each call as it is made, so nothing is staged.
    type Staging = ();

    fn alloc_staging(&self, _bytes: usize) -> Result<()> {
        Ok(())
    }

    fn upload_staged(
        &self,
        _staging: &mut (),
        buffer: &mut SimSlice<u8>,
        bytes: &[u8],
    ) -> Result<()> {
        Device::upload(self, buffer, 0, bytes)
    }

    fn upload(&self, buffer: &mut SimSlice<u8>, offset: usize, bytes: &[u8]) -> Result<()> {
        self.check_own(buffer)?;
        checked_end(buffer.len, offset, bytes.len())?;
        let mut state = self.state()?;
        state.stats.backend_uploads += 1;
        state
            .memory
            .write(buffer.ptr.offset(offset as u64), bytes)
            .map_err(sim_error("writing device memory"))
    }

    fn download(&self, buffer: &SimSlice<u8>, offset: usize, len: usize) -> Result<Vec<u8>> {
        self.check_own(buffer)?;
        checked_end(buffer.len, offset, len)?;
        self.state()?
            .memory
            .read(buffer.ptr.offset(offset as u64), len)
            .map_err(sim_error("reading device memory"))
    }

    fn buffer_address(&self, buffer: &SimSlice<u8>) -> u64 {
        buffer.ptr.0
    }

    fn slice_len<T: Element>(slice: &SimSlice<T>) -> usize {
        slice.len
    }

    fn read_address<'a, T: Element>(&'a self, slice: &'a SimSlice<T>) -> Result<(u64, ())> {
        self.check_own(slice)?;
        Ok((slice.ptr.0, ()))
    }

    fn write_address<'a, T: Element>(&'a self, slice: &'a mut SimSlice<T>) -> Result<(u64, ())> {
        self.check_own(slice)?;
        Ok((slice.ptr.0, ()))
    }

    /// Runs `launch` at once (the simulator has no queue), with every check of the module
    /// docs; this function is `unsafe` only because the trait is.
    unsafe fn launch(&self, launch: &Launch) -> Result<()> {
        let kernel = &self.shared.kernels[launch.kernel.index()];
        let mut state = self.state()?;
        let allowed = if launch.kernel.uses_power_shared_memory() {
            state.power_shared_bytes
        } else {
            DEFAULT_SHARED_BYTES
        };
        if launch.shared_bytes > allowed {
            return Err(Error::Simulator {
                context: "launching a kernel",
                message: format!(
                    "{} asks for {} bytes of dynamic shared memory, {allowed} allowed",
                    launch.kernel.entry_name(),
                    launch.shared_bytes
                ),
            });
        }
        let args: Vec<ptx_sim::Arg> = launch
            .args
            .iter()
            .map(|arg| match *arg {
                LaunchArg::U64(value) => ptx_sim::Arg::U64(value),
                LaunchArg::U32(value) => ptx_sim::Arg::U32(value),
                LaunchArg::F32(value) => ptx_sim::Arg::F32(value),
            })
            .collect();
        let shuffle_seed = match state.options.cta_order {
            CtaOrder::Linear => None,
            CtaOrder::Shuffled { seed } => Some(seed.wrapping_add(state.stats.launches)),
        };
        let config = ptx_sim::LaunchConfig {
            grid: [launch.grid, 1, 1],
            block: [launch.block, 1, 1],
            dynamic_shared_bytes: launch.shared_bytes,
            shuffle_seed,
            step_limit: state.options.step_limit,
        };
        let run = state
            .memory
            .launch(kernel, &config, &args)
            .map_err(sim_error("running a kernel"))?;
        let stats = &mut state.stats;
        stats.launches += 1;
        stats.warp_instructions += run.warp_instructions;
        stats.thread_instructions += run.thread_instructions;
        stats.global_vector_accesses += run.global_vector_accesses;
        Ok(())
    }

    /// The simulator multiplies on the host: nothing to load.
    fn prepare_gemm(&self) -> Result<()> {
        Ok(())
    }

    /// Runs `gemm` at once with [`host_gemm`](crate::device::host_gemm) on the simulated
    /// memory: every operand is read and written through the simulator's bounds checks, so
    /// an address outside a live allocation is an error here, not undefined behaviour.
    unsafe fn gemm(&self, gemm: &Gemm) -> Result<()> {
        let (a_bytes, b_bytes, c_bytes) = gemm.byte_lengths()?;
        let mut state = self.state()?;
        let read = |state: &SimState, address: u64, len: usize| {
            state
                .memory
                .read(DevicePtr(address), len)
                .map_err(sim_error("reading a GEMM operand"))
        };
        let halves = |bytes: Vec<u8>| -> Vec<half::bf16> { bytemuck::pod_collect_to_vec(&bytes) };
        let a = halves(read(&state, gemm.a, a_bytes)?);
        let b = halves(read(&state, gemm.b, b_bytes)?);
        let old = read(&state, gemm.c, c_bytes)?;
        let mut c: Vec<f32> = match gemm.output {
            GemmOutput::Bf16 => halves(old).iter().map(|v| v.to_f32()).collect(),
            GemmOutput::F32 => bytemuck::pod_collect_to_vec(&old),
        };
        crate::device::host_gemm(&gemm.batch, &a, &b, &mut c)?;
        let bytes: Vec<u8> = match gemm.output {
            GemmOutput::Bf16 => c
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
                .collect(),
            GemmOutput::F32 => bytemuck::cast_slice(&c).to_vec(),
        };
        state.stats.gemms += 1;
        state
            .memory
            .write(DevicePtr(gemm.c), &bytes)
            .map_err(sim_error("writing a GEMM result"))
    }

    /// Nothing to wait for: launches run when they are enqueued.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
