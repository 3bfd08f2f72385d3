//! The NATS DLQ stream as a [`DlqSource`]: drained into the dead-letter store, each
//! message acknowledged in JetStream only after the store has it. [`NatsBackend`] pairs
//! the transport with the store through the shared [`Brokered`] wrapper.

use std::time::Duration;

use async_nats::jetstream::AckKind;
use redrive_core::{
    Brokered, DeadLetter, DeadLetterStore, DlqSource, Envelope, QueueName, StoreError,
};

use crate::error::{NatsError, call};
use crate::transport::{NatsTransport, durable, fetch_batch};
use crate::wire::{created_ms, envelope_of, id_in_stream, wire_of};

/// JetStream lanes and a dead-letter store, as one backend.
pub type NatsBackend<S> = Brokered<NatsTransport, S>;

impl DlqSource for NatsTransport {
    async fn drain_into<S: DeadLetterStore>(&self, store: &S) -> Result<u64, StoreError> {
        let mut moved = 0;
        for queue in self.queue_names().await? {
            moved += self.drain_queue(&queue, store).await?;
        }
        Ok(moved)
    }
}

impl NatsTransport {
    async fn drain_queue<S: DeadLetterStore>(
        &self,
        queue: &str,
        store: &S,
    ) -> Result<u64, NatsError> {
        let Ok(name) = QueueName::new(queue) else {
            return Ok(0);
        };
        // Messages that reached max_deliver join the DLQ stream first.
        self.sweep_exhausted(&name).await?;
        let n = self.names(queue);
        let stream = self
            .js()
            .get_stream(&n.dlq_stream)
            .await
            .map_err(call("open the DLQ stream"))?;
        let created = created_ms(&stream);
        let consumer = durable(
            &stream,
            "redrive-drain",
            Duration::from_secs(30),
            "create the drain consumer",
        )
        .await?;
        let mut moved = 0;
        loop {
            let msgs = fetch_batch(&consumer, 500, "read the DLQ stream").await?;
            if msgs.is_empty() {
                return Ok(moved);
            }
            let mut dead = Vec::with_capacity(msgs.len());
            for m in &msgs {
                let (wire, bad) = wire_of(m.headers.as_ref());
                let dead_at_ms = wire
                    .iter()
                    .find(|(k, _)| k == "redrive-dead-at")
                    .and_then(|(_, v)| v.parse().ok())
                    .filter(|ms| redrive_core::is_valid_time(*ms))
                    .unwrap_or_else(redrive_core::now_ms);
                // Whatever was published to the DLQ subject is kept, readable or not,
                // under an id that stays the same if it is drained again after a crash.
                let read = match bad {
                    Some(why) => Err(why),
                    None => envelope_of(&name, wire.clone(), m.payload.clone()),
                };
                let envelope = read.unwrap_or_else(|why| {
                    let seq = m.info().map_or(0, |i| i.stream_sequence);
                    Envelope::unreadable(
                        name.clone(),
                        id_in_stream(&n.dlq_stream, created, seq),
                        m.payload.clone(),
                        wire,
                        &format!("in {}: {why}", n.dlq_stream),
                        "dlq",
                        redrive_core::now_ms(),
                    )
                });
                dead.push(DeadLetter {
                    envelope,
                    dead_at_ms,
                });
            }
            store
                .insert_batch(&dead)
                .await
                .map_err(|e| NatsError::Call {
                    context: "store drained dead letters",
                    reason: e.to_string(),
                })?;
            redrive_core::failpoint("drain-stored");
            // Only now that the store has them are they acknowledged.
            for m in &msgs {
                self.confirm(
                    m.reply.as_ref(),
                    AckKind::Ack,
                    "acknowledge a drained dead letter",
                )
                .await?;
            }
            moved += dead.len() as u64;
        }
    }
}
