//! The dead-letter store a command runs on: the embedded SQLite file, or PostgreSQL
//! shared by many hosts.

use anyhow::{Context, Result, bail};
use redrive_core::alert::{AlertState, AlertStore, NewNotification, Notification, Transition};
use redrive_core::{
    AuditEntry, Cursor, DeadFilter, DeadGroup, DeadLetter, DeadLetterStore, DeadSelection,
    DeadStats, JobItem, JobState, JobView, MessageId, QueueName, ReplayJob, ReplayJobs,
    ReplayOutcome, RetentionStore, StoreError,
};
use redrive_core::{BreakerBoard, OpenBreaker};
use redrive_postgres::{Postgres, PostgresConfig};
use redrive_sqlite::Sqlite;

/// Where dead letters, alert state and the audit log live.
#[derive(Debug, Clone)]
pub enum AnyStore {
    /// One SQLite file (lanes too, without a broker).
    Sqlite(Sqlite),
    /// A PostgreSQL schema, shared by any number of processes.
    Postgres(Postgres),
}

/// Whether `url` names a PostgreSQL store.
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Checks a store URL without opening it (for `config check`).
///
/// # Errors
///
/// A URL neither backend accepts, with the reason.
pub fn check_url(url: &str) -> Result<()> {
    if is_postgres(url) {
        PostgresConfig::new(url)?;
    } else if url.starts_with("sqlite:") {
        redrive_sqlite::SqliteConfig::from_url(url)?;
    } else {
        bail!(
            "unsupported store {:?}: use sqlite://PATH or postgres://USER@HOST/DATABASE",
            crate::backend::without_secrets(url)
        );
    }
    Ok(())
}

/// Opens `--store`: SQLite (see [`crate::backend::open`] for `create`) or PostgreSQL,
/// whose schema is created and migrated when needed.
///
/// # Errors
///
/// A URL that does not parse, or a store that cannot be opened or reached.
pub async fn open(url: &str, create: bool) -> Result<AnyStore> {
    if is_postgres(url) {
        let config = PostgresConfig::new(url)?;
        let store = config
            .open()
            .await
            .with_context(|| format!("opening --store {}", config.display()))?;
        return Ok(AnyStore::Postgres(store));
    }
    Ok(AnyStore::Sqlite(crate::backend::open(url, create)?))
}

impl AnyStore {
    /// Flushes and closes what needs it (SQLite's writer) before the process exits.
    pub fn close(&self) {
        if let Self::Sqlite(s) = self {
            s.close();
        }
    }
}

macro_rules! each_store {
    ($self:expr, |$s:ident| $call:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $call,
            AnyStore::Postgres($s) => $call,
        }
    };
}

impl BreakerBoard for AnyStore {
    async fn report_breaker(
        &self,
        queue: &str,
        consumer: &str,
        open: Option<(i64, i64)>,
    ) -> Result<(), StoreError> {
        each_store!(self, |s| s.report_breaker(queue, consumer, open).await)
    }
    async fn open_breakers(&self, now_ms: i64) -> Result<Vec<OpenBreaker>, StoreError> {
        each_store!(self, |s| s.open_breakers(now_ms).await)
    }
}

impl ReplayJobs for AnyStore {
    async fn create_job(&self, job: &ReplayJob, items: &[JobItem]) -> Result<(), StoreError> {
        each_store!(self, |s| s.create_job(job, items).await)
    }
    async fn update_job(&self, job: &ReplayJob) -> Result<(), StoreError> {
        each_store!(self, |s| s.update_job(job).await)
    }
    async fn set_job_state(
        &self,
        id: &str,
        from: &[JobState],
        to: JobState,
        note: &str,
    ) -> Result<bool, StoreError> {
        each_store!(self, |s| s.set_job_state(id, from, to, note).await)
    }
    async fn claim_job(&self, id: &str, owner: &str, until_ms: i64) -> Result<bool, StoreError> {
        each_store!(self, |s| s.claim_job(id, owner, until_ms).await)
    }
    async fn jobs(&self, id: Option<&str>, limit: usize) -> Result<Vec<JobView>, StoreError> {
        each_store!(self, |s| s.jobs(id, limit).await)
    }
    async fn job_items(
        &self,
        id: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<JobItem>, StoreError> {
        each_store!(self, |s| s.job_items(id, after, limit).await)
    }
    async fn update_job_items(&self, id: &str, items: &[JobItem]) -> Result<(), StoreError> {
        each_store!(self, |s| s.update_job_items(id, items).await)
    }
    async fn record_replay_outcomes(&self, outcomes: &[ReplayOutcome]) -> Result<(), StoreError> {
        each_store!(self, |s| s.record_replay_outcomes(outcomes).await)
    }
    async fn replays_of(&self, id: &MessageId) -> Result<Vec<(ReplayJob, JobItem)>, StoreError> {
        each_store!(self, |s| s.replays_of(id).await)
    }
}

impl DeadLetterStore for AnyStore {
    async fn insert(&self, dead: &DeadLetter) -> Result<bool, StoreError> {
        each_store!(self, |s| s.insert(dead).await)
    }
    async fn insert_batch(&self, dead: &[DeadLetter]) -> Result<u64, StoreError> {
        each_store!(self, |s| s.insert_batch(dead).await)
    }
    async fn list(
        &self,
        filter: &DeadFilter,
        cursor: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        each_store!(self, |s| s.list(filter, cursor, limit).await)
    }
    async fn groups(
        &self,
        filter: &DeadFilter,
        limit: usize,
    ) -> Result<Vec<DeadGroup>, StoreError> {
        each_store!(self, |s| s.groups(filter, limit).await)
    }
    async fn count(&self, filter: &DeadFilter) -> Result<u64, StoreError> {
        each_store!(self, |s| s.count(filter).await)
    }
    async fn get(&self, id: &MessageId) -> Result<Option<DeadLetter>, StoreError> {
        each_store!(self, |s| s.get(id).await)
    }
    async fn mark_replayed(
        &self,
        ids: &[MessageId],
        actor: &str,
        reason: &str,
    ) -> Result<u64, StoreError> {
        each_store!(self, |s| s.mark_replayed(ids, actor, reason).await)
    }
    async fn purge(
        &self,
        selection: &DeadSelection,
        actor: &str,
        reason: &str,
    ) -> Result<u64, StoreError> {
        each_store!(self, |s| s.purge(selection, actor, reason).await)
    }
    async fn stats(&self) -> Result<Vec<DeadStats>, StoreError> {
        each_store!(self, |s| s.stats().await)
    }
    async fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        each_store!(self, |s| s.audit_log(limit).await)
    }
    async fn depth(&self, queue: Option<&QueueName>) -> Result<u64, StoreError> {
        each_store!(self, |s| s.depth(queue).await)
    }
}

impl AlertStore for AnyStore {
    async fn open_alerts(&self) -> Result<Vec<AlertState>, StoreError> {
        each_store!(self, |s| s.open_alerts().await)
    }
    async fn past_alerts(&self, limit: usize) -> Result<Vec<AlertState>, StoreError> {
        each_store!(self, |s| s.past_alerts(limit).await)
    }
    async fn apply_transitions(
        &self,
        transitions: Vec<Transition>,
        notifications: Vec<NewNotification>,
    ) -> Result<(), StoreError> {
        each_store!(self, |s| s
            .apply_transitions(transitions, notifications)
            .await)
    }
    async fn due_notifications(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Notification>, StoreError> {
        each_store!(self, |s| s.due_notifications(now_ms, limit).await)
    }
    async fn record_delivery(
        &self,
        id: i64,
        result: Result<i64, (String, Option<i64>)>,
    ) -> Result<(), StoreError> {
        each_store!(self, |s| s.record_delivery(id, result).await)
    }
    async fn recent_notifications(&self, limit: usize) -> Result<Vec<Notification>, StoreError> {
        each_store!(self, |s| s.recent_notifications(limit).await)
    }
    async fn lead(
        &self,
        role: &str,
        holder: &str,
        now_ms: i64,
        for_ms: i64,
    ) -> Result<bool, StoreError> {
        each_store!(self, |s| s.lead(role, holder, now_ms, for_ms).await)
    }
}

impl RetentionStore for AnyStore {
    async fn compress_between(&self, from_ms: i64, to_ms: i64) -> Result<u64, StoreError> {
        each_store!(self, |s| s.compress_between(from_ms, to_ms).await)
    }
    async fn archivable_days(&self, cutoff_ms: i64) -> Result<Vec<(String, i64)>, StoreError> {
        each_store!(self, |s| s.archivable_days(cutoff_ms).await)
    }
    async fn delete_archived(&self, ids: &[MessageId], archive: &str) -> Result<u64, StoreError> {
        each_store!(self, |s| s.delete_archived(ids, archive).await)
    }
    async fn forget_replayed_before(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        each_store!(self, |s| s.forget_replayed_before(cutoff_ms).await)
    }
}
