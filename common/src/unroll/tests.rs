//! The meta-gradient against central finite differences in float64.

use std::cell::RefCell;

use burn::tensor::{DType, Device, Tensor};

use super::*;
use crate::groups::{AnyPhi, GroupMap};
use crate::lstm::Lstm;
use crate::tensor::{from_f64, to_f64};
use crate::{OptimizerConfig, Phi, Preprocess, Quadratic};

const F64: DType = DType::F64;

/// Replays a recorded gradient sequence: the spec's L(φ) with every g_t held fixed.
struct FixedGrads<'a> {
    inner: &'a dyn Problem,
    grads: Vec<Tensor<2>>,
    start: usize,
}

impl Problem for FixedGrads<'_> {
    fn num_coords(&self) -> usize {
        self.inner.num_coords()
    }
    fn loss(&self, theta: Tensor<2>, step: usize) -> Tensor<1> {
        self.inner.loss(theta, step)
    }
    fn grad(&self, _theta: Tensor<2>, step: usize) -> Tensor<2> {
        self.grads[step - self.start].clone()
    }
}

/// Records the g_t an unroll asks for.
struct Recording<'a> {
    inner: &'a dyn Problem,
    seen: RefCell<Vec<Tensor<2>>>,
}

impl Problem for Recording<'_> {
    fn num_coords(&self) -> usize {
        self.inner.num_coords()
    }
    fn loss(&self, theta: Tensor<2>, step: usize) -> Tensor<1> {
        self.inner.loss(theta, step)
    }
    fn grad(&self, theta: Tensor<2>, step: usize) -> Tensor<2> {
        let g = self.inner.grad(theta, step);
        self.seen.borrow_mut().push(g.clone());
        g
    }
}

struct Case {
    lstm: Lstms,
    quad: Quadratic,
    dev: Device,
}

impl Case {
    fn new(config: OptimizerConfig, seed: u64) -> Self {
        let dev = Device::flex().autodiff();
        let phi = Phi::init(config, seed).unwrap();
        // Give out.b a non-zero value so its gradient path is exercised too.
        let mut phi = phi;
        *phi.tensors.last_mut().unwrap() = vec![0.05];
        let quad = Quadratic::from_seed(seed + 100, 2, 3).unwrap();
        Self {
            lstm: Lstms::one(Lstm::new(&phi, &dev, F64), quad.num_coords()),
            quad,
            dev,
        }
    }

    /// Two groups with different φ over the quadratics' 6 coordinates, split inside the
    /// first quadratic (coordinates 0..2 and 2..6), so each group's LSTM sees coordinates
    /// that interact with the other's.
    fn grouped(config: OptimizerConfig, seed: u64) -> Self {
        let dev = Device::flex().autodiff();
        let mut phi = crate::PhiGroups::init(config, &["conv", "fc"], seed).unwrap();
        let parts = phi
            .groups()
            .iter()
            .enumerate()
            .map(|(i, (_, p))| {
                let mut p = p.clone();
                *p.tensors.last_mut().unwrap() = vec![0.05 - 0.1 * i as f32];
                p
            })
            .collect();
        phi = match AnyPhi::from(phi).with_parts(parts).unwrap() {
            AnyPhi::Groups(g) => g,
            AnyPhi::One(_) => unreachable!(),
        };
        let map = GroupMap {
            groups: vec![("conv", 0..2), ("fc", 2..6)],
        };
        let quad = Quadratic::from_seed(seed + 100, 2, 3).unwrap();
        Self {
            lstm: Lstms::new(&phi.into(), Some(&map), 6, &dev, F64).unwrap(),
            quad,
            dev,
        }
    }

    fn carry(&self) -> DeviceCarry {
        DeviceCarry {
            theta: self.quad.theta0(&self.dev, F64),
            state: LstmState::zeros(&self.lstm.config(), self.quad.num_coords(), &self.dev, F64),
        }
    }

    /// L(φ) in f64 for the given parameters and problem, forward only.
    fn loss(&self, lstm: &Lstms, problem: &dyn Problem, steps: usize) -> f64 {
        let run = unroll(lstm, problem, self.carry(), 0, steps);
        to_f64(&run.losses.mean()).unwrap()[0]
    }
}

/// φ with `h` added to element `index` of parameter tensor `which`.
fn perturb(lstm: &Lstms, which: usize, index: usize, h: f64, dev: &Device) -> Lstms {
    let mut seen = 0;
    lstm.clone().map_params(|t| {
        let this = seen;
        seen += 1;
        if this != which {
            return t;
        }
        let [r, c] = t.dims();
        let mut delta = vec![0.0; r * c];
        delta[index] = h;
        t + from_f64(&delta, [r, c], dev, F64)
    })
}

/// Max over a tensor of |fd − ad| / max|ad|, per tensor, with central differences.
fn fd_errors(case: &Case, problem: &dyn Problem, ad: &[Vec<f64>], steps: usize) -> Vec<f64> {
    let h = 1e-5;
    ad.iter()
        .enumerate()
        .map(|(which, grad)| {
            let scale = grad.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-300);
            (0..grad.len())
                .map(|i| {
                    let up =
                        case.loss(&perturb(&case.lstm, which, i, h, &case.dev), problem, steps);
                    let down = case.loss(
                        &perturb(&case.lstm, which, i, -h, &case.dev),
                        problem,
                        steps,
                    );
                    ((up - down) / (2.0 * h) - grad[i]).abs() / scale
                })
                .fold(0f64, f64::max)
        })
        .collect()
}

/// The autodiff meta-gradient in f64 and the g_t sequence of its unroll.
fn autodiff(case: &Case, steps: usize) -> (Vec<Vec<f64>>, Vec<Tensor<2>>) {
    let problem = case.quad.on(&case.dev, F64);
    let rec = Recording {
        inner: &problem,
        seen: RefCell::new(Vec::new()),
    };
    let raw = meta_grad_tensors(&case.lstm, &rec, case.carry(), 0, steps).unwrap();
    let grads = raw.grad.iter().map(|g| to_f64(g).unwrap()).collect();
    let seen = rec
        .seen
        .into_inner()
        .into_iter()
        .map(Tensor::detach)
        .collect();
    (grads, seen)
}

fn check_against_finite_differences(config: OptimizerConfig) {
    check_case(Case::new(config, 3), config);
}

fn check_case(case: Case, config: OptimizerConfig) {
    let steps = 5;
    let (ad, seen) = autodiff(&case, steps);
    let problem = case.quad.on(&case.dev, F64);
    let fixed = FixedGrads {
        inner: &problem,
        grads: seen,
        start: 0,
    };
    let errors = fd_errors(&case, &fixed, &ad, steps);
    let parts = case.lstm.parts().len();
    let names: Vec<String> = (0..parts)
        .flat_map(|g| {
            config
                .tensor_layout()
                .into_iter()
                .map(move |(n, _)| format!("{g}:{n}"))
        })
        .collect();
    assert_eq!(names.len(), ad.len());
    eprintln!(
        "{config:?}: max rel FD error per tensor {:?}",
        names.iter().zip(&errors).collect::<Vec<_>>()
    );
    // f64 central differences with h = 1e-5: truncation error ~h² ≈ 1e-10 and
    // rounding ~1e-16/h ≈ 1e-11 relative; 1e-6 leaves a wide margin and still fails on
    // any wrong gate, sign or missing term (those give O(1) errors).
    for (name, e) in names.iter().zip(&errors) {
        assert!(*e < 1e-6, "{name}: relative error {e:e}");
    }
    // Every tensor's gradient is really there (a zero gradient would pass trivially).
    for (name, g) in names.iter().zip(&ad) {
        assert!(
            g.iter().any(|v| v.abs() > 1e-8),
            "{name} has an all-zero gradient"
        );
    }
}

#[test]
fn finite_differences_every_preprocessing() {
    // rnnprop's moments are functions of the fixed g_t alone, so the fixed-g_t
    // differences see them as constants too.
    for preprocess in [
        Preprocess::LogSign,
        Preprocess::Identity,
        Preprocess::Rnnprop,
    ] {
        let config = OptimizerConfig {
            hidden: 4,
            ..OptimizerConfig::new(preprocess)
        };
        check_against_finite_differences(config);
    }
}

#[test]
fn finite_differences_three_layers_small_k() {
    let config = OptimizerConfig {
        hidden: 3,
        layers: 3,
        k: 5.0,
        out_scale: 0.5,
        preprocess: Preprocess::LogSign,
    };
    check_against_finite_differences(config);
}

#[test]
fn finite_differences_two_groups() {
    // Spec §5: each group's φ receives its part of ∂L/∂φ of the one meta-loss.
    let config = OptimizerConfig {
        hidden: 3,
        ..OptimizerConfig::new(Preprocess::LogSign)
    };
    check_case(Case::grouped(config, 5), config);
}

#[test]
fn gradients_are_constants_of_the_unroll() {
    // Finite differences of the *full* loss, where a perturbed φ also changes every
    // g_t = ∇f(θ_t), include the second-derivative terms the spec drops. The meta-gradient
    // must match the fixed-g_t differences (tested above) and visibly differ from these;
    // an implementation that let gradients flow through g_t would do the opposite.
    let config = OptimizerConfig {
        hidden: 4,
        out_scale: 1.0,
        ..OptimizerConfig::new(Preprocess::Identity)
    };
    let case = Case::new(config, 8);
    let steps = 5;
    let (ad, _) = autodiff(&case, steps);
    let problem = case.quad.on(&case.dev, F64);
    let full = fd_errors(&case, &problem, &ad, steps);
    let worst = full.iter().cloned().fold(0f64, f64::max);
    eprintln!("full-loss FD vs meta-gradient, max rel difference {worst:e}");
    assert!(
        worst > 1e-3,
        "second-order terms should be visible here: {worst:e}"
    );
}

#[test]
fn f32_agrees_with_f64() {
    // Spec: a fresh φ's float32 and float64 meta-gradients agree to about 1e-6 relative.
    let config = OptimizerConfig::default();
    let phi = Phi::init(config, 4).unwrap();
    let quad = Quadratic::from_seed(5, 16, 10).unwrap();
    let dev = Device::flex().autodiff();
    let grads = |dtype| {
        let carry = DeviceCarry {
            theta: quad.theta0(&dev, dtype),
            state: LstmState::zeros(&config, quad.num_coords(), &dev, dtype),
        };
        let raw = meta_grad_tensors(
            &Lstms::one(Lstm::new(&phi, &dev, dtype), quad.num_coords()),
            &quad.on(&dev, dtype),
            carry,
            0,
            20,
        )
        .unwrap();
        raw.grad
            .iter()
            .map(|g| to_f64(g).unwrap())
            .collect::<Vec<_>>()
    };
    let (a, b) = (grads(DType::F32), grads(F64));
    for (x, y) in a.iter().zip(&b) {
        let scale = y.iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = x.iter().zip(y).fold(0f64, |m, (p, q)| m.max((p - q).abs()));
        assert!(diff / scale < 1e-4, "rel diff {:e}", diff / scale);
    }
}

#[test]
fn refuses_zero_steps_and_plain_devices() {
    let phi = Phi::init(OptimizerConfig::default(), 1).unwrap();
    let quad = Quadratic::from_seed(1, 2, 2).unwrap();
    for dev in [Device::flex(), Device::flex().autodiff()] {
        let carry = DeviceCarry {
            theta: quad.theta0(&dev, DType::F32),
            state: LstmState::zeros(&phi.config, 4, &dev, DType::F32),
        };
        let lstm = Lstms::one(Lstm::new(&phi, &dev, DType::F32), 4);
        let steps = if dev.is_autodiff() { 0 } else { 3 };
        let err = meta_grad(&lstm, &quad.on(&dev, DType::F32), carry, 0, steps).unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
    }
}
