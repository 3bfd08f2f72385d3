//! `redrive queues`: depth of every lane; `redrive queues create`: every lane made
//! before the first consumer.

use std::process::ExitCode;

use anyhow::{Context, Result};
use redrive_core::{BreakerBoard, LaneSet, LaneStats, QueueName, RetryPolicy, Transport};
use serde::Serialize;

use crate::backend;
use crate::cli::{Cli, CreateQueuesArgs, QueuesArgs, QueuesCommand};
use crate::output::outln;
use crate::output::{QueueJson, json_line, table};

pub async fn run(cli: &Cli, args: &QueuesArgs) -> Result<ExitCode> {
    if let Some(QueuesCommand::Create(create_args)) = &args.command {
        return create(cli, create_args).await;
    }
    let store = backend::open_any(cli, false).await?;
    let depths = store.depths().await.context("reading lane depths")?;
    let breakers = store
        .open_breakers(redrive_core::now_ms())
        .await
        .context("reading the consumers' breakers")?;
    let open = |queue: &str| breakers.iter().filter(|b| b.queue == queue).count() as u64;
    if args.json {
        for d in &depths {
            let mut q = QueueJson::from(d);
            q.breakers_open = open(&d.queue);
            json_line(&q);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if depths.is_empty() {
        outln!("no queues yet: publish with `redrive publish QUEUE`");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = depths
        .iter()
        .map(|d| {
            let retry = d
                .retry
                .iter()
                .map(|(t, n)| format!("{t}={n}"))
                .collect::<Vec<_>>()
                .join(" ");
            vec![
                d.queue.clone(),
                d.main.to_string(),
                if retry.is_empty() { "-".into() } else { retry },
                d.isolated.to_string(),
                d.dlq.to_string(),
                d.inflight.to_string(),
                match open(&d.queue) {
                    0 => "-".to_owned(),
                    n => format!("OPEN ({n})"),
                },
            ]
        })
        .collect();
    table(
        &[
            "QUEUE",
            "MAIN",
            "RETRY",
            "ISOLATED",
            "DLQ",
            "IN-FLIGHT",
            "BREAKER",
        ],
        &rows,
    );
    for b in &breakers {
        outln!(
            "breaker open on {} since {} ({}): its upstream seems down; no new messages are taken, nothing is dead-lettered for the outage",
            b.queue,
            crate::output::rfc3339(b.since_ms),
            b.consumer
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct CreatedJson<'a> {
    queue: &'a str,
    tiers: Vec<&'a str>,
    created: bool,
}

async fn create(cli: &Cli, args: &CreateQueuesArgs) -> Result<ExitCode> {
    // Every name and tier list is checked before anything is created.
    let mut wanted = Vec::with_capacity(args.queues.len());
    for name in &args.queues {
        let queue = QueueName::new(name)?;
        let policy = match &args.tiers {
            Some(t) => RetryPolicy::parse(t)
                .with_context(|| format!("invalid tiers {t:?} for queue {queue}"))?,
            None => backend::configured_policy(cli, &queue),
        };
        wanted.push(LaneSet {
            queue,
            tiers: policy.tiers().to_vec(),
        });
    }
    let store = backend::open_any(cli, true).await?;
    for lanes in &wanted {
        store
            .create_lanes(lanes)
            .await
            .with_context(|| format!("creating the lanes of {}", lanes.queue))?;
        let tiers: Vec<&str> = lanes.tiers.iter().map(redrive_core::Tier::name).collect();
        if args.json {
            json_line(&CreatedJson {
                queue: lanes.queue.as_str(),
                tiers,
                created: true,
            });
        } else {
            outln!(
                "{}: main, retry {}, isolated and dlq lanes ready",
                lanes.queue,
                tiers.join(",")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
