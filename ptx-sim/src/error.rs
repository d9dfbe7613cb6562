//! The simulator's error type.

/// What kind of fault a kernel committed (for tests that expect a particular one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// An access outside every allocation (or outside shared memory or the parameters).
    OutOfBounds,
    /// An access not aligned to its size (a `.v4.f32` access needs 16 bytes).
    Misaligned,
    /// A shared-memory read of bytes no thread wrote.
    UninitializedShared,
    /// Two threads touched a shared word between the same barriers, at least one writing,
    /// without a warp sync between them.
    SharedRace,
    /// A `bar.sync` reached by part of a warp, or after threads of the CTA exited.
    DivergentBarrier,
    /// A `shfl.sync` or `bar.warp.sync` whose member mask does not match the executing lanes.
    BadMask,
    /// An `ld.global.nc` of bytes the same launch writes (before or after the load).
    NonCoherentConflict,
    /// Integer division or remainder by zero.
    DivisionByZero,
    /// A value or form the simulator does not implement at run time.
    Unsupported,
    /// Execution ran past the last instruction (no `ret`/`exit`), or the launch past its
    /// step limit ([`LaunchConfig::step_limit`](crate::LaunchConfig::step_limit): its
    /// warp-instructions plus the cost of setting up its CTAs).
    RunAway,
}

/// Everything the simulator can report. Every error names where it happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The PTX text uses something this simulator does not implement, or is malformed.
    #[error("PTX line {line}: {message}")]
    Parse {
        /// 1-based line of the offending token.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A thread of a kernel faulted.
    #[error(
        "{kernel}: {fault:?}: {message} (CTA {cta:?}, thread {thread:?}, line {line}: {opcode})"
    )]
    Fault {
        /// The kernel.
        kernel: String,
        /// What kind of fault.
        fault: Fault,
        /// The CTA (`%ctaid`).
        cta: [u32; 3],
        /// The thread (`%tid`).
        thread: [u32; 3],
        /// Source line of the instruction.
        line: usize,
        /// Its opcode.
        opcode: String,
        /// Details.
        message: String,
    },
    /// No thread of a CTA can make progress.
    #[error("{kernel}: deadlock in CTA {cta:?}: {message}")]
    Deadlock {
        /// The kernel.
        kernel: String,
        /// The CTA.
        cta: [u32; 3],
        /// The threads' states.
        message: String,
    },
    /// A launch that does not fit the kernel (arguments, shapes, shared memory).
    #[error("launch of {kernel}: {message}")]
    Launch {
        /// The kernel.
        kernel: String,
        /// What is wrong.
        message: String,
    },
    /// A host-side access to device memory outside an allocation.
    #[error("device memory: {0}")]
    Memory(String),
}

impl SimError {
    /// The fault kind, if this is a [`SimError::Fault`].
    pub fn fault(&self) -> Option<Fault> {
        match self {
            SimError::Fault { fault, .. } => Some(*fault),
            _ => None,
        }
    }
}

/// `Result` with [`SimError`].
pub type Result<T, E = SimError> = std::result::Result<T, E>;

pub(crate) fn parse_error<T>(line: usize, message: impl Into<String>) -> Result<T> {
    Err(SimError::Parse {
        line,
        message: message.into(),
    })
}
