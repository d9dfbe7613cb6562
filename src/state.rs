//! The optimizer state as a safetensors file.
//!
//! Tensors: `momentum` (`F32`, all matrices concatenated), `power_vectors` (`F32`),
//! `power_warm` (`U8`, one per matrix), `shapes` (`U64`, `[matrices, 2]` as
//! `(fan_out, fan_in)`). Metadata: a format tag and version, the step count, every config
//! field (floats in Rust's shortest round-trip form, so they read back bit for bit), and a
//! CRC-32 of the other metadata and all tensor bytes, so that a flipped bit anywhere is
//! caught, not trained on.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};

use crate::backend::HostState;
use crate::config::{MomentumKind, SpectralSgdConfig};
use crate::error::{Error, Result};
use crate::layout::BatchLayout;
use crate::scaling::Scale;

#[cfg(target_endian = "big")]
compile_error!("state files are little-endian and are written by casting f32 slices to bytes");

const FORMAT: &str = "spectral-step/optimizer-state";
const VERSION: &str = "1";

fn format_error(message: impl Into<String>) -> Error {
    Error::StateFormat(message.into())
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
    let shapes = shapes_bytes(layout);
    let warm: Vec<u8> = state.warm.iter().map(|&w| u8::from(w)).collect();
    let momentum: &[u8] = bytemuck::cast_slice(&state.momentum);
    let vectors: &[u8] = bytemuck::cast_slice(&state.power_vectors);
    let mut metadata: HashMap<String, String> = [
        ("format", FORMAT.to_owned()),
        ("version", VERSION.to_owned()),
        ("steps", steps.to_string()),
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
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value))
    .collect();
    let crc = checksum(&metadata, [momentum, vectors, &warm, &shapes]);
    metadata.insert("crc32".to_owned(), crc);
    let matrices = layout.len();
    let view = |dtype, shape: Vec<usize>, data| {
        TensorView::new(dtype, shape, data)
            .map_err(|e| format_error(format!("cannot describe tensor: {e}")))
    };
    let tensors = [
        (
            "momentum",
            view(StDtype::F32, vec![state.momentum.len()], momentum)?,
        ),
        (
            "power_vectors",
            view(StDtype::F32, vec![state.power_vectors.len()], vectors)?,
        ),
        ("power_warm", view(StDtype::U8, vec![matrices], &warm)?),
        ("shapes", view(StDtype::U64, vec![matrices, 2], &shapes)?),
    ];
    safetensors::serialize(tensors, Some(metadata))
        .map_err(|e| format_error(format!("cannot serialize: {e}")))
}

/// CRC-32 of every metadata entry but `crc32` (sorted by key) and of the tensor bytes in
/// file order, as 8 hex digits.
fn checksum<'a>(
    metadata: &HashMap<String, String>,
    tensors: impl IntoIterator<Item = &'a [u8]>,
) -> String {
    let mut crc = crc32fast::Hasher::new();
    let mut entries: Vec<_> = metadata
        .iter()
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

fn field<F: FromStr>(metadata: &HashMap<String, String>, key: &str) -> Result<F> {
    let text = metadata
        .get(key)
        .ok_or_else(|| format_error(format!("metadata has no {key:?}")))?;
    text.parse()
        .map_err(|_| format_error(format!("metadata {key:?} = {text:?} is not valid")))
}

/// A tensor's bytes after checking its dtype and shape against what this optimizer needs.
fn checked<'a>(
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

fn f32s(bytes: &[u8]) -> Vec<f32> {
    // Tensor data inside a file buffer need not be 4-byte aligned, so no cast.
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

pub(crate) fn decode(
    bytes: &[u8],
    layout: &BatchLayout,
) -> Result<(SpectralSgdConfig, u64, HostState)> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| format_error(e.to_string()))?;
    let file = SafeTensors::deserialize(bytes).map_err(|e| format_error(e.to_string()))?;
    let metadata = header
        .metadata()
        .as_ref()
        .ok_or_else(|| format_error("no metadata"))?;
    let format: String = field(metadata, "format")?;
    let version: String = field(metadata, "version")?;
    if format != FORMAT || version != VERSION {
        return Err(format_error(format!(
            "format {format:?} version {version:?}, expected {FORMAT:?} version {VERSION}"
        )));
    }

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
    if stored_crc != checksum(metadata, tensors.iter().map(|t| t.data())) {
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
        let file_shapes: Vec<(u64, u64)> = shapes
            .data()
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect::<Vec<_>>()
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

    let momentum_kind = match field::<String>(metadata, "momentum_kind")?.as_str() {
        "heavy_ball" => MomentumKind::HeavyBall,
        "ema" => MomentumKind::Ema,
        other => return Err(format_error(format!("unknown momentum_kind {other:?}"))),
    };
    let scale_text: String = field(metadata, "scale")?;
    let config = SpectralSgdConfig {
        learning_rate: field(metadata, "learning_rate")?,
        momentum: field(metadata, "momentum")?,
        momentum_kind,
        nesterov: field(metadata, "nesterov")?,
        weight_decay: field(metadata, "weight_decay")?,
        scale: Scale::from_str(&scale_text).map_err(|e| format_error(e.to_string()))?,
        warm_iterations: field(metadata, "warm_iterations")?,
        cold_iterations: field(metadata, "cold_iterations")?,
        seed: field(metadata, "seed")?,
    };
    config.validate().map_err(|e| format_error(e.to_string()))?;
    let steps = field(metadata, "steps")?;
    let state = HostState {
        momentum: f32s(momentum),
        power_vectors: f32s(vectors),
        warm: warm.iter().map(|&w| w != 0).collect(),
    };
    Ok((config, steps, state))
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, and renames it over `path`.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io_error = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".partial");
    let temporary = std::path::PathBuf::from(temporary);
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    };
    write().map_err(|error| {
        let _ = std::fs::remove_file(&temporary);
        io_error(error)
    })
}
