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
    [
        KernelPath::Portable,
        KernelPath::Avx2Fma,
        KernelPath::Avx512,
    ]
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

/// How a [`MasterWeightsCase`] run steps its `f32` weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MasterMode {
    /// `f32` gradients: the 16-bit ones widened (exactly) to `f32`.
    Widened,
    /// The 16-bit gradients themselves (`step`).
    Mixed,
    /// The 16-bit gradients, writing a 16-bit copy of the weights (`step_with_copy`).
    MixedWithCopy,
}

/// What a run of a [`MasterWeightsCase`] ended with.
pub struct MasterOutcome<G> {
    /// Per step, the weights after it.
    pub weights: Vec<Vec<Vec<f32>>>,
    /// The momentum after the last step.
    pub momentum: Vec<Vec<f32>>,
    /// Per step, per matrix: status and sigma.
    pub reports: Vec<Vec<spectral_step::MatrixReport>>,
    /// Per step, the copies after it (`MixedWithCopy` only).
    pub copies: Option<Vec<Vec<Vec<G>>>>,
}

/// `f32` master weights with 16-bit gradients (math §5a). Widening a 16-bit value to `f32` is
/// exact, so a mixed step must be bit for bit the `f32` step on the widened gradients: the
/// same weights, momentum, statuses and sigmas, on any backend (given buffers aligned alike,
/// which the runners' allocations are: the quad path's alignment decides the power pass's
/// order of summation). With a copy, every copy must be its weights rounded to nearest after
/// every step, for matrices the step leaves alone too: runners overwrite the copies with
/// [`stale_copies`](Self::stale_copies) before every step, matrices 3 (7x5) and 7 (40x36,
/// four elements at a time) have a NaN gradient on the last step (skipped), and matrices
/// 5 (2x97) and 9 (70x64) a zero gradient throughout (a zero direction, weights left as they
/// are).
pub struct MasterWeightsCase<G> {
    pub shapes: Vec<MatrixShape>,
    pub config: SpectralSgdConfig,
    pub initial: Vec<Vec<f32>>,
    /// What the copies hold before every step (not the weights rounded).
    pub stale_copies: Vec<Vec<G>>,
    /// The gradients of each step.
    pub grads: Vec<Vec<Vec<G>>>,
}

impl<G: Element> MasterWeightsCase<G> {
    pub const NON_FINITE: [usize; 2] = [3, 7];
    pub const ZERO: [usize; 2] = [5, 9];

    pub fn new(shapes: Vec<MatrixShape>) -> Self {
        assert!(
            shapes.len() > 9
                && shapes[7].fan_in.is_multiple_of(4)
                && shapes[9].fan_in.is_multiple_of(4)
        );
        let config = SpectralSgdConfig {
            learning_rate: 0.05,
            weight_decay: 0.1,
            nesterov: true,
            ..SpectralSgdConfig::default()
        };
        let initial: Vec<Vec<f32>> = random_batch(&shapes, 0.3, 900);
        let stale_copies = shapes
            .iter()
            .map(|s| vec![G::from_f32_rne(7.0); s.len()])
            .collect();
        let grads: Vec<Vec<Vec<G>>> = (0..3u64)
            .map(|t| {
                let mut grads: Vec<Vec<G>> = random_batch(&shapes, 1.0, 1000 + 100 * t);
                for j in Self::ZERO {
                    grads[j].fill(G::from_f32_rne(0.0));
                }
                if t == 2 {
                    for j in Self::NON_FINITE {
                        grads[j][0] = G::from_f32_rne(f32::NAN);
                    }
                }
                grads
            })
            .collect();
        Self {
            shapes,
            config,
            initial,
            stale_copies,
            grads,
        }
    }

    /// The gradients of step `t` widened to `f32`.
    pub fn widened(&self, t: usize) -> Vec<Vec<f32>> {
        self.grads[t]
            .iter()
            .map(|g| g.iter().map(|x| x.to_f32()).collect())
            .collect()
    }

    /// Runs `run` in the three modes and checks the outcomes against each other.
    pub fn check(&self, what: &str, run: impl Fn(&Self, MasterMode) -> MasterOutcome<G>) {
        let widened = run(self, MasterMode::Widened);
        let last = self.grads.len() - 1;
        for j in Self::NON_FINITE {
            assert_eq!(
                widened.reports[last][j].status,
                spectral_step::MatrixStatus::SkippedNonFinite
            );
        }
        for j in Self::ZERO {
            assert_eq!(
                widened.reports[last][j].status,
                spectral_step::MatrixStatus::ZeroDirection
            );
        }
        assert!(
            widened.weights[last] != self.initial,
            "{what}: nothing moved"
        );
        for mode in [MasterMode::Mixed, MasterMode::MixedWithCopy] {
            let mixed = run(self, mode);
            let label = format!("{what} {mode:?} {}", G::DTYPE.name());
            assert_eq!(mixed.reports, widened.reports, "{label}: reports");
            for (t, (mixed_w, widened_w)) in mixed.weights.iter().zip(&widened.weights).enumerate()
            {
                for j in 0..self.shapes.len() {
                    let matrix = format!("{label}: step {t} matrix {j} ({:?})", self.shapes[j]);
                    assert_same_bits(&format!("{matrix} weights"), &mixed_w[j], &widened_w[j]);
                }
            }
            for j in 0..self.shapes.len() {
                assert_same_bits(
                    &format!("{label}: matrix {j} momentum"),
                    &mixed.momentum[j],
                    &widened.momentum[j],
                );
            }
            match (mode, &mixed.copies) {
                (MasterMode::MixedWithCopy, Some(copies)) => {
                    assert_eq!(copies.len(), self.grads.len());
                    for (t, (copies, weights)) in copies.iter().zip(&mixed.weights).enumerate() {
                        for (j, (copy, weights)) in copies.iter().zip(weights).enumerate() {
                            let rounded: Vec<G> =
                                weights.iter().map(|&w| G::from_f32_rne(w)).collect();
                            let matrix = format!("{label}: step {t} matrix {j} copy");
                            assert_same_bits(&matrix, copy, &rounded);
                        }
                    }
                }
                (MasterMode::Mixed, None) => {}
                other => panic!("{label}: copies {:?}", other.1.is_some()),
            }
        }
    }
}

/// Asserts that `actual` and `expected` are the same bits, naming the first element that is
/// not (and how many are not) instead of printing both buffers.
pub fn assert_same_bits<T: Element>(what: &str, actual: &[T], expected: &[T]) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let differ: Vec<usize> = (0..actual.len())
        .filter(|&k| bits(&actual[k..=k]) != bits(&expected[k..=k]))
        .collect();
    if let Some(&first) = differ.first() {
        panic!(
            "{what}: {} of {} elements differ, the first at {first}: {:?}, expected {:?}",
            differ.len(),
            actual.len(),
            actual[first],
            expected[first]
        );
    }
}

/// Relative Frobenius distance between the device's and the CPU's change of one matrix that
/// one step allows: the device's iterates are `bf16` (about 3 significant digits, rounded at
/// every product), the CPU's `f32`. `tests/orthogonal_device.rs` prints each distance on the
/// simulated device. Muon's schedule, which oscillates rather than converges: 0.7–1.5% on
/// shapes with at least 7 singular values, where the errors of many singular values average
/// out, up to 4.9% on thin ones (97x3), whose few singular values each carry their own; Polar
/// Express x8 and a cubic x12, which converge: 0.0–0.8%. `torch.optim.Muon`'s `bf16`
/// iteration against the same `f32` one: 1.15% on the GPT-2-small layers (README).
pub fn orthogonal_change_bound(shape: MatrixShape) -> f64 {
    if shape.fan_out.min(shape.fan_in) >= 7 {
        0.03
    } else {
        0.07
    }
}

/// `||a - b||_F / ||b||_F` over two changes of one matrix, in f64.
pub fn relative_distance(a: &[f64], b: &[f64]) -> f64 {
    let difference: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (difference / norm).sqrt()
}

pub fn change<T: Element>(after: &[T], before: &[T]) -> Vec<f64> {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| f64::from(a.to_f32()) - f64::from(b.to_f32()))
        .collect()
}
