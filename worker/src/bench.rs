//! `bench`: times the meta-gradient, the forward-only truncation and (on request) a PES
//! truncation on quadratics, on each backend asked for.

use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use l2l_common::engine::{Backend, Engine};
use l2l_common::estimator::{Estimator, PesConfig, Trajectory};
use l2l_common::fused;
use l2l_common::problems::mnist::Split;
use l2l_common::problems::{DataSource, Optimizee, ProblemSpec};
use l2l_common::{AnyPhi, OptimizerConfig, Phi, Preprocess, Quadratic};
use serde_json::json;

use crate::PreprocessArg;

/// Arguments of `bench`.
#[derive(Debug, Args)]
pub struct Bench {
    /// Coordinate counts N to time (quadratics of N/10 functions in 10 dimensions).
    #[arg(long, value_delimiter = ',', default_values_t = [1280usize, 16000])]
    n: Vec<usize>,
    /// T, optimizer steps per truncation.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    steps: u32,
    /// Preprocessing modes to time [default: both].
    #[arg(long, value_enum, value_delimiter = ',')]
    preprocess: Vec<PreprocessArg>,
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 2)]
    warmup: u32,
    /// One JSON object per measurement on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Backends to time [default: fused,flex]: `fused` (the CPU kernels workers use on a
    /// CPU; `cpu` is accepted too), `flex` (the burn composition on the CPU, the
    /// reference), `wgpu` (the fused LSTM step kernels on the GPU) and `wgpu-burn` (the
    /// burn composition on the GPU); the last two need a build with `--features wgpu`.
    #[arg(long, alias = "impl", value_enum, value_delimiter = ',')]
    backend: Vec<Backend>,
    /// Instead of quadratics of --n coordinates: an instance of this family (e.g. `conv`,
    /// `mlp`), φ with the family's parameter groups; the table adds the optimizee's share
    /// of a truncation (its T + 1 loss-and-gradient evaluations on the host, timed alone).
    #[arg(long, value_name = "FAMILY[:PARAMS]")]
    problem: Option<ProblemSpec>,
    /// Also time one PES truncation with this many antithetic pairs (2 forward unrolls
    /// each, σ = 0.01), as a worker of a `pes` run computes it [default: not timed].
    #[arg(long, value_name = "PAIRS", value_parser = clap::value_parser!(u32).range(1..=64))]
    pes_pairs: Option<u32>,
    /// The data of --problem (MNIST-format IDX or CIFAR-10 binary files).
    #[arg(long, env = "L2L_DATA", default_value = l2l_worker::DEFAULT_DATA)]
    data: std::path::PathBuf,
}

/// FLOPs of one meta-gradient per coordinate-step for the paper's 2×20 LSTM (forward and
/// backward), the count the speed issue gives: about 31 k.
const FLOP_PER_COORD_STEP: f64 = 31e3;

/// What one measurement timed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum What {
    /// One truncation's meta-gradient (truncated BPTT).
    MetaGrad,
    /// One truncation forward only.
    Forward,
    /// The meta-gradient with its step records recomputed (fused only; what `meta_grad`
    /// does beyond `fused::RECORD_BUDGET_BYTES`).
    Recompute,
    /// One PES truncation with this many pairs.
    Pes(usize),
}

impl What {
    fn name(self) -> String {
        match self {
            What::MetaGrad => "meta_grad".into(),
            What::Forward => "forward".into(),
            What::Recompute => "recompute".into(),
            What::Pes(p) => format!("pes_{p}"),
        }
    }
}

/// `bench`: prints one line (or JSON object) per (preprocess, N, what).
pub fn run(a: Bench) -> Result<()> {
    if let Some(spec) = a.problem.clone() {
        return run_problem(a, spec);
    }
    if let Some(bad) = a.n.iter().find(|n| **n == 0 || **n % 10 != 0) {
        bail!("--n {bad}: each N must be a positive multiple of 10 (quadratics of dimension 10)");
    }
    let modes: Vec<Preprocess> = if a.preprocess.is_empty() {
        vec![Preprocess::LogSign, Preprocess::Identity]
    } else {
        a.preprocess.iter().map(|p| (*p).into()).collect()
    };
    let backends = if a.backend.is_empty() {
        vec![Backend::Fused, Backend::Flex]
    } else {
        a.backend.clone()
    };
    let engines = backends
        .iter()
        .map(|b| Engine::open(*b).map_err(|e| anyhow::anyhow!("--backend {b}: {e}")))
        .collect::<Result<Vec<_>>>()?;
    let steps = a.steps as usize;
    if !a.json {
        println!(
            "l2l-worker bench: float32, T = {steps}, {} runs after {} warm-up",
            a.runs, a.warmup,
        );
        for e in &engines {
            println!("  {}: {}", e.backend(), e.adapter());
        }
        println!(
            "{:<9} {:>8} {:<7} {:<10} {:>10} {:>10} {:>10} {:>8} {:>12} {:>9}",
            "preproc",
            "N",
            "backend",
            "what",
            "median_ms",
            "min_ms",
            "max_ms",
            "GFLOP/s",
            "peak_rss_mb",
            "launches"
        );
    }
    for &preprocess in &modes {
        let phi = AnyPhi::from(Phi::init(OptimizerConfig::new(preprocess), 1)?);
        for &n in &a.n {
            let quad = Quadratic::from_seed(2, n / 10, 10)?;
            for engine in &engines {
                let mut whats = vec![What::MetaGrad, What::Forward];
                if engine.backend() == Backend::Fused {
                    whats.push(What::Recompute);
                }
                whats.extend(a.pes_pairs.map(|p| What::Pes(p as usize)));
                let loaded = engine.load(Optimizee::Quadratic(quad.clone()));
                for &what in &whats {
                    let Measured {
                        times,
                        peak_rss_mb: peak,
                        launches,
                    } = measure(engine, &phi, &loaded, steps, what, a.warmup, a.runs)?;
                    let median = times[times.len() / 2];
                    let gflops = matches!(what, What::MetaGrad | What::Recompute)
                        .then(|| FLOP_PER_COORD_STEP * (n * steps) as f64 / (median * 1e-3) / 1e9);
                    if a.json {
                        let row = json!({
                            "what": what.name(), "n": n, "steps": steps,
                            "preprocess": preprocess.name(),
                            "backend": engine.backend().name(), "adapter": engine.adapter(),
                            "median_ms": median, "min_ms": times[0],
                            "max_ms": times[times.len() - 1], "runs": times.len(),
                            "gflops": gflops, "peak_rss_mb": peak, "launches": launches,
                        });
                        println!("{row}");
                    } else {
                        println!(
                            "{:<9} {:>8} {:<7} {:<10} {:>10.2} {:>10.2} {:>10.2} {:>8} {:>12.1} {:>9}",
                            preprocess.name(),
                            n,
                            engine.backend().name(),
                            what.name(),
                            median,
                            times[0],
                            times[times.len() - 1],
                            gflops.map_or("-".to_string(), |g| format!("{g:.1}")),
                            peak,
                            launches.map_or("-".to_string(), |n| n.to_string())
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// `bench --problem`: one truncation of an instance of `spec` per backend, beside the
/// time of the optimizee's own T + 1 evaluations (what the fused path calls).
fn run_problem(a: Bench, spec: ProblemSpec) -> Result<()> {
    if a.json || a.preprocess.len() > 1 {
        bail!(
            "--problem prints one table for one preprocessing: leave out --json and give at most one --preprocess"
        );
    }
    let backends = if a.backend.is_empty() {
        vec![Backend::Fused]
    } else {
        a.backend.clone()
    };
    let preprocess = a
        .preprocess
        .first()
        .map_or(Preprocess::LogSign, |p| (*p).into());
    let mut data = DataSource::new(&a.data, Split::Train);
    let optimizee = spec.instance(1, &mut data)?;
    let host = optimizee.host();
    let n = host.num_coords();
    let names = host
        .groups()
        .map(|g| g.names().iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let names: Vec<&str> = names.iter().flatten().map(String::as_str).collect();
    let phi = AnyPhi::init(OptimizerConfig::new(preprocess), &names, 1)?;
    let steps = a.steps as usize;
    // The optimizee alone: T + 1 evaluations at θ₀ (the fused path's calls per truncation).
    let theta = optimizee.theta0().to_vec();
    let mut g = vec![0f32; n];
    // One untimed pass first, even with `--warmup 0`: the first evaluation pays for page
    // faults and caches that the unrolls measured after it do not.
    for t in 0..=steps {
        host.eval(&theta, t, &mut g);
    }
    let mut alone: Vec<f64> = (0..a.warmup + a.runs)
        .map(|_| {
            let start = Instant::now();
            for t in 0..=steps {
                host.eval(&theta, t, &mut g);
            }
            start.elapsed().as_secs_f64() * 1e3
        })
        .skip(a.warmup as usize)
        .collect();
    alone.sort_by(f64::total_cmp);
    let alone = alone[alone.len() / 2];
    println!(
        "l2l-worker bench --problem {spec}: N = {n}, groups {}, {preprocess}, float32, T = {steps}, {} runs after {} warm-up",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(",")
        },
        a.runs,
        a.warmup
    );
    println!(
        "  optimizee alone ({} loss-and-gradient evaluations on the host): {alone:.1} ms",
        steps + 1
    );
    println!(
        "{:<7} {:>12} {:>10} {:>10} {:>14} {:>10} {:>12}",
        "backend", "median_ms", "min_ms", "max_ms", "optimizee_ms", "lstm_ms", "optimizee_%"
    );
    for b in backends {
        let engine = Engine::open(b).map_err(|e| anyhow::anyhow!("--backend {b}: {e}"))?;
        let loaded = engine.load(optimizee.clone());
        let Measured { times, .. } = measure(
            &engine,
            &phi,
            &loaded,
            steps,
            What::MetaGrad,
            a.warmup,
            a.runs,
        )?;
        let median = times[times.len() / 2];
        // The optimizee's share is measured on the host; on a device its cost differs.
        let (opt, lstm, share) = if b == Backend::Fused {
            (
                format!("{alone:.1}"),
                format!("{:.1}", median - alone),
                format!("{:.0}", 100.0 * alone / median),
            )
        } else {
            ("-".into(), "-".into(), "-".into())
        };
        println!(
            "{:<7} {:>12.1} {:>10.1} {:>10.1} {opt:>14} {lstm:>10} {share:>12}",
            b.name(),
            median,
            times[0],
            times[times.len() - 1]
        );
    }
    Ok(())
}

/// Sorted times in ms of `runs` repetitions, and the peak RSS in MB while they ran.
///
/// Each repetition is what a worker does per truncation: φ to the device, the unroll
/// from θ₀, and the results back to the host (which waits for the device to finish).
fn measure(
    engine: &Engine,
    phi: &AnyPhi,
    problem: &l2l_common::engine::Loaded,
    steps: usize,
    what: What,
    warmup: u32,
    runs: u32,
) -> Result<Measured> {
    let once = || -> Result<(f64, Option<u64>)> {
        let state = engine.start(phi, problem);
        let pes = match what {
            What::Pes(pairs) => Some(Trajectory::start(
                Estimator::Pes(PesConfig { sigma: 0.01, pairs }),
                engine,
                phi,
                problem,
                1,
            )?),
            _ => None,
        };
        let start = Instant::now();
        let run = || -> Result<()> {
            match (what, pes) {
                (What::MetaGrad, _) => {
                    engine.truncation(phi, problem, state, 0, steps, None)?;
                }
                (What::Forward, _) => {
                    engine.forward(phi, problem, state, 0, steps, None)?;
                }
                (What::Recompute, _) => {
                    let o = problem.optimizee();
                    let carry = fused::HostCarry::start(&phi.config(), o.theta0().to_vec());
                    fused::meta_grad_recomputed(phi, o.host(), carry, 0, steps, None)?;
                }
                (What::Pes(_), Some(pes)) => {
                    pes.truncation(engine, phi, problem, 0, steps, None)?;
                }
                (What::Pes(_), None) => bail!("no PES trajectory to time"),
            }
            Ok(())
        };
        let launches = launches_of(engine, run)?;
        Ok((start.elapsed().as_secs_f64() * 1e3, launches))
    };
    // Buffers kept from an earlier, larger measurement would count in this one's peak.
    fused::release_buffers();
    reset_peak_rss();
    for _ in 0..warmup {
        once()?;
    }
    let timed = (0..runs).map(|_| once()).collect::<Result<Vec<_>>>()?;
    let mut times: Vec<f64> = timed.iter().map(|t| t.0).collect();
    times.sort_by(f64::total_cmp);
    let mut launches: Vec<u64> = timed.iter().filter_map(|t| t.1).collect();
    launches.sort_unstable();
    let launches = launches.get(launches.len() / 2).copied();
    Ok(Measured {
        times,
        peak_rss_mb: peak_rss_mb(),
        launches,
    })
}

/// What [`measure`] found.
struct Measured {
    /// Each run's milliseconds, sorted.
    times: Vec<f64>,
    /// The process's peak RSS over the runs.
    peak_rss_mb: f64,
    /// GPU kernels issued per run (the median), on the wgpu backend.
    launches: Option<u64>,
}

/// Runs `run`, counting the GPU kernels it issues when `engine` is the wgpu backend.
fn launches_of(engine: &Engine, run: impl FnOnce() -> Result<()>) -> Result<Option<u64>> {
    #[cfg(feature = "wgpu")]
    if matches!(engine.backend(), Backend::Wgpu | Backend::WgpuBurn) {
        let (r, n) = l2l_common::launches::counted(run);
        return r.map(|()| Some(n));
    }
    let _ = engine;
    run().map(|()| None)
}

/// Resets the kernel's high-water mark of this process's RSS (Linux; a no-op elsewhere).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size since the last reset, in MB (VmHWM; NaN where unavailable).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
