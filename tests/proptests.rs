//! Property tests over shapes, values and settings: the step agrees with the oracle, and the
//! normalised update is never smaller than its target (sigma_est <= ||U||_*).

mod common;

use common::*;
use proptest::prelude::*;
use spectral_step::{
    MatrixShape, MatrixStatus, MomentumKind, Rounding, Scale, SpectralSgd, SpectralSgdConfig,
    UpdateRule,
};
use spectral_step_reference as reference;

fn config_strategy() -> impl Strategy<Value = SpectralSgdConfig> {
    (
        0.0f32..0.99,
        any::<bool>(),
        any::<bool>(),
        0.0f32..0.5,
        0usize..3,
        1u32..4,
        1u32..10,
        any::<u64>(),
    )
        .prop_map(
            |(momentum, ema, nesterov, weight_decay, scale, warm, cold, seed)| SpectralSgdConfig {
                learning_rate: 0.1,
                momentum,
                momentum_kind: if ema {
                    MomentumKind::Ema
                } else {
                    MomentumKind::HeavyBall
                },
                nesterov,
                weight_decay,
                scale: [Scale::Spectral, Scale::MuonMax1, Scale::RmsMatch(0.2)][scale],
                warm_iterations: warm,
                cold_iterations: cold,
                seed,
                // The weights here are f32, which neither rounding touches.
                rounding: Rounding::default(),
                // The oracle these properties compare with is the power-normalised rule's.
                update: UpdateRule::PowerNormalised,
            },
        )
}

fn matrix_strategy() -> impl Strategy<Value = (MatrixShape, Vec<f32>)> {
    (1usize..24, 1usize..24).prop_flat_map(|(fan_out, fan_in)| {
        (
            Just(MatrixShape::new(fan_out, fan_in)),
            prop::collection::vec(-1e3f32..1e3, fan_out * fan_in),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn one_step_matches_the_oracle(config in config_strategy(), (shape, grads) in matrix_strategy(), weight_scale in 0.0f64..2.0) {
        let mut optimizer = SpectralSgd::new(&[shape], config).unwrap();
        let mut weights = vec![random_matrix::<f32>(shape, weight_scale, 1)];
        let mut ref_weights = to_f64(&weights[0]);
        let mut ref_momentum = vec![0.0; shape.len()];
        let mut ref_vector: Vec<f64> = optimizer.power_vector(0).iter().map(|&v| f64::from(v)).collect();
        let report = optimizer.step(&mut weights, &[&grads[..]]).unwrap();
        let outcome = reference::step(
            &mut ref_weights, &mut ref_momentum, &mut ref_vector, &to_f64(&grads),
            shape.fan_out, shape.fan_in, &reference_params(&config, shape, config.cold_iterations),
        );
        match outcome {
            reference::Outcome::Updated(sigma) => {
                prop_assert_eq!(report.matrices[0].status, MatrixStatus::Updated);
                let got = f64::from(report.matrices[0].sigma.unwrap());
                prop_assert!((got - sigma).abs() <= 1e-4 * sigma, "sigma {} vs {}", got, sigma);
                let got_weights = to_f64(&weights[0]);
                let scale = ref_weights.iter().map(|w| w.abs()).fold(0.0, f64::max) + 0.1;
                for (got, want) in got_weights.iter().zip(&ref_weights) {
                    prop_assert!((got - want).abs() <= 1e-5 * scale, "weight {} vs {}", got, want);
                }
            }
            reference::Outcome::Zero => {
                prop_assert_eq!(report.matrices[0].status, MatrixStatus::ZeroDirection);
            }
            reference::Outcome::NonFinite => prop_assert!(false, "finite input flagged non-finite"),
        }
    }

    #[test]
    fn update_is_at_least_the_target(config in config_strategy(), (shape, grads) in matrix_strategy()) {
        prop_assume!(grads.iter().any(|&g| g != 0.0));
        let config = SpectralSgdConfig { weight_decay: 0.0, ..config };
        let mut optimizer = SpectralSgd::new(&[shape], config).unwrap();
        let mut weights = vec![vec![0.0f32; shape.len()]];
        optimizer.step(&mut weights, &[&grads[..]]).unwrap();
        // ΔW = -(eta s / sigma_est) U with sigma_est <= ||U||_*, so ||ΔW||_* >= eta s.
        let update_norm = reference::spectral_norm(&to_f64(&weights[0]), shape.fan_out, shape.fan_in);
        let target = f64::from(config.learning_rate) * f64::from(config.scale.factor(shape));
        prop_assert!(update_norm >= target * (1.0 - 1e-4), "update {} below target {}", update_norm, target);
        if shape.is_vector() {
            prop_assert!((update_norm - target).abs() <= 1e-5 * target, "vector update {} vs {}", update_norm, target);
        }
    }
}
