//! `l2l-worker`: runs the learned optimizer on this machine.
//!
//! Offline commands: `init-phi` makes a fresh φ, `gen-problem` a quadratic problem file,
//! `meta-grad` one truncation's meta-gradient, `bench` times the unroll, `eval` compares
//! a learned optimizer with tuned hand-designed ones, `plot` redraws its picture.

mod bench;
mod eval;
mod offline;
mod plot;
mod run_command;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use l2l_common::Preprocess;

/// Unrolls the l2l learned LSTM optimizer (Andrychowicz et al. 2016) and computes its
/// meta-gradients. Files follow the `l2l-lstm/1` spec (safetensors).
#[derive(Debug, Parser)]
#[command(name = "l2l-worker", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Gradient preprocessing of the LSTM's input (spec §1.2).
#[derive(Debug, Clone, Copy, ValueEnum)]
enum PreprocessArg {
    /// One feature: the gradient itself (the paper's choice for quadratics).
    Identity,
    #[value(name = "log_sign")]
    /// Two features: ln|g|/k and sign(g), or -1 and e^k·g for tiny gradients.
    LogSign,
    /// Two features (RNNprop's): g and its running mean, each over the root of a running
    /// second moment, with the two moments carried per coordinate.
    Rnnprop,
}

impl From<PreprocessArg> for Preprocess {
    fn from(p: PreprocessArg) -> Self {
        match p {
            PreprocessArg::Identity => Preprocess::Identity,
            PreprocessArg::LogSign => Preprocess::LogSign,
            PreprocessArg::Rnnprop => Preprocess::Rnnprop,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes a freshly initialised optimizer φ (spec §1.6) to a file.
    InitPhi(offline::InitPhi),
    /// Writes a random problem instance (spec §4.2) to a file.
    GenProblem(offline::GenProblem),
    /// Computes one truncation's meta-gradient from zero LSTM state and θ = theta0.
    MetaGrad(offline::MetaGradArgs),
    /// Times the meta-gradient and the forward-only unroll; prints medians and peak memory.
    Bench(bench::Bench),
    /// Evaluates a learned optimizer against SGD, RMSprop, Adam and NAG with tuned
    /// learning rates on held-out problems; prints a table, writes CSV curves and a PNG.
    Eval(eval::EvalArgs),
    /// Redraws an evaluation's loss.png from its summary.csv and table.txt, without
    /// running it again.
    Plot(eval::PlotArgs),
    /// Joins a coordinator and computes meta-gradients until its run is finished or
    /// SIGTERM/SIGINT arrives; reconnects by itself when the coordinator restarts.
    Run(run_command::RunArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::InitPhi(a) => offline::init_phi(a),
        Command::GenProblem(a) => offline::gen_problem(a),
        Command::MetaGrad(a) => offline::meta_grad(a),
        Command::Bench(a) => bench::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Plot(a) => eval::replot(a),
        Command::Run(a) => run_command::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
