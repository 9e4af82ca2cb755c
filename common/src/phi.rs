//! φ, the optimizer's parameters, on the host: what files, the wire and Adam hold.

use crate::rng::Rng;
use crate::{Error, OptimizerConfig};

/// φ's tensors as flat f32 values in spec §4.1 order and shapes.
///
/// Gradients with respect to φ use the same type: same names, same shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct Phi {
    /// The configuration that fixes the tensors' shapes.
    pub config: OptimizerConfig,
    /// One row-major vector per tensor of [`OptimizerConfig::tensor_layout`].
    pub tensors: Vec<Vec<f32>>,
}

impl Phi {
    /// A fresh φ initialised from `seed` as spec §1.6 says.
    ///
    /// Draw order (see [`crate::rng`]): for each layer `w_x` then `w_h` row-major, then
    /// `out.w`, each entry `uniform_in(-1/sqrt(H), 1/sqrt(H))` rounded to f32.
    pub fn init(config: OptimizerConfig, seed: u64) -> Result<Self, Error> {
        config.validate()?;
        let mut rng = Rng::new(seed);
        let bound = 1.0 / (config.hidden as f64).sqrt();
        let h = config.hidden;
        let tensors = config
            .tensor_layout()
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                if name.ends_with(".b") {
                    // Forget-gate block (columns H..2H) starts at 1.0, the rest at 0.
                    (0..n)
                        .map(|j| if (h..2 * h).contains(&j) { 1.0 } else { 0.0 })
                        .collect()
                } else if name == "out.b" {
                    vec![0.0; n]
                } else {
                    (0..n)
                        .map(|_| rng.uniform_in(-bound, bound) as f32)
                        .collect()
                }
            })
            .collect();
        Ok(Self { config, tensors })
    }

    /// All zeros, shaped for `config` (a gradient accumulator).
    pub fn zeros(config: OptimizerConfig) -> Self {
        let tensors = config
            .tensor_layout()
            .iter()
            .map(|(_, s)| vec![0.0; s.iter().product()])
            .collect();
        Self { config, tensors }
    }

    /// Builds φ from tensors, checking their count, sizes and finiteness.
    pub fn from_tensors(config: OptimizerConfig, tensors: Vec<Vec<f32>>) -> Result<Self, Error> {
        config.validate()?;
        let layout = config.tensor_layout();
        if tensors.len() != layout.len() {
            return Err(Error::Shape(format!(
                "{} tensors given, the configuration needs {}",
                tensors.len(),
                layout.len()
            )));
        }
        for ((name, shape), t) in layout.iter().zip(&tensors) {
            let n: usize = shape.iter().product();
            if t.len() != n {
                return Err(Error::Shape(format!(
                    "{name} has {} values, shape {shape:?} needs {n}",
                    t.len()
                )));
            }
            if let Some(i) = t.iter().position(|v| !v.is_finite()) {
                return Err(Error::NonFinite(format!("{name}[{i}] = {}", t[i])));
            }
        }
        Ok(Self { config, tensors })
    }

    /// All values concatenated in spec order.
    pub fn flatten(&self) -> Vec<f32> {
        self.tensors.concat()
    }

    /// Splits a flat vector (as from [`Phi::flatten`]) back into tensors.
    pub fn unflatten(config: OptimizerConfig, flat: &[f32]) -> Result<Self, Error> {
        let want = config.num_params();
        if flat.len() != want {
            return Err(Error::Shape(format!(
                "{} values given, the configuration needs {want}",
                flat.len()
            )));
        }
        let mut rest = flat;
        let tensors = config
            .tensor_layout()
            .iter()
            .map(|(_, s)| {
                let (head, tail) = rest.split_at(s.iter().product());
                rest = tail;
                head.to_vec()
            })
            .collect();
        Self::from_tensors(config, tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Preprocess;

    #[test]
    fn init_follows_spec_1_6() {
        let cfg = OptimizerConfig::new(Preprocess::LogSign);
        let phi = Phi::init(cfg, 42).unwrap();
        let bound = 1.0 / (20f32).sqrt();
        for ((name, _), t) in cfg.tensor_layout().iter().zip(&phi.tensors) {
            if name.ends_with(".b") {
                // b = 0 except the forget block, columns H..2H, which is 1.
                for (j, &v) in t.iter().enumerate() {
                    let want = if (20..40).contains(&j) { 1.0 } else { 0.0 };
                    assert_eq!(v, want, "{name}[{j}]");
                }
            } else if name == "out.b" {
                assert_eq!(t, &vec![0.0]);
            } else {
                assert!(t.iter().all(|v| v.abs() <= bound), "{name} out of bounds");
                assert!(t.iter().any(|v| *v != 0.0), "{name} not drawn");
            }
        }
        assert_eq!(phi, Phi::init(cfg, 42).unwrap(), "same seed, same φ");
        assert_ne!(phi, Phi::init(cfg, 43).unwrap(), "another seed, another φ");
    }

    #[test]
    fn flatten_round_trips() {
        let cfg = OptimizerConfig::new(Preprocess::Identity);
        let phi = Phi::init(cfg, 1).unwrap();
        let flat = phi.flatten();
        assert_eq!(flat.len(), 5061);
        assert_eq!(Phi::unflatten(cfg, &flat).unwrap(), phi);
        assert!(Phi::unflatten(cfg, &flat[1..]).is_err());
    }
}
