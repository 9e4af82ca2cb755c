//! Optimizee problems: the functions the learned optimizer trains on (spec §3).

pub mod mlp;
pub mod mlp_on;
pub mod mnist;
pub mod quadratic;

use burn::tensor::Tensor;

pub use mlp::{Activation, Mlp, MlpSpec};
pub use mlp_on::{DatasetOn, MlpOn};
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

/// Largest count in a problem spec (a batch, a dimension, a layer width).
pub const MAX_COUNT: usize = 1 << 20;
/// Largest number of values a problem's parameters or data may need (1 GiB of f32).
pub const MAX_VALUES: usize = 1 << 28;
/// Largest number of hidden layers of an `mlp` problem.
pub const MAX_MLP_LAYERS: usize = 16;

/// A problem family with its hyper-parameters, as written on the command line:
/// `quadratic`, `mlp`, or `mlp:hidden=40`, `mlp:hidden=20x20`, `mlp:act=relu`,
/// `mlp:hidden=40,act=relu,batch=128`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemSpec {
    /// B quadratics of d dimensions (spec §3.1).
    Quadratic {
        /// B.
        batch: usize,
        /// d.
        dims: usize,
    },
    /// The MNIST network or a variant (spec §3.2).
    Mlp(MlpSpec),
}

impl ProblemSpec {
    /// A short name for tables and file names.
    pub fn name(&self) -> String {
        match self {
            ProblemSpec::Quadratic { batch, dims } => format!("quadratic-{batch}x{dims}"),
            ProblemSpec::Mlp(m) => m.name(),
        }
    }
}

impl std::str::FromStr for ProblemSpec {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, crate::Error> {
        let bad = |why: String| crate::Error::Config(format!("problem {s:?}: {why}"));
        let (family, params) = s.split_once(':').unwrap_or((s, ""));
        let pairs: Vec<(&str, &str)> = params
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.split_once('=')
                    .ok_or_else(|| bad(format!("{p:?} is not key=value")))
            })
            .collect::<Result<_, _>>()?;
        let count = |v: &str| {
            v.parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_COUNT).contains(n))
                .ok_or_else(|| bad(format!("{v:?} is not a count in 1..={MAX_COUNT}")))
        };
        match family {
            "quadratic" => {
                let (mut batch, mut dims) = (128, 10);
                for (k, v) in pairs {
                    match k {
                        "batch" => batch = count(v)?,
                        "dims" => dims = count(v)?,
                        _ => {
                            return Err(bad(format!(
                                "unknown quadratic parameter {k:?} (batch, dims)"
                            )));
                        }
                    }
                }
                // W holds batch · dims² values.
                if (batch as u128) * (dims as u128) * (dims as u128) > MAX_VALUES as u128 {
                    return Err(bad(format!(
                        "batch {batch} × dims {dims}² values; at most {MAX_VALUES}"
                    )));
                }
                Ok(ProblemSpec::Quadratic { batch, dims })
            }
            "mlp" => {
                let mut m = MlpSpec::default();
                for (k, v) in pairs {
                    match k {
                        "hidden" => m.hidden = v.split('x').map(count).collect::<Result<_, _>>()?,
                        "act" | "activation" => m.activation = v.parse()?,
                        "batch" => m.batch = count(v)?,
                        _ => {
                            return Err(bad(format!(
                                "unknown mlp parameter {k:?} (hidden, act, batch)"
                            )));
                        }
                    }
                }
                if m.hidden.len() > MAX_MLP_LAYERS {
                    return Err(bad(format!(
                        "{} hidden layers; at most {MAX_MLP_LAYERS}",
                        m.hidden.len()
                    )));
                }
                let mut widths = vec![784u128];
                widths.extend(m.hidden.iter().map(|h| *h as u128));
                widths.push(10);
                let params: u128 = widths.windows(2).map(|w| w[0] * w[1] + w[1]).sum();
                if params > MAX_VALUES as u128 {
                    return Err(bad(format!("{params} weights; at most {MAX_VALUES}")));
                }
                Ok(ProblemSpec::Mlp(m))
            }
            _ => Err(bad(format!(
                "unknown family {family:?}; use quadratic or mlp"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_specs_parse_with_defaults_and_refuse_typos() {
        assert_eq!(
            "quadratic".parse::<ProblemSpec>().unwrap(),
            ProblemSpec::Quadratic {
                batch: 128,
                dims: 10
            }
        );
        let ProblemSpec::Mlp(m) = "mlp:hidden=20x20,act=relu".parse().unwrap() else {
            panic!("an mlp")
        };
        assert_eq!(
            (m.hidden, m.activation, m.batch),
            (vec![20, 20], Activation::Relu, 128)
        );
        for bad in [
            "mlp:hiden=40",
            "mlp:hidden=0",
            "mlp:act=tanh",
            "conv",
            "mlp:hidden",
            "quadratic:batch=1000000,dims=1000000",
            "quadratic:dims=99999999999999999999",
            "mlp:hidden=1000000x1000000",
            "mlp:hidden=1x1x1x1x1x1x1x1x1x1x1x1x1x1x1x1x1",
        ] {
            assert!(bad.parse::<ProblemSpec>().is_err(), "{bad}");
        }
    }
}
