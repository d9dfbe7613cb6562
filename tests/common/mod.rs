//! Helpers shared by the integration tests: element conversions, tolerance checks (on
//! `approx`), and a bridge from the crate's config to the f64 oracle in
//! `spectral-step-reference`.
#![allow(dead_code)]

use spectral_step::half::{bf16, f16};
use spectral_step::{Element, MatrixShape, MomentumKind, SpectralSgdConfig};
use spectral_step_reference as reference;

/// Relative precision of one element type (distance from 1 to the next value).
pub fn epsilon<T: Element>() -> f64 {
    match T::DTYPE {
        spectral_step::Dtype::F32 => f64::from(f32::EPSILON),
        spectral_step::Dtype::F16 => f64::from(f16::EPSILON.to_f32()),
        spectral_step::Dtype::Bf16 => f64::from(bf16::EPSILON.to_f32()),
    }
}

/// Smallest positive value of the type (the absolute rounding floor near zero).
pub fn smallest_step<T: Element>() -> f64 {
    match T::DTYPE {
        spectral_step::Dtype::F16 => 6.0e-8,
        _ => 1.0e-38,
    }
}

pub fn to_f64<T: Element>(values: &[T]) -> Vec<f64> {
    values.iter().map(|&x| f64::from(x.to_f32())).collect()
}

pub fn from_f64<T: Element>(values: &[f64]) -> Vec<T> {
    values.iter().map(|&x| T::from_f32_rne(x as f32)).collect()
}

/// Gaussian values scaled by `scale`, rounded to `T`.
pub fn random_matrix<T: Element>(shape: MatrixShape, scale: f64, seed: u64) -> Vec<T> {
    let values: Vec<f64> = reference::gaussian(shape.len(), seed)
        .iter()
        .map(|x| x * scale)
        .collect();
    from_f64(&values)
}

pub fn reference_params(
    config: &SpectralSgdConfig,
    shape: MatrixShape,
    iterations: u32,
) -> reference::StepParams {
    reference::StepParams {
        learning_rate: f64::from(config.learning_rate),
        momentum: f64::from(config.momentum),
        ema: config.momentum_kind == MomentumKind::Ema,
        nesterov: config.nesterov,
        weight_decay: f64::from(config.weight_decay),
        scale_factor: f64::from(config.scale.factor(shape)),
        iterations,
    }
}

/// Asserts `|actual - expected| <= tolerance` (`approx::abs_diff_eq!`), naming what was
/// compared.
#[track_caller]
pub fn assert_close(what: &str, actual: f64, expected: f64, tolerance: f64) {
    assert!(
        approx::abs_diff_eq!(actual, expected, epsilon = tolerance),
        "{what}: got {actual:e}, expected {expected:e} (difference {:e} > tolerance {tolerance:e})",
        (actual - expected).abs()
    );
}

/// Asserts `|actual - expected| <= max_relative * max(|actual|, |expected|)`
/// (`approx::relative_eq!`), naming what was compared.
#[track_caller]
pub fn assert_relative(what: &str, actual: f64, expected: f64, max_relative: f64) {
    assert!(
        approx::relative_eq!(actual, expected, epsilon = 0.0, max_relative = max_relative),
        "{what}: got {actual:e}, expected {expected:e} (relative difference {:e} > {max_relative:e})",
        (actual - expected).abs() / actual.abs().max(expected.abs())
    );
}

/// Bit patterns of a slice, for exact comparisons.
pub fn bits<T: Element>(values: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(values).to_vec()
}

/// The kernel paths this CPU can run. A path it cannot run is named on stderr, so that a
/// reduced run is visible in the test log rather than silently passing.
pub fn kernel_paths() -> Vec<spectral_step::cpu::KernelPath> {
    use spectral_step::cpu::KernelPath;
    [KernelPath::Portable, KernelPath::Avx2Fma]
        .into_iter()
        .filter(|path| {
            let supported = path.is_supported();
            if !supported {
                eprintln!("NOT RUN: kernel path {path:?} (this CPU does not support it)");
            }
            supported
        })
        .collect()
}

/// Ragged shapes for kernel tests: 1x1, row and column vectors, odd sizes, sizes not
/// multiples of 4 or 32, quad-aligned rows (`fan_in % 4 == 0`), and matrices that span
/// several blocks of a small block policy.
pub fn ragged_shapes() -> Vec<MatrixShape> {
    [
        (1, 1),
        (1, 13),
        (13, 1),
        (7, 5),
        (31, 17),
        (2, 97),
        (97, 3),
        (40, 36),
        (33, 260),
        (70, 64),
    ]
    .into_iter()
    .map(MatrixShape::from)
    .collect()
}
