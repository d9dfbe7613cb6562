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
use crate::kernels::records::ROUNDING_GROUP;
use crate::kernels::records::{MatrixResult, Status};
use crate::layout::BatchLayout;
use crate::policy;
use crate::report::StepReport;
use crate::rounding::{BATCH, BATCH_GROUPS, RoundingKey, RoundingStream};

/// Elements per parallel task in the update pass (a multiple of the rounding stream's
/// [`BATCH`], so that every chunk starts a batch of rounding groups).
const UPDATE_CHUNK: usize = 1 << 16;
const _: () = assert!(UPDATE_CHUNK.is_multiple_of(BATCH));

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
    let settings = UpdateSettings {
        path: cpu.path,
        rule,
        stochastic: config
            .rounds_stochastically(T::DTYPE)
            .then(|| RoundingKey::new(config.seed, step)),
    };
    update_pass(
        settings,
        &cpu.layout,
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

/// How pass B runs: the compiled loops, the momentum rule, and `(seed, step)` of the rounding
/// stream when new 16-bit weights are rounded stochastically (math §5a), `None` for round to
/// nearest.
#[derive(Clone, Copy)]
struct UpdateSettings {
    path: KernelPath,
    rule: MomentumRule,
    stochastic: Option<RoundingKey>,
}

/// Pass B of math §5.2 over the whole batch: `M <- M_new`,
/// `W <- (1 - eta*lambda) W - (eta s / sigma) U`.
fn update_pass<T: Element>(
    settings: UpdateSettings,
    layout: &BatchLayout,
    updates: &[Update],
    weights: &mut [&mut [T]],
    grads: &[&[T]],
    momentum: &mut [f32],
) {
    let UpdateSettings {
        path,
        rule,
        stochastic,
    } = settings;
    let momenta = layout.split_elements_mut(momentum);
    weights
        .par_iter_mut()
        .zip(grads.par_iter())
        .zip(momenta)
        .zip(updates.par_iter())
        .enumerate()
        .for_each(|(matrix, (((weights, grads), momentum), &update))| {
            let chunks = weights
                .par_chunks_mut(UPDATE_CHUNK)
                .zip(grads.par_chunks(UPDATE_CHUNK))
                .zip(momentum.par_chunks_mut(UPDATE_CHUNK));
            let stream = stochastic.map(|key| key.stream(matrix as u32));
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
                    chunks
                        .enumerate()
                        .for_each(|(chunk, ((weights, grads), momentum))| {
                            let step = Step {
                                stream,
                                first_group: (chunk * (UPDATE_CHUNK / ROUNDING_GROUP)) as u64,
                                arithmetic: ElementUpdate {
                                    rule,
                                    decay,
                                    coefficient,
                                },
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
    /// The matrix's rounding stream for stochastic rounding of the new weights (math §5a),
    /// `None` for round to nearest.
    stream: Option<RoundingStream>,
    /// The rounding group of the chunk's first element.
    first_group: u64,
    arithmetic: ElementUpdate,
    weights: &'a mut [T],
    grads: &'a [T],
    momentum: &'a mut [f32],
}

impl<T: Element> Kernel for Step<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<const FMA: bool>(self) {
        match (self.arithmetic.rule.nesterov, self.stream) {
            (true, None) => self.update::<true, FMA>(),
            (false, None) => self.update::<false, FMA>(),
            (true, Some(stream)) => self.update_stochastic::<true, FMA>(stream),
            (false, Some(stream)) => self.update_stochastic::<false, FMA>(stream),
        }
    }
}

/// The element arithmetic of pass B (math §5.3), the same in both rounding modes.
#[derive(Clone, Copy)]
struct ElementUpdate {
    rule: MomentumRule,
    decay: f32,
    coefficient: f32,
}

impl ElementUpdate {
    /// `M <- M_new`, and the new weight `decay * W - coefficient * U` in `f32`, before it is
    /// narrowed to the weights' type.
    #[inline(always)]
    fn apply<T: Element, const NESTEROV: bool, const FMA: bool>(
        self,
        weight: T,
        grad: T,
        momentum: &mut f32,
    ) -> f32 {
        let (new_momentum, direction) = self.rule.apply::<NESTEROV, FMA>(*momentum, grad.to_f32());
        *momentum = new_momentum;
        madd::<FMA>(self.decay, weight.to_f32(), -self.coefficient * direction)
    }
}

impl<T: Element> Step<'_, T> {
    /// Pass B with the new weights rounded to nearest.
    #[inline(always)]
    fn update<const NESTEROV: bool, const FMA: bool>(self) {
        let arithmetic = self.arithmetic;
        let elements = self
            .weights
            .iter_mut()
            .zip(self.grads)
            .zip(self.momentum.iter_mut());
        for ((w, &g), m) in elements {
            *w = T::from_f32_rne(arithmetic.apply::<T, NESTEROV, FMA>(*w, g, m));
        }
    }

    /// Pass B with the new weights rounded stochastically (math §5a): element `e` of the
    /// matrix takes number `e` of `stream`, [`RoundingStream::batch`] by batch.
    #[inline(always)]
    fn update_stochastic<const NESTEROV: bool, const FMA: bool>(self, stream: RoundingStream) {
        let arithmetic = self.arithmetic;
        let (weight_batches, weight_rest) = self.weights.as_chunks_mut::<BATCH>();
        let (grad_batches, grad_rest) = self.grads.as_chunks::<BATCH>();
        let (momentum_batches, momentum_rest) = self.momentum.as_chunks_mut::<BATCH>();
        let batches = weight_batches
            .iter_mut()
            .zip(grad_batches)
            .zip(momentum_batches.iter_mut());
        let mut group = self.first_group;
        for ((weights, grads), momentum) in batches {
            let random = stream.batch(group);
            for k in 0..BATCH {
                let new_weight =
                    arithmetic.apply::<T, NESTEROV, FMA>(weights[k], grads[k], &mut momentum[k]);
                weights[k] = T::from_f32_stochastic(new_weight, random[k]);
            }
            group += BATCH_GROUPS as u64;
        }
        // The chunk's last elements (fewer than a batch): the first of a batch's numbers.
        let random = stream.batch(group);
        let rest = weight_rest
            .iter_mut()
            .zip(grad_rest)
            .zip(momentum_rest.iter_mut())
            .zip(random);
        for (((w, &g), m), random) in rest {
            *w = T::from_f32_stochastic(arithmetic.apply::<T, NESTEROV, FMA>(*w, g, m), random);
        }
    }
}
