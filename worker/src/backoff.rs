//! How long a worker waits after a failure: exponential in the failures since the last
//! success, capped, with ±50% jitter so a fleet that lost its coordinator does not
//! come back in lockstep.

use std::time::Duration;

use l2l_common::rng::Rng;

/// Exponential backoff with jitter, reset by a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    jitter: Rng,
    failures: u32,
}

impl Backoff {
    /// Starts at `min`, doubles per failure up to `max`; `seed` drives the jitter.
    pub fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Self {
            min,
            max: max.max(min),
            jitter: Rng::new(seed),
            failures: 0,
        }
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The pause after one more failure: `min · 2^failures`, capped at `max`, times a
    /// uniform factor in [0.5, 1.5).
    pub fn next_failure(&mut self) -> Duration {
        let n = self.failures;
        self.failures = self.failures.saturating_add(1);
        self.delay(n)
    }

    /// The pause before retry number `attempt` of one operation (does not count as a
    /// failure of the worker).
    pub fn delay(&mut self, attempt: u32) -> Duration {
        let base = self.min.as_secs_f64() * 2f64.powi(attempt.min(30) as i32);
        let capped = base.min(self.max.as_secs_f64());
        Duration::from_secs_f64(capped * self.jitter.uniform_in(0.5, 1.5))
    }

    /// A success: the next failure starts again at `min`.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    #[test]
    fn doubles_from_min_up_to_max_within_the_jitter_band() {
        let mut b = Backoff::new(MIN, MAX, 7);
        for n in 0..12 {
            let nominal = (0.1 * 2f64.powi(n)).min(5.0);
            let d = b.next_failure().as_secs_f64();
            assert!(
                d >= 0.5 * nominal && d < 1.5 * nominal,
                "failure {n}: {d} s outside [0.5, 1.5) × {nominal} s"
            );
        }
        assert_eq!(b.failures(), 12);
    }

    #[test]
    fn a_success_starts_over_at_min() {
        let mut b = Backoff::new(MIN, MAX, 3);
        for _ in 0..10 {
            b.next_failure();
        }
        b.reset();
        let d = b.next_failure();
        assert!(d >= MIN / 2 && d < MIN * 3 / 2, "{d:?}");
    }

    #[test]
    fn the_jitter_spreads_a_fleet_over_the_whole_band() {
        // 1,000 workers at their 10th failure (nominal: the 5 s cap), one seed each: the
        // pauses cover [2.5, 7.5) s, about uniformly, rather than coinciding.
        let pauses: Vec<f64> = (0..1000u64)
            .map(|seed| Backoff::new(MIN, MAX, seed).delay(10).as_secs_f64())
            .collect();
        let lo = pauses.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = pauses.iter().cloned().fold(0.0, f64::max);
        assert!(lo >= 2.5 && lo < 2.6, "shortest {lo}");
        assert!(hi < 7.5 && hi > 7.4, "longest {hi}");
        let mean = pauses.iter().sum::<f64>() / pauses.len() as f64;
        assert!((mean - 5.0).abs() < 0.15, "mean {mean}");
        // Each quarter of the band holds about a quarter of the fleet.
        for q in 0..4 {
            let (a, b) = (2.5 + 1.25 * q as f64, 2.5 + 1.25 * (q + 1) as f64);
            let n = pauses.iter().filter(|p| **p >= a && **p < b).count();
            assert!((200..300).contains(&n), "quarter {q}: {n} of 1000");
        }
    }

    #[test]
    fn a_max_below_min_is_min() {
        let mut b = Backoff::new(MIN, Duration::from_millis(1), 1);
        let d = b.delay(5);
        assert!(d >= MIN / 2 && d < MIN * 3 / 2, "{d:?}");
    }
}
