//! `redrive-bench nats://…`: no-failure throughput of the NATS backend beside a
//! plain async-nats pull consumer doing publish + fetch + ack of the same number of
//! messages, on the same server, in the same run.
//!
//! The plain consumer runs twice: on bare payloads (the ratio's baseline) and on messages
//! that carry an id where redrive puts one on a message that never failed (a `redrive-id`
//! header, or with `?ids=subject` the subject's last token), which separates what the
//! runner costs from what carrying an id costs.

use std::time::Instant;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer::pull, stream};
use redrive_core::QueueName;
use redrive_nats::{IdPlacement, NatsBackend, NatsConfig};
use redrive_sqlite::SqliteConfig;
use serde::Serialize;

use crate::Args;

#[derive(Serialize)]
struct Side {
    tool: &'static str,
    messages: usize,
    publish_secs: f64,
    consume_secs: f64,
    consume_msgs_per_sec: f64,
    /// This process's CPU time while consuming, per message (Linux only).
    consume_cpu_us_per_msg: Option<f64>,
}

/// The plain consumer: what a team writes by hand with async-nats. With `with_id`, each
/// message carries an id placed as redrive places its own.
async fn plain(url: &str, n: usize, namespace: &str, with_id: Option<IdPlacement>) -> Result<Side> {
    let client = async_nats::connect(url)
        .await
        .context("connecting to NATS")?;
    let js = jetstream::new(client);
    let suffix = if with_id.is_some() {
        "plain_id"
    } else {
        "plain"
    };
    let name = format!("{namespace}_{suffix}");
    let subject = format!("{namespace}.{suffix}");
    let s = js
        .get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![if with_id == Some(IdPlacement::Subject) {
                format!("{subject}.*")
            } else {
                subject.clone()
            }],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .context("creating the plain stream")?;
    let started = Instant::now();
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
        let payload = format!("{{\"n\":{i}}}").into();
        let id = redrive_core::MessageId::new();
        let ack = match with_id {
            Some(IdPlacement::Subject) => js.publish(format!("{subject}.{id}"), payload).await?,
            Some(IdPlacement::Header) => {
                let mut h = async_nats::HeaderMap::new();
                h.insert("redrive-id", id.to_string().as_str());
                js.publish_with_headers(subject.clone(), h, payload).await?
            }
            None => js.publish(subject.clone(), payload).await?,
        };
        acks.push(ack);
    }
    for a in acks {
        a.await?;
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let cpu = crate::measure::cpu_secs();
    let consumer: jetstream::consumer::Consumer<pull::Config> = s
        .get_or_create_consumer(
            "plain",
            pull::Config {
                durable_name: Some("plain".into()),
                ..Default::default()
            },
        )
        .await
        .context("creating the plain consumer")?;
    // Timed like redrive's side: from the first message received to the last acked.
    let mut started = None;
    let mut done = 0;
    while done < n {
        let mut batch = consumer.fetch().max_messages(256).messages().await?;
        while let Some(m) = next(&mut batch).await {
            let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
            started.get_or_insert_with(Instant::now);
            m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            done += 1;
        }
    }
    let consume_secs = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    let consume_cpu_us_per_msg = crate::measure::cpu_us_per_msg(cpu, crate::measure::cpu_secs(), n);
    let _ = js.delete_stream(&name).await;
    Ok(Side {
        tool: match with_id {
            Some(IdPlacement::Header) => "async-nats (id header)",
            Some(IdPlacement::Subject) => "async-nats (id subject)",
            None => "async-nats (plain)",
        },
        messages: n,
        publish_secs,
        consume_secs,
        consume_msgs_per_sec: n as f64 / consume_secs,
        consume_cpu_us_per_msg,
    })
}

async fn next<S: futures_core::Stream + Unpin>(s: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *s).poll_next(cx)).await
}

async fn redrive(url: &str, n: usize, concurrency: usize, namespace: &str) -> Result<Side> {
    let sep = if url.contains('?') { '&' } else { '?' };
    let transport = NatsConfig::new(&format!("{url}{sep}namespace={namespace}"))?
        .connect()
        .await
        .context("connecting to the broker")?;
    let dir = tempfile::Builder::new()
        .prefix("redrive-bench-")
        .tempdir()?;
    let store = SqliteConfig::new(dir.path().join("dead.db")).open()?;
    let backend = NatsBackend::new(transport, store);
    let queue = QueueName::new("bench")?;
    let publish_secs = crate::measure::publish_numbered(&backend, &queue, n, 1000).await?;
    let cpu = crate::measure::cpu_secs();
    let consume_secs = crate::measure::consume_noop(backend, queue, n, concurrency).await?;
    let consume_cpu_us_per_msg = crate::measure::cpu_us_per_msg(cpu, crate::measure::cpu_secs(), n);
    Ok(Side {
        tool: "redrive",
        messages: n,
        publish_secs,
        consume_secs,
        consume_msgs_per_sec: n as f64 / consume_secs,
        consume_cpu_us_per_msg,
    })
}

pub async fn run(url: &str, args: &Args) -> Result<f64> {
    let namespace = format!("bench{}", redrive_core::now_ms());
    let n = args.messages;
    let placement = NatsConfig::new(url)?.ids;
    let mine = redrive(url, n, args.concurrency, &namespace).await?;
    // The plain client takes the server's address alone (the options are redrive's).
    let url = url.split_once('?').map_or(url, |(base, _)| base);
    let theirs = plain(url, n, &namespace, None).await?;
    let with_id = plain(url, n, &namespace, Some(placement)).await?;
    let ratio = mine.consume_msgs_per_sec / theirs.consume_msgs_per_sec;
    let ratio_with_id = mine.consume_msgs_per_sec / with_id.consume_msgs_per_sec;
    // Leave the server as it was.
    if let Ok(client) = async_nats::connect(url).await {
        let js = jetstream::new(client);
        for s in [
            format!("{namespace}_bench"),
            format!("{namespace}_bench_dlq"),
            format!("{namespace}_bench_exhausted"),
            format!("KV_{namespace}_history"),
        ] {
            let _ = js.delete_stream(&s).await;
        }
    }
    if args.json {
        crate::measure::json_line(&serde_json::json!({
            "redrive": mine,
            "plain": theirs,
            "plain_with_id": with_id,
            "ratio": ratio,
            "ratio_with_id": ratio_with_id,
        }));
    } else {
        for s in [&mine, &theirs, &with_id] {
            let cpu = s
                .consume_cpu_us_per_msg
                .map(|us| format!("  {us:.1} µs CPU/msg"))
                .unwrap_or_default();
            println!(
                "{:<22} publish {:.2}s  consume {:.2}s  {:>8.0} msgs/s{cpu}",
                s.tool, s.publish_secs, s.consume_secs, s.consume_msgs_per_sec
            );
        }
        println!(
            "ratio redrive / plain: {ratio:.2}x  (redrive / plain with an id: {ratio_with_id:.2}x)"
        );
    }
    Ok(ratio)
}
