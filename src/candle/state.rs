//! The whole optimizer's state (spectral groups, AdamW moments, master weights) as one
//! safetensors file keyed by parameter names.
//!
//! Tensors, per parameter `name`: `spectral.momentum/{name}` (`F32`, its elements),
//! `spectral.power_vectors/{name}` (`F32`, `[matrices, fan_in]`), `spectral.warm/{name}`
//! (`U8`, `[matrices]`), `adamw.m/{name}` and `adamw.v/{name}` (`F32`, its elements), and
//! `master/{name}` (`F32`) when the parameter has master weights. Metadata: a format tag and
//! version, the step count, both configs (floats in shortest round-trip form), the rate ratio
//! the learning-rate schedule keeps, whether master weights are on, each parameter's route,
//! element type and dimensions, and a CRC-32 over all of it and every tensor's bytes.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

use safetensors::tensor::Dtype as StDtype;

use crate::backend::HostState;
use crate::config::SpectralSgdConfig;
use crate::error::{Error, Result};
use crate::state::{
    MAX_HEADER_BYTES, check_values, checked, checksum, config_from_metadata, config_metadata,
    field, format_error, parse, serialize,
};

use super::adamw::AdamWConfig;
use super::optimizer::{Role, SpectralOptimizer, group_config, keeps_master};

const FORMAT: &str = "spectral-step/candle-optimizer-state";
const VERSION: &str = "1";

/// The tensors of one parameter, by kind: each is stored as `{kind}/{name}`.
const MOMENTUM: &str = "spectral.momentum";
const POWER_VECTORS: &str = "spectral.power_vectors";
const WARM: &str = "spectral.warm";
const FIRST_MOMENT: &str = "adamw.m";
const SECOND_MOMENT: &str = "adamw.v";
const MASTER: &str = "master";

fn key(kind: &str, name: &str) -> String {
    format!("{kind}/{name}")
}

/// The metadata entry of a parameter's [`parameter_line`].
const PARAMETER: &str = "parameter";

/// The AdamW settings' metadata keys, in [`adamw_values`]' order.
const ADAMW_KEYS: [&str; 5] = [
    "adamw.learning_rate",
    "adamw.beta1",
    "adamw.beta2",
    "adamw.eps",
    "adamw.weight_decay",
];

fn adamw_values(config: &AdamWConfig) -> [f64; 5] {
    [
        config.learning_rate,
        config.beta1,
        config.beta2,
        config.eps,
        config.weight_decay,
    ]
}

/// What the file records of a parameter: route, element type and dimensions. A file for
/// another model, another routing or other element types is refused on this line.
fn parameter_line(optimizer: &SpectralOptimizer, index: usize) -> String {
    let param = &optimizer.params[index];
    format!(
        "{} {:?} {:?}",
        param.route.name(),
        param.var.dtype(),
        param.dims
    )
}

/// One tensor of the file: name, safetensors dtype, shape, bytes.
struct Entry {
    name: String,
    dtype: StDtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn f32_entry(name: String, shape: Vec<usize>, values: &[f32]) -> Entry {
    Entry {
        name,
        dtype: StDtype::F32,
        shape,
        bytes: bytemuck::cast_slice(values).to_vec(),
    }
}

/// The optimizer's state on the host, as the file holds it: per spectral group its state
/// and master weights (one per matrix), per AdamW slot its moments and master weights.
/// Borrowed from a CPU model, copied from a device.
pub(crate) struct Snapshot<'a> {
    pub groups: Vec<HostState>,
    pub group_masters: Vec<Option<Cow<'a, [Vec<f32>]>>>,
    pub slots: Vec<SlotView<'a>>,
}

/// One AdamW slot's state in a [`Snapshot`].
pub(crate) struct SlotView<'a> {
    pub m: Cow<'a, [f32]>,
    pub v: Cow<'a, [f32]>,
    pub master: Option<Cow<'a, [f32]>>,
}

/// The state of `optimizer` on the host (on a device, this waits for the device).
fn snapshot(optimizer: &SpectralOptimizer) -> Result<Snapshot<'_>> {
    let groups = optimizer
        .groups
        .iter()
        .map(|group| group.optimizer.state())
        .collect::<Result<Vec<_>>>()?;
    #[cfg(feature = "candle-cuda")]
    if let Some(model) = &optimizer.cuda {
        let to_host = |var: &candle_core::Var| super::cuda::to_host(var.as_tensor());
        let group_masters = optimizer
            .groups
            .iter()
            .zip(&model.group_masters)
            .map(|(group, masters)| {
                masters
                    .as_ref()
                    .map(|masters| {
                        let mut matrices = Vec::new();
                        for (master, &(_, placement)) in masters.iter().zip(&group.members) {
                            matrices.extend(placement.matrices(&to_host(master)?));
                        }
                        Ok(Cow::Owned(matrices))
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let slots = model
            .slots
            .iter()
            .map(|slot| {
                Ok(SlotView {
                    m: Cow::Owned(to_host(&slot.m)?),
                    v: Cow::Owned(to_host(&slot.v)?),
                    master: slot
                        .master
                        .as_ref()
                        .map(to_host)
                        .transpose()?
                        .map(Cow::Owned),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(Snapshot {
            groups,
            group_masters,
            slots,
        });
    }
    Ok(Snapshot {
        groups,
        group_masters: optimizer
            .groups
            .iter()
            .map(|group| group.master.as_deref().map(Cow::Borrowed))
            .collect(),
        slots: optimizer
            .slots
            .iter()
            .map(|slot| SlotView {
                m: Cow::Borrowed(&slot.m),
                v: Cow::Borrowed(&slot.v),
                master: slot.master.as_deref().map(Cow::Borrowed),
            })
            .collect(),
    })
}

/// The tensors the optimizer's state consists of, in file order (every `F32` tensor, then
/// the `U8` flags, so that each lies aligned), with their values when `snapshot` is given.
fn entries(optimizer: &SpectralOptimizer, snapshot: Option<&Snapshot>) -> Vec<Entry> {
    let mut floats = Vec::new();
    let mut flags = Vec::new();
    // Where each group's next member starts in its packed state.
    let mut cursors = vec![(0usize, 0usize, 0usize); optimizer.groups.len()];
    let mut group_master_cursor = vec![0usize; optimizer.groups.len()];
    for param in &optimizer.params {
        let name = &param.name;
        match param.role {
            Role::Spectral {
                group, placement, ..
            } => {
                let elements = placement.stored.len() * placement.count;
                let vector = placement.stored.fan_in * placement.count;
                let (momentum_at, vector_at, warm_at) = cursors[group];
                cursors[group] = (
                    momentum_at + elements,
                    vector_at + vector,
                    warm_at + placement.count,
                );
                let state = snapshot.map(|snapshot| &snapshot.groups[group]);
                let momentum = state.map_or(&[][..], |s| &s.momentum[momentum_at..][..elements]);
                let vectors = state.map_or(&[][..], |s| &s.power_vectors[vector_at..][..vector]);
                floats.push(f32_entry(key(MOMENTUM, name), vec![elements], momentum));
                floats.push(f32_entry(
                    key(POWER_VECTORS, name),
                    vec![placement.count, placement.stored.fan_in],
                    vectors,
                ));
                flags.push(Entry {
                    name: key(WARM, name),
                    dtype: StDtype::U8,
                    shape: vec![placement.count],
                    bytes: state.map_or_else(Vec::new, |s| {
                        s.warm[warm_at..][..placement.count]
                            .iter()
                            .map(|&w| u8::from(w))
                            .collect()
                    }),
                });
                if keeps_master(optimizer.master_weights, optimizer.groups[group].dtype) {
                    let first = group_master_cursor[group];
                    group_master_cursor[group] += placement.count;
                    let values: Vec<f32> = snapshot
                        .and_then(|snapshot| snapshot.group_masters[group].as_ref())
                        .map_or_else(Vec::new, |master| {
                            master[first..first + placement.count].concat()
                        });
                    floats.push(f32_entry(key(MASTER, name), vec![elements], &values));
                }
            }
            Role::AdamW { slot } => {
                let elements = param.var.elem_count();
                let state = snapshot.map(|snapshot| &snapshot.slots[slot]);
                let m = state.map_or(&[][..], |s| &s.m[..]);
                let v = state.map_or(&[][..], |s| &s.v[..]);
                floats.push(f32_entry(key(FIRST_MOMENT, name), vec![elements], m));
                floats.push(f32_entry(key(SECOND_MOMENT, name), vec![elements], v));
                if keeps_master(optimizer.master_weights, param.dtype) {
                    let master = state.and_then(|s| s.master.as_deref()).unwrap_or(&[]);
                    floats.push(f32_entry(key(MASTER, name), vec![elements], master));
                }
            }
            Role::Frozen => {}
        }
    }
    floats.extend(flags);
    floats
}

fn metadata(optimizer: &SpectralOptimizer) -> BTreeMap<String, String> {
    let adamw = &optimizer.adamw;
    let mut metadata: BTreeMap<String, String> = [
        ("format", FORMAT.to_owned()),
        ("version", VERSION.to_owned()),
        ("steps", optimizer.steps.to_string()),
        ("master_weights", optimizer.master_weights.to_string()),
        (
            "adamw_per_spectral",
            optimizer
                .adamw_per_spectral
                .map_or_else(|| "none".to_owned(), |ratio| format!("{ratio:?}")),
        ),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value))
    .collect();
    for (key, value) in ADAMW_KEYS.iter().zip(adamw_values(adamw)) {
        metadata.insert((*key).to_owned(), format!("{value:?}"));
    }
    metadata.extend(config_metadata(&optimizer.spectral, "spectral."));
    for index in 0..optimizer.params.len() {
        metadata.insert(
            key(PARAMETER, &optimizer.params[index].name),
            parameter_line(optimizer, index),
        );
    }
    metadata
}

pub(crate) fn encode(optimizer: &SpectralOptimizer) -> Result<Vec<u8>> {
    let snapshot = snapshot(optimizer)?;
    let entries = entries(optimizer, Some(&snapshot));
    let mut metadata = metadata(optimizer);
    let crc = checksum(metadata.iter(), entries.iter().map(|e| e.bytes.as_slice()));
    metadata.insert("crc32".to_owned(), crc);
    let tensors: Vec<(&str, &str, Vec<usize>, &[u8])> = entries
        .iter()
        .map(|e| {
            let dtype = if e.dtype == StDtype::U8 { "U8" } else { "F32" };
            (e.name.as_str(), dtype, e.shape.clone(), e.bytes.as_slice())
        })
        .collect();
    Ok(serialize(&metadata, &tensors))
}

/// The most bytes a state file of this optimizer can hold.
pub(crate) fn max_file_bytes(optimizer: &SpectralOptimizer) -> u64 {
    let data: u64 = entries(optimizer, None)
        .iter()
        .map(|e| {
            let elements: usize = e.shape.iter().product();
            elements as u64 * if e.dtype == StDtype::U8 { 1 } else { 4 }
        })
        .sum();
    // Each parameter adds a metadata line and up to five tensor entries to the header.
    let per_parameter = 1024 * optimizer.params.len() as u64;
    data.saturating_add(8 + MAX_HEADER_BYTES)
        .saturating_add(per_parameter)
}

/// A decoded, checked state, ready to be applied.
pub(crate) struct Decoded {
    pub spectral: SpectralSgdConfig,
    pub adamw: AdamWConfig,
    pub adamw_per_spectral: Option<f64>,
    pub steps: u64,
    pub groups: Vec<HostState>,
    pub group_masters: Vec<Option<Vec<Vec<f32>>>>,
    pub slots: Vec<SlotState>,
}

/// One AdamW slot's state: moments and master weights.
pub(crate) struct SlotState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub master: Option<Vec<f32>>,
}

fn mismatch(message: String) -> Error {
    Error::StateShapeMismatch(message)
}

pub(crate) fn decode(optimizer: &SpectralOptimizer, bytes: &[u8]) -> Result<Decoded> {
    let (file, metadata) = parse(bytes, max_file_bytes(optimizer), FORMAT, VERSION)?;
    let metadata = &metadata;

    let expected = entries(optimizer, None);
    let mut views = Vec::with_capacity(expected.len());
    let mut missing = Vec::new();
    for entry in &expected {
        match file.tensor(&entry.name) {
            Ok(view) => views.push(view),
            Err(_) => missing.push(entry.name.as_str()),
        }
    }
    // Integrity first, when every tensor is there: a flipped bit is corruption.
    if missing.is_empty() {
        let stored_crc: String = field(metadata, "crc32")?;
        if stored_crc != checksum(metadata.iter(), views.iter().map(|v| v.data())) {
            return Err(format_error("checksum mismatch: the file is corrupted"));
        }
    }

    // The same parameters, routed, typed and shaped the same.
    let ours: HashSet<String> = optimizer
        .params
        .iter()
        .map(|p| key(PARAMETER, &p.name))
        .collect();
    for (index, param) in optimizer.params.iter().enumerate() {
        let line = parameter_line(optimizer, index);
        match metadata.get(&key(PARAMETER, &param.name)) {
            None => {
                return Err(mismatch(format!(
                    "parameter {} is not in the file",
                    param.name
                )));
            }
            Some(theirs) if *theirs != line => {
                return Err(mismatch(format!(
                    "parameter {}: the file has {theirs}, this optimizer {line}",
                    param.name
                )));
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = metadata
        .keys()
        .find(|entry| entry.starts_with(&key(PARAMETER, "")) && !ours.contains(*entry))
    {
        return Err(mismatch(format!(
            "the file has parameter {}, which this optimizer does not",
            &extra[key(PARAMETER, "").len()..]
        )));
    }
    let master_weights: bool = field(metadata, "master_weights")?;
    if master_weights != optimizer.master_weights {
        return Err(mismatch(format!(
            "the file was written with master_weights = {master_weights}, this optimizer has {}",
            optimizer.master_weights
        )));
    }
    if let Some(name) = missing.first() {
        return Err(format_error(format!("tensor {name:?} is missing")));
    }
    let names: HashSet<&str> = expected.iter().map(|e| e.name.as_str()).collect();
    if let Some(extra) = file.names().into_iter().find(|name| !names.contains(*name)) {
        return Err(mismatch(format!(
            "the file has tensor {extra:?}, which this optimizer does not"
        )));
    }
    let mut values: HashMap<&str, &[u8]> = HashMap::new();
    for (entry, view) in expected.iter().zip(&views) {
        values.insert(
            entry.name.as_str(),
            checked(view, &entry.name, entry.dtype, &entry.shape)?,
        );
    }
    let floats = |name: String| -> Vec<f32> { bytemuck::pod_collect_to_vec(values[name.as_str()]) };

    // Configs.
    let spectral = config_from_metadata(metadata, "spectral.")?;
    spectral
        .validate()
        .map_err(|e| format_error(e.to_string()))?;
    // The scale decides which parameters share a batch (math §5c: transposed views), fixed
    // when the optimizer was built.
    if spectral.scale != optimizer.spectral.scale {
        return Err(mismatch(format!(
            "the file was written with scale {}, this optimizer has {}, which groups its \
             parameters differently",
            spectral.scale, optimizer.spectral.scale
        )));
    }
    let mut adamw_fields = [0.0; 5];
    for (value, key) in adamw_fields.iter_mut().zip(ADAMW_KEYS) {
        *value = field(metadata, key)?;
    }
    let [learning_rate, beta1, beta2, eps, weight_decay] = adamw_fields;
    let adamw = AdamWConfig {
        learning_rate,
        beta1,
        beta2,
        eps,
        weight_decay,
    };
    adamw.validate().map_err(|e| format_error(e.to_string()))?;
    let adamw_per_spectral = match field::<String>(metadata, "adamw_per_spectral")?.as_str() {
        "none" => None,
        text => Some(
            text.parse::<f64>()
                .ok()
                .filter(|r| r.is_finite() && *r >= 0.0)
                .ok_or_else(|| {
                    format_error(format!("adamw_per_spectral = {text:?} is not valid"))
                })?,
        ),
    };
    let steps: u64 = field(metadata, "steps")?;

    // Spectral groups: each member's slices, concatenated in the group's order.
    let mut groups: Vec<HostState> = optimizer
        .groups
        .iter()
        .map(|_| HostState {
            momentum: Vec::new(),
            power_vectors: Vec::new(),
            warm: Vec::new(),
        })
        .collect();
    let mut group_masters = optimizer.empty_group_masters();
    let mut slots = Vec::with_capacity(optimizer.slots.len());
    for param in &optimizer.params {
        let name = &param.name;
        match param.role {
            Role::Spectral {
                group, placement, ..
            } => {
                let state = &mut groups[group];
                state.momentum.extend(floats(key(MOMENTUM, name)));
                state.power_vectors.extend(floats(key(POWER_VECTORS, name)));
                for &flag in values[key(WARM, name).as_str()] {
                    if flag > 1 {
                        return Err(format_error(format!(
                            "spectral.warm/{name} holds {flag}; a warm flag is 0 or 1"
                        )));
                    }
                    state.warm.push(flag == 1);
                }
                if let Some(masters) = group_masters[group].as_mut() {
                    let master = floats(key(MASTER, name));
                    check_finite(&key(MASTER, name), &master)?;
                    masters.extend(placement.matrices(&master));
                }
            }
            Role::AdamW { .. } => {
                let m = floats(key(FIRST_MOMENT, name));
                let v = floats(key(SECOND_MOMENT, name));
                check_finite(&key(FIRST_MOMENT, name), &m)?;
                check_finite(&key(SECOND_MOMENT, name), &v)?;
                if let Some(position) = v.iter().position(|&x| x < 0.0) {
                    return Err(format_error(format!(
                        "adamw.v/{name} value {position} is {}; a second moment is >= 0",
                        v[position]
                    )));
                }
                let master = keeps_master(optimizer.master_weights, param.dtype)
                    .then(|| floats(key(MASTER, name)));
                if let Some(master) = &master {
                    check_finite(&key(MASTER, name), master)?;
                }
                slots.push(SlotState { m, v, master });
            }
            Role::Frozen => {}
        }
    }
    for (group, state) in optimizer.groups.iter().zip(&groups) {
        check_values(group.optimizer.layout(), state)?;
        group_config(&spectral, group.ratio)
            .validate_for(group.optimizer.layout())
            .map_err(|e| format_error(e.to_string()))?;
    }
    Ok(Decoded {
        spectral,
        adamw,
        adamw_per_spectral,
        steps,
        groups,
        group_masters,
        slots,
    })
}

fn check_finite(what: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(position) => Err(format_error(format!(
            "{what} value {position} is {}; it must be finite",
            values[position]
        ))),
        None => Ok(()),
    }
}
