//! The coordinator's state and every decision it takes, with no network in sight.
//!
//! The gRPC service (`service`) locks this struct and calls one method per request;
//! tests call the same methods directly, so every refusal is testable without sockets.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use l2l_common::{AnyPhi, OptimizerConfig};
use l2l_proto::v1::{
    FetchPhiReply, LeaseReply, StatusReply, SubmitReply, SubmitRequest, Version, WorkerInfo,
};

use crate::adam::Adam;
use crate::aggregate::{Aggregator, Update};
use crate::config::Config;
use crate::guard::{Guard, l2_norm};
use crate::lease::{LeaseState, LeaseTable};
use crate::refusal::Refusal;
use crate::sampler::Sampler;
use crate::validation::{NewBest, Record, Validator};
use l2l_proto::role::Role;
use l2l_proto::v1::{SubmitValidationRequest, ValidateReply};

/// Counters that survive restarts (saved in checkpoints).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Gradients accepted.
    pub accepted: u64,
    /// Refusals by reason.
    pub refused: BTreeMap<String, u64>,
    /// Trajectories whose every truncation was accepted.
    pub trajectories_done: u64,
    /// Sum of the staleness of accepted gradients.
    pub staleness_sum: u64,
    /// Largest staleness accepted.
    pub staleness_max: u64,
    /// Accepted gradients by staleness: one count per bound of [`STALENESS_BOUNDS`]
    /// (staleness ≤ bound and above the previous one), then one for larger staleness.
    #[serde(default)]
    pub staleness_buckets: Vec<u64>,
    /// Leases that expired (their trajectories were dropped).
    #[serde(default)]
    pub leases_expired: u64,
    /// Mean meta-loss of the most recent updates, oldest first (at most
    /// [`META_LOSS_HISTORY`], so checkpoints stay small).
    pub meta_losses: Vec<f64>,
    /// Updates refused because their result would not have been finite (φ kept).
    #[serde(default)]
    pub updates_refused: u64,
    /// Gradients summed into applied updates (each at most once).
    #[serde(default)]
    pub gradients_applied: u64,
    /// L2 norms of the most recently accepted gradients, oldest first (the guard's window).
    #[serde(default)]
    pub recent_norms: Vec<f64>,
    /// SHA-256 of the training data set of the run's first accepted gradient that used
    /// data; every later one must name the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_fingerprint: Option<String>,
}

/// Upper bounds of the staleness histogram's buckets.
pub const STALENESS_BOUNDS: [u64; 8] = [0, 1, 2, 4, 8, 16, 32, 64];

impl Counters {
    /// Counts an accepted gradient of this staleness.
    fn record_staleness(&mut self, staleness: u64) {
        self.staleness_sum = self.staleness_sum.saturating_add(staleness);
        self.staleness_max = self.staleness_max.max(staleness);
        self.staleness_buckets.resize(STALENESS_BOUNDS.len() + 1, 0);
        let i = STALENESS_BOUNDS
            .iter()
            .position(|b| staleness <= *b)
            .unwrap_or(STALENESS_BOUNDS.len());
        self.staleness_buckets[i] += 1;
    }
}

/// How many recent per-update meta-losses the counters keep.
pub const META_LOSS_HISTORY: usize = 2000;

/// Bytes of a worker's session secret.
pub const SESSION_BYTES: usize = 16;

/// Characters of a worker's name or backend kept (longer ones are cut).
pub const MAX_NAME_CHARS: usize = 64;

/// Workers listed in a status reply (the most recently seen).
pub const STATUS_WORKERS: usize = 100;

/// A name as status and logs show it: at most [`MAX_NAME_CHARS`] characters, control
/// characters (terminal escapes among them) replaced by `?`.
pub fn sanitize_name(raw: &str) -> String {
    let cleaned: String = raw
        .chars()
        .take(MAX_NAME_CHARS)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    let trimmed = cleaned.trim();
    if trimmed.is_empty() {
        "?".into()
    } else {
        trimmed.into()
    }
}

/// A registered worker.
#[derive(Debug, Clone)]
struct WorkerRecord {
    /// The secret its requests must carry.
    session: [u8; SESSION_BYTES],
    name: String,
    backend: String,
    role: Role,
    last_seen: Instant,
    accepted: u64,
    /// Whether it has been told that the run is finished.
    told_finished: bool,
}

/// What a successful submission did.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// The reply for the worker.
    pub reply: SubmitReply,
    /// The update it completed, if any (already applied).
    pub update: Option<Update>,
}

/// φ, its meta-optimizer, the leases and the counters of one coordinator run.
pub struct Coordinator {
    config: Config,
    /// The run's identity, the same across restarts.
    run: String,
    optimizer: OptimizerConfig,
    /// φ's parameter groups (spec §5); `None` for one LSTM.
    groups: Option<Vec<String>>,
    phi: Vec<f32>,
    phi_bytes: Bytes,
    adam: Adam,
    epoch: u64,
    version: u64,
    sampler: Sampler,
    leases: LeaseTable,
    aggregator: Aggregator,
    workers: HashMap<u64, WorkerRecord>,
    next_worker: u64,
    /// When workers not seen for a while were last forgotten.
    pruned: Option<Instant>,
    guard: Guard,
    counters: Counters,
    recent_updates: VecDeque<Instant>,
    /// Reused buffer for decoding submitted gradients (no allocation per request).
    scratch: Vec<f32>,
    /// The gradient estimator every lease carries.
    estimator: l2l_common::estimator::Estimator,
    /// Validation jobs and results, when the run validates.
    validator: Option<Validator>,
}

/// The persistent part of a coordinator, as a checkpoint holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The run's identity.
    pub run: String,
    /// φ (one group or several, spec §5).
    pub phi: AnyPhi,
    /// Adam's state.
    pub adam: Adam,
    /// Restart epoch of the run that wrote it.
    pub epoch: u64,
    /// Updates applied.
    pub version: u64,
    /// The instance sampler's RNG state.
    pub sampler_state: u64,
    /// Counters.
    pub counters: Counters,
}

/// How a coordinator process starts: the run, the epoch it serves, and what it resumes.
#[derive(Debug, Clone, PartialEq)]
pub struct Start {
    /// The run's identity.
    pub run: String,
    /// The restart epoch this process serves (durable before it serves anything).
    pub epoch: u64,
    /// The checkpoint it resumes from; none starts φ from `config.init`.
    pub resume: Option<Snapshot>,
}

impl Start {
    /// A new run in epoch 0 with a random identity, kept nowhere (tests, benchmarks).
    pub fn fresh() -> Self {
        Self {
            run: crate::run_dir::new_run_id(),
            epoch: 0,
            resume: None,
        }
    }
}

impl Coordinator {
    /// A fresh run (φ initialised from `config.init`) or a resumed one, serving `start`'s epoch.
    pub fn new(config: Config, start: Start) -> Result<Self> {
        config.validate()?;
        let snapshot = match start.resume {
            Some(s) => Snapshot {
                epoch: start.epoch,
                run: start.run.clone(),
                ..s
            },
            None => {
                let phi = match &config.init.phi {
                    Some(path) => AnyPhi::load(path).with_context(|| {
                        format!("cannot start from init.phi {}", path.display())
                    })?,
                    None => {
                        // The groups the families need (all must agree; checked below).
                        let groups = config.problems[0].spec()?.groups().unwrap_or_default();
                        AnyPhi::init(config.optimizer()?, &groups, config.init.seed)?
                    }
                };
                let n = phi.num_params();
                Snapshot {
                    run: start.run.clone(),
                    phi,
                    adam: Adam::new(config.adam, n),
                    epoch: start.epoch,
                    version: 0,
                    sampler_state: config.seed,
                    counters: Counters::default(),
                }
            }
        };
        let optimizer = snapshot.phi.config();
        let groups: Option<Vec<String>> = snapshot
            .phi
            .names()
            .map(|v| v.into_iter().map(String::from).collect());
        // Spec §5: every family of the run must take this φ's groups.
        for family in &config.problems {
            family
                .spec()?
                .check_phi(snapshot.phi.names().as_deref())
                .context("φ does not fit the run's problems")?;
        }
        let validator = if config.validation.enabled() {
            let best = crate::validation::read_best(&config.dir, &snapshot.run)?;
            let first = config.problems[0].spec()?;
            let v = Validator::new(
                &config.validation,
                &first,
                config.trajectory_steps,
                snapshot.epoch,
                best,
            )?;
            if let Some(v) = &v {
                v.spec()
                    .check_phi(snapshot.phi.names().as_deref())
                    .context("φ does not fit validation.problem")?;
            }
            v
        } else {
            None
        };
        let n = snapshot.phi.num_params();
        if snapshot.adam.m.len() != n || snapshot.adam.v.len() != n {
            anyhow::bail!("Adam's moments do not have φ's {n} values");
        }
        let mut adam = snapshot.adam;
        // Hyper-parameters come from the configuration in force; the moments persist.
        adam.config = config.adam;
        let mut me = Self {
            aggregator: Aggregator::new(config.aggregation, n),
            leases: LeaseTable::new(
                Duration::from_millis(config.lease_timeout_ms),
                snapshot.epoch << 32,
                config.max_lease_records(),
            ),
            sampler: Sampler::new(&config.problems, snapshot.sampler_state)?,
            guard: Guard::new(config.guard, snapshot.counters.recent_norms.clone()),
            run: snapshot.run,
            pruned: None,
            phi: snapshot.phi.flatten(),
            phi_bytes: Bytes::new(),
            adam,
            epoch: snapshot.epoch,
            version: snapshot.version,
            workers: HashMap::new(),
            // Ids carry the epoch in their high bits, so no id is reused across restarts.
            next_worker: (snapshot.epoch << 32) + 1,
            counters: snapshot.counters,
            recent_updates: VecDeque::new(),
            scratch: Vec::with_capacity(n),
            estimator: config.estimator.estimator()?,
            validator,
            optimizer,
            groups,
            config,
        };
        me.publish()?;
        // A fresh run validates its starting φ too: the curve's first point.
        if me.version == 0 {
            let (version, phi, bytes) = (me.version(), me.phi()?, me.phi_bytes.clone());
            if let Some(v) = me.validator.as_mut() {
                v.queue(version, phi, bytes);
            }
        }
        Ok(me)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The current version.
    pub fn version(&self) -> Version {
        Version {
            epoch: self.epoch,
            step: self.version,
        }
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The run's identity.
    pub fn run(&self) -> &str {
        &self.run
    }

    /// True once `max_updates` updates have been applied.
    pub fn finished(&self) -> bool {
        self.config.max_updates > 0 && self.version >= self.config.max_updates
    }

    /// φ on the host.
    pub fn phi(&self) -> Result<AnyPhi> {
        Ok(AnyPhi::unflatten(
            self.optimizer,
            self.groups.as_deref(),
            &self.phi,
        )?)
    }

    /// The persistent state, for a checkpoint.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut counters = self.counters.clone();
        counters.recent_norms = self.guard.recent().to_vec();
        Ok(Snapshot {
            run: self.run.clone(),
            phi: self.phi()?,
            adam: self.adam.clone(),
            epoch: self.epoch,
            version: self.version,
            sampler_state: self.sampler.state(),
            counters,
        })
    }

    /// Encodes φ once for every fetch of this version.
    fn publish(&mut self) -> Result<()> {
        let phi = self.phi()?;
        let meta = HashMap::from([
            (
                "version".to_string(),
                format!("{}.{}", self.epoch, self.version),
            ),
            ("run".to_string(), self.run.clone()),
        ]);
        self.phi_bytes = Bytes::from(phi.encode(meta)?);
        Ok(())
    }

    /// Registers a trainer holding `session` (random, from the caller); returns its id.
    ///
    /// Workers not seen for `forget_workers_after_ms` are forgotten first; when the table
    /// still holds `max_workers`, the registration is refused.
    pub fn register(
        &mut self,
        name: &str,
        backend: &str,
        session: [u8; SESSION_BYTES],
        now: Instant,
    ) -> Result<u64, Refusal> {
        self.register_as(name, backend, Role::Trainer, session, now)
    }

    /// [`Coordinator::register`] for a worker in `role`.
    pub fn register_as(
        &mut self,
        name: &str,
        backend: &str,
        role: Role,
        session: [u8; SESSION_BYTES],
        now: Instant,
    ) -> Result<u64, Refusal> {
        if self.workers.len() >= self.config.max_workers {
            self.forget_workers(now);
        }
        if self.workers.len() >= self.config.max_workers {
            return Err(self.count_refusal(Refusal::TooManyWorkers {
                max: self.config.max_workers,
            }));
        }
        let id = self.next_worker;
        self.next_worker += 1;
        let (name, backend) = (sanitize_name(name), sanitize_name(backend));
        tracing::info!(worker = id, %name, %backend, %role, "worker registered");
        self.workers.insert(
            id,
            WorkerRecord {
                session,
                name,
                backend,
                role,
                last_seen: now,
                accepted: 0,
                told_finished: false,
            },
        );
        Ok(id)
    }

    /// Forgets workers not seen for `forget_workers_after_ms`, expiring their leases.
    fn forget_workers(&mut self, now: Instant) {
        let after = Duration::from_millis(self.config.forget_workers_after_ms());
        let leases = &mut self.leases;
        let validator = self.validator.as_ref();
        let before = self.workers.len();
        self.workers.retain(|id, w| {
            // An evaluator computing a job calls nothing until its result: kept while the
            // job is (the job's own deadline bounds that).
            let keep = now.saturating_duration_since(w.last_seen) < after
                || validator.is_some_and(|v| v.holds(*id));
            if !keep {
                leases.release_worker(*id);
            }
            keep
        });
        let forgotten = before - self.workers.len();
        if forgotten > 0 {
            tracing::info!(forgotten, "workers not seen for a while forgotten");
        }
        self.pruned = Some(now);
    }

    /// Checks that `session` is `worker`'s and marks the worker seen.
    fn authorize(&mut self, worker: u64, session: &[u8], now: Instant) -> Result<(), Refusal> {
        use subtle::ConstantTimeEq;
        match self.workers.get_mut(&worker) {
            Some(w) if bool::from(w.session.as_slice().ct_eq(session)) => {
                w.last_seen = now;
                Ok(())
            }
            Some(_) => Err(Refusal::BadSession { worker }),
            None => Err(Refusal::UnknownWorker { worker }),
        }
    }

    fn count_refusal(&mut self, r: Refusal) -> Refusal {
        *self
            .counters
            .refused
            .entry(r.reason().to_string())
            .or_default() += 1;
        r
    }

    /// Leases a fresh instance to `worker` (holding `session`) for one trajectory.
    pub fn lease(
        &mut self,
        worker: u64,
        session: &[u8],
        now: Instant,
    ) -> Result<LeaseReply, Refusal> {
        self.authorize(worker, session, now)
            .map_err(|r| self.count_refusal(r))?;
        if self.finished() {
            self.tell_finished(worker);
            return Err(Refusal::Finished);
        }
        // One trajectory per worker at a time: the grant drops the worker's old lease.
        let instance = self.sampler.next();
        let (s, t) = self.config.shape_at(self.version);
        let truncations = (s / t) as usize;
        let id = self
            .leases
            .grant(worker, instance.clone(), truncations, now);
        tracing::debug!(worker, lease = id, family = %instance.family, seed = instance.seed, "lease granted");
        Ok(LeaseReply {
            lease_id: id,
            instance: Some(instance),
            trajectory_steps: s,
            truncation_steps: t,
            step_weights: self.config.step_weights_for(s),
            estimator: Some(l2l_proto::v1::Estimator::of(&self.estimator)),
        })
    }

    /// φ unless `have` is the current version.
    pub fn fetch_phi(&self, have: Option<Version>) -> FetchPhiReply {
        let current = self.version();
        let unchanged = have.as_ref() == Some(&current);
        FetchPhiReply {
            version: Some(current),
            unchanged,
            phi: if unchanged {
                Bytes::new()
            } else {
                self.phi_bytes.clone()
            },
        }
    }

    /// Renews a lease of `worker` (holding `session`).
    pub fn heartbeat(
        &mut self,
        worker: u64,
        session: &[u8],
        lease: u64,
        now: Instant,
    ) -> Result<(), Refusal> {
        let r = self
            .authorize(worker, session, now)
            .and_then(|()| self.leases.renew(worker, lease, now));
        r.map_err(|r| self.count_refusal(r))
    }

    /// Validates a submission (design §2 step 4) and, if accepted, aggregates it.
    pub fn submit(&mut self, req: &SubmitRequest, now: Instant) -> Result<Accepted, Refusal> {
        match self.check_and_add(req, now) {
            Ok(a) => Ok(a),
            Err(Refusal::Finished) => {
                // Only returned after the session was checked: this is the worker itself.
                self.tell_finished(req.worker_id);
                Err(Refusal::Finished)
            }
            Err(r) => Err(self.count_refusal(r)),
        }
    }

    fn tell_finished(&mut self, worker: u64) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.told_finished = true;
        }
    }

    /// True when every worker seen within a lease timeout has been told the run is over,
    /// so a finished coordinator can exit without leaving workers retrying.
    pub fn all_told_finished(&self, now: Instant) -> bool {
        let live = Duration::from_millis(self.config.lease_timeout_ms);
        self.workers
            .values()
            .all(|w| w.told_finished || now.saturating_duration_since(w.last_seen) >= live)
    }

    fn check_and_add(&mut self, req: &SubmitRequest, now: Instant) -> Result<Accepted, Refusal> {
        // The epoch first: ids from before a restart mean nothing now.
        let version = req.version.unwrap_or_default();
        if version.epoch != self.epoch {
            return Err(Refusal::PreRestart {
                epoch: version.epoch,
                current: self.epoch,
            });
        }
        self.authorize(req.worker_id, &req.session, now)?;
        let current = self.version();
        let finished = self.finished();
        let (step, bound, n) = (
            self.version,
            self.aggregator.staleness_bound(),
            self.phi.len(),
        );
        let lease = self.leases.get_mut(req.worker_id, req.lease_id)?;
        let t = req.truncation as usize;
        if t >= lease.accepted.len() {
            return Err(Refusal::BadTruncation {
                truncation: req.truncation,
                truncations: lease.accepted.len(),
            });
        }
        if lease.accepted[t] {
            // A retry of an accepted submission: acknowledge, apply nothing.
            return Ok(Accepted {
                reply: SubmitReply {
                    accepted: true,
                    duplicate: true,
                    current: Some(current),
                },
                update: None,
            });
        }
        if lease.state != LeaseState::Live {
            return Err(Refusal::ExpiredLease {
                lease: req.lease_id,
            });
        }
        if version.step > step {
            return Err(Refusal::FutureVersion {
                version: version.step,
                current: step,
            });
        }
        let staleness = step - version.step;
        if staleness > bound {
            return Err(Refusal::Stale { staleness, bound });
        }
        if req.grad.len() != 4 * n {
            return Err(Refusal::Shape {
                got: req.grad.len() / 4,
                want: n,
            });
        }
        let grad = &mut self.scratch;
        grad.clear();
        l2l_common::wire::extend_from_le_bytes(grad, &req.grad);
        // One pass on the common path: the f64 sum of squares of finite f32 values is
        // finite, so only a non-finite norm needs the search for the offending value.
        let norm = l2_norm(grad);
        if !norm.is_finite() {
            let index = grad.iter().position(|g| !g.is_finite()).unwrap_or(0);
            return Err(Refusal::NonFinite { index });
        }
        if !req.meta_loss.is_finite() {
            return Err(Refusal::NonFinite { index: usize::MAX });
        }
        self.guard
            .check(norm, req.meta_loss)
            .map_err(Refusal::TooLarge)?;
        // One data set per run: the first fingerprint accepted is kept, others refused.
        let pin = if lease.needs_data {
            let got = &req.data_fingerprint;
            if got.is_empty() {
                return Err(Refusal::WrongData {
                    got: String::new(),
                    want: String::new(),
                });
            }
            if got.len() != 64 || !got.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Refusal::WrongData {
                    // Bounded: a message never echoes more than the 64 a fingerprint has.
                    got: got.chars().take(64).collect(),
                    want: String::new(),
                });
            }
            match &self.counters.data_fingerprint {
                Some(want) if !want.eq_ignore_ascii_case(got) => {
                    return Err(Refusal::WrongData {
                        got: got.clone(),
                        want: want.clone(),
                    });
                }
                Some(_) => None,
                None => Some(got.to_ascii_lowercase()),
            }
        } else {
            None
        };
        if finished {
            return Err(Refusal::Finished);
        }
        if let Some(fingerprint) = pin {
            tracing::info!(%fingerprint, "the run's training data set is kept");
            self.counters.data_fingerprint = Some(fingerprint);
        }
        // Accepted: the lease's truncation is counted and its deadline renewed.
        lease.accepted[t] = true;
        lease.deadline = now + Duration::from_millis(self.config.lease_timeout_ms);
        if lease.accepted.iter().all(|a| *a) {
            self.leases.finish(req.worker_id, req.lease_id);
            self.counters.trajectories_done += 1;
        }
        self.counters.accepted += 1;
        self.counters.record_staleness(staleness);
        self.guard.accepted(norm);
        tracing::debug!(
            epoch = self.epoch,
            worker = req.worker_id,
            lease = req.lease_id,
            truncation = req.truncation,
            version = version.step,
            norm,
            "gradient accepted"
        );
        if let Some(w) = self.workers.get_mut(&req.worker_id) {
            w.accepted += 1;
        }
        let update = self
            .aggregator
            .add(&self.scratch, req.meta_loss, now)
            .filter(|u| self.apply(u, now));
        Ok(Accepted {
            reply: SubmitReply {
                accepted: true,
                duplicate: false,
                current: Some(self.version()),
            },
            update,
        })
    }

    /// Applies an averaged gradient with Adam and publishes the next version; an update
    /// whose result would not be finite is refused and counted, and φ stays as it was.
    fn apply(&mut self, u: &Update, now: Instant) -> bool {
        if let Err(e) = self.adam.step(&mut self.phi, &u.grad, self.guard.clip()) {
            self.counters.updates_refused += 1;
            tracing::error!(version = self.version, gradients = u.count, "{e}");
            return false;
        }
        self.counters.gradients_applied += u.count as u64;
        self.version += 1;
        let history = &mut self.counters.meta_losses;
        if history.len() >= META_LOSS_HISTORY {
            history.remove(0);
        }
        history.push(u.meta_loss);
        self.recent_updates.push_back(now);
        while self.recent_updates.len() > 50 {
            self.recent_updates.pop_front();
        }
        if let Err(e) = self.publish() {
            // Only a non-finite φ could fail here, and the step above refuses those.
            tracing::error!(error = %e, "cannot encode φ");
        }
        if self
            .validator
            .as_ref()
            .is_some_and(|v| v.is_due(self.version))
        {
            match self.phi() {
                Ok(phi) => {
                    let (version, bytes) = (self.version(), self.phi_bytes.clone());
                    if let Some(v) = self.validator.as_mut() {
                        v.queue(version, phi, bytes);
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot queue φ for validation"),
            }
        }
        tracing::debug!(
            version = self.version,
            meta_loss = u.meta_loss,
            gradients = u.count,
            "φ updated"
        );
        true
    }

    /// Expires overdue leases and closes an overdue sync round; true if φ changed.
    pub fn tick(&mut self, now: Instant) -> bool {
        let expired = self.leases.expire(now);
        self.counters.leases_expired += expired as u64;
        if let Some(v) = self.validator.as_mut() {
            v.expire(now);
        }
        if expired > 0 {
            tracing::warn!(expired, "leases expired; their trajectories are dropped");
        }
        let forget = Duration::from_millis(self.config.forget_workers_after_ms());
        if self
            .pruned
            .is_none_or(|p| now.saturating_duration_since(p) >= forget / 4)
        {
            self.forget_workers(now);
        }
        if self.finished() {
            return false;
        }
        match self.aggregator.tick(now) {
            Some(u) => self.apply(&u, now),
            None => false,
        }
    }

    /// Updates per second over the recent updates.
    pub fn updates_per_second(&self, now: Instant) -> f64 {
        match (self.recent_updates.front(), self.recent_updates.len()) {
            (Some(first), n) if n >= 2 => {
                let span = now.saturating_duration_since(*first).as_secs_f64();
                if span > 0.0 {
                    (n - 1) as f64 / span
                } else {
                    0.0
                }
            }
            _ => 0.0,
        }
    }

    /// The backends of the workers seen within a lease timeout.
    pub fn live_worker_backends(&self, now: Instant) -> Vec<&str> {
        let live = Duration::from_millis(self.config.lease_timeout_ms);
        self.workers
            .values()
            .filter(|w| now.saturating_duration_since(w.last_seen) < live)
            .map(|w| w.backend.as_str())
            .collect()
    }

    /// The run's progress for `status`.
    pub fn status(&self, now: Instant) -> StatusReply {
        let live = Duration::from_millis(self.config.lease_timeout_ms);
        let c = &self.counters;
        // The most recently seen workers, so the reply stays small however many there are.
        let mut recent: Vec<(&u64, &WorkerRecord)> = self.workers.iter().collect();
        if recent.len() > STATUS_WORKERS {
            recent.select_nth_unstable_by_key(STATUS_WORKERS, |(_, w)| {
                std::cmp::Reverse(w.last_seen)
            });
            recent.truncate(STATUS_WORKERS);
        }
        let mut workers: Vec<WorkerInfo> = recent
            .into_iter()
            .map(|(id, w)| WorkerInfo {
                worker_id: *id,
                name: w.name.clone(),
                backend: w.backend.clone(),
                role: w.role.name().into(),
                accepted: w.accepted,
                seconds_since_seen: now.saturating_duration_since(w.last_seen).as_secs_f64(),
            })
            .collect();
        workers.sort_by_key(|w| w.worker_id);
        StatusReply {
            version: Some(self.version()),
            live_workers: self
                .workers
                .values()
                .filter(|w| now.saturating_duration_since(w.last_seen) < live)
                .count() as u64,
            live_leases: self.leases.live() as u64,
            accepted: c.accepted,
            refused: c.refused.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            updates_per_second: self.updates_per_second(now),
            last_meta_loss: c.meta_losses.last().copied().unwrap_or(f64::NAN),
            mean_staleness: if c.accepted > 0 {
                c.staleness_sum as f64 / c.accepted as f64
            } else {
                0.0
            },
            max_staleness: c.staleness_max,
            trajectories_done: c.trajectories_done,
            leases_expired: c.leases_expired,
            aggregation: format!("{:?}", self.config.aggregation.mode).to_lowercase(),
            estimator: self.estimator.to_string(),
            workers,
            workers_total: self.workers.len() as u64,
            updates_refused: c.updates_refused,
            median_grad_norm: self.guard.median().unwrap_or(0.0),
            validation: self.validator.as_ref().map(Validator::status),
        }
    }

    /// Hands `worker` (holding `session`) the oldest waiting validation job, if any.
    ///
    /// Refused once the run is finished and no job is left; a run without validation
    /// answers `enabled: false`.
    pub fn validate(
        &mut self,
        worker: u64,
        session: &[u8],
        now: Instant,
    ) -> Result<ValidateReply, Refusal> {
        self.authorize(worker, session, now)
            .map_err(|r| self.count_refusal(r))?;
        let finished = self.finished();
        let Some(v) = self.validator.as_mut() else {
            return Ok(ValidateReply::default());
        };
        v.expire(now);
        if finished && v.idle() {
            self.tell_finished(worker);
            return Err(Refusal::Finished);
        }
        Ok(v.take(worker, now))
    }

    /// Records a validation result of `req.worker_id`: its row, and φ to write as the
    /// run's best when it beats every earlier validation (the caller writes both).
    pub fn submit_validation(
        &mut self,
        req: &SubmitValidationRequest,
        now: Instant,
    ) -> Result<(Record, Option<NewBest>), Refusal> {
        let r = self.check_validation(req, now);
        r.map_err(|r| self.count_refusal(r))
    }

    fn check_validation(
        &mut self,
        req: &SubmitValidationRequest,
        now: Instant,
    ) -> Result<(Record, Option<NewBest>), Refusal> {
        self.authorize(req.worker_id, &req.session, now)?;
        let Some(v) = self.validator.as_mut() else {
            return Err(Refusal::UnknownJob { job: req.job_id });
        };
        v.expire(now);
        v.check(req)?;
        if v.needs_data() {
            // The curves are only comparable on the run's data set; a validation never
            // pins one (only a gradient does).
            if let Some(want) = &self.counters.data_fingerprint
                && !want.eq_ignore_ascii_case(&req.data_fingerprint)
            {
                // This evaluator stops (it cannot compute on the run's data); another
                // one takes the job.
                v.release(req.job_id);
                return Err(Refusal::WrongData {
                    got: req.data_fingerprint.chars().take(64).collect(),
                    want: want.clone(),
                });
            }
        }
        let run = self.run.clone();
        match self.validator.as_mut() {
            Some(v) => v.complete(req, &run),
            None => Err(Refusal::UnknownJob { job: req.job_id }),
        }
    }

    /// Makes `version` the run's best by validation, its file written.
    pub fn validation_best_written(&mut self, version: Version, score: f64) {
        if let Some(v) = self.validator.as_mut() {
            v.confirm_best(version, score);
        }
    }

    /// True when no validation job waits or runs (or the run validates nothing).
    pub fn validation_idle(&self) -> bool {
        self.validator.as_ref().is_none_or(Validator::idle)
    }
}

#[cfg(test)]
mod tests;
