//! The cluster as users run it: real coordinator and worker processes on loopback.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use l2l_common::Phi;
use l2l_common::wire::f32_to_le_bytes;
use l2l_coordinator::checkpoint;
use l2l_proto::v1::coordinator_client::CoordinatorClient;
use l2l_proto::v1::{LeaseRequest, RegisterRequest, SubmitRequest, Version};
use l2l_tests::{
    Coordinator, Proc, binary, coordinator, refused, start_worker, status, text, version,
};

const MINUTE: Duration = Duration::from_secs(60);

fn s(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

#[test]
fn local_run_trains_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let d = dir.path().join(name);
        let out = coordinator(&[
            "local",
            "--workers",
            "1",
            "--max-updates",
            "60",
            "--seed",
            "7",
            "--eval-problems",
            "2",
            "--dir",
            s(&d),
        ]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stdout.contains("learned optimizer φ written to"),
            "{stdout}"
        );
        assert!(
            stdout.contains("   100 "),
            "the table reports step 100: {stdout}"
        );
        d
    };
    let (a, b) = (run("a"), run("b"));
    let phi = Phi::load(&a.join("phi.safetensors")).expect("the final φ loads per the spec");
    assert_eq!(phi.config.num_params(), 5141);
    // sync mode, one worker, a fixed seed: the same φ bit for bit (the files differ
    // only in the run identity their metadata names).
    let bits = |p: &std::path::Path| -> Vec<u32> {
        Phi::load(&p.join("phi.safetensors"))
            .unwrap()
            .flatten()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    assert!(
        bits(&a) == bits(&b),
        "two identical local runs wrote different φ"
    );
    let (_, snap) = checkpoint::load_newest(&a).unwrap().expect("a checkpoint");
    assert_eq!(snap.version, 60, "φ's version advanced to max_updates");
    let losses = &snap.counters.meta_losses;
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&losses[..15]), mean(&losses[losses.len() - 15..]));
    assert!(
        last < 0.8 * first,
        "meta-loss did not fall: first 15 updates {first}, last 15 {last}"
    );
}

/// The PES estimator, chosen by the coordinator and carried on the leases: a run trains
/// with it (φ moves, every update's meta-loss is finite) and is reproducible, since its
/// perturbations are drawn from what the coordinator chose (instance seed and lease id).
#[test]
fn local_run_with_pes_trains_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let d = dir.path().join(name);
        let out = coordinator(&[
            "local",
            "--workers",
            "1",
            "--max-updates",
            "30",
            "--seed",
            "7",
            "--eval-problems",
            "1",
            "--estimator",
            "pes",
            "--dir",
            s(&d),
        ]);
        let (_, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains("[estimator]\nkind = \"pes\""),
            "the printed configuration names the estimator: {stderr}"
        );
        let phi = Phi::load(&d.join("phi.safetensors")).unwrap().flatten();
        let (_, snap) = checkpoint::load_newest(&d).unwrap().expect("a checkpoint");
        assert_eq!(snap.version, 30);
        assert!(snap.counters.meta_losses.iter().all(|l| l.is_finite()));
        phi
    };
    let (a, b) = (run("a"), run("b"));
    let init = Phi::init(l2l_common::OptimizerConfig::default(), 7)
        .unwrap()
        .flatten();
    let moved = a.iter().zip(&init).filter(|(x, y)| x != y).count();
    assert!(
        moved > a.len() / 2,
        "PES moved only {moved} of φ's {} values",
        a.len()
    );
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(
        bits(&a) == bits(&b),
        "two identical PES runs wrote different φ"
    );
}

/// An async worker sends each truncation's submission while the next one computes, on a
/// φ at most one submission older (so a coordinator that accepts staleness 1 refuses
/// none of them), and submits before going on when the coordinator accepts no staleness.
#[test]
fn async_workers_pipeline_submissions_when_staleness_allows() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, staleness: &str, worker_args: &[&str]| {
        let d = dir.path().join(name);
        let c = Coordinator::serve(
            &d,
            "127.0.0.1:0",
            &[
                "--aggregation",
                "async",
                "--every",
                "1",
                "--max-staleness",
                staleness,
                "--max-updates",
                "40",
                "--trajectory-steps",
                "100",
                "--truncation-steps",
                "20",
            ],
        );
        let url = c.url();
        let mut args = vec![
            "run",
            "--coordinator",
            url.as_str(),
            "--max-backoff-ms",
            "500",
        ];
        args.extend_from_slice(worker_args);
        let out = l2l_tests::worker(&args);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        let count = |what: &str| -> u64 {
            let words: Vec<&str> = stdout.split_whitespace().collect();
            let i = words
                .iter()
                .position(|w| w.trim_end_matches(',') == what)
                .unwrap_or_else(|| panic!("no '{what}' in the summary: {stdout}"));
            words[i - 1].parse().expect("a count")
        };
        let (accepted, overlapped, checks) = (
            count("gradients"),
            count("submissions"),
            count("truncations"),
        );
        let mut c = c;
        assert!(c.proc.wait_exit(MINUTE).success());
        let (_, snap) = checkpoint::load_newest(&d).unwrap().expect("a checkpoint");
        assert_eq!(snap.version, 40, "the run completed");
        let refusals: Vec<_> = snap
            .counters
            .refused
            .iter()
            .filter(|(r, n)| *r != "finished" && **n > 0)
            .collect();
        assert!(
            refusals.is_empty(),
            "one pipelining worker's gradients are at most 1 version stale: {refusals:?}"
        );
        (accepted, overlapped, checks)
    };
    let (accepted, overlapped, checks) = run("pipelined", "1", &[]);
    // 5 truncations per trajectory: all but the last travel while the next computes, and
    // only the first two ask for φ first (the second's because the first's submission is
    // still on its way); the others run on the φ a submission brought back.
    let trajectories = accepted / 5;
    assert!(
        overlapped >= 4 * trajectories && overlapped < accepted,
        "{overlapped} of {accepted} submissions overlapped"
    );
    assert!(
        checks <= 2 * (trajectories + 1),
        "{checks} of {accepted} truncations waited for a φ check"
    );
    let (accepted, overlapped, checks) = run("no-staleness", "0", &[]);
    assert_eq!(overlapped, 0, "staleness 0: no overlap");
    assert!(checks >= accepted, "staleness 0: every truncation checks φ");
    let (accepted, overlapped, checks) = run("off", "1", &["--no-pipeline"]);
    assert_eq!(overlapped, 0, "--no-pipeline");
    assert!(
        checks >= accepted,
        "--no-pipeline: every truncation checks φ"
    );
}

#[test]
fn killed_worker_lease_expires_and_run_completes() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::serve(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--max-updates",
            "25",
            "--quorum",
            "2",
            "--round-timeout-ms",
            "300",
            // Long enough that a busy machine never starves the survivor's heartbeats
            // (every lease/3 from a one-thread runtime) into an expiry of its own.
            "--lease-timeout-ms",
            "5000",
        ],
    );
    let doomed = start_worker(&c.url(), "doomed", &dir.path().join("w1.log"));
    let mut survivor = start_worker(&c.url(), "survivor", &dir.path().join("w2.log"));
    c.wait_for(MINUTE, "three updates", |s| version(s) >= 3);
    doomed.signal("KILL");
    let status = c.proc.wait_exit(2 * MINUTE);
    assert!(status.success(), "coordinator exit {status}");
    // The coordinator told the survivor the run was over before it left.
    let status = survivor.wait_exit(MINUTE);
    assert!(status.success(), "worker exit {status}");
    let (_, snap) = checkpoint::load_newest(dir.path())
        .unwrap()
        .expect("a checkpoint");
    assert_eq!(
        snap.version, 25,
        "the run completed with the surviving worker"
    );
    assert!(
        snap.counters.leases_expired >= 1,
        "the killed worker's lease expired: {:?}",
        snap.counters
    );
    // Under load a round may close by its deadline before a slow gradient arrives, which
    // is then refused as stale; any other refusal would mean something half-sent arrived.
    let other: u64 = snap
        .counters
        .refused
        .iter()
        .filter(|(r, _)| *r != "stale")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(other, 0, "unexpected refusals: {:?}", snap.counters.refused);
}

#[test]
fn coordinator_restart_resumes_and_workers_rejoin() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--quorum",
        "2",
        "--checkpoint-every-updates",
        "5",
        "--lease-timeout-ms",
        "2000",
    ];
    let c = Coordinator::serve(dir.path(), "127.0.0.1:0", &args);
    let addr = c.addr;
    let _w1 = start_worker(&c.url(), "w1", &dir.path().join("w1.log"));
    let _w2 = start_worker(&c.url(), "w2", &dir.path().join("w2.log"));
    c.wait_for(MINUTE, "twelve updates", |s| version(s) >= 12);
    c.proc.signal("KILL");
    drop(c);
    let (_, snap) = checkpoint::load_newest(dir.path())
        .unwrap()
        .expect("a checkpoint");
    assert!(snap.version >= 10, "checkpointed at {}", snap.version);
    // Same address, so the running workers find it again.
    let c = Coordinator::serve(dir.path(), &addr.to_string(), &args);
    let s = c.status();
    assert_eq!(s["epoch"], 1, "a restart starts a new epoch");
    assert!(version(&s) >= snap.version, "resumed at the checkpoint");
    let resumed_at = version(&s);
    let s = c.wait_for(MINUTE, "both workers back and training", |s| {
        version(s) >= resumed_at + 5 && s["live_workers"].as_u64() == Some(2)
    });
    assert!(
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["accepted"].as_u64() > Some(0)),
        "{s}"
    );
    // A gradient computed before the restart (epoch 0) is refused.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt.block_on(async {
        let mut client = CoordinatorClient::connect(c.url()).await.unwrap();
        let reg = client
            .register(RegisterRequest {
                name: "old".into(),
                backend: "none".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let (id, session) = (reg.worker_id, reg.session);
        let lease = client
            .lease(LeaseRequest {
                worker_id: id,
                session: session.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .lease_id;
        client
            .submit(SubmitRequest {
                worker_id: id,
                lease_id: lease,
                truncation: 0,
                version: Some(Version {
                    epoch: 0,
                    step: snap.version,
                }),
                grad: f32_to_le_bytes(&[0.0; 5141]).into(),
                meta_loss: 1.0,
                unroll_seconds: 0.0,
                session,
                data_fingerprint: String::new(),
            })
            .await
            .unwrap_err()
    });
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
    assert_eq!(err.metadata().get("l2l-refusal").unwrap(), "pre_restart");
    assert!(refused(&c.status(), "pre_restart") >= 1);
}

#[test]
fn sync_rounds_close_by_deadline_with_a_frozen_worker() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::serve(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--quorum",
            "2",
            "--round-timeout-ms",
            "300",
            "--lease-timeout-ms",
            "60000",
        ],
    );
    let frozen = start_worker(&c.url(), "frozen", &dir.path().join("w1.log"));
    let mut alive = start_worker(&c.url(), "alive", &dir.path().join("w2.log"));
    c.wait_for(MINUTE, "two updates", |s| version(s) >= 2);
    frozen.signal("STOP");
    let v = version(&c.status());
    // Each round now has one gradient and closes 300 ms after it by its deadline.
    c.wait_for(MINUTE, "five more updates with one worker frozen", |s| {
        version(s) >= v + 5
    });
    frozen.signal("CONT");
    // SIGTERM: the worker stops cleanly (exit 0) between truncations.
    alive.signal("TERM");
    let status = alive.wait_exit(MINUTE);
    assert!(status.success(), "worker exit after SIGTERM: {status}");
}

#[test]
fn bad_submissions_over_the_wire_are_refused_and_phi_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::serve(dir.path(), "127.0.0.1:0", &["--quorum", "1"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = CoordinatorClient::connect(c.url()).await.unwrap();
        let reg = |name: &str| RegisterRequest {
            name: name.into(),
            backend: "none".into(),
            ..Default::default()
        };
        let me = client.register(reg("me")).await.unwrap().into_inner();
        let other = client.register(reg("other")).await.unwrap().into_inner();
        assert!(me.session.len() >= 16, "at least 128 bits of session");
        assert_ne!(me.session, other.session);
        let (me, my_session) = (me.worker_id, me.session);
        let (other, other_session) = (other.worker_id, other.session);
        // Knowing my id is not enough to lease for me.
        let err = client
            .lease(LeaseRequest {
                worker_id: me,
                session: other_session.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(err.metadata().get("l2l-refusal").unwrap(), "bad_session");
        let lease = client
            .lease(LeaseRequest {
                worker_id: me,
                session: my_session.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .lease_id;
        let good = SubmitRequest {
            worker_id: me,
            lease_id: lease,
            truncation: 0,
            version: Some(Version { epoch: 0, step: 0 }),
            grad: f32_to_le_bytes(&[1e-3; 5141]).into(),
            meta_loss: 1.0,
            unroll_seconds: 0.0,
            session: my_session.clone(),
            data_fingerprint: String::new(),
        };
        let cases: Vec<(SubmitRequest, tonic::Code, &str)> = vec![
            (
                SubmitRequest {
                    grad: f32_to_le_bytes(&[0.0; 5140]).into(),
                    ..good.clone()
                },
                tonic::Code::InvalidArgument,
                "shape",
            ),
            (
                SubmitRequest {
                    grad: {
                        let mut g = vec![1e-3f32; 5141];
                        g[9] = f32::NAN;
                        f32_to_le_bytes(&g).into()
                    },
                    ..good.clone()
                },
                tonic::Code::InvalidArgument,
                "non_finite",
            ),
            (
                SubmitRequest {
                    grad: {
                        let mut g = vec![1e-3f32; 5141];
                        g[0] = f32::INFINITY;
                        f32_to_le_bytes(&g).into()
                    },
                    ..good.clone()
                },
                tonic::Code::InvalidArgument,
                "non_finite",
            ),
            (
                SubmitRequest {
                    lease_id: 424242,
                    ..good.clone()
                },
                tonic::Code::NotFound,
                "unknown_lease",
            ),
            (
                SubmitRequest {
                    worker_id: other,
                    session: other_session.clone(),
                    ..good.clone()
                },
                tonic::Code::PermissionDenied,
                "foreign_lease",
            ),
            (
                SubmitRequest {
                    session: other_session.clone(),
                    ..good.clone()
                },
                tonic::Code::PermissionDenied,
                "bad_session",
            ),
            (
                SubmitRequest {
                    grad: f32_to_le_bytes(&[1e30; 5141]).into(),
                    ..good.clone()
                },
                tonic::Code::InvalidArgument,
                "too_large",
            ),
            (
                SubmitRequest {
                    meta_loss: f64::MAX,
                    ..good.clone()
                },
                tonic::Code::InvalidArgument,
                "too_large",
            ),
            (
                SubmitRequest {
                    version: Some(Version { epoch: 0, step: 3 }),
                    ..good.clone()
                },
                tonic::Code::OutOfRange,
                "future_version",
            ),
            (
                SubmitRequest {
                    worker_id: 987_654_321,
                    ..good.clone()
                },
                tonic::Code::NotFound,
                "unknown_worker",
            ),
            (
                // S = 100, T = 20: truncations 0..=4.
                SubmitRequest {
                    truncation: 5,
                    ..good.clone()
                },
                tonic::Code::InvalidArgument,
                "bad_truncation",
            ),
        ];
        for (req, code, reason) in cases {
            let err = client.submit(req).await.unwrap_err();
            assert_eq!(
                (
                    err.code(),
                    err.metadata().get("l2l-refusal").unwrap().to_str().unwrap()
                ),
                (code, reason),
                "{err:?}"
            );
        }
        let s = c.status();
        assert_eq!(version(&s), 0, "no refusal touched φ");
        assert_eq!(refused(&s, "non_finite"), 2);
        // The good one is applied once; its retry is acknowledged as a duplicate.
        let first = client.submit(good.clone()).await.unwrap().into_inner();
        assert!(first.accepted && !first.duplicate);
        let again = client.submit(good.clone()).await.unwrap().into_inner();
        assert!(again.accepted && again.duplicate);
        assert_eq!(version(&c.status()), 1);
        // Now version 0 is stale (sync mode accepts only the current version).
        let stale = SubmitRequest {
            truncation: 1,
            ..good.clone()
        };
        let err = client.submit(stale).await.unwrap_err();
        assert_eq!(err.metadata().get("l2l-refusal").unwrap(), "stale");
    });
}

#[test]
fn expired_leases_oversized_messages_and_finished_runs_have_their_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::serve(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--quorum",
            "1",
            "--max-updates",
            "1",
            "--lease-timeout-ms",
            "300",
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = CoordinatorClient::connect(c.url()).await.unwrap();
        let reg = client
            .register(RegisterRequest {
                name: "me".into(),
                backend: "none".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let (me, session) = (reg.worker_id, reg.session);
        let lease = |client: &mut CoordinatorClient<tonic::transport::Channel>| {
            let mut client = client.clone();
            let session = session.clone();
            async move {
                client
                    .lease(LeaseRequest {
                        worker_id: me,
                        session,
                    })
                    .await
            }
        };
        let submit = |lease_id: u64, grad: Vec<f32>| SubmitRequest {
            worker_id: me,
            lease_id,
            truncation: 0,
            version: Some(Version { epoch: 0, step: 0 }),
            grad: f32_to_le_bytes(&grad).into(),
            meta_loss: 1.0,
            unroll_seconds: 0.0,
            session: session.clone(),
            data_fingerprint: String::new(),
        };
        let code_and_reason = |e: &tonic::Status| {
            (
                e.code(),
                e.metadata()
                    .get("l2l-refusal")
                    .map(|r| r.to_str().unwrap().to_string()),
            )
        };
        // A lease left silent past its timeout.
        let first = lease(&mut client).await.unwrap().into_inner().lease_id;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let err = client
            .submit(submit(first, vec![1e-3; 5141]))
            .await
            .unwrap_err();
        assert_eq!(
            code_and_reason(&err),
            (
                tonic::Code::FailedPrecondition,
                Some("expired_lease".into())
            ),
            "{err:?}"
        );
        // A request above the cap (one gradient of φ's size plus 64 KiB) is refused by
        // the transport before it is decoded; the server goes on serving.
        let second = lease(&mut client).await.unwrap().into_inner().lease_id;
        let err = client
            .submit(submit(second, vec![1e-3; 5141 + 20_000]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
        assert!(err.message().contains("too large"), "{err:?}");
        // The last update of the run, then every request hears that it is finished.
        let reply = client
            .submit(submit(second, vec![1e-3; 5141]))
            .await
            .unwrap()
            .into_inner();
        assert!(reply.accepted);
        let err = lease(&mut client).await.unwrap_err();
        assert_eq!(
            code_and_reason(&err),
            (tonic::Code::Cancelled, Some("finished".into())),
            "{err:?}"
        );
    });
    // Every live worker was told: the coordinator leaves at once, not after its 10 s.
    let exit = c.proc.wait_exit(Duration::from_secs(8));
    assert!(exit.success(), "{exit}");
    let (_, snap) = checkpoint::load_newest(dir.path()).unwrap().unwrap();
    assert_eq!(snap.version, 1);
    assert_eq!(snap.counters.leases_expired, 1, "{:?}", snap.counters);
}

#[test]
fn local_resumes_after_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("run");
    let local = |max_updates: &str| {
        let mut c = Command::new(binary("l2l-coordinator"));
        c.args([
            "local",
            "--workers",
            "1",
            "--max-updates",
            max_updates,
            "--eval-problems",
            "2",
            "--dir",
            s(&d),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        c
    };
    let mut first = Proc {
        child: local("100000").spawn().unwrap(),
    };
    // Ctrl-C once it has trained a little (a checkpoint file by count or at the end).
    let stderr = first.child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut log = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            log.push_str(&line);
            log.push('\n');
        }
        let _ = tx.send(log);
    });
    let end = std::time::Instant::now() + 3 * MINUTE;
    let stdout = first.child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().expect("local prints its address").unwrap();
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let url = format!("http://{addr}");
    loop {
        let v = version(&status(&url));
        if v >= 10 {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "local never reached 10 updates"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    first.signal("INT");
    let exit = first.wait_exit(MINUTE);
    let log = rx.recv_timeout(MINUTE).unwrap();
    // An interrupted run is not a finished one: it says so, and how to go on.
    assert_eq!(exit.code(), Some(1), "{log}");
    assert!(
        log.contains("interrupted; run the same command again to resume from"),
        "{log}"
    );
    let (_, snap) = checkpoint::load_newest(&d)
        .unwrap()
        .expect("a checkpoint at Ctrl-C");
    assert!(snap.version >= 10, "checkpointed at {}", snap.version);
    // The same command again resumes from there and finishes the run.
    let target = snap.version + 5;
    let out = local(&target.to_string()).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("learned optimizer φ written to"),
        "{stdout}"
    );
    let (_, resumed) = checkpoint::load_newest(&d).unwrap().unwrap();
    assert_eq!(
        resumed.version, target,
        "resumed at {} and trained 5 more",
        snap.version
    );
    assert_eq!(resumed.epoch, snap.epoch + 1, "a restart is a new epoch");
    assert_eq!(resumed.run, snap.run, "the same run, not a new one");
    assert!(
        resumed.counters.meta_losses.len() > snap.counters.meta_losses.len(),
        "the history goes on"
    );
}

#[test]
fn registrations_beyond_max_workers_are_refused_with_their_code() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("small.toml");
    std::fs::write(&config, "max_workers = 2\n").unwrap();
    let c = Coordinator::serve(dir.path(), "127.0.0.1:0", &["--config", s(&config)]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = CoordinatorClient::connect(c.url()).await.unwrap();
        let reg = |name: &str| RegisterRequest {
            name: name.into(),
            backend: "none".into(),
            ..Default::default()
        };
        client.register(reg("a")).await.unwrap();
        client.register(reg("b")).await.unwrap();
        let err = client.register(reg("c")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert_eq!(
            err.metadata().get("l2l-refusal").unwrap(),
            "too_many_workers"
        );
    });
    assert_eq!(c.status()["workers_total"], 2);
}

#[test]
fn a_run_validates_through_its_evaluators_and_keeps_the_best_phi() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("run");
    std::fs::create_dir_all(&d).unwrap();
    let cfg = dir.path().join("validate.toml");
    std::fs::write(
        &cfg,
        "[validation]\nevery = 5\ninstances = 2\ntune_instances = 2\nsteps = 20\n",
    )
    .unwrap();
    let c = Coordinator::serve(
        &d,
        "127.0.0.1:0",
        &["--config", s(&cfg), "--max-updates", "30", "--quorum", "1"],
    );
    let mut trainer = start_worker(&c.url(), "trainer", &dir.path().join("t.log"));
    let evaluator_host = l2l_tests::Host {
        env: vec![("L2L_ROLE".into(), "evaluator".into())],
        ..Default::default()
    };
    let elog = dir.path().join("e.log");
    let mut evaluator = l2l_tests::start_worker_on(&evaluator_host, &c.url(), "eval", &elog);
    // The starting φ, then every 5 updates.
    let st = c.wait_for(Duration::from_secs(120), "three validations", |s| {
        s["validation"]["done"].as_u64() >= Some(3)
    });
    let v = &st["validation"];
    assert_eq!(
        (v["every"].as_u64(), v["baseline"].as_str()),
        (Some(5), Some("adam"))
    );
    let last = v["last_version"].as_u64().unwrap();
    assert!(last.is_multiple_of(5) && last >= 10, "{v}");
    assert!(v["last_ratio_mean"].as_f64().unwrap() > 0.0, "{v}");
    let best = v["best_version"].as_u64().expect("a best φ");
    let roles: Vec<&str> = st["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["role"].as_str())
        .collect();
    assert!(
        roles.contains(&"evaluator") && roles.contains(&"trainer"),
        "{st}"
    );
    let out = coordinator(&["status", "--coordinator", &c.url()]);
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains("validation     every 5 updates, at update") && stdout.contains("  best "),
        "{stdout}"
    );
    // The run ends; the evaluator finishes the last jobs, is told, and exits cleanly.
    assert!(trainer.wait_exit(Duration::from_secs(120)).success());
    assert!(
        evaluator.wait_exit(Duration::from_secs(120)).success(),
        "{}",
        std::fs::read_to_string(&elog).unwrap_or_default()
    );
    let csv = std::fs::read_to_string(d.join("validation.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert!(csv.starts_with("update,epoch,"), "{csv}");
    assert!(rows.len() >= 3, "{csv}");
    assert!(rows[0].starts_with("0,0,"), "the starting φ first: {csv}");
    let best_row = rows
        .iter()
        .rfind(|r| r.ends_with(",1"))
        .expect("a row marked best");
    let file = l2l_common::files::TensorFile::read(&d.join("best.safetensors")).unwrap();
    let best_version = file.metadata()["version"].clone();
    assert!(best_version.ends_with(&format!(".{}", best_row.split(',').next().unwrap())));
    assert!(
        best_version
            .split('.')
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= best
    );
    // The best φ is an optimizer file like any other.
    Phi::load(&d.join("best.safetensors")).unwrap();
}

#[test]
fn an_evaluator_of_a_run_without_validation_stops_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::serve(dir.path(), "127.0.0.1:0", &["--max-updates", "5"]);
    let out = l2l_tests::worker(&["run", "--coordinator", &c.url(), "--role", "evaluator"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("validates nothing") && stderr.contains("[validation]"),
        "{stderr}"
    );
}
