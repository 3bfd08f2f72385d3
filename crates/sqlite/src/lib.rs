//! The embedded redrive backend: every lane, every lease and the dead-letter store in one
//! SQLite file (WAL mode), with group commit so durability does not cost one fsync per
//! message.
//!
//! [`Sqlite`] implements [`Transport`](redrive_core::Transport),
//! [`LaneStats`](redrive_core::LaneStats) and
//! [`DeadLetterStore`](redrive_core::DeadLetterStore),
//! [`AlertStore`](redrive_core::alert::AlertStore) and
//! [`RetentionStore`](redrive_core::RetentionStore).

mod alerts;
mod config;
mod db;
mod error;
mod jobs;
mod retention;
mod store;
mod transport;

pub use config::{Durability, SqliteConfig};
pub use db::Sqlite;
pub use error::SqliteError;
pub use transport::Token;
