//! The `conv` family and its two parameter groups (spec §5, §6) through the real
//! binaries: `init-phi --groups`, `meta-grad --instance` on two backends, `local`
//! meta-training with checkpoints and resumption, `eval`, and every refusal of a φ whose
//! kind does not fit the family.

use std::path::Path;

use l2l_common::AnyPhi;
use l2l_common::MetaGradFile;
use l2l_common::problems::mnist::encode_idx;
use l2l_common::rng::Rng;
use l2l_coordinator::checkpoint;
use l2l_tests::{coordinator, text, worker};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A small IDX data set of 12×12 images (both splits) in `dir`, every pixel drawn.
fn write_images(dir: &Path) {
    let mut rng = Rng::new(3);
    for (split, n) in [("train", 120usize), ("t10k", 60)] {
        let pixels: Vec<u8> = (0..n * 144).map(|_| rng.below(256) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i * 7 % 10) as u8).collect();
        std::fs::write(
            dir.join(format!("{split}-images-idx3-ubyte")),
            encode_idx(&[n, 12, 12], &pixels),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("{split}-labels-idx1-ubyte")),
            encode_idx(&[n], &labels),
        )
        .unwrap();
    }
}

const NET: &str = "conv:channels=4,hidden=6,batch=8";

fn init_phi(out: &Path, groups: Option<&str>) {
    let mut args = vec![
        "init-phi",
        "--preprocess",
        "log_sign",
        "--seed",
        "2",
        "--out",
        s(out),
    ];
    if let Some(g) = groups {
        args.extend(["--groups", g]);
    }
    let o = worker(&args);
    assert!(o.status.success(), "{}", text(&o).1);
}

/// `meta-grad` of 4 steps on the instance of seed 5 of `instance`, with `data`.
fn meta_grad(
    phi: &Path,
    instance: &str,
    data: &Path,
    backend: &str,
    out: &Path,
) -> std::process::Output {
    worker(&[
        "meta-grad",
        "--phi",
        s(phi),
        "--instance",
        instance,
        "--seed",
        "5",
        "--data",
        s(data),
        "--steps",
        "4",
        "--backend",
        backend,
        "--out",
        s(out),
    ])
}

/// `worker args` fails with exit code 1 and a message holding every `want`, no panic.
fn refused(out: std::process::Output, want: &[&str]) {
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for w in want {
        assert!(stderr.contains(w), "expected {w:?} in: {stderr}");
    }
}

#[test]
fn a_two_group_meta_gradient_agrees_across_backends_and_misfits_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_images(&data);
    let (two, one) = (dir.path().join("two"), dir.path().join("one"));
    init_phi(&two, Some("conv,fc"));
    init_phi(&one, None);
    let grad = |phi: &Path, instance: &str, backend: &str, out: &Path| {
        meta_grad(phi, instance, &data, backend, out)
    };
    let (fused, flex) = (dir.path().join("fused"), dir.path().join("flex"));
    for (backend, out) in [("fused", &fused), ("flex", &flex)] {
        let o = grad(&two, NET, backend, out);
        assert!(o.status.success(), "{backend}: {}", text(&o).1);
    }
    let (a, b) = (
        MetaGradFile::load(&fused).unwrap(),
        MetaGradFile::load(&flex).unwrap(),
    );
    assert_eq!(
        a.grad.names(),
        Some(vec!["conv", "fc"]),
        "the gradient keeps φ's groups"
    );
    assert!((a.meta_loss - b.meta_loss).abs() < 1e-5 * a.meta_loss);
    // Each group's tensors against the burn composition, to the backends' 1e-3.
    for (i, (x, y)) in a.grad.tensors().zip(b.grad.tensors()).enumerate() {
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(scale > 0.0, "tensor {i} has a gradient");
        assert!(diff <= 1e-3 * scale, "tensor {i}: {diff} of {scale}");
    }
    let parts = a.grad.parts();
    assert_ne!(parts[0], parts[1], "each group's φ gets its own part");

    // bench times the family's truncation and the optimizee's share of it.
    let o = worker(&[
        "bench",
        "--problem",
        NET,
        "--data",
        s(&data),
        "--steps",
        "2",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--backend",
        "fused,flex",
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stdout.contains("groups conv,fc")
            && stdout.contains("optimizee alone (3 loss-and-gradient"),
        "{stdout}"
    );
    let fused = stdout
        .lines()
        .find(|l| l.starts_with("fused"))
        .expect("a fused row");
    // A share, not a timing: both times are measured separately, so with one run on a
    // busy machine it may pass 100%; the test checks that it is computed, not its size.
    let share: f64 = fused.split_whitespace().last().unwrap().parse().unwrap();
    assert!(share.is_finite() && share > 0.0, "{fused}");
    assert!(stdout.lines().any(|l| l.starts_with("flex")), "{stdout}");

    // A one-group φ for the two-group family, and a grouped φ for one LSTM: refused,
    // naming both, nothing written; with lstms=1 the one-group φ fits.
    let wrong = dir.path().join("wrong");
    refused(
        grad(&one, NET, "fused", &wrong),
        &[
            "needs one LSTM per parameter group (conv,fc",
            "init-phi --groups conv,fc",
        ],
    );
    refused(
        grad(&two, &format!("{NET},lstms=1"), "fused", &wrong),
        &[
            "one LSTM per parameter group (conv,fc",
            "has no parameter groups",
        ],
    );
    assert!(!wrong.exists(), "nothing written");
    let o = grad(&one, &format!("{NET},lstms=1"), "fused", &wrong);
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(MetaGradFile::load(&wrong).unwrap().grad.names(), None);

    // Impossible sizes and bad data: a clear error, nothing written.
    let tiny = dir.path().join("tiny");
    std::fs::create_dir(&tiny).unwrap();
    std::fs::write(
        tiny.join("train-images-idx3-ubyte"),
        encode_idx(&[2, 7, 7], &[0; 98]),
    )
    .unwrap();
    std::fs::write(
        tiny.join("train-labels-idx1-ubyte"),
        encode_idx(&[2], &[0, 1]),
    )
    .unwrap();
    let o = meta_grad(&two, NET, &tiny, "fused", &wrong);
    refused(o, &["7×7", "at least 8"]);
    let cifar = dir.path().join("cifar");
    std::fs::create_dir(&cifar).unwrap();
    std::fs::write(cifar.join("data_batch_1.bin"), vec![1u8; 3072]).unwrap();
    let o = meta_grad(&two, NET, &cifar, "fused", &dir.path().join("c"));
    refused(o, &["data_batch_1.bin", "3073-byte records"]);
    assert!(!dir.path().join("c").exists());
}

#[test]
fn local_meta_trains_a_two_group_phi_resumes_it_and_eval_compares_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_images(&data);
    let recipe = dir.path().join("conv.toml");
    std::fs::write(
        &recipe,
        "trajectory_steps = 4\ntruncation_steps = 2\ncheckpoint_every_updates = 2\n\
         [init]\npreprocess = \"log_sign\"\nseed = 1\n\
         [aggregation]\nmode = \"sync\"\nquorum = 1\n\
         [[problems]]\nfamily = \"conv\"\nchannels = 4\nhidden = 6\nbatch = 8\n",
    )
    .unwrap();
    let run = dir.path().join("run");
    let local = |dir: &Path, updates: &str, more: &[&str]| {
        let mut args = vec![
            "local",
            "--workers",
            "1",
            "--config",
            s(&recipe),
            "--data",
            s(&data),
            "--dir",
            s(dir),
            "--max-updates",
            updates,
        ];
        args.extend(more);
        coordinator(&args)
    };
    let o = local(&run, "6", &[]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stdout.contains("--problem conv:"),
        "the eval hint names the family: {stdout}"
    );
    let phi = AnyPhi::load(&run.join("phi.safetensors")).unwrap();
    assert_eq!(
        phi.names(),
        Some(vec!["conv", "fc"]),
        "a fresh conv run has two LSTMs"
    );
    let (_, snap) = checkpoint::load_newest(&run)
        .unwrap()
        .expect("a checkpoint");
    assert_eq!(snap.version, 6);
    assert_eq!(snap.phi, phi);
    assert_eq!(snap.adam.m.len(), phi.num_params());
    // Both groups moved away from their initialisation.
    let fresh = AnyPhi::init(phi.config(), &["conv", "fc"], 1).unwrap();
    for (p, q) in phi.parts().iter().zip(fresh.parts()) {
        assert_ne!(p.flatten(), q.flatten());
    }
    // The same command with a later stop resumes from the checkpoint.
    let o = local(&run, "8", &[]);
    let (_, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    let (_, snap) = checkpoint::load_newest(&run).unwrap().unwrap();
    assert_eq!(snap.version, 8, "resumed, not restarted");

    // A run directory of another kind of φ is refused: a one-group init.phi for conv.
    let one = dir.path().join("one");
    init_phi(&one, None);
    let o = local(&dir.path().join("other"), "2", &["--init-phi", s(&one)]);
    let (_, stderr) = text(&o);
    assert!(
        !o.status.success() && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert!(
        stderr.contains("needs one LSTM per parameter group (conv,fc"),
        "{stderr}"
    );
    assert!(
        checkpoint::load_newest(&dir.path().join("other"))
            .unwrap()
            .is_none()
    );

    // eval compares the trained φ with tuned baselines on held-out instances.
    let out = dir.path().join("eval");
    let o = worker(&[
        "eval",
        "--phi",
        s(&run.join("phi.safetensors")),
        "--problem",
        NET,
        "--data",
        s(&data),
        "--steps",
        "6",
        "--runs",
        "2",
        "--tune-runs",
        "1",
        "--grid-points",
        "3",
        "--refine",
        "1",
        "--baselines",
        "sgd,adam",
        "--out",
        s(&out),
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("learned"), "{stdout}");
    assert!(out.join("table.txt").exists() && out.join("curves.csv").exists());
}
