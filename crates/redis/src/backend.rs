//! The Redis DLQ stream as a [`DlqSource`]: drained into the dead-letter store, each
//! entry acknowledged in Redis only after the store has it. [`RedisBackend`] pairs the
//! transport with the store through the shared [`Brokered`] wrapper.

use redis::Value;
use redrive_core::{Brokered, DeadLetter, DeadLetterStore, DlqSource, QueueName, StoreError};

use crate::error::RedisError;
use crate::transport::RedisTransport;
use crate::wire::{Entry, entries, envelope_of, read_reply};

/// Redis lanes and a dead-letter store, as one backend.
pub type RedisBackend<S> = Brokered<RedisTransport, S>;

/// The consumer group that drains DLQ streams into the store.
const DRAIN_GROUP: &str = "redrive-drain";
/// A drain entry pending this long belongs to a drainer that died; take it over.
const DRAIN_RECLAIM_MS: u64 = 30_000;

impl DlqSource for RedisTransport {
    async fn drain_into<S: DeadLetterStore>(&self, store: &S) -> Result<u64, StoreError> {
        let mut moved = 0;
        for queue in self.queues().await? {
            moved += self.drain_queue(&queue, store).await?;
        }
        Ok(moved)
    }
}

impl RedisTransport {
    async fn drain_queue<S: DeadLetterStore>(
        &self,
        queue: &str,
        store: &S,
    ) -> Result<u64, RedisError> {
        let Ok(name) = QueueName::new(queue) else {
            return Ok(0);
        };
        let keys = self.keys(queue);
        let t = self;
        t.ensure(queue, &keys.dlq, DRAIN_GROUP).await?;
        let mut conn = t.conn();
        let mut moved = 0;
        loop {
            let claimed: Value = redis::cmd("XAUTOCLAIM")
                .arg(&keys.dlq)
                .arg(DRAIN_GROUP)
                .arg("drainer")
                .arg(DRAIN_RECLAIM_MS)
                .arg("0-0")
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await
                .map_err(t.err("reclaim DLQ entries"))?;
            let mut batch: Vec<Entry> = match &claimed {
                Value::Array(parts) => parts.get(1).map(entries).unwrap_or_default(),
                _ => Vec::new(),
            };
            if batch.is_empty() {
                let read: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(DRAIN_GROUP)
                    .arg("drainer")
                    .arg("COUNT")
                    .arg(500)
                    .arg("STREAMS")
                    .arg(&keys.dlq)
                    .arg(">")
                    .query_async(&mut conn)
                    .await
                    .map_err(t.err("read DLQ"))?;
                batch = read_reply(&read);
            }
            if batch.is_empty() {
                return Ok(moved);
            }
            let mut dead = Vec::with_capacity(batch.len());
            for e in batch.iter().filter(|e| !e.fields.is_empty()) {
                // An entry that cannot be read is stored as what could be read of it,
                // with why: it is dead either way, and must not stop the drain.
                let envelope = envelope_of(&name, &keys.dlq, e).unwrap_or_else(|raw| *raw);
                let dead_at_ms = e
                    .get("dead_at")
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                    .filter(|ms| redrive_core::is_valid_time(*ms))
                    .unwrap_or_else(redrive_core::now_ms);
                dead.push(DeadLetter {
                    envelope,
                    dead_at_ms,
                });
            }
            store
                .insert_batch(&dead)
                .await
                .map_err(|e| RedisError::Malformed {
                    key: keys.dlq.clone(),
                    id: "batch".into(),
                    reason: format!("the dead-letter store refused it: {e}"),
                })?;
            redrive_core::failpoint("drain-stored");
            // Only now that the store has them are they acknowledged and removed.
            let ids: Vec<&str> = batch.iter().map(|e| e.id.as_str()).collect();
            let mut pipe = redis::pipe();
            pipe.cmd("XACK")
                .arg(&keys.dlq)
                .arg(DRAIN_GROUP)
                .arg(&ids)
                .ignore();
            pipe.cmd("XDEL").arg(&keys.dlq).arg(&ids).ignore();
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(t.err("acknowledge drained DLQ entries"))?;
            moved += dead.len() as u64;
        }
    }
}
