//! The runner's own ceiling: an in-memory transport whose fetch costs `FETCH_US`
//! microseconds (a lease write), `MAX` per fetch, no-op handler.
//! `cargo run --release -p redrive-runner --example ceiling -- N CONC MAX FETCH_US INFLIGHT`

#![allow(clippy::unwrap_used, missing_docs)]
use std::sync::Arc;
use std::time::{Duration, Instant};

use redrive_core::testing::MemoryTransport;
use redrive_core::{Envelope, QueueName, RetryPolicy, Transport};
use redrive_runner::{Runner, RunnerConfig, handler_fn};

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
        let mut t = MemoryTransport::new()
            .with_max_fetch(max)
            .with_fetches_in_flight(inflight);
        if fetch_us > 0 {
            // A lease write: a blocking call of FETCH_US per fetch.
            t = t.with_fetch_delay(Arc::new(move || {
                Box::pin(async move {
                    tokio::task::spawn_blocking(move || {
                        std::thread::sleep(Duration::from_micros(fetch_us));
                    })
                    .await
                    .unwrap();
                })
            }));
        }
        let env = Envelope::new(q.clone(), "{\"n\":1}");
        t.publish(&q, (0..n).map(|_| env.clone()).collect()).await.unwrap();
        let t = Arc::new(t);
        let config = RunnerConfig {
            concurrency: conc,
            lease: Duration::from_secs(30),
            idle_poll: Duration::from_millis(20),
            max_messages: Some(n as u64),
            ..RunnerConfig::default()
        };
        let started = Instant::now();
        Runner::<MemoryTransport>::new(Arc::clone(&t), q, RetryPolicy::parse("1s").unwrap(), config)
            .run(handler_fn(|_m: Envelope| async { Ok(()) }), std::future::pending())
            .await
            .unwrap();
        let secs = started.elapsed().as_secs_f64();
        println!(
            "n={n} c={conc} max={max} fetch_us={fetch_us} inflight={inflight}: {:.0} msgs/s, {} fetches ({:.0} per fetch)",
            n as f64 / secs,
            t.fetches(),
            n as f64 / t.fetches() as f64
        );
    });
}
