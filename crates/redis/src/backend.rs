//! [`RedisBackend`]: the Redis lanes plus the dead-letter store of record, as one
//! backend. Every read of the store first drains the Redis DLQ streams into it, and a
//! drained entry is acknowledged in Redis only after the store has it.

use std::time::Duration;

use redis::Value;
use redrive_core::{
    AuditEntry, Cursor, DeadFilter, DeadGroup, DeadLetter, DeadLetterStore, DeadSelection,
    DeadStats, Delivery, Envelope, Fetched, LaneSet, LaneStats, MessageId, QueueDepths, QueueName,
    StoreError, Tier, Transport, TransportError,
};

use crate::error::RedisError;
use crate::transport::{Entry, RedisTransport, Token, entries, envelope_of, read_reply};

/// The consumer group that drains DLQ streams into the store.
const DRAIN_GROUP: &str = "redrive-drain";
/// A drain entry pending this long belongs to a drainer that died; take it over.
const DRAIN_RECLAIM_MS: u64 = 30_000;

/// Redis lanes and a dead-letter store, as one backend.
#[derive(Debug, Clone)]
pub struct RedisBackend<S> {
    transport: RedisTransport,
    store: S,
}

impl<S: DeadLetterStore + Clone> RedisBackend<S> {
    /// Pairs a connected transport with a store.
    pub fn new(transport: RedisTransport, store: S) -> Self {
        Self { transport, store }
    }

    /// The store of record.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The Redis transport.
    pub fn transport(&self) -> &RedisTransport {
        &self.transport
    }

    /// Moves every dead message waiting in the Redis DLQ streams into the store;
    /// returns how many were moved.
    ///
    /// # Errors
    ///
    /// Fails when Redis or the store does; entries not yet stored stay in Redis.
    pub async fn drain(&self) -> Result<u64, RedisError> {
        let mut moved = 0;
        for queue in self.transport.queues().await? {
            moved += self.drain_queue(&queue).await?;
        }
        Ok(moved)
    }

    async fn drain_queue(&self, queue: &str) -> Result<u64, RedisError> {
        let Ok(name) = QueueName::new(queue) else {
            return Ok(0);
        };
        let keys = self.transport.keys(queue);
        let t = &self.transport;
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
                let envelope = envelope_of(&name, &keys.dlq, e)?;
                let dead_at_ms = e
                    .get("dead_at")
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                    .unwrap_or_else(redrive_core::now_ms);
                dead.push(DeadLetter {
                    envelope,
                    dead_at_ms,
                });
            }
            self.store
                .insert_batch(&dead)
                .await
                .map_err(|e| RedisError::Malformed {
                    key: keys.dlq.clone(),
                    id: "batch".into(),
                    reason: format!("the dead-letter store refused it: {e}"),
                })?;
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

    async fn drained(&self) -> Result<(), StoreError> {
        self.drain().await.map(|_| ()).map_err(Into::into)
    }
}

impl<S: DeadLetterStore + Clone> Transport for RedisBackend<S> {
    type Token = Token;

    async fn publish(&self, queue: &QueueName, batch: Vec<Envelope>) -> Result<(), TransportError> {
        self.transport.publish(queue, batch).await
    }
    async fn fetch(
        &self,
        lanes: &LaneSet,
        max: usize,
        lease: Duration,
    ) -> Result<Fetched<Token>, TransportError> {
        self.transport.fetch(lanes, max, lease).await
    }
    async fn ack(&self, d: &Delivery<Token>) -> Result<(), TransportError> {
        self.transport.ack(d).await
    }
    async fn retry(
        &self,
        d: &Delivery<Token>,
        tier: &Tier,
        due_ms: i64,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        self.transport.retry(d, tier, due_ms, envelope).await
    }
    async fn dead_letter(
        &self,
        d: &Delivery<Token>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        self.transport.dead_letter(d, envelope).await
    }
    async fn release(&self, d: &Delivery<Token>) -> Result<(), TransportError> {
        self.transport.release(d).await
    }
    async fn extend_lease(
        &self,
        d: &Delivery<Token>,
        lease: Duration,
    ) -> Result<(), TransportError> {
        self.transport.extend_lease(d, lease).await
    }
}

impl<S: DeadLetterStore + Clone> LaneStats for RedisBackend<S> {
    async fn depths(&self) -> Result<Vec<QueueDepths>, TransportError> {
        let mut out = self.transport.depths().await?;
        for d in &mut out {
            d.dlq += self
                .store
                .depth(QueueName::new(&d.queue).ok().as_ref())
                .await
                .map_err(|e| TransportError::Backend {
                    context: "dead-letter store".into(),
                    source: Box::new(e),
                })?;
        }
        Ok(out)
    }

    async fn queue_depths(&self, lanes: &LaneSet) -> Result<QueueDepths, TransportError> {
        let mut d = self.transport.queue_depths(lanes).await?;
        d.dlq +=
            self.store
                .depth(Some(&lanes.queue))
                .await
                .map_err(|e| TransportError::Backend {
                    context: "dead-letter store".into(),
                    source: Box::new(e),
                })?;
        Ok(d)
    }
}

impl<S: DeadLetterStore + Clone> DeadLetterStore for RedisBackend<S> {
    async fn insert(&self, dead: &DeadLetter) -> Result<bool, StoreError> {
        self.store.insert(dead).await
    }
    async fn insert_batch(&self, dead: &[DeadLetter]) -> Result<u64, StoreError> {
        self.store.insert_batch(dead).await
    }
    async fn list(
        &self,
        filter: &DeadFilter,
        cursor: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.drained().await?;
        self.store.list(filter, cursor, limit).await
    }
    async fn groups(
        &self,
        filter: &DeadFilter,
        limit: usize,
    ) -> Result<Vec<DeadGroup>, StoreError> {
        self.drained().await?;
        self.store.groups(filter, limit).await
    }
    async fn count(&self, filter: &DeadFilter) -> Result<u64, StoreError> {
        self.drained().await?;
        self.store.count(filter).await
    }
    async fn get(&self, id: &MessageId) -> Result<Option<DeadLetter>, StoreError> {
        self.drained().await?;
        self.store.get(id).await
    }
    async fn mark_replayed(
        &self,
        ids: &[MessageId],
        actor: &str,
        reason: &str,
    ) -> Result<u64, StoreError> {
        self.store.mark_replayed(ids, actor, reason).await
    }
    async fn purge(
        &self,
        selection: &DeadSelection,
        actor: &str,
        reason: &str,
    ) -> Result<u64, StoreError> {
        self.drained().await?;
        self.store.purge(selection, actor, reason).await
    }
    async fn stats(&self) -> Result<Vec<DeadStats>, StoreError> {
        self.drained().await?;
        self.store.stats().await
    }
    async fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.store.audit_log(limit).await
    }
    async fn depth(&self, queue: Option<&QueueName>) -> Result<u64, StoreError> {
        self.drained().await?;
        self.store.depth(queue).await
    }
}
