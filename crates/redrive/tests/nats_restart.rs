//! A NATS restart mid-run loses no acknowledged message. The test starts its own
//! `nats-server -js` on a free port with its own store directory, kills it (SIGKILL)
//! after a fifth of the messages are handled, and starts it again on the same store.
//!
//! Two things it found, both fixed: the restarted server keeps messages it had already
//! acknowledged in the work-queue stream (they were counted in flight forever; now
//! purged, see `nats_depths`), and a pull sent around the reconnect can go unanswered
//! (the fetch now gives up after 5 s, flushes and looks the consumer up again).

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redrive_core::{
    Envelope, HandlerResult, LaneSet, LaneStats, QueueName, RetryPolicy, Transport,
};
use redrive_nats::{NatsBackend, NatsConfig};
use redrive_runner::{Runner, RunnerConfig, handler_fn};
use redrive_sqlite::SqliteConfig;

mod own_server;
use own_server::{OwnServer, free_port};

/// A test-owned nats-server with JetStream on disk in `dir`.
fn own_nats(dir: &Path) -> OwnServer {
    let port = free_port();
    let port_arg = port.to_string();
    let dir_arg = dir.display().to_string();
    let args = ["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd", &dir_arg];
    OwnServer::start("nats-server", args.map(String::from).to_vec(), port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_run_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = own_nats(&dir.path().join("js"));
    let transport = NatsConfig::new(&format!("nats://127.0.0.1:{}", nats.port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let store = SqliteConfig::new(dir.path().join("dead.db"))
        .open()
        .unwrap();
    let backend = NatsBackend::new(transport, store);
    let queue = QueueName::new("restart.test").unwrap();
    let policy = RetryPolicy::parse("50ms,100ms,200ms").unwrap();
    const N: usize = 2000;
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
        // The ack wait: a delivery whose ack was lost with the server comes back after it.
        lease: Duration::from_secs(2),
        idle_poll: Duration::from_millis(20),
        ..RunnerConfig::default()
    };
    let runner = Runner::new(backend.clone(), queue.clone(), policy.clone(), config).until_idle();
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

    let deadline = Instant::now() + Duration::from_secs(20);
    while handled.lock().unwrap().len() < N / 5 {
        assert!(Instant::now() < deadline, "the consumer did not get going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    nats.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.spawn();
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
    let lanes = LaneSet {
        queue,
        tiers: policy.tiers().to_vec(),
    };
    let depths = backend.queue_depths(&lanes).await.unwrap();
    assert!(depths.is_drained() && depths.dlq == 0, "{depths:?}");
}
