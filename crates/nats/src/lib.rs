//! The NATS JetStream backend.
//!
//! | lane | JetStream |
//! |---|---|
//! | main | stream `<ns>_<queue>` (work-queue retention) on subject `<ns>.<queue>`, durable pull consumer `redrive`, explicit acks |
//! | retry tier | the same message, `Nak` with the tier's delay; its failure history is kept in the KV bucket `<ns>_history` until it is settled |
//! | lease | the consumer's ack wait (set from the first consumer's lease), extended with in-progress acks while a handler runs |
//! | DLQ | stream `<ns>_<queue>_dlq`, drained into the dead-letter store, acked only after the store has it |
//!
//! JetStream keeps a delivery count but not why a delivery ended, so the history bucket
//! records each failure and each release: a redelivery with more deliveries than
//! recorded outcomes followed a crash, and counts as a failed attempt. `max_deliver` is
//! a backstop above max attempts. Every delay is an explicit `Nak` delay: the
//! consumer's own backoff (ignored by `Nak` without a delay) is not used.

mod backend;
mod transport;

pub use backend::NatsBackend;
pub use transport::{NatsConfig, NatsError, NatsTransport, Token};
