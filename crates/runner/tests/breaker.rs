//! The outage breaker cannot keep a backlog of messages that fail on their own alive
//! forever: every message here fails with a retryable error, which looks like an outage,
//! so the breaker opens, spares failures and probes; but a message is spared only a
//! bounded number of times, after which its failures count and it reaches the DLQ with
//! exactly its policy's attempts counted.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::sync::Arc;
use std::time::Duration;

use redrive_core::testing::MemoryTransport;
use redrive_core::{Envelope, FailureKind, HandlerError, QueueName, RetryPolicy, Transport};
use redrive_runner::{BreakerConfig, Runner, RunnerConfig, handler_fn};

const MESSAGES: usize = 30;

#[tokio::test]
async fn messages_that_always_fail_still_reach_the_dlq_with_the_breaker_on() {
    let queue = QueueName::new("always.failing").unwrap();
    let transport = Arc::new(MemoryTransport::new());
    let batch: Vec<Envelope> = (0..MESSAGES)
        .map(|n| Envelope::new(queue.clone(), n.to_string()))
        .collect();
    transport.publish(&queue, batch).await.unwrap();

    let config = RunnerConfig {
        concurrency: 8,
        idle_poll: Duration::from_millis(10),
        breaker: Some(BreakerConfig {
            min_failures: 5,
            failure_ratio: 0.8,
            window: Duration::from_secs(30),
            first_probe: Duration::from_millis(10),
            max_probe: Duration::from_millis(10),
        }),
        ..RunnerConfig::default()
    };
    let policy = RetryPolicy::parse("10ms,20ms").unwrap();
    let attempts = policy.max_attempts();
    let runner: Runner<MemoryTransport> =
        Runner::new(Arc::clone(&transport), queue.clone(), policy, config);
    let stats = runner.stats();
    let handler = handler_fn(|_m: Envelope| async {
        Err::<(), _>(HandlerError::retry(
            "http_503",
            "the upstream is unavailable",
        ))
    });
    let all_dead = {
        let (transport, queue) = (Arc::clone(&transport), queue.clone());
        async move {
            while transport.dead(&queue).len() < MESSAGES {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), runner.run(handler, all_dead))
        .await
        .expect("the messages never all reached the DLQ")
        .unwrap();

    let s = stats.snapshot();
    assert!(s.breaker_opened >= 1, "{s:?}");
    assert!(s.spared >= 1, "{s:?}");
    let limit = 2 * attempts as usize;
    for dead in transport.dead(&queue) {
        let counted = dead.history.iter().filter(|f| f.counted).count();
        let spared = dead.uncounted_failures();
        assert_eq!(counted, attempts as usize, "{:?}", dead.history);
        assert_eq!(dead.attempt, attempts);
        assert!(spared <= limit, "{spared} spared: {:?}", dead.history);
        assert!(
            dead.history
                .iter()
                .filter(|f| !f.counted)
                .all(|f| f.kind == FailureKind::Retry
                    && f.message
                        .ends_with("(not counted: the queue's breaker was open)")),
            "{:?}",
            dead.history
        );
    }
}
