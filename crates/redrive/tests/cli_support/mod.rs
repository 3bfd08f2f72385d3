//! Running the `redrive` binary as a user would, for the tests that drive it end to end.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::process::{Command, Stdio};

/// Runs `redrive --store STORE ARGS` with `stdin` as its input; fails the test with
/// redrive's stderr unless it succeeds, and returns its stdout.
pub fn redrive(store: &str, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args(["--store", store])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "redrive {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `redrive --store STORE ARGS` and returns its exit code and stdout, whatever
/// the code.
#[allow(dead_code)] // Not every test that shares these helpers uses each one.
pub fn redrive_status(store: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args(["--store", store])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
    )
}

/// A `redrive` process running in the background (a consumer), killed when dropped.
#[allow(dead_code)]
pub struct Background(std::process::Child);

#[allow(dead_code)]
impl Background {
    /// Starts `redrive --store STORE ARGS`, its output discarded.
    pub fn start(store: &str, args: &[&str]) -> Self {
        Self(
            Command::new(env!("CARGO_BIN_EXE_redrive"))
                .args(["--store", store])
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
