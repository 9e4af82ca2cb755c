//! The fused CPU meta-gradient: the same truncation as [`crate::unroll::meta_grad`],
//! hand-differentiated and computed in f32 on host memory.
//!
//! Why it can be fused: every g_t is a constant (spec §2), so θ_{t+1} = θ_t + u_t has
//! ∂θ_{t+1}/∂θ_t = I and the problem enters the backward pass only through its gradients:
//! ∂L/∂u_t = (1/T) Σ_{j=t+1..T} ∇f_j(θ_j), suffix sums of gradients the forward pass
//! computes anyway (plus one at θ_T). The rest is the coordinatewise LSTM's own
//! backpropagation through time, independent per coordinate: blocks of coordinates run
//! in parallel ([`rayon`]), each keeping all 4H gates of a coordinate together in cache,
//! with branch-free exp/sigmoid/tanh ([`math`]) that vectorize, compiled for AVX-512 or
//! AVX2 with FMA when the CPU has them ([`kernels`], chosen at run time). The burn
//! composition in [`crate::unroll`] stays as the reference the tests compare this path
//! with.

mod cell;
pub mod kernels;
pub mod math;

use rayon::prelude::*;

use crate::problems::HostProblem;
use crate::truncation::{Forward, Truncation};
use std::ops::Range;

use crate::groups::AnyPhi;
use crate::{Error, OptimizerConfig, Phi};

use cell::{Accumulator, LANES, Layout, MOMENTS, Weights};
pub use kernels::Kernels;

/// Where a trajectory stands between truncations, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostCarry {
    /// θ_t, N values.
    pub theta: Vec<f32>,
    /// h of every layer, each N·H values (coordinate-major).
    pub h: Vec<Vec<f32>>,
    /// c of every layer, each N·H values.
    pub c: Vec<Vec<f32>>,
    /// rnnprop's moments m and v, each N values; empty for the other preprocessings
    /// ([`crate::Preprocess::moments`]).
    pub moments: Vec<Vec<f32>>,
}

impl HostCarry {
    /// θ_0 and zero LSTM state (the start of a trajectory).
    pub fn start(config: &OptimizerConfig, theta0: Vec<f32>) -> Self {
        let n = theta0.len() * config.hidden;
        let moments = vec![vec![0.0; theta0.len()]; config.preprocess.moments()];
        Self {
            theta: theta0,
            h: vec![vec![0.0; n]; config.layers],
            c: vec![vec![0.0; n]; config.layers],
            moments,
        }
    }
}

/// SIMD blocks per parallel task: enough to amortise scheduling, small enough that a
/// task's records stay in L2. Fixed, so results are the same for any thread count.
const TASK_BLOCKS: usize = 8;

/// The meta-gradient of T steps from `carry` at step `start` (spec §2), fused.
///
/// `phi` may have parameter groups (spec §5): each group's LSTM updates the coordinates
/// the problem assigns it ([`HostProblem::groups`]), and the gradient has one part per
/// group. The kernels are [`Kernels::chosen`]: AVX-512 or AVX2 with fused multiply-adds
/// where the CPU has them (the two give the same bits), plain ones elsewhere. Results are
/// bitwise reproducible for one variant, whatever the thread count, and agree across
/// variants to float32 rounding.
pub fn meta_grad(
    phi: &AnyPhi,
    problem: &dyn HostProblem,
    carry: HostCarry,
    start: usize,
    steps: usize,
) -> Result<Truncation<HostCarry>, Error> {
    meta_grad_with(Kernels::chosen()?, phi, problem, carry, start, steps, None)
}

/// [`meta_grad`] of the weighted meta-loss L = (1/T) Σ w_t f_t(θ_t) (spec §2), with
/// `weights[i]` the weight of step start+i+1; T = `weights.len()`.
pub fn meta_grad_weighted(
    phi: &AnyPhi,
    problem: &dyn HostProblem,
    carry: HostCarry,
    start: usize,
    weights: &[f32],
) -> Result<Truncation<HostCarry>, Error> {
    meta_grad_with(
        Kernels::chosen()?,
        phi,
        problem,
        carry,
        start,
        weights.len(),
        Some(weights),
    )
}

/// The truncation of [`meta_grad`] run forward only: the same losses, meta-loss and
/// carry (bitwise), without the meta-gradient, in O(N·H) memory instead of O(N·H·T).
///
/// `weights` as in [`meta_grad_weighted`] (T = `weights.len()`), or `None` with T =
/// `steps`. The forward-only estimators (PES, [`crate::estimator`]) run on this.
pub fn forward(
    phi: &AnyPhi,
    problem: &dyn HostProblem,
    carry: HostCarry,
    start: usize,
    steps: usize,
    weights: Option<&[f32]>,
) -> Result<Forward<HostCarry>, Error> {
    let steps = weights.map_or(steps, <[f32]>::len);
    let pass = if recomputes(&phi.config(), problem.num_coords(), steps) {
        Pass::ForwardCompact
    } else {
        Pass::Forward
    };
    forward_pass(pass, phi, problem, carry, start, steps, weights)
}

/// [`forward`] in `pass`.
fn forward_pass(
    pass: Pass,
    phi: &AnyPhi,
    problem: &dyn HostProblem,
    carry: HostCarry,
    start: usize,
    steps: usize,
    weights: Option<&[f32]>,
) -> Result<Forward<HostCarry>, Error> {
    let mut records = FORWARD_RECORDS.with(|r| std::mem::take(&mut *r.borrow_mut()));
    let out = run(
        pass,
        Kernels::chosen()?,
        phi,
        problem,
        carry,
        start,
        steps,
        weights,
        &mut records,
    );
    FORWARD_RECORDS.with(|r| *r.borrow_mut() = records);
    let out = out?;
    Ok(Forward {
        meta_loss: out.meta_loss,
        losses: out.losses,
        carry: out.carry,
    })
}

/// Whether a truncation computes the meta-gradient or only runs forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Forward, keeping every step's record, then backward.
    MetaGrad,
    /// Forward keeping only each coordinate's LSTM state (h, c), then backward task by
    /// task, each task first recomputing its blocks' records from the initial state and
    /// the kept gradients: O(N·(H + T)) memory instead of O(N·H·T), one more forward pass
    /// of the LSTM (not of the problem), the same gradient bit for bit.
    Recompute,
    /// Forward only, keeping two records (the previous step's and the current one).
    Forward,
    /// Forward only, keeping only each coordinate's h and c, as [`Pass::Recompute`]'s
    /// forward (for truncations beyond [`RECORD_BUDGET_BYTES`]).
    ForwardCompact,
}

/// Largest step records a meta-gradient keeps, in bytes (T + 1 records of about 280
/// floats per coordinate with H = 20 and two layers: N ≈ 45,000 at T = 20). Beyond it the
/// fused path recomputes them ([`Pass::Recompute`]).
pub const RECORD_BUDGET_BYTES: usize = 1 << 30;

/// Whether a meta-gradient of `steps` steps over `coords` coordinates recomputes its step
/// records rather than keeping them ([`RECORD_BUDGET_BYTES`]).
pub fn recomputes(config: &OptimizerConfig, coords: usize, steps: usize) -> bool {
    let record = Layout::new(config).record * 4;
    (steps + 1)
        .saturating_mul(coords.div_ceil(LANES) * LANES)
        .saturating_mul(record)
        > RECORD_BUDGET_BYTES
}

/// What [`run`] computed: the meta-gradient only in [`Pass::MetaGrad`].
struct Ran {
    grad: Option<AnyPhi>,
    meta_loss: f64,
    losses: Vec<f64>,
    carry: HostCarry,
}

thread_local! {
    /// Step records kept between calls on this thread: a worker's truncations all have
    /// the same size, so after the first one no memory is allocated or zeroed.
    static RECORDS: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The two records of [`forward`], kept apart from [`RECORDS`] so that a forward
    /// pass (PES runs many per truncation) neither shrinks nor reallocates those.
    static FORWARD_RECORDS: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Frees the step records this thread keeps between calls (they are as large as the
/// biggest truncation run on it: T+1 records of about 280 floats per coordinate, and
/// the forward pass's two).
pub fn release_buffers() {
    RECORDS.with(|r| r.borrow_mut().clear());
    FORWARD_RECORDS.with(|r| r.borrow_mut().clear());
}

/// [`meta_grad`] (weighted when `weights` is given) run by `kernels`.
pub(crate) fn meta_grad_with(
    kernels: Kernels,
    phi: &AnyPhi,
    problem: &dyn HostProblem,
    carry: HostCarry,
    start: usize,
    steps: usize,
    weights: Option<&[f32]>,
) -> Result<Truncation<HostCarry>, Error> {
    let pass = if recomputes(&phi.config(), problem.num_coords(), steps) {
        Pass::Recompute
    } else {
        Pass::MetaGrad
    };
    meta_grad_pass(pass, kernels, phi, problem, carry, start, steps, weights)
}

/// [`meta_grad_weighted`] (`weights`, or all 1 over `steps`) with the step records
/// recomputed whatever their size, as [`meta_grad`] does beyond [`RECORD_BUDGET_BYTES`]:
/// the same result bit for bit, for measuring what recomputation costs.
pub fn meta_grad_recomputed(
    phi: &AnyPhi,
    problem: &dyn HostProblem,
    carry: HostCarry,
    start: usize,
    steps: usize,
    weights: Option<&[f32]>,
) -> Result<Truncation<HostCarry>, Error> {
    meta_grad_pass(
        Pass::Recompute,
        Kernels::chosen()?,
        phi,
        problem,
        carry,
        start,
        steps,
        weights,
    )
}

/// [`forward`] keeping only h and c whatever the size (for tests).
#[cfg(test)]
pub(crate) fn forward_compact(
    phi: &AnyPhi,
    problem: &dyn HostProblem,
    carry: HostCarry,
    start: usize,
    steps: usize,
    weights: Option<&[f32]>,
) -> Result<Forward<HostCarry>, Error> {
    forward_pass(
        Pass::ForwardCompact,
        phi,
        problem,
        carry,
        start,
        steps,
        weights,
    )
}

#[allow(clippy::too_many_arguments)]
fn meta_grad_pass(
    pass: Pass,
    kernels: Kernels,
    phi: &AnyPhi,
    problem: &dyn HostProblem,
    carry: HostCarry,
    start: usize,
    steps: usize,
    weights: Option<&[f32]>,
) -> Result<Truncation<HostCarry>, Error> {
    let mut records = if pass == Pass::MetaGrad {
        RECORDS.with(|r| std::mem::take(&mut *r.borrow_mut()))
    } else {
        Vec::new()
    };
    let out = run(
        pass,
        kernels,
        phi,
        problem,
        carry,
        start,
        steps,
        weights,
        &mut records,
    );
    if pass == Pass::MetaGrad {
        RECORDS.with(|r| *r.borrow_mut() = records);
    }
    let out = out?;
    Ok(Truncation {
        // A MetaGrad pass always has it.
        grad: out
            .grad
            .ok_or_else(|| Error::Config("no meta-gradient was computed".into()))?,
        meta_loss: out.meta_loss,
        losses: out.losses,
        carry: out.carry,
    })
}

/// One group's coordinates: `natural` in θ, from block `block` on in the padded layout,
/// where each group starts on a whole SIMD block so every block has one LSTM.
struct Segment {
    weights: Weights,
    natural: Range<usize>,
    block: usize,
    blocks: usize,
}

impl Segment {
    /// Index in the padded layout of the segment's first coordinate.
    fn pad(&self) -> usize {
        self.block * LANES
    }
}

// The pass's inputs, each needed: bundling them would only rename them.
#[allow(clippy::too_many_arguments)]
fn run(
    pass: Pass,
    kernels: Kernels,
    phi: &AnyPhi,
    problem: &dyn HostProblem,
    carry: HostCarry,
    start: usize,
    steps: usize,
    weights: Option<&[f32]>,
    records: &mut Vec<Vec<f32>>,
) -> Result<Ran, Error> {
    let weight = |t: usize| weights.map_or(1.0, |w| w[t]);
    let cfg = phi.config();
    let n = problem.num_coords();
    crate::truncation::check_steps(steps)?;
    if carry.theta.len() != n
        || carry.h.len() != cfg.layers
        || carry
            .h
            .iter()
            .chain(&carry.c)
            .any(|v| v.len() != n * cfg.hidden)
        || carry.moments.len() != cfg.preprocess.moments()
        || carry.moments.iter().any(|v| v.len() != n)
    {
        return Err(Error::Shape(format!(
            "carry does not fit {n} coordinates × {} layers × H = {} with {} preprocessing",
            cfg.layers, cfg.hidden, cfg.preprocess
        )));
    }
    let mut block = 0;
    let segments: Vec<Segment> = phi
        .bind(problem.groups().as_ref(), n)?
        .into_iter()
        .map(|(part, natural)| {
            let blocks = natural.len().div_ceil(LANES);
            let s = Segment {
                weights: Weights::new(part),
                natural,
                block,
                blocks,
            };
            block += blocks;
            s
        })
        .collect();
    let lay = Layout::new(&cfg);
    let (hidden, rl) = (cfg.hidden, lay.record * LANES);
    // Coordinates are padded to whole SIMD blocks, group by group; padding has g = 0 and
    // ∂L/∂u = 0, so it contributes nothing to the gradient and is dropped at the end.
    let blocks = block;
    let n_pad = blocks * LANES;
    // With one group the padded layout is θ itself plus a tail, so the problem reads it in
    // place at every step (θ is copied in and out once per truncation).
    let single = segments.len() == 1;
    let pad_of = |k: usize| -> usize {
        let s = segments
            .iter()
            .find(|s| s.natural.contains(&k))
            .unwrap_or(&segments[0]);
        s.pad() + k - s.natural.start
    };
    let at = |p: usize, offset: usize| (p / LANES) * rl + offset * LANES + p % LANES;
    let HostCarry {
        theta,
        h,
        c,
        moments: carried,
    } = carry;
    // The preprocessing's moments, [`MOMENTS`] values per block (zeros, unused, unless
    // rnnprop carries them).
    let mut moments = vec![0f32; blocks * MOMENTS];
    let mo = |p: usize, i: usize| (p / LANES) * MOMENTS + i * LANES + p % LANES;
    for (i, v) in carried.iter().enumerate() {
        for (k, x) in v.iter().enumerate() {
            moments[mo(pad_of(k), i)] = *x;
        }
    }
    let moments0 = if pass == Pass::Recompute {
        moments.clone()
    } else {
        Vec::new()
    };
    let mut theta_pad = vec![0f32; n_pad];
    for s in &segments {
        theta_pad[s.pad()..s.pad() + s.natural.len()].copy_from_slice(&theta[s.natural.clone()]);
    }
    // θ and ∇f in θ's own order, for the problem (only with several groups).
    let (mut theta_nat, mut g_nat) = if single {
        (Vec::new(), Vec::new())
    } else {
        (theta, vec![0f32; n])
    };
    let mut eval = |theta_pad: &[f32], step: usize, g_pad: &mut [f32]| -> f64 {
        if single {
            return problem.eval(&theta_pad[..n], step, &mut g_pad[..n]);
        }
        for s in &segments {
            theta_nat[s.natural.clone()]
                .copy_from_slice(&theta_pad[s.pad()..s.pad() + s.natural.len()]);
        }
        let f = problem.eval(&theta_nat, step, &mut g_nat);
        for s in &segments {
            g_pad[s.pad()..s.pad() + s.natural.len()].copy_from_slice(&g_nat[s.natural.clone()]);
        }
        f
    };

    // records[t]: for every block, everything step t produced (record 0: the initial h, c);
    // forward only, step t's record is records[t % 2].
    // Reused buffers need no zeroing: the forward pass writes every value it later reads.
    // Recompute keeps no records: each block's h and c of every layer, `sl` values per
    // block (layer by layer, h then c, each H·LANES), in `state`.
    let compact = matches!(pass, Pass::Recompute | Pass::ForwardCompact);
    let sl = cfg.layers * 2 * hidden * LANES;
    let st = |p: usize, l: usize, c: bool, j: usize| {
        (p / LANES) * sl + (2 * l + usize::from(c)) * hidden * LANES + j * LANES + p % LANES
    };
    let kept = match pass {
        Pass::MetaGrad => steps + 1,
        Pass::Forward => 2,
        Pass::Recompute | Pass::ForwardCompact => 0,
    };
    let slot = |t: usize| if pass == Pass::MetaGrad { t } else { t % 2 };
    records.resize_with(kept, Vec::new);
    records.truncate(kept);
    for r in records.iter_mut() {
        r.resize(blocks * rl, 0.0);
    }
    let mut state = vec![0f32; if compact { blocks * sl } else { 0 }];
    if compact {
        for k in 0..n {
            let p = pad_of(k);
            for l in 0..cfg.layers {
                for j in 0..hidden {
                    state[st(p, l, false, j)] = h[l][k * hidden + j];
                    state[st(p, l, true, j)] = c[l][k * hidden + j];
                }
            }
        }
    } else {
        let first = &mut records[0];
        // Padding starts from zero state, whatever a reused buffer held before (a diverged
        // earlier truncation could have left NaN there).
        first.fill(0.0);
        for k in 0..n {
            let p = pad_of(k);
            for l in 0..cfg.layers {
                for j in 0..hidden {
                    first[at(p, lay.h_at(l) + j)] = h[l][k * hidden + j];
                    first[at(p, lay.c_at(l) + j)] = c[l][k * hidden + j];
                }
            }
        }
    }
    // The state the backward pass recomputes from.
    let state0 = if pass == Pass::Recompute {
        state.clone()
    } else {
        Vec::new()
    };
    // grads[t] = ∇f(θ_t) for t = 0..=T; losses[t-1] = f(θ_t) for t = 1..=T.
    let mut grads: Vec<Vec<f32>> =
        Vec::with_capacity(if pass == Pass::MetaGrad || pass == Pass::Recompute {
            steps + 1
        } else {
            1
        });
    let mut losses = Vec::with_capacity(steps);
    let mut g = vec![0f32; n_pad];
    eval(&theta_pad, start, &mut g);
    let chunk = TASK_BLOCKS * LANES;
    for t in 0..steps {
        if compact {
            for s in &segments {
                let (b, e) = (s.block, s.block + s.blocks);
                state[b * sl..e * sl]
                    .par_chunks_mut(TASK_BLOCKS * sl)
                    .zip(theta_pad[b * LANES..e * LANES].par_chunks_mut(chunk))
                    .zip(g[b * LANES..e * LANES].par_chunks(chunk))
                    .zip(moments[b * MOMENTS..e * MOMENTS].par_chunks_mut(TASK_BLOCKS * MOMENTS))
                    .for_each_init(
                        || (vec![0f32; TASK_BLOCKS * rl], vec![0f32; TASK_BLOCKS * rl]),
                        |(prev, cur), (((state, theta), g), mom)| {
                            let nb = g.len() / LANES;
                            let (prev, cur) = (&mut prev[..nb * rl], &mut cur[..nb * rl]);
                            for k in 0..nb {
                                unpack(&lay, &state[k * sl..(k + 1) * sl], &mut prev[k * rl..]);
                            }
                            let w = &s.weights;
                            cell::forward_blocks(kernels, w, &lay, g, mom, prev, cur, theta);
                            for k in 0..nb {
                                pack(&lay, &cur[k * rl..], &mut state[k * sl..(k + 1) * sl]);
                            }
                        },
                    );
            }
            if pass == Pass::Recompute {
                grads.push(std::mem::replace(&mut g, vec![0f32; n_pad]));
            } else {
                g.fill(0.0);
            }
            let f = eval(&theta_pad, start + t + 1, &mut g);
            losses.push(f);
            continue;
        }
        let (prev, cur) = match pass {
            Pass::Recompute | Pass::ForwardCompact => unreachable!("handled above"),
            Pass::MetaGrad => {
                let (done, rest) = records.split_at_mut(t + 1);
                (&done[t], &mut rest[0])
            }
            Pass::Forward => {
                let (a, b) = records.split_at_mut(1);
                if t % 2 == 0 {
                    (&a[0], &mut b[0])
                } else {
                    (&b[0], &mut a[0])
                }
            }
        };
        for s in &segments {
            let (b, e) = (s.block, s.block + s.blocks);
            cur[b * rl..e * rl]
                .par_chunks_mut(TASK_BLOCKS * rl)
                .zip(prev[b * rl..e * rl].par_chunks(TASK_BLOCKS * rl))
                .zip(theta_pad[b * LANES..e * LANES].par_chunks_mut(chunk))
                .zip(g[b * LANES..e * LANES].par_chunks(chunk))
                .zip(moments[b * MOMENTS..e * MOMENTS].par_chunks_mut(TASK_BLOCKS * MOMENTS))
                .for_each(|((((cur, prev), theta), g), mom)| {
                    cell::forward_blocks(kernels, &s.weights, &lay, g, mom, prev, cur, theta)
                });
        }
        match pass {
            Pass::MetaGrad | Pass::Recompute => {
                grads.push(std::mem::replace(&mut g, vec![0f32; n_pad]))
            }
            // The same buffer again: cleared, as a fresh one would be.
            Pass::Forward | Pass::ForwardCompact => g.fill(0.0),
        }
        let f = eval(&theta_pad, start + t + 1, &mut g);
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
    let meta_loss = losses
        .iter()
        .enumerate()
        .map(|(t, l)| weight(t) as f64 * l)
        .sum::<f64>()
        / steps as f64;
    // θ and the LSTM state after the last step, in θ's order.
    let mut h: Vec<Vec<f32>> = vec![vec![0.0; n * hidden]; cfg.layers];
    let mut c: Vec<Vec<f32>> = vec![vec![0.0; n * hidden]; cfg.layers];
    for k in 0..n {
        let p = pad_of(k);
        for l in 0..cfg.layers {
            for j in 0..hidden {
                let (hv, cv) = if compact {
                    (state[st(p, l, false, j)], state[st(p, l, true, j)])
                } else {
                    let last = &records[slot(steps)];
                    (last[at(p, lay.h_at(l) + j)], last[at(p, lay.c_at(l) + j)])
                };
                h[l][k * hidden + j] = hv;
                c[l][k * hidden + j] = cv;
            }
        }
    }
    drop(state);
    let moments: Vec<Vec<f32>> = (0..cfg.preprocess.moments())
        .map(|i| (0..n).map(|k| moments[mo(pad_of(k), i)]).collect())
        .collect();
    let mut theta = vec![0f32; n];
    for s in &segments {
        theta[s.natural.clone()].copy_from_slice(&theta_pad[s.pad()..s.pad() + s.natural.len()]);
    }
    let carry = HostCarry {
        theta,
        h,
        c,
        moments,
    };
    if matches!(pass, Pass::Forward | Pass::ForwardCompact) {
        return Ok(Ran {
            grad: None,
            meta_loss,
            losses,
            carry,
        });
    }

    // ∂L/∂u_t = (1/T) Σ_{j=t+1..T} w_j ∇f(θ_j), as suffix sums, t = 0..T-1.
    let inv_t = 1.0 / steps as f32;
    let mut du: Vec<Vec<f32>> = vec![vec![0f32; n_pad]; steps];
    let mut acc = vec![0f32; n_pad];
    for t in (0..steps).rev() {
        let scale = inv_t * weight(t);
        for (a, gj) in acc.iter_mut().zip(&grads[t + 1]) {
            *a += gj * scale;
        }
        du[t].copy_from_slice(&acc);
    }

    // Each task sums blocks of one group into its own accumulator; each group's tasks are
    // then added in task order, so the result does not depend on scheduling or the thread
    // count.
    let tasks: Vec<(usize, Range<usize>)> = segments
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            (0..s.blocks.div_ceil(TASK_BLOCKS)).map(move |task| {
                let b = s.block + task * TASK_BLOCKS;
                (i, b..(b + TASK_BLOCKS).min(s.block + s.blocks))
            })
        })
        .collect();
    let partial: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(Vec::new, |local: &mut Vec<Vec<f32>>, (i, range)| {
            let w = &segments[*i].weights;
            let mut acc = Accumulator::new(w);
            if !compact {
                cell::backward_blocks(kernels, w, &lay, records, &du, range.clone(), &mut acc);
                return acc.total();
            }
            // This task's records, recomputed from its blocks' initial state and the kept
            // gradients: the forward pass's values exactly (the same kernel on the same
            // inputs; θ does not enter the records, so a scratch θ does).
            let nb = range.len();
            local.resize_with(steps + 1, Vec::new);
            for r in local.iter_mut() {
                r.resize(nb * rl, 0.0);
            }
            local[0].fill(0.0);
            for k in 0..nb {
                let b = range.start + k;
                unpack(&lay, &state0[b * sl..(b + 1) * sl], &mut local[0][k * rl..]);
            }
            let lanes = range.start * LANES..range.end * LANES;
            let mut theta = vec![0f32; nb * LANES];
            let mut mom = moments0[range.start * MOMENTS..range.end * MOMENTS].to_vec();
            for t in 0..steps {
                let (done, rest) = local.split_at_mut(t + 1);
                let g = &grads[t][lanes.clone()];
                let (prev, cur) = (&done[t], &mut rest[0]);
                cell::forward_blocks(kernels, w, &lay, g, &mut mom, prev, cur, &mut theta);
            }
            let du: Vec<Vec<f32>> = du.iter().map(|d| d[lanes.clone()].to_vec()).collect();
            cell::backward_blocks(kernels, w, &lay, &local[..], &du, 0..nb, &mut acc);
            acc.total()
        })
        .collect();
    let mut parts = Vec::with_capacity(segments.len());
    for (i, s) in segments.iter().enumerate() {
        let mut total = vec![0f32; s.weights.num_params()];
        for (_, p) in tasks.iter().zip(&partial).filter(|((j, _), _)| *j == i) {
            total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
        }
        parts.push(Phi::unflatten(cfg, &total).map_err(|e| match e {
            Error::NonFinite(what) => Error::NonFinite(format!(
                "the meta-gradient diverged ({what}); the optimizee blew up under this φ"
            )),
            other => other,
        })?);
    }
    let grad = phi.with_parts(parts)?;
    Ok(Ran {
        grad: Some(grad),
        meta_loss,
        losses,
        carry,
    })
}

/// Copies a block's h and c of every layer from its compact state (`sl` values) into its
/// record (the offsets of [`Layout`]).
fn unpack(lay: &Layout, state: &[f32], rec: &mut [f32]) {
    let hl = lay.h * LANES;
    for (l, hc) in state.chunks_exact(2 * hl).enumerate() {
        let (h, c) = hc.split_at(hl);
        rec[lay.h_at(l) * LANES..][..hl].copy_from_slice(h);
        rec[lay.c_at(l) * LANES..][..hl].copy_from_slice(c);
    }
}

/// Copies a block's h and c of every layer from its record into its compact state.
fn pack(lay: &Layout, rec: &[f32], state: &mut [f32]) {
    let hl = lay.h * LANES;
    for (l, hc) in state.chunks_exact_mut(2 * hl).enumerate() {
        let (h, c) = hc.split_at_mut(hl);
        h.copy_from_slice(&rec[lay.h_at(l) * LANES..][..hl]);
        c.copy_from_slice(&rec[lay.c_at(l) * LANES..][..hl]);
    }
}

#[cfg(test)]
mod tests;
