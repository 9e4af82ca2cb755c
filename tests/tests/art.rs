//! The `art` family (spec §6, neural art) through the real binaries: `local`
//! meta-training on a directory of images with validation, `eval` with its pictures, and
//! the refusals of bad images, sizes and options (a clear error, nothing written).

use std::path::Path;

use l2l_common::problems::images::{Image, write_png};
use l2l_common::rng::Rng;
use l2l_tests::{coordinator, text, worker};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Random images in `dir`: photographs `a` (40×36) and `b` (30×30), a style `st`
/// (24×24), a `tiny` one (10×10) and a file `junk.png` that is no image.
fn write_images(dir: &Path) {
    let mut rng = Rng::new(7);
    let mut noise = |h: usize, w: usize| {
        Image::new(h, w, (0..3 * h * w).map(|_| rng.uniform() as f32).collect()).unwrap()
    };
    for (name, h, w) in [
        ("a", 36, 40),
        ("b", 30, 30),
        ("st", 24, 24),
        ("tiny", 10, 10),
    ] {
        write_png(&dir.join(format!("{name}.png")), &noise(h, w)).unwrap();
    }
    std::fs::write(dir.join("junk.png"), b"no picture").unwrap();
}

const PROBLEM: &str = "art:size=16,content=a+b,style=st";

#[test]
fn local_meta_trains_on_images_and_eval_draws_what_each_optimizer_made() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("images");
    std::fs::create_dir(&data).unwrap();
    write_images(&data);
    let recipe = dir.path().join("art.toml");
    std::fs::write(
        &recipe,
        "trajectory_steps = 4\ntruncation_steps = 2\ncheckpoint_every_updates = 2\n\
         [init]\npreprocess = \"log_sign\"\nseed = 1\n\
         [aggregation]\nmode = \"sync\"\nquorum = 1\n\
         [validation]\nevery = 2\ninstances = 2\ntune_instances = 1\n\
         [[problems]]\nfamily = \"art\"\nsize = 16\ncontent = \"a+b\"\nstyle = \"st\"\n",
    )
    .unwrap();
    let run = dir.path().join("run");
    let o = coordinator(&[
        "local",
        "--workers",
        "1",
        "--config",
        s(&recipe),
        "--data",
        s(&data),
        "--dir",
        s(&run),
        "--max-updates",
        "4",
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("--problem art:"), "{stdout}");
    // Validated at updates 0, 2 and 4 on held-out crops, the best φ kept.
    let csv = std::fs::read_to_string(run.join("validation.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(run.join("best.safetensors").exists());

    // eval: the table, and one picture grid per drawn problem, a PNG of the grid's size.
    let out = dir.path().join("eval");
    let o = worker(&[
        "eval",
        "--phi",
        s(&run.join("phi.safetensors")),
        "--problem",
        PROBLEM,
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
        "--pictures",
        "2",
        "--out",
        s(&out),
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(stdout.contains("images from"), "{stdout}");
    for i in 0..2 {
        let p = out.join(format!("pictures/problem-{i}.png"));
        let img = l2l_common::problems::images::read(&p).unwrap();
        // Columns: content, style, learned, sgd, adam; rows: steps 1, 3, 6 (16-pixel
        // images enlarged 10×): 90 + 5·170 + 10 wide, 2·22 + 10 + 3·(160 + 22 + 10) + 10.
        assert_eq!((img.width, img.height), (950, 640), "{}", p.display());
    }
}

#[test]
fn bad_images_sizes_and_options_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("images");
    std::fs::create_dir(&data).unwrap();
    write_images(&data);
    let phi = dir.path().join("phi");
    let o = worker(&[
        "init-phi",
        "--preprocess",
        "log_sign",
        "--seed",
        "1",
        "--out",
        s(&phi),
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let out = dir.path().join("out");
    let eval = |problem: &str, more: &[&str]| {
        let mut args = vec![
            "eval",
            "--phi",
            s(&phi),
            "--problem",
            problem,
            "--data",
            s(&data),
            "--steps",
            "2",
            "--runs",
            "1",
            "--tune-runs",
            "1",
            "--out",
            s(&out),
        ];
        args.extend(more);
        worker(&args)
    };
    for (problem, more, want) in [
        (
            "art:size=16,content=tiny,style=st",
            &[][..],
            "needs at least 16×16",
        ),
        ("art:size=16,content=a,style=tiny", &[][..], "style image"),
        (
            "art:size=16,content=missing,style=st",
            &[][..],
            "no image \"missing\"",
        ),
        (
            "art:size=16,content=junk,style=st",
            &[][..],
            "not a readable PNG or JPEG",
        ),
        (
            "art:size=8,content=a,style=st",
            &[][..],
            "give an image side in 16..=512",
        ),
        (
            "art:size=64,content=a,style=st",
            &[][..],
            "needs at least 64×64",
        ),
        ("art:style=../images/st", &[][..], "letters, digits"),
        (
            "quadratic",
            &["--pictures", "1"][..],
            "only art problems are images",
        ),
        (PROBLEM, &["--pictures", "3"][..], "more than --runs"),
    ] {
        let o = eval(problem, more);
        let (_, stderr) = text(&o);
        assert!(!o.status.success(), "{problem} {more:?} was accepted");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains(want), "{problem}: {stderr}");
        assert!(!out.exists(), "{problem}: something was written");
    }

    // `local` whose workers cannot find the images stops with the reason, not with a
    // trained φ: every worker failed before the first update.
    let recipe = dir.path().join("art.toml");
    std::fs::write(
        &recipe,
        "trajectory_steps = 4\ntruncation_steps = 2\n\
         [[problems]]\nfamily = \"art\"\nsize = 16\ncontent = \"nowhere\"\nstyle = \"st\"\n",
    )
    .unwrap();
    let o = coordinator(&[
        "local",
        "--workers",
        "1",
        "--config",
        s(&recipe),
        "--data",
        s(&data),
        "--dir",
        s(&dir.path().join("run")),
        "--max-updates",
        "2",
    ]);
    let (stdout, stderr) = text(&o);
    assert!(!o.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("every worker stopped before the run's 2 updates")
            && stderr.contains("no image \"nowhere\"")
            && stderr.contains("run the same command again to resume"),
        "{stderr}"
    );
    assert!(!stdout.contains("learned optimizer φ written"), "{stdout}");
}
