//! # spectral-step
//!
//! A drop-in optimizer step that satisfies the *spectral condition for feature learning*
//! (Yang, Simon & Bernstein, "A Spectral Condition for Feature Learning", 2023): every weight
//! matrix and every update has spectral norm about `sqrt(fan_out / fan_in)`, which makes
//! hidden features move by `Θ(1)` relative amounts at every width, so hyper-parameters tuned at
//! small width carry over.
//!
//! * [`scaling`]: the paper's math: target factors, spectral initialisation, and the
//!   parametrisation helpers for users who keep their own optimizer.
//! * [`SpectralSgd`]: momentum SGD whose updates are normalised by a power-iteration estimate
//!   of their spectral norm, fused into two passes over memory (math §4, 5).
//! * [`cpu`]: the CPU backend (rayon, bitwise reproducible for any thread count).
//! * [`diagnostics`]: measure `||W||_* / s`, `||ΔW||_* / s` and stable ranks during training.
//! * [`BatchLayout`]: the one description of a batch of matrices every backend reads.
//!
//! ```
//! use spectral_step::{MatrixShape, Scale, SpectralSgd, SpectralSgdConfig, scaling};
//!
//! let shapes = [MatrixShape::new(256, 32), MatrixShape::new(256, 256), MatrixShape::new(10, 256)];
//! let mut weights: Vec<Vec<f32>> = shapes.iter().map(|s| vec![0.0; s.len()]).collect();
//! for (seed, (w, &shape)) in weights.iter_mut().zip(&shapes).enumerate() {
//!     scaling::spectral_init(w, shape, 1.0, Scale::Spectral, seed as u64)?;
//! }
//! let mut optimizer = SpectralSgd::new(&shapes, SpectralSgdConfig::default())?;
//! # let grads: Vec<Vec<f32>> = shapes.iter().map(|s| vec![0.5; s.len()]).collect();
//! // ... compute gradients for `weights` ...
//! let report = optimizer.step(&mut weights, &grads)?;
//! for (layer, line) in report.matrices.iter().enumerate() {
//!     println!("layer {layer}: sigma(U) = {:?}, {:?}", line.sigma, line.status);
//! }
//! # Ok::<(), spectral_step::Error>(())
//! ```

#![warn(missing_docs)]

pub mod backend;
#[cfg(feature = "candle")]
pub mod candle;
mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod diagnostics;
mod element;
mod error;
pub mod kernels;
mod layout;
mod memory;
pub mod newton_schulz;
mod optimizer;
mod policy;
mod random;
mod report;
mod rounding;
pub mod scaling;
#[cfg(feature = "sim")]
pub mod sim;
mod state;

pub use backend::{Backend, HostState};
pub use config::{MAX_POWER_ITERATIONS, MomentumKind, SpectralSgdConfig};
pub use element::{Dtype, Element, StepTypes};
pub use error::{Error, Result};
pub use layout::{BatchLayout, BlockPolicy, BufferPacking, MatrixEntry, MatrixShape, RowBlock};
pub use newton_schulz::{Schedule, UpdateRule};
pub use optimizer::SpectralSgd;
pub use report::{MatrixReport, MatrixStatus, StepReport};
pub use rounding::Rounding;
pub use scaling::Scale;

/// Re-exported so that users can name the element types without adding `half` themselves.
pub use half;
