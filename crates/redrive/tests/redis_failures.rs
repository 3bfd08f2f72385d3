//! How the Redis backend behaves when Redis is down at start or restarts mid-run. These
//! tests start their own `redis-server` with persistence on a free port, so the shared
//! one is untouched.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redrive_core::{Envelope, HandlerResult, QueueName, RetryPolicy, Transport};
use redrive_redis::{RedisBackend, RedisConfig};
use redrive_runner::{Runner, RunnerConfig, handler_fn};
use redrive_sqlite::SqliteConfig;

mod own_server;
use own_server::{OwnServer, free_port};

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
    let queue = QueueName::new("restart.test").unwrap();
    const N: usize = 3000;
    let mut published = HashSet::new();
    for chunk in (0..N).collect::<Vec<_>>().chunks(500) {
        let batch: Vec<Envelope> = chunk
            .iter()
            .map(|i| Envelope::new(queue.clone(), format!("{i}")))
            .collect();
        published.extend(batch.iter().map(|e| e.id));
        backend.publish(&queue, batch).await.unwrap();
    }

    let handled: Arc<Mutex<HashSet<redrive_core::MessageId>>> = Arc::default();
    let seen = Arc::clone(&handled);
    let config = RunnerConfig {
        concurrency: 20,
        lease: Duration::from_secs(2),
        idle_poll: Duration::from_millis(20),
        ..RunnerConfig::default()
    };
    let runner = Runner::new(
        backend.clone(),
        queue.clone(),
        RetryPolicy::parse("50ms,100ms,200ms").unwrap(),
        config,
    )
    .until_idle();
    let run = tokio::spawn(runner.run(
        handler_fn(move |env: Envelope| {
            let seen = Arc::clone(&seen);
            async move {
                tokio::time::sleep(Duration::from_millis(3)).await;
                seen.lock().unwrap().insert(env.id);
                HandlerResult::Ok(())
            }
        }),
        std::future::pending(),
    ));

    // Let it get going, then kill Redis and bring it back on the same files.
    let deadline = Instant::now() + Duration::from_secs(20);
    while handled.lock().unwrap().len() < N / 5 {
        assert!(Instant::now() < deadline, "the consumer did not get going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    redis.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.spawn();

    tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the run recovers and finishes")
        .unwrap()
        .unwrap();
    let handled = handled.lock().unwrap().clone();
    let missing: Vec<_> = published.difference(&handled).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages were never handled",
        missing.len()
    );
    let lanes = redrive_core::LaneSet {
        queue: queue.clone(),
        tiers: RetryPolicy::parse("50ms,100ms,200ms")
            .unwrap()
            .tiers()
            .to_vec(),
    };
    let depths = redrive_core::LaneStats::queue_depths(&backend, &lanes)
        .await
        .unwrap();
    assert!(depths.is_drained() && depths.dlq == 0, "{depths:?}");
}
