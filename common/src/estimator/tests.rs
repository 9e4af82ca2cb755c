//! PES against the truth it estimates: the gradient of a whole trajectory's meta-loss.

use super::*;
use crate::engine::Backend;
use crate::problems::Optimizee;
use crate::{OptimizerConfig, Preprocess, Quadratic};

/// A trajectory of S = 8 steps in truncations of T = 2 (K = 4), on a 40-coordinate
/// quadratic, with a small LSTM (one layer of H = 2: 43 values of φ) so that the
/// estimate's standard error is small after a few thousand trajectories.
const S: usize = 8;
const T: usize = 2;

fn small_phi() -> AnyPhi {
    let config = OptimizerConfig {
        hidden: 2,
        layers: 1,
        ..OptimizerConfig::new(Preprocess::LogSign)
    };
    AnyPhi::from(crate::Phi::init(config, 5).unwrap())
}

fn quadratic() -> Optimizee {
    Optimizee::Quadratic(Quadratic::from_seed(11, 4, 10).unwrap())
}

/// Σₖ Lₖ of a whole trajectory under one φ: (S/T) times the mean loss over S steps.
fn full_loss(engine: &Engine, phi: &AnyPhi, p: &Loaded) -> f64 {
    let out = engine
        .forward(phi, p, engine.start(phi, p), 0, S, None)
        .unwrap();
    out.meta_loss * (S / T) as f64
}

/// d(Σₖ Lₖ)/dφ by central differences (every derivative kept, no truncation).
fn full_gradient(engine: &Engine, phi: &AnyPhi, p: &Loaded, h: f32) -> Vec<f64> {
    let flat = phi.flatten();
    (0..flat.len())
        .map(|j| {
            let at = |d: f32| {
                let mut v = flat.clone();
                v[j] += d;
                let moved = AnyPhi::unflatten(phi.config(), None, &v).unwrap();
                full_loss(engine, &moved, p)
            };
            (at(h) - at(-h)) / (2.0 * h as f64)
        })
        .collect()
}

/// One trajectory's estimate of d(Σₖ Lₖ)/dφ: the sum of its truncations' estimates.
fn trajectory_estimate(
    estimator: Estimator,
    engine: &Engine,
    phi: &AnyPhi,
    p: &Loaded,
    seed: u64,
) -> Vec<f64> {
    let mut sum = vec![0f64; phi.num_params()];
    let mut tr = Trajectory::start(estimator, engine, phi, p, seed).unwrap();
    for k in 0..S / T {
        let out = tr.truncation(engine, phi, p, k * T, T, None).unwrap();
        for (s, g) in sum.iter_mut().zip(out.grad.flatten()) {
            *s += g as f64;
        }
        tr = out.carry;
    }
    sum
}

/// Mean and standard error of each coordinate of `samples` estimates.
fn mean_and_se(samples: impl Iterator<Item = Vec<f64>>, d: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut sum, mut sq, mut m) = (vec![0f64; d], vec![0f64; d], 0usize);
    for g in samples {
        for j in 0..d {
            sum[j] += g[j];
            sq[j] += g[j] * g[j];
        }
        m += 1;
    }
    let m = m as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / m).collect();
    let se = (0..d)
        .map(|j| ((sq[j] / m - mean[j] * mean[j]) * m / (m - 1.0) / m).sqrt())
        .collect();
    (mean, se)
}

/// The acceptance test for PES: over many trajectories, the mean of PES's
/// estimates (summed over each trajectory's truncations) matches the gradient of the
/// whole, untruncated meta-loss within its standard error; truncated BPTT's does not.
///
/// The statistic is χ² = Σⱼ ((meanⱼ − truthⱼ) / seⱼ)² over φ's 43 values: about 43 ± 9
/// for an unbiased estimator; the bound is 43 + 5·√86. The truth is central differences
/// of Σₖ Lₖ under one φ, all 8 steps in one pass (h = 1e-3 and 3e-3 agree to 1.5e-2
/// against |truth| = 35 and a standard error of 1.7 summed over φ). At σ = 1e-3 the
/// smoothing is below the standard error (σ = 1e-2 gives χ² = 168 here: the σ-smoothed
/// gradient is measurably another one on this problem).
#[test]
fn pes_is_unbiased_for_the_whole_trajectory_and_truncated_bptt_is_not() {
    let engine = Engine::open(Backend::Fused).unwrap();
    let phi = small_phi();
    let p = engine.load(quadratic());
    let truth = full_gradient(&engine, &phi, &p, 1e-3);
    let d = truth.len();
    assert_eq!(d, 43);
    let pes = Estimator::Pes(PesConfig {
        sigma: 1e-3,
        pairs: 1,
    });
    let (mean, se) = mean_and_se(
        (0..16_000u64).map(|i| trajectory_estimate(pes, &engine, &phi, &p, 1000 + i)),
        d,
    );
    let chi2 = |v: &[f64]| -> f64 { (0..d).map(|j| ((v[j] - truth[j]) / se[j]).powi(2)).sum() };
    let bound = d as f64 + 5.0 * (2.0 * d as f64).sqrt();
    let tbptt = trajectory_estimate(Estimator::Tbptt, &engine, &phi, &p, 0);
    let (c_pes, c_tbptt) = (chi2(&mean), chi2(&tbptt));
    eprintln!(
        "χ² over {d} values of φ: PES {c_pes:.1}, truncated BPTT {c_tbptt:.1} (bound {bound:.1})"
    );
    assert!(
        c_pes < bound,
        "PES's mean is off the truth: χ² = {c_pes:.1}"
    );
    for j in 0..d {
        let z = (mean[j] - truth[j]) / se[j];
        assert!(
            z.abs() < 5.0,
            "value {j}: PES {} against {} (z = {z:.1})",
            mean[j],
            truth[j]
        );
    }
    assert!(
        c_tbptt > 10.0 * bound,
        "truncated BPTT should be biased here: χ² = {c_tbptt:.1}"
    );
}

/// The same seed gives the same estimate; another seed another one.
#[test]
fn a_pes_trajectory_is_reproducible_from_its_seed() {
    let engine = Engine::open(Backend::Fused).unwrap();
    let (phi, p) = (small_phi(), engine.load(quadratic()));
    let pes = Estimator::Pes(PesConfig::default());
    let a = trajectory_estimate(pes, &engine, &phi, &p, 7);
    assert_eq!(a, trajectory_estimate(pes, &engine, &phi, &p, 7));
    assert_ne!(a, trajectory_estimate(pes, &engine, &phi, &p, 8));
}

/// Continuing a trajectory with a φ of another shape (a coordinator restarted with
/// another configuration) is refused; so are settings that cannot run.
#[test]
fn pes_refuses_another_phi_and_bad_settings() {
    let engine = Engine::open(Backend::Fused).unwrap();
    let (phi, p) = (small_phi(), engine.load(quadratic()));
    let tr = Trajectory::start(Estimator::Pes(PesConfig::default()), &engine, &phi, &p, 1).unwrap();
    let other = AnyPhi::from(crate::Phi::init(OptimizerConfig::default(), 1).unwrap());
    let e = tr
        .truncation(&engine, &other, &p, 0, T, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("another φ"), "{e}");
    for (sigma, pairs, what) in [
        (0.0, 1, "sigma"),
        (f32::NAN, 1, "sigma"),
        (2.0, 1, "sigma"),
        (0.1, 0, "pairs"),
        (0.1, 65, "pairs"),
    ] {
        let e = PesConfig { sigma, pairs }
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains(what), "{e}");
    }
}
