//! The offline commands: `init-phi`, `gen-problem`, `meta-grad`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use l2l_common::burn::tensor::{DType, Device};
use l2l_common::fused::{self, HostCarry};
use l2l_common::unroll::{Carry, meta_grad as compute_meta_grad};
use l2l_common::{Lstm, LstmState, MetaGradFile, OptimizerConfig, Phi, Preprocess, Quadratic};

use crate::{Impl, PreprocessArg};

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
    let phi = Phi::init(config, a.seed)?;
    let meta = HashMap::from([("seed".to_string(), a.seed.to_string())]);
    phi.save(&a.out, meta)?;
    println!(
        "wrote {} ({} numbers, {preprocess}, hidden {}, layers {}, k {}, out_scale {})",
        a.out.display(),
        config.num_params(),
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
    /// Implementation: `fused` (hand-differentiated CPU kernels) or `burn` (the plain burn
    /// composition with autodiff, the reference).
    #[arg(long = "impl", value_enum, default_value_t = Impl::Fused)]
    implementation: Impl,
}

/// `meta-grad`: one truncation from zero state and θ_0, in float32 on the CPU.
pub fn meta_grad(a: MetaGradArgs) -> Result<()> {
    let phi = Phi::load(&a.phi).context("cannot load φ (--phi)")?;
    let quad = Quadratic::load(&a.problem).context("cannot load the problem (--problem)")?;
    let steps = a.steps as usize;
    let (grad, meta_loss) = match a.implementation {
        Impl::Fused => {
            let carry = HostCarry::start(&phi.config, quad.theta0.clone());
            let out = fused::meta_grad(&phi, &quad, carry, 0, steps)?;
            (out.grad, out.meta_loss)
        }
        Impl::Burn => {
            let (dev, dtype) = (Device::flex().autodiff(), DType::F32);
            let carry = Carry {
                theta: quad.theta0(&dev, dtype),
                state: LstmState::zeros(&phi.config, quad.num_coords(), &dev, dtype),
            };
            let lstm = Lstm::new(&phi, &dev, dtype);
            let out = compute_meta_grad(&lstm, &quad.on(&dev, dtype), carry, 0, steps)?;
            (out.grad, out.meta_loss)
        }
    };
    MetaGradFile {
        grad,
        meta_loss,
        steps,
    }
    .save(&a.out)?;
    println!("meta_loss {meta_loss:.9e}");
    println!("wrote {}", a.out.display());
    Ok(())
}
