//! The `DeadLetterStore` seam: the DLQ of record, where triage, replay and retention
//! happen.

use std::future::Future;

use crate::agent::Cost;
use crate::envelope::{Envelope, MessageId};
use crate::queue::QueueName;

/// A dead-letter store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be opened or reached.
    #[error("dead-letter store at {address} is unavailable: {source}")]
    Unavailable {
        /// Where it was expected (never includes credentials).
        address: String,
        /// The underlying error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Any other store error, with what was being done.
    #[error("{context}: {source}")]
    Backend {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A dead message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message, its last failure at the end of its history.
    pub envelope: Envelope,
    /// When it reached the DLQ (unix ms).
    pub dead_at_ms: i64,
}

/// Which dead messages a listing, replay or purge is about. Empty fields match all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadFilter {
    /// Only this queue.
    pub queue: Option<QueueName>,
    /// Only this fingerprint.
    pub fingerprint: Option<String>,
    /// Only this error class.
    pub error_class: Option<String>,
    /// Dead at or after (unix ms).
    pub since_ms: Option<i64>,
    /// Dead before (unix ms).
    pub until_ms: Option<i64>,
    /// Text contained in the error or the payload.
    pub text: Option<String>,
}

/// A selection of dead messages: explicit ids, or a filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadSelection {
    /// These messages.
    Ids(Vec<MessageId>),
    /// Every message matching the filter.
    Filter(DeadFilter),
}

impl DeadSelection {
    /// How the audit log names this selection.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::Ids(ids) => format!("{} id(s)", ids.len()),
            Self::Filter(f) => {
                let mut parts = Vec::new();
                if let Some(q) = &f.queue {
                    parts.push(format!("queue {q}"));
                }
                if let Some(fp) = &f.fingerprint {
                    parts.push(format!("fingerprint {fp}"));
                }
                if let Some(c) = &f.error_class {
                    parts.push(format!("class {c}"));
                }
                if let Some(t) = &f.text {
                    parts.push(format!("text {t:?}"));
                }
                if let Some(ms) = f.since_ms {
                    parts.push(format!("dead since {ms} (unix ms)"));
                }
                if let Some(ms) = f.until_ms {
                    parts.push(format!("dead before {ms} (unix ms)"));
                }
                if parts.is_empty() {
                    "every dead message".to_owned()
                } else {
                    parts.join(", ")
                }
            }
        }
    }
}

/// How the audit log names the messages of a replay: the id of one, or how many.
#[must_use]
pub fn describe_replayed(ids: &[MessageId]) -> String {
    match ids {
        [one] => one.to_string(),
        many => format!("{} messages", many.len()),
    }
}

/// Dead messages that share a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadGroup {
    /// The shared fingerprint.
    pub fingerprint: String,
    /// The error class of the group.
    pub error_class: String,
    /// How many dead messages it holds.
    pub count: u64,
    /// The earliest and latest failure time (unix ms).
    pub first_seen_ms: i64,
    /// The latest failure time (unix ms).
    pub last_seen_ms: i64,
    /// One error message of the group.
    pub sample_error: String,
    /// Queues the group spans.
    pub queues: Vec<String>,
    /// Failed attempts of its messages, summed.
    pub attempts: u64,
    /// What the failed attempts of its messages cost, summed, as their handlers
    /// reported.
    pub spent: Cost,
}

/// Dead-letter counts of one queue and error class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadStats {
    /// The queue.
    pub queue: String,
    /// The error class.
    pub error_class: String,
    /// Dead now.
    pub dead: u64,
    /// Dead-lettered since the store began (replayed ones included; purged ones not).
    pub total: u64,
    /// When the oldest message still dead reached the DLQ (unix ms).
    pub oldest_dead_at_ms: Option<i64>,
}

/// One entry of the audit log: every replay, edit and purge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// When (unix ms).
    pub at_ms: i64,
    /// Who.
    pub actor: String,
    /// What: `replay`, `purge`.
    pub action: String,
    /// On what.
    pub detail: String,
    /// How many messages.
    pub count: u64,
    /// Why.
    pub reason: String,
}

/// Position after which a listing continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// `dead_at_ms` of the last row seen.
    pub dead_at_ms: i64,
    /// Id of the last row seen.
    pub id: MessageId,
}

/// The DLQ of record.
pub trait DeadLetterStore: Send + Sync + 'static {
    /// Stores a dead message; a second insert of the same id while it is dead does
    /// nothing (returns `false`), so drains may repeat after a crash.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn insert(&self, dead: &DeadLetter) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Stores many dead messages at once (imports, drains); returns how many were new.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn insert_batch(
        &self,
        dead: &[DeadLetter],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Dead messages matching `filter`, oldest first, after `cursor`, at most `limit`.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn list(
        &self,
        filter: &DeadFilter,
        cursor: Option<&Cursor>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, StoreError>> + Send;

    /// Dead messages matching `filter`, grouped by fingerprint, largest group first, at
    /// most `limit` groups.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn groups(
        &self,
        filter: &DeadFilter,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadGroup>, StoreError>> + Send;

    /// How many dead messages match `filter`.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn count(&self, filter: &DeadFilter) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// One dead message.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn get(
        &self,
        id: &MessageId,
    ) -> impl Future<Output = Result<Option<DeadLetter>, StoreError>> + Send;

    /// Marks messages as replayed (they leave the DLQ) and writes an audit entry.
    /// Returns how many were still dead and are now marked.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn mark_replayed(
        &self,
        ids: &[MessageId],
        actor: &str,
        reason: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Deletes the selected dead messages and writes an audit entry. Returns how many.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn purge(
        &self,
        selection: &DeadSelection,
        actor: &str,
        reason: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Counts per queue and error class, for metrics and alerts.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn stats(&self) -> impl Future<Output = Result<Vec<DeadStats>, StoreError>> + Send;

    /// The audit log, newest first, at most `limit` entries.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn audit_log(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<AuditEntry>, StoreError>> + Send;

    /// How many messages are dead, in one queue or all.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn depth(
        &self,
        queue: Option<&QueueName>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}
