//! The neural art loss of [`Art`] on a burn device, for unrolls off the host.
//!
//! The same function as [`Art::loss_grad`] (same θ layout, feature network, targets and
//! weights), built from burn's convolution and matrix products, so autodiff reaches θ
//! through the loss. The targets (the content crop's features, the style's Gram
//! matrices) are the host's, copied once. g_t is the loss's gradient taken on a copy of θ
//! cut from the unroll's graph: a constant, as spec §2 asks.

use burn::tensor::activation::relu;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Device, Tensor};

use crate::problems::Problem;
use crate::problems::art::{ALPHA, Art, BETA, CENTRE, FILTERS, GAMMA, KERNELS, filters};
use crate::tensor::from_f64;

/// An [`Art`] instance whose steps run on one device.
#[derive(Debug, Clone)]
pub struct ArtOn {
    size: usize,
    /// Per scale: the filters `[32, 3, k, k]` and the style's Gram matrix `[32, 32]`.
    scales: Vec<(Tensor<4>, Tensor<2>)>,
    /// Φ_L of the content crop `[32, P_L]`.
    content: Tensor<2>,
}

impl Art {
    /// The instance on `dev` in float32.
    pub fn on(&self, dev: &Device) -> ArtOn {
        self.on_as(dev, DType::F32)
    }

    /// The instance on `dev` in `dtype`.
    pub fn on_as(&self, dev: &Device, dtype: DType) -> ArtOn {
        let scales = KERNELS
            .iter()
            .zip(filters())
            .zip(self.style_grams())
            .map(|((&k, w), g)| {
                (
                    from_f64(w, [FILTERS, 3, k, k], dev, dtype),
                    from_f64(g, [FILTERS, FILTERS], dev, dtype),
                )
            })
            .collect();
        let c = self.content_features();
        let n = c.len() / FILTERS;
        ArtOn {
            size: self.spec.size,
            scales,
            content: from_f64(&c, [FILTERS, n], dev, dtype),
        }
    }
}

impl ArtOn {
    /// f(θ) for θ `[N, 1]`.
    fn loss_of(&self, theta: Tensor<2>) -> Tensor<1> {
        let s = self.size;
        let img = theta.reshape([1, 3, s, s]);
        let x = img.clone().sub_scalar(CENTRE);
        let nf = FILTERS as f64;
        let last = self.scales.len() - 1;
        let mut style: Option<Tensor<1>> = None;
        let mut content = None;
        for (i, (w, target)) in self.scales.iter().enumerate() {
            let phi = relu(conv2d(
                x.clone(),
                w.clone(),
                None,
                ConvOptions::new([1, 1], [0, 0], [1, 1], 1),
            ));
            let [_, _, ho, wo] = phi.dims();
            let p = ho * wo;
            let phi = phi.reshape([FILTERS, p]);
            let g = phi
                .clone()
                .matmul(phi.clone().transpose())
                .div_scalar(p as f64);
            let d = g - target.clone();
            let term = (d.clone() * d)
                .sum()
                .div_scalar(nf * nf * self.scales.len() as f64);
            style = Some(match style {
                None => term,
                Some(t) => t + term,
            });
            if i == last {
                let d = phi - self.content.clone();
                content = Some((d.clone() * d).sum().div_scalar(nf * p as f64));
            }
        }
        let dy = img.clone().narrow(2, 1, s - 1) - img.clone().narrow(2, 0, s - 1);
        let dx = img.clone().narrow(3, 1, s - 1) - img.narrow(3, 0, s - 1);
        let tv = ((dy.clone() * dy).sum() + (dx.clone() * dx).sum()).div_scalar((3 * s * s) as f64);
        let (content, style) = (content.expect("a scale"), style.expect("a scale"));
        content.mul_scalar(ALPHA) + style.mul_scalar(BETA) + tv.mul_scalar(GAMMA)
    }
}

impl Problem for ArtOn {
    fn num_coords(&self) -> usize {
        3 * self.size * self.size
    }

    fn loss(&self, theta: Tensor<2>, _step: usize) -> Tensor<1> {
        self.loss_of(theta)
    }

    fn grad(&self, theta: Tensor<2>, _step: usize) -> Tensor<2> {
        let lift = !theta.is_autodiff();
        let t = if lift {
            theta.autodiff()
        } else {
            theta.detach()
        }
        .require_grad();
        // A leaf of its own graph: g_t never reaches back into the unroll's. The targets
        // are constants of the device the instance was made on; lifted, they join t's.
        let this = if lift { self.lifted() } else { self.clone() };
        let grads = this.loss_of(t.clone()).backward();
        t.grad(&grads).unwrap_or_else(|| t.zeros_like().inner())
    }
}

impl ArtOn {
    /// The same instance with its constants on the autodiff device.
    fn lifted(&self) -> ArtOn {
        ArtOn {
            size: self.size,
            scales: self
                .scales
                .iter()
                .map(|(w, g)| (w.clone().autodiff(), g.clone().autodiff()))
                .collect(),
            content: self.content.clone().autodiff(),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, Device};

    use super::*;
    use crate::problems::ArtSpec;
    use crate::problems::images::Image;
    use crate::rng::Rng;
    use crate::tensor::to_f64;

    /// The device loss agrees with the host one (itself checked against finite
    /// differences) in f64, on flex with and without autodiff.
    #[test]
    fn device_loss_and_gradient_match_the_host_loss() {
        let noise = |h: usize, w: usize, seed: u64| {
            let mut rng = Rng::new(seed);
            Image::new(h, w, (0..3 * h * w).map(|_| rng.uniform() as f32).collect()).unwrap()
        };
        let size = 19;
        let spec = ArtSpec {
            size,
            ..ArtSpec::default()
        };
        let art = Art::from_images(
            spec,
            "n".into(),
            noise(size, size, 1),
            noise(23, 21, 2),
            Rng::new(3),
        )
        .unwrap();
        let mut rng = Rng::new(4);
        let theta: Vec<f64> = (0..art.theta0.len())
            .map(|_| 0.5 + 0.3 * rng.normal())
            .collect();
        let mut want_g = vec![0f64; theta.len()];
        let want = art.loss_grad(&theta, &mut want_g);
        for dev in [Device::flex(), Device::flex().autodiff()] {
            let on = art.on_as(&dev, DType::F64);
            let t = from_f64(&theta, [theta.len(), 1], &dev, DType::F64);
            let loss = to_f64(&on.loss(t.clone(), 0)).unwrap()[0];
            let g = to_f64(&on.grad(t, 0)).unwrap();
            assert!((loss - want).abs() < 1e-10 * want, "{loss} vs {want}");
            let scale = want_g.iter().fold(0f64, |m, v| m.max(v.abs()));
            let worst = g
                .iter()
                .zip(&want_g)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            // Measured 1.4e-8 of the largest entry (burn's convolution backward sums in
            // another order); a wrong layout or scale shows at 1e-2 and more.
            assert!(
                worst < 1e-7 * scale,
                "gradient off by {worst:e} of {scale:e}"
            );
        }
    }
}
