//! When the coordinator writes its next checkpoint: every N updates, every S seconds
//! (only if φ moved since the last one), once more when the run finishes, and a second
//! after a failed write (never in a tight loop against a full or missing disk).

use std::time::{Duration, Instant};

/// The checkpoint schedule of a running coordinator.
#[derive(Debug, Clone)]
pub struct Schedule {
    every_updates: u64,
    every: Option<Duration>,
    /// The version of the last checkpoint written (or resumed from).
    last_version: u64,
    last_at: Instant,
    /// No attempt before this instant (set by a failure).
    retry_at: Instant,
}

/// How long after a failed write the next attempt comes.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

impl Schedule {
    /// A schedule for `every_updates` (0 = never by count) and `every_seconds` (0 = never
    /// by time), starting at `version` (already saved or resumed) at `now`.
    pub fn new(every_updates: u64, every_seconds: u64, version: u64, now: Instant) -> Self {
        Self {
            every_updates,
            every: (every_seconds > 0).then(|| Duration::from_secs(every_seconds)),
            last_version: version,
            last_at: now,
            retry_at: now,
        }
    }

    /// Whether a checkpoint of `version` is due at `now` (`finished`: the run is over).
    pub fn due(&self, now: Instant, version: u64, finished: bool) -> bool {
        if now < self.retry_at || version <= self.last_version {
            return false;
        }
        let by_count = self.every_updates > 0 && version >= self.last_version + self.every_updates;
        let by_time = self
            .every
            .is_some_and(|every| now.duration_since(self.last_at) >= every);
        by_count || by_time || finished
    }

    /// A checkpoint of `version` was written at `now`.
    pub fn written(&mut self, now: Instant, version: u64) {
        self.last_version = version;
        self.last_at = now;
        self.retry_at = now;
    }

    /// A write failed at `now`: try again [`RETRY_AFTER`] later.
    pub fn failed(&mut self, now: Instant) {
        self.retry_at = now + RETRY_AFTER;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn by_count_every_n_updates_from_the_last_checkpoint() {
        let t0 = Instant::now();
        let mut s = Schedule::new(5, 0, 10, t0);
        assert!(!s.due(t0, 14, false));
        assert!(s.due(t0, 15, false));
        // A round may add several versions at once (async, several gradients per tick).
        assert!(s.due(t0, 17, false));
        s.written(t0, 17);
        assert!(
            !s.due(t0 + 100 * S, 21, false),
            "time alone does nothing here"
        );
        assert!(s.due(t0, 22, false));
    }

    #[test]
    fn by_time_only_when_phi_moved() {
        let t0 = Instant::now();
        let mut s = Schedule::new(0, 30, 0, t0);
        assert!(!s.due(t0 + 29 * S, 3, false));
        assert!(s.due(t0 + 30 * S, 3, false));
        s.written(t0 + 30 * S, 3);
        assert!(!s.due(t0 + 90 * S, 3, false), "nothing new to save");
        assert!(s.due(t0 + 90 * S, 4, false));
    }

    #[test]
    fn both_rules_whichever_comes_first() {
        let t0 = Instant::now();
        let s = Schedule::new(100, 10, 0, t0);
        assert!(s.due(t0, 100, false));
        assert!(s.due(t0 + 10 * S, 1, false));
        assert!(!s.due(t0 + 9 * S, 99, false));
    }

    #[test]
    fn at_the_end_whatever_the_rules() {
        let t0 = Instant::now();
        let mut s = Schedule::new(0, 0, 0, t0);
        assert!(
            !s.due(t0 + 1000 * S, 7, false),
            "no rule, no checkpoint while running"
        );
        assert!(s.due(t0, 7, true));
        s.written(t0, 7);
        assert!(!s.due(t0, 7, true), "the final one is written once");
    }

    #[test]
    fn a_failure_waits_a_second_then_retries_the_same_version() {
        let t0 = Instant::now();
        let mut s = Schedule::new(5, 0, 0, t0);
        assert!(s.due(t0, 5, false));
        s.failed(t0);
        assert!(!s.due(t0 + RETRY_AFTER / 2, 6, false));
        assert!(
            s.due(t0 + RETRY_AFTER, 6, false),
            "the interval still counts from 0"
        );
    }
}
