//! The Redis backend: redrive's lanes on the Redis a team already runs.
//!
//! | lane | Redis |
//! |---|---|
//! | main | stream `redrive:{QUEUE}:main`, consumer group `redrive` |
//! | retry tier | sorted set `redrive:{QUEUE}:retry:<tier>` (score = due time) of message hashes, promoted into main by a Lua script when due |
//! | lease | the pending entry's idle time; heartbeats reset it; `XAUTOCLAIM` reclaims a crashed consumer's entries, counted as attempts |
//! | DLQ | stream `redrive:{QUEUE}:dlq`, drained into the dead-letter store (acknowledged in Redis only after the store has it) |
//!
//! Every settle (ack, retry, dead-letter, release, lease extension) is one Lua script
//! that first checks the entry is still pending for this consumer, so a consumer whose
//! lease was taken over cannot settle a message twice, and no message can be both
//! moved and lost. The `{QUEUE}` hash tag keeps a queue's keys in one cluster slot.
//!
//! [`RedisBackend`] pairs the transport with a dead-letter store (SQLite by default) and
//! implements `Transport`, `LaneStats` and `DeadLetterStore`.

mod backend;
mod config;
mod error;
mod scripts;
mod transport;
mod wire;

pub use backend::RedisBackend;
pub use config::RedisConfig;
pub use error::RedisError;
pub use transport::{RedisTransport, Token};
