//! Trains a small burn model on Fashion-MNIST twice, from the same initial weights and on
//! the same minibatches: once with the shipped learned optimizer
//! (`pretrained/mlp.safetensors`) and once with burn's own Adam, and prints both loss
//! curves and the test-set results.
//!
//!     apt-get install dataset-fashion-mnist        # or --data DIR with any MNIST-format IDX files
//!     cargo run --example learned_optimizer
//!
//! The learned optimizer is used like any burn optimizer: `optim.step(lr, model, grads)`,
//! with `lr = 1.0` meaning "as meta-trained". The model is the network the optimizer was
//! meta-trained on (one hidden layer of 20 sigmoid units, minibatches of 128), for the
//! horizon it was meta-trained for (100 steps). On the 2-core development machine
//! (Fashion-MNIST, seed 0) it printed, after 100 steps:
//!
//!     training loss: learned 0.547, adam 0.830
//!     test set: learned loss 0.570, accuracy 79.8%; adam (lr 0.03) loss 0.792, accuracy 70.7%
//!
//! Adam's rate 0.03 is the best of 0.01, 0.03, 0.1 and 0.3 here (test accuracy 63.8%,
//! 70.7%, 59.2%, 52.5%), near the 0.0205 that `l2l-worker eval` tunes for Adam on this
//! network (`pretrained/eval/mlp/table.txt`).
//! One seed, one run: `l2l-worker eval` is the honest comparison (held-out networks,
//! every baseline tuned). Other seeds, rates and data: `--help`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::module::{Module, Param};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::activation::{log_softmax, sigmoid};
use burn::tensor::{DType, Device, Tensor};
use clap::Parser;
use l2l_common::optimizer::LearnedOptimizer;
use l2l_common::problems::mnist::{Dataset, Split};
use l2l_common::rng::Rng;
use l2l_common::tensor::{from_f32, to_f64};

/// Arguments (every one has a default).
#[derive(Parser)]
#[command(about = "Train a burn model with a learned optimizer beside burn's Adam")]
struct Args {
    /// MNIST-format IDX files (train-* and t10k-*, plain or .gz).
    #[arg(
        long,
        env = "L2L_DATA",
        default_value = "/usr/share/datasets/fashion-mnist"
    )]
    data: PathBuf,
    /// The learned optimizer: an l2l-lstm/1 file.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../pretrained/mlp.safetensors"))]
    phi: PathBuf,
    /// Training steps (the shipped optimizer was meta-trained for 100).
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Multiplier on the learned step (1.0: as meta-trained).
    #[arg(long, default_value_t = 1.0)]
    learned_lr: f64,
    /// Adam's learning rate (0.03: the best of 0.01, 0.03, 0.1 and 0.3 on this example).
    #[arg(long, default_value_t = 0.03)]
    adam_lr: f64,
    /// Seed of the initial weights and of the minibatches.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// A fully connected layer.
#[derive(Module, Debug)]
struct Linear {
    weight: Param<Tensor<2>>,
    bias: Param<Tensor<1>>,
}

/// 784 → 20 sigmoid → 10, the network the shipped optimizer was meta-trained on.
#[derive(Module, Debug)]
struct Model {
    hidden: Linear,
    output: Linear,
}

impl Linear {
    fn new(inputs: usize, outputs: usize, rng: &mut Rng, dev: &Device) -> Self {
        let mut normal =
            |n: usize| -> Vec<f32> { (0..n).map(|_| (0.01 * rng.normal()) as f32).collect() };
        let w = from_f32(
            &normal(inputs * outputs),
            [inputs, outputs],
            dev,
            DType::F32,
        );
        let b = from_f32(&normal(outputs), [outputs], dev, DType::F32);
        Self {
            weight: Param::from_tensor(w.require_grad()),
            bias: Param::from_tensor(b.require_grad()),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        x.matmul(self.weight.val()) + self.bias.val().unsqueeze_dim(0)
    }
}

impl Model {
    fn logits(&self, x: Tensor<2>) -> Tensor<2> {
        self.output.forward(sigmoid(self.hidden.forward(x)))
    }

    /// Mean cross-entropy against one-hot labels.
    fn loss(&self, x: Tensor<2>, onehot: Tensor<2>) -> Tensor<1> {
        (log_softmax(self.logits(x), 1) * onehot)
            .sum_dim(1)
            .mean()
            .neg()
    }
}

/// Images `[rows, 784]` in [0, 1] and one-hot labels of the examples `idx`.
fn tensors(data: &Dataset, idx: &[usize], dev: &Device) -> (Tensor<2>, Tensor<2>) {
    let x: Vec<f32> = idx.iter().flat_map(|i| data.image(*i)).collect();
    let mut y = vec![0f32; idx.len() * 10];
    for (r, i) in idx.iter().enumerate() {
        y[r * 10 + data.labels[*i] as usize] = 1.0;
    }
    (
        from_f32(&x, [idx.len(), data.pixels], dev, DType::F32),
        from_f32(&y, [idx.len(), 10], dev, DType::F32),
    )
}

/// Trains `model` for `steps` minibatches of 128; returns the loss before each step
/// (and after the last) and the trained model.
fn train(
    mut model: Model,
    optim: &mut ModuleOptimizer,
    lr: f64,
    batches: &[Vec<usize>],
    data: &Dataset,
    dev: &Device,
) -> Result<(Vec<f64>, Model)> {
    let mut losses = Vec::with_capacity(batches.len());
    for (t, idx) in batches.iter().enumerate() {
        let (x, y) = tensors(data, idx, dev);
        let loss = model.loss(x, y);
        losses.push(to_f64(&loss)?[0]);
        if t + 1 < batches.len() {
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
        }
    }
    Ok((losses, model))
}

/// Test-set loss and accuracy.
fn test(model: &Model, data: &Dataset, dev: &Device) -> Result<(f64, f64)> {
    let idx: Vec<usize> = (0..data.len()).collect();
    let (x, y) = tensors(data, &idx, dev);
    let logits = model.logits(x);
    let loss = (log_softmax(logits.clone(), 1) * y.clone())
        .sum_dim(1)
        .mean()
        .neg();
    let right = logits.argmax(1).equal(y.argmax(1)).float().sum();
    Ok((to_f64(&loss)?[0], to_f64(&right)?[0] / data.len() as f64))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let load = |split| {
        Dataset::load(&args.data, split).with_context(|| {
            format!(
                "no MNIST-format data in {}: install Fashion-MNIST (Debian: apt-get install \
                 dataset-fashion-mnist) or give --data DIR",
                args.data.display()
            )
        })
    };
    let (train_set, test_set) = (load(Split::Train)?, load(Split::Test)?);
    let learned = LearnedOptimizer::load(&args.phi)
        .with_context(|| format!("cannot load the learned optimizer {}", args.phi.display()))?;
    println!(
        "{} training and {} test images from {}; learned optimizer {} ({}, H = {}, {} layers)",
        train_set.len(),
        test_set.len(),
        args.data.display(),
        args.phi.display(),
        learned.phi().config.preprocess,
        learned.phi().config.hidden,
        learned.phi().config.layers
    );

    let dev = Device::flex().autodiff();
    let mut rng = Rng::new(args.seed);
    let model = Model {
        hidden: Linear::new(train_set.pixels, 20, &mut rng, &dev),
        output: Linear::new(20, 10, &mut rng, &dev),
    };
    let batches: Vec<Vec<usize>> = (0..=args.steps)
        .map(|_| {
            (0..128)
                .map(|_| rng.below(train_set.len() as u64) as usize)
                .collect()
        })
        .collect();

    let (l_curve, l_model) = train(
        model.clone(),
        &mut learned.init(),
        args.learned_lr,
        &batches,
        &train_set,
        &dev,
    )?;
    let (a_curve, a_model) = train(
        model,
        &mut AdamConfig::new().init(),
        args.adam_lr,
        &batches,
        &train_set,
        &dev,
    )?;

    println!("training loss (the step's minibatch)");
    println!("  step    learned       adam");
    for t in (0..=args.steps).filter(|t| t % 10 == 0 || *t == args.steps) {
        println!("{t:>6} {:>10.4} {:>10.4}", l_curve[t], a_curve[t]);
    }
    let (ll, la) = test(&l_model, &test_set, &dev)?;
    let (al, aa) = test(&a_model, &test_set, &dev)?;
    println!(
        "test set after {} steps: learned loss {ll:.4}, accuracy {:.1}%; adam (lr {}) loss {al:.4}, accuracy {:.1}%",
        args.steps,
        100.0 * la,
        args.adam_lr,
        100.0 * aa
    );
    Ok(())
}
