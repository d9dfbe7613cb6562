//! [`SpectralOptimizer`]: one optimizer over every parameter of a candle model.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use half::{bf16, f16};

use crate::config::SpectralSgdConfig;
use crate::element::Dtype;
use crate::error::{Error, Result};
use crate::layout::MatrixShape;
use crate::optimizer::SpectralSgd;
use crate::report::MatrixReport;

use super::access::{self, CandleElement, ParamMut, ParamRef};
use super::adamw::{self, AdamWConfig, AdamWElement, Coefficients};
use super::candle_error;
use super::group::GroupStep;
use super::routing::{Placement, Route, Routing};

/// Everything [`SpectralOptimizer`] needs: the spectral step's settings, the AdamW group's,
/// the routing of parameters, and whether 16-bit parameters keep `f32` master weights.
#[derive(Clone, Debug, Default)]
pub struct OptimizerConfig {
    /// The spectral step (its `learning_rate` is the optimizer's
    /// [`learning_rate`](candle_nn::Optimizer::learning_rate)).
    pub spectral: SpectralSgdConfig,
    /// The AdamW group (vectors and embeddings under the default routing).
    pub adamw: AdamWConfig,
    /// Which parameter gets which update.
    pub routing: Routing,
    /// `f32` master weights for `bf16`/`f16` parameters: the optimizer keeps an `f32` copy,
    /// steps it, and writes it rounded to nearest into the parameter (math §5a). The copies
    /// are taken from the parameters when the optimizer is built; after changing a parameter
    /// outside the optimizer, call [`SpectralOptimizer::reload_master_weights`]. Without,
    /// 16-bit parameters are stepped in their own type, the spectral step rounding as
    /// [`SpectralSgdConfig::rounding`] says and AdamW to nearest.
    pub master_weights: bool,
}

/// How one parameter was stepped.
#[derive(Clone, Debug, PartialEq)]
pub enum ParameterUpdate {
    /// The spectral step, one report per matrix of the parameter's view.
    Spectral(Vec<MatrixReport>),
    /// The AdamW step.
    AdamW,
    /// AdamW's parameter left unchanged (moments too) because its gradient is not finite.
    SkippedNonFinite,
    /// An AdamW parameter without a gradient this step, left unchanged (as candle-nn's
    /// optimizers do).
    NoGradient,
    /// Routed [`Route::Frozen`].
    Frozen,
}

/// One parameter's line of a [`ModelStepReport`].
#[derive(Clone, Debug, PartialEq)]
pub struct ParameterReport {
    /// The parameter's name.
    pub name: String,
    /// What the step did to it.
    pub update: ParameterUpdate,
}

/// What a [`SpectralOptimizer::step_report`] did, parameter by parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelStepReport {
    /// The step's number (the first is 1).
    pub step: u64,
    /// Every parameter, in the optimizer's order.
    pub parameters: Vec<ParameterReport>,
}

/// What a parameter is in the optimizer.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Role {
    /// `placement.count` matrices of spectral group `group`, after those of the group's
    /// earlier members.
    Spectral {
        group: usize,
        placement: Placement,
    },
    /// Slot `slot` of the AdamW group.
    AdamW {
        slot: usize,
    },
    Frozen,
}

#[derive(Debug)]
pub(crate) struct Param {
    pub name: String,
    pub var: Var,
    pub dims: Vec<usize>,
    /// The element type the step works in (`F32` for a frozen parameter of another type).
    pub dtype: Dtype,
    pub route: Route,
    pub role: Role,
}

/// Spectral parameters of one element type and one target-to-stored scale ratio, stepped as
/// one batch. The ratio is `s(target) / s(stored)`, 1 but for transposed views; it scales the
/// group's learning rate (and divides its weight decay, so that `ηλ` is the config's).
#[derive(Debug)]
pub(crate) struct SpectralGroup {
    pub dtype: Dtype,
    pub ratio: f32,
    pub optimizer: GroupStep,
    /// The member parameters (index, placement), in the batch's order.
    pub members: Vec<(usize, Placement)>,
    /// `f32` master weights, one per matrix, when the config asks for them and the group is
    /// 16-bit (on the host; a CUDA model keeps them on the device, and `None` here).
    pub master: Option<Vec<Vec<f32>>>,
}

/// An AdamW parameter's moments (and master weights) on the host; empty (and `None`) in a
/// CUDA model, which keeps them on the device.
#[derive(Debug)]
pub(crate) struct AdamWSlot {
    pub param: usize,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub master: Option<Vec<f32>>,
}

/// A [`candle_nn::Optimizer`] over a whole model: each parameter is routed
/// ([`Routing`]) to the spectral step (math §3a, §5) or to an AdamW group, or frozen, and
/// stepped in place in candle's own storage, with no copy.
///
/// The spectral parameters of one element type and one target-to-stored scale ratio (1 but
/// for transposed views, math §5c) form one batch ([`SpectralSgd`]), stepped in one pass
/// over memory as the slice API steps them; the result is the slice API's bit for bit. The
/// AdamW group follows candle-nn's `AdamW` operation for operation: bit for bit on `f32`
/// parameters with finite gradients (a non-finite gradient skips its parameter, where
/// candle-nn would write NaN), with `f32` moments for 16-bit parameters.
///
/// CPU tensors, or (feature `candle-cuda`) CUDA tensors of one device, stepped there by the
/// crate's kernels on candle's stream without a host synchronisation; a parameter on
/// another device is an error naming it.
///
/// A step holds the write lock of every parameter's storage at once (math §5c: one batch).
/// Do not read or write the model's tensors from another thread while it runs; candle's
/// locks would make such a thread and the step wait for each other.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{Optimizer, VarBuilder, VarMap};
/// use spectral_step::candle::{OptimizerConfig, SpectralOptimizer};
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let layer = candle_nn::linear(8, 4, vb.pp("layer"))?;
/// let mut optimizer = SpectralOptimizer::from_varmap(&varmap, OptimizerConfig::default())?;
///
/// let input = Tensor::randn(0f32, 1.0, (16, 8), &Device::Cpu)?;
/// let loss = layer.forward(&input)?.sqr()?.mean_all()?;
/// optimizer.backward_step(&loss)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SpectralOptimizer {
    pub(crate) params: Vec<Param>,
    pub(crate) groups: Vec<SpectralGroup>,
    pub(crate) slots: Vec<AdamWSlot>,
    pub(crate) spectral: SpectralSgdConfig,
    pub(crate) adamw: AdamWConfig,
    pub(crate) routing: Routing,
    pub(crate) master_weights: bool,
    pub(crate) steps: u64,
    /// A learning rate [`candle_nn::Optimizer::set_learning_rate`] could not apply: the next
    /// step reports it instead of running with the old rate.
    pending_error: Option<String>,
    /// AdamW's learning rate over the spectral one, as last set together (`None` when the
    /// spectral rate was 0).
    pub(crate) adamw_per_spectral: Option<f64>,
    /// Whether the parameters have their own names (from a `VarMap` or `from_named`), not
    /// `var{i}` positions: only then is a state file keyed by names meaningful.
    named: bool,
    /// The parameters a step writes (all but the frozen ones), in order.
    pub(crate) active: Vec<usize>,
    /// Per parameter, its index in `active` (the step's held borrows); `usize::MAX` if frozen.
    pub(crate) position: Vec<usize>,
    /// Moments and master weights on the device, for a model on a CUDA device.
    #[cfg(feature = "candle-cuda")]
    pub(crate) cuda: Option<super::cuda::CudaModel>,
    /// A device error that stopped a step after some of it was enqueued: the model is partly
    /// stepped, so every step refuses until a state is loaded.
    pub(crate) interrupted: Option<String>,
}

fn rate_ratio(spectral: f32, adamw: f64) -> Option<f64> {
    (spectral > 0.0).then(|| adamw / f64::from(spectral))
}

fn dtype_of(name: &str, dtype: DType) -> Result<Option<Dtype>> {
    match dtype {
        DType::F32 => Ok(Some(Dtype::F32)),
        DType::BF16 => Ok(Some(Dtype::Bf16)),
        DType::F16 => Ok(Some(Dtype::F16)),
        other if !other.is_float() => Ok(None),
        other => Err(Error::Parameter {
            name: name.to_owned(),
            problem: format!(
                "is {other:?}; the optimizer steps f32, bf16 and f16 parameters \
                 (route it Frozen to leave it as it is)"
            ),
        }),
    }
}

/// Whether a parameter of element type `dtype` keeps `f32` master weights.
pub(crate) fn keeps_master(master_weights: bool, dtype: Dtype) -> bool {
    master_weights && dtype.is_low_precision()
}

/// The values of a CPU tensor widened to `f32` (master weights' start).
fn widened(name: &str, tensor: &Tensor) -> Result<Vec<f32>> {
    let (storage, layout) = tensor.storage_and_layout();
    let not_cpu = || Error::Parameter {
        name: name.to_owned(),
        problem: "is not a contiguous CPU tensor".into(),
    };
    fn widen<T: AdamWElement>(values: &[T]) -> Vec<f32> {
        values.iter().map(|v| v.widen()).collect()
    }
    Ok(
        match access::param_ref(&storage, layout).ok_or_else(not_cpu)? {
            ParamRef::F32(values) => values.to_vec(),
            ParamRef::Bf16(values) => widen(values),
            ParamRef::F16(values) => widen(values),
        },
    )
}

impl SpectralOptimizer {
    /// An optimizer over every variable of `varmap`, known by its name (routing by name, a
    /// state file keyed by name), in name order.
    pub fn from_varmap(varmap: &VarMap, config: OptimizerConfig) -> Result<Self> {
        let mut named: Vec<(String, Var)> = {
            let data = varmap
                .data()
                .lock()
                .map_err(|_| Error::Candle("the VarMap's lock is poisoned".into()))?;
            data.iter()
                .map(|(name, var)| (name.clone(), var.clone()))
                .collect()
        };
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Self::from_named(named, config)
    }

    /// An optimizer over these named variables, in this order. A variable given twice (the
    /// same `Var`, as with tied weights) is stepped once, under its first name.
    pub fn from_named(vars: Vec<(String, Var)>, config: OptimizerConfig) -> Result<Self> {
        Self::build(vars, config, true)
    }

    fn build(vars: Vec<(String, Var)>, config: OptimizerConfig, named: bool) -> Result<Self> {
        config.spectral.validate()?;
        config.adamw.validate()?;
        let mut params: Vec<Param> = Vec::with_capacity(vars.len());
        let mut seen = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for (name, var) in vars {
            if !seen.insert(var.as_tensor().id()) {
                continue;
            }
            if !names.insert(name.clone()) {
                return Err(Error::Parameter {
                    name,
                    problem: "two different variables have this name".into(),
                });
            }
            let dims = var.dims().to_vec();
            let route = config.routing.route_of(Some(&name), &dims);
            let route = if route == Route::Frozen {
                route
            } else {
                match dtype_of(&name, var.dtype())? {
                    // An empty tensor has nothing to step.
                    Some(_) if route == Route::AdamW && var.elem_count() == 0 => Route::Frozen,
                    Some(_) => route,
                    // candle-nn's optimizers leave integer variables alone too.
                    None => Route::Frozen,
                }
            };
            if route != Route::Frozen {
                #[cfg(not(feature = "candle-cuda"))]
                if !matches!(var.device(), candle_core::Device::Cpu) {
                    return Err(Error::Parameter {
                        name,
                        problem: format!(
                            "is on {:?}; the candle adapter steps CPU tensors (CUDA tensors \
                             with the feature candle-cuda)",
                            var.device().location()
                        ),
                    });
                }
                if !var.as_tensor().is_contiguous() {
                    return Err(Error::Parameter {
                        name,
                        problem: "is not contiguous".into(),
                    });
                }
            }
            // A frozen parameter is never stepped, so any element type will do.
            let dtype = match route {
                Route::Frozen => dtype_of(&name, var.dtype()).ok().flatten(),
                _ => dtype_of(&name, var.dtype())?,
            }
            .unwrap_or(Dtype::F32);
            params.push(Param {
                name,
                var,
                dims,
                dtype,
                route,
                role: Role::Frozen,
            });
        }
        #[cfg(feature = "candle-cuda")]
        let device = {
            let active: Vec<(&str, &Var)> = params
                .iter()
                .filter(|param| param.route != Route::Frozen)
                .map(|param| (param.name.as_str(), &param.var))
                .collect();
            super::cuda::model_device(&active)?
        };
        #[cfg(not(feature = "candle-cuda"))]
        let device = None::<std::convert::Infallible>;
        Self::assemble(params, config, named, device)
    }

    /// Places every parameter in its group and builds the groups.
    fn assemble(
        mut params: Vec<Param>,
        config: OptimizerConfig,
        named: bool,
        #[cfg(feature = "candle-cuda")] device: Option<candle_core::CudaDevice>,
        #[cfg(not(feature = "candle-cuda"))] device: Option<std::convert::Infallible>,
    ) -> Result<Self> {
        // Master weights and moments live on the host for a CPU model, on the device for a
        // CUDA one (built at the end).
        let on_host = device.is_none();
        // (dtype, ratio bits) -> (group index, shapes)
        let mut group_keys: Vec<(Dtype, u32)> = Vec::new();
        let mut group_shapes: Vec<Vec<MatrixShape>> = Vec::new();
        let mut slots = Vec::new();
        for (index, param) in params.iter_mut().enumerate() {
            param.role = match param.route {
                Route::Frozen => Role::Frozen,
                Route::AdamW => {
                    let elements = if on_host { param.var.elem_count() } else { 0 };
                    let master = (on_host && keeps_master(config.master_weights, param.dtype))
                        .then(|| widened(&param.name, param.var.as_tensor()))
                        .transpose()?;
                    slots.push(AdamWSlot {
                        param: index,
                        m: vec![0.0; elements],
                        v: vec![0.0; elements],
                        master,
                    });
                    Role::AdamW {
                        slot: slots.len() - 1,
                    }
                }
                Route::Spectral(view) => {
                    let placement = Placement::new(&param.name, &param.dims, view)?;
                    let scale = config.spectral.scale;
                    let ratio = scale.factor(placement.target) / scale.factor(placement.stored);
                    if !(ratio.is_finite() && ratio > 0.0) {
                        return Err(Error::Parameter {
                            name: param.name.clone(),
                            problem: format!(
                                "the scale {scale} gives its view a target of ratio {ratio}"
                            ),
                        });
                    }
                    let key = (param.dtype, ratio.to_bits());
                    let group = match group_keys.iter().position(|k| *k == key) {
                        Some(group) => group,
                        None => {
                            group_keys.push(key);
                            group_shapes.push(Vec::new());
                            group_keys.len() - 1
                        }
                    };
                    group_shapes[group]
                        .extend(std::iter::repeat_n(placement.stored, placement.count));
                    Role::Spectral { group, placement }
                }
            };
        }
        let mut groups = Vec::with_capacity(group_keys.len());
        for ((dtype, ratio_bits), shapes) in group_keys.into_iter().zip(group_shapes) {
            let ratio = f32::from_bits(ratio_bits);
            let group_spectral = group_config(&config.spectral, ratio);
            let optimizer = match &device {
                None => GroupStep::Cpu(SpectralSgd::new(&shapes, group_spectral)?),
                #[cfg(feature = "candle-cuda")]
                Some(device) => super::cuda::group_step(device, &shapes, group_spectral)?,
                #[cfg(not(feature = "candle-cuda"))]
                Some(never) => match *never {},
            };
            let master = (on_host && keeps_master(config.master_weights, dtype)).then(Vec::new);
            groups.push(SpectralGroup {
                dtype,
                ratio,
                optimizer,
                members: Vec::new(),
                master,
            });
        }
        for (index, param) in params.iter().enumerate() {
            if let Role::Spectral { group, placement } = param.role {
                groups[group].members.push((index, placement));
            }
        }
        let active: Vec<usize> = (0..params.len())
            .filter(|&index| !matches!(params[index].role, Role::Frozen))
            .collect();
        let mut position = vec![usize::MAX; params.len()];
        for (held_index, &param_index) in active.iter().enumerate() {
            position[param_index] = held_index;
        }
        for param in &params {
            if let Role::Spectral {
                group, placement, ..
            } = param.role
                && let Some(master) = groups[group].master.as_mut()
            {
                master.extend(placement.matrices(&widened(&param.name, param.var.as_tensor())?));
            }
        }
        #[cfg_attr(not(feature = "candle-cuda"), allow(unused_mut))]
        let mut optimizer = Self {
            params,
            groups,
            slots,
            spectral: config.spectral,
            adamw: config.adamw,
            routing: config.routing,
            master_weights: config.master_weights,
            steps: 0,
            pending_error: None,
            adamw_per_spectral: rate_ratio(
                config.spectral.learning_rate,
                config.adamw.learning_rate,
            ),
            named,
            active,
            position,
            #[cfg(feature = "candle-cuda")]
            cuda: None,
            interrupted: None,
        };
        #[cfg(feature = "candle-cuda")]
        if let Some(device) = device {
            optimizer.cuda = Some(super::cuda::CudaModel::new(device, &optimizer)?);
        }
        Ok(optimizer)
    }

    /// Whether the model is on a CUDA device (stepped there, state there).
    pub fn is_on_cuda(&self) -> bool {
        #[cfg(feature = "candle-cuda")]
        return self.cuda.is_some();
        #[cfg(not(feature = "candle-cuda"))]
        false
    }

    /// Takes the `f32` master weights afresh from the parameters' current values. The masters
    /// are taken when the optimizer is built and come from the state file on a load; a
    /// parameter changed outside the optimizer afterwards (`Var::set`, `VarMap::load`) is
    /// overwritten from its old master by the next step unless this is called. Without
    /// master weights it does nothing.
    pub fn reload_master_weights(&mut self) -> Result<()> {
        #[cfg(feature = "candle-cuda")]
        if let Some(model) = &self.cuda {
            return model.reload_master_weights(self);
        }
        let mut group_masters = self.empty_group_masters();
        let mut slot_masters = Vec::with_capacity(self.slots.len());
        for param in &self.params {
            match param.role {
                Role::Spectral { group, placement } => {
                    if let Some(masters) = group_masters[group].as_mut() {
                        let values = widened(&param.name, param.var.as_tensor())?;
                        masters.extend(placement.matrices(&values));
                    }
                }
                Role::AdamW { slot } => slot_masters.push(
                    self.slots[slot]
                        .master
                        .is_some()
                        .then(|| widened(&param.name, param.var.as_tensor()))
                        .transpose()?,
                ),
                Role::Frozen => {}
            }
        }
        for (group, masters) in self.groups.iter_mut().zip(group_masters) {
            group.master = masters;
        }
        for (slot, master) in self.slots.iter_mut().zip(slot_masters) {
            slot.master = master;
        }
        Ok(())
    }

    /// Per spectral group, an empty list of master weights where the group keeps them.
    pub(crate) fn empty_group_masters(&self) -> Vec<Option<Vec<Vec<f32>>>> {
        self.groups
            .iter()
            .map(|group| keeps_master(self.master_weights, group.dtype).then(Vec::new))
            .collect()
    }

    /// The parameters in the optimizer's order: name, dimensions and route.
    pub fn parameters(&self) -> impl ExactSizeIterator<Item = (&str, &[usize], Route)> + '_ {
        self.params
            .iter()
            .map(|param| (param.name.as_str(), param.dims.as_slice(), param.route))
    }

    /// The spectral step's settings (the group learning rates derive from its
    /// `learning_rate`).
    pub fn spectral_config(&self) -> &SpectralSgdConfig {
        &self.spectral
    }

    /// The routing the parameters were placed by.
    pub fn routing(&self) -> &Routing {
        &self.routing
    }

    /// The AdamW group's settings.
    pub fn adamw_config(&self) -> &AdamWConfig {
        &self.adamw
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    fn apply_learning_rates(&mut self, spectral: f32, adamw: f64) -> Result<()> {
        let spectral_config = SpectralSgdConfig {
            learning_rate: spectral,
            ..self.spectral
        };
        let adamw_config = AdamWConfig {
            learning_rate: adamw,
            ..self.adamw
        };
        adamw_config.validate()?;
        spectral_config.validate()?;
        for group in &self.groups {
            group_config(&spectral_config, group.ratio).validate_for(group.optimizer.layout())?;
        }
        for group in &mut self.groups {
            group
                .optimizer
                .set_learning_rate(group_config(&spectral_config, group.ratio).learning_rate)
                .map_err(|error| Error::InvalidConfig(format!("spectral group: {error}")))?;
        }
        self.spectral = spectral_config;
        self.adamw = adamw_config;
        self.pending_error = None;
        Ok(())
    }

    /// The whole state (spectral momentum and power vectors, AdamW moments, master weights,
    /// step count, both configs) as one safetensors byte buffer keyed by parameter names
    /// (see [`save_state`](Self::save_state)).
    pub fn state_to_bytes(&self) -> Result<Vec<u8>> {
        self.check_named()?;
        super::state::encode(self)
    }

    fn check_named(&self) -> Result<()> {
        if self.named {
            return Ok(());
        }
        Err(Error::InvalidArgument(
            "this optimizer was built from bare Vars, whose order (and so their names var0, \
             var1, ...) is not stable across processes; build it with from_varmap or \
             from_named to save and load its state"
                .into(),
        ))
    }

    /// Restores a state written by [`state_to_bytes`](Self::state_to_bytes) or
    /// [`save_state`](Self::save_state) for the same parameters (names, routes, element
    /// types and dimensions) and the same `master_weights` setting: the next step is the
    /// step the saving optimizer would have taken, bit for bit, when the parameters hold
    /// the values they had at saving. Another model's state is
    /// [`Error::StateShapeMismatch`] naming the first parameter that differs; a corrupted
    /// file or out-of-range values is [`Error::StateFormat`]. On error nothing changed.
    pub fn load_state_from_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.check_named()?;
        let decoded = super::state::decode(self, bytes)?;
        // `decode` checked every group's config and state as `resume` does, so no group's
        // resume fails after another's succeeded. On a device, a driver error while copying
        // leaves the state partly loaded (the device cannot copy atomically), as
        // `SpectralSgd::load_state` says.
        #[cfg(feature = "candle-cuda")]
        let on_host = match &self.cuda {
            Some(model) => {
                model.load(&self.groups, decoded.group_masters, decoded.slots)?;
                None
            }
            None => Some((decoded.group_masters, decoded.slots)),
        };
        #[cfg(not(feature = "candle-cuda"))]
        let on_host = Some((decoded.group_masters, decoded.slots));
        for (group, state) in self.groups.iter_mut().zip(decoded.groups) {
            let config = group_config(&decoded.spectral, group.ratio);
            group.optimizer.resume(config, decoded.steps, state)?;
        }
        if let Some((group_masters, slots)) = on_host {
            for (group, master) in self.groups.iter_mut().zip(group_masters) {
                if master.is_some() {
                    group.master = master;
                }
            }
            for (slot, state) in self.slots.iter_mut().zip(slots) {
                slot.m = state.m;
                slot.v = state.v;
                slot.master = state.master;
            }
        }
        self.spectral = decoded.spectral;
        self.adamw = decoded.adamw;
        self.adamw_per_spectral = decoded.adamw_per_spectral;
        self.steps = decoded.steps;
        self.pending_error = None;
        self.interrupted = None;
        Ok(())
    }

    /// Saves the state as a safetensors file, written beside `path` and renamed into place,
    /// so a crash never leaves a half-written state under `path`. The parameters themselves
    /// are the model's to save (`VarMap::save`); with master weights, the `f32` masters are
    /// in this file.
    pub fn save_state(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        crate::state::write_atomically(path.as_ref(), &self.state_to_bytes()?)
    }

    /// Loads a state saved by [`save_state`](Self::save_state); see
    /// [`load_state_from_bytes`](Self::load_state_from_bytes). A file larger than any state
    /// of this optimizer is refused before it is read whole.
    pub fn load_state(&mut self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let limit = super::state::max_file_bytes(self);
        let bytes = crate::state::read_bounded(path.as_ref(), limit)?;
        self.load_state_from_bytes(&bytes)
    }

    /// Sets both learning rates, and the ratio [`candle_nn::Optimizer::set_learning_rate`]
    /// keeps between them. Errors, changing nothing, if either is out of range.
    pub fn set_learning_rates(&mut self, spectral: f32, adamw: f64) -> Result<()> {
        self.apply_learning_rates(spectral, adamw)?;
        self.adamw_per_spectral = rate_ratio(spectral, adamw);
        Ok(())
    }

    /// One step over every parameter with its gradient from `grads`, reporting what happened
    /// to each. Everything is checked before anything is written; on error nothing changed.
    /// A spectral parameter without a gradient is an error (the batch steps together: route
    /// an unused parameter [`Route::Frozen`]); an AdamW one is left as it is.
    pub fn step_report(&mut self, grads: &GradStore) -> Result<ModelStepReport> {
        let step = self.next_step()?;
        #[cfg(feature = "candle-cuda")]
        if self.cuda.is_some() {
            let updates = super::cuda::step(self, grads, step, true)?
                .ok_or_else(|| Error::Candle("internal: a CUDA step without its report".into()))?;
            self.steps = step;
            return Ok(self.model_report(step, updates));
        }
        let updates = self.step_on_cpu(grads, step)?;
        self.steps = step;
        Ok(self.model_report(step, updates))
    }

    fn model_report(&self, step: u64, updates: Vec<ParameterUpdate>) -> ModelStepReport {
        ModelStepReport {
            step,
            parameters: self
                .params
                .iter()
                .zip(updates)
                .map(|(param, update)| ParameterReport {
                    name: param.name.clone(),
                    update,
                })
                .collect(),
        }
    }

    /// The number of the next step, unless a learning rate could not be applied or the
    /// counter is at its end.
    fn next_step(&self) -> Result<u64> {
        if let Some(message) = &self.interrupted {
            return Err(Error::Candle(format!(
                "a device error stopped step {} part-way ({message}); the model is partly \
                 stepped: load a state file (and the parameters saved with it) to go on",
                self.steps + 1
            )));
        }
        if let Some(message) = &self.pending_error {
            return Err(Error::InvalidConfig(message.clone()));
        }
        self.steps
            .checked_add(1)
            .ok_or_else(|| Error::InvalidArgument("the step counter is at its maximum".into()))
    }

    /// Every active parameter's gradient, checked (present where the batch needs it, same
    /// dimensions, element type and device as its parameter), made contiguous where candle
    /// left it strided (a broadcast gradient); `None` for frozen parameters and AdamW ones
    /// without a gradient.
    pub(crate) fn checked_gradients(&self, grads: &GradStore) -> Result<Vec<Option<Tensor>>> {
        let mut gradients: Vec<Option<Tensor>> = Vec::with_capacity(self.params.len());
        for param in &self.params {
            if matches!(param.role, Role::Frozen) {
                gradients.push(None);
                continue;
            }
            let Some(grad) = grads.get(param.var.as_tensor()) else {
                if matches!(param.role, Role::Spectral { .. }) {
                    return Err(Error::Parameter {
                        name: param.name.clone(),
                        problem: "has no gradient; the spectral batch steps together, so \
                                  route a parameter the loss does not use Frozen"
                            .into(),
                    });
                }
                gradients.push(None);
                continue;
            };
            let mismatch = |problem: String| Error::Parameter {
                name: param.name.clone(),
                problem,
            };
            if grad.dims() != param.dims.as_slice() || grad.dtype() != param.var.dtype() {
                return Err(mismatch(format!(
                    "its gradient is {:?} {:?}, the parameter {:?} {:?}",
                    grad.dtype(),
                    grad.dims(),
                    param.var.dtype(),
                    param.dims
                )));
            }
            if !grad.device().same_device(param.var.device()) {
                return Err(mismatch(format!(
                    "its gradient is on {:?}, the parameter on {:?}",
                    grad.device().location(),
                    param.var.device().location()
                )));
            }
            let grad = if grad.is_contiguous() {
                grad.clone()
            } else {
                grad.contiguous().map_err(candle_error)?
            };
            gradients.push(Some(grad));
        }
        Ok(gradients)
    }

    /// What a group's step checks beyond the lengths and types the placements fix: so that
    /// no group fails after another has written.
    pub(crate) fn check_groups_before_step(&self) -> Result<()> {
        for group in &self.groups {
            group
                .optimizer
                .config()
                .validate_for(group.optimizer.layout())?;
            if group.optimizer.steps() != self.steps {
                return Err(Error::Candle(format!(
                    "internal: a spectral group is at step {}, the optimizer at {}",
                    group.optimizer.steps(),
                    self.steps
                )));
            }
        }
        Ok(())
    }

    /// One step of a CPU model, in place; what happened to each parameter.
    fn step_on_cpu(&mut self, grads: &GradStore, step: u64) -> Result<Vec<ParameterUpdate>> {
        let gradients = self.checked_gradients(grads)?;

        let active = &self.active;
        let position = &self.position;
        let vars: Vec<(&str, &Var)> = active
            .iter()
            .map(|&index| (self.params[index].name.as_str(), &self.params[index].var))
            .collect();
        let grad_list: Vec<(&str, &Tensor)> = self
            .params
            .iter()
            .zip(&gradients)
            .filter_map(|(param, grad)| grad.as_ref().map(|g| (param.name.as_str(), g)))
            .collect();
        access::check_disjoint(&vars, &grad_list)?;

        let guards: Vec<Option<_>> = gradients
            .iter()
            .map(|grad| grad.as_ref().map(Tensor::storage_and_layout))
            .collect();
        let grad_views: Vec<Option<ParamRef<'_>>> = guards
            .iter()
            .map(|guard| {
                guard
                    .as_ref()
                    .and_then(|(storage, layout)| access::param_ref(storage, layout))
            })
            .collect();
        let var_refs: Vec<&Var> = vars.iter().map(|(_, var)| *var).collect();

        self.check_groups_before_step()?;

        let params = &self.params;
        let groups = &mut self.groups;
        let slots = &mut self.slots;
        let coefficients = Coefficients::new(&self.adamw, step);
        let updates = access::with_vars_mut(&var_refs, |held| {
            let mut updates: Vec<ParameterUpdate> = params
                .iter()
                .map(|param| match param.role {
                    Role::Frozen => ParameterUpdate::Frozen,
                    _ => ParameterUpdate::NoGradient,
                })
                .collect();
            for group in groups.iter_mut() {
                let reports = match group.dtype {
                    Dtype::F32 => step_group::<f32>(group, held, position, &grad_views),
                    Dtype::Bf16 => step_group::<bf16>(group, held, position, &grad_views),
                    Dtype::F16 => step_group::<f16>(group, held, position, &grad_views),
                }?;
                for (param_index, matrices) in reports {
                    updates[param_index] = ParameterUpdate::Spectral(matrices);
                }
            }
            for slot in slots.iter_mut() {
                let (Some(grad), held_index) = (grad_views[slot.param], position[slot.param])
                else {
                    continue;
                };
                updates[slot.param] = step_adamw(&coefficients, slot, &mut held[held_index], grad)?;
            }
            Ok(updates)
        })?;
        drop(grad_views);
        drop(guards);
        Ok(updates)
    }
}

/// The spectral config of a group whose target-to-stored scale ratio is `ratio`.
pub(crate) fn group_config(config: &SpectralSgdConfig, ratio: f32) -> SpectralSgdConfig {
    if ratio == 1.0 {
        return *config;
    }
    SpectralSgdConfig {
        learning_rate: config.learning_rate * ratio,
        weight_decay: config.weight_decay / ratio,
        ..*config
    }
}

/// Steps one spectral group in place; returns each member parameter's matrix reports.
fn step_group<T: CandleElement>(
    group: &mut SpectralGroup,
    held: &mut [ParamMut<'_>],
    position: &[usize],
    grads: &[Option<ParamRef<'_>>],
) -> Result<Vec<(usize, Vec<MatrixReport>)>> {
    let members = &group.members;
    let internal = |what: &str| Error::Candle(format!("internal: {what} of a spectral member"));
    let mut grad_matrices: Vec<&[T]> = Vec::new();
    for &(index, placement) in members {
        let grad = grads[index]
            .and_then(T::slice)
            .ok_or_else(|| internal("gradient"))?;
        grad_matrices.extend(grad.chunks_exact(placement.stored.len()));
    }
    // Per held borrow, its placement when it is a member of this group.
    let mut member_placement = vec![None; held.len()];
    for &(index, placement) in members {
        member_placement[position[index]] = Some(placement);
    }
    let mut weight_matrices: Vec<&mut [T]> = Vec::new();
    for (held_param, placement) in held.iter_mut().zip(&member_placement) {
        if let Some(placement) = placement {
            let values = T::slice_mut(held_param).ok_or_else(|| internal("weight"))?;
            weight_matrices.extend(values.chunks_exact_mut(placement.stored.len()));
        }
    }
    let optimizer = group
        .optimizer
        .cpu_mut()
        .ok_or_else(|| internal("optimizer"))?;
    let report = match group.master.as_mut() {
        Some(master) => {
            optimizer.step_with_copy::<T, _, _, _>(master, &grad_matrices, &mut weight_matrices)?
        }
        None => optimizer.step::<T, T, _, _>(&mut weight_matrices, &grad_matrices)?,
    };
    let mut matrices = report.matrices.into_iter();
    Ok(members
        .iter()
        .map(|&(index, placement)| (index, matrices.by_ref().take(placement.count).collect()))
        .collect())
}

fn step_adamw(
    coefficients: &Coefficients,
    slot: &mut AdamWSlot,
    held: &mut ParamMut<'_>,
    grad: ParamRef<'_>,
) -> Result<ParameterUpdate> {
    fn typed<T: CandleElement>(
        coefficients: &Coefficients,
        slot: &mut AdamWSlot,
        theta: &mut [T],
        grad: &[T],
    ) -> ParameterUpdate {
        if !adamw::all_finite(grad) {
            return ParameterUpdate::SkippedNonFinite;
        }
        match slot.master.as_mut() {
            Some(master) => {
                adamw::step(coefficients, master, grad, &mut slot.m, &mut slot.v);
                for (value, master) in theta.iter_mut().zip(master.iter()) {
                    *value = T::narrow(*master);
                }
            }
            None => adamw::step(coefficients, theta, grad, &mut slot.m, &mut slot.v),
        }
        ParameterUpdate::AdamW
    }
    Ok(match (held, grad) {
        (ParamMut::F32(theta), ParamRef::F32(grad)) => typed(coefficients, slot, theta, grad),
        (ParamMut::Bf16(theta), ParamRef::Bf16(grad)) => typed(coefficients, slot, theta, grad),
        (ParamMut::F16(theta), ParamRef::F16(grad)) => typed(coefficients, slot, theta, grad),
        // The types were checked equal before the step; reaching this is a bug.
        _ => {
            return Err(Error::Candle(
                "internal: an AdamW parameter and its gradient differ in type".into(),
            ));
        }
    })
}

impl candle_nn::Optimizer for SpectralOptimizer {
    type Config = OptimizerConfig;

    /// Bare variables have no names: errors call them `var0`, `var1`, ... in the given order,
    /// and they are never routed as embeddings. Their order is not stable across processes
    /// (`VarMap::all_vars` lists a hash map), so such an optimizer refuses to save or load a
    /// state file: build it with [`SpectralOptimizer::from_varmap`] to resume training.
    fn new(vars: Vec<Var>, config: OptimizerConfig) -> candle_core::Result<Self> {
        let named = vars
            .into_iter()
            .enumerate()
            .map(|(index, var)| (format!("var{index}"), var))
            .collect();
        Self::build(named, config, false).map_err(candle_core::Error::wrap)
    }

    /// On a CUDA device, only enqueues (no report is read, nothing waits).
    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        #[cfg(feature = "candle-cuda")]
        if self.cuda.is_some() {
            let step = self.next_step().map_err(candle_core::Error::wrap)?;
            super::cuda::step(self, grads, step, false).map_err(candle_core::Error::wrap)?;
            self.steps = step;
            return Ok(());
        }
        self.step_report(grads)
            .map(drop)
            .map_err(candle_core::Error::wrap)
    }

    /// The spectral step's learning rate.
    fn learning_rate(&self) -> f64 {
        f64::from(self.spectral.learning_rate)
    }

    /// Sets the spectral learning rate and AdamW's in the ratio they had when the optimizer
    /// was built (or last given by [`SpectralOptimizer::set_learning_rates`]), so that a
    /// schedule scales both; from a spectral rate of 0 AdamW's is left as it is. A rate out
    /// of range changes nothing, and the next step returns the error.
    fn set_learning_rate(&mut self, learning_rate: f64) {
        let adamw = match self.adamw_per_spectral {
            Some(ratio) => learning_rate * ratio,
            None => self.adamw.learning_rate,
        };
        if let Err(error) = self.apply_learning_rates(learning_rate as f32, adamw) {
            self.pending_error = Some(format!("set_learning_rate({learning_rate}): {error}"));
        }
    }
}
