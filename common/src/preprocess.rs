//! Gradient preprocessing (spec §1.2): the LSTM's input features from g.

use burn::tensor::Tensor;

use crate::Preprocess;

/// Input features `[N, 1]` (identity) or `[N, 2]` (log_sign) from gradients `g: [N, 1]`.
///
/// log_sign: `[ln|g| / k, sign g]` where `|g| >= exp(-k)`, else `[-1, exp(k) g]`;
/// sign(0) = 0. `g` is a constant of the unroll, so no gradient flows through here.
pub fn preprocess(g: Tensor<2>, kind: Preprocess, k: f64) -> Tensor<2> {
    match kind {
        Preprocess::Identity => g,
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
            Tensor::cat(vec![first, second], 1)
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
        to_f64(&preprocess(t, Preprocess::LogSign, k)).unwrap()
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
}
