//! [`NatsBackend`]: the JetStream lanes plus the dead-letter store of record, as one
//! backend. Every read of the store first drains the DLQ streams into it; a drained
//! message is acknowledged in JetStream only after the store has it.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, pull};
use redrive_core::{
    AuditEntry, Cursor, DeadFilter, DeadGroup, DeadLetter, DeadLetterStore, DeadSelection,
    DeadStats, Delivery, Envelope, Fetched, LaneSet, LaneStats, MessageId, QueueDepths, QueueName,
    StoreError, Tier, Transport, TransportError,
};

use crate::transport::{NatsError, NatsTransport, Token, envelope_of, futures_like, wire_of};

/// JetStream lanes and a dead-letter store, as one backend.
#[derive(Clone)]
pub struct NatsBackend<S> {
    transport: NatsTransport,
    store: S,
}

impl<S> std::fmt::Debug for NatsBackend<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NatsBackend")
    }
}

fn call<E: std::fmt::Display>(context: &'static str) -> impl Fn(E) -> NatsError {
    move |e| NatsError::Call {
        context,
        reason: e.to_string(),
    }
}

impl<S: DeadLetterStore + Clone> NatsBackend<S> {
    /// Pairs a connected transport with a store.
    pub fn new(transport: NatsTransport, store: S) -> Self {
        Self { transport, store }
    }

    /// The store of record.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Moves every dead message waiting in the DLQ streams into the store.
    ///
    /// # Errors
    ///
    /// Fails when NATS or the store does; messages not yet stored stay in NATS.
    pub async fn drain(&self) -> Result<u64, NatsError> {
        let mut moved = 0;
        for queue in self.transport.queue_names().await? {
            moved += self.drain_queue(&queue).await?;
        }
        Ok(moved)
    }

    async fn drain_queue(&self, queue: &str) -> Result<u64, NatsError> {
        let Ok(name) = QueueName::new(queue) else {
            return Ok(0);
        };
        let n = self.transport.names(queue);
        let stream = self
            .transport
            .js()
            .get_stream(&n.dlq_stream)
            .await
            .map_err(call("open the DLQ stream"))?;
        let consumer: async_nats::jetstream::consumer::Consumer<pull::Config> = stream
            .get_or_create_consumer(
                "redrive-drain",
                pull::Config {
                    durable_name: Some("redrive-drain".into()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    ..Default::default()
                },
            )
            .await
            .map_err(call("create the drain consumer"))?;
        let mut moved = 0;
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(500)
                .messages()
                .await
                .map_err(call("read the DLQ stream"))?;
            let mut msgs = Vec::new();
            while let Some(m) = futures_like::next(&mut batch).await {
                msgs.push(m.map_err(call("read the DLQ stream"))?);
            }
            if msgs.is_empty() {
                return Ok(moved);
            }
            let mut dead = Vec::with_capacity(msgs.len());
            for m in &msgs {
                let wire = wire_of(m.headers.as_ref());
                let dead_at_ms = wire
                    .iter()
                    .find(|(k, _)| k == "redrive-dead-at")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or_else(redrive_core::now_ms);
                let envelope = envelope_of(&name, wire, m.payload.to_vec()).map_err(|reason| {
                    NatsError::Malformed {
                        stream: n.dlq_stream.clone(),
                        seq: 0,
                        reason,
                    }
                })?;
                dead.push(DeadLetter {
                    envelope,
                    dead_at_ms,
                });
            }
            self.store
                .insert_batch(&dead)
                .await
                .map_err(|e| NatsError::Call {
                    context: "store drained dead letters",
                    reason: e.to_string(),
                })?;
            // Only now that the store has them are they acknowledged.
            for m in &msgs {
                if let Some(reply) = m.message.reply.clone() {
                    let ack: bytes::Bytes = async_nats::jetstream::AckKind::Ack.into();
                    self.transport
                        .client()
                        .request(reply, ack)
                        .await
                        .map_err(call("acknowledge a drained dead letter"))?;
                }
            }
            moved += dead.len() as u64;
        }
    }

    async fn drained(&self) -> Result<(), StoreError> {
        self.drain()
            .await
            .map(|_| ())
            .map_err(|e| StoreError::Backend {
                context: "nats".into(),
                source: Box::new(e),
            })
    }
}

impl<S: DeadLetterStore + Clone> Transport for NatsBackend<S> {
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

fn store_err(e: StoreError) -> TransportError {
    TransportError::Backend {
        context: "dead-letter store".into(),
        source: Box::new(e),
    }
}

impl<S: DeadLetterStore + Clone> LaneStats for NatsBackend<S> {
    async fn depths(&self) -> Result<Vec<QueueDepths>, TransportError> {
        let mut out = self.transport.depths().await?;
        for d in &mut out {
            d.dlq += self
                .store
                .depth(QueueName::new(&d.queue).ok().as_ref())
                .await
                .map_err(store_err)?;
        }
        Ok(out)
    }

    async fn queue_depths(&self, lanes: &LaneSet) -> Result<QueueDepths, TransportError> {
        let mut d = self.transport.queue_depths(lanes).await?;
        // The DLQ stream keeps drained messages (acked by the drain consumer), so the
        // dead count is the store's, after a drain.
        self.drained().await.map_err(store_err)?;
        d.dlq = self
            .store
            .depth(Some(&lanes.queue))
            .await
            .map_err(store_err)?;
        Ok(d)
    }
}

impl<S: DeadLetterStore + Clone> DeadLetterStore for NatsBackend<S> {
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
