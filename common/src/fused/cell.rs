//! The LSTM step over blocks of [`LANES`] coordinates, forward and backward, on host f32.
//!
//! Coordinates are the SIMD lanes: every quantity of a block is stored as `[f32; LANES]`,
//! so each multiply-add, gate and exp works on a full vector whatever H is. Records and
//! weight-gradient accumulators are lane-major for the same reason; the accumulators are
//! summed over lanes once, at the end.

use std::ops::Range;

use super::math::{sigmoid, tanh};
use crate::{OptimizerConfig, Phi, Preprocess};

/// Coordinates per SIMD block (8 f32 = one AVX register).
pub const LANES: usize = 8;

type V = [f32; LANES];

/// φ laid out for the kernels: the forward reads transposed weights (`[4H][I]`), the
/// backward the spec's (`[I][4H]`).
pub struct Weights {
    preprocess: Preprocess,
    k: f32,
    out_scale: f32,
    hidden: usize,
    layers: Vec<Layer>,
    out_w: Vec<f32>,
    out_b: f32,
    /// Offset of out.w in the flat gradient (out.b follows).
    out_at: usize,
    params: usize,
}

struct Layer {
    inputs: usize,
    w_x: Vec<f32>,
    w_h: Vec<f32>,
    b: Vec<f32>,
    w_xt: Vec<f32>,
    w_ht: Vec<f32>,
    /// Offset of this layer's w_x in the flat gradient (w_h and b follow).
    at: usize,
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

impl Weights {
    /// Lays out `phi`.
    pub fn new(phi: &Phi) -> Self {
        let cfg = phi.config;
        let (h, h4) = (cfg.hidden, 4 * cfg.hidden);
        let mut at = 0;
        let layers = (0..cfg.layers)
            .map(|l| {
                let inputs = cfg.input_size(l);
                let (w_x, w_h, b) = (
                    &phi.tensors[3 * l],
                    &phi.tensors[3 * l + 1],
                    &phi.tensors[3 * l + 2],
                );
                let layer = Layer {
                    inputs,
                    w_xt: transpose(w_x, inputs, h4),
                    w_ht: transpose(w_h, h, h4),
                    w_x: w_x.clone(),
                    w_h: w_h.clone(),
                    b: b.clone(),
                    at,
                };
                at += inputs * h4 + h * h4 + h4;
                layer
            })
            .collect();
        Self {
            preprocess: cfg.preprocess,
            k: cfg.k as f32,
            out_scale: cfg.out_scale as f32,
            hidden: h,
            layers,
            out_w: phi.tensors[3 * cfg.layers].clone(),
            out_b: phi.tensors[3 * cfg.layers + 1][0],
            out_at: at,
            params: at + h + 1,
        }
    }

    /// Number of values in φ (and in its gradient).
    pub fn num_params(&self) -> usize {
        self.params
    }
}

/// Where each quantity sits in a block's record of one step, in units of `V`.
///
/// Record: `x0 [I]`, then per layer `gates [4H]` (i, f, g, o activated), `c [H]`,
/// `tanh c [H]`, `h [H]`, then `u`. Record 0 of a truncation holds only the incoming h, c.
pub struct Layout {
    /// H.
    pub h: usize,
    inputs: usize,
    /// `V`s per block per step.
    pub record: usize,
}

impl Layout {
    /// The layout for `cfg`.
    pub fn new(cfg: &OptimizerConfig) -> Self {
        let inputs = cfg.preprocess.features();
        Self {
            h: cfg.hidden,
            inputs,
            record: inputs + cfg.layers * 7 * cfg.hidden + 1,
        }
    }
    fn gates_at(&self, l: usize) -> usize {
        self.inputs + l * 7 * self.h
    }
    /// Offset of layer l's c.
    pub fn c_at(&self, l: usize) -> usize {
        self.gates_at(l) + 4 * self.h
    }
    fn tanhc_at(&self, l: usize) -> usize {
        self.gates_at(l) + 5 * self.h
    }
    /// Offset of layer l's h.
    pub fn h_at(&self, l: usize) -> usize {
        self.gates_at(l) + 6 * self.h
    }
    fn u_at(&self) -> usize {
        self.record - 1
    }
}

/// Views a block's flat f32 record as `V`s.
#[inline(always)]
fn as_v(s: &[f32]) -> &[V] {
    let (head, body, tail) = unsafe { s.align_to::<V>() };
    debug_assert!(head.is_empty() && tail.is_empty());
    body
}

/// Mutable [`as_v`].
#[inline(always)]
fn as_v_mut(s: &mut [f32]) -> &mut [V] {
    // SAFETY: V is [f32; LANES]: same alignment as f32, no padding; every caller passes a
    // length that is a multiple of LANES, checked below in debug builds.
    let (head, body, tail) = unsafe { s.align_to_mut::<V>() };
    debug_assert!(head.is_empty() && tail.is_empty());
    body
}

/// How `a · b + c` is computed: fused (one rounding, where the CPU has FMA) or plain.
trait Madd {
    fn madd(a: f32, b: f32, c: f32) -> f32;
}

/// `a · b + c` with two roundings: any CPU.
struct Plain;

impl Madd for Plain {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// `a · b + c` with one rounding: only inside functions compiled with the `fma` feature
/// (elsewhere `mul_add` would be a slow library call).
#[cfg(target_arch = "x86_64")]
struct Fused;

#[cfg(target_arch = "x86_64")]
impl Madd for Fused {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// `y + a · x`, lane by lane (on values, so the sum stays in a register).
#[inline(always)]
fn fma<M: Madd>(y: V, a: &V, x: f32) -> V {
    let mut o = y;
    for l in 0..LANES {
        o[l] = M::madd(a[l], x, o[l]);
    }
    o
}

/// Σ_j d[j] · w[j] over 4H terms (4H is a multiple of 4), in four interleaved partial
/// sums so the adds do not wait on each other.
#[inline(always)]
fn dot4<M: Madd>(d: &[V], w: &[f32]) -> V {
    let (mut s0, mut s1, mut s2, mut s3) =
        ([0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES]);
    for (dc, wc) in d.chunks_exact(4).zip(w.chunks_exact(4)) {
        s0 = fma::<M>(s0, &dc[0], wc[0]);
        s1 = fma::<M>(s1, &dc[1], wc[1]);
        s2 = fma::<M>(s2, &dc[2], wc[2]);
        s3 = fma::<M>(s3, &dc[3], wc[3]);
    }
    let mut s = [0f32; LANES];
    for lane in 0..LANES {
        s[lane] = (s0[lane] + s1[lane]) + (s2[lane] + s3[lane]);
    }
    s
}

/// `f` applied to every lane.
#[inline(always)]
fn map(x: &V, f: impl Fn(f32) -> f32) -> V {
    let mut o = [0f32; LANES];
    for l in 0..LANES {
        o[l] = f(x[l]);
    }
    o
}

/// Whether to run the AVX2+FMA kernels: the CPU has both and `portable` is not forced.
#[cfg(target_arch = "x86_64")]
fn fma_kernels(portable: bool) -> bool {
    !portable
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
}

/// One optimizer step for consecutive blocks: reads g and the previous records, writes the
/// new records and adds u to θ. Slices hold whole blocks (multiples of `LANES` coordinates).
pub fn forward_blocks(
    portable: bool,
    w: &Weights,
    lay: &Layout,
    g: &[f32],
    prev: &[f32],
    cur: &mut [f32],
    theta: &mut [f32],
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = portable;
    #[cfg(target_arch = "x86_64")]
    if fma_kernels(portable) {
        // SAFETY: the CPU supports AVX2 and FMA, checked by fma_kernels.
        unsafe { forward_avx2(w, lay, g, prev, cur, theta) };
        return;
    }
    forward_any::<Plain>(w, lay, g, prev, cur, theta)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_avx2(
    w: &Weights,
    lay: &Layout,
    g: &[f32],
    prev: &[f32],
    cur: &mut [f32],
    theta: &mut [f32],
) {
    forward_any::<Fused>(w, lay, g, prev, cur, theta)
}

#[inline(always)]
fn forward_any<M: Madd>(
    w: &Weights,
    lay: &Layout,
    g: &[f32],
    prev: &[f32],
    cur: &mut [f32],
    theta: &mut [f32],
) {
    let h = w.hidden;
    let rl = lay.record * LANES;
    let mut z = vec![[0f32; LANES]; 4 * h];
    let mut input = vec![[0f32; LANES]; h.max(2)];
    let blocks = cur
        .chunks_mut(rl)
        .zip(prev.chunks(rl))
        .zip(g.chunks(LANES))
        .zip(theta.chunks_mut(LANES));
    for (((rec, prv), gb), th) in blocks {
        let rec = as_v_mut(rec);
        let prv = as_v(prv);
        for lane in 0..LANES {
            let x = preprocess(w, gb[lane]);
            for (kk, xv) in x.iter().take(lay.inputs).enumerate() {
                rec[kk][lane] = *xv;
            }
        }
        for (l, layer) in w.layers.iter().enumerate() {
            let src = if l == 0 { 0 } else { lay.h_at(l - 1) };
            input[..layer.inputs].copy_from_slice(&rec[src..src + layer.inputs]);
            let h_prev = &prv[lay.h_at(l)..lay.h_at(l) + h];
            // Four gate columns at a time: four independent add chains instead of one.
            let ni = layer.inputs;
            for (j, zc) in (0..4 * h).step_by(4).zip(z.chunks_exact_mut(4)) {
                let (mut s0, mut s1, mut s2, mut s3) = (
                    [layer.b[j]; LANES],
                    [layer.b[j + 1]; LANES],
                    [layer.b[j + 2]; LANES],
                    [layer.b[j + 3]; LANES],
                );
                let wx = &layer.w_xt[j * ni..(j + 4) * ni];
                for (kk, x) in input[..ni].iter().enumerate() {
                    s0 = fma::<M>(s0, x, wx[kk]);
                    s1 = fma::<M>(s1, x, wx[ni + kk]);
                    s2 = fma::<M>(s2, x, wx[2 * ni + kk]);
                    s3 = fma::<M>(s3, x, wx[3 * ni + kk]);
                }
                let wh = &layer.w_ht[j * h..(j + 4) * h];
                for (kk, x) in h_prev.iter().enumerate() {
                    s0 = fma::<M>(s0, x, wh[kk]);
                    s1 = fma::<M>(s1, x, wh[h + kk]);
                    s2 = fma::<M>(s2, x, wh[2 * h + kk]);
                    s3 = fma::<M>(s3, x, wh[3 * h + kk]);
                }
                zc[0] = s0;
                zc[1] = s1;
                zc[2] = s2;
                zc[3] = s3;
            }
            let c_prev = &prv[lay.c_at(l)..lay.c_at(l) + h];
            let (gates, rest) = rec[lay.gates_at(l)..lay.gates_at(l) + 7 * h].split_at_mut(4 * h);
            let (c_new, rest) = rest.split_at_mut(h);
            let (tanhc, h_new) = rest.split_at_mut(h);
            let (sig_if, rest) = gates.split_at_mut(2 * h);
            let (g_gate, o_gate) = rest.split_at_mut(h);
            for (a, zj) in sig_if.iter_mut().zip(&z[..2 * h]) {
                *a = map(zj, sigmoid);
            }
            for (a, zj) in g_gate.iter_mut().zip(&z[2 * h..3 * h]) {
                *a = map(zj, tanh);
            }
            for (a, zj) in o_gate.iter_mut().zip(&z[3 * h..]) {
                *a = map(zj, sigmoid);
            }
            let (i_gate, f_gate) = sig_if.split_at(h);
            for j in 0..h {
                let (i, f, gg, o) = (i_gate[j], f_gate[j], g_gate[j], o_gate[j]);
                let mut c = [0f32; LANES];
                for lane in 0..LANES {
                    c[lane] = f[lane] * c_prev[j][lane] + i[lane] * gg[lane];
                }
                let t = map(&c, tanh);
                let mut hn = [0f32; LANES];
                for lane in 0..LANES {
                    hn[lane] = o[lane] * t[lane];
                }
                c_new[j] = c;
                tanhc[j] = t;
                h_new[j] = hn;
            }
        }
        let top = &rec[lay.h_at(w.layers.len() - 1)..lay.h_at(w.layers.len() - 1) + h];
        let mut dot = [0f32; LANES];
        for (hv, ow) in top.iter().zip(&w.out_w) {
            dot = fma::<M>(dot, hv, *ow);
        }
        let mut u = [0f32; LANES];
        for lane in 0..LANES {
            u[lane] = (dot[lane] + w.out_b) * w.out_scale;
            th[lane] += u[lane];
        }
        rec[lay.u_at()] = u;
    }
}

/// Spec §1.2 in f32, as the burn path computes it.
#[inline(always)]
fn preprocess(w: &Weights, g: f32) -> [f32; 2] {
    match w.preprocess {
        Preprocess::Identity => [g, 0.0],
        Preprocess::LogSign => {
            let a = g.abs();
            if a >= (-w.k).exp() {
                [a.ln() / w.k, if g > 0.0 { 1.0 } else { -1.0 }]
            } else {
                [-1.0, g * w.k.exp()]
            }
        }
    }
}

/// Per-lane gradient accumulators of one task: `LANES` partial sums per φ value.
pub struct Accumulator {
    lanes: Vec<V>,
}

impl Accumulator {
    /// Zeros for `w`.
    pub fn new(w: &Weights) -> Self {
        Self {
            lanes: vec![[0f32; LANES]; w.num_params()],
        }
    }

    /// The flat gradient: partial sums added over lanes.
    pub fn total(&self) -> Vec<f32> {
        self.lanes.iter().map(|v| v.iter().sum()).collect()
    }
}

/// Backpropagation through the truncation for the blocks in `blocks`, adding ∂L/∂φ into
/// `acc`. `du[t]` is ∂L/∂u_t for every (padded) coordinate.
pub fn backward_blocks(
    portable: bool,
    w: &Weights,
    lay: &Layout,
    records: &[Vec<f32>],
    du: &[Vec<f32>],
    blocks: Range<usize>,
    acc: &mut Accumulator,
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = portable;
    #[cfg(target_arch = "x86_64")]
    if fma_kernels(portable) {
        // SAFETY: the CPU supports AVX2 and FMA, checked by fma_kernels.
        unsafe { backward_avx2(w, lay, records, du, blocks, acc) };
        return;
    }
    backward_any::<Plain>(w, lay, records, du, blocks, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_avx2(
    w: &Weights,
    lay: &Layout,
    records: &[Vec<f32>],
    du: &[Vec<f32>],
    blocks: Range<usize>,
    acc: &mut Accumulator,
) {
    backward_any::<Fused>(w, lay, records, du, blocks, acc)
}

#[inline(always)]
fn backward_any<M: Madd>(
    w: &Weights,
    lay: &Layout,
    records: &[Vec<f32>],
    du: &[Vec<f32>],
    blocks: Range<usize>,
    acc: &mut Accumulator,
) {
    let (h, nl, h4) = (w.hidden, w.layers.len(), 4 * w.hidden);
    let rl = lay.record * LANES;
    let steps = du.len();
    let nb = blocks.len();
    let zero = [0f32; LANES];
    // Per block: what flows back from time t+1, per layer; dh arriving from above; dz.
    let mut dh_carry = vec![zero; nb * nl * h];
    let mut dc_carry = vec![zero; nb * nl * h];
    let mut dh = vec![zero; nb * h];
    let mut dz = vec![zero; nb * h4];
    let mut dzt = vec![zero; nb * h4];
    let mut xs = vec![zero; nb];
    let a = &mut acc.lanes;
    // Time outermost and all blocks of the task together, so that each accumulator row
    // is loaded once per step for all blocks instead of once per block.
    for t in (1..=steps).rev() {
        let rec_of =
            |b: usize| as_v(&records[t][(blocks.start + b) * rl..(blocks.start + b + 1) * rl]);
        let prv_of =
            |b: usize| as_v(&records[t - 1][(blocks.start + b) * rl..(blocks.start + b + 1) * rl]);
        for b in 0..nb {
            let rec = rec_of(b);
            let mut sdu = zero;
            for lane in 0..LANES {
                sdu[lane] = w.out_scale * du[t - 1][(blocks.start + b) * LANES + lane];
            }
            let top = &rec[lay.h_at(nl - 1)..lay.h_at(nl - 1) + h];
            let mut ob = a[w.out_at + h];
            for lane in 0..LANES {
                ob[lane] += sdu[lane];
            }
            a[w.out_at + h] = ob;
            for (j, hv) in top.iter().enumerate() {
                let mut v = a[w.out_at + j];
                for lane in 0..LANES {
                    v[lane] += sdu[lane] * hv[lane];
                }
                a[w.out_at + j] = v;
                let mut d = zero;
                for lane in 0..LANES {
                    d[lane] = sdu[lane] * w.out_w[j];
                }
                dh[b * h + j] = d;
            }
        }
        for l in (0..nl).rev() {
            let layer = &w.layers[l];
            for b in 0..nb {
                let (rec, prv) = (rec_of(b), prv_of(b));
                let gates = &rec[lay.gates_at(l)..lay.gates_at(l) + h4];
                let tanhc = &rec[lay.tanhc_at(l)..lay.tanhc_at(l) + h];
                let c_prev = &prv[lay.c_at(l)..lay.c_at(l) + h];
                let carry_at = (b * nl + l) * h;
                let dzb = &mut dz[b * h4..(b + 1) * h4];
                for j in 0..h {
                    let (gi, gf, gg, go) =
                        (gates[j], gates[h + j], gates[2 * h + j], gates[3 * h + j]);
                    let (tc, cp) = (tanhc[j], c_prev[j]);
                    let (dcc, dhc, dha) = (
                        dc_carry[carry_at + j],
                        dh_carry[carry_at + j],
                        dh[b * h + j],
                    );
                    let (mut zi, mut zf, mut zg, mut zo, mut carry) =
                        (zero, zero, zero, zero, zero);
                    for lane in 0..LANES {
                        // dh: from above at time t plus what flows back from time t+1.
                        let d = dha[lane] + dhc[lane];
                        let (i, f, g, o, tv) = (gi[lane], gf[lane], gg[lane], go[lane], tc[lane]);
                        let dc = dcc[lane] + d * o * (1.0 - tv * tv);
                        carry[lane] = dc * f;
                        zi[lane] = dc * g * i * (1.0 - i);
                        zf[lane] = dc * cp[lane] * f * (1.0 - f);
                        zg[lane] = dc * i * (1.0 - g * g);
                        zo[lane] = d * tv * o * (1.0 - o);
                    }
                    dc_carry[carry_at + j] = carry;
                    dzb[j] = zi;
                    dzb[h + j] = zf;
                    dzb[2 * h + j] = zg;
                    dzb[3 * h + j] = zo;
                }
                // To the previous time step through w_h, and to the layer below through w_x.
                for kk in 0..h {
                    dh_carry[carry_at + kk] = dot4::<M>(dzb, &layer.w_h[kk * h4..(kk + 1) * h4]);
                }
                if l > 0 {
                    for kk in 0..h {
                        dh[b * h + kk] = dot4::<M>(dzb, &layer.w_x[kk * h4..(kk + 1) * h4]);
                    }
                }
            }
            // Weight gradients: each accumulator row once for all blocks of the task, with
            // dz transposed to [4H][blocks] so that four columns run as independent chains.
            for (j, col) in dzt.chunks_exact_mut(nb).enumerate() {
                for (b, v) in col.iter_mut().enumerate() {
                    *v = dz[b * h4 + j];
                }
            }
            let (wx_at, wh_at) = (layer.at, layer.at + layer.inputs * h4);
            let b_at = wh_at + h * h4;
            let src = if l == 0 { 0 } else { lay.h_at(l - 1) };
            for (j, col) in dzt.chunks_exact(nb).enumerate() {
                let mut v = a[b_at + j];
                for d in col {
                    for lane in 0..LANES {
                        v[lane] += d[lane];
                    }
                }
                a[b_at + j] = v;
            }
            for kk in 0..layer.inputs + h {
                let row_at = if kk < layer.inputs {
                    wx_at + kk * h4
                } else {
                    wh_at + (kk - layer.inputs) * h4
                };
                for (b, x) in xs.iter_mut().enumerate() {
                    *x = if kk < layer.inputs {
                        rec_of(b)[src + kk]
                    } else {
                        prv_of(b)[lay.h_at(l) + kk - layer.inputs]
                    };
                }
                let row = &mut a[row_at..row_at + h4];
                for (r4, d4) in row.chunks_exact_mut(4).zip(dzt.chunks_exact(4 * nb)) {
                    let (c0, rest) = d4.split_at(nb);
                    let (c1, rest) = rest.split_at(nb);
                    let (c2, c3) = rest.split_at(nb);
                    let (mut v0, mut v1, mut v2, mut v3) = (r4[0], r4[1], r4[2], r4[3]);
                    for ((((x, d0), d1), d2), d3) in xs.iter().zip(c0).zip(c1).zip(c2).zip(c3) {
                        for lane in 0..LANES {
                            v0[lane] = M::madd(x[lane], d0[lane], v0[lane]);
                            v1[lane] = M::madd(x[lane], d1[lane], v1[lane]);
                            v2[lane] = M::madd(x[lane], d2[lane], v2[lane]);
                            v3[lane] = M::madd(x[lane], d3[lane], v3[lane]);
                        }
                    }
                    r4[0] = v0;
                    r4[1] = v1;
                    r4[2] = v2;
                    r4[3] = v3;
                }
            }
        }
    }
}
