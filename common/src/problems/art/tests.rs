//! The art loss against f64 central differences and closed forms, and its refusals.

use super::*;
use crate::problems::images::write_png;

/// A random image of h×w pixels in [0, 1].
fn noise(h: usize, w: usize, seed: u64) -> Image {
    let mut rng = Rng::new(seed);
    Image::new(h, w, (0..3 * h * w).map(|_| rng.uniform() as f32).collect()).unwrap()
}

fn spec(size: usize) -> ArtSpec {
    ArtSpec {
        size,
        ..ArtSpec::default()
    }
}

/// An instance of side `size` on random content and style images.
pub(crate) fn tiny(size: usize) -> Art {
    small(size)
}

fn small(size: usize) -> Art {
    let content = noise(size, size, 1);
    let style = noise(size + 7, size + 3, 2);
    Art::from_images(spec(size), "noise".into(), content, style, Rng::new(3)).unwrap()
}

#[test]
fn the_gradient_matches_central_differences_in_f64() {
    // 17×17 (odd: a partial last block of rows at every scale), θ far from θ₀.
    let art = small(17);
    let mut rng = Rng::new(9);
    let theta: Vec<f64> = (0..art.theta0.len())
        .map(|_| 0.5 + 0.3 * rng.normal())
        .collect();
    let mut g = vec![0f64; theta.len()];
    let f0 = art.loss_grad(&theta, &mut g);
    let [c, s, tv] = art.terms(&theta);
    assert!(c > 0.0 && s > 0.0 && tv > 0.0, "{c} {s} {tv}");
    assert!((f0 - (ALPHA * c + BETA * s + GAMMA * tv)).abs() <= 1e-12 * f0.abs());
    let h = 1e-6;
    let scale = g.iter().fold(0f64, |m, v| m.max(v.abs()));
    let mut scratch = vec![0f64; theta.len()];
    let mut worst = 0f64;
    for i in 0..theta.len() {
        let mut t = theta.clone();
        t[i] += h;
        let up = art.loss_grad(&t, &mut scratch);
        t[i] -= 2.0 * h;
        let down = art.loss_grad(&t, &mut scratch);
        let fd = (up - down) / (2.0 * h);
        worst = worst.max((fd - g[i]).abs() / scale);
    }
    assert!(worst < 1e-6, "worst relative error {worst:e}");
}

#[test]
fn each_term_is_zero_at_its_target_and_tv_has_its_closed_form() {
    // θ = the content crop: content 0. A style image of θ's size and θ = it: style 0.
    let size = 16;
    let content = noise(size, size, 4);
    let art = Art::from_images(
        spec(size),
        "c".into(),
        content.clone(),
        content.clone(),
        Rng::new(1),
    )
    .unwrap();
    let theta: Vec<f64> = content.pixels.iter().map(|v| *v as f64).collect();
    let [c, s, _] = art.terms(&theta);
    assert_eq!((c, s), (0.0, 0.0));
    // A constant image has no variation; one whose channel 0 alternates 0, 1 along rows
    // (column x has value x mod 2) has (size − 1) unit horizontal steps per row in one
    // channel: TV = size·(size − 1) / (3·size²).
    let flat = vec![0.3f64; 3 * size * size];
    assert_eq!(art.terms(&flat)[2], 0.0);
    let mut stripes = flat.clone();
    for y in 0..size {
        for x in 0..size {
            stripes[y * size + x] = (x % 2) as f64;
        }
    }
    let want = (size * (size - 1)) as f64 / (3 * size * size) as f64;
    assert!((art.terms(&stripes)[2] - want).abs() < 1e-15);
}

#[test]
fn the_result_does_not_depend_on_the_thread_count() {
    let art = small(40);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut g = vec![0f32; art.theta0.len()];
        let f = pool.install(|| art.loss_grad(&art.theta0, &mut g));
        (
            f.to_bits(),
            g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn instances_crop_the_shrunk_photograph_and_bad_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // 70×50: shrunk by ⌊50 / 32⌋ = 1 for size 16 (kept whole), by 3 for size ... none.
    write_png(&dir.path().join("photo.png"), &noise(50, 70, 5)).unwrap();
    write_png(&dir.path().join("style.png"), &noise(40, 40, 6)).unwrap();
    write_png(&dir.path().join("tiny.png"), &noise(12, 12, 7)).unwrap();
    let images = ImageSet::new(dir.path());
    let spec = |size: usize, content: &str, style: &str| ArtSpec {
        size,
        content: vec![content.to_string()],
        style: style.to_string(),
    };
    let a = Art::new(spec(16, "photo", "style"), &images, 11).unwrap();
    let b = Art::new(spec(16, "photo", "style"), &images, 11).unwrap();
    assert_eq!(a.theta0, b.theta0);
    assert_eq!(a.content, b.content);
    // The crop is a window of the photograph (shrunk by 1: itself).
    let photo = images.get("photo").unwrap();
    let found =
        (0..=50 - 16).any(|y| (0..=70 - 16).any(|x| photo.crop(y, x, 16, 16) == *a.content));
    assert!(found);
    // Size 16 from a 40×40 style image: shrunk by ⌊40 / 32⌋ = 1.
    assert_eq!((a.style.height, a.style.width), (40, 40));
    assert_eq!(a.theta0.len(), 3 * 16 * 16);
    // θ₀ = ½ + 0.1 z.
    let mean = a.theta0.iter().map(|v| *v as f64).sum::<f64>() / a.theta0.len() as f64;
    assert!((mean - 0.5).abs() < 0.02, "{mean}");

    for (s, why) in [
        (spec(16, "tiny", "style"), "needs at least 16×16"),
        (spec(64, "photo", "style"), "needs at least 64×64"),
        (spec(16, "photo", "tiny"), "style image"),
        (spec(16, "nothing", "style"), "no image \"nothing\""),
    ] {
        let e = Art::new(s, &images, 1).unwrap_err().to_string();
        assert!(e.contains(why), "{e}");
    }
}

#[test]
fn specs_parse_round_trip_and_refuse_what_the_network_cannot_take() {
    let parse = |s: &str| -> Result<ArtSpec, Error> {
        let pairs: Vec<(&str, &str)> = s
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap())
            .collect();
        ArtSpec::parse(&Params {
            family: "art",
            pairs,
        })
    };
    let a = parse("size=128,content=chelsea+rocket,style=hubble_deep_field").unwrap();
    assert_eq!(a.size, 128);
    assert_eq!(a.content, vec!["chelsea", "rocket"]);
    assert_eq!(a.name(), "art-128-hubble_deep_field-chelsea+rocket");
    assert_eq!(parse("").unwrap().name(), "art-64-ihc");
    for bad in [
        "size=15",
        "size=513",
        "size=x",
        "style=../etc/passwd",
        "content=a+",
        "content=a/b",
        "colour=red",
    ] {
        assert!(parse(bad).is_err(), "{bad}");
    }
}
