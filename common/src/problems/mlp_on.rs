//! The MNIST network of [`Mlp`] on a burn device, for unrolls off the host (a GPU).
//!
//! The same function as [`Mlp::loss_grad`]: the same θ layout, minibatches and loss; the
//! data set's images and one-hot labels are put on the device once ([`DatasetOn`]) and
//! every step's minibatch is gathered there from its indices (the only upload per step). The loss is built from tensor ops (so autodiff
//! reaches θ through it); the gradient is backpropagated by hand off the graph, a constant
//! as spec §2 asks.

use burn::tensor::activation::{relu, sigmoid, softmax};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use crate::problems::Problem;
use crate::problems::mlp::{Activation, CLASSES, Mlp};
use crate::problems::mnist::Dataset;
use crate::tensor::from_f32;

/// A data set on a device: images scaled to [0, 1] `[examples, pixels]` and one-hot
/// labels `[examples, 10]`.
#[derive(Debug, Clone)]
pub struct DatasetOn {
    pub(crate) images: Tensor<2>,
    pub(crate) onehot: Tensor<2>,
}

impl DatasetOn {
    /// Copies `data` to `device` (once per data set: a worker shares it between leases).
    pub fn new(data: &Dataset, device: &Device, dtype: DType) -> Self {
        let values: Vec<f32> = (0..data.len()).flat_map(|i| data.image(i)).collect();
        let mut onehot = vec![0f32; data.len() * CLASSES];
        for (i, y) in data.labels.iter().enumerate() {
            onehot[i * CLASSES + *y as usize] = 1.0;
        }
        Self {
            images: from_f32(&values, [data.len(), data.pixels], device, dtype),
            onehot: from_f32(&onehot, [data.len(), CLASSES], device, dtype),
        }
    }
}

/// An [`Mlp`] instance whose steps run on the device of its [`DatasetOn`].
#[derive(Debug, Clone)]
pub struct MlpOn {
    mlp: Mlp,
    data: DatasetOn,
}

impl Mlp {
    /// The instance on `data`'s device; `data` must hold this instance's data set.
    pub fn on(&self, data: &DatasetOn) -> MlpOn {
        MlpOn {
            mlp: self.clone(),
            data: data.clone(),
        }
    }
}

/// One layer's weights `[inputs, outputs]` and bias `[1, outputs]`, cut from θ.
type Layer = (Tensor<2>, Tensor<2>);

impl MlpOn {
    /// Step `step`'s inputs `[rows, pixels]` and one-hot labels `[rows, 10]`.
    fn batch(&self, step: usize, inner: bool) -> (Tensor<2>, Tensor<2>) {
        let idx: Vec<i64> = self.mlp.batch(step).iter().map(|i| *i as i64).collect();
        let (mut images, mut onehot) = (self.data.images.clone(), self.data.onehot.clone());
        if inner {
            (images, onehot) = (images.inner(), onehot.inner());
        }
        let rows = idx.len();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [rows]), &images.device());
        (images.select(0, idx.clone()), onehot.select(0, idx))
    }

    /// Every layer's parameters as views of θ `[N, 1]`.
    fn layers(&self, theta: &Tensor<2>) -> Vec<Layer> {
        let mut off = 0;
        self.mlp
            .spec
            .layers(self.mlp.data.pixels)
            .into_iter()
            .map(|(ni, no)| {
                let w = theta.clone().narrow(0, off, ni * no).reshape([ni, no]);
                let b = theta.clone().narrow(0, off + ni * no, no).reshape([1, no]);
                off += ni * no + no;
                (w, b)
            })
            .collect()
    }

    fn activate(&self, z: Tensor<2>) -> Tensor<2> {
        match self.mlp.spec.activation {
            Activation::Sigmoid => sigmoid(z),
            Activation::Relu => relu(z),
        }
    }

    /// The inputs of every layer and the logits.
    fn forward(&self, layers: &[Layer], x: Tensor<2>) -> (Vec<Tensor<2>>, Tensor<2>) {
        let mut acts = vec![x];
        let last = layers.len() - 1;
        for (l, (w, b)) in layers.iter().enumerate() {
            let a = acts[l].clone();
            let z = a.matmul(w.clone()) + b.clone();
            if l == last {
                return (acts, z);
            }
            acts.push(self.activate(z));
        }
        unreachable!("an mlp has an output layer")
    }
}

impl Problem for MlpOn {
    fn num_coords(&self) -> usize {
        self.mlp.theta0.len()
    }

    /// Mean softmax cross-entropy of step t's minibatch.
    fn loss(&self, theta: Tensor<2>, step: usize) -> Tensor<1> {
        let (x, onehot) = self.batch(step, false);
        let layers = self.layers(&theta);
        let (_, z) = self.forward(&layers, x);
        // log Σ e^z, shifted by the row maximum (a constant: the result does not depend on it).
        let m = z.clone().detach().max_dim(1);
        let lse = (z.clone() - m.clone()).exp().sum_dim(1).log() + m;
        (lse - (z * onehot).sum_dim(1)).mean()
    }

    /// Backpropagation by hand: dz = (softmax − onehot)/rows at the output, then
    /// ∂W = aᵀ dz, ∂b = Σ_rows dz, and dz ← (dz Wᵀ) ⊙ act′ one layer down.
    fn grad(&self, theta: Tensor<2>, step: usize) -> Tensor<2> {
        let (x, onehot) = self.batch(step, true);
        let layers = self.layers(&theta.inner());
        let (acts, z) = self.forward(&layers, x);
        let rows = onehot.dims()[0];
        let mut dz = (softmax(z, 1) - onehot).div_scalar(rows as f64);
        let mut pieces = Vec::with_capacity(2 * layers.len());
        for (l, (w, _)) in layers.iter().enumerate().rev() {
            let [ni, no] = w.dims();
            let a = acts[l].clone();
            let gw = a
                .clone()
                .transpose()
                .matmul(dz.clone())
                .reshape([ni * no, 1]);
            let gb = dz.clone().sum_dim(0).reshape([no, 1]);
            pieces.push(gb);
            pieces.push(gw);
            if l > 0 {
                let da = dz.matmul(w.clone().transpose());
                dz = match self.mlp.spec.activation {
                    Activation::Sigmoid => da * a.clone() * (a.neg() + 1.0),
                    // a = max(0, z): the slope is 1 where a > 0, else 0.
                    Activation::Relu => da.mask_fill(a.lower_equal_elem(0.0), 0.0),
                };
            }
        }
        pieces.reverse();
        Tensor::cat(pieces, 0)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::problems::mlp::MlpSpec;
    use crate::rng::Rng;
    use crate::tensor::{from_f64, to_f64};

    /// 9 examples of 6 pixels, all bytes drawn, labels cycling through the classes.
    fn tiny() -> Arc<Dataset> {
        let mut rng = Rng::new(8);
        Arc::new(Dataset {
            pixels: 6,
            shape: [1, 1, 6],
            images: (0..9 * 6).map(|_| rng.below(256) as u8).collect(),
            labels: (0..9).map(|i| (i * 7 % 10) as u8).collect(),
        })
    }

    /// The device network agrees with the host one (itself checked against finite
    /// differences) in f64, for both activations and one and two hidden layers, at a θ
    /// far from θ₀ so every unit is off its linear regime.
    #[test]
    fn device_loss_and_gradient_match_the_host_network() {
        let dev = Device::flex();
        for (hidden, activation) in [
            (vec![5], Activation::Sigmoid),
            (vec![4, 3], Activation::Relu),
        ] {
            let spec = MlpSpec {
                hidden,
                activation,
                batch: 8,
            };
            let m = Mlp::new(spec, tiny(), 4).unwrap();
            let mut rng = Rng::new(5);
            let theta: Vec<f64> = (0..m.theta0.len()).map(|_| 0.7 * rng.normal()).collect();
            let mut want_g = vec![0f64; theta.len()];
            let data = DatasetOn::new(&m.data, &dev, DType::F64);
            let on = m.on(&data);
            for step in [0, 3] {
                let want = m.loss_grad(&theta, step, &mut want_g);
                let t = from_f64(&theta, [theta.len(), 1], &dev, DType::F64);
                let loss = to_f64(&on.loss(t.clone(), step)).unwrap()[0];
                let g = to_f64(&on.grad(t, step)).unwrap();
                assert!((loss - want).abs() < 1e-12, "{loss} vs {want}");
                let worst = g
                    .iter()
                    .zip(&want_g)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                assert!(worst < 1e-12, "gradient off by {worst}");
                assert!(
                    want_g.iter().any(|v| v.abs() > 1e-3),
                    "a gradient to compare"
                );
            }
        }
    }

    /// The loss's autodiff gradient is the hand-written one: what the meta-gradient sees
    /// through f_t(θ_t) is the g_t the optimizer is fed.
    #[test]
    fn autodiff_through_the_loss_equals_the_hand_gradient() {
        let dev = Device::flex().autodiff();
        let m = Mlp::new(MlpSpec::default(), tiny(), 2).unwrap();
        let on = m.on(&DatasetOn::new(&m.data, &dev, DType::F64));
        let mut rng = Rng::new(1);
        let theta: Vec<f64> = (0..m.theta0.len()).map(|_| 0.3 * rng.normal()).collect();
        let t = from_f64(&theta, [theta.len(), 1], &dev, DType::F64).require_grad();
        let grads = on.loss(t.clone(), 1).backward();
        let auto = to_f64(&t.grad(&grads).unwrap()).unwrap();
        let hand = to_f64(&on.grad(t, 1)).unwrap();
        for (a, h) in auto.iter().zip(&hand) {
            assert!((a - h).abs() <= 1e-12 * (1.0 + a.abs()), "{a} vs {h}");
        }
    }
}
