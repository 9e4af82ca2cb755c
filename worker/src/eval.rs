//! `eval`: the learned optimizer against SGD, RMSprop, Adam and NAG, each with its
//! learning rate tuned, on held-out problems: a table, CSV curves and a PNG plot.
//!
//! Problems are drawn from seeds: the tuning set and the report set are disjoint seed
//! ranges, and for `mlp` the tuning set draws its minibatches from the training split,
//! the report set from the test split.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use l2l_common::baselines::{Baseline, Tuned, log_grid, tune_refined};
use l2l_common::engine::{Backend, Engine};
use l2l_common::problems::HostProblem;
use l2l_common::problems::ProblemSpec;
use l2l_common::problems::mnist::Split;
use l2l_common::problems::{DataSource, Optimizee};
use l2l_worker::DEFAULT_DATA;
use rayon::prelude::*;

use crate::plot::{Picture, Series, plot_curves};

/// Arguments of `eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The learned optimizer φ: an l2l-lstm/1 file, or a coordinator checkpoint; with the
    /// problem's parameter groups (spec §5: `conv` needs `conv,fc` unless `lstms=1`).
    #[arg(long)]
    phi: PathBuf,
    /// The problem: quadratic, mlp, conv, art, or a variant such as mlp:hidden=40,
    /// mlp:hidden=20x20, mlp:act=relu, conv:labels=5-9, conv:lstms=1,
    /// art:size=128,content=chelsea,style=hubble_deep_field.
    #[arg(long, default_value = "quadratic")]
    problem: ProblemSpec,
    /// The data of mlp and conv problems: MNIST-format IDX files (plain or .gz) or
    /// CIFAR-10 binary files; for art, a directory of PNG/JPEG images
    /// (deploy/art-images.sh DIR puts the sample ones there).
    #[arg(long, env = "L2L_DATA", default_value = DEFAULT_DATA)]
    data: PathBuf,
    /// Optimizee steps per run.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Problems in the report set.
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Problems in the tuning set (disjoint from the report set).
    #[arg(long, default_value_t = 10)]
    tune_runs: usize,
    /// log10 of the smallest learning rate of the tuning grid.
    #[arg(long, default_value_t = -4.0, allow_hyphen_values = true)]
    grid_lo: f64,
    /// log10 of the largest learning rate of the tuning grid.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    grid_hi: f64,
    /// Learning rates in the tuning grid (21: four per decade from 1e-4 to 10).
    #[arg(long, default_value_t = 21)]
    grid_points: usize,
    /// Then tune again around each baseline's best rate, the grid's spacing cut into this
    /// many parts (4: 1/16 of a decade with the default grid; 1: no refinement).
    #[arg(long, default_value_t = 4)]
    refine: usize,
    /// Steps shown in the table [default: steps/5, steps/2, steps].
    #[arg(long, value_delimiter = ',')]
    at: Vec<usize>,
    /// Baselines to compare with.
    #[arg(long, value_delimiter = ',', default_value = "sgd,rmsprop,adam,nag")]
    baselines: Vec<Baseline>,
    /// Fixed learning rates instead of tuning, e.g. `adam=0.01,nag=0.0316` (another
    /// evaluation's rates on the same problem, to compare several φ against the same
    /// baselines without tuning again); the baselines not named are tuned.
    #[arg(long = "lr", value_delimiter = ',', value_parser = parse_fixed_rate)]
    lr: Vec<(Baseline, f64)>,
    /// Seed of the problem sets.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory for curves.csv, summary.csv and loss.png.
    #[arg(long)]
    out: PathBuf,
    /// For an art problem: draw the first N report problems, one PNG each
    /// (pictures/problem-I.png): the content crop, the style, and the image each
    /// optimizer made at every step of --at (the learned one on the host's fused path).
    #[arg(long, default_value_t = 0)]
    pictures: usize,
    /// Where the learned optimizer runs: `fused` (`cpu` too), `flex` or `wgpu` (needs a build with
    /// `--features wgpu`). The baselines run on the CPU.
    #[arg(long, value_enum, default_value_t = Backend::Fused)]
    backend: Backend,
}

/// Seeds of the report set and of the tuning set: disjoint ranges.
const REPORT_SEEDS: u64 = 0x5245_504f_5254_0000;
const TUNE_SEEDS: u64 = 0x5455_4e45_0000_0000;

/// `count` instances of `spec` from seeds `base`, `base + 1`, …, their data from `data`.
fn instances(
    spec: &ProblemSpec,
    data: &mut DataSource,
    base: u64,
    count: usize,
) -> Result<Vec<Optimizee>> {
    (0..count as u64)
        .map(|i| Ok(spec.instance(base.wrapping_add(i), data)?))
        .collect()
}

/// Per-step statistics of a set of curves.
struct Stats {
    mean: Vec<f64>,
    std: Vec<f64>,
    p10: Vec<f64>,
    p90: Vec<f64>,
    /// Mean over runs of each run's mean loss over steps 1..=S.
    mean_over_steps: f64,
}

fn stats(curves: &[Vec<f64>]) -> Stats {
    let steps = curves[0].len();
    let n = curves.len() as f64;
    let mut s = Stats {
        mean: vec![0.0; steps],
        std: vec![0.0; steps],
        p10: vec![0.0; steps],
        p90: vec![0.0; steps],
        mean_over_steps: 0.0,
    };
    for t in 0..steps {
        let mut col: Vec<f64> = curves.iter().map(|c| c[t]).collect();
        let mean = col.iter().sum::<f64>() / n;
        s.mean[t] = mean;
        s.std[t] = (col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        col.sort_by(f64::total_cmp);
        let q = |p: f64| col[((col.len() - 1) as f64 * p).round() as usize];
        s.p10[t] = q(0.1);
        s.p90[t] = q(0.9);
    }
    s.mean_over_steps = curves
        .iter()
        .map(|c| c[1..].iter().sum::<f64>() / (steps - 1).max(1) as f64)
        .sum::<f64>()
        / n;
    s
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}

/// One row of the report: an optimizer, its rate, its curves.
struct Row {
    name: String,
    lr: Option<f64>,
    curves: Vec<Vec<f64>>,
}

/// Runs the evaluation and writes its files.
pub fn run(a: EvalArgs) -> Result<()> {
    if a.steps == 0 || a.runs == 0 || a.tune_runs == 0 || a.grid_points == 0 || a.refine == 0 {
        bail!("--steps, --runs, --tune-runs, --grid-points and --refine must be positive");
    }
    let at: Vec<usize> = if a.at.is_empty() {
        let mut v = vec![a.steps / 5, a.steps / 2, a.steps];
        v.retain(|t| *t > 0);
        v.dedup();
        v
    } else {
        a.at.clone()
    };
    if let Some(t) = at.iter().find(|t| **t > a.steps) {
        bail!("--at {t} is beyond --steps {}", a.steps);
    }
    for (i, (b, _)) in a.lr.iter().enumerate() {
        if !a.baselines.contains(b) {
            bail!(
                "--lr gives a rate for {}, which is not among --baselines; add it there or drop its rate",
                b.name()
            );
        }
        if a.lr[..i].iter().any(|(c, _)| c == b) {
            bail!("--lr gives {} two rates; give one", b.name());
        }
    }
    if a.pictures > 0 && !matches!(a.problem, ProblemSpec::Art(_)) {
        bail!(
            "--pictures draws the optimizee as an image: only art problems are images (the \
             problem is {}); drop --pictures",
            a.problem.family()
        );
    }
    if a.pictures > a.runs {
        bail!("--pictures {} is more than --runs {}", a.pictures, a.runs);
    }
    let phi = l2l_common::groups::load_for(&a.phi, &a.problem).context("cannot load φ (--phi)")?;
    let engine = Engine::open(a.backend).with_context(|| format!("--backend {}", a.backend))?;
    eprintln!("learned optimizer on {}", engine.describe());
    // Baselines are tuned on the training split, everything is reported on the test split.
    let mut train = DataSource::new(&a.data, Split::Train);
    let mut test = DataSource::new(&a.data, Split::Test);
    let tune_set = instances(&a.problem, &mut train, a.seed ^ TUNE_SEEDS, a.tune_runs)
        .context("cannot make the tuning problems (training split of --data)")?;
    let report = instances(&a.problem, &mut test, a.seed ^ REPORT_SEEDS, a.runs)
        .context("cannot make the report problems (test split of --data)")?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create the output directory {}", a.out.display()))?;

    // Tune every baseline on the tuning set, except those given a rate.
    let grid = log_grid(a.grid_lo, a.grid_hi, a.grid_points);
    let fixed = |b: Baseline| a.lr.iter().find(|(c, _)| *c == b).map(|(_, lr)| *lr);
    let to_tune = a.baselines.iter().filter(|b| fixed(**b).is_none()).count();
    let progress = bar(to_tune as u64, "tuning learning rates");
    let pairs: Vec<(&dyn HostProblem, &[f32])> = tune_set
        .iter()
        .map(|o| (o.host() as &dyn HostProblem, o.theta0()))
        .collect();
    let tuned: Vec<Tuned> = a
        .baselines
        .iter()
        .map(|b| match fixed(*b) {
            Some(lr) => Tuned {
                baseline: *b,
                lr,
                final_loss: f64::NAN,
            },
            None => {
                let t = tune_refined(*b, &pairs, &grid, a.steps, a.refine);
                progress.inc(1);
                t
            }
        })
        .collect();
    progress.finish_and_clear();
    for t in tuned.iter().filter(|t| fixed(t.baseline).is_none()) {
        let (lo, hi) = (grid[0], grid[grid.len() - 1]);
        if grid.len() > 1 && (t.lr <= lo * 1.000001 || t.lr >= hi / 1.000001) {
            eprintln!(
                "note: {}'s best rate {} is at the edge of the grid; widen it with --grid-lo/--grid-hi",
                t.baseline.name(),
                rate(t.lr)
            );
        }
    }

    // The report set: the learned optimizer, then each tuned baseline.
    let progress = bar((a.runs * (1 + tuned.len())) as u64, "report runs");
    let mut rows = vec![Row {
        name: "learned".into(),
        lr: None,
        curves: report
            .iter()
            .map(|i| {
                let c = engine.curve(&phi, &engine.load(i.clone()), a.steps);
                progress.inc(1);
                c
            })
            .collect::<Result<_, _>>()?,
    }];
    for t in &tuned {
        rows.push(Row {
            name: t.baseline.name().into(),
            lr: Some(t.lr),
            curves: report
                .par_iter()
                .map(|i| {
                    let c = t.baseline.curve(i.host(), i.theta0(), t.lr, a.steps);
                    progress.inc(1);
                    c
                })
                .collect(),
        });
    }
    progress.finish_and_clear();

    let all: Vec<(&Row, Stats)> = rows.iter().map(|r| (r, stats(&r.curves))).collect();
    let source = if a.problem.reads_images() {
        format!(" (images from {})", a.data.display())
    } else if a.problem.needs_data() {
        // With every rate given (--lr), nothing was tuned: do not say where.
        let tuned = if to_tune > 0 {
            "; rates tuned on the training split"
        } else {
            ""
        };
        format!(
            " (minibatches from the test split of {}{tuned})",
            a.data.display()
        )
    } else {
        String::new()
    };
    let rates = if a.lr.is_empty() {
        format!("rates tuned on {} others", a.tune_runs)
    } else {
        let given: Vec<&str> = a.lr.iter().map(|(b, _)| b.name()).collect();
        let given = given.join(", ");
        if to_tune == 0 {
            format!("the rates of {given} given (--lr)")
        } else {
            format!(
                "the rates of {given} given (--lr), the others tuned on {} other problems",
                a.tune_runs
            )
        }
    };
    let title = format!(
        "{}: {} held-out problems, {rates}{source}",
        a.problem.name(),
        a.runs,
    );
    let table = render_table(&title, &all, &at, a.steps);
    print!("{table}");
    std::fs::write(a.out.join("table.txt"), &table)?;
    write_csvs(&a.out, &all)?;
    let series: Vec<Series> = all
        .iter()
        .map(|(r, s)| Series {
            name: legend(&r.name, r.lr),
            mean: s.mean.clone(),
            low: s.p10.clone(),
            high: s.p90.clone(),
        })
        .collect();
    if a.pictures > 0 {
        draw_pictures(&a, &phi, &report[..a.pictures], &tuned, &at)?;
    }
    let png = a.out.join("loss.png");
    match plot_curves(&png, &a.problem.name(), &series) {
        Ok(()) => println!(
            "wrote {}, {}, {} and {}",
            a.out.join("table.txt").display(),
            a.out.join("curves.csv").display(),
            a.out.join("summary.csv").display(),
            png.display()
        ),
        Err(e) => {
            println!(
                "wrote {}, {} and {}",
                a.out.join("table.txt").display(),
                a.out.join("curves.csv").display(),
                a.out.join("summary.csv").display()
            );
            return Err(e.context("the table and CSVs were written, but not the plot"));
        }
    }
    Ok(())
}

/// Writes `pictures/problem-I.png` for each art instance of `report`: its content crop
/// and style, then each optimizer's image at every step of `at`, the loss under each.
fn draw_pictures(
    a: &EvalArgs,
    phi: &l2l_common::AnyPhi,
    report: &[Optimizee],
    tuned: &[Tuned],
    at: &[usize],
) -> Result<()> {
    use l2l_common::problems::images::Image;
    let dir = a.out.join("pictures");
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    let mut columns = vec![
        "content".to_string(),
        "style".to_string(),
        "learned".to_string(),
    ];
    columns.extend(tuned.iter().map(|t| t.baseline.name().to_string()));
    // The snapshots are taken in step order: --at may list its steps in any order.
    let mut at = at.to_vec();
    at.sort_unstable();
    at.dedup();
    let at = &at[..];
    let progress = bar(report.len() as u64, "pictures");
    for (i, o) in report.iter().enumerate() {
        let Optimizee::Art(art) = o else {
            bail!("--pictures needs an art problem");
        };
        let size = art.spec.size;
        let mut runs = vec![l2l_common::eval::host_learned_thetas(
            phi,
            art,
            &art.theta0,
            at,
        )?];
        runs.extend(
            tuned
                .par_iter()
                .map(|t| t.baseline.thetas(art, &art.theta0, t.lr, at))
                .collect::<Vec<_>>(),
        );
        let mut g = vec![0f32; art.theta0.len()];
        let rows = at
            .iter()
            .enumerate()
            .map(|(k, t)| {
                let mut cells: Vec<Option<Picture>> = if k == 0 {
                    vec![
                        Some(Picture {
                            image: (*art.content).clone(),
                            caption: art.photo.clone(),
                        }),
                        Some(Picture {
                            image: (*art.style).clone(),
                            caption: art.spec.style.clone(),
                        }),
                    ]
                } else {
                    vec![None, None]
                };
                for run in &runs {
                    let theta = &run[k];
                    let loss = art.eval(theta, *t, &mut g);
                    cells.push(Some(Picture {
                        image: Image::new(size, size, theta.clone())?,
                        caption: format!("f {}", rate(loss)),
                    }));
                }
                Ok((format!("step {t}"), cells))
            })
            .collect::<Result<Vec<_>>>()?;
        let title = format!(
            "{} · problem {i} (held out): {}",
            a.problem.name(),
            art.photo
        );
        let path = dir.join(format!("problem-{i}.png"));
        crate::plot::picture_grid(&path, &title, &columns, &rows)?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    println!("wrote {} picture grids in {}", report.len(), dir.display());
    Ok(())
}

/// An optimizer's line in the plot's legend: its name and rate.
fn legend(name: &str, lr: Option<f64>) -> String {
    match lr {
        Some(lr) => format!("{name} (lr {})", rate(lr)),
        None => name.to_string(),
    }
}

/// Arguments of `plot`.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// An `eval` output directory: its summary.csv and table.txt are read, its loss.png
    /// written again.
    dir: PathBuf,
}

/// The largest summary.csv or table.txt `plot` reads (an evaluation's summary is about
/// 30 KB per optimizer and 100 steps).
const MAX_EVAL_FILE: u64 = 64 << 20;

/// Redraws an evaluation's loss.png from its summary.csv, the title from its table.txt.
pub fn replot(a: PlotArgs) -> Result<()> {
    let read = |name: &str| -> Result<String> {
        use std::io::Read as _;
        let path = a.dir.join(name);
        let file = std::fs::File::open(&path).with_context(|| {
            format!(
                "cannot open {} (give a directory `eval --out` wrote)",
                path.display()
            )
        })?;
        let mut text = String::new();
        file.take(MAX_EVAL_FILE + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read {} as text", path.display()))?;
        if text.len() as u64 > MAX_EVAL_FILE {
            bail!(
                "{} is larger than {MAX_EVAL_FILE} bytes: not an eval output",
                path.display()
            );
        }
        Ok(text)
    };
    let summary = read("summary.csv")?;
    let table = read("table.txt")?;
    let series = parse_summary(&summary)
        .with_context(|| format!("{}", a.dir.join("summary.csv").display()))?;
    let title = table
        .lines()
        .next()
        .and_then(|l| l.split_once(':'))
        .map(|(name, _)| name.trim())
        .filter(|name| !name.is_empty())
        .with_context(|| {
            format!(
                "{}: the first line does not start with the problem's name and a colon",
                a.dir.join("table.txt").display()
            )
        })?;
    let png = a.dir.join("loss.png");
    plot_curves(&png, title, &series)?;
    println!("wrote {}", png.display());
    Ok(())
}

/// The curves of a summary.csv as `eval` writes it: one series per optimizer, its steps
/// 0, 1, … in order.
fn parse_summary(text: &str) -> Result<Vec<Series>> {
    const HEADER: &str = "optimizer,lr,step,mean,std,p10,p90";
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        bail!("not an eval summary: its first line is not {HEADER}");
    }
    let mut series: Vec<Series> = Vec::new();
    let mut current: Option<(String, Option<f64>)> = None;
    for (i, line) in lines.enumerate() {
        let at = || format!("line {}", i + 2);
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 7 {
            bail!("{}: {} fields, expected 7 ({HEADER})", at(), f.len());
        }
        let num = |k: usize| -> Result<f64> {
            f[k].parse::<f64>()
                .with_context(|| format!("{}: {:?} is not a number", at(), f[k]))
        };
        let lr = if f[1].is_empty() { None } else { Some(num(1)?) };
        let step: usize = f[2]
            .parse()
            .with_context(|| format!("{}: step {:?} is not a whole number", at(), f[2]))?;
        let key = (f[0].to_string(), lr);
        if step == 0 {
            series.push(Series {
                name: legend(&key.0, lr),
                mean: Vec::new(),
                low: Vec::new(),
                high: Vec::new(),
            });
            current = Some(key);
        } else if current.as_ref() != Some(&key) {
            bail!("{}: {}'s curve does not start at step 0", at(), f[0]);
        }
        let s = series.last_mut().expect("a series was started at step 0");
        if step != s.mean.len() {
            bail!(
                "{}: step {step} of {}, expected step {}",
                at(),
                f[0],
                s.mean.len()
            );
        }
        s.mean.push(num(3)?);
        s.low.push(num(5)?);
        s.high.push(num(6)?);
    }
    let Some(first) = series.first() else {
        bail!("no curves in it");
    };
    if let Some(s) = series.iter().find(|s| s.mean.len() != first.mean.len()) {
        bail!(
            "{} has {} steps, {} has {}",
            s.name,
            s.mean.len(),
            first.name,
            first.mean.len()
        );
    }
    Ok(series)
}

/// Reads one `--lr` item: `BASELINE=RATE`, the rate positive and finite.
fn parse_fixed_rate(s: &str) -> Result<(Baseline, f64), String> {
    let (b, lr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: give BASELINE=RATE, e.g. nag=0.0316"))?;
    let b: Baseline = b.trim().parse().map_err(|e| format!("{e}"))?;
    let lr: f64 = lr
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: the rate {lr:?} is not a number"))?;
    if !lr.is_finite() || lr <= 0.0 {
        return Err(format!(
            "{s:?}: a learning rate must be positive and finite"
        ));
    }
    Ok((b, lr))
}

/// A learning rate with three significant digits.
fn rate(lr: f64) -> String {
    let decimals = (2.0 - lr.log10().floor()).max(0.0) as usize;
    format!("{lr:.decimals$}")
}

fn render_table(title: &str, all: &[(&Row, Stats)], at: &[usize], steps: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{title}");
    let _ = write!(out, "{:<10} {:>9}", "optimizer", "lr");
    for t in at {
        let _ = write!(out, " {:>21}", format!("step {t}"));
    }
    let _ = writeln!(out, " {:>12}", format!("mean 1..{steps}"));
    for (r, s) in all {
        let lr = r.lr.map_or("-".to_string(), rate);
        let _ = write!(out, "{:<10} {:>9}", r.name, lr);
        for t in at {
            let _ = write!(
                out,
                " {:>21}",
                format!("{:.4} ± {:.4}", s.mean[*t], s.std[*t])
            );
        }
        let _ = writeln!(out, " {:>12.4}", s.mean_over_steps);
    }
    // The learned optimizer against the best baseline at each reported step.
    let learned = &all[0];
    for t in at
        .iter()
        .copied()
        .chain([steps])
        .collect::<std::collections::BTreeSet<_>>()
    {
        let Some((best, bs)) = all[1..]
            .iter()
            .min_by(|x, y| x.1.mean[t].total_cmp(&y.1.mean[t]))
        else {
            continue;
        };
        let wins = learned
            .0
            .curves
            .iter()
            .zip(&best.curves)
            .filter(|(l, b)| l[t] < b[t])
            .count();
        let _ = writeln!(
            out,
            "step {t}: learned/best baseline ({}) = {:.3}; learned lower on {wins} of {} problems",
            best.name,
            learned.1.mean[t] / bs.mean[t],
            learned.0.curves.len()
        );
    }
    if let Some((best, bs)) = all[1..]
        .iter()
        .min_by(|x, y| x.1.mean_over_steps.total_cmp(&y.1.mean_over_steps))
    {
        let _ = writeln!(
            out,
            "mean over steps 1..{steps}: learned/best baseline ({}) = {:.3}",
            best.name,
            learned.1.mean_over_steps / bs.mean_over_steps
        );
    }
    // A rate tuned on a few problems can sit at the edge of stability: say where a
    // held-out run ended above its start, since such runs dominate that row's means.
    for (r, _) in all {
        let up = r.curves.iter().filter(|c| !(c[steps] <= c[0])).count();
        if up > 0 {
            let lr =
                r.lr.map_or(String::new(), |lr| format!(" (lr {})", rate(lr)));
            let _ = writeln!(
                out,
                "note: {}{lr} ended above its starting loss on {up} of {} problems; its means include them",
                r.name,
                r.curves.len()
            );
        }
    }
    out
}

fn write_csvs(dir: &Path, all: &[(&Row, Stats)]) -> Result<()> {
    let mut curves = String::from("optimizer,lr,run,step,loss\n");
    let mut summary = String::from("optimizer,lr,step,mean,std,p10,p90\n");
    for (r, s) in all {
        let lr = r.lr.map_or(String::new(), |lr| format!("{lr}"));
        for (run, c) in r.curves.iter().enumerate() {
            for (t, v) in c.iter().enumerate() {
                let _ = writeln!(curves, "{},{lr},{run},{t},{v}", r.name);
            }
        }
        for t in 0..s.mean.len() {
            let _ = writeln!(
                summary,
                "{},{lr},{t},{},{},{},{}",
                r.name, s.mean[t], s.std[t], s.p10[t], s.p90[t]
            );
        }
    }
    for (name, text) in [("curves.csv", curves), ("summary.csv", summary)] {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}
