//! Aggregation: when accepted gradients become one averaged update of φ.

use std::time::{Duration, Instant};

use crate::config::{AggregationConfig, Mode};

/// Gradients accepted since the last update, summed.
#[derive(Debug, Clone)]
pub struct Aggregator {
    config: AggregationConfig,
    sum: Vec<f64>,
    count: usize,
    loss_sum: f64,
    /// sync: when the open round must close (set by its first gradient).
    round_deadline: Option<Instant>,
}

/// An averaged gradient ready to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The mean of the round's gradients.
    pub grad: Vec<f32>,
    /// The mean of their meta-losses.
    pub meta_loss: f64,
    /// How many gradients it averages.
    pub count: usize,
}

impl Aggregator {
    /// An empty aggregator for φ of `n` values.
    pub fn new(config: AggregationConfig, n: usize) -> Self {
        Self {
            config,
            sum: vec![0.0; n],
            count: 0,
            loss_sum: 0.0,
            round_deadline: None,
        }
    }

    /// The largest staleness a gradient may have to be accepted.
    pub fn staleness_bound(&self) -> u64 {
        match self.config.mode {
            Mode::Sync => 0,
            Mode::Async => self.config.max_staleness,
        }
    }

    /// Adds an accepted gradient; returns the update if it completes one.
    pub fn add(&mut self, grad: &[f32], meta_loss: f64, now: Instant) -> Option<Update> {
        for (s, g) in self.sum.iter_mut().zip(grad) {
            *s += *g as f64;
        }
        self.count += 1;
        self.loss_sum += meta_loss;
        if self.count == 1 && self.config.mode == Mode::Sync {
            self.round_deadline = Some(now + Duration::from_millis(self.config.round_timeout_ms));
        }
        let target = match self.config.mode {
            Mode::Sync => self.config.quorum,
            Mode::Async => self.config.every,
        };
        (self.count >= target).then(|| self.take())
    }

    /// sync: closes a round whose deadline passed with at least one gradient in it.
    pub fn tick(&mut self, now: Instant) -> Option<Update> {
        match self.round_deadline {
            Some(d) if now >= d && self.count > 0 => Some(self.take()),
            _ => None,
        }
    }

    /// Gradients waiting in the open round.
    pub fn pending(&self) -> usize {
        self.count
    }

    fn take(&mut self) -> Update {
        let n = self.count as f64;
        let grad = self.sum.iter().map(|s| (s / n) as f32).collect();
        let update = Update {
            grad,
            meta_loss: self.loss_sum / n,
            count: self.count,
        };
        self.sum.iter_mut().for_each(|s| *s = 0.0);
        self.count = 0;
        self.loss_sum = 0.0;
        self.round_deadline = None;
        update
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mode: Mode) -> AggregationConfig {
        AggregationConfig {
            mode,
            quorum: 3,
            every: 2,
            round_timeout_ms: 100,
            max_staleness: 5,
        }
    }

    #[test]
    fn sync_round_closes_at_quorum_with_the_mean() {
        let mut a = Aggregator::new(config(Mode::Sync), 2);
        let t = Instant::now();
        assert!(a.add(&[1.0, 2.0], 1.0, t).is_none());
        assert!(a.add(&[3.0, 4.0], 2.0, t).is_none());
        let u = a.add(&[5.0, 0.0], 3.0, t).unwrap();
        assert_eq!(u.grad, vec![3.0, 2.0]);
        assert_eq!((u.meta_loss, u.count), (2.0, 3));
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn sync_round_closes_by_its_deadline() {
        let mut a = Aggregator::new(config(Mode::Sync), 1);
        let t = Instant::now();
        assert!(
            a.tick(t + Duration::from_secs(10)).is_none(),
            "an empty round never closes"
        );
        a.add(&[4.0], 1.0, t);
        assert!(a.tick(t + Duration::from_millis(99)).is_none());
        let u = a.tick(t + Duration::from_millis(100)).unwrap();
        assert_eq!((u.grad, u.count), (vec![4.0], 1));
        assert_eq!(a.staleness_bound(), 0);
    }

    #[test]
    fn async_updates_every_k() {
        let mut a = Aggregator::new(config(Mode::Async), 1);
        let t = Instant::now();
        assert!(a.add(&[1.0], 0.0, t).is_none());
        assert_eq!(a.add(&[2.0], 0.0, t).unwrap().grad, vec![1.5]);
        assert!(
            a.tick(t + Duration::from_secs(60)).is_none(),
            "async has no deadline"
        );
        assert_eq!(a.staleness_bound(), 5);
    }
}
