//! What the broker-outage tests share: numbered messages published, a runner consuming
//! them while the test takes the broker away, and the check that nothing acknowledged
//! was lost and the lanes drained.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redrive_core::{
    Envelope, FailureKind, HandlerError, HandlerResult, LaneSet, LaneStats, MessageId, QueueName,
    RetryPolicy, Transport,
};
use redrive_runner::{RunError, Runner, RunnerConfig, Summary, handler_fn};
use tokio::task::JoinHandle;

/// A run in progress over `n` published messages.
pub struct UnderLoad {
    n: usize,
    lanes: LaneSet,
    published: HashSet<MessageId>,
    handled: Arc<Mutex<HashSet<MessageId>>>,
    /// Deliveries that came as crash suspects (their history says a consumer stopped
    /// while they were in flight), run alone.
    suspects: Arc<AtomicUsize>,
    run: JoinHandle<Result<Summary, RunError>>,
}

/// Publishes `n` messages numbered from 0 to `queue` and starts a runner on them
/// (concurrency 20, lease 2 s, tiers `50ms,100ms,200ms`, until idle; handlers take
/// 3 ms). With `fail_tenth`, every tenth fails once, so the retry lanes carry messages
/// through whatever the test does to the broker.
pub async fn start<B>(backend: &B, queue: &str, n: usize, fail_tenth: bool) -> UnderLoad
where
    B: Transport + LaneStats + Clone,
{
    let queue = QueueName::new(queue).unwrap();
    let policy = RetryPolicy::parse("50ms,100ms,200ms").unwrap();
    let mut published = HashSet::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let batch: Vec<Envelope> = chunk
            .iter()
            .map(|i| Envelope::new(queue.clone(), format!("{i}")))
            .collect();
        published.extend(batch.iter().map(|e| e.id));
        backend.publish(&queue, batch).await.unwrap();
    }
    let handled: Arc<Mutex<HashSet<MessageId>>> = Arc::default();
    let seen = Arc::clone(&handled);
    let suspects = Arc::new(AtomicUsize::new(0));
    let suspected = Arc::clone(&suspects);
    let config = RunnerConfig {
        concurrency: 20,
        // A delivery whose settle was lost with the broker comes back after it.
        lease: Duration::from_secs(2),
        idle_poll: Duration::from_millis(20),
        ..RunnerConfig::default()
    };
    let lanes = LaneSet {
        queue: queue.clone(),
        tiers: policy.tiers().to_vec(),
    };
    let runner = Runner::new(backend.clone(), queue, policy, config).until_idle();
    let run = tokio::spawn(runner.run(
        handler_fn(move |env: Envelope| {
            let seen = Arc::clone(&seen);
            if env
                .history
                .iter()
                .any(|f| f.kind == FailureKind::LeaseExpired)
            {
                suspected.fetch_add(1, Ordering::Relaxed);
            }
            async move {
                tokio::time::sleep(Duration::from_millis(3)).await;
                let n: usize = std::str::from_utf8(&env.payload).unwrap().parse().unwrap();
                if fail_tenth && n.is_multiple_of(10) && env.attempt == 0 {
                    return Err(HandlerError::retry("Busy", "upstream busy"));
                }
                seen.lock().unwrap().insert(env.id);
                HandlerResult::Ok(())
            }
        }),
        std::future::pending(),
    ));
    UnderLoad {
        n,
        lanes,
        published,
        handled,
        suspects,
        run,
    }
}

impl UnderLoad {
    /// Waits until a fifth of the messages are handled.
    pub async fn a_fifth_handled(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.handled.lock().unwrap().len() < self.n / 5 {
            assert!(Instant::now() < deadline, "the consumer did not get going");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for the run to end on its own (idle), then checks every published message
    /// was handled and the lanes of `backend` are drained with nothing dead.
    /// Returns how many deliveries came as crash suspects.
    pub async fn finishes_with_nothing_lost<B: LaneStats>(
        self,
        backend: &B,
        within: Duration,
    ) -> usize {
        tokio::time::timeout(within, self.run)
            .await
            .expect("the run recovers and finishes")
            .unwrap()
            .unwrap();
        let handled = self.handled.lock().unwrap().clone();
        let missing = self.published.difference(&handled).count();
        assert_eq!(missing, 0, "acknowledged messages never handled");
        let depths = backend.queue_depths(&self.lanes).await.unwrap();
        assert!(depths.is_drained() && depths.dlq == 0, "{depths:?}");
        self.suspects.load(Ordering::Relaxed)
    }
}
