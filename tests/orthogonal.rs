//! The orthogonalised update rule (math §5b) on the CPU: each schedule puts the update's
//! singular values in its band (checked with the oracle's exact SVD), the matrix iteration
//! applies the schedule's scalar polynomials to every singular value, one step matches a
//! plain f64 implementation of the same iteration, every shape works, and zero and
//! non-finite directions do what the power-normalised rule does.

mod common;

use common::{assert_same_bits, random_matrix};
use spectral_step::half::bf16;
use spectral_step::newton_schulz::{Coefficients, NORM_EPSILON};
use spectral_step::{
    Error, MatrixShape, MatrixStatus, MomentumKind, Rounding, Scale, Schedule, SpectralSgd,
    SpectralSgdConfig, UpdateRule,
};
use spectral_step_reference as reference;

const POLAR_EXPRESS_5: Schedule = Schedule::PolarExpress { iterations: 5 };
const POLAR_EXPRESS_8: Schedule = Schedule::PolarExpress { iterations: 8 };

fn config(schedule: Schedule) -> SpectralSgdConfig {
    SpectralSgdConfig {
        learning_rate: 0.5,
        update: UpdateRule::Orthogonalised(schedule),
        ..SpectralSgdConfig::default()
    }
}

/// One step from zero weights and zero momentum on gradient `grad`: returns `X`, recovered
/// from `W_1 = -η s X` (one rounding of `η s X` away), as f64.
fn orthogonalised(schedule: Schedule, shape: MatrixShape, grad: &[f32]) -> Vec<f64> {
    let config = config(schedule);
    let mut optimizer = SpectralSgd::new(&[shape], config).unwrap();
    let mut weights = vec![vec![0.0f32; shape.len()]];
    let report = optimizer.step(&mut weights, &[grad.to_vec()]).unwrap();
    assert_eq!(report.matrices[0].status, MatrixStatus::Updated);
    let coefficient = f64::from(config.learning_rate * config.scale.factor(shape));
    weights[0]
        .iter()
        .map(|&w| -f64::from(w) / coefficient)
        .collect()
}

/// `p_K(...p_1(x))`, the schedule's scalar map, in f64.
fn scalar_map(schedule: Schedule, x: f64) -> f64 {
    schedule.coefficients().unwrap().scalar_map(x)
}

fn sorted_singular_values(matrix: &[f64], shape: MatrixShape) -> Vec<f64> {
    let mut values = reference::singular_values(matrix, shape.fan_out, shape.fan_in);
    values.sort_by(|a, b| b.total_cmp(a));
    values
}

/// The matrix iteration applies the scalar map to every singular value of `U / (f ||U||_F + ε)`:
/// the update's singular values are the map's values at the gradient's, within `f32` rounding
/// amplified by the polynomials' slopes.
fn check_spectrum(schedule: Schedule, shape: MatrixShape, grad: &[f32], tolerance: f64) {
    let grad_f64: Vec<f64> = grad.iter().map(|&g| f64::from(g)).collect();
    let norm = reference::norm(&grad_f64);
    let start = 1.0 / (norm * f64::from(schedule.norm_factor()) + f64::from(NORM_EPSILON));
    let expected: Vec<f64> = sorted_singular_values(&grad_f64, shape)
        .iter()
        .map(|&sigma| scalar_map(schedule, sigma * start).abs())
        .collect();
    let mut expected = expected;
    expected.sort_by(|a, b| b.total_cmp(a));
    let got = sorted_singular_values(&orthogonalised(schedule, shape, grad), shape);
    for (index, (got, expected)) in got.iter().zip(&expected).enumerate() {
        assert!(
            (got - expected).abs() <= tolerance,
            "{schedule:?} {shape:?}: singular value {index} is {got}, the scalar map gives {expected}"
        );
    }
}

#[test]
fn each_schedule_puts_the_singular_values_in_its_band() {
    // Gaussian matrices of aspect 2 or more: every singular value of U / ||U||_F lies above
    // 1e-2, where each band holds. (A square one has singular values near 0, which the
    // polynomials leave near 0: checked against the scalar map below.)
    let square = MatrixShape::new(64, 64);
    let grad: Vec<f32> = random_matrix(square, 1.0, 3);
    for schedule in [Schedule::MUON, POLAR_EXPRESS_5, POLAR_EXPRESS_8] {
        check_spectrum(schedule, square, &grad, 5e-3);
    }
    for (shape, seed) in [
        (MatrixShape::new(48, 160), 1),
        (MatrixShape::new(160, 48), 2),
        (MatrixShape::new(64, 128), 3),
    ] {
        let grad: Vec<f32> = random_matrix(shape, 1.0, seed);
        for (schedule, low, high) in [
            (Schedule::MUON, 0.68, 1.14),
            (POLAR_EXPRESS_5, 0.84, 1.13),
            (POLAR_EXPRESS_8, 0.999, 1.001),
        ] {
            let values = sorted_singular_values(&orthogonalised(schedule, shape, &grad), shape);
            let slack = 5e-3;
            assert!(
                values[0] <= high + slack && *values.last().unwrap() >= low - slack,
                "{schedule:?} {shape:?}: singular values from {} to {}, band [{low}, {high}]",
                values.last().unwrap(),
                values[0]
            );
            check_spectrum(schedule, shape, &grad, 5e-3);
        }
    }
}

#[test]
fn a_low_rank_direction_keeps_its_null_space() {
    // Rank 3 of 40x90, singular values 5, 2 and 0.5: three near 1, the rest near 0.
    let shape = MatrixShape::new(40, 90);
    let spectrum = [5.0, 2.0, 0.5];
    let grad: Vec<f32> = reference::matrix_with_spectrum(40, 90, &spectrum, 7)
        .iter()
        .map(|&x| x as f32)
        .collect();
    for schedule in [Schedule::MUON, POLAR_EXPRESS_5, POLAR_EXPRESS_8] {
        let values = sorted_singular_values(&orthogonalised(schedule, shape, &grad), shape);
        for (index, &value) in values.iter().enumerate().take(3) {
            assert!(
                (0.4..1.25).contains(&value),
                "{schedule:?}: singular value {index} of a rank-3 direction is {value}"
            );
        }
        for &value in &values[3..] {
            assert!(
                value < 1e-3,
                "{schedule:?}: a null singular value became {value}"
            );
        }
        check_spectrum(schedule, shape, &grad, 5e-3);
    }
}

/// The same iteration written out in f64 with plain loops.
fn newton_schulz_f64(schedule: Schedule, shape: MatrixShape, direction: &[f64]) -> Vec<f64> {
    let (rows, cols) = (shape.fan_out, shape.fan_in);
    let transposed = rows > cols;
    let (short, long) = if transposed {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let norm = reference::norm(direction);
    let start = 1.0 / (norm * f64::from(schedule.norm_factor()) + f64::from(NORM_EPSILON));
    let mut x = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let (i, j) = if transposed { (c, r) } else { (r, c) };
            x[i * long + j] = direction[r * cols + c] * start;
        }
    }
    let product = |left: &[f64], right: &[f64], n: usize, k: usize, m: usize| {
        let mut out = vec![0.0; n * m];
        for i in 0..n {
            for l in 0..k {
                for j in 0..m {
                    out[i * m + j] += left[i * k + l] * right[l * m + j];
                }
            }
        }
        out
    };
    for &(a, b, c) in schedule.coefficients().unwrap().as_slice() {
        let (a, b, c) = (f64::from(a), f64::from(b), f64::from(c));
        let mut x_t = vec![0.0; long * short];
        for i in 0..short {
            for j in 0..long {
                x_t[j * short + i] = x[i * long + j];
            }
        }
        let gram = product(&x, &x_t, short, long, short);
        let gram_squared = product(&gram, &gram, short, short, short);
        let polynomial: Vec<f64> = gram
            .iter()
            .zip(&gram_squared)
            .map(|(g, g2)| b * g + c * g2)
            .collect();
        let bx = product(&polynomial, &x, short, short, long);
        x = x.iter().zip(&bx).map(|(x, bx)| a * x + bx).collect();
    }
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let (i, j) = if transposed { (c, r) } else { (r, c) };
            out[r * cols + c] = x[i * long + j];
        }
    }
    out
}

#[test]
fn one_step_matches_a_plain_f64_iteration_on_every_shape() {
    let custom = Schedule::Custom(Coefficients::new(&[(1.5, -0.5, 0.0); 12]).unwrap());
    let shapes = [
        MatrixShape::new(1, 1),
        MatrixShape::new(1, 17),
        MatrixShape::new(17, 1),
        MatrixShape::new(13, 7),
        MatrixShape::new(7, 13),
        MatrixShape::new(97, 3),
        MatrixShape::new(3, 97),
        MatrixShape::new(31, 31),
        MatrixShape::new(64, 200),
    ];
    for (index, &shape) in shapes.iter().enumerate() {
        let grad: Vec<f32> = random_matrix(shape, 0.3, 100 + index as u64);
        let grad_f64: Vec<f64> = grad.iter().map(|&g| f64::from(g)).collect();
        for schedule in [Schedule::MUON, POLAR_EXPRESS_8, custom] {
            let expected = newton_schulz_f64(schedule, shape, &grad_f64);
            let got = orthogonalised(schedule, shape, &grad);
            let largest = expected.iter().fold(0f64, |m, x| m.max(x.abs()));
            for (element, (got, expected)) in got.iter().zip(&expected).enumerate() {
                assert!(
                    (got - expected).abs() <= 2e-4 * largest.max(1.0),
                    "{schedule:?} {shape:?} element {element}: {got} against f64 {expected}"
                );
            }
        }
    }
}

#[test]
fn momentum_nesterov_and_decay_follow_the_shared_rule() {
    let shapes = [MatrixShape::new(24, 40), MatrixShape::new(40, 24)];
    let base = SpectralSgdConfig {
        learning_rate: 0.05,
        weight_decay: 0.3,
        momentum_kind: MomentumKind::Ema,
        nesterov: true,
        scale: Scale::RmsMatch(0.2),
        ..SpectralSgdConfig::default()
    };
    let orthogonal_config = SpectralSgdConfig {
        update: UpdateRule::MUON,
        ..base
    };
    let mut orthogonal = SpectralSgd::new(&shapes, orthogonal_config).unwrap();
    let mut power = SpectralSgd::new(&shapes, base).unwrap();
    let initial: Vec<Vec<f32>> = common::random_batch(&shapes, 0.5, 20);
    let mut weights = initial.clone();
    let mut power_weights = initial.clone();
    for step in 0..3 {
        let grads: Vec<Vec<f32>> = common::random_batch(&shapes, 1.0, 30 + 10 * step);
        let before = weights.clone();
        orthogonal.step(&mut weights, &grads).unwrap();
        power.step(&mut power_weights, &grads).unwrap();
        for (index, shape) in shapes.iter().enumerate() {
            // The same momentum rule, bit for bit.
            assert_same_bits(
                "momentum",
                orthogonal.momentum(index),
                power.momentum(index),
            );
            // W_1 = (1 - ηλ) W_0 - η s X with X from the Nesterov direction.
            let decay = 1.0 - f64::from(base.learning_rate * base.weight_decay);
            let coefficient = f64::from(base.learning_rate * base.scale.factor(*shape));
            let x: Vec<f64> = weights[index]
                .iter()
                .zip(&before[index])
                .map(|(&w, &w0)| (decay * f64::from(w0) - f64::from(w)) / coefficient)
                .collect();
            let values = sorted_singular_values(&x, *shape);
            assert!(
                values[0] < 1.2 && *values.last().unwrap() > 0.6,
                "step {step} matrix {index}: singular values {} to {}",
                values.last().unwrap(),
                values[0]
            );
        }
    }
}

#[test]
fn zero_and_non_finite_directions_do_what_the_power_rule_does() {
    let shapes = [MatrixShape::new(6, 5), MatrixShape::new(5, 6)];
    let mut optimizer = SpectralSgd::new(&shapes, config(Schedule::MUON)).unwrap();
    let initial = vec![vec![0.25f32; 30], vec![0.5f32; 30]];
    let mut weights = initial.clone();
    let mut poisoned = vec![1.0f32; 30];
    poisoned[4] = f32::NAN;
    let grads = vec![vec![0.0f32; 30], poisoned];
    let report = optimizer.step(&mut weights, &grads).unwrap();
    assert_eq!(report.matrices[0].status, MatrixStatus::ZeroDirection);
    assert_eq!(report.matrices[0].sigma, Some(0.0));
    assert_eq!(report.matrices[1].status, MatrixStatus::SkippedNonFinite);
    assert_eq!(weights, initial, "neither matrix's weights change");
    assert_eq!(
        optimizer.momentum(1),
        &[0.0f32; 30][..],
        "the skipped momentum"
    );
    // An infinite gradient element too.
    let mut infinite = vec![1.0f32; 30];
    infinite[0] = f32::INFINITY;
    let report = optimizer
        .step(&mut weights, &[vec![1.0f32; 30], infinite])
        .unwrap();
    assert_eq!(report.matrices[0].status, MatrixStatus::Updated);
    assert_eq!(report.matrices[1].status, MatrixStatus::SkippedNonFinite);
    assert_eq!(weights[1], initial[1]);
}

#[test]
fn bf16_weights_round_as_the_config_says_and_any_thread_count_gives_the_same_bits() {
    let shapes = [
        MatrixShape::new(33, 70),
        MatrixShape::new(70, 33),
        MatrixShape::new(8, 8),
    ];
    let initial: Vec<Vec<bf16>> = common::random_batch(&shapes, 0.5, 40);
    let grads: Vec<Vec<bf16>> = common::random_batch(&shapes, 1.0, 50);
    let run = |threads: usize, rounding: Rounding| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let config = SpectralSgdConfig {
                rounding,
                ..config(POLAR_EXPRESS_5)
            };
            let mut optimizer = SpectralSgd::new(&shapes, config).unwrap();
            let mut weights = initial.clone();
            for _ in 0..2 {
                optimizer.step(&mut weights, &grads).unwrap();
            }
            weights
        })
    };
    for rounding in [Rounding::Stochastic, Rounding::Nearest] {
        let one = run(1, rounding);
        let two = run(2, rounding);
        for (a, b) in one.iter().zip(&two) {
            assert_same_bits("bf16 weights, 1 and 2 threads", a, b);
        }
        assert_ne!(one, initial);
    }
    assert_ne!(run(1, Rounding::Stochastic), run(1, Rounding::Nearest));
}

#[test]
fn the_rule_survives_a_state_file() {
    let shapes = [MatrixShape::new(8, 12)];
    let rule = UpdateRule::Orthogonalised(Schedule::Custom(
        Coefficients::new(&[(3.4445, -4.775, 2.0315), (1.875, -1.25, 0.375)]).unwrap(),
    ));
    let config = SpectralSgdConfig {
        update: rule,
        ..SpectralSgdConfig::default()
    };
    let optimizer = SpectralSgd::new(&shapes, config).unwrap();
    let bytes = optimizer.state_to_bytes().unwrap();
    let mut restored = SpectralSgd::new(&shapes, SpectralSgdConfig::default()).unwrap();
    restored.load_state_from_bytes(&bytes).unwrap();
    assert_eq!(restored.config().update, rule);
}

#[test]
fn bad_schedules_are_config_errors() {
    for schedule in [
        Schedule::Muon { iterations: 0 },
        Schedule::PolarExpress { iterations: 17 },
    ] {
        let error = SpectralSgd::new(&[MatrixShape::new(2, 2)], config(schedule)).unwrap_err();
        assert!(matches!(error, Error::InvalidConfig(_)), "{error}");
    }
    assert!(Coefficients::new(&[(f32::NAN, 0.0, 0.0)]).is_err());
    assert!(Coefficients::new(&[(1.0, 0.0, 0.0); 17]).is_err());
}
