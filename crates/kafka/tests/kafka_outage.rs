//! A Kafka broker that goes away mid-run and comes back loses no acknowledged record,
//! and the lanes drain. The broker is librdkafka's mock cluster, in this process, so the
//! test can take it down and up at will: while down it closes every connection and
//! refuses new ones, as a broker being restarted does; it keeps its log, as a broker
//! with durable storage does. Records are produced in batches.
//!
//! No consumer dies here, so no record may come back as a crash suspect (run alone, one
//! at a time), even when the outage outlasts the member's session and its assignment
//! is lost: the member that gets it back knows it did not die.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::time::Duration;

use rdkafka::mocking::MockCluster;
use redrive_kafka::{KafkaBackend, KafkaConfig};
use redrive_sqlite::SqliteConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_broker_outage_mid_run_loses_no_acknowledged_record() {
    outage("outage", Duration::from_secs(3)).await;
}

/// The member's session is 6 s: an outage of 9 s outlasts it on every machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_session_runs_no_record_as_a_crash_suspect() {
    outage("long", Duration::from_secs(9)).await;
}

/// Consumes 2,000 records (every tenth failing once) and takes the broker down for
/// `down` once a fifth are handled.
async fn outage(group: &str, down: Duration) {
    // `REDRIVE_TEST_LOG=redrive_kafka=trace` shows what the consumer did.
    if let Ok(filter) = std::env::var("REDRIVE_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    let cluster = MockCluster::new(1).unwrap();
    let url = format!(
        "kafka://{}?prefix={group}.&group={group}&topics=auto&linger.ms=20&fetch.wait.max.ms=10",
        cluster.bootstrap_servers()
    );
    let dir = tempfile::tempdir().unwrap();
    let transport = KafkaConfig::new(&url).unwrap().connect().await.unwrap();
    let store = SqliteConfig::new(dir.path().join("dead.db"))
        .open()
        .unwrap();
    let backend = KafkaBackend::new(transport, store);
    let load = redrive_conformance::under_load::start(&backend, "outage.test", 2000, true).await;
    load.a_fifth_handled(Duration::from_secs(60)).await;
    cluster.broker_down(1).unwrap();
    tokio::time::sleep(down).await;
    cluster.broker_up(1).unwrap();
    let suspects = load
        .finishes_with_nothing_lost(&backend, Duration::from_secs(120))
        .await;
    assert_eq!(suspects, 0, "records run alone as crash suspects");
}
