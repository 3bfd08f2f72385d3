//! Kafka backend errors, each saying what was being done.

use redrive_core::{StoreError, TransportError};

/// A Kafka backend error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaError {
    /// The `--broker` URL is wrong.
    #[error("--broker: {0}")]
    Config(String),
    /// No broker answered at start.
    #[error("Kafka at {address} is unreachable: {reason}")]
    Unreachable {
        /// The brokers (never the client settings).
        address: String,
        /// Why.
        reason: String,
    },
    /// A Kafka call failed.
    #[error("Kafka: {context}: {reason}")]
    Call {
        /// What was being done.
        context: String,
        /// Why.
        reason: String,
    },
}

impl KafkaError {
    pub(crate) fn call(context: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::Call {
            context: context.into(),
            reason: reason.to_string(),
        }
    }
}

/// `map_err` helper: `.map_err(during("create topics"))`.
pub(crate) fn during<E: std::fmt::Display>(context: &str) -> impl Fn(E) -> KafkaError + '_ {
    move |e| KafkaError::call(context, e)
}

impl From<KafkaError> for TransportError {
    fn from(e: KafkaError) -> Self {
        match e {
            KafkaError::Unreachable { address, reason } => Self::Unavailable {
                backend: "kafka",
                address,
                source: reason.into(),
            },
            other => Self::Backend {
                context: "kafka".into(),
                source: Box::new(other),
            },
        }
    }
}

impl From<KafkaError> for StoreError {
    fn from(e: KafkaError) -> Self {
        Self::Backend {
            context: "kafka".into(),
            source: Box::new(e),
        }
    }
}
