//! `redrive queues`: depth of every lane.

use std::process::ExitCode;

use anyhow::{Context, Result};
use redrive_core::LaneStats;

use crate::backend;
use crate::cli::{Cli, QueuesArgs};
use crate::output::outln;
use crate::output::{QueueJson, json_line, table};

pub async fn run(cli: &Cli, args: &QueuesArgs) -> Result<ExitCode> {
    let store = backend::open_any(cli, false).await?;
    let depths = store.depths().await.context("reading lane depths")?;
    if args.json {
        for d in &depths {
            json_line(&QueueJson::from(d));
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
                d.dlq.to_string(),
                d.inflight.to_string(),
            ]
        })
        .collect();
    table(&["QUEUE", "MAIN", "RETRY", "DLQ", "IN-FLIGHT"], &rows);
    Ok(ExitCode::SUCCESS)
}
