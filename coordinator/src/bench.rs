//! `bench`: M simulated workers over loopback submit spec-sized gradients with no
//! compute; prints accepted gradients/s, φ fetches/s and latency percentiles.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use l2l_proto::v1::coordinator_client::CoordinatorClient;
use l2l_proto::v1::{FetchPhiRequest, LeaseRequest, RegisterRequest, SubmitRequest, Version};
use tonic::transport::Channel;

use crate::config::{Config, Mode};
use crate::service::Server;
use crate::state::Coordinator;

/// Arguments of `bench`.
#[derive(Debug, Args)]
pub struct Bench {
    /// Simulated workers (concurrent clients).
    #[arg(long, default_value_t = 16)]
    pub workers: usize,
    /// Seconds to measure (after one second of warm-up).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

struct ClientStats {
    submits: Vec<Duration>,
    fetches: u64,
    accepted: u64,
}

/// Runs the load and prints the figures.
pub async fn run(a: Bench) -> Result<()> {
    let dir = tempfile_dir()?;
    let mut config = Config {
        listen: ([127, 0, 0, 1], 0).into(),
        dir: dir.clone(),
        lease_timeout_ms: 60_000,
        checkpoint_every_updates: 0,
        checkpoint_every_seconds: 0,
        ..Config::default()
    };
    // Async with a generous staleness bound: every accepted gradient counts, as in a busy
    // cluster; an update every 8 gradients.
    config.aggregation.mode = Mode::Async;
    config.aggregation.every = 8;
    config.aggregation.max_staleness = 1_000_000;
    let n = config.optimizer()?.num_params();
    let server = Server::start(Coordinator::new(config, None)?, ([127, 0, 0, 1], 0).into()).await?;
    let url = format!("http://{}", server.addr);
    let start = Instant::now() + Duration::from_secs(1);
    let end = start + Duration::from_secs_f64(a.seconds);
    let mut tasks = Vec::new();
    for i in 0..a.workers {
        // One connection per simulated worker, as separate worker processes would have.
        let channel = Channel::from_shared(url.clone())?
            .tcp_nodelay(true)
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(8 << 20)
            .connect()
            .await
            .context("cannot connect")?;
        let client = CoordinatorClient::new(channel);
        tasks.push(tokio::spawn(simulate(client, i, n, start, end)));
    }
    let mut submits = Vec::new();
    let (mut fetches, mut accepted) = (0, 0);
    for t in tasks {
        let s = t.await??;
        submits.extend(s.submits);
        fetches += s.fetches;
        accepted += s.accepted;
    }
    let status = server.shared.lock().status(Instant::now());
    server.shutdown().await?;
    let _ = std::fs::remove_dir_all(&dir);
    submits.sort();
    let pct = |p: f64| -> f64 {
        submits
            .get(((submits.len() as f64 - 1.0) * p).round() as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    let secs = a.seconds;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "workers": a.workers, "seconds": secs, "phi_values": n,
                "accepted_per_s": accepted as f64 / secs, "fetches_per_s": fetches as f64 / secs,
                "submit_p50_ms": pct(0.5), "submit_p99_ms": pct(0.99),
                "updates": status.version.map(|v| v.step), "refused": status.refused,
            })
        );
    } else {
        println!(
            "l2l-coordinator bench: {} simulated workers, {n}-value gradients, {secs} s over loopback",
            a.workers
        );
        println!("accepted gradients/s  {:.0}", accepted as f64 / secs);
        println!("φ fetches/s           {:.0}", fetches as f64 / secs);
        println!(
            "submit latency        p50 {:.3} ms, p99 {:.3} ms",
            pct(0.5),
            pct(0.99)
        );
        println!(
            "updates applied       {}",
            status.version.map_or(0, |v| v.step)
        );
    }
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("l2l-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// One simulated worker: fetch φ when it changed, submit, repeat; lease anew after each
/// trajectory.
async fn simulate(
    mut c: CoordinatorClient<Channel>,
    i: usize,
    n: usize,
    start: Instant,
    end: Instant,
) -> Result<ClientStats> {
    let id = c
        .register(RegisterRequest {
            name: format!("sim-{i}"),
            backend: "none".into(),
        })
        .await?
        .into_inner()
        .worker_id;
    let values: Vec<f32> = (0..n).map(|j| ((j % 7) as f32 - 3.0) * 1e-3).collect();
    let grad = bytes::Bytes::from(l2l_common::wire::f32_to_le_bytes(&values));
    let mut stats = ClientStats {
        submits: Vec::new(),
        fetches: 0,
        accepted: 0,
    };
    let mut have: Option<Version> = None;
    let mut current = Some(Version::default());
    loop {
        let lease = c.lease(LeaseRequest { worker_id: id }).await?.into_inner();
        let truncations = lease.trajectory_steps / lease.truncation_steps.max(1);
        for k in 0..truncations {
            let now = Instant::now();
            if now >= end {
                return Ok(stats);
            }
            // Like a worker, fetch φ only when the last reply says it changed.
            if have != current {
                let phi = c
                    .fetch_phi(FetchPhiRequest { have, wait_ms: 0 })
                    .await?
                    .into_inner();
                have = phi.version;
                if now >= start {
                    stats.fetches += 1;
                }
            }
            let t0 = Instant::now();
            let r = c
                .submit(SubmitRequest {
                    worker_id: id,
                    lease_id: lease.lease_id,
                    truncation: k,
                    version: have,
                    grad: grad.clone(),
                    meta_loss: 1.0,
                    unroll_seconds: 0.0,
                })
                .await;
            if let Ok(reply) = &r {
                current = reply.get_ref().current;
            }
            if now >= start {
                stats.submits.push(t0.elapsed());
                if r.is_ok() {
                    stats.accepted += 1;
                }
            }
        }
    }
}
