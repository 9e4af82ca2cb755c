//! The l2l wire contract: gRPC service `l2l.v1.Coordinator`, generated from
//! `proto/l2l.proto`. Only generated code lives here.
#![allow(missing_docs, clippy::all)]

/// Package `l2l.v1`.
pub mod v1 {
    tonic::include_proto!("l2l.v1");
}
