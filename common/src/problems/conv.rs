//! `conv`: the paper's CIFAR-10 network (spec §6, paper §3.3), on the host.
//!
//! The network, exactly (what every worker computes from a family, its parameters and a
//! seed), for images of C channels, H × W pixels scaled to [0, 1]:
//!
//! - Three blocks, each: a 5×5 convolution with `channels` (16) output channels, stride
//!   1, zero padding 2 (the output keeps the input's size), no bias; batch normalisation
//!   with the minibatch's statistics (per channel over examples and positions, biased
//!   variance, ε = 1e-5), with a learned shift β and no scale (Sonnet's default, which the
//!   authors' code used); ReLU; 2×2 max pooling with stride 2, rounding sizes down (the
//!   first maximum in row-major window order takes the gradient).
//! - The third block's output flattened channel by channel (each row-major): F = channels
//!   · ⌊⌊⌊H/2⌋/2⌋/2⌋ · ⌊⌊⌊W/2⌋/2⌋/2⌋ values per example (256 for CIFAR-10's 32×32, 144 for
//!   28×28).
//! - A fully connected layer of `hidden` (32) units without bias, batch normalisation as
//!   above (per unit over the minibatch) with a shift, ReLU.
//! - 10 outputs (weights and a bias), softmax cross-entropy averaged over the minibatch
//!   of `batch` (128) examples, drawn uniformly with replacement from the examples whose
//!   labels are in `labels` (all ten by default), a function of (seed, step) only.
//!
//! θ, in this order (every entry of θ₀ ~ N(0, 0.01²), drawn in order from `Rng::new(seed)`):
//! group `conv`: the kernels K1 `[channels, C, 5, 5]`, K2 and K3 `[channels, channels, 5, 5]`;
//! group `fc`: the shifts β1, β2, β3 `[channels]`, W4 `[F, hidden]`, β4 `[hidden]`, W5
//! `[hidden, 10]`, b5 `[10]` (all row-major). With `lstms=2` (the default) the family
//! has the parameter groups `conv,fc` of spec §5, the paper's two LSTMs; with `lstms=1`
//! one LSTM updates everything (the paper's comparison).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;

use crate::Error;
use crate::groups::GroupMap;
use crate::problems::gemm::Real;
use crate::problems::mlp::{CLASSES, softmax_cross_entropy};
use crate::problems::mnist::Dataset;
use crate::problems::{HostProblem, MAX_VALUES, Params};
use crate::rng::Rng;

/// Side of every convolution kernel.
pub const KERNEL: usize = 5;
/// Zero padding on each side (keeps the size).
const PAD: usize = 2;
/// Taps of one kernel.
const TAPS: usize = KERNEL * KERNEL;
/// Convolution blocks.
pub const BLOCKS: usize = 3;
/// Batch normalisation's ε.
pub const BN_EPS: f64 = 1e-5;
/// Smallest image side three 2×2 poolings leave at least one pixel of.
pub const MIN_SIDE: usize = 8;
/// Examples per parallel task in the backward pass: fixed, so sums do not depend on the
/// thread count.
const TASK_IMAGES: usize = 4;

/// The network's sizes, minibatch and label subset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvSpec {
    /// Output channels of every convolution (the paper: 16).
    pub channels: usize,
    /// Units of the fully connected layer (the paper: 32).
    pub hidden: usize,
    /// Examples per minibatch (at least 2: batch statistics need two).
    pub batch: usize,
    /// The classes whose examples are drawn, ascending (default all ten).
    pub labels: Vec<u8>,
    /// Two LSTMs (`conv` and `fc`, spec §5) or one for all parameters.
    pub two_lstms: bool,
}

impl Default for ConvSpec {
    fn default() -> Self {
        Self {
            channels: 16,
            hidden: 32,
            batch: 128,
            labels: (0..CLASSES as u8).collect(),
            two_lstms: true,
        }
    }
}

/// Parses `0-4`, `7`, `0-1+5-6`: classes as ranges joined by `+`.
fn parse_labels(params: &Params, v: &str) -> Result<Vec<u8>, Error> {
    let bad = || {
        params.bad(format!(
            "labels {v:?}: give classes 0..=9 as ranges joined by +, e.g. 0-4 or 0-1+8-9"
        ))
    };
    let mut out = Vec::new();
    for part in v.split('+') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u8, u8) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        if a > b || b as usize >= CLASSES {
            return Err(bad());
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The canonical form of a label set, as [`parse_labels`] reads it back.
fn format_labels(labels: &[u8]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < labels.len() {
        let mut j = i;
        while j + 1 < labels.len() && labels[j + 1] == labels[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            labels[i].to_string()
        } else {
            format!("{}-{}", labels[i], labels[j])
        });
        i = j + 1;
    }
    parts.join("+")
}

impl ConvSpec {
    /// Reads `channels`, `hidden`, `batch`, `labels` and `lstms` (1 or 2); defaults: the
    /// paper's network. Refuses other keys and a batch below 2.
    pub fn parse(params: &Params) -> Result<Self, Error> {
        let mut c = ConvSpec::default();
        for &(k, v) in params.pairs() {
            match k {
                "channels" => c.channels = params.count(v)?,
                "hidden" => c.hidden = params.count(v)?,
                "batch" => c.batch = params.count(v)?,
                "labels" => c.labels = parse_labels(params, v)?,
                "lstms" => {
                    c.two_lstms = match v {
                        "2" => true,
                        "1" => false,
                        _ => {
                            return Err(params.bad(format!(
                                "lstms {v:?}: 2 (conv and fc, spec §5) or 1 (one for all)"
                            )));
                        }
                    }
                }
                _ => return Err(params.unknown(k, "channels, hidden, batch, labels, lstms")),
            }
        }
        if c.batch < 2 {
            return Err(params.bad(
                "batch 1: batch normalisation with batch statistics needs at least 2".into(),
            ));
        }
        // A bound before any data is seen (CIFAR-10's images); the data's own shape is
        // checked when an instance is made.
        if c.channels > 4096 || c.hidden > 1 << 16 {
            return Err(params.bad(format!(
                "channels {} and hidden {}: too large",
                c.channels, c.hidden
            )));
        }
        c.check_images([3, 32, 32]).map_err(|e| match e {
            Error::Config(why) => params.bad(why),
            other => other,
        })?;
        Ok(c)
    }

    /// Every parameter, as [`ConvSpec::parse`] reads them.
    pub fn params(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("channels".to_string(), self.channels.to_string()),
            ("hidden".to_string(), self.hidden.to_string()),
            ("batch".to_string(), self.batch.to_string()),
            ("labels".to_string(), format_labels(&self.labels)),
            (
                "lstms".to_string(),
                if self.two_lstms { "2" } else { "1" }.to_string(),
            ),
        ])
    }

    /// A short name: `conv`, `conv-labels0-4`, `conv-1lstm`.
    pub fn name(&self) -> String {
        let mut name = "conv".to_string();
        if self.labels.len() != CLASSES {
            name += &format!("-labels{}", format_labels(&self.labels));
        }
        if !self.two_lstms {
            name += "-1lstm";
        }
        name
    }

    /// The parameter groups of spec §5: `conv,fc`, or none with one LSTM.
    pub fn groups(&self) -> Option<Vec<&'static str>> {
        self.two_lstms.then(|| vec!["conv", "fc"])
    }

    fn num_params_for(&self, shape: [usize; 3]) -> usize {
        Shapes::new(self, shape).total
    }

    /// Refuses images the network cannot take (three poolings need sides of at least 8).
    pub fn check_images(&self, shape: [usize; 3]) -> Result<(), Error> {
        let [c, h, w] = shape;
        if c == 0 || h < MIN_SIDE || w < MIN_SIDE {
            return Err(Error::Config(format!(
                "conv: images of {c} channels, {h}×{w} pixels; three 2×2 poolings need at \
                 least one channel and sides of at least {MIN_SIDE}"
            )));
        }
        let n = self.num_params_for(shape) as u128;
        if n > MAX_VALUES as u128 {
            return Err(Error::Config(format!(
                "conv: {n} weights for {c}×{h}×{w} images; at most {MAX_VALUES}"
            )));
        }
        // What one step holds: each block's activations for the whole minibatch, and one
        // image's patches per thread.
        let pixels = h as u128 * w as u128;
        let activations = self.batch as u128 * c.max(self.channels) as u128 * pixels;
        let patches = c.max(self.channels) as u128 * TAPS as u128 * pixels;
        if activations > MAX_VALUES as u128 || patches > MAX_VALUES as u128 {
            return Err(Error::Config(format!(
                "conv: a minibatch of {} images of {c}×{h}×{w} needs {activations} values per \
                 layer; at most {MAX_VALUES}: use a smaller batch or smaller images",
                self.batch
            )));
        }
        Ok(())
    }
}

/// Sizes and θ offsets of the network for one image shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shapes {
    /// Input channels of block l.
    pub cin: [usize; BLOCKS],
    /// Input (rows, cols) of block l; pooling halves them.
    pub side: [(usize, usize); BLOCKS],
    /// Output channels of every block.
    pub ch: usize,
    /// Units of the fully connected layer.
    pub hidden: usize,
    /// Features after the last block.
    pub features: usize,
    /// Offsets of K1..K3.
    pub k: [usize; BLOCKS],
    /// Offsets of β1..β3.
    pub beta: [usize; BLOCKS],
    /// Offset of W4.
    pub w4: usize,
    /// Offset of β4.
    pub beta4: usize,
    /// Offset of W5.
    pub w5: usize,
    /// Offset of b5.
    pub b5: usize,
    /// Coordinates of the `conv` group (the kernels), which come first.
    pub conv_end: usize,
    /// N.
    pub total: usize,
}

impl Shapes {
    fn new(spec: &ConvSpec, [c, h, w]: [usize; 3]) -> Self {
        let ch = spec.channels;
        let cin = [c, ch, ch];
        let side = [(h, w), (h / 2, w / 2), (h / 4, w / 4)];
        let features = ch * (h / 8) * (w / 8);
        let mut at = 0;
        let mut take = |n: usize| {
            let o = at;
            at += n;
            o
        };
        let k = [
            take(ch * cin[0] * TAPS),
            take(ch * cin[1] * TAPS),
            take(ch * cin[2] * TAPS),
        ];
        let conv_end = k[2] + ch * cin[2] * TAPS;
        let beta = [take(ch), take(ch), take(ch)];
        let w4 = take(features * spec.hidden);
        let beta4 = take(spec.hidden);
        let w5 = take(spec.hidden * CLASSES);
        let b5 = take(CLASSES);
        Self {
            cin,
            side,
            ch,
            hidden: spec.hidden,
            features,
            k,
            beta,
            w4,
            beta4,
            w5,
            b5,
            conv_end,
            total: at,
        }
    }
}

/// One instance: a network's θ₀ and its minibatches, drawn from a seed.
#[derive(Debug, Clone)]
pub struct Conv {
    /// The network's sizes and label subset.
    pub spec: ConvSpec,
    /// The examples minibatches are drawn from.
    pub data: Arc<Dataset>,
    /// Indices of the examples whose labels are in the subset.
    pub eligible: Arc<Vec<u32>>,
    /// The instance's seed.
    pub seed: u64,
    /// θ₀, every entry ~ N(0, 0.01²).
    pub theta0: Vec<f32>,
    shapes: Shapes,
}

/// What the forward pass keeps for the backward pass, per block.
struct BlockRecord<T> {
    /// The block's input `[B, cin, rows·cols]`.
    input: Vec<T>,
    /// Normalised convolution output x̂ `[B, ch, rows·cols]`.
    xhat: Vec<T>,
    /// 1/√(σ² + ε) per channel.
    inv_std: Vec<T>,
    /// Per pooled output `[B, ch, rows/2 · cols/2]`: the position in rows·cols it took.
    argmax: Vec<u32>,
}

impl Conv {
    /// The instance of `seed` on `data`: θ₀ from `Rng::new(seed)`, batches from (seed,
    /// step); refuses images the network cannot take and a label subset with no examples.
    pub fn new(spec: ConvSpec, data: Arc<Dataset>, seed: u64) -> Result<Self, Error> {
        spec.check_images(data.shape)?;
        if data.pixels != data.shape.iter().product::<usize>()
            || data.images.len() != data.len() * data.pixels
        {
            return Err(Error::Shape(format!(
                "conv: a data set of {} labels, {} bytes and {} pixels per image does not \
                 hold images of shape {:?}",
                data.len(),
                data.images.len(),
                data.pixels,
                data.shape
            )));
        }
        let eligible: Vec<u32> = (0..data.len() as u32)
            .filter(|i| spec.labels.contains(&data.labels[*i as usize]))
            .collect();
        if eligible.is_empty() {
            return Err(Error::Config(format!(
                "conv: the data set has no examples with labels {}",
                format_labels(&spec.labels)
            )));
        }
        let shapes = Shapes::new(&spec, data.shape);
        let mut rng = Rng::new(seed);
        let theta0 = (0..shapes.total)
            .map(|_| (0.01 * rng.normal()) as f32)
            .collect();
        Ok(Self {
            spec,
            data,
            eligible: Arc::new(eligible),
            seed,
            theta0,
            shapes,
        })
    }

    /// The network's sizes and where each tensor sits in θ.
    pub fn layout(&self) -> &Shapes {
        &self.shapes
    }

    /// Coordinates of the `conv` group (the kernels); the rest are `fc`.
    pub fn conv_coords(&self) -> Range<usize> {
        0..self.shapes.conv_end
    }

    /// Indices of step `step`'s minibatch, uniform with replacement over the examples
    /// with the subset's labels.
    pub fn batch(&self, step: usize) -> Vec<usize> {
        let mut rng = Rng::for_step(self.seed, 0x636f_6e76_5f62_6174, step);
        let n = self.eligible.len() as u64;
        (0..self.spec.batch)
            .map(|_| self.eligible[rng.below(n) as usize] as usize)
            .collect()
    }

    /// f_t(θ) and ∇f_t(θ) (written into `grad`), in f32 or f64.
    ///
    /// Panics unless `theta` and `grad` have N values (a caller's bug, not input).
    pub fn loss_grad<T: Real>(&self, theta: &[T], step: usize, grad: &mut [T]) -> T {
        let s = &self.shapes;
        assert!(
            theta.len() == s.total && grad.len() == s.total,
            "conv: θ and its gradient need {} values",
            s.total
        );
        let idx = self.batch(step);
        let rows = idx.len();
        let to = |v: f32| T::from(v).unwrap_or_else(T::zero);
        let mut x: Vec<T> = idx
            .iter()
            .flat_map(|i| self.data.image(*i).map(to))
            .collect();
        let mut records = Vec::with_capacity(BLOCKS);
        for l in 0..BLOCKS {
            let (rec, pooled) = block_forward(s, l, theta, x, rows);
            records.push(rec);
            x = pooled;
        }
        // The fully connected part: x is F `[B, features]`.
        let (f, hid) = (s.features, s.hidden);
        let mut z4 = vec![T::zero(); rows * hid];
        T::gemm(
            rows,
            f,
            hid,
            &x,
            (f, 1),
            &theta[s.w4..s.w4 + f * hid],
            (hid, 1),
            T::zero(),
            &mut z4,
            (hid, 1),
        );
        let (xhat4, inv4) = batch_norm(&z4, rows, hid, 1);
        let a4: Vec<T> = xhat4
            .iter()
            .enumerate()
            .map(|(i, v)| (*v + theta[s.beta4 + i % hid]).max(T::zero()))
            .collect();
        let mut z5 = vec![T::zero(); rows * CLASSES];
        for r in 0..rows {
            z5[r * CLASSES..(r + 1) * CLASSES].copy_from_slice(&theta[s.b5..s.b5 + CLASSES]);
        }
        T::gemm(
            rows,
            hid,
            CLASSES,
            &a4,
            (hid, 1),
            &theta[s.w5..s.w5 + hid * CLASSES],
            (CLASSES, 1),
            T::one(),
            &mut z5,
            (CLASSES, 1),
        );
        let inv = T::one() / T::from(rows).unwrap_or_else(T::one);
        let labels = idx.iter().map(|i| self.data.labels[*i] as usize);
        let loss = softmax_cross_entropy(&mut z5, labels);
        let dz5 = z5;
        grad.iter_mut().for_each(|g| *g = T::zero());
        // W5, b5, and the gradient at a4.
        T::gemm(
            hid,
            rows,
            CLASSES,
            &a4,
            (1, hid),
            &dz5,
            (CLASSES, 1),
            T::zero(),
            &mut grad[s.w5..s.w5 + hid * CLASSES],
            (CLASSES, 1),
        );
        for r in 0..rows {
            for j in 0..CLASSES {
                grad[s.b5 + j] = grad[s.b5 + j] + dz5[r * CLASSES + j];
            }
        }
        let mut da4 = vec![T::zero(); rows * hid];
        T::gemm(
            rows,
            CLASSES,
            hid,
            &dz5,
            (CLASSES, 1),
            &theta[s.w5..s.w5 + hid * CLASSES],
            (1, CLASSES),
            T::zero(),
            &mut da4,
            (hid, 1),
        );
        // ReLU, then the shift and batch normalisation of the hidden layer.
        for (i, d) in da4.iter_mut().enumerate() {
            if a4[i] <= T::zero() {
                *d = T::zero();
            }
            grad[s.beta4 + i % hid] = grad[s.beta4 + i % hid] + *d;
        }
        let dz4 = batch_norm_backward(&da4, &xhat4, &inv4, rows, hid, 1);
        T::gemm(
            f,
            rows,
            hid,
            &x,
            (1, f),
            &dz4,
            (hid, 1),
            T::zero(),
            &mut grad[s.w4..s.w4 + f * hid],
            (hid, 1),
        );
        let mut dx = vec![T::zero(); rows * f];
        T::gemm(
            rows,
            hid,
            f,
            &dz4,
            (hid, 1),
            &theta[s.w4..s.w4 + f * hid],
            (1, hid),
            T::zero(),
            &mut dx,
            (f, 1),
        );
        for l in (0..BLOCKS).rev() {
            dx = block_backward(s, l, theta, &records[l], &dx, rows, grad);
        }
        loss * inv
    }
}

/// Batch normalisation without scale or shift over `groups` of `rows × per` values
/// (`[rows, groups, per]` row-major, statistics per group): x̂ and 1/√(σ² + ε).
fn batch_norm<T: Real>(z: &[T], rows: usize, groups: usize, per: usize) -> (Vec<T>, Vec<T>) {
    let m = T::from(rows * per).unwrap_or_else(T::one);
    let eps = T::from(BN_EPS).unwrap_or_else(T::zero);
    let mut xhat = vec![T::zero(); z.len()];
    let mut inv_std = vec![T::zero(); groups];
    for (g, inv_g) in inv_std.iter_mut().enumerate() {
        let planes = || (0..rows).map(|r| &z[(r * groups + g) * per..][..per]);
        let mean = planes().fold(T::zero(), |a, p| p.iter().fold(a, |a, v| a + *v)) / m;
        let var = planes().fold(T::zero(), |a, p| {
            p.iter().fold(a, |a, v| a + (*v - mean) * (*v - mean))
        }) / m;
        let inv = T::one() / (var + eps).sqrt();
        *inv_g = inv;
        for r in 0..rows {
            let at = (r * groups + g) * per;
            for (o, v) in xhat[at..at + per].iter_mut().zip(&z[at..at + per]) {
                *o = (*v - mean) * inv;
            }
        }
    }
    (xhat, inv_std)
}

/// ∂/∂z of batch normalisation given ∂/∂x̂ `dy`: (1/σ̂)(dy − mean(dy) − x̂·mean(dy·x̂)),
/// means per group.
fn batch_norm_backward<T: Real>(
    dy: &[T],
    xhat: &[T],
    inv_std: &[T],
    rows: usize,
    groups: usize,
    per: usize,
) -> Vec<T> {
    let m = T::from(rows * per).unwrap_or_else(T::one);
    let mut dz = vec![T::zero(); dy.len()];
    for (g, inv_g) in inv_std.iter().enumerate() {
        let (mut sum, mut dot) = (T::zero(), T::zero());
        for r in 0..rows {
            let at = (r * groups + g) * per;
            for i in at..at + per {
                sum = sum + dy[i];
                dot = dot + dy[i] * xhat[i];
            }
        }
        let (mean, mean_dot) = (sum / m, dot / m);
        for r in 0..rows {
            let at = (r * groups + g) * per;
            for i in at..at + per {
                dz[i] = *inv_g * (dy[i] - mean - xhat[i] * mean_dot);
            }
        }
    }
    dz
}

/// For kernel offset `k` (0..5) along a side of `n`: the output positions whose input
/// position `o + k − 2` lies inside, as `lo..hi` (input `lo + k − 2 ..`).
fn valid(k: usize, n: usize) -> (usize, usize) {
    let lo = PAD.saturating_sub(k).min(n);
    let hi = (n + PAD).saturating_sub(k).min(n).max(lo);
    (lo, hi)
}

/// The 5×5 patches of one image `[cin, h, w]` as columns: `[cin·25, h·w]`.
fn im2col<T: Real>(x: &[T], cin: usize, (h, w): (usize, usize), cols: &mut [T]) {
    let hw = h * w;
    for ci in 0..cin {
        let plane = &x[ci * hw..][..hw];
        for ky in 0..KERNEL {
            let (ylo, yhi) = valid(ky, h);
            for kx in 0..KERNEL {
                let (xlo, xhi) = valid(kx, w);
                let row = &mut cols[((ci * KERNEL + ky) * KERNEL + kx) * hw..][..hw];
                row[..ylo * w].fill(T::zero());
                row[yhi * w..].fill(T::zero());
                for y in ylo..yhi {
                    let out = &mut row[y * w..(y + 1) * w];
                    let src = (y + ky - PAD) * w;
                    out[..xlo].fill(T::zero());
                    out[xhi..].fill(T::zero());
                    out[xlo..xhi]
                        .copy_from_slice(&plane[src + xlo + kx - PAD..src + xhi + kx - PAD]);
                }
            }
        }
    }
}

/// Adds columns `[cin·25, h·w]` back onto the image they came from (im2col's adjoint).
fn col2im<T: Real>(cols: &[T], cin: usize, (h, w): (usize, usize), x: &mut [T]) {
    let hw = h * w;
    for ci in 0..cin {
        let plane = &mut x[ci * hw..][..hw];
        for ky in 0..KERNEL {
            let (ylo, yhi) = valid(ky, h);
            for kx in 0..KERNEL {
                let (xlo, xhi) = valid(kx, w);
                let row = &cols[((ci * KERNEL + ky) * KERNEL + kx) * hw..][..hw];
                for y in ylo..yhi {
                    let src = (y + ky - PAD) * w;
                    let dst = &mut plane[src + xlo + kx - PAD..src + xhi + kx - PAD];
                    for (d, v) in dst.iter_mut().zip(&row[y * w + xlo..y * w + xhi]) {
                        *d = *d + *v;
                    }
                }
            }
        }
    }
}

/// Block l forward: convolution, batch normalisation, shift, ReLU, pooling; returns its
/// record and the pooled output `[B, ch, ⌊rows/2⌋·⌊cols/2⌋]`.
fn block_forward<T: Real>(
    s: &Shapes,
    l: usize,
    theta: &[T],
    input: Vec<T>,
    rows: usize,
) -> (BlockRecord<T>, Vec<T>) {
    let (cin, ch, (h, w)) = (s.cin[l], s.ch, s.side[l]);
    let hw = h * w;
    let kernel = &theta[s.k[l]..s.k[l] + ch * cin * TAPS];
    let mut z = vec![T::zero(); rows * ch * hw];
    z.par_chunks_mut(ch * hw)
        .zip(input.par_chunks(cin * hw))
        .for_each_init(
            || vec![T::zero(); cin * TAPS * hw],
            |cols, (z, x)| {
                im2col(x, cin, (h, w), cols);
                T::gemm(
                    ch,
                    cin * TAPS,
                    hw,
                    kernel,
                    (cin * TAPS, 1),
                    cols,
                    (hw, 1),
                    T::zero(),
                    z,
                    (hw, 1),
                );
            },
        );
    let (xhat, inv_std) = batch_norm(&z, rows, ch, hw);
    let beta = &theta[s.beta[l]..s.beta[l] + ch];
    let (h2, w2) = (h / 2, w / 2);
    let mut pooled = vec![T::zero(); rows * ch * h2 * w2];
    let mut argmax = vec![0u32; rows * ch * h2 * w2];
    for r in 0..rows {
        for c in 0..ch {
            let plane = &xhat[(r * ch + c) * hw..][..hw];
            let out = (r * ch + c) * h2 * w2;
            for py in 0..h2 {
                for px in 0..w2 {
                    let mut best = (T::neg_infinity(), 0usize);
                    for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                        let at = (2 * py + dy) * w + 2 * px + dx;
                        let v = (plane[at] + beta[c]).max(T::zero());
                        if v > best.0 {
                            best = (v, at);
                        }
                    }
                    pooled[out + py * w2 + px] = best.0;
                    argmax[out + py * w2 + px] = best.1 as u32;
                }
            }
        }
    }
    (
        BlockRecord {
            input,
            xhat,
            inv_std,
            argmax,
        },
        pooled,
    )
}

/// Block l backward from ∂/∂(pooled output): adds ∂K and ∂β to `grad` and returns
/// ∂/∂(block input) (empty for the first block, whose input is the image).
fn block_backward<T: Real>(
    s: &Shapes,
    l: usize,
    theta: &[T],
    rec: &BlockRecord<T>,
    dpooled: &[T],
    rows: usize,
    grad: &mut [T],
) -> Vec<T> {
    let (cin, ch, (h, w)) = (s.cin[l], s.ch, s.side[l]);
    let hw = h * w;
    let p = (h / 2) * (w / 2);
    let beta = &theta[s.beta[l]..s.beta[l] + ch];
    // Pooling routes each gradient to its maximum; ReLU passes it where the shifted x̂ > 0.
    let mut dy = vec![T::zero(); rows * ch * hw];
    for rc in 0..rows * ch {
        for j in 0..p {
            let at = rc * hw + rec.argmax[rc * p + j] as usize;
            if rec.xhat[at] + beta[rc % ch] > T::zero() {
                dy[at] = dy[at] + dpooled[rc * p + j];
            }
        }
    }
    for (rc, plane) in dy.chunks(hw).enumerate() {
        let g = &mut grad[s.beta[l] + rc % ch];
        *g = plane.iter().fold(*g, |a, v| a + *v);
    }
    let dz = batch_norm_backward(&dy, &rec.xhat, &rec.inv_std, rows, ch, hw);
    let kernel = &theta[s.k[l]..s.k[l] + ch * cin * TAPS];
    let first = l == 0;
    let mut dx = if first {
        Vec::new()
    } else {
        vec![T::zero(); rows * cin * hw]
    };
    let kn = ch * cin * TAPS;
    // Each task: its images' ∂K (summed in image order) and their ∂input.
    let tasks = rows.div_ceil(TASK_IMAGES);
    let partial: Vec<(Vec<T>, Vec<T>)> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let images = t * TASK_IMAGES..((t + 1) * TASK_IMAGES).min(rows);
            let mut dk = vec![T::zero(); kn];
            let mut cols = vec![T::zero(); cin * TAPS * hw];
            let mut dxs = vec![T::zero(); if first { 0 } else { images.len() * cin * hw }];
            for (i, r) in images.enumerate() {
                let dzr = &dz[r * ch * hw..][..ch * hw];
                im2col(
                    &rec.input[r * cin * hw..][..cin * hw],
                    cin,
                    (h, w),
                    &mut cols,
                );
                // ∂Kᵀ += cols · ∂zᵀ: the large operand (the patches) is read row by row,
                // which the GEMM packs far faster than the transposed gather of ∂z · colsᵀ.
                T::gemm(
                    cin * TAPS,
                    hw,
                    ch,
                    &cols,
                    (hw, 1),
                    dzr,
                    (1, hw),
                    T::one(),
                    &mut dk,
                    (1, cin * TAPS),
                );
                if !first {
                    T::gemm(
                        cin * TAPS,
                        ch,
                        hw,
                        kernel,
                        (1, cin * TAPS),
                        dzr,
                        (hw, 1),
                        T::zero(),
                        &mut cols,
                        (hw, 1),
                    );
                    col2im(&cols, cin, (h, w), &mut dxs[i * cin * hw..][..cin * hw]);
                }
            }
            (dk, dxs)
        })
        .collect();
    let gk = &mut grad[s.k[l]..s.k[l] + kn];
    for (t, (dk, dxs)) in partial.iter().enumerate() {
        gk.iter_mut().zip(dk).for_each(|(g, v)| *g = *g + *v);
        if !first {
            let at = t * TASK_IMAGES * cin * hw;
            dx[at..at + dxs.len()].copy_from_slice(dxs);
        }
    }
    // The block's input is the previous block's pooled output `[B, cin, rows·cols]`.
    dx
}

impl HostProblem for Conv {
    fn num_coords(&self) -> usize {
        self.theta0.len()
    }

    fn eval(&self, theta: &[f32], step: usize, grad: &mut [f32]) -> f64 {
        self.loss_grad(theta, step, grad) as f64
    }

    fn groups(&self) -> Option<GroupMap> {
        self.spec.two_lstms.then(|| GroupMap {
            groups: vec![
                ("conv", 0..self.shapes.conv_end),
                ("fc", self.shapes.conv_end..self.shapes.total),
            ],
        })
    }
}

#[cfg(test)]
pub(crate) mod tests;
