//! The convolutional network of [`Conv`] on a burn device, for unrolls off the host.
//!
//! The same function as [`Conv::loss_grad`] (same θ layout, minibatches, batch
//! statistics and loss), built from burn's convolution, pooling and tensor ops, so
//! autodiff reaches θ through the loss. The gradient g_t is that loss's gradient taken on
//! a copy of θ cut from the unroll's graph: a constant, as spec §2 asks.

use burn::tensor::activation::relu;
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Int, Tensor, TensorData};

use crate::problems::Problem;
use crate::problems::conv::{BLOCKS, BN_EPS, Conv, KERNEL};
use crate::problems::mlp::CLASSES;
use crate::problems::mlp_on::DatasetOn;

/// A [`Conv`] instance whose steps run on the device of its [`DatasetOn`].
#[derive(Debug, Clone)]
pub struct ConvOn {
    conv: Conv,
    data: DatasetOn,
}

impl Conv {
    /// The instance on `data`'s device; `data` must hold this instance's data set.
    pub fn on(&self, data: &DatasetOn) -> ConvOn {
        ConvOn {
            conv: self.clone(),
            data: data.clone(),
        }
    }
}

/// Batch normalisation with batch statistics, averaged over the dimensions `dims` (biased
/// variance, no scale or shift).
fn normalise<const D: usize>(z: Tensor<D>, dims: &[usize]) -> Tensor<D> {
    let mean = dims.iter().fold(z.clone(), |t, d| t.mean_dim(*d));
    let centred = z - mean;
    let var = dims
        .iter()
        .fold(centred.clone() * centred.clone(), |t, d| t.mean_dim(*d));
    centred / var.add_scalar(BN_EPS).sqrt()
}

impl ConvOn {
    /// Step `step`'s images `[B, C, H, W]` and one-hot labels `[B, 10]`.
    fn batch(&self, step: usize) -> (Tensor<4>, Tensor<2>) {
        let idx: Vec<i64> = self.conv.batch(step).iter().map(|i| *i as i64).collect();
        let rows = idx.len();
        let device = self.data.images.device();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [rows]), &device);
        let [c, h, w] = self.conv.data.shape;
        (
            self.data
                .images
                .clone()
                .select(0, idx.clone())
                .reshape([rows, c, h, w]),
            self.data.onehot.clone().select(0, idx),
        )
    }

    /// The mean cross-entropy of the minibatch `x`, `onehot` at θ `[N, 1]`.
    fn loss_of(&self, theta: Tensor<2>, x: Tensor<4>, onehot: Tensor<2>) -> Tensor<1> {
        let s = self.conv.layout();
        let piece = |at: usize, n: usize| theta.clone().narrow(0, at, n);
        let rows = onehot.dims()[0];
        let mut a = x;
        for l in 0..BLOCKS {
            let cin = a.dims()[1];
            let k =
                piece(s.k[l], s.ch * cin * KERNEL * KERNEL).reshape([s.ch, cin, KERNEL, KERNEL]);
            let z = conv2d(a, k, None, ConvOptions::new([1, 1], [2, 2], [1, 1], 1));
            let y = normalise(z, &[0, 2, 3]) + piece(s.beta[l], s.ch).reshape([1, s.ch, 1, 1]);
            a = max_pool2d(relu(y), MaxPoolOptions::new([2, 2]));
        }
        let f = a.reshape([rows, s.features]);
        let z4 = f.matmul(piece(s.w4, s.features * s.hidden).reshape([s.features, s.hidden]));
        let a4 = relu(normalise(z4, &[0]) + piece(s.beta4, s.hidden).reshape([1, s.hidden]));
        let z5 = a4.matmul(piece(s.w5, s.hidden * CLASSES).reshape([s.hidden, CLASSES]))
            + piece(s.b5, CLASSES).reshape([1, CLASSES]);
        // log Σ e^z, shifted by the row maximum (a constant: the result does not depend on it).
        let m = z5.clone().detach().max_dim(1);
        let lse = (z5.clone() - m.clone()).exp().sum_dim(1).log() + m;
        (lse - (z5 * onehot).sum_dim(1)).mean()
    }
}

impl Problem for ConvOn {
    fn num_coords(&self) -> usize {
        self.conv.theta0.len()
    }

    fn loss(&self, theta: Tensor<2>, step: usize) -> Tensor<1> {
        let (x, onehot) = self.batch(step);
        self.loss_of(theta, x, onehot)
    }

    fn grad(&self, theta: Tensor<2>, step: usize) -> Tensor<2> {
        let (mut x, mut onehot) = self.batch(step);
        // A leaf of its own graph: g_t never reaches back into the unroll's.
        let lift = !theta.is_autodiff();
        let t = if lift {
            (x, onehot) = (x.autodiff(), onehot.autodiff());
            theta.autodiff()
        } else {
            theta.detach()
        }
        .require_grad();
        let grads = self.loss_of(t.clone(), x, onehot).backward();
        t.grad(&grads).unwrap_or_else(|| t.zeros_like().inner())
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, Device};

    use super::*;
    use crate::problems::conv::ConvSpec;
    use crate::problems::conv::tests::{images, small};
    use crate::rng::Rng;
    use crate::tensor::{from_f64, to_f64};

    /// The device network agrees with the host one (itself checked against finite
    /// differences) in f64, on flex with and without autodiff, for two image shapes.
    #[test]
    fn device_loss_and_gradient_match_the_host_network() {
        for dev in [Device::flex(), Device::flex().autodiff()] {
            for shape in [[2, 17, 18], [1, 8, 9]] {
                let spec = ConvSpec {
                    labels: vec![1, 4, 7],
                    ..small()
                };
                let c = Conv::new(spec, images(30, shape, 2), 3).unwrap();
                let mut rng = Rng::new(4);
                let theta: Vec<f64> = (0..c.theta0.len()).map(|_| 0.5 * rng.normal()).collect();
                let mut want_g = vec![0f64; theta.len()];
                let on = c.on(&DatasetOn::new(&c.data, &dev, DType::F64));
                for step in [0, 5] {
                    let want = c.loss_grad(&theta, step, &mut want_g);
                    let t = from_f64(&theta, [theta.len(), 1], &dev, DType::F64);
                    let loss = to_f64(&on.loss(t.clone(), step)).unwrap()[0];
                    let g = to_f64(&on.grad(t, step)).unwrap();
                    assert!((loss - want).abs() < 1e-10, "{loss} vs {want}");
                    let scale = want_g.iter().fold(0f64, |m, v| m.max(v.abs()));
                    let worst = g
                        .iter()
                        .zip(&want_g)
                        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
                    assert!(worst < 1e-9 * scale, "{shape:?}: gradient off by {worst:e}");
                }
            }
        }
    }
}
