//! The run directory: the run's identity and restart epoch (`run.json`), its checkpoints
//! and its final φ, and the decision a starting coordinator takes from them.
//!
//! Guarantees (README, "What happens when something fails"):
//! - the epoch a process serves is written (atomically) before it serves anything, so every
//!   restart fences the previous process's work, checkpoint or not;
//! - a directory that holds checkpoints none of which loads stops the start with a list of
//!   them; starting over there takes `--start-fresh`, which moves the old files aside;
//! - the final `phi.safetensors` names its run, and is never replaced by another run's φ.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use l2l_common::AnyPhi;
use l2l_common::files::{TensorFile, write_atomic};
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::state::Start;

/// The file holding the run's identity and current epoch.
pub const RUN_FILE: &str = "run.json";

/// The final φ of a run, written when it stops.
pub const PHI_FILE: &str = "phi.safetensors";

/// Format tag of [`RUN_FILE`].
pub const RUN_FORMAT: &str = "l2l-run/1";

/// Largest `run.json` read.
const MAX_RUN_FILE: u64 = 64 << 10;

/// The content of `run.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    /// Always [`RUN_FORMAT`].
    pub format: String,
    /// The run's identity (32 hex digits).
    pub run: String,
    /// The epoch of the newest process that started on this directory.
    pub epoch: u64,
}

/// A new run identity: 128 random bits as hex.
///
/// Should the system's random source fail, the time and process id are used instead: an
/// identity only has to differ between runs, it is not a secret.
pub fn new_run_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b = (t ^ ((std::process::id() as u128) << 64)).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Reads `run.json` from `dir`, if present; refuses a damaged one.
pub fn read_run_file(dir: &Path) -> Result<Option<RunFile>> {
    let path = dir.join(RUN_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut text = String::new();
    use std::io::Read;
    file.take(MAX_RUN_FILE + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let bad = |why: String| {
        anyhow::anyhow!(
            "{} is damaged ({why}); restore it, or pass --start-fresh to start a new run in {} \
             (the old files are moved aside)",
            path.display(),
            dir.display()
        )
    };
    if text.len() as u64 > MAX_RUN_FILE {
        return Err(bad(format!("larger than {MAX_RUN_FILE} bytes")));
    }
    let run: RunFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if run.format != RUN_FORMAT {
        return Err(bad(format!(
            "format {:?}, expected {RUN_FORMAT:?}",
            run.format
        )));
    }
    if run.run.is_empty() || run.run.len() > 128 {
        return Err(bad("run identity missing or too long".into()));
    }
    Ok(Some(run))
}

/// Writes `run.json` atomically.
fn write_run_file(dir: &Path, run: &RunFile) -> Result<()> {
    let json = serde_json::to_vec_pretty(run)?;
    write_atomic(&dir.join(RUN_FILE), &json)?;
    Ok(())
}

/// The run identity recorded in a φ file, if it has one.
fn phi_run(path: &Path) -> Result<Option<String>> {
    let file = TensorFile::read(path)?;
    Ok(file.metadata().get("run").cloned())
}

/// Moves a run's files (run file, checkpoints, final φ) into `dir/abandoned-<secs>/`;
/// returns that folder, or none when there was nothing to move.
fn abandon(dir: &Path) -> Result<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = checkpoint::list(dir)?.into_iter().map(|(_, p)| p).collect();
    for name in [
        RUN_FILE,
        PHI_FILE,
        crate::validation::BEST_FILE,
        crate::validation::VALIDATION_FILE,
    ] {
        let p = dir.join(name);
        if p.exists() {
            files.push(p);
        }
    }
    // Files set aside as unreadable by an earlier start belong to the old run too.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(".unreadable") {
                files.push(e.path());
            }
        }
    }
    if files.is_empty() {
        return Ok(None);
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let to = (0..)
        .map(|n| match n {
            0 => dir.join(format!("abandoned-{secs}")),
            n => dir.join(format!("abandoned-{secs}-{n}")),
        })
        .find(|p| !p.exists())
        .expect("an unused name");
    std::fs::create_dir(&to).with_context(|| format!("cannot create {}", to.display()))?;
    for f in files {
        let name = f.file_name().expect("a file name");
        std::fs::rename(&f, to.join(name))
            .with_context(|| format!("cannot move {} to {}", f.display(), to.display()))?;
    }
    Ok(Some(to))
}

/// What [`prepare`] decided.
#[derive(Debug)]
pub struct Prepared {
    /// The run, epoch and checkpoint to start the coordinator with.
    pub start: Start,
    /// The checkpoint resumed from, if any.
    pub resumed_from: Option<PathBuf>,
    /// Where `--start-fresh` moved an earlier run's files, if anywhere.
    pub abandoned: Option<PathBuf>,
}

/// Decides how a coordinator starts on `config.dir` and makes its epoch durable.
///
/// Resumes the newest loadable checkpoint (newer files that do not load are renamed
/// `*.unreadable` and reported); refuses to start when checkpoints exist and none loads,
/// when `run.json` is damaged, or when the files belong to different runs. With
/// `start_fresh`, an earlier run's files are first moved into `abandoned-<secs>/`.
pub fn prepare(dir: &Path, start_fresh: bool) -> Result<Prepared> {
    checkpoint::check_writable(dir)?;
    let abandoned = if start_fresh { abandon(dir)? } else { None };
    let run_file = read_run_file(dir)?;
    let scan = checkpoint::scan(dir)?;
    if scan.newest.is_none() && !scan.unreadable.is_empty() {
        let list: Vec<String> = scan
            .unreadable
            .iter()
            .map(|(p, e)| format!("  {}: {e}", p.display()))
            .collect();
        bail!(
            "{} holds checkpoints, and none of them can be loaded:\n{}\n\
             Refusing to start a new run over them. Restore a checkpoint, or pass \
             --start-fresh to start a new run here on purpose (the old files are moved \
             into {}/abandoned-<time>/).",
            dir.display(),
            list.join("\n"),
            dir.display()
        );
    }
    for (path, why) in &scan.unreadable {
        let aside = PathBuf::from(format!("{}.unreadable", path.display()));
        tracing::error!(path = %path.display(), error = %why, moved_to = %aside.display(),
            "a checkpoint newer than the one resumed cannot be loaded; set aside");
        std::fs::rename(path, &aside)
            .with_context(|| format!("cannot set {} aside", path.display()))?;
    }
    let resume = scan.newest;
    if let (Some(rf), Some((path, snap))) = (&run_file, &resume)
        && !snap.run.is_empty()
        && snap.run != rf.run
    {
        bail!(
            "{} belongs to run {} but {} says run {}: two runs share {}; move one away, \
             or pass --start-fresh to start a new run here",
            path.display(),
            snap.run,
            RUN_FILE,
            rf.run,
            dir.display()
        );
    }
    let continuing = run_file.is_some() || resume.is_some();
    let run = run_file
        .as_ref()
        .map(|r| r.run.clone())
        .or_else(|| {
            resume
                .as_ref()
                .map(|(_, s)| s.run.clone())
                .filter(|r| !r.is_empty())
        })
        .unwrap_or_else(new_run_id);
    check_final_phi(dir, &run, continuing)?;
    let epoch = if continuing {
        let seen = run_file.as_ref().map_or(0, |r| r.epoch);
        let saved = resume.as_ref().map_or(0, |(_, s)| s.epoch);
        seen.max(saved)
            .checked_add(1)
            .context("the epoch counter is exhausted")?
    } else {
        0
    };
    write_run_file(
        dir,
        &RunFile {
            format: RUN_FORMAT.into(),
            run: run.clone(),
            epoch,
        },
    )
    .context("cannot record the new epoch; nothing is served before it is durable")?;
    let resumed_from = resume.as_ref().map(|(p, _)| p.clone());
    Ok(Prepared {
        start: Start {
            run,
            epoch,
            resume: resume.map(|(_, s)| s),
        },
        resumed_from,
        abandoned,
    })
}

/// Refuses a final φ in `dir` that belongs to another run than `run`.
fn check_final_phi(dir: &Path, run: &str, continuing: bool) -> Result<()> {
    let path = dir.join(PHI_FILE);
    if !path.exists() {
        return Ok(());
    }
    let owner = phi_run(&path).with_context(|| {
        format!(
            "{} exists but cannot be read; move it away, or pass --start-fresh",
            path.display()
        )
    })?;
    match owner {
        Some(r) if r == run => Ok(()),
        // Written before φ files named their run: it is this run's if the run goes on.
        None if continuing => Ok(()),
        other => bail!(
            "{} holds the final φ of {}, not of this run; move it away or use another --dir \
             (or pass --start-fresh to move it aside)",
            path.display(),
            other.map_or("an earlier run".to_string(), |r| format!("run {r}"))
        ),
    }
}

/// Writes the run's final φ to `dir/phi.safetensors`, naming the run in its metadata;
/// refuses to replace a φ of another run.
pub fn save_final_phi(dir: &Path, run: &str, phi: &AnyPhi) -> Result<PathBuf> {
    let path = dir.join(PHI_FILE);
    if path.exists() {
        match phi_run(&path) {
            Ok(Some(r)) if r != run => bail!(
                "{} holds the final φ of run {r}; not replacing it with run {run}'s",
                path.display()
            ),
            _ => {}
        }
    }
    let meta = [("run".to_string(), run.to_string())].into();
    phi.save(&path, meta)?;
    Ok(path)
}

#[cfg(test)]
mod tests;
