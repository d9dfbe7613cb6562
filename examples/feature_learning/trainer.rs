//! The optimiser step of each parametrisation, on the CPU or (spectral 3a) a CUDA device.
//! The orthogonalised rule steps on the CPU: the device backend does not run it yet.

use spectral_step::cuda::cudarc::driver::CudaSlice;
use spectral_step::cuda::{Cuda, CudaDevice};
use spectral_step::newton_schulz::{Schedule, UpdateRule};
use spectral_step::scaling::sgd_learning_rate_multiplier;
use spectral_step::{MatrixShape, SpectralSgd, SpectralSgdConfig};

use super::model::Mlp;
use super::parametrisation::{BASE_WIDTH, Parametrisation};

/// Updates the weights from gradients, per parametrisation. `planted_bug` multiplies every
/// update by an extra `1/sqrt(fan_in)`: a deliberately wrong scaling, which the tests use to
/// check that their science checks can fail.
pub struct Trainer {
    parametrisation: Parametrisation,
    learning_rate: f32,
    spectral: Option<SpectralSgd>,
    device: Option<DeviceEngine>,
    /// Scale every update by `1/sqrt(fan_in)`.
    pub planted_bug: bool,
}

impl Trainer {
    /// The optimiser of `parametrisation` for `model`: `SpectralSgd` (momentum 0.9) for
    /// spectral 3a, on the CUDA device if `cuda`, and with Muon's orthogonalised rule for
    /// spectral-orth, on the CPU; plain SGD otherwise.
    pub fn new(
        parametrisation: Parametrisation,
        learning_rate: f32,
        model: &Mlp,
        cuda: bool,
    ) -> spectral_step::Result<Self> {
        let config = SpectralSgdConfig {
            learning_rate,
            momentum: 0.9,
            ..SpectralSgdConfig::default()
        };
        let (spectral, device) = match parametrisation {
            Parametrisation::SpectralNormalised if cuda => (
                None,
                Some(DeviceEngine::new(&model.shapes, config, &model.weights)?),
            ),
            Parametrisation::SpectralNormalised => {
                (Some(SpectralSgd::new(&model.shapes, config)?), None)
            }
            Parametrisation::SpectralOrthogonalised => {
                let config = SpectralSgdConfig {
                    update: UpdateRule::Orthogonalised(Schedule::MUON),
                    ..config
                };
                (Some(SpectralSgd::new(&model.shapes, config)?), None)
            }
            _ => (None, None),
        };
        Ok(Self {
            parametrisation,
            learning_rate,
            spectral,
            device,
            planted_bug: false,
        })
    }

    /// One update of `model`'s weights from `grads`.
    pub fn step(&mut self, model: &mut Mlp, grads: &[Vec<f32>]) -> spectral_step::Result<()> {
        if let Some(engine) = &mut self.device {
            return engine.step(&mut model.weights, grads);
        }
        let bug = |shape: MatrixShape| {
            if self.planted_bug {
                1.0 / (shape.fan_in as f32).sqrt()
            } else {
                1.0
            }
        };
        if let Some(optimizer) = &mut self.spectral {
            let before = self.planted_bug.then(|| model.weights.clone());
            optimizer.step(&mut model.weights, grads)?;
            if let Some(before) = before {
                for ((w, b), &shape) in model.weights.iter_mut().zip(&before).zip(&model.shapes) {
                    let factor = bug(shape);
                    w.iter_mut()
                        .zip(b)
                        .for_each(|(w, b)| *w = b + factor * (*w - b));
                }
            }
            return Ok(());
        }
        for (layer, grad) in grads.iter().enumerate() {
            let shape = model.shapes[layer];
            let rate = bug(shape)
                * match self.parametrisation {
                    Parametrisation::Ntk => {
                        self.learning_rate * BASE_WIDTH as f32 / shape.fan_in as f32
                    }
                    Parametrisation::Standard => self.learning_rate,
                    Parametrisation::SpectralParametrisation => {
                        self.learning_rate * sgd_learning_rate_multiplier(shape)
                    }
                    Parametrisation::SpectralNormalised
                    | Parametrisation::SpectralOrthogonalised => unreachable!("handled above"),
                };
            model.weights[layer]
                .iter_mut()
                .zip(grad)
                .for_each(|(w, g)| *w -= rate * g);
        }
        Ok(())
    }
}

/// `SpectralSgd` on a CUDA device: gradients go up, the step runs there, weights come back
/// (the model's forward and backward passes stay on the CPU).
struct DeviceEngine {
    optimizer: SpectralSgd<Cuda>,
    weights: Vec<CudaSlice<f32>>,
    grads: Vec<CudaSlice<f32>>,
}

impl DeviceEngine {
    fn new(
        shapes: &[MatrixShape],
        config: SpectralSgdConfig,
        weights: &[Vec<f32>],
    ) -> spectral_step::Result<Self> {
        let optimizer = SpectralSgd::<Cuda>::on_device(shapes, config, CudaDevice::open(0)?)?;
        let stream = optimizer.device().stream().clone();
        let upload = |values: &[Vec<f32>]| -> spectral_step::Result<Vec<CudaSlice<f32>>> {
            values
                .iter()
                .map(|v| {
                    stream
                        .clone_htod(v)
                        .map_err(|e| spectral_step::Error::Cuda {
                            context: "uploading",
                            message: e.to_string(),
                        })
                })
                .collect()
        };
        let (weights, grads) = (upload(weights)?, upload(weights)?);
        Ok(Self {
            optimizer,
            weights,
            grads,
        })
    }

    fn step(&mut self, weights: &mut [Vec<f32>], grads: &[Vec<f32>]) -> spectral_step::Result<()> {
        let stream = self.optimizer.device().stream().clone();
        let error =
            |e: spectral_step::cuda::cudarc::driver::DriverError| spectral_step::Error::Cuda {
                context: "copying",
                message: e.to_string(),
            };
        for (device, host) in self.grads.iter_mut().zip(grads) {
            stream.memcpy_htod(host, device).map_err(error)?;
        }
        self.optimizer.step(&mut self.weights, &self.grads)?;
        for (device, host) in self.weights.iter().zip(weights.iter_mut()) {
            stream.memcpy_dtoh(device, host).map_err(error)?;
        }
        Ok(())
    }
}
