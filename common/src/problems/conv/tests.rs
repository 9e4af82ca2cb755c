//! The host network against f64 central differences, and its refusals.

use super::*;
use crate::problems::Params;

/// `n` random images of `shape` with labels cycling through the classes.
pub(crate) fn images(n: usize, shape: [usize; 3], seed: u64) -> Arc<Dataset> {
    let mut rng = Rng::new(seed);
    let pixels = shape.iter().product::<usize>();
    Arc::new(Dataset {
        pixels,
        shape,
        images: (0..n * pixels).map(|_| rng.below(256) as u8).collect(),
        labels: (0..n).map(|i| (i * 7 % 10) as u8).collect(),
    })
}

pub(crate) fn small() -> ConvSpec {
    ConvSpec {
        channels: 3,
        hidden: 4,
        batch: 5,
        ..ConvSpec::default()
    }
}

fn parse(s: &str) -> Result<ConvSpec, Error> {
    let pairs: Vec<(&str, &str)> = s
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap())
        .collect();
    ConvSpec::parse(&Params {
        family: "conv",
        pairs,
    })
}

#[test]
fn the_gradient_matches_central_differences_in_f64() {
    // Odd sides (17×18 → 8×9 → 4×4 → 2×2) exercise the rounding of every pooling; two
    // channels; a θ far from θ₀ so batch normalisation and ReLU are off their linear regime.
    for (shape, labels) in [([2, 17, 18], "0-9"), ([1, 8, 9], "2-4")] {
        let spec = ConvSpec {
            labels: parse(&format!("labels={labels}")).unwrap().labels,
            ..small()
        };
        let c = Conv::new(spec, images(40, shape, 3), 5).unwrap();
        let mut rng = Rng::new(9);
        let theta: Vec<f64> = (0..c.theta0.len()).map(|_| 0.5 * rng.normal()).collect();
        let mut g = vec![0f64; theta.len()];
        let f0 = c.loss_grad(&theta, 2, &mut g);
        assert!(f0.is_finite() && f0 > 0.0);
        let h = 1e-6;
        let mut worst = 0f64;
        let scale = g.iter().fold(0f64, |m, v| m.max(v.abs()));
        let mut scratch = vec![0f64; theta.len()];
        for i in 0..theta.len() {
            let mut t = theta.clone();
            t[i] += h;
            let up = c.loss_grad(&t, 2, &mut scratch);
            t[i] -= 2.0 * h;
            let down = c.loss_grad(&t, 2, &mut scratch);
            let fd = (up - down) / (2.0 * h);
            worst = worst.max((fd - g[i]).abs() / scale);
        }
        eprintln!(
            "{shape:?}: max |fd − grad| / max|grad| = {worst:.1e} over {} coordinates",
            g.len()
        );
        assert!(worst < 1e-6, "{shape:?}: {worst:e}");
        // Every part of θ has a gradient (a dead block would pass the comparison).
        let s = &c.shapes;
        for (name, r) in [
            ("K1", s.k[0]..s.k[1]),
            ("K3", s.k[2]..s.conv_end),
            ("β1", s.beta[0]..s.beta[1]),
            ("W4", s.w4..s.beta4),
            ("b5", s.b5..s.total),
        ] {
            assert!(
                g[r].iter().any(|v| v.abs() > 1e-6),
                "{name} has no gradient"
            );
        }
    }
}

#[test]
fn f32_agrees_with_f64_and_steps_draw_their_own_batches() {
    let c = Conv::new(small(), images(30, [3, 16, 16], 1), 2).unwrap();
    let t64: Vec<f64> = c.theta0.iter().map(|v| *v as f64 * 30.0).collect();
    let t32: Vec<f32> = t64.iter().map(|v| *v as f32).collect();
    let (mut g64, mut g32) = (vec![0f64; t64.len()], vec![0f32; t32.len()]);
    let (a, b) = (
        c.loss_grad(&t64, 0, &mut g64),
        c.loss_grad(&t32, 0, &mut g32),
    );
    assert!((a - b as f64).abs() < 1e-5 * a, "{a} vs {b}");
    let scale = g64.iter().fold(0f64, |m, v| m.max(v.abs()));
    let worst = g64
        .iter()
        .zip(&g32)
        .fold(0f64, |m, (x, y)| m.max((x - *y as f64).abs()));
    assert!(worst < 1e-4 * scale, "{worst:e} of {scale:e}");
    assert_ne!(c.batch(0), c.batch(1));
    assert_eq!(
        c.batch(4),
        Conv::new(small(), c.data.clone(), 2).unwrap().batch(4)
    );
}

#[test]
fn batches_hold_only_the_subsets_labels_and_groups_split_kernels_from_the_rest() {
    let spec = parse("channels=3,hidden=4,batch=64,labels=0-1+8").unwrap();
    assert_eq!(spec.labels, [0, 1, 8]);
    assert_eq!(spec.params()["labels"], "0-1+8");
    assert_eq!(spec.name(), "conv-labels0-1+8");
    let c = Conv::new(spec, images(50, [1, 8, 8], 4), 1).unwrap();
    for step in 0..5 {
        assert!(
            c.batch(step)
                .iter()
                .all(|i| [0, 1, 8].contains(&c.data.labels[*i]))
        );
    }
    let map = c.groups().unwrap();
    assert_eq!(map.names(), ["conv", "fc"]);
    // 3·1·25 + 2·(3·3·25) kernel values, then the rest.
    assert_eq!(map.groups[0].1, 0..525);
    assert_eq!(map.groups[1].1.end, c.theta0.len());
    let one = Conv::new(parse("lstms=1").unwrap(), images(5, [1, 8, 8], 4), 1).unwrap();
    assert!(one.groups().is_none());
    // The paper's network on 28×28 and on CIFAR-10's 32×32×3.
    let n = |shape| Shapes::new(&ConvSpec::default(), shape).total;
    assert_eq!(
        n([1, 28, 28]),
        400 + 2 * 6400 + 48 + 144 * 32 + 32 + 320 + 10
    );
    assert_eq!(
        n([3, 32, 32]),
        1200 + 2 * 6400 + 48 + 256 * 32 + 32 + 320 + 10
    );
}

#[test]
fn impossible_sizes_and_empty_subsets_are_refused_with_the_reason() {
    for (s, why) in [
        ("batch=1", "at least 2"),
        ("labels=4-2", "ranges joined by +"),
        ("labels=10", "ranges joined by +"),
        ("lstms=3", "lstms"),
        ("kernel=3", "unknown"),
        ("channels=0", "count"),
        ("channels=4000,hidden=60000", "weights"),
        ("channels=5000", "too large"),
        ("batch=1000000", "smaller batch"),
    ] {
        let e = parse(s).unwrap_err().to_string();
        assert!(e.contains(why), "{s}: {e}");
    }
    let e = Conv::new(small(), images(5, [1, 7, 30], 1), 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 8"), "{e}");
    let spec = ConvSpec {
        labels: vec![9],
        ..small()
    };
    // Labels of images(5, ..) are 0, 7, 4, 1, 8: no 9.
    let e = Conv::new(spec, images(5, [1, 8, 8], 1), 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no examples with labels 9"), "{e}");
}
