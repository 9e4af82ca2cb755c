//! Leases: one optimizee instance held by one worker for a whole trajectory.

use std::collections::{BTreeMap, HashMap};
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
    /// Whether the instance's family samples minibatches from a data set (its gradients
    /// must then name the run's data-set fingerprint); decided once, at the grant.
    pub needs_data: bool,
    /// Renewed by heartbeats and submissions.
    pub deadline: Instant,
    /// Which truncations were accepted (a retry of one is acknowledged, not applied).
    pub accepted: Vec<bool>,
    /// Live, expired or done.
    pub state: LeaseState,
}

/// All leases of this coordinator run, by id, at most `max_records` of them.
#[derive(Debug, Default)]
pub struct LeaseTable {
    /// By id, so the oldest records are the first.
    leases: BTreeMap<u64, Lease>,
    /// Records kept at most; the oldest finished or expired ones go first.
    max_records: usize,
    next_id: u64,
    timeout: Duration,
    /// Each worker's live lease (a worker holds at most one): the only leases whose
    /// deadlines need watching, so expiry costs O(live leases), not O(all leases).
    live: HashMap<u64, u64>,
    /// When finished leases were last forgotten.
    pruned: Option<Instant>,
}

impl LeaseTable {
    /// An empty table whose leases live `timeout` without renewal, holding at most
    /// `max_records` records (live leases are never dropped); ids start after `base`.
    pub fn new(timeout: Duration, base: u64, max_records: usize) -> Self {
        Self {
            leases: BTreeMap::new(),
            max_records,
            next_id: base + 1,
            timeout,
            live: HashMap::new(),
            pruned: None,
        }
    }

    /// Grants `instance` to `worker` for `truncations` truncations, expiring the worker's
    /// previous lease if it is still live; returns the lease id.
    pub fn grant(
        &mut self,
        worker: u64,
        instance: Instance,
        truncations: usize,
        now: Instant,
    ) -> u64 {
        self.release_worker(worker);
        let id = self.next_id;
        self.next_id += 1;
        self.live.insert(worker, id);
        self.leases.insert(
            id,
            Lease {
                worker,
                needs_data: instance.spec().is_ok_and(|s| s.needs_data()),
                instance,
                deadline: now + self.timeout,
                accepted: vec![false; truncations],
                state: LeaseState::Live,
            },
        );
        self.bound();
        id
    }

    /// Drops the oldest finished or expired records beyond `max_records` (a submission
    /// for one is then refused as unknown rather than expired).
    fn bound(&mut self) {
        let excess = self.leases.len().saturating_sub(self.max_records);
        if excess == 0 {
            return;
        }
        let old: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.state != LeaseState::Live)
            .map(|(id, _)| *id)
            .take(excess)
            .collect();
        for id in old {
            self.leases.remove(&id);
        }
    }

    /// Records held (live or not).
    pub fn records(&self) -> usize {
        self.leases.len()
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
        let leases = &mut self.leases;
        let before = self.live.len();
        self.live.retain(|_, id| match leases.get_mut(id) {
            Some(l) if l.deadline <= now => {
                l.state = LeaseState::Expired;
                false
            }
            Some(_) => true,
            None => false,
        });
        let expired = before - self.live.len();
        // Forget finished leases long past their deadline so the table stays small (a
        // submission for one is then refused as unknown instead of expired); at most once
        // per timeout, since it walks the whole table.
        if self
            .pruned
            .is_none_or(|p| now.saturating_duration_since(p) >= self.timeout)
        {
            let horizon = self.timeout * 10;
            self.leases.retain(|_, l| {
                l.state == LeaseState::Live || now.saturating_duration_since(l.deadline) < horizon
            });
            self.pruned = Some(now);
        }
        expired
    }

    /// Expires the live lease of `worker`, if any (it leased anew, re-registered or left).
    pub fn release_worker(&mut self, worker: u64) {
        if let Some(id) = self.live.remove(&worker)
            && let Some(l) = self.leases.get_mut(&id)
        {
            l.state = LeaseState::Expired;
        }
    }

    /// Marks a live lease done: all its truncations were accepted.
    pub fn finish(&mut self, worker: u64, id: u64) {
        if self.live.get(&worker) == Some(&id) {
            self.live.remove(&worker);
        }
        if let Some(l) = self.leases.get_mut(&id) {
            l.state = LeaseState::Done;
        }
    }

    /// Number of live leases.
    pub fn live(&self) -> usize {
        self.live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Instance {
        Instance {
            family: "quadratic".into(),
            seed: 1,
            params: Default::default(),
        }
    }

    #[test]
    fn one_live_lease_per_worker_and_only_live_ones_expire() {
        let t0 = Instant::now();
        let mut table = LeaseTable::new(Duration::from_secs(1), 0, 100);
        let a = table.grant(7, instance(), 5, t0);
        let b = table.grant(7, instance(), 5, t0);
        assert_eq!(
            table.get_mut(7, a).unwrap().state,
            LeaseState::Expired,
            "replaced"
        );
        assert_eq!(table.live(), 1);
        let c = table.grant(8, instance(), 5, t0);
        table.finish(8, c);
        assert_eq!(
            (table.live(), table.get_mut(8, c).unwrap().state),
            (1, LeaseState::Done)
        );
        assert_eq!(table.expire(t0 + Duration::from_millis(999)), 0);
        assert_eq!(
            table.expire(t0 + Duration::from_secs(1)),
            1,
            "only b was live"
        );
        assert_eq!(table.get_mut(7, b).unwrap().state, LeaseState::Expired);
        assert_eq!(
            table.get_mut(8, c).unwrap().state,
            LeaseState::Done,
            "done stays done"
        );
        // Long after, finished leases are forgotten: unknown rather than expired.
        table.expire(t0 + Duration::from_secs(30));
        assert!(matches!(
            table.get_mut(7, b),
            Err(Refusal::UnknownLease { .. })
        ));
        assert_eq!(table.live(), 0);
    }

    #[test]
    fn records_are_bounded_and_live_leases_are_never_dropped() {
        let t0 = Instant::now();
        let mut table = LeaseTable::new(Duration::from_secs(1), 0, 4);
        let held = table.grant(1, instance(), 5, t0);
        // A client leasing in a loop makes a record per call; the table stays at 4.
        let mut last = 0;
        for _ in 0..1000 {
            last = table.grant(2, instance(), 5, t0);
        }
        assert_eq!(table.records(), 4);
        assert_eq!(table.live(), 2);
        assert_eq!(table.get_mut(1, held).unwrap().state, LeaseState::Live);
        assert_eq!(table.get_mut(2, last).unwrap().state, LeaseState::Live);
        assert!(matches!(
            table.get_mut(2, last - 10),
            Err(Refusal::UnknownLease { .. })
        ));
    }
}
