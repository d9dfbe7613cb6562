//! The CUDA backend: the same [`SpectralSgd`] API on device buffers (`cudarc::driver::CudaSlice`,
//! the buffer type candle's CUDA tensors use), running the PTX kernels of `kernels/`.
//!
//! A warm step is three launches for the whole model (power pass, finish, update; SPEC 5),
//! enqueued on the optimizer's stream without waiting: `sigma` and the per-matrix decisions
//! stay on the device, and nothing is allocated after the first step, so a step can be
//! captured in a CUDA graph. Reading what happened is a separate call,
//! [`SpectralSgd::report`](crate::SpectralSgd::report), which waits for the stream. A cold
//! step (the first, or after a reset or a state load) runs `cold_iterations` rounds of power
//! pass and finish before the update.
//!
//! Without a driver or a device every entry point returns [`Error::NoCudaDriver`] or
//! [`Error::NoDevice`]; [`choose_backend`] tells a program which path it can take.
//!
//! ```
//! use spectral_step::cuda::{self, BackendChoice};
//! match cuda::choose_backend() {
//!     BackendChoice::Cuda(device) => println!("running on {device}"),
//!     BackendChoice::Cpu { reason } => println!("running on the CPU: {reason}"),
//! }
//! ```

mod device;

use std::borrow::{Borrow, BorrowMut};
use std::fmt;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

pub use cudarc;
pub use device::{CudaDevice, DeviceInfo, LoadedFrom, driver_available};

use crate::backend::{Backend, HostState};
use crate::config::SpectralSgdConfig;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::kernels::{self, StatePointers, TablePointers};
use crate::layout::{BatchLayout, BlockPolicy, MatrixShape};
use crate::optimizer::SpectralSgd;
use crate::report::StepReport;
use device::cuda_error;

/// Which backend a program can use here.
#[derive(Debug)]
pub enum BackendChoice {
    /// A CUDA device that the kernels run on.
    Cuda(DeviceInfo),
    /// The CPU path, and why not CUDA.
    Cpu {
        /// Why CUDA is not usable (no driver, no device, too old, ...).
        reason: Error,
    },
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendChoice::Cuda(device) => write!(f, "{device}"),
            BackendChoice::Cpu { reason } => write!(f, "CPU ({reason})"),
        }
    }
}

/// Opens device 0 and loads the kernels to see whether the CUDA path works; otherwise says
/// why the CPU path is the one to use. Never panics.
pub fn choose_backend() -> BackendChoice {
    match CudaDevice::open(0) {
        Ok(device) => BackendChoice::Cuda(device.info().clone()),
        Err(reason) => BackendChoice::Cpu { reason },
    }
}

/// What a CUDA step returns without waiting for the device: which step it was. The outcome
/// per matrix is read with [`SpectralSgd::report`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingReport {
    /// 1-based index of the step.
    pub step: u64,
}

/// Optimizer state on a CUDA device, and the tables the kernels read.
#[derive(Debug)]
pub struct Cuda {
    device: CudaDevice,
    momentum: CudaSlice<f32>,
    power_vectors: CudaSlice<f32>,
    partials: CudaSlice<f32>,
    block_sums: CudaSlice<f32>,
    results: CudaSlice<u8>,
    warm: CudaSlice<u32>,
    blocks: CudaSlice<u8>,
    matrices: CudaSlice<u8>,
    /// Element type and (weight, gradient) addresses the matrix table was built for.
    uploaded: Option<(crate::Dtype, Vec<(u64, u64)>)>,
    /// The host knows a power vector is cold (first step, reset, state load).
    any_cold: bool,
    last_step: Option<u64>,
    /// The optimizer's layout (with [`BlockPolicy::CUDA`]'s alignment gaps), for converting
    /// state to and from the gap-free [`HostState`].
    layout: BatchLayout,
    state_pointers: StatePointers,
    table_pointers: TablePointers,
}

fn device_addresses<T>(slice: &CudaSlice<T>, stream: &cudarc::driver::CudaStream) -> u64 {
    let (address, _guard) = slice.device_ptr(stream);
    address
}

impl Cuda {
    fn create_on(
        device: CudaDevice,
        layout: &BatchLayout,
        config: &SpectralSgdConfig,
    ) -> Result<Self> {
        kernels::check_layout(layout, device.max_shared_bytes())?;
        device.reserve_power_shared(kernels::power_shared_bytes(layout)?)?;
        let stream = device.stream().clone();
        let alloc_f32 = |len: usize| {
            stream
                .alloc_zeros::<f32>(len.max(1))
                .map_err(cuda_error("allocating optimizer state"))
        };
        let momentum = alloc_f32(layout.total_elements())?;
        let power_vectors = alloc_f32(layout.total_vector_len())?;
        let partials = alloc_f32(layout.total_partial_len())?;
        let block_sums = alloc_f32(layout.blocks().len())?;
        let results = stream
            .alloc_zeros::<u8>(layout.len() * kernels::RESULT_BYTES)
            .map_err(cuda_error("allocating the results table"))?;
        let warm = stream
            .alloc_zeros::<u32>(layout.len())
            .map_err(cuda_error("allocating the warm flags"))?;
        let blocks = stream
            .clone_htod(&kernels::block_descriptors(layout))
            .map_err(cuda_error("uploading the block table"))?;
        let matrices = stream
            .alloc_zeros::<u8>(layout.len() * kernels::MATRIX_DESCRIPTOR_BYTES)
            .map_err(cuda_error("allocating the matrix table"))?;
        let mut cuda = Cuda {
            device,
            momentum,
            power_vectors,
            partials,
            block_sums,
            results,
            warm,
            blocks,
            matrices,
            uploaded: None,
            any_cold: true,
            last_step: None,
            layout: layout.clone(),
            state_pointers: StatePointers::default(),
            table_pointers: TablePointers::default(),
        };
        cuda.state_pointers = cuda.compute_state_pointers();
        cuda.table_pointers = cuda.compute_table_pointers();
        cuda.reset_power_vectors(layout, config.seed)?;
        Ok(cuda)
    }

    /// The device this state lives on.
    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// The state buffers' addresses. Computed once at creation: the buffers never move, and
    /// asking cudarc each step would record stream events for buffers only this stream uses.
    fn compute_state_pointers(&self) -> StatePointers {
        let stream = self.device.stream();
        StatePointers {
            momentum: device_addresses(&self.momentum, stream),
            power_vectors: device_addresses(&self.power_vectors, stream),
            partials: device_addresses(&self.partials, stream),
        }
    }

    /// The tables' addresses (once, at creation, like [`Self::compute_state_pointers`]).
    fn compute_table_pointers(&self) -> TablePointers {
        let stream = self.device.stream();
        TablePointers {
            matrices: device_addresses(&self.matrices, stream),
            blocks: device_addresses(&self.blocks, stream),
            block_sums: device_addresses(&self.block_sums, stream),
            results: device_addresses(&self.results, stream),
            warm: device_addresses(&self.warm, stream),
        }
    }

    /// Rebuilds and uploads the matrix table when the caller's buffers moved (never, in a
    /// training loop that keeps its parameter buffers).
    fn upload_matrix_table(
        &mut self,
        layout: &BatchLayout,
        config: &SpectralSgdConfig,
        dtype: crate::Dtype,
        addresses: Vec<(u64, u64)>,
    ) -> Result<()> {
        if self
            .uploaded
            .as_ref()
            .is_some_and(|(d, a)| *d == dtype && *a == addresses)
        {
            return Ok(());
        }
        let (weights, grads): (Vec<u64>, Vec<u64>) = addresses.iter().copied().unzip();
        let table = kernels::matrix_descriptors(
            layout,
            config.scale,
            dtype,
            self.state_pointers,
            &weights,
            &grads,
        )?;
        self.device
            .stream()
            .memcpy_htod(&table, &mut self.matrices)
            .map_err(cuda_error("uploading the matrix table"))?;
        self.uploaded = Some((dtype, addresses));
        Ok(())
    }

    /// The state as it lies on the device (with the layout's alignment gaps). Waits.
    fn padded_state(&self) -> Result<HostState> {
        let stream = self.device.stream();
        let momentum = stream
            .clone_dtoh(&self.momentum)
            .map_err(cuda_error("reading the momentum"))?;
        let power_vectors = stream
            .clone_dtoh(&self.power_vectors)
            .map_err(cuda_error("reading the power vectors"))?;
        let warm = stream
            .clone_dtoh(&self.warm)
            .map_err(cuda_error("reading the warm flags"))?;
        Ok(HostState {
            momentum,
            power_vectors,
            warm: warm.into_iter().map(|w| w != 0).collect(),
        })
    }

    fn report(&self) -> Result<StepReport> {
        let step = self.last_step.ok_or_else(|| {
            Error::InvalidArgument("no step has been taken yet, so there is no report".into())
        })?;
        let results = self
            .device
            .stream()
            .clone_dtoh(&self.results)
            .map_err(cuda_error("reading the step results"))?;
        Ok(StepReport {
            step,
            matrices: kernels::decode_results(&results)?,
        })
    }
}

/// Copies per-matrix runs from a flat buffer with alignment gaps (`offsets` from the CUDA
/// layout) into one without gaps, or back.
fn pack(padded: &[f32], runs: impl Iterator<Item = (usize, usize)>) -> Vec<f32> {
    runs.flat_map(|(offset, len)| padded[offset..offset + len].iter().copied())
        .collect()
}

fn unpack(
    packed: &[f32],
    padded_len: usize,
    runs: impl Iterator<Item = (usize, usize)>,
) -> Vec<f32> {
    let mut padded = vec![0.0; padded_len.max(1)];
    let mut start = 0;
    for (offset, len) in runs {
        padded[offset..offset + len].copy_from_slice(&packed[start..start + len]);
        start += len;
    }
    padded
}

fn element_runs(layout: &BatchLayout) -> impl Iterator<Item = (usize, usize)> + '_ {
    layout
        .matrices()
        .iter()
        .map(|e| (e.element_offset, e.shape.len()))
}

fn vector_runs(layout: &BatchLayout) -> impl Iterator<Item = (usize, usize)> + '_ {
    layout
        .matrices()
        .iter()
        .map(|e| (e.vector_offset, e.shape.fan_in))
}

impl Backend for Cuda {
    type Storage<T: Element> = CudaSlice<T>;
    type Report = PendingReport;
    const BLOCK_POLICY: BlockPolicy = BlockPolicy::CUDA;

    /// State on device 0.
    fn create(layout: &BatchLayout, config: &SpectralSgdConfig) -> Result<Self> {
        Self::create_on(CudaDevice::open(0)?, layout, config)
    }

    fn step<T, W, G>(
        &mut self,
        layout: &BatchLayout,
        config: &SpectralSgdConfig,
        step: u64,
        weights: &mut [W],
        grads: &[G],
    ) -> Result<PendingReport>
    where
        T: Element,
        W: BorrowMut<CudaSlice<T>> + Send,
        G: Borrow<CudaSlice<T>> + Sync,
    {
        layout.check_lengths("weight", weights.iter().map(|w| w.borrow().len()))?;
        layout.check_lengths("gradient", grads.iter().map(|g| g.borrow().len()))?;
        let ordinal = self.device.info().ordinal;
        let on_other_device = weights
            .iter()
            .map(|w| w.borrow().ordinal())
            .chain(grads.iter().map(|g| g.borrow().ordinal()))
            .position(|o| o != ordinal);
        if let Some(index) = on_other_device {
            return Err(Error::InvalidArgument(format!(
                "buffer {index} is on another device than the optimizer's (device {ordinal})"
            )));
        }
        let stream = self.device.stream().clone();
        // The guards make this stream wait for pending work on the caller's buffers, and
        // record this step's use of them when dropped (after the launches are enqueued).
        let mut guards = Vec::with_capacity(2 * layout.len());
        let mut addresses = Vec::with_capacity(layout.len());
        for (weight, grad) in weights.iter_mut().zip(grads) {
            let (weight_address, weight_guard) = weight.borrow_mut().device_ptr_mut(&stream);
            let (grad_address, grad_guard) = grad.borrow().device_ptr(&stream);
            addresses.push((weight_address, grad_address));
            guards.push(weight_guard);
            guards.push(grad_guard);
        }
        self.upload_matrix_table(layout, config, T::DTYPE, addresses)?;
        let iterations = kernels::iterations_to_launch(config, self.any_cold);
        let launches = kernels::step_launches(
            layout,
            config,
            T::DTYPE,
            self.table_pointers,
            iterations,
            step,
        )?;
        self.device.launch_all(&launches)?;
        drop(guards);
        self.any_cold = false;
        self.last_step = Some(step);
        Ok(PendingReport { step })
    }

    fn export_state(&self) -> Result<HostState> {
        let padded = self.padded_state()?;
        Ok(HostState {
            momentum: pack(&padded.momentum, element_runs(&self.layout)),
            power_vectors: pack(&padded.power_vectors, vector_runs(&self.layout)),
            warm: padded.warm,
        })
    }

    fn import_state(&mut self, state: HostState) -> Result<()> {
        let layout = &self.layout;
        let momentum = unpack(
            &state.momentum,
            layout.total_elements(),
            element_runs(layout),
        );
        let vectors = unpack(
            &state.power_vectors,
            layout.total_vector_len(),
            vector_runs(layout),
        );
        let stream = self.device.stream().clone();
        stream
            .memcpy_htod(&momentum, &mut self.momentum)
            .map_err(cuda_error("writing the momentum"))?;
        stream
            .memcpy_htod(&vectors, &mut self.power_vectors)
            .map_err(cuda_error("writing the power vectors"))?;
        let warm: Vec<u32> = state.warm.iter().map(|&w| u32::from(w)).collect();
        stream
            .memcpy_htod(&warm, &mut self.warm)
            .map_err(cuda_error("writing the warm flags"))?;
        self.any_cold = state.warm.iter().any(|&w| !w);
        Ok(())
    }

    fn reset_power_vectors(&mut self, layout: &BatchLayout, seed: u64) -> Result<()> {
        // The same seeded vectors as the CPU path (random.rs), so both start alike.
        let mut vectors = vec![0.0f32; layout.total_vector_len().max(1)];
        for (index, entry) in layout.matrices().iter().enumerate() {
            crate::random::fill_unit_vector(seed, index as u64, &mut vectors[entry.vector_range()]);
        }
        let stream = self.device.stream().clone();
        stream
            .memcpy_htod(&vectors, &mut self.power_vectors)
            .map_err(cuda_error("writing the power vectors"))?;
        stream
            .memset_zeros(&mut self.warm)
            .map_err(cuda_error("clearing the warm flags"))?;
        self.any_cold = true;
        Ok(())
    }
}

impl SpectralSgd<Cuda> {
    /// An optimizer for matrices of these shapes with its state on `device`.
    pub fn on_device(
        shapes: &[MatrixShape],
        config: SpectralSgdConfig,
        device: CudaDevice,
    ) -> Result<Self> {
        Self::from_backend(shapes, config, |layout, config| {
            Cuda::create_on(device, layout, config)
        })
    }

    /// The device the state lives on.
    pub fn device(&self) -> &CudaDevice {
        self.backend().device()
    }

    /// What the latest step did to each matrix (sigma and status). Waits for the device.
    pub fn report(&self) -> Result<StepReport> {
        self.backend().report()
    }

    /// Waits until every step enqueued so far has finished on the device.
    pub fn synchronize(&self) -> Result<()> {
        self.device()
            .stream()
            .synchronize()
            .map_err(cuda_error("waiting for the stream"))
    }

    /// The momentum of matrix `index`, copied to the host (waits for the device). Panics if
    /// `index` is out of range, like slice indexing.
    pub fn momentum_to_host(&self, index: usize) -> Result<Vec<f32>> {
        let backend = self.backend();
        let range = self.layout().matrix(index).element_range();
        backend
            .device
            .stream()
            .clone_dtoh(&backend.momentum.slice(range))
            .map_err(cuda_error("reading the momentum"))
    }

    /// The power vector of matrix `index`, copied to the host (waits for the device).
    pub fn power_vector_to_host(&self, index: usize) -> Result<Vec<f32>> {
        let backend = self.backend();
        let range = self.layout().matrix(index).vector_range();
        backend
            .device
            .stream()
            .clone_dtoh(&backend.power_vectors.slice(range))
            .map_err(cuda_error("reading the power vectors"))
    }
}

/// Batched power iteration on stored matrices on the device (SPEC 4; the plain power pass):
/// `sigma` estimates of weight matrices for diagnostics, and the kernel the GPU benchmark
/// times. Its power vectors are its own, seeded like the optimizer's.
#[derive(Debug)]
pub struct PowerIteration {
    state: Cuda,
}

impl PowerIteration {
    /// Buffers for matrices of these shapes on `device`.
    pub fn new(shapes: &[MatrixShape], device: CudaDevice) -> Result<Self> {
        let config = SpectralSgdConfig::default();
        let layout = BatchLayout::new(shapes, BlockPolicy::CUDA)?;
        Ok(Self {
            state: Cuda::create_on(device, &layout, &config)?,
        })
    }

    /// The device.
    pub fn device(&self) -> &CudaDevice {
        &self.state.device
    }

    /// Enqueues `iterations` power iterations on `matrices` (one per shape, row-major),
    /// continuing from the current vectors. Does not wait.
    pub fn iterate<T: Element>(
        &mut self,
        matrices: &[CudaSlice<T>],
        iterations: u32,
    ) -> Result<()> {
        let layout = self.state.layout.clone();
        layout.check_lengths("matrix", matrices.iter().map(CudaSlice::len))?;
        if iterations == 0 {
            return Err(Error::InvalidArgument(
                "iterations must be at least 1".into(),
            ));
        }
        let stream = self.state.device.stream().clone();
        let mut guards = Vec::with_capacity(layout.len());
        let mut addresses = Vec::with_capacity(layout.len());
        for matrix in matrices {
            let (address, guard) = matrix.device_ptr(&stream);
            addresses.push((address, address));
            guards.push(guard);
        }
        let config = SpectralSgdConfig::default();
        self.state
            .upload_matrix_table(&layout, &config, T::DTYPE, addresses)?;
        let launches =
            kernels::power_launches(&layout, T::DTYPE, self.state.table_pointers, iterations)?;
        self.state.device.launch_all(&launches)?;
        drop(guards);
        self.state.last_step = Some(0);
        Ok(())
    }

    /// The estimates of the last [`iterate`](Self::iterate), per matrix. Waits.
    pub fn report(&self) -> Result<StepReport> {
        self.state.report()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device keeps state with alignment gaps; state files hold it without. Packing and
    /// unpacking must move every element to its place and back.
    #[test]
    fn state_packs_and_unpacks_around_alignment_gaps() {
        let shapes = [
            MatrixShape::new(3, 5),
            MatrixShape::new(1, 1),
            MatrixShape::new(7, 2),
        ];
        let layout = BatchLayout::new(&shapes, BlockPolicy::CUDA).unwrap();
        let packed_len: usize = shapes.iter().map(|s| s.len()).sum();
        assert!(
            layout.total_elements() > packed_len,
            "the CUDA layout has gaps here"
        );
        let packed: Vec<f32> = (0..packed_len).map(|i| i as f32 + 1.0).collect();
        let padded = unpack(&packed, layout.total_elements(), element_runs(&layout));
        for (entry, start) in layout.matrices().iter().zip([0, 15, 16]) {
            let expected: Vec<f32> = (start..start + entry.shape.len())
                .map(|i| i as f32 + 1.0)
                .collect();
            assert_eq!(&padded[entry.element_range()], expected.as_slice());
            assert_eq!(entry.element_offset % 4, 0);
        }
        assert_eq!(pack(&padded, element_runs(&layout)), packed);
        let vectors: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let padded = unpack(&vectors, layout.total_vector_len(), vector_runs(&layout));
        assert_eq!(pack(&padded, vector_runs(&layout)), vectors);
    }
}
