//! The scenario of the queue-library comparisons (`bench/redis-vs-bullmq.sh`,
//! `bench/postgres-vs-pgboss.sh`): N jobs published in bulk, consumed with concurrency C
//! and a no-op handler; 10% fail once, 1% always fail (dead after max attempts). Timed
//! from the first fetch until every job is done or dead.
//!
//! - `redis://…`: Redis lanes, dead letters in a scratch SQLite file.
//! - `postgres://…`: lanes and dead letters in a scratch schema (`bench_<ms>`, dropped
//!   at the end) unless the URL names one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use redrive_core::{
    DeadLetterStore, Envelope, HandlerError, LaneStats, QueueName, RetryPolicy, Transport,
};
use redrive_postgres::PostgresConfig;
use redrive_redis::{RedisBackend, RedisConfig};
use redrive_runner::{Runner, RunnerConfig, handler_fn};
use redrive_sqlite::SqliteConfig;
use serde::Serialize;

use crate::Args;
use crate::measure::{json_line, publish_numbered};

#[derive(Serialize)]
struct FailingBench {
    tool: &'static str,
    backend: &'static str,
    jobs: usize,
    concurrency: usize,
    tiers: String,
    publish_secs: f64,
    process_secs: f64,
    jobs_per_sec: f64,
    completed: u64,
    dead: u64,
    retried: u64,
}

fn with_option(url: &str, option: &str) -> String {
    format!("{url}{}{option}", if url.contains('?') { "&" } else { "?" })
}

/// Runs the scenario on Redis.
pub async fn redis(url: &str, args: &Args) -> Result<()> {
    let namespace = format!("bench-{}", redrive_core::now_ms());
    let transport = RedisConfig::new(with_option(url, &format!("namespace={namespace}")).as_str())?
        .connect()
        .await
        .context("connecting to the broker")?;
    let dir = tempfile::Builder::new()
        .prefix("redrive-bench-")
        .tempdir()
        .context("creating a scratch directory")?;
    let store = SqliteConfig::new(dir.path().join("dead.db")).open()?;
    let result = scenario(RedisBackend::new(transport, store), "redis", args).await;

    // Leave the shared Redis as it was.
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{namespace}:*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: i64 = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .unwrap_or(0);
    }
    report(&result?, args);
    Ok(())
}

/// Runs the scenario on PostgreSQL.
pub async fn postgres(url: &str, args: &Args) -> Result<()> {
    let scratch = (!url.contains("schema=")).then(|| format!("bench_{}", redrive_core::now_ms()));
    let url = match &scratch {
        Some(schema) => with_option(url, &format!("schema={schema}")),
        None => url.to_owned(),
    };
    let config = PostgresConfig::new(&url)?;
    let backend = config
        .open()
        .await
        .with_context(|| format!("opening {}", config.display()))?;
    let result = scenario(backend, "postgres", args).await;
    if let Some(schema) = scratch {
        // Leave the shared database as it was.
        let base = url.split_once('?').map_or(url.as_str(), |(b, _)| b);
        let (client, conn) = tokio_postgres::connect(base, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .await
            .context("dropping the scratch schema")?;
    }
    report(&result?, args);
    Ok(())
}

async fn scenario<B>(backend: B, name: &'static str, args: &Args) -> Result<FailingBench>
where
    B: Transport + LaneStats + DeadLetterStore + Clone,
{
    let queue = QueueName::new("bench")?;
    let policy = RetryPolicy::parse(&args.tiers).context("invalid --tiers")?;
    let publish_secs = publish_numbered(&backend, &queue, args.messages, 1000).await?;

    let config = RunnerConfig {
        concurrency: args.concurrency,
        timeout: Duration::from_secs(30),
        lease: Duration::from_secs(30),
        idle_poll: Duration::from_millis(20),
        ..RunnerConfig::default()
    };
    let attempts = policy.max_attempts();
    let runner = Runner::new(backend.clone(), queue.clone(), policy, config).until_idle();
    let stats = runner.stats();
    // Timed to the last job's final attempt (done, or dead after its last tier), as the
    // peers' scripts time theirs, not to the runner noticing the queue is idle.
    let settled = Arc::new(AtomicUsize::new(0));
    let last = Arc::new(OnceLock::new());
    let (n_jobs, settled_h, last_h) = (args.messages, Arc::clone(&settled), Arc::clone(&last));
    let handler = handler_fn(move |msg: Envelope| {
        let (settled, last) = (Arc::clone(&settled_h), Arc::clone(&last_h));
        async move {
            let n = crate::measure::number(&msg.payload);
            let outcome = if n % 100 == 7 {
                Err(HandlerError::retry(
                    "AlwaysFails",
                    "fails every time by design",
                ))
            } else if n.is_multiple_of(10) && msg.attempt == 0 {
                Err(HandlerError::retry("FailsOnce", "fails once by design"))
            } else {
                Ok(())
            };
            let last_attempt = msg.attempt + 1 >= attempts;
            if (outcome.is_ok() || last_attempt)
                && settled.fetch_add(1, Ordering::Relaxed) + 1 == n_jobs
            {
                last.get_or_init(Instant::now);
            }
            outcome
        }
    });
    let started = Instant::now();
    runner.run(handler, std::future::pending()).await?;
    let process_secs = last
        .get()
        .copied()
        .unwrap_or_else(Instant::now)
        .duration_since(started)
        .as_secs_f64();
    let s = stats.snapshot();
    Ok(FailingBench {
        tool: "redrive",
        backend: name,
        jobs: args.messages,
        concurrency: args.concurrency,
        tiers: args.tiers.clone(),
        publish_secs,
        process_secs,
        jobs_per_sec: args.messages as f64 / process_secs,
        completed: s.succeeded,
        dead: backend.depth(Some(&queue)).await?,
        retried: s.retried,
    })
}

fn report(result: &FailingBench, args: &Args) {
    if args.json {
        json_line(result);
    } else {
        println!(
            "redrive bench: {}, {} jobs, concurrency {}, tiers {}",
            result.backend, result.jobs, result.concurrency, result.tiers
        );
        println!(
            "  publish {:.2}s, process {:.2}s: {:.0} jobs/s",
            result.publish_secs, result.process_secs, result.jobs_per_sec
        );
        println!(
            "  {} completed, {} dead, {} retries",
            result.completed, result.dead, result.retried
        );
    }
}
