//! Helpers shared by the integration tests: element conversions, tolerance checks (on
//! `approx`), and a bridge from the crate's config to the f64 oracle in
//! `spectral-step-reference`.
#![allow(dead_code)]

use spectral_step::cpu::KernelPath;
use spectral_step::half::{bf16, f16};
use spectral_step::{
    BatchLayout, Element, HostState, MatrixShape, MomentumKind, Rounding, SpectralSgd,
    SpectralSgdConfig,
};
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

/// One [`random_matrix`] per shape, matrix `j` from seed `seed + j`.
pub fn random_batch<T: Element>(shapes: &[MatrixShape], scale: f64, seed: u64) -> Vec<Vec<T>> {
    shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, scale, seed + j as u64))
        .collect()
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

/// Gradients in `{-1, 0, 1}` with column 0 all `±1`, and weights random.
pub fn ternary_batch<T: Element>(shapes: &[MatrixShape], seed: u64) -> Vec<Vec<T>> {
    shapes
        .iter()
        .enumerate()
        .map(|(j, shape)| {
            let noise = reference::gaussian(shape.len(), seed + j as u64);
            noise
                .iter()
                .enumerate()
                .map(|(k, &x)| {
                    let value = if k % shape.fan_in == 0 {
                        x.signum()
                    } else if x.abs() < 0.7 {
                        0.0
                    } else {
                        x.signum()
                    };
                    T::from_f32_rne(value as f32)
                })
                .collect()
        })
        .collect()
}

/// A state whose step is exact arithmetic for [`ternary_batch`] gradients: zero momentum
/// and, warm, the power vector `e_0`. With `momentum = 0`, `U = G`; `t = U e_0` and
/// `w = U^T t` are sums of small integers, so `sigma` and the update's `f32` values are the
/// same bits on both backends, and only the rounding of the new weights is left to compare.
pub fn exact_state(layout: &BatchLayout) -> HostState {
    let mut power_vectors = Vec::new();
    for shape in layout.shapes() {
        let mut vector = vec![0.0f32; shape.fan_in];
        vector[0] = 1.0;
        power_vectors.extend(vector);
    }
    HostState {
        momentum: vec![0.0; layout.packed_elements()],
        power_vectors,
        warm: vec![true; layout.len()],
    }
}

/// A batch whose stochastically rounded steps a device must reproduce bit for bit, with the
/// CPU path's result.
///
/// Gradients from [`ternary_batch`], momentum 0 and, before every step, [`exact_state`]: then
/// `U = G`, `t = U e_0` and `w = U^T t` are sums of small integers, so `sigma` and every `f32`
/// value of the update are the same bits on every backend and only the rounding of the new
/// weights is left to compare. The weights include the corners of the rounding (the f16
/// subnormal grid, values near the largest finite one, infinities, NaN). `new` also checks
/// that round-to-nearest gives other bits for more than 3% of the weights, so that a device
/// that rounds to nearest fails [`check`](RoundingCase::check).
pub struct RoundingCase<T> {
    pub shapes: Vec<MatrixShape>,
    pub config: SpectralSgdConfig,
    pub initial: Vec<Vec<T>>,
    /// The gradients of each step.
    pub grads: Vec<Vec<Vec<T>>>,
    /// The CPU path's weights after the steps.
    pub expected: Vec<Vec<T>>,
}

impl<T: Element> RoundingCase<T> {
    pub fn new() -> Self {
        assert!(
            KernelPath::Avx2Fma.is_supported(),
            "the exact CPU model of the kernels' fused multiply-adds needs AVX2+FMA"
        );
        let mut shapes = ragged_shapes();
        shapes.extend([MatrixShape::new(64, 64), MatrixShape::new(9, 131)]);
        let config = SpectralSgdConfig {
            momentum: 0.0,
            seed: 0x5EED_0000_0000_0007,
            ..SpectralSgdConfig::default()
        };
        assert_eq!(config.rounding, Rounding::Stochastic);
        let mut initial: Vec<Vec<T>> = random_batch(&shapes, 0.05, 70);
        let largest = match T::DTYPE {
            spectral_step::Dtype::F16 => 65_500.0,
            _ => 3.3e38,
        };
        let corners = [
            f32::INFINITY,
            -largest,
            largest,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        for (k, w) in initial[shapes.len() - 2].iter_mut().enumerate() {
            if k % 11 == 0 {
                *w = T::from_f32_rne(corners[(k / 11) % corners.len()]);
            } else if k % 3 == 0 {
                *w = T::from_f32_rne(w.to_f32() * 1e-4);
            }
        }
        let grads: Vec<Vec<Vec<T>>> = (0..3)
            .map(|t| ternary_batch(&shapes, 500 + 50 * t))
            .collect();
        let run = |rounding| {
            let config = SpectralSgdConfig { rounding, ..config };
            let mut cpu = SpectralSgd::new(&shapes, config).unwrap();
            cpu.set_kernel_path(KernelPath::Avx2Fma).unwrap();
            let mut weights = initial.clone();
            for grads in &grads {
                cpu.set_state(exact_state(cpu.layout())).unwrap();
                cpu.step(&mut weights, grads).unwrap();
            }
            weights
        };
        let expected = run(Rounding::Stochastic);
        let nearest = run(Rounding::Nearest);
        let total: usize = shapes.iter().map(|s| s.len()).sum();
        let differs = expected
            .iter()
            .flatten()
            .zip(nearest.iter().flatten())
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            differs * 100 > 3 * total,
            "only {differs} of {total} weights differ between the roundings"
        );
        Self {
            shapes,
            config,
            initial,
            grads,
            expected,
        }
    }

    /// Asserts that `device` (the weights a device ended with) is the CPU path's result bit
    /// for bit; a NaN only has to stay NaN (a GPU's `fma` returns the canonical NaN, the CPU
    /// keeps the payload).
    pub fn check(&self, what: &str, device: &[Vec<T>]) {
        for (j, (device_w, cpu_w)) in device.iter().zip(&self.expected).enumerate() {
            for (k, (d, c)) in device_w.iter().zip(cpu_w).enumerate() {
                if c.to_f32().is_nan() {
                    assert!(
                        d.to_f32().is_nan(),
                        "{what}: matrix {j} weight {k}: {d:?} for NaN"
                    );
                    continue;
                }
                assert_eq!(
                    bits(std::slice::from_ref(d)),
                    bits(std::slice::from_ref(c)),
                    "{what} {}: matrix {j} ({:?}) weight {k}: device {d:?}, CPU {c:?}",
                    T::DTYPE.name(),
                    self.shapes[j]
                );
            }
        }
    }
}
