//! The orthogonalised step on the CPU (math §5b). Per matrix: the update direction `U` by the
//! momentum rule of math §5.1, Newton–Schulz iterations on `U / ||U||_F` (on `Uᵀ` when
//! `fan_out > fan_in`, so that `A = X Xᵀ` is the smaller square) with `matrixmultiply`'s
//! `f32` GEMMs, then `W <- (1 - ηλ) W - η s X` rounded as math §5a says, and `M <- M_new`.
//!
//! Matrices run in parallel; each matrix's arithmetic runs on one thread in a fixed order, so
//! the result is the same for any number of threads.

use std::borrow::{Borrow, BorrowMut};

use rayon::prelude::*;

use super::Cpu;
use super::power::{Kernel, on_path};
use super::rows::madd;
use super::step::{StoreMomentum, refresh_copy};
use crate::config::{MomentumRule, SpectralSgdConfig};
use crate::element::Element;
use crate::error::Result;
use crate::layout::MatrixShape;
use crate::memory::zeroed;
use crate::newton_schulz::{Coefficients, NORM_EPSILON, Schedule};
use crate::report::{MatrixReport, MatrixStatus, StepReport};
use crate::rounding::{BATCH, RoundingKey, RoundingStream};

pub(super) fn run<TW, TG, W, G, C>(
    cpu: &mut Cpu,
    config: &SpectralSgdConfig,
    schedule: Schedule,
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
        copies,
    } = super::borrow_checked(config, &cpu.layout, weights, grads, copies)?;
    let settings = Settings {
        rule: config.momentum_rule(),
        coefficients: schedule.coefficients()?,
        norm_factor: schedule.norm_factor(),
        learning_rate: config.learning_rate,
        decay: crate::policy::decay(config.learning_rate, config.weight_decay),
        stochastic: config
            .rounds_stochastically(TW::DTYPE)
            .then(|| RoundingKey::new(config.seed, step)),
        path: cpu.path,
    };
    let scale = config.scale;
    let layout = &cpu.layout;
    let momenta = layout.split_elements_mut(&mut cpu.momentum);
    let mut copies: Vec<Option<&mut [TG]>> = match copies {
        Some(copies) => copies.into_iter().map(Some).collect(),
        None => (0..layout.len()).map(|_| None).collect(),
    };
    let matrices = weights
        .par_iter_mut()
        .zip(grads.par_iter())
        .zip(momenta)
        .zip(copies.par_iter_mut())
        .zip(layout.matrices().par_iter())
        .enumerate()
        .map(|(index, ((((weights, grads), momentum), copy), entry))| {
            let matrix = Matrix {
                index: index as u32,
                shape: entry.shape,
                target: scale.factor(entry.shape),
                weights,
                grads,
                momentum,
                copy: copy.as_deref_mut(),
            };
            step_matrix(&settings, matrix)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(StepReport { step, matrices })
}

/// What every matrix of the step shares.
struct Settings {
    rule: MomentumRule,
    coefficients: Coefficients,
    norm_factor: f32,
    learning_rate: f32,
    /// `1 - ηλ`.
    decay: f32,
    stochastic: Option<RoundingKey>,
    path: super::rows::KernelPath,
}

/// One matrix's buffers.
struct Matrix<'a, TW, TG> {
    index: u32,
    shape: MatrixShape,
    /// `s`.
    target: f32,
    weights: &'a mut [TW],
    grads: &'a [TG],
    momentum: &'a mut [f32],
    copy: Option<&'a mut [TG]>,
}

fn step_matrix<TW: Element, TG: Element>(
    settings: &Settings,
    matrix: Matrix<'_, TW, TG>,
) -> Result<MatrixReport> {
    let MatrixShape { fan_out, fan_in } = matrix.shape;
    // X laid out (short, long): Uᵀ when fan_out > fan_in.
    let transposed = fan_out > fan_in;
    let (short, long) = if transposed {
        (fan_in, fan_out)
    } else {
        (fan_out, fan_in)
    };
    let mut x: Vec<f32> = zeroed(matrix.shape.len(), "the Newton-Schulz iterate")?;
    on_path(
        settings.path,
        Direction {
            rule: settings.rule,
            grads: matrix.grads,
            momentum: matrix.momentum,
            fan_in,
            transposed,
            direction: &mut x,
        },
    );
    let skipped = MatrixReport {
        sigma: None,
        status: MatrixStatus::SkippedNonFinite,
    };
    if x.iter().any(|u| !u.is_finite()) {
        refresh_copy(matrix.copy, matrix.weights);
        return Ok(skipped);
    }
    let store_momentum = |momentum: &mut [f32]| {
        on_path(
            settings.path,
            StoreMomentum {
                rule: settings.rule,
                grads: matrix.grads,
                momentum,
            },
        )
    };
    // ||U||_F in f64: no overflow or underflow of the sum of squares of finite f32 values.
    let norm = x
        .iter()
        .map(|&u| f64::from(u) * f64::from(u))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 {
        store_momentum(matrix.momentum);
        refresh_copy(matrix.copy, matrix.weights);
        return Ok(MatrixReport {
            sigma: Some(0.0),
            status: MatrixStatus::ZeroDirection,
        });
    }
    // X_0 = U / (f ||U||_F + ε).
    let start = (1.0 / (norm * f64::from(settings.norm_factor) + f64::from(NORM_EPSILON))) as f32;
    for value in &mut x {
        *value *= start;
    }
    let orthogonal = newton_schulz(&settings.coefficients, short, long, x)?;
    if orthogonal.iter().any(|x| !x.is_finite()) {
        refresh_copy(matrix.copy, matrix.weights);
        return Ok(skipped);
    }
    let update = Update {
        decay: settings.decay,
        coefficient: settings.learning_rate * matrix.target,
        orthogonal: &orthogonal,
        fan_out,
        fan_in,
        transposed,
        stream: settings.stochastic.map(|key| key.stream(matrix.index)),
        weights: matrix.weights,
        copy: matrix.copy,
    };
    on_path(settings.path, update);
    // M <- M_new, recomputed from the old M and G as the power rule's pass B does, so that a
    // skipped matrix leaves M as it was without a buffer of its own.
    store_momentum(matrix.momentum);
    Ok(MatrixReport {
        sigma: None,
        status: MatrixStatus::Updated,
    })
}

/// The Newton–Schulz iterations on `x`, `short x long` row-major (`short <= long`):
/// `A = X Xᵀ`, `B = b A + c A²`, `X <- a X + B X`, once per triple. Three GEMMs per
/// iteration, `A` computed once.
fn newton_schulz(
    coefficients: &Coefficients,
    short: usize,
    long: usize,
    mut x: Vec<f32>,
) -> Result<Vec<f32>> {
    let mut next: Vec<f32> = zeroed(short * long, "the Newton-Schulz iterate")?;
    let mut gram: Vec<f32> = zeroed(short * short, "X Xᵀ")?;
    let mut polynomial: Vec<f32> = zeroed(short * short, "b A + c A²")?;
    for &(a, b, c) in coefficients.as_slice() {
        // A = X Xᵀ: Xᵀ is X read with its strides swapped.
        gemm(
            Operand::new(&x, short, long, long, 1),
            Operand::new(&x, long, short, 1, long),
            0.0,
            1.0,
            &mut gram,
        );
        // B = c A A + b A.
        polynomial.copy_from_slice(&gram);
        gemm(
            Operand::new(&gram, short, short, short, 1),
            Operand::new(&gram, short, short, short, 1),
            b,
            c,
            &mut polynomial,
        );
        // X_next = B X + a X.
        next.copy_from_slice(&x);
        gemm(
            Operand::new(&polynomial, short, short, short, 1),
            Operand::new(&x, short, long, long, 1),
            a,
            1.0,
            &mut next,
        );
        std::mem::swap(&mut x, &mut next);
    }
    Ok(x)
}

/// A matrix operand of [`gemm`]: `rows x columns`, element `(i, j)` at
/// `values[i * row_stride + j * column_stride]`.
struct Operand<'a> {
    values: &'a [f32],
    rows: usize,
    columns: usize,
    row_stride: usize,
    column_stride: usize,
}

impl<'a> Operand<'a> {
    /// Panics unless every element the strides reach lies in `values` (the callers pass the
    /// shapes of their own buffers, so this is a check of this file, not of user input).
    fn new(
        values: &'a [f32],
        rows: usize,
        columns: usize,
        row_stride: usize,
        column_stride: usize,
    ) -> Self {
        assert!(rows > 0 && columns > 0);
        let last = (rows - 1) * row_stride + (columns - 1) * column_stride;
        assert!(
            last < values.len(),
            "a GEMM operand reaches past its buffer"
        );
        Self {
            values,
            rows,
            columns,
            row_stride,
            column_stride,
        }
    }
}

/// `out <- beta * out + alpha * left * right`, `out` row-major `left.rows x right.columns`.
fn gemm(left: Operand<'_>, right: Operand<'_>, beta: f32, alpha: f32, out: &mut [f32]) {
    assert_eq!(left.columns, right.rows, "GEMM inner dimensions");
    assert_eq!(out.len(), left.rows * right.columns, "GEMM output size");
    // SAFETY: `Operand::new` checked that every element the strides of `left` and `right`
    // reach lies inside their slices, and the assertion above that `out` holds exactly
    // `left.rows x right.columns` row-major elements; `out` is borrowed mutably, so it
    // aliases neither operand. Those are all of `sgemm`'s requirements.
    unsafe {
        matrixmultiply::sgemm(
            left.rows,
            left.columns,
            right.columns,
            alpha,
            left.values.as_ptr(),
            left.row_stride as isize,
            left.column_stride as isize,
            right.values.as_ptr(),
            right.row_stride as isize,
            right.column_stride as isize,
            beta,
            out.as_mut_ptr(),
            right.columns as isize,
            1,
        );
    }
}

/// `U` of every element (math §5.1), written as `Uᵀ` when `transposed`; `M` is not stored.
struct Direction<'a, T> {
    rule: MomentumRule,
    grads: &'a [T],
    momentum: &'a [f32],
    fan_in: usize,
    transposed: bool,
    direction: &'a mut [f32],
}

impl<T: Element> Kernel for Direction<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let fan_out = self.grads.len() / self.fan_in;
        let rows = self
            .grads
            .chunks_exact(self.fan_in)
            .zip(self.momentum.chunks_exact(self.fan_in));
        for (row, (grads, momentum)) in rows.enumerate() {
            for (column, (&g, &m)) in grads.iter().zip(momentum).enumerate() {
                let (_, u) = if self.rule.nesterov {
                    self.rule.apply::<true, FMA>(m, g.to_f32())
                } else {
                    self.rule.apply::<false, FMA>(m, g.to_f32())
                };
                let at = if self.transposed {
                    column * fan_out + row
                } else {
                    row * self.fan_in + column
                };
                self.direction[at] = u;
            }
        }
    }
}

/// `W <- decay W - coefficient X` (X read transposed back when it was built from `Uᵀ`),
/// rounded to nearest or stochastically, and the copy rounded to nearest.
struct Update<'a, TW, TG> {
    decay: f32,
    coefficient: f32,
    orthogonal: &'a [f32],
    fan_out: usize,
    fan_in: usize,
    transposed: bool,
    stream: Option<RoundingStream>,
    weights: &'a mut [TW],
    copy: Option<&'a mut [TG]>,
}

impl<TW: Element, TG: Element> Kernel for Update<'_, TW, TG> {
    type Output = ();
    #[inline(always)]
    fn run<const FMA: bool>(self) {
        let (fan_out, fan_in) = (self.fan_out, self.fan_in);
        let x = |element: usize| {
            if self.transposed {
                self.orthogonal[(element % fan_in) * fan_out + element / fan_in]
            } else {
                self.orthogonal[element]
            }
        };
        let new_weight = |element: usize, weight: TW| {
            madd::<FMA>(self.decay, weight.to_f32(), -self.coefficient * x(element))
        };
        match self.stream {
            None => {
                for (element, w) in self.weights.iter_mut().enumerate() {
                    *w = TW::from_f32_rne(new_weight(element, *w));
                }
            }
            Some(stream) => {
                // Element e takes number e of the matrix's stream (math §5a).
                for (batch, weights) in self.weights.chunks_mut(BATCH).enumerate() {
                    let first = batch * BATCH;
                    let random =
                        stream.batch((first / crate::kernels::records::ROUNDING_GROUP) as u64);
                    for (k, w) in weights.iter_mut().enumerate() {
                        *w = TW::from_f32_stochastic(new_weight(first + k, *w), random[k]);
                    }
                }
            }
        }
        refresh_copy(self.copy, self.weights);
    }
}
