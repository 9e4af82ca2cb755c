//! Optimizee problems: the functions the learned optimizer trains on (spec §3).

pub mod quadratic;

use burn::tensor::Tensor;

pub use quadratic::Quadratic;

/// An optimizee on a device: its loss and its gradient at step t.
///
/// θ is a column `[N, 1]` of all coordinates. Step t selects the minibatch B_t for
/// stochastic problems; deterministic ones ignore it.
pub trait Problem {
    /// N, the number of coordinates the optimizer sees.
    fn num_coords(&self) -> usize;

    /// f_t(θ) as a one-element tensor, differentiable with respect to θ.
    fn loss(&self, theta: Tensor<2>, step: usize) -> Tensor<1>;

    /// ∇f_t(θ) `[N, 1]`, a constant: no autodiff graph reaches back through it.
    fn grad(&self, theta: Tensor<2>, step: usize) -> Tensor<2>;
}
