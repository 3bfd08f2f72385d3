//! A Kafka broker that goes away mid-run and comes back loses no acknowledged record,
//! and the lanes drain. The broker is librdkafka's mock cluster, in this process, so the
//! test can take it down and up at will: while down it closes every connection and
//! refuses new ones, as a broker being restarted does; it keeps its log, as a broker
//! with durable storage does. Records are produced in batches.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::time::Duration;

use rdkafka::mocking::MockCluster;
use redrive_kafka::{KafkaBackend, KafkaConfig};
use redrive_sqlite::SqliteConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_broker_outage_mid_run_loses_no_acknowledged_record() {
    // `REDRIVE_TEST_LOG=redrive_kafka=trace` shows what the consumer did.
    if let Ok(filter) = std::env::var("REDRIVE_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    let cluster = MockCluster::new(1).unwrap();
    let url = format!(
        "kafka://{}?prefix=outage.&group=outage&topics=auto&linger.ms=20&fetch.wait.max.ms=10",
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
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.broker_up(1).unwrap();
    load.finishes_with_nothing_lost(&backend, Duration::from_secs(120))
        .await;
}
