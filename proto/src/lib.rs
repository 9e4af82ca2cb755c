//! The l2l wire contract and what both sides need to speak it: gRPC service
//! `l2l.v1.Coordinator`, generated from `proto/l2l.proto`; the shared token ([`auth`]);
//! why a request was refused ([`refusal::Reason`]); instances and the problem specs they
//! name ([`instance`]); how a client connects, with TLS ([`client`]); the Prometheus
//! endpoint ([`metrics_http`]) and the logging ([`logging`]) of both binaries.
#![allow(clippy::all)]

pub mod auth;
pub mod client;
pub mod instance;
pub mod logging;
pub mod metrics_http;
pub mod refusal;

/// Package `l2l.v1`.
#[allow(missing_docs)]
pub mod v1 {
    tonic::include_proto!("l2l.v1");
}
