//! The LSTM step over a block of coordinates, forward and backward, on host f32.

use std::ops::Range;

use super::math::{sigmoid, tanh};
use crate::{OptimizerConfig, Phi, Preprocess};

/// φ laid out for the kernels, with transposed copies for the backward pass.
pub struct Weights {
    preprocess: Preprocess,
    k: f32,
    out_scale: f32,
    hidden: usize,
    layers: Vec<Layer>,
    out_w: Vec<f32>,
    out_b: f32,
    /// Offsets of out.w and out.b in the flat gradient.
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

/// Where each quantity sits in a coordinate's record of one step.
///
/// Record: `x0 [I]`, then per layer `gates [4H]` (i, f, g, o activated), `c [H]`,
/// `tanh c [H]`, `h [H]`, then `u`. Record 0 of a truncation holds only the incoming h, c.
pub struct Layout {
    /// H.
    pub h: usize,
    inputs: usize,
    /// Floats per coordinate per step.
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

/// `y += a · x`.
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// One optimizer step for a block: reads g and the previous records, writes the new
/// records and adds u to θ.
pub fn forward_block(
    w: &Weights,
    lay: &Layout,
    g: &[f32],
    prev: &[f32],
    cur: &mut [f32],
    theta: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { forward_avx2(w, lay, g, prev, cur, theta) };
        return;
    }
    forward_any(w, lay, g, prev, cur, theta)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn forward_avx2(
    w: &Weights,
    lay: &Layout,
    g: &[f32],
    prev: &[f32],
    cur: &mut [f32],
    theta: &mut [f32],
) {
    forward_any(w, lay, g, prev, cur, theta)
}

#[inline(always)]
fn forward_any(
    w: &Weights,
    lay: &Layout,
    g: &[f32],
    prev: &[f32],
    cur: &mut [f32],
    theta: &mut [f32],
) {
    let h = w.hidden;
    let mut z = vec![0f32; 4 * h];
    let mut input = vec![0f32; h.max(2)];
    for (((gk, rec), prv), th) in g
        .iter()
        .zip(cur.chunks_mut(lay.record))
        .zip(prev.chunks(lay.record))
        .zip(theta.iter_mut())
    {
        preprocess(w, *gk, &mut rec[..lay.inputs]);
        for (l, layer) in w.layers.iter().enumerate() {
            let src = if l == 0 { 0 } else { lay.h_at(l - 1) };
            input[..layer.inputs].copy_from_slice(&rec[src..src + layer.inputs]);
            z.copy_from_slice(&layer.b);
            for (kk, &x) in input[..layer.inputs].iter().enumerate() {
                axpy(&mut z, x, &layer.w_x[kk * 4 * h..(kk + 1) * 4 * h]);
            }
            let h_prev = &prv[lay.h_at(l)..lay.h_at(l) + h];
            for (kk, &x) in h_prev.iter().enumerate() {
                axpy(&mut z, x, &layer.w_h[kk * 4 * h..(kk + 1) * 4 * h]);
            }
            // gates | c | tanh c | h of this layer, split so each loop runs over slices.
            let (gates, rest) = rec[lay.gates_at(l)..lay.gates_at(l) + 7 * h].split_at_mut(4 * h);
            let (c_new, rest) = rest.split_at_mut(h);
            let (tanhc, h_new) = rest.split_at_mut(h);
            let (sig_if, rest) = gates.split_at_mut(2 * h);
            let (g_gate, o_gate) = rest.split_at_mut(h);
            for (a, zj) in sig_if.iter_mut().zip(&z[..2 * h]) {
                *a = sigmoid(*zj);
            }
            for (a, zj) in g_gate.iter_mut().zip(&z[2 * h..3 * h]) {
                *a = tanh(*zj);
            }
            for (a, zj) in o_gate.iter_mut().zip(&z[3 * h..]) {
                *a = sigmoid(*zj);
            }
            let (i_gate, f_gate) = sig_if.split_at(h);
            let c_prev = &prv[lay.c_at(l)..lay.c_at(l) + h];
            for j in 0..h {
                let c = f_gate[j] * c_prev[j] + i_gate[j] * g_gate[j];
                c_new[j] = c;
            }
            for (t, c) in tanhc.iter_mut().zip(c_new.iter()) {
                *t = tanh(*c);
            }
            for ((hn, o), t) in h_new.iter_mut().zip(o_gate.iter()).zip(tanhc.iter()) {
                *hn = o * t;
            }
        }
        let top = &rec[lay.h_at(w.layers.len() - 1)..lay.h_at(w.layers.len() - 1) + h];
        let dot: f32 = top.iter().zip(&w.out_w).map(|(a, b)| a * b).sum();
        let u = (dot + w.out_b) * w.out_scale;
        rec[lay.u_at()] = u;
        *th += u;
    }
}

/// Spec §1.2 in f32, as the burn path computes it.
#[inline(always)]
fn preprocess(w: &Weights, g: f32, x: &mut [f32]) {
    match w.preprocess {
        Preprocess::Identity => x[0] = g,
        Preprocess::LogSign => {
            let a = g.abs();
            if a >= (-w.k).exp() {
                x[0] = a.ln() / w.k;
                x[1] = if g > 0.0 { 1.0 } else { -1.0 };
            } else {
                x[0] = -1.0;
                x[1] = g * w.k.exp();
            }
        }
    }
}

/// Backpropagation through the truncation for the coordinates in `range`, adding ∂L/∂φ
/// (flat, spec order) into `acc`. `du[t]` is ∂L/∂u_t.
pub fn backward_block(
    w: &Weights,
    lay: &Layout,
    records: &[Vec<f32>],
    du: &[Vec<f32>],
    range: Range<usize>,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { backward_avx2(w, lay, records, du, range, acc) };
        return;
    }
    backward_any(w, lay, records, du, range, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn backward_avx2(
    w: &Weights,
    lay: &Layout,
    records: &[Vec<f32>],
    du: &[Vec<f32>],
    range: Range<usize>,
    acc: &mut [f32],
) {
    backward_any(w, lay, records, du, range, acc)
}

#[inline(always)]
fn backward_any(
    w: &Weights,
    lay: &Layout,
    records: &[Vec<f32>],
    du: &[Vec<f32>],
    range: Range<usize>,
    acc: &mut [f32],
) {
    let (h, nl, r) = (w.hidden, w.layers.len(), lay.record);
    let steps = du.len();
    let mut dh_carry = vec![vec![0f32; h]; nl];
    let mut dc_carry = vec![vec![0f32; h]; nl];
    let mut dh = vec![0f32; h];
    let mut below = vec![0f32; h];
    let mut dz = vec![0f32; 4 * h];
    for k in range {
        dh_carry
            .iter_mut()
            .chain(dc_carry.iter_mut())
            .for_each(|v| v.iter_mut().for_each(|x| *x = 0.0));
        for t in (1..=steps).rev() {
            let rec = &records[t][k * r..(k + 1) * r];
            let prv = &records[t - 1][k * r..(k + 1) * r];
            let sdu = w.out_scale * du[t - 1][k];
            let top = &rec[lay.h_at(nl - 1)..lay.h_at(nl - 1) + h];
            acc[w.out_at + h] += sdu;
            axpy(&mut acc[w.out_at..w.out_at + h], sdu, top);
            for j in 0..h {
                dh[j] = sdu * w.out_w[j];
            }
            for l in (0..nl).rev() {
                let layer = &w.layers[l];
                // dh so far: from above at time t; add what flows back from time t+1.
                for j in 0..h {
                    dh[j] += dh_carry[l][j];
                }
                let gates = &rec[lay.gates_at(l)..lay.gates_at(l) + 4 * h];
                let (gi, gf, gg, go) = (&gates[..h], &gates[h..2 * h], &gates[2 * h..3 * h], &gates[3 * h..]);
                let tanhc = &rec[lay.tanhc_at(l)..lay.tanhc_at(l) + h];
                let c_prev = &prv[lay.c_at(l)..lay.c_at(l) + h];
                let (dzi, rest) = dz.split_at_mut(h);
                let (dzf, rest) = rest.split_at_mut(h);
                let (dzg, dzo) = rest.split_at_mut(h);
                let dcc = &mut dc_carry[l];
                for j in 0..h {
                    let (i, f, g, o) = (gi[j], gf[j], gg[j], go[j]);
                    let tc = tanhc[j];
                    let d_o = dh[j] * tc;
                    let dc = dcc[j] + dh[j] * o * (1.0 - tc * tc);
                    dcc[j] = dc * f;
                    dzi[j] = dc * g * i * (1.0 - i);
                    dzf[j] = dc * c_prev[j] * f * (1.0 - f);
                    dzg[j] = dc * i * (1.0 - g * g);
                    dzo[j] = d_o * o * (1.0 - o);
                }
                let (wx_at, wh_at) = (layer.at, layer.at + layer.inputs * 4 * h);
                let b_at = wh_at + h * 4 * h;
                axpy(&mut acc[b_at..b_at + 4 * h], 1.0, &dz);
                let src = if l == 0 { 0 } else { lay.h_at(l - 1) };
                for kk in 0..layer.inputs {
                    let x = rec[src + kk];
                    axpy(
                        &mut acc[wx_at + kk * 4 * h..wx_at + (kk + 1) * 4 * h],
                        x,
                        &dz,
                    );
                }
                let h_prev = &prv[lay.h_at(l)..lay.h_at(l) + h];
                for kk in 0..h {
                    axpy(
                        &mut acc[wh_at + kk * 4 * h..wh_at + (kk + 1) * 4 * h],
                        h_prev[kk],
                        &dz,
                    );
                }
                // To the previous time step through w_h, and to the layer below through w_x.
                let carry = &mut dh_carry[l];
                carry.iter_mut().for_each(|x| *x = 0.0);
                for (j, &d) in dz.iter().enumerate() {
                    axpy(carry, d, &layer.w_ht[j * h..(j + 1) * h]);
                }
                if l > 0 {
                    below.iter_mut().for_each(|x| *x = 0.0);
                    for (j, &d) in dz.iter().enumerate() {
                        axpy(&mut below, d, &layer.w_xt[j * h..(j + 1) * h]);
                    }
                    dh.copy_from_slice(&below);
                }
            }
        }
    }
}
