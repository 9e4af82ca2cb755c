//! Adam over φ as one flat f32 vector: the meta-optimizer the coordinator applies.

use serde::{Deserialize, Serialize};

/// Adam's hyper-parameters (Kingma & Ba 2015).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay β1.
    pub beta1: f64,
    /// Second-moment decay β2.
    pub beta2: f64,
    /// ε added to the root of the second moment.
    pub eps: f64,
    /// Clip the averaged gradient to this global L2 norm first (0 = no clipping).
    pub clip_norm: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip_norm: 0.0,
        }
    }
}

/// Adam's moments and step count.
#[derive(Debug, Clone, PartialEq)]
pub struct Adam {
    /// Hyper-parameters.
    pub config: AdamConfig,
    /// First moments, one per φ value.
    pub m: Vec<f32>,
    /// Second moments, one per φ value.
    pub v: Vec<f32>,
    /// Number of steps taken.
    pub t: u64,
}

impl Adam {
    /// Zero moments for `n` values.
    pub fn new(config: AdamConfig, n: usize) -> Self {
        Self {
            config,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    /// One bias-corrected Adam step of `phi` along `grad`, first clipped to the global L2
    /// norm `clip_norm` (when set) and to `clip` (when given).
    ///
    /// Arithmetic in f64 per element, stored in f32: the same bits on every machine. The
    /// step is all or nothing: when φ or a moment would hold a non-finite value (or one
    /// beyond f32), nothing changes and the step is refused.
    pub fn step(
        &mut self,
        phi: &mut [f32],
        grad: &[f32],
        clip: Option<f64>,
    ) -> Result<(), NonFiniteUpdate> {
        let c = self.config;
        let norm = grad.iter().map(|g| (*g as f64).powi(2)).sum::<f64>().sqrt();
        let limit = match (c.clip_norm > 0.0, clip) {
            (true, Some(r)) => c.clip_norm.min(r),
            (true, None) => c.clip_norm,
            (false, Some(r)) => r,
            (false, None) => f64::INFINITY,
        };
        let scale = if norm > limit { limit / norm } else { 1.0 };
        let t = self.t + 1;
        let power = t.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - c.beta1.powi(power);
        let bc2 = 1.0 - c.beta2.powi(power);
        // Written in place into copies (no pushes), so the loop vectorises; IEEE sqrt and
        // division round the same in every lane, so the bits do not change.
        let (mut p1, mut m1s, mut v1s) = (phi.to_vec(), self.m.clone(), self.v.clone());
        for (((p, g), m), v) in p1.iter_mut().zip(grad).zip(&mut m1s).zip(&mut v1s) {
            let g = *g as f64 * scale;
            let m1 = c.beta1 * *m as f64 + (1.0 - c.beta1) * g;
            let v1 = c.beta2 * *v as f64 + (1.0 - c.beta2) * g * g;
            let update = c.lr * (m1 / bc1) / ((v1 / bc2).sqrt() + c.eps);
            *m = m1 as f32;
            *v = v1 as f32;
            *p = (*p as f64 - update) as f32;
        }
        let bad = |xs: &[f32]| xs.iter().position(|x| !x.is_finite());
        if let Some(index) = bad(&p1).or_else(|| bad(&m1s)).or_else(|| bad(&v1s)) {
            return Err(NonFiniteUpdate { index });
        }
        phi.copy_from_slice(&p1);
        self.m = m1s;
        self.v = v1s;
        self.t = t;
        Ok(())
    }
}

/// An update refused because it would have left a non-finite value in φ or Adam's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the update would make value {index} of φ or of Adam's moments non-finite; φ kept")]
pub struct NonFiniteUpdate {
    /// The first offending index.
    pub index: usize,
}

impl AdamConfig {
    /// Refuses hyper-parameters outside Adam's domain, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!(
                "adam.lr must be positive and finite, got {}",
                self.lr
            ));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(format!("adam.{name} must be in [0, 1), got {b}"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(format!(
                "adam.eps must be positive and finite, got {}",
                self.eps
            ));
        }
        if !(self.clip_norm.is_finite() && self.clip_norm >= 0.0) {
            return Err(format!(
                "adam.clip_norm must be 0 (off) or positive, got {}",
                self.clip_norm
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_value_by_lr_against_its_sign() {
        // At t = 1, m̂ = g and v̂ = g², so the step is lr·g/(|g| + ε) ≈ lr·sign(g).
        let mut adam = Adam::new(AdamConfig::default(), 3);
        let mut phi = [1.0f32, 1.0, 1.0];
        adam.step(&mut phi, &[0.5, -2.0, 0.0], None).unwrap();
        assert!((phi[0] - (1.0 - 1e-3)).abs() < 1e-7, "{phi:?}");
        assert!((phi[1] - (1.0 + 1e-3)).abs() < 1e-7, "{phi:?}");
        assert_eq!(phi[2], 1.0);
    }

    #[test]
    fn second_step_by_hand() {
        // g1 = 1, g2 = 3 (β 0.9/0.999, lr 0.1, ε 0):
        // m2 = 0.9·0.1 + 0.1·3 = 0.39, v2 = 0.999·0.001 + 0.001·9 = 0.009999
        // m̂ = 0.39/0.19 = 2.0526315789, v̂ = 0.009999/0.001999 = 5.0020010005
        // step 2 = 0.1·2.0526315789/2.2365153 = 0.0917782; step 1 = 0.1.
        let config = AdamConfig {
            lr: 0.1,
            eps: 0.0,
            ..AdamConfig::default()
        };
        let mut adam = Adam::new(config, 1);
        let mut phi = [0.0f32];
        adam.step(&mut phi, &[1.0], None).unwrap();
        adam.step(&mut phi, &[3.0], None).unwrap();
        let want = -0.1 - 0.1 * (0.39 / 0.19) / (0.009999f64 / 0.001999).sqrt();
        assert!((phi[0] as f64 - want).abs() < 1e-6, "{} vs {want}", phi[0]);
    }

    #[test]
    fn clipping_scales_the_whole_gradient() {
        let config = AdamConfig {
            clip_norm: 1.0,
            ..AdamConfig::default()
        };
        let mut a = Adam::new(config, 2);
        let mut b = Adam::new(config, 2);
        let (mut p, mut q) = ([0.0f32; 2], [0.0f32; 2]);
        a.step(&mut p, &[30.0, 40.0], None).unwrap(); // norm 50, clipped to [0.6, 0.8]
        b.step(&mut q, &[0.6, 0.8], None).unwrap();
        // Equal up to the f32 rounding of 0.6 itself.
        for (x, y) in a.m.iter().zip(&b.m).chain(p.iter().zip(&q)) {
            assert!((x - y).abs() <= 1e-7 * y.abs().max(1e-3), "{x} vs {y}");
        }
        assert!((a.m[0] - 0.06).abs() < 1e-7, "{:?}", a.m);
    }

    #[test]
    fn the_caller_clip_and_clip_norm_take_the_smaller() {
        let config = AdamConfig {
            clip_norm: 2.0,
            ..AdamConfig::default()
        };
        let mut a = Adam::new(config, 2);
        let mut p = [0.0f32; 2];
        a.step(&mut p, &[30.0, 40.0], Some(1.0)).unwrap(); // clipped to norm 1
        assert!((a.m[0] - 0.06).abs() < 1e-7, "{:?}", a.m);
        let mut b = Adam::new(AdamConfig::default(), 2);
        b.step(&mut p, &[30.0, 40.0], Some(5.0)).unwrap(); // to norm 5: [3, 4]
        assert!((b.m[1] - 0.4).abs() < 1e-6, "{:?}", b.m);
    }

    #[test]
    fn a_step_that_would_overflow_changes_nothing() {
        // g = 1e30: g² overflows f32 in the second moment; the step is refused whole.
        let mut adam = Adam::new(AdamConfig::default(), 3);
        let mut phi = [1.0f32, 2.0, 3.0];
        let err = adam.step(&mut phi, &[0.0, 1e30, 0.0], None).unwrap_err();
        assert_eq!(err.index, 1);
        assert_eq!(phi, [1.0, 2.0, 3.0]);
        assert_eq!(
            (adam.t, &adam.m[..], &adam.v[..]),
            (0, &[0.0; 3][..], &[0.0; 3][..])
        );
        // The same gradient clipped is a normal step.
        adam.step(&mut phi, &[0.0, 1e30, 0.0], Some(1.0)).unwrap();
        assert!(phi.iter().chain(&adam.v).all(|x| x.is_finite()));
        assert_eq!(adam.t, 1);
    }

    #[test]
    fn hyper_parameters_outside_the_domain_are_refused() {
        let ok = AdamConfig::default();
        ok.validate().unwrap();
        for bad in [
            AdamConfig { beta1: 1.0, ..ok },
            AdamConfig { beta2: -0.1, ..ok },
            AdamConfig { eps: 0.0, ..ok },
            AdamConfig { lr: f64::NAN, ..ok },
            AdamConfig {
                clip_norm: f64::INFINITY,
                ..ok
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
