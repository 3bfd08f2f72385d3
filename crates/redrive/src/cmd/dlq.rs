//! `redrive dlq …`: list, show, replay, purge and export dead messages.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use redrive_core::{
    Cursor, DeadFilter, DeadLetterStore, DeadSelection, MessageId, QueueName, ReplayJobs,
    ReplayOptions, Unpaced, format_duration, now_ms, replay as replay_messages,
};
use serde::Serialize;

use super::{actor, duration_flag};
use crate::backend;
use crate::cli::{
    Cli, ExportArgs, FilterArgs, ListArgs, PurgeArgs, ReplayArgs, SelectArgs, ShowArgs,
};
use crate::output::outln;
use crate::output::{DeadJson, GroupJson, json_line, one_line, payload_fields, rfc3339, table};

fn filter_from(queue: Option<&str>, args: &FilterArgs) -> Result<DeadFilter> {
    Ok(DeadFilter {
        queue: queue.map(QueueName::new).transpose()?,
        fingerprint: args.fingerprint.clone(),
        error_class: args.class.clone(),
        since_ms: match &args.since {
            Some(d) => Some(
                now_ms()
                    - i64::try_from(duration_flag("--since", d)?.as_millis()).unwrap_or(i64::MAX),
            ),
            None => None,
        },
        until_ms: None,
        text: args.grep.clone(),
    })
}

fn selection_from(args: &SelectArgs) -> Result<DeadSelection> {
    let f = &args.filter;
    let narrowed =
        f.fingerprint.is_some() || f.class.is_some() || f.grep.is_some() || f.since.is_some();
    if !args.ids.is_empty() {
        if narrowed {
            bail!(
                "give either message ids or filters (--fingerprint, --class, --grep, --since), not both"
            );
        }
        let ids = args
            .ids
            .iter()
            .map(|id| {
                MessageId::parse(id).map_err(|_| {
                    anyhow::anyhow!(
                        "invalid message id {id:?}: expected a UUID as shown by `redrive dlq list`"
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(DeadSelection::Ids(ids));
    }
    if args.all || args.queue.is_some() || narrowed {
        return Ok(DeadSelection::Filter(filter_from(
            args.queue.as_deref(),
            f,
        )?));
    }
    bail!(
        "say which dead messages: give message ids, --queue QUEUE (optionally with --fingerprint FP), or --all"
    )
}

pub async fn list(cli: &Cli, args: &ListArgs) -> Result<ExitCode> {
    let store = backend::open_any(cli, false).await?;
    let filter = filter_from(args.queue.as_deref(), &args.filter)?;
    if args.group {
        let groups = store
            .groups(&filter, args.limit)
            .await
            .context("grouping dead messages")?;
        if args.json {
            groups.iter().for_each(|g| json_line(&GroupJson::from(g)));
        } else if groups.is_empty() {
            outln!("the DLQ is empty");
        } else {
            let rows: Vec<Vec<String>> = groups
                .iter()
                .map(|g| {
                    vec![
                        g.fingerprint.clone(),
                        g.count.to_string(),
                        g.error_class.clone(),
                        g.attempts.to_string(),
                        g.spent.to_string(),
                        ago(g.last_seen_ms),
                        g.queues.join(","),
                        one_line(&g.sample_error, 70),
                    ]
                })
                .collect();
            table(
                &[
                    "FINGERPRINT",
                    "COUNT",
                    "CLASS",
                    "ATTEMPTS",
                    "SPENT ON FAILURES",
                    "LAST SEEN",
                    "QUEUES",
                    "SAMPLE ERROR",
                ],
                &rows,
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let dead = store
        .list(&filter, None, args.limit.saturating_add(1))
        .await
        .context("listing dead messages")?;
    let more = dead.len() > args.limit;
    let dead = &dead[..dead.len().min(args.limit)];
    if args.json {
        dead.iter().for_each(|d| json_line(&DeadJson::from(d)));
    } else if dead.is_empty() {
        outln!("the DLQ is empty");
    } else {
        let rows: Vec<Vec<String>> = dead
            .iter()
            .map(|d| {
                let last = d.envelope.last_failure();
                vec![
                    d.envelope.id.to_string(),
                    d.envelope.queue.to_string(),
                    d.envelope.attempt.to_string(),
                    last.map(|f| f.class.clone()).unwrap_or_default(),
                    ago(d.dead_at_ms),
                    last.map(|f| one_line(&f.message, 60)).unwrap_or_default(),
                ]
            })
            .collect();
        table(
            &["ID", "QUEUE", "ATTEMPTS", "CLASS", "DEAD", "ERROR"],
            &rows,
        );
        if more {
            eprintln!(
                "(showing the first {}; use --limit, filters or `dlq export` for more)",
                args.limit
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ago(ms: i64) -> String {
    let secs = u64::try_from((now_ms() - ms).max(0) / 1000).unwrap_or(0);
    format!(
        "{} ago",
        format_duration(std::time::Duration::from_secs(secs)).replace("0ms", "0s")
    )
}

pub async fn show(cli: &Cli, args: &ShowArgs) -> Result<ExitCode> {
    let id = MessageId::parse(&args.id).map_err(|_| {
        anyhow::anyhow!(
            "invalid message id {:?}: expected a UUID as shown by `redrive dlq list`",
            args.id
        )
    })?;
    let store = backend::open_any(cli, false).await?;
    let Some(dead) = store.get(&id).await.context("reading the dead message")? else {
        bail!(
            "no dead message with id {id}: it may have been replayed or purged (see `redrive dlq list`)"
        );
    };
    let lineage = store
        .replays_of(&id)
        .await
        .context("reading the replay jobs of the message")?;
    if args.json {
        json_line(&redrive_server::json::DeadDetailJson {
            dead: DeadJson::from(&dead),
            replay_jobs: lineage
                .iter()
                .map(redrive_server::json::LineageJson::from)
                .collect(),
        });
        return Ok(ExitCode::SUCCESS);
    }
    let env = &dead.envelope;
    let last = env.last_failure();
    outln!("id           {}", env.id);
    outln!("queue        {}", env.queue);
    outln!("attempts     {}", env.attempt);
    outln!("replays      {}", env.replays);
    if !env.spent.is_zero() {
        outln!("spent        {} on failed attempts", env.spent);
    }
    if let Some(key) = &env.key {
        outln!("key          {key}");
    }
    if let Some(f) = last {
        outln!("error class  {}", f.class);
        outln!("fingerprint  {}", f.fingerprint);
    }
    outln!("dead at      {}", rfc3339(dead.dead_at_ms));
    if !env.headers.is_empty() {
        outln!("\nheaders");
        for (k, v) in &env.headers {
            outln!("  {k}: {v}");
        }
    }
    let (payload, encoding) = payload_fields(&env.payload);
    outln!(
        "\npayload ({} bytes{})",
        env.payload.len(),
        if encoding == "base64" {
            ", not UTF-8, shown as base64"
        } else {
            ""
        }
    );
    let pretty = serde_json::from_slice::<serde_json::Value>(&env.payload)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok());
    outln!("{}", pretty.unwrap_or(payload));
    outln!("\nhistory");
    for f in &env.history {
        outln!(
            "  #{} {} {} {} [{}]{}",
            f.attempt,
            rfc3339(f.at_ms),
            f.lane,
            f.class,
            f.kind.as_str(),
            if f.counted { "" } else { " (not counted)" }
        );
        let agent = &f.agent;
        if !agent.is_empty() {
            let mut parts = Vec::new();
            if let Some(m) = &agent.model {
                parts.push(format!("model {m}"));
            }
            if let Some(t) = &agent.tool {
                parts.push(format!("tool {t}"));
            }
            if !agent.cost.is_zero() {
                parts.push(agent.cost.to_string());
            }
            outln!("      ({})", parts.join(", "));
        }
        for line in f.message.lines().take(20) {
            outln!("      {line}");
        }
    }
    if !lineage.is_empty() {
        outln!("\nreplay jobs");
        for (job, item) in &lineage {
            let outcome = match item.state {
                redrive_core::ItemState::Ok => "succeeded".to_owned(),
                redrive_core::ItemState::Failed => {
                    format!("failed again: {}", one_line(&item.detail, 120))
                }
                redrive_core::ItemState::Moved => "moved, no outcome yet".to_owned(),
                redrive_core::ItemState::Held => "held (stayed dead)".to_owned(),
                redrive_core::ItemState::Skipped => format!("skipped: {}", item.detail),
                redrive_core::ItemState::Pending => "not moved yet".to_owned(),
            };
            outln!(
                "  {}  {}{} by {}{}: {outcome}",
                rfc3339(job.created_at_ms),
                job.id,
                if job.edited { " (edited)" } else { "" },
                job.actor,
                if job.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", job.reason)
                },
            );
        }
    }
    if let Some(f) = last {
        outln!(
            "\nreplay with: redrive dlq replay {}    (group: --queue {} --fingerprint {})",
            env.id,
            env.queue,
            f.fingerprint
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct ReplayJson {
    dry_run: bool,
    matched: u64,
    replayed: u64,
    over_replay_limit: Vec<String>,
    by_queue: serde_json::Map<String, serde_json::Value>,
}

pub async fn replay(cli: &Cli, args: &ReplayArgs) -> Result<ExitCode> {
    let selection = selection_from(&args.select)?;
    if args.canary.is_some() || args.ordered {
        anyhow::ensure!(
            !args.dry_run,
            "--dry-run lists what a plain replay would move; it does not go with --canary or --ordered"
        );
        return super::jobs::replay(cli, args, selection).await;
    }
    let to = args.to.as_deref().map(QueueName::new).transpose()?;
    let store = backend::open_any(cli, false).await?;
    let actor = actor();
    let options = ReplayOptions {
        to: to.as_ref(),
        max_replays: args.max_replays,
        dry_run: args.dry_run,
        actor: &actor,
        reason: &args.reason,
        ..ReplayOptions::default()
    };
    let report = if args.dry_run {
        replay_messages(&store, &store, &selection, &options, &Unpaced)
            .await
            .context("replaying")?
    } else {
        // A job, so the replay is in each message's timeline (`dlq show`, `dlq jobs`).
        let spec = redrive_runner::JobSpec {
            actor: actor.clone(),
            reason: args.reason.clone(),
            to: to.clone(),
            max_replays: args.max_replays,
            canary: redrive_runner::Canary::None,
            max_failed_percent: 0.0,
            ordered: false,
            rate_per_sec: None,
        };
        let (_, report) = redrive_runner::replay_as_job(
            &store,
            &store,
            &selection,
            &spec,
            &redrive_runner::JobOptions::default(),
            |_| {},
        )
        .await
        .context("replaying")?;
        report
    };
    if args.json {
        json_line(&ReplayJson {
            dry_run: args.dry_run,
            matched: report.matched,
            replayed: report.replayed,
            over_replay_limit: report.over_limit.iter().map(ToString::to_string).collect(),
            by_queue: report
                .by_queue
                .iter()
                .map(|(q, n)| (q.clone(), serde_json::Value::from(*n)))
                .collect(),
        });
    } else {
        let verb = if args.dry_run {
            "would replay"
        } else {
            "replayed"
        };
        let targets = report
            .by_queue
            .iter()
            .map(|(q, n)| format!("{n} to {q}"))
            .collect::<Vec<_>>()
            .join(", ");
        outln!(
            "{verb} {} of {} matching dead messages{}",
            report.replayed,
            report.matched,
            if targets.is_empty() {
                String::new()
            } else {
                format!(" ({targets})")
            }
        );
        if !report.over_limit.is_empty() {
            outln!(
                "{} stayed dead: already replayed {} times (raise --max-replays to force)",
                report.over_limit.len(),
                args.max_replays
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn purge(cli: &Cli, args: &PurgeArgs) -> Result<ExitCode> {
    let selection = selection_from(&args.select)?;
    let store = backend::open_any(cli, false).await?;
    let count: u64 = match &selection {
        DeadSelection::Ids(ids) => {
            let mut n = 0;
            for id in ids {
                n += u64::from(store.get(id).await?.is_some());
            }
            n
        }
        DeadSelection::Filter(f) => store.count(f).await?,
    };
    if count == 0 {
        outln!("nothing to purge: no dead message matches");
        return Ok(ExitCode::SUCCESS);
    }
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            bail!("refusing to purge {count} dead messages without confirmation: pass --yes");
        }
        eprint!("Purge {count} dead messages for good? This cannot be undone. [y/N] ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin()
            .read_line(&mut answer)
            .context("reading the confirmation")?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            outln!("nothing purged");
            return Ok(ExitCode::SUCCESS);
        }
    }
    let reason = if args.reason.is_empty() {
        "cli purge"
    } else {
        args.reason.as_str()
    };
    let purged = store
        .purge(&selection, &actor(), reason)
        .await
        .context("purging")?;
    if args.json {
        json_line(&serde_json::json!({ "purged": purged }));
    } else {
        outln!("purged {purged} dead messages");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn export(cli: &Cli, args: &ExportArgs) -> Result<ExitCode> {
    let store = backend::open_any(cli, false).await?;
    let filter = filter_from(args.queue.as_deref(), &args.filter)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut cursor: Option<Cursor> = None;
    let mut n = 0u64;
    loop {
        let page = store
            .list(&filter, cursor.as_ref(), 1000)
            .await
            .context("reading dead messages")?;
        let Some(last) = page.last() else { break };
        cursor = Some(Cursor {
            dead_at_ms: last.dead_at_ms,
            id: last.envelope.id,
        });
        for dead in &page {
            let line = serde_json::to_string(&DeadJson::from(dead))?;
            if let Err(e) = writeln!(out, "{line}") {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(ExitCode::SUCCESS);
                }
                return Err(e).context("writing to standard output");
            }
            n += 1;
        }
    }
    out.flush().ok();
    tracing::info!(exported = n, "export done");
    Ok(ExitCode::SUCCESS)
}
