//! How a truncation's meta-gradient is estimated: truncated backpropagation (spec §2) or
//! PES, persistent evolution strategies (Vicol, Metz and Sohl-Dickstein, "Unbiased
//! Gradient Estimation in Unrolled Computation Graphs with Persistent Evolution
//! Strategies", ICML 2021).
//!
//! Truncated BPTT differentiates each truncation on its own: what φ did to θ and the LSTM
//! state before the truncation is cut off (the truncation bias), and second derivatives
//! are dropped (spec §2). PES runs forward only and needs neither.
//!
//! # PES, exactly
//! A trajectory keeps P antithetic pairs of particles. Pair p has two carries (θ and the
//! LSTM state), s⁺ₚ and s⁻ₚ, both starting where a TBPTT trajectory starts, and an
//! accumulated perturbation ξₚ ∈ R^|φ|, starting at 0. For each truncation k:
//!
//! ```text
//! εₚ ~ N(0, σ² I)                      (fresh, from the trajectory's own generator)
//! s⁺ₚ, L⁺ₚ = truncation(s⁺ₚ, φ + εₚ)     (forward only; L as in spec §2, weighted)
//! s⁻ₚ, L⁻ₚ = truncation(s⁻ₚ, φ − εₚ)
//! ξₚ = ξₚ + εₚ
//! ĝ = 1/(2σ²P) · Σₚ ξₚ · (L⁺ₚ − L⁻ₚ)
//! ```
//!
//! Summed over a trajectory's truncations, E[ĝ] is the gradient of the whole trajectory's
//! meta-loss Σₖ Lₖ, smoothed by σ (each truncation perturbed independently), with every
//! derivative kept: no truncation bias. The price is variance, which grows with |φ| and
//! with the number of truncations; P pairs divide it by P. The ε of a truncation are
//! drawn pair by pair, coordinate by coordinate in flat φ order (spec §5), each
//! [`Rng::normal`] times σ, from a generator seeded per trajectory.

use crate::Error;
use crate::engine::{Carry, Engine, Loaded};
use crate::groups::AnyPhi;
use crate::rng::Rng;
use crate::truncation::Truncation;

/// Most antithetic pairs a PES trajectory may keep (each pair is two full carries).
pub const MAX_PES_PAIRS: usize = 64;

/// Which estimator a run uses (chosen in the coordinator's configuration, carried on
/// every lease so all of a run's workers use the same).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Estimator {
    /// Truncated backpropagation through time: spec §2's ∂L/∂φ of each truncation.
    Tbptt,
    /// Persistent evolution strategies, forward only.
    Pes(PesConfig),
}

/// PES's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PesConfig {
    /// Standard deviation σ of each coordinate of a perturbation.
    pub sigma: f32,
    /// Antithetic pairs of particles per trajectory.
    pub pairs: usize,
}

impl Default for PesConfig {
    fn default() -> Self {
        Self {
            sigma: 0.01,
            pairs: 4,
        }
    }
}

impl PesConfig {
    /// Refuses a σ or a pair count that cannot run, naming the field.
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.sigma.is_finite() && self.sigma > 0.0 && self.sigma <= 1.0) {
            return Err(Error::Config(format!(
                "PES sigma must be in (0, 1], got {}",
                self.sigma
            )));
        }
        if !(1..=MAX_PES_PAIRS).contains(&self.pairs) {
            return Err(Error::Config(format!(
                "PES pairs must be in 1..={MAX_PES_PAIRS}, got {}",
                self.pairs
            )));
        }
        Ok(())
    }
}

impl Estimator {
    /// The name in configurations and on the wire: `tbptt` or `pes`.
    pub fn name(&self) -> &'static str {
        match self {
            Estimator::Tbptt => "tbptt",
            Estimator::Pes(_) => "pes",
        }
    }
}

impl std::fmt::Display for Estimator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Estimator::Tbptt => f.write_str("tbptt"),
            Estimator::Pes(c) => write!(f, "pes (sigma {}, {} pairs)", c.sigma, c.pairs),
        }
    }
}

/// Where a trajectory stands between truncations under its estimator.
// One lives per trajectory and moves once per truncation: boxing saves nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Trajectory {
    /// Truncated BPTT: one carry.
    Tbptt(Carry),
    /// PES: the particles and their accumulated perturbations.
    Pes(Pes),
}

impl Trajectory {
    /// The start of a trajectory of `p` under `estimator`; `seed` seeds PES's
    /// perturbations (give each trajectory its own).
    pub fn start(
        estimator: Estimator,
        engine: &Engine,
        phi: &AnyPhi,
        p: &Loaded,
        seed: u64,
    ) -> Result<Self, Error> {
        Ok(match estimator {
            Estimator::Tbptt => Trajectory::Tbptt(engine.start(phi, p)),
            Estimator::Pes(c) => Trajectory::Pes(Pes::start(c, engine, phi, p, seed)?),
        })
    }

    /// One truncation of T steps at step `start` (T = `steps`, or `weights.len()` with
    /// the weighted meta-loss): the estimate of ∂L/∂φ, L and each step's loss (PES: the
    /// means over its particles), and where the trajectory stands after it.
    pub fn truncation(
        self,
        engine: &Engine,
        phi: &AnyPhi,
        p: &Loaded,
        start: usize,
        steps: usize,
        weights: Option<&[f32]>,
    ) -> Result<Truncation<Trajectory>, Error> {
        match self {
            Trajectory::Tbptt(carry) => Ok(engine
                .truncation(phi, p, carry, start, steps, weights)?
                .map_carry(Trajectory::Tbptt)),
            Trajectory::Pes(pes) => Ok(pes
                .truncation(engine, phi, p, start, steps, weights)?
                .map_carry(Trajectory::Pes)),
        }
    }
}

/// A PES trajectory: P antithetic pairs of particles, each pair with its accumulated
/// perturbation ξ (module docs).
#[derive(Debug, Clone)]
pub struct Pes {
    config: PesConfig,
    rng: Rng,
    pairs: Vec<Pair>,
}

/// One antithetic pair: ξ and the carries of its two particles (run with φ + ε and φ − ε).
#[derive(Debug, Clone)]
struct Pair {
    xi: Vec<f32>,
    plus: Carry,
    minus: Carry,
}

impl Pes {
    /// Every particle at θ₀ with zero state, ξ = 0.
    pub fn start(
        config: PesConfig,
        engine: &Engine,
        phi: &AnyPhi,
        p: &Loaded,
        seed: u64,
    ) -> Result<Self, Error> {
        config.validate()?;
        let start = engine.start(phi, p);
        let pairs = (0..config.pairs)
            .map(|_| Pair {
                xi: vec![0.0; phi.num_params()],
                plus: start.clone(),
                minus: start.clone(),
            })
            .collect();
        Ok(Self {
            config,
            rng: Rng::new(seed),
            pairs,
        })
    }

    /// One truncation of every particle and the PES estimate of ∂L/∂φ (module docs).
    pub fn truncation(
        mut self,
        engine: &Engine,
        phi: &AnyPhi,
        p: &Loaded,
        start: usize,
        steps: usize,
        weights: Option<&[f32]>,
    ) -> Result<Truncation<Pes>, Error> {
        let flat = phi.flatten();
        let n = flat.len();
        if self.pairs.iter().any(|pair| pair.xi.len() != n) {
            return Err(Error::Shape(format!(
                "this PES trajectory was started with another φ than the one of {n} values \
                 it is continued with; start a new trajectory"
            )));
        }
        let names: Option<Vec<String>> = phi
            .names()
            .map(|v| v.into_iter().map(String::from).collect());
        let sigma = self.config.sigma;
        let offset = |eps: &[f32], sign: f32| -> Result<AnyPhi, Error> {
            let moved: Vec<f32> = flat.iter().zip(eps).map(|(w, e)| w + sign * e).collect();
            AnyPhi::unflatten(phi.config(), names.as_deref(), &moved)
        };
        let mut grad = vec![0f64; n];
        let mut meta_loss = 0f64;
        let mut losses: Vec<f64> = Vec::new();
        let particles = 2.0 * self.pairs.len() as f64;
        // Each pair's carries move through the engine and back: no copies.
        for mut pair in std::mem::take(&mut self.pairs) {
            let eps: Vec<f32> = (0..n)
                .map(|_| (self.rng.normal() * sigma as f64) as f32)
                .collect();
            let plus = engine.forward(&offset(&eps, 1.0)?, p, pair.plus, start, steps, weights)?;
            let minus =
                engine.forward(&offset(&eps, -1.0)?, p, pair.minus, start, steps, weights)?;
            let diff = plus.meta_loss - minus.meta_loss;
            for ((g, xi), e) in grad.iter_mut().zip(&mut pair.xi).zip(&eps) {
                *xi += e;
                *g += *xi as f64 * diff;
            }
            meta_loss += (plus.meta_loss + minus.meta_loss) / particles;
            losses.resize(plus.losses.len(), 0.0);
            for (l, (a, b)) in losses.iter_mut().zip(plus.losses.iter().zip(&minus.losses)) {
                *l += (a + b) / particles;
            }
            pair.plus = plus.carry;
            pair.minus = minus.carry;
            self.pairs.push(pair);
        }
        let scale = 1.0 / (2.0 * (sigma as f64).powi(2) * self.pairs.len() as f64);
        let grad: Vec<f32> = grad.iter().map(|g| (g * scale) as f32).collect();
        let grad =
            AnyPhi::unflatten(phi.config(), names.as_deref(), &grad).map_err(|e| match e {
                Error::NonFinite(what) => Error::NonFinite(format!(
                    "the PES estimate is not finite ({what}); the optimizee blew up under this φ"
                )),
                other => other,
            })?;
        Ok(Truncation {
            grad,
            meta_loss,
            losses,
            carry: self,
        })
    }
}

#[cfg(test)]
mod tests;
