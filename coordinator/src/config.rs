//! The coordinator's configuration: a TOML file and/or flags, printed at start.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Result, bail};
use l2l_common::estimator::{Estimator, PesConfig};
use l2l_common::{OptimizerConfig, Preprocess};
use serde::{Deserialize, Serialize};

use crate::adam::AdamConfig;
use crate::guard::GuardConfig;
use crate::sampler::FamilyConfig;
use crate::validation::ValidationConfig;

/// Largest S: a lease records one flag per truncation and carries one weight per step.
pub const MAX_TRAJECTORY_STEPS: u32 = 1_000_000;

/// How accepted gradients become updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// A round of `quorum` gradients of the current version, or fewer when its deadline passes.
    Sync,
    /// An update every `every` accepted gradients no staler than `max_staleness`.
    Async,
}

/// Aggregation rule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AggregationConfig {
    /// `sync` or `async`.
    pub mode: Mode,
    /// sync: gradients of the current version that close a round.
    pub quorum: usize,
    /// sync: a round with at least one gradient closes this long after its first one.
    pub round_timeout_ms: u64,
    /// async: accepted gradients per update.
    pub every: usize,
    /// async: largest accepted staleness (current version − gradient's version).
    pub max_staleness: u64,
}

impl Default for AggregationConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Sync,
            quorum: 2,
            round_timeout_ms: 2000,
            every: 2,
            max_staleness: 4,
        }
    }
}

/// How workers estimate each truncation's gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EstimatorKind {
    /// Truncated backpropagation through time (spec §2): one forward and backward pass.
    Tbptt,
    /// Persistent evolution strategies: forward only, unbiased across truncations.
    Pes,
}

/// The run's gradient estimator (section `[estimator]`), carried on every lease.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EstimatorConfig {
    /// `tbptt` or `pes`.
    pub kind: EstimatorKind,
    /// pes: standard deviation of each coordinate of a perturbation of φ.
    pub sigma: f64,
    /// pes: antithetic pairs of particles per trajectory (each pair: two unrolls per
    /// truncation).
    pub pairs: usize,
}

impl Default for EstimatorConfig {
    fn default() -> Self {
        let pes = PesConfig::default();
        Self {
            kind: EstimatorKind::Tbptt,
            sigma: pes.sigma as f64,
            pairs: pes.pairs,
        }
    }
}

impl EstimatorConfig {
    /// The estimator workers run; refuses PES settings that cannot run.
    pub fn estimator(&self) -> Result<Estimator> {
        match self.kind {
            EstimatorKind::Tbptt => Ok(Estimator::Tbptt),
            EstimatorKind::Pes => {
                let c = PesConfig {
                    sigma: self.sigma as f32,
                    pairs: self.pairs,
                };
                c.validate()
                    .map_err(|e| anyhow::anyhow!("estimator: {e}"))?;
                Ok(Estimator::Pes(c))
            }
        }
    }
}

/// A stage of a curriculum over trajectory and truncation length (section
/// `[[curriculum]]`): from update `from` on, leases carry these S and T (Chen et al.,
/// "Training Stronger Baselines for Learning to Optimize", NeurIPS 2020: short unrolls
/// first, longer ones once φ is past its first, unstable updates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// The first update of the stage.
    pub from: u64,
    /// S, optimizee steps per trajectory.
    pub trajectory_steps: u32,
    /// T, steps per truncation (must divide S).
    pub truncation_steps: u32,
}

/// Refuses an S and T that cannot run, naming `what`.
fn check_shape(what: &str, s: u32, t: u32) -> Result<()> {
    if t == 0 || s == 0 || !s.is_multiple_of(t) {
        bail!("{what}trajectory_steps ({s}) must be a positive multiple of truncation_steps ({t})");
    }
    if s > MAX_TRAJECTORY_STEPS {
        bail!("{what}trajectory_steps ({s}) must be at most {MAX_TRAJECTORY_STEPS}");
    }
    Ok(())
}

/// The optimizer φ a fresh run starts from (spec §1.1, §1.6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InitConfig {
    /// `log_sign` (the paper's), `identity` or `rnnprop` (l2l's third, README).
    pub preprocess: String,
    /// LSTM hidden size.
    pub hidden: usize,
    /// LSTM layers.
    pub layers: usize,
    /// log_sign's k.
    pub k: f64,
    /// Output scale; unset: the spec's default for the preprocessing (0.1 with
    /// `log_sign` and `rnnprop`, 1.0 with `identity`; 0, as older files wrote it, means
    /// the same).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_scale: Option<f64>,
    /// Seed of φ's initial weights.
    pub seed: u64,
    /// Start from this φ (an optimizer file or a coordinator checkpoint) instead of fresh
    /// weights; its own configuration then replaces the fields above.
    pub phi: Option<PathBuf>,
}

impl Default for InitConfig {
    fn default() -> Self {
        Self {
            preprocess: "log_sign".into(),
            hidden: 20,
            layers: 2,
            k: 10.0,
            out_scale: None,
            seed: 0,
            phi: None,
        }
    }
}

/// Who may call the coordinator, and over what. The token itself never appears here:
/// it is read from `token_file` or `$L2L_TOKEN`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// File holding the shared token every worker must present (unset: `$L2L_TOKEN`,
    /// or no token).
    pub token_file: Option<PathBuf>,
    /// PEM certificate (chain) of the coordinator; with `tls_key`, serves TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate; when set, every client must present a certificate it signed.
    pub tls_client_ca: Option<PathBuf>,
}

/// Everything `l2l-coordinator serve` runs by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC service listens on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Address of the Prometheus endpoint `/metrics` (unset: none).
    pub metrics_listen: Option<SocketAddr>,
    /// Directory of checkpoints and the final φ; a run resumes from the newest checkpoint here.
    pub dir: PathBuf,
    /// Seed of the instance sampler.
    pub seed: u64,
    /// Stop after this many updates of φ (0 = run until stopped).
    pub max_updates: u64,
    /// S, optimizee steps per trajectory.
    pub trajectory_steps: u32,
    /// T, steps per truncation (must divide S).
    pub truncation_steps: u32,
    /// p of the meta-loss weights w_t ∝ t^p over a trajectory's steps t = 1..S, scaled
    /// to mean 1 (spec §2): 0 weighs every step alike (the spec's default), 1 grows
    /// linearly toward the end, against truncated training's short-horizon bias.
    pub meta_loss_weight_power: f64,
    /// Milliseconds a lease lives without a heartbeat or submission.
    pub lease_timeout_ms: u64,
    /// Checkpoint every this many updates (0 = never by count).
    pub checkpoint_every_updates: u64,
    /// Checkpoint at least this often, in seconds (0 = never by time).
    pub checkpoint_every_seconds: u64,
    /// Checkpoints kept in `dir`.
    pub checkpoint_keep: usize,
    /// Most workers registered at once; a registration beyond is refused.
    pub max_workers: usize,
    /// Forget a worker not seen for this long, in ms (0 = 10 lease timeouts, at least a
    /// minute); its next request is refused `unknown_worker` and it registers again.
    pub forget_workers_after_ms: u64,
    /// Require the shared token on `/metrics` too (Prometheus: `authorization.credentials_file`).
    pub metrics_require_token: bool,
    /// The starting φ.
    pub init: InitConfig,
    /// The meta-optimizer.
    pub adam: AdamConfig,
    /// What one gradient may do: the size rule and the clip of updates.
    pub guard: GuardConfig,
    /// How workers estimate the gradient of each truncation.
    pub estimator: EstimatorConfig,
    /// The aggregation rule.
    pub aggregation: AggregationConfig,
    /// Validation while meta-training, by workers in the evaluator role.
    pub validation: ValidationConfig,
    /// Token and TLS.
    pub security: SecurityConfig,
    /// Problem families instances are sampled from, by weight.
    pub problems: Vec<FamilyConfig>,
    /// Stages of trajectory and truncation length by update (none: `trajectory_steps`
    /// and `truncation_steps` throughout; before the first stage's `from`, those too).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub curriculum: Vec<Stage>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: None,
            dir: PathBuf::from("l2l-run"),
            seed: 0,
            max_updates: 0,
            trajectory_steps: 100,
            truncation_steps: 20,
            meta_loss_weight_power: 0.0,
            lease_timeout_ms: 30_000,
            checkpoint_every_updates: 100,
            checkpoint_every_seconds: 60,
            checkpoint_keep: 3,
            max_workers: 4096,
            forget_workers_after_ms: 0,
            metrics_require_token: false,
            init: InitConfig::default(),
            adam: AdamConfig::default(),
            guard: GuardConfig::default(),
            estimator: EstimatorConfig::default(),
            aggregation: AggregationConfig::default(),
            validation: ValidationConfig::default(),
            security: SecurityConfig::default(),
            problems: vec![FamilyConfig::default()],
            curriculum: Vec::new(),
        }
    }
}

/// Overlays `top` on `base`, table by table (arrays and values are replaced whole).
fn merge(base: &mut toml::Table, top: toml::Table) {
    for (k, v) in top {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge(b, t),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

impl Config {
    /// Reads a TOML file; fields it leaves out keep the defaults of `serve`.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self> {
        Self::from_toml_file_over(&Config::default(), path)
    }

    /// Reads a TOML file over `base`: fields the file leaves out keep `base`'s values
    /// (so `local --config` starts from the local mode's defaults, `serve` from serve's).
    pub fn from_toml_file_over(base: &Config, path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        let bad = |e: &dyn std::fmt::Display| anyhow::anyhow!("config {}: {e}", path.display());
        // Checked on its own first, so unknown fields are named as the file spells them.
        toml::from_str::<Config>(&text).map_err(|e| bad(&e))?;
        let file: toml::Table = toml::from_str(&text).map_err(|e| bad(&e))?;
        let mut merged: toml::Table = toml::from_str(&base.to_toml()).map_err(|e| bad(&e))?;
        merge(&mut merged, file);
        merged.try_into().map_err(|e| bad(&e))
    }

    /// The configuration as TOML, for the start-up log and checkpoints.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print config: {e}"))
    }

    /// The TOML as printed at start, followed by each problem family with every
    /// parameter written out (defaults included), as comments.
    pub fn describe(&self) -> String {
        let mut out = self.to_toml();
        for p in &self.problems {
            if let Ok(spec) = p.spec() {
                out.push_str(&format!("# sampled: {spec} (weight {})\n", p.weight));
            }
        }
        out
    }

    /// (S, T) of the leases granted at φ version `update`: the curriculum's last stage
    /// that has begun, or the top-level lengths.
    pub fn shape_at(&self, update: u64) -> (u32, u32) {
        self.curriculum
            .iter()
            .rev()
            .find(|s| s.from <= update)
            .map_or((self.trajectory_steps, self.truncation_steps), |s| {
                (s.trajectory_steps, s.truncation_steps)
            })
    }

    /// The longest S of the run (over the curriculum too).
    pub fn max_trajectory_steps(&self) -> u32 {
        self.curriculum
            .iter()
            .map(|s| s.trajectory_steps)
            .fold(self.trajectory_steps, u32::max)
    }

    /// The meta-loss weight of each step 1..=S of a trajectory, mean 1; empty when all
    /// are 1 (p = 0).
    pub fn step_weights(&self) -> Vec<f32> {
        self.step_weights_for(self.trajectory_steps)
    }

    /// [`Config::step_weights`] for trajectories of `s` steps.
    pub fn step_weights_for(&self, s: u32) -> Vec<f32> {
        let p = self.meta_loss_weight_power;
        if p == 0.0 {
            return Vec::new();
        }
        let raw: Vec<f64> = (1..=s).map(|t| (t as f64).powf(p)).collect();
        let mean = raw.iter().sum::<f64>() / raw.len().max(1) as f64;
        raw.iter().map(|w| (w / mean) as f32).collect()
    }

    /// How long a worker may stay silent before it is forgotten, in ms.
    pub fn forget_workers_after_ms(&self) -> u64 {
        match self.forget_workers_after_ms {
            0 => self.lease_timeout_ms.saturating_mul(10).max(60_000),
            ms => ms,
        }
    }

    /// Lease records kept (live, finished and expired), enough for every worker's live
    /// lease and a few recent ones each.
    pub fn max_lease_records(&self) -> usize {
        self.max_workers.saturating_mul(4).max(1024)
    }

    /// The optimizer configuration of a fresh φ.
    pub fn optimizer(&self) -> Result<OptimizerConfig> {
        let preprocess: Preprocess = self.init.preprocess.parse()?;
        let out_scale = match self.init.out_scale {
            None | Some(0.0) => preprocess.default_out_scale(),
            Some(s) => s,
        };
        let c = OptimizerConfig {
            preprocess,
            k: self.init.k,
            hidden: self.init.hidden,
            layers: self.init.layers,
            out_scale,
        };
        c.validate()?;
        Ok(c)
    }

    /// Refuses values that cannot run, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.optimizer()?;
        check_shape("", self.trajectory_steps, self.truncation_steps)?;
        for (i, stage) in self.curriculum.iter().enumerate() {
            let what = format!("curriculum stage {} (from update {}): ", i + 1, stage.from);
            check_shape(&what, stage.trajectory_steps, stage.truncation_steps)?;
            if i > 0 && stage.from <= self.curriculum[i - 1].from {
                bail!("{what}stages must be in order of `from`, each later than the one before");
            }
        }
        let p = self.meta_loss_weight_power;
        if !(p.is_finite() && (0.0..=8.0).contains(&p)) {
            bail!("meta_loss_weight_power must be in 0..=8, got {p}");
        }
        if self.lease_timeout_ms == 0 {
            bail!("lease_timeout_ms must be positive");
        }
        let a = &self.aggregation;
        if a.quorum == 0 || a.every == 0 {
            bail!("aggregation.quorum and aggregation.every must be at least 1");
        }
        if self.problems.is_empty() {
            bail!("problems: at least one problem family is needed");
        }
        for p in &self.problems {
            p.validate()?;
        }
        self.adam.validate().map_err(anyhow::Error::msg)?;
        self.guard.validate().map_err(anyhow::Error::msg)?;
        self.estimator.estimator()?;
        self.validation.validate()?;
        if !(1..=1_000_000).contains(&self.max_workers) {
            bail!(
                "max_workers must be in 1..=1000000, got {}",
                self.max_workers
            );
        }
        if self.forget_workers_after_ms != 0
            && self.forget_workers_after_ms <= self.lease_timeout_ms
        {
            bail!(
                "forget_workers_after_ms ({}) must be longer than lease_timeout_ms ({}), or 0",
                self.forget_workers_after_ms,
                self.lease_timeout_ms
            );
        }
        if self.checkpoint_keep == 0 {
            bail!("checkpoint_keep must be at least 1");
        }
        let sec = &self.security;
        if sec.tls_cert.is_some() != sec.tls_key.is_some() {
            bail!("security.tls_cert and security.tls_key go together: give both or neither");
        }
        if sec.tls_client_ca.is_some() && sec.tls_cert.is_none() {
            bail!("security.tls_client_ca needs TLS: give security.tls_cert and tls_key too");
        }
        if self.metrics_listen == Some(self.listen) && self.listen.port() != 0 {
            bail!(
                "metrics_listen and listen are both {}; give metrics its own port",
                self.listen
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shipped recipe (`pretrained/*.toml`) parses and passes validation, and its
    /// `[init]` makes a φ configuration (a recipe that could not start would ship broken;
    /// a recipe that starts from a φ file takes that file's configuration at run time).
    #[test]
    fn every_shipped_recipe_is_a_valid_configuration() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pretrained");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let c = Config::from_toml_file(&path)
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                c.validate()
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                c.optimizer()
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 10, "only {seen} recipes in {}", dir.display());
    }

    #[test]
    fn the_printout_shows_no_sentinels_and_each_family_in_full() {
        let text = Config::default().describe();
        assert!(text.contains("preprocess = \"log_sign\""), "{text}");
        assert!(
            !text.contains("out_scale"),
            "unset means the spec's default: {text}"
        );
        assert!(
            !text.contains("hidden = [20]"),
            "no other family's fields: {text}"
        );
        assert!(
            text.contains("# sampled: quadratic:batch=128,dims=10 (weight 1)"),
            "{text}"
        );
        // What is printed reads back as the same configuration.
        let back: Config = toml::from_str(&Config::default().to_toml()).unwrap();
        assert_eq!(back, Config::default());
    }

    #[test]
    fn the_example_config_parses_and_validates() {
        let c: Config = toml::from_str(include_str!("../config.example.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.aggregation.quorum, 4);
        assert_eq!(c.problems.len(), 2);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let e = toml::from_str::<Config>("quorom = 3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("quorom"), "{e}");
        let c = Config {
            truncation_steps: 30,
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("multiple of truncation_steps"), "{e}");
        let mut c = Config::default();
        c.init.preprocess = "sign".into();
        assert!(c.validate().unwrap_err().to_string().contains("sign"));
        let c: Config = toml::from_str("[estimator]\nkind = \"pes\"\npairs = 0").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("estimator") && e.contains("pairs"), "{e}");
        let e = toml::from_str::<Config>("[estimator]\nkind = \"reinforce\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("reinforce"), "{e}");
    }

    #[test]
    fn the_estimator_section_reads_back_as_the_estimator() {
        let c: Config = toml::from_str("[estimator]\nkind = \"pes\"\nsigma = 0.05").unwrap();
        assert_eq!(
            c.estimator.estimator().unwrap(),
            Estimator::Pes(PesConfig {
                sigma: 0.05,
                pairs: 4
            })
        );
        assert_eq!(
            Config::default().estimator.estimator().unwrap(),
            Estimator::Tbptt
        );
    }

    #[test]
    fn step_weights_grow_with_the_power_and_average_one() {
        let mut c = Config {
            trajectory_steps: 4,
            truncation_steps: 2,
            ..Config::default()
        };
        assert!(c.step_weights().is_empty(), "p = 0: all ones, sent as none");
        c.meta_loss_weight_power = 1.0;
        // t = 1..4, mean 2.5.
        assert_eq!(c.step_weights(), [0.4, 0.8, 1.2, 1.6]);
        c.meta_loss_weight_power = -1.0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_curriculum_sets_each_leases_lengths_from_its_stage_on() {
        let c: Config = toml::from_str(
            "trajectory_steps = 40\ntruncation_steps = 10\nmeta_loss_weight_power = 1.0\n\
             [[curriculum]]\nfrom = 100\ntrajectory_steps = 60\ntruncation_steps = 20\n\
             [[curriculum]]\nfrom = 300\ntrajectory_steps = 200\ntruncation_steps = 20\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.shape_at(0),
            (40, 10),
            "before the first stage: the top level"
        );
        assert_eq!(c.shape_at(99), (40, 10));
        assert_eq!(c.shape_at(100), (60, 20));
        assert_eq!(c.shape_at(299), (60, 20));
        assert_eq!(c.shape_at(300), (200, 20));
        assert_eq!(c.shape_at(u64::MAX), (200, 20));
        assert_eq!(c.max_trajectory_steps(), 200);
        assert_eq!(c.step_weights_for(60).len(), 60);
        // It prints and reads back the same.
        assert_eq!(toml::from_str::<Config>(&c.to_toml()).unwrap(), c);
        let bad = |extra: &str, want: &str| {
            let c: Config = toml::from_str(extra).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        };
        bad(
            "[[curriculum]]\nfrom = 5\ntrajectory_steps = 50\ntruncation_steps = 20\n",
            "curriculum stage 1 (from update 5): trajectory_steps (50) must be a positive multiple",
        );
        bad(
            "[[curriculum]]\nfrom = 5\ntrajectory_steps = 40\ntruncation_steps = 20\n\
             [[curriculum]]\nfrom = 5\ntrajectory_steps = 80\ntruncation_steps = 20\n",
            "stage 2 (from update 5): stages must be in order",
        );
        assert!(
            toml::from_str::<Config>("[[curriculum]]\nfrom = 1\ntrajectory_steps = 4\n").is_err(),
            "a stage names both lengths"
        );
    }

    #[test]
    fn a_file_overrides_only_what_it_sets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "max_updates = 7\n[adam]\nbeta1 = 0.5\n").unwrap();
        let mut base = Config::default();
        base.adam.lr = 0.01;
        base.lease_timeout_ms = 1234;
        let c = Config::from_toml_file_over(&base, &path).unwrap();
        assert_eq!((c.max_updates, c.adam.beta1), (7, 0.5));
        assert_eq!(
            (c.adam.lr, c.lease_timeout_ms),
            (0.01, 1234),
            "kept from base"
        );
        std::fs::write(&path, "[adam]\nbeta3 = 1\n").unwrap();
        let e = Config::from_toml_file_over(&base, &path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("beta3"), "{e}");
    }
}
