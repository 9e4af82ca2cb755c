//! Leases: one optimizee instance held by one worker for a whole trajectory.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use l2l_proto::v1::Instance;

use crate::refusal::Refusal;

/// Where a lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Its worker may submit; the deadline is live.
    Live,
    /// Its deadline passed without a heartbeat or submission; nothing more is accepted.
    Expired,
    /// Every truncation was accepted.
    Done,
}

/// One lease.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The worker holding it.
    pub worker: u64,
    /// The instance it is for.
    pub instance: Instance,
    /// Renewed by heartbeats and submissions.
    pub deadline: Instant,
    /// Which truncations were accepted (a retry of one is acknowledged, not applied).
    pub accepted: Vec<bool>,
    /// Live, expired or done.
    pub state: LeaseState,
}

/// All leases of this coordinator run, by id.
#[derive(Debug, Default)]
pub struct LeaseTable {
    leases: HashMap<u64, Lease>,
    next_id: u64,
    timeout: Duration,
}

impl LeaseTable {
    /// An empty table whose leases live `timeout` without renewal; ids start after `base`.
    pub fn new(timeout: Duration, base: u64) -> Self {
        Self {
            leases: HashMap::new(),
            next_id: base + 1,
            timeout,
        }
    }

    /// Grants `instance` to `worker` for `truncations` truncations; returns the lease id.
    pub fn grant(
        &mut self,
        worker: u64,
        instance: Instance,
        truncations: usize,
        now: Instant,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.leases.insert(
            id,
            Lease {
                worker,
                instance,
                deadline: now + self.timeout,
                accepted: vec![false; truncations],
                state: LeaseState::Live,
            },
        );
        id
    }

    /// The lease `id` if `worker` holds it (live or not).
    pub fn get_mut(&mut self, worker: u64, id: u64) -> Result<&mut Lease, Refusal> {
        let lease = self
            .leases
            .get_mut(&id)
            .ok_or(Refusal::UnknownLease { lease: id })?;
        if lease.worker != worker {
            return Err(Refusal::ForeignLease { lease: id });
        }
        Ok(lease)
    }

    /// Pushes a live lease's deadline to `now + timeout`.
    pub fn renew(&mut self, worker: u64, id: u64, now: Instant) -> Result<(), Refusal> {
        let timeout = self.timeout;
        let lease = self.get_mut(worker, id)?;
        if lease.state != LeaseState::Live {
            return Err(Refusal::ExpiredLease { lease: id });
        }
        lease.deadline = now + timeout;
        Ok(())
    }

    /// Marks leases past their deadline expired; returns how many expired now.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut n = 0;
        for lease in self.leases.values_mut() {
            if lease.state == LeaseState::Live && lease.deadline <= now {
                lease.state = LeaseState::Expired;
                n += 1;
            }
        }
        // Forget finished leases long past their deadline so the table stays small;
        // a submission for one is then refused as unknown instead of expired.
        let horizon = self.timeout * 10;
        self.leases.retain(|_, l| {
            l.state == LeaseState::Live || now.saturating_duration_since(l.deadline) < horizon
        });
        n
    }

    /// Expires every live lease of `worker` (it re-registered or left).
    pub fn release_worker(&mut self, worker: u64) {
        for lease in self.leases.values_mut() {
            if lease.worker == worker && lease.state == LeaseState::Live {
                lease.state = LeaseState::Expired;
            }
        }
    }

    /// Number of live leases.
    pub fn live(&self) -> usize {
        self.leases
            .values()
            .filter(|l| l.state == LeaseState::Live)
            .count()
    }
}
