//! The candle adapter: it steps exactly what the slice API steps, its AdamW group is
//! candle-nn's, every kind of parameter is routed as documented, real models train, and bad
//! input is a typed error that names the parameter and changes nothing.

mod candle_model;
mod common;

#[path = "../examples/candle_transformer/model.rs"]
mod model;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_model::{
    MODEL, SPECTRAL_PARAMS, assert_same_vars, gradients, named_vars, seeded, spectral_shapes,
    values,
};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use common::assert_same_bits;
use spectral_step::candle::{
    MatrixView, OptimizerConfig, ParameterUpdate, Route, Routing, SpectralOptimizer,
};
use spectral_step::half::{bf16, f16};
use spectral_step::{Element, Error, MatrixShape, Rounding, SpectralSgd, SpectralSgdConfig};

/// The adapter over [`MODEL`] and the slice API over copies of its spectral matrices take
/// three steps on the same gradients; every weight is equal bit for bit after every step.
fn adapter_matches_slice_api<T: Element + candle_core::WithDType>(config: OptimizerConfig) {
    let vars = named_vars::<T>(10);
    let mut adapter = SpectralOptimizer::from_named(vars.clone(), config.clone()).unwrap();
    let mut slices: Vec<Vec<T>> = Vec::new();
    for &index in &SPECTRAL_PARAMS {
        let all = values::<T>(vars[index].1.as_tensor());
        let per_matrix = all.len() / if index == 3 { 3 } else { 1 };
        slices.extend(all.chunks(per_matrix).map(<[T]>::to_vec));
    }
    let mut master: Vec<Vec<f32>> = slices
        .iter()
        .map(|m| {
            m.iter()
                .map(|v| common::to_f64(std::slice::from_ref(v))[0] as f32)
                .collect()
        })
        .collect();
    let mut reference = SpectralSgd::new(&spectral_shapes(), config.spectral).unwrap();
    for step in 0..3 {
        let grads = gradients::<T>(&vars, 100 + 10 * step);
        let report = adapter.step_report(&grads).unwrap();
        let mut grad_slices: Vec<Vec<T>> = Vec::new();
        for &index in &SPECTRAL_PARAMS {
            let all = values::<T>(grads.get(vars[index].1.as_tensor()).unwrap());
            let per_matrix = all.len() / if index == 3 { 3 } else { 1 };
            grad_slices.extend(all.chunks(per_matrix).map(<[T]>::to_vec));
        }
        let expected = if config.master_weights && <T as Element>::DTYPE.is_low_precision() {
            reference
                .step_with_copy(&mut master, &grad_slices, &mut slices)
                .unwrap()
        } else {
            reference
                .step::<T, T, _, _>(&mut slices, &grad_slices)
                .unwrap()
        };
        let mut expected_reports = expected.matrices.iter();
        let mut matrix = 0;
        for &index in &SPECTRAL_PARAMS {
            let ParameterUpdate::Spectral(reports) = &report.parameters[index].update else {
                panic!(
                    "{} was not stepped spectrally",
                    report.parameters[index].name
                );
            };
            for line in reports {
                assert_eq!(Some(line), expected_reports.next());
            }
            let stepped = values::<T>(vars[index].1.as_tensor());
            let count = reports.len();
            let expected: Vec<T> = slices[matrix..matrix + count].concat();
            matrix += count;
            assert_same_bits(
                &format!("{} after step {step}", vars[index].0),
                &stepped,
                &expected,
            );
        }
    }
}

#[test]
fn the_adapter_steps_what_the_slice_api_steps_bit_for_bit() {
    adapter_matches_slice_api::<f32>(OptimizerConfig::default());
    let nearest = OptimizerConfig {
        spectral: SpectralSgdConfig {
            rounding: Rounding::Nearest,
            ..SpectralSgdConfig::default()
        },
        ..OptimizerConfig::default()
    };
    adapter_matches_slice_api::<bf16>(nearest.clone());
    adapter_matches_slice_api::<bf16>(OptimizerConfig::default());
    adapter_matches_slice_api::<f16>(OptimizerConfig::default());
    let master = OptimizerConfig {
        master_weights: true,
        ..OptimizerConfig::default()
    };
    adapter_matches_slice_api::<bf16>(master.clone());
    adapter_matches_slice_api::<f16>(master);
    // Muon's orthogonalised rule (math §5b) through the adapter: a drop-in Muon for candle.
    let muon = OptimizerConfig {
        spectral: SpectralSgdConfig {
            update: spectral_step::UpdateRule::MUON,
            ..SpectralSgdConfig::default()
        },
        ..OptimizerConfig::default()
    };
    adapter_matches_slice_api::<f32>(muon.clone());
    adapter_matches_slice_api::<bf16>(muon);
}

/// A two-layer MLP written out so that two copies can be built from the same values.
struct Mlp {
    vars: Vec<Var>,
}

impl Mlp {
    fn new(seed: u64) -> Self {
        let dims: [&[usize]; 4] = [&[32, 8], &[32], &[3, 32], &[3]];
        let vars = dims
            .iter()
            .enumerate()
            .map(|(index, dims)| {
                Var::from_tensor(&seeded::<f32>(dims, 0.3, seed + index as u64)).unwrap()
            })
            .collect();
        Self { vars }
    }

    fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Tensor {
        let [w1, b1, w2, b2] = [0, 1, 2, 3].map(|i| self.vars[i].as_tensor());
        let hidden = inputs
            .matmul(&w1.t().unwrap())
            .unwrap()
            .broadcast_add(b1)
            .unwrap()
            .tanh()
            .unwrap();
        let output = hidden
            .matmul(&w2.t().unwrap())
            .unwrap()
            .broadcast_add(b2)
            .unwrap();
        (output - targets)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    }
}

#[test]
fn the_adamw_group_is_candle_nn_adamw_bit_for_bit() {
    let params = candle_nn::ParamsAdamW {
        lr: 0.01,
        weight_decay: 0.1,
        ..Default::default()
    };
    let ours = Mlp::new(1);
    let theirs = Mlp {
        vars: ours
            .vars
            .iter()
            .map(|v| Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap())
            .collect(),
    };
    let config = OptimizerConfig {
        adamw: params.clone().into(),
        routing: Routing::muon().rank(2, Route::AdamW),
        ..OptimizerConfig::default()
    };
    let mut adapter = SpectralOptimizer::new(ours.vars.clone(), config).unwrap();
    let mut adamw = candle_nn::AdamW::new(theirs.vars.clone(), params).unwrap();
    let inputs = seeded::<f32>(&[64, 8], 1.0, 7);
    let targets = seeded::<f32>(&[64, 3], 1.0, 8);
    for step in 0..8 {
        let mut our_grads = ours.loss(&inputs, &targets).backward().unwrap();
        let mut their_grads = theirs.loss(&inputs, &targets).backward().unwrap();
        // On steps 3 and 4 the first bias has no gradient: both leave it alone, and both
        // still count the step for the bias correction of every parameter.
        if step == 3 || step == 4 {
            our_grads.remove(ours.vars[1].as_tensor());
            their_grads.remove(theirs.vars[1].as_tensor());
        }
        adapter.step(&our_grads).unwrap();
        adamw.step(&their_grads).unwrap();
        for (index, (a, b)) in ours.vars.iter().zip(&theirs.vars).enumerate() {
            assert_same_bits(
                &format!("var{index} after step {step}"),
                &values::<f32>(a.as_tensor()),
                &values::<f32>(b.as_tensor()),
            );
        }
    }
}

#[test]
fn an_mlp_trains_with_the_adapter() {
    mlp_trains(OptimizerConfig::default());
    mlp_trains(OptimizerConfig {
        spectral: SpectralSgdConfig {
            update: spectral_step::UpdateRule::MUON,
            ..SpectralSgdConfig::default()
        },
        ..OptimizerConfig::default()
    });
}

fn mlp_trains(config: OptimizerConfig) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let hidden = candle_nn::linear(8, 64, vb.pp("hidden")).unwrap();
    let output = candle_nn::linear(64, 3, vb.pp("output")).unwrap();
    let rule = config.spectral.update;
    let mut optimizer = SpectralOptimizer::from_varmap(&varmap, config).unwrap();
    let inputs = seeded::<f32>(&[128, 8], 1.0, 3);
    // A smooth target the MLP can fit: a fixed random linear map, squashed.
    let targets = inputs
        .matmul(&seeded::<f32>(&[8, 3], 0.5, 4))
        .unwrap()
        .tanh()
        .unwrap();
    let loss = |_: ()| {
        let prediction = output
            .forward(&hidden.forward(&inputs).unwrap().relu().unwrap())
            .unwrap();
        (prediction - &targets)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let first = loss(()).to_scalar::<f32>().unwrap();
    for _ in 0..60 {
        optimizer.backward_step(&loss(())).unwrap();
    }
    let last = loss(()).to_scalar::<f32>().unwrap();
    assert!(
        last < 0.25 * first,
        "MLP loss under {rule}: {first} -> {last}"
    );
}

fn tiny_transformer(varmap: &VarMap) -> model::Transformer {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
    let shape = model::TransformerShape {
        vocab: 12,
        context: 16,
        width: 32,
        heads: 4,
        layers: 2,
    };
    let transformer = model::Transformer::new(shape, vb).unwrap();
    model::seed_parameters(varmap, 3).unwrap();
    transformer
}

#[test]
fn a_transformer_trains_with_the_adapter() {
    let varmap = VarMap::new();
    let transformer = tiny_transformer(&varmap);
    let config = OptimizerConfig {
        spectral: SpectralSgdConfig {
            learning_rate: 0.05,
            ..SpectralSgdConfig::default()
        },
        adamw: spectral_step::candle::AdamWConfig {
            learning_rate: 0.01,
            ..Default::default()
        },
        ..OptimizerConfig::default()
    };
    let mut optimizer = SpectralOptimizer::from_varmap(&varmap, config).unwrap();
    // Sequences with structure to learn: each token is the previous plus a per-row stride.
    let tokens: Vec<u32> = (0..8u32)
        .flat_map(|row| (0..16u32).map(move |t| (row * 5 + t * (1 + row % 3)) % 12))
        .collect();
    let tokens = Tensor::from_vec(tokens, (8, 16), &Device::Cpu).unwrap();
    let first = transformer
        .loss(&tokens)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    for _ in 0..40 {
        let loss = transformer.loss(&tokens).unwrap();
        let report = optimizer.step_report(&loss.backward().unwrap()).unwrap();
        assert!(
            report.parameters.iter().all(|p| !matches!(
                p.update,
                ParameterUpdate::NoGradient | ParameterUpdate::SkippedNonFinite
            )),
            "{report:?}"
        );
    }
    let last = transformer
        .loss(&tokens)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(last < 0.5 * first, "transformer loss {first} -> {last}");
}

#[test]
fn every_transformer_parameter_is_routed_as_documented() {
    let varmap = VarMap::new();
    let _transformer = tiny_transformer(&varmap);
    let muon = SpectralOptimizer::from_varmap(&varmap, OptimizerConfig::default()).unwrap();
    let paper = SpectralOptimizer::from_varmap(
        &varmap,
        OptimizerConfig {
            routing: Routing::paper(),
            ..OptimizerConfig::default()
        },
    )
    .unwrap();
    assert_eq!(muon.parameters().len(), 2 + 2 * 12 + 2 + 1);
    for ((name, dims, muon_route), (_, _, paper_route)) in muon.parameters().zip(paper.parameters())
    {
        let (expected_muon, expected_paper) = if name == "wte.weight" || name == "wpe.weight" {
            (Route::AdamW, Route::Spectral(MatrixView::Transposed))
        } else if dims.len() == 1 {
            (Route::AdamW, Route::Spectral(MatrixView::Column))
        } else {
            (
                Route::Spectral(MatrixView::Auto),
                Route::Spectral(MatrixView::Auto),
            )
        };
        assert_eq!(
            (muon_route, paper_route),
            (expected_muon, expected_paper),
            "{name} {dims:?}"
        );
    }
}

/// One step from zero momentum with no weight decay: `ΔW = -η s G / σ(G)`, so each routed
/// view's update has spectral norm `η s` with `s` from its target shape.
#[test]
fn each_view_gets_an_update_of_its_target_norm() {
    let vars = named_vars::<f32>(20);
    let routing = Routing::paper();
    let learning_rate = 0.02f32;
    let config = OptimizerConfig {
        spectral: SpectralSgdConfig {
            learning_rate,
            cold_iterations: 200,
            ..SpectralSgdConfig::default()
        },
        routing,
        ..OptimizerConfig::default()
    };
    let before: Vec<Vec<f32>> = vars.iter().map(|(_, v)| values(v.as_tensor())).collect();
    let mut optimizer = SpectralOptimizer::from_named(vars.clone(), config).unwrap();
    optimizer.step_report(&gradients::<f32>(&vars, 50)).unwrap();
    // (stored shape of each matrix, target shape)
    let views: [(MatrixShape, usize, MatrixShape); 7] = [
        (MatrixShape::new(24, 16), 1, MatrixShape::new(24, 16)),
        (MatrixShape::new(24, 1), 1, MatrixShape::new(24, 1)),
        (MatrixShape::new(8, 27), 1, MatrixShape::new(8, 27)),
        (MatrixShape::new(12, 16), 3, MatrixShape::new(12, 16)),
        (MatrixShape::new(40, 16), 1, MatrixShape::new(16, 40)),
        (MatrixShape::new(5, 24), 1, MatrixShape::new(5, 24)),
        (MatrixShape::new(16, 1), 1, MatrixShape::new(16, 1)),
    ];
    for (((name, var), before), (stored, count, target)) in vars.iter().zip(&before).zip(views) {
        let after = values::<f32>(var.as_tensor());
        let delta: Vec<f32> = after.iter().zip(before).map(|(a, b)| a - b).collect();
        for (matrix, delta) in delta.chunks(stored.len()).enumerate() {
            assert_eq!(delta.len(), stored.len());
            let norm = spectral_step::diagnostics::spectral_norm(delta, stored).unwrap();
            let expected = learning_rate * (target.fan_out as f32 / target.fan_in as f32).sqrt();
            common::assert_relative(
                &format!("{name} matrix {matrix}"),
                norm.into(),
                expected.into(),
                2e-3,
            );
        }
        assert_eq!(delta.len(), stored.len() * count, "{name}");
    }
}

fn parameter_error(result: Result<impl std::fmt::Debug, Error>) -> (String, String) {
    match result {
        Err(Error::Parameter { name, problem }) => (name, problem),
        other => panic!("expected a parameter error, got {other:?}"),
    }
}

#[test]
fn parameters_the_adapter_cannot_step_are_errors_naming_them() {
    let f64_var =
        Var::from_tensor(&seeded::<f32>(&[4, 4], 1.0, 1).to_dtype(DType::F64).unwrap()).unwrap();
    let (name, problem) = parameter_error(SpectralOptimizer::from_named(
        vec![("double.weight".into(), f64_var)],
        OptimizerConfig::default(),
    ));
    assert_eq!(name, "double.weight");
    assert!(problem.contains("F64"), "{problem}");

    let vector = Var::from_tensor(&seeded::<f32>(&[7], 1.0, 1)).unwrap();
    let config = OptimizerConfig {
        routing: Routing::muon().name("gain", Route::Spectral(MatrixView::Auto)),
        ..OptimizerConfig::default()
    };
    let (name, problem) = parameter_error(SpectralOptimizer::from_named(
        vec![("gain".into(), vector.clone())],
        config,
    ));
    assert_eq!(name, "gain");
    assert!(problem.contains("MatrixView::Column"), "{problem}");

    // An integer variable is left alone, as candle-nn's optimizers leave it.
    let counter = Var::from_tensor(&Tensor::new(&[1u32, 2], &Device::Cpu).unwrap()).unwrap();
    let optimizer = SpectralOptimizer::from_named(
        vec![("counter".into(), counter)],
        OptimizerConfig::default(),
    )
    .unwrap();
    assert_eq!(optimizer.parameters().next().unwrap().2, Route::Frozen);

    // An f64 parameter routed Frozen is accepted (and left alone).
    let double =
        Var::from_tensor(&seeded::<f32>(&[4, 4], 1.0, 1).to_dtype(DType::F64).unwrap()).unwrap();
    let config = OptimizerConfig {
        routing: Routing::muon().name("double.weight", Route::Frozen),
        ..OptimizerConfig::default()
    };
    let optimizer =
        SpectralOptimizer::from_named(vec![("double.weight".into(), double)], config).unwrap();
    assert_eq!(optimizer.parameters().next().unwrap().2, Route::Frozen);

    let twin = Var::from_tensor(&seeded::<f32>(&[7], 1.0, 2)).unwrap();
    let (name, _) = parameter_error(SpectralOptimizer::from_named(
        vec![("gain".into(), vector), ("gain".into(), twin)],
        OptimizerConfig::default(),
    ));
    assert_eq!(name, "gain");
}

/// A state of the model's values, to check that a refused step changed nothing.
fn snapshot(vars: &[(String, Var)]) -> Vec<Vec<u8>> {
    vars.iter()
        .map(|(_, v)| common::bits(&values::<f32>(v.as_tensor())))
        .collect()
}

#[test]
fn bad_gradients_are_errors_naming_the_parameter_and_change_nothing() {
    let vars = named_vars::<f32>(30);
    let mut optimizer =
        SpectralOptimizer::from_named(vars.clone(), OptimizerConfig::default()).unwrap();
    optimizer.step_report(&gradients::<f32>(&vars, 1)).unwrap();
    let before = snapshot(&vars);
    type Breakage<'a> = Box<dyn Fn(&mut GradStore) + 'a>;
    let broken: [(&str, Breakage); 5] = [
        (
            "missing",
            Box::new(|g| drop(g.remove(vars[3].1.as_tensor()))),
        ),
        (
            "wrong shape",
            Box::new(|g| drop(g.insert(vars[0].1.as_tensor(), seeded::<f32>(&[16, 24], 1.0, 2)))),
        ),
        (
            "wrong type",
            Box::new(|g| {
                let grad = seeded::<f32>(&[8, 3, 3, 3], 1.0, 2)
                    .to_dtype(DType::BF16)
                    .unwrap();
                drop(g.insert(vars[2].1.as_tensor(), grad));
            }),
        ),
        (
            "aliasing its parameter",
            Box::new(|g| {
                drop(g.insert(vars[5].1.as_tensor(), vars[5].1.as_tensor().clone()));
            }),
        ),
        (
            "aliasing another parameter",
            Box::new(|g| {
                let flat = vars[4].1.as_tensor().flatten_all().unwrap();
                let view = flat
                    .narrow(0, 0, 216)
                    .unwrap()
                    .reshape((8, 3, 3, 3))
                    .unwrap();
                drop(g.insert(vars[2].1.as_tensor(), view));
            }),
        ),
    ];
    for ((what, breaks), (expected_name, expected_problem)) in broken.iter().zip([
        ("experts.weight", "no gradient"),
        ("blocks.0.fc.weight", "[16, 24]"),
        ("conv.weight", "BF16"),
        ("head.weight", "shares memory"),
        (
            "conv.weight",
            "shares memory with parameter tok_embed.weight",
        ),
    ]) {
        let mut grads = gradients::<f32>(&vars, 2);
        breaks(&mut grads);
        let (name, problem) = parameter_error(optimizer.step_report(&grads));
        assert_eq!(name, expected_name, "{what}: {problem}");
        assert!(problem.contains(expected_problem), "{what}: {problem}");
        assert_eq!(snapshot(&vars), before, "{what} changed the model");
        assert_eq!(optimizer.steps(), 1, "{what}");
    }
    // Two parameters may share one gradient tensor: it is only read.
    let mut grads = gradients::<f32>(&vars, 3);
    let shared = grads.get(vars[1].1.as_tensor()).unwrap().clone();
    grads.insert(vars[6].1.as_tensor(), shared.narrow(0, 0, 16).unwrap());
    optimizer.step_report(&grads).unwrap();
    let before = snapshot(&vars);
    // A missing AdamW gradient is not an error: candle-nn leaves such a parameter alone.
    let mut grads = gradients::<f32>(&vars, 3);
    grads.remove(vars[6].1.as_tensor());
    let report = optimizer.step_report(&grads).unwrap();
    assert_eq!(report.parameters[6].update, ParameterUpdate::NoGradient);
    assert_eq!(snapshot(&vars)[6], before[6]);
}

#[test]
fn a_rejected_learning_rate_is_reported_by_the_next_step() {
    let vars = named_vars::<f32>(40);
    let mut optimizer =
        SpectralOptimizer::from_named(vars.clone(), OptimizerConfig::default()).unwrap();
    let before = snapshot(&vars);
    optimizer.set_learning_rate(f64::NAN);
    assert!(matches!(
        optimizer.step_report(&gradients::<f32>(&vars, 1)),
        Err(Error::InvalidConfig(_))
    ));
    assert_eq!(snapshot(&vars), before);
    assert_eq!(optimizer.learning_rate(), f64::from(0.02f32));
    // A valid rate clears it, and moves AdamW's in proportion (0.001 / 0.02 at the start).
    optimizer.set_learning_rate(0.04);
    assert_eq!(optimizer.learning_rate(), 0.04f32 as f64);
    assert!((optimizer.adamw_config().learning_rate - 0.002).abs() < 1e-9);
    optimizer.step_report(&gradients::<f32>(&vars, 1)).unwrap();
}

#[test]
fn non_finite_gradients_skip_their_parameter() {
    let vars = named_vars::<f32>(50);
    let mut optimizer =
        SpectralOptimizer::from_named(vars.clone(), OptimizerConfig::default()).unwrap();
    let before = snapshot(&vars);
    let mut grads = gradients::<f32>(&vars, 1);
    let mut poisoned = values::<f32>(grads.get(vars[1].1.as_tensor()).unwrap());
    poisoned[3] = f32::NAN;
    grads.insert(
        vars[1].1.as_tensor(),
        Tensor::from_vec(poisoned, 24, &Device::Cpu).unwrap(),
    );
    let mut poisoned = values::<f32>(grads.get(vars[0].1.as_tensor()).unwrap());
    poisoned[5] = f32::INFINITY;
    grads.insert(
        vars[0].1.as_tensor(),
        Tensor::from_vec(poisoned, (24, 16), &Device::Cpu).unwrap(),
    );
    let report = optimizer.step_report(&grads).unwrap();
    assert_eq!(
        report.parameters[1].update,
        ParameterUpdate::SkippedNonFinite
    );
    let ParameterUpdate::Spectral(lines) = &report.parameters[0].update else {
        panic!("{report:?}")
    };
    assert_eq!(
        lines[0].status,
        spectral_step::MatrixStatus::SkippedNonFinite
    );
    let after = snapshot(&vars);
    assert_eq!(after[0], before[0]);
    assert_eq!(after[1], before[1]);
    assert_ne!(after[2], before[2]);
}

fn resume_config(master_weights: bool) -> OptimizerConfig {
    OptimizerConfig {
        spectral: SpectralSgdConfig {
            weight_decay: 0.01,
            ..SpectralSgdConfig::default()
        },
        routing: Routing::muon().name("experts.weight", Route::Frozen),
        master_weights,
        ..OptimizerConfig::default()
    }
}

fn copies(vars: &[(String, Var)]) -> Vec<(String, Var)> {
    vars.iter()
        .map(|(name, var)| {
            (
                name.clone(),
                Var::from_tensor(&var.as_tensor().copy().unwrap()).unwrap(),
            )
        })
        .collect()
}

/// Six steps straight, or three, a save, a fresh optimizer over copies of the parameters, a
/// load and three more: the parameters are equal bit for bit (bf16 with stochastic
/// rounding, whose random bits depend on the step count, with and without master weights).
fn resuming_is_not_stopping(master_weights: bool) {
    let straight_vars = named_vars::<bf16>(60);
    let stopped_vars = copies(&straight_vars);
    let mut straight =
        SpectralOptimizer::from_named(straight_vars.clone(), resume_config(master_weights))
            .unwrap();
    let mut stopped =
        SpectralOptimizer::from_named(stopped_vars.clone(), resume_config(master_weights)).unwrap();
    for step in 0..3 {
        straight
            .step_report(&gradients::<bf16>(&straight_vars, 10 * step))
            .unwrap();
        stopped
            .step_report(&gradients::<bf16>(&stopped_vars, 10 * step))
            .unwrap();
    }
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("optimizer.safetensors");
    stopped.save_state(&path).unwrap();
    let resumed_vars = copies(&stopped_vars);
    drop(stopped);
    let mut resumed =
        SpectralOptimizer::from_named(resumed_vars.clone(), resume_config(master_weights)).unwrap();
    resumed.load_state(&path).unwrap();
    assert_eq!(resumed.steps(), 3);
    assert_eq!(
        resumed.state_to_bytes().unwrap(),
        straight.state_to_bytes().unwrap()
    );
    for step in 3..6 {
        straight
            .step_report(&gradients::<bf16>(&straight_vars, 10 * step))
            .unwrap();
        resumed
            .step_report(&gradients::<bf16>(&resumed_vars, 10 * step))
            .unwrap();
    }
    assert_same_vars::<bf16>(&straight_vars, &resumed_vars);
    assert_eq!(
        resumed.state_to_bytes().unwrap(),
        straight.state_to_bytes().unwrap()
    );
}

#[test]
fn resuming_from_a_state_file_is_bitwise_not_stopping() {
    resuming_is_not_stopping(false);
    resuming_is_not_stopping(true);
}

#[test]
fn a_state_for_another_model_or_a_damaged_file_is_refused_and_changes_nothing() {
    let vars = named_vars::<f32>(70);
    let mut optimizer =
        SpectralOptimizer::from_named(vars.clone(), OptimizerConfig::default()).unwrap();
    optimizer.step_report(&gradients::<f32>(&vars, 1)).unwrap();
    let saved = optimizer.state_to_bytes().unwrap();
    optimizer.step_report(&gradients::<f32>(&vars, 2)).unwrap();
    let current = optimizer.state_to_bytes().unwrap();

    // A flipped bit in each of the first 64 data bytes, and in every 97th byte across the
    // file (header included), is caught.
    let data_start = 8 + u64::from_le_bytes(saved[..8].try_into().unwrap()) as usize;
    for position in (0..saved.len())
        .step_by(97)
        .chain(data_start..data_start + 64)
    {
        let mut damaged = saved.clone();
        damaged[position] ^= 0x10;
        let error = optimizer.load_state_from_bytes(&damaged).unwrap_err();
        assert!(
            matches!(error, Error::StateFormat(_) | Error::StateShapeMismatch(_)),
            "byte {position}: {error}"
        );
    }
    for length in [0, 7, 8, saved.len() / 2, saved.len() - 1] {
        assert!(matches!(
            optimizer.load_state_from_bytes(&saved[..length]),
            Err(Error::StateFormat(_))
        ));
    }
    // Another model: one parameter reshaped, one renamed, another routing, master weights on,
    // another scale.
    let mut other = named_vars::<f32>(70);
    other[5].1 = Var::from_tensor(&seeded::<f32>(&[6, 24], 1.0, 1)).unwrap();
    let reshaped = SpectralOptimizer::from_named(other, OptimizerConfig::default()).unwrap();
    let mut renamed_vars = named_vars::<f32>(70);
    renamed_vars[6].0 = "final_norm.weight".into();
    let renamed = SpectralOptimizer::from_named(renamed_vars, OptimizerConfig::default()).unwrap();
    let rerouted = SpectralOptimizer::from_named(
        named_vars::<f32>(70),
        OptimizerConfig {
            routing: Routing::paper(),
            ..OptimizerConfig::default()
        },
    )
    .unwrap();
    let with_masters = SpectralOptimizer::from_named(
        named_vars::<f32>(70),
        OptimizerConfig {
            master_weights: true,
            ..OptimizerConfig::default()
        },
    )
    .unwrap();
    let rescaled = SpectralOptimizer::from_named(
        named_vars::<f32>(70),
        OptimizerConfig {
            spectral: SpectralSgdConfig {
                scale: spectral_step::Scale::MuonMax1,
                ..SpectralSgdConfig::default()
            },
            ..OptimizerConfig::default()
        },
    )
    .unwrap();
    for (what, source, expected) in [
        ("reshaped", &reshaped, "head.weight"),
        ("renamed", &renamed, "norm.weight"),
        ("rerouted", &rerouted, "blocks.0.fc.bias"),
        ("with master weights", &with_masters, "master_weights"),
        ("rescaled", &rescaled, "scale"),
    ] {
        match optimizer.load_state_from_bytes(&source.state_to_bytes().unwrap()) {
            Err(Error::StateShapeMismatch(message)) => {
                assert!(message.contains(expected), "{what}: {message}");
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    let single = SpectralSgd::new(&[MatrixShape::new(4, 4)], SpectralSgdConfig::default()).unwrap();
    assert!(matches!(
        optimizer.load_state_from_bytes(&single.state_to_bytes().unwrap()),
        Err(Error::StateFormat(_))
    ));
    assert_eq!(
        optimizer.state_to_bytes().unwrap(),
        current,
        "a refused load changed the state"
    );
    optimizer.load_state_from_bytes(&saved).unwrap();
    assert_eq!(optimizer.state_to_bytes().unwrap(), saved);
    assert_eq!(optimizer.steps(), 1);
}

/// The step holds every parameter's storage through one nested candle call per parameter:
/// a model with tens of thousands of parameters steps from a test thread's 2 MiB stack.
#[test]
fn many_thousands_of_parameters_step_from_a_small_stack() {
    let vars: Vec<(String, Var)> = (0..20_000)
        .map(|index| {
            let dims: &[usize] = if index % 3 == 0 { &[5] } else { &[6, 4] };
            (
                format!("p{index:05}"),
                Var::from_tensor(&seeded::<f32>(dims, 1.0, index)).unwrap(),
            )
        })
        .collect();
    let mut optimizer =
        SpectralOptimizer::from_named(vars.clone(), OptimizerConfig::default()).unwrap();
    let before = snapshot(&vars);
    let report = optimizer.step_report(&gradients::<f32>(&vars, 5)).unwrap();
    assert!(report.parameters.iter().all(|p| matches!(
        p.update,
        ParameterUpdate::Spectral(_) | ParameterUpdate::AdamW
    )));
    let after = snapshot(&vars);
    assert!(before.iter().zip(&after).all(|(b, a)| b != a));
}

#[test]
fn bare_vars_step_but_refuse_state_files() {
    let vars = named_vars::<f32>(80);
    let bare: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let mut optimizer = SpectralOptimizer::new(bare, OptimizerConfig::default()).unwrap();
    optimizer.step(&gradients::<f32>(&vars, 1)).unwrap();
    assert!(matches!(
        optimizer.state_to_bytes(),
        Err(Error::InvalidArgument(_))
    ));
    let named = SpectralOptimizer::from_named(vars, OptimizerConfig::default()).unwrap();
    let bytes = named.state_to_bytes().unwrap();
    assert!(matches!(
        optimizer.load_state_from_bytes(&bytes),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn a_variable_given_twice_is_one_parameter() {
    let vars = named_vars::<f32>(90);
    let mut tied = vars.clone();
    tied.push(("head_tied.weight".into(), vars[5].1.clone()));
    let optimizer = SpectralOptimizer::from_named(tied, OptimizerConfig::default()).unwrap();
    let names: Vec<&str> = optimizer.parameters().map(|(name, _, _)| name).collect();
    assert_eq!(names.len(), MODEL.len());
    assert!(!names.contains(&"head_tied.weight"));
}

/// Without momentum each step is `W <- (1 - ηλ) W - η s G / σ(G)`: checked element by element
/// for a transposed embedding, whose batch runs at `η s_target / s_stored` with decay
/// `λ s_stored / s_target` (math §5c), before and after a change of learning rate.
#[test]
fn a_transposed_view_steps_with_its_target_rate_and_the_configured_decay() {
    let dims = [40usize, 16];
    let embedding = Var::from_tensor(&seeded::<f32>(&dims, 0.5, 5)).unwrap();
    let vars = vec![("tok_embed.weight".to_owned(), embedding)];
    let (learning_rate, weight_decay) = (0.02f32, 0.5f32);
    let config = OptimizerConfig {
        spectral: SpectralSgdConfig {
            learning_rate,
            weight_decay,
            momentum: 0.0,
            cold_iterations: 300,
            warm_iterations: 300,
            ..SpectralSgdConfig::default()
        },
        routing: Routing::paper(),
        ..OptimizerConfig::default()
    };
    let mut optimizer = SpectralOptimizer::from_named(vars.clone(), config).unwrap();
    let stored = MatrixShape::new(dims[0], dims[1]);
    // The linear map R^vocab -> R^d: fan_out = 16, fan_in = 40.
    let s_target = (16f64 / 40.0).sqrt();
    for (step, rate) in [(0u64, learning_rate), (1, 0.05)] {
        if step == 1 {
            optimizer.set_learning_rate(f64::from(rate));
        }
        let before = values::<f32>(vars[0].1.as_tensor());
        let grads = gradients::<f32>(&vars, 200 + step);
        let grad = values::<f32>(grads.get(vars[0].1.as_tensor()).unwrap());
        let grad_f64: Vec<f64> = grad.iter().map(|&g| f64::from(g)).collect();
        let sigma =
            spectral_step_reference::spectral_norm(&grad_f64, stored.fan_out, stored.fan_in);
        optimizer.step_report(&grads).unwrap();
        let after = values::<f32>(vars[0].1.as_tensor());
        let (eta, lambda) = (f64::from(rate), f64::from(weight_decay));
        for (index, ((a, b), g)) in after.iter().zip(&before).zip(&grad).enumerate() {
            let expected =
                (1.0 - eta * lambda) * f64::from(*b) - eta * s_target * f64::from(*g) / sigma;
            common::assert_close(
                &format!("step {step} element {index}"),
                f64::from(*a),
                expected,
                2e-5 * (1.0 + expected.abs()),
            );
        }
    }
}

/// A parameter changed outside the optimizer is stepped from its new value once the master
/// weights are reloaded: the step then equals a fresh optimizer's on the new values.
#[test]
fn reloaded_master_weights_follow_a_changed_parameter() {
    let config = OptimizerConfig {
        master_weights: true,
        ..OptimizerConfig::default()
    };
    let vars = named_vars::<bf16>(100);
    let mut optimizer = SpectralOptimizer::from_named(vars.clone(), config.clone()).unwrap();
    for (index, (_, var)) in vars.iter().enumerate() {
        var.set(&seeded::<bf16>(var.dims(), 0.5, 500 + index as u64))
            .unwrap();
    }
    optimizer.reload_master_weights().unwrap();
    let fresh_vars = copies(&vars);
    let mut fresh = SpectralOptimizer::from_named(fresh_vars.clone(), config).unwrap();
    optimizer.step_report(&gradients::<bf16>(&vars, 7)).unwrap();
    fresh
        .step_report(&gradients::<bf16>(&fresh_vars, 7))
        .unwrap();
    for ((name, a), (_, b)) in vars.iter().zip(&fresh_vars) {
        assert_same_bits(
            name,
            &values::<bf16>(a.as_tensor()),
            &values::<bf16>(b.as_tensor()),
        );
    }
}
