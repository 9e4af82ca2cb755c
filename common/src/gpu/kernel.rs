//! The CubeCL kernels of one optimizer step: the whole LSTM of one coordinate, every
//! layer and the output, in one thread (forward), and its hand-written backward.
//!
//! Layouts, all flat f32 buffers: θ, g and ∂L/∂u are `[N]`; the state of every layer is
//! `[L·H, N]` (row `l·H + j` holds unit j of layer l for every coordinate, so the threads
//! of a warp read consecutive addresses); gate gradients are `[L·4H, N]` in spec gate
//! order i, f, g, o; φ is every group's tensors, each group flattened in spec §4.1 order
//! (`w_x [I, 4H]`, `w_h [H, 4H]`, `b [4H]` per layer, then `out_w [H]`, `out_b`), one
//! after the other. A launch covers the coordinates `start .. start + count` of one
//! parameter group, whose φ begins at `w_base`.
//!
//! σ and tanh are written with exp (`tanh z = 1 − 2 / (e^{2z} + 1)`) on a clamped
//! argument, so they saturate to ±1 and 0 without an infinity on any driver.

use cubecl::prelude::*;

/// σ(z), saturating cleanly at both ends.
#[cube]
fn sigmoid(z: f32) -> f32 {
    // |z| ≤ 80: e^{80} is finite in f32, and σ(±80) is 0 or 1 to f32 precision.
    let z = z.clamp(-80.0f32, 80.0f32);
    1.0f32 / (1.0f32 + (-z).exp())
}

/// tanh(z), saturating cleanly at both ends.
#[cube]
fn tanh_(z: f32) -> f32 {
    // |z| ≤ 15: e^{30} is finite, and tanh(±15) is ±1 to f32 precision.
    let z = z.clamp(-15.0f32, 15.0f32);
    1.0f32 - 2.0f32 / ((2.0f32 * z).exp() + 1.0f32)
}

/// Where layer `l`'s tensors start inside one group's φ.
#[cube]
fn layer_base(l: usize, #[comptime] inputs: usize, #[comptime] hidden: usize) -> usize {
    let h4 = hidden * 4;
    let first = (inputs + hidden + 1) * h4;
    let later = (hidden + hidden + 1) * h4;
    if l == 0 {
        0usize
    } else {
        first + (l - 1) * later
    }
}

/// The first row of layer `l`'s `[x; h_prev; 1]` block (l = L: the output's `[h; 1]`).
#[cube]
fn input_base(l: usize, #[comptime] inputs: usize, #[comptime] hidden: usize) -> usize {
    if l == 0 {
        0usize
    } else {
        inputs + hidden + 1 + (l - 1) * (2 * hidden + 1)
    }
}

/// log_sign's two features of g (spec §1.2), or g itself.
#[cube]
fn features(g: f32, threshold: f32, k: f32, ek: f32, #[comptime] log_sign: bool) -> (f32, f32) {
    if comptime![log_sign] {
        let a = g.abs();
        if a >= threshold {
            let sign = select(g > 0.0f32, 1.0f32, -1.0f32);
            (a.max(1.0e-37f32).ln() / k, sign)
        } else {
            (-1.0f32, ek * g)
        }
    } else {
        (g, 0.0f32)
    }
}

/// Layer 0's input of coordinate `n`: log_sign's or identity's features of `grad[n]`, or
/// with `given` the two features themselves, `grad` then being `[2, N]` (rnnprop's, which
/// carry state and are computed before the step).
#[cube]
#[allow(clippy::too_many_arguments)]
fn layer_input(
    grad: &[f32],
    n: usize,
    nt: usize,
    threshold: f32,
    k: f32,
    ek: f32,
    #[comptime] inputs: usize,
    #[comptime] given: bool,
) -> (f32, f32) {
    if comptime![given] {
        (grad[n], grad[nt + n])
    } else {
        features(grad[n], threshold, k, ek, inputs == 2)
    }
}

/// The four gate pre-activations of unit `j` of layer `l` for coordinate `n`.
///
/// `below` holds the layer's input for l > 0 (the new h of the layer below, `[L·H, N]`);
/// layer 0 reads the features `x0`, `x1`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn gates(
    w: &[f32],
    wl: usize,
    below: &mut [f32],
    h_prev: &[f32],
    x0: f32,
    x1: f32,
    l: usize,
    j: usize,
    n: usize,
    nt: usize,
    #[comptime] inputs: usize,
    #[comptime] hidden: usize,
) -> (f32, f32, f32, f32) {
    let h4 = hidden * 4;
    let in_size = if l == 0 { inputs } else { hidden };
    let wh = wl + in_size * h4;
    let b = wh + hidden * h4;
    let mut zi = w[b + j];
    let mut zf = w[b + hidden + j];
    let mut zg = w[b + 2 * hidden + j];
    let mut zo = w[b + 3 * hidden + j];
    if l == 0 {
        zi += x0 * w[wl + j];
        zf += x0 * w[wl + hidden + j];
        zg += x0 * w[wl + 2 * hidden + j];
        zo += x0 * w[wl + 3 * hidden + j];
        if comptime![inputs == 2] {
            let r = wl + h4;
            zi += x1 * w[r + j];
            zf += x1 * w[r + hidden + j];
            zg += x1 * w[r + 2 * hidden + j];
            zo += x1 * w[r + 3 * hidden + j];
        }
    } else {
        for k in 0..hidden {
            let x = below[((l - 1) * hidden + k) * nt + n];
            let r = wl + k * h4;
            zi += x * w[r + j];
            zf += x * w[r + hidden + j];
            zg += x * w[r + 2 * hidden + j];
            zo += x * w[r + 3 * hidden + j];
        }
    }
    for k in 0..hidden {
        let x = h_prev[(l * hidden + k) * nt + n];
        let r = wh + k * h4;
        zi += x * w[r + j];
        zf += x * w[r + hidden + j];
        zg += x * w[r + 2 * hidden + j];
        zo += x * w[r + 3 * hidden + j];
    }
    (zi, zf, zg, zo)
}

/// One optimizer step for every coordinate of a group: g → features → LSTM layers → u,
/// θ' = θ + u (spec §1.2–1.4); with `given`, `grad` holds the features (`[2, N]`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn step_forward(
    theta: &[f32],
    grad: &[f32],
    h: &[f32],
    c: &[f32],
    w: &[f32],
    theta_out: &mut [f32],
    h_out: &mut [f32],
    c_out: &mut [f32],
    start: u32,
    count: u32,
    w_base: u32,
    threshold: f32,
    k: f32,
    ek: f32,
    out_scale: f32,
    #[comptime] inputs: usize,
    #[comptime] given: bool,
    #[comptime] hidden: usize,
    #[comptime] layers: usize,
) {
    if ABSOLUTE_POS >= count as usize {
        terminate!();
    }
    let n = start as usize + ABSOLUTE_POS;
    let nt = theta.len();
    let base = w_base as usize;
    let (x0, x1) = layer_input(grad, n, nt, threshold, k, ek, inputs, given);
    #[unroll]
    for l in 0..layers {
        let wl = base + layer_base(l, inputs, hidden);
        for j in 0..hidden {
            let (zi, zf, zg, zo) = gates(w, wl, h_out, h, x0, x1, l, j, n, nt, inputs, hidden);
            let at = (l * hidden + j) * nt + n;
            let cn = sigmoid(zf) * c[at] + sigmoid(zi) * tanh_(zg);
            c_out[at] = cn;
            h_out[at] = sigmoid(zo) * tanh_(cn);
        }
    }
    let ow = base + layer_base(layers, inputs, hidden);
    let mut u = w[ow + hidden];
    for j in 0..hidden {
        u += h_out[((layers - 1) * hidden + j) * nt + n] * w[ow + j];
    }
    theta_out[n] = theta[n] + u * out_scale;
}

/// The backward of [`step_forward`] for every coordinate of a group: from ∂L/∂u and the
/// gradients reaching the new state, the gradients of the old state and of every gate
/// pre-activation, and each layer's inputs stacked as `[x; h_prev; 1]` (rows I_l + H + 1,
/// then `[h_top; 1]` for the output), so that ∂L/∂φ of a layer is one product of that
/// block with its gate gradients, summed over coordinates, already in spec order
/// (`w_x`, `w_h`, `b`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn step_backward(
    du: &[f32],
    grad: &[f32],
    h_prev: &[f32],
    c_prev: &[f32],
    // Only read; declared writable because the forward pass reads its layer inputs from
    // the buffer it writes, and [`gates`] serves both.
    h_new: &mut [f32],
    c_new: &[f32],
    dh: &[f32],
    dc: &[f32],
    w: &[f32],
    dh_out: &mut [f32],
    dc_out: &mut [f32],
    dz: &mut [f32],
    xin: &mut [f32],
    start: u32,
    count: u32,
    w_base: u32,
    threshold: f32,
    k: f32,
    ek: f32,
    out_scale: f32,
    #[comptime] inputs: usize,
    #[comptime] given: bool,
    #[comptime] hidden: usize,
    #[comptime] layers: usize,
) {
    if ABSOLUTE_POS >= count as usize {
        terminate!();
    }
    let n = start as usize + ABSOLUTE_POS;
    let nt = du.len();
    let base = w_base as usize;
    let h4 = hidden * 4;
    let (x0, x1) = layer_input(grad, n, nt, threshold, k, ek, inputs, given);
    // Each layer's [x; h_prev; 1], then [h_top; 1].
    #[unroll]
    for l in 0..layers {
        let at = input_base(l, inputs, hidden) * nt + n;
        if l == 0 {
            xin[at] = x0;
            if comptime![inputs == 2] {
                xin[at + nt] = x1;
            }
        } else {
            for k in 0..hidden {
                xin[at + k * nt] = h_new[((l - 1) * hidden + k) * nt + n];
            }
        }
        let in_size = if l == 0 { inputs } else { hidden };
        for k in 0..hidden {
            xin[at + (in_size + k) * nt] = h_prev[(l * hidden + k) * nt + n];
        }
        xin[at + (in_size + hidden) * nt] = 1.0f32;
    }
    let at = input_base(layers, inputs, hidden) * nt + n;
    for k in 0..hidden {
        xin[at + k * nt] = h_new[((layers - 1) * hidden + k) * nt + n];
    }
    xin[at + hidden * nt] = 1.0f32;
    let ow = base + layer_base(layers, inputs, hidden);
    let gu = du[n] * out_scale;
    #[unroll]
    for step in 0..layers {
        let l = layers - 1 - step;
        let wl = base + layer_base(l, inputs, hidden);
        for j in 0..hidden {
            let (zi, zf, zg, zo) = gates(w, wl, h_new, h_prev, x0, x1, l, j, n, nt, inputs, hidden);
            let (i, f, g, o) = (sigmoid(zi), sigmoid(zf), tanh_(zg), sigmoid(zo));
            let at = (l * hidden + j) * nt + n;
            let tc = tanh_(c_new[at]);
            // ∂L/∂h' of this unit: carried from the next step, plus what the output
            // (top layer) or the layer above (through its w_x) sends down.
            let mut gh = dh[at];
            if l == layers - 1 {
                gh += gu * w[ow + j];
            } else {
                let above = base + layer_base(l + 1, inputs, hidden) + j * h4;
                for q in 0..h4 {
                    gh += w[above + q] * dz[((l + 1) * h4 + q) * nt + n];
                }
            }
            let gc = dc[at] + gh * o * (1.0f32 - tc * tc);
            let zrow = l * h4;
            dz[(zrow + j) * nt + n] = gc * g * i * (1.0f32 - i);
            dz[(zrow + hidden + j) * nt + n] = gc * c_prev[at] * f * (1.0f32 - f);
            dz[(zrow + 2 * hidden + j) * nt + n] = gc * i * (1.0f32 - g * g);
            dz[(zrow + 3 * hidden + j) * nt + n] = gh * tc * o * (1.0f32 - o);
            dc_out[at] = gc * f;
        }
        let in_size = if l == 0 { inputs } else { hidden };
        let wh = wl + in_size * h4;
        for j in 0..hidden {
            let r = wh + j * h4;
            let mut s = 0.0f32;
            for q in 0..h4 {
                s += w[r + q] * dz[(l * h4 + q) * nt + n];
            }
            dh_out[(l * hidden + j) * nt + n] = s;
        }
    }
}
