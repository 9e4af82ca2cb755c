//! A trained φ as a burn optimizer: any burn `Module` trains with it exactly as with
//! burn's Adam, through [`ModuleOptimizer::step`]`(lr, model, grads)`.
//!
//! ```no_run
//! use l2l_common::optimizer::LearnedOptimizer;
//! # fn train<M: burn::module::Module>(model: M, grads: burn::optim::GradientsParams) -> Result<(), l2l_common::Error> {
//! let mut optim = LearnedOptimizer::load("pretrained/mlp.safetensors".as_ref())?.init();
//! // In the training loop, with `grads` from `GradientsParams::from_grads(loss.backward(), &model)`:
//! let model = optim.step(1.0, model, grads);
//! # Ok(()) }
//! ```
//!
//! Each parameter tensor is a batch of coordinates (spec §1): its gradient is flattened,
//! run through m_φ with that tensor's own LSTM state, and the update added:
//! θ ← θ + lr · u. **`lr` is a multiplier on the learned step**: 1.0 applies φ as it was
//! meta-trained, 0.5 takes half its step, and so on (the learned step already has its
//! scale, so there is nothing to tune to use it as trained). The LSTM state (h and c of
//! every layer, `[N, H]` per tensor of N values, and with `rnnprop` its moments m and v,
//! `[N, 1]` each) is the optimizer's per-parameter burn
//! state: saved and restored with [`ModuleOptimizer::to_record`], `save`/`load` and
//! `into_bytes`/`from_bytes`, moved with the parameter between devices, and computed on
//! whatever device and float type the parameter lives on (flex, wgpu, …).
//!
//! A φ with parameter groups (spec §5) becomes one [`LearnedOptimizer`] per group, each
//! given the parameters of a [`ParamGroup`] ([`LearnedOptimizer::for_groups`]).
//!
//! A state that does not fit its parameter (a record saved for another φ configuration
//! or another model) is dropped and restarted from zeros, as burn does with a state it
//! cannot rebuild; the LSTM then begins that tensor's trajectory afresh.

use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::module::ParamGroup;
use burn::optim::{LearningRate, ModuleOptimizer, Optimizer, RecordState, StateSink, StateSource};
use burn::tensor::{DType, Device, Tensor};

use crate::groups::PhiGroups;
use crate::lstm::{Lstm, LstmState};
use crate::{Error, Phi};

/// m_φ as a [`burn::optim::Optimizer`]: θ ← θ + lr · m_φ(∇θ), per tensor.
#[derive(Clone, Debug)]
pub struct LearnedOptimizer {
    phi: Arc<Phi>,
    /// φ as tensors, one copy per (device, float type) it has stepped on.
    on: Arc<Mutex<Vec<(Device, DType, Arc<Lstm>)>>>,
}

impl LearnedOptimizer {
    /// The optimizer of a one-group φ.
    pub fn new(phi: Phi) -> Self {
        Self {
            phi: Arc::new(phi),
            on: Arc::default(),
        }
    }

    /// Reads a one-group `l2l-lstm/1` file (spec §4.1) or a coordinator checkpoint; a
    /// grouped file is refused, naming its groups ([`LearnedOptimizer::load_groups`]).
    pub fn load(path: &Path) -> Result<Self, Error> {
        Ok(Self::new(Phi::load_any(path)?))
    }

    /// φ.
    pub fn phi(&self) -> &Phi {
        &self.phi
    }

    /// The whole-module optimizer, as `AdamConfig::init` gives burn's Adam.
    pub fn init(self) -> ModuleOptimizer {
        ModuleOptimizer::from(self)
    }

    /// Reads a grouped file (spec §5) and gives each group its parameters: `rest` takes
    /// every parameter that none of `rules` matches (§5's `fc`), each rule's group those
    /// its [`ParamGroup`] matches (the last matching rule wins). A one-group file is
    /// refused, and so are rules that do not name the file's groups exactly.
    pub fn load_groups(
        path: &Path,
        rest: &str,
        rules: Vec<(&str, ParamGroup)>,
    ) -> Result<ModuleOptimizer, Error> {
        Self::for_groups(&PhiGroups::load(path)?, rest, rules)
    }

    /// As [`LearnedOptimizer::load_groups`], from φ already read.
    pub fn for_groups(
        phi: &PhiGroups,
        rest: &str,
        rules: Vec<(&str, ParamGroup)>,
    ) -> Result<ModuleOptimizer, Error> {
        let mut named: Vec<&str> = rules.iter().map(|(n, _)| *n).collect();
        named.insert(0, rest);
        let (mut sorted_named, mut sorted_file) = (named.clone(), phi.names());
        sorted_named.sort_unstable();
        sorted_file.sort_unstable();
        // φ's names are distinct, so equal sorted lists also mean no rule is repeated.
        if sorted_named != sorted_file {
            return Err(Error::Config(format!(
                "the rules name groups [{}] (rest: {rest}), φ has groups [{}]; give each of \
                 φ's groups exactly once, one of them as the rest",
                named.join(","),
                phi.names().join(",")
            )));
        }
        let of = |name: &str| {
            // Every name was just checked to be one of φ's groups.
            phi.get(name)
                .cloned()
                .map(Self::new)
                .ok_or_else(|| Error::Config(format!("φ has no group {name:?}")))
        };
        let mut optim = ModuleOptimizer::from(of(rest)?);
        for (name, group) in rules {
            optim = optim.with_group(group, of(name)?, None);
        }
        Ok(optim)
    }

    /// φ's tensors on `device` in `dtype`, uploaded once.
    fn lstm_on(&self, device: &Device, dtype: DType) -> Arc<Lstm> {
        // A panic elsewhere while the lock was held leaves the cache as valid as ever.
        let mut on = self.on.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, lstm)) = on.iter().find(|(d, t, _)| d == device && *t == dtype) {
            return lstm.clone();
        }
        let lstm = Arc::new(Lstm::new(&self.phi, device, dtype));
        on.push((device.clone(), dtype, lstm.clone()));
        lstm
    }
}

/// One parameter tensor's LSTM state: h and c of every layer, `[N, H]` each, and
/// rnnprop's moments m and v, `[N, 1]` each (none for the other preprocessings).
#[derive(Clone, Debug)]
pub struct LearnedState<const D: usize> {
    /// The state m_φ carries for this tensor's coordinates.
    pub lstm: LstmState,
}

impl<const D: usize> LearnedState<D> {
    /// Whether this state belongs to a tensor of `n` values in `dtype` under `phi`'s
    /// configuration (a record from elsewhere may hold other shapes or float types).
    fn fits(&self, phi: &Phi, n: usize, dtype: DType) -> bool {
        let cfg = &phi.config;
        let ok = |t: &Tensor<2>| t.dims() == [n, cfg.hidden] && t.dtype() == dtype;
        let moment = |t: &Tensor<2>| t.dims() == [n, 1] && t.dtype() == dtype;
        self.lstm.h.len() == cfg.layers
            && self.lstm.c.len() == cfg.layers
            && self.lstm.h.iter().chain(&self.lstm.c).all(ok)
            && self.lstm.moments.len() == cfg.preprocess.moments()
            && self.lstm.moments.iter().all(moment)
    }
}

impl Optimizer for LearnedOptimizer {
    type State<const D: usize> = LearnedState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let shape = tensor.shape();
        let n = shape.num_elements();
        let (device, dtype) = (grad.device(), grad.dtype());
        let lstm = self.lstm_on(&device, dtype);
        let state = match state {
            Some(s) if s.fits(&self.phi, n, dtype) => s.lstm,
            _ => LstmState::zeros(&self.phi.config, n, &device, dtype),
        };
        let (u, lstm_state) = lstm.step(grad.reshape([n, 1]), state);
        let u: Tensor<D> = u.reshape(shape);
        (
            tensor + u.mul_scalar(lr),
            Some(LearnedState { lstm: lstm_state }),
        )
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        let move_all = |v: Vec<Tensor<2>>| v.into_iter().map(|t| t.to_device(device)).collect();
        LearnedState {
            lstm: LstmState {
                h: move_all(state.lstm.h),
                c: move_all(state.lstm.c),
                moments: move_all(state.lstm.moments),
            },
        }
    }
}

/// The record names of rnnprop's moments, in [`LstmState::moments`] order.
const MOMENTS: [&str; 2] = ["m", "v"];

/// Saved as tensors `{param}.h.{l}` and `{param}.c.{l}` for every layer l, and with
/// rnnprop `{param}.m` and `{param}.v`.
impl<const D: usize> RecordState for LearnedState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        for (l, (h, c)) in self.lstm.h.iter().zip(&self.lstm.c).enumerate() {
            out.push_tensor(prefix, &format!("h.{l}"), h.to_data());
            out.push_tensor(prefix, &format!("c.{l}"), c.to_data());
        }
        for (name, t) in MOMENTS.iter().zip(&self.lstm.moments) {
            out.push_tensor(prefix, name, t.to_data());
        }
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let put = |d: burn::tensor::TensorData| {
            let dtype = d.dtype();
            Tensor::from_data(d, (device, dtype))
        };
        // Both moments or neither; a lone one is not a state of ours.
        let moments = match (src.take_tensor(prefix, "m"), src.take_tensor(prefix, "v")) {
            (Some(m), Some(v)) if m.rank() == 2 && v.rank() == 2 => vec![put(m), put(v)],
            (None, None) => Vec::new(),
            _ => return None,
        };
        let (mut h, mut c) = (Vec::new(), Vec::new());
        for l in 0..=crate::config::MAX_LAYERS {
            let pair = (
                src.take_tensor(prefix, &format!("h.{l}")),
                src.take_tensor(prefix, &format!("c.{l}")),
            );
            match pair {
                (Some(hl), Some(cl)) if hl.rank() == 2 && cl.rank() == 2 => {
                    h.push(put(hl));
                    c.push(put(cl));
                }
                (None, None) if l > 0 => {
                    return Some(Self {
                        lstm: LstmState { h, c, moments },
                    });
                }
                // Half a layer, a wrong rank or no layer at all: not a state of ours.
                _ => return None,
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OptimizerConfig;
    use crate::tensor::{from_f32, to_f32};
    use burn::module::{Module, Param};
    use burn::optim::GradientsParams;

    #[derive(Module, Debug)]
    struct Two {
        w: Param<Tensor<2>>,
        b: Param<Tensor<1>>,
    }

    fn model(dev: &Device) -> Two {
        let w: Vec<f32> = (0..12).map(|i| 0.1 * i as f32 - 0.5).collect();
        let b = [0.3f32, -0.2, 0.0];
        Two {
            w: Param::from_tensor(from_f32(&w, [4, 3], dev, DType::F32).require_grad()),
            b: Param::from_tensor(
                Tensor::<1>::from_data(burn::tensor::TensorData::new(b.to_vec(), [3]), dev)
                    .require_grad(),
            ),
        }
    }

    /// f = Σ (x·W)² + Σ b³ for a fixed x: gradients of both tensors, each independent of
    /// the other tensor.
    fn grads(m: &Two, dev: &Device) -> GradientsParams {
        let x = from_f32(&[1.0, -2.0, 0.5, 3.0], [1, 4], dev, DType::F32);
        let f = x.matmul(m.w.val()).square().sum() + m.b.val().powi_scalar(3).sum();
        GradientsParams::from_grads(f.backward(), m)
    }

    /// The update of each tensor is m_φ applied to its flattened gradient with the
    /// tensor's own state, computed here with [`Lstm::step`] directly.
    #[test]
    fn each_tensor_steps_by_m_phi_with_its_own_state() {
        let dev = Device::flex().autodiff();
        let phi = Phi::init(OptimizerConfig::default(), 4).unwrap();
        let mut optim = LearnedOptimizer::new(phi.clone()).init();
        let mut m = model(&dev);
        let lstm = Lstm::new(&phi, &Device::flex(), DType::F32);
        let mut sw = LstmState::zeros(&phi.config, 12, &Device::flex(), DType::F32);
        let mut sb = LstmState::zeros(&phi.config, 3, &Device::flex(), DType::F32);
        for _ in 0..3 {
            let g = grads(&m, &dev);
            let gw = g.get::<2>(m.w.id).unwrap();
            let gb = g.get::<1>(m.b.id).unwrap();
            let (w0, b0) = (to_f32(&m.w.val()).unwrap(), to_f32(&m.b.val()).unwrap());
            m = optim.step(0.5, m, g);
            let (uw, next) = lstm.step(gw.reshape([12, 1]), sw);
            sw = next;
            let (ub, next) = lstm.step(gb.reshape([3, 1]), sb);
            sb = next;
            for (got, (t0, u)) in to_f32(&m.w.val())
                .unwrap()
                .iter()
                .zip(w0.iter().zip(to_f32(&uw).unwrap()))
                .chain(
                    to_f32(&m.b.val())
                        .unwrap()
                        .iter()
                        .zip(b0.iter().zip(to_f32(&ub).unwrap())),
                )
            {
                let want = t0 + 0.5 * u;
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn groups_give_each_tensor_its_groups_lstm() {
        let dev = Device::flex().autodiff();
        let cfg = OptimizerConfig::default();
        let (pw, pb) = (Phi::init(cfg, 6).unwrap(), Phi::init(cfg, 7).unwrap());
        let grouped =
            PhiGroups::new(vec![("fc".into(), pb.clone()), ("conv".into(), pw.clone())]).unwrap();
        let mut g = LearnedOptimizer::for_groups(
            &grouped,
            "fc",
            vec![("conv", ParamGroup::from_path("w"))],
        )
        .unwrap();
        let (mut ow, mut ob) = (
            LearnedOptimizer::new(pw).init(),
            LearnedOptimizer::new(pb).init(),
        );
        let (mut mg, mut mw, mut mb) = (model(&dev), model(&dev), model(&dev));
        for _ in 0..3 {
            let (gg, gw, gb) = (grads(&mg, &dev), grads(&mw, &dev), grads(&mb, &dev));
            mg = g.step(1.0, mg, gg);
            mw = ow.step(1.0, mw, gw);
            mb = ob.step(1.0, mb, gb);
        }
        // Each tensor moved exactly as its group's φ moves it (the loss is separable, so
        // a tensor's gradients do not depend on how the other one moved).
        let v = |t: &Tensor<2>| to_f32(t).unwrap();
        let b = |m: &Two| v(&m.b.val().unsqueeze());
        assert_eq!(v(&mg.w.val()), v(&mw.w.val()), "w follows conv's φ");
        assert_eq!(b(&mg), b(&mb), "b follows fc's φ");
        assert_ne!(v(&mw.w.val()), v(&mb.w.val()), "the two φ move w apart");
    }

    /// On a GPU (lavapipe in CI) the optimizer steps a module to the same numbers as on
    /// the CPU; skipped, saying what to install, only where no Vulkan driver exists.
    #[cfg(feature = "wgpu")]
    #[test]
    fn on_wgpu_the_steps_match_the_cpu() {
        let Some(engine) = crate::engine::wgpu_for_test() else {
            return;
        };
        let gpu = engine.device().expect("wgpu runs on a device").clone();
        let cpu = Device::flex().autodiff();
        let phi = Phi::init(OptimizerConfig::default(), 8).unwrap();
        let (mut og, mut oc) = (
            LearnedOptimizer::new(phi.clone()).init(),
            LearnedOptimizer::new(phi).init(),
        );
        let (mut mg, mut mc) = (model(&gpu), model(&cpu));
        for _ in 0..5 {
            let (gg, gc) = (grads(&mg, &gpu), grads(&mc, &cpu));
            mg = og.step(1.0, mg, gg);
            mc = oc.step(1.0, mc, gc);
        }
        // Per tensor, elementwise within 1e-4 of the tensor's largest value.
        let close = |g: &Tensor<2>, c: &Tensor<2>| {
            let (g, c) = (to_f32(g).unwrap(), to_f32(c).unwrap());
            let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in g.iter().zip(&c) {
                assert!((a - b).abs() <= 1e-4 * scale, "wgpu {a} vs cpu {b}");
            }
        };
        close(&mg.w.val(), &mc.w.val());
        close(&mg.b.val().unsqueeze(), &mc.b.val().unsqueeze());
    }

    #[test]
    fn rules_must_name_the_groups_of_phi() {
        let cfg = OptimizerConfig::default();
        let grouped = PhiGroups::new(vec![
            ("conv".into(), Phi::init(cfg, 1).unwrap()),
            ("fc".into(), Phi::init(cfg, 2).unwrap()),
        ])
        .unwrap();
        for (rest, rules) in [
            ("fc", vec![]),
            ("fc", vec![("kernel", ParamGroup::all())]),
            (
                "fc",
                vec![("fc", ParamGroup::all()), ("conv", ParamGroup::all())],
            ),
        ] {
            let Err(e) = LearnedOptimizer::for_groups(&grouped, rest, rules) else {
                panic!("rules {rest} accepted")
            };
            assert!(e.to_string().contains("φ has groups [conv,fc]"), "{e}");
        }
    }

    #[test]
    fn a_one_group_file_is_refused_by_load_groups_and_the_reverse() {
        let dir = tempfile::tempdir().unwrap();
        let single = dir.path().join("one.safetensors");
        Phi::init(OptimizerConfig::default(), 1)
            .unwrap()
            .save(&single, Default::default())
            .unwrap();
        let Err(e) = LearnedOptimizer::load_groups(&single, "fc", vec![]) else {
            panic!("a one-group file accepted as groups")
        };
        assert!(e.to_string().contains("LearnedOptimizer::load"), "{e}");
        let grouped = dir.path().join("two.safetensors");
        let cfg = OptimizerConfig::default();
        PhiGroups::new(vec![("fc".into(), Phi::init(cfg, 1).unwrap())])
            .unwrap()
            .save(&grouped, Default::default())
            .unwrap();
        let e = LearnedOptimizer::load(&grouped).unwrap_err();
        assert!(e.to_string().contains("load_groups"), "{e}");
    }
}
