//! The model every candle adapter test steps: parameters of every kind, seeded values and
//! gradients, on the CPU (the CUDA tests move them to the device).

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use spectral_step::{Element, MatrixShape};

use crate::common::{assert_same_bits, random_matrix};

/// A tensor of `dims` with seeded N(0, scale²) values of element type `T`.
pub fn seeded<T: Element + candle_core::WithDType>(
    dims: &[usize],
    scale: f64,
    seed: u64,
) -> Tensor {
    let elements: usize = dims.iter().product();
    let values: Vec<T> = random_matrix(MatrixShape::new(elements, 1), scale, seed);
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

pub fn values<T: candle_core::WithDType>(tensor: &Tensor) -> Vec<T> {
    tensor.flatten_all().unwrap().to_vec1().unwrap()
}

/// Parameters of every kind: a linear layer, a convolution kernel, a stack of experts, an
/// embedding, a head and two vectors.
pub const MODEL: [(&str, &[usize]); 7] = [
    ("blocks.0.fc.weight", &[24, 16]),
    ("blocks.0.fc.bias", &[24]),
    ("conv.weight", &[8, 3, 3, 3]),
    ("experts.weight", &[3, 12, 16]),
    ("tok_embed.weight", &[40, 16]),
    ("head.weight", &[5, 24]),
    ("norm.weight", &[16]),
];

pub fn named_vars<T: Element + candle_core::WithDType>(seed: u64) -> Vec<(String, Var)> {
    MODEL
        .iter()
        .enumerate()
        .map(|(index, (name, dims))| {
            let tensor = seeded::<T>(dims, 0.5, seed + index as u64);
            ((*name).to_owned(), Var::from_tensor(&tensor).unwrap())
        })
        .collect()
}

pub fn gradients<T: Element + candle_core::WithDType>(
    vars: &[(String, Var)],
    seed: u64,
) -> GradStore {
    let mut grads = GradStore::default();
    for (index, (_, var)) in vars.iter().enumerate() {
        grads.insert(
            var.as_tensor(),
            seeded::<T>(var.dims(), 1.0, seed + index as u64),
        );
    }
    grads
}

/// The spectral matrices of [`MODEL`] under the default routing, in the adapter's order.
pub fn spectral_shapes() -> Vec<MatrixShape> {
    let mut shapes = vec![MatrixShape::new(24, 16), MatrixShape::new(8, 27)];
    shapes.extend([MatrixShape::new(12, 16); 3]);
    shapes.push(MatrixShape::new(5, 24));
    shapes
}

/// The positions in [`MODEL`] of its spectral parameters under the default routing.
pub const SPECTRAL_PARAMS: [usize; 4] = [0, 2, 3, 5];

/// Every variable of `a` equals its counterpart in `b` bit for bit.
pub fn assert_same_vars<T: Element + candle_core::WithDType>(
    a: &[(String, Var)],
    b: &[(String, Var)],
) {
    assert_eq!(a.len(), b.len());
    for ((name, a), (_, b)) in a.iter().zip(b) {
        assert_same_bits(
            name,
            &values::<T>(a.as_tensor()),
            &values::<T>(b.as_tensor()),
        );
    }
}
