//! `redrive bench --scenario crash-loop`: what messages that kill their consumer cost
//! the rest of the queue, on the embedded backend.
//!
//! N good messages and K "killers" (spread evenly among them) are consumed by `redrive
//! consume --exec` processes, started again after every death as a supervisor would.
//! A killer's handler SIGKILLs its consumer; a good one logs its `REDRIVE_ATTEMPT` and
//! succeeds. The same run without killers is the baseline. Reported: deaths, what ended
//! in the DLQ (the killers, and any good message: there should be none), how many good
//! messages were ever delivered with a counted attempt (there should be none), and the
//! wall time of both runs.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use redrive_core::{DeadFilter, DeadLetterStore, Envelope, QueueName, Transport};
use redrive_sqlite::{Durability, SqliteConfig};
use serde::Serialize;

use crate::cli::BenchArgs;
use crate::output::{json_line, outln};

/// The consumers' lease: a suspect comes back this long after its consumer died.
const LEASE: &str = "1s";

#[derive(Serialize)]
struct CrashJson {
    good: usize,
    killers: usize,
    concurrency: usize,
    tiers: String,
    lease: &'static str,
    deaths: usize,
    dead: usize,
    good_dead: usize,
    killers_dead: usize,
    good_charged: usize,
    good_never_handled: usize,
    secs_with_killers: f64,
    secs_without_killers: f64,
    slowdown: f64,
}

/// One supervised run: how many consumers died, and how long until one ended idle.
struct Run {
    deaths: usize,
    secs: f64,
}

async fn supervise(store_url: &str, args: &BenchArgs, log: &Path) -> Result<Run> {
    let bin = std::env::current_exe().context("finding the redrive binary")?;
    // A killer's shell SIGKILLs its parent, the consumer; a good message logs the
    // attempt it was delivered with.
    let handler = format!(
        "p=$(cat); case \"$p\" in killer*) kill -9 $PPID; sleep 5;; esac; \
         echo \"$p $REDRIVE_ATTEMPT\" >> '{}'",
        log.display()
    );
    let concurrency = args.concurrency.to_string();
    let started = Instant::now();
    let mut deaths = 0;
    loop {
        let status = tokio::process::Command::new(&bin)
            .args(["--store", store_url, "consume", "bench"])
            .args(["--exec", &handler, "--concurrency", &concurrency])
            .args(["--lease", LEASE, "--tiers", &args.tiers, "--jitter", "0"])
            .args(["--until-idle", "--poll", "20ms"])
            .env("REDRIVE_LOG", "error")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await
            .context("running redrive consume")?;
        if status.success() {
            return Ok(Run {
                deaths,
                secs: started.elapsed().as_secs_f64(),
            });
        }
        deaths += 1;
        if deaths > 100 * args.killers.max(1) {
            bail!("the consumer died {deaths} times without the queue draining");
        }
    }
}

/// Publishes the scenario to a fresh store, runs it supervised, and reads the outcome.
async fn scenario(
    dir: &Path,
    name: &str,
    args: &BenchArgs,
    killers: usize,
) -> Result<(Run, Vec<redrive_core::DeadLetter>, String)> {
    let path = dir.join(format!("{name}.db"));
    let store = SqliteConfig {
        path: path.clone(),
        durability: Durability::Full,
    }
    .open()?;
    let queue = QueueName::new("bench")?;
    let every = args.messages / killers.max(1) + 1;
    let mut batch = Vec::with_capacity(args.messages + killers);
    let mut placed = 0;
    for i in 0..args.messages {
        if killers > 0 && i % every == every / 2 && placed < killers {
            batch.push(Envelope::new(queue.clone(), format!("killer-{placed}")));
            placed += 1;
        }
        batch.push(Envelope::new(queue.clone(), format!("good-{i}")));
    }
    while placed < killers {
        batch.push(Envelope::new(queue.clone(), format!("killer-{placed}")));
        placed += 1;
    }
    store.publish(&queue, batch).await?;
    store.close();
    let log = dir.join(format!("{name}.log"));
    let run = supervise(&format!("sqlite://{}", path.display()), args, &log).await?;
    let store = SqliteConfig {
        path,
        durability: Durability::Full,
    }
    .open()?;
    let dead = store.list(&DeadFilter::default(), None, 100_000).await?;
    store.close();
    let handled = std::fs::read_to_string(&log).unwrap_or_default();
    Ok((run, dead, handled))
}

pub async fn run(args: &BenchArgs) -> Result<ExitCode> {
    anyhow::ensure!(args.messages > 0, "invalid --messages 0");
    anyhow::ensure!(args.concurrency > 0, "invalid --concurrency 0");
    redrive_core::RetryPolicy::parse(&args.tiers).context("invalid --tiers")?;
    let dir = tempfile::Builder::new()
        .prefix("redrive-bench-crash-")
        .tempdir()
        .context("creating a scratch directory")?;
    if !args.json {
        eprintln!(
            "{} good messages and {} killers, concurrency {}, consumer restarted after each death …",
            args.messages, args.killers, args.concurrency
        );
    }
    let (with, dead, handled) = scenario(dir.path(), "killers", args, args.killers).await?;
    if !args.json {
        eprintln!("the same {} good messages without killers …", args.messages);
    }
    let (without, _, _) = scenario(dir.path(), "baseline", args, 0).await?;

    let payload =
        |d: &redrive_core::DeadLetter| String::from_utf8_lossy(&d.envelope.payload).into_owned();
    let killers_dead = dead
        .iter()
        .filter(|d| payload(d).starts_with("killer"))
        .count();
    let good_dead = dead.len() - killers_dead;
    let mut charged = std::collections::BTreeSet::new();
    let mut seen = std::collections::BTreeSet::new();
    for line in handled.lines() {
        if let Some((p, attempt)) = line.split_once(' ')
            && p.starts_with("good-")
        {
            seen.insert(p.to_owned());
            if attempt != "0" {
                charged.insert(p.to_owned());
            }
        }
    }
    let result = CrashJson {
        good: args.messages,
        killers: args.killers,
        concurrency: args.concurrency,
        tiers: args.tiers.clone(),
        lease: LEASE,
        deaths: with.deaths,
        dead: dead.len(),
        good_dead,
        killers_dead,
        good_charged: charged.len(),
        good_never_handled: args.messages - seen.len(),
        secs_with_killers: with.secs,
        secs_without_killers: without.secs,
        slowdown: with.secs / without.secs.max(f64::EPSILON),
    };
    if args.json {
        json_line(&result);
    } else {
        outln!(
            "redrive bench: crash loop, sqlite, {} good + {} killers, concurrency {}, tiers {}, lease {}",
            result.good,
            result.killers,
            result.concurrency,
            result.tiers,
            result.lease
        );
        outln!("  consumer deaths                  {:>8}", result.deaths);
        outln!(
            "  dead-lettered                    {:>8} ({} killers, {} good)",
            result.dead,
            result.killers_dead,
            result.good_dead
        );
        outln!(
            "  good delivered with a counted attempt {:>3}",
            result.good_charged
        );
        outln!(
            "  good never handled               {:>8}",
            result.good_never_handled
        );
        outln!(
            "  wall time with killers    {:>8.1} s",
            result.secs_with_killers
        );
        outln!(
            "  wall time without killers {:>8.1} s   ({:.1}x)",
            result.secs_without_killers,
            result.slowdown
        );
    }
    Ok(ExitCode::SUCCESS)
}
