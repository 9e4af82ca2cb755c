//! Coordinator checkpoints: φ, Adam's moments, version, epoch, sampler and counters in
//! one safetensors file, written atomically; a restarted coordinator resumes the newest.
//!
//! File `checkpoint-<version>.safetensors` in the run directory: φ's tensors under their
//! spec names, with the `groups` field and `{group}.` prefixes of spec §5 for a grouped φ
//! (so any `l2l-lstm/1` reader, one of §5 for a grouped φ, sees φ after ignoring two
//! extra tensors), `adam.m` and
//! `adam.v` (flat, φ's size, in §5's flat order), and metadata `checkpoint = "l2l-coordinator/1"`,
//! `run`, `epoch`, `version`, `adam_t`, `sampler_state`, `counters` (JSON), `config` (TOML).
//!
//! Retention never deletes the newest loadable checkpoint: a new file is read back before
//! any older one is removed, and only files older than it are removed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use l2l_common::AnyPhi;
use l2l_common::files::{TensorFile, config_from, write_atomic};
use l2l_common::groups::group_names;

use crate::adam::Adam;
use crate::config::Config;
use crate::state::{Counters, Snapshot};

pub use l2l_common::files::config_metadata;

/// Tag of a coordinator checkpoint.
pub const CHECKPOINT_FORMAT: &str = "l2l-coordinator/1";

fn file_name(version: u64) -> String {
    format!("checkpoint-{version:012}.safetensors")
}

/// Writes `snap` into `dir` atomically and keeps only the newest `keep` checkpoints.
pub fn save(dir: &Path, snap: &Snapshot, config: &Config, keep: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let meta = HashMap::from([
        ("checkpoint".to_string(), CHECKPOINT_FORMAT.to_string()),
        ("run".to_string(), snap.run.clone()),
        ("epoch".to_string(), snap.epoch.to_string()),
        ("version".to_string(), snap.version.to_string()),
        ("adam_t".to_string(), snap.adam.t.to_string()),
        ("sampler_state".to_string(), snap.sampler_state.to_string()),
        (
            "counters".to_string(),
            serde_json::to_string(&snap.counters)?,
        ),
        ("config".to_string(), config.to_toml()),
    ]);
    let n = [snap.adam.m.len()];
    let moments = [
        ("adam.m", &n[..], &snap.adam.m[..]),
        ("adam.v", &n[..], &snap.adam.v[..]),
    ];
    let path = dir.join(file_name(snap.version));
    write_atomic(&path, &snap.phi.encode_with(meta, &moments)?)?;
    // Read it back before removing anything: a file that cannot be loaded never
    // replaces one that can.
    load(&path).with_context(|| {
        format!(
            "the checkpoint just written, {}, does not read back; older ones are kept",
            path.display()
        )
    })?;
    let older: Vec<PathBuf> = list(dir)?
        .into_iter()
        .filter(|(v, _)| *v < snap.version)
        .map(|(_, p)| p)
        .collect();
    for old in older.iter().rev().skip(keep.max(1) - 1) {
        let _ = std::fs::remove_file(old);
    }
    Ok(path)
}

/// Checkpoints in `dir`, oldest first, with their versions.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(v) = name
            .to_str()
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|n| n.strip_suffix(".safetensors"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((v, entry.path()));
    }
    out.sort();
    Ok(out)
}

/// Reads one checkpoint file.
pub fn load(path: &Path) -> Result<Snapshot> {
    let mut file = TensorFile::read(path)?;
    if file.meta("checkpoint")? != CHECKPOINT_FORMAT {
        bail!("{}: not an {CHECKPOINT_FORMAT} checkpoint", path.display());
    }
    let config = config_from(&file)?;
    let groups = group_names(&file)?.map_or(1, |g| g.len());
    let n = [groups * config.num_params()];
    let m = file.take("adam.m", &n)?;
    let v = file.take("adam.v", &n)?;
    let phi = AnyPhi::take_from(&mut file, config)?;
    let counters: Counters = serde_json::from_str(file.meta("counters")?)
        .with_context(|| format!("{}: bad counters", path.display()))?;
    let saved: Config = toml::from_str(file.meta("config")?)
        .with_context(|| format!("{}: bad config", path.display()))?;
    // Checkpoints from before runs had an identity carry none.
    let run = file.metadata().get("run").cloned().unwrap_or_default();
    if run.len() > 128 {
        bail!("{}: run identity of {} bytes", path.display(), run.len());
    }
    Ok(Snapshot {
        run,
        phi,
        adam: Adam {
            config: saved.adam,
            m,
            v,
            t: file.meta_parse("adam_t")?,
        },
        epoch: file.meta_parse("epoch")?,
        version: file.meta_parse("version")?,
        sampler_state: file.meta_parse("sampler_state")?,
        counters,
    })
}

/// What a run directory's checkpoints hold: the newest loadable one, and the files newer
/// than it that could not be loaded (with why).
#[derive(Debug, Default)]
pub struct Scan {
    /// The newest checkpoint that loads.
    pub newest: Option<(PathBuf, Snapshot)>,
    /// Checkpoints newer than `newest` (or all, when none loads) that do not load.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// Loads the newest checkpoint in `dir` that can be loaded, noting the ones that cannot.
pub fn scan(dir: &Path) -> Result<Scan> {
    let mut out = Scan::default();
    for (_, path) in list(dir)?.into_iter().rev() {
        match load(&path) {
            Ok(s) => {
                out.newest = Some((path, s));
                break;
            }
            Err(e) => out.unreadable.push((path, format!("{e:#}"))),
        }
    }
    Ok(out)
}

/// The newest loadable checkpoint in `dir`, if any (for tools and tests; a starting
/// coordinator goes through [`crate::run_dir::prepare`], which refuses unreadable ones).
pub fn load_newest(dir: &Path) -> Result<Option<(PathBuf, Snapshot)>> {
    Ok(scan(dir)?.newest)
}

/// Fails with the path when the checkpoint directory cannot be written.
pub fn check_writable(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the run directory {}", dir.display()))?;
    let probe = dir.join(".l2l-write-probe");
    std::fs::write(&probe, b"ok")
        .with_context(|| format!("the run directory {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Coordinator;

    /// A run directory, its configuration and a fresh run's snapshot.
    fn fresh() -> (tempfile::TempDir, Config, Snapshot) {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            dir: dir.path().into(),
            ..Config::default()
        };
        let snap = Coordinator::new(config.clone(), crate::state::Start::fresh())
            .unwrap()
            .snapshot()
            .unwrap();
        (dir, config, snap)
    }

    #[test]
    fn keeps_the_newest_and_skips_a_damaged_one() {
        let (dir, config, mut snap) = fresh();
        for v in 1..=4 {
            snap.version = v;
            save(dir.path(), &snap, &config, 2).unwrap();
        }
        let names: Vec<u64> = list(dir.path())
            .unwrap()
            .into_iter()
            .map(|(v, _)| v)
            .collect();
        assert_eq!(names, vec![3, 4], "only the newest two are kept");
        // A newer file that does not load is never what retention keeps instead of a
        // loadable one: writing version 5 beside a damaged 9 keeps 4 and 5.
        std::fs::write(dir.path().join(file_name(9)), b"garbage").unwrap();
        snap.version = 5;
        save(dir.path(), &snap, &config, 2).unwrap();
        let names: Vec<u64> = list(dir.path()).unwrap().iter().map(|(v, _)| *v).collect();
        assert_eq!(names, vec![4, 5, 9]);
        std::fs::remove_file(dir.path().join(file_name(9))).unwrap();
        // A damaged newest checkpoint (e.g. a disk error) falls back to the previous one.
        std::fs::write(dir.path().join(file_name(5)), b"garbage").unwrap();
        let (path, found) = load_newest(dir.path()).unwrap().unwrap();
        assert_eq!(found.version, 4);
        assert!(path.ends_with(file_name(4)));
        // No checkpoint at all: a fresh start.
        let empty = tempfile::tempdir().unwrap();
        assert!(load_newest(empty.path()).unwrap().is_none());
        assert!(
            load_newest(&empty.path().join("missing"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_grouped_phi_and_its_moments_round_trip_under_the_names_of_spec_5() {
        let (dir, config, mut snap) = fresh();
        let opt = snap.phi.config();
        snap.phi = AnyPhi::init(opt, &["conv", "fc"], 3).unwrap();
        let n = snap.phi.num_params();
        snap.adam = Adam::new(config.adam, n);
        snap.adam.m = (0..n).map(|i| i as f32 * 1e-3).collect();
        snap.adam.v = (0..n).map(|i| (n - i) as f32 * 1e-4).collect();
        snap.version = 7;
        let path = save(dir.path(), &snap, &config, 2).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.phi, snap.phi);
        assert_eq!(back.adam, snap.adam);
        // Any reader of spec §5 sees φ; the moments are φ's size, in §5's flat order.
        let file = TensorFile::read(&path).unwrap();
        assert_eq!(file.meta("groups").unwrap(), "conv,fc");
        assert!(file.shape("fc.out.b").is_some() && file.shape("out.b").is_none());
        assert_eq!(file.shape("adam.m"), Some(&[n][..]));
        assert_eq!(AnyPhi::load(&path).unwrap(), snap.phi);
        // The burn optimizer's loader takes the checkpoint too (moments skipped).
        let groups = l2l_common::PhiGroups::load(&path).unwrap();
        assert_eq!(AnyPhi::from(groups), snap.phi);
    }
}
