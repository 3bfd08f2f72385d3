//! `redrive-bench kafka://…`: no-failure throughput of the Kafka backend beside a
//! plain rdkafka consumer (poll, store the offset, commit in batches) of the same number
//! of records, on the same broker, with the same client settings (the member's fetch
//! settings included), in the same run.
//!
//! The plain consumer runs three times: on bare records (the ratio's baseline); on
//! records that carry the one header redrive puts on a record that never failed
//! (`redrive-id`), left unread, which shows what carrying an id costs the broker; and on
//! such records reading each one's id, as every consumer of redrive's envelope must,
//! which shows what the id costs the client before any runner work.
//!
//! Both sides join a consumer group first; how long that takes depends on the broker,
//! not on the consumer, so each side's rate is measured from its first record to its
//! last (the time including the join is reported beside it).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use redrive_core::{Envelope, QueueName, now_ms};
use redrive_kafka::{FETCH_SETTINGS, KafkaBackend, KafkaConfig};
use redrive_sqlite::SqliteConfig;
use serde::Serialize;

use crate::Args;

#[derive(Serialize)]
struct Side {
    tool: &'static str,
    messages: usize,
    publish_secs: f64,
    /// From subscribing to the last record settled (group join included).
    total_secs: f64,
    /// From the first record handed out to the last settled.
    consume_secs: f64,
    consume_msgs_per_sec: f64,
}

/// What the plain consumer's records carry, and what it reads of them.
#[derive(Clone, Copy, PartialEq)]
enum Plain {
    /// Payload only.
    Bare,
    /// A `redrive-id` header as redrive's records carry, never read.
    IdCarried,
    /// A `redrive-id` header, read and parsed for every record.
    IdRead,
}

/// The plain consumer: what a team writes by hand with rdkafka.
async fn plain(config: &KafkaConfig, topic: &str, n: usize, mode: Plain) -> Result<Side> {
    let id_header = mode != Plain::Bare;
    let producer: FutureProducer = config
        .client_config(&[("acks", "all"), ("linger.ms", "2")])
        .create()
        .context("creating the plain producer")?;
    let admin: AdminClient<DefaultClientContext> = config.client_config(&[]).create()?;
    let new = NewTopic::new(
        topic,
        config.partitions,
        TopicReplication::Fixed(config.replication),
    );
    for r in admin.create_topics([&new], &AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    let started = Instant::now();
    let mut waiting = Vec::with_capacity(n);
    for i in 0..n {
        let payload = format!("{{\"n\":{i}}}");
        let id = redrive_core::MessageId::new().to_string();
        loop {
            let mut record = FutureRecord::<(), _>::to(topic).payload(&payload);
            if id_header {
                record = record.headers(OwnedHeaders::new().insert(Header {
                    key: "redrive-id",
                    value: Some(id.as_bytes()),
                }));
            }
            match producer.send_result(record) {
                Ok(f) => {
                    waiting.push(f);
                    break;
                }
                Err((_, _)) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
    for f in waiting {
        f.await?.map_err(|(e, _)| e)?;
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let group = format!("{topic}.plain");
    let mut settings = vec![
        ("group.id", group.as_str()),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("auto.offset.reset", "earliest"),
    ];
    // Fetching as redrive's member does: the ratio is then the runner's cost, not a
    // difference in librdkafka settings (its default fetch backoff stalls a consumer
    // that falls behind its buffer for up to a second).
    settings.extend_from_slice(FETCH_SETTINGS);
    let consumer: BaseConsumer = config
        .client_config(&settings)
        .create()
        .context("creating the plain consumer")?;
    let topic = topic.to_owned();
    let (total, first) = tokio::task::spawn_blocking(move || -> Result<(f64, Instant)> {
        consumer.subscribe(&[&topic])?;
        let started = Instant::now();
        let mut first = None;
        let mut done = 0;
        while done < n {
            if started.elapsed() > Duration::from_secs(600) {
                bail!("the plain consumer saw {done} of {n} records in 10 minutes");
            }
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    first.get_or_insert_with(Instant::now);
                    if mode == Plain::IdRead {
                        // The same reading redrive's decode starts with.
                        let id = m.headers().and_then(|h| {
                            Envelope::compact_id(
                                h.iter().map(|h| (h.key, h.value.unwrap_or_default())),
                            )
                        });
                        if id.is_none() {
                            bail!(
                                "a record without a redrive-id header at offset {}",
                                m.offset()
                            );
                        }
                    }
                    consumer.store_offset_from_message(&m)?;
                    done += 1;
                    if done % 1000 == 0 {
                        consumer.commit_consumer_state(CommitMode::Async)?;
                    }
                }
                Some(Err(e)) => bail!("plain consumer: {e}"),
                None => {}
            }
        }
        // Nothing stored since the last batch's commit is not an error.
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(())
            | Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => {}
            Err(e) => return Err(e.into()),
        }
        Ok((
            started.elapsed().as_secs_f64(),
            first.unwrap_or_else(Instant::now),
        ))
    })
    .await??;
    let consume_secs = first.elapsed().as_secs_f64();
    Ok(Side {
        tool: match mode {
            Plain::Bare => "rdkafka (plain)",
            Plain::IdCarried => "rdkafka (id header)",
            Plain::IdRead => "rdkafka (reads id)",
        },
        messages: n,
        publish_secs,
        total_secs: total,
        consume_secs,
        consume_msgs_per_sec: n as f64 / consume_secs,
    })
}

async fn redrive(url: &str, n: usize, concurrency: usize) -> Result<Side> {
    let transport = KafkaConfig::new(url)?
        .connect()
        .await
        .context("connecting to the broker")?;
    let dir = tempfile::Builder::new()
        .prefix("redrive-bench-")
        .tempdir()?;
    let store = SqliteConfig::new(dir.path().join("dead.db")).open()?;
    let backend = KafkaBackend::new(transport, store);
    let queue = QueueName::new("bench")?;
    let publish_secs = crate::measure::publish_numbered(&backend, &queue, n, 5000).await?;
    let started = Instant::now();
    let consume_secs = crate::measure::consume_noop(backend, queue, n, concurrency).await?;
    let total_secs = started.elapsed().as_secs_f64();
    Ok(Side {
        tool: "redrive",
        messages: n,
        publish_secs,
        total_secs,
        consume_secs,
        consume_msgs_per_sec: n as f64 / consume_secs,
    })
}

pub async fn run(url: &str, args: &Args) -> Result<f64> {
    let run_prefix = format!("bench{}.", now_ms());
    let sep = if url.contains('?') { '&' } else { '?' };
    let url = format!(
        "{url}{sep}prefix={run_prefix}&group={}",
        run_prefix.trim_end_matches('.')
    );
    let config = KafkaConfig::new(&url)?;
    let n = args.messages;
    let mine = redrive(&url, n, args.concurrency).await?;
    let theirs = plain(&config, &config.topic("plain"), n, Plain::Bare).await?;
    let with_id = plain(&config, &config.topic("plain_id"), n, Plain::IdCarried).await?;
    let reads_id = plain(&config, &config.topic("plain_reads_id"), n, Plain::IdRead).await?;
    let ratio = mine.consume_msgs_per_sec / theirs.consume_msgs_per_sec;
    let ratio_with_id = mine.consume_msgs_per_sec / with_id.consume_msgs_per_sec;
    let ratio_reads_id = mine.consume_msgs_per_sec / reads_id.consume_msgs_per_sec;
    // How far below the bare loop reading the id alone puts a consumer.
    let reads_id_to_plain = reads_id.consume_msgs_per_sec / theirs.consume_msgs_per_sec;
    // Leave the broker as it was.
    if let Ok(admin) = config
        .client_config(&[])
        .create::<AdminClient<DefaultClientContext>>()
    {
        let topics: Vec<String> = [
            "bench",
            "bench.dlq",
            "bench.retry.1s",
            "plain",
            "plain_id",
            "plain_reads_id",
        ]
        .iter()
        .map(|t| config.topic(t))
        .collect();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
    }
    if args.json {
        crate::measure::json_line(&serde_json::json!({
            "redrive": mine,
            "plain": theirs,
            "plain_with_id": with_id,
            "plain_reads_id": reads_id,
            "ratio": ratio,
            "ratio_with_id": ratio_with_id,
            "ratio_reads_id": ratio_reads_id,
            "reads_id_to_plain": reads_id_to_plain,
        }));
    } else {
        for s in [&mine, &theirs, &with_id, &reads_id] {
            println!(
                "{:<20} publish {:.2}s  first→last record {:.2}s  {:>8.0} msgs/s  (with group join {:.2}s)",
                s.tool, s.publish_secs, s.consume_secs, s.consume_msgs_per_sec, s.total_secs
            );
        }
        println!(
            "ratio redrive / plain: {ratio:.2}x  (redrive / plain with an id header: \
             {ratio_with_id:.2}x; redrive / plain reading the id: {ratio_reads_id:.2}x; \
             plain reading the id / plain: {reads_id_to_plain:.2}x)"
        );
    }
    Ok(ratio)
}
