//! `redrive bench --scenario crash-points`: the process killed at every crash point, in
//! turn and many times, on the backend the global flags name; what was lost (it must be
//! nothing) and how many extra deliveries each crash cost.
//!
//! Needs a build with the crash points (`--features failpoints`): each run of a child
//! process gets `REDRIVE_FAILPOINT=POINT:K` for a random K, dies there (SIGABRT, nothing
//! flushed), and is started again, as a supervisor would, until the work is done.
//!
//! | point | work |
//! |---|---|
//! | `fetched`, `handled`, `next-lane-written`, `settled` | `consume --exec`: 10% of messages fail once, 5% are poison |
//! | `drain-stored` | `dlq list` draining a broker's DLQ into the store |
//! | `replay-published` | `dlq replay --all`, then a consume of what came back |
//! | `archive-renamed` | `retention run` over dead letters 40 days old |
//!
//! Lost: a published message neither handled nor dead at the end, or a dead letter
//! neither replayed-and-handled nor archived. Extra deliveries: handler starts beyond
//! what the work needs with no crash (one per message, two for one that fails once).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use redrive_core::{
    DeadFilter, DeadLetter, DeadLetterStore, Envelope, Failure, FailureKind, LaneSet, LaneStats,
    MessageId, QueueName, RetryPolicy, Transport, now_ms,
};
use serde::Serialize;

use crate::backend::{self, AnyBackend};
use crate::cli::{BenchArgs, Cli};
use crate::output::{json_line, outln, table};

/// What one point's runs came to.
#[derive(Serialize)]
struct PointJson {
    backend: String,
    point: &'static str,
    kills: usize,
    messages: usize,
    lost: usize,
    extra_deliveries: i64,
    extra_per_crash: f64,
    note: Option<&'static str>,
}

/// How the children reach the backend under test.
struct Target {
    args: Vec<String>,
    backend: String,
    dir: PathBuf,
    tiers: &'static str,
    lease: &'static str,
}

impl Target {
    fn command(&self, failpoint: Option<String>) -> tokio::process::Command {
        let bin = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("redrive"));
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args(&self.args)
            .env("REDRIVE_LOG", "error")
            .env("REDRIVE_ARCHIVE_DIR", self.dir.join("archive"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        match failpoint {
            Some(fp) => cmd.env("REDRIVE_FAILPOINT", fp),
            None => cmd.env_remove("REDRIVE_FAILPOINT"),
        };
        cmd
    }

    /// Runs `args` until one run ends on its own, each run but the last few dying at
    /// `point` (hit K, K drawn from 1..=`hits`); returns how many died. A run that
    /// reaches the end of its work before its K-th hit ends on its own.
    async fn supervise(
        &self,
        args: &[&str],
        point: &str,
        hits: u64,
        kills: &mut usize,
        quota: usize,
    ) -> Result<()> {
        loop {
            let fp =
                (*kills < quota).then(|| format!("{point}:{}", fastrand::u64(1..=hits.max(1))));
            let armed = fp.is_some();
            let status = tokio::time::timeout(
                Duration::from_secs(120),
                self.command(fp).args(args).status(),
            )
            .await
            .context("a run took over 120 s")?
            .context("starting a child")?;
            if status.success() {
                return Ok(());
            }
            if !armed {
                bail!("{args:?} failed without a crash point ({status})");
            }
            *kills += 1;
        }
    }

    fn consume_args<'a>(&'a self, queue: &'a str, handler: &'a str) -> Vec<&'a str> {
        vec![
            "consume",
            queue,
            "--exec",
            handler,
            "--concurrency",
            "1",
            "--lease",
            self.lease,
            "--tiers",
            self.tiers,
            "--jitter",
            "0",
            "--until-idle",
            "--poll",
            "20ms",
        ]
    }
}

/// The handler: logs its start (id and attempt), then fails once (every 10th) or for
/// good (every 20th, from 7) by the number in the payload, unless `fixed` exists.
fn handler(log: &Path, fixed: &Path) -> String {
    format!(
        "p=$(cat); echo \"$REDRIVE_ID $REDRIVE_ATTEMPT\" >> '{log}'; n=${{p#n}}; \
         [ -e '{fixed}' ] && exit 0; \
         if [ $((n % 20)) -eq 7 ]; then exit 65; fi; \
         if [ $((n % 10)) -eq 0 ] && [ \"$REDRIVE_ATTEMPT\" = 0 ]; then exit 75; fi; exit 0",
        log = log.display(),
        fixed = fixed.display()
    )
}

/// Handler starts per id.
fn starts(log: &Path) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        if let Some((id, _)) = line.split_once(' ') {
            *out.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    out
}

async fn publish(
    store: &AnyBackend,
    queue: &QueueName,
    from: usize,
    n: usize,
) -> Result<Vec<(MessageId, usize)>> {
    let batch: Vec<Envelope> = (from..from + n)
        .map(|i| Envelope::new(queue.clone(), format!("n{i}")))
        .collect();
    let ids = batch.iter().map(|e| e.id).zip(from..).collect();
    store.publish(queue, batch).await?;
    Ok(ids)
}

async fn dead_ids(store: &AnyBackend, queue: &QueueName) -> Result<BTreeSet<MessageId>> {
    let filter = DeadFilter {
        queue: Some(queue.clone()),
        ..DeadFilter::default()
    };
    Ok(store
        .list(&filter, None, 1_000_000)
        .await?
        .into_iter()
        .map(|d| d.envelope.id)
        .collect())
}

async fn drained(store: &AnyBackend, lanes: &LaneSet) -> Result<bool> {
    Ok(store.queue_depths(lanes).await?.is_drained())
}

/// The consume points: kill the consumer at `point` `quota` times over rounds of `n`
/// messages, then check every message was handled or is dead.
async fn consume_point(
    t: &Target,
    store: &AnyBackend,
    point: &'static str,
    n: usize,
    quota: usize,
) -> Result<PointJson> {
    let queue = QueueName::new(format!(
        "crash.{}.{:x}",
        point.replace('-', "_"),
        fastrand::u32(..)
    ))?;
    let lanes = LaneSet {
        queue: queue.clone(),
        tiers: RetryPolicy::parse(t.tiers)?.tiers().to_vec(),
    };
    let log = t.dir.join(format!("{queue}.log"));
    let handler = handler(&log, &t.dir.join("never"));
    let args = t.consume_args(queue.as_str(), &handler);
    // How often a run meets the point: fetches are few, handler ends many.
    // (A round that ends without reaching its K-th hit halves the range.)
    let mut hits = match point {
        "fetched" => 3,
        "next-lane-written" => (n / 6) as u64,
        _ => n as u64,
    };
    let mut published = Vec::new();
    let mut kills = 0;
    let mut rounds = 0;
    while kills < quota {
        rounds += 1;
        published.extend(publish(store, &queue, published.len(), n).await?);
        let before = kills;
        t.supervise(&args, point, hits, &mut kills, quota).await?;
        if kills == before {
            hits = (hits / 2).max(1);
            if rounds > 12 && kills == 0 {
                bail!("{point} was never reached on {}", t.backend);
            }
        }
    }
    // What the crashes left behind (leases running out, isolated suspects) finishes.
    t.supervise(&args, point, 1, &mut kills.clone(), 0).await?;
    let dead = dead_ids(store, &queue).await?;
    let started = starts(&log);
    let mut lost = 0;
    let mut need = 0i64;
    for (id, i) in &published {
        let handled = started.contains_key(&id.to_string());
        if !handled && !dead.contains(id) {
            lost += 1;
        }
        need += if i % 20 == 7 {
            1
        } else if i % 10 == 0 {
            2
        } else {
            1
        };
    }
    if !drained(store, &lanes).await? {
        lost += store.queue_depths(&lanes).await?.main as usize;
    }
    let total: i64 = started.values().map(|&c| c as i64).sum();
    Ok(result(
        t,
        point,
        kills,
        published.len(),
        lost,
        total - need,
        None,
    ))
}

fn result(
    t: &Target,
    point: &'static str,
    kills: usize,
    messages: usize,
    lost: usize,
    extra: i64,
    note: Option<&'static str>,
) -> PointJson {
    PointJson {
        backend: t.backend.clone(),
        point,
        kills,
        messages,
        lost,
        extra_deliveries: extra,
        extra_per_crash: if kills == 0 {
            0.0
        } else {
            extra as f64 / kills as f64
        },
        note,
    }
}

/// Dead letters into the broker's DLQ (poison, consumed cleanly), then `dlq list`
/// killed between storing a drained batch and acknowledging it.
async fn drain_point(t: &Target, store: &AnyBackend, n: usize, quota: usize) -> Result<PointJson> {
    let queue = QueueName::new(format!("crash.drain.{:x}", fastrand::u32(..)))?;
    // Stopped by count, not by `--until-idle`: the idle check reads depths, and reading
    // depths drains the broker's DLQ, which is the step under test.
    let count = n.to_string();
    let args = [
        "consume",
        queue.as_str(),
        "--exec",
        "cat >/dev/null; exit 65",
        "--lease",
        t.lease,
        "--tiers",
        t.tiers,
        "--max-messages",
        count.as_str(),
        "--poll",
        "20ms",
    ];
    let mut published = Vec::new();
    let mut kills = 0;
    let mut rounds = 0;
    while kills < quota {
        rounds += 1;
        published.extend(publish(store, &queue, published.len(), n).await?);
        t.supervise(&args, "none", 1, &mut 0, 0).await?;
        let before = kills;
        t.supervise(
            &["dlq", "list", "--json", "--limit", "1"],
            "drain-stored",
            1,
            &mut kills,
            quota,
        )
        .await?;
        if kills == before && rounds > 3 {
            bail!("drain-stored was never reached on {}", t.backend);
        }
    }
    let dead = dead_ids(store, &queue).await?;
    let lost = published
        .iter()
        .filter(|(id, _)| !dead.contains(id))
        .count();
    let stored = store
        .count(&DeadFilter {
            queue: Some(queue),
            ..DeadFilter::default()
        })
        .await?;
    // A message drained twice is stored once (insert is idempotent on id).
    let extra = i64::try_from(stored).unwrap_or(0) - published.len() as i64;
    Ok(result(
        t,
        "drain-stored",
        kills,
        published.len(),
        lost,
        extra,
        None,
    ))
}

/// Dead letters in the store, then `dlq replay --all` killed between publishing them
/// back and marking them replayed, then a consume (now succeeding) of what came back.
async fn replay_point(t: &Target, store: &AnyBackend, n: usize, quota: usize) -> Result<PointJson> {
    let queue = QueueName::new(format!("crash.replay.{:x}", fastrand::u32(..)))?;
    let log = t.dir.join(format!("{queue}.log"));
    let fixed = t.dir.join(format!("{queue}.fixed"));
    let _ = std::fs::remove_file(&fixed);
    let poison = t.consume_args(queue.as_str(), "cat >/dev/null; exit 65");
    let mut published = Vec::new();
    let mut kills = 0;
    let mut rounds = 0;
    while kills < quota {
        rounds += 1;
        published.extend(publish(store, &queue, published.len(), n).await?);
        t.supervise(&poison, "none", 1, &mut 0, 0).await?;
        let before = kills;
        let replay = ["dlq", "replay", "--queue", queue.as_str()];
        t.supervise(&replay, "replay-published", 1, &mut kills, quota)
            .await?;
        if kills == before && rounds > 3 {
            bail!("replay-published was never reached on {}", t.backend);
        }
        // What came back is handled (and fixed, so it succeeds): the log tells.
        std::fs::write(&fixed, b"")?;
        let handler = handler(&log, &fixed);
        let consume = t.consume_args(queue.as_str(), &handler);
        t.supervise(&consume, "none", 1, &mut 0, 0).await?;
        let _ = std::fs::remove_file(&fixed);
    }
    let dead = dead_ids(store, &queue).await?;
    let started = starts(&log);
    let lost = published
        .iter()
        .filter(|(id, _)| !dead.contains(id) && !started.contains_key(&id.to_string()))
        .count();
    let total: i64 = started.values().map(|&c| c as i64).sum();
    Ok(result(
        t,
        "replay-published",
        kills,
        published.len(),
        lost,
        total - published.len() as i64,
        None,
    ))
}

/// Dead letters 40 days old in the store, then `retention run` killed between an archive
/// file's rename and the deletion of its messages.
async fn archive_point(
    t: &Target,
    store: &AnyBackend,
    n: usize,
    quota: usize,
) -> Result<PointJson> {
    let queue = QueueName::new(format!("crash.archive.{:x}", fastrand::u32(..)))?;
    let mut ids = BTreeSet::new();
    let mut kills = 0;
    let mut day = 0;
    while kills < quota {
        // Each round a day of its own, so each round writes a file of its own.
        day += 1;
        let at = now_ms() - (40 + day) * 86_400_000;
        let dead: Vec<DeadLetter> = (0..n)
            .map(|i| {
                let mut env = Envelope::new(queue.clone(), format!("old {i}"));
                env.record_failure(
                    Failure::new(FailureKind::Poison, "Old", "aged out", at),
                    "main",
                );
                DeadLetter {
                    envelope: env,
                    dead_at_ms: at,
                }
            })
            .collect();
        ids.extend(dead.iter().map(|d| d.envelope.id));
        store.insert_batch(&dead).await?;
        let before = kills;
        t.supervise(
            &["retention", "run"],
            "archive-renamed",
            1,
            &mut kills,
            quota,
        )
        .await?;
        if kills == before && day > 3 {
            bail!("archive-renamed was never reached on {}", t.backend);
        }
    }
    // Every id must be in exactly one archive file, and none left in the store.
    let mut archived: BTreeMap<MessageId, usize> = BTreeMap::new();
    let dir = t.dir.join("archive").join(queue.as_str());
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "zst") {
            for r in redrive_retention::read_file(&path)? {
                *archived.entry(r.id).or_insert(0) += 1;
            }
        }
    }
    let left = dead_ids(store, &queue).await?;
    let lost = ids
        .iter()
        .filter(|id| !archived.contains_key(id) && !left.contains(id))
        .count();
    let extra = archived.values().map(|&c| c as i64 - 1).sum::<i64>() + left.len() as i64;
    Ok(result(
        t,
        "archive-renamed",
        kills,
        ids.len(),
        lost,
        extra,
        None,
    ))
}

pub async fn run(cli: &Cli, args: &BenchArgs) -> Result<ExitCode> {
    if !redrive_core::failpoints_built() {
        bail!(
            "this redrive was built without crash points: build it with `cargo build --release \
             --features redrive/failpoints` to run --scenario crash-points"
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("redrive-crash-points-")
        .tempdir()?;
    let mut child_args = Vec::new();
    let broker = cli.broker_url();
    let backend = broker
        .map_or("sqlite", |b| b.split("://").next().unwrap_or(b))
        .to_owned();
    // PostgreSQL keeps its dead letters beside its lanes, as the embedded store does.
    let lanes_and_store = matches!(backend.as_str(), "postgres" | "postgresql");
    let store_url = match broker {
        // The embedded backend: a scratch store of its own.
        None => format!("sqlite://{}", dir.path().join("lanes.db").display()),
        Some(url) if lanes_and_store => url.to_owned(),
        Some(_) => format!("sqlite://{}", dir.path().join("dead.db").display()),
    };
    child_args.extend(["--store".to_owned(), store_url.clone()]);
    if let Some(b) = broker {
        child_args.extend(["--broker".to_owned(), b.to_owned()]);
    }
    if let Some(e) = &cli.sqs_endpoint {
        child_args.extend(["--sqs-endpoint".to_owned(), e.clone()]);
    }
    // SQS counts visibility in whole seconds.
    let sqs = backend == "sqs";
    let t = Target {
        args: child_args,
        backend: backend.clone(),
        dir: dir.path().to_owned(),
        tiers: if sqs { "1s" } else { "100ms" },
        lease: if sqs { "1s" } else { "300ms" },
    };
    let store = backend::open_urls(&store_url, broker, cli.sqs_endpoint.as_deref(), true).await?;
    let n = args.messages.min(10_000);
    // The points this backend has: a move that is one atomic step has no point between
    // writing the next lane and releasing the source; the embedded store has no broker
    // DLQ to drain.
    let atomic_moves = lanes_and_store || matches!(backend.as_str(), "sqlite" | "redis" | "rediss");
    let mut points: Vec<&'static str> = vec!["fetched", "handled"];
    if !atomic_moves {
        points.push("next-lane-written");
    }
    points.push("settled");
    if broker.is_some() && !lanes_and_store {
        points.push("drain-stored");
    }
    points.extend(["replay-published", "archive-renamed"]);
    let quota = args.kills.div_ceil(points.len()).max(1);
    let mut results = Vec::new();
    for point in points {
        if !args.json {
            eprintln!("{backend}: {quota} kills at {point} …");
        }
        let r = match point {
            "drain-stored" => drain_point(&t, &store, n, quota).await?,
            "replay-published" => replay_point(&t, &store, n, quota).await?,
            "archive-renamed" => archive_point(&t, &store, n, quota).await?,
            _ => consume_point(&t, &store, point, n, quota).await?,
        };
        if args.json {
            json_line(&r);
        }
        results.push(r);
    }
    if !args.json {
        outln!("redrive bench: crash points, {backend}, {n} messages a round");
        let rows: Vec<Vec<String>> = results
            .iter()
            .map(|r| {
                vec![
                    r.point.to_owned(),
                    r.kills.to_string(),
                    r.messages.to_string(),
                    r.lost.to_string(),
                    format!("{:.2}", r.extra_per_crash),
                ]
            })
            .collect();
        table(
            &[
                "POINT",
                "KILLS",
                "MESSAGES",
                "LOST",
                "EXTRA DELIVERIES PER CRASH",
            ],
            &rows,
        );
    }
    let lost: usize = results.iter().map(|r| r.lost).sum();
    if lost > 0 {
        eprintln!("{lost} message(s) lost");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
