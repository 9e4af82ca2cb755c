//! The Python loader (`python/l2l_optimizer.py`) computes the updates the Rust burn
//! optimizer computes: Rust writes φ, gradients and its own updates; Python replays them
//! with the LSTM state carried across steps and must agree elementwise to 1e-4 (float32
//! matmuls and transcendentals rounded differently; measured worst 1.6e-5).
//!
//! Needs `python3` with numpy and safetensors (`pip install numpy safetensors`, as
//! `.ci/run` does).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use l2l_common::burn::optim::Optimizer;
use l2l_common::burn::tensor::{DType, Device, Tensor};
use l2l_common::files::{NamedTensor, encode, write_atomic};
use l2l_common::optimizer::{LearnedOptimizer, LearnedState};
use l2l_common::rng::Rng;
use l2l_common::tensor::{from_f32, to_f32};
use l2l_common::{OptimizerConfig, Phi, PhiGroups, Preprocess};
use l2l_tests::skip;

/// Steps of every fixture.
const STEPS: usize = 6;
/// The learning rate (a multiplier on the learned step), not 1 so Python must apply it.
const LR: f64 = 0.5;

/// Gradients spread over 14 decades, both signs and a few exact zeros, so both branches of
/// log_sign (|g| ≥ e^-k and below) run for k = 10.
fn gradients(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n)
        .map(|i| {
            if i % 11 == 0 {
                return 0.0;
            }
            let mag = 10f64.powf(rng.uniform_in(-12.0, 2.0));
            (if rng.below(2) == 0 { mag } else { -mag }) as f32
        })
        .collect()
}

/// Runs `optim` on one tensor of `shape` for [`STEPS`] steps from θ = 0, so each
/// returned tensor is exactly lr · u; returns (gradient, update) per step.
fn updates<const D: usize>(
    optim: &LearnedOptimizer,
    shape: [usize; D],
    rng: &mut Rng,
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let dev = Device::flex();
    let n: usize = shape.iter().product();
    let mut state: Option<LearnedState<D>> = None;
    (0..STEPS)
        .map(|_| {
            let g = gradients(n, rng);
            let zeros = Tensor::<D>::zeros(shape, (&dev, DType::F32));
            let grad = from_f32(&g, shape, &dev, DType::F32);
            let (u, next) = optim.step(LR, zeros, grad, state.take());
            state = next;
            (g, to_f32(&u).unwrap())
        })
        .collect()
}

/// Writes one fixture: φ (one group, or groups), `steps.safetensors` and `case.json`.
fn fixture(dir: &Path, phi: Kind, seed: u64) {
    let mut rng = Rng::new(seed);
    let (opts, groups): (Vec<(Option<String>, LearnedOptimizer)>, bool) = match &phi {
        Kind::One(p) => {
            p.save(&dir.join("phi.safetensors"), HashMap::new())
                .unwrap();
            (vec![(None, LearnedOptimizer::new(p.clone()))], false)
        }
        Kind::Groups(g) => {
            g.save(&dir.join("phi.safetensors"), HashMap::new())
                .unwrap();
            let opts = g
                .groups()
                .iter()
                .map(|(n, p)| (Some(n.clone()), LearnedOptimizer::new(p.clone())))
                .collect();
            (opts, true)
        }
    };
    // Tensors of rank 1, 2 and 3, spread over the groups in turn.
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut params = serde_json::Map::new();
    let shapes: [&[usize]; 3] = [&[7], &[5, 9], &[2, 3, 4]];
    for (i, shape) in shapes.into_iter().enumerate() {
        let (group, optim) = &opts[i % opts.len()];
        let steps = match shape.len() {
            1 => updates(optim, [shape[0]], &mut rng),
            2 => updates(optim, [shape[0], shape[1]], &mut rng),
            _ => updates(optim, [shape[0], shape[1], shape[2]], &mut rng),
        };
        let name = format!("p{i}");
        for (t, (g, u)) in steps.into_iter().enumerate() {
            tensors.push((format!("grad.{t}.{name}"), shape.to_vec(), g));
            tensors.push((format!("update.{t}.{name}"), shape.to_vec(), u));
        }
        let n: usize = shape.iter().product();
        params.insert(name, serde_json::json!([group, n]));
    }
    let named: Vec<NamedTensor<'_>> = tensors
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice()))
        .collect();
    let bytes = encode(&named, HashMap::new()).unwrap();
    write_atomic(&dir.join("steps.safetensors"), &bytes).unwrap();
    let case = serde_json::json!({
        "phi": "phi.safetensors",
        "groups": groups,
        "params": params,
        "steps": STEPS,
        "lr": LR,
        "bound": 1e-4,
    });
    std::fs::write(dir.join("case.json"), case.to_string()).unwrap();
}

/// The φ of a fixture: one group, or groups.
enum Kind {
    One(Phi),
    Groups(PhiGroups),
}

fn shipped(name: &str) -> Phi {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../pretrained")
        .join(name);
    Phi::load(&path).unwrap()
}

fn python_has_numpy_and_safetensors() -> bool {
    Command::new("python3")
        .args(["-c", "import numpy, safetensors"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn python_reproduces_the_rust_updates() {
    if !python_has_numpy_and_safetensors() {
        skip("python3 with numpy and safetensors is needed: pip install numpy safetensors");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let identity = OptimizerConfig {
        hidden: 5,
        layers: 3,
        ..OptimizerConfig::new(Preprocess::Identity)
    };
    let k5 = OptimizerConfig {
        k: 5.0,
        ..OptimizerConfig::new(Preprocess::LogSign)
    };
    let cases = [
        ("mlp", Kind::One(shipped("mlp.safetensors"))),
        ("quadratic", Kind::One(shipped("quadratic.safetensors"))),
        ("identity", Kind::One(Phi::init(identity, 3).unwrap())),
        // rnnprop's moments carried across the steps, on both sides.
        (
            "rnnprop",
            Kind::One(Phi::init(OptimizerConfig::new(Preprocess::Rnnprop), 6).unwrap()),
        ),
        (
            "groups",
            Kind::Groups(
                PhiGroups::new(vec![
                    ("conv".into(), Phi::init(k5, 4).unwrap()),
                    ("fc".into(), Phi::init(k5, 5).unwrap()),
                ])
                .unwrap(),
            ),
        ),
    ];
    let mut dirs = Vec::new();
    for (i, (name, phi)) in cases.into_iter().enumerate() {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        fixture(&dir, phi, 100 + i as u64);
        dirs.push(dir);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../python/l2l_optimizer.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(&dirs)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!("{stdout}{stderr}");
    assert!(out.status.success(), "python disagrees:\n{stdout}{stderr}");
    assert_eq!(
        stdout.lines().count(),
        dirs.len(),
        "one line per fixture: {stdout}"
    );
}

#[test]
fn python_refuses_the_wrong_kind_of_file_with_the_loader_to_use() {
    if !python_has_numpy_and_safetensors() {
        skip("python3 with numpy and safetensors is needed: pip install numpy safetensors");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.safetensors");
    let two = dir.path().join("two.safetensors");
    let cfg = OptimizerConfig::default();
    Phi::init(cfg, 1)
        .unwrap()
        .save(&one, HashMap::new())
        .unwrap();
    PhiGroups::new(vec![("fc".into(), Phi::init(cfg, 2).unwrap())])
        .unwrap()
        .save(&two, HashMap::new())
        .unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a file of ours").unwrap();
    let py = format!(
        "import sys; sys.path.insert(0, {:?})\n\
         import l2l_optimizer as l\n\
         for f, p in [(l.load, {:?}), (l.load_groups, {:?}), (l.load, {:?})]:\n\
         \x20   try:\n\
         \x20       f(p); print('loaded', p)\n\
         \x20   except l.FormatError as e:\n\
         \x20       print(e)\n",
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../python"),
        two,
        one,
        garbage
    );
    let out = Command::new("python3").args(["-c", &py]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].contains("use load_groups"), "{stdout}");
    assert!(lines[1].contains("use load"), "{stdout}");
    assert!(lines[2].contains("not a safetensors file"), "{stdout}");
}
