//! Hostile inputs: what a demanding user expects of every entry point given bad data, from a
//! state file to a shape to a concurrent save. Each probe asserts a typed error (or a
//! documented result), no panic, nothing changed on failure, and bounded time and memory.
//! The counts of probes are printed (`cargo test --test hostile -- --nocapture`).
//!
//! - state files: every metadata field, every tensor's dtype, shape and offsets, the length
//!   prefix, truncations and bit flips, and files whose checksum is right but whose values
//!   are not (crafted here from the documented format);
//! - special files: `/dev/zero`, a huge sparse file, a directory, a missing file;
//! - configurations and scales out of range, huge iteration counts;
//! - extreme shapes, in a child process under a memory limit;
//! - saves and loads at the same time from threads and from processes;
//! - extreme magnitudes in the diagnostics and in initialisation;
//! - the step counter at its maximum, and `Debug` of a large optimizer.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use spectral_step::half::{bf16, f16};
use spectral_step::sim::{SimDevice, Simulated};
use spectral_step::{
    BatchLayout, BlockPolicy, Error, HostState, MAX_POWER_ITERATIONS, MatrixShape, MomentumKind,
    Rounding, Scale, SpectralSgd, SpectralSgdConfig, diagnostics, scaling,
};

fn shapes() -> Vec<MatrixShape> {
    vec![
        MatrixShape::new(12, 7),
        MatrixShape::new(1, 9),
        MatrixShape::new(16, 16),
    ]
}

fn config() -> SpectralSgdConfig {
    SpectralSgdConfig {
        learning_rate: 0.03,
        momentum_kind: MomentumKind::Ema,
        nesterov: true,
        weight_decay: 0.01,
        cold_iterations: 4,
        seed: 5,
        ..SpectralSgdConfig::default()
    }
}

/// An optimizer after two steps.
fn trained(seed: u64) -> SpectralSgd {
    let mut optimizer = SpectralSgd::new(&shapes(), config()).unwrap();
    let mut weights: Vec<Vec<f32>> = shapes()
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 0.3, seed + j as u64))
        .collect();
    for step in 0..2 {
        let grads: Vec<Vec<f32>> = shapes()
            .iter()
            .enumerate()
            .map(|(j, &s)| random_matrix(s, 1.0, seed + 100 * (step + 1) + j as u64))
            .collect();
        optimizer.step(&mut weights, &grads).unwrap();
    }
    optimizer
}

/// Everything a load could change, for "nothing changed" checks.
fn snapshot(optimizer: &SpectralSgd) -> (SpectralSgdConfig, u64, HostState) {
    (
        *optimizer.config(),
        optimizer.steps(),
        optimizer.state().unwrap(),
    )
}

/// Loads `bytes` into a trained optimizer: an error must be typed and change nothing; a
/// success is only allowed where the bytes describe exactly the same state.
fn probe(bytes: &[u8], what: &str, reference: &(SpectralSgdConfig, u64, HostState)) -> bool {
    let mut target = trained(7);
    let before = snapshot(&target);
    match target.load_state_from_bytes(bytes) {
        Ok(()) => {
            assert_eq!(
                &snapshot(&target),
                reference,
                "{what}: accepted, but not as saved"
            );
            false
        }
        Err(Error::StateFormat(_) | Error::StateShapeMismatch(_)) => {
            assert_eq!(
                snapshot(&target),
                before,
                "{what}: a failed load changed the state"
            );
            true
        }
        Err(other) => panic!("{what}: untyped error {other:?}"),
    }
}

/// The header of a state file: `(length prefix, JSON)`.
fn split_header(bytes: &[u8]) -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
    let length = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + length]).unwrap();
    let serde_json::Value::Object(header) = header else {
        panic!("header is an object")
    };
    (header, bytes[8 + length..].to_vec())
}

fn join_header(header: &serde_json::Map<String, serde_json::Value>, data: &[u8]) -> Vec<u8> {
    let mut json = serde_json::to_vec(header).unwrap();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(data);
    bytes
}

/// Every metadata field and every tensor field of a real state file, mutated one at a time,
/// plus the length prefix, truncations and bit flips: each is refused with a typed error and
/// leaves the optimizer as it was.
#[test]
fn mutated_state_files_are_typed_errors_and_change_nothing() {
    let saved = trained(1);
    let reference = snapshot(&saved);
    let bytes = saved.state_to_bytes().unwrap();
    assert_eq!(
        bytes,
        saved.state_to_bytes().unwrap(),
        "encoding is deterministic"
    );
    let (header, data) = split_header(&bytes);
    let mut mutants: Vec<(String, Vec<u8>)> = Vec::new();
    let metadata = header["__metadata__"].as_object().unwrap().clone();
    let bad_values = [
        "",
        "x",
        "-1",
        "0",
        "1e400",
        "NaN",
        "inf",
        "18446744073709551616",
        "4294967296",
        "true",
        "\u{0}",
    ];
    for key in metadata.keys() {
        let mut removed = header.clone();
        removed["__metadata__"].as_object_mut().unwrap().remove(key);
        mutants.push((
            format!("metadata {key} removed"),
            join_header(&removed, &data),
        ));
        for value in bad_values {
            let mut changed = header.clone();
            changed["__metadata__"][key] = serde_json::Value::String(value.into());
            mutants.push((
                format!("metadata {key} = {value:?}"),
                join_header(&changed, &data),
            ));
        }
        let mut typed = header.clone();
        typed["__metadata__"][key] = serde_json::json!(12);
        mutants.push((
            format!("metadata {key} as a number"),
            join_header(&typed, &data),
        ));
    }
    let tensor_names: Vec<String> = header
        .keys()
        .filter(|k| k.as_str() != "__metadata__")
        .cloned()
        .collect();
    for name in &tensor_names {
        let info = header[name].clone();
        let mut removed = header.clone();
        removed.remove(name);
        mutants.push((
            format!("tensor {name} removed"),
            join_header(&removed, &data),
        ));
        for dtype in ["F64", "F16", "BF16", "I32", "U8", "U64", "BOOL", "Q4"] {
            let mut changed = header.clone();
            changed[name]["dtype"] = serde_json::json!(dtype);
            mutants.push((
                format!("tensor {name} dtype {dtype}"),
                join_header(&changed, &data),
            ));
        }
        let length = info["shape"][0].as_u64().unwrap();
        for shape in [
            serde_json::json!([]),
            serde_json::json!([0]),
            serde_json::json!([length + 1]),
            serde_json::json!([length - 1]),
            serde_json::json!([length, 1]),
            serde_json::json!([u64::MAX]),
        ] {
            let mut changed = header.clone();
            changed[name]["shape"] = shape.clone();
            mutants.push((
                format!("tensor {name} shape {shape}"),
                join_header(&changed, &data),
            ));
        }
        let (start, end) = (
            info["data_offsets"][0].as_u64().unwrap(),
            info["data_offsets"][1].as_u64().unwrap(),
        );
        for offsets in [
            [end, start],
            [0, 0],
            [start, end + 4],
            [start + 4, end + 4],
            [start, u64::MAX],
            [u64::MAX - 1, u64::MAX],
        ] {
            let mut changed = header.clone();
            changed[name]["data_offsets"] = serde_json::json!(offsets);
            mutants.push((
                format!("tensor {name} offsets {offsets:?}"),
                join_header(&changed, &data),
            ));
        }
    }
    let mut extra = header.clone();
    extra.insert("extra".into(), header[&tensor_names[0]].clone());
    mutants.push(("an extra tensor".into(), join_header(&extra, &data)));
    for prefix in [0u64, 7, 8, u64::MAX, (bytes.len() as u64) * 2] {
        let mut changed = bytes.clone();
        changed[..8].copy_from_slice(&prefix.to_le_bytes());
        mutants.push((format!("length prefix {prefix}"), changed));
    }
    for length in (0..bytes.len()).step_by(7).chain([bytes.len() - 1]) {
        mutants.push((
            format!("truncated to {length} bytes"),
            bytes[..length].to_vec(),
        ));
    }
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 8]);
    mutants.push(("8 bytes appended".into(), longer));
    for position in (0..bytes.len()).step_by(5) {
        for bit in [0, 7] {
            let mut flipped = bytes.clone();
            flipped[position] ^= 1 << bit;
            mutants.push((format!("bit {bit} of byte {position} flipped"), flipped));
        }
    }
    let mut refused = 0;
    for (what, mutant) in &mutants {
        if probe(mutant, what, &reference) {
            refused += 1;
        }
    }
    eprintln!(
        "state files: {} mutants of a {}-byte file, {refused} refused with a typed error, {} \
         accepted as the same state",
        mutants.len(),
        bytes.len(),
        mutants.len() - refused
    );
    assert!(
        refused > mutants.len() * 9 / 10,
        "almost every mutation is a change"
    );
}

/// A state file written from the documented format (safetensors, metadata, CRC-32 of the
/// sorted `key=value` lines and the tensor bytes), so that values the crate never writes can
/// be given a valid checksum.
fn crafted(
    edit_metadata: impl FnOnce(&mut BTreeMap<String, String>),
    edit_state: impl FnOnce(&mut HostState),
) -> Vec<u8> {
    let saved = trained(2);
    let (header, _) = split_header(&saved.state_to_bytes().unwrap());
    let mut metadata: BTreeMap<String, String> = header["__metadata__"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    metadata.remove("crc32");
    edit_metadata(&mut metadata);
    let mut state = saved.state().unwrap();
    edit_state(&mut state);
    let momentum: Vec<u8> = state
        .momentum
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let vectors: Vec<u8> = state
        .power_vectors
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let warm: Vec<u8> = state.warm.iter().map(|&w| u8::from(w)).collect();
    let shapes: Vec<u8> = shapes()
        .iter()
        .flat_map(|s| [s.fan_out as u64, s.fan_in as u64])
        .flat_map(u64::to_le_bytes)
        .collect();
    let mut crc = crc32fast::Hasher::new();
    for (key, value) in &metadata {
        crc.update(format!("{key}={value}\n").as_bytes());
    }
    for bytes in [&momentum, &vectors, &warm, &shapes] {
        crc.update(bytes);
    }
    metadata.insert("crc32".into(), format!("{:08x}", crc.finalize()));
    let n = shapes.len() / 16;
    let tensors = vec![
        (
            "momentum",
            TensorView::new(StDtype::F32, vec![state.momentum.len()], &momentum).unwrap(),
        ),
        (
            "power_vectors",
            TensorView::new(StDtype::F32, vec![state.power_vectors.len()], &vectors).unwrap(),
        ),
        (
            "power_warm",
            TensorView::new(StDtype::U8, vec![n], &warm).unwrap(),
        ),
        (
            "shapes",
            TensorView::new(StDtype::U64, vec![n, 2], &shapes).unwrap(),
        ),
    ];
    let metadata: HashMap<String, String> = metadata.into_iter().collect();
    safetensors::serialize(tensors, Some(metadata)).unwrap()
}

/// An edit of a state, for a crafted file.
type StateEdit = Box<dyn Fn(&mut HostState)>;

/// Values no state of this crate holds, with a valid checksum: non-finite momentum or power
/// vectors, power vectors not of unit length, a warm flag other than 0 or 1, settings out of
/// range. Each is refused and changes nothing; the crafting itself is checked by a
/// well-formed file that loads.
#[test]
fn loaded_values_are_validated_whatever_the_checksum() {
    let reference = snapshot(&trained(2));
    let faithful = crafted(|_| {}, |_| {});
    let mut target = trained(7);
    target.load_state_from_bytes(&faithful).unwrap();
    assert_eq!(
        snapshot(&target),
        reference,
        "the crafted file is the state it describes"
    );

    let state_probes: Vec<(&str, StateEdit)> = vec![
        ("NaN momentum", Box::new(|s| s.momentum[3] = f32::NAN)),
        (
            "infinite momentum",
            Box::new(|s| s.momentum[0] = f32::INFINITY),
        ),
        (
            "NaN power vector",
            Box::new(|s| s.power_vectors[1] = f32::NAN),
        ),
        (
            "infinite power vector",
            Box::new(|s| s.power_vectors[8] = f32::NEG_INFINITY),
        ),
        (
            "power vector of length 10",
            Box::new(|s| s.power_vectors[..7].iter_mut().for_each(|x| *x *= 10.0)),
        ),
        (
            "power vector of length 0.01",
            Box::new(|s| s.power_vectors[7..16].iter_mut().for_each(|x| *x *= 0.01)),
        ),
        (
            "zero power vector",
            Box::new(|s| s.power_vectors[16..].iter_mut().for_each(|x| *x = 0.0)),
        ),
    ];
    let mut count = 0;
    for (what, edit) in &state_probes {
        assert!(
            probe(&crafted(|_| {}, |s| edit(s)), what, &reference),
            "{what}"
        );
        count += 1;
    }
    let metadata_probes: [(&str, &str); 14] = [
        ("cold_iterations", "4294967295"),
        ("cold_iterations", "0"),
        ("warm_iterations", "1025"),
        ("learning_rate", "NaN"),
        ("learning_rate", "-0.1"),
        ("learning_rate", "3.4028235e38"),
        ("momentum", "1.0"),
        ("weight_decay", "inf"),
        ("scale", "rms_match:3.4028235e38"),
        ("scale", "rms_match:-1"),
        ("scale", "rms_match:NaN"),
        ("momentum_kind", "nesterov"),
        ("rounding", "truncate"),
        ("version", "2"),
    ];
    for (key, value) in metadata_probes {
        let bytes = crafted(
            |m| {
                m.insert(key.into(), value.into());
            },
            |_| {},
        );
        assert!(
            probe(&bytes, &format!("{key} = {value}"), &reference),
            "{key}"
        );
        count += 1;
    }
    // A warm flag of 2 needs the byte itself changed (HostState holds booleans).
    let mut bytes = crafted(|_| {}, |_| {});
    let (header, _) = split_header(&bytes);
    let start = header["power_warm"]["data_offsets"][0].as_u64().unwrap() as usize;
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header_len + start] = 2;
    assert!(probe(&bytes, "warm flag 2", &reference));
    count += 1;
    eprintln!("crafted state files with a valid checksum: {count} refused");
}

/// A state saved before the rounding setting existed has no `rounding` key: it loads and
/// resumes as it ran, with round-to-nearest; a file that names a rounding gets that one.
#[test]
fn a_state_without_a_rounding_setting_resumes_with_round_to_nearest() {
    for (stored, expected) in [
        (None, Rounding::Nearest),
        (Some("nearest"), Rounding::Nearest),
        (Some("stochastic"), Rounding::Stochastic),
    ] {
        let bytes = crafted(
            |m| match stored {
                None => {
                    m.remove("rounding");
                }
                Some(name) => {
                    m.insert("rounding".into(), name.into());
                }
            },
            |_| {},
        );
        let mut target = trained(7);
        target.load_state_from_bytes(&bytes).unwrap();
        assert_eq!(target.config().rounding, expected, "{stored:?}");
    }
}

/// `set_state` takes the same values a file can hold, and refuses the same bad ones.
#[test]
fn set_state_validates_values_too() {
    let mut optimizer = trained(3);
    let before = snapshot(&optimizer);
    let mut bad = optimizer.state().unwrap();
    bad.momentum[0] = f32::NAN;
    assert!(optimizer.set_state(bad).is_err());
    let mut bad = optimizer.state().unwrap();
    bad.power_vectors.iter_mut().for_each(|x| *x *= 3.0);
    assert!(optimizer.set_state(bad).is_err());
    assert_eq!(snapshot(&optimizer), before);
}

/// A path to something that is not a state file is refused without reading more than a
/// state for these shapes can hold: `/dev/zero` (endless), a 16 GiB sparse file, a
/// directory, a missing file.
#[test]
fn special_files_are_refused_in_bounded_memory() {
    let mut optimizer = trained(4);
    let before = snapshot(&optimizer);
    let directory = tempfile::tempdir().unwrap();
    let sparse = directory.path().join("sparse.safetensors");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(16 << 30)
        .unwrap();
    let mut probes = vec![
        (sparse.clone(), "a 16 GiB sparse file"),
        (directory.path().to_owned(), "a directory"),
        (directory.path().join("missing"), "a missing file"),
    ];
    if Path::new("/dev/zero").exists() {
        probes.push((PathBuf::from("/dev/zero"), "/dev/zero"));
    } else {
        eprintln!("NOT RUN: /dev/zero probe (no /dev/zero here)");
    }
    for (path, what) in &probes {
        match optimizer.load_state(path) {
            Err(Error::StateFormat(message)) => {
                assert!(message.contains("larger than"), "{what}: {message}")
            }
            Err(Error::Io { .. }) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    assert_eq!(snapshot(&optimizer), before);
    eprintln!("special files: {} refused", probes.len());
}

/// Settings out of range are errors at construction, in `set_learning_rate` and in loaded
/// files (above); a scale whose `s` or `learning_rate * s` overflows for some shape too.
#[test]
fn configurations_out_of_range_are_errors() {
    let base = config();
    let probes = [
        SpectralSgdConfig {
            learning_rate: f32::NAN,
            ..base
        },
        SpectralSgdConfig {
            learning_rate: -1.0,
            ..base
        },
        SpectralSgdConfig {
            learning_rate: f32::INFINITY,
            ..base
        },
        SpectralSgdConfig {
            momentum: 1.0,
            ..base
        },
        SpectralSgdConfig {
            momentum: f32::NAN,
            ..base
        },
        SpectralSgdConfig {
            weight_decay: f32::NAN,
            ..base
        },
        SpectralSgdConfig {
            weight_decay: 100.0,
            ..base
        },
        SpectralSgdConfig {
            cold_iterations: 0,
            ..base
        },
        SpectralSgdConfig {
            cold_iterations: u32::MAX,
            ..base
        },
        SpectralSgdConfig {
            warm_iterations: MAX_POWER_ITERATIONS + 1,
            ..base
        },
        SpectralSgdConfig {
            scale: Scale::RmsMatch(f32::MAX),
            ..base
        },
        SpectralSgdConfig {
            scale: Scale::RmsMatch(0.0),
            ..base
        },
        SpectralSgdConfig {
            scale: Scale::RmsMatch(f32::NEG_INFINITY),
            ..base
        },
        SpectralSgdConfig {
            learning_rate: 3e38,
            scale: Scale::RmsMatch(1.0),
            ..base
        },
    ];
    for (k, config) in probes.iter().enumerate() {
        assert!(
            matches!(
                SpectralSgd::new(&shapes(), *config),
                Err(Error::InvalidConfig(_))
            ),
            "probe {k}: {config:?}"
        );
        let device = SimDevice::new().unwrap();
        assert!(
            SpectralSgd::<Simulated>::on_device(&shapes(), *config, device).is_err(),
            "probe {k} on the device"
        );
    }
    let mut optimizer = SpectralSgd::new(
        &shapes(),
        SpectralSgdConfig {
            scale: Scale::RmsMatch(1e30),
            ..base
        },
    )
    .unwrap();
    for rate in [f32::NAN, -0.5, 1e10] {
        assert!(optimizer.set_learning_rate(rate).is_err(), "{rate}");
    }
    assert_eq!(optimizer.config().learning_rate, base.learning_rate);
    eprintln!(
        "configurations: {} refused, 3 learning rates refused",
        probes.len()
    );
}

/// Lanczos (the diagnostics' cold start) takes at most `MAX_POWER_ITERATIONS` passes: more is
/// an error, not a basis that grows without bound; so is a block size out of range.
#[test]
fn lanczos_iteration_counts_are_bounded() {
    let shape = MatrixShape::new(8, 8);
    let matrix = random_matrix::<f32>(shape, 1.0, 4);
    let convergence = diagnostics::Convergence {
        max_iterations: u32::MAX,
        ..diagnostics::Convergence::default()
    };
    assert!(matches!(
        diagnostics::spectral_norm_with(&matrix, shape, convergence),
        Err(Error::InvalidArgument(_))
    ));
    // A zero matrix, which needs no pass, does not hide a bad setting.
    let zero = vec![0.0f32; matrix.len()];
    for block_vectors in [0, spectral_step::cpu::MAX_LANCZOS_BLOCK + 1] {
        let convergence = diagnostics::Convergence {
            block_vectors,
            ..diagnostics::Convergence::default()
        };
        for input in [&matrix, &zero] {
            assert!(
                matches!(
                    diagnostics::spectral_norm_with(input, shape, convergence),
                    Err(Error::InvalidArgument(_))
                ),
                "a block of {block_vectors}"
            );
        }
    }
    let layout = BatchLayout::new(&[shape], BlockPolicy::CPU).unwrap();
    let mut power = spectral_step::cpu::BatchPowerIteration::new(layout).unwrap();
    assert!(
        power
            .lanczos(&[&matrix[..]], 0, 1e-6, MAX_POWER_ITERATIONS + 1, 4)
            .is_err()
    );
    assert!(
        power
            .lanczos(&[&matrix[..]], 0, 1e-6, MAX_POWER_ITERATIONS, 4)
            .is_ok()
    );
}

/// The largest iteration count a config may ask for ends as soon as the estimate has
/// converged, on both backends alike: a cold step of a rank-one matrix is quick and exact.
#[test]
fn the_maximum_iteration_count_ends_at_convergence() {
    let shapes = [MatrixShape::new(4, 4), MatrixShape::new(6, 3)];
    let config = SpectralSgdConfig {
        cold_iterations: MAX_POWER_ITERATIONS,
        ..SpectralSgdConfig::default()
    };
    let x = [1.0f32, -2.0, 0.5, 3.0];
    let rank_one: Vec<f32> = x
        .iter()
        .flat_map(|a| x.iter().map(move |b| a * b))
        .collect();
    let grads = vec![rank_one, random_matrix(shapes[1], 1.0, 3)];
    let mut cpu = SpectralSgd::new(&shapes, config).unwrap();
    let mut weights: Vec<Vec<f32>> = shapes.iter().map(|s| vec![0.0; s.len()]).collect();
    let report = cpu.step(&mut weights, &grads).unwrap();
    let exact = x.iter().map(|a| a * a).sum::<f32>();
    assert_relative(
        "rank-one sigma",
        f64::from(report.matrices[0].sigma.unwrap()),
        f64::from(exact),
        1e-6,
    );
    let device = SimDevice::new().unwrap();
    let mut sim = SpectralSgd::<Simulated>::on_device(&shapes, config, device.clone()).unwrap();
    let mut sim_weights: Vec<_> = shapes
        .iter()
        .map(|s| device.upload(&vec![0.0f32; s.len()]).unwrap())
        .collect();
    let sim_grads: Vec<_> = grads.iter().map(|g| device.upload(g).unwrap()).collect();
    sim.step(&mut sim_weights, &sim_grads).unwrap();
    let sim_report = sim.report().unwrap();
    for (s, c) in sim_report.matrices.iter().zip(&report.matrices) {
        assert_eq!(s.status, c.status);
        assert_relative(
            "sigma",
            f64::from(s.sigma.unwrap()),
            f64::from(c.sigma.unwrap()),
            2e-5,
        );
    }
    let launches = device.stats().launches;
    assert_eq!(launches, u64::from(2 * MAX_POWER_ITERATIONS + 1));
    eprintln!(
        "maximum iterations: {launches} launches, {} thread-instructions",
        device.stats().thread_instructions
    );
}

const CHILD: &str = "SPECTRAL_STEP_HOSTILE_CHILD";

/// Runs this test binary's test `name` again in a child process with `CHILD=mode`, under a
/// virtual-memory limit of `limit_kib` (`ulimit -v`); returns its stdout and stderr, or
/// `None` (said on stderr) where there is no POSIX shell to set the limit.
fn run_child(name: &str, mode: &str, limit_kib: u64) -> Option<(bool, String)> {
    if !Path::new("/bin/sh").exists() {
        eprintln!("NOT RUN: {name} in a child process (no /bin/sh)");
        return None;
    }
    let exe = std::env::current_exe().unwrap();
    let output = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v {limit_kib} && exec \"$0\" --exact {name} --nocapture --test-threads=1"
        ))
        .arg(&exe)
        .env(CHILD, mode)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    Some((output.status.success(), text))
}

/// Shapes whose sizes overflow or cannot be allocated: every constructor answers with a
/// typed error, in a child process whose address space is limited to 4 GiB (so that an
/// attempt to allocate would fail there, not on the machine).
#[test]
fn extreme_shapes_are_errors_in_bounded_memory() {
    let probes: Vec<Vec<MatrixShape>> = vec![
        vec![MatrixShape::new(1, 1 << 61)],
        vec![MatrixShape::new(1, 1 << 40)],
        vec![MatrixShape::new(1 << 31, 1 << 31)],
        vec![MatrixShape::new(1 << 62, 1), MatrixShape::new(1 << 62, 1)],
        vec![MatrixShape::new(1 << 40, 1 << 20)],
        vec![MatrixShape::new(usize::MAX, usize::MAX)],
        vec![MatrixShape::new(usize::MAX, 1)],
        vec![MatrixShape::new(1 << 20, 1 << 20)],
        vec![MatrixShape::new(4, 4), MatrixShape::new(1 << 33, 1 << 10)],
    ];
    if std::env::var(CHILD).as_deref() != Ok("shapes") {
        let Some((ok, text)) = run_child(
            "extreme_shapes_are_errors_in_bounded_memory",
            "shapes",
            4 << 20,
        ) else {
            return;
        };
        assert!(ok && !text.contains("panicked"), "child failed:\n{text}");
        assert_eq!(
            text.matches("refused:").count(),
            4 * probes.len(),
            "every probe reported:\n{text}"
        );
        eprintln!(
            "extreme shapes: {} batches x 4 constructors refused in a child under a 4 GiB limit",
            probes.len()
        );
        return;
    }
    for shapes in &probes {
        let config = SpectralSgdConfig::default();
        let cpu = SpectralSgd::new(shapes, config);
        assert!(
            matches!(
                cpu,
                Err(Error::LayoutOverflow { .. } | Error::OutOfMemory { .. })
            ),
            "{shapes:?}: {cpu:?}"
        );
        println!("refused: CPU {shapes:?}: {}", cpu.unwrap_err());
        let layout = BatchLayout::new(shapes, BlockPolicy::CPU);
        let power = layout.and_then(spectral_step::cpu::BatchPowerIteration::new);
        println!(
            "refused: power iteration {shapes:?}: {}",
            power.unwrap_err()
        );
        let device = SimDevice::new().unwrap();
        let sim = SpectralSgd::<Simulated>::on_device(shapes, config, device);
        println!("refused: simulated device {shapes:?}: {}", sim.unwrap_err());
        let cuda = SpectralSgd::<spectral_step::cuda::Cuda>::with_backend(shapes, config);
        println!("refused: CUDA {shapes:?}: {}", cuda.unwrap_err());
    }
}

/// The simulated device's memory limit: a batch beyond it is an out-of-memory error, with
/// nothing allocated, and so is a caller's buffer beyond it.
#[test]
fn the_simulated_device_refuses_allocations_past_its_limit() {
    let device = SimDevice::with_options(spectral_step::sim::SimOptions {
        memory_limit: Some(1 << 20),
        ..spectral_step::sim::SimOptions::default()
    })
    .unwrap();
    let result = SpectralSgd::<Simulated>::on_device(
        &[MatrixShape::new(1024, 1024)],
        SpectralSgdConfig::default(),
        device.clone(),
    );
    assert!(
        matches!(result, Err(Error::OutOfMemory { .. })),
        "{result:?}"
    );
    assert!(matches!(
        device.alloc_zeros::<f32>(1 << 20),
        Err(Error::OutOfMemory { .. })
    ));
    assert!(matches!(
        device.alloc_zeros::<f32>(usize::MAX),
        Err(Error::InvalidArgument(_) | Error::OutOfMemory { .. })
    ));
    assert_eq!(
        device.allocated_bytes().unwrap(),
        0,
        "nothing left allocated"
    );
}

/// Many saves to one path at once, from threads, with readers loading all along: every save
/// succeeds, every load sees one whole state of one of the writers, and no temporary file is
/// left behind.
#[test]
fn concurrent_saves_and_loads_from_threads_never_fail_or_tear() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("state.safetensors");
    let writers: Vec<SpectralSgd> = (0..4).map(|k| trained(10 + k)).collect();
    let states: Vec<_> = writers.iter().map(snapshot).collect();
    writers[0].save_state(&path).unwrap();
    let saves_per_writer = 40;
    let done = AtomicBool::new(false);
    let loads = AtomicUsize::new(0);
    // Everyone starts together: the writers, the readers, and this thread.
    let start = Barrier::new(writers.len() + 3);
    std::thread::scope(|scope| {
        let saving: Vec<_> = writers
            .iter()
            .map(|writer| {
                let (path, start) = (&path, &start);
                scope.spawn(move || {
                    start.wait();
                    for _ in 0..saves_per_writer {
                        writer.save_state(path).unwrap();
                    }
                })
            })
            .collect();
        for _ in 0..2 {
            let (path, start, done, loads, states) = (&path, &start, &done, &loads, &states);
            scope.spawn(move || {
                let mut reader = trained(99);
                start.wait();
                while !done.load(Ordering::Relaxed) {
                    reader.load_state(path).unwrap();
                    assert!(
                        states.contains(&snapshot(&reader)),
                        "a torn or foreign state"
                    );
                    loads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        start.wait();
        for writer in saving {
            writer.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
    });
    let left: Vec<_> = std::fs::read_dir(directory.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("state.safetensors")]);
    eprintln!(
        "threads: {} saves from {} writers and {} loads, none failed or torn",
        saves_per_writer * writers.len(),
        writers.len(),
        loads.load(Ordering::Relaxed)
    );
}

/// The same from processes: children save to one path while this process loads it.
#[test]
fn concurrent_saves_from_processes_never_fail_or_tear() {
    let saves_per_child = 30;
    if let Ok(mode) = std::env::var(CHILD)
        && let Some(rest) = mode.strip_prefix("save:")
    {
        let (id, path) = rest.split_once(':').unwrap();
        let writer = trained(20 + id.parse::<u64>().unwrap());
        for _ in 0..saves_per_child {
            writer.save_state(path).unwrap();
        }
        return;
    }
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("state.safetensors");
    let states: Vec<_> = (0..3).map(|k| snapshot(&trained(20 + k))).collect();
    trained(20).save_state(&path).unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|k| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "concurrent_saves_from_processes_never_fail_or_tear",
                    "--test-threads=1",
                ])
                .env(CHILD, format!("save:{k}:{}", path.display()))
                .spawn()
                .unwrap()
        })
        .collect();
    let mut reader = trained(98);
    let mut loads = 0;
    let mut children = children;
    while children.iter_mut().any(|c| c.try_wait().unwrap().is_none()) {
        reader.load_state(&path).unwrap();
        assert!(
            states.contains(&snapshot(&reader)),
            "a torn or foreign state"
        );
        loads += 1;
    }
    for mut child in children {
        assert!(child.wait().unwrap().success(), "a child's save failed");
    }
    assert_eq!(
        std::fs::read_dir(directory.path()).unwrap().count(),
        1,
        "no temporary left"
    );
    eprintln!(
        "processes: {} saves from 3 children and {loads} loads, none failed or torn",
        3 * saves_per_child
    );
}

/// The spectral norm of `c * I` for magnitudes from 1e-30 to 1e38: exact to `f32` precision,
/// where `f32` sums of squares would underflow or overflow; a norm beyond `f32` is an error.
#[test]
fn spectral_norms_hold_at_every_finite_magnitude() {
    let n = 6;
    let mut count = 0;
    for c in [
        1e-38f32, 1e-30, 1e-25, 1e-22, 1e-12, 1.0, 1e12, 1e19, 1e30, 3e38,
    ] {
        let mut identity = vec![0.0f32; n * n];
        identity.iter_mut().step_by(n + 1).for_each(|x| *x = c);
        let sigma = diagnostics::spectral_norm(&identity, MatrixShape::new(n, n)).unwrap();
        assert_relative(
            &format!("||{c:e} I||"),
            f64::from(sigma),
            f64::from(c),
            1e-6,
        );
        count += 1;
    }
    let huge = vec![f32::MAX; 4];
    assert!(matches!(
        diagnostics::spectral_norm(&huge, MatrixShape::new(2, 2)),
        Err(Error::InvalidArgument(_))
    ));
    let tiny = vec![f32::from_bits(1); 9];
    let sigma = diagnostics::spectral_norm(&tiny, MatrixShape::new(3, 3)).unwrap();
    assert_relative("all-subnormal", f64::from(sigma), 3.0 * 1.4e-45, 0.05);
    eprintln!("spectral norms: {count} magnitudes exact, an overflow refused");
}

/// A target beyond the element type's range is an error, and nothing is written.
#[test]
fn initialisation_beyond_the_element_range_is_an_error() {
    let shape = MatrixShape::new(8, 8);
    let mut halves = vec![f16::from_f32(0.25); shape.len()];
    let error = scaling::spectral_init(&mut halves, shape, 1e6, Scale::Spectral, 1).unwrap_err();
    assert!(error.to_string().contains("f16"), "{error}");
    assert!(
        halves.iter().all(|&x| x == f16::from_f32(0.25)),
        "nothing written"
    );
    // s = 1e6 sqrt(8): a target of about 3e42, beyond every element type.
    let wide = Scale::RmsMatch(1e6);
    let mut brains = vec![bf16::from_f32(0.25); shape.len()];
    assert!(scaling::spectral_init(&mut brains, shape, 1e36, wide, 1).is_err());
    assert!(brains.iter().all(|&x| x == bf16::from_f32(0.25)));
    let mut singles = vec![0.25f32; shape.len()];
    assert!(scaling::spectral_init(&mut singles, shape, 1e36, wide, 1).is_err());
    assert!(singles.iter().all(|&x| x == 0.25));
    scaling::spectral_init(&mut halves, shape, 1000.0, Scale::Spectral, 1).unwrap();
}

/// A step counter at its maximum (a loadable state) makes the next step an error that
/// changes nothing.
#[test]
fn the_step_counter_at_its_maximum_is_an_error_not_an_overflow() {
    let bytes = crafted(
        |m| {
            m.insert("steps".into(), u64::MAX.to_string());
        },
        |_| {},
    );
    let mut optimizer = trained(5);
    optimizer.load_state_from_bytes(&bytes).unwrap();
    assert_eq!(optimizer.steps(), u64::MAX);
    let before = snapshot(&optimizer);
    let mut weights: Vec<Vec<f32>> = shapes().iter().map(|s| vec![0.5; s.len()]).collect();
    let grads: Vec<Vec<f32>> = shapes().iter().map(|s| vec![1.0; s.len()]).collect();
    assert!(matches!(
        optimizer.step(&mut weights, &grads),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(snapshot(&optimizer), before);
    assert!(weights.iter().flatten().all(|&w| w == 0.5));
}

/// `Debug` of an optimizer is a summary, not its state.
#[test]
fn debug_output_is_a_summary() {
    let shape = [MatrixShape::new(1000, 1000)];
    let optimizer = SpectralSgd::new(&shape, SpectralSgdConfig::default()).unwrap();
    let text = format!("{optimizer:?}");
    assert!(text.len() < 1000, "{} bytes: {}", text.len(), &text[..200]);
    let device = SimDevice::new().unwrap();
    let sim =
        SpectralSgd::<Simulated>::on_device(&shape, SpectralSgdConfig::default(), device).unwrap();
    assert!(format!("{sim:?}").len() < 1000);
}
