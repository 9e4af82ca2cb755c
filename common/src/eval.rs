//! Loss curves of the learned optimizer, for evaluation: on a burn device (forward only)
//! or on the host (the fused path workers run).

use burn::tensor::{DType, Device, Tensor};

use crate::Error;
use crate::fused::{self, HostCarry};
use crate::groups::AnyPhi;
use crate::lstm::{LstmState, Lstms};
use crate::problems::HostProblem;
use crate::problems::Problem;
use crate::tensor::to_f64;
use crate::unroll::{DeviceCarry, unroll};

/// f(θ_t) for t = 0 ..= steps under the learned optimizer, state carried throughout.
///
/// Forward only (no autodiff); `lstm` and `theta0` must be on `device`.
pub fn learned_curve(
    lstm: &Lstms,
    problem: &dyn Problem,
    theta0: Tensor<2>,
    steps: usize,
    device: &Device,
    dtype: DType,
) -> Result<Vec<f64>, Error> {
    let first = problem.loss(theta0.clone(), 0);
    let carry = DeviceCarry {
        state: LstmState::zeros(&lstm.config(), problem.num_coords(), device, dtype),
        theta: theta0,
    };
    let run = unroll(lstm, problem, carry, 0, steps);
    to_f64(&Tensor::cat(vec![first, run.losses], 0))
}

/// Steps per fused call in [`host_learned_curve`].
const HOST_CHUNK: usize = 20;

/// f(θ_t) for t = 0 ..= steps under the learned optimizer on the host, state carried
/// throughout; once a loss is not finite the rest of the curve is +∞.
///
/// Runs the fused truncation forward only ([`fused::forward`]: the losses of the
/// meta-gradient pass, bit for bit) in chunks of 20 steps. A chunk that blows up is run
/// again one step at a time, so the curve keeps every finite loss before the blow-up, as
/// [`learned_curve`] does.
pub fn host_learned_curve(
    phi: &AnyPhi,
    problem: &dyn HostProblem,
    theta0: &[f32],
    steps: usize,
) -> Result<Vec<f64>, Error> {
    let mut g = vec![0f32; theta0.len()];
    let mut out = vec![problem.eval(theta0, 0, &mut g)];
    let mut carry = HostCarry::start(&phi.config(), theta0.to_vec());
    let mut t = 0;
    let mut chunk = HOST_CHUNK;
    while t < steps {
        let k = chunk.min(steps - t);
        match fused::forward(phi, problem, carry.clone(), t, k, None) {
            Ok(r) => {
                out.extend(&r.losses);
                carry = r.carry;
                t += k;
            }
            Err(Error::NonFinite(_)) if k > 1 => chunk = 1,
            Err(Error::NonFinite(_)) => break,
            Err(e) => return Err(e),
        }
    }
    end_at_divergence(&mut out, steps);
    Ok(out)
}

/// θ_t under the learned optimizer on the host at each step of `at` (ascending, each
/// ≤ the last), state carried throughout: what the optimizee looks like there (`eval`'s
/// pictures). A step after a blow-up keeps the last finite θ.
pub fn host_learned_thetas(
    phi: &AnyPhi,
    problem: &dyn HostProblem,
    theta0: &[f32],
    at: &[usize],
) -> Result<Vec<Vec<f32>>, Error> {
    let mut carry = HostCarry::start(&phi.config(), theta0.to_vec());
    let mut t = 0;
    let mut diverged = false;
    let mut out = Vec::with_capacity(at.len());
    for &want in at {
        while t < want && !diverged {
            let k = HOST_CHUNK.min(want - t);
            match fused::forward(phi, problem, carry.clone(), t, k, None) {
                Ok(r) if r.carry.theta.iter().all(|v| v.is_finite()) => carry = r.carry,
                Ok(_) | Err(Error::NonFinite(_)) => diverged = true,
                Err(e) => return Err(e),
            }
            t += k;
        }
        out.push(carry.theta.clone());
    }
    Ok(out)
}

/// The one rule of every loss curve (learned or baseline, host or device): from the
/// first loss that is not finite to step `steps`, every loss is +∞ (the run diverged).
pub fn end_at_divergence(curve: &mut Vec<f64>, steps: usize) {
    if let Some(t) = curve.iter().position(|l| !l.is_finite()) {
        curve.truncate(t);
    }
    curve.resize(steps + 1, f64::INFINITY);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{OptimizerConfig, Preprocess, Quadratic};

    /// A quadratic whose loss is NaN from step `from` on.
    struct BreaksAt {
        q: Quadratic,
        from: usize,
    }

    impl HostProblem for BreaksAt {
        fn num_coords(&self) -> usize {
            self.q.num_coords()
        }
        fn eval(&self, theta: &[f32], step: usize, grad: &mut [f32]) -> f64 {
            let f = self.q.eval(theta, step, grad);
            if step >= self.from { f64::NAN } else { f }
        }
    }

    /// The curve keeps every loss before the first non-finite one, also inside the
    /// 20-step chunk where it happens, and is +∞ from there on.
    #[test]
    fn a_host_curve_ends_at_the_step_that_blew_up() {
        let phi =
            AnyPhi::from(crate::Phi::init(OptimizerConfig::new(Preprocess::LogSign), 3).unwrap());
        let q = Quadratic::from_seed(2, 3, 10).unwrap();
        let whole = host_learned_curve(&phi, &q, &q.theta0, 50).unwrap();
        assert!(whole.iter().all(|l| l.is_finite()));
        let broken = BreaksAt {
            q: q.clone(),
            from: 27,
        };
        let curve = host_learned_curve(&phi, &broken, &q.theta0, 50).unwrap();
        assert_eq!(curve.len(), 51);
        assert_eq!(&curve[..27], &whole[..27], "the same losses up to step 26");
        assert!(
            curve[27..].iter().all(|l| *l == f64::INFINITY),
            "{:?}",
            &curve[20..30]
        );
    }
}
