//! `run`: register, lease, unroll, submit; reconnect with backoff; stop on request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use l2l_common::AnyPhi;
use l2l_common::engine::{Backend, Engine, Loaded};
use l2l_common::estimator::Trajectory;
use l2l_common::files::TensorFile;
use l2l_common::files::config_from;
use l2l_common::problems::mnist::Split;
use l2l_common::problems::{DataSource, ProblemSpec};
use l2l_proto::client::{Client, ClientSecurity, connect, explain, fatal_refusal};
use l2l_proto::refusal::Reason;
use l2l_proto::role::Role;
use l2l_proto::v1::{
    FetchPhiRequest, HeartbeatRequest, Instance, LeaseReply, LeaseRequest, RegisterRequest,
    SubmitRequest, SubmitValidationRequest, ValidateRequest, Version,
};

use crate::backoff::Backoff;
use crate::metrics::WorkerMetrics;

/// The domain of PES's perturbation streams ([`l2l_common::rng::Rng::for_step`]).
const PES_DOMAIN: u64 = 0x5045_535f_6570_7300;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The coordinator's URL, e.g. `http://127.0.0.1:50051`.
    pub coordinator: String,
    /// A name for the coordinator's logs and status.
    pub name: String,
    /// First reconnection delay; doubles up to `max_backoff`, with ±50% jitter.
    pub min_backoff: Duration,
    /// Longest reconnection delay.
    pub max_backoff: Duration,
    /// Seed of the backoff jitter.
    pub seed: u64,
    /// The token and TLS settings.
    pub security: ClientSecurity,
    /// Where to count truncations and submissions, if anywhere.
    pub metrics: Option<Arc<WorkerMetrics>>,
    /// MNIST-format data for `mlp` instances (its training split is used).
    pub data: std::path::PathBuf,
    /// Where the unrolls run.
    pub backend: Backend,
    /// Train (lease instances, submit meta-gradients) or evaluate (validation jobs).
    pub role: Role,
    /// In async runs, submit each truncation in the background while the next one
    /// computes (its φ is then at most one submission older); off: submit, then go on.
    pub pipeline: bool,
}

impl WorkerOptions {
    /// Defaults for `coordinator`: backoff 100 ms .. 5 s.
    pub fn new(coordinator: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            coordinator: coordinator.into(),
            name: name.into(),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            seed: std::process::id() as u64,
            security: ClientSecurity::default(),
            metrics: None,
            data: std::path::PathBuf::from(crate::DEFAULT_DATA),
            backend: Backend::Fused,
            role: Role::Trainer,
            pipeline: true,
        }
    }
}

/// What a worker did before it stopped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerSummary {
    /// Submissions the coordinator accepted.
    pub accepted: u64,
    /// Submissions it refused.
    pub refused: u64,
    /// Trajectories run to their end.
    pub trajectories: u64,
    /// Validation results the coordinator recorded (evaluators).
    pub validations: u64,
    /// Submissions that travelled while the next truncation computed (pipelining).
    pub overlapped: u64,
    /// Truncations that first asked the coordinator for its φ version (with pipelining,
    /// the others ran on the φ a submission brought back, already known to be current).
    pub phi_checks: u64,
}

/// How a trajectory ended, from the weakest consequence to the strongest (so that of
/// two outcomes the worker acts on the greater).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Every truncation was submitted: lease the next instance.
    Done,
    /// Lease again after a pause (the lease was lost, or the instance is unusable).
    Release,
    /// Register again (the coordinator forgot this worker: it restarted).
    Reregister,
    /// The run is finished or a stop was requested.
    Stop,
}

/// Attempts of one call before the coordinator counts as unreachable.
const RETRIES: usize = 4;

/// What a landed submission brings back besides its acceptance: whether φ was checked
/// right after it, and the newer φ when the coordinator's had moved past the one held.
struct Landed {
    /// The coordinator's φ version after the submission, as its reply named it.
    current: Option<Version>,
    /// The check after the submission worked: `newer` is that version, or none was needed.
    checked: bool,
    /// φ fetched because the reply named a newer version than the one held.
    newer: Option<(Version, AnyPhi)>,
}

/// A submission on its way: the coordinator's answer, as [`with_retries`] gives it.
type Submission = tokio::task::JoinHandle<Result<Landed, Option<tonic::Status>>>;

/// After an accepted submission whose reply names a φ newer than `have`, fetches and
/// decodes it (`checked` is false when that failed: the next truncation fetches φ itself).
async fn fetch_newer(
    client: Option<Client>,
    have: Option<Version>,
    current: Option<Version>,
) -> Landed {
    if current.is_none() || current == have {
        return Landed {
            current,
            checked: current.is_some(),
            newer: None,
        };
    }
    let Some(mut c) = client else {
        return Landed {
            current,
            checked: false,
            newer: None,
        };
    };
    let fetched = c
        .fetch_phi(FetchPhiRequest { have, wait_ms: 0 })
        .await
        .map_err(|s| anyhow::anyhow!("{s}"))
        .and_then(|r| {
            let r = r.into_inner();
            if r.unchanged {
                return Ok(None);
            }
            Ok(Some((r.version.unwrap_or_default(), decode_phi(&r.phi)?)))
        });
    match fetched {
        Ok(newer) => Landed {
            current,
            checked: true,
            newer,
        },
        Err(e) => {
            tracing::debug!(error = %e, "prefetching φ failed; the next truncation fetches it");
            Landed {
                current,
                checked: false,
                newer: None,
            }
        }
    }
}

/// φ versions in the order the coordinator makes them: by restart epoch, then by step.
fn order(v: Version) -> (u64, u64) {
    (v.epoch, v.step)
}

/// Calls the coordinator up to [`RETRIES`] times, pausing `delays[i]` after the i-th
/// transport failure (cut short by `stop`); a refusal is `Some(status)`, and `None` means
/// the coordinator could not be reached (or there is no client).
async fn with_retries<R, Fut>(
    client: Option<Client>,
    what: &'static str,
    delays: [Duration; RETRIES],
    stop: Arc<AtomicBool>,
    mut call: impl FnMut(Client) -> Fut,
) -> Result<R, Option<tonic::Status>>
where
    Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    let client = client.ok_or(None)?;
    for (attempt, delay) in delays.into_iter().enumerate() {
        match call(client.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if is_transport(&s) => {
                tracing::warn!(status = %s, attempt, "{what} failed; retrying");
                let until = Instant::now() + delay;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(10).min(until - Instant::now())).await;
                }
            }
            Err(s) => return Err(Some(s)),
        }
    }
    Err(None)
}

/// Why a submission did not land.
#[derive(Debug, Clone, Copy, PartialEq)]
enum NotLanded {
    /// The coordinator refused it, saying why.
    Refused(Reason),
    /// Refused without a reason this worker knows (a newer coordinator?).
    Unrecognised,
    /// The coordinator could not be reached.
    Transport,
}

impl NotLanded {
    /// The label in the worker's metrics.
    fn label(self) -> &'static str {
        match self {
            NotLanded::Refused(r) => r.name(),
            NotLanded::Unrecognised => "unknown",
            NotLanded::Transport => "transport",
        }
    }
}

/// A transport-level failure (coordinator down or unreachable) rather than a refusal.
fn is_transport(s: &tonic::Status) -> bool {
    Reason::of(s).is_none()
        && matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
        )
}

struct Worker {
    opts: WorkerOptions,
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    id: u64,
    /// The secret `Register` returned; every request of this worker carries it.
    session: Vec<u8>,
    /// Pauses after failures; reset by an accepted submission.
    backoff: Backoff,
    lease_timeout: Duration,
    wait_for_update: bool,
    /// async: the largest staleness the coordinator accepts (0: submit before going on).
    max_staleness: u64,
    /// How long the next φ fetch waits for a newer version: set after an accepted
    /// submission in sync mode, across trajectory boundaries too (a worker that starts a
    /// new trajectory must not compute on a φ whose round is still open).
    next_wait: Duration,
    phi: Option<(Version, AnyPhi)>,
    stop: Arc<AtomicBool>,
    summary: WorkerSummary,
    /// The training split, loaded on the first lease that needs data.
    data: DataSource,
    /// SHA-256 of the training split and of the image directory, each once read (sent
    /// with every gradient that used it).
    fingerprint: [String; 2],
    /// The backend the unrolls run on.
    engine: Engine,
    /// The baseline rates and curves an evaluator keeps across jobs.
    evaluator: crate::validate::Evaluator,
}

/// Runs a worker until the coordinator's run is finished or `stop` is set.
///
/// Blocking: the unroll runs on the calling thread; RPCs and heartbeats run on a small
/// runtime of the worker's own. Fails at once when the backend cannot be opened.
pub fn run_worker(opts: WorkerOptions, stop: Arc<AtomicBool>) -> Result<WorkerSummary> {
    let engine = Engine::open(opts.backend)
        .with_context(|| format!("cannot open the {} backend", opts.backend))?;
    tracing::info!(backend = %engine.backend(), adapter = engine.adapter(), "backend opened");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the worker's I/O runtime")?;
    let mut w = Worker {
        backoff: Backoff::new(opts.min_backoff, opts.max_backoff, opts.seed),
        data: DataSource::new(&opts.data, Split::Train),
        fingerprint: Default::default(),
        opts,
        rt,
        client: None,
        id: 0,
        session: Vec::new(),
        lease_timeout: Duration::from_secs(30),
        wait_for_update: false,
        max_staleness: 0,
        next_wait: Duration::ZERO,
        phi: None,
        stop,
        summary: WorkerSummary::default(),
        engine,
        evaluator: crate::validate::Evaluator::new(),
    };
    w.main_loop()?;
    Ok(w.summary)
}

impl Worker {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Pauses after a failure of any kind (connect, register, lease, φ, truncation,
    /// refusal): exponential in the failures since the last accepted submission.
    fn pause(&mut self) {
        let delay = self.backoff.next_failure();
        self.sleep(delay);
    }

    /// Sleeps `delay`, waking early on stop.
    fn sleep(&self, delay: Duration) {
        let until = Instant::now() + delay;
        while Instant::now() < until && !self.stopping() {
            std::thread::sleep(Duration::from_millis(10).min(until - Instant::now()));
        }
    }

    /// Connects and registers, retrying with backoff until it works or stop is set;
    /// fails at once when the coordinator refuses this worker's credentials.
    fn join(&mut self) -> Result<bool> {
        while !self.stopping() {
            match self.try_join() {
                Ok(()) => return Ok(true),
                Err(e) => {
                    if let Some(why) = e.downcast_ref::<tonic::Status>().and_then(fatal_refusal) {
                        bail!(why);
                    }
                    tracing::warn!(failures = self.backoff.failures(), error = %e, "cannot join the coordinator; retrying");
                    self.client = None;
                    self.pause();
                }
            }
        }
        Ok(false)
    }

    fn try_join(&mut self) -> Result<()> {
        if self.client.is_none() {
            let client = self.rt.block_on(connect(
                &self.opts.coordinator,
                &self.opts.security,
                Duration::from_secs(30),
            ))?;
            self.client = Some(client);
        }
        let mut c = self
            .client
            .clone()
            .ok_or_else(|| anyhow!("not connected"))?;
        let reply = match self.rt.block_on(c.register(RegisterRequest {
            name: self.opts.name.clone(),
            backend: self.engine.describe(),
            role: self.opts.role.name().into(),
        })) {
            Ok(r) => r.into_inner(),
            Err(e) => return Err(explain(&self.opts.security, e)),
        };
        self.id = reply.worker_id;
        self.session = reply.session;
        self.lease_timeout = Duration::from_millis(reply.lease_timeout_ms.max(1));
        self.wait_for_update = reply.wait_for_update;
        self.max_staleness = reply.max_staleness;
        tracing::info!(worker = self.id, epoch = reply.epoch, "registered");
        Ok(())
    }

    fn main_loop(&mut self) -> Result<()> {
        'join: loop {
            if !self.join()? {
                return Ok(());
            }
            loop {
                if self.stopping() {
                    return Ok(());
                }
                let outcome = if self.opts.role == Role::Evaluator {
                    self.validation()?
                } else {
                    let Some(mut c) = self.client.clone() else {
                        // The coordinator became unreachable (the client was dropped).
                        self.pause();
                        continue 'join;
                    };
                    let lease = self.rt.block_on(c.lease(LeaseRequest {
                        worker_id: self.id,
                        session: self.session.clone(),
                    }));
                    let lease = match lease {
                        Ok(l) => l.into_inner(),
                        Err(s) if Reason::of(&s) == Some(Reason::Finished) => return Ok(()),
                        Err(s)
                            if matches!(
                                Reason::of(&s),
                                Some(Reason::UnknownWorker | Reason::BadSession)
                            ) =>
                        {
                            self.pause();
                            continue 'join;
                        }
                        Err(s) => {
                            if let Some(why) = fatal_refusal(&s) {
                                bail!(why);
                            }
                            tracing::warn!(status = %s, "lease failed; reconnecting");
                            self.client = None;
                            self.pause();
                            continue 'join;
                        }
                    };
                    self.trajectory(lease)?
                };
                match outcome {
                    Outcome::Done => continue,
                    Outcome::Release => {
                        self.pause();
                        continue;
                    }
                    Outcome::Reregister => {
                        self.pause();
                        continue 'join;
                    }
                    Outcome::Stop => return Ok(()),
                }
            }
        }
    }

    /// Makes sure the newest φ is loaded, first waiting up to `wait` for a version newer
    /// than the one held; returns its version.
    fn refresh_phi(&mut self, wait: Duration) -> Result<Version, tonic::Status> {
        let mut c = self
            .client
            .clone()
            .ok_or_else(|| tonic::Status::unavailable("not connected"))?;
        let have = self.phi.as_ref().map(|(v, _)| *v);
        // Long-poll in slices of at most a second, so a stop request is seen promptly.
        let until = Instant::now() + wait;
        let reply = loop {
            let left = until.saturating_duration_since(Instant::now());
            let reply = self
                .rt
                .block_on(c.fetch_phi(FetchPhiRequest {
                    have,
                    wait_ms: left.min(Duration::from_secs(1)).as_millis() as u64,
                }))?
                .into_inner();
            if !reply.unchanged || left.is_zero() || self.stopping() {
                break reply;
            }
        };
        let version = reply.version.unwrap_or_default();
        if !reply.unchanged {
            let phi =
                decode_phi(&reply.phi).map_err(|e| tonic::Status::internal(format!("{e:#}")))?;
            self.phi = Some((version, phi));
        }
        Ok(version)
    }

    /// Runs a leased trajectory truncation by truncation, submitting each; in async runs
    /// (with [`WorkerOptions::pipeline`]) a submission travels while the next truncation
    /// computes, and lands before the one after it is sent, so they arrive in order.
    fn trajectory(&mut self, lease: LeaseReply) -> Result<Outcome> {
        let span = tracing::info_span!("lease", id = lease.lease_id);
        let _g = span.enter();
        let mut in_flight = None;
        let outcome = self.truncations(lease, &mut in_flight);
        let Some((task, fingerprint)) = in_flight else {
            return outcome;
        };
        // The loop ended early (stop, lost φ, failed truncation) with a submission on its
        // way: it lands first, so the work it carries is not lost.
        let landed = self.join_submit(task).map(drop);
        match (outcome, self.landed(landed, &fingerprint)) {
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(e),
            // The stronger of the two: the submission may have found the coordinator gone
            // (Reregister, the client dropped) while the loop only lost its lease.
            (Ok(o), Ok(Some(l))) => Ok(o.max(l)),
            (Ok(o), Ok(None)) => Ok(o),
        }
    }

    /// The body of [`Worker::trajectory`]; leaves in `in_flight` a submission still on its
    /// way when it returns early.
    fn truncations(
        &mut self,
        lease: LeaseReply,
        in_flight: &mut Option<(Submission, String)>,
    ) -> Result<Outcome> {
        let (problem, data_fingerprint) = match self.instance_problem(lease.instance.as_ref()) {
            Ok(p) => p,
            Err(why) => {
                tracing::error!(instance = ?lease.instance, "{why}");
                bail!("cannot run the leased instance: {why}");
            }
        };
        let estimator = match lease.estimator() {
            Ok(e) => e,
            Err(why) => {
                tracing::error!(estimator = ?lease.estimator, "{why}");
                bail!("cannot run the lease: {why}");
            }
        };
        // PES's perturbations: a stream per lease (lease ids are unique within a run, also
        // across restarts), from what the coordinator chose, so runs are reproducible.
        let instance_seed = lease.instance.as_ref().map_or(0, |i| i.seed);
        let seed =
            l2l_common::rng::Rng::for_step(instance_seed, PES_DOMAIN, lease.lease_id as usize)
                .next_u64();
        let t = lease.truncation_steps.max(1) as usize;
        let truncations = (lease.trajectory_steps as usize) / t;
        let mut carry = None;
        // Whether φ was checked against the coordinator's after the last submission that
        // landed (pipelining): then this truncation starts without a round trip.
        let mut phi_checked = false;
        for k in 0..truncations {
            if self.stopping() {
                return Ok(Outcome::Stop);
            }
            let wait = std::mem::take(&mut self.next_wait);
            if !std::mem::take(&mut phi_checked) {
                self.summary.phi_checks += 1;
                if let Err(s) = self.refresh_phi(wait) {
                    tracing::warn!(status = %s, "cannot fetch φ");
                    self.client = None;
                    return Ok(Outcome::Reregister);
                }
            }
            let Some((version, phi)) = self.phi.as_ref() else {
                return Ok(Outcome::Reregister);
            };
            let version = *version;
            let c = match carry.take() {
                Some(c) => c,
                None => match Trajectory::start(estimator, &self.engine, phi, &problem, seed) {
                    Ok(c) => c,
                    Err(e) => bail!("cannot start the trajectory: {e}"),
                },
            };
            let _t = tracing::debug_span!("truncation", k, version = version.step).entered();
            let started = Instant::now();
            let heartbeat = self.start_heartbeat(lease.lease_id);
            let weights = if lease.step_weights.is_empty() {
                None
            } else {
                let Some(w) = lease.step_weights.get(k * t..(k + 1) * t) else {
                    bail!(
                        "the lease has {} step weights for {} steps; is this worker older than the coordinator?",
                        lease.step_weights.len(),
                        lease.trajectory_steps
                    );
                };
                Some(w)
            };
            let out = c.truncation(&self.engine, phi, &problem, k * t, t, weights);
            heartbeat.abort();
            if let Some(m) = &self.opts.metrics {
                m.truncations.inc();
                m.unroll_seconds.observe(started.elapsed().as_secs_f64());
            }
            let out = match out {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(error = %e, "truncation failed; dropping the trajectory");
                    return Ok(Outcome::Release);
                }
            };
            let req = SubmitRequest {
                worker_id: self.id,
                lease_id: lease.lease_id,
                truncation: k as u32,
                version: Some(version),
                grad: l2l_common::wire::f32_to_le_bytes(&out.grad.flatten()).into(),
                meta_loss: out.meta_loss,
                unroll_seconds: started.elapsed().as_secs_f64(),
                session: self.session.clone(),
                data_fingerprint: data_fingerprint.clone(),
            };
            carry = Some(out.carry);
            // The previous truncation's submission lands before this one is sent.
            if let Some((task, fingerprint)) = in_flight.take() {
                let landed = self.join_submit(task);
                phi_checked = matches!(landed, Ok(true));
                if let Some(o) = self.landed(landed.map(drop), &fingerprint)? {
                    return Ok(o);
                }
            }
            let overlap = self.opts.pipeline && !self.wait_for_update && self.max_staleness >= 1;
            if overlap && k + 1 < truncations {
                // This submission travels while the next truncation computes (on the φ
                // checked after the previous one), and brings back φ when it moved.
                self.summary.overlapped += 1;
                *in_flight = Some((self.spawn_submit(req, true), data_fingerprint.clone()));
            } else {
                let task = self.spawn_submit(req, false);
                let landed = self.join_submit(task);
                if let Some(o) = self.landed(landed.map(drop), &data_fingerprint)? {
                    return Ok(o);
                }
            }
        }
        self.summary.trajectories += 1;
        if let Some(m) = &self.opts.metrics {
            m.trajectories.inc();
        }
        Ok(Outcome::Done)
    }

    /// Counts a submission's result and says whether the trajectory ends with it (`None`:
    /// go on); fails when nothing this worker computes can count.
    fn landed(
        &mut self,
        submitted: Result<(), NotLanded>,
        data_fingerprint: &str,
    ) -> Result<Option<Outcome>> {
        if let Some(m) = &self.opts.metrics {
            m.submission(submitted.err().map_or("accepted", NotLanded::label));
        }
        match submitted {
            Ok(()) => {
                self.summary.accepted += 1;
                self.backoff.reset();
                // In sync mode the next truncation waits for the round to close, so
                // it is not computed on a φ that is about to be replaced.
                self.next_wait = if self.wait_for_update {
                    self.lease_timeout / 3
                } else {
                    Duration::ZERO
                };
                Ok(None)
            }
            Err(r) => {
                self.summary.refused += 1;
                self.next_wait = Duration::ZERO;
                match r {
                    // Outdated φ: the trajectory goes on with the new one.
                    NotLanded::Refused(
                        Reason::Stale | Reason::PreRestart | Reason::FutureVersion,
                    ) => Ok(None),
                    NotLanded::Refused(Reason::Finished) => Ok(Some(Outcome::Stop)),
                    // Another data set than the run's: nothing this worker computes
                    // can count, so it stops and says why.
                    NotLanded::Refused(Reason::WrongData) => bail!(
                        "the coordinator refused this worker's training data ({}, SHA-256 {}): \
                         the run was trained on another data set; give every worker of the \
                         run the same --data files",
                        self.opts.data.display(),
                        if data_fingerprint.is_empty() {
                            "none"
                        } else {
                            data_fingerprint
                        }
                    ),
                    NotLanded::Refused(Reason::UnknownWorker | Reason::BadSession)
                    | NotLanded::Transport => Ok(Some(Outcome::Reregister)),
                    _ => Ok(Some(Outcome::Release)),
                }
            }
        }
    }

    /// Sends a submission on the worker's runtime, retrying transport failures a few
    /// times (a retried one is acknowledged as a duplicate); with `prefetch`, then fetches
    /// φ when the reply names a newer version than the one held.
    fn spawn_submit(&mut self, req: SubmitRequest, prefetch: bool) -> Submission {
        let delays = self.retry_delays();
        let (client, stop) = (self.client.clone(), self.stop.clone());
        let have = self.phi.as_ref().map(|(v, _)| *v);
        self.rt.spawn(async move {
            let reply = with_retries(client.clone(), "submit", delays, stop, move |mut c| {
                let req = req.clone();
                async move { c.submit(req).await }
            })
            .await?;
            Ok(if prefetch {
                fetch_newer(client, have, reply.current).await
            } else {
                Landed {
                    current: reply.current,
                    checked: false,
                    newer: None,
                }
            })
        })
    }

    /// Waits for a submission and takes the φ it brought; says whether φ is known to be
    /// current, or returns the refusal reason (`transport` when the coordinator is gone,
    /// and then the client is dropped).
    fn join_submit(&mut self, task: Submission) -> Result<bool, NotLanded> {
        let result = self.rt.block_on(task).unwrap_or_else(|e| {
            Err(Some(tonic::Status::internal(format!(
                "submission task: {e}"
            ))))
        });
        match result {
            Ok(landed) => {
                // A refresh while the submission travelled may have installed a newer φ
                // than the one fetched: φ never goes back.
                if let Some((v, phi)) = landed.newer
                    && self.held_version() < Some(order(v))
                {
                    self.phi = Some((v, phi));
                }
                // φ is current if what is held now is at least the version the reply named.
                Ok(landed.checked
                    && landed
                        .current
                        .is_some_and(|c| self.held_version() >= Some(order(c))))
            }
            Err(Some(s)) => {
                let r = Reason::of(&s).map_or(NotLanded::Unrecognised, NotLanded::Refused);
                tracing::info!(reason = r.label(), "submission refused: {}", s.message());
                Err(r)
            }
            Err(None) => {
                self.client = None;
                Err(NotLanded::Transport)
            }
        }
    }

    /// Calls the coordinator, retrying transport failures a few times with backoff (a
    /// retried submission is acknowledged as a duplicate); a refusal is `Some(status)`,
    /// and `None` means the coordinator could not be reached (the client is dropped).
    fn retrying<R, Fut>(
        &mut self,
        what: &'static str,
        call: impl FnMut(Client) -> Fut,
    ) -> Result<R, Option<tonic::Status>>
    where
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let delays = self.retry_delays();
        let r = self.rt.block_on(with_retries(
            self.client.clone(),
            what,
            delays,
            self.stop.clone(),
            call,
        ));
        if matches!(r, Err(None)) {
            self.client = None;
        }
        r
    }

    /// The order of the φ held, if any (see [`order`]).
    fn held_version(&self) -> Option<(u64, u64)> {
        self.phi.as_ref().map(|(v, _)| order(*v))
    }

    /// The pauses after each of a call's transport failures.
    fn retry_delays(&mut self) -> [Duration; RETRIES] {
        std::array::from_fn(|attempt| self.backoff.delay(attempt as u32))
    }

    /// Heartbeats the lease every third of its timeout while the unroll runs.
    fn start_heartbeat(&self, lease: u64) -> tokio::task::JoinHandle<()> {
        let client = self.client.clone();
        let (worker, every) = (self.id, self.lease_timeout / 3);
        let session = self.session.clone();
        self.rt.spawn(async move {
            let Some(mut c) = client else { return };
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let _ = c
                    .heartbeat(HeartbeatRequest {
                        worker_id: worker,
                        lease_id: lease,
                        session: session.clone(),
                    })
                    .await;
            }
        })
    }
}

impl Worker {
    /// One validation job of an evaluator: asks for one, runs it, returns its curves.
    fn validation(&mut self) -> Result<Outcome> {
        let Some(mut c) = self.client.clone() else {
            // The coordinator became unreachable (the client was dropped): join again.
            return Ok(Outcome::Reregister);
        };
        let job = self.rt.block_on(c.validate(ValidateRequest {
            worker_id: self.id,
            session: self.session.clone(),
        }));
        let job = match job {
            Ok(j) => j.into_inner(),
            Err(s) => return self.after_refusal(&s),
        };
        if !job.enabled {
            bail!(
                "the coordinator's run validates nothing ([validation] every = 0): enable \
                 validation in its configuration, or run this worker as a trainer (without \
                 --role evaluator)"
            );
        }
        if job.job_id == 0 {
            self.sleep(Duration::from_millis(job.retry_ms.clamp(100, 10_000)));
            return Ok(Outcome::Done);
        }
        let span = tracing::info_span!("validation", job = job.job_id);
        let _g = span.enter();
        let phi = decode_phi(&job.phi).context("cannot read the validation job's φ")?;
        // The data set's fingerprint, when a family of the job uses data.
        let first = job.instances.first().and_then(|i| i.spec().ok());
        let fingerprint = if let Some(spec) = first.filter(|spec| spec.needs_data()) {
            self.data_fingerprint(&spec).with_context(|| {
                format!(
                    "cannot load the validation data (--data {})",
                    self.opts.data.display()
                )
            })?
        } else {
            String::new()
        };
        let started = Instant::now();
        let stop = self.stop.clone();
        let curves = self
            .evaluator
            .run(&job, &phi, &self.engine, &mut self.data, &|| {
                stop.load(Ordering::Relaxed)
            });
        let curves = match curves {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(Outcome::Stop),
            Err(e) => bail!("cannot run the validation job: {e:#}"),
        };
        let version = job.version.unwrap_or_default();
        let req = SubmitValidationRequest {
            worker_id: self.id,
            session: self.session.clone(),
            job_id: job.job_id,
            learned: curves.learned,
            baseline: curves.baseline,
            baseline_lr: curves.lr,
            data_fingerprint: fingerprint,
        };
        let sent = self.retrying("validation result", |mut c| {
            let req = req.clone();
            async move { c.submit_validation(req).await }
        });
        match sent {
            Ok(r) => {
                self.summary.validations += 1;
                self.backoff.reset();
                tracing::info!(
                    version = version.step,
                    score = r.score,
                    best = r.best,
                    seconds = started.elapsed().as_secs_f64(),
                    "validation recorded"
                );
                Ok(Outcome::Done)
            }
            Err(Some(s)) if Reason::of(&s) == Some(Reason::WrongData) => bail!(
                "the coordinator refused this evaluator's data ({}): {}; give every \
                 worker of the run the same --data files",
                self.opts.data.display(),
                s.message()
            ),
            Err(Some(s)) => {
                tracing::warn!(status = %s, "validation result refused");
                self.after_refusal(&s)
            }
            Err(None) => Ok(Outcome::Reregister),
        }
    }

    /// What a refused or failed request of an evaluator leads to.
    fn after_refusal(&mut self, s: &tonic::Status) -> Result<Outcome> {
        Ok(match Reason::of(s) {
            Some(Reason::Finished) => Outcome::Stop,
            Some(Reason::UnknownWorker | Reason::BadSession) => Outcome::Reregister,
            Some(_) => Outcome::Release,
            None => {
                if let Some(why) = fatal_refusal(s) {
                    bail!(why);
                }
                tracing::warn!(status = %s, "validation request failed; reconnecting");
                self.client = None;
                Outcome::Reregister
            }
        })
    }
}

/// Decodes φ as served by the coordinator (an `l2l-lstm/1` file, one group or several).
fn decode_phi(bytes: &[u8]) -> Result<AnyPhi> {
    let mut file = TensorFile::parse(std::path::Path::new("<coordinator φ>"), bytes)?;
    let config = config_from(&file)?;
    Ok(AnyPhi::take_from(&mut file, config)?)
}

impl Worker {
    /// Builds the instance's problem on the backend (loading the data on the first lease
    /// that needs data), with the fingerprint of the data it uses (empty: none); refuses
    /// unknown families, unreadable parameters and missing data.
    fn instance_problem(
        &mut self,
        instance: Option<&Instance>,
    ) -> Result<(Loaded, String), String> {
        let i = instance.ok_or("the lease carries no instance")?;
        let spec = i
            .spec()
            .map_err(|e| format!("{e}; is this worker older than the coordinator?"))?;
        let optimizee = spec
            .instance(i.seed, &mut self.data)
            .map_err(|e| format!("cannot make the {} instance: {e}", spec.family()))?;
        let fingerprint = if spec.needs_data() {
            self.data_fingerprint(&spec).map_err(|e| e.to_string())?
        } else {
            String::new()
        };
        Ok((self.engine.load(optimizee), fingerprint))
    }

    /// The SHA-256 of the training split (or, for `art`, of the image directory),
    /// loading it (and logging it) the first time.
    fn data_fingerprint(&mut self, spec: &ProblemSpec) -> Result<String, l2l_common::Error> {
        let images = spec.reads_images();
        let slot = &mut self.fingerprint[usize::from(images)];
        if slot.is_empty() {
            if images {
                *slot = self.data.images().fingerprint()?;
                tracing::info!(dir = %self.opts.data.display(), sha256 = %slot, "images found");
            } else {
                let data = self.data.get()?;
                *slot = data.fingerprint();
                tracing::info!(dir = %self.opts.data.display(), examples = data.len(), sha256 = %slot, "training data loaded");
            }
        }
        Ok(slot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::Outcome;

    /// When a trajectory ends early with a submission in flight, the worker acts on the
    /// stronger of the two outcomes: a lost coordinator (Reregister) found by the
    /// submission outweighs the loop's lost lease (Release), and a stop outweighs both.
    #[test]
    fn the_stronger_outcome_wins() {
        use Outcome::*;
        assert_eq!(Release.max(Reregister), Reregister);
        assert_eq!(Reregister.max(Release), Reregister);
        assert_eq!(Done.max(Release), Release);
        assert_eq!(Reregister.max(Stop), Stop);
        assert_eq!(Stop.max(Done), Stop);
    }
}
