//! The fused optimizer step on the CPU (math §5.2): rounds of power iteration on the update
//! direction, then one update pass, with the per-matrix decisions of [`crate::policy`].

use std::borrow::{Borrow, BorrowMut};

use rayon::prelude::*;

use super::Cpu;
use super::power::{FinishSettings, Kernel, finish, fused_pass, on_path};
use super::rows::{DirectionRows, KernelPath, madd};
use crate::config::{MomentumRule, SpectralSgdConfig};
use crate::element::Element;
use crate::error::Result;
use crate::kernels::records::{MatrixResult, Status};
use crate::layout::BatchLayout;
use crate::policy;
use crate::report::StepReport;

/// Elements per parallel task in the update pass.
const UPDATE_CHUNK: usize = 1 << 16;

/// What pass B does to one matrix, read from its result record as the update kernel reads it.
#[derive(Clone, Copy, Debug)]
enum Update {
    /// Weights, momentum and power vector untouched (non-finite, sigma too small).
    Skip,
    /// Store the new momentum, leave the weights (zero direction, re-seeded vector).
    MomentumOnly,
    /// `W <- decay * W - coefficient * U`, with `decay = 1 - eta*lambda` and
    /// `coefficient = eta * s / sigma`.
    Full { decay: f32, coefficient: f32 },
}

impl Update {
    fn of(result: &MatrixResult) -> Self {
        match Status::from_code(result.status) {
            Some(status) if status.writes_weights() => Update::Full {
                decay: result.decay,
                coefficient: result.coefficient,
            },
            Some(status) if status.stores_momentum() => Update::MomentumOnly,
            _ => Update::Skip,
        }
    }
}

pub(super) fn run<T, W, G>(
    cpu: &mut Cpu,
    config: &SpectralSgdConfig,
    step: u64,
    weights: &mut [W],
    grads: &[G],
) -> Result<StepReport>
where
    T: Element,
    W: BorrowMut<[T]> + Send,
    G: Borrow<[T]> + Sync,
{
    config.validate_for(&cpu.layout)?;
    // Borrowed once: the slices whose lengths are checked are the slices the passes use.
    let mut weights: Vec<&mut [T]> = weights.iter_mut().map(BorrowMut::borrow_mut).collect();
    let grads: Vec<&[T]> = grads.iter().map(Borrow::borrow).collect();
    cpu.layout
        .check_lengths("weight", weights.iter().map(|w| w.len()))?;
    cpu.layout
        .check_lengths("gradient", grads.iter().map(|g| g.len()))?;
    let rule = config.momentum_rule();
    estimate_sigmas(cpu, config, step, rule, &grads);
    cpu.host_knows_cold = false;

    let results = &cpu.scratch.results;
    let matrices = results
        .iter()
        .map(policy::report_of)
        .collect::<Result<Vec<_>>>()?;
    let updates: Vec<Update> = results.iter().map(Update::of).collect();
    update_pass(
        cpu.path,
        &cpu.layout,
        rule,
        &updates,
        &mut weights,
        &grads,
        &mut cpu.momentum,
    );
    Ok(StepReport { step, matrices })
}

/// Power iteration on every matrix's `U` (math §4.7): the rounds the device path would
/// launch, each matrix taking part while [`policy::continues`] says so. The first round
/// fixes each matrix's iteration count from its warm flag.
fn estimate_sigmas<T: Element>(
    cpu: &mut Cpu,
    config: &SpectralSgdConfig,
    step: u64,
    rule: MomentumRule,
    grads: &[&[T]],
) {
    let layout = &cpu.layout;
    let rows: Vec<_> = layout
        .matrices()
        .iter()
        .zip(grads)
        .map(|(entry, grads)| DirectionRows {
            grads,
            momentum: &cpu.momentum[entry.element_range()],
            fan_in: entry.shape.fan_in,
            rule,
        })
        .collect();
    let settings = FinishSettings {
        learning_rate: config.learning_rate,
        weight_decay: config.weight_decay,
        scale: config.scale,
        reseed_step: policy::reseed_step(step),
    };
    let scratch = &mut cpu.scratch;
    for round in 0..policy::rounds_to_launch(config, cpu.host_knows_cold) {
        let mut any_active = false;
        for (index, entry) in layout.matrices().iter().enumerate() {
            let result = &mut scratch.results[index];
            let active = if round == 0 {
                result.iterations_needed = policy::iterations_needed(config, cpu.warm[index]);
                true
            } else {
                policy::continues(round, entry.shape.is_vector(), result)
            };
            scratch.active[index] = active;
            any_active |= active;
        }
        if !any_active {
            return;
        }
        fused_pass(
            cpu.path,
            layout,
            &rows,
            &scratch.active,
            &cpu.power_vectors,
            &mut scratch.partials,
            &mut scratch.sums,
        );
        finish(
            layout,
            &settings,
            round,
            &scratch.active,
            &mut scratch.partials,
            &scratch.sums,
            &mut cpu.power_vectors,
            &mut cpu.warm,
            &mut scratch.results,
        );
    }
}

/// Pass B of math §5.2 over the whole batch: `M <- M_new`,
/// `W <- (1 - eta*lambda) W - (eta s / sigma) U`.
fn update_pass<T: Element>(
    path: KernelPath,
    layout: &BatchLayout,
    rule: MomentumRule,
    updates: &[Update],
    weights: &mut [&mut [T]],
    grads: &[&[T]],
    momentum: &mut [f32],
) {
    let momenta = layout.split_elements_mut(momentum);
    weights
        .par_iter_mut()
        .zip(grads.par_iter())
        .zip(momenta)
        .zip(updates.par_iter())
        .for_each(|(((weights, grads), momentum), &update)| {
            let chunks = weights
                .par_chunks_mut(UPDATE_CHUNK)
                .zip(grads.par_chunks(UPDATE_CHUNK))
                .zip(momentum.par_chunks_mut(UPDATE_CHUNK));
            match update {
                Update::Skip => {}
                Update::MomentumOnly => chunks.for_each(|((_, grads), momentum)| {
                    on_path(
                        path,
                        StoreMomentum {
                            rule,
                            grads,
                            momentum,
                        },
                    )
                }),
                Update::Full { decay, coefficient } => {
                    chunks.for_each(|((weights, grads), momentum)| {
                        let step = Step {
                            rule,
                            decay,
                            coefficient,
                            weights,
                            grads,
                            momentum,
                        };
                        on_path(path, step)
                    })
                }
            }
        });
}

/// `M <- M_new` only (a zero update direction).
struct StoreMomentum<'a, T> {
    rule: MomentumRule,
    grads: &'a [T],
    momentum: &'a mut [f32],
}

impl<T: Element> Kernel for StoreMomentum<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<const FMA: bool>(self) {
        for (m, &g) in self.momentum.iter_mut().zip(self.grads) {
            *m = self.rule.apply::<false, FMA>(*m, g.to_f32()).0;
        }
    }
}

/// Pass B over one chunk of one matrix.
struct Step<'a, T> {
    rule: MomentumRule,
    decay: f32,
    coefficient: f32,
    weights: &'a mut [T],
    grads: &'a [T],
    momentum: &'a mut [f32],
}

impl<T: Element> Kernel for Step<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<const FMA: bool>(self) {
        if self.rule.nesterov {
            self.update::<true, FMA>()
        } else {
            self.update::<false, FMA>()
        }
    }
}

impl<T: Element> Step<'_, T> {
    /// The element-wise body of pass B (math §5.3): `M <- M_new`,
    /// `W <- decay * W - coefficient * U`.
    #[inline(always)]
    fn update<const NESTEROV: bool, const FMA: bool>(self) {
        let Step {
            rule,
            decay,
            coefficient,
            weights,
            grads,
            momentum,
        } = self;
        for ((w, &g), m) in weights.iter_mut().zip(grads).zip(momentum.iter_mut()) {
            let (new_momentum, direction) = rule.apply::<NESTEROV, FMA>(*m, g.to_f32());
            *m = new_momentum;
            *w = T::from_f32_rne(madd::<FMA>(decay, w.to_f32(), -coefficient * direction));
        }
    }
}
