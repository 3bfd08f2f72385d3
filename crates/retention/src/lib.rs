//! Retention: dead messages stay **hot** (full detail) while younger than `hot`, turn
//! **warm** (payload compressed in the store, still listable and replayable) after that,
//! and are **archived** once older than `warm`: written to one zstd-compressed JSONL file
//! per queue and UTC day, then deleted from the store.
//!
//! Nothing is lost on the way: an archive file is written under a temporary name,
//! fsynced, renamed into place and its directory fsynced — so a file is complete or
//! absent — and only then are its messages deleted. A crash between the rename and the
//! delete leaves the messages in both places; the next sweep sees the complete file,
//! deletes what it holds, and does not write them twice. Import is idempotent on ids.

mod archive;

use std::path::PathBuf;
use std::time::Duration;

use redrive_core::{Cursor, DeadFilter, DeadLetterStore, QueueName, RetentionStore};

pub use archive::{ArchiveRecord, FailPoint, import_file, read_file};

pub use redrive_core::DAY_MS;

/// Retention settings.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Age until which dead messages stay uncompressed.
    pub hot: Duration,
    /// Age until which they stay in the store (compressed); older ones are archived.
    pub warm: Duration,
    /// Where archive files go: `<dir>/<queue>/<YYYY-MM-DD>.jsonl.zst`.
    pub archive_dir: PathBuf,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            hot: Duration::from_secs(7 * 86_400),
            warm: Duration::from_secs(30 * 86_400),
            archive_dir: PathBuf::from("redrive-archive"),
        }
    }
}

/// A retention failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RetentionError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] redrive_core::StoreError),
    /// Writing or reading an archive file failed.
    #[error("archive file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// An archive line is not a dead message.
    #[error("archive file {path}, line {line}: {reason}")]
    Format {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The settings cannot work.
    #[error("invalid retention settings: {0}")]
    Config(String),
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Payloads compressed (hot → warm).
    pub compressed: u64,
    /// Messages archived and deleted from the store (warm → archive).
    pub archived: u64,
    /// Archive files written.
    pub files: Vec<PathBuf>,
    /// Replayed messages' history rows forgotten.
    pub forgotten: u64,
}

/// Runs one retention sweep at `now_ms`.
///
/// # Errors
///
/// Fails when the store or the archive directory fails; what was done before the
/// failure stays done, and nothing is deleted whose archive is not complete.
pub async fn sweep<S: DeadLetterStore + RetentionStore>(
    store: &S,
    retention: &Retention,
    now_ms: i64,
    fail: Option<FailPoint>,
) -> Result<SweepReport, RetentionError> {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    if retention.warm <= retention.hot {
        return Err(RetentionError::Config(format!(
            "warm ({}) must be longer than hot ({}): both are ages, and warm messages are the ones between them",
            redrive_core::format_duration(retention.warm),
            redrive_core::format_duration(retention.hot)
        )));
    }
    let archive_cutoff = now_ms - ms(retention.warm);
    // Days wholly past the warm period are archived below; compress only what stays.
    let first_kept_day = archive_cutoff.div_euclid(DAY_MS) * DAY_MS;
    let compressed = store
        .compress_between(first_kept_day, now_ms - ms(retention.hot))
        .await?;
    let mut report = SweepReport {
        compressed,
        ..SweepReport::default()
    };
    for (queue, day) in store.archivable_days(archive_cutoff).await? {
        let (written, archived) = archive_day(store, retention, &queue, day, fail).await?;
        report.archived += archived;
        report.files.extend(written);
    }
    report.forgotten = store.forget_replayed_before(archive_cutoff).await?;
    Ok(report)
}

/// Archives one queue's dead messages of one UTC day.
async fn archive_day<S: DeadLetterStore + RetentionStore>(
    store: &S,
    retention: &Retention,
    queue: &str,
    day: i64,
    fail: Option<FailPoint>,
) -> Result<(Option<PathBuf>, u64), RetentionError> {
    let queue_name = QueueName::new(queue).map_err(|e| RetentionError::Config(e.to_string()))?;
    let dir = retention.archive_dir.join(queue);
    let date = archive::date_of(day);
    let complete = dir.join(format!("{date}.jsonl.zst"));
    let mut archived = 0;
    // A complete file from an earlier sweep that crashed before deleting: finish that job.
    if complete.exists() {
        let ids: Vec<_> = read_file(&complete)?.into_iter().map(|r| r.id).collect();
        archived += store
            .delete_archived(&ids, &complete.display().to_string())
            .await?;
    }
    let filter = DeadFilter {
        queue: Some(queue_name),
        since_ms: Some(day),
        until_ms: Some(day + DAY_MS),
        ..DeadFilter::default()
    };
    let mut rows = Vec::new();
    let mut cursor: Option<Cursor> = None;
    loop {
        let page = store.list(&filter, cursor.as_ref(), 1000).await?;
        let Some(last) = page.last() else { break };
        cursor = Some(Cursor {
            dead_at_ms: last.dead_at_ms,
            id: last.envelope.id,
        });
        rows.extend(page);
    }
    if rows.is_empty() {
        return Ok((None, archived));
    }
    let target = if complete.exists() {
        dir.join(format!("{date}.{}.jsonl.zst", redrive_core::now_ms()))
    } else {
        complete
    };
    let ids: Vec<_> = rows.iter().map(|d| d.envelope.id).collect();
    let path = target.clone();
    tokio::task::spawn_blocking(move || archive::write_file(&path, &rows, fail))
        .await
        .map_err(|e| RetentionError::Io {
            path: target.display().to_string(),
            source: std::io::Error::other(e),
        })??;
    redrive_core::failpoint("archive-renamed");
    archived += store
        .delete_archived(&ids, &target.display().to_string())
        .await?;
    tracing::info!(file = %target.display(), messages = ids.len(), "archived");
    Ok((Some(target), archived))
}
