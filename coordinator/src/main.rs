//! `l2l-coordinator`: the parameter server of l2l, its local single-node mode, and tools.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use l2l_coordinator::auth::ServerSecurity;
use l2l_coordinator::cli::{LogFormat, Overrides, init_logging};
use l2l_coordinator::config::Config;
use l2l_coordinator::service::Server;
use l2l_coordinator::state::Coordinator;
use l2l_coordinator::{bench, local, metrics, relay, run_dir, status};

/// mimalloc keeps freed megabyte blocks (a relay's batches) for reuse, where glibc's
/// malloc gave them back and faulted them in again for every message.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Meta-trains the l2l learned LSTM optimizer: holds φ and its Adam state, leases problem
/// instances to workers (`l2l-worker run`), aggregates their meta-gradients, checkpoints.
#[derive(Debug, Parser)]
#[command(name = "l2l-coordinator", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr (RUST_LOG sets the level).
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serves the gRPC coordinator until stopped (SIGINT/SIGTERM) or `max_updates`.
    Serve(Overrides),
    /// Runs a coordinator and N workers on this machine, then compares the learned
    /// optimizer with tuned Adam on fresh quadratics.
    Local(local::Local),
    /// Serves the workers of this machine (or rack) in front of a coordinator: batches
    /// their submissions and answers φ from a cache, with the same refusals.
    Relay(relay::RelayArgs),
    /// Prints a running coordinator's progress and counters.
    Status(status::Status),
    /// Load-tests the coordinator with simulated workers over loopback.
    Bench(bench::Bench),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // local and bench show their own progress and figures; serve and status log.
    let level = match cli.command {
        Command::Local(_) | Command::Bench(_) => "warn",
        _ => "info",
    };
    init_logging(cli.log_format, level);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Serve(o) => serve(o).await,
            Command::Local(l) => local::run(l).await.map(|_| ()),
            Command::Relay(r) => relay::run(r).await,
            Command::Status(s) => status::run(s).await,
            Command::Bench(b) => bench::run(b).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(o: Overrides) -> Result<()> {
    let config = o.apply(Config::default())?;
    eprintln!(
        "l2l-coordinator serve, configuration:\n{}",
        config.describe()
    );
    let security = ServerSecurity::resolve(&config.security)?;
    if security.token.is_none() && !config.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %config.listen,
            "no token: anyone who can reach this port can submit gradients; \
             set --token-file or $L2L_TOKEN (see the README's Deploy section)"
        );
    }
    let (token, tls) = (security.token.is_some(), security.tls.is_some());
    let metrics_token = metrics_token(&config, &security)?;
    let prepared = run_dir::prepare(&config.dir, o.start_fresh)?;
    if let Some(a) = &prepared.abandoned {
        tracing::warn!(moved_to = %a.display(), "--start-fresh: the earlier run's files were moved aside");
    }
    if let (Some(path), Some(s)) = (&prepared.resumed_from, &prepared.start.resume) {
        tracing::info!(path = %path.display(), version = s.version, epoch = prepared.start.epoch, "resuming");
    }
    let run = prepared.start.run.clone();
    tracing::info!(run = %run, epoch = prepared.start.epoch, "epoch recorded");
    let coordinator = Coordinator::new(config.clone(), prepared.start)?;
    let server = Server::start(coordinator, config.listen, security).await?;
    let metrics_task = match config.metrics_listen {
        Some(addr) => {
            let listener = l2l_proto::metrics_http::bind(addr).await?;
            tracing::info!(addr = %listener.local_addr()?, token = metrics_token.is_some(), "serving metrics at /metrics");
            let registry = std::sync::Arc::new(metrics::registry(server.shared.clone()));
            Some(tokio::spawn(l2l_proto::metrics_http::serve(
                listener,
                registry,
                metrics_token,
            )))
        }
        None => None,
    };
    // Tests and scripts read this line to learn the port when listening on port 0.
    println!("listening on {}", server.addr);
    tracing::info!(addr = %server.addr, token, tls, "serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    // After the last update, linger until the last validation jobs are recorded (at most
    // validation.timeout_ms) and every live worker has heard that the run is finished (at
    // most 10 s more), so none is left retrying against a closed port.
    let mut finished_at = None;
    let validation_limit = std::time::Duration::from_millis(config.validation.timeout_ms);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {
                let now = std::time::Instant::now();
                let c = server.shared.lock();
                if c.finished() {
                    let since = *finished_at.get_or_insert(now);
                    let waited = now.duration_since(since);
                    let validating = !c.validation_idle() && waited < validation_limit;
                    if !validating && (c.all_told_finished(now) || waited.as_secs() >= 10) {
                        break;
                    }
                }
            }
        }
    }
    if let Some(t) = metrics_task {
        t.abort();
    }
    let phi = server.shared.lock().phi()?;
    let version = server.shared.lock().version();
    let ckpt = server.shutdown().await?;
    let phi_path = run_dir::save_final_phi(&config.dir, &run, &phi)?;
    tracing::info!(checkpoint = %ckpt.display(), phi = %phi_path.display(), version = version.step, "stopped");
    println!(
        "φ version {} written to {}",
        version.step,
        phi_path.display()
    );
    Ok(())
}

/// The token `/metrics` requires, if the configuration asks for one.
fn metrics_token(
    config: &Config,
    security: &ServerSecurity,
) -> Result<Option<l2l_proto::auth::Token>> {
    match (config.metrics_require_token, &security.token) {
        (false, _) => Ok(None),
        (true, Some(t)) => Ok(Some(t.clone())),
        (true, None) => {
            anyhow::bail!("metrics_require_token needs a token: give --token-file or $L2L_TOKEN")
        }
    }
}
