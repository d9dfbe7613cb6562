//! The fused optimizer step on the CPU (math §5.2): rounds of power iteration on the update
//! direction, then one update pass, with the per-matrix decisions of [`crate::policy`].

use std::borrow::{Borrow, BorrowMut};

use rayon::iter::Either;
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
use half::f16;

#[cfg(target_arch = "x86_64")]
use super::rows::{InRegister, SIMD_WIDTH};

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

pub(super) fn run<TW, TG, W, G, C>(
    cpu: &mut Cpu,
    config: &SpectralSgdConfig,
    step: u64,
    weights: &mut [W],
    grads: &[G],
    copies: Option<&mut [C]>,
) -> Result<StepReport>
where
    TW: Element,
    TG: Element,
    W: BorrowMut<[TW]> + Send,
    G: Borrow<[TG]> + Sync,
    C: BorrowMut<[TG]>,
{
    let super::Borrowed {
        mut weights,
        grads,
        mut copies,
    } = super::borrow_checked(config, &cpu.layout, weights, grads, copies)?;
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
            .rounds_stochastically(TW::DTYPE)
            .then(|| RoundingKey::new(config.seed, step)),
    };
    update_pass(
        settings,
        &cpu.layout,
        &updates,
        Buffers {
            weights: &mut weights,
            grads: &grads,
            copies: copies.as_deref_mut(),
        },
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

/// The caller's buffers of a step, one slice per matrix.
struct Buffers<'a, 'b, TW, TG> {
    weights: &'a mut [&'b mut [TW]],
    grads: &'a [&'b [TG]],
    /// The low-precision copies of `f32` master weights (math §5a), when asked for.
    copies: Option<&'a mut [&'b mut [TG]]>,
}

/// `Some` per item of `items`, or `count` times `None` without them: the optional copies,
/// zipped with the other buffers, per matrix or per chunk.
fn optional<I: IndexedParallelIterator>(
    items: Option<I>,
    count: usize,
) -> impl IndexedParallelIterator<Item = Option<I::Item>> {
    match items {
        Some(items) => Either::Left(items.map(Some)),
        None => Either::Right(rayon::iter::repeat_n((), count).map(|()| None)),
    }
}

/// Pass B of math §5.2 over the whole batch: `M <- M_new`,
/// `W <- (1 - eta*lambda) W - (eta s / sigma) U`, and with copies `C <- rne(W)` for every
/// matrix (updated or not, so that each copy is its weights rounded after the step).
fn update_pass<TW: Element, TG: Element>(
    settings: UpdateSettings,
    layout: &BatchLayout,
    updates: &[Update],
    buffers: Buffers<'_, '_, TW, TG>,
    momentum: &mut [f32],
) {
    let UpdateSettings {
        path,
        rule,
        stochastic,
    } = settings;
    let momenta = layout.split_elements_mut(momentum);
    let copies = optional(buffers.copies.map(|c| c.par_iter_mut()), layout.len());
    buffers
        .weights
        .par_iter_mut()
        .zip(buffers.grads.par_iter())
        .zip(momenta)
        .zip(copies)
        .zip(updates.par_iter())
        .enumerate()
        .for_each(
            |(matrix, ((((weights, grads), momentum), copy), &update))| {
                let chunk_count = weights.len().div_ceil(UPDATE_CHUNK);
                let chunks = weights
                    .par_chunks_mut(UPDATE_CHUNK)
                    .zip(grads.par_chunks(UPDATE_CHUNK))
                    .zip(momentum.par_chunks_mut(UPDATE_CHUNK))
                    .zip(optional(
                        copy.map(|c| c.par_chunks_mut(UPDATE_CHUNK)),
                        chunk_count,
                    ));
                let stream = stochastic.map(|key| key.stream(matrix as u32));
                match update {
                    Update::Skip => {
                        chunks.for_each(|(((weights, _), _), copy)| refresh_copy(copy, weights))
                    }
                    Update::MomentumOnly => {
                        chunks.for_each(|(((weights, grads), momentum), copy)| {
                            on_path(
                                path,
                                StoreMomentum {
                                    rule,
                                    grads,
                                    momentum,
                                },
                            );
                            refresh_copy(copy, weights);
                        })
                    }
                    Update::Full { decay, coefficient } => chunks.enumerate().for_each(
                        |(chunk, (((weights, grads), momentum), copy))| {
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
                                copy,
                            };
                            on_path(path, step)
                        },
                    ),
                }
            },
        );
}

/// `copy <- rne(weights)`, for a matrix whose weights the step leaves as they are.
pub(super) fn refresh_copy<TW: Element, TG: Element>(copy: Option<&mut [TG]>, weights: &[TW]) {
    if let Some(copy) = copy {
        for (c, &w) in copy.iter_mut().zip(weights) {
            *c = TG::from_f32_rne(w.to_f32());
        }
    }
}

/// `M <- M_new` only (a zero update direction).
pub(super) struct StoreMomentum<'a, T> {
    pub rule: MomentumRule,
    pub grads: &'a [T],
    pub momentum: &'a mut [f32],
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
struct Step<'a, TW, TG> {
    /// The matrix's rounding stream for stochastic rounding of the new weights (math §5a),
    /// `None` for round to nearest.
    stream: Option<RoundingStream>,
    /// The rounding group of the chunk's first element.
    first_group: u64,
    arithmetic: ElementUpdate,
    weights: &'a mut [TW],
    grads: &'a [TG],
    momentum: &'a mut [f32],
    /// The chunk of the copy the new weights are also written to, rounded to nearest.
    copy: Option<&'a mut [TG]>,
}

impl<TW: Element, TG: Element> Kernel for Step<'_, TW, TG> {
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

/// Eight elements of pass B for `f16` weights and gradients, both widened by one F16C
/// `vcvtph2ps` each: the new weights in `f32` (the per-element arithmetic), `m` updated.
///
/// # Safety
///
/// The CPU has AVX2, FMA and F16C (the caller runs under [`KernelPath::Avx2Fma`]'s or
/// [`KernelPath::Avx512`]'s check).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn f16_new_weights<const NESTEROV: bool>(
    arithmetic: ElementUpdate,
    weights: &[f16; SIMD_WIDTH],
    grads: &[f16; SIMD_WIDTH],
    momentum: &mut [f32; SIMD_WIDTH],
) -> [f32; SIMD_WIDTH] {
    // SAFETY: the caller promises F16C.
    let (old, grad): ([f32; SIMD_WIDTH], [f32; SIMD_WIDTH]) = unsafe {
        (
            bytemuck::cast(f16::widen8(weights)),
            bytemuck::cast(f16::widen8(grads)),
        )
    };
    std::array::from_fn(|lane| {
        arithmetic.apply::<f32, f32, NESTEROV, true>(old[lane], grad[lane], &mut momentum[lane])
    })
}

/// [`Step::update`] for `f16` weights and gradients on the AVX2 path: [`f16_new_weights`],
/// then eight new weights narrowed per `vcvtps2ph` to nearest even (exactly
/// `Element::from_f32_rne`). The warm f16 step took 71-82 ms with the branch-free narrowing
/// and 48-50 ms with this (`gpt2_small`, `bench/results/2026-12-07-0440-cpu-f16.md` and
/// `-0510-cpu-f16-step.md`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn update_f16_nearest<const NESTEROV: bool>(
    arithmetic: ElementUpdate,
    weights: &mut [f16],
    grads: &[f16],
    momentum: &mut [f32],
) {
    use std::arch::x86_64::{_MM_FROUND_TO_NEAREST_INT, _mm256_cvtps_ph};
    let (weight_lanes, weight_tail) = weights.as_chunks_mut::<SIMD_WIDTH>();
    let (grad_lanes, grad_tail) = grads.as_chunks::<SIMD_WIDTH>();
    let (momentum_lanes, momentum_tail) = momentum.as_chunks_mut::<SIMD_WIDTH>();
    let lanes = weight_lanes
        .iter_mut()
        .zip(grad_lanes)
        .zip(momentum_lanes.iter_mut());
    for ((w, g), m) in lanes {
        // SAFETY: this function is compiled for AVX2, FMA and F16C and only called where the
        // CPU has them.
        let new = unsafe { f16_new_weights::<NESTEROV>(arithmetic, w, g, m) };
        *w = bytemuck::cast(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
            bytemuck::cast(new),
        ));
    }
    let rest = weight_tail
        .iter_mut()
        .zip(grad_tail)
        .zip(momentum_tail.iter_mut());
    for ((w, &g), m) in rest {
        *w = f16::from_f32_rne(arithmetic.apply::<f16, f16, NESTEROV, true>(*w, g, m));
    }
}

/// [`Step::update_stochastic`] for `f16` weights and gradients on the AVX2 path: weights and
/// gradients widened eight per F16C `vcvtph2ps`, the same arithmetic, stream numbers and
/// stochastic rounding per element.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn update_f16_stochastic<const NESTEROV: bool>(
    arithmetic: ElementUpdate,
    stream: RoundingStream,
    first_group: u64,
    weights: &mut [f16],
    grads: &[f16],
    momentum: &mut [f32],
) {
    const _: () = assert!(BATCH.is_multiple_of(SIMD_WIDTH));
    stochastic_batches::<f16, f16, NESTEROV, true>(
        arithmetic,
        stream,
        first_group,
        weights,
        grads,
        momentum,
        |weights, grads, momentum, random| {
            // The new weights of the batch first, then their rounding in one loop over the
            // batch (which vectorises; per eight lanes it did not).
            let mut new_weights = [0.0f32; BATCH];
            let lanes = new_weights
                .as_chunks_mut::<SIMD_WIDTH>()
                .0
                .iter_mut()
                .zip(weights.as_chunks::<SIMD_WIDTH>().0)
                .zip(grads.as_chunks::<SIMD_WIDTH>().0)
                .zip(momentum.as_chunks_mut::<SIMD_WIDTH>().0);
            for (((new, w), g), m) in lanes {
                // SAFETY: this closure is compiled for AVX2, FMA and F16C with the function
                // around it, which is only called where the CPU has them.
                *new = unsafe { f16_new_weights::<NESTEROV>(arithmetic, w, g, m) };
            }
            for ((w, &new_weight), &random) in weights.iter_mut().zip(&new_weights).zip(random) {
                *w = f16::from_f32_stochastic(new_weight, random);
            }
        },
    );
}

/// Pass B with stochastic rounding over a chunk, batch by batch: `batch(weights, grads,
/// momentum, random)` updates one whole batch whose element `k` takes `random[k]`; the chunk's
/// last elements (fewer than a batch) take the first numbers of the next batch, element by
/// element.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn stochastic_batches<TW: Element, TG: Element, const NESTEROV: bool, const FMA: bool>(
    arithmetic: ElementUpdate,
    stream: RoundingStream,
    first_group: u64,
    weights: &mut [TW],
    grads: &[TG],
    momentum: &mut [f32],
    mut batch: impl FnMut(&mut [TW; BATCH], &[TG; BATCH], &mut [f32; BATCH], &[u16; BATCH]),
) {
    let (weight_batches, weight_rest) = weights.as_chunks_mut::<BATCH>();
    let (grad_batches, grad_rest) = grads.as_chunks::<BATCH>();
    let (momentum_batches, momentum_rest) = momentum.as_chunks_mut::<BATCH>();
    let batches = weight_batches
        .iter_mut()
        .zip(grad_batches)
        .zip(momentum_batches.iter_mut());
    let mut group = first_group;
    for ((weights, grads), momentum) in batches {
        batch(weights, grads, momentum, &stream.batch_on::<FMA>(group));
        group += BATCH_GROUPS as u64;
    }
    let random = stream.batch_on::<FMA>(group);
    let rest = weight_rest
        .iter_mut()
        .zip(grad_rest)
        .zip(momentum_rest.iter_mut())
        .zip(random);
    for (((w, &g), m), random) in rest {
        let new_weight = arithmetic.apply::<TW, TG, NESTEROV, FMA>(*w, g, m);
        *w = TW::from_f32_stochastic(new_weight, random);
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
    fn apply<TW: Element, TG: Element, const NESTEROV: bool, const FMA: bool>(
        self,
        weight: TW,
        grad: TG,
        momentum: &mut f32,
    ) -> f32 {
        let (new_momentum, direction) = self.rule.apply::<NESTEROV, FMA>(*momentum, grad.to_f32());
        *momentum = new_momentum;
        madd::<FMA>(self.decay, weight.to_f32(), -self.coefficient * direction)
    }
}

impl<TW: Element, TG: Element> Step<'_, TW, TG> {
    /// Pass B with the new weights rounded to nearest (and, with a copy, stored into it
    /// rounded to nearest too).
    #[inline(always)]
    fn update<const NESTEROV: bool, const FMA: bool>(self) {
        let arithmetic = self.arithmetic;
        let elements = self
            .weights
            .iter_mut()
            .zip(self.grads)
            .zip(self.momentum.iter_mut());
        #[cfg(target_arch = "x86_64")]
        if FMA
            && self.copy.is_none()
            && TW::DTYPE == crate::Dtype::F16
            && TG::DTYPE == crate::Dtype::F16
        {
            let weights: &mut [f16] = bytemuck::cast_slice_mut(self.weights);
            let grads: &[f16] = bytemuck::cast_slice(self.grads);
            // SAFETY: `FMA = true` code runs only inside `on_path`'s `Avx2Fma` and `Avx512`
            // branches, both of which have checked that the CPU has AVX2, FMA and F16C.
            unsafe { update_f16_nearest::<NESTEROV>(arithmetic, weights, grads, self.momentum) };
            return;
        }
        match self.copy {
            None => {
                for ((w, &g), m) in elements {
                    *w = TW::from_f32_rne(arithmetic.apply::<TW, TG, NESTEROV, FMA>(*w, g, m));
                }
            }
            Some(copy) => {
                for (((w, &g), m), c) in elements.zip(copy) {
                    let new_weight = arithmetic.apply::<TW, TG, NESTEROV, FMA>(*w, g, m);
                    *w = TW::from_f32_rne(new_weight);
                    *c = TG::from_f32_rne(w.to_f32());
                }
            }
        }
    }

    /// Pass B with the new weights rounded stochastically (math §5a): element `e` of the
    /// matrix takes number `e` of `stream`, [`RoundingStream::batch`] by batch. 16-bit
    /// weights only, which have no copy ([`StepTypes::check_copy`]).
    #[inline(always)]
    fn update_stochastic<const NESTEROV: bool, const FMA: bool>(self, stream: RoundingStream) {
        debug_assert!(self.copy.is_none());
        let arithmetic = self.arithmetic;
        #[cfg(target_arch = "x86_64")]
        if FMA && TW::DTYPE == crate::Dtype::F16 && TG::DTYPE == crate::Dtype::F16 {
            let weights: &mut [f16] = bytemuck::cast_slice_mut(self.weights);
            let grads: &[f16] = bytemuck::cast_slice(self.grads);
            let first_group = self.first_group;
            // SAFETY: `FMA = true` code runs only inside `on_path`'s `Avx2Fma` and `Avx512`
            // branches, both of which have checked that the CPU has AVX2, FMA and F16C.
            unsafe {
                update_f16_stochastic::<NESTEROV>(
                    arithmetic,
                    stream,
                    first_group,
                    weights,
                    grads,
                    self.momentum,
                )
            };
            return;
        }
        stochastic_batches::<TW, TG, NESTEROV, FMA>(
            arithmetic,
            stream,
            self.first_group,
            self.weights,
            self.grads,
            self.momentum,
            |weights, grads, momentum, random| {
                for k in 0..BATCH {
                    let new_weight = arithmetic.apply::<TW, TG, NESTEROV, FMA>(
                        weights[k],
                        grads[k],
                        &mut momentum[k],
                    );
                    weights[k] = TW::from_f32_stochastic(new_weight, random[k]);
                }
            },
        );
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Pass B for `f16` with F16C gives the element-by-element form's bits, to nearest and
    /// stochastically: every `f16` value as a weight, Gaussian gradients and momentum, both
    /// momentum rules, a tail shorter than a rounding batch.
    fn f16_update_in_registers_matches_the_per_element_form(stochastic: bool) {
        if !KernelPath::Avx2Fma.is_supported() {
            eprintln!("NOT RUN: the f16 update with F16C (the CPU lacks AVX2, FMA or F16C)");
            return;
        }
        let len = (1 << 16) + 5;
        let weights: Vec<f16> = (0..len).map(|i| f16::from_bits(i as u16)).collect();
        let mut values = vec![0.0f32; len];
        crate::random::fill_gaussian(9, 0, &mut values);
        let grads: Vec<f16> = values.iter().map(|&x| f16::from_f32_rne(x)).collect();
        let mut momentum = vec![0.0f32; len];
        crate::random::fill_gaussian(9, 1, &mut momentum);
        let stream = stochastic.then(|| RoundingKey::new(11, 3).stream(2));
        for nesterov in [false, true] {
            let arithmetic = ElementUpdate {
                rule: MomentumRule {
                    beta: 0.95,
                    grad_coef: 1.0,
                    nesterov,
                },
                decay: 0.999,
                coefficient: 0.02,
            };
            let (mut fast_weights, mut fast_momentum) = (weights.clone(), momentum.clone());
            on_path(
                KernelPath::Avx2Fma,
                Step {
                    stream,
                    first_group: 0,
                    arithmetic,
                    weights: &mut fast_weights[..],
                    grads: &grads[..],
                    momentum: &mut fast_momentum,
                    copy: None,
                },
            );
            for index in 0..len {
                let mut m = momentum[index];
                let new = if nesterov {
                    arithmetic.apply::<f16, f16, true, true>(weights[index], grads[index], &mut m)
                } else {
                    arithmetic.apply::<f16, f16, false, true>(weights[index], grads[index], &mut m)
                };
                // Element `e` takes number `e` of the stream, batch by batch (the tail: the
                // first numbers of the next batch).
                let expected = match stream {
                    None => f16::from_f32_rne(new),
                    Some(stream) => {
                        let batch = stream.batch((index / BATCH * BATCH_GROUPS) as u64);
                        f16::from_f32_stochastic(new, batch[index % BATCH])
                    }
                };
                let got = fast_weights[index];
                // A NaN weight stays NaN; its payload comes from whichever `fma` computed it
                // (the expected side may be the C library's).
                let same =
                    got.to_bits() == expected.to_bits() || (got.is_nan() && expected.is_nan());
                assert!(
                    same,
                    "weight bits {index:#06x}, nesterov {nesterov}, stochastic {stochastic}: \
                     {got} vs {expected}"
                );
                assert_eq!(
                    fast_momentum[index].to_bits(),
                    m.to_bits(),
                    "momentum {index}"
                );
            }
        }
    }

    #[test]
    fn f16_update_to_nearest_in_registers_matches_the_per_element_form() {
        f16_update_in_registers_matches_the_per_element_form(false);
    }

    #[test]
    fn f16_stochastic_update_in_registers_matches_the_per_element_form() {
        f16_update_in_registers_matches_the_per_element_form(true);
    }
}
