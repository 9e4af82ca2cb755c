//! The meta-gradient on every backend against golden numbers from the independent JAX
//! reference of the spec (`tests/fixtures/jax/`: φ, problem, and for two truncations in a
//! row the expected meta-loss, per-step losses and ∂L/∂φ in float64; the command that made
//! them is in `make_fixtures.py` there). The cases are where the spec's alternatives
//! disagree: H ≥ 2, two features (log_sign), two layers, B ≥ 2, k ≠ 10.
//!
//! Runs through [`Engine`], the code a worker runs: the fused CPU kernels, burn flex, and
//! (with `--features wgpu`) burn wgpu.

use std::path::{Path, PathBuf};

use l2l_common::engine::{Backend, Engine};
use l2l_common::problems::Optimizee;
use l2l_common::{Phi, Quadratic};

const CASES: [&str; 2] = ["log_sign_h3_l2_k5", "identity_h2_l2"];

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/jax")
        .join(case)
}

/// Elementwise agreement: |got − want| ≤ rtol · max(|want|, floor · max|want|) for every
/// element; the floor keeps elements that are tiny next to the tensor's largest (where
/// float32 rounding of the larger terms dominates) from demanding more than float32 can
/// give. Returns the worst ratio of the error to its bound (≤ 1 passes).
pub fn worst_elementwise(got: &[f32], want: &[f64], rtol: f64, floor: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "sizes");
    let scale = want.iter().fold(0f64, |m, w| m.max(w.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs() / (rtol * w.abs().max(floor * scale)))
        .fold(0f64, f64::max)
}

fn backends() -> Vec<(Backend, f64)> {
    // float32 against the float64 reference. Measured worst error / bound (printed):
    // fused 0.22, flex 0.11 at 1e-5; wgpu on lavapipe 0.6 at 1e-5. A GPU's shaders may
    // round differently (fast math), so wgpu is held to 1e-4.
    let mut b = vec![(Backend::Fused, 1e-5), (Backend::Flex, 1e-5)];
    if cfg!(feature = "wgpu") {
        b.push((Backend::Wgpu, 1e-4));
    }
    b
}

fn check(case: &str, backend: Backend, rtol: f64) {
    let dir = fixture(case);
    let phi = l2l_common::AnyPhi::from(Phi::load(&dir.join("phi.safetensors")).unwrap());
    let quad = Quadratic::load(&dir.join("problem.safetensors")).unwrap();
    let want: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let engine = match Engine::open(backend) {
        Ok(e) => e,
        Err(e) => {
            l2l_tests::skip(&format!("cannot open {backend}: {e}"));
            return;
        }
    };
    let problem = engine.load(Optimizee::Quadratic(quad));
    let mut state = engine.start(&phi, &problem);
    let mut start = 0;
    for (j, t) in want["truncations"].as_array().unwrap().iter().enumerate() {
        let steps = t["steps"].as_u64().unwrap() as usize;
        let out = engine
            .truncation(&phi, &problem, state, start, steps, None)
            .unwrap();
        let floats = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        // The meta-loss is the mean of the T losses after each step (not their sum, and
        // not including f(θ_0)), and each loss is the batch mean.
        let losses = floats(&t["losses"]);
        assert_eq!(out.losses.len(), steps);
        for (s, (g, w)) in out.losses.iter().zip(&losses).enumerate() {
            assert!(
                (g - w).abs() <= rtol * w.abs(),
                "{case} on {backend}, truncation {j}, step {s}: loss {g} vs {w}"
            );
        }
        let meta = t["meta_loss"].as_f64().unwrap();
        assert!(
            (out.meta_loss - meta).abs() <= rtol * meta.abs(),
            "{case} on {backend}, truncation {j}: meta-loss {} vs {meta}",
            out.meta_loss
        );
        let layout = phi.config().tensor_layout();
        assert_eq!(out.grad.tensors().count(), layout.len());
        for ((name, _), got) in layout.iter().zip(out.grad.tensors()) {
            let expected = floats(&t["grad"][name.as_str()]);
            let worst = worst_elementwise(got, &expected, rtol, 1e-2);
            eprintln!("{case} on {backend}, truncation {j}: {name} worst error / bound {worst:.3}");
            assert!(
                worst <= 1.0,
                "{case} on {backend}, truncation {j}: {name} is off by {worst:.2}× the bound \
                 (rtol {rtol:e})\n got  {got:?}\n want {expected:?}"
            );
        }
        state = out.carry;
        start += steps;
    }
}

#[test]
fn log_sign_two_layers_h3_k5_matches_the_jax_reference_on_every_backend() {
    for (backend, rtol) in backends() {
        check(CASES[0], backend, rtol);
    }
}

#[test]
fn identity_two_layers_h2_matches_the_jax_reference_on_every_backend() {
    for (backend, rtol) in backends() {
        check(CASES[1], backend, rtol);
    }
}

#[test]
fn the_elementwise_bound_catches_a_small_element_that_a_per_tensor_bound_lets_through() {
    // One large element and one small one off by 50%: max|diff| / max|ref| = 5e-5 would
    // pass a 1e-4 per-tensor bound; the elementwise bound does not.
    let want = [1.0, 1e-4];
    let got = [1.0f32, 1.5e-4];
    assert!(worst_elementwise(&got, &want, 1e-4, 1e-2) > 1.0);
    assert!(worst_elementwise(&[1.0, 1e-4], &want, 1e-4, 1e-2) <= 1.0);
}
