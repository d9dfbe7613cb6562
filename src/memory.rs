//! Allocation that fails with an error instead of aborting, for the buffers whose size comes
//! from the caller's shapes and that a backend keeps (state, scratch, tables), and for the
//! Lanczos basis, which grows with the passes. Transient copies made while saving, loading or
//! estimating a norm are ordinary allocations.

use crate::error::{Error, Result};

/// An empty vector with room for `len` values, or [`Error::OutOfMemory`] naming `what`.
pub(crate) fn with_capacity<T>(len: usize, what: &'static str) -> Result<Vec<T>> {
    let mut values = Vec::new();
    values
        .try_reserve_exact(len)
        .map_err(|_| Error::OutOfMemory {
            what,
            bytes: len.saturating_mul(std::mem::size_of::<T>()),
        })?;
    Ok(values)
}

/// `len` copies of `T::default()`, or [`Error::OutOfMemory`] naming `what`.
pub(crate) fn zeroed<T: Clone + Default>(len: usize, what: &'static str) -> Result<Vec<T>> {
    let mut values = with_capacity(len, what)?;
    values.resize(len, T::default());
    Ok(values)
}
