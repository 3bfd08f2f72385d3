//! A broker that is down at start gives a clear error naming its address (NATS and
//! Kafka here; Redis in `redis_failures.rs`), and nothing is published.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::process::{Command, Stdio};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn publish_fails_naming(url: &str, expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args([
            "--broker",
            url,
            "--store",
            &format!("sqlite://{}", dir.path().join("s.db").display()),
        ])
        .args(["publish", "q"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(expected), "{err}");
}

#[test]
fn nats_down_at_start_is_a_clear_error_naming_the_address() {
    let port = free_port();
    publish_fails_naming(
        &format!("nats://127.0.0.1:{port}"),
        &format!("NATS at nats://127.0.0.1:{port} is unreachable"),
    );
}

#[test]
fn kafka_down_at_start_is_a_clear_error_naming_the_brokers_not_the_settings() {
    let port = free_port();
    publish_fails_naming(
        &format!("kafka://127.0.0.1:{port}?sasl.password=hunter2"),
        &format!("Kafka at kafka://127.0.0.1:{port} is unreachable"),
    );
    // The settings' values are never shown.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args([
            "--broker",
            &format!("kafka://127.0.0.1:{port}?sasl.password=hunter2"),
        ])
        .args([
            "--store",
            &format!("sqlite://{}", dir.path().join("s.db").display()),
        ])
        .args(["queues"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));
}
