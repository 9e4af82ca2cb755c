//! Where unrolls run: the fused CPU kernels, burn's flex CPU backend, or burn wgpu on a
//! GPU (Vulkan, Metal, DX12), behind one interface ([`Engine`]) that a worker, `eval` and
//! a user's own training loop all call.
//!
//! `fused` (spelled `cpu` before) is the hand-differentiated path of [`crate::fused`],
//! the fastest on a CPU. `wgpu` runs the same hand-differentiated math on a GPU as one
//! CubeCL kernel per step forward and one backward (`crate::gpu`, feature `wgpu`).
//! `flex` and `wgpu-burn` run the burn composition of [`crate::unroll`] with autodiff on
//! their device. On a device the problem runs there too, and θ and the LSTM state stay
//! there between a trajectory's truncations. All four compute the same meta-gradient
//! (tested to float32 rounding).

use burn::tensor::{DType, Device};

use crate::fused::{self, HostCarry};
use crate::groups::AnyPhi;
use crate::lstm::Lstms;
use crate::problems::{DeviceData, Optimizee, Problem};
use crate::truncation::{Forward, Truncation};
use crate::unroll::{self, DeviceCarry};
use crate::{Error, LstmState, OptimizerConfig, eval};

/// A backend as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Hand-differentiated fused kernels on the CPU: the fastest CPU path (also
    /// accepted: `cpu`, its name before).
    #[value(alias = "cpu")]
    Fused,
    /// burn's flex CPU backend with autodiff: the reference composition.
    #[value(alias = "burn")]
    Flex,
    /// burn wgpu on a GPU (Vulkan, Metal or DX12) with the fused LSTM step kernels
    /// ([`crate::gpu`]); needs a build with `--features wgpu`.
    Wgpu,
    /// burn wgpu running the burn composition (many small kernels per step): the
    /// reference the fused GPU kernels are tested against.
    WgpuBurn,
}

impl Backend {
    /// The name on the command line and in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Fused => "fused",
            Backend::Flex => "flex",
            Backend::Wgpu => "wgpu",
            Backend::WgpuBurn => "wgpu-burn",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a backend cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The binary was built without the `wgpu` feature.
    #[error(
        "this binary was built without GPU support; rebuild it with the wgpu feature \
         (`cargo build --release -p l2l-worker --features wgpu`, or `-p l2l-coordinator` \
         for `local`; the GPU image: deploy/Dockerfile with \
         --build-arg FEATURES=l2l-worker/wgpu), or choose --backend fused (the CPU kernels)"
    )]
    NotCompiled,
    /// wgpu found no adapter, or the adapter refused to open.
    #[error(
        "wgpu found no usable GPU adapter ({0}). Install the Vulkan driver of this machine's \
         GPU (NVIDIA: the proprietary driver's Vulkan ICD, and in containers \
         NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics; AMD and Intel: Debian's \
         mesa-vulkan-drivers) and check that `vulkaninfo --summary` lists it. Without a \
         GPU, mesa-vulkan-drivers' lavapipe is a (slow) CPU adapter for testing; or choose \
         --backend fused"
    )]
    NoAdapter(String),
    /// `L2L_KERNELS` names kernels this CPU cannot run, or none at all.
    #[error("{0}")]
    Kernels(String),
}

/// An opened backend: its device and the adapter it runs on.
#[derive(Debug)]
pub struct Engine {
    backend: Backend,
    /// The autodiff device of `flex` and `wgpu`; `None` for `fused`.
    device: Option<Device>,
    adapter: String,
    /// The last data set put on the device, shared by every `mlp` instance on it.
    data: DeviceData,
}

/// An instance made ready on an engine's device.
pub struct Loaded {
    optimizee: Optimizee,
    device: Option<Box<dyn Problem + Send>>,
}

impl Loaded {
    /// The optimizee on the host.
    pub fn optimizee(&self) -> &Optimizee {
        &self.optimizee
    }
}

/// Where a trajectory stands between truncations: θ and the LSTM state, kept where the
/// engine computes.
// One lives per trajectory and moves once per truncation: boxing saves nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Carry {
    /// In host memory (`fused`).
    Host(HostCarry),
    /// On the device (`flex`, `wgpu`).
    Device(DeviceCarry),
}

impl Engine {
    /// Opens `backend`: for `wgpu`, finds and opens the adapter (once per process).
    pub fn open(backend: Backend) -> Result<Self, BackendError> {
        let (device, adapter) = match backend {
            Backend::Fused => {
                let kernels = crate::fused::Kernels::chosen().map_err(|e| match e {
                    crate::Error::Config(why) => BackendError::Kernels(why),
                    other => BackendError::Kernels(other.to_string()),
                })?;
                (
                    None,
                    format!(
                        "CPU kernels ({kernels}), {} threads",
                        rayon::current_num_threads()
                    ),
                )
            }
            Backend::Flex => (Some(Device::flex().autodiff()), "burn flex".to_string()),
            Backend::Wgpu | Backend::WgpuBurn => {
                let (device, adapter) = open_wgpu()?;
                (Some(device.autodiff()), adapter)
            }
        };
        Ok(Self {
            backend,
            device,
            adapter,
            data: DeviceData::default(),
        })
    }

    /// The backend this engine runs.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The autodiff device unrolls run on; `None` for `fused` (the host).
    pub fn device(&self) -> Option<&Device> {
        self.device.as_ref()
    }

    /// What the unrolls run on: the adapter's name for `wgpu`.
    pub fn adapter(&self) -> &str {
        &self.adapter
    }

    /// `backend (adapter)`, as the worker reports itself to the coordinator.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.backend, self.adapter)
    }

    /// Makes `optimizee` ready on the device (copying its data set there on first use).
    pub fn load(&self, optimizee: Optimizee) -> Loaded {
        let device = self
            .device
            .as_ref()
            .map(|dev| optimizee.on(dev, &self.data));
        Loaded { optimizee, device }
    }

    /// θ₀ and zero LSTM state: the start of a trajectory.
    pub fn start(&self, phi: &AnyPhi, p: &Loaded) -> Carry {
        let theta0 = p.optimizee.theta0();
        match &self.device {
            None => Carry::Host(HostCarry::start(&phi.config(), theta0.to_vec())),
            Some(dev) => Carry::Device(DeviceCarry {
                theta: crate::tensor::from_f32(theta0, [theta0.len(), 1], dev, DType::F32),
                state: LstmState::zeros(&phi.config(), theta0.len(), dev, DType::F32),
            }),
        }
    }

    /// One truncation of T steps from `state` at step `start`: T = `steps`, or with
    /// `weights` the weighted meta-loss over `weights.len()` steps.
    pub fn truncation(
        &self,
        phi: &AnyPhi,
        p: &Loaded,
        carry: Carry,
        start: usize,
        steps: usize,
        weights: Option<&[f32]>,
    ) -> Result<Truncation<Carry>, Error> {
        match (carry, &self.device, &p.device) {
            (Carry::Host(carry), None, _) => {
                let out = match weights {
                    None => fused::meta_grad(phi, p.optimizee.host(), carry, start, steps)?,
                    Some(w) => fused::meta_grad_weighted(phi, p.optimizee.host(), carry, start, w)?,
                };
                Ok(out.map_carry(Carry::Host))
            }
            #[cfg(feature = "wgpu")]
            (Carry::Device(carry), Some(dev), Some(problem)) if self.backend == Backend::Wgpu => {
                let out = self.on_gpu(phi, p, carry, dev, |parts, carry| {
                    let steps = weights.map_or(steps, <[f32]>::len);
                    crate::gpu::meta_grad(
                        phi,
                        parts,
                        problem.as_ref(),
                        carry,
                        start,
                        steps,
                        weights,
                    )
                })?;
                Ok(out.map_carry(Carry::Device))
            }
            (Carry::Device(carry), Some(dev), Some(problem)) => {
                let run = |lstm: &Lstms, carry| match weights {
                    None => unroll::meta_grad(lstm, problem.as_ref(), carry, start, steps),
                    Some(w) => unroll::meta_grad_weighted(lstm, problem.as_ref(), carry, start, w),
                };
                let out = self.on_device(phi, p, carry, dev, problem.as_ref(), run)?;
                Ok(out.map_carry(Carry::Device))
            }
            _ => Err(Error::Config(
                "a trajectory's state and instance must come from the engine that runs it".into(),
            )),
        }
    }

    /// The truncation of [`Engine::truncation`] run forward only: its losses, meta-loss
    /// and carry, without the meta-gradient (for the forward-only estimators, PES).
    pub fn forward(
        &self,
        phi: &AnyPhi,
        p: &Loaded,
        carry: Carry,
        start: usize,
        steps: usize,
        weights: Option<&[f32]>,
    ) -> Result<Forward<Carry>, Error> {
        match (carry, &self.device, &p.device) {
            (Carry::Host(carry), None, _) => {
                let out = fused::forward(phi, p.optimizee.host(), carry, start, steps, weights)?;
                Ok(out.map_carry(Carry::Host))
            }
            #[cfg(feature = "wgpu")]
            (Carry::Device(carry), Some(dev), Some(problem)) if self.backend == Backend::Wgpu => {
                let out = self.on_gpu(phi, p, carry, dev, |parts, carry| {
                    crate::gpu::forward(parts, problem.as_ref(), carry, start, steps, weights)
                })?;
                Ok(out.map_carry(Carry::Device))
            }
            (Carry::Device(carry), Some(dev), Some(problem)) => {
                let out = self.on_device(phi, p, carry, dev, problem.as_ref(), |lstm, carry| {
                    unroll::forward(lstm, problem.as_ref(), carry, start, steps, weights)
                })?;
                Ok(out.map_carry(Carry::Device))
            }
            _ => Err(Error::Config(
                "a trajectory's state and instance must come from the engine that runs it".into(),
            )),
        }
    }

    /// Runs `run` with φ's LSTMs on the device, after checking that `carry` fits them and
    /// lives there. burn reports device failures (out of memory, a lost device) by
    /// panicking; they become an error, so a worker drops the trajectory instead of dying.
    fn on_device<T>(
        &self,
        phi: &AnyPhi,
        p: &Loaded,
        carry: DeviceCarry,
        dev: &Device,
        problem: &(dyn Problem + Send),
        run: impl FnOnce(&Lstms, DeviceCarry) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let n = problem.num_coords();
        check_carry(&carry, &phi.config(), n, dev)?;
        let groups = p.optimizee.host().groups();
        let lstm = Lstms::new(phi, groups.as_ref(), n, dev, DType::F32)?;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&lstm, carry))).map_err(
            |p| {
                Error::Backend(format!(
                    "the {} device failed: {}",
                    self.backend,
                    panic_text(&*p)
                ))
            },
        )?
    }

    /// Runs `run` with φ bound to the problem's groups, for the fused GPU kernels, with
    /// the checks and the panic guard of [`Engine::on_device`].
    #[cfg(feature = "wgpu")]
    fn on_gpu<T>(
        &self,
        phi: &AnyPhi,
        p: &Loaded,
        carry: DeviceCarry,
        dev: &Device,
        run: impl FnOnce(&[(&crate::Phi, std::ops::Range<usize>)], DeviceCarry) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let n = p.optimizee.host().num_coords();
        check_carry(&carry, &phi.config(), n, dev)?;
        let groups = p.optimizee.host().groups();
        let parts = phi.bind(groups.as_ref(), n)?;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&parts, carry))).map_err(
            |p| {
                Error::Backend(format!(
                    "the {} device failed: {}",
                    self.backend,
                    panic_text(&*p)
                ))
            },
        )?
    }

    /// f(θ_t) for t = 0 ..= steps under the learned optimizer from θ₀, state carried
    /// throughout; once a loss is not finite the rest of the curve is +∞.
    pub fn curve(&self, phi: &AnyPhi, p: &Loaded, steps: usize) -> Result<Vec<f64>, Error> {
        let (Some(dev), Some(problem)) = (&self.device, &p.device) else {
            return eval::host_learned_curve(phi, p.optimizee.host(), p.optimizee.theta0(), steps);
        };
        #[cfg(feature = "wgpu")]
        if self.backend == Backend::Wgpu {
            let Carry::Device(carry) = self.start(phi, p) else {
                return Err(Error::Config(
                    "the wgpu engine started a trajectory on the host".into(),
                ));
            };
            let mut curve = self.on_gpu(phi, p, carry, dev, |parts, carry| {
                crate::gpu::curve(parts, problem.as_ref(), carry, steps)
            })?;
            eval::end_at_divergence(&mut curve, steps);
            return Ok(curve);
        }
        // Forward only: nothing requires a gradient, so no graph is kept.
        let theta0 = p.optimizee.theta0();
        let groups = p.optimizee.host().groups();
        let lstm = Lstms::new(phi, groups.as_ref(), theta0.len(), dev, DType::F32)?;
        let theta0 = crate::tensor::from_f32(theta0, [theta0.len(), 1], dev, DType::F32);
        let mut curve =
            eval::learned_curve(&lstm, problem.as_ref(), theta0, steps, dev, DType::F32)?;
        eval::end_at_divergence(&mut curve, steps);
        Ok(curve)
    }
}

/// Refuses a carried state that does not fit φ and the problem, or lives elsewhere (a
/// coordinator restarted with another φ shape; a state from another engine).
fn check_carry(
    carry: &DeviceCarry,
    cfg: &OptimizerConfig,
    n: usize,
    dev: &Device,
) -> Result<(), Error> {
    let fits = carry.theta.dims() == [n, 1]
        && carry.state.h.len() == cfg.layers
        && carry.state.c.len() == cfg.layers
        && carry
            .state
            .h
            .iter()
            .chain(&carry.state.c)
            .all(|t| t.dims() == [n, cfg.hidden])
        && carry.state.moments.len() == cfg.preprocess.moments()
        && carry.state.moments.iter().all(|t| t.dims() == [n, 1]);
    if !fits {
        return Err(Error::Shape(format!(
            "the trajectory's state does not fit {n} coordinates × {} layers × H = {} with {} \
             preprocessing",
            cfg.layers, cfg.hidden, cfg.preprocess
        )));
    }
    if carry.theta.device().inner() != dev.clone().inner() {
        return Err(Error::Config(
            "the trajectory's state lives on another device than this engine's".into(),
        ));
    }
    Ok(())
}

/// A panic's message, for an error.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Whether a Vulkan driver is installed at all: an ICD manifest where the Vulkan loader
/// looks, or an existing one named by `VK_ICD_FILENAMES` / `VK_DRIVER_FILES`.
pub fn vulkan_driver_installed() -> bool {
    let named = ["VK_ICD_FILENAMES", "VK_DRIVER_FILES"].iter().any(|v| {
        std::env::var_os(v).is_some_and(|files| std::env::split_paths(&files).any(|f| f.is_file()))
    });
    named
        || [
            "/usr/share/vulkan/icd.d",
            "/etc/vulkan/icd.d",
            "/usr/local/share/vulkan/icd.d",
        ]
        .iter()
        .any(|d| std::fs::read_dir(d).is_ok_and(|mut e| e.next().is_some()))
}

/// The wgpu engine for a test; `None` (the test is skipped, saying what to install) only
/// where no Vulkan driver is installed at all, and a failure instead where
/// `L2L_REQUIRE_ALL=1` (CI) forbids skips.
#[cfg(all(test, feature = "wgpu"))]
pub(crate) fn wgpu_for_test() -> Option<Engine> {
    if !vulkan_driver_installed() {
        let why = "no Vulkan driver is installed; `apt-get install mesa-vulkan-drivers` \
                   (lavapipe, a CPU Vulkan driver) runs this test on any machine";
        assert!(
            std::env::var("L2L_REQUIRE_ALL").map_or(true, |v| v != "1"),
            "{why}; L2L_REQUIRE_ALL=1 forbids skips"
        );
        eprintln!("SKIPPED: {why}");
        return None;
    }
    Some(Engine::open(Backend::Wgpu).unwrap_or_else(|e| panic!("{e}")))
}

/// The wgpu device and its adapter's name, opened once per process (wgpu's runtime
/// cannot be initialised twice).
#[cfg(feature = "wgpu")]
fn open_wgpu() -> Result<(Device, String), BackendError> {
    use std::sync::OnceLock;
    static OPENED: OnceLock<Result<(Device, String), String>> = OnceLock::new();
    OPENED
        .get_or_init(|| {
            // A driver that misbehaves may panic inside wgpu rather than return an error.
            let opened = std::panic::catch_unwind(|| {
                use burn::tensor::wgpu::WgpuInitError;
                let device = match Device::wgpu_options().init() {
                    Ok(device) => device,
                    // The runtime is up already: something in this process made a tensor on
                    // burn's default device, which is wgpu in a build with it (burn's
                    // optimizer records load there). Its device is the one to use.
                    Err(WgpuInitError::Registration { .. }) => {
                        Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)
                    }
                    Err(e) => return Err(e.to_string()),
                };
                let name = device
                    .identity()
                    .map_or_else(|| "unnamed adapter".to_string(), |i| i.name);
                Ok::<_, String>((device, name))
            });
            match opened {
                Ok(r) => r,
                Err(panic) => Err(format!("wgpu panicked: {}", panic_text(&*panic))),
            }
        })
        .clone()
        .map_err(BackendError::NoAdapter)
}

#[cfg(not(feature = "wgpu"))]
fn open_wgpu() -> Result<(Device, String), BackendError> {
    Err(BackendError::NotCompiled)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::problems::MlpSpec;
    use crate::problems::mnist::Dataset;
    use crate::rng::Rng;
    use crate::{Mlp, OptimizerConfig, Preprocess, Quadratic};

    use super::*;

    /// max|a − b| / max|b| over one tensor.
    fn rel(a: &[f32], b: &[f32]) -> f64 {
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() as f64)
            .fold(0.0, f64::max);
        let scale = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
        diff / scale
    }

    /// A small data set with every pixel drawn, for an MLP that runs anywhere quickly.
    fn tiny_data() -> Arc<Dataset> {
        let mut rng = Rng::new(4);
        Arc::new(Dataset {
            pixels: 12,
            shape: [1, 1, 12],
            images: (0..40 * 12).map(|_| rng.below(256) as u8).collect(),
            labels: (0..40).map(|i| (i * 3 % 10) as u8).collect(),
        })
    }

    /// The problems every backend is checked on: a quadratic, and a sigmoid MLP with
    /// weighted steps (the MNIST recipe's meta-loss).
    fn cases() -> Vec<(Optimizee, Option<Vec<f32>>)> {
        let spec = MlpSpec {
            hidden: vec![8],
            batch: 16,
            ..MlpSpec::default()
        };
        vec![
            (
                Optimizee::Quadratic(Quadratic::from_seed(3, 12, 10).unwrap()),
                None,
            ),
            (
                Optimizee::Mlp(Mlp::new(spec, tiny_data(), 6).unwrap()),
                Some((1..=6).map(|t| t as f32 / 3.5).collect()),
            ),
            // The conv family with its two parameter groups (spec §5): each group's LSTM.
            (
                Optimizee::Conv(
                    crate::problems::Conv::new(
                        crate::problems::ConvSpec {
                            channels: 4,
                            hidden: 6,
                            batch: 8,
                            ..crate::problems::ConvSpec::default()
                        },
                        crate::problems::conv::tests::images(30, [2, 12, 12], 5),
                        2,
                    )
                    .unwrap(),
                ),
                None,
            ),
            // The art family: an image of 16×16 pixels, every scale of the network.
            (Optimizee::Art(crate::problems::art::tests::tiny(16)), None),
        ]
    }

    /// φ for `optimizee`: its groups (spec §5), each drawn from its own seed.
    fn phi_for(optimizee: &Optimizee, config: OptimizerConfig) -> AnyPhi {
        let map = optimizee.host().groups();
        let names = map.as_ref().map(|g| g.names()).unwrap_or_default();
        AnyPhi::init(config, &names, 7).unwrap()
    }

    /// Two truncations on `engine` and on the fused CPU path, state carried between them:
    /// every tensor of both meta-gradients within `tol` (max|diff| / max|ref|), and the
    /// losses of the second one too (so the carried θ and LSTM state agree).
    pub(crate) fn agrees_with_cpu(engine: &Engine, tol: f64) {
        let cpu = Engine::open(Backend::Fused).unwrap();
        let mut worst = 0f64;
        for preprocess in [
            Preprocess::LogSign,
            Preprocess::Identity,
            Preprocess::Rnnprop,
        ] {
            for (optimizee, weights) in cases() {
                // rnnprop on the families whose features differ in kind (a quadratic, an
                // MLP, conv's two groups); art adds only time.
                if preprocess == Preprocess::Rnnprop && matches!(optimizee, Optimizee::Art(_)) {
                    continue;
                }
                let phi = phi_for(&optimizee, OptimizerConfig::new(preprocess));
                let steps = weights.as_ref().map_or(5, Vec::len);
                let name = match &optimizee {
                    Optimizee::Quadratic(_) => "quadratic",
                    Optimizee::Mlp(_) => "mlp",
                    Optimizee::Conv(_) => "conv (two groups)",
                    Optimizee::Art(_) => "art",
                };
                // Batch normalisation divides by batch deviations, which amplifies the
                // float32 rounding of two summation orders (burn's convolution against
                // the host's); conv is held to 1e-3, the bound the backends are held to on the
                // problems of issue 16.
                // Art's features are sums of up to 363 products in float32, in burn's
                // order and the host's: held to the same 1e-3 (measured 4.2e-4 on flex).
                let tol = match optimizee {
                    Optimizee::Conv(_) | Optimizee::Art(_) => tol.max(1e-3),
                    _ => tol,
                };
                let (a, b) = (engine.load(optimizee.clone()), cpu.load(optimizee));
                let (mut sa, mut sb) = (engine.start(&phi, &a), cpu.start(&phi, &b));
                for k in 0..2 {
                    let w = weights.as_deref();
                    let ta = engine
                        .truncation(&phi, &a, sa, k * steps, steps, w)
                        .unwrap();
                    let tb = cpu.truncation(&phi, &b, sb, k * steps, steps, w).unwrap();
                    let what = format!("{} {preprocess} {name} truncation {k}", engine.backend());
                    for (i, (ga, gb)) in ta.grad.tensors().zip(tb.grad.tensors()).enumerate() {
                        let r = rel(ga, gb);
                        worst = worst.max(r);
                        assert!(r <= tol, "{what}: tensor {i} off by {r:.2e}");
                    }
                    assert!(tb.grad.tensors().flatten().any(|v| *v != 0.0));
                    for (la, lb) in ta.losses.iter().zip(&tb.losses) {
                        assert!(
                            (la - lb).abs() <= tol * lb.abs(),
                            "{what}: loss {la} vs {lb}"
                        );
                    }
                    let m = (ta.meta_loss - tb.meta_loss).abs();
                    assert!(
                        m <= tol * tb.meta_loss.abs(),
                        "{what}: meta-loss off by {m}"
                    );
                    (sa, sb) = (ta.carry, tb.carry);
                }
            }
        }
        eprintln!(
            "{}: worst tensor max|diff|/max|ref| {worst:.2e}",
            engine.backend()
        );
    }

    #[test]
    fn flex_meta_gradients_match_the_fused_cpu_path() {
        agrees_with_cpu(&Engine::open(Backend::Flex).unwrap(), 1e-4);
    }

    #[test]
    fn curves_agree_across_backends() {
        let (cpu, flex) = (
            Engine::open(Backend::Fused).unwrap(),
            Engine::open(Backend::Flex).unwrap(),
        );
        for (o, _) in cases() {
            let phi = phi_for(&o, OptimizerConfig::new(Preprocess::LogSign));
            let a = cpu.curve(&phi, &cpu.load(o.clone()), 30).unwrap();
            let b = flex.curve(&phi, &flex.load(o), 30).unwrap();
            assert_eq!(a.len(), 31);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-4 * x.abs(), "{x} vs {y}");
            }
        }
    }

    /// Forward only, the fused path gives exactly the losses, meta-loss and carry of its
    /// meta-gradient pass (two truncations, weighted and not), and flex agrees with it.
    #[test]
    fn forward_only_truncations_match_the_meta_gradient_pass() {
        let (cpu, flex) = (
            Engine::open(Backend::Fused).unwrap(),
            Engine::open(Backend::Flex).unwrap(),
        );
        for ((o, weights), preprocess) in cases().into_iter().zip(
            [Preprocess::LogSign, Preprocess::Rnnprop]
                .into_iter()
                .cycle(),
        ) {
            let phi = phi_for(&o, OptimizerConfig::new(preprocess));
            let steps = weights.as_ref().map_or(5, Vec::len);
            let w = weights.as_deref();
            let (a, b) = (cpu.load(o.clone()), flex.load(o));
            let (mut full, mut fwd, mut dev) = (
                cpu.start(&phi, &a),
                cpu.start(&phi, &a),
                flex.start(&phi, &b),
            );
            for k in 0..2 {
                let t = cpu.truncation(&phi, &a, full, k * steps, steps, w).unwrap();
                let f = cpu.forward(&phi, &a, fwd, k * steps, steps, w).unwrap();
                let d = flex.forward(&phi, &b, dev, k * steps, steps, w).unwrap();
                assert_eq!(f.losses, t.losses, "truncation {k}");
                assert_eq!(f.meta_loss, t.meta_loss);
                let (Carry::Host(x), Carry::Host(y)) = (&f.carry, &t.carry) else {
                    panic!("fused carries live on the host")
                };
                assert_eq!(x, y, "truncation {k}: the carries differ");
                for (l, r) in d.losses.iter().zip(&f.losses) {
                    assert!(
                        (l - r).abs() <= 1e-3 * r.abs(),
                        "flex {l} against fused {r}"
                    );
                }
                (full, fwd, dev) = (t.carry, f.carry, d.carry);
            }
        }
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn wgpu_without_the_feature_says_how_to_build_it() {
        let e = Engine::open(Backend::Wgpu).unwrap_err().to_string();
        assert!(e.contains("--features wgpu"), "{e}");
    }

    /// The spec's acceptance test for GPU workers: wgpu's meta-gradients equal the CPU
    /// ones to 1e-3 per tensor, for both preprocess modes, on both problem families.
    /// Runs on any Vulkan driver (lavapipe in CI); skipped, saying what to install, only
    /// where no Vulkan driver is installed at all.
    #[cfg(feature = "wgpu")]
    #[test]
    fn wgpu_meta_gradients_match_the_cpu_backend() {
        let Some(engine) = wgpu_for_test() else {
            return;
        };
        eprintln!("wgpu adapter: {}", engine.adapter());
        agrees_with_cpu(&engine, 1e-3);
    }

    /// Evaluation curves of the fused GPU kernels agree with the CPU's, on every family.
    #[cfg(feature = "wgpu")]
    #[test]
    fn wgpu_curves_match_the_cpu() {
        let Some(gpu) = wgpu_for_test() else {
            return;
        };
        let cpu = Engine::open(Backend::Fused).unwrap();
        for (o, _) in cases() {
            let phi = phi_for(&o, OptimizerConfig::new(Preprocess::LogSign));
            let a = cpu.curve(&phi, &cpu.load(o.clone()), 12).unwrap();
            let b = gpu.curve(&phi, &gpu.load(o), 12).unwrap();
            assert_eq!((a.len(), b.len()), (13, 13));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-3 * x.abs(), "{x} vs {y}");
            }
        }
    }

    /// The fused GPU kernels for LSTM shapes besides the default (H = 7; one and three
    /// layers): meta-gradients of two truncations within 1e-3 of the CPU path.
    #[cfg(feature = "wgpu")]
    #[test]
    fn wgpu_kernels_fit_other_lstm_shapes() {
        let Some(gpu) = wgpu_for_test() else {
            return;
        };
        let cpu = Engine::open(Backend::Fused).unwrap();
        for preprocess in [
            Preprocess::LogSign,
            Preprocess::Identity,
            Preprocess::Rnnprop,
        ] {
            for layers in [1, 3] {
                let config = OptimizerConfig {
                    hidden: 7,
                    layers,
                    ..OptimizerConfig::new(preprocess)
                };
                let o = Optimizee::Quadratic(Quadratic::from_seed(5, 9, 10).unwrap());
                let phi = phi_for(&o, config);
                let (a, b) = (gpu.load(o.clone()), cpu.load(o));
                let (mut sa, mut sb) = (gpu.start(&phi, &a), cpu.start(&phi, &b));
                for k in 0..2 {
                    let ta = gpu.truncation(&phi, &a, sa, k * 4, 4, None).unwrap();
                    let tb = cpu.truncation(&phi, &b, sb, k * 4, 4, None).unwrap();
                    for (i, (ga, gb)) in ta.grad.tensors().zip(tb.grad.tensors()).enumerate() {
                        let r = rel(ga, gb);
                        assert!(
                            r <= 1e-3,
                            "{preprocess} L = {layers} truncation {k}: tensor {i} off by {r:.2e}"
                        );
                    }
                    (sa, sb) = (ta.carry, tb.carry);
                }
            }
        }
    }

    /// The burn composition on wgpu, the reference of the fused GPU kernels, agrees with
    /// the CPU too (and so with them).
    #[cfg(feature = "wgpu")]
    #[test]
    fn wgpu_burn_composition_matches_the_cpu_backend() {
        if wgpu_for_test().is_none() {
            return;
        }
        let engine = Engine::open(Backend::WgpuBurn).unwrap();
        agrees_with_cpu(&engine, 1e-3);
    }
}
