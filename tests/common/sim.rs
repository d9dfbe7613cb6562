//! Runs the crate's PTX kernels in `ptx-sim` the way the CUDA backend runs them on a GPU:
//! same layout, descriptor tables and launch sequence (`spectral_step::kernels`), simulated
//! device memory instead of CUDA buffers.

use ptx_sim::{Arg, Device, DevicePtr, LaunchConfig};
use spectral_step::kernels::{self, Launch, LaunchArg, StatePointers, TablePointers};
use spectral_step::{
    BatchLayout, BlockPolicy, Element, MatrixReport, MatrixShape, SpectralSgdConfig,
};

/// Optimizer state and tables in simulated device memory.
pub struct SimOptimizer {
    pub device: Device,
    pub layout: BatchLayout,
    pub config: SpectralSgdConfig,
    pub momentum: DevicePtr,
    pub vectors: DevicePtr,
    pub partials: DevicePtr,
    pub block_sums: DevicePtr,
    pub results: DevicePtr,
    pub warm: DevicePtr,
    pub blocks: DevicePtr,
    pub any_cold: bool,
    pub steps: u64,
    /// CTA order: `None` in order, `Some(seed)` shuffled.
    pub shuffle_seed: Option<u64>,
}

impl SimOptimizer {
    /// Zero momentum; power vectors copied from `start_vectors` (per matrix, as the CPU
    /// optimizer seeded them), all cold.
    pub fn new(
        shapes: &[MatrixShape],
        policy: BlockPolicy,
        config: SpectralSgdConfig,
        start_vectors: &[Vec<f32>],
    ) -> Self {
        let layout = BatchLayout::new(shapes, policy).expect("valid layout");
        kernels::check_layout(&layout, 48 * 1024).expect("layout fits the kernels");
        let mut device = Device::new();
        let mut vectors = vec![0.0f32; layout.total_vector_len()];
        for (entry, start) in layout.matrices().iter().zip(start_vectors) {
            vectors[entry.vector_range()].copy_from_slice(start);
        }
        let momentum = device.alloc(layout.total_elements() * 4);
        let vectors = device.alloc_f32(&vectors);
        let partials = device.alloc(layout.total_partial_len() * 4);
        let block_sums = device.alloc(layout.blocks().len() * 4);
        let results = device.alloc(layout.len() * kernels::RESULT_BYTES);
        let warm = device.alloc(layout.len() * 4);
        let blocks = device.alloc_bytes(&kernels::block_descriptors(&layout));
        Self {
            device,
            layout,
            config,
            momentum,
            vectors,
            partials,
            block_sums,
            results,
            warm,
            blocks,
            any_cold: true,
            steps: 0,
            shuffle_seed: None,
        }
    }

    fn state_pointers(&self) -> StatePointers {
        StatePointers {
            momentum: self.momentum.0,
            power_vectors: self.vectors.0,
            partials: self.partials.0,
        }
    }

    fn tables(&self, matrices: DevicePtr) -> TablePointers {
        TablePointers {
            matrices: matrices.0,
            blocks: self.blocks.0,
            block_sums: self.block_sums.0,
            results: self.results.0,
            warm: self.warm.0,
        }
    }

    /// Runs `launches` in the simulator; returns how many launches ran.
    pub fn run(&mut self, launches: &[Launch]) -> usize {
        for launch in launches {
            let module = kernels::module(launch.kernel).expect("kernel module exists");
            let parsed = ptx_sim::parse(module.ptx).expect("kernel parses in the simulator");
            let kernel = parsed.kernel(launch.kernel).expect("entry exists");
            let args: Vec<Arg> = launch
                .args
                .iter()
                .map(|arg| match *arg {
                    LaunchArg::U64(v) => Arg::U64(v),
                    LaunchArg::U32(v) => Arg::U32(v),
                    LaunchArg::F32(v) => Arg::F32(v),
                })
                .collect();
            let config = LaunchConfig {
                grid: [launch.grid, 1, 1],
                block: [launch.block, 1, 1],
                dynamic_shared_bytes: launch.shared_bytes,
                shuffle_seed: self.shuffle_seed,
                step_limit: 1 << 40,
            };
            if let Err(error) = self.device.launch(kernel, &config, &args) {
                panic!("{}: {error}", launch.kernel);
            }
        }
        launches.len()
    }

    /// One optimizer step on weights and gradients placed in simulated memory at
    /// `byte_offset` past an allocation's start (0: aligned; 2 or 4: forces the scalar path).
    /// Returns the report and the number of launches.
    pub fn step<T: Element>(
        &mut self,
        weights: &mut [Vec<T>],
        grads: &[Vec<T>],
        byte_offset: u64,
    ) -> (Vec<MatrixReport>, usize) {
        let mut weight_ptrs = Vec::new();
        let mut grad_ptrs = Vec::new();
        for (w, g) in weights.iter().zip(grads) {
            let place = |device: &mut Device, values: &[T]| {
                let bytes: &[u8] = bytemuck::cast_slice(values);
                let base = device.alloc(bytes.len() + 16);
                let ptr = base.offset(byte_offset);
                device.write(ptr, bytes).expect("write");
                ptr
            };
            weight_ptrs.push(place(&mut self.device, w));
            grad_ptrs.push(place(&mut self.device, g));
        }
        let table = kernels::matrix_descriptors(
            &self.layout,
            self.config.scale,
            T::DTYPE,
            self.state_pointers(),
            &weight_ptrs.iter().map(|p| p.0).collect::<Vec<_>>(),
            &grad_ptrs.iter().map(|p| p.0).collect::<Vec<_>>(),
        )
        .expect("descriptors");
        let matrices = self.device.alloc_bytes(&table);
        self.steps += 1;
        let iterations = kernels::iterations_to_launch(&self.config, self.any_cold);
        let launches = kernels::step_launches(
            &self.layout,
            &self.config,
            T::DTYPE,
            self.tables(matrices),
            iterations,
            self.steps,
        )
        .expect("launch plan");
        let count = self.run(&launches);
        self.any_cold = false;
        for (w, ptr) in weights.iter_mut().zip(&weight_ptrs) {
            let bytes = self
                .device
                .read(*ptr, std::mem::size_of_val(w.as_slice()))
                .expect("read weights");
            w.copy_from_slice(bytemuck::cast_slice(&bytes));
        }
        (self.report(), count)
    }

    /// Power iterations on stored matrices (the plain pass); returns the per-matrix reports.
    pub fn power<T: Element>(&mut self, matrices: &[Vec<T>], iterations: u32) -> Vec<MatrixReport> {
        let ptrs: Vec<u64> = matrices
            .iter()
            .map(|m| self.device.alloc_bytes(bytemuck::cast_slice(m)).0)
            .collect();
        let table = kernels::matrix_descriptors(
            &self.layout,
            self.config.scale,
            T::DTYPE,
            self.state_pointers(),
            &ptrs,
            &ptrs,
        )
        .expect("descriptors");
        let table = self.device.alloc_bytes(&table);
        let launches =
            kernels::power_launches(&self.layout, T::DTYPE, self.tables(table), iterations)
                .expect("launch plan");
        self.run(&launches);
        self.report()
    }

    pub fn report(&self) -> Vec<MatrixReport> {
        let bytes = self
            .device
            .read(self.results, self.layout.len() * kernels::RESULT_BYTES)
            .expect("read results");
        kernels::decode_results(&bytes).expect("valid results")
    }

    pub fn momentum(&self, index: usize) -> Vec<f32> {
        let entry = self.layout.matrix(index);
        self.device
            .read_f32(
                self.momentum.offset(4 * entry.element_offset as u64),
                entry.shape.len(),
            )
            .expect("read momentum")
    }

    pub fn power_vector(&self, index: usize) -> Vec<f32> {
        let entry = self.layout.matrix(index);
        self.device
            .read_f32(
                self.vectors.offset(4 * entry.vector_offset as u64),
                entry.shape.fan_in,
            )
            .expect("read power vector")
    }

    pub fn warm_flags(&self) -> Vec<u32> {
        self.device
            .read_u32(self.warm, self.layout.len())
            .expect("read warm flags")
    }
}
