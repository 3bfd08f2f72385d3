//! The DLQ topics as a [`DlqSource`]: drained into the dead-letter store, their offsets
//! committed (in `<group>.drain`) only after the store has the records. [`KafkaBackend`]
//! pairs the transport with the store through the shared [`Brokered`] wrapper.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use redrive_core::{
    Brokered, DeadLetter, DeadLetterStore, DlqSource, Failure, FailureKind, QueueName, StoreError,
    now_ms,
};

use crate::consumer::CALL_TIMEOUT;
use crate::error::{KafkaError, during};
use crate::transport::{Inner, KafkaTransport};
use crate::wire::decode;

/// Kafka lanes and a dead-letter store, as one backend.
pub type KafkaBackend<S> = Brokered<KafkaTransport, S>;

/// Records read per store write.
const DRAIN_BATCH: usize = 500;

struct Read {
    dead: Vec<DeadLetter>,
    /// Per DLQ partition, the offset to commit once the store has `dead`.
    positions: Vec<(String, i32, i64)>,
}

impl DlqSource for KafkaTransport {
    async fn drain_into<S: DeadLetterStore>(&self, store: &S) -> Result<u64, StoreError> {
        let _one_at_a_time = self.inner_drain_lock().lock().await;
        let topics = self.topic_partitions().await?;
        let prefix = self.config().prefix.clone();
        let mut dlqs: Vec<(String, QueueName, i32)> = Vec::new();
        // One metadata read serves both the queue list and the partition counts.
        for q in self.queues_in(&topics) {
            let Ok(name) = QueueName::new(&q) else {
                continue;
            };
            let topic = format!("{prefix}{q}.dlq");
            if let Some(n) = topics.get(&topic) {
                dlqs.push((topic, name, *n));
            }
        }
        if dlqs.is_empty() {
            return Ok(0);
        }
        let mut moved = 0;
        let started = Instant::now();
        loop {
            let list = dlqs.clone();
            let read = self
                .blocking(move |inner| read_dlqs(inner, &list))
                .await??;
            if read.dead.is_empty() {
                tracing::trace!(
                    ms = started.elapsed().as_millis() as u64,
                    moved,
                    "DLQ drained"
                );
                return Ok(moved);
            }
            store.insert_batch(&read.dead).await?;
            redrive_core::failpoint("drain-stored");
            // Only now that the store has them are they committed past.
            let positions = read.positions;
            self.blocking(move |inner| {
                let mut tpl = TopicPartitionList::new();
                for (t, p, o) in &positions {
                    let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
                }
                inner.drainer.commit(&tpl, CommitMode::Sync)
            })
            .await?
            .map_err(during("commit drained dead letters"))?;
            moved += read.dead.len() as u64;
        }
    }
}

/// Reads up to [`DRAIN_BATCH`] records past the drain group's committed offsets, one DLQ
/// topic at a time, each partition to its end as the fetch reports it (partition EOF).
/// Fetch responses carry the true end; a broker's `ListOffsets` answer is not trusted
/// here, as some Kafka-protocol brokers report the last batch's first offset.
fn read_dlqs(inner: &Inner, dlqs: &[(String, QueueName, i32)]) -> Result<Read, KafkaError> {
    let mut read = Read {
        dead: Vec::new(),
        positions: Vec::new(),
    };
    for (topic, queue, partitions) in dlqs {
        if read.dead.len() >= DRAIN_BATCH {
            break;
        }
        read_topic(inner, topic, queue, *partitions, &mut read)?;
    }
    Ok(read)
}

fn read_topic(
    inner: &Inner,
    topic: &str,
    queue: &QueueName,
    partitions: i32,
    read: &mut Read,
) -> Result<(), KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = inner
        .drainer
        .committed_offsets(tpl, CALL_TIMEOUT)
        .map_err(during("read the drain offsets"))?;
    let mut assign = TopicPartitionList::new();
    for p in 0..partitions {
        let from = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(c)) => Offset::Offset(c),
            _ => Offset::Beginning,
        };
        let _ = assign.add_partition_offset(topic, p, from);
    }
    inner
        .drainer
        .assign(&assign)
        .map_err(during("read the DLQ topics"))?;
    let mut open: Vec<i32> = (0..partitions).collect();
    let mut positions: HashMap<i32, i64> = HashMap::new();
    let deadline = Instant::now() + CALL_TIMEOUT;
    while !open.is_empty() && read.dead.len() < DRAIN_BATCH && Instant::now() < deadline {
        let msg = match inner.drainer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                open.retain(|x| *x != p);
                continue;
            }
            Some(Err(e)) => {
                tracing::warn!(topic, error = %e, "reading a DLQ topic");
                continue;
            }
            Some(Ok(m)) => m,
        };
        if msg.topic() != topic {
            continue;
        }
        let dead_at_ms = msg
            .headers()
            .and_then(|h| {
                h.iter()
                    .find(|x| x.key == "redrive-dead-at")
                    .and_then(|x| x.value)
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
            })
            .or_else(|| msg.timestamp().to_millis())
            .unwrap_or_else(now_ms);
        let envelope = decode(queue, &msg).unwrap_or_else(|bad| {
            let (why, mut raw) = *bad;
            // Kept, not lost: the reason is its last failure.
            raw.record_failure(
                Failure::new(FailureKind::Poison, "MalformedEnvelope", why, dead_at_ms),
                "dlq",
            );
            raw
        });
        read.dead.push(DeadLetter {
            envelope,
            dead_at_ms,
        });
        positions.insert(msg.partition(), msg.offset() + 1);
    }
    let _ = inner.drainer.unassign();
    read.positions
        .extend(positions.into_iter().map(|(p, o)| (topic.to_owned(), p, o)));
    Ok(())
}
