//! The offline commands: `init-phi`, `gen-problem`, `meta-grad`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use l2l_common::engine::{Backend, Engine};
use l2l_common::problems::Optimizee;
use l2l_common::{MetaGradFile, OptimizerConfig, Phi, PhiGroups, Preprocess, Quadratic};

use crate::PreprocessArg;

/// Arguments of `init-phi`.
#[derive(Debug, Args)]
pub struct InitPhi {
    /// Gradient preprocessing.
    #[arg(long, value_enum)]
    preprocess: PreprocessArg,
    /// LSTM hidden size H.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=4096))]
    hidden: u32,
    /// Number of stacked LSTM layers.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    layers: u32,
    /// log_sign's constant k (the paper's p).
    #[arg(long, default_value_t = 10.0)]
    k: f64,
    /// Factor on the network's output [default: 0.1 for log_sign, 1.0 for identity].
    #[arg(long)]
    out_scale: Option<f64>,
    /// Seed of the portable RNG that draws the weights.
    #[arg(long)]
    seed: u64,
    /// One LSTM per parameter group (spec §5), e.g. `conv,fc`: a grouped φ whose group i
    /// is drawn with seed + i. Without it, the one-group φ of spec §4.1.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    /// Where to write φ (safetensors, format l2l-lstm/1).
    #[arg(long)]
    out: PathBuf,
}

/// `init-phi`: writes a fresh φ.
pub fn init_phi(a: InitPhi) -> Result<()> {
    let preprocess: Preprocess = a.preprocess.into();
    let config = OptimizerConfig {
        preprocess,
        k: a.k,
        hidden: a.hidden as usize,
        layers: a.layers as usize,
        out_scale: a.out_scale.unwrap_or(preprocess.default_out_scale()),
    };
    let meta = HashMap::from([("seed".to_string(), a.seed.to_string())]);
    let (numbers, groups) = if a.groups.is_empty() {
        Phi::init(config, a.seed)?.save(&a.out, meta)?;
        (config.num_params(), String::new())
    } else {
        let names: Vec<&str> = a.groups.iter().map(String::as_str).collect();
        PhiGroups::init(config, &names, a.seed)
            .context("--groups")?
            .save(&a.out, meta)?;
        let total = config.num_params() * names.len();
        (total, format!(", groups {}", names.join(",")))
    };
    println!(
        "wrote {} ({numbers} numbers{groups}, {preprocess}, hidden {}, layers {}, k {}, out_scale {})",
        a.out.display(),
        config.hidden,
        config.layers,
        config.k,
        config.out_scale
    );
    Ok(())
}

/// Arguments of `gen-problem`.
#[derive(Debug, Args)]
pub struct GenProblem {
    #[command(subcommand)]
    family: Family,
}

#[derive(Debug, Subcommand)]
enum Family {
    /// B independent d-dimensional quadratics ||W θ − y||² (spec §3.1).
    Quadratic {
        /// B, the number of functions.
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
        batch: u32,
        /// d, the dimension of each function.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=4096))]
        dims: u32,
        /// Seed of the portable RNG (same problem on every machine).
        #[arg(long)]
        seed: u64,
        /// Where to write the problem (safetensors, spec §4.2).
        #[arg(long)]
        out: PathBuf,
    },
}

/// `gen-problem`: writes a problem instance.
pub fn gen_problem(a: GenProblem) -> Result<()> {
    let Family::Quadratic {
        batch,
        dims,
        seed,
        out,
    } = a.family;
    let q = Quadratic::from_seed(seed, batch as usize, dims as usize)?;
    q.save(&out)?;
    println!(
        "wrote {} (quadratic, batch {batch}, dims {dims}, N = {})",
        out.display(),
        q.num_coords()
    );
    Ok(())
}

/// Arguments of `meta-grad`.
#[derive(Debug, Args)]
pub struct MetaGradArgs {
    /// The optimizer φ (safetensors, format l2l-lstm/1).
    #[arg(long)]
    phi: PathBuf,
    /// The problem instance (safetensors, spec §4.2).
    #[arg(long)]
    problem: PathBuf,
    /// T, the number of optimizer steps in the truncation.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    steps: u32,
    /// Where to write ∂L/∂φ (same names and shapes as φ; meta_loss and steps in metadata).
    #[arg(long)]
    out: PathBuf,
    /// Where to compute: `fused` (the fused CPU kernels; `cpu` is accepted too), `flex` (the burn composition on the
    /// CPU, the reference) or `wgpu` (the burn composition on the GPU; needs a build with
    /// `--features wgpu`).
    #[arg(long, alias = "impl", value_enum, default_value_t = Backend::Fused)]
    backend: Backend,
}

/// `meta-grad`: one truncation from zero state and θ_0, in float32.
pub fn meta_grad(a: MetaGradArgs) -> Result<()> {
    let spec = l2l_common::ProblemSpec::from_parts("quadratic", [])?;
    let phi = l2l_common::groups::load_for(&a.phi, &spec).context("cannot load φ (--phi)")?;
    let quad = Quadratic::load(&a.problem).context("cannot load the problem (--problem)")?;
    let steps = a.steps as usize;
    let engine = Engine::open(a.backend).with_context(|| format!("--backend {}", a.backend))?;
    eprintln!("backend {}", engine.describe());
    let problem = engine.load(Optimizee::Quadratic(quad));
    let state = engine.start(&phi, &problem);
    let out = engine.truncation(&phi, &problem, state, 0, steps, None)?;
    MetaGradFile {
        grad: out.grad,
        meta_loss: out.meta_loss,
        steps,
    }
    .save(&a.out)?;
    println!("meta_loss {:.9e}", out.meta_loss);
    println!("wrote {}", a.out.display());
    Ok(())
}
