//! Write access to many candle variables at once, without copies and without `unsafe`.
//!
//! candle hands out a tensor's storage mutably only inside an in-place custom op
//! ([`candle_core::InplaceOp1`]), for the duration of the call. The step needs every
//! parameter at once (one batch, one pass over memory), so the op for the first variable
//! runs the op for the second inside its own call, and so on: the innermost call holds every
//! write lock and runs the step. The recursion is one frame per parameter.
//!
//! Two rules keep this from deadlocking on candle's (non-reentrant) storage locks: no two
//! variables given share storage, and no gradient read during the step shares storage with
//! a variable. [`check_disjoint`] enforces both before any lock is taken for writing.
//!
//! A model of many parameters nests deeply, so beyond [`NEST_ON_CALLER`] parameters the nest
//! runs on a thread of its own whose stack is sized for it.

use std::cell::RefCell;

use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor, Var};
use half::{bf16, f16};

#[cfg(feature = "candle-cuda")]
use cudarc::driver::CudaSlice;

use crate::element::Element;
use crate::error::{Error, Result};

use super::adamw::AdamWElement;

/// A parameter's storage, borrowed for writing, by device and element type.
pub(crate) enum ParamMut<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [bf16]),
    F16(&'a mut [f16]),
    /// candle's CUDA buffer of a parameter, which it fills exactly (checked).
    #[cfg(feature = "candle-cuda")]
    Cuda(CudaParamMut<'a>),
}

/// A CUDA parameter's buffer, borrowed for writing, by element type.
#[cfg(feature = "candle-cuda")]
pub(crate) enum CudaParamMut<'a> {
    F32(&'a mut CudaSlice<f32>),
    Bf16(&'a mut CudaSlice<bf16>),
    F16(&'a mut CudaSlice<f16>),
}

/// A CUDA gradient's buffer, borrowed for reading, by element type.
#[cfg(feature = "candle-cuda")]
#[derive(Clone, Copy)]
pub(crate) enum CudaParamRef<'a> {
    F32(&'a CudaSlice<f32>),
    Bf16(&'a CudaSlice<bf16>),
    F16(&'a CudaSlice<f16>),
}

/// A gradient's storage, borrowed for reading, by element type.
#[derive(Clone, Copy)]
pub(crate) enum ParamRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

/// The element types a candle parameter may have for stepping.
pub(crate) trait CandleElement: Element + AdamWElement {
    fn slice_mut<'a>(param: &'a mut ParamMut<'_>) -> Option<&'a mut [Self]>;
    fn slice<'a>(param: ParamRef<'a>) -> Option<&'a [Self]>;
    #[cfg(feature = "candle-cuda")]
    fn cuda_slice_mut<'a>(param: &'a mut ParamMut<'_>) -> Option<&'a mut CudaSlice<Self>>;
    #[cfg(feature = "candle-cuda")]
    fn cuda_slice<'a>(param: CudaParamRef<'a>) -> Option<&'a CudaSlice<Self>>;
}

macro_rules! candle_element {
    ($type:ty, $variant:ident) => {
        impl CandleElement for $type {
            fn slice_mut<'a>(param: &'a mut ParamMut<'_>) -> Option<&'a mut [Self]> {
                match param {
                    ParamMut::$variant(values) => Some(values),
                    _ => None,
                }
            }
            fn slice<'a>(param: ParamRef<'a>) -> Option<&'a [Self]> {
                match param {
                    ParamRef::$variant(values) => Some(values),
                    _ => None,
                }
            }
            #[cfg(feature = "candle-cuda")]
            fn cuda_slice_mut<'a>(param: &'a mut ParamMut<'_>) -> Option<&'a mut CudaSlice<Self>> {
                match param {
                    ParamMut::Cuda(CudaParamMut::$variant(values)) => Some(values),
                    _ => None,
                }
            }
            #[cfg(feature = "candle-cuda")]
            fn cuda_slice<'a>(param: CudaParamRef<'a>) -> Option<&'a CudaSlice<Self>> {
                match param {
                    CudaParamRef::$variant(values) => Some(values),
                    _ => None,
                }
            }
        }
    };
}
candle_element!(f32, F32);
candle_element!(bf16, Bf16);
candle_element!(f16, F16);

fn contiguous_range(layout: &Layout) -> candle_core::Result<std::ops::Range<usize>> {
    layout
        .contiguous_offsets()
        .map(|(start, end)| start..end)
        .ok_or_else(|| candle_core::Error::Msg("the tensor is not contiguous".into()))
}

/// The typed, contiguous view of a CPU storage, or `None` for another device or type.
pub(crate) fn param_ref<'a>(storage: &'a Storage, layout: &Layout) -> Option<ParamRef<'a>> {
    let range = layout.contiguous_offsets().map(|(start, end)| start..end)?;
    match storage {
        Storage::Cpu(CpuStorage::F32(values)) => values.get(range).map(ParamRef::F32),
        Storage::Cpu(CpuStorage::BF16(values)) => values.get(range).map(ParamRef::Bf16),
        Storage::Cpu(CpuStorage::F16(values)) => values.get(range).map(ParamRef::F16),
        _ => None,
    }
}

/// The bytes a CPU tensor's elements occupy, as addresses (for the overlap check), or `None`
/// for another device or a non-contiguous layout.
fn address_range(tensor: &Tensor) -> Option<std::ops::Range<usize>> {
    let (storage, layout) = tensor.storage_and_layout();
    let slice_range = |pointer: *const u8, element_bytes: usize| {
        let (start, end) = layout.contiguous_offsets()?;
        let base = pointer.addr();
        Some(base + start * element_bytes..base + end * element_bytes)
    };
    match &*storage {
        Storage::Cpu(CpuStorage::F32(values)) => slice_range(values.as_ptr().cast(), 4),
        Storage::Cpu(CpuStorage::BF16(values)) => slice_range(values.as_ptr().cast(), 2),
        Storage::Cpu(CpuStorage::F16(values)) => slice_range(values.as_ptr().cast(), 2),
        _ => None,
    }
}

/// Errors, naming the parameter, if two variables, or a variable and a gradient, share
/// memory: the step would read what it writes (and candle's locks would deadlock). Two
/// gradients may share memory (a gradient read twice is harmless).
pub(crate) fn check_disjoint(vars: &[(&str, &Var)], grads: &[(&str, &Tensor)]) -> Result<()> {
    let not_cpu = |name: &str, what: &str| Error::Parameter {
        name: name.to_owned(),
        problem: format!("{what} is not a contiguous f32, bf16 or f16 CPU tensor"),
    };
    let mut var_ranges = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        let range = address_range(var.as_tensor()).ok_or_else(|| not_cpu(name, "it"))?;
        if !range.is_empty() {
            var_ranges.push((range, *name));
        }
    }
    var_ranges.sort_by_key(|(range, _)| range.start);
    for pair in var_ranges.windows(2) {
        if pair[1].0.start < pair[0].0.end {
            return Err(shares_memory(pair[1].1, pair[0].1));
        }
    }
    // The parameters are disjoint and sorted, so their ends are sorted too: the first whose
    // end lies beyond a gradient's start is the only one that can overlap it first.
    for (name, grad) in grads {
        let range = address_range(grad).ok_or_else(|| not_cpu(name, "its gradient"))?;
        if range.is_empty() {
            continue;
        }
        let first = var_ranges.partition_point(|(var, _)| var.end <= range.start);
        if let Some((var, var_name)) = var_ranges.get(first)
            && var.start < range.end
        {
            return Err(gradient_shares_memory(name, var_name));
        }
    }
    Ok(())
}

/// Parameter `name` shares memory with parameter `other`.
pub(crate) fn shares_memory(name: &str, other: &str) -> Error {
    Error::Parameter {
        name: name.to_owned(),
        problem: format!("it shares memory with parameter {other}"),
    }
}

/// The gradient of parameter `name` shares memory with parameter `var_name`.
pub(crate) fn gradient_shares_memory(name: &str, var_name: &str) -> Error {
    Error::Parameter {
        name: name.to_owned(),
        problem: format!(
            "its gradient shares memory with parameter {var_name}: the step would read what \
             it writes"
        ),
    }
}

type Body<'n, R> = Box<dyn FnOnce(&mut [ParamMut<'_>]) -> Result<R> + 'n>;

/// One level of the nest: holds the write borrows taken so far and takes the next.
struct Nest<'n, 'b, 'p, R> {
    rest: &'n [&'n Var],
    held: RefCell<Vec<ParamMut<'p>>>,
    body: &'n RefCell<Option<Body<'b, R>>>,
    outcome: &'n RefCell<Option<Result<R>>>,
}

impl<R> InplaceOp1 for Nest<'_, '_, '_, R> {
    fn name(&self) -> &'static str {
        "spectral_step_write_access"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let range = contiguous_range(layout)?;
        let out_of_range = || candle_core::Error::Msg("the layout exceeds the storage".into());
        let mut held = self.held.take();
        held.push(match storage {
            CpuStorage::F32(values) => {
                ParamMut::F32(values.get_mut(range).ok_or_else(out_of_range)?)
            }
            CpuStorage::BF16(values) => {
                ParamMut::Bf16(values.get_mut(range).ok_or_else(out_of_range)?)
            }
            CpuStorage::F16(values) => {
                ParamMut::F16(values.get_mut(range).ok_or_else(out_of_range)?)
            }
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "cannot step a {:?} tensor",
                    candle_core::backend::BackendStorage::dtype(other)
                )));
            }
        });
        self.descend(held)
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        storage: &mut candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<()> {
        let range = contiguous_range(layout)?;
        let mut held = self.held.take();
        held.push(ParamMut::Cuda(cuda_param_mut(storage, range)?));
        self.descend(held)
    }
}

impl<'n, 'b, R> Nest<'n, 'b, '_, R> {
    /// Takes the next variable's borrow with `held` kept, or runs the body with all of them.
    fn descend(&self, mut held: Vec<ParamMut<'_>>) -> candle_core::Result<()> {
        match self.rest.split_first() {
            Some((next, rest)) => next.inplace_op1(&Nest {
                rest,
                held: RefCell::new(held),
                body: self.body,
                outcome: self.outcome,
            }),
            None => {
                let body = self
                    .body
                    .take()
                    .ok_or_else(|| candle_core::Error::Msg("the step body ran already".into()))?;
                *self.outcome.borrow_mut() = Some(body(&mut held));
                Ok(())
            }
        }
    }
}

/// A CUDA storage as the buffer of exactly the elements `range` of the layout: the kernels
/// address whole buffers, so a parameter must start at the buffer's first element and fill
/// it (a `Var` does: it owns its storage).
#[cfg(feature = "candle-cuda")]
fn cuda_param_mut(
    storage: &mut candle_core::CudaStorage,
    range: std::ops::Range<usize>,
) -> candle_core::Result<CudaParamMut<'_>> {
    use candle_core::backend::BackendStorage;
    fn exact<T>(
        slice: &mut CudaSlice<T>,
        range: &std::ops::Range<usize>,
    ) -> candle_core::Result<()> {
        if range.start == 0 && slice.len() == range.end {
            Ok(())
        } else {
            Err(candle_core::Error::Msg(format!(
                "the tensor is elements {range:?} of a CUDA buffer of {}; the step needs a \
                 tensor that fills its buffer",
                slice.len()
            )))
        }
    }
    Ok(match storage.dtype() {
        candle_core::DType::F32 => {
            let slice = storage.as_cuda_slice_mut::<f32>()?;
            exact(slice, &range)?;
            CudaParamMut::F32(slice)
        }
        candle_core::DType::BF16 => {
            let slice = storage.as_cuda_slice_mut::<bf16>()?;
            exact(slice, &range)?;
            CudaParamMut::Bf16(slice)
        }
        candle_core::DType::F16 => {
            let slice = storage.as_cuda_slice_mut::<f16>()?;
            exact(slice, &range)?;
            CudaParamMut::F16(slice)
        }
        other => {
            return Err(candle_core::Error::Msg(format!(
                "cannot step a {other:?} tensor"
            )));
        }
    })
}

/// A CUDA gradient's buffer, when the tensor fills it exactly (else `None`: the caller
/// copies the gradient into a buffer of its own first).
#[cfg(feature = "candle-cuda")]
pub(crate) fn cuda_param_ref<'a>(
    storage: &'a Storage,
    layout: &Layout,
) -> Option<CudaParamRef<'a>> {
    let (start, end) = layout.contiguous_offsets()?;
    let Storage::Cuda(storage) = storage else {
        return None;
    };
    fn exact<T>(slice: &CudaSlice<T>, start: usize, end: usize) -> Option<&CudaSlice<T>> {
        (start == 0 && slice.len() == end).then_some(slice)
    }
    use candle_core::backend::BackendStorage;
    match storage.dtype() {
        candle_core::DType::F32 => storage
            .as_cuda_slice::<f32>()
            .ok()
            .and_then(|s| exact(s, start, end))
            .map(CudaParamRef::F32),
        candle_core::DType::BF16 => storage
            .as_cuda_slice::<bf16>()
            .ok()
            .and_then(|s| exact(s, start, end))
            .map(CudaParamRef::Bf16),
        candle_core::DType::F16 => storage
            .as_cuda_slice::<f16>()
            .ok()
            .and_then(|s| exact(s, start, end))
            .map(CudaParamRef::F16),
        _ => None,
    }
}

/// The most parameters whose nest runs on the caller's stack (a test thread's 2 MiB holds
/// it with a wide margin in every profile).
pub(crate) const NEST_ON_CALLER: usize = 128;

/// Stack per nested parameter on the nest's own thread: several times a nest level's frames
/// in an unoptimised build. Only touched pages are committed.
const STACK_PER_PARAMETER: usize = 16 << 10;

/// Runs `body` with every variable of `vars` borrowed for writing, in order. The variables
/// must be contiguous CPU tensors of distinct storage ([`check_disjoint`]).
pub(crate) fn with_vars_mut<R: Send>(
    vars: &[&Var],
    body: impl FnOnce(&mut [ParamMut<'_>]) -> Result<R> + Send,
) -> Result<R> {
    if vars.len() <= NEST_ON_CALLER {
        return nest(vars, body);
    }
    let stack = (1 << 20) + vars.len().saturating_mul(STACK_PER_PARAMETER);
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("spectral-step-nest".into())
            .stack_size(stack)
            .spawn_scoped(scope, || nest(vars, body))
            .map_err(|error| {
                Error::Candle(format!(
                    "cannot start the step's thread ({stack} bytes of stack): {error}"
                ))
            })?;
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn nest<R>(vars: &[&Var], body: impl FnOnce(&mut [ParamMut<'_>]) -> Result<R>) -> Result<R> {
    let Some((first, rest)) = vars.split_first() else {
        return body(&mut []);
    };
    let body: RefCell<Option<Body<'_, R>>> = RefCell::new(Some(Box::new(body)));
    let outcome = RefCell::new(None);
    first
        .inplace_op1(&Nest {
            rest,
            held: RefCell::new(Vec::with_capacity(vars.len())),
            body: &body,
            outcome: &outcome,
        })
        .map_err(|error| Error::Candle(error.to_string()))?;
    outcome
        .into_inner()
        .unwrap_or_else(|| Err(Error::Candle("the step body did not run".into())))
}
