//! Helpers for the end-to-end tests in `tests/tests/`: find, start, watch and stop the
//! real binaries. Every process started here is killed when its handle drops.
#![warn(missing_docs)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

/// The environment variable that turns every skip into a failure (`.ci/run` sets it).
pub const REQUIRE_ALL: &str = "L2L_REQUIRE_ALL";

/// Says why a test cannot run here and lets it return early, or fails it where
/// `L2L_REQUIRE_ALL=1` (CI) demands that every test runs for real.
pub fn skip(why: &str) {
    if std::env::var(REQUIRE_ALL).is_ok_and(|v| v == "1") {
        panic!("this test would be skipped ({why}), and {REQUIRE_ALL}=1 forbids skips");
    }
    eprintln!("SKIPPED: {why}");
}

/// Path of a workspace binary (`l2l-worker`, ...), built up to date first.
///
/// `cargo test -p l2l-tests` alone would not rebuild other packages' binaries, and a
/// stale binary would test old code; so each test process runs `cargo build --bins`
/// once (a no-op when `cargo test --workspace` already built them), with the GPU
/// feature when this crate has it (`--all-features`), so nothing is built twice. Tests
/// live in `target/<profile>/deps/`; the binaries sit one level up.
pub fn binary(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--bins", "--workspace"]);
        if cfg!(feature = "wgpu") {
            build.arg("--all-features");
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "building the workspace binaries failed");
    });
    let exe = std::env::current_exe().expect("the test binary knows its own path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binaries live in target/<profile>/deps");
    dir.join(name)
}

/// Runs `l2l-worker` with `args` and returns its output (it never reads stdin).
pub fn worker(args: &[&str]) -> Output {
    Command::new(binary("l2l-worker"))
        .args(args)
        .output()
        .expect("l2l-worker starts")
}

/// Runs `l2l-coordinator` with `args` to completion.
pub fn coordinator(args: &[&str]) -> Output {
    Command::new(binary("l2l-coordinator"))
        .args(args)
        .output()
        .expect("l2l-coordinator starts")
}

/// stdout and stderr of a finished process as text.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    /// The process.
    pub child: Child,
}

impl Proc {
    /// Sends `signal` (e.g. "KILL", "STOP", "CONT", "TERM") to the process.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} failed");
    }

    /// Waits for the process to exit, at most `limit`; returns its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < end,
                "process {} did not exit within {limit:?}",
                self.child.id()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a process runs: this machine's network, or a network namespace (a simulated
/// host), with extra environment variables.
#[derive(Debug, Clone, Default)]
pub struct Host {
    /// The namespace, if any.
    pub netns: Option<String>,
    /// Environment variables set for every process (e.g. `L2L_TOKEN_FILE`).
    pub env: Vec<(String, String)>,
}

impl Host {
    /// This machine, no extra environment.
    pub fn local() -> Self {
        Self::default()
    }

    /// A command running workspace binary `bin` on this host.
    pub fn command(&self, bin: &str) -> Command {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary(bin));
                c
            }
            None => Command::new(binary(bin)),
        };
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
}

/// A coordinator started with `serve`, and the address it reported.
pub struct Coordinator {
    /// The process.
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The URL clients use (`http://addr` unless given).
    pub url: String,
    /// Where `status` runs from.
    pub host: Host,
}

impl Coordinator {
    /// Starts `l2l-coordinator serve --dir DIR --listen LISTEN ARGS...` and waits for its
    /// "listening on" line. Its log goes to `DIR/coordinator-<n>.log`.
    pub fn serve(dir: &Path, listen: &str, args: &[&str]) -> Self {
        Self::serve_on(&Host::local(), None, dir, listen, args)
    }

    /// As [`Coordinator::serve`], on `host`, reached by clients at `url` (default
    /// `http://` + the address it reports).
    pub fn serve_on(
        host: &Host,
        url: Option<&str>,
        dir: &Path,
        listen: &str,
        args: &[&str],
    ) -> Self {
        std::fs::create_dir_all(dir).expect("run dir");
        let log = (0..)
            .map(|n| dir.join(format!("coordinator-{n}.log")))
            .find(|p| !p.exists())
            .expect("a free log name");
        let mut child = host
            .command("l2l-coordinator")
            .arg("serve")
            .args([
                "--dir",
                dir.to_str().expect("utf-8 path"),
                "--listen",
                listen,
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("l2l-coordinator starts");
        let rx = listening_on(child.stdout.take().expect("piped stdout"));
        let proc = Proc { child };
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "coordinator never listened; log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        Self {
            proc,
            addr,
            url: url.map_or_else(|| format!("http://{addr}"), String::from),
            host: host.clone(),
        }
    }

    /// The URL clients use.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// `l2l-coordinator status --json` for this coordinator, run on its host.
    pub fn status(&self) -> serde_json::Value {
        let out = self
            .host
            .command("l2l-coordinator")
            .args(["status", "--json", "--coordinator", &self.url])
            .output()
            .expect("l2l-coordinator starts");
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "status failed: {stderr}");
        serde_json::from_str(&stdout).expect("status prints JSON")
    }

    /// Polls the status until `cond` holds, at most `limit`; returns that status.
    pub fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        cond: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let end = Instant::now() + limit;
        loop {
            let s = self.status();
            if cond(&s) {
                return s;
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}; last status {s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A relay started with `l2l-coordinator relay`, and the address it reported.
pub struct Relay {
    /// The process.
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Relay {
    /// Starts `l2l-coordinator relay --upstream UPSTREAM --listen 127.0.0.1:0 ARGS...` on
    /// `host` and waits for its "listening on" line; its log goes to `log`.
    pub fn start(host: &Host, upstream: &str, log: &Path, args: &[&str]) -> Self {
        let mut child = host
            .command("l2l-coordinator")
            .args(["relay", "--upstream", upstream, "--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("l2l-coordinator starts");
        let addr = listening_on(child.stdout.take().expect("piped stdout"));
        let proc = Proc { child };
        let addr = addr
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "relay never listened; log: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            });
        Self { proc, addr }
    }

    /// The URL workers use.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The address of the first "listening on ADDR" line a process prints.
fn listening_on(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("listening on ") {
                let _ = tx.send(a.parse::<SocketAddr>().expect("an address"));
            }
        }
    });
    rx
}

/// `l2l-coordinator status --json --coordinator URL`, parsed.
pub fn status(url: &str) -> serde_json::Value {
    let out = coordinator(&["status", "--json", "--coordinator", url]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "status failed: {stderr}");
    serde_json::from_str(&stdout).expect("status prints JSON")
}

/// Starts `l2l-worker run --coordinator URL --name NAME --threads 1`, logging to `log`.
pub fn start_worker(url: &str, name: &str, log: &Path) -> Proc {
    start_worker_on(&Host::local(), url, name, log)
}

/// As [`start_worker`], on `host`.
pub fn start_worker_on(host: &Host, url: &str, name: &str, log: &Path) -> Proc {
    let child = host
        .command("l2l-worker")
        .args([
            "run",
            "--coordinator",
            url,
            "--name",
            name,
            "--max-backoff-ms",
            "500",
            // Two workers share the two cores of a test machine.
            "--threads",
            "1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("l2l-worker starts");
    Proc { child }
}

/// The version step in a status.
pub fn version(s: &serde_json::Value) -> u64 {
    s["version"].as_u64().expect("version")
}

/// A refusal count in a status (0 if absent).
pub fn refused(s: &serde_json::Value, reason: &str) -> u64 {
    s["refused"][reason].as_u64().unwrap_or(0)
}

/// `GET /metrics` on `addr`, with an optional bearer token: the status line and the body.
pub fn get_metrics(addr: &str, token: Option<&str>) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("the metrics port answers");
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nhost: {addr}\r\n{auth}connection: close\r\n\r\n"
    )
    .expect("the request is sent");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("the reply is read");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}
