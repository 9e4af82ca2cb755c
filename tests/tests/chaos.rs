//! Chaos: a coordinator and three workers, killed (SIGKILL) at random moments and
//! restarted, several times. At the end φ is finite and the run's own, no restart resumed
//! behind the newest checkpoint on disk, and no gradient was accepted twice.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use l2l_common::files::TensorFile;
use l2l_common::rng::Rng;
use l2l_tests::{Coordinator, Host, Proc, start_worker, version};

const MINUTE: Duration = Duration::from_secs(60);

/// The newest checkpoint's version in `dir` (0 when none).
fn newest_checkpoint(dir: &Path) -> u64 {
    l2l_coordinator::checkpoint::list(dir)
        .unwrap()
        .last()
        .map_or(0, |(v, _)| *v)
}

/// The version the newest coordinator log says its process resumed from (0: none).
fn resumed_version(dir: &Path) -> u64 {
    let newest = (0..)
        .map(|n| dir.join(format!("coordinator-{n}.log")))
        .take_while(|p| p.exists())
        .last()
        .expect("a coordinator log");
    let text = std::fs::read_to_string(newest).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "resuming")
        .map_or(0, |v| v["fields"]["version"].as_u64().unwrap())
}

/// Every (lease, truncation) the coordinator logs said it accepted, over all its logs.
fn accepted_gradients(dir: &Path) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("coordinator-") && name.ends_with(".log")) {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap();
        for line in text.lines() {
            // A process killed mid-line leaves at most one partial last line.
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let f = &v["fields"];
            if f["message"] == "gradient accepted" {
                out.push((
                    f["lease"].as_u64().unwrap(),
                    f["truncation"].as_u64().unwrap(),
                ));
            }
        }
    }
    out
}

#[test]
fn random_kills_lose_no_checkpoint_and_apply_no_gradient_twice() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let host = Host {
        netns: None,
        env: vec![(
            "RUST_LOG".into(),
            "info,l2l_coordinator::state=debug".into(),
        )],
    };
    let args = [
        "--log-format",
        "json",
        "--quorum",
        "2",
        "--round-timeout-ms",
        "500",
        "--checkpoint-every-updates",
        "3",
        "--checkpoint-every-seconds",
        "1",
        "--lease-timeout-ms",
        "3000",
    ];
    let mut coordinator = Coordinator::serve_on(&host, None, d, "127.0.0.1:0", &args);
    let addr = coordinator.addr.to_string();
    let url = coordinator.url();
    let mut spawned = 0;
    let mut worker = |name: &str| {
        spawned += 1;
        start_worker(&url, name, &d.join(format!("{name}-{spawned}.log")))
    };
    let mut workers: Vec<Proc> = (0..3).map(|i| worker(&format!("w{i}"))).collect();
    coordinator.wait_for(MINUTE, "training", |s| version(s) >= 3);
    let seed = std::env::var("L2L_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261129u64);
    eprintln!("chaos seed {seed} (set L2L_CHAOS_SEED to replay another)");
    let mut rng = Rng::new(seed);
    let (mut epoch, mut resumed_at) = (0u64, 0u64);
    let mut coordinator_kills = 0;
    for round in 0..7 {
        std::thread::sleep(Duration::from_secs_f64(rng.uniform_in(0.2, 1.5)));
        // The coordinator at least three times, the workers otherwise.
        if round % 2 == 0 || rng.uniform_in(0.0, 1.0) < 0.3 {
            coordinator.proc.signal("KILL");
            drop(coordinator);
            coordinator_kills += 1;
            let on_disk = newest_checkpoint(d);
            coordinator = Coordinator::serve_on(&host, None, d, &addr, &args);
            let s = coordinator.status();
            epoch += 1;
            assert_eq!(s["epoch"].as_u64(), Some(epoch), "round {round}: {s}");
            let resumed = resumed_version(d);
            assert_eq!(
                resumed, on_disk,
                "round {round}: resumed from the newest checkpoint on disk"
            );
            assert!(
                resumed >= resumed_at,
                "round {round}: the version went back"
            );
            assert!(version(&s) >= resumed);
            resumed_at = resumed;
            coordinator.wait_for(MINUTE, "the workers back and training", |s| {
                version(s) >= resumed_at + 2
            });
        } else {
            let i = (rng.next_u64() % workers.len() as u64) as usize;
            workers[i].signal("KILL");
            workers[i] = worker(&format!("w{i}"));
        }
    }
    assert!(coordinator_kills >= 3);
    let before_stop =
        coordinator.wait_for(MINUTE, "more training", |s| version(s) >= resumed_at + 3);
    coordinator.proc.signal("TERM");
    assert!(coordinator.proc.wait_exit(MINUTE).success());
    drop(workers);

    // φ is finite (the reader refuses anything else) and the run's own.
    let run = l2l_coordinator::run_dir::read_run_file(d).unwrap().unwrap();
    assert_eq!(run.epoch, epoch);
    let phi = TensorFile::read(&d.join("phi.safetensors")).unwrap();
    assert_eq!(phi.metadata()["run"], run.run);
    l2l_common::Phi::load(&d.join("phi.safetensors")).unwrap();
    for (_, path) in l2l_coordinator::checkpoint::list(d).unwrap() {
        let snap = l2l_coordinator::checkpoint::load(&path).unwrap();
        assert_eq!(snap.run, run.run, "{}", path.display());
        assert!(snap.counters.gradients_applied <= snap.counters.accepted);
    }
    assert!(newest_checkpoint(d) >= version(&before_stop));
    // No gradient accepted twice, across every process of the run: lease ids carry the
    // epoch, so a repeated (lease, truncation) would be a gradient counted again.
    let accepted = accepted_gradients(d);
    let unique: HashSet<_> = accepted.iter().collect();
    assert!(accepted.len() > 20, "{} accepted", accepted.len());
    assert_eq!(
        unique.len(),
        accepted.len(),
        "a gradient was accepted twice"
    );
    let epochs: HashSet<u64> = accepted.iter().map(|(lease, _)| lease >> 32).collect();
    assert!(
        epochs.len() as u64 >= epoch,
        "gradients in every epoch: {epochs:?}"
    );
}
