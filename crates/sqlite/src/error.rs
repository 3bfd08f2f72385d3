//! Errors of the embedded backend, and their mapping onto the core error types.

use std::path::PathBuf;

use redrive_core::{StoreError, TransportError};

/// An error of the embedded backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqliteError {
    /// The store URL is malformed.
    #[error("invalid store URL {url:?}: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The database could not be opened or prepared.
    #[error("cannot open the SQLite store {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
    /// A statement failed.
    #[error("SQLite store: {context}: {source}")]
    Query {
        /// What was being done.
        context: &'static str,
        /// The cause.
        source: rusqlite::Error,
    },
    /// The transaction holding this operation failed to commit.
    #[error("SQLite store: commit failed: {0}")]
    Commit(String),
    /// The writer thread has stopped (it panicked or the store was closed).
    #[error("SQLite store: the writer thread has stopped")]
    WriterGone,
    /// A row could not be read back as a message.
    #[error("SQLite store: message {id} is unreadable: {reason}")]
    Corrupt {
        /// The row's message id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The fencing check failed: the lease was taken over.
    #[error("lease lost for message {0}")]
    LeaseLost(String),
}

impl SqliteError {
    pub(crate) fn query(context: &'static str) -> impl FnOnce(rusqlite::Error) -> Self {
        move |source| Self::Query { context, source }
    }
}

impl From<SqliteError> for TransportError {
    fn from(e: SqliteError) -> Self {
        match e {
            SqliteError::LeaseLost(id) => Self::LeaseLost { id },
            other => Self::Backend {
                context: "embedded store".to_owned(),
                source: Box::new(other),
            },
        }
    }
}

impl From<SqliteError> for StoreError {
    fn from(e: SqliteError) -> Self {
        Self::Backend {
            context: "embedded store".to_owned(),
            source: Box::new(e),
        }
    }
}
