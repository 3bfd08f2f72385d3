//! The embedded [`RetentionStore`]: warm messages get their payloads compressed in
//! place; archived ones are deleted only after the archive file is on disk.

use redrive_core::{DAY_MS, MessageId, RetentionStore, StoreError, WARM_ZSTD_LEVEL, now_ms};
use rusqlite::params;

use crate::db::Sqlite;
use crate::error::SqliteError;

/// Rows compressed per write transaction.
const COMPRESS_BATCH: i64 = 500;

impl RetentionStore for Sqlite {
    async fn compress_between(&self, from_ms: i64, to_ms: i64) -> Result<u64, StoreError> {
        let mut total = 0u64;
        // Walk the time index once with a cursor, so each row is visited once.
        let mut cursor: (i64, String) = (from_ms - 1, String::new());
        loop {
            let after = cursor.clone();
            let rows: Vec<(String, i64, bool, Vec<u8>)> = self
                .read(move |conn| {
                    conn.prepare_cached(
                        "SELECT id, dead_at_ms, compressed, payload FROM dead_letters
                         WHERE replayed = 0 AND dead_at_ms < ?1 AND (dead_at_ms, id) > (?2, ?3)
                         ORDER BY dead_at_ms, id LIMIT ?4",
                    )
                    .and_then(|mut s| {
                        s.query_map(params![to_ms, after.0, after.1, COMPRESS_BATCH], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                        })?
                        .collect()
                    })
                    .map_err(SqliteError::query("read warm payloads"))
                })
                .await?;
            let Some(last) = rows.last() else {
                return Ok(total);
            };
            cursor = (last.1, last.0.clone());
            let rows: Vec<(String, Vec<u8>)> = rows
                .into_iter()
                .filter(|r| !r.2)
                .map(|r| (r.0, r.3))
                .collect();
            if rows.is_empty() {
                continue;
            }
            // Compress off the async threads and off the writer thread.
            let compressed = tokio::task::spawn_blocking(move || {
                rows.into_iter()
                    .map(|(id, payload)| {
                        zstd::encode_all(payload.as_slice(), WARM_ZSTD_LEVEL).map(|c| (id, c))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .map_err(|e| SqliteError::Commit(format!("compression task failed: {e}")))?
            .map_err(|e| SqliteError::Commit(format!("compression failed: {e}")))?;
            let n = self
                .write(move |conn| {
                    let mut stmt = conn
                        .prepare_cached("UPDATE dead_letters SET payload = ?2, compressed = 1 WHERE id = ?1 AND compressed = 0")
                        .map_err(SqliteError::query("prepare compression"))?;
                    let mut n = 0u64;
                    for (id, payload) in &compressed {
                        n += stmt.execute(params![id, payload]).map_err(SqliteError::query("compress payload"))? as u64;
                    }
                    Ok(n)
                })
                .await?;
            total += n;
        }
    }

    async fn archivable_days(&self, cutoff_ms: i64) -> Result<Vec<(String, i64)>, StoreError> {
        // Whole days only: a day is archived once its last millisecond is past the cutoff.
        let last_day_start = cutoff_ms.div_euclid(DAY_MS) * DAY_MS;
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT DISTINCT queue, (dead_at_ms / 86400000) * 86400000 AS day FROM dead_letters
                 WHERE replayed = 0 AND dead_at_ms < ?1 ORDER BY day, queue",
            )
            .and_then(|mut s| {
                s.query_map([last_day_start], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect()
            })
            .map_err(SqliteError::query("list archivable days"))
        })
        .await
        .map_err(Into::into)
    }

    async fn delete_archived(&self, ids: &[MessageId], archive: &str) -> Result<u64, StoreError> {
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let archive = archive.to_owned();
        self.write(move |conn| {
            let mut stmt = conn
                .prepare_cached("DELETE FROM dead_letters WHERE id = ?1 AND replayed = 0")
                .map_err(SqliteError::query("prepare archive delete"))?;
            let mut n = 0u64;
            for id in &ids {
                n += stmt.execute([id]).map_err(SqliteError::query("delete archived"))? as u64;
            }
            conn.execute(
                "INSERT INTO audit (at_ms, actor, action, detail, count, reason) VALUES (?1, 'retention', 'archive', ?2, ?3, 'older than the warm period')",
                params![now_ms(), archive, n],
            )
            .map_err(SqliteError::query("write audit log"))?;
            Ok(n)
        })
        .await
        .map_err(Into::into)
    }

    async fn forget_replayed_before(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        self.write(move |conn| {
            conn.execute(
                "DELETE FROM dead_letters WHERE replayed = 1 AND dead_at_ms < ?1",
                [cutoff_ms],
            )
            .map(|n| n as u64)
            .map_err(SqliteError::query("forget replayed"))
        })
        .await
        .map_err(Into::into)
    }
}
