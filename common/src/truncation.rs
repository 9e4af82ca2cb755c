//! One truncation's result, whichever path computed it (the fused kernels, the burn
//! composition on any device, or the [`crate::engine::Engine`] in front of both).

use crate::Error;
use crate::groups::AnyPhi;

/// A truncation's meta-gradient ∂L/∂φ, its meta-loss L, each step's loss, and where the
/// trajectory stands after it (`C`: on the host, on a device, or either).
#[derive(Debug, Clone)]
pub struct Truncation<C> {
    /// ∂L/∂φ in spec order and shapes (one part per parameter group).
    pub grad: AnyPhi,
    /// L = (1/T) Σ w_t f_t(θ_t), t = s+1 ..= s+T (w_t = 1 unless weighted).
    pub meta_loss: f64,
    /// f_t(θ_t) of every step, for progress and evaluation.
    pub losses: Vec<f64>,
    /// θ and the LSTM state after the truncation, detached for the next one.
    pub carry: C,
}

impl<C> Truncation<C> {
    /// The same result with its carry wrapped (e.g. into [`crate::engine::Carry`]).
    pub fn map_carry<D>(self, f: impl FnOnce(C) -> D) -> Truncation<D> {
        Truncation {
            grad: self.grad,
            meta_loss: self.meta_loss,
            losses: self.losses,
            carry: f(self.carry),
        }
    }
}

/// A truncation run forward only (no meta-gradient): its meta-loss, each step's loss, and
/// where the trajectory stands after it.
#[derive(Debug, Clone)]
pub struct Forward<C> {
    /// L = (1/T) Σ w_t f_t(θ_t), t = s+1 ..= s+T (w_t = 1 unless weighted).
    pub meta_loss: f64,
    /// f_t(θ_t) of every step.
    pub losses: Vec<f64>,
    /// θ and the LSTM state after the truncation.
    pub carry: C,
}

impl<C> Forward<C> {
    /// The same result with its carry wrapped (e.g. into [`crate::engine::Carry`]).
    pub fn map_carry<D>(self, f: impl FnOnce(C) -> D) -> Forward<D> {
        Forward {
            meta_loss: self.meta_loss,
            losses: self.losses,
            carry: f(self.carry),
        }
    }
}

/// Refuses a truncation of no steps (every path checks the same way).
pub(crate) fn check_steps(steps: usize) -> Result<(), Error> {
    if steps == 0 {
        return Err(Error::Config("a truncation needs at least one step".into()));
    }
    Ok(())
}
