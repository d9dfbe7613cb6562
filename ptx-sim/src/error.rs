//! The simulator's error type.

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
}

/// `Result` with [`SimError`].
pub type Result<T, E = SimError> = std::result::Result<T, E>;

pub(crate) fn parse_error<T>(line: usize, message: impl Into<String>) -> Result<T> {
    Err(SimError::Parse {
        line,
        message: message.into(),
    })
}
