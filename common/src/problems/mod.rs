//! Optimizee problems: the functions the learned optimizer trains on (spec §3).
//!
//! Each family lives whole in its module: its hyper-parameters and their parsing, its
//! instances on the host ([`HostProblem`], for the fused kernels, the baselines and
//! evaluation) and on a burn device ([`Problem`]), and its data. [`ProblemSpec`] is the
//! registry: the worker, `eval` and the coordinator's sampler reach every family through
//! it, so adding a family is a new module and one variant (with its match arms) here.

pub mod art;
pub mod art_on;
pub mod cifar;
pub mod conv;
pub mod conv_on;
pub mod gemm;
pub mod images;
pub mod mlp;
pub mod mlp_on;
pub mod mnist;
pub mod quadratic;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::tensor::{DType, Device, Tensor};

use crate::Error;
use crate::groups::GroupMap;
use mnist::{Dataset, Split};

pub use art::{Art, ArtSpec};
pub use conv::{Conv, ConvSpec};
pub use conv_on::ConvOn;
pub use mlp::{Activation, Mlp, MlpSpec};
pub use mlp_on::{DatasetOn, MlpOn};
pub use quadratic::{Quadratic, QuadraticSpec};

/// An optimizee on a device: its loss and its gradient at step t.
///
/// θ is a column `[N, 1]` of all coordinates. Step t selects the minibatch B_t for
/// stochastic problems; deterministic ones ignore it.
pub trait Problem {
    /// N, the number of coordinates the optimizer sees.
    fn num_coords(&self) -> usize;

    /// f_t(θ) as a one-element tensor, differentiable with respect to θ.
    fn loss(&self, theta: Tensor<2>, step: usize) -> Tensor<1>;

    /// ∇f_t(θ) `[N, 1]`, a constant: no autodiff graph reaches back through it.
    fn grad(&self, theta: Tensor<2>, step: usize) -> Tensor<2>;
}

/// An optimizee on the host: loss and gradient on f32 values (the fused kernels, the
/// baselines and evaluation use it).
pub trait HostProblem: Sync {
    /// N, the number of coordinates.
    fn num_coords(&self) -> usize;
    /// f_t(θ), writing ∇f_t(θ) into `grad`.
    fn eval(&self, theta: &[f32], step: usize, grad: &mut [f32]) -> f64;

    /// Which coordinates each parameter group holds (spec §5); `None`: no groups.
    fn groups(&self) -> Option<GroupMap> {
        None
    }
}

/// Largest count in a problem spec (a batch, a dimension, a layer width).
pub const MAX_COUNT: usize = 1 << 20;
/// Largest number of values a problem's parameters or data may need (1 GiB of f32).
pub const MAX_VALUES: usize = 1 << 28;
/// Largest number of hidden layers of an `mlp` problem.
pub const MAX_MLP_LAYERS: usize = 16;

/// A family's hyper-parameters as given (`key=value` pairs), for its parser.
pub struct Params<'a> {
    family: &'a str,
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Params<'a> {
    /// The pairs in order.
    pub fn pairs(&self) -> &[(&'a str, &'a str)] {
        &self.pairs
    }

    /// A refusal naming the family.
    pub fn bad(&self, why: String) -> Error {
        Error::Config(format!("problem {:?}: {why}", self.family))
    }

    /// `v` as a count in 1..=[`MAX_COUNT`].
    pub fn count(&self, v: &str) -> Result<usize, Error> {
        v.parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_COUNT).contains(n))
            .ok_or_else(|| self.bad(format!("{v:?} is not a count in 1..={MAX_COUNT}")))
    }

    /// The refusal of an unknown key, listing the known ones.
    pub fn unknown(&self, key: &str, known: &str) -> Error {
        self.bad(format!(
            "unknown {} parameter {key:?} ({known})",
            self.family
        ))
    }
}

/// A problem family with its hyper-parameters: the registry of families. Written on the
/// command line as `quadratic`, `mlp`, `mlp:hidden=40`, `mlp:hidden=20x20,act=relu`,
/// `conv`, `conv:labels=0-4`, …
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemSpec {
    /// B quadratics of d dimensions (spec §3.1).
    Quadratic(QuadraticSpec),
    /// The MNIST network or a variant (spec §3.2).
    Mlp(MlpSpec),
    /// The paper's CIFAR-10 network (spec §6).
    Conv(ConvSpec),
    /// The paper's neural art: θ is an image (spec §6).
    Art(ArtSpec),
}

/// The names of the registered families.
pub const FAMILIES: [&str; 4] = ["quadratic", "mlp", "conv", "art"];

impl ProblemSpec {
    /// The family with its `params` (each family's defaults fill the rest).
    pub fn from_parts<'a>(
        family: &'a str,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, Error> {
        let params = Params {
            family,
            pairs: params.into_iter().collect(),
        };
        match family {
            "quadratic" => QuadraticSpec::parse(&params).map(ProblemSpec::Quadratic),
            "mlp" => MlpSpec::parse(&params).map(ProblemSpec::Mlp),
            "conv" => ConvSpec::parse(&params).map(ProblemSpec::Conv),
            "art" => ArtSpec::parse(&params).map(ProblemSpec::Art),
            _ => Err(params.bad(format!(
                "unknown family; use one of {}",
                FAMILIES.join(", ")
            ))),
        }
    }

    /// The family's name, as on the wire.
    pub fn family(&self) -> &'static str {
        match self {
            ProblemSpec::Quadratic(_) => "quadratic",
            ProblemSpec::Mlp(_) => "mlp",
            ProblemSpec::Conv(_) => "conv",
            ProblemSpec::Art(_) => "art",
        }
    }

    /// Every hyper-parameter, as `from_parts` reads them back.
    pub fn params(&self) -> BTreeMap<String, String> {
        match self {
            ProblemSpec::Quadratic(q) => q.params(),
            ProblemSpec::Mlp(m) => m.params(),
            ProblemSpec::Conv(c) => c.params(),
            ProblemSpec::Art(a) => a.params(),
        }
    }

    /// A short name for tables and file names.
    pub fn name(&self) -> String {
        match self {
            ProblemSpec::Quadratic(q) => q.name(),
            ProblemSpec::Mlp(m) => m.name(),
            ProblemSpec::Conv(c) => c.name(),
            ProblemSpec::Art(a) => a.name(),
        }
    }

    /// The parameter groups the family's instances have (spec §5), in φ's order; `None`
    /// for a family whose parameters all share one LSTM.
    pub fn groups(&self) -> Option<Vec<&'static str>> {
        match self {
            ProblemSpec::Quadratic(_) | ProblemSpec::Mlp(_) | ProblemSpec::Art(_) => None,
            ProblemSpec::Conv(c) => c.groups(),
        }
    }

    /// Refuses (spec §5) a φ with groups `phi` (`None`: one group) that are not this
    /// family's, naming both.
    pub fn check_phi(&self, phi: Option<&[&str]>) -> Result<(), Error> {
        let who = format!("problem {self}");
        crate::groups::check_groups(phi, self.groups().as_deref(), &who)
    }

    /// Whether instances need data (`--data`: a data set, or images for `art`).
    pub fn needs_data(&self) -> bool {
        match self {
            ProblemSpec::Quadratic(_) => false,
            ProblemSpec::Mlp(_) | ProblemSpec::Conv(_) | ProblemSpec::Art(_) => true,
        }
    }

    /// The instance drawn from `seed`, its data (if any) from `data`.
    pub fn instance(&self, seed: u64, data: &mut DataSource) -> Result<Optimizee, Error> {
        Ok(match self {
            ProblemSpec::Quadratic(q) => Optimizee::Quadratic(q.instance(seed)?),
            ProblemSpec::Mlp(m) => Optimizee::Mlp(Mlp::new(m.clone(), data.get()?, seed)?),
            ProblemSpec::Conv(c) => Optimizee::Conv(Conv::new(c.clone(), data.get()?, seed)?),
            ProblemSpec::Art(a) => Optimizee::Art(Art::new(a.clone(), &data.images(), seed)?),
        })
    }

    /// Whether instances read images (`art`) rather than a data set.
    pub fn reads_images(&self) -> bool {
        matches!(self, ProblemSpec::Art(_))
    }
}

impl std::str::FromStr for ProblemSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |why: String| Error::Config(format!("problem {s:?}: {why}"));
        let (family, params) = s.split_once(':').unwrap_or((s, ""));
        let pairs: Vec<(&str, &str)> = params
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.split_once('=')
                    .ok_or_else(|| bad(format!("{p:?} is not key=value")))
            })
            .collect::<Result<_, _>>()?;
        ProblemSpec::from_parts(family, pairs).map_err(|e| bad(e.to_string()))
    }
}

impl std::fmt::Display for ProblemSpec {
    /// `family:key=value,...`, every parameter written out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let params: Vec<String> = self
            .params()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        write!(f, "{}:{}", self.family(), params.join(","))
    }
}

/// A problem instance, on the host.
// One per trajectory, moved a few times: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Optimizee {
    /// A batch of quadratics.
    Quadratic(Quadratic),
    /// An MNIST network.
    Mlp(Mlp),
    /// A convolutional network.
    Conv(Conv),
    /// An image to stylise.
    Art(Art),
}

impl Optimizee {
    /// The instance on the host.
    pub fn host(&self) -> &(dyn HostProblem + Send) {
        match self {
            Optimizee::Quadratic(q) => q,
            Optimizee::Mlp(m) => m,
            Optimizee::Conv(c) => c,
            Optimizee::Art(a) => a,
        }
    }

    /// θ₀.
    pub fn theta0(&self) -> &[f32] {
        match self {
            Optimizee::Quadratic(q) => &q.theta0,
            Optimizee::Mlp(m) => &m.theta0,
            Optimizee::Conv(c) => &c.theta0,
            Optimizee::Art(a) => &a.theta0,
        }
    }

    /// The instance on `dev` in float32, its data copied there through `cache`.
    pub fn on(&self, dev: &Device, cache: &DeviceData) -> Box<dyn Problem + Send> {
        match self {
            Optimizee::Quadratic(q) => Box::new(q.on(dev, DType::F32)),
            Optimizee::Mlp(m) => Box::new(m.on(&cache.get(&m.data, dev))),
            Optimizee::Conv(c) => Box::new(c.on(&cache.get(&c.data, dev))),
            Optimizee::Art(a) => Box::new(a.on(dev)),
        }
    }
}

/// Where instances find their data: a directory of MNIST-format IDX files or of CIFAR-10
/// binary files ([`cifar`], chosen when `data_batch_1.bin` or `test_batch.bin` is there),
/// loaded once on first use; for `art`, a directory of images ([`images`]), each read
/// when an instance first names it.
#[derive(Debug, Clone)]
pub struct DataSource {
    dir: PathBuf,
    split: Split,
    loaded: Option<Arc<Dataset>>,
    images: Option<Arc<images::ImageSet>>,
}

impl DataSource {
    /// The `split` of the data in `dir`, not loaded yet.
    pub fn new(dir: &Path, split: Split) -> Self {
        Self {
            dir: dir.to_path_buf(),
            split,
            loaded: None,
            images: None,
        }
    }

    /// The directory's images (the same for both splits: `art` families name their
    /// held-out photographs).
    pub fn images(&mut self) -> Arc<images::ImageSet> {
        self.images
            .get_or_insert_with(|| Arc::new(images::ImageSet::new(&self.dir)))
            .clone()
    }

    /// The data set, loaded on the first call.
    pub fn get(&mut self) -> Result<Arc<Dataset>, Error> {
        if let Some(d) = &self.loaded {
            return Ok(d.clone());
        }
        let d = if cifar::is_cifar_dir(&self.dir) {
            cifar::load(&self.dir, self.split)?
        } else {
            Dataset::load(&self.dir, self.split)?
        };
        let d = Arc::new(d);
        self.loaded = Some(d.clone());
        Ok(d)
    }

    /// Whether the data was loaded already.
    pub fn is_loaded(&self) -> bool {
        self.loaded.is_some() || self.images.is_some()
    }
}

/// The last data set put on a device, shared by every instance that uses it there.
#[derive(Debug, Default)]
pub struct DeviceData(Mutex<Option<(Arc<Dataset>, DatasetOn)>>);

impl DeviceData {
    /// The device copy of `data`, made once while instances use one data set.
    pub fn get(&self, data: &Arc<Dataset>, dev: &Device) -> DatasetOn {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &*held {
            Some((d, on)) if Arc::ptr_eq(d, data) => on.clone(),
            _ => {
                let on = DatasetOn::new(data, dev, DType::F32);
                *held = Some((data.clone(), on.clone()));
                on
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_specs_parse_with_defaults_and_refuse_typos() {
        assert_eq!(
            "quadratic".parse::<ProblemSpec>().unwrap(),
            ProblemSpec::Quadratic(QuadraticSpec {
                batch: 128,
                dims: 10
            })
        );
        let ProblemSpec::Mlp(m) = "mlp:hidden=20x20,act=relu".parse().unwrap() else {
            panic!("an mlp")
        };
        assert_eq!(
            (m.hidden, m.activation, m.batch),
            (vec![20, 20], Activation::Relu, 128)
        );
        // Display writes every parameter; parsing it gives the same spec back.
        for text in [
            "quadratic:batch=3",
            "mlp:hidden=20x20,act=relu",
            "mlp",
            "conv",
            "conv:labels=0-1+8,lstms=1,channels=8",
            "art",
            "art:size=128,content=chelsea+rocket,style=brick",
        ] {
            let spec: ProblemSpec = text.parse().unwrap();
            assert_eq!(spec.to_string().parse::<ProblemSpec>().unwrap(), spec);
            let params = spec.params();
            let back = ProblemSpec::from_parts(
                spec.family(),
                params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            );
            assert_eq!(back.unwrap(), spec);
        }
        for bad in [
            "mlp:hiden=40",
            "mlp:hidden=0",
            "mlp:act=tanh",
            "lstm",
            "conv:lstms=0",
            "art:size=8",
            "art:style=../x",
            "mlp:hidden",
            "quadratic:batch=1000000,dims=1000000",
            "quadratic:dims=99999999999999999999",
            "mlp:hidden=1000000x1000000",
            "mlp:hidden=1x1x1x1x1x1x1x1x1x1x1x1x1x1x1x1x1",
        ] {
            assert!(bad.parse::<ProblemSpec>().is_err(), "{bad}");
        }
    }
}
