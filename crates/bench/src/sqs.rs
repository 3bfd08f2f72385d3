//! `redrive-bench sqs://…`: no-failure throughput and SQS calls per message of
//! the SQS backend beside a plain aws-sdk-sqs loop (send in batches of 10, receive 10,
//! delete the batch) over the same number of messages, on the same endpoint, in the
//! same run. SQS bills per call, so calls per message is the figure that matters most.
//!
//! Both sides' queues are made under a per-run prefix and deleted afterwards.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};
use redrive_core::{QueueName, now_ms};
use redrive_sqlite::SqliteConfig;
use redrive_sqs::{SqsBackend, SqsConfig};
use serde::Serialize;

use crate::Args;
use crate::measure::json_line;

#[derive(Serialize)]
struct Side {
    tool: &'static str,
    messages: usize,
    publish_secs: f64,
    publish_calls: u64,
    /// From the first message handed out to the last one deleted.
    consume_secs: f64,
    consume_msgs_per_sec: f64,
    /// Receive, delete and visibility calls while consuming (empty receives included).
    consume_calls: u64,
    consume_calls_per_msg: f64,
    /// Sending, receiving and deleting, per message.
    calls_per_msg: f64,
}

impl Side {
    /// The rates of one side from its counts.
    fn new(
        tool: &'static str,
        messages: usize,
        (publish_secs, publish_calls): (f64, u64),
        (consume_secs, consume_calls): (f64, u64),
    ) -> Self {
        let n = messages as f64;
        Self {
            tool,
            messages,
            publish_secs,
            publish_calls,
            consume_secs,
            consume_msgs_per_sec: n / consume_secs,
            consume_calls,
            consume_calls_per_msg: consume_calls as f64 / n,
            calls_per_msg: (publish_calls + consume_calls) as f64 / n,
        }
    }
}

/// The plain loop: what a team writes by hand with aws-sdk-sqs.
async fn plain(config: &SqsConfig, n: usize) -> Result<Side> {
    let (client, calls) = config.sdk_client().await?;
    let url = client
        .create_queue()
        .queue_name(format!("{}plain", config.prefix))
        .send()
        .await
        .context("creating the plain loop's queue")?
        .queue_url()
        .unwrap_or_default()
        .to_owned();
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10) {
        let entries = chunk
            .iter()
            .map(|i| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(format!("{{\"n\":{i}}}"))
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = client
            .send_message_batch()
            .queue_url(&url)
            .set_entries(Some(entries))
            .send()
            .await?;
        if !out.failed().is_empty() {
            bail!("the plain loop's send was refused: {:?}", out.failed());
        }
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let publish_calls = calls.get();
    let mut first = None;
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while done < n {
        if Instant::now() > deadline {
            bail!("the plain loop saw {done} of {n} messages in 10 minutes");
        }
        let out = client
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .visibility_timeout(30)
            .send()
            .await?;
        let messages = out.messages.unwrap_or_default();
        if messages.is_empty() {
            continue;
        }
        first.get_or_insert_with(Instant::now);
        let entries = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(m.receipt_handle().unwrap_or_default())
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()?;
        client
            .delete_message_batch()
            .queue_url(&url)
            .set_entries(Some(entries))
            .send()
            .await?;
        done += messages.len();
    }
    let consume_secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64()).max(1e-3);
    let consume_calls = calls.get() - publish_calls;
    Ok(Side::new(
        "aws-sdk-sqs (plain)",
        n,
        (publish_secs, publish_calls),
        (consume_secs, consume_calls),
    ))
}

async fn redrive(config: &SqsConfig, n: usize, concurrency: usize) -> Result<Side> {
    let transport = config.connect().await.context("connecting to the broker")?;
    let dir = tempfile::Builder::new()
        .prefix("redrive-bench-")
        .tempdir()?;
    let store = SqliteConfig::new(dir.path().join("dead.db")).open()?;
    let backend = SqsBackend::new(transport.clone(), store);
    let queue = QueueName::new("bench")?;
    let setup_calls = transport.api_calls();
    let publish_secs = crate::measure::publish_numbered(&backend, &queue, n, 1000).await?;
    let publish_calls = transport.api_calls() - setup_calls;
    let before = transport.api_calls();
    let consume_secs = crate::measure::consume_noop(backend, queue, n, concurrency).await?;
    // Three calls set the redrive policy once per queue (read the DLQ's ARN, read and
    // set the policy): setup, not per message.
    let consume_calls = (transport.api_calls() - before).saturating_sub(3);
    Ok(Side::new(
        "redrive",
        n,
        (publish_secs, publish_calls),
        (consume_secs, consume_calls),
    ))
}

async fn clean_up(config: &SqsConfig) -> Result<()> {
    let (client, _) = config.sdk_client().await?;
    let out = client
        .list_queues()
        .queue_name_prefix(config.prefix.clone())
        .send()
        .await?;
    for url in out.queue_urls() {
        let _ = client.delete_queue().queue_url(url).send().await;
    }
    Ok(())
}

pub async fn run(url: &str, endpoint: Option<&str>, args: &Args) -> Result<f64> {
    let mut config = SqsConfig::new(url)?;
    if let Some(e) = endpoint {
        config.set_endpoint(e).context("--sqs-endpoint")?;
    }
    config.prefix = format!("{}bench{}-", config.prefix, now_ms());
    let n = args.messages;
    anyhow::ensure!(n > 0, "invalid --messages 0");
    let result = async {
        let mine = redrive(&config, n, args.concurrency).await?;
        let theirs = plain(&config, n).await?;
        Ok::<_, anyhow::Error>((mine, theirs))
    }
    .await;
    // Leave the account as it was, whatever happened.
    if let Err(e) = clean_up(&config).await {
        eprintln!("warning: could not delete the bench's queues: {e:#}");
    }
    let (mine, theirs) = result?;
    let ratio = mine.consume_msgs_per_sec / theirs.consume_msgs_per_sec;
    if args.json {
        json_line(&serde_json::json!({ "redrive": mine, "plain": theirs, "ratio": ratio }));
    } else {
        for s in [&mine, &theirs] {
            println!(
                "{:<20} publish {:.2}s ({} calls)  consume {:.2}s {:>7.0} msgs/s  {:.3} calls/msg consuming, {:.3} in all",
                s.tool,
                s.publish_secs,
                s.publish_calls,
                s.consume_secs,
                s.consume_msgs_per_sec,
                s.consume_calls_per_msg,
                s.calls_per_msg
            );
        }
        println!("ratio redrive / plain: {ratio:.2}x");
    }
    Ok(ratio)
}
