//! The NATS JetStream backend.
//!
//! | lane | JetStream |
//! |---|---|
//! | main | stream `<ns>_<queue>` (work-queue retention) on subject `<ns>.<queue>` (and `<ns>-id.<queue>.*` with `ids=subject`), durable pull consumer `redrive`, explicit acks |
//! | retry tier | the same message, `Nak` with the tier's delay; its failure history is kept in the KV bucket `<ns>_history` until it is settled |
//! | lease | the consumer's ack wait (set from the first consumer's lease), extended with in-progress acks while a handler runs |
//! | DLQ | stream `<ns>_<queue>_dlq`, drained into the dead-letter store, acked only after the store has it |
//!
//! JetStream keeps a delivery count but not why a delivery ended, so the history bucket
//! records each failure and each release: a redelivery with more deliveries than
//! recorded outcomes followed a crash, and counts as a failed attempt. `max_deliver` is
//! a backstop above max attempts: a message that reaches it anyway (its consumer died
//! before it could settle even the delivery that revealed the crash) is announced in a
//! MAX_DELIVERIES advisory, kept by the stream `<ns>_<queue>_exhausted`, and moved to the
//! DLQ stream from there (see `exhausted`). Every delay is an explicit `Nak` delay: the
//! consumer's own backoff (ignored by `Nak` without a delay) is not used.

mod backend;
mod config;
mod error;
mod exhausted;
mod transport;
mod wire;

pub use backend::NatsBackend;
pub use config::{IdPlacement, NatsConfig};
pub use error::NatsError;
pub use transport::{NatsTransport, Token};
