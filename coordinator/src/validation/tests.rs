//! The validation jobs and their records, with hand-made curves; and through a
//! coordinator: jobs at every K updates, the best φ kept across restarts.

use std::time::{Duration, Instant};

use l2l_common::OptimizerConfig;
use l2l_common::wire::f32_to_le_bytes;
use l2l_proto::v1::SubmitRequest;

use super::*;
use crate::config::{Config, Mode};
use crate::state::{Coordinator, SESSION_BYTES, Start};

fn config(every: u64) -> ValidationConfig {
    ValidationConfig {
        every,
        instances: 3,
        steps: 10,
        ..ValidationConfig::default()
    }
}

fn validator(select: Select) -> Validator {
    let c = ValidationConfig {
        select,
        ..config(5)
    };
    Validator::new(&c, &"quadratic".parse().unwrap(), 100, 0, None)
        .unwrap()
        .unwrap()
}

fn phi() -> AnyPhi {
    let c = OptimizerConfig {
        hidden: 4,
        ..OptimizerConfig::default()
    };
    AnyPhi::init(c, &[], 1).unwrap()
}

fn version(step: u64) -> Version {
    Version { epoch: 0, step }
}

/// A result of `worker` for `job` with learned curve `l` and baseline curve `b`.
fn result(worker: u64, job: u64, l: Vec<f64>, b: Vec<f64>) -> SubmitValidationRequest {
    SubmitValidationRequest {
        worker_id: worker,
        job_id: job,
        learned: l,
        baseline: b,
        baseline_lr: 0.1,
        ..Default::default()
    }
}

/// Curves of 11 values (S = 10): `v0` at step 0, then `v` at every step but `last` at 10.
fn curve(v: f64, last: f64) -> Vec<f64> {
    let mut c = vec![v; 11];
    c[0] = 9.0;
    c[10] = last;
    c
}

#[test]
fn the_ratios_are_those_of_the_means_and_of_the_last_step() {
    let mut v = validator(Select::Mean);
    let now = Instant::now();
    v.queue(version(5), phi(), Bytes::new());
    let job = v.take(1, now);
    assert_eq!(job.steps, 10);
    assert_eq!(job.instances.len(), 3);
    assert_eq!(
        job.tune_instances.len(),
        4,
        "the rate is left to the evaluator"
    );
    assert_eq!(job.baseline, "adam");
    // Learned: 1.0 at steps 1..9, 0.5 at 10 → mean 0.95; baseline: 2.0, 0.25 → 1.825.
    let mut l = curve(1.0, 0.5);
    l[2] = 0.6; // steps 1..10: 8 × 1.0 + 0.6 + 0.5 = 9.1 → mean 0.91; S/5 = 2, S/2 = 5.
    let (rec, best) = v
        .complete(&result(1, job.job_id, l, curve(2.0, 0.25)), "run-a")
        .unwrap();
    assert!((rec.learned_mean - 0.91).abs() < 1e-12);
    assert!((rec.baseline_mean - 1.825).abs() < 1e-12);
    assert!((rec.ratio_mean - 0.91 / 1.825).abs() < 1e-12);
    assert!((rec.ratio_fifth - 0.3).abs() < 1e-12, "step 2: 0.6 / 2.0");
    assert!((rec.ratio_half - 0.5).abs() < 1e-12, "step 5: 1.0 / 2.0");
    assert!((rec.ratio_final - 2.0).abs() < 1e-12, "step 10: 0.5 / 0.25");
    assert_eq!(rec.score, rec.ratio_mean);
    assert!(rec.best);
    let best = best.expect("the first finite score is the best");
    assert_eq!(best.metadata["run"], "run-a");
    assert_eq!(best.metadata["version"], "0.5");
    assert_eq!(
        best.metadata["validation_score"].parse::<f64>().unwrap(),
        rec.score
    );
    // The CSV row has a value per header column.
    assert_eq!(
        rec.csv_row(7).split(',').count(),
        CSV_HEADER.split(',').count()
    );

    // Selecting by the last step: the same curves score 2.0.
    let mut v = validator(Select::Final);
    v.queue(version(5), phi(), Bytes::new());
    let id = v.take(1, now).job_id;
    let (rec, _) = v
        .complete(&result(1, id, curve(1.0, 0.5), curve(2.0, 0.25)), "r")
        .unwrap();
    assert_eq!(rec.score, 2.0);
}

#[test]
fn only_a_better_finite_score_becomes_the_best() {
    let mut v = validator(Select::Mean);
    let now = Instant::now();
    let run = |v: &mut Validator, step: u64, l: f64| {
        v.queue(version(step), phi(), Bytes::new());
        let id = v.take(1, now).job_id;
        let out = v
            .complete(&result(1, id, curve(l, l), curve(1.0, 1.0)), "r")
            .unwrap();
        if let Some(b) = &out.1 {
            v.confirm_best(b.version, b.score);
        }
        out
    };
    assert!(run(&mut v, 5, 0.8).1.is_some());
    assert!(run(&mut v, 10, 0.9).1.is_none(), "worse");
    assert!(run(&mut v, 15, 0.8).1.is_none(), "a tie keeps the older φ");
    let (rec, best) = run(&mut v, 20, f64::INFINITY);
    assert!(best.is_none() && !rec.best, "a diverged curve never wins");
    assert!(run(&mut v, 25, 0.5).1.is_some());
    assert_eq!(v.best(), Some((version(25), 0.5)));
    let s = v.status();
    assert_eq!((s.done, s.best_score), (5, 0.5));
    assert_eq!(s.last_version, Some(version(25)));
}

#[test]
fn results_that_are_not_the_jobs_curves_are_refused_and_the_job_kept() {
    let mut v = validator(Select::Mean);
    let now = Instant::now();
    v.queue(version(5), phi(), Bytes::new());
    let id = v.take(1, now).job_id;
    let ok = || result(1, id, curve(1.0, 1.0), curve(1.0, 1.0));
    let refused = |v: &mut Validator, r: SubmitValidationRequest, want: &str| {
        let e = v.complete(&r, "r").unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
        e
    };
    let mut short = ok();
    short.learned.pop();
    let e = refused(&mut v, short, "learned curve has 10 values");
    assert_eq!(e.reason(), "shape");
    let mut nan = ok();
    nan.baseline[3] = f64::NAN;
    refused(&mut v, nan, "baseline curve's value at step 3 is NaN");
    let mut neg = ok();
    neg.learned[4] = f64::NEG_INFINITY;
    refused(&mut v, neg, "step 4");
    let mut lr = ok();
    lr.baseline_lr = 0.0;
    refused(&mut v, lr, "learning rate");
    let mut foreign = ok();
    foreign.worker_id = 2;
    assert_eq!(
        refused(&mut v, foreign, "another evaluator").reason(),
        "foreign_lease"
    );
    let mut unknown = ok();
    unknown.job_id = id + 1;
    assert_eq!(
        refused(&mut v, unknown, "held by no evaluator").reason(),
        "unknown_lease"
    );
    // None of those used up the job; the good result lands once.
    v.complete(&ok(), "r").unwrap();
    refused(&mut v, ok(), "held by no evaluator");
}

#[test]
fn jobs_wait_in_a_bounded_queue_and_expire_with_their_evaluator() {
    let mut v = validator(Select::Mean);
    let now = Instant::now();
    assert_eq!(v.take(1, now).job_id, 0, "nothing waiting");
    assert!(v.is_due(5) && v.is_due(10) && !v.is_due(7) && !v.is_due(0));
    for step in [5, 10, 15] {
        v.queue(version(step), phi(), Bytes::new());
    }
    assert_eq!(v.status().waiting, MAX_WAITING as u64);
    assert_eq!(v.status().dropped, 1, "the oldest was pushed out");
    let a = v.take(1, now);
    assert_eq!(a.version, Some(version(10)), "oldest of those left first");
    // Asking again drops the job this evaluator held.
    let b = v.take(1, now);
    assert_eq!(b.version, Some(version(15)));
    assert_eq!(v.status().dropped, 2);
    let late = result(1, a.job_id, curve(1.0, 1.0), curve(1.0, 1.0));
    assert!(v.complete(&late, "r").is_err());
    // The job's evaluator goes silent: past its timeout the job is dropped.
    assert!(!v.idle());
    v.expire(now + Duration::from_millis(config(5).timeout_ms + 1));
    assert!(v.idle());
    assert_eq!(v.status().dropped, 3);
}

#[test]
fn bad_configurations_are_refused_by_field() {
    let bad = [
        (
            ValidationConfig {
                instances: 0,
                ..config(1)
            },
            "validation.instances",
        ),
        (
            ValidationConfig {
                instances: MAX_INSTANCES + 1,
                ..config(1)
            },
            "validation.instances",
        ),
        (
            ValidationConfig {
                tune_instances: 0,
                ..config(1)
            },
            "tune_instances",
        ),
        (
            ValidationConfig {
                steps: MAX_STEPS + 1,
                ..config(1)
            },
            "validation.steps",
        ),
        (
            ValidationConfig {
                baseline: "lion".into(),
                ..config(1)
            },
            "validation.baseline",
        ),
        (
            ValidationConfig {
                learning_rate: -1.0,
                ..config(1)
            },
            "learning_rate",
        ),
        (
            ValidationConfig {
                learning_rate: f64::NAN,
                ..config(1)
            },
            "learning_rate",
        ),
        (
            ValidationConfig {
                timeout_ms: 0,
                ..config(1)
            },
            "timeout_ms",
        ),
        (
            ValidationConfig {
                timeout_ms: MAX_TIMEOUT_MS + 1,
                ..config(1)
            },
            "timeout_ms",
        ),
        (
            ValidationConfig {
                problem: Some("mlp:act=tanh".into()),
                ..config(1)
            },
            "validation.problem",
        ),
    ];
    for (c, want) in bad {
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    // Off, nothing is checked; a given rate means nothing to tune on.
    assert!(
        ValidationConfig {
            instances: 0,
            ..config(0)
        }
        .validate()
        .is_ok()
    );
    let v = Validator::new(
        &ValidationConfig {
            learning_rate: 0.01,
            ..config(1)
        },
        &"quadratic".parse().unwrap(),
        100,
        0,
        None,
    )
    .unwrap()
    .unwrap();
    assert!(v.tune.is_empty());
    assert!(
        Validator::new(&config(0), &"quadratic".parse().unwrap(), 100, 0, None)
            .unwrap()
            .is_none()
    );
}

#[test]
fn held_out_seeds_are_fixed_by_the_config_and_differ_from_the_tuning_seeds() {
    let spec = "quadratic:batch=4".parse().unwrap();
    let a = Validator::new(&config(1), &spec, 100, 0, None)
        .unwrap()
        .unwrap();
    let b = Validator::new(&config(1), &spec, 100, 3, None)
        .unwrap()
        .unwrap();
    assert_eq!(
        a.instances, b.instances,
        "the same instances in every epoch"
    );
    assert!(a.instances.iter().all(|i| i.params["batch"] == "4"));
    let c = Validator::new(
        &ValidationConfig {
            seed: 1,
            ..config(1)
        },
        &spec,
        100,
        0,
        None,
    )
    .unwrap()
    .unwrap();
    assert_ne!(a.instances, c.instances);
    for i in &a.instances {
        assert!(a.tune.iter().all(|t| t.seed != i.seed));
    }
    assert_eq!(a.steps, 10);
    let d = Validator::new(
        &ValidationConfig {
            steps: 0,
            ..config(1)
        },
        &spec,
        60,
        0,
        None,
    )
    .unwrap()
    .unwrap();
    assert_eq!(d.steps, 60, "the run's trajectory length by default");
}

const S: [u8; SESSION_BYTES] = [7; SESSION_BYTES];

/// A coordinator of quadratics validating every 2 updates, each gradient an update.
fn coordinator(dir: &Path, start: Start) -> Coordinator {
    let mut c = Config {
        dir: dir.to_path_buf(),
        lease_timeout_ms: 10_000,
        ..Config::default()
    };
    c.init.hidden = 4;
    c.aggregation.mode = Mode::Sync;
    c.aggregation.quorum = 1;
    c.validation = config(2);
    Coordinator::new(c, start).unwrap()
}

/// Submits `n` gradients of `worker`'s lease: `n` updates.
fn train(c: &mut Coordinator, worker: u64, n: u32, now: Instant) {
    let lease = c.lease(worker, &S, now).unwrap().lease_id;
    let len = c.phi().unwrap().num_params();
    for t in 0..n {
        let req = SubmitRequest {
            worker_id: worker,
            lease_id: lease,
            truncation: t,
            version: Some(c.version()),
            grad: f32_to_le_bytes(&vec![0.01; len]).into(),
            meta_loss: 1.0,
            session: S.to_vec(),
            ..Default::default()
        };
        c.submit(&req, now).unwrap();
    }
}

#[test]
fn a_run_queues_its_phi_every_k_updates_and_keeps_the_best_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let now = Instant::now();
    let mut c = coordinator(dir.path(), Start::fresh());
    let trainer = c.register("t", "cpu", S, now).unwrap();
    let eval = c
        .register_as("e", "cpu", l2l_proto::role::Role::Evaluator, S, now)
        .unwrap();
    // The starting φ is validated first.
    let start = c.validate(eval, &S, now).unwrap();
    assert_eq!(start.version, Some(version(0)));
    assert_eq!(
        c.validate(eval, &S, now).unwrap().job_id,
        0,
        "nothing else yet"
    );
    // A stranger cannot take jobs.
    assert_eq!(
        c.validate(eval, &[0; SESSION_BYTES], now)
            .unwrap_err()
            .reason(),
        "bad_session"
    );
    train(&mut c, trainer, 3, now);
    let job = c.validate(eval, &S, now).unwrap();
    assert_eq!(job.version, Some(version(2)));
    // The job's φ is the φ of version 2, not the current one.
    assert_ne!(job.phi, c.fetch_phi(None).phi);
    let served = l2l_common::files::TensorFile::parse(Path::new("job"), &job.phi).unwrap();
    assert_eq!(served.metadata()["version"], "0.2");
    let good = result(eval, job.job_id, curve(1.0, 1.0), curve(2.0, 2.0));
    let good = SubmitValidationRequest {
        session: S.to_vec(),
        ..good
    };
    let (mut rec, best) = c.submit_validation(&good, now).unwrap();
    assert!(rec.best);
    assert!(
        c.status(now).validation.unwrap().best_version.is_none(),
        "not the best before its file is written"
    );
    assert!(write(dir.path(), &mut rec, best.as_ref()).unwrap());
    let b = best.unwrap();
    c.validation_best_written(b.version, b.score);
    let status = c.status(now).validation.unwrap();
    assert_eq!(
        (status.best_version, status.best_score),
        (Some(version(2)), 0.5)
    );
    // The best file is φ of version 2, readable as any l2l-lstm/1 file.
    let kept = AnyPhi::load(&dir.path().join(BEST_FILE)).unwrap();
    let at2 = l2l_common::files::TensorFile::parse(Path::new("job"), &job.phi).unwrap();
    let at2 = AnyPhi::take_from(&mut { at2 }, kept.config()).unwrap();
    assert_eq!(kept, at2);
    let csv = std::fs::read_to_string(dir.path().join(VALIDATION_FILE)).unwrap();
    assert!(
        csv.starts_with(CSV_HEADER) && csv.lines().count() == 2,
        "{csv}"
    );

    // A restart of the same run reads the best back; a worse φ does not replace it.
    let run = c.run().to_string();
    drop(c);
    let start = Start {
        run: run.clone(),
        epoch: 1,
        resume: None,
    };
    let mut c = coordinator(dir.path(), start);
    let s = c.status(now).validation.unwrap();
    assert_eq!((s.best_score, s.done), (0.5, 0));
    let (trainer, eval) = (
        c.register("t", "cpu", S, now).unwrap(),
        c.register("e", "cpu", S, now).unwrap(),
    );
    train(&mut c, trainer, 2, now);
    let job = c.validate(eval, &S, now).unwrap();
    assert_eq!(job.version.unwrap().epoch, 1);
    let worse = SubmitValidationRequest {
        worker_id: eval,
        job_id: job.job_id,
        session: S.to_vec(),
        ..result(eval, job.job_id, curve(1.5, 1.5), curve(2.0, 2.0))
    };
    let (rec, best) = c.submit_validation(&worse, now).unwrap();
    assert!(!rec.best && best.is_none());
    let on_disk = read_best(dir.path(), &run).unwrap().unwrap();
    assert_eq!(
        (on_disk.version, on_disk.score),
        (Version { epoch: 0, step: 2 }, 0.5)
    );
    // A best measured otherwise (here: on more instances) is not compared with.
    let quadratic = "quadratic".parse().unwrap();
    let other = ValidationConfig {
        instances: 5,
        ..config(2)
    };
    let v = Validator::new(&other, &quadratic, 100, 1, Some(on_disk.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(v.best(), None);
    let same = Validator::new(&config(2), &quadratic, 100, 1, Some(on_disk))
        .unwrap()
        .unwrap();
    assert_eq!(same.best(), Some((Version { epoch: 0, step: 2 }, 0.5)));
    // Another run's best file means nothing to this one; an unreadable one stops the start.
    assert_eq!(read_best(dir.path(), "another-run").unwrap(), None);
    std::fs::write(dir.path().join(BEST_FILE), b"not a safetensors file").unwrap();
    let e = read_best(dir.path(), &run).unwrap_err().to_string();
    assert!(e.contains("move") && e.contains(BEST_FILE), "{e}");
}

#[test]
fn a_validation_on_other_data_than_the_runs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let now = Instant::now();
    // A run that has kept a data set (as its first data gradient would), validating on
    // mnist networks.
    let mut c = coordinator(dir.path(), Start::fresh());
    let mut snap = c.snapshot().unwrap();
    snap.counters.data_fingerprint = Some("ab".repeat(32));
    let mut config = c.config().clone();
    config.validation.problem = Some("mlp".into());
    let start = Start {
        run: c.run().to_string(),
        epoch: 1,
        resume: Some(snap),
    };
    c = Coordinator::new(config, start).unwrap();
    let (t, e) = (
        c.register("t", "cpu", S, now).unwrap(),
        c.register("e", "cpu", S, now).unwrap(),
    );
    train(&mut c, t, 2, now);
    let job = c.validate(e, &S, now).unwrap();
    assert_eq!(job.instances[0].family, "mlp");
    let mut r = SubmitValidationRequest {
        session: S.to_vec(),
        data_fingerprint: "cd".repeat(32),
        ..result(e, job.job_id, curve(1.0, 1.0), curve(2.0, 2.0))
    };
    let err = c.submit_validation(&r, now).unwrap_err();
    assert_eq!(err.reason(), "wrong_data");
    assert!(err.to_string().contains(&"ab".repeat(32)), "{err}");
    // The job goes back to the queue for another evaluator.
    let e2 = c.register("e2", "cpu", S, now).unwrap();
    let again = c.validate(e2, &S, now).unwrap();
    assert_eq!(again.version, job.version);
    r.worker_id = e2;
    r.job_id = again.job_id;
    r.data_fingerprint = "AB".repeat(32);
    assert!(
        c.submit_validation(&r, now).is_ok(),
        "the same set, in capitals"
    );
}

#[test]
fn an_evaluator_computing_a_long_job_is_not_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let mut c = coordinator(dir.path(), Start::fresh());
    let (t, e) = (
        c.register("t", "cpu", S, t0).unwrap(),
        c.register("e", "cpu", S, t0).unwrap(),
    );
    let job = c.validate(e, &S, t0).unwrap();
    assert_eq!(job.version, Some(version(0)));
    // Past forget_workers_after_ms (10 lease timeouts: 100 s) and within the job's 600 s.
    let later = t0 + Duration::from_secs(200);
    c.tick(later);
    assert_eq!(
        c.lease(t, &S, later).unwrap_err().reason(),
        "unknown_worker",
        "the silent trainer is forgotten"
    );
    let r = SubmitValidationRequest {
        session: S.to_vec(),
        ..result(e, job.job_id, curve(1.0, 1.0), curve(2.0, 2.0))
    };
    assert!(
        c.submit_validation(&r, later).is_ok(),
        "the evaluator is not"
    );
}

#[test]
fn a_row_cut_short_by_a_crash_does_not_swallow_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(VALIDATION_FILE);
    std::fs::write(&path, format!("{CSV_HEADER}\n5,0,17,10,0.9")).unwrap();
    let mut v = validator(Select::Mean);
    v.queue(version(10), phi(), Bytes::new());
    let id = v.take(1, Instant::now()).job_id;
    let (mut rec, _) = v
        .complete(&result(1, id, curve(1.0, 1.0), curve(2.0, 2.0)), "r")
        .unwrap();
    write(dir.path(), &mut rec, None).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[1], "5,0,17,10,0.9", "the cut row stays as it was");
    assert!(lines[2].starts_with("10,0,"), "{text}");
}
