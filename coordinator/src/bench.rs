//! `bench`: M simulated workers over loopback submit spec-sized gradients; prints
//! accepted gradients/s, φ fetches/s, latency percentiles, and with `--unroll-ms` (compute
//! replaced by a sleep of the unroll time) the efficiency against ideal scaling. With
//! `--relays R` the workers go through R relays ([`crate::relay`]) in this process: a
//! worker's call to its relay is a function call (in a cluster that hop stays on the
//! worker's machine), the relay's batches to the coordinator cross loopback HTTP/2.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use l2l_proto::client::{Client, ClientArgs, ClientSecurity, client, connect, endpoint};
use l2l_proto::v1::coordinator_server::Coordinator as _;
use l2l_proto::v1::{
    FetchPhiReply, FetchPhiRequest, LeaseReply, LeaseRequest, RegisterReply, RegisterRequest,
    SubmitReply, SubmitRequest, Version,
};
use tonic::{Request, Status};

use crate::config::{Config, Mode};
use crate::relay::{MAX_BATCH, Relay};
use crate::service::Server;
use crate::state::Coordinator;

/// Arguments of `bench`.
#[derive(Debug, Args)]
pub struct Bench {
    /// Simulated workers (concurrent clients); a list runs one measurement per count.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16, 64, 256])]
    pub workers: Vec<usize>,
    /// Milliseconds each simulated worker "computes" (sleeps) per truncation before it
    /// submits; 0 = no compute, the coordinator's raw capacity.
    #[arg(long, default_value_t = 0.0)]
    pub unroll_ms: f64,
    /// Relays the workers share (worker i uses relay i mod R); 0 = every worker talks to
    /// the coordinator itself.
    #[arg(long, default_value_t = 0)]
    pub relays: usize,
    /// Simulate pipelined workers: a submission, and the φ fetch after it, travel while
    /// the next truncation "computes", and land before the next submission is sent.
    #[arg(long)]
    pub pipelined: bool,
    /// Seconds to measure (after one second of warm-up).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Load an already running coordinator at this URL instead of starting one in-process
    /// (e.g. `l2l-coordinator serve --aggregation async --every 8 --max-staleness 1000000`
    /// pinned to other cores); its φ must have the spec's default size.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Token and TLS for --coordinator.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

struct ClientStats {
    submits: Vec<Duration>,
    fetches: u64,
    accepted: u64,
}

impl ClientStats {
    /// Counts a submission that took `took` (when `counted`: sent after the warm-up) and
    /// returns the φ version its reply names.
    fn record(
        &mut self,
        took: Duration,
        r: Result<SubmitReply, Status>,
        counted: bool,
    ) -> Option<Version> {
        if counted {
            self.submits.push(took);
            if r.is_ok() {
                self.accepted += 1;
            }
        }
        r.ok().and_then(|reply| reply.current)
    }
}

/// What one measurement found.
struct Row {
    workers: usize,
    accepted_per_s: f64,
    fetches_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    updates_per_s: f64,
    /// accepted/s against M · 1000 / unroll_ms (None without simulated compute).
    efficiency: Option<f64>,
}

/// Runs the load for each worker count and prints the figures.
pub async fn run(a: Bench) -> Result<()> {
    if !a.json {
        println!(
            "l2l-coordinator bench: 5,141-value gradients over loopback, {} s per row, simulated unroll {} ms, {}",
            a.seconds,
            a.unroll_ms,
            match a.relays {
                0 => "no relays".to_string(),
                r => format!("{r} relays in this process"),
            }
        );
        println!(
            "{:>8} {:>12} {:>10} {:>9} {:>9} {:>10} {:>10}",
            "workers", "accepted/s", "fetches/s", "p50_ms", "p99_ms", "updates/s", "efficiency"
        );
    }
    for &m in &a.workers {
        let security = match &a.coordinator {
            Some(url) => a.client.resolve(url)?,
            None => ClientSecurity::default(),
        };
        let r = measure(
            m,
            a.seconds,
            a.unroll_ms,
            a.relays,
            a.pipelined,
            a.coordinator.as_deref(),
            &security,
        )
        .await?;
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "workers": r.workers, "relays": a.relays, "seconds": a.seconds, "unroll_ms": a.unroll_ms,
                    "accepted_per_s": r.accepted_per_s, "fetches_per_s": r.fetches_per_s,
                    "submit_p50_ms": r.p50_ms, "submit_p99_ms": r.p99_ms,
                    "updates_per_s": r.updates_per_s, "efficiency": r.efficiency,
                })
            );
        } else {
            println!(
                "{:>8} {:>12.0} {:>10.0} {:>9.3} {:>9.3} {:>10.1} {:>10}",
                r.workers,
                r.accepted_per_s,
                r.fetches_per_s,
                r.p50_ms,
                r.p99_ms,
                r.updates_per_s,
                r.efficiency
                    .map_or("-".into(), |e| format!("{:.1}%", 100.0 * e))
            );
        }
    }
    Ok(())
}

/// One measurement with `workers` simulated workers on a fresh coordinator.
async fn measure(
    workers: usize,
    seconds: f64,
    unroll_ms: f64,
    relays: usize,
    pipelined: bool,
    external: Option<&str>,
    security: &ClientSecurity,
) -> Result<Row> {
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
    let (server, url) = match external {
        Some(url) => (None, url.to_string()),
        None => {
            let server = Server::start(
                Coordinator::new(config, crate::state::Start::fresh())?,
                ([127, 0, 0, 1], 0).into(),
                Default::default(),
            )
            .await?;
            let url = format!("http://{}", server.addr);
            (Some(server), url)
        }
    };
    let version_now = |url: String| async move {
        let mut c = connect(&url, security, Duration::from_secs(30)).await?;
        let s = c
            .status(l2l_proto::v1::StatusRequest {})
            .await?
            .into_inner();
        anyhow::Ok(s.version.map_or(0, |v| v.step))
    };
    let updates_before = version_now(url.clone()).await?;
    let start = Instant::now() + Duration::from_secs(1);
    let end = start + Duration::from_secs_f64(seconds);
    let unroll = Duration::from_secs_f64(unroll_ms / 1e3);
    let mut relay_list = Vec::new();
    for _ in 0..relays {
        relay_list.push(Relay::connect(&url, security, MAX_BATCH, Duration::from_secs(30)).await?);
    }
    let mut tasks = Vec::new();
    for i in 0..workers {
        let target = match relay_list.get(i % relays.max(1)) {
            Some(r) => Target::Relay(r.clone()),
            None => {
                // One connection per simulated worker, as separate worker processes
                // would have.
                let channel = endpoint(&url, security)?
                    .connect()
                    .await
                    .context("cannot connect")?;
                Target::Direct(client(channel, security))
            }
        };
        tasks.push(tokio::spawn(simulate(
            target, i, n, unroll, pipelined, start, end,
        )));
    }
    let mut submits = Vec::new();
    let (mut fetches, mut accepted) = (0, 0);
    for t in tasks {
        let s = t.await??;
        submits.extend(s.submits);
        fetches += s.fetches;
        accepted += s.accepted;
    }
    let updates_at_end = version_now(url.clone()).await? - updates_before;
    drop(relay_list);
    if let Some(server) = server {
        server.shutdown().await?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    submits.sort();
    let pct = |p: f64| -> f64 {
        submits
            .get(((submits.len() as f64 - 1.0) * p).round() as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    let accepted_per_s = accepted as f64 / seconds;
    Ok(Row {
        workers,
        accepted_per_s,
        fetches_per_s: fetches as f64 / seconds,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        // Updates over the whole run including the warm-up second.
        updates_per_s: updates_at_end as f64 / (seconds + 1.0),
        efficiency: (unroll_ms > 0.0).then(|| accepted_per_s / (workers as f64 * 1e3 / unroll_ms)),
    })
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("l2l-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Where a simulated worker's calls go: the coordinator over loopback, or a relay in
/// this process.
#[derive(Clone)]
enum Target {
    Direct(Client),
    Relay(Relay),
}

impl Target {
    async fn register(&mut self, r: RegisterRequest) -> Result<RegisterReply, Status> {
        match self {
            Target::Direct(c) => c.register(r).await,
            Target::Relay(x) => x.register(Request::new(r)).await,
        }
        .map(|r| r.into_inner())
    }

    async fn lease(&mut self, r: LeaseRequest) -> Result<LeaseReply, Status> {
        match self {
            Target::Direct(c) => c.lease(r).await,
            Target::Relay(x) => x.lease(Request::new(r)).await,
        }
        .map(|r| r.into_inner())
    }

    async fn fetch_phi(&mut self, r: FetchPhiRequest) -> Result<FetchPhiReply, Status> {
        match self {
            Target::Direct(c) => c.fetch_phi(r).await,
            Target::Relay(x) => x.fetch_phi(Request::new(r)).await,
        }
        .map(|r| r.into_inner())
    }

    async fn submit(&mut self, r: SubmitRequest) -> Result<SubmitReply, Status> {
        match self {
            Target::Direct(c) => c.submit(r).await,
            Target::Relay(x) => x.submit(Request::new(r)).await,
        }
        .map(|r| r.into_inner())
    }
}

/// One simulated worker: fetch φ when it changed, "compute", submit, repeat; lease anew
/// after each trajectory.
async fn simulate(
    mut c: Target,
    i: usize,
    n: usize,
    unroll: Duration,
    pipelined: bool,
    start: Instant,
    end: Instant,
) -> Result<ClientStats> {
    let reply = c
        .register(RegisterRequest {
            name: format!("sim-{i}"),
            backend: "none".into(),
            ..Default::default()
        })
        .await?;
    let (id, session) = (reply.worker_id, reply.session);
    let values: Vec<f32> = (0..n).map(|j| ((j % 7) as f32 - 3.0) * 1e-3).collect();
    let grad = bytes::Bytes::from(l2l_common::wire::f32_to_le_bytes(&values));
    let mut stats = ClientStats {
        submits: Vec::new(),
        fetches: 0,
        accepted: 0,
    };
    let mut have: Option<Version> = None;
    let mut current = Some(Version::default());
    let mut pending = None;
    loop {
        let lease = c
            .lease(LeaseRequest {
                worker_id: id,
                session: session.clone(),
            })
            .await?;
        let truncations = lease.trajectory_steps / lease.truncation_steps.max(1);
        for k in 0..truncations {
            let now = Instant::now();
            if now >= end {
                return Ok(stats);
            }
            // Like a worker, fetch φ only when the last reply says it changed.
            if have != current {
                let phi = c.fetch_phi(FetchPhiRequest { have, wait_ms: 0 }).await?;
                have = phi.version;
                if now >= start {
                    stats.fetches += 1;
                }
            }
            if !unroll.is_zero() {
                tokio::time::sleep(unroll).await;
            }
            let req = SubmitRequest {
                worker_id: id,
                lease_id: lease.lease_id,
                truncation: k,
                version: have,
                grad: grad.clone(),
                meta_loss: 1.0,
                unroll_seconds: 0.0,
                session: session.clone(),
                data_fingerprint: String::new(),
            };
            let mut to = c.clone();
            let submit = async move {
                let t0 = Instant::now();
                let r = to.submit(req).await;
                (t0.elapsed(), r)
            };
            // The previous submission (and the φ fetched after it) lands before this one
            // is sent.
            if let Some((task, counted)) = pending.take() {
                let (took, r, fetched) = task.await?;
                current = stats.record(took, r, counted).or(current);
                if let Some(v) = fetched {
                    // At least as new as the reply's: nothing more to fetch.
                    (have, current) = (v, v);
                    stats.fetches += u64::from(counted);
                }
            }
            if pipelined && k + 1 < truncations {
                // Like a pipelined worker, fetch the new φ in the background too.
                let mut to = c.clone();
                let task = async move {
                    let (took, r) = submit.await;
                    let newer = r.as_ref().ok().and_then(|reply| reply.current);
                    let mut fetched = None;
                    if newer.is_some()
                        && newer != have
                        && let Ok(phi) = to.fetch_phi(FetchPhiRequest { have, wait_ms: 0 }).await
                    {
                        fetched = Some(phi.version);
                    }
                    (took, r, fetched)
                };
                pending = Some((tokio::spawn(task), now >= start));
            } else {
                let (took, r) = submit.await;
                current = stats.record(took, r, now >= start).or(current);
            }
        }
    }
}
