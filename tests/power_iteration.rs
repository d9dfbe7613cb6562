//! Batched power iteration (math §4) against exact singular values from the Jacobi SVD.

mod common;

use common::*;
use spectral_step::cpu::{BatchPowerIteration, Estimate, KernelPath, MAX_LANCZOS_BLOCK};
use spectral_step::half::{bf16, f16};
use spectral_step::{BatchLayout, BlockPolicy, Element, Error, MatrixShape};
use spectral_step_reference as reference;

fn power_for(shapes: &[MatrixShape]) -> BatchPowerIteration {
    BatchPowerIteration::new(BatchLayout::new(shapes, BlockPolicy::CPU).unwrap()).unwrap()
}

fn f32s(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&x| x as f32).collect()
}

#[test]
fn converges_to_a_known_spectrum_from_cold_start() {
    let shapes = [
        MatrixShape::new(17, 9),
        MatrixShape::new(9, 17),
        MatrixShape::new(64, 64),
        MatrixShape::new(31, 7),
    ];
    let spectrum = [5.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05];
    let matrices: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, s)| {
            f32s(&reference::matrix_with_spectrum(
                s.fan_out, s.fan_in, &spectrum, j as u64,
            ))
        })
        .collect();
    // The oracle itself reproduces the spectrum it was built with.
    for (matrix, shape) in matrices.iter().zip(&shapes) {
        let exact = reference::singular_values(&to_f64(matrix), shape.fan_out, shape.fan_in);
        assert_close("oracle top singular value", exact[0], 5.0, 1e-5);
        assert_close("oracle second singular value", exact[1], 2.0, 1e-5);
    }
    let views: Vec<&[f32]> = matrices.iter().map(Vec::as_slice).collect();
    let mut power = power_for(&shapes);
    let mut vectors = power.cold_vectors(1).unwrap();
    let mut previous = vec![0.0f32; shapes.len()];
    for iteration in 0..30 {
        let estimates = power.fused(&views, &mut vectors).unwrap();
        for (j, estimate) in estimates.iter().enumerate() {
            let sigma = estimate.sigma();
            // Never above the true norm, and non-decreasing (Rayleigh quotients of U^T U).
            assert!(
                sigma <= 5.0 * (1.0 + 1e-5),
                "matrix {j} iteration {iteration}: {sigma} > 5"
            );
            assert!(
                sigma >= previous[j] * (1.0 - 1e-5),
                "matrix {j} iteration {iteration}: decreased"
            );
            previous[j] = sigma;
        }
    }
    for (j, &sigma) in previous.iter().enumerate() {
        assert_close(
            &format!("matrix {j} converged sigma"),
            f64::from(sigma),
            5.0,
            5e-5 * 5.0,
        );
    }
}

#[test]
fn gaussian_matrices_converge_to_exact_norm() {
    let shapes = [
        MatrixShape::new(50, 30),
        MatrixShape::new(30, 50),
        MatrixShape::new(41, 41),
    ];
    let matrices: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 1.0, 40 + j as u64))
        .collect();
    let views: Vec<&[f32]> = matrices.iter().map(Vec::as_slice).collect();
    let mut power = power_for(&shapes);
    let mut vectors = power.cold_vectors(2).unwrap();
    let mut estimates = Vec::new();
    for _ in 0..2000 {
        estimates = power.fused(&views, &mut vectors).unwrap();
    }
    for (j, shape) in shapes.iter().enumerate() {
        let exact = reference::spectral_norm(&to_f64(&matrices[j]), shape.fan_out, shape.fan_in);
        assert_close(
            &format!("gaussian matrix {j}"),
            f64::from(estimates[j].sigma()),
            exact,
            1e-4 * exact,
        );
    }
}

#[test]
fn one_iteration_matches_the_oracle() {
    let shapes = [
        MatrixShape::new(33, 20),
        MatrixShape::new(5, 300),
        MatrixShape::new(1031, 300),
    ];
    let matrices: Vec<Vec<bf16>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 1.0, 60 + j as u64))
        .collect();
    let views: Vec<&[bf16]> = matrices.iter().map(Vec::as_slice).collect();
    for path in kernel_paths() {
        let mut power = power_for(&shapes);
        power.set_kernel_path(path).unwrap();
        let mut vectors = power.cold_vectors(3).unwrap();
        let before = vectors.clone();
        let estimates = power.fused(&views, &mut vectors).unwrap();
        check_one_iteration(
            &format!("{path:?}"),
            power.layout(),
            &matrices,
            &before,
            &vectors,
            &estimates,
        );
    }
}

fn check_one_iteration(
    context: &str,
    layout: &BatchLayout,
    matrices: &[Vec<bf16>],
    before: &[f32],
    vectors: &[f32],
    estimates: &[Estimate],
) {
    for (j, entry) in layout.matrices().iter().enumerate() {
        let mut v = to_f64(&before[entry.vector_range()]);
        let power = reference::power_iteration_step(
            &to_f64(&matrices[j]),
            entry.shape.fan_out,
            entry.shape.fan_in,
            &mut v,
        );
        let u = to_f64(&matrices[j]);
        let sigma = power.max(reference::frobenius_floor(
            &u,
            entry.shape.fan_out,
            entry.shape.fan_in,
        ));
        assert_close(
            &format!("{context} matrix {j} sigma"),
            f64::from(estimates[j].sigma()),
            sigma,
            1e-5 * sigma,
        );
        for (k, (&got, &want)) in vectors[entry.vector_range()].iter().zip(&v).enumerate() {
            assert_close(
                &format!("{context} matrix {j} v[{k}]"),
                f64::from(got),
                want,
                1e-5,
            );
        }
    }
}

#[test]
fn fused_and_two_pass_agree_bit_for_bit() {
    // Same row dots, same partial order: the two forms differ only in memory traffic.
    fused_and_two_pass_agree::<f32>();
    fused_and_two_pass_agree::<bf16>();
}

fn fused_and_two_pass_agree<T: Element>() {
    let shapes = [
        MatrixShape::new(700, 513),
        MatrixShape::new(3, 3),
        MatrixShape::new(1, 40),
    ];
    let matrices: Vec<Vec<T>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 1.0, 70 + j as u64))
        .collect();
    let views: Vec<&[T]> = matrices.iter().map(Vec::as_slice).collect();
    for path in kernel_paths() {
        let mut power = power_for(&shapes);
        power.set_kernel_path(path).unwrap();
        let mut fused_vectors = power.cold_vectors(4).unwrap();
        let mut two_pass_vectors = fused_vectors.clone();
        for _ in 0..3 {
            let fused = power.fused(&views, &mut fused_vectors).unwrap();
            let two_pass = power.two_pass(&views, &mut two_pass_vectors).unwrap();
            assert_eq!(fused, two_pass, "{path:?} {:?}", T::DTYPE);
            assert_eq!(
                bits(&fused_vectors),
                bits(&two_pass_vectors),
                "{path:?} {:?}",
                T::DTYPE
            );
        }
    }
}

/// The AVX-512 path gives the AVX2 path's bits in the fused and two-matvec passes and in
/// Lanczos, for every stored type, on rows whose length leaves every tail from 0 to 31
/// elements past the 32 lanes (and 0 to 15 past the sixteen of a 512-bit vector), and on
/// blocks whose rows do not fill the last tile or the last group of eight.
#[test]
fn avx512_power_passes_give_the_avx2_paths_bits() {
    if !KernelPath::Avx512.is_supported() {
        eprintln!("NOT RUN: the AVX-512 path (this CPU lacks AVX-512F)");
        return;
    }
    avx512_matches_avx2::<f32>();
    avx512_matches_avx2::<bf16>();
    avx512_matches_avx2::<f16>();
}

fn avx512_matches_avx2<T: Element>() {
    let mut shapes: Vec<MatrixShape> = (0..32)
        .map(|tail| MatrixShape::new(3 + tail % 11, 64 + tail))
        .collect();
    shapes.extend(
        [(1, 1), (13, 1), (1, 15), (75, 768), (131, 517), (9, 3072)].map(MatrixShape::from),
    );
    let matrices: Vec<Vec<T>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 1.0, 200 + j as u64))
        .collect();
    let views: Vec<&[T]> = matrices.iter().map(Vec::as_slice).collect();
    let run = |path| {
        let mut power = power_for(&shapes);
        power.set_kernel_path(path).unwrap();
        let mut fused_vectors = power.cold_vectors(6).unwrap();
        let mut two_pass_vectors = fused_vectors.clone();
        let mut estimates = Vec::new();
        for _ in 0..3 {
            estimates.push(power.fused(&views, &mut fused_vectors).unwrap());
            estimates.push(power.two_pass(&views, &mut two_pass_vectors).unwrap());
        }
        let lanczos = [1, 4].map(|block| power.lanczos(&views, 7, 1e-4, 30, block).unwrap());
        (
            estimates,
            bits(&fused_vectors),
            bits(&two_pass_vectors),
            lanczos,
        )
    };
    let (avx2, avx512) = (run(KernelPath::Avx2Fma), run(KernelPath::Avx512));
    assert_eq!(avx2.0, avx512.0, "estimates, {:?}", T::DTYPE);
    assert_eq!(avx2.1, avx512.1, "fused vectors, {:?}", T::DTYPE);
    assert_eq!(avx2.2, avx512.2, "two-matvec vectors, {:?}", T::DTYPE);
    assert_eq!(avx2.3, avx512.3, "Lanczos, {:?}", T::DTYPE);
}

#[test]
fn warm_start_tracks_a_slowly_changing_matrix() {
    let shape = MatrixShape::new(48, 32);
    let spectrum: Vec<f64> = (0..32).map(|k| 4.0 * 0.8f64.powi(k)).collect();
    let base = reference::matrix_with_spectrum(48, 32, &spectrum, 9);
    let drift = reference::gaussian(shape.len(), 10);
    let mut power = power_for(&[shape]);
    let mut vector = power.cold_vectors(5).unwrap();
    for step in 0..60 {
        let matrix: Vec<f64> = base
            .iter()
            .zip(&drift)
            .map(|(a, d)| a + 0.002 * f64::from(step) * d)
            .collect();
        let data = f32s(&matrix);
        let iterations = if step == 0 { 8 } else { 1 };
        let mut estimate = Estimate::Zero;
        for _ in 0..iterations {
            estimate = power.fused(&[&data[..]], &mut vector).unwrap()[0];
        }
        let exact = reference::spectral_norm(&matrix, 48, 32);
        assert!(
            f64::from(estimate.sigma()) <= exact * (1.0 + 1e-5),
            "step {step}: estimate above the norm"
        );
        assert_close(
            &format!("step {step}"),
            f64::from(estimate.sigma()),
            exact,
            2e-3 * exact,
        );
    }
}

#[test]
fn vectors_are_exact_in_one_iteration() {
    let shapes = [
        MatrixShape::new(1, 1),
        MatrixShape::new(1, 37),
        MatrixShape::new(37, 1),
        MatrixShape::new(1, 1000),
    ];
    let matrices: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 3.0, 80 + j as u64))
        .collect();
    let views: Vec<&[f32]> = matrices.iter().map(Vec::as_slice).collect();
    let mut power = power_for(&shapes);
    let mut vectors = power.cold_vectors(6).unwrap();
    let estimates = power.fused(&views, &mut vectors).unwrap();
    for (j, matrix) in matrices.iter().enumerate() {
        let exact = reference::norm(&to_f64(matrix));
        assert_close(
            &format!("vector {j}"),
            f64::from(estimates[j].sigma()),
            exact,
            1e-6 * exact,
        );
    }
}

#[test]
fn zero_and_non_finite_matrices() {
    let shapes = [
        MatrixShape::new(4, 6),
        MatrixShape::new(4, 6),
        MatrixShape::new(4, 6),
        MatrixShape::new(4, 6),
    ];
    let zero = [0.0f32; 24];
    let mut with_nan = random_matrix::<f32>(shapes[0], 1.0, 90);
    with_nan[7] = f32::NAN;
    let mut with_inf = random_matrix::<f32>(shapes[0], 1.0, 91);
    with_inf[23] = f32::NEG_INFINITY;
    let huge = [1e30f32; 24];
    let mut power = power_for(&shapes);
    let mut vectors = power.cold_vectors(7).unwrap();
    let before = vectors.clone();
    let estimates = power
        .fused(
            &[&zero[..], &with_nan[..], &with_inf[..], &huge[..]],
            &mut vectors,
        )
        .unwrap();
    assert_eq!(
        estimates,
        vec![
            Estimate::Zero,
            Estimate::NonFinite,
            Estimate::NonFinite,
            Estimate::NonFinite
        ]
    );
    assert_eq!(
        bits(&vectors),
        bits(&before),
        "power vectors must be untouched"
    );
}

#[test]
fn wrong_lengths_are_errors() {
    let shapes = [MatrixShape::new(4, 6)];
    let mut power = power_for(&shapes);
    let mut vectors = power.cold_vectors(0).unwrap();
    let short = [1.0f32; 23];
    assert!(matches!(
        power.fused(&[&short[..]], &mut vectors),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        power.fused::<f32>(&[], &mut vectors),
        Err(Error::MatrixCountMismatch { .. })
    ));
    let matrix = [1.0f32; 24];
    let mut wrong_vectors = vec![0.0f32; 5];
    assert!(matches!(
        power.fused(&[&matrix[..]], &mut wrong_vectors),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        power.two_pass(&[&matrix[..]], &mut wrong_vectors),
        Err(Error::InvalidArgument(_))
    ));
}

/// Lanczos (the cold-start method) against the exact SVD: Gaussian matrices (crowded top
/// singular values), known spectra with a 1% gap, low-rank gradient-like matrices, vectors,
/// in one batch; every estimate within the asked tolerance and never above the true norm
/// (beyond f32 rounding), in far fewer passes than power iteration would need.
#[test]
fn lanczos_meets_its_tolerance_against_the_exact_svd() {
    let mut shapes = vec![
        MatrixShape::new(300, 200),
        MatrixShape::new(160, 240),
        MatrixShape::new(120, 90),
    ];
    let mut matrices: Vec<Vec<f64>> = vec![
        reference::gaussian(300 * 200, 1),
        reference::gaussian(160 * 240, 2),
        reference::matrix_with_spectrum(
            120,
            90,
            &(0..90)
                .map(|i| if i == 0 { 10.0 } else { 9.9 - 0.05 * i as f64 })
                .collect::<Vec<_>>(),
            3,
        ),
    ];
    // Low stable rank: a sum of three outer products plus a little noise (a gradient's shape).
    let (rows, cols) = (256, 128);
    let mut low_rank = vec![0.0; rows * cols];
    for k in 0..3u64 {
        let (a, b) = (
            reference::gaussian(rows, 10 + k),
            reference::gaussian(cols, 20 + k),
        );
        for i in 0..rows {
            for j in 0..cols {
                low_rank[i * cols + j] += a[i] * b[j] / (k + 1) as f64;
            }
        }
    }
    low_rank
        .iter_mut()
        .zip(reference::gaussian(rows * cols, 30))
        .for_each(|(x, n)| *x += 0.01 * n);
    shapes.push(MatrixShape::new(rows, cols));
    matrices.push(low_rank);
    shapes.push(MatrixShape::new(1, 50));
    matrices.push(reference::gaussian(50, 40));
    shapes.push(MatrixShape::new(70, 1));
    matrices.push(reference::gaussian(70, 41));
    // Fewer columns than a block has vectors: the start block spans the whole space.
    shapes.push(MatrixShape::new(40, 2));
    matrices.push(reference::gaussian(80, 42));
    shapes.push(MatrixShape::new(30, 3));
    matrices.push(reference::gaussian(90, 43));

    let data: Vec<Vec<f32>> = matrices
        .iter()
        .map(|m| m.iter().map(|&x| x as f32).collect())
        .collect();
    let views: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
    let mut power =
        BatchPowerIteration::new(BatchLayout::new(&shapes, BlockPolicy::CPU).unwrap()).unwrap();
    for (tolerance, block_vectors) in [
        (1e-3, 1),
        (1e-5, 1),
        (1e-3, 2),
        (1e-3, 3),
        (1e-3, 4),
        (1e-5, 4),
    ] {
        let results = power
            .lanczos(&views, 5, tolerance, 300, block_vectors)
            .unwrap();
        for (j, (result, shape)) in results.iter().zip(&shapes).enumerate() {
            let exact = reference::spectral_norm(&to_f64(&data[j]), shape.fan_out, shape.fan_in);
            let Estimate::Sigma(sigma) = result.estimate else {
                panic!("matrix {j}: {result:?}")
            };
            let error = (f64::from(sigma) - exact) / exact;
            eprintln!(
                "tol {tolerance:e}, block of {block_vectors}, matrix {j} ({}x{}): {} passes, \
                 relative error {error:+.2e}",
                shape.fan_out, shape.fan_in, result.iterations
            );
            assert!(result.converged, "matrix {j}: {result:?}");
            assert!(
                error.abs() <= tolerance,
                "matrix {j}: relative error {error:e} > {tolerance:e}"
            );
            assert!(
                error <= 1e-6,
                "matrix {j}: above the true norm by {error:e}"
            );
            assert!(
                result.iterations <= 60,
                "matrix {j}: {} passes",
                result.iterations
            );
        }
    }
}

/// Top singular values in a cluster a few times the tolerance wide (2 to 10 values, 0.2% to
/// 1% wide, then a geometric tail): `diag(s)` is as hard as `U diag(s) V^T` from a random
/// start, and exact in `f32`. Returns the runs that did not converge or converged with an
/// error above the tolerance.
fn clustered_failures(block_vectors: usize) -> Vec<String> {
    let n = 1000;
    let mut failures = Vec::new();
    for (count, width) in [(5usize, 0.004f64), (3, 0.004), (10, 0.01), (2, 0.002)] {
        let s: Vec<f64> = (0..n)
            .map(|i| {
                if i < count {
                    1.0 - width * i as f64 / (count - 1) as f64
                } else {
                    0.9 * 0.995f64.powi((i - count) as i32)
                }
            })
            .collect();
        let mut matrix = vec![0.0f32; n * n];
        for (i, &value) in s.iter().enumerate() {
            matrix[i * n + i] = value as f32;
        }
        let mut power = power_for(&[MatrixShape::new(n, n)]);
        for seed in 1..=3 {
            let result = power
                .lanczos(&[&matrix[..]], seed, 1e-3, 300, block_vectors)
                .unwrap()[0];
            let error = (1.0 - f64::from(result.estimate.sigma())).abs();
            let run = format!(
                "block of {block_vectors}, cluster of {count}, width {width}, seed {seed}: \
                 {} passes, error {error:.2e}",
                result.iterations
            );
            eprintln!("{run}");
            if !result.converged || error > 1e-3 {
                failures.push(run);
            }
        }
    }
    failures
}

/// A block of four resolves clusters of top singular values (math §4.9.1): every run meets
/// its tolerance.
#[test]
fn block_lanczos_meets_its_tolerance_on_clustered_top_singular_values() {
    assert_eq!(clustered_failures(4), Vec::<String>::new());
}

/// A known limitation, kept visible: with one vector the Ritz value settles inside the cluster
/// while the Kato–Temple bound already claims convergence (the space has not found the
/// cluster's other values, so nothing bounds λ2 near θ; math §4.9.1): 7 or 8 passes, errors
/// above the tolerance. The test states the promise that one vector does not keep; run it with
/// `--ignored`.
#[test]
#[ignore = "known limitation of one-vector Lanczos on clustered top singular values (math §4.9.1)"]
fn one_vector_lanczos_meets_its_tolerance_on_clustered_top_singular_values() {
    assert_eq!(clustered_failures(1), Vec::<String>::new());
}

/// The Gaussian set: 60 `n x n` matrices (`reference::gaussian`, seeds 0 to 59) for each of
/// `n` = 128 and 256, whose top singular values sit close together at the spectrum's edge.
const GAUSSIAN_SIZES: [usize; 2] = [128, 256];
const GAUSSIAN_SEEDS: u64 = 60;

/// One matrix of the Gaussian set, in `f32`.
fn gaussian_matrix(n: usize, seed: u64) -> Vec<f32> {
    f32s(&reference::gaussian(n * n, seed))
}

/// `(σ1, σ2)` of every matrix of the Gaussian set by the oracle's exact SVD, per size in the
/// order of `GAUSSIAN_SIZES`; computed once for the tests that share the set.
fn gaussian_top_two() -> &'static [Vec<[f64; 2]>] {
    static TOP_TWO: std::sync::OnceLock<Vec<Vec<[f64; 2]>>> = std::sync::OnceLock::new();
    TOP_TWO.get_or_init(|| {
        GAUSSIAN_SIZES
            .iter()
            .map(|&n| {
                (0..GAUSSIAN_SEEDS)
                    .map(|seed| {
                        let exact =
                            reference::singular_values(&to_f64(&gaussian_matrix(n, seed)), n, n);
                        [exact[0], exact[1]]
                    })
                    .collect()
            })
            .collect()
    })
}

/// A run of the Gaussian set that missed the tolerance.
struct GaussianFailure {
    n: usize,
    seed: u64,
    /// `|σ - σ1| / σ1`, `|σ - σ2| / σ2` and `(σ1 - σ2) / σ1`.
    errors: [f64; 3],
}

/// Lanczos at `1e-3` on the Gaussian set, one batch per size, against the exact SVD: the runs
/// that did not converge or whose estimate is off `σ1` by more than the tolerance.
fn gaussian_failures(block_vectors: usize) -> Vec<GaussianFailure> {
    let tolerance = 1e-3;
    let mut failures = Vec::new();
    for (&n, top_two) in GAUSSIAN_SIZES.iter().zip(gaussian_top_two()) {
        let shapes = vec![MatrixShape::new(n, n); GAUSSIAN_SEEDS as usize];
        let data: Vec<Vec<f32>> = (0..GAUSSIAN_SEEDS)
            .map(|seed| gaussian_matrix(n, seed))
            .collect();
        let views: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
        let results = power_for(&shapes)
            .lanczos(&views, 1, tolerance, 300, block_vectors)
            .unwrap();
        for ((seed, result), &[first, second]) in (0..).zip(&results).zip(top_two) {
            let sigma = f64::from(result.estimate.sigma());
            let errors = [
                (sigma - first).abs() / first,
                (sigma - second).abs() / second,
                (first - second) / first,
            ];
            if !result.converged || errors[0] > tolerance {
                eprintln!(
                    "block of {block_vectors}, {n}x{n}, seed {seed}: {} passes, error {:.2e} \
                     against σ1, {:.2e} against σ2, gap {:.2e}",
                    result.iterations, errors[0], errors[1], errors[2]
                );
                failures.push(GaussianFailure { n, seed, errors });
            }
        }
    }
    failures
}

/// The default block of four meets the tolerance on every matrix of the Gaussian set.
#[test]
fn block_lanczos_meets_its_tolerance_on_gaussian_matrices() {
    let failures = gaussian_failures(4);
    assert!(failures.is_empty(), "{} runs missed", failures.len());
}

/// One vector on the Gaussian set (math §4.9.1) misses the tolerance in exactly three runs:
/// two whose start had little weight on the top singular vector, where the space found σ2
/// first and the estimate lies within the tolerance of σ2, and one whose top two values are
/// 3.5 tolerances apart. (The rule that took `θ2` itself for the ceiling on λ2, run on the
/// same set at commit b55a898, missed in 8.)
#[test]
fn one_vector_lanczos_on_gaussian_matrices_misses_only_its_known_cases() {
    let failures = gaussian_failures(1);
    let cases: Vec<(usize, u64)> = failures.iter().map(|f| (f.n, f.seed)).collect();
    assert_eq!(cases, [(128, 29), (256, 11), (256, 35)]);
    for failure in &failures[..2] {
        assert!(failure.errors[1] <= 1e-3, "not at σ2: {:?}", failure.errors);
    }
    assert!((0.0034..0.0036).contains(&failures[2].errors[2]));
}

#[test]
fn lanczos_reports_zero_and_non_finite_matrices() {
    let shapes = [MatrixShape::new(8, 6), MatrixShape::new(5, 5)];
    let zero = [0.0f32; 48];
    let mut nan: Vec<f32> = reference::gaussian(25, 1)
        .iter()
        .map(|&x| x as f32)
        .collect();
    nan[7] = f32::NAN;
    let mut power =
        BatchPowerIteration::new(BatchLayout::new(&shapes, BlockPolicy::CPU).unwrap()).unwrap();
    for block_vectors in 1..=MAX_LANCZOS_BLOCK {
        let results = power
            .lanczos(&[&zero[..], &nan[..]], 1, 1e-3, 20, block_vectors)
            .unwrap();
        assert_eq!(results[0].estimate, Estimate::Zero);
        assert_eq!(results[1].estimate, Estimate::NonFinite);
        assert!(
            power
                .lanczos(&[&zero[..], &nan[..]], 1, 0.0, 20, block_vectors)
                .is_err()
        );
        assert!(
            power
                .lanczos(&[&zero[..]], 1, 1e-3, 20, block_vectors)
                .is_err(),
            "one matrix for a batch of two"
        );
    }
    for block_vectors in [0, MAX_LANCZOS_BLOCK + 1] {
        assert!(
            power
                .lanczos(&[&zero[..], &nan[..]], 1, 1e-3, 20, block_vectors)
                .is_err(),
            "a block of {block_vectors}"
        );
    }
}

/// The CPU power iteration reads every vector and partial at the layout's offsets: a layout
/// with alignment gaps (as the device layouts have) gives the same bits as one without, in
/// the fused and the two-matvec forms and in Lanczos.
#[test]
fn aligned_layouts_give_the_same_bits_as_packed_ones() {
    let shapes = ragged_shapes();
    let layout = |align_elements| {
        BatchLayout::new(
            &shapes,
            BlockPolicy {
                target_elements: 600,
                align_elements,
            },
        )
        .unwrap()
    };
    let (packed, aligned) = (layout(1), layout(4));
    assert!(
        aligned.total_vector_len() > packed.total_vector_len(),
        "gaps"
    );
    assert!(
        aligned.total_partial_len() > packed.total_partial_len(),
        "gaps"
    );
    assert_eq!(aligned.blocks().len(), packed.blocks().len());
    let matrices: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(j, &s)| random_matrix(s, 1.0, 300 + j as u64))
        .collect();
    let views: Vec<&[f32]> = matrices.iter().map(Vec::as_slice).collect();
    let vectors_of = |layout: &BatchLayout, vectors: &[f32]| -> Vec<Vec<u32>> {
        layout
            .matrices()
            .iter()
            .map(|e| {
                vectors[e.vector_range()]
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
            .collect()
    };
    let mut power = [
        BatchPowerIteration::new(packed.clone()).unwrap(),
        BatchPowerIteration::new(aligned.clone()).unwrap(),
    ];
    let mut vectors = [
        power[0].cold_vectors(9).unwrap(),
        power[1].cold_vectors(9).unwrap(),
    ];
    assert_eq!(
        vectors_of(&packed, &vectors[0]),
        vectors_of(&aligned, &vectors[1])
    );
    for iteration in 0..3 {
        let [packed_power, aligned_power] = &mut power;
        let [packed_vectors, aligned_vectors] = &mut vectors;
        let (expected, got) = if iteration == 1 {
            (
                packed_power.two_pass(&views, packed_vectors).unwrap(),
                aligned_power.two_pass(&views, aligned_vectors).unwrap(),
            )
        } else {
            (
                packed_power.fused(&views, packed_vectors).unwrap(),
                aligned_power.fused(&views, aligned_vectors).unwrap(),
            )
        };
        let bits = |estimates: &[Estimate]| -> Vec<u32> {
            estimates.iter().map(|e| e.sigma().to_bits()).collect()
        };
        assert_eq!(
            bits(&got),
            bits(&expected),
            "iteration {iteration} estimates"
        );
        assert_eq!(
            vectors_of(&aligned, aligned_vectors),
            vectors_of(&packed, packed_vectors),
            "iteration {iteration} vectors"
        );
    }
    let [packed_power, aligned_power] = &mut power;
    for block_vectors in [1, 4] {
        let expected = packed_power
            .lanczos(&views, 5, 1e-4, 40, block_vectors)
            .unwrap();
        let got = aligned_power
            .lanczos(&views, 5, 1e-4, 40, block_vectors)
            .unwrap();
        assert_eq!(got, expected, "Lanczos, block of {block_vectors}");
    }
}
