//! Starting on a run directory: fresh, resumed, fenced, refused, started over.

use super::*;
use crate::config::Config;
use crate::state::Coordinator;

fn config(dir: &Path) -> Config {
    let mut c = Config {
        dir: dir.into(),
        ..Config::default()
    };
    c.init.hidden = 3;
    c
}

/// Starts a coordinator as `serve` would and writes one checkpoint at `version`.
fn checkpoint_at(dir: &Path, version: u64) -> Start {
    let p = prepare(dir, false).unwrap();
    let start = p.start.clone();
    let c = Coordinator::new(config(dir), p.start).unwrap();
    let mut snap = c.snapshot().unwrap();
    snap.version = version;
    checkpoint::save(dir, &snap, &config(dir), 3).unwrap();
    start
}

#[test]
fn every_start_records_a_new_epoch_before_serving_even_without_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let first = prepare(dir.path(), false).unwrap();
    assert_eq!(first.start.epoch, 0);
    assert!(first.start.resume.is_none());
    let rf = read_run_file(dir.path()).unwrap().unwrap();
    assert_eq!((rf.epoch, rf.run.as_str()), (0, first.start.run.as_str()));
    assert_eq!(rf.run.len(), 32);
    // Killed before any checkpoint: the next start is a new epoch of the same run, so
    // worker ids, lease ids and versions of the first process are all fenced.
    let second = prepare(dir.path(), false).unwrap();
    assert_eq!(second.start.epoch, 1);
    assert_eq!(second.start.run, first.start.run);
    assert!(second.start.resume.is_none());
    let third = prepare(dir.path(), false).unwrap();
    assert_eq!(third.start.epoch, 2);
}

#[test]
fn resumes_the_newest_checkpoint_in_an_epoch_above_every_earlier_one() {
    let dir = tempfile::tempdir().unwrap();
    let run = checkpoint_at(dir.path(), 7).run; // epoch 0 wrote version 7
    prepare(dir.path(), false).unwrap(); // epoch 1 crashed before a checkpoint
    let p = prepare(dir.path(), false).unwrap();
    assert_eq!(
        p.start.epoch, 2,
        "above the run file's 1, not the checkpoint's 0 + 1"
    );
    assert_eq!(p.start.run, run);
    let snap = p.start.resume.unwrap();
    assert_eq!((snap.version, snap.run.as_str()), (7, run.as_str()));
}

#[test]
fn unreadable_checkpoints_stop_the_start_until_start_fresh_moves_them() {
    let dir = tempfile::tempdir().unwrap();
    let old_run = checkpoint_at(dir.path(), 3).run;
    std::fs::write(dir.path().join("phi.safetensors"), b"old final phi").unwrap();
    for name in checkpoint::list(dir.path()).unwrap() {
        std::fs::write(&name.1, b"damaged").unwrap();
    }
    let e = format!("{:#}", prepare(dir.path(), false).unwrap_err());
    assert!(e.contains("none of them can be loaded"), "{e}");
    assert!(e.contains("checkpoint-000000000003.safetensors"), "{e}");
    assert!(e.contains("--start-fresh"), "{e}");
    // The refusal changed nothing.
    assert_eq!(read_run_file(dir.path()).unwrap().unwrap().epoch, 0);
    let p = prepare(dir.path(), true).unwrap();
    let aside = p.abandoned.unwrap();
    assert_ne!(p.start.run, old_run, "a new run");
    assert_eq!(p.start.epoch, 0);
    assert!(p.start.resume.is_none());
    for name in [
        "checkpoint-000000000003.safetensors",
        "run.json",
        "phi.safetensors",
    ] {
        assert!(aside.join(name).exists(), "{name} kept aside");
    }
    assert!(checkpoint::list(dir.path()).unwrap().is_empty());
}

#[test]
fn a_damaged_newer_checkpoint_is_set_aside_and_the_older_one_resumed() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint_at(dir.path(), 4);
    let bad = dir.path().join("checkpoint-000000000009.safetensors");
    std::fs::write(&bad, b"torn").unwrap();
    let p = prepare(dir.path(), false).unwrap();
    assert_eq!(p.start.resume.unwrap().version, 4);
    assert!(!bad.exists());
    assert!(
        dir.path()
            .join("checkpoint-000000000009.safetensors.unreadable")
            .exists()
    );
}

#[test]
fn files_of_another_run_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint_at(dir.path(), 2);
    // run.json says another run than the checkpoint.
    let mut rf = read_run_file(dir.path()).unwrap().unwrap();
    rf.run = "0".repeat(32);
    write_run_file(dir.path(), &rf).unwrap();
    let e = format!("{:#}", prepare(dir.path(), false).unwrap_err());
    assert!(e.contains("two runs share"), "{e}");

    // A final φ of another run in an otherwise empty directory.
    let other = tempfile::tempdir().unwrap();
    let phi =
        AnyPhi::from(l2l_common::Phi::init(l2l_common::OptimizerConfig::default(), 1).unwrap());
    save_final_phi(other.path(), "someone-else", &phi).unwrap();
    let e = format!("{:#}", prepare(other.path(), false).unwrap_err());
    assert!(e.contains("run someone-else"), "{e}");
    assert!(
        prepare(other.path(), true).is_ok(),
        "--start-fresh moves it aside"
    );
}

#[test]
fn a_final_phi_is_never_replaced_by_another_runs() {
    let dir = tempfile::tempdir().unwrap();
    let a = AnyPhi::from(l2l_common::Phi::init(l2l_common::OptimizerConfig::default(), 1).unwrap());
    let b = AnyPhi::from(l2l_common::Phi::init(l2l_common::OptimizerConfig::default(), 2).unwrap());
    let path = save_final_phi(dir.path(), "run-a", &a).unwrap();
    save_final_phi(dir.path(), "run-a", &b).unwrap();
    assert_eq!(
        AnyPhi::load(&path).unwrap(),
        b,
        "the same run updates its φ"
    );
    let e = save_final_phi(dir.path(), "run-b", &a)
        .unwrap_err()
        .to_string();
    assert!(e.contains("run-a") && e.contains("not replacing"), "{e}");
    assert_eq!(AnyPhi::load(&path).unwrap(), b);
}

#[test]
fn a_damaged_run_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(RUN_FILE),
        b"{\"format\": \"l2l-run/1\", \"ru",
    )
    .unwrap();
    let e = format!("{:#}", prepare(dir.path(), false).unwrap_err());
    assert!(
        e.contains("run.json is damaged") && e.contains("--start-fresh"),
        "{e}"
    );
    std::fs::write(dir.path().join(RUN_FILE), vec![b' '; 1 << 20]).unwrap();
    let e = format!("{:#}", prepare(dir.path(), false).unwrap_err());
    assert!(e.contains("larger than"), "{e}");
}
