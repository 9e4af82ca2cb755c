//! The LSTM step over blocks of [`LANES`] coordinates, forward and backward, on host f32.
//!
//! Coordinates are the SIMD lanes: every quantity of a block is stored as `[f32; LANES]`,
//! so each multiply-add, gate and exp works on a full vector whatever H is. Records and
//! weight-gradient accumulators are lane-major for the same reason; the accumulators are
//! summed over lanes once, at the end.

use std::ops::Range;

use super::kernels::Kernels;
#[cfg(target_arch = "x86_64")]
use super::math::Fused;
use super::math::{Madd, Plain, sigmoid, tanh};
use crate::preprocess::rnnprop_scalar;
use crate::{OptimizerConfig, Phi, Preprocess};

/// Coordinates per SIMD block (16 f32: one AVX-512 register, two AVX ones).
pub const LANES: usize = 16;

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

/// `y + a · x`, lane by lane (on values, so the sum stays in a register).
#[inline(always)]
fn fma<M: Madd>(y: V, a: &V, x: f32) -> V {
    let mut o = y;
    for l in 0..LANES {
        o[l] = M::madd(a[l], x, o[l]);
    }
    o
}

/// `out[r] = Σ_j d[j] · w[r·4H + j]` for the `R` rows of `w` (4H is even), each in two
/// interleaved partial sums (even and odd j) so that `2R` add chains run side by side;
/// every `R` gives the same bits.
#[inline(always)]
fn dots<M: Madd, const R: usize>(d: &[V], w: &[f32], out: &mut [V]) {
    let h4 = d.len();
    // d and each row in pairs, every slice exactly `n` pairs long, so that the loop below
    // carries no bounds checks.
    let (d2, _) = d.as_chunks::<2>();
    let n = d2.len();
    let rows: [&[[f32; 2]]; R] =
        std::array::from_fn(|r| &w[r * h4..][..h4].as_chunks::<2>().0[..n]);
    let mut even = [[0f32; LANES]; R];
    let mut odd = [[0f32; LANES]; R];
    for jj in 0..n {
        let dj = &d2[jj];
        for r in 0..R {
            even[r] = fma::<M>(even[r], &dj[0], rows[r][jj][0]);
            odd[r] = fma::<M>(odd[r], &dj[1], rows[r][jj][1]);
        }
    }
    for r in 0..R {
        for lane in 0..LANES {
            out[r][lane] = even[r][lane] + odd[r][lane];
        }
    }
}

/// `out[kk] = Σ_j d[j] · w[kk·4H + j]` for every row kk of `w`, `R` rows at a time.
#[inline(always)]
fn matvec<M: Madd, const R: usize>(d: &[V], w: &[f32], out: &mut [V]) {
    let h4 = d.len();
    let rows = out.len();
    let mut kk = 0;
    while kk + R <= rows {
        dots::<M, R>(d, &w[kk * h4..(kk + R) * h4], &mut out[kk..kk + R]);
        kk += R;
    }
    while kk < rows {
        dots::<M, 1>(d, &w[kk * h4..(kk + 1) * h4], &mut out[kk..kk + 1]);
        kk += 1;
    }
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

/// Values per block of the preprocessing's moments (rnnprop's m, then v, lane by lane).
pub const MOMENTS: usize = 2 * LANES;

/// One optimizer step for consecutive blocks: reads g and the previous records, writes the
/// new records and adds u to θ; with rnnprop it also steps each block's moments
/// ([`MOMENTS`] values per block, ignored otherwise). Slices hold whole blocks (multiples
/// of `LANES` coordinates). A variant this CPU cannot run falls back to the portable one.
#[allow(clippy::too_many_arguments)]
pub fn forward_blocks(
    kernels: Kernels,
    w: &Weights,
    lay: &Layout,
    g: &[f32],
    moments: &mut [f32],
    prev: &[f32],
    cur: &mut [f32],
    theta: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    match kernels {
        Kernels::Avx512 if kernels.supported() => {
            // SAFETY: the CPU has AVX-512 F/VL, AVX2 and FMA, checked just above.
            unsafe { forward_avx512(w, lay, g, moments, prev, cur, theta) };
            return;
        }
        Kernels::Avx2 if kernels.supported() => {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            unsafe { forward_avx2(w, lay, g, moments, prev, cur, theta) };
            return;
        }
        _ => {}
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = kernels;
    forward_any::<Plain, 4>(w, lay, g, moments, prev, cur, theta)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_avx2(
    w: &Weights,
    lay: &Layout,
    g: &[f32],
    moments: &mut [f32],
    prev: &[f32],
    cur: &mut [f32],
    theta: &mut [f32],
) {
    // Four gate columns of two 256-bit halves: 8 of the 16 registers accumulate.
    forward_any::<Fused, 4>(w, lay, g, moments, prev, cur, theta)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn forward_avx512(
    w: &Weights,
    lay: &Layout,
    g: &[f32],
    moments: &mut [f32],
    prev: &[f32],
    cur: &mut [f32],
    theta: &mut [f32],
) {
    // Eight gate columns: eight independent chains hide the FMA latency of 32 registers.
    forward_any::<Fused, 8>(w, lay, g, moments, prev, cur, theta)
}

/// Defines a gate tile: the pre-activations `b + W_x x + W_h h` of consecutive gate
/// columns from `j` into `out`, one named accumulator per column (named, so that the
/// compiler keeps them in registers: an array of them ends up on the stack), each summed
/// in input order, so every tile width gives the same bits.
macro_rules! gate_tile {
    ($name:ident: $($s:ident $c:literal),+) => {
        #[inline(always)]
        fn $name<M: Madd>(layer: &Layer, j: usize, input: &[V], h_prev: &[V], out: &mut [V]) {
            let (ni, h) = (input.len(), h_prev.len());
            let n = [$($c),+].len();
            $(let mut $s = [layer.b[j + $c]; LANES];)+
            // One slice per column, each exactly as long as its input, so that the loops
            // below carry no bounds checks.
            let wx = &layer.w_xt[j * ni..(j + n) * ni];
            let wx = [$(&wx[$c * ni..($c + 1) * ni]),+];
            for kk in 0..ni {
                let x = &input[kk];
                $($s = fma::<M>($s, x, wx[$c][kk]);)+
            }
            let wh = &layer.w_ht[j * h..(j + n) * h];
            let wh = [$(&wh[$c * h..($c + 1) * h]),+];
            for kk in 0..h {
                let x = &h_prev[kk];
                $($s = fma::<M>($s, x, wh[$c][kk]);)+
            }
            $(out[$c] = $s;)+
        }
    };
}

gate_tile!(gate_tile4: s0 0, s1 1, s2 2, s3 3);
gate_tile!(gate_tile8: s0 0, s1 1, s2 2, s3 3, s4 4, s5 5, s6 6, s7 7);

/// A gate tile `C` wide (4 or 8).
#[inline(always)]
fn gate_tile<M: Madd, const C: usize>(
    layer: &Layer,
    j: usize,
    input: &[V],
    h_prev: &[V],
    out: &mut [V],
) {
    match C {
        8 => gate_tile8::<M>(layer, j, input, h_prev, out),
        4 => gate_tile4::<M>(layer, j, input, h_prev, out),
        _ => unreachable!("gate tiles are 4 or 8 columns"),
    }
}

/// The forward step with gate tiles `C` wide (4H need not be a multiple of `C`: the rest
/// goes four at a time).
#[inline(always)]
fn forward_any<M: Madd, const C: usize>(
    w: &Weights,
    lay: &Layout,
    g: &[f32],
    moments: &mut [f32],
    prev: &[f32],
    cur: &mut [f32],
    theta: &mut [f32],
) {
    let h = w.hidden;
    let rl = lay.record * LANES;
    // Every block has its moments (zipped below: a short slice would skip blocks).
    debug_assert_eq!(moments.len(), g.len() / LANES * MOMENTS);
    let mut z = vec![[0f32; LANES]; 4 * h];
    let mut input = vec![[0f32; LANES]; h.max(2)];
    let blocks = cur
        .chunks_mut(rl)
        .zip(prev.chunks(rl))
        .zip(g.chunks(LANES))
        .zip(theta.chunks_mut(LANES))
        .zip(moments.chunks_mut(MOMENTS));
    for ((((rec, prv), gb), th), mom) in blocks {
        let rec = as_v_mut(rec);
        let prv = as_v(prv);
        if w.preprocess == Preprocess::Rnnprop {
            let (m, v) = mom.split_at_mut(LANES);
            for lane in 0..LANES {
                let (x0, x1, mn, vn) = rnnprop_scalar(gb[lane], m[lane], v[lane]);
                (rec[0][lane], rec[1][lane], m[lane], v[lane]) = (x0, x1, mn, vn);
            }
        } else {
            for lane in 0..LANES {
                let x = preprocess(w, gb[lane]);
                for (kk, xv) in x.iter().take(lay.inputs).enumerate() {
                    rec[kk][lane] = *xv;
                }
            }
        }
        for (l, layer) in w.layers.iter().enumerate() {
            let src = if l == 0 { 0 } else { lay.h_at(l - 1) };
            input[..layer.inputs].copy_from_slice(&rec[src..src + layer.inputs]);
            let h_prev = &prv[lay.h_at(l)..lay.h_at(l) + h];
            let ni = layer.inputs;
            let mut j = 0;
            while j + C <= 4 * h {
                gate_tile::<M, C>(layer, j, &input[..ni], h_prev, &mut z[j..]);
                j += C;
            }
            while j < 4 * h {
                gate_tile::<M, 4>(layer, j, &input[..ni], h_prev, &mut z[j..]);
                j += 4;
            }
            let c_prev = &prv[lay.c_at(l)..lay.c_at(l) + h];
            let (gates, rest) = rec[lay.gates_at(l)..lay.gates_at(l) + 7 * h].split_at_mut(4 * h);
            let (c_new, rest) = rest.split_at_mut(h);
            let (tanhc, h_new) = rest.split_at_mut(h);
            let (sig_if, rest) = gates.split_at_mut(2 * h);
            let (g_gate, o_gate) = rest.split_at_mut(h);
            for (a, zj) in sig_if.iter_mut().zip(&z[..2 * h]) {
                *a = map(zj, sigmoid::<M>);
            }
            for (a, zj) in g_gate.iter_mut().zip(&z[2 * h..3 * h]) {
                *a = map(zj, tanh::<M>);
            }
            for (a, zj) in o_gate.iter_mut().zip(&z[3 * h..]) {
                *a = map(zj, sigmoid::<M>);
            }
            let (i_gate, f_gate) = sig_if.split_at(h);
            for j in 0..h {
                let (i, f, gg, o) = (i_gate[j], f_gate[j], g_gate[j], o_gate[j]);
                let mut c = [0f32; LANES];
                for lane in 0..LANES {
                    c[lane] = f[lane] * c_prev[j][lane] + i[lane] * gg[lane];
                }
                let t = map(&c, tanh::<M>);
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
        // Stateful: computed by the caller with its moments.
        Preprocess::Rnnprop => [0.0, 0.0],
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
/// `acc`. `du[t]` is ∂L/∂u_t for every (padded) coordinate. A variant this CPU cannot run
/// falls back to the portable one.
pub fn backward_blocks(
    kernels: Kernels,
    w: &Weights,
    lay: &Layout,
    records: &[Vec<f32>],
    du: &[Vec<f32>],
    blocks: Range<usize>,
    acc: &mut Accumulator,
) {
    #[cfg(target_arch = "x86_64")]
    match kernels {
        Kernels::Avx512 if kernels.supported() => {
            // SAFETY: the CPU has AVX-512 F/VL, AVX2 and FMA, checked just above.
            unsafe { backward_avx512(w, lay, records, du, blocks, acc) };
            return;
        }
        Kernels::Avx2 if kernels.supported() => {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            unsafe { backward_avx2(w, lay, records, du, blocks, acc) };
            return;
        }
        _ => {}
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = kernels;
    backward_any::<Plain, 2, 4>(w, lay, records, du, blocks, acc)
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
    // Tiles of 2 rows (dh) and 1 row (weight gradients): 8 registers accumulate.
    backward_any::<Fused, 2, 4>(w, lay, records, du, blocks, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn backward_avx512(
    w: &Weights,
    lay: &Layout,
    records: &[Vec<f32>],
    du: &[Vec<f32>],
    blocks: Range<usize>,
    acc: &mut Accumulator,
) {
    // Tiles of 4 rows (dh: 8 chains) and of 4 rows × 4 columns (weight gradients: 16
    // accumulators and their 8 operands), in 32 registers.
    backward_any::<Fused, 4, 16>(w, lay, records, du, blocks, acc)
}

/// The backward pass with dh tiles of `R` rows and weight-gradient tiles of `NW / 4` rows
/// (`NW` accumulators).
#[inline(always)]
fn backward_any<M: Madd, const R: usize, const NW: usize>(
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
    const { assert!(NW.is_multiple_of(4) && NW > 0) };
    let rw = NW / 4;
    let mut xs = vec![zero; nb * rw];
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
                matvec::<M, R>(dzb, &layer.w_h, &mut dh_carry[carry_at..carry_at + h]);
                if l > 0 {
                    matvec::<M, R>(dzb, &layer.w_x, &mut dh[b * h..(b + 1) * h]);
                }
            }
            // Weight gradients: each accumulator row once for all blocks of the task, with
            // dz regrouped as [4H/4][blocks][4], so that a tile's four columns of one block
            // are adjacent and every operand of the tile's loop is one pointer away.
            for (q, quad) in dzt.chunks_exact_mut(4 * nb).enumerate() {
                for (b, v) in quad.chunks_exact_mut(4).enumerate() {
                    v.copy_from_slice(&dz[b * h4 + 4 * q..b * h4 + 4 * q + 4]);
                }
            }
            let (wx_at, wh_at) = (layer.at, layer.at + layer.inputs * h4);
            let b_at = wh_at + h * h4;
            let src = if l == 0 { 0 } else { lay.h_at(l - 1) };
            for j in 0..h4 {
                let mut v = a[b_at + j];
                for b in 0..nb {
                    let d = &dz[b * h4 + j];
                    for lane in 0..LANES {
                        v[lane] += d[lane];
                    }
                }
                a[b_at + j] = v;
            }
            // w_x's rows and then w_h's are consecutive in the gradient: row kk of the
            // stacked [x; h_prev] input is at wx_at + kk·4H.
            let rows = layer.inputs + h;
            let x_of = |b: usize, kk: usize| {
                if kk < layer.inputs {
                    rec_of(b)[src + kk]
                } else {
                    prv_of(b)[lay.h_at(l) + kk - layer.inputs]
                }
            };
            let mut kk = 0;
            while kk + rw <= rows {
                // xs is [blocks][rw]: the tile's rows of one block side by side.
                for (b, xb) in xs.chunks_exact_mut(rw).enumerate() {
                    for (r, x) in xb.iter_mut().enumerate() {
                        *x = x_of(b, kk + r);
                    }
                }
                grad_tile::<M, NW>(
                    &xs,
                    &dzt,
                    nb,
                    &mut a[wx_at + kk * h4..wx_at + (kk + rw) * h4],
                );
                kk += rw;
            }
            while kk < rows {
                for (b, x) in xs[..nb].iter_mut().enumerate() {
                    *x = x_of(b, kk);
                }
                grad_tile::<M, 4>(
                    &xs,
                    &dzt,
                    nb,
                    &mut a[wx_at + kk * h4..wx_at + (kk + 1) * h4],
                );
                kk += 1;
            }
        }
    }
}

/// `y + a · x`, lane by lane, both vectors.
#[inline(always)]
fn fma_v<M: Madd>(y: V, a: &V, x: &V) -> V {
    let mut o = y;
    for l in 0..LANES {
        o[l] = M::madd(a[l], x[l], o[l]);
    }
    o
}

/// Adds `Σ_b x[b][r] · dz[b][j]` into `rows[r·4H + j]` for the `RW = N/4` rows and every
/// gate column j, four columns at a time: `N` accumulators stay in registers across the
/// blocks, and each block's `RW` + 4 operands are loaded once for the tile's `N`
/// multiply-adds. `xs` is `[nb][RW]`, `dzt` is `[4H/4][nb][4]`.
#[inline(always)]
fn grad_tile<M: Madd, const N: usize>(xs: &[V], dzt: &[V], nb: usize, rows: &mut [V]) {
    let rw = N / 4;
    let h4 = rows.len() / rw;
    let xs = &xs[..nb * rw];
    for (q, d4) in dzt.chunks_exact(4 * nb).enumerate() {
        let mut s: [V; N] = std::array::from_fn(|i| rows[(i / 4) * h4 + 4 * q + i % 4]);
        for (xb, db) in xs.chunks_exact(rw).zip(d4.chunks_exact(4)) {
            let x: [V; N] = std::array::from_fn(|i| xb[i / 4]);
            let d: [V; 4] = [db[0], db[1], db[2], db[3]];
            for (i, si) in s.iter_mut().enumerate() {
                *si = fma_v::<M>(*si, &x[i], &d[i % 4]);
            }
        }
        for (i, si) in s.iter().enumerate() {
            rows[(i / 4) * h4 + 4 * q + i % 4] = *si;
        }
    }
}
