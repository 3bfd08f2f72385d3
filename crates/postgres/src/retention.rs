//! The PostgreSQL [`RetentionStore`]: warm messages get their payloads compressed in
//! place; archived ones are deleted only after the archive file is on disk.

use redrive_core::{DAY_MS, MessageId, RetentionStore, StoreError, WARM_ZSTD_LEVEL, now_ms};

use crate::db::Postgres;
use crate::error::PgError;

/// Rows compressed per transaction.
const COMPRESS_BATCH: i64 = 500;

impl RetentionStore for Postgres {
    async fn compress_between(&self, from_ms: i64, to_ms: i64) -> Result<u64, StoreError> {
        let mut total = 0u64;
        // Walk the time index once with a cursor, so each row is visited once.
        let mut cursor: (i64, String) = (from_ms - 1, String::new());
        loop {
            let rows = self
                .client()
                .await?
                .query(
                    "SELECT id, dead_at_ms, payload FROM dead_letters
                     WHERE NOT replayed AND NOT compressed AND dead_at_ms < $1 AND (dead_at_ms, id) > ($2, $3)
                     ORDER BY dead_at_ms, id LIMIT $4",
                    &[&to_ms, &cursor.0, &cursor.1, &COMPRESS_BATCH],
                )
                .await
                .map_err(PgError::query("read warm payloads"))?;
            let Some(last) = rows.last() else {
                return Ok(total);
            };
            cursor = (last.get(1), last.get(0));
            let rows: Vec<(String, Vec<u8>)> = rows.iter().map(|r| (r.get(0), r.get(2))).collect();
            // Compressed off the async threads.
            let compressed = tokio::task::spawn_blocking(move || {
                rows.into_iter()
                    .map(|(id, payload)| {
                        zstd::encode_all(payload.as_slice(), WARM_ZSTD_LEVEL).map(|c| (id, c))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .map_err(|e| PgError::Corrupt {
                id: "(batch)".into(),
                reason: format!("compression task failed: {e}"),
            })?
            .map_err(|e| PgError::Corrupt {
                id: "(batch)".into(),
                reason: format!("compression failed: {e}"),
            })?;
            let mut client = self.client().await?;
            let tx = client
                .transaction()
                .await
                .map_err(PgError::query("begin compression"))?;
            let statement = tx
                .prepare("UPDATE dead_letters SET payload = $2, compressed = true WHERE id = $1 AND NOT compressed")
                .await
                .map_err(PgError::query("prepare compression"))?;
            for (id, payload) in &compressed {
                total += tx
                    .execute(&statement, &[id, payload])
                    .await
                    .map_err(PgError::query("compress payload"))?;
            }
            tx.commit()
                .await
                .map_err(PgError::query("commit compression"))?;
        }
    }

    async fn archivable_days(&self, cutoff_ms: i64) -> Result<Vec<(String, i64)>, StoreError> {
        // Whole days only: a day is archived once its last millisecond is past the cutoff.
        let last_day_start = cutoff_ms.div_euclid(DAY_MS) * DAY_MS;
        let rows = self
            .client()
            .await?
            .query(
                "SELECT DISTINCT queue, (dead_at_ms / 86400000) * 86400000 AS day FROM dead_letters
                 WHERE NOT replayed AND dead_at_ms < $1 ORDER BY day, queue",
                &[&last_day_start],
            )
            .await
            .map_err(PgError::query("list archivable days"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn delete_archived(&self, ids: &[MessageId], archive: &str) -> Result<u64, StoreError> {
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(PgError::query("begin archive delete"))?;
        let n = tx
            .execute(
                "DELETE FROM dead_letters WHERE id = ANY($1) AND NOT replayed",
                &[&ids],
            )
            .await
            .map_err(PgError::query("delete archived"))?;
        tx.execute(
            "INSERT INTO audit (at_ms, actor, action, detail, count, reason)
             VALUES ($1, 'retention', 'archive', $2, $3, 'older than the warm period')",
            &[
                &now_ms(),
                &crate::store::text(archive),
                &i64::try_from(n).unwrap_or(i64::MAX),
            ],
        )
        .await
        .map_err(PgError::query("write audit log"))?;
        tx.commit()
            .await
            .map_err(PgError::query("commit archive delete"))?;
        Ok(n)
    }

    async fn forget_replayed_before(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        Ok(self
            .client()
            .await?
            .execute(
                "DELETE FROM dead_letters WHERE replayed AND dead_at_ms < $1",
                &[&cutoff_ms],
            )
            .await
            .map_err(PgError::query("forget replayed"))?)
    }
}
