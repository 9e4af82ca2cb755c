//! GPU workers (`--backend wgpu`) as users run them: real processes on a real Vulkan
//! adapter (lavapipe, Mesa's CPU Vulkan driver, in CI). Built with `--all-features`.
#![cfg(feature = "wgpu")]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use l2l_common::MetaGradFile;
use l2l_common::engine::vulkan_driver_installed;
use l2l_tests::{Coordinator, Host, Proc, start_worker, text, worker};

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// One test at a time: on lavapipe they share the machine's cores, and a GPU worker slowed
/// by its neighbours' kernel compilation could miss the end of its run.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// False (after saying what to install) where no Vulkan driver is installed at all.
fn have_vulkan() -> bool {
    let ok = vulkan_driver_installed();
    if !ok {
        l2l_tests::skip(
            "no Vulkan driver is installed; `apt-get install mesa-vulkan-drivers` \
             (lavapipe, a CPU Vulkan driver) runs these tests on any machine",
        );
    }
    ok
}

/// Writes `DIR/phi` (a fresh φ with `preprocess`) and `DIR/prob` (`batch` quadratics).
fn inputs(dir: &Path, preprocess: &str, batch: usize) {
    let (phi, prob) = (dir.join("phi"), dir.join("prob"));
    let batch = batch.to_string();
    for args in [
        &[
            "init-phi",
            "--preprocess",
            preprocess,
            "--seed",
            "3",
            "--out",
            s(&phi),
        ][..],
        &[
            "gen-problem",
            "quadratic",
            "--batch",
            &batch,
            "--seed",
            "9",
            "--out",
            s(&prob),
        ],
    ] {
        let out = worker(args);
        assert!(out.status.success(), "{args:?}: {:?}", text(&out));
    }
}

/// `meta-grad --backend wgpu` writes the CPU backend's meta-gradient (1e-3 per tensor).
#[test]
fn meta_grad_on_wgpu_matches_the_cpu_file() {
    let _one = serial();
    if !have_vulkan() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let ok = |args: &[&str]| {
        let out = worker(args);
        assert!(out.status.success(), "{args:?}: {:?}", text(&out));
        text(&out)
    };
    inputs(dir.path(), "log_sign", 8);
    let mut files = Vec::new();
    // `cpu`, the fused backend's older spelling, is still accepted.
    for (backend, name) in [("cpu", "fused"), ("wgpu", "wgpu")] {
        let out = p(backend);
        let (_, stderr) = ok(&[
            "meta-grad",
            "--phi",
            s(&p("phi")),
            "--problem",
            s(&p("prob")),
            "--steps",
            "8",
            "--backend",
            backend,
            "--out",
            s(&out),
        ]);
        assert!(stderr.contains(&format!("backend {name} (")), "{stderr}");
        files.push(MetaGradFile::load(&out).unwrap());
    }
    let (cpu, gpu) = (&files[0], &files[1]);
    for (i, (a, b)) in gpu.grad.tensors().zip(cpu.grad.tensors()).enumerate() {
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
        assert!(
            diff <= 1e-3 * scale,
            "tensor {i}: max|diff| {diff} vs max|ref| {scale}"
        );
    }
    assert!((gpu.meta_loss - cpu.meta_loss).abs() <= 1e-4 * cpu.meta_loss);
}

/// With every driver hidden, `--backend wgpu` ends with a message that says what to
/// install, not a panic, and writes nothing.
#[test]
fn no_adapter_is_a_clear_error() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    inputs(dir.path(), "identity", 2);
    let out = Host::local()
        .command("l2l-worker")
        .args([
            "meta-grad",
            "--phi",
            s(&p("phi")),
            "--problem",
            s(&p("prob")),
        ])
        .args(["--steps", "3", "--backend", "wgpu", "--out", s(&p("grad"))])
        // Mesa's Vulkan ICDs and EGL vendors (wgpu's GL fallback) both out of reach.
        .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
        .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
        .env("__EGL_VENDOR_LIBRARY_FILENAMES", "/nonexistent/egl.json")
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    if out.status.success() {
        // Nothing was checked: that is a skip, not a pass.
        l2l_tests::skip(&format!(
            "an adapter was still reachable with every driver hidden: {stderr}"
        ));
        return;
    }
    assert_eq!(
        out.status.code(),
        Some(1),
        "an error, not a crash: {stderr}"
    );
    for want in [
        "no usable GPU adapter",
        "mesa-vulkan-drivers",
        "--backend fused",
    ] {
        assert!(stderr.contains(want), "{want:?} missing: {stderr}");
    }
    assert!(!p("grad").exists());
}

/// `bench --backend wgpu` prints the same rows as on the CPU, naming the adapter, with the
/// GPU kernels each truncation issued: the fused step kernels issue a few per step, the
/// burn composition (`wgpu-burn`) about a hundred.
#[test]
fn bench_runs_on_wgpu() {
    let _one = serial();
    if !have_vulkan() {
        return;
    }
    let out = worker(&[
        "bench",
        "--backend",
        "cpu,wgpu,wgpu-burn",
        "--n",
        "100",
        "--steps",
        "4",
        "--runs",
        "2",
        "--warmup",
        "1",
        "--preprocess",
        "identity",
        "--pes-pairs",
        "1",
        "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |b: &str| rows.iter().filter(|r| r["backend"] == b).count();
    // `cpu` is still accepted on the command line; rows name the backend `fused`. Each
    // backend times the meta-gradient, the forward-only truncation and a PES truncation;
    // fused also the meta-gradient with its step records recomputed.
    assert_eq!(
        (of("fused"), of("wgpu"), of("wgpu-burn")),
        (4, 3, 3),
        "{stdout}"
    );
    assert!(
        rows.iter()
            .any(|r| r["backend"] == "fused" && r["what"] == "recompute"),
        "{stdout}"
    );
    for b in ["fused", "wgpu"] {
        assert!(
            rows.iter()
                .any(|r| r["backend"] == b && r["what"] == "pes_1"),
            "{stdout}"
        );
    }
    for r in &rows {
        assert!(r["median_ms"].as_f64().is_some_and(|m| m > 0.0), "{r}");
        assert!(r["adapter"].as_str().is_some_and(|a| !a.is_empty()), "{r}");
        // Kernel launches are counted on the GPU backend only: at least one per step.
        if r["backend"] == "wgpu" || r["backend"] == "wgpu-burn" {
            assert!(r["launches"].as_u64().is_some_and(|n| n >= 4), "{r}");
        } else {
            assert!(r["launches"].is_null(), "{r}");
        }
    }
    let launches = |backend: &str, what: &str| {
        rows.iter()
            .find(|r| r["backend"] == backend && r["what"] == what)
            .and_then(|r| r["launches"].as_u64())
            .unwrap_or_else(|| panic!("no {backend} {what} row: {stdout}"))
    };
    for b in ["wgpu", "wgpu-burn"] {
        assert!(
            launches(b, "meta_grad") > launches(b, "forward"),
            "{b}: the backward pass issues kernels of its own: {stdout}"
        );
    }
    // T = 4 steps: the fused kernels' truncation is O(T) launches, a small fraction of
    // the composition's.
    for what in ["meta_grad", "forward"] {
        let (fused, burn) = (launches("wgpu", what), launches("wgpu-burn", what));
        assert!(
            fused * 3 < burn,
            "{what}: {fused} launches fused against {burn} composed: {stdout}"
        );
    }
}

/// A GPU worker and a CPU worker train one φ together; the coordinator's status names
/// the GPU worker's backend and adapter.
#[test]
fn gpu_and_cpu_workers_train_together() {
    let _one = serial();
    if !have_vulkan() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::serve(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--max-updates",
            "30",
            "--aggregation",
            "async",
            "--every",
            "1",
            "--max-staleness",
            "1000",
            "--trajectory-steps",
            "20",
            "--truncation-steps",
            "5",
        ],
    );
    let gpu_log = dir.path().join("gpu.log");
    let child = Host::local()
        .command("l2l-worker")
        .args([
            "run",
            "--coordinator",
            &c.url(),
            "--name",
            "gpu-1",
            "--backend",
            "wgpu",
        ])
        .args(["--threads", "1", "--max-backoff-ms", "500"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&gpu_log).unwrap())
        .spawn()
        .unwrap();
    let mut gpu = Proc { child };
    // The GPU worker first, alone: on lavapipe its first truncation compiles its kernels.
    let st = c.wait_for(
        Duration::from_secs(240),
        "the GPU worker's first gradient",
        |s| {
            s["workers"].as_array().is_some_and(|ws| {
                ws.iter()
                    .any(|w| w["name"] == "gpu-1" && w["accepted"].as_u64() > Some(0))
            })
        },
    );
    let row = st["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "gpu-1")
        .unwrap()
        .clone();
    let backend = row["backend"].as_str().unwrap();
    assert!(
        backend.starts_with("wgpu (") && backend.len() > 7,
        "{backend}"
    );
    let mut cpu = start_worker(&c.url(), "cpu-1", &dir.path().join("cpu.log"));
    assert!(
        c.proc.wait_exit(Duration::from_secs(240)).success(),
        "coordinator"
    );
    for (w, log) in [
        (&mut gpu, &gpu_log),
        (&mut cpu, &dir.path().join("cpu.log")),
    ] {
        let status = w.wait_exit(Duration::from_secs(120));
        assert!(
            status.success(),
            "a worker ends with the run: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    let (_, snap) = l2l_coordinator::checkpoint::load_newest(dir.path())
        .unwrap()
        .expect("a checkpoint");
    assert_eq!(snap.version, 30);
}
