//! A NATS restart mid-run loses no acknowledged message. The test starts its own
//! `nats-server -js` on a free port with its own store directory, kills it (SIGKILL)
//! after a fifth of the messages are handled, and starts it again on the same store.
//!
//! Two things it found, both fixed: the restarted server keeps messages it had already
//! acknowledged in the work-queue stream (they were counted in flight forever; now
//! purged, see `nats_depths`), and a pull sent around the reconnect can go unanswered
//! (the fetch now gives up after 5 s, flushes and looks the consumer up again).

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::path::Path;
use std::time::Duration;

use redrive_nats::{NatsBackend, NatsConfig};
use redrive_sqlite::SqliteConfig;

use redrive_conformance::own_server::{OwnServer, free_port};

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
    let load = redrive_conformance::under_load::start(&backend, "restart.test", 2000, false).await;
    load.a_fifth_handled(Duration::from_secs(20)).await;
    nats.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.spawn();
    load.finishes_with_nothing_lost(&backend, Duration::from_secs(90))
        .await;
}
