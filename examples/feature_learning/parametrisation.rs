//! The five parametrisations of the width sweep (math §7): how each initialises and updates
//! the weights.

/// Width at which the NTK learning rate is `eta` for a hidden layer (`eta * BASE / fan_in`).
pub const BASE_WIDTH: usize = 64;

/// How weights are initialised and updated. (The last variant's name is the paper's term,
/// hence the allow.)
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Parametrisation {
    /// `W ~ N(0, 1/fan_in)`, plain SGD with `eta_l = eta * BASE_WIDTH / fan_in`.
    Ntk,
    /// PyTorch's default `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, plain SGD with one `eta`.
    Standard,
    /// math §3a: spectral init, and `SpectralSgd` normalising every update to `eta * s`.
    SpectralNormalised,
    /// math §3b: `N(0, sigma_l^2)` with `sigma_l = init_std(shape, 1)`, plain SGD with
    /// `eta_l = eta * fan_out / fan_in`.
    SpectralParametrisation,
    /// math §5b: spectral init, and `SpectralSgd` replacing every update by `eta * s` times
    /// its Newton–Schulz orthogonalisation (Muon's five quintic iterations): every singular
    /// value of the update near `eta * s`, not only the top one.
    SpectralOrthogonalised,
}

impl Parametrisation {
    /// All five, in plotting order.
    pub const ALL: [Parametrisation; 5] = [
        Parametrisation::Ntk,
        Parametrisation::Standard,
        Parametrisation::SpectralNormalised,
        Parametrisation::SpectralParametrisation,
        Parametrisation::SpectralOrthogonalised,
    ];

    /// The two that step with `SpectralSgd` (and start from `spectral_init`).
    pub fn uses_spectral_sgd(self) -> bool {
        matches!(
            self,
            Parametrisation::SpectralNormalised | Parametrisation::SpectralOrthogonalised
        )
    }

    /// Short name for tables and files.
    pub fn name(self) -> &'static str {
        match self {
            Parametrisation::Ntk => "ntk",
            Parametrisation::Standard => "standard",
            Parametrisation::SpectralNormalised => "spectral-3a",
            Parametrisation::SpectralParametrisation => "spectral-3b",
            Parametrisation::SpectralOrthogonalised => "spectral-orth",
        }
    }

    /// The learning rate of the width sweep: one fixed value per parametrisation, for every
    /// width (the point of the experiment). Chosen at width 64 so that training makes
    /// progress while the relative changes stay moderate; the learning-rate sweep finds the
    /// loss-optimal rates separately.
    pub fn default_learning_rate(self) -> f32 {
        match self {
            Parametrisation::Ntk => 0.1,
            Parametrisation::Standard => 0.05,
            Parametrisation::SpectralNormalised => 0.01,
            Parametrisation::SpectralParametrisation => 0.5,
            Parametrisation::SpectralOrthogonalised => 0.01,
        }
    }
}
