//! The computation every part of l2l stands on: the learned LSTM optimizer m_φ
//! (`../shared/spec/learned-optimizer.md`, format `l2l-lstm/1`), its problems, the
//! truncated unroll with its meta-loss and meta-gradient, and the files of the spec.
//!
//! Pure computation: no sockets, no threads of its own. Written once on burn, so the
//! same code runs on the CPU backend (`Device::flex()`, `.autodiff()` for gradients)
//! and on any other burn device.
//!
//! ```no_run
//! use burn::tensor::{DType, Device};
//! use l2l_common::{Lstm, LstmState, Lstms, OptimizerConfig, Phi, Quadratic, unroll};
//!
//! let phi = Phi::init(OptimizerConfig::default(), 1)?;
//! let problem = Quadratic::from_seed(2, 128, 10)?;
//! let dev = Device::flex().autodiff();
//! let carry = unroll::DeviceCarry {
//!     theta: problem.theta0(&dev, DType::F32),
//!     state: LstmState::zeros(&phi.config, problem.num_coords(), &dev, DType::F32),
//! };
//! let lstm = Lstms::one(Lstm::new(&phi, &dev, DType::F32), problem.num_coords());
//! let out = unroll::meta_grad(&lstm, &problem.on(&dev, DType::F32), carry, 0, 20)?;
//! println!("meta-loss {}", out.meta_loss);
//! # Ok::<(), l2l_common::Error>(())
//! ```
#![warn(missing_docs)]

pub mod baselines;
pub mod config;
pub mod engine;
pub mod error;
pub mod estimator;
pub mod eval;
pub mod files;
pub mod fused;
#[cfg(feature = "wgpu")]
pub mod gpu;
pub mod groups;
#[cfg(feature = "wgpu")]
pub mod launches;
pub mod lstm;
#[cfg(feature = "optim")]
pub mod optimizer;
pub mod phi;
pub mod preprocess;
pub mod problems;
pub mod rng;
pub mod tensor;
pub mod truncation;
pub mod unroll;
pub mod wire;

pub use burn;
pub use config::{OptimizerConfig, Preprocess};
pub use engine::{Backend, Engine};
pub use error::Error;
pub use files::MetaGradFile;
pub use groups::{AnyPhi, PhiGroups};
pub use lstm::{Lstm, LstmState, Lstms};
pub use phi::Phi;
pub use problems::{Mlp, MlpSpec, Optimizee, Problem, ProblemSpec, Quadratic, QuadraticSpec};
pub use truncation::Truncation;
