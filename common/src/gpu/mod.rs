//! The fused LSTM step on the GPU: one CubeCL kernel per optimizer step forward and one
//! backward ([`kernel`]), so the LSTM costs a truncation O(T) launches (besides those of
//! the problem's loss and gradient, and a few matrix products per step and group for
//! ∂L/∂φ), where the burn composition of [`crate::unroll`] launches about a hundred per
//! step.
//!
//! The math is the fused CPU path's ([`crate::fused`]): every g_t is a constant (spec §2),
//! so the problem enters the backward pass only through the gradients the forward pass
//! computes anyway, summed from the end, ∂L/∂u_t = (1/T) Σ_{j>t} w_j ∇f_j(θ_j), and the
//! rest is the coordinatewise LSTM's backpropagation through time. Each kernel runs one
//! thread per coordinate through every layer; ∂L/∂φ is the sum over coordinates of the
//! gate gradients times the layer inputs, a few matrix products per step that burn runs.
//! The problem itself (its loss and gradient) runs as burn operations on the same device.
//!
//! The kernels enter burn as a backend extension ([`LstmStep`]) implemented for the
//! cubecl backend; burn's fusion queues them like any other operation.

mod kernel;

use std::ops::Range;

use burn::backend::fusion::custom::TensorSpec;
use burn::backend::{Backend, Dispatch, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::groups::AnyPhi;
use crate::problems::Problem;
use crate::tensor::{from_f32, to_f32, to_f64};
use crate::truncation::{Forward, Truncation, check_steps};
use crate::unroll::{DeviceCarry, finite_losses, weighted_mean};
use crate::{Error, LstmState, OptimizerConfig, Phi, Preprocess};

/// What the step kernels need besides tensors: the LSTM's sizes, its constants, and the
/// coordinates of each parameter group.
#[derive(Debug, Clone)]
pub struct StepShape {
    /// Features per coordinate (1 for identity, 2 for log_sign and rnnprop).
    inputs: usize,
    /// Whether the kernels are given the features (rnnprop's, `[2, N]`) instead of g.
    given: bool,
    /// H.
    hidden: usize,
    /// L.
    layers: usize,
    /// log_sign's threshold e^{-k}, in f32.
    threshold: f32,
    /// log_sign's k.
    k: f32,
    /// e^k.
    ek: f32,
    /// The output's factor.
    out_scale: f32,
    /// Values in one group's φ.
    group_len: usize,
    /// Each group's first coordinate and count, in φ's order.
    groups: Vec<(u32, u32)>,
}

impl StepShape {
    /// The shape of `config`'s step over the coordinate ranges `groups` of `n`
    /// coordinates; refuses sizes whose buffers the kernels' 32-bit indices cannot address.
    fn new(config: &OptimizerConfig, groups: &[Range<usize>], n: usize) -> Result<Self, Error> {
        let too_big = || {
            Error::Config(format!(
                "the GPU kernels index their buffers with 32 bits, and {n} coordinates with \
                 {} layers of H = {} need more; run this problem with --backend fused",
                config.layers, config.hidden
            ))
        };
        let as_u32 = |v: usize| u32::try_from(v).map_err(|_| too_big());
        let shape = Self {
            inputs: config.input_size(0),
            given: config.preprocess == Preprocess::Rnnprop,
            hidden: config.hidden,
            layers: config.layers,
            threshold: (-config.k).exp() as f32,
            k: config.k as f32,
            ek: config.k.exp() as f32,
            out_scale: config.out_scale as f32,
            group_len: config.num_params(),
            groups: groups
                .iter()
                .map(|r| Ok((as_u32(r.start)?, as_u32(r.len())?)))
                .collect::<Result<_, Error>>()?,
        };
        // The largest buffers (gate gradients, the stacked layer inputs) and φ of every
        // group: each index into them must fit in a u32.
        let rows = shape.gate_rows().max(shape.input_rows(shape.layers + 1));
        rows.checked_mul(n).map(as_u32).ok_or_else(too_big)??;
        shape
            .group_len
            .checked_mul(groups.len())
            .map(as_u32)
            .ok_or_else(too_big)??;
        Ok(shape)
    }

    /// Rows of the gate-gradient buffer: L·4H.
    fn gate_rows(&self) -> usize {
        self.layers * 4 * self.hidden
    }

    /// Rows of layer `l`'s `[x; h_prev; 1]` block (l = L: the output's `[h; 1]`).
    fn block_rows(&self, l: usize) -> usize {
        match l {
            0 => self.inputs + self.hidden + 1,
            l if l < self.layers => 2 * self.hidden + 1,
            _ => self.hidden + 1,
        }
    }

    /// Rows of the blocks before block `l` (all of them for l = L + 1).
    fn input_rows(&self, l: usize) -> usize {
        (0..l).map(|m| self.block_rows(m)).sum()
    }
}

/// The output specs of [`LstmStep::lstm_step_backward`].
#[allow(clippy::too_many_arguments)]
fn backward_meta(
    du: &TensorSpec,
    _grad: &TensorSpec,
    h_prev: &TensorSpec,
    _c_prev: &TensorSpec,
    _h_new: &TensorSpec,
    _c_new: &TensorSpec,
    _dh: &TensorSpec,
    _dc: &TensorSpec,
    _w: &TensorSpec,
    shape: &StepShape,
) -> (TensorSpec, TensorSpec, TensorSpec, TensorSpec) {
    let n = du.shape.num_elements();
    (
        h_prev.clone(),
        h_prev.clone(),
        TensorSpec::new(Shape::new([shape.gate_rows() * n]), du.dtype),
        TensorSpec::new(
            Shape::new([shape.input_rows(shape.layers + 1) * n]),
            du.dtype,
        ),
    )
}

/// The fused optimizer step as a burn backend operation. Every tensor is flat f32 in the
/// layouts of [`kernel`].
#[backend_extension(Cube, Fusion)]
pub trait LstmStep: Backend {
    /// One step: (θ', h', c') from θ, g (or rnnprop's features), h, c and φ (every
    /// group's, concatenated).
    #[fusion(meta = |theta, _grad, h, c, _w, _shape| (theta.clone(), h.clone(), c.clone()))]
    fn lstm_step(
        theta: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        h: FloatTensor<Self>,
        c: FloatTensor<Self>,
        w: FloatTensor<Self>,
        shape: StepShape,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// The step's backward: (∂h, ∂c of the old state, gate gradients, every layer's
    /// inputs as `[x; h_prev; 1]` blocks) from ∂L/∂u, g, the old and new state, and the
    /// gradients reaching the new state.
    #[fusion(meta = backward_meta)]
    #[allow(clippy::too_many_arguments)]
    fn lstm_step_backward(
        du: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        h_prev: FloatTensor<Self>,
        c_prev: FloatTensor<Self>,
        h_new: FloatTensor<Self>,
        c_new: FloatTensor<Self>,
        dh: FloatTensor<Self>,
        dc: FloatTensor<Self>,
        w: FloatTensor<Self>,
        shape: StepShape,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );
}

/// A contiguous f32 buffer of `len` values on `like`'s device.
fn empty_like(like: &CubeTensor, len: usize) -> CubeTensor {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::new([len]),
        DType::F32,
    )
}

/// A kernel argument viewing all of `t`.
fn arg(t: &CubeTensor) -> BufferArg {
    let len = t.meta.shape().num_elements();
    // SAFETY: the length is the tensor's own, and every tensor passed is contiguous.
    unsafe { BufferArg::from_raw_parts(t.handle.clone(), len) }
}

/// Threads per cube and cubes for `count` coordinates.
fn grid(client: &Client, count: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(client, count);
    (
        cubecl::calculate_cube_count_elemwise(client, count, dim),
        dim,
    )
}

impl LstmStep for CubeBackend {
    fn lstm_step(
        theta: CubeTensor,
        grad: CubeTensor,
        h: CubeTensor,
        c: CubeTensor,
        w: CubeTensor,
        shape: StepShape,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let [theta, grad, h, c, w] = [theta, grad, h, c, w].map(into_contiguous);
        let n = theta.meta.shape().num_elements();
        let (theta_out, h_out, c_out) = (
            empty_like(&theta, n),
            empty_like(&h, h.meta.shape().num_elements()),
            empty_like(&c, c.meta.shape().num_elements()),
        );
        for (g, &(start, count)) in shape.groups.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let (cubes, dim) = grid(&theta.client, count as usize);
            kernel::step_forward::launch(
                &theta.client,
                cubes,
                dim,
                arg(&theta),
                arg(&grad),
                arg(&h),
                arg(&c),
                arg(&w),
                arg(&theta_out),
                arg(&h_out),
                arg(&c_out),
                start,
                count,
                (g * shape.group_len) as u32, // < 2³²: checked in StepShape::new
                shape.threshold,
                shape.k,
                shape.ek,
                shape.out_scale,
                shape.inputs,
                shape.given,
                shape.hidden,
                shape.layers,
            );
        }
        (theta_out, h_out, c_out)
    }

    fn lstm_step_backward(
        du: CubeTensor,
        grad: CubeTensor,
        h_prev: CubeTensor,
        c_prev: CubeTensor,
        h_new: CubeTensor,
        c_new: CubeTensor,
        dh: CubeTensor,
        dc: CubeTensor,
        w: CubeTensor,
        shape: StepShape,
    ) -> (CubeTensor, CubeTensor, CubeTensor, CubeTensor) {
        let [du, grad, h_prev, c_prev, h_new, c_new, dh, dc, w] =
            [du, grad, h_prev, c_prev, h_new, c_new, dh, dc, w].map(into_contiguous);
        let n = du.meta.shape().num_elements();
        let state = h_prev.meta.shape().num_elements();
        let dh_out = empty_like(&du, state);
        let dc_out = empty_like(&du, state);
        let dz = empty_like(&du, shape.gate_rows() * n);
        let x = empty_like(&du, shape.input_rows(shape.layers + 1) * n);
        for (g, &(start, count)) in shape.groups.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let (cubes, dim) = grid(&du.client, count as usize);
            kernel::step_backward::launch(
                &du.client,
                cubes,
                dim,
                arg(&du),
                arg(&grad),
                arg(&h_prev),
                arg(&c_prev),
                arg(&h_new),
                arg(&c_new),
                arg(&dh),
                arg(&dc),
                arg(&w),
                arg(&dh_out),
                arg(&dc_out),
                arg(&dz),
                arg(&x),
                start,
                count,
                (g * shape.group_len) as u32, // < 2³²: checked in StepShape::new
                shape.threshold,
                shape.k,
                shape.ek,
                shape.out_scale,
                shape.inputs,
                shape.given,
                shape.hidden,
                shape.layers,
            );
        }
        (dh_out, dc_out, dz, x)
    }
}

/// One fused step on tensors of a plain (not autodiff) wgpu device.
fn step(
    theta: Tensor<1>,
    grad: Tensor<1>,
    h: Tensor<1>,
    c: Tensor<1>,
    w: &Tensor<1>,
    shape: &StepShape,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let (t, h, c) = <Dispatch as LstmStep>::lstm_step(
        theta.into_dispatch(),
        grad.into_dispatch(),
        h.into_dispatch(),
        c.into_dispatch(),
        w.clone().into_dispatch(),
        shape.clone(),
    );
    (
        Tensor::from_dispatch(t),
        Tensor::from_dispatch(h),
        Tensor::from_dispatch(c),
    )
}

/// A truncation's setup: φ and the state in the kernels' layouts, on the plain device.
struct Setup {
    shape: StepShape,
    w: Tensor<1>,
    n: usize,
    theta: Tensor<1>,
    h: Tensor<1>,
    c: Tensor<1>,
    /// rnnprop's m and v (`[N]` each), or none.
    moments: Option<(Tensor<1>, Tensor<1>)>,
}

/// What the step kernels read besides θ and the state: g itself, or with rnnprop its
/// features `[2, N]` from the moments, which step too.
fn kernel_input(
    g: Tensor<1>,
    moments: Option<(Tensor<1>, Tensor<1>)>,
) -> (Tensor<1>, Option<(Tensor<1>, Tensor<1>)>) {
    let Some((m, v)) = moments else {
        return (g, None);
    };
    let n = g.dims()[0];
    let (x, m, v) =
        crate::preprocess::rnnprop(g.reshape([n, 1]), m.reshape([n, 1]), v.reshape([n, 1]));
    // [N, 2] → [2, N]: feature-major, as the kernels read it.
    let x = x.transpose().reshape([2 * n]);
    (x, Some((m.reshape([n]), v.reshape([n]))))
}

/// φ bound to the problem's groups, and the carry in the kernels' layouts.
fn setup(parts: &[(&Phi, Range<usize>)], carry: DeviceCarry) -> Result<Setup, Error> {
    let config = parts
        .first()
        .map(|(p, _)| p.config)
        .ok_or_else(|| Error::Config("φ has no parameter group".into()))?;
    let ranges: Vec<Range<usize>> = parts.iter().map(|(_, r)| r.clone()).collect();
    let theta = carry.theta.inner();
    if theta.dtype() != DType::F32 {
        return Err(Error::Config(format!(
            "the GPU kernels compute in float32, the trajectory's state is {:?}",
            theta.dtype()
        )));
    }
    let dev = theta.device();
    let n = theta.dims()[0];
    let shape = StepShape::new(&config, &ranges, n)?;
    let flat: Vec<f32> = parts.iter().flat_map(|(p, _)| p.flatten()).collect();
    let w = from_f32(&flat, [flat.len()], &dev, DType::F32);
    let moments = match carry.state.moments.as_slice() {
        [] if !shape.given => None,
        [m, v] if shape.given => Some((
            m.clone().inner().reshape([n]),
            v.clone().inner().reshape([n]),
        )),
        _ => {
            return Err(Error::Shape(format!(
                "the trajectory's state has {} moment vectors; {} preprocessing carries {}",
                carry.state.moments.len(),
                config.preprocess,
                config.preprocess.moments()
            )));
        }
    };
    // [N, H] per layer → [L·H, N] flat: unit-major, so a warp's reads are contiguous.
    let stack = |layers: Vec<Tensor<2>>| {
        let rows: Vec<Tensor<2>> = layers.into_iter().map(|t| t.inner().transpose()).collect();
        Tensor::cat(rows, 0).reshape([config.layers * config.hidden * n])
    };
    Ok(Setup {
        shape,
        w,
        n,
        theta: theta.reshape([n]),
        h: stack(carry.state.h),
        c: stack(carry.state.c),
        moments,
    })
}

/// The kernels' state back as a [`DeviceCarry`] (`[N, 1]` and `[N, H]` per layer).
fn carry_from(
    setup: &Setup,
    theta: Tensor<1>,
    h: Tensor<1>,
    c: Tensor<1>,
    moments: Option<(Tensor<1>, Tensor<1>)>,
) -> DeviceCarry {
    let (n, hid, layers) = (setup.n, setup.shape.hidden, setup.shape.layers);
    let unstack = |s: Tensor<1>| -> Vec<Tensor<2>> {
        let s = s.reshape([layers * hid, n]);
        (0..layers)
            .map(|l| {
                Tensor::from_inner(s.clone().slice([l * hid..(l + 1) * hid, 0..n]).transpose())
            })
            .collect()
    };
    DeviceCarry {
        theta: Tensor::from_inner(theta.reshape([n, 1])),
        state: LstmState {
            h: unstack(h),
            c: unstack(c),
            moments: moments
                .map(|(m, v)| {
                    vec![
                        Tensor::from_inner(m.reshape([n, 1])),
                        Tensor::from_inner(v.reshape([n, 1])),
                    ]
                })
                .unwrap_or_default(),
        },
    }
}

/// The problem's gradient at θ (flat, plain device) for step `t`.
fn problem_grad(problem: &dyn Problem, theta: &Tensor<1>, n: usize, t: usize) -> Tensor<1> {
    let theta = Tensor::from_inner(theta.clone().reshape([n, 1]));
    problem.grad(theta, t).inner().reshape([n])
}

/// The problem's loss at θ for step `t`, a one-element tensor.
fn problem_loss(problem: &dyn Problem, theta: &Tensor<1>, n: usize, t: usize) -> Tensor<1> {
    let theta = Tensor::from_inner(theta.clone().reshape([n, 1]));
    problem.loss(theta, t).inner()
}

/// Brings the losses to the host, refusing non-finite ones as the other paths do.
fn losses_of(losses: Vec<Tensor<1>>) -> Result<Vec<f64>, Error> {
    let losses = to_f64(&Tensor::cat(losses, 0))?;
    finite_losses(&losses)?;
    Ok(losses)
}

/// θ, h, c and the moments after some steps.
type Ended = (
    Tensor<1>,
    Tensor<1>,
    Tensor<1>,
    Option<(Tensor<1>, Tensor<1>)>,
);

/// Runs `steps` fused steps from `s`'s state at step `start`: each step's loss tensor
/// (f_t(θ_t), t = start+1 ..= start+steps) and the state after them.
fn unroll(s: &Setup, problem: &dyn Problem, start: usize, steps: usize) -> (Vec<Tensor<1>>, Ended) {
    let (mut theta, mut h, mut c) = (s.theta.clone(), s.h.clone(), s.c.clone());
    let mut moments = s.moments.clone();
    let mut losses = Vec::with_capacity(steps);
    for t in start..start + steps {
        let g = problem_grad(problem, &theta, s.n, t);
        let x;
        (x, moments) = kernel_input(g, moments);
        (theta, h, c) = step(theta, x, h, c, &s.w, &s.shape);
        losses.push(problem_loss(problem, &theta, s.n, t + 1));
    }
    (losses, (theta, h, c, moments))
}

/// The truncation run forward only with the fused kernels: the losses, the meta-loss
/// (weighted by `weights`, T = `weights.len()`, or T = `steps`) and the carry.
pub fn forward(
    parts: &[(&Phi, Range<usize>)],
    problem: &dyn Problem,
    carry: DeviceCarry,
    start: usize,
    steps: usize,
    weights: Option<&[f32]>,
) -> Result<Forward<DeviceCarry>, Error> {
    let steps = weights.map_or(steps, <[f32]>::len);
    check_steps(steps)?;
    let s = setup(parts, carry)?;
    let (losses, (theta, h, c, moments)) = unroll(&s, problem, start, steps);
    let losses = losses_of(losses)?;
    Ok(Forward {
        meta_loss: weighted_mean(&losses, weights),
        losses,
        carry: carry_from(&s, theta, h, c, moments),
    })
}

/// f(θ_t) for t = 0 ..= steps from `carry` (θ₀ and zero state) with the fused kernels,
/// non-finite losses included as they are.
pub fn curve(
    parts: &[(&Phi, Range<usize>)],
    problem: &dyn Problem,
    carry: DeviceCarry,
    steps: usize,
) -> Result<Vec<f64>, Error> {
    let s = setup(parts, carry)?;
    let first = problem_loss(problem, &s.theta, s.n, 0);
    let (losses, _) = unroll(&s, problem, 0, steps);
    to_f64(&Tensor::cat([vec![first], losses].concat(), 0))
}

/// The meta-gradient of T steps from `carry` at step `start` (spec §2) with the fused
/// kernels: T = `steps`, or with `weights` the weighted meta-loss over `weights.len()`
/// steps. `phi` is the AnyPhi whose groups `parts` binds (its names shape the result).
pub fn meta_grad(
    phi: &AnyPhi,
    parts: &[(&Phi, Range<usize>)],
    problem: &dyn Problem,
    carry: DeviceCarry,
    start: usize,
    steps: usize,
    weights: Option<&[f32]>,
) -> Result<Truncation<DeviceCarry>, Error> {
    let steps = weights.map_or(steps, <[f32]>::len);
    check_steps(steps)?;
    let s = setup(parts, carry)?;
    let (n, hid, layers) = (s.n, s.shape.hidden, s.shape.layers);
    let h4 = 4 * hid;
    // Forward, keeping every step's gradient and state.
    let mut theta = s.theta.clone();
    let mut hs = vec![s.h.clone()];
    let mut cs = vec![s.c.clone()];
    let mut gs = Vec::with_capacity(steps + 1);
    // What each step's kernel read: g, or rnnprop's features.
    let mut xs = Vec::with_capacity(steps);
    let mut moments = s.moments.clone();
    let mut losses = Vec::with_capacity(steps);
    for t in start..start + steps {
        let g = problem_grad(problem, &theta, n, t);
        let x;
        (x, moments) = kernel_input(g.clone(), moments);
        let (th, h, c) = step(
            theta,
            x.clone(),
            hs[hs.len() - 1].clone(),
            cs[cs.len() - 1].clone(),
            &s.w,
            &s.shape,
        );
        theta = th;
        losses.push(problem_loss(problem, &theta, n, t + 1));
        gs.push(g);
        xs.push(x);
        hs.push(h);
        cs.push(c);
    }
    // ∇f at θ_{s+T}: the last term of the meta-loss.
    gs.push(problem_grad(problem, &theta, n, start + steps));

    // Backward through the steps, summing ∂L/∂φ per group and tensor.
    let dev = theta.device();
    let zeros = |len: usize| Tensor::<1>::zeros([len], (&dev, DType::F32));
    let mut du = zeros(n);
    let mut dh = zeros(layers * hid * n);
    let mut dc = zeros(layers * hid * n);
    let ranges: Vec<Range<usize>> = parts.iter().map(|(_, r)| r.clone()).collect();
    // Per group: per layer its (w_x; w_h; b) stacked, then (out_w; out_b).
    let mut sums: Vec<Vec<Option<Tensor<2>>>> = vec![vec![None; layers + 1]; ranges.len()];
    let add = |slot: &mut Option<Tensor<2>>, t: Tensor<2>| {
        *slot = Some(match slot.take() {
            None => t,
            Some(a) => a + t,
        });
    };
    let inv_t = 1.0 / steps as f64;
    let out_scale = s.shape.out_scale as f64;
    for k in (0..steps).rev() {
        let w = weights.map_or(1.0, |w| w[k] as f64);
        du = du + gs[k + 1].clone().mul_scalar(w * inv_t);
        let (gh, gc, dz, xin) = <Dispatch as LstmStep>::lstm_step_backward(
            du.clone().into_dispatch(),
            xs[k].clone().into_dispatch(),
            hs[k].clone().into_dispatch(),
            cs[k].clone().into_dispatch(),
            hs[k + 1].clone().into_dispatch(),
            cs[k + 1].clone().into_dispatch(),
            dh.into_dispatch(),
            dc.into_dispatch(),
            s.w.clone().into_dispatch(),
            s.shape.clone(),
        );
        dh = Tensor::from_dispatch(gh);
        dc = Tensor::from_dispatch(gc);
        let dz = Tensor::<1>::from_dispatch(dz).reshape([layers * h4, n]);
        let xin = Tensor::<1>::from_dispatch(xin);
        let block = |l: usize| {
            let (at, rows) = (s.shape.input_rows(l), s.shape.block_rows(l));
            // One row range of the flat buffer, viewed as [rows, N].
            let range = at * n..(at + rows) * n;
            xin.clone().slice(range).reshape([rows, n])
        };
        let du2 = du.clone().reshape([n, 1]);
        for (sum, r) in sums.iter_mut().zip(&ranges) {
            if r.is_empty() {
                continue;
            }
            let cols = r.clone();
            for (l, slot) in sum.iter_mut().take(layers).enumerate() {
                let dzl = dz
                    .clone()
                    .slice([l * h4..(l + 1) * h4, cols.clone()])
                    .transpose();
                let x = block(l).slice([0..s.shape.block_rows(l), cols.clone()]);
                add(slot, x.matmul(dzl));
            }
            let top = block(layers).slice([0..hid + 1, cols.clone()]);
            let dug = du2.clone().slice([cols.clone(), 0..1]);
            add(&mut sum[layers], top.matmul(dug).mul_scalar(out_scale));
        }
    }
    let losses = losses_of(losses)?;
    // One read-back: every group's tensors flattened in spec order.
    let config = parts[0].0.config;
    let flat: Vec<Tensor<1>> = sums
        .into_iter()
        .flat_map(|group| {
            group.into_iter().enumerate().map(|(l, t)| {
                let len = s.shape.block_rows(l) * if l < layers { h4 } else { 1 };
                t.map(|t| t.reshape([len])).unwrap_or_else(|| zeros(len))
            })
        })
        .collect();
    let flat = to_f32(&Tensor::cat(flat, 0))?;
    if flat.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite(
            "the meta-gradient diverged (a value is not finite); the optimizee blew up under this φ"
                .into(),
        ));
    }
    let per = config.num_params();
    let grads = flat
        .chunks(per)
        .map(|v| Phi::unflatten(config, v))
        .collect::<Result<Vec<_>, _>>()?;
    let grad = phi.with_parts(grads)?;
    Ok(Truncation {
        grad,
        meta_loss: weighted_mean(&losses, weights),
        losses,
        carry: carry_from(
            &s,
            theta,
            hs.pop().unwrap_or(s.h.clone()),
            cs.pop().unwrap_or(s.c.clone()),
            moments,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buffers the kernels' 32-bit indices cannot address are refused before anything
    /// is allocated (2·4H = 160 gate rows × 30 M coordinates > 2³²); a million is fine.
    #[test]
    fn sizes_past_32_bit_indices_are_refused() {
        let config = OptimizerConfig::new(Preprocess::LogSign);
        let (big, fine) = (30_000_000, 1_000_000);
        let e = StepShape::new(&config, std::slice::from_ref(&(0..big)), big).unwrap_err();
        assert!(e.to_string().contains("--backend fused"), "{e}");
        assert!(StepShape::new(&config, std::slice::from_ref(&(0..fine)), fine).is_ok());
    }
}
