//! `l2l-worker`'s offline commands as a user runs them: real processes, real files.

use std::path::Path;

use l2l_common::{MetaGradFile, Phi, Preprocess, Quadratic};
use l2l_tests::{text, worker};

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

#[test]
fn init_gen_meta_grad_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let (phi, prob, grad) = (
        dir.path().join("phi"),
        dir.path().join("prob"),
        dir.path().join("grad"),
    );
    let out = worker(&[
        "init-phi",
        "--preprocess",
        "identity",
        "--hidden",
        "8",
        "--seed",
        "3",
        "--out",
        s(&phi),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    let loaded = Phi::load(&phi).unwrap();
    assert_eq!(loaded.config.preprocess, Preprocess::Identity);
    assert_eq!(
        loaded.config.out_scale, 1.0,
        "identity's default out_scale is 1.0"
    );
    assert_eq!(loaded.config.hidden, 8);

    let out = worker(&[
        "gen-problem",
        "quadratic",
        "--batch",
        "4",
        "--seed",
        "9",
        "--out",
        s(&prob),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(
        Quadratic::load(&prob).unwrap(),
        Quadratic::from_seed(9, 4, 10).unwrap()
    );

    let out = worker(&[
        "meta-grad",
        "--phi",
        s(&phi),
        "--problem",
        s(&prob),
        "--steps",
        "5",
        "--out",
        s(&grad),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let file = MetaGradFile::load(&grad).unwrap();
    assert_eq!(file.steps, 5);
    assert_eq!(file.grad.config(), loaded.config);
    // The printed meta-loss is the one in the file.
    let printed: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("meta_loss "))
        .expect("meta-grad prints the meta-loss")
        .parse()
        .unwrap();
    assert!((printed - file.meta_loss).abs() <= 1e-8 * file.meta_loss.abs());

    // The burn composition on the CPU, named the old way (`--impl burn`, now an alias of
    // `--backend flex`), writes the same meta-gradient.
    let flex = dir.path().join("grad-flex");
    let out = worker(&[
        "meta-grad",
        "--phi",
        s(&phi),
        "--problem",
        s(&prob),
        "--steps",
        "5",
        "--impl",
        "burn",
        "--out",
        s(&flex),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(text(&out).1.contains("backend flex ("), "{:?}", text(&out));
    let flex = MetaGradFile::load(&flex).unwrap();
    for (a, b) in flex.grad.tensors().zip(file.grad.tensors()) {
        let scale = b.iter().map(|v| v.abs()).fold(0f32, f32::max);
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-4 * scale, "{diff} vs {scale}");
    }
}

#[test]
fn log_sign_defaults_follow_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let phi = dir.path().join("phi");
    let out = worker(&[
        "init-phi",
        "--preprocess",
        "log_sign",
        "--seed",
        "1",
        "--out",
        s(&phi),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    let c = Phi::load(&phi).unwrap().config;
    assert_eq!((c.hidden, c.layers, c.k, c.out_scale), (20, 2, 10.0, 0.1));
    assert_eq!(c.num_params(), 5141);
}

/// Runs a command that must fail cleanly: non-zero exit, no panic, a message with `want`.
fn refused(args: &[&str], want: &[&str]) {
    let out = worker(args);
    let (_, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(if stderr.contains("For more information") {
            2
        } else {
            1
        }),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    for w in want {
        assert!(stderr.contains(w), "expected {w:?} in: {stderr}");
    }
}

#[test]
fn bad_input_is_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let (phi, prob, grad) = (
        dir.path().join("phi"),
        dir.path().join("prob"),
        dir.path().join("grad"),
    );
    assert!(
        worker(&[
            "init-phi",
            "--preprocess",
            "log_sign",
            "--seed",
            "1",
            "--out",
            s(&phi)
        ])
        .status
        .success()
    );
    assert!(
        worker(&[
            "gen-problem",
            "quadratic",
            "--batch",
            "2",
            "--seed",
            "1",
            "--out",
            s(&prob)
        ])
        .status
        .success()
    );

    refused(
        &[
            "meta-grad",
            "--phi",
            "/nonexistent/phi",
            "--problem",
            s(&prob),
            "--steps",
            "3",
            "--out",
            s(&grad),
        ],
        &["--phi", "/nonexistent/phi", "No such file"],
    );
    refused(
        &[
            "meta-grad",
            "--phi",
            s(&phi),
            "--problem",
            s(&prob),
            "--steps",
            "0",
            "--out",
            s(&grad),
        ],
        &["--steps", "0"],
    );
    refused(
        &[
            "init-phi",
            "--preprocess",
            "sign",
            "--seed",
            "1",
            "--out",
            s(&phi),
        ],
        &["sign", "log_sign", "identity"],
    );
    // A problem file where φ is expected, and the reverse.
    refused(
        &[
            "meta-grad",
            "--phi",
            s(&prob),
            "--problem",
            s(&prob),
            "--steps",
            "3",
            "--out",
            s(&grad),
        ],
        &["metadata field \"format\" is missing"],
    );
    refused(
        &[
            "meta-grad",
            "--phi",
            s(&phi),
            "--problem",
            s(&phi),
            "--steps",
            "3",
            "--out",
            s(&grad),
        ],
        &["--problem", "\"problem\" is missing"],
    );
    // A φ file with a NaN written into its first tensor's data.
    let mut bytes = std::fs::read(&phi).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header..8 + header + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let nan_phi = dir.path().join("nan_phi");
    std::fs::write(&nan_phi, bytes).unwrap();
    refused(
        &[
            "meta-grad",
            "--phi",
            s(&nan_phi),
            "--problem",
            s(&prob),
            "--steps",
            "3",
            "--out",
            s(&grad),
        ],
        &["non-finite"],
    );
    // An output path in a directory that does not exist.
    refused(
        &[
            "meta-grad",
            "--phi",
            s(&phi),
            "--problem",
            s(&prob),
            "--steps",
            "3",
            "--out",
            "/nonexistent/dir/grad",
        ],
        &["/nonexistent/dir/grad"],
    );
    assert!(
        !grad.exists(),
        "no output is written when the command fails"
    );
}

/// Writes a small MNIST-format data set: `n` 4×4 images per split, labels 0..=9.
fn tiny_idx(dir: &Path, n: usize) {
    use l2l_common::problems::mnist::encode_idx;
    for split in ["train", "t10k"] {
        let pixels: Vec<u8> = (0..n * 16).map(|i| ((i * 37) % 256) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        std::fs::write(
            dir.join(format!("{split}-images-idx3-ubyte")),
            encode_idx(&[n, 4, 4], &pixels),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("{split}-labels-idx1-ubyte")),
            encode_idx(&[n], &labels),
        )
        .unwrap();
    }
}

#[test]
fn eval_writes_a_table_csvs_and_a_png() {
    let dir = tempfile::tempdir().unwrap();
    let phi = dir.path().join("phi");
    let out = worker(&[
        "init-phi",
        "--preprocess",
        "log_sign",
        "--seed",
        "1",
        "--out",
        s(&phi),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    tiny_idx(dir.path(), 30);
    for (problem, name) in [
        ("quadratic:batch=4", "quadratic-4x10"),
        ("mlp:hidden=3,batch=8", "mlp-3-sigmoid"),
    ] {
        let out_dir = dir.path().join(name);
        let out = worker(&[
            "eval",
            "--phi",
            s(&phi),
            "--problem",
            problem,
            "--data",
            s(dir.path()),
            "--steps",
            "10",
            "--runs",
            "3",
            "--tune-runs",
            "2",
            "--grid-points",
            "4",
            "--out",
            s(&out_dir),
        ]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{problem}: {stderr}");
        for row in [
            "learned",
            "sgd",
            "rmsprop",
            "adam",
            "nag",
            "step 10: learned/best baseline",
        ] {
            assert!(stdout.contains(row), "{problem}: no {row:?} in\n{stdout}");
        }
        assert!(stdout.starts_with(name), "{stdout}");
        let curves = std::fs::read_to_string(out_dir.join("curves.csv")).unwrap();
        assert!(curves.starts_with("optimizer,lr,run,step,loss\n"));
        // 5 optimizers × 3 runs × 11 points, plus the header.
        assert_eq!(curves.lines().count(), 1 + 5 * 3 * 11, "{problem}");
        let summary = std::fs::read_to_string(out_dir.join("summary.csv")).unwrap();
        assert_eq!(summary.lines().count(), 1 + 5 * 11, "{problem}");
        let png = std::fs::read(out_dir.join("loss.png")).unwrap();
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{problem}: not a PNG"
        );
        // IHDR: width and height, big-endian, at bytes 16..24.
        assert_eq!(&png[16..24], &[0, 0, 3, 232, 0, 0, 2, 138], "1000 × 650");
        // `plot` draws the same picture again from summary.csv and table.txt alone.
        std::fs::remove_file(out_dir.join("loss.png")).unwrap();
        let out = worker(&["plot", s(&out_dir)]);
        assert!(out.status.success(), "{problem}: {:?}", text(&out));
        assert!(
            std::fs::read(out_dir.join("loss.png")).unwrap() == png,
            "{problem}: plot's picture differs from eval's"
        );
    }
    // A summary that is not eval's is refused, naming the line, and nothing is drawn.
    let bad = dir.path().join("bad-summary");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("table.txt"), "quadratic: 3 held-out problems\n").unwrap();
    for (summary, says) in [
        ("optimizer,lr,step,mean\n", "not an eval summary"),
        (
            "optimizer,lr,step,mean,std,p10,p90\nsgd,0.1,1,1,0,1,1\n",
            "line 2: sgd's curve does not start at step 0",
        ),
        (
            "optimizer,lr,step,mean,std,p10,p90\nsgd,0.1,0,1,0,x,1\n",
            "line 2: \"x\" is not a number",
        ),
        ("optimizer,lr,step,mean,std,p10,p90\n", "no curves"),
    ] {
        std::fs::write(bad.join("summary.csv"), summary).unwrap();
        let out = worker(&["plot", s(&bad)]);
        let (_, stderr) = text(&out);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{summary:?}: {stderr}"
        );
        assert!(!bad.join("loss.png").exists());
    }
    // A data directory without the files is refused with what to do.
    let out = worker(&[
        "eval",
        "--phi",
        s(&phi),
        "--problem",
        "mlp",
        "--data",
        "/nonexistent",
        "--out",
        s(&dir.path().join("x")),
    ]);
    let (_, stderr) = text(&out);
    assert!(
        !out.status.success() && stderr.contains("--data"),
        "{stderr}"
    );
}

/// `--lr` fixes a baseline's rate instead of tuning it (the table shows that rate, which
/// no tuning grid holds), the others are still tuned, and bad rates are refused.
#[test]
fn eval_uses_given_rates_and_refuses_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let phi = dir.path().join("phi");
    let out = worker(&[
        "init-phi",
        "--preprocess",
        "log_sign",
        "--seed",
        "1",
        "--out",
        s(&phi),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    let eval = |extra: &[&str], out_dir: &Path| {
        let mut args = vec![
            "eval",
            "--phi",
            s(&phi),
            "--problem",
            "quadratic:batch=4",
            "--steps",
            "10",
            "--runs",
            "2",
            "--tune-runs",
            "2",
            "--grid-lo",
            "-4",
            "--grid-hi",
            "0",
            "--grid-points",
            "5",
            "--refine",
            "1",
            "--out",
            s(out_dir),
        ];
        args.extend_from_slice(extra);
        worker(&args)
    };
    let out_dir = dir.path().join("given");
    let out = eval(&["--baselines", "sgd,nag", "--lr", "sgd=0.123"], &out_dir);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("the rates of sgd given (--lr), the others tuned on 2 other problems"),
        "{stdout}"
    );
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row in\n{stdout}"))
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_eq!(row("sgd"), "0.123");
    // NAG is tuned: its rate is one of the grid's (1e-4, 1e-3, …, 1).
    let nag: f64 = row("nag").parse().unwrap();
    assert!(
        (0..5).any(|k| (nag.log10() - (k as f64 - 4.0)).abs() < 1e-6),
        "nag {nag}"
    );
    let summary = std::fs::read_to_string(out_dir.join("summary.csv")).unwrap();
    assert!(
        summary.lines().any(|l| l.starts_with("sgd,0.123,")),
        "{summary}"
    );

    for (extra, says) in [
        (&["--lr", "sgd=-1"][..], "positive and finite"),
        (&["--lr", "sgd=fast"][..], "is not a number"),
        (&["--lr", "momentum=0.1"][..], "unknown baseline"),
        (&["--lr", "sgd"][..], "BASELINE=RATE"),
        (
            &["--baselines", "sgd", "--lr", "nag=0.1"][..],
            "not among --baselines",
        ),
        (&["--lr", "sgd=0.1,sgd=0.2"][..], "two rates"),
    ] {
        let bad = dir.path().join("bad");
        let out = eval(extra, &bad);
        let (_, stderr) = text(&out);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{extra:?}: {stderr}"
        );
        assert!(!bad.exists(), "{extra:?}: wrote {}", bad.display());
    }
}

/// The shipped optimizers: each loads as the spec's φ, and the quadratic one beats
/// SGD, RMSprop, Adam and NAG, each tuned on a grid of 4 rates per decade, on held-out
/// problems at every reported step (a quick version of `pretrained/eval/quadratic`).
#[test]
fn the_pretrained_optimizers_load_and_the_quadratic_one_beats_tuned_baselines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (file, hidden) in [("quadratic", 20), ("mlp", 20), ("art", 20)] {
        let phi = Phi::load(&root.join(format!("pretrained/{file}.safetensors")))
            .unwrap_or_else(|e| panic!("pretrained/{file}.safetensors: {e}"));
        assert_eq!(phi.config.hidden, hidden, "{file}");
        assert!(phi.flatten().iter().all(|v| v.is_finite()), "{file}");
    }
    // The conv optimizer has two LSTMs, for the kernels and for the rest (spec §5).
    let conv = root.join("pretrained/conv.safetensors");
    let spec: l2l_common::ProblemSpec = "conv".parse().unwrap();
    let phi = l2l_common::groups::load_for(&conv, &spec)
        .unwrap_or_else(|e| panic!("pretrained/conv.safetensors: {e}"));
    assert_eq!(phi.names(), Some(vec!["conv", "fc"]));
    assert!(phi.flatten().iter().all(|v| v.is_finite()));
    let dir = tempfile::tempdir().unwrap();
    let out = worker(&[
        "eval",
        "--phi",
        s(&root.join("pretrained/quadratic.safetensors")),
        "--problem",
        "quadratic",
        "--runs",
        "10",
        "--tune-runs",
        "5",
        "--grid-lo",
        "-4",
        "--grid-hi",
        "1",
        "--grid-points",
        "21",
        "--seed",
        "12345",
        "--out",
        s(dir.path()),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    // "step 100: learned/best baseline (adam) = 0.711; learned lower on 10 of 10 problems"
    let ratios: Vec<(String, f64)> = stdout
        .lines()
        .filter(|l| l.contains("learned/best baseline"))
        .map(|l| {
            let at = l.split(':').next().unwrap().to_string();
            let r = l.split("= ").nth(1).unwrap();
            let r = r.split(';').next().unwrap().trim().parse().unwrap();
            (at, r)
        })
        .collect();
    assert_eq!(ratios.len(), 4, "steps 20, 50, 100 and the mean:\n{stdout}");
    for (at, r) in &ratios {
        assert!(
            *r < 0.9,
            "{at}: learned/best tuned baseline = {r}\n{stdout}"
        );
    }
    assert!(
        stdout.contains("step 100: learned/best baseline")
            && stdout.contains("learned lower on 10 of 10 problems"),
        "{stdout}"
    );
}

/// `init-phi --groups` writes a grouped φ (spec §5); the commands whose families have no
/// parameter groups refuse it, naming the groups and the family, and write nothing.
#[test]
fn a_grouped_phi_is_written_and_refused_by_families_without_groups() {
    use l2l_common::PhiGroups;
    let dir = tempfile::tempdir().unwrap();
    let (phi, prob, grad) = (
        dir.path().join("phi"),
        dir.path().join("prob"),
        dir.path().join("grad"),
    );
    let out = worker(&[
        "init-phi",
        "--preprocess",
        "log_sign",
        "--groups",
        "conv,fc",
        "--seed",
        "4",
        "--out",
        s(&phi),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("10282 numbers, groups conv,fc"), "{stdout}");
    let groups = PhiGroups::load(&phi).unwrap();
    assert_eq!(groups.names(), ["conv", "fc"]);
    let cfg = groups.config();
    assert_eq!(groups.get("fc").unwrap(), &Phi::init(cfg, 5).unwrap());
    assert!(
        worker(&["gen-problem", "quadratic", "--seed", "1", "--out", s(&prob)])
            .status
            .success()
    );
    refused(
        &[
            "meta-grad",
            "--phi",
            s(&phi),
            "--problem",
            s(&prob),
            "--steps",
            "3",
            "--out",
            s(&grad),
        ],
        &[
            "one LSTM per parameter group (conv,fc",
            "problem quadratic",
            "has no parameter groups",
        ],
    );
    refused(
        &[
            "eval",
            "--phi",
            s(&phi),
            "--out",
            s(&dir.path().join("eval")),
        ],
        &[
            "one LSTM per parameter group (conv,fc",
            "problem quadratic",
            "has no parameter groups",
        ],
    );
    assert!(
        !grad.exists() && !dir.path().join("eval").exists(),
        "nothing written"
    );
    refused(
        &[
            "init-phi",
            "--preprocess",
            "log_sign",
            "--groups",
            "conv,conv",
            "--seed",
            "1",
            "--out",
            s(&grad),
        ],
        &["--groups", "named twice"],
    );
    assert!(!grad.exists());
}

/// A worker whose `--data` differs from the run's is refused `wrong_data` and stops,
/// naming its files; the worker with the run's data trains on.
#[test]
fn a_worker_with_other_data_is_refused_and_stops() {
    use l2l_tests::{Coordinator, Proc, binary, refused, version};
    use std::process::Stdio;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = (dir.path().join("good"), dir.path().join("bad"));
    for (d, n) in [(&good, 30), (&bad, 31)] {
        std::fs::create_dir_all(d).unwrap();
        tiny_idx(d, n);
    }
    let config = dir.path().join("mlp.toml");
    std::fs::write(
        &config,
        "trajectory_steps = 4\ntruncation_steps = 2\n\
         [aggregation]\nmode = \"async\"\nevery = 1\n\
         [[problems]]\nfamily = \"mlp\"\nhidden = [3]\nbatch = 8\n",
    )
    .unwrap();
    let c = Coordinator::serve(
        &dir.path().join("run"),
        "127.0.0.1:0",
        &["--config", s(&config)],
    );
    let start = |data: &Path, name: &str| -> Proc {
        let log = dir.path().join(format!("{name}.log"));
        let child = std::process::Command::new(binary("l2l-worker"))
            .args([
                "run",
                "--coordinator",
                &c.url(),
                "--name",
                name,
                "--threads",
                "1",
            ])
            .args(["--data", s(data), "--max-backoff-ms", "500"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        Proc { child }
    };
    let _a = start(&good, "good");
    c.wait_for(
        Duration::from_secs(60),
        "updates from the good worker",
        |s| version(s) >= 2,
    );
    let mut b = start(&bad, "bad");
    let status = b.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "the worker with other data must stop");
    let log = std::fs::read_to_string(dir.path().join("bad.log")).unwrap();
    assert!(
        log.contains("refused this worker's training data") && log.contains(s(&bad)),
        "{log}"
    );
    let s0 = c.wait_for(Duration::from_secs(30), "a wrong_data refusal", |s| {
        refused(s, "wrong_data") >= 1
    });
    let v = version(&s0);
    c.wait_for(Duration::from_secs(60), "the good worker to go on", |s| {
        version(s) > v
    });
}
