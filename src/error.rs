//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in `spectral_step`. Every fallible public function returns
/// this; nothing panics on user input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A batch must hold at least one matrix.
    #[error("a batch must hold at least one matrix")]
    EmptyBatch,

    /// A matrix with a zero dimension has no spectral norm and no update.
    #[error("matrix {index} has shape {fan_out}x{fan_in}: both dimensions must be at least 1")]
    ZeroDimension {
        /// Position of the matrix in the batch.
        index: usize,
        /// Rows (outputs) of the matrix.
        fan_out: usize,
        /// Columns (inputs) of the matrix.
        fan_in: usize,
    },

    /// The batch is too large to address: an element count or offset overflows.
    #[error("batch layout overflows {what} at matrix {index}")]
    LayoutOverflow {
        /// Position of the matrix whose size overflowed.
        index: usize,
        /// Which quantity overflowed.
        what: &'static str,
    },

    /// Memory for the batch could not be allocated (the shapes ask for more than the
    /// machine grants): nothing was allocated or changed.
    #[error("cannot allocate {bytes} bytes for {what}")]
    OutOfMemory {
        /// What the memory was for.
        what: &'static str,
        /// How many bytes were asked for (saturated at `usize::MAX`).
        bytes: usize,
    },

    /// `step` received a different number of matrices than the optimizer was built for.
    #[error("expected {expected} {what} matrices (one per matrix of the batch), got {got}")]
    MatrixCountMismatch {
        /// Which buffers: "weight", "gradient", ...
        what: &'static str,
        /// The batch size the optimizer was built for.
        expected: usize,
        /// What was passed.
        got: usize,
    },

    /// A weight or gradient buffer has the wrong number of elements for its matrix.
    #[error(
        "{what} matrix {index} has {got} elements, but its shape {fan_out}x{fan_in} needs {expected}"
    )]
    LengthMismatch {
        /// Which buffer: "weight", "gradient", ...
        what: &'static str,
        /// Position of the matrix in the batch.
        index: usize,
        /// Rows of the matrix.
        fan_out: usize,
        /// Columns of the matrix.
        fan_in: usize,
        /// `fan_out * fan_in`.
        expected: usize,
        /// Length of the buffer that was passed.
        got: usize,
    },

    /// A configuration value is out of its documented range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// The weights', gradients' (and copy's) element types do not form a supported step
    /// ([`StepTypes`](crate::StepTypes)).
    #[error("unsupported element types: {0}")]
    ElementTypes(String),

    /// An argument (other than a shape or buffer length) is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A setting this backend cannot run (the orthogonalised update rule on a device, for
    /// now); the message says which and where it runs. Nothing was changed.
    #[error("unsupported here: {0}")]
    Unsupported(String),

    /// A parameter of a candle model cannot be stepped as it is routed: its shape, element
    /// type or device, or its gradient (missing, of another shape or type, or sharing memory
    /// with a parameter). Nothing was changed.
    #[error("parameter {name}: {problem}")]
    Parameter {
        /// The parameter's name (its `VarMap` key, or `var{i}` for the `i`-th bare `Var`).
        name: String,
        /// What is wrong, and what to do about it.
        problem: String,
    },

    /// A candle call failed (feature `candle`).
    #[error("candle: {0}")]
    Candle(String),

    /// Reading or writing a state file failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A state file is truncated, corrupted or not a spectral-step state file.
    #[error("corrupt or unreadable optimizer state: {0}")]
    StateFormat(String),

    /// A state file was written for a different set of matrix shapes.
    #[error("optimizer state is for a different batch: {0}")]
    StateShapeMismatch(String),

    /// The CUDA driver library (`libcuda.so` / `nvcuda.dll`) could not be loaded: no NVIDIA
    /// driver on this machine. Use the CPU backend (see `cuda::choose_backend`).
    #[error("no CUDA driver: {0}")]
    NoCudaDriver(String),

    /// The driver is present but there is no usable device (none installed, or the one asked
    /// for does not exist, or it is older than sm_80).
    #[error("no usable CUDA device: {0}")]
    NoDevice(String),

    /// A CUDA driver call failed.
    #[error("CUDA error in {context}: {message}")]
    Cuda {
        /// What the crate was doing.
        context: &'static str,
        /// The driver's error.
        message: String,
    },

    /// The simulated device (feature `sim`) refused or faulted on a launch, or could not
    /// parse a kernel: a kernel bug or an out-of-range access, caught as a GPU sanitizer
    /// would.
    #[error("simulated device, {context}: {message}")]
    Simulator {
        /// What the crate was doing.
        context: &'static str,
        /// The simulator's message (kernel, instruction, thread).
        message: String,
    },

    /// The batch is beyond what the CUDA kernels handle (for example a `fan_in` whose
    /// partial does not fit in the device's shared memory, or a dimension above `u32`).
    #[error("not supported by the CUDA kernels: {0}")]
    DeviceLimit(String),

    /// No cuBLAS library loads on this machine (CUDA 13's and 12's names are tried). What
    /// needs cuBLAS cannot run on the device; the rest of the CUDA path can.
    #[error("cuBLAS is not available: none of {tried} loads ({message})")]
    NoCublas {
        /// The library file names tried, in order.
        tried: String,
        /// The loader's error for each of them.
        message: String,
    },

    /// A cuBLAS call returned an error status.
    #[error("cuBLAS {call} failed with status {status}")]
    Cublas {
        /// The cuBLAS function.
        call: &'static str,
        /// Its `cublasStatus_t`.
        status: i32,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
