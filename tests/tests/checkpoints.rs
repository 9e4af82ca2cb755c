//! What the README promises about checkpoints, with real processes: at most one
//! checkpoint interval is lost when the coordinator is killed, time-based checkpoints are
//! written, and a checkpoint that cannot be written turns health NOT_SERVING (and
//! `/metrics`' `l2l_ready` to 0) until one can.

use std::path::Path;
use std::time::{Duration, Instant};

use l2l_coordinator::checkpoint;
use l2l_tests::{Coordinator, get_metrics, start_worker, version};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const MINUTE: Duration = Duration::from_secs(60);

/// Polls `cond` every 100 ms until it holds, at most `limit`.
fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The versions of the checkpoints in `dir`, oldest first.
fn checkpointed(dir: &Path) -> Vec<u64> {
    checkpoint::list(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|(v, _)| v)
        .collect()
}

#[test]
fn a_killed_coordinator_loses_at_most_one_checkpoint_interval() {
    let dir = tempfile::tempdir().unwrap();
    let every = 5;
    let c = Coordinator::serve(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--quorum",
            "2",
            "--round-timeout-ms",
            "300",
            "--checkpoint-every-updates",
            &every.to_string(),
            "--checkpoint-every-seconds",
            "0",
        ],
    );
    let w1 = start_worker(&c.url(), "w1", &dir.path().join("w1.log"));
    let w2 = start_worker(&c.url(), "w2", &dir.path().join("w2.log"));
    c.wait_for(MINUTE, "twelve updates", |s| version(s) >= 12);
    // Freeze the workers so the version at the kill is known exactly: it stops moving
    // once a gradient in flight has landed and any open round has closed by its deadline.
    w1.signal("STOP");
    w2.signal("STOP");
    let mut at_kill = version(&c.status());
    let mut still_since = Instant::now();
    wait_until(MINUTE, "the version to settle", || {
        let v = version(&c.status());
        if v != at_kill {
            (at_kill, still_since) = (v, Instant::now());
        }
        still_since.elapsed() > Duration::from_secs(2)
    });
    c.proc.signal("KILL");
    drop(c);
    let (_, snap) = checkpoint::load_newest(dir.path())
        .unwrap()
        .expect("a checkpoint");
    eprintln!(
        "killed at version {at_kill}, newest checkpoint {}",
        snap.version
    );
    assert!(snap.version <= at_kill);
    assert!(
        at_kill - snap.version < every,
        "lost {} updates; the promise is less than one interval of {every}",
        at_kill - snap.version
    );
    assert_eq!(snap.version % every, 0, "written on the schedule");
    w1.signal("CONT");
    w2.signal("CONT");
}

#[test]
fn time_based_checkpoints_are_written_without_a_count() {
    let dir = tempfile::tempdir().unwrap();
    // Keep them all, so the test sees each one.
    let config = dir.path().join("keep.toml");
    std::fs::write(&config, "checkpoint_keep = 100\n").unwrap();
    let mut c = Coordinator::serve(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--config",
            config.to_str().unwrap(),
            "--quorum",
            "1",
            "--checkpoint-every-updates",
            "0",
            "--checkpoint-every-seconds",
            "1",
        ],
    );
    let _w = start_worker(&c.url(), "w", &dir.path().join("w.log"));
    // Three checkpoints of increasing versions, written while training goes on.
    wait_until(2 * MINUTE, "three time-based checkpoints", || {
        checkpointed(dir.path()).len() >= 3
    });
    let versions = checkpointed(dir.path());
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    assert!(versions[0] > 0, "{versions:?}");
    c.proc.signal("TERM");
    assert!(c.proc.wait_exit(MINUTE).success());
}

/// The gRPC health status of the whole server ("").
fn health(url: &str) -> ServingStatus {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut h = HealthClient::new(ch);
        let r = h
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        ServingStatus::try_from(r.status).unwrap()
    })
}

/// The body of `GET /metrics` on `addr` (which must answer 200).
fn metrics(addr: &str) -> String {
    let (line, body) = get_metrics(addr, None);
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    body
}

fn ready(addr: &str) -> bool {
    let body = metrics(addr);
    let line = body
        .lines()
        .find(|l| l.starts_with("l2l_ready "))
        .unwrap_or_else(|| panic!("no l2l_ready in {body}"));
    line.trim_end().ends_with(" 1") || line.trim_end().ends_with(" 1.0")
}

#[test]
fn a_checkpoint_that_cannot_be_written_turns_health_not_serving_until_one_can() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let away = tmp.path().join("run.away");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_at = format!("127.0.0.1:{port}");
    let mut c = Coordinator::serve(
        &run,
        "127.0.0.1:0",
        &[
            "--quorum",
            "1",
            "--checkpoint-every-updates",
            "2",
            "--metrics-listen",
            &metrics_at,
        ],
    );
    let _w = start_worker(&c.url(), "w", &tmp.path().join("w.log"));
    c.wait_for(MINUTE, "a checkpoint", |s| version(s) >= 3);
    wait_until(MINUTE, "a checkpoint", || !checkpointed(&run).is_empty());
    assert_eq!(health(&c.url()), ServingStatus::Serving);
    assert!(ready(&metrics_at));
    // The volume goes away: the run directory's path now names a file, so the next
    // checkpoint cannot be written (this works as root too, unlike permissions).
    std::fs::rename(&run, &away).unwrap();
    std::fs::write(&run, "not a directory").unwrap();
    wait_until(MINUTE, "health NOT_SERVING", || {
        health(&c.url()) == ServingStatus::NotServing
    });
    assert!(!ready(&metrics_at), "l2l_ready follows health");
    let during = version(&c.status());
    // Training goes on meanwhile (φ is in memory); it is the durability that is missing.
    c.wait_for(MINUTE, "training to go on", |s| version(s) > during);
    // The volume is back: the next attempt (a second later) succeeds and health recovers.
    std::fs::remove_file(&run).unwrap();
    std::fs::rename(&away, &run).unwrap();
    wait_until(MINUTE, "health SERVING again", || {
        health(&c.url()) == ServingStatus::Serving
    });
    assert!(ready(&metrics_at));
    let newest = *checkpointed(&run).last().unwrap();
    assert!(
        newest > during,
        "a checkpoint after the outage: {newest} vs {during}"
    );
    c.proc.signal("TERM");
    assert!(c.proc.wait_exit(MINUTE).success());
}
