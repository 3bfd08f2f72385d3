//! The Kafka backend.
//!
//! | lane | Kafka |
//! |---|---|
//! | main | topic `QUEUE`, read by the consumer group `<group>.QUEUE` |
//! | retry tier | topic `QUEUE.retry.<tier>`, read by the same group; a partition whose next record is not due is paused at that record until it is |
//! | lease | the group membership; leases handed to handlers are recorded in the group `<group>.QUEUE.leased`, so a member's crash is counted |
//! | DLQ | topic `QUEUE.dlq`, drained into the dead-letter store, committed (group `<group>.drain`) only after the store has it |
//!
//! A failed record is produced to its next lane with its key and headers, and its
//! source offset is committed only after that produce is acknowledged; offsets are
//! committed in batches. Retries leave the partition, so they break per-key order (see
//! ARCHITECTURE.md).

mod backend;
mod config;
mod consumer;
mod error;
mod slots;
#[cfg(feature = "test-util")]
pub mod testing;
mod transport;
mod wire;

pub use backend::KafkaBackend;
pub use config::KafkaConfig;
pub use error::KafkaError;
pub use transport::{FETCH_SETTINGS, KafkaTransport, Token};
