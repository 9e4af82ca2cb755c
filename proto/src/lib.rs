//! The l2l wire contract: gRPC service `l2l.v1.Coordinator`, generated from
//! `proto/l2l.proto`, how a caller presents the shared token ([`auth`]), and why a
//! request was refused ([`refusal::Reason`]).
#![allow(clippy::all)]

pub mod auth;
pub mod instance;
pub mod refusal;

/// Package `l2l.v1`.
#[allow(missing_docs)]
pub mod v1 {
    tonic::include_proto!("l2l.v1");
}
