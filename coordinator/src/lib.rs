//! The l2l coordinator: a parameter server that holds the learned optimizer's φ and its
//! Adam state, leases optimizee instances to workers, validates and aggregates their
//! meta-gradients, publishes new φ versions and checkpoints (see `../shared/design.md`).
//!
//! [`state::Coordinator`] takes every decision without a network; [`service`] puts it
//! behind gRPC; [`local`] runs a coordinator and N workers on one machine.
#![warn(missing_docs)]

pub mod adam;
pub mod aggregate;
pub mod auth;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod guard;
pub mod lease;
pub mod local;
pub mod metrics;
pub mod refusal;
pub mod relay;
pub mod run_dir;
pub mod sampler;
pub mod schedule;
pub mod service;
pub mod state;
pub mod status;
pub mod validation;
