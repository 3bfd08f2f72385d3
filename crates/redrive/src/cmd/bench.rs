//! `redrive bench`: end-to-end throughput, retry lateness and peak memory on the embedded
//! backend, beside what the same disk allows measured in the same run: its raw durable
//! commit rate, and a plain SQLite queue lifecycle written by hand.
//!
//! Scenario: publish N messages, then consume them with a no-op handler where 10% fail
//! once (one trip through the first retry tier) and 0.1% are poison. Then retry lateness
//! at low load (`bench_lateness`), which `--scenario lateness` also runs on a broker.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use redrive_core::{Envelope, HandlerError, QueueName, RetryPolicy, Transport};
use redrive_runner::{Runner, RunnerConfig, handler_fn};
use redrive_sqlite::{Durability, SqliteConfig};
use serde::Serialize;

use super::bench_lateness::{self, Lateness};
use crate::backend;
use crate::cli::{BenchArgs, Cli};
use crate::output::json_line;
use crate::output::outln;

#[derive(Serialize)]
struct BenchJson {
    backend: &'static str,
    durability: String,
    messages: usize,
    concurrency: usize,
    raw_commits_per_sec: f64,
    publish_msgs_per_sec: f64,
    consume_msgs_per_sec: f64,
    end_to_end_msgs_per_sec: f64,
    consume_commits_per_msg: f64,
    retried: u64,
    dead_lettered: u64,
    succeeded: u64,
    retry_lateness_p50_ms: u32,
    retry_lateness_p99_ms: u32,
    retry_lateness_max_ms: u32,
    plain_lifecycle_msgs_per_sec: f64,
    /// End to end msgs/s over the plain lifecycle's, measured in this run.
    ratio_to_plain: f64,
    low_load_lateness: Lateness,
    peak_rss_mib: f64,
}

/// Single-row transactions against a scratch file, as many as fit in `for_how_long`.
fn raw_commit_rate(
    path: &std::path::Path,
    durability: Durability,
    for_how_long: Duration,
) -> Result<f64> {
    let conn = rusqlite::Connection::open(path)?;
    let sync = if durability == Durability::Full {
        "FULL"
    } else {
        "NORMAL"
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync}; CREATE TABLE t (x INTEGER, y BLOB);"
    ))?;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < for_how_long {
        conn.execute("INSERT INTO t VALUES (?1, zeroblob(64))", [n])?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Batch size of the plain lifecycle.
const PLAIN_BATCH: usize = 100;

/// The plain SQLite queue lifecycle a team would write by hand, on a scratch file with
/// the same journal and `synchronous` settings: insert in batches of 100, then claim 100
/// (one `UPDATE … RETURNING` transaction) and delete them (another), until the table is
/// empty. No retries, no DLQ, no lease renewal, no concurrency: the bound on what SQLite
/// on this disk allows a queue. Returns messages per second, end to end.
fn plain_lifecycle(path: &std::path::Path, durability: Durability, messages: usize) -> Result<f64> {
    let mut conn = rusqlite::Connection::open(path)?;
    let sync = if durability == Durability::Full {
        "FULL"
    } else {
        "NORMAL"
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync};
         CREATE TABLE q (id INTEGER PRIMARY KEY, payload BLOB NOT NULL,
                         leased_until INTEGER NOT NULL DEFAULT 0);"
    ))?;
    let start = Instant::now();
    for chunk in (0..messages).collect::<Vec<_>>().chunks(PLAIN_BATCH) {
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached("INSERT INTO q (payload) VALUES (?1)")?;
            for i in chunk {
                insert.execute([format!("{{\"n\":{i}}}").into_bytes()])?;
            }
        }
        tx.commit()?;
    }
    let mut consumed = 0usize;
    loop {
        let now = redrive_core::now_ms();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let claimed: Vec<(i64, Vec<u8>)> = {
            let mut claim = tx.prepare_cached(
                "UPDATE q SET leased_until = ?1 WHERE id IN
                   (SELECT id FROM q WHERE leased_until < ?2 ORDER BY id LIMIT ?3)
                 RETURNING id, payload",
            )?;
            claim
                .query_map(
                    rusqlite::params![now + 30_000, now, PLAIN_BATCH as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?
                .collect::<rusqlite::Result<_>>()?
        };
        tx.commit()?;
        if claimed.is_empty() {
            break;
        }
        consumed += claimed.iter().filter(|(_, p)| !p.is_empty()).count();
        let tx = conn.transaction()?;
        {
            let mut delete = tx.prepare_cached("DELETE FROM q WHERE id = ?1")?;
            for (id, _) in &claimed {
                delete.execute([id])?;
            }
        }
        tx.commit()?;
    }
    anyhow::ensure!(
        consumed == messages,
        "the plain lifecycle consumed {consumed} of {messages}"
    );
    Ok(messages as f64 / start.elapsed().as_secs_f64())
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The `p`th percentile (nearest rank) of sorted samples; the default (zero) when there
/// are none. Every bench scenario reports through it.
pub(crate) fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The message number in `{"n":123}`.
fn number(payload: &[u8]) -> u64 {
    payload
        .iter()
        .filter(|b| b.is_ascii_digit())
        .fold(0, |acc, b| acc * 10 + u64::from(b - b'0'))
}

pub async fn run(cli: &Cli, args: &BenchArgs) -> Result<ExitCode> {
    let broker = cli.broker_url();
    if args.scenario == "lateness" {
        let result = lateness(cli, args).await?;
        if args.json {
            json_line(&result);
        } else {
            outln!(
                "redrive bench: retry lateness at low load, {}",
                result.backend
            );
            print_lateness(&result);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if broker.is_some() {
        bail!(
            "--scenario {} runs on the embedded store; with --broker, `redrive bench` runs \
             --scenario crash-points. redrive beside each broker's plain client is the \
             redrive-bench program: cargo run --release -p redrive-bench -- URL",
            args.scenario
        );
    }
    match args.scenario.as_str() {
        "consume" => {}
        "triage" => {
            super::bench_triage::run(args.dead, args.json).await?;
            return Ok(ExitCode::SUCCESS);
        }
        "crash-loop" => return super::bench_crash::run(args).await,
        "handlers" => return super::bench_handlers::run(args).await,
        other => {
            bail!(
                "invalid --scenario {other:?}: use consume, lateness, triage, crash-loop, \
                 handlers or crash-points"
            )
        }
    }
    let (result, samples) = embedded(args).await?;
    if args.json {
        json_line(&result);
    } else {
        print_embedded(&result, samples);
    }
    Ok(ExitCode::SUCCESS)
}

/// The embedded bench: the raw commit rate of the disk, then publish and consume on a
/// scratch store. Returns the figures and how many retry-lateness samples they rest on.
async fn embedded(args: &BenchArgs) -> Result<(BenchJson, usize)> {
    let durability = match args.durability.as_str() {
        "full" => Durability::Full,
        "relaxed" => Durability::Relaxed,
        other => bail!("invalid --durability {other:?}: use full or relaxed"),
    };
    anyhow::ensure!(args.messages > 0, "invalid --messages 0");
    let policy = RetryPolicy::parse(&args.tiers).context("invalid --tiers")?;
    let dir = tempfile::Builder::new()
        .prefix("redrive-bench-")
        .tempdir()
        .context("creating a scratch directory")?;
    if !args.json {
        eprintln!(
            "measuring the raw durable commit rate of {} …",
            dir.path().display()
        );
    }
    let raw = raw_commit_rate(
        &dir.path().join("raw.db"),
        durability,
        Duration::from_secs(2),
    )?;
    if !args.json {
        eprintln!(
            "running the plain SQLite lifecycle over {} messages …",
            args.messages
        );
    }
    let plain = plain_lifecycle(&dir.path().join("plain.db"), durability, args.messages)?;

    let store = SqliteConfig {
        path: dir.path().join("bench.db"),
        durability,
    }
    .open()?;
    let queue = QueueName::new("bench")?;
    if !args.json {
        eprintln!("publishing {} messages …", args.messages);
    }
    let started = Instant::now();
    for chunk in (0..args.messages).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk
            .iter()
            .map(|i| Envelope::new(queue.clone(), format!("{{\"n\":{i}}}")))
            .collect();
        store.publish(&queue, batch).await?;
    }
    let publish_secs = started.elapsed().as_secs_f64();

    if !args.json {
        eprintln!("consuming with concurrency {} …", args.concurrency);
    }
    let config = RunnerConfig {
        concurrency: args.concurrency,
        timeout: Duration::from_secs(30),
        lease: Duration::from_secs(30),
        idle_poll: Duration::from_millis(20),
        ..RunnerConfig::default()
    };
    let runner = Runner::new(store.clone(), queue.clone(), policy, config).until_idle();
    let stats = runner.stats();
    let handler = handler_fn(|msg: Envelope| async move {
        let n = number(&msg.payload);
        if n % 1000 == 5 {
            return Err(HandlerError::poison("BenchPoison", "poison by design"));
        }
        if n.is_multiple_of(10) && msg.attempt == 0 {
            return Err(HandlerError::retry(
                "BenchTransient",
                "fails once by design",
            ));
        }
        Ok(())
    });
    let commits_before = store.commit_count();
    let started = Instant::now();
    runner.run(handler, std::future::pending()).await?;
    let consume_commits = store.commit_count() - commits_before;
    let consume_secs = started.elapsed().as_secs_f64();
    let s = stats.snapshot();
    let mut lateness = stats.lateness_samples();
    lateness.sort_unstable();
    if !args.json {
        eprintln!(
            "retry lateness at low load ({} messages in rounds of 20, 700 ms apart) …",
            bench_lateness::MESSAGES
        );
    }
    let low_load = bench_lateness::measure(
        std::sync::Arc::new(store.clone()),
        "sqlite",
        QueueName::new("bench-lateness")?,
        lateness_config(args.concurrency),
    )
    .await?;
    let end_to_end = args.messages as f64 / (publish_secs + consume_secs);

    let result = BenchJson {
        backend: "sqlite",
        durability: args.durability.clone(),
        messages: args.messages,
        concurrency: args.concurrency,
        raw_commits_per_sec: raw,
        publish_msgs_per_sec: args.messages as f64 / publish_secs,
        consume_msgs_per_sec: args.messages as f64 / consume_secs,
        end_to_end_msgs_per_sec: end_to_end,
        consume_commits_per_msg: consume_commits as f64 / args.messages as f64,
        retried: s.retried,
        dead_lettered: s.dead,
        succeeded: s.succeeded,
        retry_lateness_p50_ms: percentile(&lateness, 50.0),
        retry_lateness_p99_ms: percentile(&lateness, 99.0),
        retry_lateness_max_ms: lateness.last().copied().unwrap_or(0),
        plain_lifecycle_msgs_per_sec: plain,
        ratio_to_plain: end_to_end / plain,
        low_load_lateness: low_load,
        peak_rss_mib: peak_rss_mib(),
    };
    store.close();
    let samples = lateness.len();
    Ok((result, samples))
}

/// The embedded bench's figures as a table.
fn print_embedded(result: &BenchJson, samples: usize) {
    outln!(
        "redrive bench: sqlite, durability {}, {} messages, concurrency {}",
        result.durability,
        result.messages,
        result.concurrency
    );
    outln!(
        "  raw SQLite commits/s (1 row per txn)  {:>10.0}",
        result.raw_commits_per_sec
    );
    outln!(
        "  publish msgs/s                        {:>10.0}",
        result.publish_msgs_per_sec
    );
    outln!(
        "  consume msgs/s                        {:>10.0}",
        result.consume_msgs_per_sec
    );
    outln!(
        "  end to end msgs/s (publish+consume)   {:>10.0}",
        result.end_to_end_msgs_per_sec
    );
    outln!(
        "  plain SQLite lifecycle msgs/s         {:>10.0}   (redrive end to end: {:.2}x)",
        result.plain_lifecycle_msgs_per_sec,
        result.ratio_to_plain
    );
    outln!(
        "  fsynced commits per message (consume) {:>10.3}",
        result.consume_commits_per_msg
    );
    outln!(
        "  outcomes: {} ok, {} retried, {} dead",
        result.succeeded,
        result.retried,
        result.dead_lettered
    );
    outln!(
        "  retry lateness under load ms: p50 {} p99 {} max {} ({} samples)",
        result.retry_lateness_p50_ms,
        result.retry_lateness_p99_ms,
        result.retry_lateness_max_ms,
        samples
    );
    print_lateness(&result.low_load_lateness);
    outln!("  peak RSS {:.1} MiB", result.peak_rss_mib);
}

fn print_lateness(l: &Lateness) {
    outln!(
        "  retry lateness at low load ms: p50 {:.1} p99 {:.1} max {:.1} min {:.1} \
         ({} samples, tier {} ms; CPU {:.1}% of a core)",
        l.p50_ms,
        l.p99_ms,
        l.max_ms,
        l.min_ms,
        l.messages,
        l.tier_ms,
        l.cpu_share * 100.0
    );
}

/// The consumer of the lateness runs: `consume`'s defaults (a 100 ms poll among them),
/// but no outage breaker: every first attempt fails by design, which is what it guards
/// against.
fn lateness_config(concurrency: usize) -> RunnerConfig {
    RunnerConfig {
        concurrency,
        breaker: None,
        ..RunnerConfig::default()
    }
}

/// `--scenario lateness`: on the embedded store, or on `--broker` with a scratch
/// dead-letter store (PostgreSQL holds both).
async fn lateness(cli: &Cli, args: &BenchArgs) -> Result<Lateness> {
    let dir = tempfile::Builder::new()
        .prefix("redrive-bench-")
        .tempdir()
        .context("creating a scratch directory")?;
    let broker = cli.broker_url();
    let name = broker.map_or("sqlite", |b| b.split("://").next().unwrap_or(b));
    let store_url = match broker {
        Some(url) if matches!(name, "postgres" | "postgresql") => url.to_owned(),
        _ => format!("sqlite://{}", dir.path().join("bench.db").display()),
    };
    let store = backend::open_urls(&store_url, broker, cli.sqs_endpoint.as_deref(), true).await?;
    // A queue of its own on a shared broker, so an earlier run's leftovers stay out.
    let queue = QueueName::new(format!("bench-lateness-{}", redrive_core::now_ms()))?;
    if !args.json {
        eprintln!(
            "retry lateness at low load on {name}: {} messages in rounds of 20, 700 ms \
             apart, tier 1s …",
            bench_lateness::MESSAGES
        );
    }
    bench_lateness::measure(
        std::sync::Arc::new(store),
        name,
        queue,
        lateness_config(args.concurrency),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(
            (
                percentile(&v, 50.0),
                percentile(&v, 99.0),
                percentile(&v, 100.0)
            ),
            (50, 99, 100)
        );
        assert_eq!(percentile::<u32>(&[], 99.0), 0);
        let fractions: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&fractions, 99.0), 198.0);
        assert_eq!(number(b"{\"n\":1205}"), 1205);
    }
}
