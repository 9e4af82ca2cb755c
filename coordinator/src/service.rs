//! The gRPC service: one lock on the [`Coordinator`] per request, plus a ticker task that
//! expires leases, closes overdue sync rounds and writes checkpoints.
//!
//! Beside `l2l.v1.Coordinator` the server answers gRPC health checks
//! (`grpc.health.v1.Health`, no token needed): service `""` is SERVING when the
//! coordinator is ready (φ loaded, run directory writable, last checkpoint written) and
//! service `liveness` while the process serves at all.
//!
//! It also serves `l2l.v1.Relay` (same token): a relay (`l2l-coordinator relay`, see
//! [`crate::relay`]) sends the submissions of the workers behind it as one batch, each
//! item judged under one lock exactly as a `Submit` of its own worker would be.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use l2l_proto::refusal::Reason;
use l2l_proto::v1::coordinator_server::{Coordinator as Rpc, CoordinatorServer};
use l2l_proto::v1::relay_server::{Relay as RelayRpc, RelayServer};
use l2l_proto::v1::{
    FetchPhiReply, FetchPhiRequest, HeartbeatReply, HeartbeatRequest, LeaseReply, LeaseRequest,
    RegisterReply, RegisterRequest, StatusReply, StatusRequest, SubmitBatchReply,
    SubmitBatchRequest, SubmitOutcome, SubmitReply, SubmitRequest, SubmitValidationReply,
    SubmitValidationRequest, ValidateReply, ValidateRequest,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::auth::{CheckToken, ServerSecurity};
use crate::checkpoint;
use crate::schedule::Schedule;
use crate::state::{Coordinator, SESSION_BYTES};

/// The health-check service name that reports liveness (the empty name reports readiness).
pub const LIVENESS: &str = "liveness";

/// Facts about the service that the coordinator's state does not hold.
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Requests refused for a missing or wrong token.
    pub unauthenticated: Arc<AtomicU64>,
    /// When the last checkpoint was written.
    pub last_checkpoint: Mutex<Option<SystemTime>>,
    /// Whether the health check reports ready.
    pub ready: AtomicBool,
}

/// The shared coordinator behind the gRPC service.
#[derive(Clone)]
pub struct Shared {
    inner: Arc<Mutex<Coordinator>>,
    /// The current version step, for fetches that wait for the next φ.
    version: watch::Sender<u64>,
    /// Readiness, checkpoint age and authentication refusals.
    pub stats: Arc<ServiceStats>,
    /// Held from the decision on a validation result to its files being written, so the
    /// best φ on disk is the best decided, whatever order results arrive in.
    validation_files: Arc<tokio::sync::Mutex<()>>,
}

impl Shared {
    /// Wraps a coordinator.
    pub fn new(c: Coordinator) -> Self {
        let (version, _) = watch::channel(c.version().step);
        Self {
            inner: Arc::new(Mutex::new(c)),
            version,
            stats: Arc::default(),
            validation_files: Arc::default(),
        }
    }

    /// Tells waiting fetches about the version `c` is at now.
    fn announce(&self, c: &Coordinator) {
        self.version.send_if_modified(|v| {
            let now = c.version().step;
            let changed = *v != now;
            *v = now;
            changed
        });
    }

    /// Locks the coordinator. A panic while locked cannot leave φ half-updated (updates
    /// replace φ in one step), so a poisoned lock is still safe to use.
    pub fn lock(&self) -> MutexGuard<'_, Coordinator> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[tonic::async_trait]
impl Rpc for Shared {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        let r = req.into_inner();
        let mut session = [0u8; SESSION_BYTES];
        getrandom::fill(&mut session).map_err(|e| {
            tracing::error!(error = %e, "the system's random source failed");
            Status::unavailable("cannot draw a session secret; retry later")
        })?;
        let mut c = self.lock();
        let role = l2l_proto::role::Role::from_wire(&r.role).unwrap_or_else(|| {
            tracing::warn!(role = %crate::state::sanitize_name(&r.role), "unknown worker role; registered as a trainer");
            l2l_proto::role::Role::Trainer
        });
        let id = c
            .register_as(&r.name, &r.backend, role, session, Instant::now())
            .map_err(|e| e.to_status())?;
        Ok(Response::new(RegisterReply {
            worker_id: id,
            epoch: c.version().epoch,
            lease_timeout_ms: c.config().lease_timeout_ms,
            wait_for_update: c.config().aggregation.mode == crate::config::Mode::Sync,
            session: session.to_vec(),
            max_staleness: c.config().aggregation.max_staleness,
        }))
    }

    async fn lease(&self, req: Request<LeaseRequest>) -> Result<Response<LeaseReply>, Status> {
        let r = req.into_inner();
        let reply = self.lock().lease(r.worker_id, &r.session, Instant::now());
        reply.map(Response::new).map_err(|e| e.to_status())
    }

    async fn fetch_phi(
        &self,
        req: Request<FetchPhiRequest>,
    ) -> Result<Response<FetchPhiReply>, Status> {
        let r = req.into_inner();
        let mut changed = self.version.subscribe();
        let reply = self.lock().fetch_phi(r.have);
        if !reply.unchanged || r.wait_ms == 0 {
            return Ok(Response::new(reply));
        }
        let wait = Duration::from_millis(r.wait_ms.min(60_000));
        let _ = tokio::time::timeout(wait, changed.changed()).await;
        Ok(Response::new(self.lock().fetch_phi(r.have)))
    }

    async fn submit(&self, req: Request<SubmitRequest>) -> Result<Response<SubmitReply>, Status> {
        let r = req.into_inner();
        let _span = tracing::debug_span!(
            "submit",
            worker = r.worker_id,
            lease = r.lease_id,
            truncation = r.truncation
        )
        .entered();
        let result = {
            let mut c = self.lock();
            let result = c.submit(&r, Instant::now());
            self.announce(&c);
            result
        };
        match result {
            Ok(a) => Ok(Response::new(a.reply)),
            Err(e) => {
                tracing::info!(
                    worker = r.worker_id,
                    lease = r.lease_id,
                    reason = e.reason(),
                    "submission refused: {e}"
                );
                Err(e.to_status())
            }
        }
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let r = req.into_inner();
        let mut c = self.lock();
        c.heartbeat(r.worker_id, &r.session, r.lease_id, Instant::now())
            .map_err(|e| e.to_status())?;
        Ok(Response::new(HeartbeatReply {
            lease_timeout_ms: c.config().lease_timeout_ms,
        }))
    }

    async fn validate(
        &self,
        req: Request<ValidateRequest>,
    ) -> Result<Response<ValidateReply>, Status> {
        let r = req.into_inner();
        let reply = self
            .lock()
            .validate(r.worker_id, &r.session, Instant::now());
        reply.map(Response::new).map_err(|e| e.to_status())
    }

    async fn submit_validation(
        &self,
        req: Request<SubmitValidationRequest>,
    ) -> Result<Response<SubmitValidationReply>, Status> {
        let r = req.into_inner();
        // Held until the files are written and the best confirmed, inside the blocking
        // task, so a dropped request cannot let a later result overtake this one.
        let files = self.validation_files.clone().lock_owned().await;
        let (result, dir) = {
            let mut c = self.lock();
            (
                c.submit_validation(&r, Instant::now()),
                c.config().dir.clone(),
            )
        };
        let (mut record, best) = result.map_err(|e| {
            tracing::info!(
                worker = r.worker_id,
                job = r.job_id,
                reason = e.reason(),
                "validation result refused: {e}"
            );
            e.to_status()
        })?;
        let shared = self.clone();
        let written = tokio::task::spawn_blocking(move || {
            let _files = files;
            let out = crate::validation::write(&dir, &mut record, best.as_ref());
            if let (Ok(true), Some(b)) = (&out, &best) {
                shared.lock().validation_best_written(b.version, b.score);
            }
            (out, record)
        })
        .await;
        let record = match written {
            Ok((Ok(_), record)) => record,
            Ok((Err(e), record)) => {
                tracing::error!(error = %format!("{e:#}"), "cannot write the validation files");
                record
            }
            Err(e) => {
                tracing::error!(error = %e, "the validation writer panicked");
                return Err(Status::internal(
                    "the validation result could not be recorded",
                ));
            }
        };
        Ok(Response::new(SubmitValidationReply {
            best: record.best,
            score: record.score,
        }))
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let mut reply = self.lock().status(Instant::now());
        let unauthenticated = self.stats.unauthenticated.load(Ordering::Relaxed);
        if unauthenticated > 0 {
            reply
                .refused
                .insert(Reason::Unauthenticated.name().into(), unauthenticated);
        }
        Ok(Response::new(reply))
    }
}

/// Most submissions one `SubmitBatch` may carry.
pub const MAX_BATCH: usize = 64;

/// Bytes of one batch item beyond φ's file size (ids, version, session, fingerprint); a
/// relay refuses a larger submission itself, so one worker cannot make a batch too large.
pub const ITEM_ENVELOPE: usize = 1024;

#[tonic::async_trait]
impl RelayRpc for Shared {
    async fn submit_batch(
        &self,
        req: Request<SubmitBatchRequest>,
    ) -> Result<Response<SubmitBatchReply>, Status> {
        let r = req.into_inner();
        if r.items.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "a batch holds at most {MAX_BATCH} submissions, this one {}; \
                 is the relay newer than the coordinator?",
                r.items.len()
            )));
        }
        let now = Instant::now();
        let mut c = self.lock();
        let outcomes = r
            .items
            .iter()
            .map(|item| match c.submit(item, now) {
                Ok(a) => SubmitOutcome {
                    reply: Some(a.reply),
                    ..Default::default()
                },
                Err(e) => {
                    tracing::info!(
                        worker = item.worker_id,
                        lease = item.lease_id,
                        reason = e.reason(),
                        "submission refused: {e}"
                    );
                    SubmitOutcome {
                        reply: None,
                        code: e.code() as i32,
                        reason: e.reason().into(),
                        message: e.to_string(),
                    }
                }
            })
            .collect();
        self.announce(&c);
        let phi = c.fetch_phi(r.have);
        drop(c);
        Ok(Response::new(SubmitBatchReply {
            outcomes,
            current: phi.version,
            phi: phi.phi,
        }))
    }
}

/// A running server: its address, the shared state, and a way to stop it.
pub struct Server {
    /// The address it listens on (the real port when configured with port 0).
    pub addr: SocketAddr,
    /// The coordinator behind it.
    pub shared: Shared,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<()>>,
}

/// Longest a request may run (a φ long-poll waits at most 60 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// Concurrent requests one HTTP/2 connection may have open.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// Sets the readiness reported by health checks.
async fn set_ready(health: &HealthReporter, stats: &ServiceStats, ready: bool) {
    let was = stats.ready.swap(ready, Ordering::Relaxed);
    let status = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
    if was != ready {
        tracing::info!(ready, "readiness changed");
    }
}

/// Message size limits from φ's size: the largest request is a gradient (4 bytes per
/// parameter), the largest reply φ's file; both with room for the envelope. A batch
/// request may hold [`MAX_BATCH`] gradients.
fn message_limits(c: &Coordinator) -> (usize, usize, usize) {
    const SLACK: usize = 64 << 10;
    let params = c.phi().map_or(0, |p| p.num_params());
    let phi_file = c.fetch_phi(None).phi.len();
    // A lease reply carries one f32 weight per trajectory step.
    let weights = c.config().max_trajectory_steps() as usize * 4;
    // A validation job carries φ's file and its instances; a result's two curves (at most
    // 2 × 2,001 f64, 32 KB) fit in the slack, so the request limit stays a gradient's.
    let instances =
        (crate::validation::MAX_INSTANCES + crate::validation::MAX_TUNE_INSTANCES) * 1024;
    (
        params * 4 + SLACK,
        phi_file.max(weights).max(phi_file + instances) + SLACK,
        // φ's file is at least its values (4 bytes each): what a relay bounds items by.
        MAX_BATCH * (phi_file.max(params * 4) + ITEM_ENVELOPE) + SLACK,
    )
}

/// A gRPC server with l2l's explicit HTTP/2 limits, serving TLS when `tls` is set.
pub(crate) fn http2_server(
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<tonic::transport::Server> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .context("bad TLS configuration: check the certificate and key files")?;
    }
    // Gradients are ~20 KB: larger HTTP/2 frames and windows mean one frame per message
    // and no WINDOW_UPDATE round per request.
    Ok(builder
        // Explicit HTTP/2 limits: what one connection may hold open, how long a request
        // may run (a φ long-poll waits at most 60 s), and how a dead peer is noticed.
        .timeout(REQUEST_TIMEOUT)
        // Enforced by HTTP/2 itself (the peer may not open more); a tower concurrency
        // layer on top cost about 5% of the bench's throughput.
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .http2_max_pending_accept_reset_streams(Some(64))
        .http2_max_header_list_size(16 << 10)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(8 << 20)
        .max_frame_size(1 << 20))
}

/// The accepted connections of `listener`, with TCP_NODELAY (small request/reply pairs
/// must not wait for delayed ACKs) and keep-alive (a peer that vanished without closing
/// is noticed by TCP too).
pub(crate) fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
}

impl Server {
    /// Binds `listen`, serves `coordinator` with `security`, and ticks every 20 ms.
    pub async fn start(
        coordinator: Coordinator,
        listen: SocketAddr,
        security: ServerSecurity,
    ) -> Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}; is the port in use?"))?;
        let addr = listener.local_addr()?;
        let (max_request, max_reply, max_batch) = message_limits(&coordinator);
        let dir = coordinator.config().dir.clone();
        let shared = Shared::new(coordinator);
        let (stop, mut stopped) = watch::channel(false);
        let svc = CoordinatorServer::new(shared.clone())
            .max_decoding_message_size(max_request)
            .max_encoding_message_size(max_reply);
        let check = CheckToken::new(security.token, shared.stats.unauthenticated.clone());
        let svc = tonic::service::interceptor::InterceptedService::new(svc, check.clone());
        let batches = RelayServer::new(shared.clone())
            .max_decoding_message_size(max_batch)
            .max_encoding_message_size(max_reply);
        let batches = tonic::service::interceptor::InterceptedService::new(batches, check);
        let (health, health_svc) = tonic_health::server::health_reporter();
        health
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        match checkpoint::check_writable(&dir) {
            Ok(()) => set_ready(&health, &shared.stats, true).await,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "not ready: checkpoints cannot be written");
                set_ready(&health, &shared.stats, false).await;
            }
        }
        let mut builder = http2_server(security.tls)?;
        let ticker = shared.clone();
        let mut tick_stop = stop.subscribe();
        let task = tokio::spawn(async move {
            let tick = tokio::spawn(async move {
                let mut schedule = {
                    let c = ticker.lock();
                    let cfg = c.config();
                    Schedule::new(
                        cfg.checkpoint_every_updates,
                        cfg.checkpoint_every_seconds,
                        c.version().step,
                        Instant::now(),
                    )
                };
                let mut every = tokio::time::interval(Duration::from_millis(20));
                loop {
                    tokio::select! {
                        _ = every.tick() => {}
                        _ = tick_stop.changed() => break,
                    }
                    let now = Instant::now();
                    // Decide and copy the state under the lock; write it after releasing
                    // the lock (and off the runtime's threads), so an fsync never holds up
                    // a submission.
                    let due = {
                        let mut c = ticker.lock();
                        if c.tick(now) {
                            ticker.announce(&c);
                        }
                        let v = c.version().step;
                        schedule
                            .due(now, v, c.finished())
                            .then(|| c.snapshot().map(|snap| (v, snap, c.config().clone())))
                    };
                    let Some(due) = due else { continue };
                    let written = match due {
                        Ok((v, snap, cfg)) => tokio::task::spawn_blocking(move || {
                            checkpoint::save(&cfg.dir, &snap, &cfg, cfg.checkpoint_keep)
                                .map(|p| (v, p))
                        })
                        .await
                        .map_err(anyhow::Error::from)
                        .and_then(|r| r),
                        Err(e) => Err(e),
                    };
                    match written {
                        Ok((v, path)) => {
                            tracing::info!(version = v, path = %path.display(), "checkpoint written");
                            schedule.written(now, v);
                            *ticker
                                .stats
                                .last_checkpoint
                                .lock()
                                .unwrap_or_else(|p| p.into_inner()) = Some(SystemTime::now());
                            set_ready(&health, &ticker.stats, true).await;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "checkpoint failed; retrying in 1 s");
                            schedule.failed(now);
                            set_ready(&health, &ticker.stats, false).await;
                        }
                    }
                }
            });
            let served = builder
                .add_service(health_svc)
                .add_service(batches)
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming(listener), async move {
                    let _ = stopped.changed().await;
                })
                .await;
            tick.abort();
            served.context("gRPC server failed")
        });
        Ok(Self {
            addr,
            shared,
            stop,
            task,
        })
    }

    /// Stops serving, writes a last checkpoint and returns when the server is down.
    pub async fn shutdown(self) -> Result<PathBuf> {
        let _ = self.stop.send(true);
        self.task.await.context("server task panicked")??;
        let c = self.shared.lock();
        write_checkpoint(&c)
    }
}

/// Writes a checkpoint of `c` into its run directory.
pub fn write_checkpoint(c: &Coordinator) -> Result<PathBuf> {
    let cfg = c.config();
    checkpoint::save(&cfg.dir, &c.snapshot()?, cfg, cfg.checkpoint_keep)
}
