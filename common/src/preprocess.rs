//! Gradient preprocessing (spec §1.2): the LSTM's input features from g.
//!
//! `rnnprop`, l2l's third preprocessing beside the spec's two (RNNprop's inputs, Lv, Jiang
//! and Li 2017, "Learning Gradient Descent: Better Generalization and Longer Horizons"),
//! carries two moments per coordinate, m and v, zero at the start of a trajectory and
//! carried across truncations (detached at their boundaries) like the LSTM's h and c.
//! For each step's gradient g, in float32:
//!
//! ```text
//! m' = β1·m + (1 − β1)·g          β1 = 0.95   (1 − β1 rounded to f32: 0.050000012)
//! v' = β2·v + (1 − β2)·g·g        β2 = 0.95
//! d  = √v' + ε                    ε  = 1e-8
//! x  = [ g / d ,  m' / d ]
//! ```
//!
//! There is no bias correction: the features stay bounded without it (|g/d| ≤ 1/√(1 − β2)
//! ≈ 4.47, and |m'/d| ≤ 1 by Cauchy–Schwarz since β1 = β2), and a rescaled problem (g → a·g) gives the same features
//! wherever √v' ≫ ε, which is the point of normalising. Like g itself the moments are
//! constants of the unroll (second derivatives are dropped, spec §2): no gradient flows
//! through them.

use burn::tensor::Tensor;

use crate::Preprocess;

/// RNNprop's decay of the running mean m.
pub const RNNPROP_BETA1: f32 = 0.95;
/// RNNprop's decay of the running second moment v.
pub const RNNPROP_BETA2: f32 = 0.95;
/// Added to √v before dividing by it.
pub const RNNPROP_EPS: f32 = 1e-8;

/// RNNprop's features of one coordinate and its new moments: `(x0, x1, m', v')`, in the
/// module's order of operations (what every backend computes).
#[inline(always)]
pub fn rnnprop_scalar(g: f32, m: f32, v: f32) -> (f32, f32, f32, f32) {
    let m = RNNPROP_BETA1 * m + (1.0 - RNNPROP_BETA1) * g;
    let v = RNNPROP_BETA2 * v + (1.0 - RNNPROP_BETA2) * (g * g);
    let d = v.sqrt() + RNNPROP_EPS;
    (g / d, m / d, m, v)
}

/// RNNprop's features `[N, 2]` of gradients `g: [N, 1]` and the new moments `(m', v')`,
/// each `[N, 1]`, from the previous ones.
pub fn rnnprop(g: Tensor<2>, m: Tensor<2>, v: Tensor<2>) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
    let m = m.mul_scalar(RNNPROP_BETA1) + g.clone().mul_scalar(1.0 - RNNPROP_BETA1);
    let v = v.mul_scalar(RNNPROP_BETA2) + (g.clone() * g.clone()).mul_scalar(1.0 - RNNPROP_BETA2);
    let d = v.clone().sqrt().add_scalar(RNNPROP_EPS);
    let x = Tensor::cat(vec![g / d.clone(), m.clone() / d], 1);
    (x, m, v)
}

/// Input features `[N, 1]` (identity) or `[N, 2]` (log_sign, rnnprop) from gradients
/// `g: [N, 1]`, and the preprocessing's new moments (rnnprop's m', v', each `[N, 1]`; none
/// for the others) from `moments`, the previous ones.
///
/// log_sign: `[ln|g| / k, sign g]` where `|g| >= exp(-k)`, else `[-1, exp(k) g]`;
/// sign(0) = 0. rnnprop: the module's formulas; moments it is not given (a state made
/// for another preprocessing, which the engine refuses before it gets here) start at
/// zero. `g` is a constant of the unroll, so no gradient flows through here.
pub fn preprocess(
    g: Tensor<2>,
    kind: Preprocess,
    k: f64,
    moments: Vec<Tensor<2>>,
) -> (Tensor<2>, Vec<Tensor<2>>) {
    match kind {
        Preprocess::Identity => (g, moments),
        Preprocess::Rnnprop => {
            let mut it = moments.into_iter();
            let m = it.next().unwrap_or_else(|| g.zeros_like());
            let v = it.next().unwrap_or_else(|| g.zeros_like());
            let (x, m, v) = rnnprop(g, m, v);
            (x, vec![m, v])
        }
        Preprocess::LogSign => {
            let abs = g.clone().abs();
            // The threshold is compared in g's own precision, as an implementation
            // working in float32 would.
            let large = abs.clone().greater_equal_elem((-k).exp());
            // ln of zero would be -inf in the branch that is not taken; clamp it away
            // so no non-finite number exists even transiently.
            let log = abs.clamp_min(f32::MIN_POSITIVE).log().div_scalar(k);
            let first = log.mask_where(large.clone().bool_not(), g.ones_like().neg());
            let second = g.clone().mul_scalar(k.exp()).mask_where(large, g.sign());
            (Tensor::cat(vec![first, second], 1), moments)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{from_f64, to_f64};
    use burn::tensor::{DType, Device};

    fn run(g: &[f64], k: f64) -> Vec<f64> {
        let dev = Device::flex();
        let t = from_f64(g, [g.len(), 1], &dev, DType::F64);
        to_f64(&preprocess(t, Preprocess::LogSign, k, Vec::new()).0).unwrap()
    }

    #[test]
    fn log_sign_branches_threshold_and_zero() {
        let k = 10.0f64;
        let thr = (-k).exp(); // 4.54e-5
        let g = [2.0, -0.5, thr, thr * 0.5, -thr * 0.5, 0.0];
        let x = run(&g, k);
        // Large branch: [ln|g|/k, sign g].
        assert!((x[0] - 2f64.ln() / 10.0).abs() < 1e-15 && x[1] == 1.0);
        assert!((x[2] - 0.5f64.ln() / 10.0).abs() < 1e-15 && x[3] == -1.0);
        // Exactly at the threshold: the large branch (>=), ln(e^-k)/k = -1, sign 1.
        assert!((x[4] + 1.0).abs() < 1e-12 && x[5] == 1.0);
        // Small branch: [-1, e^k g] = [-1, ±0.5].
        assert!(x[6] == -1.0 && (x[7] - 0.5).abs() < 1e-12);
        assert!(x[8] == -1.0 && (x[9] + 0.5).abs() < 1e-12);
        // Zero takes the small branch: [-1, 0], with sign(0) = 0 and nothing non-finite.
        assert_eq!((x[10], x[11]), (-1.0, 0.0));
    }

    #[test]
    fn log_sign_uses_k() {
        let x = run(&[0.01], 5.0);
        assert!((x[0] - 0.01f64.ln() / 5.0).abs() < 1e-15, "{x:?}");
        // With k = 5 the threshold is e^-5 = 6.7e-3: 1e-3 is small.
        let x = run(&[1e-3], 5.0);
        assert!(
            x[0] == -1.0 && (x[1] - 1e-3 * 5f64.exp()).abs() < 1e-12,
            "{x:?}"
        );
    }

    /// Three steps of rnnprop on burn in f64 against the module's formulas written out
    /// by hand in f64 (with β1, β2, ε as the f32 constants are).
    #[test]
    fn rnnprop_follows_its_formulas_across_steps() {
        let dev = Device::flex();
        let steps = [
            [0.3, -2.0, 0.0, 1e-3],
            [-0.1, -2.0, 0.0, 5e-4],
            [0.2, 4.0, 1e-9, -1e-3],
        ];
        let (b1, b2, eps) = (
            RNNPROP_BETA1 as f64,
            RNNPROP_BETA2 as f64,
            RNNPROP_EPS as f64,
        );
        let (o1, o2) = ((1.0 - RNNPROP_BETA1) as f64, (1.0 - RNNPROP_BETA2) as f64);
        let mut want_m = [0f64; 4];
        let mut want_v = [0f64; 4];
        let mut moments = vec![
            from_f64(&[0.0; 4], [4, 1], &dev, DType::F64),
            from_f64(&[0.0; 4], [4, 1], &dev, DType::F64),
        ];
        for g in steps {
            let t = from_f64(&g, [4, 1], &dev, DType::F64);
            let (x, next) = preprocess(t, Preprocess::Rnnprop, 10.0, moments);
            let x = to_f64(&x).unwrap();
            for k in 0..4 {
                want_m[k] = b1 * want_m[k] + o1 * g[k];
                want_v[k] = b2 * want_v[k] + o2 * g[k] * g[k];
                let d = want_v[k].sqrt() + eps;
                let (x0, x1) = (g[k] / d, want_m[k] / d);
                assert!(
                    (x[2 * k] - x0).abs() < 1e-12,
                    "x0[{k}] {} vs {x0}",
                    x[2 * k]
                );
                assert!(
                    (x[2 * k + 1] - x1).abs() < 1e-12,
                    "x1[{k}] {} vs {x1}",
                    x[2 * k + 1]
                );
            }
            let m = to_f64(&next[0]).unwrap();
            let v = to_f64(&next[1]).unwrap();
            for k in 0..4 {
                assert!((m[k] - want_m[k]).abs() < 1e-15 && (v[k] - want_v[k]).abs() < 1e-15);
            }
            moments = next;
        }
        // Hand values at the first step for g = 0.3: m = 0.05·0.3, v = 0.05·0.09,
        // x = [0.3 / √0.0045, 0.015 / √0.0045] = [4.472, 0.2236].
        let t = from_f64(&[0.3], [1, 1], &dev, DType::F64);
        let (x, _) = preprocess(t, Preprocess::Rnnprop, 10.0, Vec::new());
        let x = to_f64(&x).unwrap();
        assert!(
            (x[0] - 4.4721).abs() < 1e-3 && (x[1] - 0.22361).abs() < 1e-4,
            "{x:?}"
        );
    }

    /// What the normalisation is for: gradients scaled by 1,000 give the same features,
    /// and a zero gradient gives zeros, not NaN.
    #[test]
    fn rnnprop_is_scale_free_and_finite_at_zero() {
        let g = [0.01, -0.003, 0.02];
        let mut a = vec![0f32; 2];
        let (mut ma, mut va, mut mb, mut vb) = (0f32, 0f32, 0f32, 0f32);
        for gk in g {
            let (x0, x1, m, v) = rnnprop_scalar(gk, ma, va);
            let (y0, y1, m2, v2) = rnnprop_scalar(gk * 1000.0, mb, vb);
            (ma, va, mb, vb) = (m, v, m2, v2);
            assert!(
                (x0 - y0).abs() < 1e-4 && (x1 - y1).abs() < 1e-4,
                "{x0} {y0} {x1} {y1}"
            );
            a = vec![x0, x1];
        }
        assert!(a[0].abs() <= 1.0 / (1.0 - RNNPROP_BETA2).sqrt() && a[1].abs() <= 1.0 + 1e-6);
        // The bounds are reached: a first gradient gives |g/d| = 1/√(1 − β2); a steady
        // one drives m'/d towards 1.
        let (x0, _, _, _) = rnnprop_scalar(0.5, 0.0, 0.0);
        assert!(
            (x0 - 1.0 / (1.0 - RNNPROP_BETA2).sqrt()).abs() < 1e-3,
            "{x0}"
        );
        let (mut m, mut v, mut x1) = (0f32, 0f32, 0f32);
        for _ in 0..400 {
            let (_, y, m2, v2) = rnnprop_scalar(0.5, m, v);
            (m, v, x1) = (m2, v2, y);
        }
        assert!(x1 <= 1.0 + 1e-6 && x1 > 0.999, "{x1}");
        assert_eq!(rnnprop_scalar(0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0));
    }
}
