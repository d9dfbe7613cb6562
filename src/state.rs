//! The optimizer state as a safetensors file.
//!
//! Tensors: `momentum` (`F32`, all matrices concatenated), `power_vectors` (`F32`),
//! `power_warm` (`U8`, one per matrix), `shapes` (`U64`, `[matrices, 2]` as
//! `(fan_out, fan_in)`). Metadata: a format tag and version, the step count, every config
//! field (floats in Rust's shortest round-trip form, so they read back bit for bit), and a
//! CRC-32 of the other metadata and all tensor bytes, so that a flipped bit anywhere is
//! caught, not trained on.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;

use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};

use crate::backend::HostState;
use crate::config::{MomentumKind, SpectralSgdConfig};
use crate::error::{Error, Result};
use crate::layout::BatchLayout;
use crate::newton_schulz::UpdateRule;
use crate::rounding::Rounding;
use crate::scaling::Scale;

#[cfg(target_endian = "big")]
compile_error!("state files are little-endian and are written by casting f32 slices to bytes");

const FORMAT: &str = "spectral-step/optimizer-state";
const VERSION: &str = "1";

pub(crate) fn format_error(message: impl Into<String>) -> Error {
    Error::StateFormat(message.into())
}

/// Every config field as metadata entries under `prefix` (floats in Rust's shortest
/// round-trip form, so that they read back bit for bit).
pub(crate) fn config_metadata(
    config: &SpectralSgdConfig,
    prefix: &str,
) -> impl Iterator<Item = (String, String)> {
    [
        ("learning_rate", format!("{:?}", config.learning_rate)),
        ("momentum", format!("{:?}", config.momentum)),
        (
            "momentum_kind",
            momentum_kind_name(config.momentum_kind).to_owned(),
        ),
        ("nesterov", config.nesterov.to_string()),
        ("weight_decay", format!("{:?}", config.weight_decay)),
        ("scale", config.scale.to_string()),
        ("warm_iterations", config.warm_iterations.to_string()),
        ("cold_iterations", config.cold_iterations.to_string()),
        ("seed", config.seed.to_string()),
        ("rounding", config.rounding.name().to_owned()),
        ("update_rule", config.update.to_string()),
    ]
    .into_iter()
    .map(move |(key, value)| (format!("{prefix}{key}"), value))
}

/// The config [`config_metadata`] wrote under `prefix` (not yet validated).
pub(crate) fn config_from_metadata(
    metadata: &HashMap<String, String>,
    prefix: &str,
) -> Result<SpectralSgdConfig> {
    let key = |name: &str| format!("{prefix}{name}");
    let momentum_kind = match field::<String>(metadata, &key("momentum_kind"))?.as_str() {
        "heavy_ball" => MomentumKind::HeavyBall,
        "ema" => MomentumKind::Ema,
        other => return Err(format_error(format!("unknown momentum_kind {other:?}"))),
    };
    let scale_text: String = field(metadata, &key("scale"))?;
    // A state saved before the setting existed resumes as it ran: round to nearest.
    let rounding = match metadata.get(&key("rounding")) {
        None => Rounding::Nearest,
        Some(name) => Rounding::from_name(name)
            .ok_or_else(|| format_error(format!("unknown rounding {name:?}")))?,
    };
    // A state saved before the setting existed ran the power-normalised rule.
    let update = match metadata.get(&key("update_rule")) {
        None => UpdateRule::PowerNormalised,
        Some(text) => text
            .parse::<UpdateRule>()
            .map_err(|e| format_error(e.to_string()))?,
    };
    Ok(SpectralSgdConfig {
        learning_rate: field(metadata, &key("learning_rate"))?,
        momentum: field(metadata, &key("momentum"))?,
        momentum_kind,
        nesterov: field(metadata, &key("nesterov"))?,
        weight_decay: field(metadata, &key("weight_decay"))?,
        scale: Scale::from_str(&scale_text).map_err(|e| format_error(e.to_string()))?,
        warm_iterations: field(metadata, &key("warm_iterations"))?,
        cold_iterations: field(metadata, &key("cold_iterations"))?,
        seed: field(metadata, &key("seed"))?,
        rounding,
        update,
    })
}

fn momentum_kind_name(kind: MomentumKind) -> &'static str {
    match kind {
        MomentumKind::HeavyBall => "heavy_ball",
        MomentumKind::Ema => "ema",
    }
}

fn shapes_bytes(layout: &BatchLayout) -> Vec<u8> {
    layout
        .shapes()
        .flat_map(|shape| [shape.fan_out as u64, shape.fan_in as u64])
        .flat_map(u64::to_le_bytes)
        .collect()
}

pub(crate) fn encode(
    layout: &BatchLayout,
    config: &SpectralSgdConfig,
    steps: u64,
    state: &HostState,
) -> Result<Vec<u8>> {
    state.check(layout)?;
    let shapes = shapes_bytes(layout);
    let warm: Vec<u8> = state.warm.iter().map(|&w| u8::from(w)).collect();
    let momentum: &[u8] = bytemuck::cast_slice(&state.momentum);
    let vectors: &[u8] = bytemuck::cast_slice(&state.power_vectors);
    let mut metadata: BTreeMap<String, String> = [
        ("format", FORMAT.to_owned()),
        ("version", VERSION.to_owned()),
        ("steps", steps.to_string()),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value))
    .collect();
    metadata.extend(config_metadata(config, ""));
    let crc = checksum(
        metadata.iter(),
        [momentum, vectors, warm.as_slice(), shapes.as_slice()],
    );
    metadata.insert("crc32".to_owned(), crc);
    let matrices = layout.len();
    // Tensors in descending alignment, so that each lies naturally aligned after the
    // 8-byte-aligned header (the order safetensors itself would choose).
    let tensors: [(&str, &str, Vec<usize>, &[u8]); 4] = [
        ("shapes", "U64", vec![matrices, 2], &shapes),
        ("momentum", "F32", vec![state.momentum.len()], momentum),
        (
            "power_vectors",
            "F32",
            vec![state.power_vectors.len()],
            vectors,
        ),
        ("power_warm", "U8", vec![matrices], &warm),
    ];
    Ok(serialize(&metadata, &tensors))
}

/// A safetensors file whose header is written in one fixed order (serde_json's maps sort their
/// keys: metadata, then the tensor entries by name) and whose data follows in the order given,
/// so that the same state always gives the same bytes; the `safetensors` crate reads it back
/// and checks it.
pub(crate) fn serialize(
    metadata: &BTreeMap<String, String>,
    tensors: &[(&str, &str, Vec<usize>, &[u8])],
) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".to_owned(),
        serde_json::Value::Object(
            metadata
                .iter()
                .map(|(key, value)| (key.clone(), serde_json::Value::String(value.clone())))
                .collect(),
        ),
    );
    let mut offset = 0;
    for (name, dtype, shape, data) in tensors {
        header.insert(
            (*name).to_owned(),
            serde_json::json!({
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [offset, offset + data.len()],
            }),
        );
        offset += data.len();
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut bytes = Vec::with_capacity(8 + header.len() + offset);
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&header);
    for (_, _, _, data) in tensors {
        bytes.extend_from_slice(data);
    }
    bytes
}

/// CRC-32 of every metadata entry but `crc32` (sorted by key) and of the tensor bytes in the
/// order `tensors` gives them (momentum, power vectors, warm flags, shapes: math §5.8), as 8
/// hex digits.
pub(crate) fn checksum<'a, 'm>(
    metadata: impl Iterator<Item = (&'m String, &'m String)>,
    tensors: impl IntoIterator<Item = &'a [u8]>,
) -> String {
    let mut crc = crc32fast::Hasher::new();
    let mut entries: Vec<_> = metadata
        .filter(|(key, _)| key.as_str() != "crc32")
        .collect();
    entries.sort();
    for (key, value) in entries {
        crc.update(format!("{key}={value}\n").as_bytes());
    }
    for bytes in tensors {
        crc.update(bytes);
    }
    format!("{:08x}", crc.finalize())
}

pub(crate) fn field<F: FromStr>(metadata: &HashMap<String, String>, key: &str) -> Result<F> {
    let text = metadata
        .get(key)
        .ok_or_else(|| format_error(format!("metadata has no {key:?}")))?;
    text.parse()
        .map_err(|_| format_error(format!("metadata {key:?} = {text:?} is not valid")))
}

/// A tensor's bytes after checking its dtype and shape against what this optimizer needs.
pub(crate) fn checked<'a>(
    tensor: &TensorView<'a>,
    name: &str,
    dtype: StDtype,
    shape: &[usize],
) -> Result<&'a [u8]> {
    if tensor.dtype() != dtype || tensor.shape() != shape {
        return Err(Error::StateShapeMismatch(format!(
            "tensor {name:?} is {:?} {:?}, this optimizer needs {dtype:?} {shape:?}",
            tensor.dtype(),
            tensor.shape()
        )));
    }
    Ok(tensor.data())
}

/// The tensors and metadata of a state file of at most `limit` bytes, after checking that
/// its metadata names `format` and `version`.
pub(crate) fn parse<'a>(
    bytes: &'a [u8],
    limit: u64,
    format: &str,
    version: &str,
) -> Result<(SafeTensors<'a>, HashMap<String, String>)> {
    if bytes.len() as u64 > limit {
        return Err(format_error(format!(
            "{} bytes is larger than any state of this optimizer (at most {limit})",
            bytes.len()
        )));
    }
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| format_error(e.to_string()))?;
    let file = SafeTensors::deserialize(bytes).map_err(|e| format_error(e.to_string()))?;
    let metadata = header
        .metadata()
        .clone()
        .ok_or_else(|| format_error("no metadata"))?;
    let file_format: String = field(&metadata, "format")?;
    let file_version: String = field(&metadata, "version")?;
    if file_format != format || file_version != version {
        return Err(format_error(format!(
            "format {file_format:?} version {file_version:?}, expected {format:?} version \
             {version}"
        )));
    }
    Ok((file, metadata))
}

pub(crate) fn decode(
    bytes: &[u8],
    layout: &BatchLayout,
) -> Result<(SpectralSgdConfig, u64, HostState)> {
    let (file, metadata) = parse(bytes, max_file_bytes(layout), FORMAT, VERSION)?;
    let metadata = &metadata;

    // Integrity first: a flipped bit is corruption, whatever tensor it lands in.
    let names = ["momentum", "power_vectors", "power_warm", "shapes"];
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        tensors.push(
            file.tensor(name)
                .map_err(|e| format_error(format!("tensor {name:?}: {e}")))?,
        );
    }
    let stored_crc: String = field(metadata, "crc32")?;
    if stored_crc != checksum(metadata.iter(), tensors.iter().map(|t| t.data())) {
        return Err(format_error("checksum mismatch: the file is corrupted"));
    }

    let matrices = layout.len();
    let shapes = &tensors[3];
    if shapes.dtype() != StDtype::U64 || shapes.shape() != [matrices, 2] {
        return Err(Error::StateShapeMismatch(format!(
            "the file holds {:?} shapes, this optimizer has {matrices} matrices",
            shapes.shape()
        )));
    }
    if shapes.data() != shapes_bytes(layout).as_slice() {
        let file_shapes: Vec<(u64, u64)> = bytemuck::pod_collect_to_vec::<u8, u64>(shapes.data())
            .chunks_exact(2)
            .map(|pair| (pair[0], pair[1]))
            .collect();
        let ours: Vec<(usize, usize)> = layout.shapes().map(|s| (s.fan_out, s.fan_in)).collect();
        return Err(Error::StateShapeMismatch(format!(
            "file shapes {file_shapes:?}, optimizer shapes {ours:?}"
        )));
    }
    let momentum = checked(
        &tensors[0],
        "momentum",
        StDtype::F32,
        &[layout.packed_elements()],
    )?;
    let vectors = checked(
        &tensors[1],
        "power_vectors",
        StDtype::F32,
        &[layout.packed_vector_len()],
    )?;
    let warm = checked(&tensors[2], "power_warm", StDtype::U8, &[matrices])?;

    let config = config_from_metadata(metadata, "")?;
    config
        .validate_for(layout)
        .map_err(|e| format_error(e.to_string()))?;
    let steps = field(metadata, "steps")?;
    if let Some(flag) = warm.iter().find(|&&w| w > 1) {
        return Err(format_error(format!(
            "power_warm holds {flag}; a warm flag is 0 or 1"
        )));
    }
    let state = HostState {
        momentum: bytemuck::pod_collect_to_vec(momentum),
        power_vectors: bytemuck::pod_collect_to_vec(vectors),
        warm: warm.iter().map(|&w| w == 1).collect(),
    };
    check_values(layout, &state)?;
    Ok((config, steps, state))
}

/// How far from 1 a stored power vector's length may be: every vector this crate writes is
/// normalised in `f64` and rounded to `f32` per entry, so its length is within a few `f32`
/// units of 1 (`n` roundings of relative `2^-24` at most); 1e-3 leaves a wide margin and
/// still rejects a vector that would make the first update a fraction of its target.
const UNIT_LENGTH_TOLERANCE: f64 = 1e-3;

/// The values a state may hold (math §5.8): finite momentum, and finite power vectors of unit
/// length, whatever the CRC says (a file can be written by other code).
pub(crate) fn check_values(layout: &BatchLayout, state: &HostState) -> Result<()> {
    state.check(layout)?;
    if let Some(position) = state.momentum.iter().position(|m| !m.is_finite()) {
        return Err(format_error(format!(
            "momentum value {position} is {}; momentum must be finite",
            state.momentum[position]
        )));
    }
    let mut start = 0;
    for (index, shape) in layout.shapes().enumerate() {
        let vector = &state.power_vectors[start..start + shape.fan_in];
        start += shape.fan_in;
        let length = vector
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        if !(length - 1.0).abs().le(&UNIT_LENGTH_TOLERANCE) {
            return Err(format_error(format!(
                "the power vector of matrix {index} has length {length}; it must be a unit vector"
            )));
        }
    }
    Ok(())
}

/// The largest header this crate reads: its own headers are about 1 KiB plus 100 bytes per
/// tensor, so 1 MiB is far beyond any state file it writes.
pub(crate) const MAX_HEADER_BYTES: u64 = 1 << 20;

/// The most bytes a state file for `layout` can hold: the header bound, the length prefix,
/// and the four tensors. Reading stops there, so a wrong path (a device, a huge file) costs
/// at most this much memory.
pub(crate) fn max_file_bytes(layout: &BatchLayout) -> u64 {
    let matrices = layout.len() as u64;
    let f32s = (layout.packed_elements() as u64).saturating_add(layout.packed_vector_len() as u64);
    (17 * matrices)
        .saturating_add(f32s.saturating_mul(4))
        .saturating_add(8 + MAX_HEADER_BYTES)
}

/// Reads a state file of at most `limit` bytes ([`max_file_bytes`] for one batch).
pub(crate) fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let io_error = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_error)?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() as u64 > limit {
        return Err(format_error(format!(
            "{} is larger than any state file for these shapes (at most {limit} bytes)",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Writes `bytes` to a new temporary file beside `path` (a name no other save uses: the
/// process id, a per-process counter and the time), syncs it to disk, renames it over
/// `path`, and syncs the directory, so that `path` always holds a complete file: the old one
/// or the new one, after a crash too, and whatever other threads or processes save there at
/// the same time.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SAVES: AtomicU64 = AtomicU64::new(0);
    let io_error = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let file_name = path.file_name().ok_or_else(|| {
        io_error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path names no file",
        ))
    })?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut temporary_name = file_name.to_owned();
    temporary_name.push(format!(
        ".{}.{}.{nanos}.partial",
        std::process::id(),
        SAVES.fetch_add(1, Ordering::Relaxed)
    ));
    let temporary = path.with_file_name(temporary_name);
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temporary, path)?;
        sync_directory(path)
    };
    write().map_err(|error| {
        let _ = std::fs::remove_file(&temporary);
        io_error(error)
    })
}

/// Makes a rename in `path`'s directory durable (on Unix; elsewhere the rename is all the
/// platform offers).
fn sync_directory(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let directory = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        std::fs::File::open(directory)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}
