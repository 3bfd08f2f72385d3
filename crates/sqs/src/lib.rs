//! The AWS SQS backend.
//!
//! | lane | SQS |
//! |---|---|
//! | main | queue `QUEUE` (each `.` written `-`: `agent.tasks` is `agent-tasks`), tagged `redrive-queue=QUEUE` |
//! | retry tier | the received message hidden for the tier's delay (`ChangeMessageVisibility`); its next receive is its next attempt |
//! | lease | the visibility timeout, extended while a handler runs |
//! | DLQ | queue `QUEUE-dlq`: the main queue's redrive policy (`maxReceiveCount` = max attempts) moves crash-looping messages there; poison and exhausted ones are sent there by redrive; drained into the dead-letter store, deleted only after the store has them |
//!
//! Batch calls throughout: receive 10, delete up to 10 acks per call, send up to 10.
//! Credentials and endpoint come from the standard AWS chain (`AWS_*` environment,
//! profiles, roles); `endpoint=` or `AWS_ENDPOINT_URL` point it at a local server.

mod backend;
mod config;
mod error;
mod metrics;
mod transport;
mod wire;

pub use backend::SqsBackend;
pub use config::SqsConfig;
pub use error::SqsError;
pub use metrics::CallCount;
pub use transport::{SqsTransport, Token};
