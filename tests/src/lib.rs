//! Helpers for the end-to-end tests in `tests/tests/`: find and run the real binaries.
#![warn(missing_docs)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Once;

/// Path of a workspace binary (`l2l-worker`, ...), building it first if it is missing.
///
/// Tests live in `target/<profile>/deps/`; the binaries sit one level up.
pub fn binary(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let exe = std::env::current_exe().expect("the test binary knows its own path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binaries live in target/<profile>/deps");
    let path = dir.join(name);
    if !path.exists() {
        // `cargo test -p l2l-tests` alone does not build other packages' binaries.
        BUILD.call_once(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--bins", "--workspace"])
                .status()
                .expect("cargo runs");
            assert!(status.success(), "building the workspace binaries failed");
        });
    }
    path
}

/// Runs `l2l-worker` with `args` and returns its output (it never reads stdin).
pub fn worker(args: &[&str]) -> Output {
    Command::new(binary("l2l-worker"))
        .args(args)
        .output()
        .expect("l2l-worker starts")
}

/// stdout and stderr of a finished process as text.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
