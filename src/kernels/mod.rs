//! The PTX kernels (math §4, §5) as the build script embeds them, and the host-side
//! description of how they are launched.
//!
//! * [`records`]: the records host and kernels share (descriptors, results, statuses, flags,
//!   shared-memory layouts), defined once; the build script substitutes their offsets into
//!   the templates.
//! * [`KernelId`]: which kernel, as a type; [`module`] finds its embedded PTX and cubins.
//! * [`plan`]: descriptor tables and the launch sequence of a step, from a [`BatchLayout`].
//!
//! Everything here is plain data: the device backend ([`crate::device`]) runs it on a CUDA
//! GPU or on the simulated device alike. One CTA per [`RowBlock`](crate::RowBlock) in the
//! power pass and the update, one CTA per matrix in the finish.
//!
//! | kernel | module | grid | math |
//! | --- | --- | --- | --- |
//! | [`KernelId::PowerStep`] | `power_step_{T}`: fused power pass on `U = f(G, M)` | blocks | §4.2, §5.2 (pass A) |
//! | [`KernelId::PowerPlain`] | `power_plain_{T}`: fused power pass on a stored matrix | blocks | §4.2 |
//! | [`KernelId::Finish`] | `power_finish`: partials → `sigma`, `v`, coefficients | matrices | §4.2–4.6 |
//! | [`KernelId::Update`] | `update_{W}_{G}`: `M <- M_new`, `W <- decay W - coefficient U`, rounded as §5a says, and the copy of `f32` master weights | blocks | §5.2 (pass B), §5a |
//! | [`KernelId::OrthNorm`] | `orth_norm_{T}`: per block `||U||_F^2` of `U = f(G, M)` in `f64` | blocks | §5b |
//! | [`KernelId::OrthStart`] | `orth_start_{T}`: the matrix's decision, `X_0 = U / (f ||U||_F + eps)` in `bf16` | blocks | §5b |
//! | [`KernelId::OrthPolynomial`] | `orth_polynomial`: `P = a I + b A + c A^2` between the Newton–Schulz GEMMs | any | §5b |
//! | [`KernelId::OrthCheck`] | `orth_check`: a non-finite last iterate skips its matrix | blocks | §5b |
//! | [`KernelId::OrthUpdate`] | `orth_update_{W}_{G}`: `M <- M_new`, `W <- decay W - eta s X`, rounded as §5a says | blocks | §5b, §5a |
//!
//! The orthogonalised rule's products (`A = X Xᵀ`, `A^2`, `P X`) are not kernels of this crate:
//! they are strided-batched GEMMs ([`crate::device::Gemm`]), cuBLAS on a GPU.
//!
//! ```
//! use spectral_step::{Dtype, StepTypes};
//! use spectral_step::kernels::{self, KernelId};
//! let module = kernels::module(KernelId::Update(StepTypes::new(Dtype::F32, Dtype::Bf16)?));
//! assert!(module.ptx.contains(".entry update_f32_bf16"));
//! // Cubins are present when ptxas was found at build time.
//! for cubin in module.cubins {
//!     assert!([80, 86, 89, 90].contains(&cubin.arch));
//! }
//! # Ok::<(), spectral_step::Error>(())
//! ```
//!
//! [`BatchLayout`]: crate::BatchLayout

pub mod iterate;
pub mod plan;
pub mod records;

use crate::element::{Dtype, StepTypes};

pub use plan::{Launch, LaunchArg, MatrixPointers, StatePointers, TablePointers};

/// A cubin: the module assembled by ptxas for one architecture.
#[derive(Clone, Copy, Debug)]
pub struct Cubin {
    /// Compute capability times ten: 80, 86, 89 or 90.
    pub arch: u32,
    /// The ELF image, as ptxas wrote it.
    pub image: &'static [u8],
}

/// One kernel module: its expanded PTX text and the cubins assembled from it.
#[derive(Clone, Copy, Debug)]
pub struct KernelModule {
    /// The module's single `.entry`, e.g. `power_step_f32`.
    pub name: &'static str,
    /// The expanded PTX (what the simulator runs and the driver JITs when no cubin fits).
    pub ptx: &'static str,
    /// Cubins for sm_80, sm_86, sm_89 and sm_90; empty when ptxas was not found at build time.
    pub cubins: &'static [Cubin],
}

impl KernelModule {
    /// The cubin a device of compute capability `arch` runs natively: the one for `arch`, or
    /// for the nearest earlier minor of the same major (sm_86 code runs on sm_87). `None`
    /// means the driver must JIT the PTX (a newer major, or a PTX-only build).
    pub fn cubin_for(&self, arch: u32) -> Option<&'static Cubin> {
        self.cubins
            .iter()
            .filter(|c| c.arch / 10 == arch / 10 && c.arch <= arch)
            .max_by_key(|c| c.arch)
    }
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Which kernel: one per module the build produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelId {
    /// The fused power pass on the update direction `U = f(G, M)`, gradients of the given
    /// type (pass A of the step).
    PowerStep(Dtype),
    /// The fused power pass on a stored matrix of the given type.
    PowerPlain(Dtype),
    /// The end of a power iteration (one kernel for every type).
    Finish,
    /// The update (pass B) for weights and gradients of the given types.
    Update(StepTypes),
    /// The orthogonalised rule's per-block `||U||_F^2`, gradients of the given type.
    OrthNorm(Dtype),
    /// The orthogonalised rule's decision and its first iterate `X_0 = U / (f ||U||_F + eps)`.
    OrthStart(Dtype),
    /// `P = a I + b A + c A^2` of one Newton–Schulz iteration (one kernel for every type).
    OrthPolynomial,
    /// Marks a matrix whose last iterate is not finite as skipped.
    OrthCheck,
    /// The orthogonalised rule's update, `W <- decay W - eta s X`, for the given types.
    OrthUpdate(StepTypes),
}

impl KernelId {
    /// Every kernel, in a fixed order ([`index`](Self::index) is the position here).
    pub const ALL: [KernelId; 25] = [
        KernelId::PowerStep(Dtype::F32),
        KernelId::PowerStep(Dtype::F16),
        KernelId::PowerStep(Dtype::Bf16),
        KernelId::PowerPlain(Dtype::F32),
        KernelId::PowerPlain(Dtype::F16),
        KernelId::PowerPlain(Dtype::Bf16),
        KernelId::Finish,
        KernelId::Update(StepTypes::ALL[0]),
        KernelId::Update(StepTypes::ALL[1]),
        KernelId::Update(StepTypes::ALL[2]),
        KernelId::Update(StepTypes::ALL[3]),
        KernelId::Update(StepTypes::ALL[4]),
        KernelId::OrthNorm(Dtype::F32),
        KernelId::OrthNorm(Dtype::F16),
        KernelId::OrthNorm(Dtype::Bf16),
        KernelId::OrthStart(Dtype::F32),
        KernelId::OrthStart(Dtype::F16),
        KernelId::OrthStart(Dtype::Bf16),
        KernelId::OrthPolynomial,
        KernelId::OrthCheck,
        KernelId::OrthUpdate(StepTypes::ALL[0]),
        KernelId::OrthUpdate(StepTypes::ALL[1]),
        KernelId::OrthUpdate(StepTypes::ALL[2]),
        KernelId::OrthUpdate(StepTypes::ALL[3]),
        KernelId::OrthUpdate(StepTypes::ALL[4]),
    ];

    /// Position in [`ALL`](Self::ALL): a dense index for per-kernel tables.
    pub const fn index(self) -> usize {
        const fn dtype(dtype: Dtype) -> usize {
            match dtype {
                Dtype::F32 => 0,
                Dtype::F16 => 1,
                Dtype::Bf16 => 2,
            }
        }
        match self {
            KernelId::PowerStep(t) => dtype(t),
            KernelId::PowerPlain(t) => 3 + dtype(t),
            KernelId::Finish => 6,
            KernelId::Update(types) => 7 + types.index(),
            KernelId::OrthNorm(t) => 12 + dtype(t),
            KernelId::OrthStart(t) => 15 + dtype(t),
            KernelId::OrthPolynomial => 18,
            KernelId::OrthCheck => 19,
            KernelId::OrthUpdate(types) => 20 + types.index(),
        }
    }

    /// The `.entry` name in the PTX (and the module's name).
    pub const fn entry_name(self) -> &'static str {
        match self {
            KernelId::PowerStep(Dtype::F32) => "power_step_f32",
            KernelId::PowerStep(Dtype::F16) => "power_step_f16",
            KernelId::PowerStep(Dtype::Bf16) => "power_step_bf16",
            KernelId::PowerPlain(Dtype::F32) => "power_plain_f32",
            KernelId::PowerPlain(Dtype::F16) => "power_plain_f16",
            KernelId::PowerPlain(Dtype::Bf16) => "power_plain_bf16",
            KernelId::Finish => "power_finish",
            // `update_{W}_{G}`, in the order of StepTypes::ALL.
            KernelId::Update(types) => [
                "update_f32_f32",
                "update_f16_f16",
                "update_bf16_bf16",
                "update_f32_f16",
                "update_f32_bf16",
            ][types.index()],
            KernelId::OrthNorm(Dtype::F32) => "orth_norm_f32",
            KernelId::OrthNorm(Dtype::F16) => "orth_norm_f16",
            KernelId::OrthNorm(Dtype::Bf16) => "orth_norm_bf16",
            KernelId::OrthStart(Dtype::F32) => "orth_start_f32",
            KernelId::OrthStart(Dtype::F16) => "orth_start_f16",
            KernelId::OrthStart(Dtype::Bf16) => "orth_start_bf16",
            KernelId::OrthPolynomial => "orth_polynomial",
            KernelId::OrthCheck => "orth_check",
            KernelId::OrthUpdate(types) => [
                "orth_update_f32_f32",
                "orth_update_f16_f16",
                "orth_update_bf16_bf16",
                "orth_update_f32_f16",
                "orth_update_f32_bf16",
            ][types.index()],
        }
    }

    /// Whether the kernel takes the power pass's dynamic shared memory (the partial `w`).
    pub const fn uses_power_shared_memory(self) -> bool {
        matches!(self, KernelId::PowerStep(_) | KernelId::PowerPlain(_))
    }
}

/// Every module the build produced.
pub fn modules() -> &'static [KernelModule] {
    MODULES
}

/// The module of kernel `id`. Every [`KernelId`] has one (a unit test checks the table).
pub fn module(id: KernelId) -> &'static KernelModule {
    MODULES
        .iter()
        .find(|m| m.name == id.entry_name())
        .expect("the build script expands every template into the modules KernelId names")
}

/// The ptxas release line (e.g. `Cuda compilation tools, release 13.5, V13.5.37`) when the
/// kernels were assembled at build time, `None` for a PTX-only build.
pub fn ptxas_version() -> Option<&'static str> {
    PTXAS_VERSION
}

/// ptxas's `-v` output for every module and architecture: registers, shared memory, spills.
pub fn ptxas_report() -> &'static str {
    PTXAS_REPORT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_ids_and_built_modules_match_one_to_one() {
        assert_eq!(modules().len(), KernelId::ALL.len());
        for (position, id) in KernelId::ALL.into_iter().enumerate() {
            assert_eq!(id.index(), position, "{id:?}");
            let module = module(id);
            assert!(
                module.ptx.contains(&format!(".entry {}(", id.entry_name())),
                "{id:?}"
            );
        }
        for built in modules() {
            assert!(
                KernelId::ALL.iter().any(|id| id.entry_name() == built.name),
                "module {} has no KernelId",
                built.name
            );
        }
    }

    #[test]
    fn update_kernels_are_named_by_weight_and_gradient_type() {
        for (position, types) in StepTypes::ALL.into_iter().enumerate() {
            assert_eq!(types.index(), position);
            assert!(
                KernelId::ALL.contains(&KernelId::Update(types)),
                "{types:?}"
            );
            let name = format!("update_{}_{}", types.weights().name(), types.grads().name());
            assert_eq!(KernelId::Update(types).entry_name(), name);
        }
    }

    #[test]
    fn cubins_are_chosen_by_major_and_nearest_earlier_minor() {
        static CUBINS: [Cubin; 4] = [
            Cubin {
                arch: 80,
                image: b"80",
            },
            Cubin {
                arch: 86,
                image: b"86",
            },
            Cubin {
                arch: 89,
                image: b"89",
            },
            Cubin {
                arch: 90,
                image: b"90",
            },
        ];
        let module = KernelModule {
            name: "k",
            ptx: "",
            cubins: &CUBINS,
        };
        let chosen = |arch| module.cubin_for(arch).map(|c| c.arch);
        assert_eq!(chosen(80), Some(80));
        assert_eq!(chosen(86), Some(86));
        assert_eq!(chosen(87), Some(86));
        assert_eq!(chosen(89), Some(89));
        assert_eq!(chosen(90), Some(90));
        assert_eq!(chosen(100), None, "a newer major needs the JIT");
        assert_eq!(chosen(120), None);
        assert_eq!(chosen(75), None);
        let ptx_only = KernelModule {
            name: "k",
            ptx: "",
            cubins: &[],
        };
        assert!(ptx_only.cubin_for(90).is_none());
    }
}
