//! How the Redis backend behaves when Redis is down at start or restarts mid-run. These
//! tests start their own `redis-server` with persistence on a free port, so the shared
//! one is untouched.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use redrive_redis::{RedisBackend, RedisConfig};
use redrive_sqlite::SqliteConfig;

use redrive_conformance::own_server::{OwnServer, free_port};

/// A test-owned redis-server with an fsync-always append-only file in `dir`: killed,
/// it keeps everything it acknowledged.
fn own_redis(dir: &Path) -> OwnServer {
    let port = free_port();
    let port_arg = port.to_string();
    let dir_arg = dir.display().to_string();
    let args = [
        "--port",
        &port_arg,
        "--bind",
        "127.0.0.1",
        "--dir",
        &dir_arg,
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
    ];
    OwnServer::start("redis-server", args.map(String::from).to_vec(), port)
}

#[test]
fn redis_down_at_start_is_a_clear_error_naming_the_address() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args([
            "--broker",
            &format!("redis://127.0.0.1:{port}"),
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
        err.contains(&format!("Redis at redis://127.0.0.1:{port} is unreachable")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_run_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = own_redis(dir.path());
    let transport = RedisConfig::new(format!("redis://127.0.0.1:{}", redis.port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let store = SqliteConfig::new(dir.path().join("dead.db"))
        .open()
        .unwrap();
    let backend = RedisBackend::new(transport, store);
    let load = redrive_conformance::under_load::start(&backend, "restart.test", 3000, false).await;
    // Let it get going, then kill Redis and bring it back on the same files.
    load.a_fifth_handled(Duration::from_secs(20)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.spawn();

    load.finishes_with_nothing_lost(&backend, Duration::from_secs(90))
        .await;
}
