//! Loss curves of the learned optimizer, for evaluation: on a burn device (forward only)
//! or on the host (the fused path workers run).

use burn::tensor::{DType, Device, Tensor};

use crate::Error;
use crate::Phi;
use crate::fused::{self, HostCarry, HostProblem};
use crate::lstm::{Lstm, LstmState};
use crate::problems::Problem;
use crate::tensor::to_f64;
use crate::unroll::{Carry, unroll};

/// f(θ_t) for t = 0 ..= steps under the learned optimizer, state carried throughout.
///
/// Forward only (no autodiff); `lstm` and `theta0` must be on `device`.
pub fn learned_curve(
    lstm: &Lstm,
    problem: &dyn Problem,
    theta0: Tensor<2>,
    steps: usize,
    device: &Device,
    dtype: DType,
) -> Result<Vec<f64>, Error> {
    let first = problem.loss(theta0.clone(), 0);
    let carry = Carry {
        state: LstmState::zeros(&lstm.config, problem.num_coords(), device, dtype),
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
/// Runs the fused meta-gradient in chunks of 20 steps and keeps only its losses: the
/// gradient work is wasted, but the losses are exactly what meta-training optimizes.
pub fn host_learned_curve(
    phi: &Phi,
    problem: &dyn HostProblem,
    theta0: &[f32],
    steps: usize,
) -> Result<Vec<f64>, Error> {
    let mut g = vec![0f32; theta0.len()];
    let mut out = vec![problem.eval(theta0, 0, &mut g)];
    let mut carry = HostCarry::start(&phi.config, theta0.to_vec());
    let mut t = 0;
    while t < steps {
        let k = HOST_CHUNK.min(steps - t);
        match fused::meta_grad(phi, problem, carry, t, k) {
            Ok(r) => {
                out.extend(&r.losses);
                carry = r.carry;
            }
            Err(Error::NonFinite(_)) => break,
            Err(e) => return Err(e),
        }
        t += k;
    }
    out.resize(steps + 1, f64::INFINITY);
    Ok(out)
}
