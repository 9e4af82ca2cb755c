//! Relays (`l2l-coordinator relay`) as users run them: real coordinator, relay and worker
//! processes on loopback. A relay must refuse exactly what the coordinator refuses, keep
//! the token, and follow a coordinator restart.

use std::time::{Duration, Instant};

use l2l_common::wire::f32_to_le_bytes;
use l2l_proto::auth::Token;
use l2l_proto::client::{Client, ClientSecurity, batch_client, connect, endpoint};
use l2l_proto::v1::{
    FetchPhiRequest, LeaseRequest, RegisterRequest, StatusRequest, SubmitBatchRequest,
    SubmitRequest, Version,
};
use l2l_tests::{Coordinator, Host, Relay, start_worker_on, text, version};

const MINUTE: Duration = Duration::from_secs(60);
const TOKEN: &str = "relay-test-token-5f0c2a9e71";

fn secured() -> ClientSecurity {
    ClientSecurity {
        token: Some(Token::new(TOKEN, "test").unwrap()),
        ..Default::default()
    }
}

fn reg(name: &str) -> RegisterRequest {
    RegisterRequest {
        name: name.into(),
        backend: "none".into(),
        ..Default::default()
    }
}

/// Registers `name` through `c`: its id and session.
async fn register(c: &mut Client, name: &str) -> (u64, Vec<u8>) {
    let r = c.register(reg(name)).await.unwrap().into_inner();
    (r.worker_id, r.session)
}

fn code_and_reason(s: &tonic::Status) -> (tonic::Code, String) {
    let reason = s
        .metadata()
        .get("l2l-refusal")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (s.code(), reason)
}

#[test]
fn workers_train_through_a_relay_that_refuses_what_the_coordinator_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("token"), format!("{TOKEN}\n")).unwrap();
    let host = Host {
        netns: None,
        env: vec![(
            "L2L_TOKEN_FILE".into(),
            d.join("token").to_str().unwrap().into(),
        )],
    };
    let mut c = Coordinator::serve_on(
        &host,
        None,
        &d.join("run"),
        "127.0.0.1:0",
        &["--quorum", "2"],
    );
    c.host = host.clone();
    let relay = Relay::start(&host, &c.url(), &d.join("relay.log"), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let sec = secured();
        let mut direct = connect(&c.url(), &sec, MINUTE).await.unwrap();
        let mut r = connect(&relay.url(), &sec, MINUTE).await.unwrap();
        let (me, my_session) = register(&mut r, "me").await;
        let (other, other_session) = register(&mut r, "other").await;
        // Forwarded calls keep their refusals: my id with another session leases nothing.
        let err = r
            .lease(LeaseRequest {
                worker_id: me,
                session: other_session.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            code_and_reason(&err),
            (tonic::Code::PermissionDenied, "bad_session".into())
        );
        let lease = r
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
        let cases = [
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
                    worker_id: other,
                    session: other_session.clone(),
                    ..good.clone()
                },
                tonic::Code::PermissionDenied,
                "foreign_lease",
            ),
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
                    lease_id: 424_242,
                    ..good.clone()
                },
                tonic::Code::NotFound,
                "unknown_lease",
            ),
            (
                SubmitRequest {
                    version: Some(Version { epoch: 7, step: 0 }),
                    ..good.clone()
                },
                tonic::Code::Aborted,
                "pre_restart",
            ),
        ];
        for (req, code, reason) in cases {
            let through = r.submit(req.clone()).await.unwrap_err();
            assert_eq!(
                code_and_reason(&through),
                (code, reason.to_string()),
                "{through:?}"
            );
            let straight = direct.submit(req).await.unwrap_err();
            assert_eq!(code_and_reason(&straight), code_and_reason(&through));
        }
        // A submission larger than its share of a batch (φ's file + 1 KB) is refused by
        // the relay itself, so it cannot make the coordinator refuse a whole batch.
        let err = r
            .submit(SubmitRequest {
                data_fingerprint: "f".repeat(8192),
                ..good.clone()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("envelope"), "{err:?}");
        let first = r.submit(good.clone()).await.unwrap().into_inner();
        assert!(first.accepted && !first.duplicate, "{first:?}");
        let again = r.submit(good.clone()).await.unwrap().into_inner();
        assert!(again.accepted && again.duplicate, "{again:?}");
        // φ through the relay is the coordinator's, byte for byte.
        let via = r
            .fetch_phi(FetchPhiRequest::default())
            .await
            .unwrap()
            .into_inner();
        let own = direct
            .fetch_phi(FetchPhiRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!((via.version, &via.phi), (own.version, &own.phi));
        assert!(!via.phi.is_empty());

        // The relay asks for the token too.
        let mut anon = connect(&relay.url(), &ClientSecurity::default(), MINUTE)
            .await
            .unwrap();
        let err = anon.status(StatusRequest {}).await.unwrap_err();
        assert_eq!(
            code_and_reason(&err),
            (tonic::Code::Unauthenticated, "unauthenticated".into())
        );

        // The coordinator's batch service: the token, at most 64 items, one outcome each.
        let channel = endpoint(&c.url(), &sec).unwrap().connect().await.unwrap();
        let mut no_token = batch_client(channel.clone(), &ClientSecurity::default(), 8 << 20);
        let err = no_token
            .submit_batch(SubmitBatchRequest {
                items: vec![good.clone()],
                have: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let mut batches = batch_client(channel, &sec, 8 << 20);
        let err = batches
            .submit_batch(SubmitBatchRequest {
                items: vec![good.clone(); 65],
                have: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("at most 64"), "{err:?}");
        let reply = batches
            .submit_batch(SubmitBatchRequest {
                items: vec![
                    good.clone(),
                    SubmitRequest {
                        session: other_session.clone(),
                        ..good.clone()
                    },
                ],
                have: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.outcomes.len(), 2);
        let dup = reply.outcomes[0]
            .reply
            .expect("the good one is a duplicate");
        assert!(dup.accepted && dup.duplicate);
        let refused = &reply.outcomes[1];
        assert!(refused.reply.is_none());
        assert_eq!(
            (refused.code, refused.reason.as_str()),
            (tonic::Code::PermissionDenied as i32, "bad_session")
        );
        assert!(
            !reply.phi.is_empty(),
            "φ comes along when `have` is not current"
        );
    });
    let s = c.status();
    assert_eq!(
        version(&s),
        0,
        "one gradient of a quorum of two: no update yet"
    );
    assert_eq!(s["accepted"], 1, "{s}");

    // Two workers train through the relay; in sync mode they wait for each round's φ at
    // the relay, which long-polls the coordinator for them.
    let _w1 = start_worker_on(&host, &relay.url(), "w1", &d.join("w1.log"));
    let _w2 = start_worker_on(&host, &relay.url(), "w2", &d.join("w2.log"));
    let s = c.wait_for(2 * MINUTE, "twelve updates through the relay", |s| {
        version(s) >= 12
    });
    let trained: Vec<_> = s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["name"] == "w1" || w["name"] == "w2")
        .map(|w| w["accepted"].as_u64().unwrap())
        .collect();
    assert_eq!(trained.len(), 2, "{s}");
    assert!(trained.iter().all(|&a| a > 0), "{s}");
    // `status` through the relay shows the coordinator's.
    let out = host
        .command("l2l-coordinator")
        .args(["status", "--json", "--coordinator", &relay.url()])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let via: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(version(&via) >= 12, "{via}");
}

#[test]
fn after_a_coordinator_restart_the_relay_serves_the_new_epoch_and_fences_old_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = ["--quorum", "1", "--checkpoint-every-updates", "1"];
    let c = Coordinator::serve(&d.join("run"), "127.0.0.1:0", &args);
    let addr = c.addr;
    let relay = Relay::start(&Host::local(), &c.url(), &d.join("relay.log"), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sec = ClientSecurity::default();
    let (mut r, me, session, lease) = rt.block_on(async {
        let mut r = connect(&relay.url(), &sec, MINUTE).await.unwrap();
        let (me, session) = register(&mut r, "old").await;
        let lease = r
            .lease(LeaseRequest {
                worker_id: me,
                session: session.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .lease_id;
        (r, me, session, lease)
    });
    let submit = |truncation: u32, version: Version| SubmitRequest {
        worker_id: me,
        lease_id: lease,
        truncation,
        version: Some(version),
        grad: f32_to_le_bytes(&[1e-3; 5141]).into(),
        meta_loss: 1.0,
        unroll_seconds: 0.0,
        session: session.clone(),
        data_fingerprint: String::new(),
    };
    rt.block_on(async {
        let a = r
            .submit(submit(0, Version::default()))
            .await
            .unwrap()
            .into_inner();
        assert!(a.accepted);
        assert_eq!(a.current, Some(Version { epoch: 0, step: 1 }));
    });
    c.wait_for(MINUTE, "version 1", |s| version(s) >= 1);
    // Checkpoints are written by a 20 ms ticker.
    std::thread::sleep(Duration::from_millis(300));
    c.proc.signal("KILL");
    drop(c);
    let c = Coordinator::serve(&d.join("run"), &addr.to_string(), &args);
    assert_eq!(c.status()["epoch"], 1, "a restart starts a new epoch");
    rt.block_on(async {
        // The relay's φ moves to the new epoch by itself (refreshed once a second).
        let end = Instant::now() + MINUTE;
        loop {
            let got = r.fetch_phi(FetchPhiRequest::default()).await;
            if let Ok(p) = got
                && p.get_ref().version.is_some_and(|v| v.epoch == 1)
            {
                break;
            }
            assert!(Instant::now() < end, "the relay kept the old epoch's φ");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Work computed before the restart is refused as such, through the relay.
        let err = loop {
            let err = r
                .submit(submit(1, Version { epoch: 0, step: 1 }))
                .await
                .unwrap_err();
            if err.code() != tonic::Code::Unavailable {
                break err;
            }
            assert!(
                Instant::now() < end,
                "the relay never reached the new coordinator"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            code_and_reason(&err),
            (tonic::Code::Aborted, "pre_restart".into())
        );
        let again = r.register(reg("new")).await.unwrap().into_inner();
        assert_eq!(again.epoch, 1);
    });
}

#[test]
fn the_bench_runs_workers_through_relays() {
    let out = l2l_tests::coordinator(&[
        "bench",
        "--workers",
        "8",
        "--relays",
        "2",
        "--seconds",
        "1",
        "--unroll-ms",
        "5",
        "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let row: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(row["relays"], 2);
    assert!(row["accepted_per_s"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["efficiency"].as_f64().unwrap() > 0.0, "{row}");
}
