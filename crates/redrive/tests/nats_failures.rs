//! How the NATS backend behaves when NATS is down at start.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::process::{Command, Stdio};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn nats_down_at_start_is_a_clear_error_naming_the_address() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args([
            "--broker",
            &format!("nats://127.0.0.1:{port}"),
            "--store",
            &format!("sqlite://{}", dir.path().join("s.db").display()),
        ])
        .args(["publish", "q"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("NATS at nats://127.0.0.1:{port} is unreachable")),
        "{err}"
    );
}
