//! Messages that reached the consumer's `max_deliver`, and other upkeep of a main stream.
//!
//! redrive counts attempts itself and dead-letters at max attempts, well before
//! `max_deliver`. A message can still reach it: a consumer that dies before it can even
//! settle the delivery that revealed an earlier crash, or a `max_deliver` set low by the
//! user. JetStream then stops delivering the message but keeps it in the work-queue
//! stream, and says so only in a MAX_DELIVERIES advisory, published to whoever listens at
//! that moment. Each queue's advisory stream keeps those announcements; a sweep reads
//! them, publishes each message to the DLQ stream with its payload and one
//! `lease_expired` failure per delivery nobody settled, and only then deletes it from
//! main and acknowledges the advisory.
//!
//! Sweeps run when the DLQ stream is drained (every store read, `serve`), every few
//! seconds from a consumer's fetch, and before acknowledged leftovers are purged.

use std::time::{Duration, Instant};

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, AckKind};
use redrive_core::{Envelope, QueueName, now_ms};

use crate::error::{NatsError, call};
use crate::transport::{NatsTransport, durable, fetch_batch};
use crate::wire::{created_ms, envelope_of, id_in_stream, id_of_subject, read_envelope, wire_of};

/// How often a consumer looks for exhausted messages while it fetches.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// How long acknowledged leftovers are watched before they are purged: long enough for
/// the advisory of any message exhausted before them to be in its stream.
const LEFTOVER_GRACE: Duration = Duration::from_secs(2);

/// Per-queue bookkeeping of the sweeps.
#[derive(Debug, Default)]
pub(crate) struct Upkeep {
    swept_at: Option<Instant>,
    sweeping: bool,
    /// The consumer's ack floor when leftovers were first seen, and when.
    leftovers: Option<(u64, Instant)>,
}

/// The part of a MAX_DELIVERIES advisory a sweep needs.
#[derive(serde::Deserialize)]
struct Advisory {
    stream_seq: u64,
    deliveries: u64,
}

impl NatsTransport {
    /// Starts a sweep of `queue` in the background if none ran in the last
    /// [`SWEEP_EVERY`]; the caller does not wait for it.
    pub(crate) fn sweep_soon(&self, queue: &QueueName) {
        {
            let Ok(mut upkeep) = self.upkeep.lock() else {
                return;
            };
            let u = upkeep.entry(queue.to_string()).or_default();
            if u.sweeping || u.swept_at.is_some_and(|at| at.elapsed() < SWEEP_EVERY) {
                return;
            }
            u.sweeping = true;
        }
        let (this, queue) = (self.clone(), queue.clone());
        tokio::spawn(async move {
            if let Err(e) = this.sweep_exhausted(&queue).await {
                tracing::warn!(%queue, error = %e, "could not move messages that reached max_deliver; trying again later");
            }
        });
    }

    /// Moves every message the advisory stream reports as exhausted to the DLQ stream.
    /// Returns how many were moved.
    pub(crate) async fn sweep_exhausted(&self, queue: &QueueName) -> Result<u64, NatsError> {
        let result = self.sweep(queue).await;
        if let Ok(mut upkeep) = self.upkeep.lock() {
            let u = upkeep.entry(queue.to_string()).or_default();
            u.sweeping = false;
            u.swept_at = Some(Instant::now());
        }
        result
    }

    async fn sweep(&self, queue: &QueueName) -> Result<u64, NatsError> {
        let n = self.ensure_streams(queue.as_str()).await?;
        let advisories = self
            .js()
            .get_stream(&n.exhausted_stream)
            .await
            .map_err(call("open the advisory stream"))?;
        let consumer = durable(
            &advisories,
            "redrive-sweep",
            Duration::from_secs(60),
            "create the advisory consumer",
        )
        .await?;
        let main = self
            .js()
            .get_stream(&n.stream)
            .await
            .map_err(call("open the main stream"))?;
        let mut moved = 0;
        loop {
            let msgs = fetch_batch(&consumer, 100, "read the advisory stream").await?;
            if msgs.is_empty() {
                return Ok(moved);
            }
            for m in msgs {
                match serde_json::from_slice::<Advisory>(&m.payload) {
                    Ok(a) => {
                        if self.move_exhausted(queue, &main, &a).await? {
                            moved += 1;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%queue, error = %e, "skipping an unreadable MAX_DELIVERIES advisory");
                    }
                }
                // The message is in the DLQ stream (or was settled meanwhile): done.
                self.confirm(m.reply.as_ref(), AckKind::Ack, "acknowledge an advisory")
                    .await?;
            }
        }
    }

    /// Publishes the exhausted message to the DLQ stream, then deletes it from main.
    /// `false` when it is no longer in main (acknowledged meanwhile).
    async fn move_exhausted(
        &self,
        queue: &QueueName,
        main: &jetstream::stream::Stream,
        a: &Advisory,
    ) -> Result<bool, NatsError> {
        let raw = match main.get_raw_message(a.stream_seq).await {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(false),
            Err(e) => return Err(call("read a message that reached max_deliver")(e)),
        };
        let payload = raw.payload.clone();
        let now = now_ms();
        let subject_id =
            id_of_subject(&raw.subject, &self.id_prefix(queue.as_str())).and_then(Result::ok);
        // Named as `fetch` named it, so its history is found.
        let read = read_envelope(queue, subject_id, Some(&raw.headers), &payload, || {
            id_in_stream(
                &main.cached_info().config.name,
                created_ms(main),
                a.stream_seq,
            )
        });
        let mut envelope = match read {
            Ok(mut env) => {
                // Its failures so far, as the history bucket has them.
                let id = env.id.to_string();
                let mut settled = 0;
                if let Some(r) = self.record(&id).await? {
                    settled = r.settled();
                    if let Ok(known) = envelope_of(queue, r.h, payload.clone()) {
                        env = known;
                    }
                }
                let unsettled = a.deliveries.saturating_sub(settled).max(1);
                let message = format!(
                    "NATS stopped delivering it after {} deliveries (the consumer's max_deliver); \
                     {unsettled} of them ended without an outcome (consumer crashed, was killed, \
                     or its lease expired)",
                    a.deliveries
                );
                env.record_lost_deliveries(unsettled, &message, now);
                env
            }
            Err(why) => {
                let id = id_in_stream(
                    &main.cached_info().config.name,
                    created_ms(main),
                    a.stream_seq,
                );
                let (wire, _) = wire_of(Some(&raw.headers));
                Envelope::unreadable(queue.clone(), id, payload, wire, &why, "main", now)
            }
        };
        envelope.queue = queue.clone();
        self.publish_dead(&envelope).await?;
        // Only once the DLQ stream has it is it removed from main.
        main.delete_message(a.stream_seq)
            .await
            .map_err(call("delete a message that reached max_deliver"))?;
        if let Err(e) = self.history().delete(envelope.id.to_string()).await {
            tracing::warn!(id = %envelope.id, error = %e, "could not forget a dead message's history");
        }
        tracing::warn!(%queue, id = %envelope.id, deliveries = a.deliveries, "message reached max_deliver: moved to the DLQ stream");
        Ok(true)
    }

    /// Whether acknowledged leftovers below `floor` may be purged now: only once they
    /// were first seen [`LEFTOVER_GRACE`] ago, at a floor at least as high, and after a
    /// sweep has moved every exhausted message announced by then. Returns the floor to
    /// purge below (inclusive).
    pub(crate) async fn leftovers_to_purge(
        &self,
        queue: &QueueName,
        floor: u64,
    ) -> Result<Option<u64>, NatsError> {
        let ready = {
            let Ok(mut upkeep) = self.upkeep.lock() else {
                return Ok(None);
            };
            let u = upkeep.entry(queue.to_string()).or_default();
            match u.leftovers {
                Some((seen, at)) if at.elapsed() >= LEFTOVER_GRACE => {
                    u.leftovers = None;
                    Some(seen.min(floor))
                }
                Some(_) => None,
                None => {
                    u.leftovers = Some((floor, Instant::now()));
                    None
                }
            }
        };
        let Some(purge_below) = ready else {
            return Ok(None);
        };
        self.sweep_exhausted(queue).await?;
        Ok(Some(purge_below))
    }
}
