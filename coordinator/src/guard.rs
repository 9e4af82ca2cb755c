//! What one gradient can do to φ: the size rule for submissions and the clip of updates.
//!
//! The rule, in full (README, "What one gradient can do"):
//! - a gradient whose L2 norm exceeds `max_norm` is refused (`too_large`), always;
//! - once `warmup` gradients were accepted, one whose norm exceeds `max_norm_ratio` times
//!   the median norm of the last `window` accepted gradients is refused (`too_large`);
//!   legitimate spikes reach about 1,000× the median, so the default is 10⁴;
//! - a meta-loss whose magnitude exceeds `max_meta_loss` is refused (`too_large`);
//! - the averaged gradient of an update is clipped to `clip_ratio` times that median (and
//!   to `adam.clip_norm` when set).
//!
//! Only accepted norms enter the window, so refused gradients cannot move the median.

use serde::{Deserialize, Serialize};

/// The limits on one submission (section `[guard]` of the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuardConfig {
    /// Largest L2 norm of a gradient ever accepted.
    pub max_norm: f64,
    /// A gradient may be at most this many times the median of recent accepted norms.
    pub max_norm_ratio: f64,
    /// Accepted norms the median is taken over.
    pub window: usize,
    /// Accepted gradients before the ratio rule applies.
    pub warmup: usize,
    /// Largest |meta-loss| accepted.
    pub max_meta_loss: f64,
    /// Clip each averaged gradient to this many times the median norm (0 = off).
    pub clip_ratio: f64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            max_norm: 1e9,
            // Legitimate spikes reach about 1,000× the median (a trajectory that blows
            // up early in meta-training); 1e4 refuses only the absurd, and the clip below
            // bounds what a spike does to the update.
            max_norm_ratio: 1e4,
            window: 64,
            warmup: 8,
            max_meta_loss: 1e30,
            clip_ratio: 10.0,
        }
    }
}

/// The largest `max_norm` a configuration may set: the square of a gradient value stays
/// far inside f32, so Adam's second moment cannot overflow.
pub const MAX_NORM_CEILING: f64 = 1e15;

impl GuardConfig {
    /// Refuses limits that would not bound anything, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        let ok = |v: f64| v.is_finite() && v > 0.0;
        if !(ok(self.max_norm) && self.max_norm <= MAX_NORM_CEILING) {
            return Err(format!(
                "guard.max_norm must be in (0, {MAX_NORM_CEILING:e}], got {}",
                self.max_norm
            ));
        }
        if !(self.max_norm_ratio.is_finite() && self.max_norm_ratio > 1.0) {
            return Err(format!(
                "guard.max_norm_ratio must be a finite number above 1, got {}",
                self.max_norm_ratio
            ));
        }
        if !(1..=100_000).contains(&self.window) {
            return Err(format!(
                "guard.window must be in 1..=100000, got {}",
                self.window
            ));
        }
        if self.warmup == 0 {
            return Err("guard.warmup must be at least 1".into());
        }
        if !(ok(self.max_meta_loss) && self.max_meta_loss <= 1e300) {
            return Err(format!(
                "guard.max_meta_loss must be in (0, 1e300], got {}",
                self.max_meta_loss
            ));
        }
        if !(self.clip_ratio.is_finite() && self.clip_ratio >= 0.0) {
            return Err(format!(
                "guard.clip_ratio must be 0 (off) or positive, got {}",
                self.clip_ratio
            ));
        }
        Ok(())
    }
}

/// Why a submission is too large for the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TooLarge {
    /// The gradient's L2 norm is above the limit in force.
    Norm {
        /// The gradient's norm.
        norm: f64,
        /// The limit in force.
        limit: f64,
    },
    /// The meta-loss's magnitude is above `max_meta_loss`.
    MetaLoss {
        /// The meta-loss given.
        loss: f64,
        /// The limit.
        limit: f64,
    },
}

/// The norms of recently accepted gradients and the limits they imply.
#[derive(Debug, Clone, PartialEq)]
pub struct Guard {
    config: GuardConfig,
    /// Accepted norms, oldest first, at most `config.window`.
    recent: Vec<f64>,
    median: Option<f64>,
}

impl Guard {
    /// A guard that has seen the accepted norms `recent` (oldest first; from a checkpoint).
    pub fn new(config: GuardConfig, mut recent: Vec<f64>) -> Self {
        recent.retain(|n| n.is_finite() && *n >= 0.0);
        let skip = recent.len().saturating_sub(config.window);
        recent.drain(..skip);
        let mut g = Self {
            config,
            recent,
            median: None,
        };
        g.median = g.compute_median();
        g
    }

    /// The accepted norms the guard remembers, oldest first (saved in checkpoints).
    pub fn recent(&self) -> &[f64] {
        &self.recent
    }

    /// The median of the remembered norms, if any.
    pub fn median(&self) -> Option<f64> {
        self.median
    }

    fn compute_median(&self) -> Option<f64> {
        if self.recent.is_empty() {
            return None;
        }
        let mut v = self.recent.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            0.5 * (v[n / 2 - 1] + v[n / 2])
        })
    }

    /// The largest norm a gradient may have now.
    pub fn norm_limit(&self) -> f64 {
        match self.median {
            Some(m) if self.recent.len() >= self.config.warmup => {
                (self.config.max_norm_ratio * m).min(self.config.max_norm)
            }
            _ => self.config.max_norm,
        }
    }

    /// Checks a finite gradient of L2 norm `norm` and its meta-loss against the limits.
    pub fn check(&self, norm: f64, meta_loss: f64) -> Result<(), TooLarge> {
        let limit = self.norm_limit();
        if norm > limit {
            return Err(TooLarge::Norm { norm, limit });
        }
        if meta_loss.abs() > self.config.max_meta_loss {
            return Err(TooLarge::MetaLoss {
                loss: meta_loss,
                limit: self.config.max_meta_loss,
            });
        }
        Ok(())
    }

    /// Remembers the norm of an accepted gradient.
    pub fn accepted(&mut self, norm: f64) {
        if self.recent.len() >= self.config.window {
            self.recent.remove(0);
        }
        self.recent.push(norm);
        self.median = self.compute_median();
    }

    /// The norm an averaged gradient is clipped to by the ratio rule, if any.
    pub fn clip(&self) -> Option<f64> {
        match self.median {
            Some(m) if self.config.clip_ratio > 0.0 && m > 0.0 => Some(self.config.clip_ratio * m),
            _ => None,
        }
    }
}

/// The L2 norm of `v`, summed in f64 (finite for any finite f32 input of sane length).
pub fn l2_norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GuardConfig {
        GuardConfig {
            max_norm: 1e6,
            max_norm_ratio: 100.0,
            window: 5,
            warmup: 3,
            max_meta_loss: 1e30,
            clip_ratio: 10.0,
        }
    }

    #[test]
    fn absolute_limit_before_warmup_then_ratio_to_the_median() {
        let mut g = Guard::new(config(), vec![]);
        assert_eq!(g.norm_limit(), 1e6);
        assert!(g.check(1e6, 0.0).is_ok());
        assert_eq!(
            g.check(2e6, 0.0),
            Err(TooLarge::Norm {
                norm: 2e6,
                limit: 1e6
            })
        );
        g.accepted(1.0);
        g.accepted(3.0);
        assert_eq!(
            g.norm_limit(),
            1e6,
            "2 < warmup 3: still the absolute limit"
        );
        g.accepted(2.0);
        // median of [1, 3, 2] = 2 → limit 200.
        assert_eq!(g.norm_limit(), 200.0);
        assert!(g.check(200.0, 0.0).is_ok());
        assert!(g.check(200.1, 0.0).is_err());
        assert_eq!(g.clip(), Some(20.0));
    }

    #[test]
    fn window_slides_and_median_of_even_count_is_the_midpoint() {
        let mut g = Guard::new(config(), vec![f64::NAN, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(g.recent(), [1.0, 2.0, 3.0, 4.0], "non-finite dropped");
        assert_eq!(g.median(), Some(2.5));
        g.accepted(10.0);
        g.accepted(20.0);
        assert_eq!(g.recent(), [2.0, 3.0, 4.0, 10.0, 20.0], "oldest dropped");
        assert_eq!(g.median(), Some(4.0));
        let g = Guard::new(config(), (0..100).map(f64::from).collect());
        assert_eq!(
            g.recent(),
            [95.0, 96.0, 97.0, 98.0, 99.0],
            "cut to the window"
        );
    }

    #[test]
    fn meta_loss_magnitude_is_bounded() {
        let g = Guard::new(config(), vec![]);
        assert!(g.check(1.0, -1e30).is_ok());
        assert!(matches!(
            g.check(1.0, f64::MAX),
            Err(TooLarge::MetaLoss { .. })
        ));
    }

    #[test]
    fn limits_that_bound_nothing_are_refused() {
        for bad in [
            GuardConfig {
                max_norm: f64::INFINITY,
                ..config()
            },
            GuardConfig {
                max_norm: 1e20,
                ..config()
            },
            GuardConfig {
                max_norm_ratio: 1.0,
                ..config()
            },
            GuardConfig {
                window: 0,
                ..config()
            },
            GuardConfig {
                max_meta_loss: f64::NAN,
                ..config()
            },
            GuardConfig {
                clip_ratio: -1.0,
                ..config()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        GuardConfig::default().validate().unwrap();
    }
}
