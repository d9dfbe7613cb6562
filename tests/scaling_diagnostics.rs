//! math §2, 3 and 6: target factors, spectral initialisation, parametrisation helpers and
//! diagnostics, checked against the exact SVD.

mod common;

use common::*;
use spectral_step::diagnostics::{self, LayerDiagnostics};
use spectral_step::half::bf16;
use spectral_step::scaling::{self, spectral_init};
use spectral_step::{Error, MatrixShape, Scale};
use spectral_step_reference as reference;

#[test]
fn scale_factors_follow_the_table() {
    for (fan_out, fan_in) in [
        (1, 1),
        (3072, 768),
        (768, 3072),
        (10, 784),
        (784, 10),
        (5, 1),
    ] {
        let shape = MatrixShape::new(fan_out, fan_in);
        let (m, n) = (fan_out as f64, fan_in as f64);
        assert_close(
            "spectral",
            f64::from(Scale::Spectral.factor(shape)),
            (m / n).sqrt(),
            1e-6 * (m / n).sqrt(),
        );
        let muon = if m > n { (m / n).sqrt() } else { 1.0 };
        assert_close(
            "muon_max1",
            f64::from(Scale::MuonMax1.factor(shape)),
            muon,
            1e-6 * muon,
        );
        let rms = 0.2 * m.max(n).sqrt();
        assert_close(
            "rms_match",
            f64::from(Scale::RmsMatch(0.2).factor(shape)),
            rms,
            1e-6 * rms,
        );
    }
    // A bias (fan_out x 1) has target sqrt(fan_out) (math §2).
    assert_eq!(Scale::Spectral.factor(MatrixShape::new(64, 1)), 8.0);
}

#[test]
fn scale_names_round_trip() {
    for scale in [
        Scale::Spectral,
        Scale::MuonMax1,
        Scale::RmsMatch(0.2),
        Scale::RmsMatch(1.0 / 3.0),
    ] {
        assert_eq!(scale.to_string().parse::<Scale>().unwrap(), scale);
    }
    for bad in [
        "",
        "Spectral",
        "rms_match:",
        "rms_match:-1",
        "rms_match:nan",
        "muon",
    ] {
        assert!(bad.parse::<Scale>().is_err(), "{bad:?} parsed");
    }
}

#[test]
fn spectral_init_hits_the_target_exactly() {
    for (fan_out, fan_in, sigma0) in [
        (40, 10, 1.0f32),
        (10, 40, 0.5),
        (33, 33, 2.0),
        (1, 20, 1.0),
        (20, 1, 1.0),
    ] {
        let shape = MatrixShape::new(fan_out, fan_in);
        let mut weights = vec![0.0f32; shape.len()];
        spectral_init(&mut weights, shape, sigma0, Scale::Spectral, 7).unwrap();
        let exact = reference::spectral_norm(&to_f64(&weights), fan_out, fan_in);
        let target = f64::from(sigma0) * (fan_out as f64 / fan_in as f64).sqrt();
        assert_close(
            &format!("{fan_out}x{fan_in} init"),
            exact,
            target,
            1e-4 * target,
        );
        // Not a degenerate matrix: a Gaussian draw has stable rank well above 1.
        if fan_out > 1 && fan_in > 1 {
            assert!(reference::stable_rank(&to_f64(&weights), fan_out, fan_in) > 2.0);
        }
    }
    let shape = MatrixShape::new(48, 24);
    let mut weights = vec![bf16::ZERO; shape.len()];
    spectral_init(&mut weights, shape, 1.0, Scale::MuonMax1, 3).unwrap();
    let exact = reference::spectral_norm(&to_f64(&weights), 48, 24);
    assert_close("bf16 init", exact, 2f64.sqrt(), 1e-2);
    // Seeded: the same seed gives the same matrix, another seed another one.
    let mut again = vec![bf16::ZERO; shape.len()];
    spectral_init(&mut again, shape, 1.0, Scale::MuonMax1, 3).unwrap();
    assert_eq!(weights, again);
    spectral_init(&mut again, shape, 1.0, Scale::MuonMax1, 4).unwrap();
    assert_ne!(weights, again);
}

#[test]
fn spectral_init_rejects_bad_arguments() {
    let shape = MatrixShape::new(4, 4);
    let mut short = vec![0.0f32; 15];
    assert!(matches!(
        spectral_init(&mut short, shape, 1.0, Scale::Spectral, 0),
        Err(Error::LengthMismatch { .. })
    ));
    let mut weights = vec![0.0f32; 16];
    assert!(matches!(
        spectral_init(&mut weights, shape, f32::NAN, Scale::Spectral, 0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        spectral_init(&mut weights, shape, 1.0, Scale::RmsMatch(-1.0), 0),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        spectral_init(
            &mut weights,
            MatrixShape::new(0, 4),
            1.0,
            Scale::Spectral,
            0
        ),
        Err(Error::ZeroDimension { .. })
    ));
}

#[test]
fn parametrisation_helpers_follow_spec_3b() {
    let square = MatrixShape::new(256, 256);
    assert_close(
        "square init",
        f64::from(scaling::init_std(square, 1.0)),
        1.0 / 16.0,
        1e-9,
    );
    // Wide-to-narrow (fan_out < fan_in): the min(1, sqrt(fan_out/fan_in)) factor applies.
    let output = MatrixShape::new(10, 1000);
    assert_close(
        "output init",
        f64::from(scaling::init_std(output, 2.0)),
        2.0 / 1000f64.sqrt() * 0.1,
        1e-9,
    );
    let input = MatrixShape::new(1000, 10);
    assert_close(
        "input init",
        f64::from(scaling::init_std(input, 1.0)),
        1.0 / 10f64.sqrt(),
        1e-7,
    );
    assert_eq!(scaling::sgd_learning_rate_multiplier(input), 100.0);
    assert_eq!(scaling::sgd_learning_rate_multiplier(output), 0.01);
    assert_eq!(scaling::adam_learning_rate_multiplier(output), 0.001);

    // The point of math §3b: a Gaussian init with this std has ||W||_* = Θ(sqrt(fan_out/fan_in)).
    for (fan_out, fan_in) in [(64, 16), (16, 64), (128, 128)] {
        let shape = MatrixShape::new(fan_out, fan_in);
        let std = f64::from(scaling::init_std(shape, 1.0));
        let weights: Vec<f64> = reference::gaussian(shape.len(), 1)
            .iter()
            .map(|x| x * std)
            .collect();
        let ratio = reference::spectral_norm(&weights, fan_out, fan_in)
            / f64::from(Scale::Spectral.factor(shape));
        assert!(
            (0.5..4.0).contains(&ratio),
            "{fan_out}x{fan_in}: ratio {ratio}"
        );
    }
}

#[test]
fn diagnostics_match_the_exact_svd() {
    let shape = MatrixShape::new(50, 30);
    let matrix: Vec<f32> = random_matrix(shape, 1.0, 12);
    let exact = reference::singular_values(&to_f64(&matrix), 50, 30);
    let sigma = diagnostics::spectral_norm(&matrix, shape).unwrap();
    assert_close("spectral norm", f64::from(sigma), exact[0], 1e-4 * exact[0]);
    let stable = exact.iter().map(|s| s * s).sum::<f64>() / (exact[0] * exact[0]);
    assert_close(
        "stable rank",
        f64::from(diagnostics::stable_rank(&matrix, shape).unwrap()),
        stable,
        1e-3 * stable,
    );
    let ratio = diagnostics::ratio_to_target(&matrix, shape, Scale::Spectral).unwrap();
    assert_close(
        "ratio",
        f64::from(ratio),
        exact[0] / (50f64 / 30.0).sqrt(),
        1e-4 * exact[0],
    );

    // A rank-one update has stable rank 1; a known spectrum gives a known stable rank.
    let spectrum = [3.0, 3.0, 1.0];
    let known: Vec<f32> = reference::matrix_with_spectrum(20, 10, &spectrum, 4)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let expected = (9.0 + 9.0 + 1.0) / 9.0;
    assert_close(
        "known stable rank",
        f64::from(diagnostics::stable_rank(&known, MatrixShape::new(20, 10)).unwrap()),
        expected,
        1e-3,
    );

    assert_eq!(
        diagnostics::spectral_norm(&[0.0f32; 12], MatrixShape::new(3, 4)).unwrap(),
        0.0
    );
    assert_eq!(
        diagnostics::stable_rank(&[0.0f32; 12], MatrixShape::new(3, 4)).unwrap(),
        0.0
    );
    let mut bad = vec![1.0f32; 12];
    bad[5] = f32::NAN;
    assert!(matches!(
        diagnostics::spectral_norm(&bad, MatrixShape::new(3, 4)),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        diagnostics::spectral_norm(&bad[..11], MatrixShape::new(3, 4)),
        Err(Error::LengthMismatch { .. })
    ));
}

#[test]
fn layer_diagnostics_report_spec_6_quantities() {
    let shape = MatrixShape::new(30, 20);
    let before: Vec<f32> = random_matrix(shape, 0.1, 1);
    let u = reference::gaussian(30, 2);
    let v = reference::gaussian(20, 3);
    let after: Vec<f32> = (0..shape.len())
        .map(|k| before[k] + 0.01 * (u[k / 20] * v[k % 20]) as f32)
        .collect();
    let report = LayerDiagnostics::measure(&before, &after, shape, Scale::Spectral).unwrap();
    let s = (30f64 / 20.0).sqrt();
    let update_norm = 0.01 * reference::norm(&u) * reference::norm(&v);
    assert_close(
        "update ratio",
        f64::from(report.update_ratio),
        update_norm / s,
        1e-3 * update_norm / s,
    );
    assert_close(
        "update stable rank",
        f64::from(report.update_stable_rank),
        1.0,
        1e-3,
    );
    let weight_norm = reference::spectral_norm(&to_f64(&after), 30, 20);
    assert_close(
        "weight ratio",
        f64::from(report.weight_ratio),
        weight_norm / s,
        1e-4 * weight_norm / s,
    );
    assert!(LayerDiagnostics::measure(&before, &after[..599], shape, Scale::Spectral).is_err());
}
