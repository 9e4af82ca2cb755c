//! `local`: a coordinator and N workers on this machine over real loopback gRPC, then an
//! evaluation of the learned optimizer against tuned Adam on fresh quadratics.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use l2l_common::baselines::{self, Baseline};
use l2l_common::eval::host_learned_curve;
use l2l_common::problems::HostProblem;
use l2l_common::rng::Rng;
use l2l_common::{AnyPhi, Quadratic};
use l2l_worker::{Backend, Engine, WorkerOptions, run_worker};

use crate::auth::ServerSecurity;
use crate::cli::Overrides;
use crate::config::{Config, Mode};
use crate::run_dir;
use crate::service::Server;
use crate::state::Coordinator;

/// Arguments of `local`.
#[derive(Debug, Args)]
pub struct Local {
    /// Worker threads to run beside the coordinator.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub workers: u32,
    /// Evaluator threads for the run's validation jobs (`[validation]`; default: one when
    /// the run validates, none otherwise).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=16))]
    pub evaluators: Option<u32>,
    /// Fresh quadratics (128 × 10-d each) to report the comparison on (runs on quadratics
    /// only; for other families the run prints the `l2l-worker eval` command to use).
    #[arg(long, default_value_t = 16)]
    pub eval_problems: usize,
    /// The data of mlp and conv problem families: MNIST-format IDX files or CIFAR-10
    /// binary files (the training split is used).
    #[arg(long, env = "L2L_DATA", default_value = l2l_worker::DEFAULT_DATA)]
    pub data: PathBuf,
    /// Where the workers' unrolls run: `fused` (the fused CPU kernels; `cpu` is accepted too), `flex` (burn on the
    /// CPU) or `wgpu` (burn on the GPU; needs a build with `--features wgpu`).
    #[arg(long, env = "L2L_BACKEND", value_enum, default_value_t = Backend::Fused)]
    pub backend: Backend,
    /// With --tls-cert: PEM CA certificate the local workers check the coordinator's
    /// certificate against [default: the system's roots].
    #[arg(long, value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,
    /// With --tls-cert: the name the local workers check the coordinator's certificate
    /// against (they connect to the listen address).
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    pub tls_domain: String,
    /// With --tls-client-ca: PEM client certificate the local workers present.
    #[arg(long, value_name = "PATH", requires = "worker_tls_key")]
    pub worker_tls_cert: Option<PathBuf>,
    /// PEM private key of --worker-tls-cert.
    #[arg(long, value_name = "PATH", requires = "worker_tls_cert")]
    pub worker_tls_key: Option<PathBuf>,
    /// Configuration overrides (see `serve --help`).
    #[command(flatten)]
    pub overrides: Overrides,
}

/// The local mode's defaults: a run that finishes in a few minutes on 2 cores.
pub fn default_config(workers: u32) -> Config {
    let mut c = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        dir: PathBuf::from("l2l-local"),
        max_updates: 1000,
        lease_timeout_ms: 10_000,
        checkpoint_every_updates: 100,
        checkpoint_every_seconds: 30,
        ..Config::default()
    };
    c.aggregation.mode = Mode::Sync;
    c.aggregation.quorum = workers as usize;
    c.adam.lr = 1e-2;
    // The validation curve by default (one evaluator thread beside the workers).
    c.validation.every = 100;
    c
}

/// What a local run produced.
#[derive(Debug, Clone)]
pub struct LocalOutcome {
    /// The final φ file.
    pub phi_path: PathBuf,
    /// Mean meta-loss of each update, in order.
    pub meta_losses: Vec<f64>,
    /// The evaluation at steps 20, 50, 100 (quadratic problem sets only).
    pub report: Option<Report>,
}

/// Runs the local mode end to end.
pub async fn run(args: Local) -> Result<LocalOutcome> {
    let config = args.overrides.apply(default_config(args.workers))?;
    eprintln!(
        "l2l local: {} workers, configuration:\n{}",
        args.workers,
        config.describe()
    );
    // Opened before anything starts, so a missing GPU is an error here and not a run
    // whose workers never come.
    let engine =
        Engine::open(args.backend).with_context(|| format!("--backend {}", args.backend))?;
    eprintln!("workers compute on {}", engine.describe());
    drop(engine);
    // The same security as `serve`: the token and TLS flags are honoured, and the local
    // workers present what a remote worker would.
    let security = ServerSecurity::resolve(&config.security)?;
    if security.token.is_none() && !config.listen.ip().is_loopback() {
        eprintln!(
            "warning: no token, and listening on {}: anyone who can reach this port can \
             submit gradients; set --token-file or $L2L_TOKEN",
            config.listen
        );
    }
    let tls = security.tls.is_some();
    if !tls && (args.tls_ca.is_some() || args.worker_tls_cert.is_some()) {
        bail!("--tls-ca and --worker-tls-cert need TLS: give --tls-cert and --tls-key too");
    }
    let mut client = l2l_proto::client::ClientArgs {
        token_file: None,
        tls_ca: args.tls_ca.clone(),
        tls_cert: args.worker_tls_cert.clone(),
        tls_key: args.worker_tls_key.clone(),
        tls_domain: Some(args.tls_domain.clone()),
    }
    .resolve(if tls { "https://" } else { "http://" })?;
    client.token = security.token.clone();
    let prepared = run_dir::prepare(&config.dir, args.overrides.start_fresh)?;
    if let Some(a) = &prepared.abandoned {
        eprintln!(
            "--start-fresh: the earlier run's files were moved to {}",
            a.display()
        );
    }
    if let (Some(path), Some(s)) = (&prepared.resumed_from, &prepared.start.resume) {
        eprintln!("resuming from {} (version {})", path.display(), s.version);
    }
    let run = prepared.start.run.clone();
    let coordinator = Coordinator::new(config.clone(), prepared.start)?;
    let server = Server::start(coordinator, config.listen, security).await?;
    let url = format!("{}://{}", if tls { "https" } else { "http" }, server.addr);
    // Scripts and tests read this line to reach the coordinator while it runs.
    println!("listening on {}", server.addr);
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let evaluators = args
        .evaluators
        .unwrap_or(u32::from(config.validation.enabled()));
    if evaluators > 0 && !config.validation.enabled() {
        bail!(
            "--evaluators {evaluators}: this run validates nothing; set [validation] every in the configuration"
        );
    }
    let mut evaluator_handles = Vec::new();
    for i in 0..args.workers + evaluators {
        let evaluator = i >= args.workers;
        let name = if evaluator {
            format!("local-evaluator-{}", i - args.workers)
        } else {
            format!("local-{i}")
        };
        let mut opts = WorkerOptions::new(url.clone(), name.clone());
        opts.security = client.clone();
        opts.seed = config.seed.wrapping_add(i as u64);
        opts.data = args.data.clone();
        opts.backend = args.backend;
        if evaluator {
            opts.role = l2l_worker::Role::Evaluator;
        }
        let stop = stop.clone();
        let h = std::thread::Builder::new()
            .name(name)
            .spawn(move || run_worker(opts, stop))
            .context("cannot start a worker thread")?;
        if evaluator {
            evaluator_handles.push(h);
        } else {
            handles.push(h);
        }
    }
    let (started, trajectories_before) = (
        Instant::now(),
        server.shared.lock().counters().trajectories_done,
    );
    let progress = progress_bar(config.max_updates);
    // Without a terminal the bar is hidden; print a line every tenth of the run instead.
    let plain = progress.is_hidden();
    let mut next_line = 0;
    // A worker that cannot join (a TLS or token mismatch) retries forever by design;
    // here nothing else would end the run, so give up when none has joined in a while.
    const JOIN_LIMIT: Duration = Duration::from_secs(60);
    let mut none_joined = false;
    let interrupted = loop {
        let (version, loss, rate, finished, joined, validation) = {
            let c = server.shared.lock();
            let s = c.status(Instant::now());
            (
                c.version().step,
                s.last_meta_loss,
                s.updates_per_second,
                c.finished(),
                s.workers_total > 0 || c.counters().accepted > 0,
                s.validation.as_ref().and_then(validation_line),
            )
        };
        // No meta-loss before the first update.
        let loss = if loss.is_finite() {
            format!("{loss:.4}")
        } else {
            "–".into()
        };
        progress.set_position(version);
        let validation = validation.map(|v| format!("  {v}")).unwrap_or_default();
        progress.set_message(format!("meta-loss {loss}  {rate:.1} updates/s{validation}"));
        if plain && version >= next_line {
            eprintln!(
                "update {version}/{}  meta-loss {loss}  {rate:.1} updates/s{validation}",
                config.max_updates
            );
            next_line = version + (config.max_updates / 10).max(1);
        }
        if finished || handles.iter().all(|h| h.is_finished()) {
            break false;
        }
        if !joined && started.elapsed() > JOIN_LIMIT {
            none_joined = true;
            break false;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = tokio::signal::ctrl_c() => break true,
        }
    };
    progress.finish();
    // The last validation jobs (the final φ's among them) finish before the evaluators stop.
    if !interrupted && !evaluator_handles.is_empty() {
        let limit = Duration::from_millis(config.validation.timeout_ms);
        let since = Instant::now();
        let mut said = false;
        while !server.shared.lock().validation_idle()
            && !evaluator_handles.iter().all(|h| h.is_finished())
            && since.elapsed() < limit
        {
            if !said {
                eprintln!("waiting for the last validation jobs");
                said = true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let trainers = handles.len();
    let run_finished = server.shared.lock().finished();
    handles.extend(evaluator_handles);
    // Why each trainer stopped, when it failed (the first is repeated at the end).
    let mut failed = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let why = match h.join() {
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "its thread panicked".to_string(),
        };
        eprintln!("a worker failed: {why}");
        if i < trainers {
            failed.push(why);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (meta_losses, trajectories) = {
        let c = server.shared.lock();
        let counters = c.counters();
        (
            counters.meta_losses.clone(),
            counters.trajectories_done - trajectories_before,
        )
    };
    eprintln!(
        "trained {trajectories} trajectories in {elapsed:.1} s ({:.2} trajectories/s)",
        trajectories as f64 / elapsed.max(1e-9)
    );
    let phi = server.shared.lock().phi()?;
    let server_validation = {
        let s = server.shared.lock().status(Instant::now());
        s.validation.map(|v| validation_summary(&v, &config.dir))
    };
    let ckpt = server.shutdown().await?;
    let phi_path = run_dir::save_final_phi(&config.dir, &run, &phi)?;
    eprintln!("checkpoint {}", ckpt.display());
    if none_joined {
        bail!(
            "no worker could join the coordinator within {} s (see the warnings above: \
             a TLS or token setting that the workers cannot meet?)",
            JOIN_LIMIT.as_secs()
        );
    }
    if interrupted {
        bail!(
            "interrupted; run the same command again to resume from {}",
            ckpt.display()
        );
    }
    if !run_finished && trainers > 0 && failed.len() == trainers {
        bail!(
            "every worker stopped before the run's {} updates, the first because: {}; fix \
             that and run the same command again to resume from {}",
            config.max_updates,
            failed[0],
            ckpt.display()
        );
    }
    println!("learned optimizer φ written to {}", phi_path.display());
    if let Some(v) = server_validation {
        println!("{v}");
    }
    let report = if config.problems.iter().all(|p| p.family == "quadratic") {
        let report =
            tokio::task::spawn_blocking(move || evaluate(&phi, config.seed, args.eval_problems))
                .await??;
        println!("{report}");
        Some(report)
    } else {
        for family in &config.problems {
            let problem = family.spec()?;
            println!(
                "compare it with tuned SGD, RMSprop, Adam and NAG: l2l-worker eval --phi {} --problem {problem} --data {} --out eval/{}",
                phi_path.display(),
                args.data.display(),
                problem.name()
            );
        }
        None
    };
    Ok(LocalOutcome {
        phi_path,
        meta_losses,
        report,
    })
}

/// The progress line's validation part: the newest ratio and the best; none before the
/// first validation.
fn validation_line(v: &l2l_proto::v1::ValidationStatus) -> Option<String> {
    let last = v.last_version?;
    let best = v
        .best_version
        .map(|b| format!(", best {:.3} at {}", v.best_score, b.step))
        .unwrap_or_default();
    Some(format!(
        "validation at {}: {:.3} of {}{best}",
        last.step, v.last_ratio_mean, v.baseline
    ))
}

/// What the run's validation came to, for the end of a local run.
fn validation_summary(v: &l2l_proto::v1::ValidationStatus, dir: &std::path::Path) -> String {
    let csv = dir.join(crate::validation::VALIDATION_FILE);
    match v.best_version {
        Some(b) => format!(
            "validation: {} recorded this session ({} dropped), curve in {}; best φ by validation \
             (learned / tuned {} = {:.3}, by the {} loss) at update {}: {}",
            v.done,
            v.dropped,
            csv.display(),
            v.baseline,
            v.best_score,
            v.select,
            b.step,
            dir.join(crate::validation::BEST_FILE).display()
        ),
        None => format!(
            "validation: {} recorded this session ({} dropped); no best φ yet",
            v.done, v.dropped
        ),
    }
}

fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} updates  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// The learned optimizer against Adam with its best learning rate, on fresh quadratics.
#[derive(Debug, Clone)]
pub struct Report {
    /// Steps reported.
    pub steps: Vec<usize>,
    /// Mean loss of the learned optimizer at each reported step.
    pub learned: Vec<f64>,
    /// Mean loss of tuned Adam at each reported step.
    pub adam: Vec<f64>,
    /// Adam's learning rate, chosen on separate tuning problems.
    pub adam_lr: f64,
    /// Problems averaged over.
    pub problems: usize,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "mean loss on {} fresh quadratics (128 × 10-d each); Adam lr {:.*} chosen on other problems",
            self.problems,
            // Three significant digits.
            (2.0 - self.adam_lr.log10().floor()).max(0.0) as usize,
            self.adam_lr
        )?;
        writeln!(
            f,
            "{:>6} {:>14} {:>14} {:>9}",
            "step", "learned", "adam", "ratio"
        )?;
        for ((s, l), a) in self.steps.iter().zip(&self.learned).zip(&self.adam) {
            writeln!(f, "{s:>6} {l:>14.6} {a:>14.6} {:>9.3}", l / a)?;
        }
        Ok(())
    }
}

/// Adam's learning-rate grid: four rates per decade from 1e-3 to 10 (then refined).
pub fn adam_grid() -> Vec<f64> {
    baselines::log_grid(-3.0, 1.0, 17)
}

/// Evaluates `phi` against tuned Adam: the learning rate with the best mean loss at step
/// 100 on 4 tuning problems (the grid of [`adam_grid`] refined to 1/16 of a decade,
/// [`baselines::tune_refined`]), then both on `problems` report
/// problems (all seeds fresh), on the host.
pub fn evaluate(phi: &AnyPhi, seed: u64, problems: usize) -> Result<Report> {
    let steps = 100;
    // Seeds drawn from a stream of their own, away from the training sampler's.
    let mut rng = Rng::new(seed ^ 0x6576_616c_7561_7465);
    let tune: Vec<Quadratic> = (0..4)
        .map(|_| Quadratic::from_seed(rng.next_u64(), 128, 10))
        .collect::<Result<_, _>>()?;
    let report: Vec<Quadratic> = (0..problems.max(1))
        .map(|_| Quadratic::from_seed(rng.next_u64(), 128, 10))
        .collect::<Result<_, _>>()?;
    let tuning: Vec<(&dyn HostProblem, &[f32])> = tune
        .iter()
        .map(|q| (q as &dyn HostProblem, q.theta0.as_slice()))
        .collect();
    let adam_lr = baselines::tune_refined(Baseline::Adam, &tuning, &adam_grid(), steps, 4).lr;
    let learned = mean_curves(
        report
            .iter()
            .map(|q| host_learned_curve(phi, q, &q.theta0, steps)),
    )?;
    let adam = mean_curves(
        report
            .iter()
            .map(|q| Ok(Baseline::Adam.curve(q, &q.theta0, adam_lr, steps))),
    )?;
    let at = vec![20, 50, 100];
    Ok(Report {
        learned: at.iter().map(|&s| learned[s]).collect(),
        adam: at.iter().map(|&s| adam[s]).collect(),
        steps: at,
        adam_lr,
        problems: report.len(),
    })
}

/// The elementwise mean of loss curves (diverged steps are +∞ in each).
fn mean_curves(
    curves: impl Iterator<Item = Result<Vec<f64>, l2l_common::Error>>,
) -> Result<Vec<f64>> {
    let mut sum: Vec<f64> = Vec::new();
    let mut n = 0.0;
    for c in curves {
        let c = c?;
        if sum.is_empty() {
            sum = vec![0.0; c.len()];
        }
        for (s, v) in sum.iter_mut().zip(&c) {
            *s += v;
        }
        n += 1.0;
    }
    Ok(sum.into_iter().map(|s| s / n).collect())
}
