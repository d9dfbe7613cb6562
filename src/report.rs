//! What a step reports.

/// What happened to one matrix in a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatrixStatus {
    /// `W` and `M` were updated.
    Updated,
    /// The update direction was zero (`sigma == 0`): `M` was updated, `W` left unchanged
    /// (math §4.5.2).
    ZeroDirection,
    /// The power vector was orthogonal to the update direction (`U v == 0` while `U != 0`),
    /// so no estimate could be made: the vector was re-seeded with a deterministic
    /// `±1/sqrt(fan_in)` vector and marked cold, `M` was updated and `W` left unchanged this
    /// step (math §4.6).
    Reseeded,
    /// The update direction held a NaN or an infinity (or overflowed `f32`): `W`, `M` and the
    /// power vector were left untouched (math §4.5.1). Also reported, with its `sigma`, when
    /// `sigma` was so small that `eta s / sigma` overflows: then `W` and `M` are untouched but
    /// the power vector, already normalised, keeps its new value (math §5.4).
    SkippedNonFinite,
}

/// One matrix's line of a [`StepReport`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatrixReport {
    /// The power-iteration estimate of `||U||_*` the update was normalised by; `Some(0.0)` for
    /// a zero direction, `None` when the matrix was skipped for a non-finite direction or its
    /// power vector was re-seeded, and for every other matrix under the orthogonalised rule
    /// ([`UpdateRule::Orthogonalised`](crate::UpdateRule::Orthogonalised)), which estimates
    /// no `σ`.
    pub sigma: Option<f32>,
    /// What was done.
    pub status: MatrixStatus,
}

/// The outcome of one [`SpectralSgd::step`](crate::SpectralSgd::step), in batch order.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// 1-based index of this step.
    pub step: u64,
    /// One entry per matrix, in batch order.
    pub matrices: Vec<MatrixReport>,
}

impl StepReport {
    /// Indices of the matrices skipped for a non-finite update direction.
    pub fn skipped(&self) -> impl Iterator<Item = usize> + '_ {
        self.matrices
            .iter()
            .enumerate()
            .filter(|(_, m)| m.status == MatrixStatus::SkippedNonFinite)
            .map(|(index, _)| index)
    }

    /// True when every matrix was updated.
    pub fn all_updated(&self) -> bool {
        self.matrices
            .iter()
            .all(|m| m.status == MatrixStatus::Updated)
    }
}
