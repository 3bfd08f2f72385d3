//! The PostgreSQL dead-letter store: one store of record for any number of `serve`
//! processes on any hosts.
//!
//! [`PostgresConfig::open`] connects, creates the schema (`?schema=NAME`, default
//! `redrive`) and migrates it to this build's [`SCHEMA_VERSION`], refusing a schema a
//! newer redrive wrote. [`Postgres`] implements
//! [`DeadLetterStore`](redrive_core::DeadLetterStore): inserts are idempotent by
//! message id, so two processes draining the same broker store each dead message once.

mod acks;
mod alerts;
mod config;
mod db;
mod error;
mod jobs;
mod retention;
mod store;
#[cfg(feature = "test-util")]
pub mod testing;
mod tls;
mod transport;
mod wake;

pub use config::{PostgresConfig, without_password};
pub use db::{Postgres, SCHEMA_VERSION};
pub use error::PgError;
pub use tls::SslMode;
pub use transport::Token;
