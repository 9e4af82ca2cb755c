//! The offline commands: `init-phi`, `gen-problem`, `meta-grad`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use l2l_common::engine::{Backend, Engine};
use l2l_common::problems::mnist::Split;
use l2l_common::problems::{DataSource, Optimizee};
use l2l_common::{
    MetaGradFile, OptimizerConfig, Phi, PhiGroups, Preprocess, ProblemSpec, Quadratic,
};

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
    /// Factor on the network's output [default: 0.1 for log_sign and rnnprop, 1.0 for
    /// identity].
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
    /// The optimizer φ (safetensors, format l2l-lstm/1; a grouped φ of spec §5 for a
    /// family with parameter groups, such as `conv`).
    #[arg(long)]
    phi: PathBuf,
    /// A quadratic problem instance file (safetensors, spec §4.2).
    #[arg(
        long,
        required_unless_present = "instance",
        conflicts_with = "instance"
    )]
    problem: Option<PathBuf>,
    /// Instead of --problem: an instance drawn from a family, e.g. `conv` or
    /// `mlp:hidden=40`, with --seed (and --data for families with data).
    #[arg(long, value_name = "FAMILY[:PARAMS]", requires = "seed")]
    instance: Option<ProblemSpec>,
    /// The instance's seed (with --instance).
    #[arg(long, conflicts_with = "problem")]
    seed: Option<u64>,
    /// The data set of --instance (MNIST-format IDX or CIFAR-10 binary files; the
    /// training split is used).
    #[arg(long, env = "L2L_DATA", default_value = l2l_worker::DEFAULT_DATA)]
    data: PathBuf,
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
    let (spec, optimizee) = match (&a.problem, a.instance, a.seed) {
        (Some(path), _, _) => {
            let quad = Quadratic::load(path).context("cannot load the problem (--problem)")?;
            (
                ProblemSpec::from_parts("quadratic", [])?,
                Optimizee::Quadratic(quad),
            )
        }
        (None, Some(spec), Some(seed)) => {
            let mut data = DataSource::new(&a.data, Split::Train);
            let o = spec
                .instance(seed, &mut data)
                .with_context(|| format!("cannot make the {spec} instance of seed {seed}"))?;
            (spec, o)
        }
        _ => anyhow::bail!("give --problem FILE, or --instance FAMILY with --seed"),
    };
    let phi = l2l_common::groups::load_for(&a.phi, &spec).context("cannot load φ (--phi)")?;
    let steps = a.steps as usize;
    let engine = Engine::open(a.backend).with_context(|| format!("--backend {}", a.backend))?;
    eprintln!("backend {}", engine.describe());
    let problem = engine.load(optimizee);
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
