//! The fused optimizer step on the CPU (SPEC 5): power iteration on the update direction,
//! then one update pass.

use std::borrow::{Borrow, BorrowMut};

use rayon::prelude::*;

use super::Cpu;
use super::power::{Estimate, Kernel, finish, fused_pass, on_path, split_lengths};
use super::rows::{DirectionRows, KernelPath, MomentumRule, madd};
use crate::config::{MomentumKind, SpectralSgdConfig};
use crate::element::Element;
use crate::error::Result;
use crate::layout::BatchLayout;
use crate::report::{MatrixReport, MatrixStatus, StepReport};

/// Elements per parallel task in the update pass.
const UPDATE_CHUNK: usize = 1 << 16;

impl From<&SpectralSgdConfig> for MomentumRule {
    fn from(config: &SpectralSgdConfig) -> Self {
        let grad_coef = match config.momentum_kind {
            MomentumKind::HeavyBall => 1.0,
            MomentumKind::Ema => 1.0 - config.momentum,
        };
        MomentumRule {
            beta: config.momentum,
            grad_coef,
            nesterov: config.nesterov,
        }
    }
}

/// What pass B does to one matrix.
#[derive(Clone, Copy, Debug)]
enum Update {
    /// Non-finite `U`: weights, momentum and power vector untouched.
    Skip,
    /// `sigma == 0`: store the new momentum, leave the weights (SPEC 4).
    MomentumOnly,
    /// `W <- decay * W - coefficient * U`, with `decay = 1 - eta*lambda` and
    /// `coefficient = eta * s / sigma`.
    Full { decay: f32, coefficient: f32 },
}

pub(super) fn run<T, W, G>(
    cpu: &mut Cpu,
    layout: &BatchLayout,
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
    layout.check_lengths("weight", weights.iter().map(|w| w.borrow().len()))?;
    layout.check_lengths("gradient", grads.iter().map(|g| g.borrow().len()))?;
    let rule = MomentumRule::from(config);
    let grads: Vec<&[T]> = grads.iter().map(Borrow::borrow).collect();
    estimate_sigmas(cpu, layout, config, step, rule, &grads);

    let mut updates = Vec::with_capacity(layout.len());
    let mut report = StepReport {
        step,
        matrices: Vec::with_capacity(layout.len()),
    };
    for ((entry, &estimate), warm) in layout
        .matrices()
        .iter()
        .zip(&cpu.scratch.estimates)
        .zip(cpu.warm.iter_mut())
    {
        let (update, matrix_report) = match estimate {
            Estimate::NonFinite => (
                Update::Skip,
                MatrixReport {
                    sigma: None,
                    status: MatrixStatus::SkippedNonFinite,
                },
            ),
            Estimate::Zero | Estimate::Degenerate => (
                Update::MomentumOnly,
                MatrixReport {
                    sigma: Some(0.0),
                    status: MatrixStatus::ZeroDirection,
                },
            ),
            Estimate::Sigma(sigma) => {
                *warm = true;
                let eta = f64::from(config.learning_rate);
                let coefficient =
                    (eta * f64::from(config.scale.factor(entry.shape)) / f64::from(sigma)) as f32;
                let decay = (1.0 - eta * f64::from(config.weight_decay)) as f32;
                if coefficient.is_finite() {
                    (
                        Update::Full { decay, coefficient },
                        MatrixReport {
                            sigma: Some(sigma),
                            status: MatrixStatus::Updated,
                        },
                    )
                } else {
                    // sigma so small that eta * s / sigma overflows f32: writing W would
                    // produce infinities, so the matrix is skipped like a non-finite one.
                    (
                        Update::Skip,
                        MatrixReport {
                            sigma: Some(sigma),
                            status: MatrixStatus::SkippedNonFinite,
                        },
                    )
                }
            }
        };
        updates.push(update);
        report.matrices.push(matrix_report);
    }
    update_pass(
        cpu.path,
        layout,
        rule,
        &updates,
        weights,
        &grads,
        &mut cpu.momentum,
    );
    Ok(report)
}

/// Power iteration on every matrix's `U` (SPEC 4): the first pass for all matrices, then
/// extra passes for those that still need them (cold start: `cold_iterations` in all, warm:
/// `warm_iterations`). A degenerate start vector is re-seeded once and given a cold start.
fn estimate_sigmas<T: Element>(
    cpu: &mut Cpu,
    layout: &BatchLayout,
    config: &SpectralSgdConfig,
    step: u64,
    rule: MomentumRule,
    grads: &[&[T]],
) {
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
    let scratch = &mut cpu.scratch;
    for (index, &warm) in cpu.warm.iter().enumerate() {
        scratch.active[index] = true;
        scratch.reseeded[index] = false;
        scratch.remaining[index] = if warm {
            config.warm_iterations
        } else {
            config.cold_iterations
        };
    }
    loop {
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
            &scratch.active,
            &mut scratch.partials,
            &scratch.sums,
            &mut cpu.power_vectors,
            &mut scratch.estimates,
        );
        let mut any_active = false;
        for (index, entry) in layout.matrices().iter().enumerate() {
            if !scratch.active[index] {
                continue;
            }
            scratch.remaining[index] -= 1;
            let again = match scratch.estimates[index] {
                Estimate::Degenerate if !scratch.reseeded[index] => {
                    scratch.reseeded[index] = true;
                    // A fresh random vector needs a cold start, now and, if this step ends
                    // without a usable estimate, on the next step too.
                    cpu.warm[index] = false;
                    scratch.remaining[index] = config.cold_iterations;
                    crate::random::fill_unit_vector(
                        config.seed.wrapping_add(step),
                        index as u64,
                        &mut cpu.power_vectors[entry.vector_range()],
                    );
                    true
                }
                Estimate::Sigma(_) => scratch.remaining[index] > 0 && !entry.shape.is_vector(),
                _ => false,
            };
            scratch.active[index] = again;
            any_active |= again;
        }
        if !any_active {
            return;
        }
    }
}

/// Pass B of SPEC 5 over the whole batch: `M <- M_new`, `W <- (1 - eta*lambda) W - (eta s / sigma) U`.
fn update_pass<T, W>(
    path: KernelPath,
    layout: &BatchLayout,
    rule: MomentumRule,
    updates: &[Update],
    weights: &mut [W],
    grads: &[&[T]],
    momentum: &mut [f32],
) where
    T: Element,
    W: BorrowMut<[T]> + Send,
{
    let momenta = split_lengths(momentum, layout.shapes().map(|shape| shape.len()));
    weights
        .par_iter_mut()
        .zip(grads.par_iter())
        .zip(momenta)
        .zip(updates.par_iter())
        .for_each(|(((weights, grads), momentum), &update)| {
            let weights = weights.borrow_mut();
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
    /// The element-wise body of pass B (SPEC 5): `M <- M_new`,
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
