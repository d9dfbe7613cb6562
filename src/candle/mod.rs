//! The optimizer for candle trainers (feature `candle`): [`SpectralOptimizer`] implements
//! [`candle_nn::Optimizer`] over every parameter of a model (math §5c).
//!
//! * **Routing** ([`Routing`]): matrices `(out, in)` get the spectral step with
//!   `fan_out = out`, `fan_in = in`; convolution kernels `(out, in, kh, kw)` are stepped as
//!   `(out, in·kh·kw)` matrices; stacks `(k, out, in)` as `k` matrices; vectors (biases, norm
//!   gains) and embeddings go to an AdamW group with its own learning rate and weight decay.
//!   Rules by name, name fragment, shape or rank override this, down to the paper's choice of
//!   stepping a bias as an `(n, 1)` matrix and an embedding as the input layer.
//! * **In place**: the step reads candle's gradients and writes candle's parameters in their
//!   own storage, with no copy, one batch per element type (and per target ratio of
//!   transposed views), exactly as the slice API
//!   ([`SpectralSgd::step`](crate::SpectralSgd::step)) steps the same matrices.
//! * **Low precision**: `bf16` and `f16` parameters are stepped in their own type (with
//!   stochastic rounding when the config asks for it), or through `f32` master weights
//!   ([`OptimizerConfig::master_weights`]).
//!
//! Replacing candle-nn's AdamW in a training loop is one changed line:
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{Optimizer, VarBuilder, VarMap};
//! use spectral_step::candle::{OptimizerConfig, SpectralOptimizer};
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let hidden = candle_nn::linear(16, 64, vb.pp("hidden"))?;
//! let output = candle_nn::linear(64, 4, vb.pp("output"))?;
//! // Was: candle_nn::AdamW::new(varmap.all_vars(), candle_nn::ParamsAdamW::default())?
//! let mut optimizer = SpectralOptimizer::from_varmap(&varmap, OptimizerConfig::default())?;
//!
//! let inputs = Tensor::randn(0f32, 1.0, (32, 16), &Device::Cpu)?;
//! let targets = Tensor::randn(0f32, 1.0, (32, 4), &Device::Cpu)?;
//! for _ in 0..5 {
//!     let prediction = output.forward(&hidden.forward(&inputs)?.relu()?)?;
//!     let loss = (prediction - &targets)?.sqr()?.mean_all()?;
//!     optimizer.backward_step(&loss)?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod access;
mod adamw;
#[cfg(feature = "candle-cuda")]
mod cuda;
mod group;
mod optimizer;
mod routing;
mod state;

/// A candle error as this crate's.
pub(crate) fn candle_error(error: candle_core::Error) -> crate::error::Error {
    crate::error::Error::Candle(error.to_string())
}

pub use adamw::AdamWConfig;
pub use optimizer::{
    ModelStepReport, OptimizerConfig, ParameterReport, ParameterUpdate, SpectralOptimizer,
};
pub use routing::{MatrixView, Route, Routing, Selector};
