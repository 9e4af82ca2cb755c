//! `l2l-coordinator relay`: serves the `Coordinator` service to the workers of one machine
//! or rack and speaks to the real coordinator in fewer, larger messages.
//!
//! - **Submissions** are queued and sent upstream as `Relay.SubmitBatch` batches: whatever
//!   queued while the previous batch was in flight, at most [`MAX_BATCH`] items and
//!   [`IN_FLIGHT`] batches at a time. Each item keeps its worker's own session, and the
//!   coordinator judges it exactly as a direct `Submit` (epoch fence, session, lease,
//!   duplicate, staleness, shape, guard, data pin), so a relay cannot act for a worker
//!   whose session it has not seen, and every refusal reaches its worker with its code and
//!   `l2l-refusal` reason. Gradients are not summed here: the coordinator's guard judges
//!   each gradient's norm, and a refused item could not be taken out of a sum.
//! - **φ** is answered from a cache. Every batch reply carries φ when the relay's copy is
//!   not current; while some worker waits for a newer φ (sync runs), one upstream
//!   long-poll keeps the cache current; otherwise it is refreshed once a second.
//! - **Everything else** (Register, Lease, Heartbeat, Status, Validate,
//!   SubmitValidation) is forwarded as it is.
//!
//! If the coordinator cannot be reached, the waiting workers get `unavailable` and retry;
//! a retried submission is acknowledged as a duplicate, so nothing counts twice. The relay
//! sees the sessions of the workers behind it: run it on their machine (or rack), and use
//! TLS upstream where the network is not trusted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Args;
use l2l_proto::client::{
    BatchClient, Client, ClientArgs, ClientSecurity, MAX_REPLY_BYTES, batch_client, client,
    endpoint,
};
use l2l_proto::refusal::Reason;
use l2l_proto::v1::coordinator_server::{Coordinator as Rpc, CoordinatorServer};
use l2l_proto::v1::{
    FetchPhiReply, FetchPhiRequest, HeartbeatReply, HeartbeatRequest, LeaseReply, LeaseRequest,
    RegisterReply, RegisterRequest, StatusReply, StatusRequest, SubmitBatchRequest, SubmitOutcome,
    SubmitReply, SubmitRequest, SubmitValidationReply, SubmitValidationRequest, ValidateReply,
    ValidateRequest, Version,
};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tonic::{Code, Request, Response, Status};

use crate::auth::{CheckToken, ServerSecurity};
use crate::config::SecurityConfig;
pub use crate::service::MAX_BATCH;
use crate::service::{ITEM_ENVELOPE, REQUEST_TIMEOUT, http2_server, incoming};

/// Batches a relay has in flight to the coordinator at once.
pub const IN_FLIGHT: usize = 2;

/// Submissions that may wait for a batch; a worker beyond them waits to enqueue.
const QUEUE: usize = 8192;

/// Longest a batch may take upstream before its workers are told to retry.
const BATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes a request may hold beyond a φ-sized gradient (ids, session, a validation
/// result's two curves).
const SLACK: usize = 64 << 10;

/// Arguments of `relay`.
#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    /// URL of the coordinator, e.g. http://10.0.0.5:50051 (https:// for TLS).
    #[arg(long, value_name = "URL")]
    pub upstream: String,
    /// Address the workers of this machine connect to (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:50052")]
    pub listen: SocketAddr,
    /// Most submissions per upstream batch (at most 64).
    #[arg(long, default_value_t = MAX_BATCH, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub max_batch: usize,
    /// Token and TLS towards the coordinator; the workers must present the same token.
    #[command(flatten)]
    pub client: ClientArgs,
    /// PEM certificate (chain) the relay serves TLS with; with --listen-tls-key.
    #[arg(long, value_name = "PATH", requires = "listen_tls_key")]
    pub listen_tls_cert: Option<PathBuf>,
    /// PEM private key of --listen-tls-cert.
    #[arg(long, value_name = "PATH", requires = "listen_tls_cert")]
    pub listen_tls_key: Option<PathBuf>,
    /// PEM CA certificate; when set, every worker must present a certificate it signed.
    #[arg(long, value_name = "PATH", requires = "listen_tls_cert")]
    pub listen_tls_client_ca: Option<PathBuf>,
}

/// φ as the relay holds it.
#[derive(Debug, Clone)]
struct Cached {
    version: Version,
    phi: Bytes,
}

/// A submission waiting for its batch's answer.
struct Pending {
    req: SubmitRequest,
    reply: oneshot::Sender<Result<SubmitReply, Status>>,
}

/// What the relay's handlers and tasks share.
struct Inner {
    upstream: String,
    control: Client,
    queue: mpsc::Sender<Pending>,
    phi: watch::Sender<Option<Cached>>,
    /// Fetches waiting for a newer φ: while any, the poller long-polls.
    waiting: AtomicUsize,
    /// Wakes the poller when a fetch starts waiting.
    wake: Notify,
}

/// The relay: a `Coordinator` service in front of the real one.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

impl Relay {
    /// Connects to the coordinator at `upstream`, waits for its first φ (up to
    /// `patience`), and starts the batching and φ tasks.
    pub async fn connect(
        upstream: &str,
        security: &ClientSecurity,
        max_batch: usize,
        patience: Duration,
    ) -> Result<Self> {
        let max_batch = max_batch.clamp(1, MAX_BATCH);
        // Two connections: batches and the φ long-poll on one, the workers' other calls
        // on the other, so neither waits behind the other's streams.
        let control = client(endpoint(upstream, security)?.connect_lazy(), security);
        let first = first_phi(control.clone(), upstream, patience).await?;
        // A gradient has φ's size, and φ's file is its values plus a header.
        let max_request = max_batch * (first.phi.len() + ITEM_ENVELOPE) + SLACK;
        let batches = batch_client(
            endpoint(upstream, security)?.connect_lazy(),
            security,
            max_request,
        );
        let data = client(endpoint(upstream, security)?.connect_lazy(), security);
        let (queue, rx) = mpsc::channel(QUEUE);
        let inner = Arc::new(Inner {
            upstream: upstream.to_string(),
            control,
            queue,
            phi: watch::Sender::new(Some(first)),
            waiting: AtomicUsize::new(0),
            wake: Notify::new(),
        });
        tokio::spawn(batcher(rx, batches, Arc::downgrade(&inner), max_batch));
        tokio::spawn(poller(data, inner.clone()));
        Ok(Self { inner })
    }

    /// The φ version the relay holds.
    pub fn version(&self) -> Option<Version> {
        self.inner.phi.borrow().as_ref().map(|c| c.version)
    }

    /// Bytes of the largest request a worker may send: a gradient of φ's size.
    fn max_request(&self) -> usize {
        self.inner.phi.borrow().as_ref().map_or(0, |c| c.phi.len()) + SLACK
    }

    /// Refuses a submission that would not fit its share of a batch (φ's file size plus
    /// [`ITEM_ENVELOPE`]), so no worker can make the coordinator refuse its neighbours'
    /// batch as too large.
    fn check_size(&self, r: &SubmitRequest) -> Result<(), Status> {
        // Fixed-size fields (ids, version, losses) with their tags and length prefixes
        // take at most 128 bytes.
        let size = r.grad.len() + r.session.len() + r.data_fingerprint.len() + 128;
        let limit = self.inner.phi.borrow().as_ref().map_or(0, |c| c.phi.len()) + ITEM_ENVELOPE;
        if size > limit {
            return Err(Status::invalid_argument(format!(
                "this submission is {size} bytes, more than a gradient of φ's size with its \
                 envelope ({limit}); is the worker meant for another run?"
            )));
        }
        Ok(())
    }

    /// An upstream failure as the worker should see it.
    fn upstream_error(&self, s: Status) -> Status {
        forwarded(&self.inner.upstream, s)
    }
}

/// A status from upstream as the relay passes it on: refusals with their reason, and
/// failures to reach the coordinator as `unavailable` (the worker retries).
fn forwarded(upstream: &str, s: Status) -> Status {
    if let Some(r) = Reason::of(&s) {
        if r == Reason::Unauthenticated {
            tracing::error!(
                "the coordinator refused this relay's token: {}",
                s.message()
            );
            return Status::unavailable(
                "the relay's token was refused by the coordinator; fix the relay's \
                 --token-file (or $L2L_TOKEN)",
            );
        }
        return r.status(s.message());
    }
    // A status the coordinator sent has no source; one made from a transport failure has.
    if std::error::Error::source(&s).is_some() || s.code() == Code::Unavailable {
        return Status::unavailable(format!(
            "the relay cannot reach the coordinator at {upstream}: {}; retry",
            s.message()
        ));
    }
    Status::new(s.code(), s.message())
}

/// The refusal an outcome of a batch carries, as a status.
fn outcome_status(o: SubmitOutcome) -> Status {
    match Reason::from_name(&o.reason) {
        _ if o.code == Code::Ok as i32 => {
            Status::internal("the coordinator answered neither a reply nor a refusal")
        }
        Some(r) if r.code() as i32 == o.code => r.status(o.message),
        _ => Status::new(Code::from(o.code), o.message),
    }
}

/// Fetches φ until the coordinator answers, for at most `patience`.
async fn first_phi(mut c: Client, upstream: &str, patience: Duration) -> Result<Cached> {
    let until = Instant::now() + patience;
    let mut last_said = Instant::now();
    loop {
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            c.fetch_phi(FetchPhiRequest {
                have: None,
                wait_ms: 0,
            }),
        )
        .await;
        let why = match got {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                return Ok(Cached {
                    version: r.version.unwrap_or_default(),
                    phi: r.phi,
                });
            }
            Ok(Err(s)) if Reason::of(&s) == Some(Reason::Unauthenticated) => {
                anyhow::bail!(
                    "the coordinator at {upstream} refused this relay's token: {}; give the \
                     relay the run's token (--token-file or $L2L_TOKEN)",
                    s.message()
                )
            }
            Ok(Err(s)) => s.to_string(),
            Err(_) => "no answer in 10 s".to_string(),
        };
        if Instant::now() >= until {
            anyhow::bail!(
                "the coordinator at {upstream} did not answer within {} s ({why}); is it \
                 running, and is the URL right?",
                patience.as_secs()
            );
        }
        if last_said.elapsed() >= Duration::from_secs(5) {
            tracing::warn!(upstream, why, "waiting for the coordinator");
            last_said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Puts `got` into the cache if it is newer than what it holds: a later step of the same
/// epoch, or a later epoch; any other epoch when `authoritative` (the poller asks one
/// request at a time, so its answer is the coordinator's epoch now, even for a run that
/// was started over).
fn publish(phi: &watch::Sender<Option<Cached>>, got: Cached, authoritative: bool) {
    phi.send_if_modified(|c| {
        let newer = match c {
            None => true,
            Some(c) if c.version == got.version => false,
            Some(c) if c.version.epoch != got.version.epoch => {
                authoritative || got.version.epoch > c.version.epoch
            }
            Some(c) => got.version.step > c.version.step,
        };
        if newer {
            if let Some(old) = c.as_ref().filter(|c| c.phi.len() != got.phi.len()) {
                tracing::warn!(
                    was = old.phi.len(),
                    now = got.phi.len(),
                    "φ changed size (another run?); restart the relay so its message limits follow"
                );
            }
            *c = Some(got);
        }
        newer
    });
}

/// Sends the queued submissions upstream in batches, [`IN_FLIGHT`] at a time.
async fn batcher(
    mut rx: mpsc::Receiver<Pending>,
    client: BatchClient,
    inner: std::sync::Weak<Inner>,
    max_batch: usize,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Wait for a free slot first: what queues meanwhile joins this batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        let mut client = client.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let have = inner.phi.borrow().as_ref().map(|c| c.version);
            let (items, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.req, p.reply)).unzip();
            let n = items.len();
            let sent = tokio::time::timeout(
                BATCH_TIMEOUT,
                client.submit_batch(SubmitBatchRequest { items, have }),
            )
            .await;
            let reply = match sent {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(s)) => {
                    tracing::warn!(status = %s, items = n, "a batch failed; its workers retry");
                    let s = forwarded(&inner.upstream, s);
                    for r in replies {
                        let _ = r.send(Err(s.clone()));
                    }
                    return;
                }
                Err(_) => {
                    tracing::warn!(
                        items = n,
                        "a batch got no answer in 30 s; its workers retry"
                    );
                    for r in replies {
                        let _ = r.send(Err(Status::unavailable(
                            "the coordinator did not answer the relay in 30 s; retry",
                        )));
                    }
                    return;
                }
            };
            if !reply.phi.is_empty() {
                let got = Cached {
                    version: reply.current.unwrap_or_default(),
                    phi: reply.phi,
                };
                publish(&inner.phi, got, false);
            }
            if reply.outcomes.len() != n {
                tracing::error!(
                    items = n,
                    outcomes = reply.outcomes.len(),
                    "the coordinator answered a batch with the wrong number of outcomes"
                );
                for r in replies {
                    let _ = r.send(Err(Status::internal(
                        "the coordinator's batch answer did not match the batch; is the \
                         relay the coordinator's version?",
                    )));
                }
                return;
            }
            for (o, r) in reply.outcomes.into_iter().zip(replies) {
                let _ = r.send(match o.reply {
                    Some(reply) => Ok(reply),
                    None => Err(outcome_status(o)),
                });
            }
        });
    }
}

/// Keeps the cached φ current: long-polls upstream while a fetch waits for a newer φ,
/// otherwise refreshes it once a second. Ends when the relay itself is gone.
async fn poller(mut client: Client, inner: Arc<Inner>) {
    let mut failures = 0u32;
    // The poller's own reference is the last one when every `Relay` is dropped.
    while Arc::strong_count(&inner) > 1 {
        if inner.waiting.load(Ordering::Acquire) == 0 {
            let wake = inner.wake.notified();
            tokio::pin!(wake);
            // Registered before the check, so a fetch that starts waiting now wakes us.
            wake.as_mut().enable();
            if inner.waiting.load(Ordering::Acquire) == 0 {
                let _ = tokio::time::timeout(Duration::from_secs(1), wake).await;
            }
        }
        let have = inner.phi.borrow().as_ref().map(|c| c.version);
        let wait_ms = if inner.waiting.load(Ordering::Acquire) > 0 {
            30_000
        } else {
            0
        };
        let got = tokio::time::timeout(
            REQUEST_TIMEOUT,
            client.fetch_phi(FetchPhiRequest { have, wait_ms }),
        )
        .await;
        match got {
            Ok(Ok(r)) => {
                failures = 0;
                let r = r.into_inner();
                if !r.unchanged {
                    let got = Cached {
                        version: r.version.unwrap_or_default(),
                        phi: r.phi,
                    };
                    publish(&inner.phi, got, true);
                }
            }
            failed => {
                // Quiet once the relay is gone (its coordinator may be gone too).
                if failures.is_multiple_of(10) && Arc::strong_count(&inner) > 1 {
                    let why = match failed {
                        Ok(Err(s)) => s.to_string(),
                        _ => "no answer".into(),
                    };
                    tracing::warn!(upstream = %inner.upstream, why, "cannot refresh φ; retrying");
                }
                failures += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Counts a fetch as waiting for a newer φ while it lives.
struct Waiting<'a>(&'a Inner);

impl<'a> Waiting<'a> {
    fn new(inner: &'a Inner) -> Self {
        inner.waiting.fetch_add(1, Ordering::AcqRel);
        inner.wake.notify_one();
        Self(inner)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The reply to a fetch by a worker holding `have`, from `cached`.
fn phi_reply(cached: &Cached, have: Option<Version>) -> FetchPhiReply {
    let unchanged = have == Some(cached.version);
    FetchPhiReply {
        version: Some(cached.version),
        unchanged,
        phi: if unchanged {
            Bytes::new()
        } else {
            cached.phi.clone()
        },
    }
}

#[tonic::async_trait]
impl Rpc for Relay {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        let mut c = self.inner.control.clone();
        c.register(req.into_inner())
            .await
            .map_err(|s| self.upstream_error(s))
    }

    async fn lease(&self, req: Request<LeaseRequest>) -> Result<Response<LeaseReply>, Status> {
        let mut c = self.inner.control.clone();
        c.lease(req.into_inner())
            .await
            .map_err(|s| self.upstream_error(s))
    }

    async fn fetch_phi(
        &self,
        req: Request<FetchPhiRequest>,
    ) -> Result<Response<FetchPhiReply>, Status> {
        let r = req.into_inner();
        let mut changed = self.inner.phi.subscribe();
        let cached = changed.borrow_and_update().clone();
        let Some(cached) = cached else {
            return Err(Status::unavailable("the relay holds no φ yet; retry"));
        };
        if r.have != Some(cached.version) || r.wait_ms == 0 {
            return Ok(Response::new(phi_reply(&cached, r.have)));
        }
        {
            let _waiting = Waiting::new(&self.inner);
            let wait = Duration::from_millis(r.wait_ms.min(60_000));
            let _ = tokio::time::timeout(wait, changed.changed()).await;
        }
        let cached = changed.borrow().clone();
        match cached {
            Some(c) => Ok(Response::new(phi_reply(&c, r.have))),
            None => Err(Status::unavailable("the relay holds no φ yet; retry")),
        }
    }

    async fn submit(&self, req: Request<SubmitRequest>) -> Result<Response<SubmitReply>, Status> {
        let req = req.into_inner();
        self.check_size(&req)?;
        let (reply, answer) = oneshot::channel();
        self.inner
            .queue
            .send(Pending { req, reply })
            .await
            .map_err(|_| Status::unavailable("the relay is shutting down; retry"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the relay dropped the submission; retry"))?
            .map(Response::new)
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let mut c = self.inner.control.clone();
        c.heartbeat(req.into_inner())
            .await
            .map_err(|s| self.upstream_error(s))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let mut c = self.inner.control.clone();
        c.status(req.into_inner())
            .await
            .map_err(|s| self.upstream_error(s))
    }

    async fn validate(
        &self,
        req: Request<ValidateRequest>,
    ) -> Result<Response<ValidateReply>, Status> {
        let mut c = self.inner.control.clone();
        c.validate(req.into_inner())
            .await
            .map_err(|s| self.upstream_error(s))
    }

    async fn submit_validation(
        &self,
        req: Request<SubmitValidationRequest>,
    ) -> Result<Response<SubmitValidationReply>, Status> {
        let mut c = self.inner.control.clone();
        c.submit_validation(req.into_inner())
            .await
            .map_err(|s| self.upstream_error(s))
    }
}

/// A relay serving on a socket: its address and a way to stop it.
pub struct RelayServer {
    /// The address it listens on (the real port when configured with port 0).
    pub addr: SocketAddr,
    /// The relay behind it.
    pub relay: Relay,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl RelayServer {
    /// Binds `listen` and serves `relay` with `security` (the workers' token and TLS).
    pub async fn start(relay: Relay, listen: SocketAddr, security: ServerSecurity) -> Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}; is the port in use?"))?;
        let addr = listener.local_addr()?;
        let svc = CoordinatorServer::new(relay.clone())
            .max_decoding_message_size(relay.max_request())
            .max_encoding_message_size(MAX_REPLY_BYTES);
        let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let svc = tonic::service::interceptor::InterceptedService::new(
            svc,
            CheckToken::new(security.token, refused),
        );
        let (health, health_svc) = tonic_health::server::health_reporter();
        for name in ["", crate::service::LIVENESS] {
            health
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
        let mut builder = http2_server(security.tls)?;
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            builder
                .add_service(health_svc)
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming(listener), async move {
                    let _ = stopped.changed().await;
                })
                .await
                .context("gRPC server failed")
        });
        Ok(Self {
            addr,
            relay,
            stop,
            task,
        })
    }

    /// Stops serving and returns when the server is down.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(true);
        self.task.await.context("relay task panicked")?
    }
}

/// `l2l-coordinator relay`: serves until SIGINT or SIGTERM.
pub async fn run(a: RelayArgs) -> Result<()> {
    let upstream_security = a.client.resolve(&a.upstream)?;
    let security = ServerSecurity::resolve(&SecurityConfig {
        token_file: a.client.token_file.clone(),
        tls_cert: a.listen_tls_cert.clone(),
        tls_key: a.listen_tls_key.clone(),
        tls_client_ca: a.listen_tls_client_ca.clone(),
    })?;
    if security.token.is_none() && !a.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %a.listen,
            "no token: anyone who can reach this port can act through the relay; \
             set --token-file or $L2L_TOKEN"
        );
    }
    let relay = Relay::connect(
        &a.upstream,
        &upstream_security,
        a.max_batch,
        Duration::from_secs(600),
    )
    .await?;
    let server = RelayServer::start(relay, a.listen, security).await?;
    // Tests and scripts read this line to learn the port when listening on port 0.
    println!("listening on {}", server.addr);
    tracing::info!(addr = %server.addr, upstream = %a.upstream, max_batch = a.max_batch, version = ?server.relay.version(), "relaying");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    server.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(epoch: u64, step: u64) -> Cached {
        Cached {
            version: Version { epoch, step },
            phi: Bytes::from(vec![step as u8; 8]),
        }
    }

    fn held(phi: &watch::Sender<Option<Cached>>) -> (u64, u64) {
        let v = phi.borrow().as_ref().unwrap().version;
        (v.epoch, v.step)
    }

    #[test]
    fn the_cache_never_goes_back_except_by_the_poller() {
        let phi = watch::Sender::new(None);
        publish(&phi, cached(0, 5), false);
        assert_eq!(held(&phi), (0, 5));
        // A batch reply that was overtaken does not bring back an older φ.
        publish(&phi, cached(0, 3), false);
        assert_eq!(held(&phi), (0, 5));
        publish(&phi, cached(0, 9), false);
        assert_eq!(held(&phi), (0, 9));
        publish(&phi, cached(1, 2), false);
        assert_eq!(held(&phi), (1, 2), "a new epoch is newer whatever its step");
        // The poller's answer is the coordinator's state now: a run started over (its
        // epoch counted anew) is taken as it is.
        publish(&phi, cached(1, 1), true);
        assert_eq!(
            held(&phi),
            (1, 2),
            "within an epoch only forward, even for the poller"
        );
        publish(&phi, cached(0, 0), true);
        assert_eq!(held(&phi), (0, 0));
        assert_eq!(phi.borrow().as_ref().unwrap().phi[..], [0u8; 8]);
    }

    #[test]
    fn outcomes_become_the_statuses_a_direct_submit_returns() {
        for r in Reason::ALL {
            let s = outcome_status(SubmitOutcome {
                reply: None,
                code: r.code() as i32,
                reason: r.name().into(),
                message: "why".into(),
            });
            assert_eq!((s.code(), Reason::of(&s)), (r.code(), Some(r)));
            assert_eq!(s.message(), "why");
        }
        // A reason that does not match its code is not passed on as one.
        let s = outcome_status(SubmitOutcome {
            reply: None,
            code: Code::NotFound as i32,
            reason: "finished".into(),
            message: "x".into(),
        });
        assert_eq!((s.code(), Reason::of(&s)), (Code::NotFound, None));
        // An outcome with neither a reply nor a refusal is an error, never a success.
        let s = outcome_status(SubmitOutcome::default());
        assert_eq!(s.code(), Code::Internal);
    }

    #[test]
    fn forwarded_statuses_keep_refusals_and_turn_failures_into_retries() {
        let up = "http://10.0.0.5:50051";
        let s = forwarded(up, Reason::ForeignLease.status("not yours"));
        assert_eq!(Reason::of(&s), Some(Reason::ForeignLease));
        assert_eq!(s.message(), "not yours");
        // The relay's own token refused upstream is the relay's problem: workers retry.
        let s = forwarded(up, Reason::Unauthenticated.status("wrong token"));
        assert_eq!((s.code(), Reason::of(&s)), (Code::Unavailable, None));
        let s = forwarded(up, Status::unavailable("connection refused"));
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains(up), "{s:?}");
        let s = forwarded(up, Status::invalid_argument("too big"));
        assert_eq!((s.code(), s.message()), (Code::InvalidArgument, "too big"));
    }
}
