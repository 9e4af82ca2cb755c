//! The fused path against the plain burn composition it replaces (float64 there).

use burn::tensor::{DType, Device};

use super::*;
use crate::Quadratic;
use crate::groups::AnyPhi;
use crate::groups::GroupMap;
use crate::tensor::{from_f32, to_f64};
use crate::unroll::{DeviceCarry, meta_grad_tensors};
use crate::{LstmState, Lstms, Preprocess};

/// The burn path's meta-gradient (f64), meta-loss and final θ and state.
fn reference(
    phi: &AnyPhi,
    groups: Option<&GroupMap>,
    q: &Quadratic,
    carry: &HostCarry,
    start: usize,
    steps: usize,
) -> (Vec<Vec<f64>>, f64, Vec<f64>, Vec<Vec<f64>>) {
    let dev = Device::flex().autodiff();
    let (n, h) = (q.num_coords(), phi.config().hidden);
    let state = LstmState {
        h: carry
            .h
            .iter()
            .map(|v| from_f32(v, [n, h], &dev, DType::F64))
            .collect(),
        c: carry
            .c
            .iter()
            .map(|v| from_f32(v, [n, h], &dev, DType::F64))
            .collect(),
        moments: carry
            .moments
            .iter()
            .map(|v| from_f32(v, [n, 1], &dev, DType::F64))
            .collect(),
    };
    let c = DeviceCarry {
        theta: from_f32(&carry.theta, [n, 1], &dev, DType::F64),
        state,
    };
    let raw = meta_grad_tensors(
        &Lstms::new(phi, groups, n, &dev, DType::F64).unwrap(),
        &q.on(&dev, DType::F64),
        c,
        start,
        steps,
    )
    .unwrap();
    let grads = raw.grad.iter().map(|g| to_f64(g).unwrap()).collect();
    let losses = to_f64(&raw.losses).unwrap();
    let state: Vec<Vec<f64>> = raw
        .carry
        .state
        .h
        .iter()
        .chain(&raw.carry.state.c)
        .chain(&raw.carry.state.moments)
        .map(|t| to_f64(t).unwrap())
        .collect();
    (
        grads,
        losses.iter().sum::<f64>() / steps as f64,
        to_f64(&raw.carry.theta).unwrap(),
        state,
    )
}

/// Worst elementwise relative error, |got − want| / max(|want|, 1e-2 · max|want|): every
/// element is held to the bound, with a floor of 1% of the tensor's largest element so
/// that near-cancelled elements are not asked for more than float32 carries.
fn max_rel(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let floor = 1e-2 * want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    got.iter().zip(want).fold(0f64, |m, (g, w)| {
        m.max((*g as f64 - w).abs() / w.abs().max(floor))
    })
}

fn compare(config: OptimizerConfig, batch: usize, steps: usize) {
    let phi = AnyPhi::from(Phi::init(config, 11).unwrap());
    compare_with(&phi, None, config, batch, steps);
}

/// A quadratic whose coordinates fall into parameter groups (spec §5).
struct Grouped<'a> {
    q: &'a Quadratic,
    map: GroupMap,
}

impl HostProblem for Grouped<'_> {
    fn num_coords(&self) -> usize {
        self.q.num_coords()
    }
    fn eval(&self, theta: &[f32], step: usize, grad: &mut [f32]) -> f64 {
        self.q.eval(theta, step, grad)
    }
    fn groups(&self) -> Option<GroupMap> {
        Some(self.map.clone())
    }
}

fn compare_with(
    phi: &AnyPhi,
    groups: Option<&GroupMap>,
    config: OptimizerConfig,
    batch: usize,
    steps: usize,
) {
    let q = Quadratic::from_seed(12, batch, 10).unwrap();
    let grouped = groups.map(|map| Grouped {
        q: &q,
        map: map.clone(),
    });
    let host: &dyn HostProblem = match &grouped {
        Some(g) => g,
        None => &q,
    };
    let layout: Vec<String> = phi
        .parts()
        .iter()
        .enumerate()
        .flat_map(|(g, _)| {
            config
                .tensor_layout()
                .into_iter()
                .map(move |(n, _)| format!("{g}:{n}"))
        })
        .collect();
    let mut carry = HostCarry::start(&config, q.theta0.clone());
    // Two truncations in a row: the second starts from a non-zero state.
    for trunc in 0..2 {
        let start = trunc * steps;
        let (want, want_loss, want_theta, want_state) =
            reference(phi, groups, &q, &carry, start, steps);
        let got = meta_grad(phi, host, carry.clone(), start, steps).unwrap();
        assert_eq!(got.grad.names(), phi.names());
        assert_eq!(want.len(), layout.len());
        // Float32 against float64 at a fresh φ: about 1e-6 (spec); allow 1e-4.
        for (name, (g, w)) in layout.iter().zip(got.grad.tensors().zip(&want)) {
            let e = max_rel(g, w);
            assert!(e < 1e-4, "{config:?} truncation {trunc}: {name} rel {e:e}");
        }
        assert!(
            (got.meta_loss - want_loss).abs() < 1e-5 * want_loss,
            "{} vs {want_loss}",
            got.meta_loss
        );
        // θ sums 20 rounded updates: float32 drifts ~3e-5 from float64 here.
        let e = max_rel(&got.carry.theta, &want_theta);
        assert!(e < 1e-4, "theta rel {e:e}");
        // Each layer's h and c, as tensors of their own. log_sign amplifies float32's
        // rounding of small gradients (log|g| of a g near cancellation, whose θ drifted
        // ~3e-5 in float32): an h of 1e-3 can be 2% off where the layer's largest is 0.3
        // (measured worst: 1.1e-4 of the tensor's largest element, 5.7e-3 elementwise with
        // the 1% floor). So the state is held to 5e-4 of each tensor's largest element, and
        // every element to 2e-2 of itself (floor 1%). The gradients meet 1e-4 elementwise.
        for (i, (g, w)) in got
            .carry
            .h
            .iter()
            .chain(&got.carry.c)
            .chain(&got.carry.moments)
            .zip(&want_state)
            .enumerate()
        {
            let scale = w.iter().fold(0f64, |m, v| m.max(v.abs()));
            let abs = g
                .iter()
                .zip(w)
                .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
            assert!(
                abs < 5e-4 * scale,
                "truncation {trunc}, state {i} (h, then c, then moments): {abs:e}"
            );
            let e = max_rel(g, w);
            assert!(
                e < 2e-2,
                "truncation {trunc}, state {i} (h, then c, then moments): rel {e:e}"
            );
        }
        assert_eq!(
            want_state.len(),
            2 * config.layers + config.preprocess.moments()
        );
        carry = got.carry;
    }
}

#[test]
fn matches_the_burn_path_log_sign() {
    compare(OptimizerConfig::default(), 13, 20);
}

#[test]
fn matches_the_burn_path_identity() {
    compare(OptimizerConfig::new(Preprocess::Identity), 13, 20);
}

#[test]
fn matches_the_burn_path_rnnprop() {
    // Two truncations: the second starts from nonzero moments, carried out of the first.
    compare(OptimizerConfig::new(Preprocess::Rnnprop), 13, 20);
}

#[test]
fn two_groups_match_the_burn_path() {
    // 130 coordinates in groups of 37 and 93: neither starts or ends on a SIMD block, so
    // the per-group padding is exercised (rnnprop's moments included); each group has its
    // own φ.
    for preprocess in [Preprocess::LogSign, Preprocess::Rnnprop] {
        let config = OptimizerConfig {
            hidden: 6,
            ..OptimizerConfig::new(preprocess)
        };
        let phi = AnyPhi::init(config, &["conv", "fc"], 21).unwrap();
        let map = GroupMap {
            groups: vec![("conv", 0..37), ("fc", 37..130)],
        };
        compare_with(&phi, Some(&map), config, 13, 9);
    }
}

#[test]
fn two_groups_with_one_phi_sum_to_the_one_group_gradient() {
    // The same φ in both groups runs the same steps as one φ for all coordinates, and
    // ∂L/∂φ of the one φ is the sum of the two groups' parts.
    let config = OptimizerConfig::default();
    let one = Phi::init(config, 4).unwrap();
    let both = AnyPhi::Groups(
        crate::PhiGroups::new(vec![
            ("conv".into(), one.clone()),
            ("fc".into(), one.clone()),
        ])
        .unwrap(),
    );
    let q = Quadratic::from_seed(3, 7, 10).unwrap();
    let g = Grouped {
        q: &q,
        map: GroupMap {
            groups: vec![("conv", 0..21), ("fc", 21..70)],
        },
    };
    let carry = HostCarry::start(&config, q.theta0.clone());
    let a = meta_grad(&AnyPhi::from(one), &q, carry.clone(), 0, 10).unwrap();
    let b = meta_grad(&both, &g, carry, 0, 10).unwrap();
    assert_eq!(a.losses, b.losses);
    assert_eq!(a.carry, b.carry);
    let parts = b.grad.parts();
    let summed: Vec<f32> = parts[0]
        .flatten()
        .iter()
        .zip(parts[1].flatten())
        .map(|(x, y)| x + y)
        .collect();
    let want: Vec<f64> = a.grad.flatten().iter().map(|v| *v as f64).collect();
    let e = max_rel(&summed, &want);
    assert!(e < 1e-5, "rel {e:e}");
    assert!(parts.iter().all(|p| p.flatten().iter().any(|v| *v != 0.0)));
}

#[test]
fn refuses_a_phi_that_does_not_fit_the_problems_groups() {
    let config = OptimizerConfig::default();
    let q = Quadratic::from_seed(3, 2, 10).unwrap();
    let g = Grouped {
        q: &q,
        map: GroupMap {
            groups: vec![("conv", 0..5), ("fc", 5..20)],
        },
    };
    let carry = HostCarry::start(&config, q.theta0.clone());
    let one = AnyPhi::from(Phi::init(config, 1).unwrap());
    let e = meta_grad(&one, &g, carry.clone(), 0, 3)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("conv,fc") && e.contains("one LSTM for everything"),
        "{e}"
    );
    let two = AnyPhi::init(config, &["fc", "conv"], 1).unwrap();
    let e = meta_grad(&two, &g, carry.clone(), 0, 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("fc,conv") && e.contains("names conv,fc"), "{e}");
    let e = meta_grad(&two, &q, carry, 0, 3).unwrap_err().to_string();
    assert!(e.contains("no parameter groups"), "{e}");
}

#[test]
fn matches_the_burn_path_other_sizes() {
    let c = OptimizerConfig {
        hidden: 7,
        layers: 3,
        k: 5.0,
        ..OptimizerConfig::default()
    };
    compare(c, 70, 7);
    let c = OptimizerConfig {
        hidden: 33,
        layers: 1,
        ..OptimizerConfig::new(Preprocess::Identity)
    };
    compare(c, 3, 5);
}

#[test]
fn refuses_zero_steps_and_a_carry_of_the_wrong_size() {
    let phi = AnyPhi::from(Phi::init(OptimizerConfig::default(), 1).unwrap());
    let q = Quadratic::from_seed(1, 2, 10).unwrap();
    let carry = HostCarry::start(&phi.config(), q.theta0.clone());
    assert!(matches!(
        meta_grad(&phi, &q, carry.clone(), 0, 0),
        Err(Error::Config(_))
    ));
    let mut bad = carry;
    bad.h[1].pop();
    assert!(matches!(
        meta_grad(&phi, &q, bad, 0, 3),
        Err(Error::Shape(_))
    ));
}

#[test]
fn every_kernel_variant_agrees_with_the_portable_one() {
    // Every variant this CPU runs against the portable kernels and the f64 burn path:
    // fused multiply-adds round once where the portable ones round twice, so they agree to
    // float32 rounding; AVX2 and AVX-512 do the same operations, so they agree bit for bit.
    // N = 200: 13 blocks of 16, the last one padded.
    let phi = AnyPhi::from(Phi::init(OptimizerConfig::default(), 3).unwrap());
    let q = Quadratic::from_seed(4, 20, 10).unwrap();
    let carry = HostCarry::start(&phi.config(), q.theta0.clone());
    let (want, _, _, _) = reference(&phi, None, &q, &carry, 0, 20);
    let run = |k: Kernels| meta_grad_with(k, &phi, &q, carry.clone(), 0, 20, None).unwrap();
    let portable = run(Kernels::Portable);
    let available = Kernels::available();
    eprintln!("kernel variants on this CPU: {available:?}");
    if std::env::var("L2L_REQUIRE_ALL").is_ok_and(|v| v == "1") && cfg!(target_arch = "x86_64") {
        // Every x86-64 server CI runs on has AVX2 and FMA; AVX-512 is tested where present.
        assert!(
            available.contains(&Kernels::Avx2),
            "this CPU lacks AVX2+FMA"
        );
    }
    let mut fma_bits = None;
    for k in available {
        let got = run(k);
        for ((a, b), w) in got.grad.tensors().zip(portable.grad.tensors()).zip(&want) {
            assert!(max_rel(a, w) < 1e-4, "{k} against f64: {}", max_rel(a, w));
            let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
            assert!(max_rel(a, &b64) < 1e-4, "{k} against portable");
        }
        assert_eq!(got.losses.len(), 20);
        if k != Kernels::Portable {
            match &fma_bits {
                None => fma_bits = Some(got.grad.clone()),
                Some(first) => assert_eq!(&got.grad, first, "{k} differs from avx2"),
            }
        }
        // Reused buffers: a second call gives bit-identical results.
        assert_eq!(run(k).grad, got.grad, "{k} twice");
    }
}

#[test]
fn a_diverged_truncation_does_not_poison_the_next() {
    // A blown-up run on 16 coordinates leaves non-finite state in the kept buffers; the
    // next run on 9 coordinates pads 7 lanes where those coordinates were.
    let blow_up = OptimizerConfig {
        out_scale: 1e30,
        ..OptimizerConfig::default()
    };
    let bad = AnyPhi::from(Phi::init(blow_up, 1).unwrap());
    let q16 = Quadratic::from_seed(5, 8, 2).unwrap();
    let err = meta_grad(
        &bad,
        &q16,
        HostCarry::start(&blow_up, q16.theta0.clone()),
        0,
        5,
    )
    .unwrap_err();
    assert!(matches!(err, Error::NonFinite(_)), "{err}");
    let phi = AnyPhi::from(Phi::init(OptimizerConfig::default(), 1).unwrap());
    let q9 = Quadratic::from_seed(6, 3, 3).unwrap();
    let carry = HostCarry::start(&phi.config(), q9.theta0.clone());
    let reused = meta_grad(&phi, &q9, carry.clone(), 0, 5).unwrap();
    release_buffers();
    let fresh = meta_grad(&phi, &q9, carry, 0, 5).unwrap();
    assert_eq!(reused.grad, fresh.grad);
}

#[test]
fn weighting_the_last_step_is_the_difference_of_two_plain_truncations() {
    // With w = (0, …, 0, T), L = f(θ_T) = T·L_T − (T−1)·L_{T−1}, where L_k is the plain
    // mean over the first k steps (the first T−1 steps of both runs are the same).
    let phi = AnyPhi::from(Phi::init(OptimizerConfig::default(), 8).unwrap());
    let q = Quadratic::from_seed(9, 12, 10).unwrap();
    let carry = HostCarry::start(&phi.config(), q.theta0.clone());
    let t = 6;
    let long = meta_grad(&phi, &q, carry.clone(), 3, t).unwrap();
    let short = meta_grad(&phi, &q, carry.clone(), 3, t - 1).unwrap();
    let mut w = vec![0f32; t];
    w[t - 1] = t as f32;
    let last = meta_grad_weighted(&phi, &q, carry.clone(), 3, &w).unwrap();
    assert!((last.meta_loss - long.losses[t - 1]).abs() < 1e-9);
    for ((l, a), b) in last
        .grad
        .tensors()
        .zip(long.grad.tensors())
        .zip(short.grad.tensors())
    {
        let want: Vec<f64> = a
            .iter()
            .zip(b)
            .map(|(a, b)| t as f64 * *a as f64 - (t - 1) as f64 * *b as f64)
            .collect();
        assert!(max_rel(l, &want) < 1e-3, "{}", max_rel(l, &want));
    }
    // All-ones weights are the plain meta-gradient, bit for bit.
    let ones = meta_grad_weighted(&phi, &q, carry, 3, &vec![1.0; t]).unwrap();
    assert_eq!(ones.grad, long.grad);
}

#[test]
fn bitwise_reproducible_for_any_thread_count() {
    // Blocks of coordinates run in parallel; their gradient sums are added in a fixed
    // order, so 1, 2, 3 or 7 threads give the same bits (640 coordinates: 80 blocks).
    let config = OptimizerConfig::default();
    let phi = AnyPhi::from(Phi::init(config, 5).unwrap());
    let q = Quadratic::from_seed(6, 64, 10).unwrap();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let first =
                meta_grad(&phi, &q, HostCarry::start(&config, q.theta0.clone()), 0, 20).unwrap();
            let second = meta_grad(&phi, &q, first.carry.clone(), 20, 20).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let mut all: Vec<Vec<u32>> = second.grad.tensors().map(|t| bits(t)).collect();
            all.push(bits(&second.carry.theta));
            all.push(vec![
                second.meta_loss.to_bits() as u32,
                (second.meta_loss.to_bits() >> 32) as u32,
            ]);
            all
        })
    };
    let one = run(1);
    for threads in [2, 3, 7] {
        assert!(
            run(threads) == one,
            "{threads} threads differ from one thread"
        );
    }
}

#[test]
fn recomputed_records_give_the_kept_records_gradient_bit_for_bit() {
    // 1,300 coordinates in two groups (11 tasks, neither group on a block boundary), a
    // truncation that starts mid-trajectory from a nonzero LSTM state, weighted steps:
    // recomputing the step records in the backward pass changes no bit (rnnprop's moments
    // replayed from the truncation's start too).
    for preprocess in [Preprocess::LogSign, Preprocess::Rnnprop] {
        recompute_case(OptimizerConfig::new(preprocess));
    }
    // The size rule: small truncations keep their records, a million coordinates do not.
    let config = OptimizerConfig::default();
    assert!(!recomputes(&config, 16_000, 20));
    assert!(recomputes(&config, 1_000_000, 20));
}

fn recompute_case(config: OptimizerConfig) {
    let q = Quadratic::from_seed(8, 130, 10).unwrap();
    let g = Grouped {
        q: &q,
        map: GroupMap {
            groups: vec![("conv", 0..437), ("fc", 437..1300)],
        },
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let grouped = AnyPhi::Groups(
        crate::PhiGroups::new(vec![
            ("conv".into(), Phi::init(config, 1).unwrap()),
            ("fc".into(), Phi::init(config, 2).unwrap()),
        ])
        .unwrap(),
    );
    let one = AnyPhi::from(Phi::init(config, 3).unwrap());
    let weights: Vec<f32> = (1..=12).map(|t| t as f32 / 6.5).collect();
    for (phi, problem) in [
        (&one, &q as &dyn HostProblem),
        (&grouped, &g as &dyn HostProblem),
    ] {
        let start = HostCarry::start(&config, q.theta0.clone());
        let warm = meta_grad(phi, problem, start, 0, 5).unwrap().carry;
        assert!(warm.h[0].iter().any(|v| *v != 0.0));
        let kept = meta_grad_with(
            Kernels::best(),
            phi,
            problem,
            warm.clone(),
            5,
            12,
            Some(&weights),
        )
        .unwrap();
        let redone = meta_grad_recomputed(phi, problem, warm, 5, 12, Some(&weights)).unwrap();
        assert_eq!(kept.losses, redone.losses);
        assert_eq!(kept.meta_loss.to_bits(), redone.meta_loss.to_bits());
        assert_eq!(kept.carry, redone.carry);
        for (a, b) in kept.grad.tensors().zip(redone.grad.tensors()) {
            assert!(bits(a) == bits(b), "a gradient tensor differs");
        }
        assert!(kept.grad.tensors().any(|t| t.iter().any(|v| *v != 0.0)));
        // Forward only, keeping h and c alone: the same losses and carry.
        let a = forward(phi, problem, redone.carry.clone(), 17, 12, Some(&weights)).unwrap();
        let b = forward_compact(phi, problem, redone.carry, 17, 12, Some(&weights)).unwrap();
        assert_eq!(a.losses, b.losses);
        assert_eq!(a.carry, b.carry);
    }
}
