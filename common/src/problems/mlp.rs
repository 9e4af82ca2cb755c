//! `mlp`: the paper's MNIST network (spec §3.2) and its variants, on the host.
//!
//! 784 inputs scaled to [0, 1], hidden layers of sigmoid (or ReLU) units, 10 outputs,
//! softmax cross-entropy averaged over a minibatch of 128 examples drawn uniformly with
//! replacement at every step; every weight and bias starts ~ N(0, 0.01²). θ holds, layer
//! by layer, the weights `[inputs, outputs]` row-major and then the biases.
//!
//! The minibatch of step t is a function of (seed, t) only, so every worker, evaluator and
//! baseline sees the same batches for the same instance.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use num_traits::Float;

use crate::Error;
use crate::problems::mnist::Dataset;
use crate::problems::{HostProblem, MAX_MLP_LAYERS, MAX_VALUES, Params};
use crate::rng::Rng;

/// Classes of the output layer.
pub const CLASSES: usize = 10;

/// The hidden units' nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// 1 / (1 + e^−z), the paper's.
    Sigmoid,
    /// max(0, z), the paper's failure case.
    Relu,
}

impl Activation {
    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Sigmoid => "sigmoid",
            Activation::Relu => "relu",
        }
    }
}

impl FromStr for Activation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "sigmoid" => Ok(Activation::Sigmoid),
            "relu" => Ok(Activation::Relu),
            _ => Err(Error::Config(format!(
                "unknown activation {s:?}; use sigmoid or relu"
            ))),
        }
    }
}

/// The network's shape and minibatch size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlpSpec {
    /// Width of each hidden layer (the paper: one of 20).
    pub hidden: Vec<usize>,
    /// Nonlinearity of the hidden layers.
    pub activation: Activation,
    /// Examples per minibatch.
    pub batch: usize,
}

impl Default for MlpSpec {
    fn default() -> Self {
        Self {
            hidden: vec![20],
            activation: Activation::Sigmoid,
            batch: 128,
        }
    }
}

impl MlpSpec {
    /// (inputs, outputs) of every layer, hidden ones first, for `pixels` inputs.
    pub fn layers(&self, pixels: usize) -> Vec<(usize, usize)> {
        let mut widths = vec![pixels];
        widths.extend(&self.hidden);
        widths.push(CLASSES);
        widths.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// Parameters of the network for `pixels` inputs (15,910 for the paper's).
    pub fn num_params(&self, pixels: usize) -> usize {
        self.layers(pixels).iter().map(|(i, o)| i * o + o).sum()
    }

    /// Refuses shapes that cannot train.
    pub fn validate(&self) -> Result<(), Error> {
        if self.hidden.is_empty() || self.hidden.contains(&0) {
            return Err(Error::Config(format!(
                "mlp hidden layers must be at least one positive width, got {:?}",
                self.hidden
            )));
        }
        if self.batch == 0 {
            return Err(Error::Config("mlp batch must be positive".into()));
        }
        Ok(())
    }

    /// Reads `hidden` (widths joined by `x`), `act` (or `activation`) and `batch`;
    /// defaults: the paper's network. Refuses other keys and sizes beyond
    /// [`MAX_VALUES`] weights or [`MAX_MLP_LAYERS`] layers.
    pub fn parse(params: &Params) -> Result<Self, Error> {
        let mut m = MlpSpec::default();
        for &(k, v) in params.pairs() {
            match k {
                "hidden" => {
                    m.hidden = v
                        .split('x')
                        .map(|w| params.count(w))
                        .collect::<Result<_, _>>()?
                }
                "act" | "activation" => m.activation = v.parse()?,
                "batch" => m.batch = params.count(v)?,
                _ => return Err(params.unknown(k, "hidden, act, batch")),
            }
        }
        if m.hidden.len() > MAX_MLP_LAYERS {
            return Err(params.bad(format!(
                "{} hidden layers; at most {MAX_MLP_LAYERS}",
                m.hidden.len()
            )));
        }
        let mut widths = vec![784u128];
        widths.extend(m.hidden.iter().map(|h| *h as u128));
        widths.push(CLASSES as u128);
        let weights: u128 = widths.windows(2).map(|w| w[0] * w[1] + w[1]).sum();
        if weights > MAX_VALUES as u128 {
            return Err(params.bad(format!("{weights} weights; at most {MAX_VALUES}")));
        }
        Ok(m)
    }

    /// Every parameter, as [`MlpSpec::parse`] reads them.
    pub fn params(&self) -> BTreeMap<String, String> {
        let h: Vec<String> = self.hidden.iter().map(|h| h.to_string()).collect();
        BTreeMap::from([
            ("hidden".to_string(), h.join("x")),
            ("act".to_string(), self.activation.name().to_string()),
            ("batch".to_string(), self.batch.to_string()),
        ])
    }

    /// A short name: `mlp-20-sigmoid`, `mlp-20x20-relu`.
    pub fn name(&self) -> String {
        let h: Vec<String> = self.hidden.iter().map(|h| h.to_string()).collect();
        format!("mlp-{}-{}", h.join("x"), self.activation.name())
    }
}

/// Σ over rows of the softmax cross-entropy of logits `z` (`[rows, 10]`) against
/// `labels`, replacing `z` by its gradient of the *mean*: (softmax − onehot) / rows.
pub(crate) fn softmax_cross_entropy<T: Float>(
    z: &mut [T],
    labels: impl Iterator<Item = usize>,
) -> T {
    let rows = z.len() / CLASSES;
    let inv = T::one() / T::from(rows).unwrap_or_else(T::one);
    let mut loss = T::zero();
    for (zr, y) in z.chunks_mut(CLASSES).zip(labels) {
        let m = zr.iter().copied().fold(T::neg_infinity(), T::max);
        let sum = zr.iter().fold(T::zero(), |s, v| s + (*v - m).exp());
        loss = loss + (m + sum.ln() - zr[y]);
        for (j, v) in zr.iter_mut().enumerate() {
            let p = (*v - m).exp() / sum;
            *v = (p - if j == y { T::one() } else { T::zero() }) * inv;
        }
    }
    loss
}

/// One instance: a network's θ₀ and its minibatches, drawn from a seed.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// The network's shape.
    pub spec: MlpSpec,
    /// The examples minibatches are drawn from.
    pub data: Arc<Dataset>,
    /// The instance's seed.
    pub seed: u64,
    /// θ₀, every entry ~ N(0, 0.01²).
    pub theta0: Vec<f32>,
}

impl Mlp {
    /// The instance of `seed`: θ₀ from `Rng::new(seed)`, batches from (seed, step).
    pub fn new(spec: MlpSpec, data: Arc<Dataset>, seed: u64) -> Result<Self, Error> {
        spec.validate()?;
        if data.is_empty() {
            return Err(Error::Config("the mlp's data set has no examples".into()));
        }
        let weights = spec.num_params(data.pixels);
        if weights > MAX_VALUES {
            return Err(Error::Config(format!(
                "mlp: {weights} weights for images of {} pixels; at most {MAX_VALUES}",
                data.pixels
            )));
        }
        let mut rng = Rng::new(seed);
        let theta0 = (0..spec.num_params(data.pixels))
            .map(|_| (0.01 * rng.normal()) as f32)
            .collect();
        Ok(Self {
            spec,
            data,
            seed,
            theta0,
        })
    }

    /// Indices of step `step`'s minibatch, uniform with replacement.
    pub fn batch(&self, step: usize) -> Vec<usize> {
        let mut rng = Rng::for_step(self.seed, 0x6d6c_705f_6261_7463, step);
        let n = self.data.len() as u64;
        (0..self.spec.batch)
            .map(|_| rng.below(n) as usize)
            .collect()
    }

    /// f_t(θ) and ∇f_t(θ) (written into `grad`), in any float type.
    pub fn loss_grad<T: Float>(&self, theta: &[T], step: usize, grad: &mut [T]) -> T {
        let idx = self.batch(step);
        let rows = idx.len();
        let layers = self.spec.layers(self.data.pixels);
        let to = |v: f32| T::from(v).unwrap_or_else(T::zero);
        // acts[l]: the input of layer l, rows × inputs.
        let mut acts: Vec<Vec<T>> = Vec::with_capacity(layers.len());
        acts.push(
            idx.iter()
                .flat_map(|i| self.data.image(*i).map(to))
                .collect(),
        );
        let mut offsets = Vec::with_capacity(layers.len());
        let mut off = 0;
        let mut z = Vec::new();
        for (l, (ni, no)) in layers.iter().copied().enumerate() {
            offsets.push(off);
            let (w, b) = (
                &theta[off..off + ni * no],
                &theta[off + ni * no..off + ni * no + no],
            );
            off += ni * no + no;
            let a = &acts[l];
            z = vec![T::zero(); rows * no];
            for r in 0..rows {
                let zr = &mut z[r * no..(r + 1) * no];
                zr.copy_from_slice(b);
                for (k, av) in a[r * ni..(r + 1) * ni].iter().enumerate() {
                    if av.is_zero() {
                        continue;
                    }
                    for (zj, wj) in zr.iter_mut().zip(&w[k * no..(k + 1) * no]) {
                        *zj = *zj + *av * *wj;
                    }
                }
            }
            if l + 1 < layers.len() {
                let act = match self.spec.activation {
                    Activation::Sigmoid => z
                        .iter()
                        .map(|v| T::one() / (T::one() + (-*v).exp()))
                        .collect(),
                    Activation::Relu => z.iter().map(|v| v.max(T::zero())).collect(),
                };
                acts.push(act);
            }
        }
        let inv = T::one() / T::from(rows).unwrap_or_else(T::one);
        let labels = idx.iter().map(|i| self.data.labels[*i] as usize);
        let loss = softmax_cross_entropy(&mut z, labels);
        grad.iter_mut().for_each(|g| *g = T::zero());
        let mut dz = z;
        for (l, (ni, no)) in layers.iter().copied().enumerate().rev() {
            let off = offsets[l];
            let a = &acts[l];
            {
                let (gw, gb) = grad[off..off + ni * no + no].split_at_mut(ni * no);
                for r in 0..rows {
                    let dzr = &dz[r * no..(r + 1) * no];
                    for (gbj, d) in gb.iter_mut().zip(dzr) {
                        *gbj = *gbj + *d;
                    }
                    for (k, av) in a[r * ni..(r + 1) * ni].iter().enumerate() {
                        if av.is_zero() {
                            continue;
                        }
                        for (g, d) in gw[k * no..(k + 1) * no].iter_mut().zip(dzr) {
                            *g = *g + *av * *d;
                        }
                    }
                }
            }
            if l == 0 {
                break;
            }
            // dz of the layer below: (dz Wᵀ) ⊙ act'(its output).
            let w = &theta[off..off + ni * no];
            let mut below = vec![T::zero(); rows * ni];
            for r in 0..rows {
                let dzr = &dz[r * no..(r + 1) * no];
                for k in 0..ni {
                    let s = w[k * no..(k + 1) * no]
                        .iter()
                        .zip(dzr)
                        .fold(T::zero(), |s, (wv, d)| s + *wv * *d);
                    let av = a[r * ni + k];
                    let d = match self.spec.activation {
                        Activation::Sigmoid => av * (T::one() - av),
                        Activation::Relu => {
                            if av > T::zero() {
                                T::one()
                            } else {
                                T::zero()
                            }
                        }
                    };
                    below[r * ni + k] = s * d;
                }
            }
            dz = below;
        }
        loss * inv
    }
}

impl HostProblem for Mlp {
    fn num_coords(&self) -> usize {
        self.theta0.len()
    }

    fn eval(&self, theta: &[f32], step: usize, grad: &mut [f32]) -> f64 {
        self.loss_grad(theta, step, grad) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny data set: 7 examples of 5 pixels, some zero, all classes used.
    fn tiny() -> Arc<Dataset> {
        let mut rng = Rng::new(3);
        let images = (0..7 * 5)
            .map(|i| if i % 4 == 0 { 0 } else { rng.below(256) as u8 })
            .collect();
        Arc::new(Dataset {
            pixels: 5,
            shape: [1, 1, 5],
            images,
            labels: vec![0, 3, 9, 1, 3, 7, 5],
        })
    }

    #[test]
    fn the_papers_network_has_15910_parameters() {
        assert_eq!(MlpSpec::default().num_params(784), 15_910);
        let two = MlpSpec {
            hidden: vec![20, 20],
            ..MlpSpec::default()
        };
        assert_eq!(two.num_params(784), 15_910 + 20 * 20 + 20);
        assert_eq!(two.name(), "mlp-20x20-sigmoid");
    }

    #[test]
    fn at_theta_zero_the_loss_is_ln_10_whatever_the_data() {
        let m = Mlp::new(MlpSpec::default(), tiny(), 1).unwrap();
        let theta = vec![0f64; m.theta0.len()];
        let mut g = vec![0f64; theta.len()];
        let loss = m.loss_grad(&theta, 0, &mut g);
        assert!((loss - 10f64.ln()).abs() < 1e-12, "{loss}");
        // Output biases: mean over the batch of (1/10 − onehot).
        let spec = MlpSpec::default();
        let ob = spec.num_params(5) - CLASSES;
        let labels: Vec<u8> = m.batch(0).iter().map(|i| m.data.labels[*i]).collect();
        for j in 0..CLASSES {
            let count = labels.iter().filter(|y| **y as usize == j).count() as f64;
            let want = 0.1 - count / labels.len() as f64;
            assert!(
                (g[ob + j] - want).abs() < 1e-12,
                "bias {j}: {} vs {want}",
                g[ob + j]
            );
        }
    }

    #[test]
    fn gradients_match_central_differences_in_f64() {
        for (hidden, activation) in [
            (vec![4], Activation::Sigmoid),
            (vec![3, 4], Activation::Sigmoid),
            (vec![4], Activation::Relu),
        ] {
            let spec = MlpSpec {
                hidden,
                activation,
                batch: 6,
            };
            let m = Mlp::new(spec, tiny(), 11).unwrap();
            // Larger weights than θ₀ so every term matters.
            let mut rng = Rng::new(5);
            let theta: Vec<f64> = (0..m.theta0.len()).map(|_| 0.5 * rng.normal()).collect();
            let mut g = vec![0f64; theta.len()];
            m.loss_grad(&theta, 2, &mut g);
            let h = 1e-6;
            let mut worst = 0f64;
            for i in 0..theta.len() {
                let (mut p, mut q) = (theta.clone(), theta.clone());
                p[i] += h;
                q[i] -= h;
                let mut scratch = vec![0f64; theta.len()];
                let fd = (m.loss_grad(&p, 2, &mut scratch) - m.loss_grad(&q, 2, &mut scratch))
                    / (2.0 * h);
                worst = worst.max((fd - g[i]).abs() / (fd.abs() + g[i].abs()).max(1e-6));
            }
            assert!(
                worst < 1e-6,
                "{}: worst relative error {worst:e}",
                m.spec.name()
            );
        }
    }

    #[test]
    fn batches_depend_on_seed_and_step_only() {
        let m = Mlp::new(MlpSpec::default(), tiny(), 4).unwrap();
        let again = Mlp::new(MlpSpec::default(), tiny(), 4).unwrap();
        assert_eq!(m.batch(3), again.batch(3));
        assert_eq!(m.theta0, again.theta0);
        assert_ne!(m.batch(3), m.batch(4));
        assert!(m.batch(0).iter().all(|i| *i < 7));
        let f32_loss = m.eval(&m.theta0, 0, &mut vec![0f32; m.theta0.len()]);
        assert!(
            (f32_loss - 10f64.ln()).abs() < 0.05,
            "θ₀ ≈ 0: loss ≈ ln 10, got {f32_loss}"
        );
    }
}
