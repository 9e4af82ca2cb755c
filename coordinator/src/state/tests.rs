//! Every decision of the coordinator, tested without a network.

use std::time::{Duration, Instant};

use l2l_proto::v1::{SubmitRequest, Version};

use l2l_common::OptimizerConfig;
use l2l_common::wire::f32_to_le_bytes;

use super::*;
use crate::config::Mode;

fn config(mode: Mode, quorum: usize) -> Config {
    let mut c = Config {
        lease_timeout_ms: 1000,
        ..Config::default()
    };
    c.init.hidden = 4;
    c.aggregation.mode = mode;
    c.aggregation.quorum = quorum;
    c.aggregation.every = quorum;
    c.aggregation.max_staleness = 1;
    c.aggregation.round_timeout_ms = 500;
    c
}

struct Fixture {
    c: Coordinator,
    t0: Instant,
    worker: u64,
    lease: u64,
}

/// The session of the fixture's worker.
const S: [u8; SESSION_BYTES] = [7; SESSION_BYTES];
/// Another worker's session.
const OTHER: [u8; SESSION_BYTES] = [9; SESSION_BYTES];

fn fixture(mode: Mode, quorum: usize) -> Fixture {
    fixture_with(config(mode, quorum))
}

fn fixture_with(config: Config) -> Fixture {
    let mut c = Coordinator::new(config, Start::fresh()).unwrap();
    let t0 = Instant::now();
    let worker = c.register("w", "flex", S, t0).unwrap();
    let lease = c.lease(worker, &S, t0).unwrap().lease_id;
    Fixture {
        c,
        t0,
        worker,
        lease,
    }
}

impl Fixture {
    fn n(&self) -> usize {
        self.c.phi.len()
    }

    fn req(&self, truncation: u32, step: u64) -> SubmitRequest {
        SubmitRequest {
            worker_id: self.worker,
            lease_id: self.lease,
            truncation,
            version: Some(Version {
                epoch: self.c.epoch,
                step,
            }),
            grad: f32_to_le_bytes(&vec![0.01; self.n()]).into(),
            meta_loss: 1.0,
            unroll_seconds: 0.1,
            session: S.to_vec(),
            data_fingerprint: String::new(),
        }
    }

    /// A request of truncation 0 at the current version with gradient `g`.
    fn with_grad(&self, truncation: u32, g: &[f32]) -> SubmitRequest {
        SubmitRequest {
            grad: f32_to_le_bytes(g).into(),
            ..self.req(truncation, self.c.version().step)
        }
    }

    fn refused(&mut self, req: SubmitRequest, reason: &str) {
        let phi = self.c.phi.clone();
        let version = self.c.version();
        let before = self.c.counters().refused.get(reason).copied().unwrap_or(0);
        let err = self.c.submit(&req, self.t0).unwrap_err();
        assert_eq!(err.reason(), reason, "{err}");
        assert_eq!(
            self.c.counters().refused[reason],
            before + 1,
            "counted once"
        );
        assert_eq!(self.c.phi, phi, "φ untouched by a refusal");
        assert_eq!(self.c.version(), version);
    }
}

#[test]
fn accepted_gradient_updates_phi_and_version() {
    let mut f = fixture(Mode::Sync, 1);
    let before = f.c.phi.clone();
    let a = f.c.submit(&f.req(0, 0), f.t0).unwrap();
    assert!(a.reply.accepted && !a.reply.duplicate);
    assert_eq!(f.c.version().step, 1);
    assert_ne!(f.c.phi, before);
    // Adam's first step moves each value by lr against the gradient's sign.
    assert!((before[0] - f.c.phi[0] - 1e-3).abs() < 1e-6);
    assert_eq!(f.c.counters().accepted, 1);
}

#[test]
fn duplicate_is_acknowledged_and_applied_once() {
    let mut f = fixture(Mode::Async, 2);
    f.c.submit(&f.req(0, 0), f.t0).unwrap();
    let phi = f.c.phi.clone();
    let dup = f.c.submit(&f.req(0, 0), f.t0).unwrap();
    assert!(dup.reply.accepted && dup.reply.duplicate && dup.update.is_none());
    assert_eq!(f.c.counters().accepted, 1);
    assert_eq!(f.c.phi, phi);
    assert_eq!(
        f.c.aggregator.pending(),
        1,
        "the retry did not enter the round"
    );
}

#[test]
fn stale_future_and_pre_restart_versions_are_refused() {
    let mut f = fixture(Mode::Sync, 1);
    f.c.submit(&f.req(0, 0), f.t0).unwrap(); // now at version 1
    f.refused(f.req(1, 0), "stale"); // sync: staleness bound 0
    f.refused(f.req(1, 5), "future_version");
    let mut r = f.req(1, 1);
    r.version = Some(Version { epoch: 7, step: 1 });
    f.refused(r, "pre_restart");
    assert!(
        f.c.submit(&f.req(1, 1), f.t0).is_ok(),
        "the current version is accepted"
    );
}

#[test]
fn async_accepts_within_the_staleness_bound() {
    let mut f = fixture(Mode::Async, 1);
    f.c.submit(&f.req(0, 0), f.t0).unwrap();
    f.c.submit(&f.req(1, 1), f.t0).unwrap(); // version 2
    assert!(
        f.c.submit(&f.req(2, 1), f.t0).is_ok(),
        "staleness 1 ≤ bound 1"
    );
    f.refused(f.req(3, 1), "stale"); // staleness 2
    assert_eq!(f.c.counters().staleness_max, 1);
    assert_eq!(
        f.c.counters().staleness_buckets,
        [2, 1, 0, 0, 0, 0, 0, 0, 0],
        "staleness 0, 0, 1 in the ≤0 and ≤1 buckets"
    );
}

#[test]
fn bad_gradients_are_refused() {
    let mut f = fixture(Mode::Sync, 1);
    let mut r = f.req(0, 0);
    r.grad.truncate(r.grad.len() - 4);
    f.refused(r, "shape");
    let with = |i: usize, v: f32| {
        let mut g = vec![0.01f32; f.n()];
        g[i] = v;
        SubmitRequest {
            grad: f32_to_le_bytes(&g).into(),
            ..f.req(0, 0)
        }
    };
    let (nan, inf) = (with(17, f32::NAN), with(0, f32::NEG_INFINITY));
    f.refused(nan, "non_finite");
    f.refused(inf, "non_finite");
    let mut r = f.req(0, 0);
    r.grad.truncate(r.grad.len() - 1);
    f.refused(r, "shape");
    let mut r = f.req(0, 0);
    r.meta_loss = f64::INFINITY;
    f.refused(r, "non_finite");
    f.refused(f.req(5, 0), "bad_truncation");
}

#[test]
fn unknown_foreign_and_expired_leases_are_refused() {
    let mut f = fixture(Mode::Sync, 1);
    let mut r = f.req(0, 0);
    r.lease_id = 999;
    f.refused(r, "unknown_lease");
    let other = f.c.register("x", "flex", OTHER, f.t0).unwrap();
    let mut r = f.req(0, 0);
    r.worker_id = other;
    r.session = OTHER.to_vec();
    f.refused(r, "foreign_lease");
    let mut r = f.req(0, 0);
    r.worker_id = 12345;
    f.refused(r, "unknown_worker");
    // Past the deadline (1 s) with no heartbeat: expired.
    f.c.tick(f.t0 + Duration::from_millis(1500));
    f.refused(f.req(0, 0), "expired_lease");
}

#[test]
fn heartbeats_keep_a_lease_alive() {
    let mut f = fixture(Mode::Sync, 1);
    for k in 1..=5 {
        let now = f.t0 + Duration::from_millis(600 * k);
        f.c.heartbeat(f.worker, &S, f.lease, now).unwrap();
        f.c.tick(now);
    }
    f.t0 += Duration::from_millis(3000);
    assert!(
        f.c.submit(&f.req(0, 0), f.t0).is_ok(),
        "renewed lease still live after 3 s"
    );
}

#[test]
fn sync_round_closes_by_deadline_without_quorum() {
    let mut f = fixture(Mode::Sync, 3);
    f.c.submit(&f.req(0, 0), f.t0).unwrap();
    assert_eq!(f.c.version().step, 0, "one of three: the round stays open");
    assert!(!f.c.tick(f.t0 + Duration::from_millis(400)));
    assert!(
        f.c.tick(f.t0 + Duration::from_millis(500)),
        "the deadline closes it"
    );
    assert_eq!(f.c.version().step, 1);
}

#[test]
fn fetch_is_cheap_when_unchanged() {
    let mut f = fixture(Mode::Sync, 1);
    let first = f.c.fetch_phi(None);
    assert!(!first.unchanged && !first.phi.is_empty());
    let again = f.c.fetch_phi(first.version);
    assert!(again.unchanged && again.phi.is_empty());
    f.c.submit(&f.req(0, 0), f.t0).unwrap();
    let next = f.c.fetch_phi(first.version);
    assert!(!next.unchanged);
    assert_eq!(next.version.unwrap().step, 1);
}

#[test]
fn trajectory_completes_and_run_finishes() {
    let mut cfg = config(Mode::Sync, 1);
    cfg.max_updates = 5;
    let mut c = Coordinator::new(cfg, Start::fresh()).unwrap();
    let t0 = Instant::now();
    let w = c.register("w", "flex", S, t0).unwrap();
    let lease = c.lease(w, &S, t0).unwrap().lease_id;
    for k in 0..5u32 {
        let req = SubmitRequest {
            worker_id: w,
            lease_id: lease,
            truncation: k,
            version: Some(c.version()),
            grad: f32_to_le_bytes(&vec![0.1; c.phi.len()]).into(),
            meta_loss: 1.0,
            unroll_seconds: 0.0,
            session: S.to_vec(),
            data_fingerprint: String::new(),
        };
        c.submit(&req, t0).unwrap();
    }
    assert_eq!(c.counters().trajectories_done, 1);
    assert!(c.finished());
    assert_eq!(c.lease(w, &S, t0).unwrap_err().reason(), "finished");
}

#[test]
fn snapshot_resumes_with_a_new_epoch_and_the_same_next_step() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(Mode::Sync, 1);
    cfg.dir = dir.path().into();
    let mut f = fixture(Mode::Sync, 1);
    f.c.config = cfg.clone();
    f.c.submit(&f.req(0, 0), f.t0).unwrap();
    f.c.submit(&f.req(1, 1), f.t0).unwrap();
    let path = crate::checkpoint::save(dir.path(), &f.c.snapshot().unwrap(), &cfg, 3).unwrap();
    let (found, snap) = crate::checkpoint::load_newest(dir.path()).unwrap().unwrap();
    assert_eq!(found, path);
    assert_eq!(snap, f.c.snapshot().unwrap());
    let start = Start {
        run: snap.run.clone(),
        epoch: 1,
        resume: Some(snap),
    };
    let mut resumed = Coordinator::new(cfg, start).unwrap();
    assert_eq!(resumed.version(), Version { epoch: 1, step: 2 });
    assert_eq!(
        resumed.run(),
        f.c.run(),
        "the run goes on under its own identity"
    );
    // The next update from the same gradient is bit-identical in both.
    let t = f.t0;
    let w = resumed.register("w", "flex", S, t).unwrap();
    let l = resumed.lease(w, &S, t).unwrap().lease_id;
    let mut req = f.req(2, 2);
    f.c.submit(&req, t).unwrap();
    req.worker_id = w;
    req.lease_id = l;
    req.truncation = 0;
    req.version = Some(resumed.version());
    resumed.submit(&req, t).unwrap();
    assert_eq!(f.c.phi, resumed.phi);
    assert_eq!(f.c.adam, resumed.adam);
}

#[test]
fn a_fresh_run_can_start_from_a_given_phi() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("start.safetensors");
    let start = l2l_common::Phi::init(
        OptimizerConfig {
            hidden: 6,
            ..OptimizerConfig::new(l2l_common::Preprocess::Identity)
        },
        9,
    )
    .unwrap();
    start.save(&path, Default::default()).unwrap();
    let mut cfg = config(Mode::Sync, 1);
    cfg.init.phi = Some(path.clone());
    let c = Coordinator::new(cfg.clone(), Start::fresh()).unwrap();
    assert_eq!(
        c.phi().unwrap(),
        AnyPhi::from(start),
        "φ and its configuration come from the file"
    );
    cfg.init.phi = Some(dir.path().join("missing"));
    let Err(e) = Coordinator::new(cfg, Start::fresh()) else {
        panic!("a missing init.phi must be refused")
    };
    let e = format!("{e:#}");
    assert!(e.contains("init.phi") && e.contains("missing"), "{e}");
}

#[test]
fn a_huge_finite_gradient_is_refused_and_phi_keeps_moving() {
    let mut f = fixture(Mode::Sync, 1);
    // All 1e30: finite, but far beyond guard.max_norm (1e9).
    let huge = f.with_grad(0, &vec![1e30; f.n()]);
    f.refused(huge, "too_large");
    for t in 0..4u32 {
        let phi = f.c.phi.clone();
        f.c.submit(&f.with_grad(t, &vec![0.01; f.n()]), f.t0)
            .unwrap();
        assert_ne!(f.c.phi, phi, "φ moves after the refusal");
    }
    assert_eq!(f.c.version().step, 4);
    assert!(f.c.phi.iter().chain(&f.c.adam.v).all(|x| x.is_finite()));
}

#[test]
fn after_the_warmup_a_gradient_far_above_the_median_is_refused() {
    let mut cfg = config(Mode::Async, 1);
    cfg.trajectory_steps = 400; // 20 truncations in one lease
    cfg.guard.max_norm_ratio = 100.0;
    let mut f = fixture_with(cfg);
    let n = f.n();
    let norm1 = (n as f64).sqrt() * 0.01;
    for t in 0..8u32 {
        f.c.submit(&f.with_grad(t, &vec![0.01; n]), f.t0).unwrap();
    }
    assert!((f.c.guard.median().unwrap() - norm1).abs() < 1e-6 * norm1);
    // 50× the median passes the 100× rule; 200× does not.
    f.c.submit(&f.with_grad(8, &vec![0.5; n]), f.t0).unwrap();
    let e =
        f.c.submit(&f.with_grad(9, &vec![2.0; n]), f.t0)
            .unwrap_err();
    assert_eq!(e.reason(), "too_large");
    assert!(e.to_string().contains("gradient norm"), "{e}");
    assert_eq!(f.c.counters().refused["too_large"], 1);
    // Refused norms do not move the median: the same gradient is refused again.
    let e =
        f.c.submit(&f.with_grad(9, &vec![2.0; n]), f.t0)
            .unwrap_err();
    assert_eq!(e.reason(), "too_large");
}

#[test]
fn the_averaged_gradient_is_clipped_to_a_multiple_of_the_median() {
    let mut cfg = config(Mode::Async, 1);
    cfg.trajectory_steps = 400;
    cfg.guard.clip_ratio = 2.0;
    let mut f = fixture_with(cfg);
    let n = f.n();
    for t in 0..8u32 {
        f.c.submit(&f.with_grad(t, &vec![0.01; n]), f.t0).unwrap();
    }
    // 50× the median is accepted, and enters Adam as 2× the median.
    let m_before = f.c.adam.m.clone();
    f.c.submit(&f.with_grad(8, &vec![0.5; n]), f.t0).unwrap();
    let median = f.c.guard.median().unwrap();
    let g0 = 2.0 * median / (n as f64).sqrt(); // each value of the clipped gradient
    let want = 0.9 * m_before[0] as f64 + 0.1 * g0;
    assert!(
        (f.c.adam.m[0] as f64 - want).abs() < 1e-6 * want.abs(),
        "{} vs {want}",
        f.c.adam.m[0]
    );
}

#[test]
fn absurd_meta_losses_are_refused_and_counters_stay_finite() {
    let mut f = fixture(Mode::Sync, 2);
    let mut r = f.req(0, 0);
    r.meta_loss = f64::MAX;
    f.refused(r, "too_large");
    // Two meta-losses at the limit in one round: their mean is finite, and so is every
    // counter a checkpoint writes.
    let other = f.c.register("x", "flex", OTHER, f.t0).unwrap();
    let lease = f.c.lease(other, &OTHER, f.t0).unwrap().lease_id;
    let mut a = f.req(0, 0);
    a.meta_loss = 1e30;
    let mut b = f.req(0, 0);
    (b.worker_id, b.lease_id, b.session, b.meta_loss) = (other, lease, OTHER.to_vec(), -1e30);
    f.c.submit(&a, f.t0).unwrap();
    f.c.submit(&b, f.t0).unwrap();
    assert_eq!(f.c.version().step, 1);
    let dir = tempfile::tempdir().unwrap();
    let snap = f.c.snapshot().unwrap();
    assert!(snap.counters.meta_losses.iter().all(|l| l.is_finite()));
    crate::checkpoint::save(dir.path(), &snap, &f.c.config, 1).unwrap();
    let (_, back) = crate::checkpoint::load_newest(dir.path()).unwrap().unwrap();
    assert_eq!(back.counters, snap.counters);
}

#[test]
fn an_update_that_would_not_be_finite_is_refused_and_phi_kept() {
    let mut cfg = config(Mode::Sync, 1);
    // A learning rate that moves φ beyond f32: the update must not happen.
    cfg.adam.lr = 1e300;
    let mut f = fixture_with(cfg);
    let (phi, adam) = (f.c.phi.clone(), f.c.adam.clone());
    let published = f.c.fetch_phi(None).phi;
    let a = f.c.submit(&f.req(0, 0), f.t0).unwrap();
    assert!(a.reply.accepted && a.update.is_none());
    assert_eq!(f.c.counters().updates_refused, 1);
    assert_eq!(f.c.version().step, 0, "no version is published");
    assert_eq!((&f.c.phi, &f.c.adam), (&phi, &adam));
    assert_eq!(f.c.fetch_phi(None).phi, published);
    assert!(
        f.c.snapshot().is_ok(),
        "what a checkpoint would hold is finite"
    );
    assert_eq!(f.c.status(f.t0).updates_refused, 1);
}

#[test]
fn only_the_session_holder_can_act_for_a_worker() {
    let mut f = fixture(Mode::Sync, 1);
    // Someone who knows the worker's id (status shows it) but not its session.
    assert_eq!(
        f.c.lease(f.worker, &OTHER, f.t0).unwrap_err().reason(),
        "bad_session"
    );
    assert_eq!(
        f.c.lease(f.worker, &[], f.t0).unwrap_err().reason(),
        "bad_session"
    );
    assert_eq!(
        f.c.heartbeat(f.worker, &S[..15], f.lease, f.t0)
            .unwrap_err()
            .reason(),
        "bad_session"
    );
    let mut r = f.req(0, 0);
    r.session = OTHER.to_vec();
    f.refused(r, "bad_session");
    assert_eq!(f.c.counters().refused["bad_session"], 4);
    // None of that touched the worker's lease: its submission is accepted.
    assert!(f.c.submit(&f.req(0, 0), f.t0).is_ok());
    // Status lists the worker but never its session.
    use prost::Message;
    let encoded = f.c.status(f.t0).encode_to_vec();
    assert!(
        !encoded.windows(S.len()).any(|w| w == S),
        "a session leaked"
    );
}

#[test]
fn workers_are_bounded_forgotten_when_silent_and_named_safely() {
    let mut cfg = config(Mode::Sync, 1);
    cfg.max_workers = 3;
    cfg.forget_workers_after_ms = 5_000;
    let mut f = fixture_with(cfg);
    let evil = "\u{1b}]0;pwned\u{7}\u{1b}[2J".to_string() + &"x".repeat(10_000);
    let b = f.c.register(&evil, "cpu", OTHER, f.t0).unwrap();
    f.c.register("c", "cpu", OTHER, f.t0).unwrap();
    let e = f.c.register("d", "cpu", OTHER, f.t0).unwrap_err();
    assert_eq!(e.reason(), "too_many_workers");
    let status = f.c.status(f.t0);
    let shown = status.workers.iter().find(|w| w.worker_id == b).unwrap();
    assert_eq!(shown.name.chars().count(), MAX_NAME_CHARS);
    assert!(shown.name.starts_with("?]0;pwned??[2J"), "{:?}", shown.name);
    assert!(!shown.name.chars().any(char::is_control));
    // The first worker keeps heartbeating; the others go silent and are forgotten.
    let later = f.t0 + Duration::from_secs(6);
    f.c.heartbeat(f.worker, &S, f.lease, f.t0 + Duration::from_millis(900))
        .unwrap();
    f.c.lease(f.worker, &S, f.t0 + Duration::from_secs(4))
        .unwrap();
    f.c.tick(later);
    assert_eq!(f.c.status(later).workers_total, 1);
    assert_eq!(
        f.c.lease(b, &OTHER, later).unwrap_err().reason(),
        "unknown_worker",
        "a forgotten worker registers again"
    );
    assert!(f.c.register("d", "cpu", OTHER, later).is_ok());
}

#[test]
fn status_stays_small_however_many_workers_register() {
    let mut cfg = config(Mode::Sync, 1);
    cfg.max_workers = 100_000;
    let mut f = fixture_with(cfg);
    let name = "n".repeat(4096);
    for i in 0..5_000u64 {
        let t = f.t0 + Duration::from_micros(i);
        f.c.register(&name, &name, OTHER, t).unwrap();
    }
    let s = f.c.status(f.t0 + Duration::from_secs(1));
    assert_eq!(s.workers_total, 5_001);
    assert_eq!(s.workers.len(), STATUS_WORKERS);
    // The most recently seen are shown.
    assert!(s.workers.iter().all(|w| w.worker_id > f.worker + 4_900));
    use prost::Message;
    assert!(s.encoded_len() < 64 << 10, "{} bytes", s.encoded_len());
}

#[test]
fn a_lease_loop_keeps_the_lease_table_bounded() {
    let mut cfg = config(Mode::Sync, 1);
    cfg.max_workers = 10;
    let mut f = fixture_with(cfg);
    for _ in 0..10_000 {
        f.c.lease(f.worker, &S, f.t0).unwrap();
    }
    assert!(f.c.leases.records() <= f.c.config.max_lease_records());
    assert_eq!(f.c.leases.live(), 1);
}

mod fuzz {
    //! Random submissions, leases and heartbeats from a mix of honest and hostile callers:
    //! never a panic, φ and Adam's state always finite, the version never goes back.

    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Grad {
        /// Raw bytes of any length.
        Bytes(Vec<u8>),
        /// φ's size, values from a pool of awkward numbers scaled by `scale`.
        Values(Vec<u8>, f32),
    }

    #[derive(Debug, Clone)]
    struct Call {
        kind: u8,
        worker: Option<u64>,
        session: Option<Vec<u8>>,
        lease: Option<u64>,
        truncation: u32,
        epoch: Option<u64>,
        step: u64,
        grad: Grad,
        meta_loss: f64,
        advance_ms: u64,
    }

    fn grad() -> impl Strategy<Value = Grad> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..2048).prop_map(Grad::Bytes),
            (
                proptest::collection::vec(any::<u8>(), 1..64),
                prop::sample::select(vec![1e-3f32, 1.0, 1e6, 1e30, f32::MAX, 1e-40])
            )
                .prop_map(|(v, s)| Grad::Values(v, s)),
        ]
    }

    fn call() -> impl Strategy<Value = Call> {
        (
            (
                0u8..4,
                proptest::option::weighted(0.2, any::<u64>()),
                proptest::option::weighted(0.2, proptest::collection::vec(any::<u8>(), 0..24)),
                proptest::option::weighted(0.2, any::<u64>()),
                0u32..8,
            ),
            (
                proptest::option::weighted(0.1, any::<u64>()),
                0u64..4,
                grad(),
                prop_oneof![
                    Just(1.0f64),
                    any::<f64>(),
                    Just(f64::MAX),
                    Just(-1e30),
                    Just(f64::NAN)
                ],
                0u64..1500,
            ),
        )
            .prop_map(
                |(
                    (kind, worker, session, lease, truncation),
                    (epoch, step, grad, meta_loss, advance_ms),
                )| Call {
                    kind,
                    worker,
                    session,
                    lease,
                    truncation,
                    epoch,
                    step,
                    grad,
                    meta_loss,
                    advance_ms,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn hostile_calls_never_panic_nor_make_phi_non_finite(
            calls in proptest::collection::vec(call(), 1..48),
            async_mode in any::<bool>(),
        ) {
            let mode = if async_mode { Mode::Async } else { Mode::Sync };
            let mut f = fixture(mode, 2);
            let n = f.n();
            let mut now = f.t0;
            let mut last = f.c.version().step;
            let pool = [0.01f32, -0.02, 1.0, -3.0, 0.0, 1e-30, 7.5, -0.5];
            for c in calls {
                now += Duration::from_millis(c.advance_ms);
                let worker = c.worker.unwrap_or(f.worker);
                let session = c.session.clone().unwrap_or(S.to_vec());
                let lease = c.lease.unwrap_or(f.lease);
                match c.kind {
                    0 => {
                        if let Ok(l) = f.c.lease(worker, &session, now) {
                            f.lease = l.lease_id;
                        }
                    }
                    1 => {
                        let _ = f.c.heartbeat(worker, &session, lease, now);
                    }
                    _ => {
                        let grad = match &c.grad {
                            Grad::Bytes(b) => b.clone(),
                            Grad::Values(v, scale) => f32_to_le_bytes(
                                &(0..n)
                                    .map(|i| pool[v[i % v.len()] as usize % pool.len()] * scale)
                                    .collect::<Vec<_>>(),
                            ),
                        };
                        let req = SubmitRequest {
                            worker_id: worker,
                            lease_id: lease,
                            truncation: c.truncation,
                            version: Some(Version {
                                epoch: c.epoch.unwrap_or(f.c.epoch),
                                step: f.c.version().step.saturating_sub(c.step % 2) + c.step / 2,
                            }),
                            grad: grad.into(),
                            meta_loss: c.meta_loss,
                            unroll_seconds: 0.0,
                            session,
                            data_fingerprint: String::new(),
                        };
                        let _ = f.c.submit(&req, now);
                    }
                }
                f.c.tick(now);
                prop_assert!(f.c.phi.iter().all(|x| x.is_finite()));
                prop_assert!(f.c.adam.m.iter().chain(&f.c.adam.v).all(|x| x.is_finite()));
                prop_assert!(f.c.version().step >= last);
                last = f.c.version().step;
                let snap = f.c.snapshot().unwrap();
                prop_assert!(snap.counters.meta_losses.iter().all(|l| l.is_finite()));
                prop_assert!(snap.counters.recent_norms.iter().all(|l| l.is_finite()));
                prop_assert!(snap.counters.gradients_applied <= snap.counters.accepted);
            }
        }
    }
}

/// Every lease carries the configured estimator, and status names it.
#[test]
fn leases_and_status_carry_the_runs_estimator() {
    let mut config = config(Mode::Sync, 1);
    config.estimator.kind = crate::config::EstimatorKind::Pes;
    config.estimator.pairs = 3;
    let mut f = fixture_with(config);
    let lease = f.c.lease(f.worker, &S, f.t0).unwrap();
    assert_eq!(
        lease.estimator().unwrap(),
        l2l_common::estimator::Estimator::Pes(l2l_common::estimator::PesConfig {
            sigma: 0.01,
            pairs: 3
        })
    );
    assert_eq!(f.c.status(f.t0).estimator, "pes (sigma 0.01, 3 pairs)");
    let f = fixture(Mode::Sync, 1);
    assert_eq!(f.c.status(f.t0).estimator, "tbptt");
}

/// One data set per run: a family with data needs a fingerprint; the first accepted one
/// is kept (and saved with the counters); another one, a malformed one or none is
/// refused `wrong_data` with φ untouched; quadratics need none.
#[test]
fn a_run_keeps_the_data_set_of_its_first_gradient() {
    let mut config = config(Mode::Async, 1);
    config.problems = vec![crate::sampler::FamilyConfig {
        family: "mlp".into(),
        ..Default::default()
    }];
    let mut f = fixture_with(config);
    let (a, b) = ("ab".repeat(32), "cd".repeat(32));
    let with = |f: &Fixture, t: u32, fp: &str| SubmitRequest {
        data_fingerprint: fp.to_string(),
        ..f.req(t, f.c.version().step)
    };
    let none = with(&f, 0, "");
    f.refused(none, "wrong_data");
    let short = with(&f, 0, "abc");
    f.refused(short, "wrong_data");
    let first = with(&f, 0, &a.to_uppercase());
    f.c.submit(&first, f.t0).unwrap();
    assert_eq!(f.c.counters().data_fingerprint.as_deref(), Some(a.as_str()));
    let other = with(&f, 1, &b);
    let err = f.c.submit(&other, f.t0).unwrap_err().to_string();
    assert!(
        err.contains(&a) && err.contains(&b) && err.contains("--data"),
        "{err}"
    );
    let same = with(&f, 1, &a);
    f.c.submit(&same, f.t0).unwrap();
    // Kept across a restart: the counters are what a checkpoint saves.
    let json = serde_json::to_string(f.c.counters()).unwrap();
    let back: Counters = serde_json::from_str(&json).unwrap();
    assert_eq!(back.data_fingerprint.as_deref(), Some(a.as_str()));
    // Quadratics use no data: no fingerprint needed.
    let mut q = fixture(Mode::Async, 1);
    let plain = q.req(0, 0);
    q.c.submit(&plain, q.t0).unwrap();
    assert_eq!(q.c.counters().data_fingerprint, None);
}

#[test]
fn leases_follow_the_curriculum_stage_of_the_current_version() {
    let mut config = config(Mode::Sync, 1);
    config.meta_loss_weight_power = 1.0;
    config.curriculum = vec![crate::config::Stage {
        from: 2,
        trajectory_steps: 40,
        truncation_steps: 10,
    }];
    let mut f = fixture_with(config);
    let first = f.c.lease(f.worker, &S, f.t0).unwrap();
    assert_eq!((first.trajectory_steps, first.truncation_steps), (100, 20));
    assert_eq!(first.step_weights.len(), 100);
    f.lease = first.lease_id;
    // Two updates: the stage begins.
    for t in 0..2 {
        let r = f.req(t, f.c.version().step);
        f.c.submit(&r, f.t0).unwrap();
    }
    assert_eq!(f.c.version().step, 2);
    let next = f.c.lease(f.worker, &S, f.t0).unwrap();
    assert_eq!((next.trajectory_steps, next.truncation_steps), (40, 10));
    assert_eq!(next.step_weights.len(), 40);
    // The new lease has 4 truncations: a fifth is outside it.
    f.lease = next.lease_id;
    let r = f.req(4, 2);
    assert_eq!(f.c.submit(&r, f.t0).unwrap_err().reason(), "bad_truncation");
    let r = f.req(3, 2);
    assert!(f.c.submit(&r, f.t0).is_ok());
}
