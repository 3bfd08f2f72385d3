//! A transport that lets the runner keep two fetches in flight (NATS does, so the
//! server always has the next pull request waiting) still sees every message handled
//! once, and every message it leased either settled or released.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redrive_core::{
    Delivery, Envelope, Fetched, Lane, LaneSet, QueueName, RetryPolicy, Tier, Transport,
    TransportError, now_ms,
};
use redrive_runner::{Runner, RunnerConfig, handler_fn};

/// An in-memory queue of `total` numbered messages whose fetches take a few
/// milliseconds, counting how many run at once.
struct SlowFetches {
    overlap: usize,
    total: usize,
    next: Mutex<usize>,
    fetching: AtomicUsize,
    most_fetching: AtomicUsize,
    leased: AtomicUsize,
    acked: Mutex<Vec<usize>>,
    released: Mutex<Vec<usize>>,
}

impl SlowFetches {
    fn new(total: usize, overlap: usize) -> Self {
        Self {
            overlap,
            total,
            next: Mutex::new(0),
            fetching: AtomicUsize::new(0),
            most_fetching: AtomicUsize::new(0),
            leased: AtomicUsize::new(0),
            acked: Mutex::new(Vec::new()),
            released: Mutex::new(Vec::new()),
        }
    }
}

impl Transport for SlowFetches {
    type Token = usize;

    async fn publish(&self, _: &QueueName, _: Vec<Envelope>) -> Result<(), TransportError> {
        Ok(())
    }

    async fn fetch(
        &self,
        lanes: &LaneSet,
        max: usize,
        _lease: Duration,
    ) -> Result<Fetched<usize>, TransportError> {
        let now = self.fetching.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_fetching.fetch_max(now, Ordering::SeqCst);
        // Leased when asked for, answered later, as a broker does.
        let range = {
            let mut next = self.next.lock().unwrap();
            let from = *next;
            *next = (from + max).min(self.total);
            from..*next
        };
        self.leased.fetch_add(range.len(), Ordering::SeqCst);
        // Long beside the no-op handlers: the runner spends most of its time waiting
        // on fetches, so one is in flight whenever the run is told to stop.
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.fetching.fetch_sub(1, Ordering::SeqCst);
        let deliveries = range
            .map(|n| Delivery {
                envelope: Envelope::new(lanes.queue.clone(), n.to_string()),
                lane: Lane::Main,
                due_ms: now_ms(),
                unfinished_before: false,
                token: n,
            })
            .collect();
        Ok(Fetched {
            deliveries,
            next_due_ms: None,
        })
    }

    async fn ack(&self, d: &Delivery<usize>) -> Result<(), TransportError> {
        self.acked.lock().unwrap().push(d.token);
        Ok(())
    }

    async fn retry(
        &self,
        _: &Delivery<usize>,
        _: &Tier,
        _: i64,
        _: &Envelope,
    ) -> Result<(), TransportError> {
        unreachable!("every handler call succeeds")
    }

    async fn dead_letter(&self, _: &Delivery<usize>, _: &Envelope) -> Result<(), TransportError> {
        unreachable!("every handler call succeeds")
    }

    async fn release(&self, d: &Delivery<usize>) -> Result<(), TransportError> {
        self.released.lock().unwrap().push(d.token);
        Ok(())
    }

    async fn extend_lease(&self, _: &Delivery<usize>, _: Duration) -> Result<(), TransportError> {
        Ok(())
    }

    async fn create_lanes(&self, _: &LaneSet) -> Result<(), TransportError> {
        Ok(())
    }

    async fn isolate(&self, _: &Delivery<usize>, _: &Envelope) -> Result<(), TransportError> {
        Ok(())
    }

    async fn fetch_isolated(
        &self,
        _: &LaneSet,
        _: Duration,
    ) -> Result<Fetched<usize>, TransportError> {
        Ok(Fetched {
            deliveries: Vec::new(),
            next_due_ms: None,
        })
    }

    async fn isolated_due(&self, _: &LaneSet) -> Result<Option<i64>, TransportError> {
        Ok(None)
    }

    fn fetches_in_flight(&self) -> usize {
        self.overlap
    }
}

/// How a run ends.
enum End {
    /// `max_messages` deliveries.
    After(usize),
    /// Shutdown asked by the handler that completes this many.
    ShutdownAt(usize),
}

/// Runs a queue of `total` messages through a runner until `end`; returns the
/// transport to look at, with the run's deliveries and releases.
async fn run(total: usize, end: End, overlap: usize) -> (Arc<SlowFetches>, u64, u64) {
    let transport = Arc::new(SlowFetches::new(total, overlap));
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
    let queue = QueueName::new("overlap").unwrap();
    let runner: Runner<SlowFetches> = Runner::new(
        Arc::clone(&transport),
        queue,
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
    (transport, summary.delivered, summary.released)
}

fn sorted(v: &Mutex<Vec<usize>>) -> Vec<usize> {
    let mut v = v.lock().unwrap().clone();
    v.sort_unstable();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_fetches_in_flight_hand_every_message_out_once() {
    let (t, delivered, released) = run(3000, End::After(3000), 2).await;
    assert_eq!(
        t.most_fetching.load(Ordering::SeqCst),
        2,
        "the runner kept a second fetch waiting"
    );
    assert_eq!(delivered, 3000);
    assert_eq!(released, 0);
    assert_eq!(sorted(&t.acked), (0..3000).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fetch_at_a_time_unless_the_transport_allows_more() {
    let (t, delivered, _) = run(2000, End::After(2000), 1).await;
    assert_eq!(t.most_fetching.load(Ordering::SeqCst), 1);
    assert_eq!(delivered, 2000);
    assert_eq!(sorted(&t.acked), (0..2000).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_shutdown_what_both_fetches_leased_is_released_not_lost() {
    let (t, delivered, released) = run(50_000, End::ShutdownAt(700), 2).await;
    let acked = sorted(&t.acked);
    assert_eq!(delivered as usize, acked.len());
    assert!(acked.len() >= 700);
    let leased = t.leased.load(Ordering::SeqCst);
    assert!(leased < 50_000, "the run stopped fetching at shutdown");
    assert_eq!(
        acked.len() + t.released.lock().unwrap().len(),
        leased,
        "every leased message was acked or released"
    );
    assert_eq!(released as usize, leased - acked.len());
    // Nothing handed out twice, nothing both acked and released.
    let mut all = acked;
    all.extend(sorted(&t.released));
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), leased);
}
