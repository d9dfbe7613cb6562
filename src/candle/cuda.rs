//! The adapter on candle's CUDA tensors (feature `candle-cuda`, math §5c).
//!
//! * The spectral groups run the crate's kernels ([`crate::cuda::Cuda`]) on candle's own
//!   stream, on candle's buffers: the weights and gradients of every member parameter are
//!   the buffers candle allocated, each parameter's matrices back to back in its buffer
//!   ([`SpectralSgd::step_packed`](crate::SpectralSgd::step_packed)), so a step is one launch
//!   per pass for all of a group's matrices, with no copy and no host synchronisation. The
//!   stream orders the step after the backward pass that wrote the gradients and before the
//!   next forward pass.
//! * The AdamW group is candle-nn's `AdamW`, the same tensor operations on the same stream
//!   (so bit for bit candle-nn's on `f32`), with `f32` moments for 16-bit parameters and a
//!   device-side guard that leaves a parameter whose gradient is not finite unchanged.
//! * `f32` master weights of 16-bit parameters are `f32` tensors on the device.
//!
//! [`SpectralOptimizer::step`](candle_nn::Optimizer::step) only enqueues.
//! [`SpectralOptimizer::step_report`] waits for the device to say what happened to each
//! parameter; the state file waits to copy the state out.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use half::{bf16, f16};

use crate::cuda::CudaDevice;
use crate::element::Dtype;
use crate::error::{Error, Result};
use crate::layout::MatrixShape;
use crate::optimizer::SpectralSgd;
use crate::report::MatrixReport;

use super::access::{self, CandleElement, CudaParamRef, ParamMut};
use super::adamw::AdamWConfig;
use super::candle_error;
use super::group::GroupStep;
use super::optimizer::{ParameterUpdate, Role, SpectralGroup, SpectralOptimizer, keeps_master};
use super::state::SlotState;

/// What the optimizer keeps on a CUDA device besides the spectral groups' own state.
#[derive(Debug)]
pub(crate) struct CudaModel {
    /// candle's stream, which every launch of the step goes to.
    pub stream: std::sync::Arc<cudarc::driver::CudaStream>,
    /// Per AdamW slot, in the optimizer's order.
    pub slots: Vec<DeviceSlot>,
    /// Per spectral group that keeps master weights, one `f32` variable per member
    /// parameter, in the group's order.
    pub group_masters: Vec<Option<Vec<Var>>>,
    /// The parameters the step's nest borrows, in order: the spectral ones (AdamW's are
    /// written by candle's own operations after the nest). Each group's masters follow them.
    pub spectral: Vec<usize>,
    /// Per parameter, its place in `spectral`; `usize::MAX` for the others.
    pub position: Vec<usize>,
    /// Per group, the place in the nest of its first master (after `spectral` and the
    /// masters of the groups before it).
    pub master_start: Vec<usize>,
}

/// An AdamW parameter's moments and master weights on the device.
#[derive(Debug)]
pub(crate) struct DeviceSlot {
    pub m: Var,
    pub v: Var,
    pub master: Option<Var>,
}

/// The optimizer of a spectral group of these shapes on candle's stream.
pub(crate) fn group_step(
    device: &candle_core::CudaDevice,
    shapes: &[MatrixShape],
    config: crate::config::SpectralSgdConfig,
) -> Result<GroupStep> {
    let ours = CudaDevice::on_stream(device.cuda_stream())?;
    let optimizer = SpectralSgd::on_device(shapes, config, ours)?;
    Ok(GroupStep::Cuda(optimizer))
}

/// A fresh `f32` copy of a parameter on its device (a master weight).
fn master_of(tensor: &Tensor) -> Result<Var> {
    Var::from_tensor(&tensor.to_dtype(DType::F32).map_err(candle_error)?).map_err(candle_error)
}

impl CudaModel {
    /// Moments (zero) and master weights (from the parameters) for every AdamW slot and
    /// spectral group of `optimizer`, whose groups and slots are already placed.
    pub fn new(device: candle_core::CudaDevice, optimizer: &SpectralOptimizer) -> Result<Self> {
        let stream = device.cuda_stream();
        let on = Device::Cuda(device);
        let slots = optimizer
            .slots
            .iter()
            .map(|slot| {
                let param = &optimizer.params[slot.param];
                let zeros =
                    || Var::zeros(param.dims.as_slice(), DType::F32, &on).map_err(candle_error);
                Ok(DeviceSlot {
                    m: zeros()?,
                    v: zeros()?,
                    master: keeps_master(optimizer.master_weights, param.dtype)
                        .then(|| master_of(param.var.as_tensor()))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let group_masters = optimizer
            .groups
            .iter()
            .map(|group| {
                keeps_master(optimizer.master_weights, group.dtype)
                    .then(|| {
                        group
                            .members
                            .iter()
                            .map(|&(index, _)| master_of(optimizer.params[index].var.as_tensor()))
                            .collect::<Result<Vec<_>>>()
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let spectral: Vec<usize> = optimizer
            .active
            .iter()
            .copied()
            .filter(|&index| matches!(optimizer.params[index].role, Role::Spectral { .. }))
            .collect();
        let mut position = vec![usize::MAX; optimizer.params.len()];
        for (held_index, &index) in spectral.iter().enumerate() {
            position[index] = held_index;
        }
        let mut master_start = Vec::with_capacity(group_masters.len());
        let mut next = spectral.len();
        for masters in &group_masters {
            master_start.push(next);
            next += masters.as_ref().map_or(0, Vec::len);
        }
        Ok(Self {
            stream,
            slots,
            group_masters,
            spectral,
            position,
            master_start,
        })
    }

    /// Takes every master weight afresh from its parameter.
    pub fn reload_master_weights(&self, optimizer: &SpectralOptimizer) -> Result<()> {
        let set = |master: &Var, param: usize| {
            let values = optimizer.params[param]
                .var
                .as_tensor()
                .to_dtype(DType::F32)
                .map_err(candle_error)?;
            master.set(&values).map_err(candle_error)
        };
        for (slot, device_slot) in optimizer.slots.iter().zip(&self.slots) {
            if let Some(master) = &device_slot.master {
                set(master, slot.param)?;
            }
        }
        for (group, masters) in optimizer.groups.iter().zip(&self.group_masters) {
            for (master, &(param, _)) in masters.iter().flatten().zip(&group.members) {
                set(master, param)?;
            }
        }
        Ok(())
    }
}

impl CudaModel {
    /// Writes a decoded state's master weights and AdamW moments to the device.
    pub fn load(
        &self,
        groups: &[SpectralGroup],
        group_masters: Vec<Option<Vec<Vec<f32>>>>,
        slots: Vec<SlotState>,
    ) -> Result<()> {
        for ((group, masters), values) in groups.iter().zip(&self.group_masters).zip(group_masters)
        {
            let (Some(masters), Some(values)) = (masters, values) else {
                continue;
            };
            let mut matrices = values.into_iter();
            for (master, &(_, placement)) in masters.iter().zip(&group.members) {
                let values: Vec<f32> = matrices.by_ref().take(placement.count).flatten().collect();
                set_from_host(master, &values)?;
            }
        }
        for (slot, state) in self.slots.iter().zip(slots) {
            set_from_host(&slot.m, &state.m)?;
            set_from_host(&slot.v, &state.v)?;
            if let (Some(master), Some(values)) = (&slot.master, state.master) {
                set_from_host(master, &values)?;
            }
        }
        Ok(())
    }
}

/// A tensor's values, as `f32`, on the host (waits for the device).
pub(crate) fn to_host(tensor: &Tensor) -> Result<Vec<f32>> {
    tensor
        .flatten_all()
        .and_then(|flat| flat.to_dtype(DType::F32))
        .and_then(|flat| flat.to_vec1::<f32>())
        .map_err(candle_error)
}

/// Writes host values into a device variable of the same element count.
pub(crate) fn set_from_host(var: &Var, values: &[f32]) -> Result<()> {
    let tensor = Tensor::from_slice(values, var.dims(), var.device()).map_err(candle_error)?;
    var.set(&tensor).map_err(candle_error)
}

/// Errors, naming the parameter, unless every active parameter is a CUDA tensor of the
/// first one's device; returns that device (`None` when the model is on the CPU).
pub(crate) fn model_device(params: &[(&str, &Var)]) -> Result<Option<candle_core::CudaDevice>> {
    let Some((_, first)) = params.first() else {
        return Ok(None);
    };
    let device = match first.device() {
        Device::Cpu => None,
        Device::Cuda(device) => Some(device.clone()),
        other => {
            return Err(Error::Parameter {
                name: params[0].0.to_owned(),
                problem: format!(
                    "is on {:?}; the candle adapter steps CPU and CUDA tensors",
                    other.location()
                ),
            });
        }
    };
    for (name, var) in params {
        if !var.device().same_device(first.device()) {
            return Err(Error::Parameter {
                name: (*name).to_owned(),
                problem: format!(
                    "is on {:?}, parameter {} on {:?}; one optimizer steps one device",
                    var.device().location(),
                    params[0].0,
                    first.device().location()
                ),
            });
        }
    }
    Ok(device)
}

/// One step of a model on a CUDA device. With `report`, waits for the device and says what
/// happened to each parameter; without, only enqueues (and returns no report).
pub(crate) fn step(
    optimizer: &mut SpectralOptimizer,
    grads: &GradStore,
    step: u64,
    report: bool,
) -> Result<Option<Vec<ParameterUpdate>>> {
    let gradients = optimizer.checked_gradients(grads)?;
    // Gradients whose tensor does not fill its buffer (a view of a larger one) are copied
    // into buffers of their own: the kernels address whole buffers.
    let gradients: Vec<Option<Tensor>> = gradients
        .into_iter()
        .map(|grad| {
            grad.map(|grad| {
                let fills = {
                    let (storage, layout) = grad.storage_and_layout();
                    access::cuda_param_ref(&storage, layout).is_some()
                };
                if fills {
                    Ok(grad)
                } else {
                    grad.force_contiguous().map_err(candle_error)
                }
            })
            .transpose()
        })
        .collect::<Result<_>>()?;
    optimizer.check_groups_before_step()?;

    let Some(model) = optimizer.cuda.as_ref() else {
        return Err(Error::Candle(
            "internal: a CUDA step without a CUDA model".into(),
        ));
    };
    // The variables the nest borrows (`CudaModel::spectral`, then each group's masters).
    let mut vars: Vec<(&str, &Var)> = model
        .spectral
        .iter()
        .map(|&index| {
            (
                optimizer.params[index].name.as_str(),
                &optimizer.params[index].var,
            )
        })
        .collect();
    let adamw_vars = optimizer.slots.iter().map(|slot| {
        let param = &optimizer.params[slot.param];
        (param.name.as_str(), &param.var)
    });
    for (group, masters) in optimizer.groups.iter().zip(&model.group_masters) {
        for (master, &(index, _)) in masters.iter().flatten().zip(&group.members) {
            vars.push((optimizer.params[index].name.as_str(), master));
        }
    }
    let grad_list: Vec<(&str, &Tensor)> = optimizer
        .params
        .iter()
        .zip(&gradients)
        .filter_map(|(param, grad)| grad.as_ref().map(|g| (param.name.as_str(), g)))
        .collect();
    let mut all_vars = vars.clone();
    all_vars.extend(adamw_vars);
    check_distinct_storage(&all_vars, &grad_list)?;

    let spectral_grads: Vec<Option<Tensor>> = optimizer
        .params
        .iter()
        .zip(&gradients)
        .map(|(param, grad)| match param.role {
            Role::Spectral { .. } => grad.clone(),
            _ => None,
        })
        .collect();
    let guards: Vec<Option<_>> = spectral_grads
        .iter()
        .map(|grad| grad.as_ref().map(Tensor::storage_and_layout))
        .collect();
    let grad_views: Vec<Option<CudaParamRef<'_>>> = guards
        .iter()
        .map(|guard| {
            guard
                .as_ref()
                .and_then(|(storage, layout)| access::cuda_param_ref(storage, layout))
        })
        .collect();
    let var_refs: Vec<&Var> = vars.iter().map(|(_, var)| *var).collect();
    let spectral_len = model.spectral.len();
    let position = &model.position;
    let master_start = &model.master_start;
    let groups = &mut optimizer.groups;
    // Beyond `NEST_ON_CALLER` variables the nest runs on a thread of its own, and a candle
    // device's default stream is per thread: these events order the nest's launches after
    // the caller's work (the backward pass) and the caller's later work (the next forward
    // pass, freeing the gradients) after them. On one thread they order nothing new.
    let stream = &model.stream;
    let before = stream
        .record_event(None)
        .map_err(crate::cuda::cuda_error("recording an event"))?;
    let stepped = std::sync::atomic::AtomicUsize::new(0);
    let outcome = access::with_vars_mut(&var_refs, |held| {
        stream
            .wait(&before)
            .map_err(crate::cuda::cuda_error("waiting for an event"))?;
        let (params_held, masters_held) = held.split_at_mut(spectral_len);
        for ((group, masters), &start) in groups
            .iter_mut()
            .zip(&model.group_masters)
            .zip(master_start)
        {
            let first = start - spectral_len;
            let masters = masters
                .as_ref()
                .map(|masters| &mut masters_held[first..first + masters.len()]);
            match group.dtype {
                Dtype::F32 => step_group::<f32>(group, params_held, masters, position, &grad_views),
                Dtype::Bf16 => {
                    step_group::<bf16>(group, params_held, masters, position, &grad_views)
                }
                Dtype::F16 => step_group::<f16>(group, params_held, masters, position, &grad_views),
            }?;
            stepped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        stream
            .record_event(None)
            .map_err(crate::cuda::cuda_error("recording an event"))
    });
    drop(grad_views);
    drop(guards);
    let after = outcome.inspect_err(|error| {
        if stepped.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            optimizer.interrupted = Some(error.to_string());
        }
    })?;
    stream
        .wait(&after)
        .map_err(crate::cuda::cuda_error("waiting for an event"))?;

    // The AdamW group, after the nest has released every parameter.
    let adamw = optimizer.adamw;
    let mut finite_flags = Vec::with_capacity(optimizer.slots.len());
    for (slot, device_slot) in optimizer.slots.iter().zip(&model.slots) {
        let Some(grad) = &gradients[slot.param] else {
            finite_flags.push((slot.param, None));
            continue;
        };
        let theta = &optimizer.params[slot.param].var;
        let finite = match adamw_step(&adamw, step, theta, device_slot, grad) {
            Ok(finite) => finite,
            Err(error) => {
                let error = Error::Parameter {
                    name: optimizer.params[slot.param].name.clone(),
                    problem: format!("its AdamW step failed on the device: {error}"),
                };
                // The spectral groups have been enqueued (and earlier AdamW slots stepped).
                optimizer.interrupted = Some(error.to_string());
                return Err(error);
            }
        };
        finite_flags.push((slot.param, Some(finite)));
    }
    if !report {
        return Ok(None);
    }

    let mut updates: Vec<ParameterUpdate> = optimizer
        .params
        .iter()
        .map(|param| match param.role {
            Role::Frozen => ParameterUpdate::Frozen,
            _ => ParameterUpdate::NoGradient,
        })
        .collect();
    for group in &optimizer.groups {
        let GroupStep::Cuda(group_optimizer) = &group.optimizer else {
            return Err(Error::Candle(
                "internal: a CPU group in a CUDA model".into(),
            ));
        };
        let mut matrices = group_optimizer.report()?.matrices.into_iter();
        for &(index, placement) in &group.members {
            let reports: Vec<MatrixReport> = matrices.by_ref().take(placement.count).collect();
            updates[index] = ParameterUpdate::Spectral(reports);
        }
    }
    for (param, finite) in finite_flags {
        if let Some(finite) = finite {
            let finite = finite.to_scalar::<u8>().map_err(candle_error)?;
            updates[param] = if finite == 1 {
                ParameterUpdate::AdamW
            } else {
                ParameterUpdate::SkippedNonFinite
            };
        }
    }
    Ok(Some(updates))
}

/// Errors, naming the parameter, if two variables, or a variable and a gradient, are the
/// same candle storage (the CUDA counterpart of the CPU path's address check: a candle CUDA
/// storage owns its buffer, so buffers overlap only when storages are the same).
fn check_distinct_storage(vars: &[(&str, &Var)], grads: &[(&str, &Tensor)]) -> Result<()> {
    let identity = |tensor: &Tensor| {
        let (storage, _) = tensor.storage_and_layout();
        std::ptr::from_ref(&*storage).addr()
    };
    let mut seen = std::collections::HashMap::new();
    for (name, var) in vars {
        if let Some(other) = seen.insert(identity(var.as_tensor()), *name) {
            return Err(access::shares_memory(name, other));
        }
    }
    for (name, grad) in grads {
        if let Some(var_name) = seen.get(&identity(grad)) {
            return Err(access::gradient_shares_memory(name, var_name));
        }
    }
    Ok(())
}

/// Enqueues one spectral group's step on candle's buffers: each member parameter's buffer
/// holds its `placement.count` matrices back to back. With master weights, the `f32`
/// masters are the weights and the parameters the copies (math §5a).
fn step_group<T: CandleElement>(
    group: &mut SpectralGroup,
    params_held: &mut [ParamMut<'_>],
    masters_held: Option<&mut [ParamMut<'_>]>,
    position: &[usize],
    grads: &[Option<CudaParamRef<'_>>],
) -> Result<()> {
    let internal =
        |what: &str| Error::Candle(format!("internal: {what} of a CUDA spectral member"));
    let members = &group.members;
    let counts: Vec<usize> = members
        .iter()
        .map(|(_, placement)| placement.count)
        .collect();
    let grad_buffers = members
        .iter()
        .map(|&(index, _)| grads[index].and_then(T::cuda_slice))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| internal("gradient"))?;
    let mut is_member = vec![false; params_held.len()];
    for &(index, _) in members {
        is_member[position[index]] = true;
    }
    let mut param_buffers = params_held
        .iter_mut()
        .zip(&is_member)
        .filter(|(_, member)| **member)
        .map(|(held, _)| T::cuda_slice_mut(held))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| internal("weight"))?;
    let optimizer = group
        .optimizer
        .cuda_mut()
        .ok_or_else(|| internal("optimizer"))?;
    match masters_held {
        Some(masters) => {
            let mut master_buffers = masters
                .iter_mut()
                .map(f32::cuda_slice_mut)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| internal("master weight"))?;
            optimizer.step_packed_with_copy(
                &counts,
                &mut master_buffers,
                &grad_buffers,
                &mut param_buffers,
            )?;
        }
        None => {
            optimizer.step_packed(&counts, &mut param_buffers, &grad_buffers)?;
        }
    }
    Ok(())
}

/// candle-nn's `AdamW` step on one parameter, operation for operation, in `f32` (moments
/// always; the parameter through its master weights or widened), on the device. A gradient
/// with a non-finite element leaves parameter and moments as they were: the returned `u8`
/// scalar (1: all finite) selects, on the device, between new and old values.
fn adamw_step(
    config: &AdamWConfig,
    step: u64,
    theta: &Var,
    slot: &DeviceSlot,
    grad: &Tensor,
) -> candle_core::Result<Tensor> {
    let lr = config.learning_rate;
    let lr_lambda = lr * config.weight_decay;
    let (beta1, beta2) = (config.beta1, config.beta2);
    // candle-nn's bias corrections, with its `i32` step count.
    let scale_m = 1f64 / (1f64 - beta1.powi(step as i32));
    let scale_v = 1f64 / (1f64 - beta2.powi(step as i32));
    let g = grad.to_dtype(DType::F32)?;
    let next_m = ((slot.m.as_tensor() * beta1)? + (&g * (1.0 - beta1))?)?;
    let next_v = ((slot.v.as_tensor() * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
    let m_hat = (&next_m * scale_m)?;
    let v_hat = (&next_v * scale_v)?;
    let theta_f32 = match &slot.master {
        Some(master) => master.as_tensor().clone(),
        None => theta.as_tensor().to_dtype(DType::F32)?,
    };
    let next_theta = (&theta_f32 * (1f64 - lr_lambda))?;
    let adjusted_grad = (m_hat / (v_hat.sqrt()? + config.eps)?)?;
    let next_theta = (next_theta - (adjusted_grad * lr)?)?;

    // |g| <= f32::MAX exactly where g is finite (false at an infinity, and at a NaN).
    let finite = g.abs()?.le(f64::from(f32::MAX))?.min_all()?;
    let keep = |new: &Tensor, old: &Tensor| finite.broadcast_as(new.shape())?.where_cond(new, old);
    slot.m.set(&keep(&next_m, slot.m.as_tensor())?)?;
    slot.v.set(&keep(&next_v, slot.v.as_tensor())?)?;
    match &slot.master {
        Some(master) => {
            master.set(&keep(&next_theta, master.as_tensor())?)?;
            let rounded = master.as_tensor().to_dtype(theta.dtype())?;
            theta.set(&keep(&rounded, theta.as_tensor())?)?;
        }
        None => {
            let next_theta = next_theta.to_dtype(theta.dtype())?;
            theta.set(&keep(&next_theta, theta.as_tensor())?)?;
        }
    }
    Ok(finite)
}
