//! The `run` command: the worker loop of [`l2l_worker::run_worker`] with signals and logs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use l2l_proto::client::ClientArgs;
use l2l_proto::logging::{LogFormat, init_logging};
use l2l_proto::metrics_http::{bind, serve};
use l2l_worker::metrics::WorkerMetrics;
use l2l_worker::{Backend, Engine, WorkerOptions, run_worker};
use prometheus_client::registry::Registry;

/// Arguments of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The coordinator's URL, e.g. http://10.0.0.5:50051 (https:// for TLS).
    #[arg(long, env = "L2L_COORDINATOR")]
    coordinator: String,
    #[command(flatten)]
    client: ClientArgs,
    /// MNIST-format IDX files (plain or .gz) for mlp instances; the training split is used.
    #[arg(long, env = "L2L_DATA", default_value = l2l_worker::DEFAULT_DATA)]
    data: std::path::PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9091).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Name shown in the coordinator's status [default: l2l-worker-<pid>].
    #[arg(long, env = "L2L_WORKER_NAME")]
    name: Option<String>,
    /// Longest reconnection backoff in ms (starts at 100 ms, doubles, ±50% jitter).
    #[arg(long, default_value_t = 5000)]
    max_backoff_ms: u64,
    /// Log format on stderr (RUST_LOG sets the level, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Where the unrolls run: `fused` (the fused CPU kernels; `cpu` is accepted too), `flex` (burn on the CPU, the
    /// reference) or `wgpu` (burn on the GPU: Vulkan, Metal, DX12; needs a build with
    /// `--features wgpu` and the GPU's Vulkan driver).
    #[arg(long, env = "L2L_BACKEND", value_enum, default_value_t = Backend::Fused)]
    backend: Backend,
    /// `trainer` leases instances and submits meta-gradients; `evaluator` takes the run's
    /// validation jobs (its `[validation]` section): φ and a tuned baseline on held-out
    /// instances, the curve and the best φ kept by the coordinator.
    #[arg(long, env = "L2L_ROLE", value_enum, default_value_t = l2l_worker::Role::Trainer)]
    role: l2l_worker::Role,
    /// Threads for the unroll [default: one per CPU core]; lower it when several workers
    /// share a machine.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    threads: Option<u32>,
    /// In async runs, wait for each submission before computing the next truncation
    /// (by default a submission travels while the next truncation computes, so the
    /// submit's latency is hidden and φ is at most one submission older).
    #[arg(long)]
    no_pipeline: bool,
}

/// Runs the worker until done or signalled.
pub fn run(a: RunArgs) -> Result<()> {
    init_logging(a.log_format, "info");
    if let Some(n) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n as usize)
            .build_global()
            .context("cannot set up the unroll threads")?;
    }
    let name = a
        .name
        .unwrap_or_else(|| format!("l2l-worker-{}", std::process::id()));
    let security = a.client.resolve(&a.coordinator)?;
    let stop = Arc::new(AtomicBool::new(false));
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal handler")?;
    // Opened here to fail before connecting and to label the metrics; the worker loop
    // opens it again (a wgpu adapter is opened once per process and shared).
    let engine = Engine::open(a.backend).with_context(|| format!("--backend {}", a.backend))?;
    tracing::info!(backend = %a.backend, adapter = engine.adapter(), "backend ready");
    let mut registry = Registry::default();
    let metrics = WorkerMetrics::register(&mut registry, a.backend.name(), engine.adapter(), &name);
    drop(engine);
    let metrics_listener = match a.metrics_listen {
        Some(addr) => {
            let l = signals.block_on(bind(addr))?;
            tracing::info!(addr = %l.local_addr()?, "serving metrics at /metrics");
            Some(l)
        }
        None => None,
    };
    let flag = stop.clone();
    let watcher = std::thread::spawn(move || {
        signals.block_on(async {
            if let Some(l) = metrics_listener {
                let registry = Arc::new(registry);
                tokio::spawn(async move {
                    if let Err(e) = serve(l, registry, None).await {
                        tracing::error!(error = %e, "metrics endpoint stopped");
                    }
                });
            }
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("stop requested; finishing");
            flag.store(true, Ordering::Relaxed);
        })
    });
    let mut opts = WorkerOptions::new(a.coordinator, name);
    opts.security = security;
    opts.data = a.data;
    opts.backend = a.backend;
    opts.role = a.role;
    opts.pipeline = !a.no_pipeline;
    opts.metrics = Some(metrics);
    opts.max_backoff = Duration::from_millis(a.max_backoff_ms.max(100));
    let summary = run_worker(opts, stop)?;
    drop(watcher);
    tracing::info!(
        accepted = summary.accepted,
        refused = summary.refused,
        trajectories = summary.trajectories,
        validations = summary.validations,
        overlapped = summary.overlapped,
        phi_checks = summary.phi_checks,
        "worker stopped"
    );
    if a.role == l2l_worker::Role::Evaluator {
        println!(
            "evaluator stopped: {} validations recorded",
            summary.validations
        );
    } else {
        println!(
            "worker stopped: {} gradients accepted, {} refused, {} trajectories, \
             {} submissions sent while the next truncation computed, {} truncations \
             waited for a φ check",
            summary.accepted,
            summary.refused,
            summary.trajectories,
            summary.overlapped,
            summary.phi_checks
        );
    }
    Ok(())
}
