//! The l2l wire contract and what both sides need to speak it: gRPC service
//! `l2l.v1.Coordinator`, generated from `proto/l2l.proto`; the shared token ([`auth`]);
//! why a request was refused ([`refusal::Reason`]); instances and the problem specs they
//! name ([`instance`]); the run's gradient estimator on a lease ([`estimator`]); a
//! worker's role ([`role`]); how a
//! client connects, with TLS ([`client`]); the Prometheus endpoint ([`metrics_http`]) and
//! the logging ([`logging`]) of both binaries.
//!
//! Where this differs from `../shared/design.md`'s picture (proto as the contract alone,
//! coordinator → common ← worker): this crate depends on `l2l-common`, for the problem
//! specs an instance names, and holds the networking both binaries share, so that
//! `common` stays free of networking and the coordinator depends on the worker crate
//! only for its local mode (which runs the worker loop in-process).
#![allow(clippy::all)]

pub mod auth;
pub mod client;
pub mod estimator;
pub mod instance;
pub mod logging;
pub mod metrics_http;
pub mod refusal;
pub mod role;

/// Package `l2l.v1`.
#[allow(missing_docs)]
pub mod v1 {
    tonic::include_proto!("l2l.v1");
}
