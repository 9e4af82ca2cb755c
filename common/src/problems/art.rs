//! `art`: the paper's neural art (spec §6, paper §3.4), on the host.
//!
//! θ is an image: `size`×`size` pixels, three channels, `[3, size, size]` planar (channel
//! by channel, each row-major), N = 3·size² (12,288 at 64, 49,152 at 128). The loss,
//! exactly (what every worker computes from a family, its parameters and a seed):
//!
//! **The feature network.** No trained VGG weights can be had here, so the features are
//! those of one layer of random filters at several scales, the construction of
//! Ustyuzhaninov, Brendel, Gatys and Bethge ("What does it take to generate natural
//! textures?", ICLR 2017), who showed that such a network's Gram matrices already
//! generate natural textures. Their multi-scale network has 128 filters at each of eight
//! sizes 3…55; this one keeps four sizes and fewer filters so a trajectory is cheap on two
//! cores:
//!
//! - [`KERNELS`] = 3, 5, 7, 11 (one scale each), [`FILTERS`] = 32 filters per scale.
//! - Scale s's filters `W_s [32, 3, k, k]` (row-major) are drawn in the order of
//!   [`KERNELS`], each value N(0, 1)/√(3k²), from `Rng::new(NET_SEED)` ([`NET_SEED`] =
//!   2017): the same network on every machine, for every instance.
//! - The input is x = θ − ½ ([`CENTRE`]); each scale is a valid convolution (no padding,
//!   stride 1, no bias) and a ReLU: Φ_s(θ) `[32, P_s]`, P_s = (size − k + 1)².
//!
//! **The loss** f(θ) = α·content + β·style + γ·TV ([`ALPHA`], [`BETA`], [`GAMMA`]):
//!
//! - content = Σ (Φ_L(θ) − Φ_L(c))² / (32·P_L) over the largest scale L (k = 11) only,
//!   with c the content crop: it keeps the photograph's larger structures and leaves the
//!   finer ones to the style.
//! - style = ¼ Σ_s Σ (G_s(θ) − G_s(y))² / 32², with the Gram matrices G_s = Φ_s Φ_sᵀ / P_s
//!   `[32, 32]` and y the style image (its own P_s).
//! - TV = Σ over channels and neighbour pairs (vertical and horizontal) of the squared
//!   difference, / (3·size²).
//!
//! **An instance** (`Rng::new(seed)`, draws in this order): which photograph of
//! `content` (uniform), then the crop's top row and left column (uniform over every
//! position that fits), then θ₀ = ½ + 0.1·z per pixel ([`NOISE`]; z ~ N(0, 1), in θ's
//! order). A photograph of h×w pixels is first shrunk by r = max(1, ⌊min(h, w) /
//! (2·size)⌋) (r×r block means, [`Image::reduced`]), so a crop shows the same share of
//! the photograph at every size; the style image is shrunk by the same rule and used
//! whole. Images are named by file (see [`images`](crate::problems::images)); the
//! defaults are scikit-image's sample photographs and its `ihc` texture.
//!
//! Deterministic: the step is ignored. The backward pass is written out by hand; every
//! sum has a fixed order (per output rows in blocks of [`ROWS`]), so the result does not
//! depend on the thread count.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use rayon::prelude::*;

use crate::Error;
use crate::problems::gemm::Real;
use crate::problems::images::{Image, ImageSet, check_name};
use crate::problems::{HostProblem, Params};
use crate::rng::Rng;

/// The filter sides, one scale each.
pub const KERNELS: [usize; 4] = [3, 5, 7, 11];
/// Filters per scale.
pub const FILTERS: usize = 32;
/// The seed of the feature network's filters.
pub const NET_SEED: u64 = 2017;
/// Subtracted from every pixel before the network.
pub const CENTRE: f64 = 0.5;
/// Standard deviation of θ₀'s noise around [`CENTRE`].
pub const NOISE: f64 = 0.1;
/// Weight of the content term.
pub const ALPHA: f64 = 1.0;
/// Weight of the style term.
pub const BETA: f64 = 500.0;
/// Weight of the total variation term.
pub const GAMMA: f64 = 0.1;
/// Smallest image side (the largest filter must leave a few positions).
pub const MIN_SIZE: usize = 16;
/// Largest image side.
pub const MAX_SIZE: usize = 512;
/// Most photographs in `content`.
pub const MAX_CONTENT: usize = 64;
/// Output rows per parallel task: fixed, so sums do not depend on the thread count.
pub const ROWS: usize = 8;
/// The default training photographs (scikit-image's, public domain or CC0; `camera` is grey).
pub const DEFAULT_CONTENT: [&str; 4] = ["astronaut", "camera", "coffee", "rocket"];
/// The default style image (scikit-image's `ihc`, an immunohistochemistry stain).
pub const DEFAULT_STYLE: &str = "ihc";

/// The image size, the photographs and the style of an `art` family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtSpec {
    /// Side of θ's image in pixels.
    pub size: usize,
    /// The photographs instances crop their content from (image names).
    pub content: Vec<String>,
    /// The style image's name.
    pub style: String,
}

impl Default for ArtSpec {
    fn default() -> Self {
        Self {
            size: 64,
            content: DEFAULT_CONTENT.iter().map(|s| s.to_string()).collect(),
            style: DEFAULT_STYLE.to_string(),
        }
    }
}

impl ArtSpec {
    /// Reads `size` ([`MIN_SIZE`]..=[`MAX_SIZE`]), `content` (image names joined by `+`)
    /// and `style` (one image name); refuses other keys.
    pub fn parse(params: &Params) -> Result<Self, Error> {
        let mut a = ArtSpec::default();
        for &(k, v) in params.pairs() {
            match k {
                "size" => {
                    a.size = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (MIN_SIZE..=MAX_SIZE).contains(n))
                        .ok_or_else(|| {
                            params.bad(format!(
                                "size {v:?}: give an image side in {MIN_SIZE}..={MAX_SIZE} \
                                 pixels (the largest filter is {} pixels wide)",
                                KERNELS[KERNELS.len() - 1]
                            ))
                        })?
                }
                "content" => {
                    let names: Vec<String> = v.split('+').map(str::to_string).collect();
                    if names.len() > MAX_CONTENT {
                        return Err(params.bad(format!(
                            "content names {} photographs; at most {MAX_CONTENT}",
                            names.len()
                        )));
                    }
                    for n in &names {
                        check_name(n).map_err(|e| params.bad(e.to_string()))?;
                    }
                    a.content = names;
                }
                "style" => {
                    check_name(v).map_err(|e| params.bad(e.to_string()))?;
                    a.style = v.to_string();
                }
                _ => return Err(params.unknown(k, "size, content, style")),
            }
        }
        Ok(a)
    }

    /// Every parameter, as [`ArtSpec::parse`] reads them back.
    pub fn params(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("size".to_string(), self.size.to_string()),
            ("content".to_string(), self.content.join("+")),
            ("style".to_string(), self.style.clone()),
        ])
    }

    /// `art-64-ihc`, and the photographs when they are not the default ones.
    pub fn name(&self) -> String {
        let mut n = format!("art-{}-{}", self.size, self.style);
        if self.content != ArtSpec::default().content {
            n.push('-');
            n.push_str(&self.content.join("+"));
        }
        n
    }

    /// N, the number of pixels' values.
    pub fn num_coords(&self) -> usize {
        3 * self.size * self.size
    }
}

/// The random filters of every scale, in f64 (drawn once).
pub fn filters() -> &'static [Vec<f64>] {
    static NET: OnceLock<Vec<Vec<f64>>> = OnceLock::new();
    NET.get_or_init(|| {
        let mut rng = Rng::new(NET_SEED);
        KERNELS
            .iter()
            .map(|&k| {
                let scale = 1.0 / ((3 * k * k) as f64).sqrt();
                (0..FILTERS * 3 * k * k)
                    .map(|_| rng.normal() * scale)
                    .collect()
            })
            .collect()
    })
}

/// The shrink factor of a photograph or style image for images of side `size`.
pub fn reduction(image: &Image, size: usize) -> usize {
    (image.height.min(image.width) / (2 * size)).max(1)
}

/// What θ is compared with: the content crop's largest-scale features and the style
/// image's Gram matrices, in f64.
#[derive(Debug)]
struct Targets {
    /// Φ_L(c) in the block layout of [`features`].
    content: Vec<f64>,
    /// G_s(y) `[32, 32]` per scale.
    grams: Vec<Vec<f64>>,
}

/// An `art` instance: a content crop, a style image and θ₀.
#[derive(Debug, Clone)]
pub struct Art {
    /// The family.
    pub spec: ArtSpec,
    /// The photograph the crop came from.
    pub photo: String,
    /// The content crop `[3, size, size]`.
    pub content: Arc<Image>,
    /// The style image, shrunk.
    pub style: Arc<Image>,
    /// θ₀.
    pub theta0: Vec<f32>,
    targets: Arc<Targets>,
}

impl Art {
    /// The instance of `seed`, its images from `images`; refuses images too small for
    /// the size.
    pub fn new(spec: ArtSpec, images: &ImageSet, seed: u64) -> Result<Self, Error> {
        let mut rng = Rng::new(seed);
        if spec.content.is_empty() {
            return Err(Error::Config("art: content names no photograph".into()));
        }
        let photo = spec.content[rng.below(spec.content.len() as u64) as usize].clone();
        let full = images.get(&photo)?;
        let shrunk = full.reduced(reduction(&full, spec.size));
        let (size, h, w) = (spec.size, shrunk.height, shrunk.width);
        if h < size || w < size {
            return Err(Error::Config(format!(
                "art: image {photo:?} is {}×{} pixels; art:size={size} needs at least \
                 {size}×{size}",
                full.width, full.height
            )));
        }
        let y = rng.below((h - size + 1) as u64) as usize;
        let x = rng.below((w - size + 1) as u64) as usize;
        let content = shrunk.crop(y, x, size, size);
        let style_full = images.get(&spec.style)?;
        let style = style_full.reduced(reduction(&style_full, size));
        Self::from_images(spec, photo, content, style, rng)
    }

    /// The instance with this content crop and (shrunk) style image, θ₀ drawn from `rng`.
    pub fn from_images(
        spec: ArtSpec,
        photo: String,
        content: Image,
        style: Image,
        mut rng: Rng,
    ) -> Result<Self, Error> {
        let size = spec.size;
        if (content.height, content.width) != (size, size) {
            return Err(Error::Shape(format!(
                "art: a content crop of {}×{} for size {size}",
                content.height, content.width
            )));
        }
        if style.height.min(style.width) < MIN_SIZE {
            return Err(Error::Config(format!(
                "art: style image {:?} is {}×{} pixels after shrinking; it needs at least \
                 {MIN_SIZE}×{MIN_SIZE}",
                spec.style, style.width, style.height
            )));
        }
        let theta0 = (0..spec.num_coords())
            .map(|_| (CENTRE + NOISE * rng.normal()) as f32)
            .collect();
        let to64 =
            |i: &Image| -> Vec<f64> { i.pixels.iter().map(|v| *v as f64 - CENTRE).collect() };
        let net = filters();
        let last = KERNELS.len() - 1;
        let c = to64(&content);
        let y = to64(&style);
        let targets = Targets {
            content: features(&net[last], KERNELS[last], &c, (size, size)),
            grams: (0..KERNELS.len())
                .map(|s| {
                    let (hs, ws) = (style.height, style.width);
                    let phi = features(&net[s], KERNELS[s], &y, (hs, ws));
                    gram(&phi, KERNELS[s], (hs, ws))
                })
                .collect(),
        };
        Ok(Self {
            spec,
            photo,
            content: Arc::new(content),
            style: Arc::new(style),
            theta0,
            targets: Arc::new(targets),
        })
    }

    /// The content target Φ_L(c) `[32, P_L]` row-major, for device copies.
    pub fn content_features(&self) -> Vec<f64> {
        let k = KERNELS[KERNELS.len() - 1];
        let (ho, wo) = (self.spec.size - k + 1, self.spec.size - k + 1);
        let blocks = &self.targets.content;
        let mut out = vec![0f64; FILTERS * ho * wo];
        for (b, y0) in (0..ho).step_by(ROWS).enumerate() {
            let n = (ROWS.min(ho - y0)) * wo;
            let block = &blocks[FILTERS * b * ROWS * wo..][..FILTERS * n];
            for f in 0..FILTERS {
                for i in 0..n {
                    out[f * ho * wo + y0 * wo + i] = block[f * n + i];
                }
            }
        }
        out
    }

    /// The style targets G_s(y) `[32, 32]`, one per scale.
    pub fn style_grams(&self) -> &[Vec<f64>] {
        &self.targets.grams
    }

    /// The three terms (content, style, TV) at θ, unweighted.
    pub fn terms<T: Real>(&self, theta: &[T]) -> [T; 3] {
        let mut g = vec![T::zero(); theta.len()];
        self.evaluate(theta, &mut g).1
    }

    /// f(θ), writing ∇f(θ) into `grad`.
    pub fn loss_grad<T: Real>(&self, theta: &[T], grad: &mut [T]) -> T {
        self.evaluate(theta, grad).0
    }

    fn evaluate<T: Real>(&self, theta: &[T], grad: &mut [T]) -> (T, [T; 3]) {
        let num = |v: f64| T::from(v).unwrap_or_else(T::zero);
        let size = self.spec.size;
        let hw = (size, size);
        let x: Vec<T> = theta.iter().map(|v| *v - num(CENTRE)).collect();
        let net = filters();
        let last = KERNELS.len() - 1;
        let nf = FILTERS as f64;
        let scales = 1.0 / KERNELS.len() as f64;
        let mut dx = vec![T::zero(); x.len()];
        let mut style = T::zero();
        let mut content = T::zero();
        for (s, &k) in KERNELS.iter().enumerate() {
            let w: Vec<T> = net[s].iter().map(|v| num(*v)).collect();
            let phi = features(&w, k, &x, hw);
            let p = positions(k, hw);
            // style: Σ (G − Gy)² / (4 F²); ∂/∂G = 2 (G − Gy) / (4 F²), ∂/∂Φ = 2 ∂G Φ / P.
            let g = gram(&phi, k, hw);
            let mut dg = vec![T::zero(); FILTERS * FILTERS];
            let mut sum = T::zero();
            for ((d, a), b) in dg.iter_mut().zip(&g).zip(&self.targets.grams[s]) {
                let diff = *a - num(*b);
                sum = sum + diff * diff;
                *d = diff * num(BETA * 2.0 * scales / (nf * nf) / p as f64);
            }
            style = style + sum * num(scales / (nf * nf));
            let mut dphi = gram_back(&dg, &phi, k, hw);
            if s == last {
                let scale = num(1.0 / (nf * p as f64));
                let mut sum = T::zero();
                for ((d, a), b) in dphi.iter_mut().zip(&phi).zip(&self.targets.content) {
                    let diff = *a - num(*b);
                    sum = sum + diff * diff;
                    *d = *d + num(2.0 * ALPHA) * scale * diff;
                }
                content = sum * scale;
            }
            // Through the ReLU: Φ > 0 exactly where the pre-activation was.
            dphi.iter_mut().zip(&phi).for_each(|(d, v)| {
                if *v <= T::zero() {
                    *d = T::zero();
                }
            });
            features_back(&w, k, &dphi, hw, &mut dx);
        }
        let tv = total_variation(theta, size, &mut dx, num(GAMMA));
        grad.copy_from_slice(&dx);
        let f = num(ALPHA) * content + num(BETA) * style + num(GAMMA) * tv;
        (f, [content, style, tv])
    }
}

/// P, the output positions of a valid k×k convolution of an h×w image.
fn positions(k: usize, (h, w): (usize, usize)) -> usize {
    (h - k + 1) * (w - k + 1)
}

/// The output rows of each parallel block: `(first row, rows)`.
fn blocks(k: usize, h: usize) -> impl Iterator<Item = (usize, usize)> {
    let ho = h - k + 1;
    (0..ho).step_by(ROWS).map(move |y0| (y0, ROWS.min(ho - y0)))
}

/// Φ = ReLU(W ∗ x) for one scale (W `[32, 3, k, k]`, x `[3, h, w]`), in blocks of
/// [`ROWS`] output rows: block b holds `[32, rows_b · wo]`, blocks one after another.
fn features<T: Real>(w: &[T], k: usize, x: &[T], (h, wd): (usize, usize)) -> Vec<T> {
    let wo = wd - k + 1;
    let taps = 3 * k * k;
    let mut out = vec![T::zero(); FILTERS * positions(k, (h, wd))];
    out.par_chunks_mut(FILTERS * ROWS * wo)
        .zip(blocks(k, h).collect::<Vec<_>>())
        .for_each(|(z, (y0, rows))| {
            let n = rows * wo;
            let mut cols = vec![T::zero(); taps * n];
            im2col(x, k, (h, wd), y0, rows, &mut cols);
            T::gemm(
                FILTERS,
                taps,
                n,
                w,
                (taps, 1),
                &cols,
                (n, 1),
                T::zero(),
                z,
                (n, 1),
            );
            z.iter_mut().for_each(|v| *v = v.max(T::zero()));
        });
    out
}

/// The k×k patches of output rows `y0 .. y0 + rows` of x `[3, h, w]` as columns
/// `[3·k·k, rows · wo]`.
fn im2col<T: Real>(
    x: &[T],
    k: usize,
    (h, w): (usize, usize),
    y0: usize,
    rows: usize,
    cols: &mut [T],
) {
    let wo = w - k + 1;
    let n = rows * wo;
    for c in 0..3 {
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut cols[((c * k + ky) * k + kx) * n..][..n];
                for r in 0..rows {
                    let src = (c * h + y0 + r + ky) * w + kx;
                    row[r * wo..(r + 1) * wo].copy_from_slice(&x[src..src + wo]);
                }
            }
        }
    }
}

/// Adds ∂/∂x of one scale to `dx` from ∂/∂(pre-activation) `dz` (block layout).
fn features_back<T: Real>(w: &[T], k: usize, dz: &[T], (h, wd): (usize, usize), dx: &mut [T]) {
    let wo = wd - k + 1;
    let taps = 3 * k * k;
    let parts: Vec<(usize, Vec<T>)> = dz
        .par_chunks(FILTERS * ROWS * wo)
        .zip(blocks(k, h).collect::<Vec<_>>())
        .map(|(dzb, (y0, rows))| {
            let n = rows * wo;
            let mut cols = vec![T::zero(); taps * n];
            T::gemm(
                taps,
                FILTERS,
                n,
                w,
                (1, taps),
                dzb,
                (n, 1),
                T::zero(),
                &mut cols,
                (n, 1),
            );
            // col2im: the rows y0 .. y0 + rows + k − 1 this block's patches touch.
            let span = rows + k - 1;
            let mut part = vec![T::zero(); 3 * span * wd];
            for c in 0..3 {
                for ky in 0..k {
                    for kx in 0..k {
                        let row = &cols[((c * k + ky) * k + kx) * n..][..n];
                        for r in 0..rows {
                            let dst = &mut part[(c * span + r + ky) * wd + kx..][..wo];
                            for (d, v) in dst.iter_mut().zip(&row[r * wo..(r + 1) * wo]) {
                                *d = *d + *v;
                            }
                        }
                    }
                }
            }
            (y0, part)
        })
        .collect();
    for (y0, part) in parts {
        let span = part.len() / (3 * wd);
        for c in 0..3 {
            let src = &part[c * span * wd..(c + 1) * span * wd];
            let dst = &mut dx[(c * h + y0) * wd..][..span * wd];
            dst.iter_mut().zip(src).for_each(|(d, v)| *d = *d + *v);
        }
    }
}

/// G = Φ Φᵀ / P `[32, 32]` of one scale's features (block layout), summed block by
/// block in order.
fn gram<T: Real>(phi: &[T], k: usize, (h, w): (usize, usize)) -> Vec<T> {
    let wo = w - k + 1;
    let mut g = vec![T::zero(); FILTERS * FILTERS];
    let mut at = 0;
    for (_, rows) in blocks(k, h) {
        let n = rows * wo;
        let b = &phi[at..at + FILTERS * n];
        T::gemm(
            FILTERS,
            n,
            FILTERS,
            b,
            (n, 1),
            b,
            (1, n),
            T::one(),
            &mut g,
            (FILTERS, 1),
        );
        at += FILTERS * n;
    }
    let inv = T::one() / T::from(positions(k, (h, w))).unwrap_or_else(T::one);
    g.iter_mut().for_each(|v| *v = *v * inv);
    g
}

/// ∂/∂Φ = (∂G + ∂Gᵀ) Φ / P = 2 ∂G Φ / P for a symmetric ∂G (`dg`, already divided by P),
/// block by block.
fn gram_back<T: Real>(dg: &[T], phi: &[T], k: usize, (h, w): (usize, usize)) -> Vec<T> {
    let wo = w - k + 1;
    let mut out = vec![T::zero(); phi.len()];
    let two = T::one() + T::one();
    let dg2: Vec<T> = dg.iter().map(|v| *v * two).collect();
    let mut at = 0;
    for (_, rows) in blocks(k, h) {
        let n = rows * wo;
        T::gemm(
            FILTERS,
            FILTERS,
            n,
            &dg2,
            (FILTERS, 1),
            &phi[at..at + FILTERS * n],
            (n, 1),
            T::zero(),
            &mut out[at..at + FILTERS * n],
            (n, 1),
        );
        at += FILTERS * n;
    }
    out
}

/// TV: the squared differences of vertical and horizontal neighbours over 3·size²; adds
/// `gamma` · ∂TV/∂θ to `dx`.
fn total_variation<T: Real>(theta: &[T], size: usize, dx: &mut [T], gamma: T) -> T {
    let scale = T::one() / T::from(3 * size * size).unwrap_or_else(T::one);
    let two = T::one() + T::one();
    let mut sum = T::zero();
    for c in 0..3 {
        for y in 0..size {
            for x in 0..size {
                let i = (c * size + y) * size + x;
                for j in [
                    (y + 1 < size).then_some(i + size),
                    (x + 1 < size).then_some(i + 1),
                ]
                .into_iter()
                .flatten()
                {
                    let d = theta[j] - theta[i];
                    sum = sum + d * d;
                    let g = gamma * two * scale * d;
                    dx[j] = dx[j] + g;
                    dx[i] = dx[i] - g;
                }
            }
        }
    }
    sum * scale
}

impl HostProblem for Art {
    fn num_coords(&self) -> usize {
        self.theta0.len()
    }

    fn eval(&self, theta: &[f32], _step: usize, grad: &mut [f32]) -> f64 {
        self.loss_grad(theta, grad) as f64
    }
}

#[cfg(test)]
pub(crate) mod tests;
