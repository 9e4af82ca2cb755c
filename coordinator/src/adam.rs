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

    /// One bias-corrected Adam step of `phi` along `grad`, after optional clipping.
    ///
    /// Arithmetic in f64 per element, stored in f32: the same bits on every machine.
    pub fn step(&mut self, phi: &mut [f32], grad: &[f32]) {
        let c = self.config;
        let norm = grad.iter().map(|g| (*g as f64).powi(2)).sum::<f64>().sqrt();
        let scale = if c.clip_norm > 0.0 && norm > c.clip_norm {
            c.clip_norm / norm
        } else {
            1.0
        };
        self.t += 1;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (((p, g), m), v) in phi.iter_mut().zip(grad).zip(&mut self.m).zip(&mut self.v) {
            let g = *g as f64 * scale;
            let m1 = c.beta1 * *m as f64 + (1.0 - c.beta1) * g;
            let v1 = c.beta2 * *v as f64 + (1.0 - c.beta2) * g * g;
            *m = m1 as f32;
            *v = v1 as f32;
            let update = c.lr * (m1 / bc1) / ((v1 / bc2).sqrt() + c.eps);
            *p = (*p as f64 - update) as f32;
        }
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
        adam.step(&mut phi, &[0.5, -2.0, 0.0]);
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
        adam.step(&mut phi, &[1.0]);
        adam.step(&mut phi, &[3.0]);
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
        a.step(&mut p, &[30.0, 40.0]); // norm 50, clipped to [0.6, 0.8]
        b.step(&mut q, &[0.6, 0.8]);
        // Equal up to the f32 rounding of 0.6 itself.
        for (x, y) in a.m.iter().zip(&b.m).chain(p.iter().zip(&q)) {
            assert!((x - y).abs() <= 1e-7 * y.abs().max(1e-3), "{x} vs {y}");
        }
        assert!((a.m[0] - 0.06).abs() < 1e-7, "{:?}", a.m);
    }
}
