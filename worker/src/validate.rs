//! The evaluator role's computation: a validation job's mean loss curves, the learned
//! optimizer's and the tuned baseline's, on the job's held-out instances.
//!
//! The baseline's learning rate, when the job leaves it to the evaluator, is tuned on the
//! job's tuning instances: four rates per decade from 1e-4 to 10 ([`GRID`]), refined to
//! 1/16 of a decade around the best ([`baselines::tune_refined`]), by the mean loss at the
//! job's last step. The baseline does not depend on φ, so its rate and its curve are
//! computed once per evaluator process and kept for the run's later jobs.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use l2l_common::AnyPhi;
use l2l_common::baselines::{self, Baseline};
use l2l_common::engine::Engine;
use l2l_common::problems::{DataSource, HostProblem, Optimizee};
use l2l_proto::v1::{Instance, ValidateReply};
use rayon::prelude::*;

/// log10 of the tuning grid's ends and its points (four per decade).
pub const GRID: (f64, f64, usize) = (-4.0, 1.0, 21);

/// Parts each grid spacing is cut into around the grid's best rate.
pub const REFINE: usize = 4;

/// A job's two mean curves, steps 0 ..= S.
#[derive(Debug, Clone, PartialEq)]
pub struct Curves {
    /// The learned optimizer's mean loss.
    pub learned: Vec<f64>,
    /// The baseline's mean loss.
    pub baseline: Vec<f64>,
    /// The baseline's learning rate.
    pub lr: f64,
}

/// What an evaluator keeps across jobs: the baseline's rates and curves.
#[derive(Debug, Default)]
pub struct Evaluator {
    /// Tuned rates by (baseline, steps, tuning instances).
    rates: HashMap<String, f64>,
    /// Mean baseline curves by (baseline, rate, steps, instances).
    curves: HashMap<String, Vec<f64>>,
}

/// A key naming a set of instances exactly.
fn key_of(instances: &[Instance]) -> String {
    instances
        .iter()
        .map(|i| {
            let mut p: Vec<_> = i.params.iter().collect();
            p.sort();
            format!("{}:{:?}@{}", i.family, p, i.seed)
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// The elementwise mean of curves of equal length (+∞ stays +∞).
fn mean(curves: &[Vec<f64>]) -> Vec<f64> {
    let n = curves.len().max(1) as f64;
    let len = curves.first().map_or(0, Vec::len);
    (0..len)
        .map(|t| curves.iter().map(|c| c[t]).sum::<f64>() / n)
        .collect()
}

impl Evaluator {
    /// A new evaluator with nothing kept.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `job` with φ `phi` on `engine`, the instances' data from `data`; none when
    /// `stopping` turned true before the curves were complete.
    pub fn run(
        &mut self,
        job: &ValidateReply,
        phi: &AnyPhi,
        engine: &Engine,
        data: &mut DataSource,
        stopping: &dyn Fn() -> bool,
    ) -> Result<Option<Curves>> {
        let steps = job.steps as usize;
        if steps == 0 || job.instances.is_empty() {
            bail!(
                "the validation job has no steps or no instances; is this worker older than the coordinator?"
            );
        }
        let baseline: Baseline = job.baseline.parse().with_context(|| {
            "the validation job's baseline is unknown; is this worker older than the coordinator?"
        })?;
        let make = |data: &mut DataSource, set: &[Instance]| -> Result<Vec<Optimizee>> {
            set.iter()
                .map(|i| {
                    let spec = i.spec().context("cannot read a validation instance")?;
                    spec.instance(i.seed, data)
                        .with_context(|| format!("cannot make the validation instance {spec}"))
                })
                .collect()
        };
        let lr = if job.learning_rate > 0.0 {
            job.learning_rate
        } else {
            let key = format!(
                "{}|{steps}|{}",
                baseline.name(),
                key_of(&job.tune_instances)
            );
            match self.rates.get(&key) {
                Some(lr) => *lr,
                None => {
                    if job.tune_instances.is_empty() {
                        bail!(
                            "the validation job gives neither a learning rate nor instances to tune one on"
                        );
                    }
                    let tune = make(data, &job.tune_instances)?;
                    let pairs: Vec<(&dyn HostProblem, &[f32])> = tune
                        .iter()
                        .map(|o| (o.host() as &dyn HostProblem, o.theta0()))
                        .collect();
                    let grid = baselines::log_grid(GRID.0, GRID.1, GRID.2);
                    let t = baselines::tune_refined(baseline, &pairs, &grid, steps, REFINE);
                    if !t.final_loss.is_finite() {
                        bail!(
                            "{} diverged at every learning rate from 1e-4 to 10 on the validation problems",
                            baseline.name()
                        );
                    }
                    tracing::info!(
                        baseline = baseline.name(),
                        lr = t.lr,
                        "validation baseline tuned"
                    );
                    self.rates.insert(key, t.lr);
                    t.lr
                }
            }
        };
        let report = make(data, &job.instances)?;
        let key = format!(
            "{}|{}|{steps}|{}",
            baseline.name(),
            lr.to_bits(),
            key_of(&job.instances)
        );
        if !self.curves.contains_key(&key) {
            let curves: Vec<Vec<f64>> = report
                .par_iter()
                .map(|o| baseline.curve(o.host(), o.theta0(), lr, steps))
                .collect();
            self.curves.insert(key.clone(), mean(&curves));
        }
        let mut learned = Vec::with_capacity(report.len());
        for o in report {
            if stopping() {
                return Ok(None);
            }
            learned.push(engine.curve(phi, &engine.load(o), steps)?);
        }
        Ok(Some(Curves {
            learned: mean(&learned),
            baseline: self.curves[&key].clone(),
            lr,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use l2l_common::OptimizerConfig;
    use l2l_common::engine::Backend;
    use l2l_common::problems::ProblemSpec;
    use l2l_common::problems::mnist::Split;

    fn job(lr: f64) -> ValidateReply {
        let spec: ProblemSpec = "quadratic:batch=8".parse().unwrap();
        ValidateReply {
            enabled: true,
            job_id: 1,
            instances: (0..3).map(|s| Instance::of(&spec, 100 + s)).collect(),
            tune_instances: (0..2).map(|s| Instance::of(&spec, 200 + s)).collect(),
            steps: 30,
            baseline: "adam".into(),
            learning_rate: lr,
            ..Default::default()
        }
    }

    /// The curves are the means of the per-instance curves computed directly, and the
    /// tuned rate is the one `tune_refined` picks on the tuning instances.
    #[test]
    fn a_job_is_the_mean_of_its_instances_and_the_rate_is_tuned_once() {
        let engine = Engine::open(Backend::Fused).unwrap();
        let phi = AnyPhi::init(OptimizerConfig::default(), &[], 3).unwrap();
        let mut data = DataSource::new(std::path::Path::new("/nonexistent"), Split::Train);
        let mut e = Evaluator::new();
        let j = job(0.0);
        let got = e
            .run(&j, &phi, &engine, &mut data, &|| false)
            .unwrap()
            .unwrap();
        let mut make = |set: &[Instance]| -> Vec<Optimizee> {
            set.iter()
                .map(|i| i.spec().unwrap().instance(i.seed, &mut data).unwrap())
                .collect()
        };
        let tune = make(&j.tune_instances);
        let pairs: Vec<(&dyn HostProblem, &[f32])> = tune
            .iter()
            .map(|o| (o.host() as &dyn HostProblem, o.theta0()))
            .collect();
        let grid = baselines::log_grid(GRID.0, GRID.1, GRID.2);
        let lr = baselines::tune_refined(Baseline::Adam, &pairs, &grid, 30, REFINE).lr;
        assert_eq!(got.lr, lr);
        let report = make(&j.instances);
        let want_b: Vec<Vec<f64>> = report
            .iter()
            .map(|o| Baseline::Adam.curve(o.host(), o.theta0(), lr, 30))
            .collect();
        let want_l: Vec<Vec<f64>> = report
            .iter()
            .map(|o| engine.curve(&phi, &engine.load(o.clone()), 30).unwrap())
            .collect();
        assert_eq!(got.baseline.len(), 31);
        for t in 0..=30 {
            let b = (want_b[0][t] + want_b[1][t] + want_b[2][t]) / 3.0;
            let l = (want_l[0][t] + want_l[1][t] + want_l[2][t]) / 3.0;
            assert!(
                (got.baseline[t] - b).abs() <= 1e-12 * b.abs().max(1.0),
                "baseline step {t}"
            );
            assert!(
                (got.learned[t] - l).abs() <= 1e-12 * l.abs().max(1.0),
                "learned step {t}"
            );
        }
        // The instances differ: their mean is not any one of them.
        assert_ne!(want_b[0][30], want_b[1][30]);
        // A second job reuses the rate and the baseline's curve.
        assert_eq!(e.rates.len(), 1);
        let again = e
            .run(&j, &phi, &engine, &mut data, &|| false)
            .unwrap()
            .unwrap();
        assert_eq!(again, got);
        // A given rate is used as given, and a stop request ends the job without curves.
        let fixed = e
            .run(&job(0.01), &phi, &engine, &mut data, &|| false)
            .unwrap()
            .unwrap();
        assert_eq!(fixed.lr, 0.01);
        assert_ne!(fixed.baseline, got.baseline);
        assert!(
            e.run(&j, &phi, &engine, &mut data, &|| true)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn jobs_a_worker_cannot_run_are_refused_with_the_reason() {
        let engine = Engine::open(Backend::Fused).unwrap();
        let phi = AnyPhi::init(OptimizerConfig::default(), &[], 3).unwrap();
        let mut data = DataSource::new(std::path::Path::new("/nonexistent"), Split::Train);
        let mut e = Evaluator::new();
        let mut j = job(0.0);
        j.baseline = "lion".into();
        let err = format!(
            "{:#}",
            e.run(&j, &phi, &engine, &mut data, &|| false).unwrap_err()
        );
        assert!(err.contains("baseline") && err.contains("lion"), "{err}");
        let mut j = job(0.0);
        j.instances[0].family = "mlp".into();
        j.instances[0].params.clear();
        let err = format!(
            "{:#}",
            e.run(&j, &phi, &engine, &mut data, &|| false).unwrap_err()
        );
        assert!(err.contains("/nonexistent"), "{err}");
    }
}
