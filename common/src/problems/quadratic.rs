//! The paper's quadratic functions (spec §3.1): f_b(θ_b) = ||W_b θ_b − y_b||².

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::{DType, Device, Tensor};

use crate::Error;
use crate::files::{NamedTensor, TensorFile, encode, write_atomic};
use crate::problems::{HostProblem, MAX_VALUES, Params, Problem};
use crate::rng::Rng;
use crate::tensor::from_f32;

/// The family's hyper-parameters: `quadratic:batch=128,dims=10`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuadraticSpec {
    /// B, the number of independent functions.
    pub batch: usize,
    /// d, the dimension of each.
    pub dims: usize,
}

impl Default for QuadraticSpec {
    fn default() -> Self {
        Self {
            batch: 128,
            dims: 10,
        }
    }
}

impl QuadraticSpec {
    /// Reads `batch` and `dims` (defaults 128 and 10); refuses others and sizes beyond
    /// [`MAX_VALUES`].
    pub fn parse(params: &Params) -> Result<Self, Error> {
        let mut q = Self::default();
        for &(k, v) in params.pairs() {
            match k {
                "batch" => q.batch = params.count(v)?,
                "dims" => q.dims = params.count(v)?,
                _ => return Err(params.unknown(k, "batch, dims")),
            }
        }
        // W holds batch · dims² values.
        if (q.batch as u128) * (q.dims as u128) * (q.dims as u128) > MAX_VALUES as u128 {
            return Err(params.bad(format!(
                "batch {} × dims {}² values; at most {MAX_VALUES}",
                q.batch, q.dims
            )));
        }
        Ok(q)
    }

    /// Every parameter, as [`QuadraticSpec::parse`] reads them.
    pub fn params(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("batch".to_string(), self.batch.to_string()),
            ("dims".to_string(), self.dims.to_string()),
        ])
    }

    /// `quadratic-128x10`.
    pub fn name(&self) -> String {
        format!("quadratic-{}x{}", self.batch, self.dims)
    }

    /// The instance drawn from `seed`.
    pub fn instance(&self, seed: u64) -> Result<Quadratic, Error> {
        Quadratic::from_seed(seed, self.batch, self.dims)
    }
}

/// A batch of B quadratics in d dimensions, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Quadratic {
    /// B, the number of independent functions.
    pub batch: usize,
    /// d, the dimension of each.
    pub dims: usize,
    /// W, `[B, d, d]` row-major.
    pub w: Vec<f32>,
    /// y, `[B, d]`.
    pub y: Vec<f32>,
    /// θ_0, `[B, d]`.
    pub theta0: Vec<f32>,
}

impl Quadratic {
    /// Draws an instance from `seed` with [`crate::rng`]: all of W row-major, then y,
    /// then θ_0, entries N(0, 1) for W and y and N(0, 0.01²) for θ_0.
    pub fn from_seed(seed: u64, batch: usize, dims: usize) -> Result<Self, Error> {
        if batch == 0 || dims == 0 {
            return Err(Error::Config(format!(
                "a quadratic needs batch ≥ 1 and dims ≥ 1, got batch {batch}, dims {dims}"
            )));
        }
        let mut rng = Rng::new(seed);
        let mut draw = |n: usize, scale: f64| -> Vec<f32> {
            (0..n).map(|_| (scale * rng.normal()) as f32).collect()
        };
        let w = draw(batch * dims * dims, 1.0);
        let y = draw(batch * dims, 1.0);
        let theta0 = draw(batch * dims, 0.01);
        Ok(Self {
            batch,
            dims,
            w,
            y,
            theta0,
        })
    }

    /// N = B·d.
    pub fn num_coords(&self) -> usize {
        self.batch * self.dims
    }

    /// Reads a problem file (spec §4.2).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let mut file = TensorFile::read(path)?;
        let kind = file.meta("problem")?;
        if kind != "quadratic" {
            return Err(Error::format(
                path,
                format!("problem {kind:?} is not a quadratic problem file"),
            ));
        }
        // B and d come from w's shape; y and θ_0 must agree with it.
        let shape = file
            .shape("w")
            .ok_or_else(|| Error::format(path, "tensor \"w\" is missing"))?
            .to_vec();
        let &[batch, dims, dims2] = shape.as_slice() else {
            return Err(Error::format(
                path,
                format!("tensor \"w\" has shape {shape:?}, expected [B, d, d]"),
            ));
        };
        if dims != dims2 || batch == 0 || dims == 0 {
            return Err(Error::format(
                path,
                format!("tensor \"w\" has shape {shape:?}, expected [B, d, d]"),
            ));
        }
        let w = file.take("w", &[batch, dims, dims])?;
        let y = file.take("y", &[batch, dims])?;
        let theta0 = file.take("theta0", &[batch, dims])?;
        file.expect_no_more("a quadratic problem file")?;
        Ok(Self {
            batch,
            dims,
            w,
            y,
            theta0,
        })
    }

    /// Writes a problem file (spec §4.2) atomically.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let (b, d) = (self.batch, self.dims);
        let (s3, s2) = ([b, d, d], [b, d]);
        let tensors: [NamedTensor<'_>; 3] = [
            ("w", &s3, &self.w),
            ("y", &s2, &self.y),
            ("theta0", &s2, &self.theta0),
        ];
        let meta = HashMap::from([("problem".to_string(), "quadratic".to_string())]);
        write_atomic(path, &encode(&tensors, meta)?)
    }

    /// θ_0 as a column `[N, 1]`.
    pub fn theta0(&self, device: &Device, dtype: DType) -> Tensor<2> {
        from_f32(&self.theta0, [self.num_coords(), 1], device, dtype)
    }

    /// The instance on `device`, ready for an unroll.
    pub fn on(&self, device: &Device, dtype: DType) -> QuadraticOn {
        let (b, d) = (self.batch, self.dims);
        QuadraticOn {
            batch: b,
            dims: d,
            w: from_f32(&self.w, [b, d, d], device, dtype),
            y: from_f32(&self.y, [b, d, 1], device, dtype),
        }
    }
}

/// A quadratic instance's W and y as tensors on a device.
#[derive(Debug, Clone)]
pub struct QuadraticOn {
    batch: usize,
    dims: usize,
    w: Tensor<3>,
    y: Tensor<3>,
}

impl QuadraticOn {
    /// W θ − y per function, `[B, d, 1]`.
    fn residual(&self, w: Tensor<3>, y: Tensor<3>, theta: Tensor<2>) -> Tensor<3> {
        w.matmul(theta.reshape([self.batch, self.dims, 1])) - y
    }
}

impl Problem for QuadraticOn {
    fn num_coords(&self) -> usize {
        self.batch * self.dims
    }

    /// f(θ) = (1/B) Σ_b ||W_b θ_b − y_b||².
    fn loss(&self, theta: Tensor<2>, _step: usize) -> Tensor<1> {
        let r = self.residual(self.w.clone(), self.y.clone(), theta);
        r.square().sum().div_scalar(self.batch as f64)
    }

    /// Closed form ∇_{θ_b} f = (2/B) W_bᵀ (W_b θ_b − y_b), computed off the autodiff graph.
    fn grad(&self, theta: Tensor<2>, _step: usize) -> Tensor<2> {
        let w = self.w.clone().inner();
        let r = self.residual(w.clone(), self.y.clone().inner(), theta.inner());
        w.transpose()
            .matmul(r)
            .mul_scalar(2.0 / self.batch as f64)
            .reshape([self.num_coords(), 1])
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::to_f64;

    #[test]
    fn host_loss_and_gradient_by_hand_are_batch_means() {
        // B = 2, d = 2. First: W = [[1, 2], [3, 4]], y = [1, 1], θ = [1, −1]: r = [−2, −2],
        // ||r||² = 8, Wᵀr = [−8, −12]. Second: W = I, y = 0, θ = [1, 1]: ||r||² = 2,
        // Wᵀr = [1, 1]. f = (8 + 2) / 2 = 5 (a sum would be 10), ∇ = (2/B) Wᵀr.
        let q = Quadratic {
            batch: 2,
            dims: 2,
            w: vec![1.0, 2.0, 3.0, 4.0, 1.0, 0.0, 0.0, 1.0],
            y: vec![1.0, 1.0, 0.0, 0.0],
            theta0: vec![1.0, -1.0, 1.0, 1.0],
        };
        let mut g = [0f32; 4];
        assert_eq!(q.eval(&q.theta0, 0, &mut g), 5.0);
        assert_eq!(g, [-8.0, -12.0, 1.0, 1.0]);
    }

    #[test]
    fn seeded_instances_are_reproducible_and_scaled() {
        let a = Quadratic::from_seed(11, 128, 10).unwrap();
        assert_eq!(a, Quadratic::from_seed(11, 128, 10).unwrap());
        assert_ne!(a.w, Quadratic::from_seed(12, 128, 10).unwrap().w);
        let std = |v: &[f32]| {
            (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
        };
        // 12,800 N(0,1) draws: the sample std is within a few 1/sqrt(2n) ≈ 0.006 of 1.
        assert!((std(&a.w) - 1.0).abs() < 0.03, "{}", std(&a.w));
        assert!((std(&a.theta0) - 0.01).abs() < 0.002, "{}", std(&a.theta0));
    }

    #[test]
    fn closed_form_gradient_matches_autodiff() {
        let q = Quadratic::from_seed(5, 4, 3).unwrap();
        let dev = Device::flex().autodiff();
        let p = q.on(&dev, DType::F64);
        let theta = q.theta0(&dev, DType::F64).add_scalar(0.3).require_grad();
        let grads = p.loss(theta.clone(), 0).backward();
        let auto = to_f64(&theta.grad(&grads).unwrap()).unwrap();
        let closed = to_f64(&p.grad(theta, 0)).unwrap();
        for (a, c) in auto.iter().zip(&closed) {
            assert!((a - c).abs() <= 1e-12 * (1.0 + a.abs()), "{a} vs {c}");
        }
    }

    #[test]
    fn loss_by_hand() {
        // B = 1, d = 2: W = [[1, 2], [3, 4]], y = [1, 1], θ = [1, -1]:
        // Wθ − y = [-1 - 1, -1 - 1] = [-2, -2], f = 8; ∇ = 2 Wᵀ r = 2·[-8, -12] = [-16, -24].
        let q = Quadratic {
            batch: 1,
            dims: 2,
            w: vec![1.0, 2.0, 3.0, 4.0],
            y: vec![1.0, 1.0],
            theta0: vec![1.0, -1.0],
        };
        let dev = Device::flex();
        let p = q.on(&dev, DType::F64);
        let theta = q.theta0(&dev, DType::F64);
        assert_eq!(to_f64(&p.loss(theta.clone(), 0)).unwrap(), vec![8.0]);
        assert_eq!(to_f64(&p.grad(theta, 0)).unwrap(), vec![-16.0, -24.0]);
    }

    #[test]
    fn file_round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.safetensors");
        let q = Quadratic::from_seed(1, 3, 2).unwrap();
        q.save(&path).unwrap();
        assert_eq!(Quadratic::load(&path).unwrap(), q);
        let mut bad = q.clone();
        bad.y.pop();
        assert!(
            bad.save(&path).is_err(),
            "a y of the wrong size cannot be written"
        );
    }
}
