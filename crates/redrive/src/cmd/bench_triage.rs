//! `redrive bench --scenario triage`: how fast the triage UI and API answer over a large
//! DLQ. Loads N dead messages into a scratch store, serves it on a loopback port, and
//! times real HTTP requests for the pages an on-call person opens first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use redrive_core::{
    DeadLetter, DeadLetterStore, Envelope, Failure, FailureKind, QueueName, now_ms,
};
use redrive_server::{Metrics, Tokens};
use redrive_sqlite::SqliteConfig;
use serde::Serialize;

use super::bench::percentile;
use crate::output::{json_line, outln};

const ROUNDS: usize = 30;

#[derive(Serialize)]
struct Timing {
    page: &'static str,
    path: String,
    p50_ms: f64,
    p95_ms: f64,
    max_ms: f64,
    bytes: usize,
}

#[derive(Serialize)]
struct TriageJson {
    dead_messages: usize,
    load_secs: f64,
    /// The store's files (database and write-ahead log) once loaded.
    store_mib: f64,
    rounds: usize,
    timings: Vec<Timing>,
}

fn queue_of(i: usize) -> String {
    format!("agents.q{}", i % 5)
}

/// A realistic spread: 5 queues, 12 error classes, messages that vary in numbers and ids
/// so fingerprints group them into a few dozen groups.
fn dead_letter(i: usize, base: i64) -> DeadLetter {
    const ERRORS: [(&str, &str); 12] = [
        (
            "RateLimited",
            "429 rate limit exceeded for model, retry in {n}s (request req_{h})",
        ),
        ("ToolTimeout", "tool web_search timed out after {n} ms"),
        (
            "SchemaViolation",
            "field `url` must be a string, got number {n}",
        ),
        ("UpstreamUnavailable", "vector-db shard {n} answered 503"),
        (
            "decode",
            "payload is not a valid task: EOF at line 1 column {n}",
        ),
        (
            "decode",
            "payload is not a valid task: missing field `agent` at column {n}",
        ),
        ("panic", "plan step {n} out of range"),
        ("exit_1", "Traceback: KeyError: 'task_{n}'"),
        ("http_500", "HTTP 500: internal error id {h}"),
        ("http_422", "HTTP 422: prompt too long ({n} tokens)"),
        ("ContextOverflow", "context window exceeded by {n} tokens"),
        (
            "AuthError",
            "credential for tool github expired {n} minutes ago",
        ),
    ];
    let (class, template) = ERRORS[(i * 7 + i / 13) % ERRORS.len()];
    let message = template
        .replace("{n}", &(i % 997).to_string())
        .replace("{h}", &format!("{:x}", i * 2_654_435_761));
    let payload = format!(
        "{{\"task_id\":{i},\"agent\":\"agent-{}\",\"prompt\":\"summarize document {i} for the weekly report\"}}",
        i % 17
    );
    let mut env = Envelope::new(
        QueueName::new(queue_of(i)).unwrap_or_else(|_| unreachable!()),
        payload,
    );
    let at = base + i as i64;
    env.record_failure(Failure::new(FailureKind::Retry, class, message, at), "main");
    DeadLetter {
        envelope: env,
        dead_at_ms: at,
    }
}

pub async fn run(dead: usize, json: bool) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("redrive-bench-")
        .tempdir()
        .context("creating a scratch directory")?;
    let store = SqliteConfig::new(dir.path().join("triage.db")).open()?;
    if !json {
        eprintln!("loading {dead} dead messages …");
    }
    let started = Instant::now();
    let base = now_ms() - 3_600_000;
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..dead {
        let store = store.clone();
        pending.spawn(async move { store.insert(&dead_letter(i, base)).await });
        if pending.len() >= 2000 {
            while let Some(r) = pending.join_next().await {
                r??;
            }
        }
    }
    while let Some(r) = pending.join_next().await {
        r??;
    }
    let load_secs = started.elapsed().as_secs_f64();
    let store_mib = std::fs::read_dir(dir.path())
        .context("reading the scratch directory")?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum::<u64>() as f64
        / (1024.0 * 1024.0);

    let (app, listener, addr) = super::serve::start(
        &store,
        Tokens::default(),
        Arc::new(Metrics::new()),
        "127.0.0.1:0".parse()?,
        5,
    )
    .await?;
    let server = tokio::spawn(redrive_server::serve(
        app,
        listener,
        Duration::from_secs(3600),
        std::future::pending(),
    ));
    let http = reqwest::Client::new();
    let pages: [(&'static str, String); 6] = [
        ("groups page (HTML)", "/groups".to_owned()),
        ("groups (API)", "/api/v1/groups".to_owned()),
        (
            "filtered list page (HTML): queue + class",
            "/messages?queue=agents.q3&class=ToolTimeout".to_owned(),
        ),
        (
            "filtered list (API): queue + class",
            "/api/v1/dead?queue=agents.q3&class=ToolTimeout&limit=50".to_owned(),
        ),
        (
            "filtered list (API): text search",
            "/api/v1/dead?q=document%2012345%20&limit=50".to_owned(),
        ),
        ("overview page (HTML)", "/".to_owned()),
    ];
    let mut timings = Vec::new();
    for (page, path) in pages {
        let url = format!("http://{addr}{path}");
        let mut samples = Vec::with_capacity(ROUNDS);
        let mut bytes = 0;
        // One warm-up request, then the measured rounds.
        http.get(&url).send().await?.bytes().await?;
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let resp = http.get(&url).send().await?;
            anyhow::ensure!(
                resp.status().is_success(),
                "{path} answered {}",
                resp.status()
            );
            bytes = resp.bytes().await?.len();
            samples.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        samples.sort_by(f64::total_cmp);
        timings.push(Timing {
            page,
            path,
            p50_ms: percentile(&samples, 50.0),
            p95_ms: percentile(&samples, 95.0),
            max_ms: samples.last().copied().unwrap_or(0.0),
            bytes,
        });
    }
    server.abort();
    store.close();
    let result = TriageJson {
        dead_messages: dead,
        load_secs,
        store_mib,
        rounds: ROUNDS,
        timings,
    };
    if json {
        json_line(&result);
    } else {
        outln!(
            "redrive bench --scenario triage: {} dead messages (loaded in {:.1}s, store {:.0} MiB), \
             {} requests per page",
            dead,
            load_secs,
            store_mib,
            ROUNDS
        );
        for t in &result.timings {
            outln!(
                "  {:<44} p50 {:>7.1} ms  p95 {:>7.1} ms  max {:>7.1} ms  ({} bytes)",
                t.page,
                t.p50_ms,
                t.p95_ms,
                t.max_ms,
                t.bytes
            );
        }
    }
    Ok(())
}
