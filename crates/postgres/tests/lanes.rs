//! What the PostgreSQL lanes promise beyond the conformance suite (which the binary's
//! tests run): consumers on many connections never share a lease, and an idle fetch is
//! woken by a notification instead of waiting out its poll.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use redrive_core::{Envelope, LaneSet, LaneStats, QueueName, RetryPolicy, Transport};
use redrive_postgres::testing::TestSchema;

fn lanes(name: &str) -> LaneSet {
    LaneSet {
        queue: QueueName::new(name).unwrap(),
        tiers: RetryPolicy::default().tiers().to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_side_by_side_each_get_a_message_once() {
    let schema = TestSchema::new();
    let producer = schema.open().await;
    let lanes = lanes("agent.tasks");
    let batch: Vec<Envelope> = (0..400)
        .map(|i| Envelope::new(lanes.queue.clone(), format!("m{i}").into_bytes()))
        .collect();
    let published: HashSet<String> = batch.iter().map(|e| e.id.to_string()).collect();
    producer.publish(&lanes.queue, batch).await.unwrap();

    // Four consumers, each with a pool of its own (as four hosts would have).
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let store = schema.open().await;
        let lanes = lanes.clone();
        consumers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let fetched = store
                    .fetch(&lanes, 7, Duration::from_secs(30))
                    .await
                    .unwrap();
                if fetched.deliveries.is_empty() {
                    return got;
                }
                for d in fetched.deliveries {
                    store.ack(&d).await.unwrap();
                    got.push(d.envelope.id.to_string());
                }
            }
        }));
    }
    let mut seen = Vec::new();
    for c in consumers {
        seen.extend(c.await.unwrap());
    }
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(seen.len(), 400, "no message handed out twice");
    assert_eq!(unique, published, "every message handed out");
    assert!(producer.queue_depths(&lanes).await.unwrap().is_drained());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_fetch_wakes_when_another_program_inserts() {
    let schema = TestSchema::new();
    let store = schema.open().await;
    let lanes = lanes("agent.tasks");
    store.create_lanes(&lanes).await.unwrap();
    // A consumer's fetch loop (the first fetch starts the listening connection); let it
    // settle into its wait.
    let fetch = {
        let (store, lanes) = (store.clone(), lanes.clone());
        tokio::spawn(async move {
            let mut looks = 0;
            loop {
                looks += 1;
                let fetched = store
                    .fetch(&lanes, 1, Duration::from_secs(30))
                    .await
                    .unwrap();
                if !fetched.deliveries.is_empty() {
                    return (fetched.deliveries.len(), looks);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let inserted = Instant::now();
    schema
        .connect()
        .await
        .execute(
            "INSERT INTO messages (queue, payload) VALUES ('agent.tasks', 'plain')",
            &[],
        )
        .await
        .unwrap();
    let (got, looks) = fetch.await.unwrap();
    assert_eq!(got, 1);
    assert!(
        looks <= 3,
        "{looks} fetches: an idle fetch should wait, not poll"
    );
    // Without the notification it would have looked again only when its one-second
    // wait ran out.
    assert!(
        inserted.elapsed() < Duration::from_millis(600),
        "the message was fetched {:?} after the insert",
        inserted.elapsed()
    );
}
