//! The CPU step against the f64 oracle (math §5), over mixed batches, all element types, each
//! momentum variant, weight decay on and off, and each scale variant.

mod common;

use common::*;
use spectral_step::half::{bf16, f16};
use spectral_step::{
    Element, Error, MatrixShape, MatrixStatus, MomentumKind, Rounding, Scale, SpectralSgd,
    SpectralSgdConfig,
};
use spectral_step_reference as reference;

/// `1x1`, row and column vectors, odd and prime sizes, and one matrix large enough to be cut
/// into several row blocks (2^18 elements per block on the CPU).
fn mixed_shapes(with_large: bool) -> Vec<MatrixShape> {
    let mut shapes = vec![
        MatrixShape::new(1, 1),
        MatrixShape::new(1, 13),
        MatrixShape::new(13, 1),
        MatrixShape::new(7, 5),
        MatrixShape::new(31, 17),
        MatrixShape::new(2, 97),
        MatrixShape::new(97, 3),
        MatrixShape::new(64, 64),
        MatrixShape::new(257, 263),
    ];
    if with_large {
        shapes.push(MatrixShape::new(1031, 300));
    }
    shapes
}

/// Runs `steps` steps of the crate and, before each, hands the crate's current state to the
/// oracle; each step's weights, momentum, power vector and sigma must match the oracle's.
fn check_against_reference<T: Element>(
    shapes: &[MatrixShape],
    config: SpectralSgdConfig,
    steps: u32,
    seed: u64,
) {
    for path in kernel_paths() {
        check_path_against_reference::<T>(path, shapes, config, steps, seed);
    }
}

fn check_path_against_reference<T: Element>(
    path: spectral_step::cpu::KernelPath,
    shapes: &[MatrixShape],
    config: SpectralSgdConfig,
    steps: u32,
    seed: u64,
) {
    let mut optimizer = SpectralSgd::new(shapes, config).unwrap();
    optimizer.set_kernel_path(path).unwrap();
    let mut weights: Vec<Vec<T>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 0.1, seed * 1000 + j as u64))
        .collect();
    for step in 0..steps {
        let grads: Vec<Vec<T>> = shapes
            .iter()
            .enumerate()
            .map(|(j, &s)| {
                random_matrix(
                    s,
                    1.0 + j as f64,
                    seed * 1000 + 100 * (step as u64 + 1) + j as u64,
                )
            })
            .collect();
        // The oracle's inputs: exactly the crate's state before this step.
        let mut expected: Vec<_> = (0..shapes.len())
            .map(|j| {
                let iterations = if optimizer.is_warm(j) {
                    config.warm_iterations
                } else {
                    config.cold_iterations
                };
                (
                    to_f64(&weights[j]),
                    optimizer
                        .momentum(j)
                        .iter()
                        .map(|&m| f64::from(m))
                        .collect::<Vec<_>>(),
                    optimizer
                        .power_vector(j)
                        .iter()
                        .map(|&v| f64::from(v))
                        .collect::<Vec<_>>(),
                    iterations,
                )
            })
            .collect();
        let report = optimizer.step(&mut weights, &grads).unwrap();
        assert_eq!(report.step, u64::from(step) + 1);

        for (j, &shape) in shapes.iter().enumerate() {
            let (ref_weights, ref_momentum, ref_vector, iterations) = &mut expected[j];
            let old_weights = ref_weights.clone();
            let old_momentum = ref_momentum.clone();
            let params = reference_params(&config, shape, *iterations);
            let outcome = reference::step(
                ref_weights,
                ref_momentum,
                ref_vector,
                &to_f64(&grads[j]),
                shape.fan_out,
                shape.fan_in,
                &params,
            );
            let context = format!(
                "{path:?} {:?} step {} matrix {j} ({}x{})",
                T::DTYPE,
                step + 1,
                shape.fan_out,
                shape.fan_in
            );
            let reference::Outcome::Updated(ref_sigma) = outcome else {
                panic!("{context}: oracle did not update ({outcome:?})");
            };
            let line = report.matrices[j];
            assert_eq!(line.status, MatrixStatus::Updated, "{context}");
            assert_close(
                &format!("{context} sigma"),
                f64::from(line.sigma.unwrap()),
                ref_sigma,
                2e-4 * ref_sigma,
            );

            // Weights: the rounding of T, plus f32 error in the update term.
            let decay = 1.0 - params.learning_rate * params.weight_decay;
            let got = to_f64(&weights[j]);
            for k in 0..shape.len() {
                let update = (ref_weights[k] - decay * old_weights[k]).abs();
                let tolerance = epsilon::<T>() * ref_weights[k].abs()
                    + smallest_step::<T>()
                    + 3e-4 * update
                    + 1e-6 * old_weights[k].abs();
                assert_close(
                    &format!("{context} weight {k}"),
                    got[k],
                    ref_weights[k],
                    tolerance,
                );
            }
            // Momentum: two f32 roundings of beta*M + c*G.
            for (k, (&got, &want)) in optimizer
                .momentum(j)
                .iter()
                .zip(ref_momentum.iter())
                .enumerate()
            {
                let scale = want.abs() + f64::from(config.momentum) * old_momentum[k].abs();
                assert_close(
                    &format!("{context} momentum {k}"),
                    f64::from(got),
                    want,
                    4.0 * f64::from(f32::EPSILON) * scale,
                );
            }
            // Power vector: unit length, matching the oracle's direction.
            if !shape.is_vector() {
                for (k, (&got, &want)) in optimizer
                    .power_vector(j)
                    .iter()
                    .zip(ref_vector.iter())
                    .enumerate()
                {
                    assert_close(
                        &format!("{context} power vector {k}"),
                        f64::from(got),
                        want,
                        2e-4,
                    );
                }
            }
        }
    }
}

fn all_configs() -> Vec<SpectralSgdConfig> {
    let mut configs = Vec::new();
    for momentum_kind in [MomentumKind::HeavyBall, MomentumKind::Ema] {
        for nesterov in [false, true] {
            for weight_decay in [0.0, 0.1] {
                for scale in [Scale::Spectral, Scale::MuonMax1, Scale::RmsMatch(0.2)] {
                    configs.push(SpectralSgdConfig {
                        learning_rate: 0.05,
                        momentum: 0.9,
                        momentum_kind,
                        nesterov,
                        weight_decay,
                        scale,
                        warm_iterations: 1,
                        cold_iterations: 8,
                        seed: 11,
                        rounding: Rounding::Stochastic,
                        ..SpectralSgdConfig::default()
                    });
                }
            }
        }
    }
    configs
}

#[test]
fn every_config_matches_reference_in_f32() {
    for (index, config) in all_configs().into_iter().enumerate() {
        check_against_reference::<f32>(&mixed_shapes(false), config, 3, index as u64);
    }
}

#[test]
fn every_config_matches_reference_in_bf16() {
    for (index, config) in all_configs().into_iter().enumerate() {
        check_against_reference::<bf16>(&mixed_shapes(false), config, 2, 100 + index as u64);
    }
}

#[test]
fn every_config_matches_reference_in_f16() {
    for (index, config) in all_configs().into_iter().enumerate() {
        check_against_reference::<f16>(&mixed_shapes(false), config, 2, 200 + index as u64);
    }
}

#[test]
fn multi_block_matrices_match_reference() {
    let shapes = mixed_shapes(true);
    let optimizer = SpectralSgd::new(&shapes, SpectralSgdConfig::default()).unwrap();
    let large = optimizer.layout().matrix(shapes.len() - 1);
    assert!(
        large.block_count >= 2,
        "the large matrix must span several blocks, got {}",
        large.block_count
    );
    let config = SpectralSgdConfig {
        warm_iterations: 2,
        cold_iterations: 5,
        ..SpectralSgdConfig::default()
    };
    check_against_reference::<f32>(&shapes, config, 3, 7);
    check_against_reference::<bf16>(
        &shapes,
        SpectralSgdConfig {
            nesterov: true,
            ..config
        },
        2,
        8,
    );
}

#[test]
fn update_has_the_target_spectral_norm() {
    // math §3a: ||ΔW||_* = eta * s * ||U||_* / sigma_est >= eta * s, and close to it once the
    // power iteration has converged (a clear spectral gap, cold start of 8 iterations).
    let shape = MatrixShape::new(40, 24);
    let spectrum: Vec<f64> = (0..24).map(|k| 3.0 * 0.7f64.powi(k)).collect();
    let grads: Vec<f32> = reference::matrix_with_spectrum(40, 24, &spectrum, 5)
        .iter()
        .map(|&x| x as f32)
        .collect();
    for scale in [Scale::Spectral, Scale::MuonMax1, Scale::RmsMatch(0.2)] {
        let config = SpectralSgdConfig {
            scale,
            learning_rate: 0.1,
            ..SpectralSgdConfig::default()
        };
        let mut optimizer = SpectralSgd::new(&[shape], config).unwrap();
        let mut weights = vec![vec![0.0f32; shape.len()]];
        optimizer.step(&mut weights, &[&grads[..]]).unwrap();
        let update_norm = reference::spectral_norm(&to_f64(&weights[0]), 40, 24);
        let target = 0.1 * f64::from(scale.factor(shape));
        assert!(
            update_norm >= target * (1.0 - 1e-5),
            "{scale}: {update_norm} < {target}"
        );
        assert_close(
            &format!("{scale} update norm"),
            update_norm,
            target,
            1e-3 * target,
        );
    }
}

#[test]
fn zero_gradient_leaves_weights_unchanged() {
    let shapes = mixed_shapes(false);
    let config = SpectralSgdConfig {
        weight_decay: 0.5,
        ..SpectralSgdConfig::default()
    };
    let mut optimizer = SpectralSgd::new(&shapes, config).unwrap();
    let mut weights: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 1.0, j as u64))
        .collect();
    let before = weights.clone();
    let zeros: Vec<Vec<f32>> = shapes.iter().map(|s| vec![0.0; s.len()]).collect();
    let report = optimizer.step(&mut weights, &zeros).unwrap();
    assert_eq!(weights, before);
    for line in &report.matrices {
        assert_eq!(line.status, MatrixStatus::ZeroDirection);
        assert_eq!(line.sigma, Some(0.0));
    }
    // Negative zeros are zeros too.
    let negative_zeros: Vec<Vec<f32>> = shapes.iter().map(|s| vec![-0.0; s.len()]).collect();
    optimizer.step(&mut weights, &negative_zeros).unwrap();
    assert_eq!(weights, before);
}

fn non_finite_skips_only_that_matrix<T: Element>(poison: f32) {
    let shapes = mixed_shapes(false);
    let config = SpectralSgdConfig {
        weight_decay: 0.1,
        ..SpectralSgdConfig::default()
    };
    let mut optimizer = SpectralSgd::new(&shapes, config).unwrap();
    let mut weights: Vec<Vec<T>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 1.0, j as u64))
        .collect();
    let grads = |step: u64| -> Vec<Vec<T>> {
        shapes
            .iter()
            .enumerate()
            .map(|(j, &s)| random_matrix(s, 1.0, 50 + 10 * step + j as u64))
            .collect()
    };
    optimizer.step(&mut weights, &grads(1)).unwrap();

    for poisoned in [4, 8] {
        let mut bad = grads(2 + poisoned as u64);
        let position = bad[poisoned].len() / 2;
        bad[poisoned][position] = T::from_f32_rne(poison);
        let weights_before = weights.clone();
        let momentum_before = optimizer.momentum(poisoned).to_vec();
        let vector_before = optimizer.power_vector(poisoned).to_vec();
        let report = optimizer.step(&mut weights, &bad).unwrap();

        assert_eq!(report.skipped().collect::<Vec<_>>(), vec![poisoned]);
        assert_eq!(report.matrices[poisoned].sigma, None);
        assert_eq!(bits(&weights[poisoned]), bits(&weights_before[poisoned]));
        assert_eq!(bits(optimizer.momentum(poisoned)), bits(&momentum_before));
        assert_eq!(bits(optimizer.power_vector(poisoned)), bits(&vector_before));
        for (j, line) in report.matrices.iter().enumerate() {
            if j != poisoned {
                assert_eq!(line.status, MatrixStatus::Updated, "matrix {j}");
                assert_ne!(
                    weights[j], weights_before[j],
                    "matrix {j} should have moved"
                );
            }
        }
    }
}

#[test]
fn nan_skips_only_that_matrix() {
    non_finite_skips_only_that_matrix::<f32>(f32::NAN);
    non_finite_skips_only_that_matrix::<bf16>(f32::NAN);
    non_finite_skips_only_that_matrix::<f16>(f32::NAN);
}

#[test]
fn infinity_skips_only_that_matrix() {
    non_finite_skips_only_that_matrix::<f32>(f32::INFINITY);
    non_finite_skips_only_that_matrix::<f32>(f32::NEG_INFINITY);
    // 1e5 overflows f16 to infinity when the gradient is stored.
    non_finite_skips_only_that_matrix::<f16>(1e5);
}

#[test]
fn bad_inputs_are_errors_and_change_nothing() {
    let shapes = [MatrixShape::new(3, 4), MatrixShape::new(5, 2)];
    let mut optimizer = SpectralSgd::new(&shapes, SpectralSgdConfig::default()).unwrap();
    let mut weights = vec![vec![1.0f32; 12], vec![1.0f32; 10]];
    let grads = vec![vec![1.0f32; 12], vec![1.0f32; 10]];

    let error = optimizer.step(&mut weights[..1], &grads).unwrap_err();
    assert!(
        matches!(
            error,
            Error::MatrixCountMismatch {
                expected: 2,
                got: 1,
                ..
            }
        ),
        "{error}"
    );
    let error = optimizer.step(&mut weights, &grads[..1]).unwrap_err();
    assert!(
        matches!(
            error,
            Error::MatrixCountMismatch {
                expected: 2,
                got: 1,
                ..
            }
        ),
        "{error}"
    );
    let short = vec![vec![1.0f32; 12], vec![1.0f32; 9]];
    let error = optimizer.step(&mut weights, &short).unwrap_err();
    assert!(
        matches!(
            error,
            Error::LengthMismatch {
                index: 1,
                expected: 10,
                got: 9,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("gradient matrix 1"), "{error}");

    assert_eq!(weights, vec![vec![1.0f32; 12], vec![1.0f32; 10]]);
    assert_eq!(optimizer.steps(), 0);
    assert!(optimizer.momentum(0).iter().all(|&m| m == 0.0));
}

#[test]
fn bad_shapes_and_configs_are_errors() {
    let config = SpectralSgdConfig::default();
    assert!(matches!(
        SpectralSgd::new(&[], config),
        Err(Error::EmptyBatch)
    ));
    assert!(matches!(
        SpectralSgd::new(&[MatrixShape::new(3, 3), MatrixShape::new(0, 3)], config),
        Err(Error::ZeroDimension { index: 1, .. })
    ));
    assert!(matches!(
        SpectralSgd::new(&[MatrixShape::new(usize::MAX / 2, 3)], config),
        Err(Error::LayoutOverflow { index: 0, .. })
    ));
    let shapes = [MatrixShape::new(2, 2)];
    for bad in [
        SpectralSgdConfig {
            learning_rate: f32::NAN,
            ..config
        },
        SpectralSgdConfig {
            learning_rate: -1.0,
            ..config
        },
        SpectralSgdConfig {
            momentum: 1.0,
            ..config
        },
        SpectralSgdConfig {
            momentum: -0.1,
            ..config
        },
        SpectralSgdConfig {
            weight_decay: f32::INFINITY,
            ..config
        },
        SpectralSgdConfig {
            learning_rate: 1.0,
            weight_decay: 2.0,
            ..config
        },
        SpectralSgdConfig {
            warm_iterations: 0,
            ..config
        },
        SpectralSgdConfig {
            cold_iterations: 0,
            ..config
        },
        SpectralSgdConfig {
            scale: Scale::RmsMatch(0.0),
            ..config
        },
        SpectralSgdConfig {
            scale: Scale::RmsMatch(f32::NAN),
            ..config
        },
    ] {
        assert!(
            matches!(SpectralSgd::new(&shapes, bad), Err(Error::InvalidConfig(_))),
            "{bad:?} accepted"
        );
    }
    let mut optimizer = SpectralSgd::new(&shapes, config).unwrap();
    assert!(optimizer.set_learning_rate(-0.5).is_err());
    assert_eq!(optimizer.config().learning_rate, config.learning_rate);
    optimizer.set_learning_rate(0.5).unwrap();
    assert_eq!(optimizer.config().learning_rate, 0.5);
}

#[test]
fn reset_restarts_power_iteration_cold() {
    let shapes = [MatrixShape::new(9, 7)];
    let config = SpectralSgdConfig {
        seed: 3,
        ..SpectralSgdConfig::default()
    };
    let mut optimizer = SpectralSgd::new(&shapes, config).unwrap();
    let initial = optimizer.power_vector(0).to_vec();
    let mut weights = vec![vec![0.0f32; 63]];
    let grads = vec![random_matrix::<f32>(shapes[0], 1.0, 1)];
    optimizer.step(&mut weights, &grads).unwrap();
    assert!(optimizer.is_warm(0));
    assert_ne!(optimizer.power_vector(0), &initial[..]);
    optimizer.reset_power_vectors().unwrap();
    assert!(!optimizer.is_warm(0));
    assert_eq!(optimizer.power_vector(0), &initial[..]);
}

#[test]
fn step_accepts_vectors_and_borrowed_slices_alike() {
    let shapes = [MatrixShape::new(6, 4), MatrixShape::new(3, 6)];
    let grads: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 1.0, j as u64))
        .collect();
    let mut owned: Vec<Vec<f32>> = shapes.iter().map(|s| vec![0.5; s.len()]).collect();
    let mut storage = owned.clone();
    let mut borrowed: Vec<&mut [f32]> = storage.iter_mut().map(Vec::as_mut_slice).collect();
    let grad_views: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
    let mut a = SpectralSgd::new(&shapes, SpectralSgdConfig::default()).unwrap();
    let mut b = SpectralSgd::new(&shapes, SpectralSgdConfig::default()).unwrap();
    a.step(&mut owned, &grads).unwrap();
    b.step(&mut borrowed, &grad_views).unwrap();
    drop(borrowed);
    assert_eq!(owned, storage);
    assert_ne!(owned[0], vec![0.5; 24]);
}

/// Step 1 trains the power vector on a rank-one gradient `a x^T` (so `v = x`); steps 2 to 4
/// (no momentum) bring `b y^T`. Returns their statuses, their `||ΔW||_*`, and the target
/// `eta * s`.
fn later_updates(y: &[f64]) -> ([MatrixStatus; 3], [f64; 3], f64) {
    let shape = MatrixShape::new(24, 16);
    let config = SpectralSgdConfig {
        momentum: 0.0,
        learning_rate: 0.1,
        ..SpectralSgdConfig::default()
    };
    let outer = |left: &[f64], right: &[f64]| -> Vec<f32> {
        left.iter()
            .flat_map(|l| right.iter().map(move |r| (l * r) as f32))
            .collect()
    };
    let mut x = vec![0.0; 16];
    x[0] = 1.0;
    let (a, b) = (reference::gaussian(24, 1), reference::gaussian(24, 2));
    let mut optimizer = SpectralSgd::new(&[shape], config).unwrap();
    let mut weights = vec![vec![0.0f32; shape.len()]];
    optimizer.step(&mut weights, &[outer(&a, &x)]).unwrap();
    assert_eq!(
        optimizer.power_vector(0)[0].abs(),
        1.0,
        "v should have converged to x"
    );
    let mut statuses = [MatrixStatus::Updated; 3];
    let mut norms = [0.0; 3];
    for k in 0..3 {
        let before = to_f64(&weights[0]);
        let report = optimizer.step(&mut weights, &[outer(&b, y)]).unwrap();
        statuses[k] = report.matrices[0].status;
        let update: Vec<f64> = to_f64(&weights[0])
            .iter()
            .zip(&before)
            .map(|(w, p)| w - p)
            .collect();
        norms[k] = reference::spectral_norm(&update, 24, 16);
    }
    (
        statuses,
        norms,
        0.1 * f64::from(Scale::Spectral.factor(shape)),
    )
}

#[test]
fn a_warm_vector_orthogonal_to_the_new_update_is_reseeded() {
    // y ⊥ x exactly: U v = 0, so w = 0. As on the device, the vector is re-seeded with a
    // dense ±1/sqrt(n) vector and the step leaves W alone. The next step runs the warm rounds
    // only (the device's host cannot know about the re-seed without waiting for the device):
    // one iteration from v, with |<y, v>| = 1/4, estimates sigma * sqrt(1/4), so that update
    // is twice its target (within the Frobenius floor's bound of sqrt(min(m, n)) = 4 times)
    // and leaves v = y; from then on the estimate is exact (U is rank one).
    let mut y = vec![0.0; 16];
    y[1] = 1.0;
    let (statuses, norms, target) = later_updates(&y);
    assert_eq!(
        statuses,
        [
            MatrixStatus::Reseeded,
            MatrixStatus::Updated,
            MatrixStatus::Updated
        ]
    );
    assert_eq!(norms[0], 0.0, "no update while re-seeding");
    assert_close(
        "first update after re-seeding",
        norms[1],
        2.0 * target,
        2e-4 * target,
    );
    assert_close(
        "second update after re-seeding",
        norms[2],
        target,
        1e-4 * target,
    );
}

#[test]
fn a_nearly_orthogonal_warm_vector_cannot_blow_up_the_update() {
    // y almost ⊥ x: one warm iteration sees ||U^T U v|| ~ 1e-12 sigma^2, so the power estimate
    // alone would make the update 1e6 times its target. The Frobenius floor bounds it by
    // sqrt(min(m, n)) = 4 (U is rank one, so ||U||_F = ||U||_*).
    let mut y = vec![0.0; 16];
    y[1] = 1.0;
    y[0] = 1e-6;
    let (statuses, norms, target) = later_updates(&y);
    assert_eq!(statuses[0], MatrixStatus::Updated);
    let update_norm = norms[0];
    assert!(
        update_norm >= target * (1.0 - 1e-4),
        "{update_norm} < {target}"
    );
    assert!(
        update_norm <= 4.0 * target * (1.0 + 1e-3),
        "{update_norm} > 4 x {target}"
    );
}
