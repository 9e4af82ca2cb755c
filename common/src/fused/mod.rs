//! The fused CPU meta-gradient: the same truncation as [`crate::unroll::meta_grad`],
//! hand-differentiated and computed in f32 on host memory.
//!
//! Why it can be fused: every g_t is a constant (spec §2), so θ_{t+1} = θ_t + u_t has
//! ∂θ_{t+1}/∂θ_t = I and the problem enters the backward pass only through its gradients:
//! ∂L/∂u_t = (1/T) Σ_{j=t+1..T} ∇f_j(θ_j), suffix sums of gradients the forward pass
//! computes anyway (plus one at θ_T). The rest is the coordinatewise LSTM's own
//! backpropagation through time, independent per coordinate: blocks of coordinates run
//! in parallel ([`rayon`]), each keeping all 4H gates of a coordinate together in cache,
//! with branch-free exp/sigmoid/tanh ([`math`]) that vectorize, compiled for AVX2+FMA when
//! the CPU has them. The burn composition in [`crate::unroll`] stays as the reference the
//! tests compare this path with.

mod cell;
pub mod math;

use rayon::prelude::*;

use crate::{Error, OptimizerConfig, Phi, Quadratic};

use cell::{Layout, Weights};

/// A problem as the fused path sees it: loss and gradient on host f32 values.
pub trait HostProblem: Sync {
    /// N, the number of coordinates.
    fn num_coords(&self) -> usize;
    /// f_t(θ), writing ∇f_t(θ) into `grad`.
    fn eval(&self, theta: &[f32], step: usize, grad: &mut [f32]) -> f64;
}

impl HostProblem for Quadratic {
    fn num_coords(&self) -> usize {
        Quadratic::num_coords(self)
    }

    /// f = (1/B) Σ_b ||W_b θ_b − y_b||², ∇_b = (2/B) W_bᵀ (W_b θ_b − y_b).
    fn eval(&self, theta: &[f32], _step: usize, grad: &mut [f32]) -> f64 {
        let (d, scale) = (self.dims, 2.0 / self.batch as f32);
        let mut loss = 0f64;
        let mut r = vec![0f32; d];
        for b in 0..self.batch {
            let w = &self.w[b * d * d..(b + 1) * d * d];
            let th = &theta[b * d..(b + 1) * d];
            for (i, ri) in r.iter_mut().enumerate() {
                let row = &w[i * d..(i + 1) * d];
                *ri = row.iter().zip(th).map(|(a, t)| a * t).sum::<f32>() - self.y[b * d + i];
                loss += (*ri as f64) * (*ri as f64);
            }
            let g = &mut grad[b * d..(b + 1) * d];
            g.iter_mut().for_each(|v| *v = 0.0);
            for (i, ri) in r.iter().enumerate() {
                let row = &w[i * d..(i + 1) * d];
                for (gj, wij) in g.iter_mut().zip(row) {
                    *gj += wij * ri;
                }
            }
            g.iter_mut().for_each(|v| *v *= scale);
        }
        loss / self.batch as f64
    }
}

/// Where a trajectory stands between truncations, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostCarry {
    /// θ_t, N values.
    pub theta: Vec<f32>,
    /// h of every layer, each N·H values (coordinate-major).
    pub h: Vec<Vec<f32>>,
    /// c of every layer, each N·H values.
    pub c: Vec<Vec<f32>>,
}

impl HostCarry {
    /// θ_0 and zero LSTM state (the start of a trajectory).
    pub fn start(config: &OptimizerConfig, theta0: Vec<f32>) -> Self {
        let n = theta0.len() * config.hidden;
        Self {
            theta: theta0,
            h: vec![vec![0.0; n]; config.layers],
            c: vec![vec![0.0; n]; config.layers],
        }
    }
}

/// A truncation's meta-gradient from the fused path.
#[derive(Debug, Clone)]
pub struct FusedMetaGrad {
    /// ∂L/∂φ in spec order and shapes.
    pub grad: Phi,
    /// L = (1/T) Σ f_t(θ_t), t = s+1 ..= s+T.
    pub meta_loss: f64,
    /// f_t(θ_t) of every step.
    pub losses: Vec<f64>,
    /// θ and state after the truncation.
    pub carry: HostCarry,
}

/// Coordinates per parallel block: enough to amortise scheduling, small enough that a
/// block's records stay in L2.
const BLOCK: usize = 64;

/// The meta-gradient of T steps from `carry` at step `start` (spec §2), fused.
pub fn meta_grad(
    phi: &Phi,
    problem: &dyn HostProblem,
    carry: HostCarry,
    start: usize,
    steps: usize,
) -> Result<FusedMetaGrad, Error> {
    let cfg = phi.config;
    let n = problem.num_coords();
    if steps == 0 {
        return Err(Error::Config("a truncation needs at least one step".into()));
    }
    if carry.theta.len() != n
        || carry.h.len() != cfg.layers
        || carry
            .h
            .iter()
            .chain(&carry.c)
            .any(|v| v.len() != n * cfg.hidden)
    {
        return Err(Error::Shape(format!(
            "carry does not fit {n} coordinates × {} layers × H = {}",
            cfg.layers, cfg.hidden
        )));
    }
    let weights = Weights::new(phi);
    let lay = Layout::new(&cfg);
    let HostCarry { mut theta, h, c } = carry;

    // records[t]: per coordinate, everything step t produced (record 0: the initial h, c).
    let mut records: Vec<Vec<f32>> = Vec::with_capacity(steps + 1);
    let mut first = vec![0f32; n * lay.record];
    for (k, rec) in first.chunks_mut(lay.record).enumerate() {
        for l in 0..cfg.layers {
            let (hh, cc) = (
                &h[l][k * lay.h..(k + 1) * lay.h],
                &c[l][k * lay.h..(k + 1) * lay.h],
            );
            rec[lay.h_at(l)..lay.h_at(l) + lay.h].copy_from_slice(hh);
            rec[lay.c_at(l)..lay.c_at(l) + lay.h].copy_from_slice(cc);
        }
    }
    records.push(first);
    // grads[t] = ∇f(θ_t) for t = 0..=T; losses[t-1] = f(θ_t) for t = 1..=T.
    let mut grads: Vec<Vec<f32>> = Vec::with_capacity(steps + 1);
    let mut losses = Vec::with_capacity(steps);
    let mut g = vec![0f32; n];
    problem.eval(&theta, start, &mut g);
    for t in 0..steps {
        let mut cur = vec![0f32; n * lay.record];
        let prev = &records[t];
        cur.par_chunks_mut(lay.record * BLOCK)
            .zip(prev.par_chunks(lay.record * BLOCK))
            .zip(theta.par_chunks_mut(BLOCK))
            .zip(g.par_chunks(BLOCK))
            .for_each(|(((cur, prev), theta), g)| {
                cell::forward_block(&weights, &lay, g, prev, cur, theta)
            });
        records.push(cur);
        grads.push(std::mem::replace(&mut g, vec![0f32; n]));
        let f = problem.eval(&theta, start + t + 1, &mut g);
        losses.push(f);
    }
    grads.push(g);
    if let Some(t) = losses.iter().position(|l| !l.is_finite()) {
        return Err(Error::NonFinite(format!(
            "the optimizee's loss at step {} is {}; the optimizee blew up under this φ",
            start + t + 1,
            losses[t]
        )));
    }

    // ∂L/∂u_t = (1/T) Σ_{j=t+1..T} ∇f(θ_j), as suffix sums, t = 0..T-1.
    let inv_t = 1.0 / steps as f32;
    let mut du: Vec<Vec<f32>> = vec![vec![0f32; n]; steps];
    let mut acc = vec![0f32; n];
    for t in (0..steps).rev() {
        for (a, gj) in acc.iter_mut().zip(&grads[t + 1]) {
            *a += gj * inv_t;
        }
        du[t].copy_from_slice(&acc);
    }

    let blocks = n.div_ceil(BLOCK);
    let total = (0..blocks)
        .into_par_iter()
        .fold(
            || vec![0f32; weights.num_params()],
            |mut acc, b| {
                let range = b * BLOCK..((b + 1) * BLOCK).min(n);
                cell::backward_block(&weights, &lay, &records, &du, range, &mut acc);
                acc
            },
        )
        .reduce(
            || vec![0f32; weights.num_params()],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        );
    let grad = Phi::unflatten(cfg, &total).map_err(|e| match e {
        Error::NonFinite(what) => Error::NonFinite(format!(
            "the meta-gradient diverged ({what}); the optimizee blew up under this φ"
        )),
        other => other,
    })?;

    let last = &records[steps];
    let mut h: Vec<Vec<f32>> = vec![vec![0.0; n * lay.h]; cfg.layers];
    let mut c: Vec<Vec<f32>> = vec![vec![0.0; n * lay.h]; cfg.layers];
    for (k, rec) in last.chunks(lay.record).enumerate() {
        for l in 0..cfg.layers {
            h[l][k * lay.h..(k + 1) * lay.h]
                .copy_from_slice(&rec[lay.h_at(l)..lay.h_at(l) + lay.h]);
            c[l][k * lay.h..(k + 1) * lay.h]
                .copy_from_slice(&rec[lay.c_at(l)..lay.c_at(l) + lay.h]);
        }
    }
    Ok(FusedMetaGrad {
        grad,
        meta_loss: losses.iter().sum::<f64>() / steps as f64,
        losses,
        carry: HostCarry { theta, h, c },
    })
}

#[cfg(test)]
mod tests;
