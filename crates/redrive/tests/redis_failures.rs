//! How the Redis backend behaves when Redis is down at start or restarts mid-run. These
//! tests start their own `redis-server` with persistence on a free port, so the shared
//! one is untouched.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redrive_core::{Envelope, HandlerResult, QueueName, RetryPolicy, Transport};
use redrive_redis::{RedisBackend, RedisConfig};
use redrive_runner::{Runner, RunnerConfig, handler_fn};
use redrive_sqlite::SqliteConfig;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A test-owned redis-server with an fsync-always append-only file.
struct OwnRedis {
    child: Option<Child>,
    port: u16,
    dir: std::path::PathBuf,
}

impl OwnRedis {
    fn start(dir: &Path, port: u16) -> Self {
        let mut r = Self {
            child: None,
            port,
            dir: dir.to_owned(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                &self.dir.display().to_string(),
            ])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server the way a crash or a restart would (SIGKILL); with
    /// `appendfsync always`, everything Redis acknowledged is on disk.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
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
    let mut redis = OwnRedis::start(dir.path(), free_port());
    let transport = RedisConfig::new(redis.url())
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
