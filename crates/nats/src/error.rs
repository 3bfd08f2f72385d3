//! What can go wrong talking to NATS, and how it reads as a transport or store error.

use redrive_core::TransportError;

/// A JetStream backend error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// NATS could not be reached at start.
    #[error("NATS at {address} is unreachable: {reason}")]
    Unreachable {
        /// Where.
        address: String,
        /// Why.
        reason: String,
    },
    /// A JetStream call failed.
    #[error("NATS JetStream: {context}: {reason}")]
    Call {
        /// What was being done.
        context: &'static str,
        /// Why.
        reason: String,
    },
    /// A message is not a redrive message.
    #[error("NATS JetStream: message {seq} of {stream} is not a redrive message: {reason}")]
    Malformed {
        /// Stream.
        stream: String,
        /// Stream sequence.
        seq: u64,
        /// Why.
        reason: String,
    },
}

impl From<NatsError> for TransportError {
    fn from(e: NatsError) -> Self {
        match e {
            NatsError::Unreachable { address, reason } => Self::Unavailable {
                backend: "nats",
                address,
                source: reason.into(),
            },
            other => Self::Backend {
                context: "nats".into(),
                source: Box::new(other),
            },
        }
    }
}

impl From<NatsError> for redrive_core::StoreError {
    fn from(e: NatsError) -> Self {
        Self::Backend {
            context: "nats".into(),
            source: Box::new(e),
        }
    }
}

pub(crate) fn call<E: std::fmt::Display>(context: &'static str) -> impl Fn(E) -> NatsError {
    move |e| NatsError::Call {
        context,
        reason: e.to_string(),
    }
}
