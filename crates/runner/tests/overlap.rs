//! A transport that lets the runner keep two fetches in flight (NATS does, so the
//! server always has the next pull request waiting) still sees every message handled
//! once, and every message it leased either settled or released.
//!
//! Two of the three on Tokio's paused clock: the fetches' 20 ms and the runner's poll
//! waits pass as soon as nothing else can run, so the runs take no wall-clock time for
//! their waits and interleave the same way on a loaded machine. (The in-memory transport's leases and
//! due times read the wall clock; the leases here are far longer than a run.)

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redrive_core::testing::MemoryTransport;
use redrive_core::{Envelope, MessageId, QueueName, RetryPolicy, Transport};
use redrive_runner::{Runner, RunnerConfig, handler_fn};

/// How a run ends.
enum End {
    /// `max_messages` deliveries.
    After(usize),
    /// Shutdown asked by the handler that completes this many.
    ShutdownAt(usize),
}

/// What a run did: the messages acknowledged and released (by number, sorted), the
/// deliveries leased, the most fetches at once, and the run's own counts.
struct Ran {
    acked: Vec<usize>,
    released: Vec<usize>,
    leased: usize,
    most_fetching: usize,
    delivered: u64,
    released_count: u64,
}

/// Runs a queue of `total` numbered messages through a runner until `end`. Its fetches
/// take 20 ms (long beside the no-op handlers: the runner spends most of its time
/// waiting on fetches, so one is in flight whenever the run is told to stop), up to
/// `overlap` at once.
async fn run(total: usize, end: End, overlap: usize) -> Ran {
    let queue = QueueName::new("overlap").unwrap();
    let transport = Arc::new(
        MemoryTransport::new()
            .with_fetches_in_flight(overlap)
            .with_fetch_delay(Arc::new(|| {
                Box::pin(tokio::time::sleep(Duration::from_millis(20)))
            })),
    );
    let batch: Vec<Envelope> = (0..total)
        .map(|n| Envelope::new(queue.clone(), n.to_string()))
        .collect();
    let numbers: HashMap<MessageId, usize> =
        batch.iter().enumerate().map(|(n, e)| (e.id, n)).collect();
    transport.publish(&queue, batch).await.unwrap();

    let (max_messages, stop_at) = match end {
        End::After(n) => (Some(n as u64), usize::MAX),
        End::ShutdownAt(n) => (None, n),
    };
    let config = RunnerConfig {
        concurrency: 4,
        fetch_batch: 64,
        max_messages,
        idle_poll: Duration::from_millis(5),
        ..RunnerConfig::default()
    };
    let handled = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let (h, s) = (Arc::clone(&handled), Arc::clone(&stop));
    let runner: Runner<MemoryTransport> = Runner::new(
        Arc::clone(&transport),
        queue.clone(),
        RetryPolicy::parse("1s").unwrap(),
        config,
    );
    let summary = tokio::time::timeout(
        Duration::from_secs(60),
        runner.run(
            handler_fn(move |_m: Envelope| {
                if h.fetch_add(1, Ordering::SeqCst) + 1 == stop_at {
                    s.notify_one();
                }
                async { Ok(()) }
            }),
            async move { stop.notified().await },
        ),
    )
    .await
    .expect("the run ends")
    .unwrap();
    let by_number = |ids: Vec<MessageId>| {
        let mut v: Vec<usize> = ids.iter().map(|id| numbers[id]).collect();
        v.sort_unstable();
        v
    };
    Ran {
        acked: by_number(transport.acked(&queue)),
        released: by_number(transport.released(&queue)),
        leased: transport.leases(&queue),
        most_fetching: transport.most_fetches_at_once(),
        delivered: summary.delivered,
        released_count: summary.released,
    }
}

// On the real clock: the runner fetches ahead by the pace of handler starts over time,
// and on the paused clock, where every start lands on the instant a fetch returns, it
// never found room for a second fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_fetches_in_flight_hand_every_message_out_once() {
    let ran = run(3000, End::After(3000), 2).await;
    assert_eq!(
        ran.most_fetching, 2,
        "the runner kept a second fetch waiting"
    );
    assert_eq!(ran.delivered, 3000);
    assert_eq!(ran.released_count, 0);
    assert_eq!(ran.acked, (0..3000).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn one_fetch_at_a_time_unless_the_transport_allows_more() {
    let ran = run(2000, End::After(2000), 1).await;
    assert_eq!(ran.most_fetching, 1);
    assert_eq!(ran.delivered, 2000);
    assert_eq!(ran.acked, (0..2000).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn at_shutdown_what_both_fetches_leased_is_released_not_lost() {
    let ran = run(50_000, End::ShutdownAt(700), 2).await;
    assert_eq!(ran.delivered as usize, ran.acked.len());
    assert!(ran.acked.len() >= 700);
    assert!(ran.leased < 50_000, "the run stopped fetching at shutdown");
    assert_eq!(
        ran.acked.len() + ran.released.len(),
        ran.leased,
        "every leased message was acked or released"
    );
    assert_eq!(ran.released_count as usize, ran.leased - ran.acked.len());
    // Nothing handed out twice, nothing both acked and released.
    let mut all = ran.acked;
    all.extend(ran.released);
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), ran.leased);
}
