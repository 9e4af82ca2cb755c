//! The deployment files in `deploy/` against the binaries: every flag, environment
//! variable and port they use must exist, and the Kubernetes manifests must render and
//! validate against the Kubernetes schemas. Nothing here needs a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use l2l_tests::binary;
use serde_yaml_ng::Value;

/// Variables read by the container runtime or the GPU driver, not by l2l.
const RUNTIME_ENV: [&str; 2] = ["NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// Every YAML document under `deploy/k8s` (kustomizations excluded), with its file.
fn manifests() -> Vec<(PathBuf, Value)> {
    let mut files = Vec::new();
    let mut dirs = vec![root().join("deploy/k8s")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("deploy/k8s is readable") {
            let p = e.expect("a directory entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
            {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("readable manifest");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", f.display()));
            docs.push((f.clone(), v));
        }
    }
    assert!(docs.len() >= 8, "expected the base and overlay manifests");
    docs
}

use serde::Deserialize;

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

/// `<binary> <subcommand> --help`.
fn help(bin: &str, sub: &str) -> String {
    let out = Command::new(binary(bin))
        .args([sub, "--help"])
        .output()
        .expect("the binary runs");
    assert!(out.status.success(), "{bin} {sub} --help failed");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

/// Checks that every `--flag` in `args` is an option of `bin sub`.
fn check_flags(bin: &str, sub: &str, args: &[String], origin: &str) {
    let h = help(bin, sub);
    for a in args.iter().filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().expect("a flag");
        assert!(
            h.contains(&format!("  {flag} ")) || h.contains(&format!("  {flag}\n")),
            "{origin}: `{bin} {sub}` has no option {flag}"
        );
    }
}

/// The value following `flag` in `args`.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

/// A container of a workload, as written in one file.
struct Container {
    origin: String,
    name: String,
    command: Option<String>,
    args: Vec<String>,
    env: Vec<String>,
    /// Port name → number.
    ports: BTreeMap<String, u16>,
    /// Volume name → mount path.
    mounts: BTreeMap<String, String>,
    spec: Value,
}

fn containers(docs: &[(PathBuf, Value)]) -> Vec<Container> {
    let mut out = Vec::new();
    for (file, doc) in docs {
        let Some(list) = doc["spec"]["template"]["spec"]["containers"].as_sequence() else {
            continue;
        };
        for c in list {
            let strings = |v: &Value| -> Vec<String> {
                v.as_sequence()
                    .map(|l| l.iter().map(s).collect())
                    .unwrap_or_default()
            };
            let named = |key: &str, field: &str| -> Vec<(String, Value)> {
                c[key]
                    .as_sequence()
                    .map(|l| {
                        l.iter()
                            .map(|p| (s(&p["name"]), p[field].clone()))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            out.push(Container {
                origin: format!(
                    "{} ({})",
                    file.strip_prefix(root()).unwrap_or(file).display(),
                    s(&doc["metadata"]["name"])
                ),
                name: s(&c["name"]),
                command: strings(&c["command"]).first().cloned(),
                args: strings(&c["args"]),
                env: named("env", "name").into_iter().map(|(n, _)| n).collect(),
                ports: named("ports", "containerPort")
                    .into_iter()
                    .map(|(n, p)| (n, p.as_u64().expect("a port number") as u16))
                    .collect(),
                mounts: named("volumeMounts", "mountPath")
                    .into_iter()
                    .map(|(n, p)| (n, s(&p)))
                    .collect(),
                spec: c.clone(),
            });
        }
    }
    out
}

#[test]
fn manifests_use_only_flags_env_and_ports_the_binaries_have() {
    let docs = manifests();
    let all = containers(&docs);
    // Which binary and subcommand each container name runs, from the files that say so
    // (overlay patches name the container only).
    let mut runs: BTreeMap<String, (String, String)> = BTreeMap::new();
    for c in &all {
        if let Some(bin) = &c.command {
            let sub = c.args.first().cloned().expect("a subcommand");
            runs.insert(c.name.clone(), (bin.clone(), sub));
        }
    }
    assert_eq!(
        runs.get("coordinator"),
        Some(&("l2l-coordinator".to_string(), "serve".to_string()))
    );
    assert_eq!(
        runs.get("worker"),
        Some(&("l2l-worker".to_string(), "run".to_string()))
    );
    for c in &all {
        let (bin, sub) = runs
            .get(&c.name)
            .unwrap_or_else(|| panic!("{}: container {} runs nothing known", c.origin, c.name));
        check_flags(bin, sub, &c.args, &c.origin);
        let h = help(bin, sub);
        for e in &c.env {
            assert!(
                h.contains(e.as_str()) || RUNTIME_ENV.contains(&e.as_str()),
                "{}: {bin} {sub} does not read ${e} (not in its --help)",
                c.origin
            );
        }
    }

    // The coordinator's configuration parses and validates, and its ports are the
    // container's and the probes'.
    let cm = docs
        .iter()
        .find(|(_, d)| d["kind"] == "ConfigMap")
        .map(|(_, d)| d)
        .expect("the coordinator's ConfigMap");
    let toml_text = s(&cm["data"]["coordinator.toml"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("coordinator.toml");
    std::fs::write(&path, &toml_text).expect("write");
    let config = l2l_coordinator::config::Config::from_toml_file(&path)
        .expect("the ConfigMap's coordinator.toml parses");
    config
        .validate()
        .expect("the ConfigMap's coordinator.toml is valid");
    let coord = all
        .iter()
        .find(|c| c.name == "coordinator" && c.command.is_some())
        .expect("the coordinator container");
    assert_eq!(coord.ports.get("grpc"), Some(&config.listen.port()));
    assert_eq!(
        coord.ports.get("metrics").copied(),
        config.metrics_listen.map(|a| a.port())
    );
    assert_eq!(
        flag_value(&coord.args, "--config"),
        Some(format!("{}/coordinator.toml", coord.mounts["config"]).as_str())
    );
    let token_file = config.security.token_file.clone().expect("a token file");
    assert!(
        token_file.starts_with(&coord.mounts["token"]),
        "the token file is on the Secret's volume"
    );
    assert!(
        config.dir.starts_with(&coord.mounts["run"]),
        "the run directory is on the PVC"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        let g = &coord.spec[probe]["grpc"];
        assert_eq!(g["port"].as_u64(), Some(config.listen.port() as u64));
        let service = g["service"].as_str().unwrap_or("");
        assert!(
            service.is_empty() || service == l2l_coordinator::service::LIVENESS,
            "{probe} asks for health service {service:?}, which the coordinator does not report"
        );
    }

    // Workers: their metrics port, the coordinator's address, and the token's path.
    let worker = all
        .iter()
        .find(|c| c.name == "worker" && c.command.is_some())
        .expect("the worker container");
    let metrics = flag_value(&worker.args, "--metrics-listen").expect("worker metrics");
    assert_eq!(worker.ports.get("metrics"), Some(&port_of(metrics)));
    let url = flag_value(&worker.args, "--coordinator").expect("coordinator URL");
    let service = docs
        .iter()
        .find(|(_, d)| d["kind"] == "Service")
        .map(|(_, d)| d)
        .expect("the Service");
    assert!(url.contains(&format!("//{}:", s(&service["metadata"]["name"]))));
    let grpc = service["spec"]["ports"]
        .as_sequence()
        .and_then(|l| l.iter().find(|p| p["name"] == "grpc"))
        .expect("a grpc port");
    assert_eq!(port_of(url), grpc["port"].as_u64().unwrap() as u16);
    let targets: BTreeSet<String> = service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| s(&p["targetPort"]))
        .collect();
    for t in targets {
        assert!(
            coord.ports.contains_key(&t),
            "Service targets port {t}, which the coordinator does not name"
        );
    }
    let worker_token = flag_value(&worker.args, "--token-file").expect("worker token");
    assert!(worker_token.starts_with(&worker.mounts["token"]));
}

#[test]
fn systemd_units_use_only_flags_the_binaries_have() {
    for unit in ["l2l-coordinator.service", "l2l-worker.service"] {
        let text = std::fs::read_to_string(root().join("deploy/systemd").join(unit))
            .expect("the unit file");
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("an ExecStart line");
        let words: Vec<String> = exec.split_whitespace().map(String::from).collect();
        let bin = Path::new(&words[0])
            .file_name()
            .and_then(|n| n.to_str())
            .expect("a binary")
            .to_string();
        check_flags(&bin, &words[1], &words[2..], unit);
        let h = help(&bin, &words[1]);
        for line in text.lines().filter(|l| l.starts_with("# L2L_")) {
            let var = line[2..].split_whitespace().next().unwrap();
            assert!(h.contains(var), "{unit}: {bin} does not read ${var}");
        }
        for var in text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("L2L_"))
        {
            assert!(
                h.contains(var),
                "{unit}: {bin} {} does not read ${var}",
                words[1]
            );
        }
    }
}

#[test]
fn the_image_builds_with_the_workspace_toolchain() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let cargo = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let rust = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"'))
        .expect("rust-version");
    assert!(
        dockerfile.contains(&format!("FROM rust:{rust}-")),
        "the build stage must use the workspace's rust-version {rust}"
    );
    assert!(
        dockerfile.contains("USER 10001"),
        "the runtime runs unprivileged"
    );
    for bin in ["l2l-coordinator", "l2l-worker"] {
        assert!(dockerfile.contains(&format!("-p {bin}")), "{bin} is built");
    }
}

/// Where `tool args` cannot run, says why (a skip, or a failure under
/// `L2L_REQUIRE_ALL=1`) and returns false.
fn have(tool: &str, args: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        l2l_tests::skip(&format!(
            "`{tool} {}` does not run (.ci/run installs it: kubectl from Debian's \
             kubernetes-client, kubernetes-validate from PyPI)",
            args.join(" ")
        ));
    }
    ok
}

#[test]
fn overlays_render_and_validate_against_the_kubernetes_schemas() {
    // `kubectl version` alone also asks a cluster for its version and fails wherever
    // none is reachable; `--client` is the check that kubectl itself runs.
    if !have("kubectl", &["version", "--client"]) || !have("kubernetes-validate", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for overlay in ["cpu", "gpu"] {
        let out = Command::new("kubectl")
            .args(["kustomize"])
            .arg(root().join("deploy/k8s/overlays").join(overlay))
            .output()
            .expect("kubectl runs");
        assert!(
            out.status.success(),
            "kubectl kustomize {overlay} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rendered = String::from_utf8(out.stdout).unwrap();
        for kind in [
            "Namespace",
            "ConfigMap",
            "StatefulSet",
            "Service",
            "Deployment",
            "PodDisruptionBudget",
            "NetworkPolicy",
        ] {
            assert!(
                rendered.contains(&format!("kind: {kind}\n")),
                "{overlay} renders no {kind}"
            );
        }
        let file = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        let v = Command::new("kubernetes-validate")
            .args(["--strict", "--quiet"])
            .arg(&file)
            .output()
            .expect("kubernetes-validate runs");
        assert!(
            v.status.success(),
            "{overlay} does not validate:\n{}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
}
