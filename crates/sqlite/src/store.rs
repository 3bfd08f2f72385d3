//! The embedded [`DeadLetterStore`]: the `dead_letters` table, written by the transport
//! when a message dies and by ingesters, read by the CLI and the triage UI.

use redrive_core::{
    AuditEntry, Cost, Cursor, DeadFilter, DeadGroup, DeadLetter, DeadLetterStore, DeadSelection,
    DeadStats, MessageId, QueueName, StoreError, describe_replayed, now_ms,
};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};

use crate::db::Sqlite;
use crate::error::SqliteError;
use crate::transport::{envelope_from_row, insert_dead};

/// Appends the filter's conditions to `sql` (which already has a WHERE clause).
fn push_filter(filter: &DeadFilter, sql: &mut String, args: &mut Vec<Value>) {
    if let Some(q) = &filter.queue {
        sql.push_str(" AND queue = ?");
        args.push(Value::Text(q.to_string()));
    }
    if let Some(fp) = &filter.fingerprint {
        sql.push_str(" AND fingerprint = ?");
        args.push(Value::Text(fp.clone()));
    }
    if let Some(class) = &filter.error_class {
        sql.push_str(" AND error_class = ?");
        args.push(Value::Text(class.clone()));
    }
    if let Some(since) = filter.since_ms {
        sql.push_str(" AND dead_at_ms >= ?");
        args.push(Value::Integer(since));
    }
    if let Some(until) = filter.until_ms {
        sql.push_str(" AND dead_at_ms < ?");
        args.push(Value::Integer(until));
    }
    if let Some(text) = &filter.text {
        if text.chars().count() >= 3 && !text.contains('\0') {
            // The trigram index finds the rows holding the text; the exact check stays
            // for the uncompressed ones (a compressed payload is matched by the index).
            sql.push_str(
                " AND dead_letters.rowid IN (SELECT rowid FROM dead_text WHERE dead_text MATCH ?)
                  AND (compressed = 1 OR instr(error, ?) > 0 OR instr(payload, CAST(? AS BLOB)) > 0)",
            );
            args.push(Value::Text(fts_phrase(text)));
        } else {
            // Under 3 characters a trigram index cannot answer (nor, with a NUL, a query
            // string): every row is read.
            sql.push_str(" AND (instr(error, ?) > 0 OR instr(payload, CAST(? AS BLOB)) > 0)");
        }
        args.push(Value::Text(text.clone()));
        args.push(Value::Text(text.clone()));
    }
}

/// `text` as one FTS5 phrase: quoted, its quotes doubled, so no character of it is
/// query syntax.
fn fts_phrase(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\""))
}

/// The columns every dead-letter read selects, in this order.
const DEAD_COLUMNS: &str = "queue, dead_at_ms, key, payload, headers, compressed";

type DeadRow = (String, i64, Option<String>, Vec<u8>, String, bool);

fn dead_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn to_dead(row: DeadRow) -> Result<DeadLetter, SqliteError> {
    let (queue, dead_at_ms, key, payload, headers, compressed) = row;
    let payload = if compressed {
        zstd::decode_all(payload.as_slice()).map_err(|e| SqliteError::Corrupt {
            id: format!("in queue {queue}"),
            reason: format!("compressed payload: {e}"),
        })?
    } else {
        payload
    };
    Ok(DeadLetter {
        envelope: envelope_from_row(&queue, key, payload, &headers)?,
        dead_at_ms,
    })
}

fn audit(
    conn: &Connection,
    actor: &str,
    action: &str,
    detail: &str,
    count: u64,
    reason: &str,
) -> Result<(), SqliteError> {
    conn.prepare_cached(
        "INSERT INTO audit (at_ms, actor, action, detail, count, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut s| s.execute(params![now_ms(), actor, action, detail, count, reason]))
    .map_err(SqliteError::query("write audit log"))?;
    Ok(())
}

impl DeadLetterStore for Sqlite {
    async fn insert(&self, dead: &DeadLetter) -> Result<bool, StoreError> {
        let dead = dead.clone();
        self.write(move |conn| insert_dead(conn, &dead.envelope, dead.dead_at_ms))
            .await
            .map_err(Into::into)
    }

    async fn insert_batch(&self, dead: &[DeadLetter]) -> Result<u64, StoreError> {
        let dead = dead.to_vec();
        self.write(move |conn| {
            let mut n = 0u64;
            for d in &dead {
                n += u64::from(insert_dead(conn, &d.envelope, d.dead_at_ms)?);
            }
            Ok(n)
        })
        .await
        .map_err(Into::into)
    }

    async fn list(
        &self,
        filter: &DeadFilter,
        cursor: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let filter = filter.clone();
        let cursor = cursor.cloned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let mut sql = format!("SELECT {DEAD_COLUMNS} FROM dead_letters WHERE replayed = 0");
            let mut args = Vec::new();
            push_filter(&filter, &mut sql, &mut args);
            if let Some(c) = cursor {
                sql.push_str(" AND (dead_at_ms, id) > (?, ?)");
                args.push(Value::Integer(c.dead_at_ms));
                args.push(Value::Text(c.id.to_string()));
            }
            sql.push_str(" ORDER BY dead_at_ms, id LIMIT ?");
            args.push(Value::Integer(limit));
            let rows: Vec<_> = conn
                .prepare_cached(&sql)
                .and_then(|mut s| {
                    s.query_map(params_from_iter(args), dead_from_row)?
                        .collect()
                })
                .map_err(SqliteError::query("list dead letters"))?;
            rows.into_iter().map(to_dead).collect()
        })
        .await
        .map_err(Into::into)
    }

    async fn groups(
        &self,
        filter: &DeadFilter,
        limit: usize,
    ) -> Result<Vec<DeadGroup>, StoreError> {
        let filter = filter.clone();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            // Filters the summary table can answer go there; time and text filters need
            // the messages themselves.
            let summary = filter.since_ms.is_none() && filter.until_ms.is_none() && filter.text.is_none();
            let mut args = Vec::new();
            let mut sql = if summary {
                let mut sql = "SELECT fingerprint, max(error_class), sum(dead), min(first_seen_ms), max(last_seen_ms),
                                      max(sample_error), group_concat(queue),
                                      sum(attempts), sum(input_tokens), sum(output_tokens), sum(cost_micros)
                               FROM dead_groups WHERE dead > 0"
                    .to_owned();
                push_filter(&DeadFilter { since_ms: None, until_ms: None, text: None, ..filter.clone() }, &mut sql, &mut args);
                sql
            } else {
                let mut sql = "SELECT fingerprint, error_class, count(*), min(coalesce(first_failed_ms, dead_at_ms)),
                                      max(coalesce(last_failed_ms, dead_at_ms)), error, group_concat(DISTINCT queue),
                                      sum(attempts), sum(input_tokens), sum(output_tokens), sum(cost_micros)
                               FROM dead_letters WHERE replayed = 0"
                    .to_owned();
                push_filter(&filter, &mut sql, &mut args);
                sql
            };
            sql.push_str(" GROUP BY fingerprint ORDER BY 3 DESC, 5 DESC LIMIT ?");
            args.push(Value::Integer(limit));
            conn.prepare_cached(&sql)
                .and_then(|mut s| {
                    s.query_map(params_from_iter(args), |r| {
                        let queues: String = r.get(6)?;
                        let sum = |i| r.get::<_, i64>(i).map(|n| u64::try_from(n).unwrap_or(0));
                        Ok(DeadGroup {
                            fingerprint: r.get(0)?,
                            error_class: r.get(1)?,
                            count: r.get(2)?,
                            first_seen_ms: r.get(3)?,
                            last_seen_ms: r.get(4)?,
                            sample_error: r.get(5)?,
                            queues: queues.split(',').map(str::to_owned).collect(),
                            attempts: sum(7)?,
                            spent: Cost {
                                input_tokens: sum(8)?,
                                output_tokens: sum(9)?,
                                usd_micros: sum(10)?,
                            },
                        })
                    })?
                    .collect()
                })
                .map_err(SqliteError::query("group dead letters"))
        })
        .await
        .map_err(Into::into)
    }

    async fn count(&self, filter: &DeadFilter) -> Result<u64, StoreError> {
        let filter = filter.clone();
        self.read(move |conn| {
            let mut sql = "SELECT count(*) FROM dead_letters WHERE replayed = 0".to_owned();
            let mut args = Vec::new();
            push_filter(&filter, &mut sql, &mut args);
            conn.prepare_cached(&sql)
                .and_then(|mut s| s.query_row(params_from_iter(args), |r| r.get(0)))
                .map_err(SqliteError::query("count dead letters"))
        })
        .await
        .map_err(Into::into)
    }

    async fn get(&self, id: &MessageId) -> Result<Option<DeadLetter>, StoreError> {
        let id = id.to_string();
        self.read(move |conn| {
            let row = conn
                .prepare_cached(&format!(
                    "SELECT {DEAD_COLUMNS} FROM dead_letters WHERE id = ?1 AND replayed = 0"
                ))
                .and_then(|mut s| s.query_row([id], dead_from_row).optional())
                .map_err(SqliteError::query("get dead letter"))?;
            row.map(to_dead).transpose()
        })
        .await
        .map_err(Into::into)
    }

    async fn mark_replayed(
        &self,
        ids: &[MessageId],
        actor: &str,
        reason: &str,
    ) -> Result<u64, StoreError> {
        let detail = describe_replayed(ids);
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let (actor, reason) = (actor.to_owned(), reason.to_owned());
        self.write(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE dead_letters SET replayed = 1 WHERE id = ?1 AND replayed = 0",
                )
                .map_err(SqliteError::query("prepare replay mark"))?;
            let mut n = 0u64;
            for id in &ids {
                n += stmt
                    .execute([id])
                    .map_err(SqliteError::query("mark replayed"))? as u64;
            }
            audit(conn, &actor, "replay", &detail, n, &reason)?;
            Ok(n)
        })
        .await
        .map_err(Into::into)
    }

    async fn purge(
        &self,
        selection: &DeadSelection,
        actor: &str,
        reason: &str,
    ) -> Result<u64, StoreError> {
        let selection = selection.clone();
        let (actor, reason) = (actor.to_owned(), reason.to_owned());
        self.write(move |conn| {
            let n = match &selection {
                DeadSelection::Ids(ids) => {
                    let mut stmt = conn
                        .prepare_cached("DELETE FROM dead_letters WHERE id = ?1 AND replayed = 0")
                        .map_err(SqliteError::query("prepare purge"))?;
                    let mut n = 0u64;
                    for id in ids {
                        n += stmt
                            .execute([id.to_string()])
                            .map_err(SqliteError::query("purge"))?
                            as u64;
                    }
                    n
                }
                DeadSelection::Filter(filter) => {
                    let mut sql = "DELETE FROM dead_letters WHERE replayed = 0".to_owned();
                    let mut args = Vec::new();
                    push_filter(filter, &mut sql, &mut args);
                    conn.execute(&sql, params_from_iter(args))
                        .map_err(SqliteError::query("purge"))? as u64
                }
            };
            audit(conn, &actor, "purge", &selection.describe(), n, &reason)?;
            Ok(n)
        })
        .await
        .map_err(Into::into)
    }

    async fn stats(&self) -> Result<Vec<DeadStats>, StoreError> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT queue, error_class, sum(replayed = 0), count(*), min(CASE WHEN replayed = 0 THEN dead_at_ms END)
                 FROM dead_letters GROUP BY queue, error_class ORDER BY queue, error_class",
            )
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok(DeadStats {
                        queue: r.get(0)?,
                        error_class: r.get(1)?,
                        dead: r.get(2)?,
                        total: r.get(3)?,
                        oldest_dead_at_ms: r.get(4)?,
                    })
                })?
                .collect()
            })
            .map_err(SqliteError::query("dead-letter stats"))
        })
        .await
        .map_err(Into::into)
    }

    async fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            conn.prepare("SELECT at_ms, actor, action, detail, count, reason FROM audit ORDER BY seq DESC LIMIT ?1")
                .and_then(|mut s| {
                    s.query_map([limit], |r| {
                        Ok(AuditEntry {
                            at_ms: r.get(0)?,
                            actor: r.get(1)?,
                            action: r.get(2)?,
                            detail: r.get(3)?,
                            count: r.get(4)?,
                            reason: r.get(5)?,
                        })
                    })?
                    .collect()
                })
                .map_err(SqliteError::query("read audit log"))
        })
        .await
        .map_err(Into::into)
    }

    async fn depth(&self, queue: Option<&QueueName>) -> Result<u64, StoreError> {
        let queue = queue.map(ToString::to_string);
        self.read(move |conn| {
            // The group summary holds exact counts: no walk over a large DLQ.
            let mut sql = "SELECT coalesce(sum(dead), 0) FROM dead_groups WHERE 1".to_owned();
            let mut args = Vec::new();
            if let Some(q) = queue {
                sql.push_str(" AND queue = ?");
                args.push(Value::Text(q));
            }
            conn.prepare_cached(&sql)
                .and_then(|mut s| s.query_row(params_from_iter(args), |r| r.get(0)))
                .map_err(SqliteError::query("dlq depth"))
        })
        .await
        .map_err(Into::into)
    }
}
