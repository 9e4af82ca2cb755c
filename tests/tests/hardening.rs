//! What a hostile client or an unlucky operator can do to a run, with real processes:
//! huge gradients, crashes before a checkpoint, unreadable checkpoints, crafted files,
//! floods of registrations, a coordinator that serves garbage, and `/metrics`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use l2l_common::files::{NamedTensor, encode, write_atomic};
use l2l_common::wire::f32_to_le_bytes;
use l2l_common::{OptimizerConfig, Phi};
use l2l_proto::v1::coordinator_client::CoordinatorClient;
use l2l_proto::v1::{LeaseRequest, RegisterRequest, SubmitRequest, Version};
use l2l_tests::{Coordinator, Proc, binary, get_metrics, refused, start_worker, text, version};

const MINUTE: Duration = Duration::from_secs(60);

type Client = CoordinatorClient<tonic::transport::Channel>;

/// A registered client: its id and session.
async fn register(client: &mut Client, name: &str) -> (u64, Vec<u8>) {
    let r = client
        .register(RegisterRequest {
            name: name.into(),
            backend: "none".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (r.worker_id, r.session)
}

/// Leases for `(id, session)`; returns the lease id.
async fn lease(client: &mut Client, id: u64, session: &[u8]) -> u64 {
    client
        .lease(LeaseRequest {
            worker_id: id,
            session: session.to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .lease_id
}

fn submit(id: u64, session: &[u8], lease: u64, t: u32, v: Version, g: f32) -> SubmitRequest {
    SubmitRequest {
        worker_id: id,
        lease_id: lease,
        truncation: t,
        version: Some(v),
        grad: f32_to_le_bytes(&vec![g; 5141]).into(),
        meta_loss: 1.0,
        unroll_seconds: 0.0,
        session: session.to_vec(),
        data_fingerprint: String::new(),
    }
}

fn reason(s: &tonic::Status) -> String {
    s.metadata()
        .get("l2l-refusal")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[test]
fn a_huge_gradient_is_refused_and_the_run_survives_restarts_with_its_own_phi() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = ["--quorum", "1", "--checkpoint-every-updates", "1"];
    let mut c = Coordinator::serve(d, "127.0.0.1:0", &args);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = Client::connect(c.url()).await.unwrap();
        let (id, session) = register(&mut client, "attacker").await;
        let l = lease(&mut client, id, &session).await;
        let v0 = Version { epoch: 0, step: 0 };
        // All 1e30: finite, so only the size rule stops it.
        let err = client
            .submit(submit(id, &session, l, 0, v0, 1e30))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (tonic::Code::InvalidArgument, "too_large")
        );
        // φ keeps moving with ordinary gradients.
        for (t, step) in [(0u32, 0u64), (1, 1), (2, 2)] {
            let v = Version { epoch: 0, step };
            client
                .submit(submit(id, &session, l, t, v, 1e-3))
                .await
                .unwrap();
        }
    });
    let s = c.wait_for(MINUTE, "three updates checkpointed", |s| version(s) >= 3);
    assert_eq!(refused(&s, "too_large"), 1);
    c.proc.signal("TERM");
    assert!(c.proc.wait_exit(MINUTE).success());
    let run = l2l_coordinator::run_dir::read_run_file(d)
        .unwrap()
        .unwrap()
        .run;
    let phi_file = l2l_common::files::TensorFile::read(&d.join("phi.safetensors")).unwrap();
    assert_eq!(phi_file.metadata()["run"], run, "the final φ names its run");
    // Restarted: the same run, a new epoch, the version where it stopped.
    let c = Coordinator::serve(d, "127.0.0.1:0", &args);
    let s = c.status();
    assert_eq!((s["epoch"].as_u64(), version(&s)), (Some(1), 3));
    Phi::load(&d.join("phi.safetensors")).expect("a finite φ");
}

#[test]
fn a_crash_before_the_first_checkpoint_still_fences_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // No checkpoint for a long while: the crash comes before the first one.
    let args = [
        "--quorum",
        "2",
        "--checkpoint-every-updates",
        "100000",
        "--checkpoint-every-seconds",
        "3600",
    ];
    let c = Coordinator::serve(d, "127.0.0.1:0", &args);
    let addr = c.addr.to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (id, session, l) = rt.block_on(async {
        let mut client = Client::connect(c.url()).await.unwrap();
        let (id, session) = register(&mut client, "before").await;
        let l = lease(&mut client, id, &session).await;
        (id, session, l)
    });
    c.proc.signal("KILL");
    drop(c);
    assert!(l2l_coordinator::checkpoint::list(d).unwrap().is_empty());
    let c = Coordinator::serve(d, &addr, &args);
    assert_eq!(c.status()["epoch"], 1, "the restart is a new epoch");
    rt.block_on(async {
        let mut client = Client::connect(c.url()).await.unwrap();
        // The gradient computed before the crash is refused, not applied.
        let v = Version { epoch: 0, step: 0 };
        let err = client
            .submit(submit(id, &session, l, 0, v, 1e-3))
            .await
            .unwrap_err();
        assert_eq!(reason(&err), "pre_restart", "{err:?}");
        // And the old ids mean nothing now: new ones are handed out.
        let err = client
            .lease(LeaseRequest {
                worker_id: id,
                session: session.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(reason(&err), "unknown_worker");
        let (new_id, _) = register(&mut client, "after").await;
        assert_ne!(new_id, id);
        assert_eq!(new_id >> 32, 1, "ids carry the epoch");
    });
    assert_eq!(version(&c.status()), 0);
}

#[test]
fn unreadable_checkpoints_stop_the_start_and_start_fresh_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut c = Coordinator::serve(d, "127.0.0.1:0", &["--quorum", "1"]);
    let _w = start_worker(&c.url(), "w", &d.join("w.log"));
    c.wait_for(MINUTE, "an update", |s| version(s) >= 2);
    c.proc.signal("TERM");
    assert!(c.proc.wait_exit(MINUTE).success());
    let phi_before = std::fs::read(d.join("phi.safetensors")).unwrap();
    // Every checkpoint damaged (a disk error, a bad copy).
    let ckpts = l2l_coordinator::checkpoint::list(d).unwrap();
    assert!(!ckpts.is_empty());
    for (_, p) in &ckpts {
        std::fs::write(p, b"damaged").unwrap();
    }
    let out = Command::new(binary("l2l-coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0", "--dir"])
        .arg(d)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stdout.contains("listening on"), "nothing was served");
    assert!(stderr.contains("none of them can be loaded"), "{stderr}");
    assert!(stderr.contains("--start-fresh"), "{stderr}");
    for (_, p) in &ckpts {
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(stderr.contains(name), "{name} listed in {stderr}");
    }
    assert_eq!(
        std::fs::read(d.join("phi.safetensors")).unwrap(),
        phi_before,
        "the run's φ is untouched"
    );
    // On purpose: a new run, the old files kept aside.
    let c = Coordinator::serve(d, "127.0.0.1:0", &["--quorum", "1", "--start-fresh"]);
    let s = c.status();
    assert_eq!((s["epoch"].as_u64(), version(&s)), (Some(0), 0));
    let aside: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("abandoned-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(
        std::fs::read(aside[0].path().join("phi.safetensors")).unwrap(),
        phi_before
    );
}

/// Writes a φ-shaped file whose metadata claims `layers` layers.
fn crafted_phi(path: &Path, layers: &str, checkpoint: bool) {
    let cfg = OptimizerConfig::default();
    let phi = Phi::init(cfg, 1).unwrap();
    let layout = cfg.tensor_layout();
    let named: Vec<NamedTensor<'_>> = layout
        .iter()
        .zip(&phi.tensors)
        .map(|((n, s), v)| (n.as_str(), s.as_slice(), v.as_slice()))
        .collect();
    let mut meta = l2l_common::files::config_metadata(&cfg);
    meta.insert("layers".into(), layers.into());
    if checkpoint {
        meta.insert("checkpoint".into(), "l2l-coordinator/1".into());
    }
    write_atomic(path, &encode(&named, meta).unwrap()).unwrap();
}

#[test]
fn absurd_phi_metadata_is_refused_without_aborting() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let phi = d.join("phi.safetensors");
    crafted_phi(&phi, "10000000000000", false);
    let problem = d.join("q.safetensors");
    let made = Command::new(binary("l2l-worker"))
        .args([
            "gen-problem",
            "quadratic",
            "--batch",
            "2",
            "--seed",
            "1",
            "--out",
        ])
        .arg(&problem)
        .output()
        .unwrap();
    assert!(made.status.success());
    let out = Command::new(binary("l2l-worker"))
        .args(["meta-grad", "--steps", "5", "--phi"])
        .arg(&phi)
        .arg("--problem")
        .arg(&problem)
        .arg("--out")
        .arg(d.join("g.safetensors"))
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "no abort: {stderr}");
    assert!(stderr.contains("layers must be in 1..=64"), "{stderr}");
    // The same in a coordinator's run directory: a clear refusal, not a crash.
    let run = d.join("run");
    std::fs::create_dir(&run).unwrap();
    crafted_phi(
        &run.join("checkpoint-000000000005.safetensors"),
        "10000000000000",
        true,
    );
    let out = Command::new(binary("l2l-coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0", "--dir"])
        .arg(&run)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "no abort: {stderr}");
    assert!(
        stderr.contains("checkpoint-000000000005.safetensors") && stderr.contains("layers"),
        "{stderr}"
    );
}

#[test]
fn status_stays_readable_after_thousands_of_registrations() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::serve(dir.path(), "127.0.0.1:0", &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(c.url()).await.unwrap();
        let long = format!("\u{1b}[31m{}", "n".repeat(60_000));
        let mut tasks = Vec::new();
        for k in 0..8 {
            let (mut client, long) = (client.clone(), long.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..400 {
                    register(&mut client, &format!("{long}-{k}-{i}")).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let s = c.status();
    assert_eq!(s["workers_total"], 3200);
    assert_eq!(s["workers"].as_array().unwrap().len(), 100);
    let out = Command::new(binary("l2l-coordinator"))
        .args(["status", "--coordinator", &c.url()])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("and 3100 more workers"), "{stdout}");
    assert!(
        !stdout.contains('\u{1b}'),
        "no terminal escapes reach the screen"
    );
}

/// A coordinator that registers and leases like the real one but serves φ that does not
/// decode; counts registrations.
#[derive(Clone, Default)]
struct Garbage {
    registrations: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

#[tonic::async_trait]
impl l2l_proto::v1::coordinator_server::Coordinator for Garbage {
    async fn register(
        &self,
        _: tonic::Request<RegisterRequest>,
    ) -> Result<tonic::Response<l2l_proto::v1::RegisterReply>, tonic::Status> {
        let n = self
            .registrations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(tonic::Response::new(l2l_proto::v1::RegisterReply {
            worker_id: n + 1,
            epoch: 0,
            lease_timeout_ms: 30_000,
            wait_for_update: false,
            session: vec![1; 16],
            max_staleness: 0,
        }))
    }
    async fn lease(
        &self,
        _: tonic::Request<LeaseRequest>,
    ) -> Result<tonic::Response<l2l_proto::v1::LeaseReply>, tonic::Status> {
        Ok(tonic::Response::new(l2l_proto::v1::LeaseReply {
            lease_id: 1,
            instance: Some(l2l_proto::v1::Instance {
                family: "quadratic".into(),
                seed: 1,
                params: [("batch".to_string(), "2".to_string())].into(),
            }),
            trajectory_steps: 20,
            truncation_steps: 20,
            step_weights: vec![],
            estimator: None,
        }))
    }
    async fn fetch_phi(
        &self,
        _: tonic::Request<l2l_proto::v1::FetchPhiRequest>,
    ) -> Result<tonic::Response<l2l_proto::v1::FetchPhiReply>, tonic::Status> {
        Ok(tonic::Response::new(l2l_proto::v1::FetchPhiReply {
            version: Some(Version::default()),
            unchanged: false,
            phi: bytes::Bytes::from_static(b"this is not a safetensors file"),
        }))
    }
    async fn submit(
        &self,
        _: tonic::Request<SubmitRequest>,
    ) -> Result<tonic::Response<l2l_proto::v1::SubmitReply>, tonic::Status> {
        Err(tonic::Status::internal("unused"))
    }
    async fn heartbeat(
        &self,
        _: tonic::Request<l2l_proto::v1::HeartbeatRequest>,
    ) -> Result<tonic::Response<l2l_proto::v1::HeartbeatReply>, tonic::Status> {
        Err(tonic::Status::internal("unused"))
    }
    async fn status(
        &self,
        _: tonic::Request<l2l_proto::v1::StatusRequest>,
    ) -> Result<tonic::Response<l2l_proto::v1::StatusReply>, tonic::Status> {
        Err(tonic::Status::internal("unused"))
    }
    async fn validate(
        &self,
        _: tonic::Request<l2l_proto::v1::ValidateRequest>,
    ) -> Result<tonic::Response<l2l_proto::v1::ValidateReply>, tonic::Status> {
        Err(tonic::Status::internal("unused"))
    }
    async fn submit_validation(
        &self,
        _: tonic::Request<l2l_proto::v1::SubmitValidationRequest>,
    ) -> Result<tonic::Response<l2l_proto::v1::SubmitValidationReply>, tonic::Status> {
        Err(tonic::Status::internal("unused"))
    }
}

#[test]
fn a_worker_backs_off_when_the_coordinator_serves_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = Garbage::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = l2l_proto::v1::coordinator_server::CoordinatorServer::new(fake.clone());
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream_from(listener)),
    );
    let log = dir.path().join("w.log");
    let mut w = Proc {
        child: Command::new(binary("l2l-worker"))
            .args(["run", "--coordinator", &format!("http://{addr}")])
            .args(["--max-backoff-ms", "1000", "--threads", "1"])
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    };
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let n = fake
        .registrations
        .load(std::sync::atomic::Ordering::Relaxed);
    w.signal("KILL");
    let _ = w.wait_exit(MINUTE);
    let secs = started.elapsed().as_secs_f64();
    // Backoff 0.1, 0.2, 0.4, 0.8, then 1 s (±50%): about 8 in 4 s; hundreds without it.
    assert!(
        (2..=15).contains(&n),
        "{n} registrations in {secs:.1} s; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// The accepted connections of `listener` as the stream tonic serves.
fn tokio_stream_from(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
}

#[test]
fn metrics_can_require_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let token = "metrics-test-token-5f0c1a2b";
    std::fs::write(d.join("token"), token).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let mut c = Coordinator::serve_on(
        &l2l_tests::Host {
            netns: None,
            env: vec![(
                "L2L_TOKEN_FILE".into(),
                d.join("token").to_str().unwrap().into(),
            )],
        },
        None,
        d,
        "127.0.0.1:0",
        &["--metrics-listen", &metrics, "--metrics-require-token"],
    );
    let (line, _) = get_metrics(&metrics, None);
    assert!(line.contains("401"), "{line}");
    let (line, _) = get_metrics(&metrics, Some("metrics-test-token-5f0c1a2c"));
    assert!(line.contains("401"), "{line}");
    let (line, body) = get_metrics(&metrics, Some(token));
    assert!(line.contains("200"), "{line}");
    assert!(body.contains("l2l_version"), "{body}");
    c.proc.signal("TERM");
    let _ = c.proc.wait_exit(MINUTE);
}
