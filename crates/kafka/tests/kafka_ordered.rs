//! Ordered mode on Kafka (`?ordered=true`): a failing record is retried in place after
//! its tier's delay and its partition waits for it, so records of one key are handled
//! strictly in order — at the price of blocking that partition meanwhile.
//!
//! Needs a Kafka-protocol broker at `REDRIVE_TEST_KAFKA_URL` (`scripts/test` starts one).

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redrive_core::{
    DeadFilter, DeadLetterStore, Envelope, HandlerError, QueueName, RetryPolicy, Transport, now_ms,
};
use redrive_kafka::{KafkaBackend, KafkaConfig};
use redrive_runner::{Runner, RunnerConfig, handler_fn};
use redrive_sqlite::SqliteConfig;

use redrive_kafka::testing::Scope;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_mode_retries_in_place_and_keeps_per_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let scope = Scope::new();
    let url = format!("{}&ordered=true&partitions=2", scope.url);
    let transport = KafkaConfig::new(&url)
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e} (run ./scripts/test, or set REDRIVE_TEST_KAFKA_URL)"));
    let store = SqliteConfig::new(dir.path().join("dead.db"))
        .open()
        .unwrap();
    let backend = KafkaBackend::new(transport, store);
    let queue = QueueName::new("agent.tasks").unwrap();
    let policy = RetryPolicy::parse("300ms,400ms").unwrap();

    // Two keys, eight records each, interleaved; the third record of key "a" fails twice.
    let mut batch = Vec::new();
    for i in 0..8 {
        for key in ["a", "b"] {
            let mut env = Envelope::new(queue.clone(), format!("{key}{i}"));
            env.key = Some(key.to_owned());
            batch.push(env);
        }
    }
    backend.publish(&queue, batch).await.unwrap();

    let log: Arc<Mutex<Vec<(i64, String, u32, bool)>>> = Arc::default();
    let rec = Arc::clone(&log);
    let runner = Runner::new(
        backend.clone(),
        queue.clone(),
        policy,
        RunnerConfig {
            concurrency: 8,
            lease: Duration::from_secs(5),
            idle_poll: Duration::from_millis(20),
            ..RunnerConfig::default()
        },
    )
    .until_idle();
    tokio::time::timeout(
        Duration::from_secs(90),
        runner.run(
            handler_fn(move |env: Envelope| {
                let payload = String::from_utf8(env.payload.to_vec()).unwrap();
                let fail = payload == "a2" && env.attempt < 2;
                rec.lock()
                    .unwrap()
                    .push((now_ms(), payload, env.attempt, !fail));
                async move {
                    // Long enough for another record of the partition to overtake it,
                    // if anything let it.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if fail {
                        Err(HandlerError::retry("Flaky", "not yet"))
                    } else {
                        Ok(())
                    }
                }
            }),
            std::future::pending(),
        ),
    )
    .await
    .expect("the run finishes")
    .expect("the run succeeds");

    let log = log.lock().unwrap().clone();
    for key in ["a", "b"] {
        let handled: Vec<&str> = log
            .iter()
            .filter(|(_, p, _, ok)| *ok && p.starts_with(key))
            .map(|(_, p, _, _)| p.as_str())
            .collect();
        let expected: Vec<String> = (0..8).map(|i| format!("{key}{i}")).collect();
        assert_eq!(handled, expected, "key {key} handled out of order: {log:?}");
    }
    // a2 was handled three times, each retry after its tier's delay, and nothing of key
    // "a" ran while it waited.
    let a2: Vec<&(i64, String, u32, bool)> = log.iter().filter(|(_, p, _, _)| p == "a2").collect();
    assert_eq!(
        a2.iter()
            .map(|(_, _, attempt, _)| *attempt)
            .collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert!(a2[1].0 - a2[0].0 >= 300, "first retry early: {a2:?}");
    assert!(a2[2].0 - a2[1].0 >= 400, "second retry early: {a2:?}");
    let first_a3 = log.iter().position(|(_, p, _, _)| p == "a3").unwrap();
    let last_a2 = log.iter().rposition(|(_, p, _, _)| p == "a2").unwrap();
    assert!(first_a3 > last_a2, "a3 overtook a2: {log:?}");
    assert_eq!(log.len(), 18, "16 records, two of them retried: {log:?}");
    assert_eq!(
        backend.count(&DeadFilter::default()).await.unwrap(),
        0,
        "nothing dead"
    );
    // The consumer goes before the scope deletes its topics.
    drop(backend);
    drop(scope);
}
