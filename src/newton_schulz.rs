//! The orthogonalised update rule (math §5b): Newton–Schulz iterations that take the update
//! direction to a matrix whose singular values all lie near 1, and their coefficient
//! schedules. The iterations themselves run in the backends (`src/cpu/orthogonal.rs`).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The most Newton–Schulz iterations a schedule may hold.
pub const MAX_NEWTON_SCHULZ_ITERATIONS: usize = 16;

/// Muon's quintic `(a, b, c)` (Jordan et al. 2024), the same at every iteration: fast to a
/// band around 1, without converging to 1.
pub const MUON_QUINTIC: (f32, f32, f32) = (3.4445, -4.7750, 2.0315);

/// The Polar Express schedule (Amsel, Persson, Musco & Gower 2025, Algorithm 1), degree 5,
/// before the safety factor: optimal for singular values in `[1e-3, 1]`, one triple per
/// iteration; iterations past the eighth repeat the last triple.
const POLAR_EXPRESS_RAW: [(f64, f64, f64); 8] = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
];

/// Polar Express's safety factor: every triple but the last is `(a/f, b/f³, c/f⁵)`, and the
/// start is divided by `f ||U||_F` instead of `||U||_F`, so that rounding cannot push a
/// singular value past the interval the polynomials were fitted on.
pub const POLAR_EXPRESS_SAFETY: f64 = 1.01;

/// Added to the Frobenius norm the start is divided by (Muon's and Polar Express's `1e-7`),
/// so that a tiny direction does not overflow.
pub const NORM_EPSILON: f32 = 1e-7;

/// The coefficient triples `(a, b, c)` of a schedule, one per iteration: iteration `k` maps
/// `X <- a_k X + (b_k A + c_k A²) X` with `A = X Xᵀ`, which applies
/// `p_k(x) = a_k x + b_k x³ + c_k x⁵` to every singular value.
#[derive(Clone, Copy, PartialEq)]
pub struct Coefficients {
    len: u8,
    triples: [(f32, f32, f32); MAX_NEWTON_SCHULZ_ITERATIONS],
}

impl fmt::Debug for Coefficients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl Coefficients {
    /// A user's schedule: 1 to [`MAX_NEWTON_SCHULZ_ITERATIONS`] finite triples.
    ///
    /// ```
    /// use spectral_step::newton_schulz::Coefficients;
    /// // The classical cubic Newton–Schulz step, p(x) = 1.5 x - 0.5 x³, ten times.
    /// let cubic = Coefficients::new(&[(1.5, -0.5, 0.0); 10])?;
    /// assert_eq!(cubic.as_slice().len(), 10);
    /// assert!(Coefficients::new(&[]).is_err());
    /// # Ok::<(), spectral_step::Error>(())
    /// ```
    pub fn new(triples: &[(f32, f32, f32)]) -> Result<Self> {
        if triples.is_empty() || triples.len() > MAX_NEWTON_SCHULZ_ITERATIONS {
            return Err(Error::InvalidConfig(format!(
                "a Newton-Schulz schedule holds 1 to {MAX_NEWTON_SCHULZ_ITERATIONS} triples, \
                 got {}",
                triples.len()
            )));
        }
        if let Some(index) = triples
            .iter()
            .position(|&(a, b, c)| !(a.is_finite() && b.is_finite() && c.is_finite()))
        {
            return Err(Error::InvalidConfig(format!(
                "Newton-Schulz triple {index} is {:?}; every coefficient must be finite",
                triples[index]
            )));
        }
        let mut all = [(0.0, 0.0, 0.0); MAX_NEWTON_SCHULZ_ITERATIONS];
        all[..triples.len()].copy_from_slice(triples);
        Ok(Self {
            len: triples.len() as u8,
            triples: all,
        })
    }

    /// The triples, one per iteration.
    pub fn as_slice(&self) -> &[(f32, f32, f32)] {
        &self.triples[..usize::from(self.len)]
    }

    /// The map `p_K(...p_1(x))`, `p(x) = a x + b x³ + c x⁵`, in `f64`: what the iteration
    /// does to each singular value `x` of its (normalised) start, in exact arithmetic
    /// (math §5b).
    ///
    /// ```
    /// use spectral_step::newton_schulz::Coefficients;
    /// let cubic = Coefficients::new(&[(1.5, -0.5, 0.0); 10])?;
    /// assert!((cubic.scalar_map(0.5) - 1.0).abs() < 1e-3);
    /// # Ok::<(), spectral_step::Error>(())
    /// ```
    pub fn scalar_map(&self, x: f64) -> f64 {
        self.as_slice().iter().fold(x, |x, &(a, b, c)| {
            let (a, b, c) = (f64::from(a), f64::from(b), f64::from(c));
            a * x + b * x.powi(3) + c * x.powi(5)
        })
    }
}

/// Which coefficients the iterations use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// [`MUON_QUINTIC`] at every one of `iterations` (Muon uses 5).
    Muon {
        /// Iterations, 1 to [`MAX_NEWTON_SCHULZ_ITERATIONS`].
        iterations: u32,
    },
    /// Polar Express's per-iteration triples with its safety factor, the last one repeated
    /// past the eighth iteration (its paper's Muon runs use 5).
    PolarExpress {
        /// Iterations, 1 to [`MAX_NEWTON_SCHULZ_ITERATIONS`].
        iterations: u32,
    },
    /// The user's own triples, the start divided by `||U||_F + 1e-7` as for Muon.
    Custom(Coefficients),
}

impl Schedule {
    /// Muon's five quintic iterations.
    pub const MUON: Schedule = Schedule::Muon { iterations: 5 };

    /// The triples, one per iteration, in `f32` (Polar Express's computed in `f64` with its
    /// safety factor, then rounded).
    pub fn coefficients(&self) -> Result<Coefficients> {
        self.validate()?;
        match *self {
            Schedule::Muon { iterations } => {
                Coefficients::new(&vec![MUON_QUINTIC; iterations as usize])
            }
            Schedule::PolarExpress { iterations } => {
                let last = POLAR_EXPRESS_RAW.len() - 1;
                let triples: Vec<(f32, f32, f32)> = (0..iterations as usize)
                    .map(|k| {
                        let (a, b, c) = POLAR_EXPRESS_RAW[k.min(last)];
                        if k < last {
                            let f = POLAR_EXPRESS_SAFETY;
                            (
                                (a / f) as f32,
                                (b / f.powi(3)) as f32,
                                (c / f.powi(5)) as f32,
                            )
                        } else {
                            (a as f32, b as f32, c as f32)
                        }
                    })
                    .collect();
                Coefficients::new(&triples)
            }
            Schedule::Custom(coefficients) => Ok(coefficients),
        }
    }

    /// The factor `||U||_F` is multiplied by before the start is divided by it: Polar
    /// Express's safety factor, 1 otherwise.
    pub fn norm_factor(&self) -> f32 {
        match self {
            Schedule::PolarExpress { .. } => POLAR_EXPRESS_SAFETY as f32,
            _ => 1.0,
        }
    }

    /// Iteration counts in range (a custom schedule was checked when it was made).
    pub fn validate(&self) -> Result<()> {
        match *self {
            Schedule::Muon { iterations } | Schedule::PolarExpress { iterations }
                if !(1..=MAX_NEWTON_SCHULZ_ITERATIONS as u32).contains(&iterations) =>
            {
                Err(Error::InvalidConfig(format!(
                    "Newton-Schulz iterations must be between 1 and \
                     {MAX_NEWTON_SCHULZ_ITERATIONS}, got {iterations}"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// How a step turns the update direction `U` into the change of the weights (math §5b).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum UpdateRule {
    /// `W <- (1 - ηλ) W - (η s / σ) U`, `σ` the power-iteration estimate of `||U||_*`
    /// (math §4, §5): the update's largest singular value is `η s`. The default.
    #[default]
    PowerNormalised,
    /// `W <- (1 - ηλ) W - η s X`, `X` from Newton–Schulz iterations on `U / ||U||_F`
    /// (transposed when `fan_out > fan_in`), whose singular values all lie near 1 (math §5b).
    /// On the CPU in `f32`; on a device with `bf16` iterates and cuBLAS's products.
    Orthogonalised(Schedule),
}

impl UpdateRule {
    /// Muon's rule: five quintic iterations.
    pub const MUON: UpdateRule = UpdateRule::Orthogonalised(Schedule::MUON);

    /// Checks the schedule.
    pub fn validate(&self) -> Result<()> {
        match self {
            UpdateRule::PowerNormalised => Ok(()),
            UpdateRule::Orthogonalised(schedule) => schedule.validate(),
        }
    }
}

impl fmt::Display for UpdateRule {
    /// `power_normalised`, `orthogonalised:muon:5`, `orthogonalised:polar_express:5`, or
    /// `orthogonalised:custom:a,b,c;a,b,c;...` (floats in shortest round-trip form): the
    /// state file's spelling, read back by [`FromStr`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateRule::PowerNormalised => f.write_str("power_normalised"),
            UpdateRule::Orthogonalised(Schedule::Muon { iterations }) => {
                write!(f, "orthogonalised:muon:{iterations}")
            }
            UpdateRule::Orthogonalised(Schedule::PolarExpress { iterations }) => {
                write!(f, "orthogonalised:polar_express:{iterations}")
            }
            UpdateRule::Orthogonalised(Schedule::Custom(coefficients)) => {
                let triples: Vec<String> = coefficients
                    .as_slice()
                    .iter()
                    .map(|(a, b, c)| format!("{a:?},{b:?},{c:?}"))
                    .collect();
                write!(f, "orthogonalised:custom:{}", triples.join(";"))
            }
        }
    }
}

impl FromStr for UpdateRule {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let invalid = || Error::InvalidConfig(format!("unknown update rule {text:?}"));
        if text == "power_normalised" {
            return Ok(UpdateRule::PowerNormalised);
        }
        let rest = text.strip_prefix("orthogonalised:").ok_or_else(invalid)?;
        let (kind, value) = rest.split_once(':').ok_or_else(invalid)?;
        let schedule = match kind {
            "muon" => Schedule::Muon {
                iterations: value.parse().map_err(|_| invalid())?,
            },
            "polar_express" => Schedule::PolarExpress {
                iterations: value.parse().map_err(|_| invalid())?,
            },
            "custom" => {
                let triples = value
                    .split(';')
                    .map(|triple| {
                        let numbers: Vec<f32> = triple
                            .split(',')
                            .map(|n| n.parse::<f32>().map_err(|_| invalid()))
                            .collect::<Result<_>>()?;
                        match numbers[..] {
                            [a, b, c] => Ok((a, b, c)),
                            _ => Err(invalid()),
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                Schedule::Custom(Coefficients::new(&triples)?)
            }
            _ => return Err(invalid()),
        };
        schedule.validate()?;
        Ok(UpdateRule::Orthogonalised(schedule))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_reads_back_what_it_writes() {
        let rules = [
            UpdateRule::PowerNormalised,
            UpdateRule::MUON,
            UpdateRule::Orthogonalised(Schedule::PolarExpress { iterations: 11 }),
            UpdateRule::Orthogonalised(Schedule::Custom(
                Coefficients::new(&[(1.5, -0.5, 0.0), (3.4445, -4.775, 2.0315)]).unwrap(),
            )),
        ];
        for rule in rules {
            assert_eq!(rule.to_string().parse::<UpdateRule>().unwrap(), rule);
        }
        for bad in [
            "",
            "orthogonalised",
            "orthogonalised:muon:0",
            "orthogonalised:muon:17",
            "orthogonalised:custom:1,2",
            "orthogonalised:custom:1,2,inf",
            "orthogonalised:newton:5",
        ] {
            assert!(bad.parse::<UpdateRule>().is_err(), "{bad:?}");
        }
    }

    /// The scalar map `p_K ∘ ... ∘ p_1` of a schedule at `x = σ / ||U||_F`, in f64.
    fn scalar_map(schedule: Schedule, x: f64) -> f64 {
        let x = x / f64::from(schedule.norm_factor());
        schedule.coefficients().unwrap().scalar_map(x)
    }

    /// The bands of math §5b's table (and README's), measured here: the least and greatest
    /// value of each schedule's scalar map over 20,001 points spaced geometrically in
    /// `[low, 1]`, printed, and checked against the table's bounds rounded outward to two
    /// decimals (each within 0.01 of the measured extreme).
    #[test]
    fn scalar_maps_stay_in_the_documented_bands() {
        let table = [
            (Schedule::MUON, 1e-2f64, 0.68, 1.14),
            (Schedule::MUON, 1e-3, 0.47, 1.21),
            (Schedule::PolarExpress { iterations: 5 }, 1e-2, 0.87, 1.13),
            (Schedule::PolarExpress { iterations: 5 }, 1e-3, 0.84, 1.13),
            (
                Schedule::PolarExpress { iterations: 8 },
                1e-3,
                0.9999,
                1.0001,
            ),
        ];
        for (schedule, low, band_low, band_high) in table {
            let (mut least, mut greatest) = (f64::INFINITY, f64::NEG_INFINITY);
            for i in 0..=20_000 {
                let x = low * (1.0 / low).powf(f64::from(i) / 20_000.0);
                let y = scalar_map(schedule, x);
                least = least.min(y);
                greatest = greatest.max(y);
            }
            println!("{schedule:?} on [{low}, 1]: {least:.4} to {greatest:.4}");
            assert!(
                band_low <= least && least < band_low + 0.01,
                "{schedule:?} on [{low}, 1]: least {least}, table {band_low}"
            );
            assert!(
                greatest <= band_high && greatest > band_high - 0.01,
                "{schedule:?} on [{low}, 1]: greatest {greatest}, table {band_high}"
            );
        }
    }

    #[test]
    fn polar_express_applies_its_safety_factor_to_all_but_the_last_triple() {
        let triples = Schedule::PolarExpress { iterations: 10 }
            .coefficients()
            .unwrap();
        let triples = triples.as_slice();
        assert_eq!(triples.len(), 10);
        assert_eq!(triples[0].0, (8.28721201814563 / 1.01) as f32);
        assert_eq!(triples[0].2, (17.300387312530933 / 1.01f64.powi(5)) as f32);
        assert_eq!(triples[6].1, (-1.2500016453999487 / 1.01f64.powi(3)) as f32);
        for triple in &triples[7..] {
            assert_eq!(*triple, (1.875, -1.25, 0.375));
        }
    }
}
