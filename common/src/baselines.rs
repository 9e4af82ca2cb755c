//! Hand-designed optimizers run on the same problems as the learned one, for comparison.

use burn::tensor::Tensor;

use crate::Error;
use crate::problems::Problem;
use crate::tensor::to_f64;

/// Adam (Kingma & Ba 2015) with β = (0.9, 0.999) and ε = 1e-8 on an optimizee.
///
/// Returns f(θ_t) for t = 0 ..= steps, step t's gradient on minibatch t.
pub fn adam_curve(
    problem: &dyn Problem,
    theta0: Tensor<2>,
    lr: f64,
    steps: usize,
) -> Result<Vec<f64>, Error> {
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
    let mut theta = theta0;
    let mut m = theta.zeros_like();
    let mut v = theta.zeros_like();
    let mut losses = vec![problem.loss(theta.clone(), 0)];
    for t in 0..steps {
        let g = problem.grad(theta.clone(), t);
        m = m.mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
        v = v.mul_scalar(b2) + g.square().mul_scalar(1.0 - b2);
        let k = (t + 1) as i32;
        let m_hat = m.clone().div_scalar(1.0 - b1.powi(k));
        let v_hat = v.clone().div_scalar(1.0 - b2.powi(k));
        theta = theta - m_hat.div(v_hat.sqrt().add_scalar(eps)).mul_scalar(lr);
        losses.push(problem.loss(theta.clone(), t + 1));
    }
    to_f64(&Tensor::cat(losses, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Quadratic;
    use burn::tensor::{DType, Device};

    #[test]
    fn adam_matches_a_loop_written_out_in_f64() {
        // One coordinate: f(θ) = (2θ − 1)², ∇ = 4(2θ − 1); Adam written out on the host.
        let q = Quadratic {
            batch: 1,
            dims: 1,
            w: vec![2.0],
            y: vec![1.0],
            theta0: vec![0.0],
        };
        let dev = Device::flex();
        let curve =
            adam_curve(&q.on(&dev, DType::F64), q.theta0(&dev, DType::F64), 0.1, 3).unwrap();
        let (mut th, mut m, mut v) = (0f64, 0f64, 0f64);
        let mut want = vec![1.0];
        for t in 1..=3 {
            let g = 4.0 * (2.0 * th - 1.0);
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            th -=
                0.1 * (m / (1.0 - 0.9f64.powi(t))) / ((v / (1.0 - 0.999f64.powi(t))).sqrt() + 1e-8);
            want.push((2.0 * th - 1.0).powi(2));
        }
        for (a, b) in curve.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12, "{curve:?} vs {want:?}");
        }
    }
}
