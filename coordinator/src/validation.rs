//! Validation while meta-training: every `every` updates the run's φ becomes a job; a
//! worker in the evaluator role runs it and a tuned baseline on held-out instances and
//! returns the two mean loss curves; the run records their ratio (`validation.csv`) and
//! keeps the best φ by validation (`best.safetensors`) beside the last one.
//!
//! - **Held-out instances.** `instances` seeds from a range of their own (and
//!   `tune_instances` more for the baseline's learning rate), of `problem` (default: the
//!   first `[[problems]]` family). The training sampler draws 64-bit seeds at random, so it
//!   meets one of them with probability about 2⁻⁵⁷ per lease. Data families take their
//!   minibatches from the training split, like training. The networks, initialisations
//!   and minibatch orders are new; the test split stays for `l2l-worker eval`'s final
//!   report, so selecting by validation does not select on the report.
//! - **The score.** `ratio_mean` is the learned optimizer's mean loss over steps 1..S
//!   divided by the baseline's; `ratio_final` is the same at step S. `select` picks which
//!   one chooses the best φ; lower is better, and a diverged curve (+∞) never wins.
//! - **Jobs.** A fresh run's starting φ (version 0) is the first. At most [`MAX_WAITING`] wait for an evaluator; a newer one pushes out the
//!   oldest (counted as dropped). An evaluator holds one job at a time, for `timeout_ms`;
//!   a result after that, or for a job it does not hold, is refused.
//! - **Restarts.** The best score is read back from `best.safetensors` (its metadata), so
//!   a restarted run keeps comparing against it; jobs in flight are dropped (their φ
//!   versions belong to the old epoch) and the next due update queues a new one.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use l2l_common::AnyPhi;
use l2l_common::baselines::Baseline;
use l2l_common::problems::ProblemSpec;
use l2l_proto::v1::{Instance, SubmitValidationRequest, ValidateReply, ValidationStatus, Version};
use serde::{Deserialize, Serialize};

use crate::refusal::Refusal;

/// The validation curve, one row per validation, in the run directory.
pub const VALIDATION_FILE: &str = "validation.csv";

/// The best φ by validation, in the run directory.
pub const BEST_FILE: &str = "best.safetensors";

/// The header of [`VALIDATION_FILE`].
pub const CSV_HEADER: &str = "update,epoch,unix_seconds,steps,score,ratio_mean,ratio_fifth,ratio_half,ratio_final,learned_mean,baseline_mean,learned_final,baseline_final,baseline,baseline_lr,best";

/// Most held-out instances per validation.
pub const MAX_INSTANCES: usize = 256;

/// Most instances the baseline's rate is tuned on.
pub const MAX_TUNE_INSTANCES: usize = 64;

/// Longest validation curve: two curves of f64 (32 KB) fit in the request size limit's
/// slack above a gradient, so validation leaves that limit as it is.
pub const MAX_STEPS: u32 = 2_000;

/// Jobs waiting for an evaluator at most; a newer one pushes out the oldest.
pub const MAX_WAITING: usize = 2;

/// Longest time an evaluator may hold a job: a day.
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;

/// How long an evaluator waits before asking again when no job is waiting.
pub const RETRY_MS: u64 = 1000;

/// Seeds of the held-out instances and of the tuning instances: ranges of their own.
const HELD_OUT_SEEDS: u64 = 0x5641_4c49_4400_0000;
const TUNE_SEEDS: u64 = 0x5641_4c54_554e_0000;

/// Which ratio chooses the best φ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Select {
    /// The mean loss over steps 1..S (the whole curve).
    Mean,
    /// The loss at step S.
    Final,
}

impl std::fmt::Display for Select {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Select::Mean => "mean",
            Select::Final => "final",
        })
    }
}

/// Validation while meta-training (section `[validation]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationConfig {
    /// Validate every this many updates (0: never).
    pub every: u64,
    /// The problem validated on, e.g. `mlp` or `mlp:act=relu` (unset: the first
    /// `[[problems]]` family with its parameters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Held-out instances per validation.
    pub instances: usize,
    /// Other held-out instances the baseline's learning rate is tuned on.
    pub tune_instances: usize,
    /// Optimizee steps S of each curve (0: the run's trajectory_steps).
    pub steps: u32,
    /// The baseline: sgd, rmsprop, adam or nag.
    pub baseline: String,
    /// The baseline's learning rate (0: the evaluator tunes it, four rates per decade
    /// from 1e-4 to 10 refined to 1/16 of a decade, once per evaluator process).
    pub learning_rate: f64,
    /// Which ratio chooses the best φ: `mean` or `final`.
    pub select: Select,
    /// Milliseconds an evaluator may take for one job.
    pub timeout_ms: u64,
    /// Seed of the held-out instances.
    pub seed: u64,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            every: 0,
            problem: None,
            instances: 8,
            tune_instances: 4,
            steps: 0,
            baseline: "adam".into(),
            learning_rate: 0.0,
            select: Select::Mean,
            timeout_ms: 600_000,
            seed: 0,
        }
    }
}

impl ValidationConfig {
    /// True when the run validates.
    pub fn enabled(&self) -> bool {
        self.every > 0
    }

    /// Refuses values that cannot run, naming the field.
    pub fn validate(&self) -> Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        if !(1..=MAX_INSTANCES).contains(&self.instances) {
            bail!(
                "validation.instances must be in 1..={MAX_INSTANCES}, got {}",
                self.instances
            );
        }
        if !(1..=MAX_TUNE_INSTANCES).contains(&self.tune_instances) {
            bail!(
                "validation.tune_instances must be in 1..={MAX_TUNE_INSTANCES}, got {}",
                self.tune_instances
            );
        }
        if self.steps > MAX_STEPS {
            bail!(
                "validation.steps must be at most {MAX_STEPS}, got {}",
                self.steps
            );
        }
        self.baseline
            .parse::<Baseline>()
            .map_err(|e| anyhow::anyhow!("validation.baseline: {e}"))?;
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            bail!(
                "validation.learning_rate must be 0 (tune it) or a positive rate, got {}",
                self.learning_rate
            );
        }
        if !(1..=MAX_TIMEOUT_MS).contains(&self.timeout_ms) {
            bail!(
                "validation.timeout_ms must be in 1..={MAX_TIMEOUT_MS} (a day), got {}",
                self.timeout_ms
            );
        }
        if let Some(p) = &self.problem {
            p.parse::<ProblemSpec>()
                .map_err(|e| anyhow::anyhow!("validation.problem: {e}"))?;
        }
        Ok(())
    }
}

/// A φ version waiting for, or held by, an evaluator.
#[derive(Debug, Clone)]
struct Job {
    id: u64,
    version: Version,
    phi: AnyPhi,
    bytes: Bytes,
}

/// A job an evaluator holds.
#[derive(Debug, Clone)]
struct Running {
    job: Job,
    worker: u64,
    deadline: Instant,
}

/// One validation's result: a row of [`VALIDATION_FILE`].
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The validated φ's version.
    pub version: Version,
    /// S.
    pub steps: u32,
    /// The selected ratio (lower is better).
    pub score: f64,
    /// Learned / baseline of the mean loss over steps 1..S.
    pub ratio_mean: f64,
    /// Learned / baseline at steps S/5, S/2 and S.
    pub ratio_fifth: f64,
    /// At S/2.
    pub ratio_half: f64,
    /// At S.
    pub ratio_final: f64,
    /// The learned optimizer's mean loss over steps 1..S.
    pub learned_mean: f64,
    /// The baseline's.
    pub baseline_mean: f64,
    /// The learned optimizer's loss at step S.
    pub learned_final: f64,
    /// The baseline's.
    pub baseline_final: f64,
    /// The baseline's name.
    pub baseline: &'static str,
    /// Its learning rate.
    pub baseline_lr: f64,
    /// True when this is the best φ so far.
    pub best: bool,
}

impl Record {
    /// The record as a CSV row (after [`CSV_HEADER`]), stamped `unix_seconds`.
    pub fn csv_row(&self, unix_seconds: u64) -> String {
        format!(
            "{},{},{unix_seconds},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            self.version.step,
            self.version.epoch,
            self.steps,
            self.score,
            self.ratio_mean,
            self.ratio_fifth,
            self.ratio_half,
            self.ratio_final,
            self.learned_mean,
            self.baseline_mean,
            self.learned_final,
            self.baseline_final,
            self.baseline,
            self.baseline_lr,
            u8::from(self.best)
        )
    }
}

/// A job's φ that beats the run's best: what to write to [`BEST_FILE`], and to confirm
/// with [`Validator::confirm_best`] once written.
#[derive(Debug, Clone)]
pub struct NewBest {
    /// Its version.
    pub version: Version,
    /// Its score.
    pub score: f64,
    /// φ.
    pub phi: AnyPhi,
    /// Its file's metadata (run, version, score, how it was validated).
    pub metadata: HashMap<String, String>,
}

/// The validation jobs and results of a run.
pub struct Validator {
    config: ValidationConfig,
    steps: u32,
    baseline: Baseline,
    spec: ProblemSpec,
    instances: Vec<Instance>,
    tune: Vec<Instance>,
    waiting: VecDeque<Job>,
    running: HashMap<u64, Running>,
    next_job: u64,
    done: u64,
    dropped: u64,
    last: Option<Record>,
    best: Option<(Version, f64)>,
}

impl Validator {
    /// The validator of a run (none when `config.every` is 0) serving `epoch`, for runs of
    /// `trajectory_steps` whose first family is `first`; `best` is the best so far (from
    /// [`read_best`]), ignored when it was measured otherwise (another problem, baseline,
    /// horizon, number of instances or score).
    pub fn new(
        config: &ValidationConfig,
        first: &ProblemSpec,
        trajectory_steps: u32,
        epoch: u64,
        best: Option<Best>,
    ) -> Result<Option<Self>> {
        if !config.enabled() {
            return Ok(None);
        }
        config.validate()?;
        let spec = match &config.problem {
            Some(p) => p
                .parse::<ProblemSpec>()
                .map_err(|e| anyhow::anyhow!("validation.problem: {e}"))?,
            None => first.clone(),
        };
        let steps = match config.steps {
            0 => trajectory_steps.min(MAX_STEPS),
            s => s,
        };
        let draw = |base: u64, n: usize| -> Vec<Instance> {
            (0..n as u64)
                .map(|i| Instance::of(&spec, (base ^ config.seed).wrapping_add(i)))
                .collect()
        };
        let measured = measured(config, &spec, steps);
        let best = match best {
            Some(b) if b.measured == measured => Some((b.version, b.score)),
            Some(b) => {
                tracing::warn!(
                    was = %b.measured,
                    now = %measured,
                    "the best φ on disk was validated otherwise; the next validation replaces it"
                );
                None
            }
            None => None,
        };
        Ok(Some(Self {
            instances: draw(HELD_OUT_SEEDS, config.instances),
            tune: if config.learning_rate > 0.0 {
                Vec::new()
            } else {
                draw(TUNE_SEEDS, config.tune_instances)
            },
            baseline: config.baseline.parse()?,
            steps,
            spec,
            config: config.clone(),
            waiting: VecDeque::new(),
            running: HashMap::new(),
            next_job: (epoch << 32) + 1,
            done: 0,
            dropped: 0,
            last: None,
            best,
        }))
    }

    /// The problem validated on.
    pub fn spec(&self) -> &ProblemSpec {
        &self.spec
    }

    /// True when an update to `step` should be validated.
    pub fn is_due(&self, step: u64) -> bool {
        step > 0 && step.is_multiple_of(self.config.every)
    }

    /// Queues φ at `version` (encoded as `bytes`) for validation.
    pub fn queue(&mut self, version: Version, phi: AnyPhi, bytes: Bytes) {
        if self.waiting.len() >= MAX_WAITING
            && let Some(old) = self.waiting.pop_front()
        {
            self.dropped += 1;
            tracing::warn!(
                version = old.version.step,
                "validation of an older φ dropped: no evaluator took it in time (run more evaluators?)"
            );
        }
        let id = self.next_job;
        self.next_job += 1;
        self.waiting.push_back(Job {
            id,
            version,
            phi,
            bytes,
        });
    }

    /// Hands `worker` the oldest waiting job (dropping any job it held), or a reply that
    /// says to ask again later.
    pub fn take(&mut self, worker: u64, now: Instant) -> ValidateReply {
        let before = self.running.len();
        self.running.retain(|_, r| r.worker != worker);
        self.dropped += (before - self.running.len()) as u64;
        let Some(job) = self.waiting.pop_front() else {
            return ValidateReply {
                enabled: true,
                retry_ms: RETRY_MS,
                ..Default::default()
            };
        };
        let reply = ValidateReply {
            enabled: true,
            job_id: job.id,
            retry_ms: RETRY_MS,
            version: Some(job.version),
            phi: job.bytes.clone(),
            instances: self.instances.clone(),
            tune_instances: self.tune.clone(),
            steps: self.steps,
            baseline: self.baseline.name().into(),
            learning_rate: self.config.learning_rate,
            timeout_ms: self.config.timeout_ms,
        };
        tracing::info!(
            worker,
            job = job.id,
            version = job.version.step,
            "validation job handed out"
        );
        self.running.insert(
            job.id,
            Running {
                job,
                worker,
                deadline: now + Duration::from_millis(self.config.timeout_ms),
            },
        );
        reply
    }

    /// Checks a result of `worker` against the job it holds, without consuming it.
    pub fn check(&self, req: &SubmitValidationRequest) -> Result<(), Refusal> {
        let r = self
            .running
            .get(&req.job_id)
            .ok_or(Refusal::UnknownJob { job: req.job_id })?;
        if r.worker != req.worker_id {
            return Err(Refusal::ForeignJob { job: req.job_id });
        }
        let want = self.steps as usize + 1;
        for (name, curve) in [("learned", &req.learned), ("baseline", &req.baseline)] {
            if curve.len() != want {
                return Err(Refusal::BadCurve {
                    why: format!(
                        "the {name} curve has {} values, the job's {} steps need {want}",
                        curve.len(),
                        self.steps
                    ),
                });
            }
            // +∞ is a diverged run; NaN and −∞ are never losses a worker should report.
            if let Some(t) = curve
                .iter()
                .position(|v| v.is_nan() || *v == f64::NEG_INFINITY)
            {
                return Err(Refusal::BadCurve {
                    why: format!("the {name} curve's value at step {t} is {}", curve[t]),
                });
            }
        }
        if !(req.baseline_lr.is_finite() && req.baseline_lr > 0.0) {
            return Err(Refusal::BadCurve {
                why: format!(
                    "the baseline's learning rate {} is not a positive number",
                    req.baseline_lr
                ),
            });
        }
        Ok(())
    }

    /// Records a result that passed [`Validator::check`]: its row, and the φ to write as
    /// the best when it beats every earlier one of the run.
    pub fn complete(
        &mut self,
        req: &SubmitValidationRequest,
        run: &str,
    ) -> Result<(Record, Option<NewBest>), Refusal> {
        self.check(req)?;
        let Some(r) = self.running.remove(&req.job_id) else {
            return Err(Refusal::UnknownJob { job: req.job_id });
        };
        let s = self.steps as usize;
        let mean = |c: &[f64]| c[1..].iter().sum::<f64>() / s.max(1) as f64;
        let ratio = |l: f64, b: f64| {
            if b > 0.0 && b.is_finite() {
                l / b
            } else {
                f64::NAN
            }
        };
        let (lm, bm) = (mean(&req.learned), mean(&req.baseline));
        let at = |t: usize| ratio(req.learned[t], req.baseline[t]);
        let mut rec = Record {
            version: r.job.version,
            steps: self.steps,
            score: 0.0,
            ratio_mean: ratio(lm, bm),
            ratio_fifth: at((s / 5).max(1).min(s)),
            ratio_half: at((s / 2).max(1).min(s)),
            ratio_final: at(s),
            learned_mean: lm,
            baseline_mean: bm,
            learned_final: req.learned[s],
            baseline_final: req.baseline[s],
            baseline: self.baseline.name(),
            baseline_lr: req.baseline_lr,
            best: false,
        };
        rec.score = match self.config.select {
            Select::Mean => rec.ratio_mean,
            Select::Final => rec.ratio_final,
        };
        rec.best = rec.score.is_finite() && self.best.is_none_or(|(_, b)| rec.score < b);
        self.done += 1;
        let best = rec.best.then(|| {
            let v = rec.version;
            NewBest {
                version: v,
                score: rec.score,
                phi: r.job.phi.clone(),
                metadata: HashMap::from([
                    ("run".to_string(), run.to_string()),
                    ("version".to_string(), format!("{}.{}", v.epoch, v.step)),
                    ("validation_score".to_string(), rec.score.to_string()),
                    (
                        "validation_select".to_string(),
                        self.config.select.to_string(),
                    ),
                    (
                        "validation_baseline".to_string(),
                        self.baseline.name().to_string(),
                    ),
                    (
                        "validation_baseline_lr".to_string(),
                        req.baseline_lr.to_string(),
                    ),
                    ("validation_steps".to_string(), self.steps.to_string()),
                    (
                        "validation_measured".to_string(),
                        measured(&self.config, &self.spec, self.steps),
                    ),
                    ("validation_problem".to_string(), self.spec.to_string()),
                    (
                        "validation_instances".to_string(),
                        self.instances.len().to_string(),
                    ),
                ]),
            }
        });
        tracing::info!(
            version = rec.version.step,
            ratio_mean = rec.ratio_mean,
            ratio_final = rec.ratio_final,
            best = rec.best,
            "validation recorded"
        );
        self.last = Some(rec.clone());
        Ok((rec, best))
    }

    /// Makes `version` the run's best with `score`, once its file is written (a φ whose
    /// file could not be written is not the best: later ones are compared with the last
    /// best on disk).
    pub fn confirm_best(&mut self, version: Version, score: f64) {
        if self.best.is_none_or(|(_, b)| score < b) {
            self.best = Some((version, score));
        }
    }

    /// True when `worker` holds a job (it computes and calls nothing meanwhile, so it is
    /// not to be forgotten as silent).
    pub fn holds(&self, worker: u64) -> bool {
        self.running.values().any(|r| r.worker == worker)
    }

    /// Puts job `job` back at the head of the queue for another evaluator (its evaluator
    /// cannot compute it, e.g. it has another data set than the run's).
    pub fn release(&mut self, job: u64) {
        if let Some(r) = self.running.remove(&job) {
            self.waiting.push_front(r.job);
            self.waiting.truncate(MAX_WAITING);
        }
    }

    /// Drops jobs whose evaluator went silent past their deadline.
    pub fn expire(&mut self, now: Instant) {
        let before = self.running.len();
        self.running.retain(|_, r| r.deadline > now);
        let n = before - self.running.len();
        if n > 0 {
            self.dropped += n as u64;
            tracing::warn!(
                jobs = n,
                "validation jobs expired: their evaluators went silent"
            );
        }
    }

    /// True when no job waits or runs.
    pub fn idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// True when the families of this validation need a data set.
    pub fn needs_data(&self) -> bool {
        self.spec.needs_data()
    }

    /// The newest record, if any.
    pub fn last(&self) -> Option<&Record> {
        self.last.as_ref()
    }

    /// The best version and score so far.
    pub fn best(&self) -> Option<(Version, f64)> {
        self.best
    }

    /// The status's validation part.
    pub fn status(&self) -> ValidationStatus {
        ValidationStatus {
            every: self.config.every,
            baseline: self.baseline.name().into(),
            select: self.config.select.to_string(),
            done: self.done,
            dropped: self.dropped,
            waiting: self.waiting.len() as u64,
            running: self.running.len() as u64,
            last_version: self.last.as_ref().map(|r| r.version),
            last_ratio_mean: self.last.as_ref().map_or(0.0, |r| r.ratio_mean),
            last_ratio_final: self.last.as_ref().map_or(0.0, |r| r.ratio_final),
            best_version: self.best.map(|(v, _)| v),
            best_score: self.best.map_or(0.0, |(_, s)| s),
        }
    }
}

/// How a run's validations are measured, as one line: two bests compare only when equal.
fn measured(config: &ValidationConfig, spec: &ProblemSpec, steps: u32) -> String {
    format!(
        "{} of {} instances of {spec}, {steps} steps, seed {}, against {} (rate {})",
        config.select,
        config.instances,
        config.seed,
        config.baseline,
        if config.learning_rate > 0.0 {
            config.learning_rate.to_string()
        } else {
            format!("tuned on {}", config.tune_instances)
        }
    )
}

/// The best φ of a run on disk: its version, its score, and how it was measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Best {
    /// Its version.
    pub version: Version,
    /// Its score.
    pub score: f64,
    /// How it was measured (empty when the file does not say).
    pub measured: String,
}

/// The best φ recorded in `dir`'s [`BEST_FILE`] for `run`; none when there is no such
/// file, or it belongs to another run. A file that cannot be read is an error: it would
/// be replaced without knowing what it held.
pub fn read_best(dir: &Path, run: &str) -> Result<Option<Best>> {
    let path = dir.join(BEST_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let file = l2l_common::files::TensorFile::read(&path).map_err(|e| {
        anyhow::anyhow!(
            "{e}; move {} aside to let the run choose its best φ again",
            path.display()
        )
    })?;
    let meta = file.metadata();
    if meta.get("run").map(String::as_str) != Some(run) {
        return Ok(None);
    }
    let version = meta.get("version").and_then(|v| {
        let (e, s) = v.split_once('.')?;
        Some(Version {
            epoch: e.parse().ok()?,
            step: s.parse().ok()?,
        })
    });
    let score = meta
        .get("validation_score")
        .and_then(|s| s.parse::<f64>().ok());
    match (version, score) {
        (Some(version), Some(score)) if score.is_finite() => Ok(Some(Best {
            version,
            score,
            measured: meta.get("validation_measured").cloned().unwrap_or_default(),
        })),
        _ => bail!(
            "{} has no readable version and validation_score; move it aside to let the run \
             choose its best φ again",
            path.display()
        ),
    }
}

/// For a new best, writes [`BEST_FILE`] atomically (a failure is logged, and the row then
/// says the φ is not the best), then appends `record` to `dir`'s [`VALIDATION_FILE`] (with
/// the header when the file is new); true when the best was written.
pub fn write(dir: &Path, record: &mut Record, best: Option<&NewBest>) -> Result<bool> {
    use std::io::Write;
    let mut written = false;
    if let Some(b) = best {
        let p = dir.join(BEST_FILE);
        match b.phi.save(&p, b.metadata.clone()) {
            Ok(()) => written = true,
            Err(e) => {
                tracing::error!(error = %e, path = %p.display(), "cannot write the best φ; it is not counted as the best");
                record.best = false;
            }
        }
    }
    let path = dir.join(VALIDATION_FILE);
    let new = !path.exists();
    // A row cut short by a crash mid-append is ended, so it does not swallow this one.
    let cut = !new
        && std::fs::File::open(&path)
            .and_then(|mut f| {
                use std::io::{Read, Seek, SeekFrom};
                if f.seek(SeekFrom::End(0))? == 0 {
                    return Ok(false);
                }
                f.seek(SeekFrom::End(-1))?;
                let mut last = [0u8];
                f.read_exact(&mut last)?;
                Ok(last[0] != b'\n')
            })
            .unwrap_or(false);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut text = String::new();
    if cut {
        text.push('\n');
    }
    if new {
        text.push_str(CSV_HEADER);
        text.push('\n');
    }
    text.push_str(&record.csv_row(unix));
    text.push('\n');
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_data())
        .map_err(|e| anyhow::anyhow!("cannot append to {}: {e}", path.display()))?;
    Ok(written)
}

#[cfg(test)]
mod tests;
