//! The `QUEUE-dlq` queues as a [`DlqSource`]: drained into the dead-letter store, each
//! message deleted from SQS only after the store has it. [`SqsBackend`] pairs the
//! transport with the store through the shared [`Brokered`] wrapper.

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, Message, MessageSystemAttributeName};
use redrive_core::{
    Brokered, DeadLetter, DeadLetterStore, DlqSource, Failure, FailureKind, QueueName, StoreError,
    now_ms,
};

use crate::error::during;
use crate::transport::{BATCH, SqsTransport, UNRECORDED};
use crate::wire;

/// SQS lanes and a dead-letter store, as one backend.
pub type SqsBackend<S> = Brokered<SqsTransport, S>;

/// How long a drained message stays hidden while the store takes it.
const DRAIN_VISIBILITY_SECS: i32 = 60;

/// A dead letter as the store keeps it. A message that redrive sent carries its history
/// and the time it died; one that SQS's redrive policy moved (it crashed or outlived
/// every consumer that received it) gets one `lease_expired` failure per receive.
fn dead_letter(queue: &QueueName, m: &Message) -> DeadLetter {
    let incoming = wire::decode(queue, m);
    let now = now_ms();
    match (incoming.envelope, incoming.dead_at_ms) {
        (Ok(envelope), Some(dead_at_ms)) => DeadLetter {
            envelope,
            dead_at_ms,
        },
        (Ok(mut envelope), None) => {
            // Its receives on main, this drain's own excluded.
            let receives = incoming.receives.saturating_sub(1).max(1);
            let message = format!(
                "SQS moved it to the dead-letter queue after {receives} receives \
                 (maxReceiveCount); {UNRECORDED}"
            );
            envelope.record_lost_deliveries(u64::from(receives), &message, now);
            DeadLetter {
                envelope,
                dead_at_ms: now,
            }
        }
        (Err((why, mut raw)), dead_at) => {
            // Kept, not lost: the reason is its last failure.
            raw.record_failure(
                Failure::new(FailureKind::Poison, "MalformedEnvelope", why, now),
                "dlq",
            );
            DeadLetter {
                envelope: raw,
                dead_at_ms: dead_at.unwrap_or(now),
            }
        }
    }
}

impl DlqSource for SqsTransport {
    async fn drain_into<S: DeadLetterStore>(&self, store: &S) -> Result<u64, StoreError> {
        let _one_at_a_time = self.inner.drain_lock.lock().await;
        let mut dlqs = Vec::new();
        for url in self.queue_urls().await? {
            // Only queues redrive created (tagged): another application's DLQ is not ours.
            if url.ends_with("-dlq")
                && let Some(queue) = self.owner(&url).await?
            {
                dlqs.push((url, queue));
            }
        }
        let mut moved = 0;
        for (url, queue) in dlqs {
            loop {
                let out = self
                    .client()
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(BATCH as i32)
                    .wait_time_seconds(0)
                    .visibility_timeout(DRAIN_VISIBILITY_SECS)
                    .message_attribute_names("All")
                    .message_system_attribute_names(
                        MessageSystemAttributeName::ApproximateReceiveCount,
                    )
                    .send()
                    .await
                    .map_err(during("receive from the DLQ"))?;
                let messages = out.messages.unwrap_or_default();
                if messages.is_empty() {
                    break;
                }
                let dead: Vec<DeadLetter> =
                    messages.iter().map(|m| dead_letter(&queue, m)).collect();
                store.insert_batch(&dead).await?;
                redrive_core::failpoint("drain-stored");
                // Only now that the store has them are they deleted from SQS.
                let entries: Vec<DeleteMessageBatchRequestEntry> = messages
                    .iter()
                    .enumerate()
                    .filter_map(|(i, m)| {
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(m.receipt_handle().unwrap_or_default())
                            .build()
                            .ok()
                    })
                    .collect();
                let out = self
                    .client()
                    .delete_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(during("delete drained dead letters"))?;
                if let Some(f) = out.failed().first() {
                    // Stored already; it comes back after its visibility and is stored
                    // again as the same message (the store keys on the redrive id).
                    tracing::warn!(
                        code = f.code(),
                        "could not delete a drained dead letter from SQS"
                    );
                }
                moved += dead.len() as u64;
            }
        }
        Ok(moved)
    }
}
