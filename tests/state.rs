//! Saving and loading optimizer state with safetensors.

mod common;

use common::*;
use spectral_step::{
    Error, MatrixShape, MomentumKind, Rounding, Scale, SpectralSgd, SpectralSgdConfig, UpdateRule,
};

fn shapes() -> Vec<MatrixShape> {
    vec![
        MatrixShape::new(31, 17),
        MatrixShape::new(1, 9),
        MatrixShape::new(64, 64),
    ]
}

fn grads(step: u64) -> Vec<Vec<f32>> {
    shapes()
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 1.0, 10 * step + j as u64))
        .collect()
}

fn trained() -> (SpectralSgd, Vec<Vec<f32>>) {
    let config = SpectralSgdConfig {
        learning_rate: 0.037,
        momentum: 0.85,
        momentum_kind: MomentumKind::Ema,
        nesterov: true,
        weight_decay: 0.01,
        scale: Scale::RmsMatch(0.2),
        warm_iterations: 2,
        cold_iterations: 6,
        seed: 99,
        rounding: Rounding::Nearest,
        update: UpdateRule::PowerNormalised,
    };
    let mut optimizer = SpectralSgd::new(&shapes(), config).unwrap();
    let mut weights: Vec<Vec<f32>> = shapes()
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 0.1, 500 + j as u64))
        .collect();
    for step in 1..=3 {
        optimizer.step(&mut weights, &grads(step)).unwrap();
    }
    (optimizer, weights)
}

fn assert_same_state(a: &SpectralSgd, b: &SpectralSgd) {
    assert_eq!(a.config(), b.config());
    assert_eq!(a.steps(), b.steps());
    for j in 0..shapes().len() {
        assert_eq!(bits(a.momentum(j)), bits(b.momentum(j)), "momentum {j}");
        assert_eq!(
            bits(a.power_vector(j)),
            bits(b.power_vector(j)),
            "power vector {j}"
        );
        assert_eq!(a.is_warm(j), b.is_warm(j));
    }
}

#[test]
fn saved_then_loaded_gives_a_bitwise_identical_next_step() {
    let (mut original, mut weights) = trained();
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("optimizer.safetensors");
    original.save_state(&path).unwrap();

    let mut restored = SpectralSgd::new(&shapes(), SpectralSgdConfig::default()).unwrap();
    restored.load_state(&path).unwrap();
    assert_same_state(&original, &restored);

    let mut restored_weights = weights.clone();
    let next = grads(4);
    let report = original.step(&mut weights, &next).unwrap();
    let restored_report = restored.step(&mut restored_weights, &next).unwrap();
    assert_eq!(report, restored_report);
    for (a, b) in weights.iter().zip(&restored_weights) {
        assert_eq!(bits(a), bits(b));
    }
    assert_same_state(&original, &restored);
}

#[test]
fn a_state_for_other_shapes_is_rejected() {
    let (original, _) = trained();
    let bytes = original.state_to_bytes().unwrap();
    for other in [
        vec![
            MatrixShape::new(31, 17),
            MatrixShape::new(1, 9),
            MatrixShape::new(64, 63),
        ],
        vec![
            MatrixShape::new(31, 17),
            MatrixShape::new(9, 1),
            MatrixShape::new(64, 64),
        ],
        vec![MatrixShape::new(31, 17), MatrixShape::new(1, 9)],
    ] {
        let mut optimizer = SpectralSgd::new(&other, SpectralSgdConfig::default()).unwrap();
        let error = optimizer.load_state_from_bytes(&bytes).unwrap_err();
        assert!(
            matches!(error, Error::StateShapeMismatch(_)),
            "{other:?}: {error}"
        );
        assert_eq!(optimizer.steps(), 0, "a failed load must change nothing");
        assert!(optimizer.momentum(0).iter().all(|&m| m == 0.0));
    }
}

#[test]
fn truncated_and_corrupted_files_are_rejected() {
    let (original, _) = trained();
    let bytes = original.state_to_bytes().unwrap();
    let mut target = SpectralSgd::new(&shapes(), SpectralSgdConfig::default()).unwrap();
    let pristine = SpectralSgd::new(&shapes(), SpectralSgdConfig::default()).unwrap();

    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        ("seven bytes".into(), bytes[..7].to_vec()),
        ("header cut".into(), bytes[..40].to_vec()),
        (
            "last byte missing".into(),
            bytes[..bytes.len() - 1].to_vec(),
        ),
        ("half the data".into(), bytes[..bytes.len() / 2].to_vec()),
        (
            "not safetensors".into(),
            b"definitely not a state file".to_vec(),
        ),
    ];
    // A flipped bit anywhere in the tensor data (after the header) is caught by the checksum.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for position in [
        8 + header_len,
        8 + header_len + 1000,
        bytes.len() - 1,
        bytes.len() - 20,
    ] {
        let mut flipped = bytes.clone();
        flipped[position] ^= 0x10;
        cases.push((format!("bit flipped at {position}"), flipped));
    }
    // A changed config value in the header (same length, still valid JSON and a valid number).
    let text = String::from_utf8_lossy(&bytes[8..8 + header_len]).into_owned();
    let at = 8 + text.find("\"0.037\"").expect("learning rate in header") + 4;
    let mut edited = bytes.clone();
    edited[at] = b'8';
    cases.push(("learning rate edited in header".into(), edited));
    // A foreign but valid safetensors file.
    let foreign_data = [0u8; 16];
    let foreign = safetensors::serialize(
        [(
            "weight",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &foreign_data)
                .unwrap(),
        )],
        None,
    )
    .unwrap();
    cases.push(("foreign safetensors".into(), foreign));

    for (name, case) in cases {
        let error = target.load_state_from_bytes(&case).unwrap_err();
        assert!(matches!(error, Error::StateFormat(_)), "{name}: {error}");
        assert_same_state(&target, &pristine);
    }
}

#[test]
fn missing_file_is_an_io_error() {
    let directory = tempfile::tempdir().unwrap();
    let mut optimizer = SpectralSgd::new(&shapes(), SpectralSgdConfig::default()).unwrap();
    let error = optimizer
        .load_state(directory.path().join("absent.safetensors"))
        .unwrap_err();
    assert!(matches!(error, Error::Io { .. }), "{error}");
    let error = optimizer
        .save_state(directory.path().join("no/such/dir/state.safetensors"))
        .unwrap_err();
    assert!(matches!(error, Error::Io { .. }), "{error}");
}
