//! [`DeviceBackend`]: the optimizer's state and tables on a [`Device`], and the step that
//! enqueues the kernels over them.

use std::borrow::{Borrow, BorrowMut};

use super::{Device, download_f32};
use crate::backend::{Backend, HostState, check_step};
use crate::config::SpectralSgdConfig;
use crate::element::{Element, StepTypes};
use crate::error::{Error, Result};
use crate::kernels::iterate::IterateLayout;
use crate::kernels::plan::{
    self, IteratePointers, MatrixPointers, Operation, StatePointers, TablePointers,
};
use crate::kernels::records::MatrixResult;
use crate::layout::{BatchLayout, BlockPolicy, BufferPacking, MatrixShape};
use crate::newton_schulz::UpdateRule;
use crate::optimizer::SpectralSgd;
use crate::policy;
use crate::report::StepReport;
use crate::scaling::Scale;

/// What a device step returns without waiting for the device: which step it was. The
/// outcome per matrix is read with [`SpectralSgd::report`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingReport {
    /// 1-based index of the step.
    pub step: u64,
}

/// The descriptor tables, the per-step buffers and the power vectors: what every launch
/// reads, for the optimizer and for [`PowerIteration`](super::PowerIteration) alike.
#[derive(Debug)]
pub(super) struct Tables<D: Device> {
    pub power_vectors: D::Buffer,
    /// Partials and block sums: only the kernels use them (through `pointers`); held here
    /// so that they live as long as the tables.
    _partials: D::Buffer,
    _block_sums: D::Buffer,
    results: D::Buffer,
    pub warm: D::Buffer,
    /// Block table, uploaded once.
    _blocks: D::Buffer,
    matrices: D::Buffer,
    /// Host memory the matrix table is uploaded through without waiting for the device.
    staging: D::Staging,
    pub pointers: TablePointers,
    state: StatePointers,
    /// What the matrix table on the device was built for; rebuilt when any of it changes
    /// (never, in a training loop that keeps its parameter buffers).
    uploaded: Option<TableKey>,
}

#[derive(Clone, Debug, PartialEq)]
struct TableKey {
    types: StepTypes,
    scale: Scale,
    pointers: Vec<MatrixPointers>,
}

impl<D: Device> Tables<D> {
    /// Checks that the kernels can run `layout`, allocates everything it needs and uploads
    /// the block table. The matrix table points at no momentum until
    /// [`set_momentum`](Self::set_momentum). The byte sizes cannot overflow: `BatchLayout`
    /// checked them for 4-byte state, and the per-matrix and per-block records are no
    /// larger than the layout's own entries, which exist.
    pub fn new(device: &D, layout: &BatchLayout) -> Result<Self> {
        plan::check_layout(layout, device.max_shared_bytes())?;
        device.prepare_power_shared(plan::power_shared_bytes(layout)?)?;
        let power_vectors = device.alloc(4 * layout.total_vector_len())?;
        let partials = device.alloc(4 * layout.total_partial_len())?;
        let block_sums = device.alloc(4 * layout.blocks().len())?;
        let results = device.alloc(layout.len() * MatrixResult::SIZE)?;
        let warm = device.alloc(4 * layout.len())?;
        let block_table = plan::block_descriptors(layout);
        let block_bytes: &[u8] = bytemuck::cast_slice(&block_table);
        let mut blocks = device.alloc(block_bytes.len())?;
        device.upload(&mut blocks, 0, block_bytes)?;
        let table_bytes = layout.len() * crate::kernels::records::MatrixDescriptor::SIZE;
        let matrices = device.alloc(table_bytes)?;
        let staging = device.alloc_staging(table_bytes)?;
        let pointers = TablePointers {
            matrices: device.buffer_address(&matrices),
            blocks: device.buffer_address(&blocks),
            block_sums: device.buffer_address(&block_sums),
            results: device.buffer_address(&results),
            warm: device.buffer_address(&warm),
        };
        let state = StatePointers {
            momentum: 0,
            power_vectors: device.buffer_address(&power_vectors),
            partials: device.buffer_address(&partials),
        };
        Ok(Self {
            power_vectors,
            _partials: partials,
            _block_sums: block_sums,
            results,
            warm,
            _blocks: blocks,
            matrices,
            staging,
            pointers,
            state,
            uploaded: None,
        })
    }

    /// Points the matrix table at the momentum buffer at `address` (before the first upload).
    pub fn set_momentum(&mut self, address: u64) {
        self.state.momentum = address;
        self.uploaded = None;
    }

    /// Uploads the matrix table for these buffers unless it is already on the device.
    /// `iterates` is the orthogonalised rule's iterate layout (the same on every call of one
    /// backend), `None` for the power-normalised rule.
    pub fn upload_matrix_table(
        &mut self,
        device: &D,
        layout: &BatchLayout,
        scale: Scale,
        types: StepTypes,
        pointers: Vec<MatrixPointers>,
        iterates: Option<&IterateLayout>,
    ) -> Result<()> {
        let key = TableKey {
            types,
            scale,
            pointers,
        };
        if self.uploaded.as_ref() == Some(&key) {
            return Ok(());
        }
        let table =
            plan::matrix_descriptors(layout, scale, types, self.state, &key.pointers, iterates)?;
        // Forget the old key first: if the upload fails, the next step uploads again.
        self.uploaded = None;
        device.upload_staged(
            &mut self.staging,
            &mut self.matrices,
            bytemuck::cast_slice(&table),
        )?;
        self.uploaded = Some(key);
        Ok(())
    }

    /// Seeds every power vector from `seed` and marks every one cold.
    pub fn reset_power_vectors(
        &mut self,
        device: &D,
        layout: &BatchLayout,
        seed: u64,
    ) -> Result<()> {
        let vectors = crate::random::cold_power_vectors(layout, seed)?;
        device.upload(&mut self.power_vectors, 0, bytemuck::cast_slice(&vectors))?;
        device.upload(&mut self.warm, 0, &vec![0u8; 4 * layout.len()])
    }

    /// The results of the last finish (or of the orthogonalised rule's kernels, when
    /// `orthogonalised`: no `sigma` is formed, as on the CPU), as reports. Waits for the
    /// device.
    pub fn report(
        &self,
        device: &D,
        layout: &BatchLayout,
        step: u64,
        orthogonalised: bool,
    ) -> Result<StepReport> {
        let bytes = device.download(&self.results, 0, layout.len() * MatrixResult::SIZE)?;
        let matrices = bytes
            .chunks_exact(MatrixResult::SIZE)
            .map(|record| {
                let mut report = policy::report_of(&bytemuck::pod_read_unaligned(record))?;
                // The orthogonalised rule forms no sigma (math §5b).
                if orthogonalised && report.status == crate::report::MatrixStatus::Updated {
                    report.sigma = None;
                }
                Ok(report)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StepReport { step, matrices })
    }
}

/// The orthogonalised rule's buffers (math §5b): two iterate buffers used in turn, the Gram
/// buffers `A`, `A^2`, `P`, and the blocks' `||U||_F^2`, laid out by one [`IterateLayout`].
/// Allocated once, when the backend is made for that rule or at its first step with it.
#[derive(Debug)]
struct Orthogonal<D: Device> {
    layout: IterateLayout,
    pointers: IteratePointers,
    /// Held for the kernels and products, which reach them through `pointers`.
    _buffers: Vec<D::Buffer>,
}

impl<D: Device> Orthogonal<D> {
    /// Loads what the products need (cuBLAS on CUDA) and allocates the buffers.
    fn new(device: &D, layout: &BatchLayout) -> Result<Self> {
        device.prepare_gemm()?;
        let iterates = IterateLayout::new(layout)?;
        let bytes = |elements: usize, size: usize| {
            elements
                .checked_mul(size)
                .ok_or_else(|| Error::DeviceLimit("the Newton-Schulz buffers overflow".into()))
        };
        let sizes = [
            bytes(iterates.iterate_elements(), 2)?,
            bytes(iterates.iterate_elements(), 2)?,
            bytes(iterates.gram_elements(), 2)?,
            bytes(iterates.gram_elements(), 4)?,
            bytes(iterates.gram_elements(), 2)?,
            bytes(layout.blocks().len(), 8)?,
        ];
        let buffers = sizes
            .iter()
            .map(|&size| device.alloc(size))
            .collect::<Result<Vec<_>>>()?;
        let address = |index: usize| device.buffer_address(&buffers[index]);
        let pointers = IteratePointers {
            iterates: [address(0), address(1)],
            gram: address(2),
            gram_square: address(3),
            polynomial: address(4),
            block_norms: address(5),
        };
        Ok(Self {
            layout: iterates,
            pointers,
            _buffers: buffers,
        })
    }
}

/// The optimizer on a [`Device`]: state and tables in device memory, laid out by the
/// layout it was created for ([`BlockPolicy::CUDA`] by default), each step enqueued without
/// waiting. On a CUDA GPU this is [`Cuda`](crate::cuda::Cuda), on the simulator
/// [`Simulated`](crate::sim::Simulated).
///
/// A warm step is three launches for the whole model (power pass, finish, update; math
/// §5.2): `sigma` and the per-matrix decisions stay on the device, and no device memory is
/// allocated after the first step (the host builds the launch list, a few small vectors). A cold step (the first, or after a reset or a state load) runs
/// `cold_iterations` rounds of power pass and finish before the update (math §4.7). With
/// the orthogonalised rule (math §5b) a step is its element-wise kernels around the device's
/// batched products ([`Device::gemm`]), also without waiting. Reading what happened is a
/// separate call, [`SpectralSgd::report`], which waits.
pub struct DeviceBackend<D: Device> {
    device: D,
    layout: BatchLayout,
    momentum: D::Buffer,
    tables: Tables<D>,
    /// The orthogonalised rule's buffers: made with the backend when its config asks for
    /// that rule, else at the first step that does (after a state load changed the rule).
    orthogonal: Option<Orthogonal<D>>,
    /// The layout with one matrix per buffer: how [`Backend::step`]'s buffers lie.
    one_per_buffer: BufferPacking,
    /// The host knows that some power vector is cold (first step, reset, state load).
    host_knows_cold: bool,
    last_step: Option<u64>,
    /// The last step ran the orthogonalised rule (its report has no sigma).
    last_orthogonal: bool,
}

impl<D: Device> std::fmt::Debug for DeviceBackend<D> {
    /// A summary: which device, how much state, which step.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBackend")
            .field("device", &self.device.describe())
            .field("matrices", &self.layout.len())
            .field("elements", &self.layout.packed_elements())
            .field("last_step", &self.last_step)
            .finish_non_exhaustive()
    }
}

impl<D: Device> DeviceBackend<D> {
    /// Fresh state for `layout` on `device`.
    pub fn create_on(device: D, layout: BatchLayout, config: &SpectralSgdConfig) -> Result<Self> {
        config.validate_for(&layout)?;
        let mut tables = Tables::new(&device, &layout)?;
        let orthogonal = match config.update {
            UpdateRule::PowerNormalised => None,
            UpdateRule::Orthogonalised(_) => Some(Orthogonal::new(&device, &layout)?),
        };
        let momentum = device.alloc(4 * layout.total_elements())?;
        tables.set_momentum(device.buffer_address(&momentum));
        tables.reset_power_vectors(&device, &layout, config.seed)?;
        let one_per_buffer = layout.buffer_packing(&vec![1; layout.len()])?;
        Ok(Self {
            one_per_buffer,
            device,
            layout,
            momentum,
            tables,
            orthogonal,
            host_knows_cold: true,
            last_step: None,
            last_orthogonal: false,
        })
    }

    /// The device the state lives on.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// A step on buffers that each hold consecutive matrices of the batch,
    /// `matrices_per_buffer[b]` in buffer `b` ([`BatchLayout::buffer_packing`]): element
    /// types, config and every buffer's length are checked before anything is enqueued.
    pub(crate) fn step_packed<TW: Element, TG: Element>(
        &mut self,
        config: &SpectralSgdConfig,
        step: u64,
        matrices_per_buffer: &[usize],
        weights: &mut [&mut D::Slice<TW>],
        grads: &[&D::Slice<TG>],
        copies: Option<&mut [&mut D::Slice<TG>]>,
    ) -> Result<PendingReport> {
        let types = StepTypes::of::<TW, TG>()?;
        config.validate_for(&self.layout)?;
        let packing = self.layout.buffer_packing(matrices_per_buffer)?;
        if copies.is_some() {
            types.check_copy()?;
        }
        self.enqueue_step(config, step, types, Some(&packing), weights, grads, copies)
    }

    /// Checks every buffer's length against `packing` (made from this backend's layout; one
    /// matrix per buffer when `None`) and enqueues the step's launches. The caller checked the
    /// element types and the config.
    #[allow(clippy::too_many_arguments)]
    fn enqueue_step<TW: Element, TG: Element>(
        &mut self,
        config: &SpectralSgdConfig,
        step: u64,
        types: StepTypes,
        packing: Option<&BufferPacking>,
        weights: &mut [&mut D::Slice<TW>],
        grads: &[&D::Slice<TG>],
        copies: Option<&mut [&mut D::Slice<TG>]>,
    ) -> Result<PendingReport> {
        let schedule = match config.update {
            UpdateRule::PowerNormalised => None,
            UpdateRule::Orthogonalised(schedule) => Some(schedule),
        };
        if schedule.is_some() && self.orthogonal.is_none() {
            // The rule came with a loaded state: its buffers are made at its first step, once.
            self.orthogonal = Some(Orthogonal::new(&self.device, &self.layout)?);
        }
        let packing = packing.unwrap_or(&self.one_per_buffer);
        packing.check_lengths("weight", weights.iter().map(|w| D::slice_len(w)))?;
        packing.check_lengths("gradient", grads.iter().map(|g| D::slice_len(g)))?;
        if let Some(copies) = copies.as_ref() {
            packing.check_lengths("copy", copies.iter().map(|c| D::slice_len(c)))?;
        }
        let layout = &self.layout;
        let device = &self.device;
        // The guards order this step's launches after pending work on the caller's buffers,
        // and record their use when dropped, once the launches are enqueued.
        let mut guards = Vec::with_capacity(3 * packing.buffers());
        let mut bases = Vec::with_capacity(packing.buffers());
        let mut copies = copies.into_iter().flat_map(|copies| copies.iter_mut());
        for (weight, grad) in weights.iter_mut().zip(grads) {
            let (weights, weight_guard) = device.write_address(weight)?;
            let (grads, grad_guard) = device.read_address(grad)?;
            guards.push(weight_guard);
            guards.push(grad_guard);
            let copy = match copies.next() {
                Some(copy) => {
                    let (address, guard) = device.write_address(copy)?;
                    guards.push(guard);
                    address
                }
                None => 0,
            };
            bases.push(MatrixPointers {
                weights,
                grads,
                copy,
            });
        }
        let at = |base: u64, element: usize, bytes: usize| {
            if base == 0 {
                0
            } else {
                base + (element * bytes) as u64
            }
        };
        let pointers = (0..layout.len())
            .map(|matrix| {
                let (buffer, element) = packing.place(matrix);
                let base = bases[buffer];
                MatrixPointers {
                    weights: at(base.weights, element, types.weights().size_bytes()),
                    grads: at(base.grads, element, types.grads().size_bytes()),
                    copy: at(base.copy, element, types.grads().size_bytes()),
                }
            })
            .collect();
        let iterates = self.orthogonal.as_ref().map(|o| &o.layout);
        self.tables
            .upload_matrix_table(device, layout, config.scale, types, pointers, iterates)?;
        if let (Some(schedule), Some(orthogonal)) = (schedule, self.orthogonal.as_ref()) {
            let operations = plan::orthogonal_step_operations(
                layout,
                &orthogonal.layout,
                config,
                &schedule,
                types,
                self.tables.pointers,
                orthogonal.pointers,
                step,
            )?;
            for operation in &operations {
                match operation {
                    // SAFETY: as for the power rule's launches below; the iterate, Gram and
                    // block-norm buffers the orthogonalised kernels reach were allocated in
                    // `Orthogonal::new` at the sizes `orthogonal.layout` gives for this
                    // layout, and every descriptor's `iterate` offset comes from that same
                    // layout, so each block's elements lie inside them.
                    Operation::Launch(launch) => unsafe { device.launch(launch)? },
                    // SAFETY: every product's operands are one shape group's iterates or
                    // Gram matrices, at the group's offsets in buffers sized by
                    // `orthogonal.layout` (which made the groups), alive in `self`; A, A^2,
                    // P and the two iterate buffers are distinct allocations, so C overlaps
                    // neither input; `Orthogonal::new` ran `prepare_gemm`.
                    Operation::Gemm(gemm) => unsafe { device.gemm(gemm)? },
                }
            }
            drop(guards);
            self.last_step = Some(step);
            self.last_orthogonal = true;
            return Ok(PendingReport { step });
        }
        let rounds = policy::rounds_to_launch(config, self.host_knows_cold);
        let launches =
            plan::step_launches(layout, config, types, self.tables.pointers, rounds, step)?;
        for launch in &launches {
            // SAFETY: `step_launches` builds each argument list in the `.param` order and
            // types of the kernel it names (the simulator rejects a mismatch, and CI runs
            // every launch there). Every address it passes was derived from `self.layout`,
            // the one layout this backend exists for: the tables and state were allocated
            // from it in `create_on` (check_layout bounds every count and the shared
            // memory), and the caller's buffers were checked above to hold exactly the
            // matrices `packing` places in them, `packing` having been made from this
            // layout (by both callers); each matrix's address is its buffer's,
            // borrowed here, plus the elements of the matrices before it in that buffer.
            // Copies are written only by the mixed-type update kernels, the kernels of
            // `types`, which the copy check allows. Every buffer belongs to this device and
            // stays borrowed, its guard alive, until every launch is enqueued.
            unsafe { device.launch(launch)? };
        }
        drop(guards);
        self.host_knows_cold = false;
        self.last_step = Some(step);
        self.last_orthogonal = false;
        Ok(PendingReport { step })
    }
}

impl<D: Device> Backend for DeviceBackend<D> {
    type Storage<T: Element> = D::Slice<T>;
    type Report = PendingReport;
    const BLOCK_POLICY: BlockPolicy = BlockPolicy::CUDA;

    /// State on the default device ([`Device::open_default`]).
    fn create(layout: BatchLayout, config: &SpectralSgdConfig) -> Result<Self> {
        Self::create_on(D::open_default()?, layout, config)
    }

    fn layout(&self) -> &BatchLayout {
        &self.layout
    }

    fn step<TW, TG, W, G, C>(
        &mut self,
        config: &SpectralSgdConfig,
        step: u64,
        weights: &mut [W],
        grads: &[G],
        copies: Option<&mut [C]>,
    ) -> Result<PendingReport>
    where
        TW: Element,
        TG: Element,
        W: BorrowMut<D::Slice<TW>> + Send,
        G: Borrow<D::Slice<TG>> + Sync,
        C: BorrowMut<D::Slice<TG>>,
    {
        // Borrowed once: the buffers whose lengths are checked are the buffers whose
        // addresses go to the kernels, whatever the caller's `Borrow` impls do.
        let mut weights: Vec<&mut D::Slice<TW>> =
            weights.iter_mut().map(|w| w.borrow_mut()).collect();
        let grads: Vec<&D::Slice<TG>> = grads.iter().map(|g| g.borrow()).collect();
        let mut copies: Option<Vec<&mut D::Slice<TG>>> =
            copies.map(|copies| copies.iter_mut().map(|c| c.borrow_mut()).collect());
        let types = check_step::<TW, TG>(
            config,
            &self.layout,
            weights.iter().map(|w| D::slice_len(w)),
            grads.iter().map(|g| D::slice_len(g)),
            copies.as_ref().map(|c| c.iter().map(|c| D::slice_len(c))),
        )?;
        self.enqueue_step(
            config,
            step,
            types,
            None,
            &mut weights,
            &grads,
            copies.as_deref_mut(),
        )
    }

    fn export_state(&self) -> Result<HostState> {
        let layout = &self.layout;
        let momentum = download_f32(&self.device, &self.momentum, 0..layout.total_elements())?;
        let vectors = download_f32(
            &self.device,
            &self.tables.power_vectors,
            0..layout.total_vector_len(),
        )?;
        let warm = self
            .device
            .download(&self.tables.warm, 0, 4 * layout.len())?;
        Ok(HostState {
            momentum: layout.pack_elements(&momentum)?,
            power_vectors: layout.pack_vectors(&vectors)?,
            warm: warm.chunks_exact(4).map(|w| w != [0; 4]).collect(),
        })
    }

    fn import_state(&mut self, state: HostState) -> Result<()> {
        state.check(&self.layout)?;
        let momentum = self.layout.unpack_elements(&state.momentum)?;
        let vectors = self.layout.unpack_vectors(&state.power_vectors)?;
        let warm: Vec<u32> = state.warm.iter().map(|&w| u32::from(w)).collect();
        let device = &self.device;
        // A copy that fails half-way leaves a mixture the host cannot know: the next step
        // then runs the cold rounds, whatever the flags say.
        self.host_knows_cold = true;
        device.upload(&mut self.momentum, 0, bytemuck::cast_slice(&momentum))?;
        device.upload(
            &mut self.tables.power_vectors,
            0,
            bytemuck::cast_slice(&vectors),
        )?;
        device.upload(&mut self.tables.warm, 0, bytemuck::cast_slice(&warm))?;
        self.host_knows_cold = state.warm.iter().any(|&w| !w);
        Ok(())
    }

    fn reset_power_vectors(&mut self, seed: u64) -> Result<()> {
        self.tables
            .reset_power_vectors(&self.device, &self.layout, seed)?;
        self.host_knows_cold = true;
        Ok(())
    }
}

impl<D: Device> SpectralSgd<DeviceBackend<D>> {
    /// An optimizer for matrices of these shapes with its state on `device`
    /// ([`BlockPolicy::CUDA`]).
    pub fn on_device(shapes: &[MatrixShape], config: SpectralSgdConfig, device: D) -> Result<Self> {
        Self::on_device_with_layout(BatchLayout::new(shapes, BlockPolicy::CUDA)?, config, device)
    }

    /// An optimizer for a layout built by the caller (another block size; its alignment must
    /// be a multiple of 4 elements) with its state on `device`.
    pub fn on_device_with_layout(
        layout: BatchLayout,
        config: SpectralSgdConfig,
        device: D,
    ) -> Result<Self> {
        Self::from_backend(layout, config, |layout, config| {
            DeviceBackend::create_on(device, layout, config)
        })
    }

    /// The device the state lives on.
    pub fn device(&self) -> &D {
        self.backend().device()
    }

    /// One step over buffers that each hold several consecutive matrices of the batch, back
    /// to back: `matrices_per_buffer[b]` matrices in `weights[b]` and `grads[b]` (a stack of
    /// experts in one buffer, a convolution kernel cut into matrices), with no copy. Element
    /// types, counts and every buffer's length are checked before anything is enqueued.
    ///
    /// It is [`step`](SpectralSgd::step) on the matrices one by one, bit for bit, when every
    /// matrix with `fan_in % 4 == 0` starts at a multiple of 4 elements in its buffer, as in
    /// any stack of equal matrices: such a matrix moves 4 elements at a time as it does in a
    /// buffer of its own. One that starts elsewhere moves one element at a time, which rounds
    /// differently in the last bits (math §5c).
    pub fn step_packed<TW: Element, TG: Element>(
        &mut self,
        matrices_per_buffer: &[usize],
        weights: &mut [&mut D::Slice<TW>],
        grads: &[&D::Slice<TG>],
    ) -> Result<PendingReport> {
        self.step_counted(|backend, config, step| {
            backend.step_packed(config, step, matrices_per_buffer, weights, grads, None)
        })
    }

    /// [`step_packed`](Self::step_packed) on `f32` master weights with 16-bit gradients,
    /// also writing the new weights, rounded to nearest, into `copies` (packed as the
    /// weights), as [`step_with_copy`](SpectralSgd::step_with_copy) does.
    pub fn step_packed_with_copy<TG: Element>(
        &mut self,
        matrices_per_buffer: &[usize],
        weights: &mut [&mut D::Slice<f32>],
        grads: &[&D::Slice<TG>],
        copies: &mut [&mut D::Slice<TG>],
    ) -> Result<PendingReport> {
        self.step_counted(|backend, config, step| {
            backend.step_packed(
                config,
                step,
                matrices_per_buffer,
                weights,
                grads,
                Some(copies),
            )
        })
    }

    /// What the latest step did to each matrix (sigma and status). Waits for the device.
    /// Errors before the first step.
    pub fn report(&self) -> Result<StepReport> {
        let backend = self.backend();
        let step = backend.last_step.ok_or_else(|| {
            Error::InvalidArgument("no step has been taken yet, so there is no report".into())
        })?;
        backend.tables.report(
            &backend.device,
            &backend.layout,
            step,
            backend.last_orthogonal,
        )
    }

    /// Waits until every step enqueued so far has finished on the device.
    pub fn synchronize(&self) -> Result<()> {
        self.device().synchronize()
    }

    /// The momentum of matrix `index`, copied to the host (waits for the device). Panics if
    /// `index` is out of range, like slice indexing.
    pub fn momentum_to_host(&self, index: usize) -> Result<Vec<f32>> {
        let backend = self.backend();
        let range = backend.layout.matrix(index).element_range();
        download_f32(&backend.device, &backend.momentum, range)
    }

    /// The power vector of matrix `index`, copied to the host (waits for the device). Panics
    /// if `index` is out of range.
    pub fn power_vector_to_host(&self, index: usize) -> Result<Vec<f32>> {
        let backend = self.backend();
        let range = backend.layout.matrix(index).vector_range();
        download_f32(&backend.device, &backend.tables.power_vectors, range)
    }
}
