//! The `run` command: the worker loop of [`l2l_worker::run_worker`] with signals and logs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use l2l_worker::{WorkerOptions, run_worker};

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per event.
    Json,
}

/// Arguments of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The coordinator's URL, e.g. http://10.0.0.5:50051.
    #[arg(long)]
    coordinator: String,
    /// Name shown in the coordinator's status [default: l2l-worker-<pid>].
    #[arg(long)]
    name: Option<String>,
    /// Longest reconnection backoff in ms (starts at 100 ms, doubles, ±50% jitter).
    #[arg(long, default_value_t = 5000)]
    max_backoff_ms: u64,
    /// Log format on stderr (RUST_LOG sets the level, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Threads for the unroll [default: one per CPU core]; lower it when several workers
    /// share a machine.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    threads: Option<u32>,
}

/// Runs the worker until done or signalled.
pub fn run(a: RunArgs) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match a.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Some(n) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n as usize)
            .build_global()
            .context("cannot set up the unroll threads")?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal handler")?;
    let flag = stop.clone();
    let watcher = std::thread::spawn(move || {
        signals.block_on(async {
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
    let name = a
        .name
        .unwrap_or_else(|| format!("l2l-worker-{}", std::process::id()));
    let mut opts = WorkerOptions::new(a.coordinator, name);
    opts.max_backoff = Duration::from_millis(a.max_backoff_ms.max(100));
    let summary = run_worker(opts, stop)?;
    drop(watcher);
    tracing::info!(
        accepted = summary.accepted,
        refused = summary.refused,
        trajectories = summary.trajectories,
        "worker stopped"
    );
    println!(
        "worker stopped: {} gradients accepted, {} refused, {} trajectories",
        summary.accepted, summary.refused, summary.trajectories
    );
    Ok(())
}
