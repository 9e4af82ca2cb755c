//! Hand-designed optimizers run on the same problems as the learned one, for comparison:
//! SGD, RMSprop, Adam and NAG on the host ([`Baseline`]), each with its learning rate
//! tuned on a grid ([`tune`]).

use crate::Error;
use crate::problems::HostProblem;

/// A hand-designed optimizer; only its learning rate is tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// θ ← θ − lr·g.
    Sgd,
    /// v ← α v + (1 − α) g², θ ← θ − lr·g / (√v + ε), α = 0.99, ε = 1e-8.
    Rmsprop,
    /// Adam (Kingma & Ba 2015), β = (0.9, 0.999), ε = 1e-8, bias-corrected.
    Adam,
    /// Nesterov momentum μ = 0.9: b ← μ b + g, θ ← θ − lr·(g + μ b).
    Nag,
}

impl Baseline {
    /// The four, in report order.
    pub const ALL: [Baseline; 4] = [
        Baseline::Sgd,
        Baseline::Rmsprop,
        Baseline::Adam,
        Baseline::Nag,
    ];

    /// Lower-case name for tables and files.
    pub fn name(self) -> &'static str {
        match self {
            Baseline::Sgd => "sgd",
            Baseline::Rmsprop => "rmsprop",
            Baseline::Adam => "adam",
            Baseline::Nag => "nag",
        }
    }

    /// f(θ_t) for t = 0 ..= steps from `theta0` with learning rate `lr`, step t's gradient
    /// on minibatch t. Once the loss is not finite the rest of the curve is +∞.
    pub fn curve(
        self,
        problem: &dyn HostProblem,
        theta0: &[f32],
        lr: f64,
        steps: usize,
    ) -> Vec<f64> {
        self.run(problem, theta0, lr, steps, |_, _| {})
    }

    /// θ_t at each step of `at` (ascending) from `theta0` with learning rate `lr`; a step
    /// after a blow-up keeps the last finite θ.
    pub fn thetas(
        self,
        problem: &dyn HostProblem,
        theta0: &[f32],
        lr: f64,
        at: &[usize],
    ) -> Vec<Vec<f32>> {
        let steps = at.iter().copied().max().unwrap_or(0);
        let mut out: Vec<Vec<f32>> = Vec::with_capacity(at.len());
        let mut last = theta0.to_vec();
        self.run(problem, theta0, lr, steps, |t, theta| {
            if theta.iter().all(|v| v.is_finite()) {
                last.copy_from_slice(theta);
            }
            while out.len() < at.len() && at[out.len()] == t {
                out.push(last.clone());
            }
        });
        while out.len() < at.len() {
            out.push(last.clone());
        }
        out
    }

    /// The curve of [`Baseline::curve`], calling `visit(t, θ_t)` at every step reached.
    fn run(
        self,
        problem: &dyn HostProblem,
        theta0: &[f32],
        lr: f64,
        steps: usize,
        mut visit: impl FnMut(usize, &[f32]),
    ) -> Vec<f64> {
        let n = theta0.len();
        let lr = lr as f32;
        let mut theta = theta0.to_vec();
        let mut g = vec![0f32; n];
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let mut out = Vec::with_capacity(steps + 1);
        for t in 0..=steps {
            let loss = problem.eval(&theta, t, &mut g);
            out.push(loss);
            visit(t, &theta);
            if !loss.is_finite() {
                break;
            }
            if t == steps {
                break;
            }
            match self {
                Baseline::Sgd => theta.iter_mut().zip(&g).for_each(|(th, g)| *th -= lr * g),
                Baseline::Rmsprop => {
                    for ((th, g), v) in theta.iter_mut().zip(&g).zip(&mut v) {
                        *v = 0.99 * *v + 0.01 * g * g;
                        *th -= lr * g / (v.sqrt() + 1e-8);
                    }
                }
                Baseline::Adam => {
                    let k = (t + 1) as i32;
                    let (c1, c2) = (1.0 - 0.9f32.powi(k), 1.0 - 0.999f32.powi(k));
                    for (((th, g), m), v) in theta.iter_mut().zip(&g).zip(&mut m).zip(&mut v) {
                        *m = 0.9 * *m + 0.1 * g;
                        *v = 0.999 * *v + 0.001 * g * g;
                        *th -= lr * (*m / c1) / ((*v / c2).sqrt() + 1e-8);
                    }
                }
                Baseline::Nag => {
                    for ((th, g), b) in theta.iter_mut().zip(&g).zip(&mut m) {
                        *b = 0.9 * *b + g;
                        *th -= lr * (g + 0.9 * *b);
                    }
                }
            }
        }
        crate::eval::end_at_divergence(&mut out, steps);
        out
    }
}

impl std::str::FromStr for Baseline {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Baseline::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown baseline {s:?}; use sgd, rmsprop, adam or nag"
                ))
            })
    }
}

/// Learning rates 10^(lo + i·(hi − lo)/(points − 1)), a log-spaced grid.
pub fn log_grid(lo: f64, hi: f64, points: usize) -> Vec<f64> {
    (0..points)
        .map(|i| 10f64.powf(lo + (hi - lo) * i as f64 / (points.max(2) - 1) as f64))
        .collect()
}

/// Rates that cut the log spacing `spacing` (in decades) around `best` into `parts`:
/// best·10^(±j·spacing/parts) for j = 1 .. parts−1, smallest first.
pub fn refine_around(best: f64, spacing: f64, parts: usize) -> Vec<f64> {
    let steps = (1..parts).map(|j| j as f64 * spacing / parts as f64);
    let mut out: Vec<f64> = steps
        .clone()
        .rev()
        .map(|d| best * 10f64.powf(-d))
        .chain(steps.map(|d| best * 10f64.powf(d)))
        .collect();
    out.sort_by(f64::total_cmp);
    out
}

/// [`tune`] on the log-spaced `grid`, then again between the best rate and its
/// neighbours, the grid's spacing cut into `parts` (1: no refinement); the best of both.
///
/// With a grid of 4 rates per decade and `parts` = 4, the chosen rate is within 1/32 of a
/// decade (7.5%) of the best rate near the grid's best, however the loss varies between
/// grid points.
pub fn tune_refined(
    baseline: Baseline,
    problems: &[(&dyn HostProblem, &[f32])],
    grid: &[f64],
    steps: usize,
    parts: usize,
) -> Tuned {
    let coarse = tune(baseline, problems, grid, steps);
    if grid.len() < 2 || parts < 2 || !coarse.final_loss.is_finite() {
        return coarse;
    }
    let spacing = (grid[1] / grid[0]).log10().abs();
    let fine = tune(
        baseline,
        problems,
        &refine_around(coarse.lr, spacing, parts),
        steps,
    );
    if fine.final_loss < coarse.final_loss {
        fine
    } else {
        coarse
    }
}

/// A tuning result: the chosen rate and its mean final loss on the tuning problems.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuned {
    /// The optimizer.
    pub baseline: Baseline,
    /// The chosen learning rate.
    pub lr: f64,
    /// Mean f(θ_steps) over the tuning problems at that rate.
    pub final_loss: f64,
}

/// Picks the rate of `grid` with the lowest mean final loss over `problems` (each with
/// its θ₀) after `steps` steps; ties go to the earlier rate. Rates run in parallel.
pub fn tune(
    baseline: Baseline,
    problems: &[(&dyn HostProblem, &[f32])],
    grid: &[f64],
    steps: usize,
) -> Tuned {
    use rayon::prelude::*;
    let means: Vec<f64> = grid
        .par_iter()
        .map(|&lr| {
            problems
                .iter()
                .map(|(p, th0)| baseline.curve(*p, th0, lr, steps)[steps])
                .sum::<f64>()
                / problems.len().max(1) as f64
        })
        .collect();
    let mut best = Tuned {
        baseline,
        lr: grid.first().copied().unwrap_or(0.0),
        final_loss: f64::INFINITY,
    };
    for (&lr, &mean) in grid.iter().zip(&means) {
        if mean < best.final_loss {
            best = Tuned {
                baseline,
                lr,
                final_loss: mean,
            };
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Quadratic;

    /// SGD's θ at the requested steps, by hand: θ_{t+1} = θ_t − lr·(8θ_t − 4) from 0.
    #[test]
    fn thetas_are_the_iterates_at_the_requested_steps() {
        let q = one_d();
        let lr = 0.05;
        let mut want = vec![0f32];
        for _ in 0..3 {
            let t = *want.last().unwrap();
            want.push(t - lr as f32 * (8.0 * t - 4.0));
        }
        let got = Baseline::Sgd.thetas(&q, &q.theta0, lr, &[0, 1, 3]);
        assert_eq!(got.len(), 3);
        for (g, w) in got.iter().zip([want[0], want[1], want[3]]) {
            assert!((g[0] - w).abs() < 1e-6, "{g:?} vs {w}");
        }
        // 0.2 exactly: 0.05 · 4 from θ = 0.
        assert!((want[1] - 0.2).abs() < 1e-7);
    }

    /// f(θ) = (2θ − 1)² on one coordinate: ∇ = 4(2θ − 1) = 8θ − 4, minimum at θ = 0.5.
    fn one_d() -> Quadratic {
        Quadratic {
            batch: 1,
            dims: 1,
            w: vec![2.0],
            y: vec![1.0],
            theta0: vec![0.0],
        }
    }

    #[test]
    fn first_steps_match_hand_computed_values() {
        let q = one_d();
        let f = |th: f64| (2.0 * th - 1.0).powi(2);
        // θ₀ = 0, g₀ = −4.
        // SGD lr 0.05: θ₁ = 0.2; g₁ = −2.4; θ₂ = 0.32.
        let c = Baseline::Sgd.curve(&q, &[0.0], 0.05, 2);
        assert_close(&c, &[1.0, f(0.2), f(0.32)]);
        // RMSprop lr 0.01: v₁ = 0.01·16 = 0.16, θ₁ = 0.01·4/0.4 = 0.1.
        let c = Baseline::Rmsprop.curve(&q, &[0.0], 0.01, 1);
        assert_close(&c, &[1.0, f(0.1)]);
        // Adam's first step is lr·sign(g): θ₁ = 0.1.
        let c = Baseline::Adam.curve(&q, &[0.0], 0.1, 1);
        assert_close(&c, &[1.0, f(0.1)]);
        // NAG lr 0.01: b₁ = −4, θ₁ = 0.01·(4 + 3.6) = 0.076; g₁ = 8·0.076 − 4 = −3.392,
        // b₂ = −3.6 − 3.392 = −6.992, θ₂ = 0.076 + 0.01·(3.392 + 6.2928) = 0.172848.
        let c = Baseline::Nag.curve(&q, &[0.0], 0.01, 2);
        assert_close(&c, &[1.0, f(0.076), f(0.172848)]);
        // A diverging rate gives +∞ from the first non-finite loss on.
        let c = Baseline::Sgd.curve(&q, &[0.0], 1e30, 3);
        assert!(c[3].is_infinite() && c[0] == 1.0, "{c:?}");
    }

    fn assert_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(want) {
            assert!(
                (a - b).abs() < 1e-5 * (1.0 + b.abs()),
                "{got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn the_tuner_picks_the_known_best_rate() {
        // SGD on (2θ − 1)²: lr = 1/8 lands on the minimum in one step, so after one step
        // it beats every other rate of the grid.
        let q = one_d();
        let problems: Vec<(&dyn HostProblem, &[f32])> = vec![(&q, &[0.0][..])];
        let grid = [0.01, 0.05, 0.125, 0.2, 0.25];
        let t = tune(Baseline::Sgd, &problems, &grid, 1);
        assert_eq!(t.lr, 0.125);
        assert!(t.final_loss < 1e-12);
        let g = log_grid(-4.0, 0.0, 5);
        assert!(
            (g[0] - 1e-4).abs() < 1e-12
                && (g[4] - 1.0).abs() < 1e-12
                && (g[2] - 1e-2).abs() < 1e-12
        );
    }

    #[test]
    fn refinement_finds_a_rate_between_grid_points() {
        // SGD on (2θ − 1)² for one step: f(θ₁) = (8·lr − 1)², best at lr = 1/8. A grid of
        // 0.01 and 1 picks 0.01 (f = 0.8464; at 1, f = 49); cutting its two decades into 4
        // tries 0.01·10^(±0.5, ±1, ±1.5) and finds 0.1 (f = 0.04).
        let q = one_d();
        let problems: Vec<(&dyn HostProblem, &[f32])> = vec![(&q, &[0.0][..])];
        let coarse = tune(Baseline::Sgd, &problems, &[0.01, 1.0], 1);
        assert_eq!(coarse.lr, 0.01);
        let fine = tune_refined(Baseline::Sgd, &problems, &[0.01, 1.0], 1, 4);
        assert!((fine.lr - 0.1).abs() < 1e-12, "{fine:?}");
        assert!((fine.final_loss - 0.04).abs() < 1e-6, "{fine:?}");
        // parts = 1 is the coarse grid alone.
        assert_eq!(
            tune_refined(Baseline::Sgd, &problems, &[0.01, 1.0], 1, 1),
            coarse
        );
        let r = refine_around(1.0, 0.25, 4);
        let want = [-0.1875, -0.125, -0.0625, 0.0625, 0.125, 0.1875].map(|e| 10f64.powf(e));
        assert!(
            r.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
            "{r:?}"
        );
    }

    #[test]
    fn adam_matches_a_loop_written_out_in_f64() {
        // One coordinate: f(θ) = (2θ − 1)², ∇ = 4(2θ − 1); Adam written out on the host.
        let q = Quadratic {
            batch: 1,
            dims: 1,
            w: vec![2.0],
            y: vec![1.0],
            theta0: vec![0.0],
        };
        let curve = Baseline::Adam.curve(&q, &q.theta0, 0.1, 3);
        let (mut th, mut m, mut v) = (0f64, 0f64, 0f64);
        let mut want = vec![1.0];
        for t in 1..=3 {
            let g = 4.0 * (2.0 * th - 1.0);
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            th -=
                0.1 * (m / (1.0 - 0.9f64.powi(t))) / ((v / (1.0 - 0.999f64.powi(t))).sqrt() + 1e-8);
            want.push((2.0 * th - 1.0).powi(2));
        }
        // float32 against the float64 loop.
        for (a, b) in curve.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{curve:?} vs {want:?}");
        }
    }
}
