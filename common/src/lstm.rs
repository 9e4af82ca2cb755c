//! The coordinatewise LSTM optimizer m_φ (spec §1.3–1.5), written once for any burn device.

use burn::tensor::activation::{sigmoid, tanh};
use burn::tensor::{DType, Device, Tensor};

use crate::preprocess::preprocess;
use crate::tensor::{from_f32, to_f32};
use std::ops::Range;

use crate::groups::{AnyPhi, GroupMap, PhiGroups};
use crate::{Error, OptimizerConfig, Phi};

/// One LSTM layer's parameters: `w_x [I, 4H]`, `w_h [H, 4H]`, `b [1, 4H]`.
#[derive(Debug, Clone)]
pub struct LayerParams {
    /// Input weights.
    pub w_x: Tensor<2>,
    /// Recurrent weights.
    pub w_h: Tensor<2>,
    /// Bias, kept as a row so it broadcasts over coordinates.
    pub b: Tensor<2>,
}

/// φ as tensors on a device: the optimizer ready to step.
#[derive(Debug, Clone)]
pub struct Lstm {
    /// The configuration φ was made for.
    pub config: OptimizerConfig,
    /// The stacked layers, bottom first.
    pub layers: Vec<LayerParams>,
    /// Output weights `[H, 1]`.
    pub out_w: Tensor<2>,
    /// Output bias `[1, 1]`.
    pub out_b: Tensor<2>,
}

/// The LSTM's h and c for every layer, each `[N, H]`, and the preprocessing's moments.
#[derive(Debug, Clone)]
pub struct LstmState {
    /// Hidden outputs, bottom layer first.
    pub h: Vec<Tensor<2>>,
    /// Cell states, bottom layer first.
    pub c: Vec<Tensor<2>>,
    /// rnnprop's running moments m and v, each `[N, 1]`; empty for the other
    /// preprocessings ([`crate::Preprocess::moments`]).
    pub moments: Vec<Tensor<2>>,
}

impl LstmState {
    /// Zero state for `n` coordinates, as at the start of a trajectory (spec §1.5).
    pub fn zeros(config: &OptimizerConfig, n: usize, device: &Device, dtype: DType) -> Self {
        let z = || Tensor::zeros([n, config.hidden], (device, dtype));
        Self {
            h: (0..config.layers).map(|_| z()).collect(),
            c: (0..config.layers).map(|_| z()).collect(),
            moments: (0..config.preprocess.moments())
                .map(|_| Tensor::zeros([n, 1], (device, dtype)))
                .collect(),
        }
    }

    /// The same values cut from any autodiff graph (a truncation boundary).
    pub fn detach(self) -> Self {
        Self {
            h: self.h.into_iter().map(Tensor::detach).collect(),
            c: self.c.into_iter().map(Tensor::detach).collect(),
            moments: self.moments.into_iter().map(Tensor::detach).collect(),
        }
    }
}

impl Lstm {
    /// Puts host φ on `device` in `dtype`.
    pub fn new(phi: &Phi, device: &Device, dtype: DType) -> Self {
        let config = phi.config;
        let (h, h4) = (config.hidden, 4 * config.hidden);
        let mut tensors = phi.tensors.iter();
        // `Phi` guarantees one tensor per layout entry, in layout order.
        let mut next = |rows: usize, cols: usize| {
            let values = tensors.next().map(Vec::as_slice).unwrap_or(&[]);
            from_f32(values, [rows, cols], device, dtype)
        };
        let layers = (0..config.layers)
            .map(|l| LayerParams {
                w_x: next(config.input_size(l), h4),
                w_h: next(h, h4),
                b: next(1, h4),
            })
            .collect();
        let out_w = next(h, 1);
        let out_b = next(1, 1);
        Self {
            config,
            layers,
            out_w,
            out_b,
        }
    }

    /// Every parameter tensor, in spec §4.1 order.
    pub fn params(&self) -> Vec<&Tensor<2>> {
        let mut out: Vec<&Tensor<2>> = Vec::with_capacity(3 * self.layers.len() + 2);
        for layer in &self.layers {
            out.extend([&layer.w_x, &layer.w_h, &layer.b]);
        }
        out.extend([&self.out_w, &self.out_b]);
        out
    }

    /// Applies `f` to every parameter tensor, in spec §4.1 order.
    pub fn map_params(self, mut f: impl FnMut(Tensor<2>) -> Tensor<2>) -> Self {
        Self {
            config: self.config,
            layers: self
                .layers
                .into_iter()
                .map(|l| LayerParams {
                    w_x: f(l.w_x),
                    w_h: f(l.w_h),
                    b: f(l.b),
                })
                .collect(),
            out_w: f(self.out_w),
            out_b: f(self.out_b),
        }
    }

    /// Back to host φ (values rounded to f32).
    pub fn to_phi(&self) -> Result<Phi, Error> {
        let tensors = self
            .params()
            .into_iter()
            .map(to_f32)
            .collect::<Result<_, _>>()?;
        Phi::from_tensors(self.config, tensors)
    }

    /// One optimizer step: the update `u [N, 1]` for gradients `g [N, 1]`, and the new state.
    pub fn step(&self, g: Tensor<2>, state: LstmState) -> (Tensor<2>, LstmState) {
        let cfg = &self.config;
        let hidden = cfg.hidden;
        let (mut x, moments) = preprocess(g, cfg.preprocess, cfg.k, state.moments);
        let mut next = LstmState {
            h: Vec::with_capacity(cfg.layers),
            c: Vec::with_capacity(cfg.layers),
            moments,
        };
        for ((layer, h), c) in self.layers.iter().zip(state.h).zip(state.c) {
            let (h, c) = cell(layer, x, h, c, hidden);
            x = h.clone();
            next.h.push(h);
            next.c.push(c);
        }
        let u = (x.matmul(self.out_w.clone()) + self.out_b.clone()).mul_scalar(cfg.out_scale);
        (u, next)
    }
}

/// A φ of either kind on a device (spec §5): each LSTM with the coordinates it updates.
///
/// With one group this is one [`Lstm`] over all coordinates, computed exactly as
/// [`Lstm::step`]; with several, each step slices g and the state by group, steps each
/// group's LSTM on its slice and joins the results.
#[derive(Debug, Clone)]
pub struct Lstms {
    names: Option<Vec<String>>,
    parts: Vec<(Lstm, Range<usize>)>,
}

impl Lstms {
    /// Puts host φ on `device`, bound to `groups` of an N-coordinate problem; refuses a
    /// φ whose groups the problem does not name (spec §5).
    pub fn new(
        phi: &AnyPhi,
        groups: Option<&GroupMap>,
        n: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, Error> {
        let parts = phi
            .bind(groups, n)?
            .into_iter()
            .map(|(p, r)| (Lstm::new(p, device, dtype), r))
            .collect();
        Ok(Self {
            names: phi
                .names()
                .map(|v| v.into_iter().map(String::from).collect()),
            parts,
        })
    }

    /// One LSTM for all `n` coordinates (a one-group φ).
    pub fn one(lstm: Lstm, n: usize) -> Self {
        Self {
            names: None,
            parts: vec![(lstm, 0..n)],
        }
    }

    /// The configuration every LSTM shares.
    pub fn config(&self) -> OptimizerConfig {
        self.parts[0].0.config
    }

    /// Each LSTM with its coordinates, in φ's group order.
    pub fn parts(&self) -> &[(Lstm, Range<usize>)] {
        &self.parts
    }

    /// Every parameter tensor, group by group, each in spec §4.1 order.
    pub fn params(&self) -> Vec<&Tensor<2>> {
        self.parts.iter().flat_map(|(l, _)| l.params()).collect()
    }

    /// Applies `f` to every parameter tensor, in [`Lstms::params`] order.
    pub fn map_params(self, mut f: impl FnMut(Tensor<2>) -> Tensor<2>) -> Self {
        Self {
            names: self.names,
            parts: self
                .parts
                .into_iter()
                .map(|(l, r)| (l.map_params(&mut f), r))
                .collect(),
        }
    }

    /// Host φ of this kind and names from tensors in [`Lstms::params`] order (e.g. the
    /// gradient), checking sizes and finiteness.
    pub fn phi_from(&self, tensors: Vec<Vec<f32>>) -> Result<AnyPhi, Error> {
        let config = self.config();
        let per = 3 * config.layers + 2;
        if tensors.len() != per * self.parts.len() {
            return Err(Error::Shape(format!(
                "{} tensors for {} LSTMs of {per}",
                tensors.len(),
                self.parts.len()
            )));
        }
        let mut it = tensors.into_iter();
        let phis = (0..self.parts.len())
            .map(|_| Phi::from_tensors(config, it.by_ref().take(per).collect()))
            .collect::<Result<Vec<_>, _>>()?;
        match &self.names {
            None => match <[Phi; 1]>::try_from(phis) {
                Ok([phi]) => Ok(AnyPhi::One(phi)),
                Err(v) => Err(Error::Shape(format!("{} LSTMs for a one-group φ", v.len()))),
            },
            Some(names) => Ok(AnyPhi::Groups(PhiGroups::new(
                names.iter().cloned().zip(phis).collect(),
            )?)),
        }
    }

    /// Back to host φ (values rounded to f32).
    pub fn to_phi(&self) -> Result<AnyPhi, Error> {
        let tensors = self
            .params()
            .into_iter()
            .map(to_f32)
            .collect::<Result<_, _>>()?;
        self.phi_from(tensors)
    }

    /// Whether φ's tensors are on an autodiff graph's device.
    pub fn is_autodiff(&self) -> bool {
        self.parts[0].0.out_b.is_autodiff()
    }

    /// One optimizer step over all coordinates: each group's LSTM on its own.
    pub fn step(&self, g: Tensor<2>, state: LstmState) -> (Tensor<2>, LstmState) {
        if let [(lstm, _)] = self.parts.as_slice() {
            return lstm.step(g, state);
        }
        let layers = self.config().layers;
        let mut us = Vec::with_capacity(self.parts.len());
        let mut h: Vec<Vec<Tensor<2>>> = vec![Vec::with_capacity(self.parts.len()); layers];
        let mut c = h.clone();
        // As many as the preprocessing makes (a state without them starts them at zero in
        // every group, as one group does).
        let mut moments: Vec<Vec<Tensor<2>>> = vec![Vec::new(); self.config().preprocess.moments()];
        for (lstm, r) in &self.parts {
            if r.is_empty() {
                continue;
            }
            let cut = |t: &Tensor<2>| t.clone().narrow(0, r.start, r.len());
            let part = LstmState {
                h: state.h.iter().map(cut).collect(),
                c: state.c.iter().map(cut).collect(),
                moments: state.moments.iter().map(cut).collect(),
            };
            let (u, next) = lstm.step(cut(&g), part);
            us.push(u);
            for (l, (hl, cl)) in next.h.into_iter().zip(next.c).enumerate() {
                h[l].push(hl);
                c[l].push(cl);
            }
            for (all, m) in moments.iter_mut().zip(next.moments) {
                all.push(m);
            }
        }
        let next = LstmState {
            h: h.into_iter().map(|v| Tensor::cat(v, 0)).collect(),
            c: c.into_iter().map(|v| Tensor::cat(v, 0)).collect(),
            moments: moments.into_iter().map(|v| Tensor::cat(v, 0)).collect(),
        };
        (Tensor::cat(us, 0), next)
    }
}

/// One LSTM cell (spec §1.3): gates in the order i, f, g, o; returns (h', c').
pub fn cell(
    p: &LayerParams,
    x: Tensor<2>,
    h: Tensor<2>,
    c: Tensor<2>,
    hidden: usize,
) -> (Tensor<2>, Tensor<2>) {
    let z = x.matmul(p.w_x.clone()) + h.matmul(p.w_h.clone()) + p.b.clone();
    let i = sigmoid(z.clone().narrow(1, 0, hidden));
    let f = sigmoid(z.clone().narrow(1, hidden, hidden));
    let g = tanh(z.clone().narrow(1, 2 * hidden, hidden));
    let o = sigmoid(z.narrow(1, 3 * hidden, hidden));
    let c_next = f * c + i * g;
    let h_next = o * tanh(c_next.clone());
    (h_next, c_next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{from_f64, to_f64};

    #[test]
    fn one_cell_step_by_hand() {
        // H = 1, I = 1, so z has the four columns i, f, g, o.
        // x = 0.5, h = -1, c = 2; w_x = [1, 2, 3, 4], w_h = [0.5, 0, -1, 1],
        // b = [0, 1, 0, -0.5].
        // z = 0.5·w_x + (-1)·w_h + b = [0, 2, 2.5, 0.5]
        // i = σ(0) = 0.5, f = σ(2) = 0.880797077977882, g = tanh(2.5) = 0.986614298151430,
        // o = σ(0.5) = 0.622459331201855
        // c' = f·c + i·g = 1.761594155955765 + 0.493307149075715 = 2.254901305031480
        // h' = o·tanh(c') = 0.622459331201855 · 0.978238131542051 = 0.608913453115817
        // (each value printed by Python's math module).
        let dev = Device::flex();
        let t = |v: &[f64], r, c| from_f64(v, [r, c], &dev, DType::F64);
        let p = LayerParams {
            w_x: t(&[1.0, 2.0, 3.0, 4.0], 1, 4),
            w_h: t(&[0.5, 0.0, -1.0, 1.0], 1, 4),
            b: t(&[0.0, 1.0, 0.0, -0.5], 1, 4),
        };
        let (h, c) = cell(&p, t(&[0.5], 1, 1), t(&[-1.0], 1, 1), t(&[2.0], 1, 1), 1);
        let c = to_f64(&c).unwrap()[0];
        let h = to_f64(&h).unwrap()[0];
        assert!((c - 2.254901305031480).abs() < 1e-12, "c' = {c}");
        assert!((h - 0.608913453115817).abs() < 1e-12, "h' = {h}");
    }

    #[test]
    fn output_is_scaled_and_has_no_minus_sign() {
        // With all LSTM weights zero, h' = σ(0)·tanh(σ(0)·tanh(0)) = 0 in every layer,
        // so u = out_b · out_scale: +0.3 · 0.1 = +0.03 (0.3 as stored in f32).
        let cfg = OptimizerConfig::default();
        let mut phi = Phi::zeros(cfg);
        *phi.tensors.last_mut().unwrap() = vec![0.3];
        let dev = Device::flex();
        let lstm = Lstm::new(&phi, &dev, DType::F64);
        let g = from_f64(&[1.0, -2.0], [2, 1], &dev, DType::F64);
        let (u, _) = lstm.step(g, LstmState::zeros(&cfg, 2, &dev, DType::F64));
        for v in to_f64(&u).unwrap() {
            assert!((v - 0.3f32 as f64 * 0.1).abs() < 1e-15, "{v}");
        }
    }

    #[test]
    fn host_round_trip_is_exact() {
        let phi = Phi::init(OptimizerConfig::default(), 5).unwrap();
        let lstm = Lstm::new(&phi, &Device::flex(), DType::F32);
        assert_eq!(lstm.to_phi().unwrap(), phi);
    }
}
