//! A Kafka broker that goes away mid-run and comes back loses no acknowledged record,
//! and the lanes drain. The broker is librdkafka's mock cluster, in this process, so the
//! test can take it down and up at will: while down it closes every connection and
//! refuses new ones, as a broker being restarted does; it keeps its log, as a broker
//! with durable storage does. Records are produced in batches.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use redrive_core::{
    Envelope, HandlerResult, LaneSet, LaneStats, MessageId, QueueName, RetryPolicy, Transport,
};
use redrive_kafka::{KafkaBackend, KafkaConfig};
use redrive_runner::{Runner, RunnerConfig, handler_fn};
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
    let queue = QueueName::new("outage.test").unwrap();
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

    // Every tenth record fails once, so the retry lanes carry records through the outage.
    let handled: Arc<Mutex<HashSet<MessageId>>> = Arc::default();
    let seen = Arc::clone(&handled);
    let config = RunnerConfig {
        concurrency: 20,
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
                let n: usize = std::str::from_utf8(&env.payload).unwrap().parse().unwrap();
                if n.is_multiple_of(10) && env.attempt == 0 {
                    return Err(redrive_core::HandlerError::retry("Busy", "upstream busy"));
                }
                seen.lock().unwrap().insert(env.id);
                HandlerResult::Ok(())
            }
        }),
        std::future::pending(),
    ));

    let deadline = Instant::now() + Duration::from_secs(60);
    while handled.lock().unwrap().len() < N / 5 {
        assert!(Instant::now() < deadline, "the consumer did not get going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.broker_up(1).unwrap();
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the run recovers and finishes")
        .unwrap()
        .unwrap();
    let handled = handled.lock().unwrap().clone();
    let missing = published.difference(&handled).count();
    assert_eq!(missing, 0, "acknowledged records never handled");
    let lanes = LaneSet {
        queue,
        tiers: policy.tiers().to_vec(),
    };
    let depths = backend.queue_depths(&lanes).await.unwrap();
    assert!(depths.is_drained() && depths.dlq == 0, "{depths:?}");
}
