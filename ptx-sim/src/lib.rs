//! # ptx-sim
//!
//! A strict functional simulator for the PTX that spectral-step's kernels are written in, so
//! that machines without a GPU (CI among them) run the exact kernel text against the CPU
//! reference.
//!
//! [`parse`] decodes a module once into a [`Module`] (registers, labels, parameters and shared
//! variables resolved); anything it does not implement is an error naming its line.
//! [`Device`] holds simulated global memory and launches kernels: a grid of CTAs, warps of 32
//! lanes with min-PC reconvergence, `bar.sync`, `bar.warp.sync` and `shfl.sync` as warp
//! collectives, and the checks a GPU sanitizer would make (bounds and alignment of every
//! access, uninitialised shared reads, shared-memory races between barriers, `.nc` loads of
//! written bytes, divergent barriers, deadlocks, bad member masks). `README.md` lists exactly
//! what is supported, and [`limits`] what text and launches may ask for: hostile input is a
//! typed error, never a panic, an abort or a hang.
//!
//! ```
//! let module = ptx_sim::parse(r#"
//!     .version 7.0
//!     .target sm_80
//!     .address_size 64
//!     .visible .entry scale(.param .u64 data, .param .f32 factor) {
//!         .reg .b64 %rd<3>;
//!         .reg .f32 %f<3>;
//!         .reg .b32 %r<2>;
//!         ld.param.u64 %rd1, [data];
//!         ld.param.f32 %f1, [factor];
//!         mov.u32 %r1, %tid.x;
//!         mul.wide.u32 %rd2, %r1, 4;
//!         add.s64 %rd1, %rd1, %rd2;
//!         ld.global.f32 %f2, [%rd1];
//!         mul.rn.f32 %f2, %f2, %f1;
//!         st.global.f32 [%rd1], %f2;
//!         ret;
//!     }
//! "#)?;
//! let kernel = module.kernel("scale").unwrap();
//! assert_eq!(kernel.param_bytes, 12);
//! assert_eq!(kernel.instructions.len(), 9);
//! # Ok::<(), ptx_sim::SimError>(())
//! ```

#![warn(missing_docs)]

mod device;
mod error;
mod exec;
pub mod ir;
pub mod limits;
mod parse;

pub use device::{Arg, Device, DevicePtr, LaunchConfig, LaunchStats};
pub use error::{Fault, Result, SimError};
pub use ir::{Kernel, Module};
pub use limits::DEFAULT_STEP_LIMIT;
pub use parse::parse;
