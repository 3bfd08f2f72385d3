//! The retention seam: what a dead-letter store must do so dead messages can go from hot
//! (full detail) to warm (payload compressed, still listable and replayable) to an
//! archive file, without one ever being deleted before its archive is safe on disk.

use std::future::Future;

/// A day in milliseconds: archives cover whole UTC days.
pub const DAY_MS: i64 = 86_400_000;

/// The zstd level of warm payloads: fast, and most of the gain.
pub const WARM_ZSTD_LEVEL: i32 = 3;

use crate::envelope::MessageId;
use crate::store::StoreError;

/// Capability of a [`DeadLetterStore`](crate::DeadLetterStore) that supports retention.
pub trait RetentionStore: Send + Sync {
    /// Compresses the payloads of dead messages that died in `[from_ms, to_ms)` and are
    /// not compressed yet; returns how many were compressed. Reads keep returning the
    /// original bytes.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn compress_between(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// `(queue, day start)` of every UTC day that has dead messages and ended at or
    /// before `cutoff_ms`, oldest first: the days that may be archived whole.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn archivable_days(
        &self,
        cutoff_ms: i64,
    ) -> impl Future<Output = Result<Vec<(String, i64)>, StoreError>> + Send;

    /// Deletes dead messages that are now safely archived, with an audit entry; returns
    /// how many were deleted. Only messages still dead are deleted.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable; then none were deleted.
    fn delete_archived(
        &self,
        ids: &[MessageId],
        archive: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Forgets replayed messages (kept only as history) that died before `cutoff_ms`.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn forget_replayed_before(
        &self,
        cutoff_ms: i64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}
