//! Errors of the Redis backend.

use redrive_core::{StoreError, TransportError};

/// A Redis backend error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisError {
    /// Redis could not be reached at start.
    #[error("Redis at {address} is unreachable: {reason}")]
    Unreachable {
        /// The address (no credentials).
        address: String,
        /// Why.
        reason: String,
    },
    /// A command failed.
    #[error("Redis at {address}: {context}: {source}")]
    Command {
        /// The address.
        address: String,
        /// What was being done.
        context: &'static str,
        /// The cause.
        source: redis::RedisError,
    },
    /// A stream entry is not a redrive message.
    #[error("Redis: entry {id} of {key} is not a redrive message: {reason}")]
    Malformed {
        /// Stream key.
        key: String,
        /// Entry id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The lease was taken over.
    #[error("lease lost for message {0}")]
    LeaseLost(String),
}

impl From<RedisError> for TransportError {
    fn from(e: RedisError) -> Self {
        match e {
            RedisError::LeaseLost(id) => Self::LeaseLost { id },
            RedisError::Unreachable { address, reason } => Self::Unavailable {
                backend: "redis",
                address,
                source: reason.into(),
            },
            other => Self::Backend {
                context: "redis".to_owned(),
                source: Box::new(other),
            },
        }
    }
}

impl From<RedisError> for StoreError {
    fn from(e: RedisError) -> Self {
        Self::Backend {
            context: "redis".to_owned(),
            source: Box::new(e),
        }
    }
}
