//! The truncated unroll, its meta-loss and its meta-gradient (spec §2).

use burn::tensor::Tensor;

use crate::Error;
use crate::lstm::{LstmState, Lstms};
use crate::problems::Problem;
use crate::tensor::{from_f32, to_f64};
use crate::truncation::{Forward, Truncation};

/// Where an optimizee trajectory stands between truncations on a device: θ_t and the
/// LSTM state.
#[derive(Debug, Clone)]
pub struct DeviceCarry {
    /// θ_t, `[N, 1]`.
    pub theta: Tensor<2>,
    /// The LSTM's h and c.
    pub state: LstmState,
}

impl DeviceCarry {
    /// The same values cut from any autodiff graph, as at a truncation boundary.
    pub fn detach(self) -> Self {
        Self {
            theta: self.theta.detach(),
            state: self.state.detach(),
        }
    }
}

/// One truncation run forward: the per-step losses and where it ended.
#[derive(Debug, Clone)]
pub struct Unrolled {
    /// f_t(θ_t) for t = s+1 ..= s+T, a `[T]` tensor (on the autodiff graph if φ is).
    pub losses: Tensor<1>,
    /// θ_{s+T} and the state after T steps, still attached to the graph.
    pub carry: DeviceCarry,
}

/// Runs T optimizer steps from `carry` at step `start` (spec §2).
///
/// Every g_t is a constant ([`Problem::grad`]), so only first derivatives flow
/// back through θ and the LSTM state. On a device without autodiff this is the
/// forward-only evaluation path.
pub fn unroll(
    lstm: &Lstms,
    problem: &dyn Problem,
    carry: DeviceCarry,
    start: usize,
    steps: usize,
) -> Unrolled {
    let DeviceCarry {
        mut theta,
        mut state,
    } = carry;
    let mut losses = Vec::with_capacity(steps);
    for t in start..start + steps {
        let g = problem.grad(theta.clone(), t);
        let (u, next) = lstm.step(g, state);
        state = next;
        theta = theta + u;
        losses.push(problem.loss(theta.clone(), t + 1));
    }
    Unrolled {
        losses: Tensor::cat(losses, 0),
        carry: DeviceCarry { theta, state },
    }
}

/// Unrolls T steps and backpropagates once through the whole truncation.
///
/// `lstm` and `carry` must live on an autodiff device (`Device::flex().autodiff()`).
pub fn meta_grad(
    lstm: &Lstms,
    problem: &dyn Problem,
    carry: DeviceCarry,
    start: usize,
    steps: usize,
) -> Result<Truncation<DeviceCarry>, Error> {
    let raw = meta_grad_tensors(lstm, problem, carry, start, steps)?;
    download(lstm, raw, None)
}

/// [`meta_grad`] of the weighted meta-loss L = (1/T) Σ w_t f_t(θ_t) (spec §2), with
/// `weights[i]` the weight of step start+i+1; T = `weights.len()`.
pub fn meta_grad_weighted(
    lstm: &Lstms,
    problem: &dyn Problem,
    carry: DeviceCarry,
    start: usize,
    weights: &[f32],
) -> Result<Truncation<DeviceCarry>, Error> {
    let raw = raw_meta_grad(lstm, problem, carry, start, weights.len(), Some(weights))?;
    download(lstm, raw, Some(weights))
}

/// The truncation of [`meta_grad`] run forward only (nothing requires a gradient, so no
/// graph is kept): the losses, the meta-loss (weighted by `weights`, T =
/// `weights.len()`, or T = `steps`) and the carry.
pub fn forward(
    lstm: &Lstms,
    problem: &dyn Problem,
    carry: DeviceCarry,
    start: usize,
    steps: usize,
    weights: Option<&[f32]>,
) -> Result<Forward<DeviceCarry>, Error> {
    let steps = weights.map_or(steps, <[f32]>::len);
    crate::truncation::check_steps(steps)?;
    let run = unroll(lstm, problem, carry.detach(), start, steps);
    let losses = to_f64(&run.losses)?;
    finite_losses(&losses)?;
    Ok(Forward {
        meta_loss: weighted_mean(&losses, weights),
        losses,
        carry: run.carry.detach(),
    })
}

/// Refuses a truncation whose losses are not all finite: the optimizee blew up.
pub(crate) fn finite_losses(losses: &[f64]) -> Result<(), Error> {
    if let Some(t) = losses.iter().position(|l| !l.is_finite()) {
        return Err(Error::NonFinite(format!(
            "the optimizee's loss is {} after {} steps of the truncation; the optimizee blew up under this φ",
            losses[t],
            t + 1
        )));
    }
    Ok(())
}

/// (1/T) Σ w_t f_t over a truncation's losses (w_t = 1 without weights).
pub(crate) fn weighted_mean(losses: &[f64], weights: Option<&[f32]>) -> f64 {
    let weight = |t: usize| weights.map_or(1.0, |w| w[t] as f64);
    losses
        .iter()
        .enumerate()
        .map(|(t, l)| weight(t) * l)
        .sum::<f64>()
        / losses.len() as f64
}

/// Brings a meta-gradient to the host; the meta-loss is weighted as the gradient was.
fn download(
    lstm: &Lstms,
    raw: RawMetaGrad,
    weights: Option<&[f32]>,
) -> Result<Truncation<DeviceCarry>, Error> {
    let grad = raw
        .grad
        .iter()
        .map(crate::tensor::to_f32)
        .collect::<Result<Vec<_>, _>>()?;
    let losses = to_f64(&raw.losses)?;
    finite_losses(&losses)?;
    let grad = lstm.phi_from(grad).map_err(|e| match e {
        Error::NonFinite(what) => Error::NonFinite(format!(
            "the meta-gradient diverged ({what}); the optimizee blew up under this φ"
        )),
        other => other,
    })?;
    let meta_loss = weighted_mean(&losses, weights);
    Ok(Truncation {
        grad,
        meta_loss,
        losses,
        carry: raw.carry,
    })
}

/// [`meta_grad`]'s result before it leaves the device, in the unroll's precision.
#[derive(Debug, Clone)]
pub struct RawMetaGrad {
    /// ∂L/∂φ per parameter tensor, shaped as in [`Lstms::params`].
    pub grad: Vec<Tensor<2>>,
    /// f_t(θ_t) of every step, `[T]`.
    pub losses: Tensor<1>,
    /// θ and state after the truncation, detached.
    pub carry: DeviceCarry,
}

/// The meta-gradient as device tensors; see [`meta_grad`].
pub fn meta_grad_tensors(
    lstm: &Lstms,
    problem: &dyn Problem,
    carry: DeviceCarry,
    start: usize,
    steps: usize,
) -> Result<RawMetaGrad, Error> {
    raw_meta_grad(lstm, problem, carry, start, steps, None)
}

fn raw_meta_grad(
    lstm: &Lstms,
    problem: &dyn Problem,
    carry: DeviceCarry,
    start: usize,
    steps: usize,
    weights: Option<&[f32]>,
) -> Result<RawMetaGrad, Error> {
    crate::truncation::check_steps(steps)?;
    if !lstm.is_autodiff() {
        return Err(Error::Config(
            "meta_grad needs φ on an autodiff device (e.g. Device::flex().autodiff())".into(),
        ));
    }
    let lstm = lstm.clone().map_params(Tensor::require_grad);
    let carry = DeviceCarry {
        theta: carry.theta.autodiff(),
        state: carry.state,
    };
    let run = unroll(&lstm, problem, carry, start, steps);
    let meta_loss = match weights {
        None => run.losses.clone().mean(),
        Some(w) => {
            let w = from_f32(w, [steps], &run.losses.device(), run.losses.dtype());
            (run.losses.clone() * w).mean()
        }
    };
    let grads = meta_loss.backward();
    let grad = lstm
        .params()
        .into_iter()
        // A parameter the loss does not reach has a zero gradient.
        .map(|p| p.grad(&grads).unwrap_or_else(|| p.zeros_like().inner()))
        .collect();
    Ok(RawMetaGrad {
        grad,
        losses: run.losses.inner(),
        carry: run.carry.detach(),
    })
}

#[cfg(test)]
mod tests;
