//! The network and its task: a 3-layer MLP in plain Rust with hand-written forward and
//! backward passes, and the random teacher it learns.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal, Uniform};
use spectral_step::scaling::{init_std, spectral_init};
use spectral_step::{MatrixShape, Scale};

use super::parametrisation::Parametrisation;

/// Input dimension of the synthetic task.
pub const INPUTS: usize = 16;
/// Output dimension (the teacher's).
pub const OUTPUTS: usize = 4;

/// The hidden activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `max(0, x)`.
    Relu,
    /// `tanh(x)`.
    Tanh,
}

impl Activation {
    /// Short name for tables and files.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Tanh => "tanh",
        }
    }

    fn apply(self, values: &mut [f32]) {
        match self {
            Activation::Relu => values.iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Tanh => values.iter_mut().for_each(|v| *v = v.tanh()),
        }
    }

    /// Multiplies `delta` by the derivative, given the activation's output `h`.
    fn backprop(self, delta: &mut [f32], h: &[f32]) {
        match self {
            Activation::Relu => delta
                .iter_mut()
                .zip(h)
                .for_each(|(d, &h)| *d *= f32::from(u8::from(h > 0.0))),
            Activation::Tanh => delta
                .iter_mut()
                .zip(h)
                .for_each(|(d, &h)| *d *= 1.0 - h * h),
        }
    }
}

/// `c = a · b` for row-major `a` (`m x k`) and `b` (`k x n`) given with row and column strides,
/// so that transposes need no copy.
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: (&[f32], isize, isize),
    b: (&[f32], isize, isize),
    c: &mut [f32],
) {
    let fits = |rows: usize, cols: usize, (data, rs, cs): (&[f32], isize, isize)| {
        rows > 0 && cols > 0 && data.len() > (rows - 1) * rs as usize + (cols - 1) * cs as usize
    };
    assert!(
        fits(m, k, a) && fits(k, n, b) && c.len() == m * n,
        "gemm operands do not match"
    );
    // SAFETY: the assert keeps every element sgemm reads inside `a` and `b`, and `c` is
    // exactly `m x n` with row stride `n`; the three slices are distinct borrows.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.0.as_ptr(),
            a.1,
            a.2,
            b.0.as_ptr(),
            b.1,
            b.2,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// `x · W^T`: a layer applied to a batch `x` (`rows x fan_in`).
pub(super) fn layer_forward(x: &[f32], rows: usize, w: &[f32], shape: MatrixShape) -> Vec<f32> {
    let mut out = vec![0.0; rows * shape.fan_out];
    let fan_in = shape.fan_in as isize;
    gemm(
        rows,
        shape.fan_in,
        shape.fan_out,
        (x, fan_in, 1),
        (w, 1, fan_in),
        &mut out,
    );
    out
}

/// `delta^T · x`: a layer's gradient from its output error and its input.
fn layer_gradient(delta: &[f32], x: &[f32], rows: usize, shape: MatrixShape) -> Vec<f32> {
    let mut grad = vec![0.0; shape.len()];
    let (fan_out, fan_in) = (shape.fan_out as isize, shape.fan_in as isize);
    gemm(
        shape.fan_out,
        rows,
        shape.fan_in,
        (delta, 1, fan_out),
        (x, fan_in, 1),
        &mut grad,
    );
    grad
}

/// `delta · W`: the error at a layer's input.
fn layer_backward(delta: &[f32], rows: usize, w: &[f32], shape: MatrixShape) -> Vec<f32> {
    let mut out = vec![0.0; rows * shape.fan_in];
    let (fan_out, fan_in) = (shape.fan_out as isize, shape.fan_in as isize);
    gemm(
        rows,
        shape.fan_out,
        shape.fan_in,
        (delta, fan_out, 1),
        (w, fan_in, 1),
        &mut out,
    );
    out
}

/// `n` independent `N(0, 1)` samples.
pub fn gaussian(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

/// The synthetic task: inputs `x ~ N(0, I)`, targets `tanh(A x / sqrt(d))` from a fixed
/// Gaussian teacher `A` (`OUTPUTS x INPUTS`).
pub struct Teacher {
    weights: Vec<f32>,
}

impl Teacher {
    /// The teacher whose weights are drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            weights: gaussian(OUTPUTS * INPUTS, &mut ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    /// The targets of a batch `x` (`rows x INPUTS`).
    pub fn targets(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut t = layer_forward(x, rows, &self.weights, MatrixShape::new(OUTPUTS, INPUTS));
        t.iter_mut()
            .for_each(|v| *v = (*v / (INPUTS as f32).sqrt()).tanh());
        t
    }
}

/// A 3-layer MLP `INPUTS -> width -> width -> OUTPUTS`; `h2` is the second hidden layer.
pub struct Mlp {
    /// The layers' shapes, input layer first.
    pub shapes: [MatrixShape; 3],
    /// The layers' weights, row-major `fan_out x fan_in`.
    pub weights: Vec<Vec<f32>>,
    /// The activation of both hidden layers.
    pub activation: Activation,
}

/// Activations of one forward pass.
pub struct Pass {
    /// First hidden layer, `rows x width`.
    pub h1: Vec<f32>,
    /// Second hidden layer, `rows x width`.
    pub h2: Vec<f32>,
    /// Output, `rows x OUTPUTS`.
    pub out: Vec<f32>,
}

impl Mlp {
    /// A network of hidden width `width`, initialised as `parametrisation` prescribes; layer
    /// `l` draws from seed `31 seed + l`.
    pub fn new(
        width: usize,
        parametrisation: Parametrisation,
        activation: Activation,
        seed: u64,
    ) -> spectral_step::Result<Self> {
        let shapes = [
            MatrixShape::new(width, INPUTS),
            MatrixShape::new(width, width),
            MatrixShape::new(OUTPUTS, width),
        ];
        let mut weights = Vec::with_capacity(3);
        for (layer, &shape) in shapes.iter().enumerate() {
            let mut rng =
                ChaCha8Rng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(layer as u64));
            let fan_in = shape.fan_in as f32;
            let w = match parametrisation {
                Parametrisation::Ntk => gaussian(shape.len(), &mut rng)
                    .into_iter()
                    .map(|v| v / fan_in.sqrt())
                    .collect(),
                Parametrisation::Standard => {
                    let bound = 1.0 / fan_in.sqrt();
                    let uniform = Uniform::new(-bound, bound).expect("a non-empty range");
                    (0..shape.len()).map(|_| uniform.sample(&mut rng)).collect()
                }
                Parametrisation::SpectralNormalised | Parametrisation::SpectralOrthogonalised => {
                    let mut w = vec![0.0; shape.len()];
                    spectral_init(
                        &mut w,
                        shape,
                        1.0,
                        Scale::Spectral,
                        seed.wrapping_mul(31).wrapping_add(layer as u64),
                    )?;
                    w
                }
                Parametrisation::SpectralParametrisation => {
                    let std = init_std(shape, 1.0);
                    gaussian(shape.len(), &mut rng)
                        .into_iter()
                        .map(|v| v * std)
                        .collect()
                }
            };
            weights.push(w);
        }
        Ok(Self {
            shapes,
            weights,
            activation,
        })
    }

    /// The forward pass of a batch `x` (`rows x INPUTS`).
    pub fn forward(&self, x: &[f32], rows: usize) -> Pass {
        let mut h1 = layer_forward(x, rows, &self.weights[0], self.shapes[0]);
        self.activation.apply(&mut h1);
        let mut h2 = layer_forward(&h1, rows, &self.weights[1], self.shapes[1]);
        self.activation.apply(&mut h2);
        let out = layer_forward(&h2, rows, &self.weights[2], self.shapes[2]);
        Pass { h1, h2, out }
    }

    /// Mean squared error / 2 over the batch, the gradients of the three layers, and the pass.
    pub fn loss_and_gradients(
        &self,
        x: &[f32],
        target: &[f32],
        rows: usize,
    ) -> (f64, Vec<Vec<f32>>, Pass) {
        let pass = self.forward(x, rows);
        let delta_out: Vec<f32> = pass
            .out
            .iter()
            .zip(target)
            .map(|(y, t)| (y - t) / rows as f32)
            .collect();
        let loss = pass
            .out
            .iter()
            .zip(target)
            .map(|(y, t)| f64::from(y - t).powi(2))
            .sum::<f64>()
            / (2 * rows) as f64;
        let mut delta2 = layer_backward(&delta_out, rows, &self.weights[2], self.shapes[2]);
        self.activation.backprop(&mut delta2, &pass.h2);
        let mut delta1 = layer_backward(&delta2, rows, &self.weights[1], self.shapes[1]);
        self.activation.backprop(&mut delta1, &pass.h1);
        let grads = vec![
            layer_gradient(&delta1, x, rows, self.shapes[0]),
            layer_gradient(&delta2, &pass.h1, rows, self.shapes[1]),
            layer_gradient(&delta_out, &pass.h2, rows, self.shapes[2]),
        ];
        (loss, grads, pass)
    }
}
