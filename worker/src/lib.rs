//! The l2l worker as a library: the loop that joins a coordinator, leases optimizee
//! instances, unrolls the learned optimizer and submits meta-gradients ([`run`]), or, in
//! the evaluator role, runs the run's validation jobs ([`validate`]); how it
//! backs off after failures ([`backoff`]), and its Prometheus metrics ([`metrics`]).
//! How it connects (token, TLS) is [`l2l_proto::client`]; where unrolls run is
//! [`l2l_common::engine`].
//!
//! The `l2l-worker` binary wraps it (`l2l-worker run`), and the coordinator's local
//! single-node mode runs it in-process on threads of its own.
#![warn(missing_docs)]

pub mod backoff;
pub mod metrics;
pub mod run;
pub mod validate;

pub use l2l_common::engine::{Backend, Engine};
pub use l2l_proto::role::Role;
pub use run::{WorkerOptions, WorkerSummary, run_worker};

/// Where Debian's `dataset-fashion-mnist` puts Fashion-MNIST: the default data directory
/// of `mlp` problems.
pub const DEFAULT_DATA: &str = "/usr/share/datasets/fashion-mnist";
