//! The outage breaker, end to end: 1,000 messages consumed with `--webhook` by the
//! `redrive` binary, tiers `1s,2s,4s` (4 attempts), while the endpoint answers 503 for
//! 60 seconds starting one second in. With the breaker (the default) nothing is
//! dead-lettered and everything is done once the outage ends, for a few dozen calls
//! during the outage; turned off, the messages that met the outage walk their tiers into
//! the DLQ. Each test prints its figures.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::Value;

mod cli_support;
use cli_support::redrive;

const MESSAGES: usize = 1000;
const OUTAGE_FROM: Duration = Duration::from_secs(1);
const OUTAGE: Duration = Duration::from_secs(60);

/// The agent's upstream: 50 ms per call, 503 during the outage.
#[derive(Default)]
struct Upstream {
    started: std::sync::OnceLock<Instant>,
    during: AtomicU64,
    after: AtomicU64,
    before: AtomicU64,
}

async fn call(State(up): State<Arc<Upstream>>) -> StatusCode {
    let since = up.started.get_or_init(Instant::now).elapsed();
    tokio::time::sleep(Duration::from_millis(50)).await;
    if since < OUTAGE_FROM {
        up.before.fetch_add(1, Ordering::Relaxed);
        StatusCode::NO_CONTENT
    } else if since < OUTAGE_FROM + OUTAGE {
        up.during.fetch_add(1, Ordering::Relaxed);
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        up.after.fetch_add(1, Ordering::Relaxed);
        StatusCode::NO_CONTENT
    }
}

struct Run {
    /// The most consumers `queues` showed with their breaker open.
    shown_open: u64,
    summary: Value,
    dead: u64,
    calls_during_outage: u64,
    calls: u64,
}

async fn outage(breaker: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("b.db").display());
    let messages: String = (0..MESSAGES)
        .map(|i| format!("{{\"task\":{i}}}\n"))
        .collect();
    redrive(&store, &["publish", "agent.tasks"], &messages);

    let up = Arc::new(Upstream::default());
    let app = Router::new()
        .route("/", post(call))
        .with_state(Arc::clone(&up));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let args: Vec<String> = [
        "consume",
        "agent.tasks",
        "--webhook",
        &url,
        "--concurrency",
        "20",
        "--tiers",
        "1s,2s,4s",
        "--jitter",
        "0",
        "--until-idle",
        "--breaker",
        breaker,
        "--json",
    ]
    .map(str::to_owned)
    .to_vec();
    let store2 = store.clone();
    let consume = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        redrive(&store2, &args, "")
    });
    // Meanwhile `queues` shows the breaker while it is open (from the store, as `serve`
    // does).
    let store3 = store.clone();
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watch = Arc::clone(&watching);
    let shown_open = tokio::task::spawn_blocking(move || {
        let mut most = 0;
        while watch.load(Ordering::Relaxed) {
            let queues = redrive(&store3, &["queues", "--json"], "");
            if let Some(line) = queues.lines().next() {
                let q: Value = serde_json::from_str(line).unwrap();
                most = most.max(q["breakers_open"].as_u64().unwrap());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        most
    });
    let out = consume.await.unwrap();
    watching.store(false, Ordering::Relaxed);
    let shown_open = shown_open.await.unwrap();
    let summary: Value = serde_json::from_str(&out).unwrap();
    let queues = redrive(&store, &["queues", "--json"], "");
    let depths: Value = serde_json::from_str(queues.lines().next().unwrap()).unwrap();
    let calls = up.before.load(Ordering::Relaxed)
        + up.during.load(Ordering::Relaxed)
        + up.after.load(Ordering::Relaxed);
    assert_eq!(
        depths["breakers_open"], 0,
        "a consumer that stopped holds nothing back"
    );
    let run = Run {
        shown_open,
        dead: depths["dlq"].as_u64().unwrap(),
        calls_during_outage: up.during.load(Ordering::Relaxed),
        calls,
        summary,
    };
    eprintln!(
        "breaker {breaker}: {} dead, {} succeeded, {} handler calls during the 60 s outage, {} in all; {}",
        run.dead, run.summary["succeeded"], run.calls_during_outage, run.calls, run.summary
    );
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_breaker_an_outage_kills_nothing_and_everything_is_done_after_it() {
    let run = outage("20,80%,30s").await;
    assert_eq!(run.dead, 0, "{}", run.summary);
    assert_eq!(run.summary["succeeded"], MESSAGES, "{}", run.summary);
    assert_eq!(run.summary["dead_lettered"], 0, "{}", run.summary);
    assert!(
        run.summary["breaker_opened"].as_u64().unwrap() >= 1,
        "{}",
        run.summary
    );
    assert_eq!(run.shown_open, 1, "queues showed the open breaker");
    // To open it took 20 failing messages; what was in flight then failed too (20 at
    // most); then a probe after 5, 10, 20 and 40 s. Without the breaker every message
    // that meets the outage is called 4 times.
    assert!(
        run.calls_during_outage <= 60,
        "{} calls during the outage: {}",
        run.calls_during_outage,
        run.summary
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_breaker_the_outage_walks_messages_into_the_dlq() {
    let run = outage("off").await;
    assert_eq!(run.shown_open, 0);
    // Those done before the outage are fine; every other one met it on all 4 attempts.
    let done_before = MESSAGES as u64 - run.dead;
    assert!(run.dead >= 300, "only {} died: {}", run.dead, run.summary);
    assert_eq!(run.calls_during_outage, run.dead * 4, "{}", run.summary);
    assert_eq!(run.summary["succeeded"], done_before, "{}", run.summary);
}
