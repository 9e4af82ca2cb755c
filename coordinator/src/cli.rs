//! Command-line flags shared by `serve` and `local`, and logging set-up.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::config::{Config, Mode};

/// Flags that override the TOML configuration (or the defaults).
#[derive(Debug, Clone, Default, Args)]
pub struct Overrides {
    /// TOML configuration file; flags given here override its values.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:50051 (port 0 picks a free port).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Run directory: checkpoints and the final φ; a run resumes from the newest checkpoint.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seed of the instance sampler and of φ's initialisation.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after this many updates of φ (0 = run until stopped).
    #[arg(long)]
    pub max_updates: Option<u64>,
    /// Aggregation: sync (quorum rounds with a deadline) or async (every K, bounded staleness).
    #[arg(long, value_enum)]
    pub aggregation: Option<Mode>,
    /// sync: gradients per round.
    #[arg(long)]
    pub quorum: Option<usize>,
    /// sync: a round closes this many ms after its first gradient even without quorum.
    #[arg(long)]
    pub round_timeout_ms: Option<u64>,
    /// async: accepted gradients per update.
    #[arg(long)]
    pub every: Option<usize>,
    /// async: largest accepted staleness in versions.
    #[arg(long)]
    pub max_staleness: Option<u64>,
    /// Lease lifetime without heartbeat or submission, in ms.
    #[arg(long)]
    pub lease_timeout_ms: Option<u64>,
    /// Meta-optimizer (Adam) learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Clip averaged gradients to this global norm (0 = off).
    #[arg(long)]
    pub clip_norm: Option<f64>,
    /// Preprocessing of a fresh φ: identity, log_sign or rnnprop.
    #[arg(long)]
    pub preprocess: Option<String>,
    /// Start a fresh run from this φ (optimizer file or checkpoint) instead of new weights.
    #[arg(long, value_name = "PATH")]
    pub init_phi: Option<PathBuf>,
    /// S, optimizee steps per trajectory.
    #[arg(long)]
    pub trajectory_steps: Option<u32>,
    /// T, steps per truncation.
    #[arg(long)]
    pub truncation_steps: Option<u32>,
    /// p of the meta-loss weights w_t ∝ t^p over a trajectory (0: all steps alike).
    #[arg(long)]
    pub meta_loss_weight_power: Option<f64>,
    /// Gradient estimator: tbptt (truncated backpropagation) or pes (persistent
    /// evolution strategies, forward only; σ and pairs in the config's [estimator]).
    #[arg(long, value_enum)]
    pub estimator: Option<crate::config::EstimatorKind>,
    /// Checkpoint every this many updates.
    #[arg(long)]
    pub checkpoint_every_updates: Option<u64>,
    /// Checkpoint at least every this many seconds.
    #[arg(long)]
    pub checkpoint_every_seconds: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9090).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// File holding the shared token workers must present (or set $L2L_TOKEN to the
    /// token itself; never pass a token on the command line).
    #[arg(long, env = l2l_proto::auth::TOKEN_FILE_ENV, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// PEM certificate (chain) of this coordinator; with --tls-key, serves TLS.
    #[arg(long, env = "L2L_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "L2L_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate: require client certificates signed by it (mutual TLS).
    #[arg(long, env = "L2L_TLS_CLIENT_CA", value_name = "PATH")]
    pub tls_client_ca: Option<PathBuf>,
    /// Require the shared token on /metrics too (Prometheus sends it with
    /// `authorization: {credentials_file: token}`).
    #[arg(long)]
    pub metrics_require_token: bool,
    /// Start a new run even though --dir holds an earlier one: its checkpoints, run.json
    /// and phi.safetensors are moved into DIR/abandoned-<time>/ first. Without it, a
    /// directory whose checkpoints cannot be loaded stops the start.
    #[arg(long)]
    pub start_fresh: bool,
}

impl Overrides {
    /// The configuration: `base`, then the TOML file, then these flags.
    pub fn apply(&self, base: Config) -> Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_toml_file_over(&base, path)?,
            None => base,
        };
        macro_rules! set {
            ($($field:ident => $target:expr),* $(,)?) => {
                $( if let Some(v) = self.$field.clone() { $target = v; } )*
            };
        }
        set!(
            listen => c.listen,
            dir => c.dir,
            max_updates => c.max_updates,
            quorum => c.aggregation.quorum,
            round_timeout_ms => c.aggregation.round_timeout_ms,
            every => c.aggregation.every,
            max_staleness => c.aggregation.max_staleness,
            aggregation => c.aggregation.mode,
            lease_timeout_ms => c.lease_timeout_ms,
            lr => c.adam.lr,
            clip_norm => c.adam.clip_norm,
            preprocess => c.init.preprocess,
            trajectory_steps => c.trajectory_steps,
            truncation_steps => c.truncation_steps,
            meta_loss_weight_power => c.meta_loss_weight_power,
            estimator => c.estimator.kind,
            checkpoint_every_updates => c.checkpoint_every_updates,
            checkpoint_every_seconds => c.checkpoint_every_seconds,
        );
        macro_rules! set_some {
            ($($field:ident => $target:expr),* $(,)?) => {
                $( if self.$field.is_some() { $target = self.$field.clone(); } )*
            };
        }
        set_some!(
            metrics_listen => c.metrics_listen,
            init_phi => c.init.phi,
            token_file => c.security.token_file,
            tls_cert => c.security.tls_cert,
            tls_key => c.security.tls_key,
            tls_client_ca => c.security.tls_client_ca,
        );
        if self.metrics_require_token {
            c.metrics_require_token = true;
        }
        if let Some(s) = self.seed {
            c.seed = s;
            c.init.seed = s;
        }
        c.validate()?;
        Ok(c)
    }
}

pub use l2l_proto::logging::{LogFormat, init_logging};
