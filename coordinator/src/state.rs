//! The coordinator's state and every decision it takes, with no network in sight.
//!
//! The gRPC service (`service`) locks this struct and calls one method per request;
//! tests call the same methods directly, so every refusal is testable without sockets.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use l2l_common::{OptimizerConfig, Phi};
use l2l_proto::v1::{
    FetchPhiReply, LeaseReply, StatusReply, SubmitReply, SubmitRequest, Version, WorkerInfo,
};

use crate::adam::Adam;
use crate::aggregate::{Aggregator, Update};
use crate::config::Config;
use crate::lease::{LeaseState, LeaseTable};
use crate::refusal::Refusal;
use crate::sampler::Sampler;

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
}

/// Upper bounds of the staleness histogram's buckets.
pub const STALENESS_BOUNDS: [u64; 8] = [0, 1, 2, 4, 8, 16, 32, 64];

impl Counters {
    /// Counts an accepted gradient of this staleness.
    fn record_staleness(&mut self, staleness: u64) {
        self.staleness_sum += staleness;
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

/// A registered worker.
#[derive(Debug, Clone)]
struct WorkerRecord {
    name: String,
    backend: String,
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
    optimizer: OptimizerConfig,
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
    counters: Counters,
    recent_updates: VecDeque<Instant>,
    /// Reused buffer for decoding submitted gradients (no allocation per request).
    scratch: Vec<f32>,
}

/// The persistent part of a coordinator, as a checkpoint holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// φ, flat in spec order.
    pub phi: Phi,
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

impl Coordinator {
    /// A fresh run (epoch 0, φ initialised from `config.init`) or a resumed one.
    pub fn new(config: Config, resume: Option<Snapshot>) -> Result<Self> {
        config.validate()?;
        let snapshot = match resume {
            Some(s) => Snapshot {
                epoch: s.epoch + 1,
                ..s
            },
            None => {
                let phi = match &config.init.phi {
                    Some(path) => Phi::load_any(path).with_context(|| {
                        format!("cannot start from init.phi {}", path.display())
                    })?,
                    None => Phi::init(config.optimizer()?, config.init.seed)?,
                };
                let n = phi.config.num_params();
                Snapshot {
                    phi,
                    adam: Adam::new(config.adam, n),
                    epoch: 0,
                    version: 0,
                    sampler_state: config.seed,
                    counters: Counters::default(),
                }
            }
        };
        let optimizer = snapshot.phi.config;
        let n = optimizer.num_params();
        let mut adam = snapshot.adam;
        // Hyper-parameters come from the configuration in force; the moments persist.
        adam.config = config.adam;
        let mut me = Self {
            aggregator: Aggregator::new(config.aggregation, n),
            leases: LeaseTable::new(
                Duration::from_millis(config.lease_timeout_ms),
                snapshot.epoch << 32,
            ),
            sampler: Sampler::new(config.problems.clone(), snapshot.sampler_state),
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
            optimizer,
            config,
        };
        me.publish()?;
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

    /// True once `max_updates` updates have been applied.
    pub fn finished(&self) -> bool {
        self.config.max_updates > 0 && self.version >= self.config.max_updates
    }

    /// φ on the host.
    pub fn phi(&self) -> Result<Phi> {
        Ok(Phi::unflatten(self.optimizer, &self.phi)?)
    }

    /// The persistent state, for a checkpoint.
    pub fn snapshot(&self) -> Result<Snapshot> {
        Ok(Snapshot {
            phi: self.phi()?,
            adam: self.adam.clone(),
            epoch: self.epoch,
            version: self.version,
            sampler_state: self.sampler.state(),
            counters: self.counters.clone(),
        })
    }

    /// Encodes φ once for every fetch of this version.
    fn publish(&mut self) -> Result<()> {
        let phi = self.phi()?;
        let meta = HashMap::from([(
            "version".to_string(),
            format!("{}.{}", self.epoch, self.version),
        )]);
        self.phi_bytes = Bytes::from(l2l_common::checkpoint::encode_phi(&phi, meta)?);
        Ok(())
    }

    /// Registers a worker; returns its id.
    pub fn register(&mut self, name: String, backend: String, now: Instant) -> u64 {
        let id = self.next_worker;
        self.next_worker += 1;
        tracing::info!(worker = id, %name, %backend, "worker registered");
        self.workers.insert(
            id,
            WorkerRecord {
                name,
                backend,
                last_seen: now,
                accepted: 0,
                told_finished: false,
            },
        );
        id
    }

    fn seen(&mut self, worker: u64, now: Instant) -> Result<(), Refusal> {
        match self.workers.get_mut(&worker) {
            Some(w) => {
                w.last_seen = now;
                Ok(())
            }
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

    /// Leases a fresh instance to `worker` for one trajectory.
    pub fn lease(&mut self, worker: u64, now: Instant) -> Result<LeaseReply, Refusal> {
        self.seen(worker, now).map_err(|r| self.count_refusal(r))?;
        if self.finished() {
            self.tell_finished(worker);
            return Err(Refusal::Finished);
        }
        // One trajectory per worker at a time: the grant drops the worker's old lease.
        let instance = self.sampler.next();
        let truncations = (self.config.trajectory_steps / self.config.truncation_steps) as usize;
        let id = self
            .leases
            .grant(worker, instance.clone(), truncations, now);
        tracing::debug!(worker, lease = id, family = %instance.family, seed = instance.seed, "lease granted");
        Ok(LeaseReply {
            lease_id: id,
            instance: Some(instance),
            trajectory_steps: self.config.trajectory_steps,
            truncation_steps: self.config.truncation_steps,
            step_weights: self.config.step_weights(),
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

    /// Renews a lease.
    pub fn heartbeat(&mut self, worker: u64, lease: u64, now: Instant) -> Result<(), Refusal> {
        let r = self
            .seen(worker, now)
            .and_then(|()| self.leases.renew(worker, lease, now));
        r.map_err(|r| self.count_refusal(r))
    }

    /// Validates a submission (design §2 step 4) and, if accepted, aggregates it.
    pub fn submit(&mut self, req: &SubmitRequest, now: Instant) -> Result<Accepted, Refusal> {
        match self.check_and_add(req, now) {
            Ok(a) => Ok(a),
            Err(Refusal::Finished) => {
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
        self.seen(req.worker_id, now)?;
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
        if let Some(index) = grad.iter().position(|g| !g.is_finite()) {
            return Err(Refusal::NonFinite { index });
        }
        if !req.meta_loss.is_finite() {
            return Err(Refusal::NonFinite { index: usize::MAX });
        }
        if finished {
            return Err(Refusal::Finished);
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
        if let Some(w) = self.workers.get_mut(&req.worker_id) {
            w.accepted += 1;
        }
        let update = self.aggregator.add(&self.scratch, req.meta_loss, now);
        if let Some(u) = &update {
            self.apply(u, now);
        }
        Ok(Accepted {
            reply: SubmitReply {
                accepted: true,
                duplicate: false,
                current: Some(self.version()),
            },
            update,
        })
    }

    /// Applies an averaged gradient with Adam and publishes the next version.
    fn apply(&mut self, u: &Update, now: Instant) {
        self.adam.step(&mut self.phi, &u.grad);
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
            // Only a non-finite φ could fail here; Adam on finite inputs cannot produce one.
            tracing::error!(error = %e, "cannot encode φ");
        }
        tracing::debug!(
            version = self.version,
            meta_loss = u.meta_loss,
            gradients = u.count,
            "φ updated"
        );
    }

    /// Expires overdue leases and closes an overdue sync round; true if φ changed.
    pub fn tick(&mut self, now: Instant) -> bool {
        let expired = self.leases.expire(now);
        self.counters.leases_expired += expired as u64;
        if expired > 0 {
            tracing::warn!(expired, "leases expired; their trajectories are dropped");
        }
        if self.finished() {
            return false;
        }
        match self.aggregator.tick(now) {
            Some(u) => {
                self.apply(&u, now);
                true
            }
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

    /// The run's progress for `status`.
    pub fn status(&self, now: Instant) -> StatusReply {
        let live = Duration::from_millis(self.config.lease_timeout_ms);
        let c = &self.counters;
        let mut workers: Vec<WorkerInfo> = self
            .workers
            .iter()
            .map(|(id, w)| WorkerInfo {
                worker_id: *id,
                name: w.name.clone(),
                backend: w.backend.clone(),
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
            workers,
        }
    }
}

#[cfg(test)]
mod tests;
