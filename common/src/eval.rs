//! Loss curves of the learned optimizer, forward only, for evaluation.

use burn::tensor::{DType, Device, Tensor};

use crate::Error;
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
