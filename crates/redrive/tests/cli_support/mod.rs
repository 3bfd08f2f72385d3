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
