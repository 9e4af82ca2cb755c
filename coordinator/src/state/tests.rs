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

fn fixture(mode: Mode, quorum: usize) -> Fixture {
    let mut c = Coordinator::new(config(mode, quorum), None).unwrap();
    let t0 = Instant::now();
    let worker = c.register("w".into(), "flex".into(), t0);
    let lease = c.lease(worker, t0).unwrap().lease_id;
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
    let other = f.c.register("x".into(), "flex".into(), f.t0);
    let mut r = f.req(0, 0);
    r.worker_id = other;
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
        f.c.heartbeat(f.worker, f.lease, now).unwrap();
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
    let mut c = Coordinator::new(cfg, None).unwrap();
    let t0 = Instant::now();
    let w = c.register("w".into(), "flex".into(), t0);
    let lease = c.lease(w, t0).unwrap().lease_id;
    for k in 0..5u32 {
        let req = SubmitRequest {
            worker_id: w,
            lease_id: lease,
            truncation: k,
            version: Some(c.version()),
            grad: f32_to_le_bytes(&vec![0.1; c.phi.len()]).into(),
            meta_loss: 1.0,
            unroll_seconds: 0.0,
        };
        c.submit(&req, t0).unwrap();
    }
    assert_eq!(c.counters().trajectories_done, 1);
    assert!(c.finished());
    assert_eq!(c.lease(w, t0).unwrap_err().reason(), "finished");
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
    let mut resumed = Coordinator::new(cfg, Some(snap)).unwrap();
    assert_eq!(resumed.version(), Version { epoch: 1, step: 2 });
    // The next update from the same gradient is bit-identical in both.
    let t = f.t0;
    let w = resumed.register("w".into(), "flex".into(), t);
    let l = resumed.lease(w, t).unwrap().lease_id;
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
    let start = Phi::init(
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
    let c = Coordinator::new(cfg.clone(), None).unwrap();
    assert_eq!(
        c.phi().unwrap(),
        start,
        "φ and its configuration come from the file"
    );
    cfg.init.phi = Some(dir.path().join("missing"));
    let Err(e) = Coordinator::new(cfg, None) else {
        panic!("a missing init.phi must be refused")
    };
    let e = format!("{e:#}");
    assert!(e.contains("init.phi") && e.contains("missing"), "{e}");
}
