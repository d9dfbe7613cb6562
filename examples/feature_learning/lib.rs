//! The computations of the feature-learning example (math §7): a small MLP in plain Rust,
//! four parametrisations, the three experiments (width sweep, learning-rate transfer,
//! low-rank updates) and training in bf16 (math §5a). No plotting or printing here, so that the test suite can run the quick
//! mode and check the science (`tests/feature_learning.rs`).
//!
//! `main.rs` and the test include this file with `#[path]`, so its submodules are the files
//! next to it.

// The example and the test each use only part of these modules.
#![allow(dead_code)]

pub mod checks;
pub mod experiments;
pub mod model;
pub mod parametrisation;
pub mod precision;
pub mod statistics;
pub mod trainer;
