//! `redrive-bench redis://…`: the Redis backend under the scenario of the
//! BullMQ comparison (`bench/redis-vs-bullmq.sh`): N jobs published in bulk, consumed
//! with concurrency C and a no-op handler; 10% fail once, 1% always fail (dead after
//! max attempts). Timed from the first fetch until every job is done or dead.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use redrive_core::{DeadLetterStore, Envelope, HandlerError, QueueName, RetryPolicy, Transport};
use redrive_redis::{RedisBackend, RedisConfig};
use redrive_runner::{Runner, RunnerConfig, handler_fn};
use redrive_sqlite::SqliteConfig;
use serde::Serialize;

use crate::Args;
use crate::measure::json_line;

#[derive(Serialize)]
struct RedisBench {
    tool: &'static str,
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

pub async fn run(url: &str, args: &Args) -> Result<()> {
    let namespace = format!("bench-{}", redrive_core::now_ms());
    let url_ns = format!(
        "{url}{}namespace={namespace}",
        if url.contains('?') { "&" } else { "?" }
    );
    let transport = RedisConfig::new(url_ns.as_str())?
        .connect()
        .await
        .context("connecting to the broker")?;
    let dir = tempfile::Builder::new()
        .prefix("redrive-bench-")
        .tempdir()
        .context("creating a scratch directory")?;
    let store = SqliteConfig::new(dir.path().join("dead.db")).open()?;
    let backend = RedisBackend::new(transport, store);
    let queue = QueueName::new("bench")?;
    let policy = RetryPolicy::parse(&args.tiers).context("invalid --tiers")?;

    let started = Instant::now();
    for chunk in (0..args.messages).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk
            .iter()
            .map(|i| Envelope::new(queue.clone(), format!("{{\"n\":{i}}}")))
            .collect();
        backend.publish(&queue, batch).await?;
    }
    let publish_secs = started.elapsed().as_secs_f64();

    let config = RunnerConfig {
        concurrency: args.concurrency,
        timeout: Duration::from_secs(30),
        lease: Duration::from_secs(30),
        idle_poll: Duration::from_millis(20),
        ..RunnerConfig::default()
    };
    let runner = Runner::new(backend.clone(), queue.clone(), policy, config).until_idle();
    let stats = runner.stats();
    let handler = handler_fn(|msg: Envelope| async move {
        let n = crate::measure::number(&msg.payload);
        if n % 100 == 7 {
            return Err(HandlerError::retry(
                "AlwaysFails",
                "fails every time by design",
            ));
        }
        if n.is_multiple_of(10) && msg.attempt == 0 {
            return Err(HandlerError::retry("FailsOnce", "fails once by design"));
        }
        Ok(())
    });
    let started = Instant::now();
    runner.run(handler, std::future::pending()).await?;
    let process_secs = started.elapsed().as_secs_f64();
    let s = stats.snapshot();
    let dead = backend.depth(Some(&queue)).await?;

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

    let result = RedisBench {
        tool: "redrive",
        jobs: args.messages,
        concurrency: args.concurrency,
        tiers: args.tiers.clone(),
        publish_secs,
        process_secs,
        jobs_per_sec: args.messages as f64 / process_secs,
        completed: s.succeeded,
        dead,
        retried: s.retried,
    };
    if args.json {
        json_line(&result);
    } else {
        println!(
            "redrive bench: redis, {} jobs, concurrency {}, tiers {}",
            result.jobs, result.concurrency, result.tiers
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
    Ok(())
}
