//! The runner's own ceiling: an in-memory transport whose fetch costs `FETCH_US`
//! microseconds (a lease write), `MAX` per fetch, no-op handler.
//! `cargo run --release -p redrive-runner --example ceiling -- N CONC MAX FETCH_US INFLIGHT`

#![allow(clippy::unwrap_used, missing_docs)]
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redrive_core::{
    Delivery, Envelope, Fetched, Lane, LaneSet, QueueName, RetryPolicy, Tier, Transport,
    TransportError, now_ms,
};
use redrive_runner::{Runner, RunnerConfig, handler_fn};

struct Mem {
    total: usize,
    max: usize,
    fetch_us: u64,
    inflight: usize,
    next: Mutex<usize>,
    acked: AtomicUsize,
    fetches: AtomicUsize,
    env: Envelope,
}

impl Transport for Mem {
    type Token = usize;

    async fn publish(&self, _: &QueueName, _: Vec<Envelope>) -> Result<(), TransportError> {
        Ok(())
    }

    async fn fetch(
        &self,
        _lanes: &LaneSet,
        max: usize,
        _lease: Duration,
    ) -> Result<Fetched<usize>, TransportError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let range = {
            let mut next = self.next.lock().unwrap();
            let from = *next;
            *next = (from + max).min(self.total);
            from..*next
        };
        if self.fetch_us > 0 {
            let us = self.fetch_us;
            tokio::task::spawn_blocking(move || std::thread::sleep(Duration::from_micros(us)))
                .await
                .unwrap();
        }
        let deliveries = range
            .map(|n| Delivery {
                envelope: self.env.clone(),
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

    async fn ack(&self, _: &Delivery<usize>) -> Result<(), TransportError> {
        self.acked.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn retry(
        &self,
        _: &Delivery<usize>,
        _: &Tier,
        _: i64,
        _: &Envelope,
    ) -> Result<(), TransportError> {
        unreachable!()
    }

    async fn dead_letter(&self, _: &Delivery<usize>, _: &Envelope) -> Result<(), TransportError> {
        unreachable!()
    }

    async fn release(&self, _: &Delivery<usize>) -> Result<(), TransportError> {
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

    fn max_fetch(&self) -> usize {
        self.max
    }

    fn fetches_in_flight(&self) -> usize {
        self.inflight
    }
}

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let n = a.first().copied().unwrap_or(1_000_000);
    let conc = a.get(1).copied().unwrap_or(50);
    let max = a.get(2).copied().unwrap_or(256);
    let fetch_us = a.get(3).copied().unwrap_or(0) as u64;
    let inflight = a.get(4).copied().unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let q = QueueName::new("bench").unwrap();
        let t = Arc::new(Mem {
            total: n,
            max,
            fetch_us,
            inflight,
            next: Mutex::new(0),
            acked: AtomicUsize::new(0),
            fetches: AtomicUsize::new(0),
            env: Envelope::new(q.clone(), "{\"n\":1}"),
        });
        let config = RunnerConfig {
            concurrency: conc,
            lease: Duration::from_secs(30),
            idle_poll: Duration::from_millis(20),
            max_messages: Some(n as u64),
            ..RunnerConfig::default()
        };
        let started = Instant::now();
        Runner::<Mem>::new(Arc::clone(&t), q, RetryPolicy::parse("1s").unwrap(), config)
            .run(handler_fn(|_m: Envelope| async { Ok(()) }), std::future::pending())
            .await
            .unwrap();
        let secs = started.elapsed().as_secs_f64();
        println!(
            "n={n} c={conc} max={max} fetch_us={fetch_us} inflight={inflight}: {:.0} msgs/s, {} fetches ({:.0} per fetch)",
            n as f64 / secs,
            t.fetches.load(Ordering::Relaxed),
            n as f64 / t.fetches.load(Ordering::Relaxed) as f64
        );
    });
}
