//! Errors of the PostgreSQL store, and their mapping onto the core error type.

use redrive_core::{StoreError, TransportError};

/// An error of the PostgreSQL store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The URL is malformed (shown without its password).
    #[error("invalid store URL {url}: {reason}")]
    Url {
        /// The URL given, without its password.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server could not be reached or refused the connection.
    #[error("PostgreSQL store at {address} is unavailable: {reason}")]
    Unavailable {
        /// Where, without the password.
        address: String,
        /// The cause.
        reason: String,
    },
    /// TLS could not be set up as the URL asks (a root certificate file that does not
    /// read, no trusted roots).
    #[error("PostgreSQL TLS: {0}")]
    Tls(String),
    /// The schema was written by a newer redrive.
    #[error(
        "the PostgreSQL schema {schema} is at version {found}, newer than this redrive \
         knows ({known}): upgrade redrive, or point it at another schema (?schema=NAME)"
    )]
    TooNew {
        /// The schema.
        schema: String,
        /// The version found.
        found: i32,
        /// The newest this build knows.
        known: i32,
    },
    /// A statement failed (with the server's message: the driver's own text for it is
    /// only "db error").
    #[error("PostgreSQL store: {context}: {}", crate::db::with_causes(source))]
    Query {
        /// What was being done.
        context: &'static str,
        /// The cause.
        source: tokio_postgres::Error,
    },
    /// A delivery's lease was lost: it ran out and the message was leased again.
    #[error("lease lost for message {0}")]
    LeaseLost(String),
    /// A row could not be read back as a message.
    #[error("PostgreSQL store: message {id} is unreadable: {reason}")]
    Corrupt {
        /// The row's message id.
        id: String,
        /// What is wrong.
        reason: String,
    },
}

impl PgError {
    pub(crate) fn query(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Self {
        move |source| Self::Query { context, source }
    }
}

impl From<PgError> for StoreError {
    fn from(e: PgError) -> Self {
        match e {
            PgError::Unavailable { address, reason } => Self::Unavailable {
                address,
                source: reason.into(),
            },
            other => Self::Backend {
                context: "dead-letter store".to_owned(),
                source: Box::new(other),
            },
        }
    }
}

impl From<PgError> for TransportError {
    fn from(e: PgError) -> Self {
        match e {
            PgError::Unavailable { address, reason } => Self::Unavailable {
                backend: "postgres",
                address,
                source: reason.into(),
            },
            PgError::LeaseLost(id) => Self::LeaseLost { id },
            PgError::Query { context, source } if source.is_closed() => Self::Unavailable {
                backend: "postgres",
                address: context.to_owned(),
                source: Box::new(source),
            },
            other => Self::Backend {
                context: "PostgreSQL lanes".to_owned(),
                source: Box::new(other),
            },
        }
    }
}
