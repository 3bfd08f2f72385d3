//! The runner's own logic, over the in-memory transport: where each outcome sends a
//! message, that a retry waits its tier, and that a crashed delivery is run alone and
//! not charged.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redrive_core::testing::MemoryTransport;
use redrive_core::{Envelope, HandlerError, LaneSet, QueueName, RetryPolicy, Transport};
use redrive_runner::{Runner, RunnerConfig, handler_fn};

fn config(max_messages: u64) -> RunnerConfig {
    RunnerConfig {
        concurrency: 4,
        lease: Duration::from_millis(300),
        idle_poll: Duration::from_millis(5),
        max_messages: Some(max_messages),
        ..RunnerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_outcome_sends_the_message_where_it_belongs() {
    let queue = QueueName::new("outcomes").unwrap();
    let transport = Arc::new(MemoryTransport::new());
    let batch: Vec<Envelope> = ["ok", "flaky", "bad"]
        .into_iter()
        .map(|p| Envelope::new(queue.clone(), p))
        .collect();
    let ids: HashMap<String, _> = batch
        .iter()
        .map(|e| (String::from_utf8(e.payload.to_vec()).unwrap(), e.id))
        .collect();
    transport.publish(&queue, batch).await.unwrap();

    // When each payload was handled, by attempt.
    let seen: Arc<Mutex<Vec<(String, u32, Instant)>>> = Arc::default();
    let log = Arc::clone(&seen);
    let runner: Runner<MemoryTransport> = Runner::new(
        Arc::clone(&transport),
        queue.clone(),
        RetryPolicy::parse("200ms").unwrap(),
        config(4), // ok once, flaky twice, bad once
    );
    tokio::time::timeout(
        Duration::from_secs(30),
        runner.run(
            handler_fn(move |env: Envelope| {
                let payload = String::from_utf8(env.payload.to_vec()).unwrap();
                log.lock()
                    .unwrap()
                    .push((payload.clone(), env.attempt, Instant::now()));
                async move {
                    match (payload.as_str(), env.attempt) {
                        ("flaky", 0) => Err(HandlerError::retry("Busy", "try later")),
                        ("bad", _) => Err(HandlerError::poison("Invalid", "cannot parse")),
                        _ => Ok(()),
                    }
                }
            }),
            std::future::pending(),
        ),
    )
    .await
    .unwrap()
    .unwrap();

    let mut acked = transport.acked(&queue);
    acked.sort();
    let mut want = vec![ids["ok"], ids["flaky"]];
    want.sort();
    assert_eq!(acked, want);
    let dead = transport.dead(&queue);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, ids["bad"]);
    assert_eq!(dead[0].history.len(), 1, "poison is not retried");
    let seen = seen.lock().unwrap();
    let flaky: Vec<_> = seen.iter().filter(|(p, _, _)| p == "flaky").collect();
    assert_eq!(flaky.len(), 2);
    assert_eq!((flaky[0].1, flaky[1].1), (0, 1));
    assert!(
        // Due times are whole milliseconds of the wall clock: up to 1 ms is rounding.
        flaky[1].2 - flaky[0].2 >= Duration::from_millis(199),
        "the retry waited its tier: {:?}",
        flaky[1].2 - flaky[0].2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_whose_consumer_died_is_run_alone_and_not_charged() {
    let queue = QueueName::new("crashed").unwrap();
    let transport = Arc::new(MemoryTransport::new());
    let env = Envelope::new(queue.clone(), "x");
    let id = env.id;
    transport.publish(&queue, vec![env]).await.unwrap();
    // A consumer leases it and dies: the lease runs out without a settle.
    let lanes = LaneSet {
        queue: queue.clone(),
        tiers: RetryPolicy::parse("1s").unwrap().tiers().to_vec(),
    };
    let taken = transport
        .fetch(&lanes, 1, Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(taken.deliveries.len(), 1);
    tokio::time::sleep(Duration::from_millis(80)).await;

    let attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
    let log = Arc::clone(&attempts);
    let done = Arc::new(tokio::sync::Notify::new());
    let ran = Arc::clone(&done);
    let runner: Runner<MemoryTransport> = Runner::new(
        Arc::clone(&transport),
        queue.clone(),
        RetryPolicy::parse("1s").unwrap(),
        RunnerConfig {
            max_messages: None,
            ..config(0)
        },
    );
    tokio::time::timeout(
        Duration::from_secs(30),
        runner.run(
            handler_fn(move |env: Envelope| {
                log.lock().unwrap().push(env.attempt);
                ran.notify_one();
                async { Ok(()) }
            }),
            async move { done.notified().await },
        ),
    )
    .await
    .unwrap()
    .unwrap();

    // Moved to the isolation lane (the handler did not run beside others), run alone,
    // done; the crash is in its history but not counted as an attempt.
    assert_eq!(transport.acked(&queue), [id]);
    assert!(transport.dead(&queue).is_empty());
    assert_eq!(*attempts.lock().unwrap(), [0]);
    // Leased three times: by the consumer that died, by the runner (which isolated it
    // without running it), and from the isolation lane (run alone).
    assert_eq!(transport.leases(&queue), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_crash_beside_others_is_run_alone_and_charged_only_alone() {
    let queue = QueueName::new("worker.crash").unwrap();
    let transport = Arc::new(MemoryTransport::new());
    let batch: Vec<Envelope> = ["innocent", "culprit"]
        .into_iter()
        .map(|p| Envelope::new(queue.clone(), p))
        .collect();
    let culprit = batch[1].id;
    transport.publish(&queue, batch).await.unwrap();

    // (payload, attempt, whether it was the only message in its worker)
    let seen: Arc<Mutex<Vec<(String, u32, bool)>>> = Arc::default();
    let log = Arc::clone(&seen);
    let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let runner: Runner<MemoryTransport> = Runner::new(
        Arc::clone(&transport),
        queue.clone(),
        RetryPolicy::parse("20ms").unwrap(),
        RunnerConfig {
            max_messages: None,
            ..config(0)
        },
    );
    // Until the innocent message is done and the culprit dead.
    let watched = Arc::clone(&transport);
    let q = queue.clone();
    let settled = async move {
        while watched.dead(&q).is_empty() || watched.acked(&q).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(
        Duration::from_secs(30),
        runner.run(
            handler_fn(move |env: Envelope| {
                let payload = String::from_utf8(env.payload.to_vec()).unwrap();
                let (log, running) = (Arc::clone(&log), Arc::clone(&running));
                async move {
                    // Both are held until both run, as two deliveries of one worker are.
                    let alone = {
                        running.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        running.load(std::sync::atomic::Ordering::SeqCst) == 1
                    };
                    log.lock()
                        .unwrap()
                        .push((payload.clone(), env.attempt, alone));
                    running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    // The culprit kills its worker every time; the innocent one only
                    // dies with it.
                    match (payload.as_str(), alone) {
                        ("culprit", true) => Err(HandlerError::crashed("worker_crashed", "exit 9")),
                        ("culprit", false) | ("innocent", false) => Err(
                            HandlerError::crashed_beside_others("worker_crashed", "exit 9"),
                        ),
                        _ => Ok(()),
                    }
                }
            }),
            settled,
        ),
    )
    .await
    .unwrap()
    .unwrap();

    let seen = seen.lock().unwrap().clone();
    // The innocent message is never charged: it ran at attempt 0 each time.
    assert!(
        seen.iter()
            .filter(|(p, _, _)| p == "innocent")
            .all(|(_, attempt, _)| *attempt == 0),
        "{seen:?}"
    );
    assert_eq!(transport.acked(&queue).len(), 1);
    // The culprit is charged only for the crashes it had alone, and ends dead.
    let dead = transport.dead(&queue);
    assert_eq!(dead.len(), 1, "{seen:?}");
    assert_eq!(dead[0].id, culprit);
    let charged: Vec<_> = dead[0].history.iter().filter(|f| f.counted).collect();
    assert_eq!(charged.len(), 2, "{:?}", dead[0].history);
    assert!(charged.iter().all(|f| f.class == "worker_crashed"));
    assert!(
        seen.iter()
            .filter(|(p, attempt, _)| p == "culprit" && *attempt > 0)
            .all(|(_, _, alone)| *alone),
        "after its first crash the culprit runs alone: {seen:?}"
    );
}
