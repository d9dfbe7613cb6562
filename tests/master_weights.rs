//! `f32` master weights with 16-bit gradients, and the 16-bit copy the update writes (math
//! §5a), on the CPU path and the simulated device: each mixed step is bit for bit the `f32`
//! step on the widened gradients, each copy is its weights rounded to nearest, and every
//! pairing or buffer the step cannot take is an error that changes nothing.

mod common;

use common::*;
use spectral_step::half::{bf16, f16};
use spectral_step::sim::{SimDevice, SimSlice, Simulated};
use spectral_step::{
    BatchLayout, BlockPolicy, Element, Error, MatrixShape, SpectralSgd, SpectralSgdConfig,
};

/// Blocks of a few hundred elements, so that matrices span several CTAs on the simulator.
const SMALL_BLOCKS: BlockPolicy = BlockPolicy {
    target_elements: 600,
    align_elements: 4,
};

fn cpu_run<G: Element>(
    case: &MasterWeightsCase<G>,
    mode: MasterMode,
    path: spectral_step::cpu::KernelPath,
) -> MasterOutcome<G> {
    let mut cpu = SpectralSgd::new(&case.shapes, case.config).unwrap();
    cpu.set_kernel_path(path).unwrap();
    let mut weights = case.initial.clone();
    let (mut after, mut copies_after, mut reports) = (Vec::new(), Vec::new(), Vec::new());
    for t in 0..case.grads.len() {
        let mut copies = case.stale_copies.clone();
        let report = match mode {
            MasterMode::Widened => cpu.step(&mut weights, &case.widened(t)),
            MasterMode::Mixed => cpu.step(&mut weights, &case.grads[t]),
            MasterMode::MixedWithCopy => {
                cpu.step_with_copy(&mut weights, &case.grads[t], &mut copies)
            }
        };
        reports.push(report.unwrap().matrices);
        after.push(weights.clone());
        copies_after.push(copies);
    }
    MasterOutcome {
        momentum: (0..case.shapes.len())
            .map(|j| cpu.momentum(j).to_vec())
            .collect(),
        weights: after,
        reports,
        copies: (mode == MasterMode::MixedWithCopy).then_some(copies_after),
    }
}

fn upload<T: Element>(
    device: &SimDevice,
    values: &[Vec<T>],
    byte_offset: usize,
) -> Vec<SimSlice<T>> {
    values
        .iter()
        .map(|v| device.upload_at_offset(v, byte_offset).unwrap())
        .collect()
}

fn download<T: Element>(device: &SimDevice, slices: &[SimSlice<T>]) -> Vec<Vec<T>> {
    slices.iter().map(|s| device.download(s).unwrap()).collect()
}

/// The simulated device; `copy_offset` bytes past an aligned address for the copies (an odd
/// element offset moves every copied matrix one element at a time).
fn sim_run<G: Element>(
    case: &MasterWeightsCase<G>,
    mode: MasterMode,
    copy_offset: usize,
) -> MasterOutcome<G> {
    let device = SimDevice::new().unwrap();
    let layout = BatchLayout::new(&case.shapes, SMALL_BLOCKS).unwrap();
    let mut sim =
        SpectralSgd::<Simulated>::on_device_with_layout(layout, case.config, device.clone())
            .unwrap();
    let mut weights = upload(&device, &case.initial, 0);
    let (mut after, mut copies_after, mut reports) = (Vec::new(), Vec::new(), Vec::new());
    for t in 0..case.grads.len() {
        let mut copies = upload(&device, &case.stale_copies, copy_offset);
        match mode {
            MasterMode::Widened => {
                let grads = upload(&device, &case.widened(t), 0);
                sim.step(&mut weights, &grads).unwrap();
            }
            MasterMode::Mixed => {
                let grads = upload(&device, &case.grads[t], 0);
                sim.step(&mut weights, &grads).unwrap();
            }
            MasterMode::MixedWithCopy => {
                let grads = upload(&device, &case.grads[t], 0);
                sim.step_with_copy(&mut weights, &grads, &mut copies)
                    .unwrap();
            }
        }
        reports.push(sim.report().unwrap().matrices);
        after.push(download(&device, &weights));
        copies_after.push(download(&device, &copies));
    }
    MasterOutcome {
        momentum: (0..case.shapes.len())
            .map(|j| sim.momentum_to_host(j).unwrap())
            .collect(),
        weights: after,
        reports,
        copies: (mode == MasterMode::MixedWithCopy).then_some(copies_after),
    }
}

fn shapes() -> Vec<MatrixShape> {
    let mut shapes = ragged_shapes();
    shapes.push(MatrixShape::new(96, 132));
    shapes
}

#[test]
fn cpu_master_weights_step_as_f32_on_widened_gradients() {
    for path in kernel_paths() {
        let what = format!("CPU {path:?}");
        MasterWeightsCase::<bf16>::new(shapes())
            .check(&what, |case, mode| cpu_run(case, mode, path));
        MasterWeightsCase::<f16>::new(shapes())
            .check(&what, |case, mode| cpu_run(case, mode, path));
    }
}

#[test]
fn simulated_master_weights_step_as_f32_on_widened_gradients() {
    MasterWeightsCase::<bf16>::new(shapes())
        .check("simulated", |case, mode| sim_run(case, mode, 0));
    MasterWeightsCase::<f16>::new(shapes()).check("simulated", |case, mode| sim_run(case, mode, 0));
    // Copies one element off alignment: the one-element path writes them.
    MasterWeightsCase::<bf16>::new(shapes()).check("simulated, unaligned copies", |case, mode| {
        sim_run(case, mode, 2)
    });
}

/// What a refused step must leave alone: the step count, the weights and the momentum.
fn assert_unchanged(
    what: &str,
    optimizer: &SpectralSgd,
    weights: &[Vec<f32>],
    before: &[Vec<f32>],
    momentum: &[Vec<f32>],
) {
    assert_eq!(optimizer.steps(), 1, "{what}: step count");
    assert_eq!(weights, before, "{what}: weights");
    for (j, expected) in momentum.iter().enumerate() {
        assert_eq!(
            optimizer.momentum(j),
            &expected[..],
            "{what}: matrix {j} momentum"
        );
    }
}

#[test]
fn unsupported_pairings_and_bad_copies_are_errors_that_change_nothing() {
    let shapes = [MatrixShape::new(6, 4), MatrixShape::new(3, 5)];
    let config = SpectralSgdConfig::default();
    let mut cpu = SpectralSgd::new(&shapes, config).unwrap();
    let mut weights: Vec<Vec<f32>> = random_batch(&shapes, 0.5, 1);
    let grads: Vec<Vec<bf16>> = random_batch(&shapes, 1.0, 2);
    cpu.step(&mut weights, &grads).unwrap();
    let before = weights.clone();
    let momentum: Vec<Vec<f32>> = (0..2).map(|j| cpu.momentum(j).to_vec()).collect();

    // 16-bit weights with gradients of another type.
    let mut half_weights: Vec<Vec<bf16>> = random_batch(&shapes, 0.5, 3);
    let half_before = half_weights.clone();
    let f32_grads: Vec<Vec<f32>> = random_batch(&shapes, 1.0, 4);
    let f16_grads: Vec<Vec<f16>> = random_batch(&shapes, 1.0, 4);
    let error = cpu.step(&mut half_weights, &f32_grads).unwrap_err();
    assert!(matches!(error, Error::ElementTypes(_)), "{error}");
    assert!(
        error
            .to_string()
            .contains("bf16 weights with f32 gradients"),
        "{error}"
    );
    assert!(matches!(
        cpu.step(&mut half_weights, &f16_grads),
        Err(Error::ElementTypes(_))
    ));
    assert_eq!(half_weights, half_before);
    assert_unchanged("16-bit weights", &cpu, &weights, &before, &momentum);

    // A copy of f32 weights with f32 gradients (no 16-bit type to copy to).
    let mut f32_copies = vec![vec![0.0f32; 24], vec![0.0f32; 15]];
    let error = cpu
        .step_with_copy(&mut weights, &f32_grads, &mut f32_copies)
        .unwrap_err();
    assert!(matches!(error, Error::ElementTypes(_)), "{error}");
    assert!(
        f32_copies.iter().flatten().all(|&c| c == 0.0),
        "copies untouched"
    );
    assert_unchanged("f32 copy", &cpu, &weights, &before, &momentum);

    // Copies of the wrong count or length.
    let mut copies: Vec<Vec<bf16>> = shapes.iter().map(|s| vec![bf16::ZERO; s.len()]).collect();
    assert!(matches!(
        cpu.step_with_copy(&mut weights, &grads, &mut copies[..1]),
        Err(Error::MatrixCountMismatch { what: "copy", .. })
    ));
    copies[1].pop();
    assert!(matches!(
        cpu.step_with_copy(&mut weights, &grads, &mut copies),
        Err(Error::LengthMismatch {
            what: "copy",
            index: 1,
            ..
        })
    ));
    assert!(
        copies.iter().flatten().all(|&c| c == bf16::ZERO),
        "copies untouched"
    );
    assert_unchanged("bad copies", &cpu, &weights, &before, &momentum);

    // The same refusals on the simulated device, before any launch, and a copy that lives on
    // another device.
    let device = SimDevice::new().unwrap();
    let other = SimDevice::new().unwrap();
    let mut sim = SpectralSgd::<Simulated>::on_device(&shapes, config, device.clone()).unwrap();
    let mut sim_weights = upload(&device, &before, 0);
    sim.step(&mut sim_weights, &upload(&device, &grads, 0))
        .unwrap();
    let weights_after_step = download(&device, &sim_weights);
    let launches = device.stats().launches;
    let sim_grads = upload(&device, &grads, 0);
    let mut sim_half = upload(&device, &half_before, 0);
    assert!(matches!(
        sim.step(&mut sim_half, &upload(&device, &f32_grads, 0)),
        Err(Error::ElementTypes(_))
    ));
    let mut short_copies = upload(&device, &copies, 0);
    assert!(matches!(
        sim.step_with_copy(&mut sim_weights, &sim_grads, &mut short_copies),
        Err(Error::LengthMismatch {
            what: "copy",
            index: 1,
            ..
        })
    ));
    let full: Vec<Vec<bf16>> = shapes.iter().map(|s| vec![bf16::ZERO; s.len()]).collect();
    let mut one_copy = upload(&device, &full[..1], 0);
    assert!(matches!(
        sim.step_with_copy(&mut sim_weights, &sim_grads, &mut one_copy),
        Err(Error::MatrixCountMismatch { what: "copy", .. })
    ));
    let mut foreign_copies = upload(&other, &full, 0);
    let error = sim
        .step_with_copy(&mut sim_weights, &sim_grads, &mut foreign_copies)
        .unwrap_err();
    assert!(matches!(error, Error::InvalidArgument(_)), "{error}");
    let mut f32_sim_copies = upload(&device, &before, 0);
    assert!(matches!(
        sim.step_with_copy(
            &mut sim_weights,
            &upload(&device, &f32_grads, 0),
            &mut f32_sim_copies
        ),
        Err(Error::ElementTypes(_))
    ));
    assert_eq!(
        device.stats().launches,
        launches,
        "no launch after a refusal"
    );
    assert_eq!(sim.steps(), 1);
    assert_eq!(download(&device, &sim_weights), weights_after_step);
    assert_eq!(download(&device, &sim_half), half_before);
    assert_eq!(download(&device, &short_copies), copies);
    assert_eq!(download(&other, &foreign_copies), full);
    assert_eq!(download(&device, &f32_sim_copies), before);
}
