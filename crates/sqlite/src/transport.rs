//! The embedded [`Transport`]: lanes are rows with a due time, leases are due times
//! pushed into the future with a fencing id, retries and dead-lettering are updates in
//! the same transaction as the settle, so a move is atomic.
//!
//! A leased row's `due_ms` is its lease expiry, so one index on `(queue, due_ms)` finds
//! both due messages and expired leases. A row fetched while still marked `leased`
//! was never settled: its consumer crashed or hung, and the delivery says so.
//!
//! A row redrive cannot read (headers that are not its JSON, a redrive header that does
//! not parse, a payload or headers of the wrong type: anything written by hand) is moved
//! to the dead letters as `MalformedEnvelope` in the fetch that met it, so it never
//! stops the queue. A row without a `redrive-id` (written by SQL, not `publish`) is
//! named by where it sits, so every delivery of it has the same id.

use std::collections::HashMap;
use std::time::Duration;

use redrive_core::{
    Bytes, Delivery, Envelope, Fetched, Lane, LaneSet, LaneStats, MessageId, QueueDepths,
    QueueName, Tier, Transport, TransportError, now_ms,
};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, params};

use crate::db::Sqlite;
use crate::error::SqliteError;

/// The embedded backend's handle on a delivery: the row and the lease's fencing id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    seq: i64,
    lease_id: i64,
}

pub(crate) fn envelope_from_row(
    queue: &str,
    key: Option<String>,
    payload: Vec<u8>,
    headers: &str,
) -> Result<Envelope, SqliteError> {
    let corrupt = |reason: String| SqliteError::Corrupt {
        id: format!("in queue {queue}"),
        reason,
    };
    let queue = QueueName::new(queue).map_err(|e| corrupt(e.to_string()))?;
    let wire: Vec<(String, String)> =
        serde_json::from_str(headers).map_err(|e| corrupt(e.to_string()))?;
    Envelope::from_wire(&queue, key, payload, wire).map_err(|e| corrupt(e.to_string()))
}

/// Inserts a dead message; a replayed row of the same id comes back to life, a dead one
/// is left alone. Returns whether a row was written.
pub(crate) fn insert_dead(
    conn: &Connection,
    env: &Envelope,
    dead_at_ms: i64,
) -> Result<bool, SqliteError> {
    let last = env.last_failure();
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO dead_letters (id, queue, replayed, dead_at_ms, attempts, error_class, error, fingerprint,
                                       first_failed_ms, last_failed_ms, key, payload, headers,
                                       input_tokens, output_tokens, cost_micros)
             VALUES (?1, ?2, 0, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
             ON CONFLICT (id) DO UPDATE SET
                 queue = excluded.queue, replayed = 0, compressed = 0, dead_at_ms = excluded.dead_at_ms,
                 attempts = excluded.attempts, error_class = excluded.error_class, error = excluded.error,
                 fingerprint = excluded.fingerprint, first_failed_ms = excluded.first_failed_ms,
                 last_failed_ms = excluded.last_failed_ms, key = excluded.key, payload = excluded.payload,
                 headers = excluded.headers, input_tokens = excluded.input_tokens,
                 output_tokens = excluded.output_tokens, cost_micros = excluded.cost_micros
             WHERE dead_letters.replayed = 1",
        )
        .map_err(SqliteError::query("prepare dead-letter insert"))?;
    let changed = stmt
        .execute(params![
            env.id.to_string(),
            env.queue.as_str(),
            dead_at_ms,
            env.attempt,
            last.map_or("unknown", |f| f.class.as_str()),
            last.map_or("", |f| f.message.as_str()),
            last.map_or("", |f| f.fingerprint.as_str()),
            env.first_failed_ms,
            last.map(|f| f.at_ms),
            env.key,
            &env.payload[..],
            env.to_wire_json(),
            sql_int(env.spent.input_tokens),
            sql_int(env.spent.output_tokens),
            sql_int(env.spent.usd_micros),
        ])
        .map_err(SqliteError::query("insert dead letter"))?;
    Ok(changed == 1)
}

/// A count as SQLite's signed integer (saturating: no real count comes near).
pub(crate) fn sql_int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A due row as read, its columns taken whatever their type: a row written by hand is
/// quarantined, not a reason for the fetch to fail.
struct DueRow {
    seq: i64,
    lane: String,
    due_ms: i64,
    leased: bool,
    published_ms: i64,
    key: Option<String>,
    payload: Option<Vec<u8>>,
    headers: Option<String>,
}

/// A column as bytes, whatever its type (`None` for NULL).
fn loose_bytes(v: ValueRef<'_>) -> Option<Vec<u8>> {
    match v {
        ValueRef::Null => None,
        ValueRef::Integer(i) => Some(i.to_string().into_bytes()),
        ValueRef::Real(f) => Some(f.to_string().into_bytes()),
        ValueRef::Text(b) | ValueRef::Blob(b) => Some(b.to_vec()),
    }
}

fn loose_text(v: ValueRef<'_>) -> Option<String> {
    loose_bytes(v).map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn due_rows(
    conn: &Connection,
    queue: &str,
    lane: &str,
    now: i64,
    max: i64,
) -> Result<Vec<DueRow>, SqliteError> {
    conn.prepare_cached(
        "SELECT seq, lane, due_ms, leased, published_ms, key, payload, headers FROM messages
         WHERE queue = ?1 AND lane = ?2 AND due_ms <= ?3 ORDER BY due_ms, seq LIMIT ?4",
    )
    .and_then(|mut s| {
        s.query_map(params![queue, lane, now, max], |r| {
            Ok(DueRow {
                seq: r.get(0)?,
                lane: loose_text(r.get_ref(1)?).unwrap_or_default(),
                due_ms: r.get(2)?,
                leased: r.get::<_, Option<i64>>(3).ok().flatten().unwrap_or(0) != 0,
                published_ms: r.get::<_, Option<i64>>(4).ok().flatten().unwrap_or(0),
                key: loose_text(r.get_ref(5)?),
                payload: loose_bytes(r.get_ref(6)?),
                headers: loose_text(r.get_ref(7)?),
            })
        })?
        .collect()
    })
    .map_err(SqliteError::query("fetch"))
}

/// Leases due rows as deliveries, quarantining in the dead letters any row that cannot
/// be read (deleted from its lane in the same transaction).
///
/// The readable rows are leased by one statement: a statement per row would each open
/// and release a statement journal, which SQLite truncates by walking the journal from
/// its start, and that walk was most of the writer's time under load.
fn lease_rows(
    conn: &Connection,
    queue: &QueueName,
    rows: Vec<DueRow>,
    now: i64,
    lease_ms: i64,
) -> Result<Vec<Delivery<Token>>, SqliteError> {
    let mut deliveries = Vec::with_capacity(rows.len());
    for row in rows {
        let at = (row.published_ms, row.seq);
        let id = || MessageId::at(queue.as_str(), at.0, at.1.unsigned_abs());
        // The payload is shared, not copied, between the envelope and (should the row
        // not read) its quarantined copy.
        let null_payload = row.payload.is_none();
        let payload = Bytes::from(row.payload.unwrap_or_default());
        let read = match &row.headers {
            _ if null_payload => Err("the payload column is NULL".to_owned()),
            Some(headers) => read_row(queue, row.key, payload.clone(), headers, id),
            None => Err("the headers column is NULL".to_owned()),
        };
        let envelope = match read {
            Ok(envelope) => envelope,
            Err(why) => {
                let why = format!("row {} of the messages table: {why}", row.seq);
                tracing::warn!(%queue, reason = %why, "quarantining an unreadable message in the DLQ");
                // What of the headers can be read, read again: this path is rare.
                let wire = row
                    .headers
                    .as_deref()
                    .and_then(|h| serde_json::from_str(h).ok())
                    .unwrap_or_default();
                let raw =
                    Envelope::unreadable(queue.clone(), id(), payload, wire, &why, &row.lane, now);
                conn.prepare_cached("DELETE FROM messages WHERE seq = ?1")
                    .and_then(|mut s| s.execute(params![row.seq]))
                    .map_err(SqliteError::query("quarantine"))?;
                insert_dead(conn, &raw, now)?;
                continue;
            }
        };
        deliveries.push(Delivery {
            envelope,
            lane: Lane::from_label(&row.lane).unwrap_or(Lane::Main),
            due_ms: row.due_ms,
            unfinished_before: row.leased,
            token: Token {
                seq: row.seq,
                // Read back from the lease statement below.
                lease_id: 0,
            },
        });
    }
    if deliveries.is_empty() {
        return Ok(deliveries);
    }
    let seqs: Vec<String> = deliveries.iter().map(|d| d.token.seq.to_string()).collect();
    let seqs = format!("[{}]", seqs.join(","));
    let leased: HashMap<i64, i64> = conn
        .prepare_cached(
            "UPDATE messages SET due_ms = ?1, leased = 1, lease_id = lease_id + 1
             WHERE seq IN (SELECT value FROM json_each(?2)) RETURNING seq, lease_id",
        )
        .and_then(|mut s| {
            s.query_map(params![now.saturating_add(lease_ms), seqs], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect()
        })
        .map_err(SqliteError::query("lease"))?;
    for d in &mut deliveries {
        d.token.lease_id = *leased
            .get(&d.token.seq)
            .ok_or_else(|| SqliteError::Corrupt {
                id: d.envelope.id.to_string(),
                reason: format!("row {} was due but could not be leased", d.token.seq),
            })?;
    }
    Ok(deliveries)
}

/// Reads a row's envelope, or says why it cannot be read.
fn read_row(
    queue: &QueueName,
    key: Option<String>,
    payload: Bytes,
    headers: &str,
    id: impl FnOnce() -> MessageId,
) -> Result<Envelope, String> {
    let wire: Vec<(String, String)> = serde_json::from_str(headers)
        .map_err(|e| format!("headers are not a JSON list of name/value pairs: {e}"))?;
    Envelope::from_wire_at(queue, key, payload, wire, id).map_err(|e| e.to_string())
}

/// When the next message of the queue (any lane, leases included) becomes due: one
/// index seek per lane.
fn next_due(
    conn: &Connection,
    queue: &str,
    retry_lanes: &[String],
) -> Result<Option<i64>, SqliteError> {
    let mut next: Option<i64> = None;
    for lane in std::iter::once("main").chain(retry_lanes.iter().map(String::as_str)) {
        let due: Option<i64> = conn
            .prepare_cached("SELECT min(due_ms) FROM messages WHERE queue = ?1 AND lane = ?2")
            .and_then(|mut s| s.query_row(params![queue, lane], |r| r.get(0)))
            .map_err(SqliteError::query("next due"))?;
        next = match (next, due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    Ok(next)
}

/// When the isolation lane's first row is due (a leased row: when its lease runs out).
fn isolated_due_on(conn: &Connection, queue: &str) -> Result<Option<i64>, SqliteError> {
    conn.prepare_cached("SELECT min(due_ms) FROM messages WHERE queue = ?1 AND lane = 'isolated'")
        .and_then(|mut s| s.query_row(params![queue], |r| r.get(0)))
        .map_err(SqliteError::query("isolation lane due time"))
}

fn settle_check(changed: usize, id: &str) -> Result<(), SqliteError> {
    if changed == 1 {
        Ok(())
    } else {
        Err(SqliteError::LeaseLost(id.to_owned()))
    }
}

impl Sqlite {
    /// Records the tiers a consumer uses for `lanes.queue`, so `queues` can show every
    /// tier, empty ones included.
    ///
    /// # Errors
    ///
    /// Fails when the store cannot be written.
    pub async fn register_queue(&self, lanes: &LaneSet) -> Result<(), SqliteError> {
        let name = lanes.queue.to_string();
        let tiers = lanes
            .tiers
            .iter()
            .map(Tier::name)
            .collect::<Vec<_>>()
            .join(",");
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO queues (name, tiers, created_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET tiers = excluded.tiers",
                params![name, tiers, now_ms()],
            )
            .map_err(SqliteError::query("register queue"))?;
            Ok(())
        })
        .await
    }
}

impl Transport for Sqlite {
    type Token = Token;

    async fn publish(&self, queue: &QueueName, batch: Vec<Envelope>) -> Result<(), TransportError> {
        let queue = queue.clone();
        self.write(move |conn| {
            let now = now_ms();
            conn.prepare_cached(
                "INSERT INTO queues (name, created_ms) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![queue.as_str(), now]))
            .map_err(SqliteError::query("register queue"))?;
            let mut insert = conn
                .prepare_cached(
                    "INSERT INTO messages (queue, lane, due_ms, published_ms, key, payload, headers)
                     VALUES (?1, 'main', ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(SqliteError::query("prepare publish"))?;
            for mut env in batch {
                env.queue = queue.clone();
                let due = env.not_before_ms.map_or(now, |nb| nb.max(now));
                insert
                    .execute(params![
                        queue.as_str(),
                        due,
                        now,
                        env.key,
                        &env.payload[..],
                        env.to_wire_json()
                    ])
                    .map_err(SqliteError::query("publish"))?;
            }
            Ok(())
        })
        .await
        .map_err(Into::into)
    }

    async fn create_lanes(&self, lanes: &LaneSet) -> Result<(), TransportError> {
        // Lanes are rows: a queue exists once it is registered with its tiers.
        self.register_queue(lanes).await.map_err(Into::into)
    }

    async fn fetch(
        &self,
        lanes: &LaneSet,
        max: usize,
        lease: Duration,
    ) -> Result<Fetched<Token>, TransportError> {
        let queue = lanes.queue.clone();
        let configured = lanes
            .tiers
            .iter()
            .map(|t| Lane::Retry(t.name().to_owned()).label())
            .collect();
        let retry_lanes = self.retry_lanes(queue.as_str(), configured).await?;
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 4);
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.write(move |conn| {
            let now = now_ms();
            // Due retries first: they have already waited their tier, and serving them
            // behind a main backlog would make every tier late. Main lane next.
            let mut rows = Vec::new();
            for lane in &retry_lanes {
                rows.extend(due_rows(conn, queue.as_str(), lane, now, max)?);
            }
            rows.sort_by_key(|r| (r.due_ms, r.seq));
            rows.truncate(usize::try_from(max).unwrap_or(usize::MAX));
            if (rows.len() as i64) < max {
                rows.extend(due_rows(
                    conn,
                    queue.as_str(),
                    "main",
                    now,
                    max - rows.len() as i64,
                )?);
            }
            let deliveries = lease_rows(conn, &queue, rows, now, lease_ms)?;
            let next_due_ms = if (deliveries.len() as i64) < max {
                next_due(conn, queue.as_str(), &retry_lanes)?
            } else {
                None
            };
            Ok(Fetched {
                deliveries,
                next_due_ms,
            })
        })
        .await
        .map_err(Into::into)
    }

    async fn ack(&self, delivery: &Delivery<Token>) -> Result<(), TransportError> {
        let Token { seq, lease_id } = delivery.token;
        let id = delivery.envelope.id.to_string();
        self.write_one(move |conn| {
            let changed = conn
                .prepare_cached("DELETE FROM messages WHERE seq = ?1 AND lease_id = ?2")
                .and_then(|mut s| s.execute(params![seq, lease_id]))
                .map_err(SqliteError::query("ack"))?;
            settle_check(changed, &id)
        })
        .await
        .map_err(Into::into)
    }

    async fn retry(
        &self,
        delivery: &Delivery<Token>,
        tier: &Tier,
        due_ms: i64,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        let Token { seq, lease_id } = delivery.token;
        let id = envelope.id.to_string();
        let lane = Lane::Retry(tier.name().to_owned()).label();
        let headers = envelope.to_wire_json();
        self.write_one(move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE messages SET lane = ?3, due_ms = ?4, leased = 0, headers = ?5
                     WHERE seq = ?1 AND lease_id = ?2",
                )
                .and_then(|mut s| s.execute(params![seq, lease_id, lane, due_ms, headers]))
                .map_err(SqliteError::query("move to retry tier"))?;
            settle_check(changed, &id)
        })
        .await
        .map_err(Into::into)
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery<Token>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        let Token { seq, lease_id } = delivery.token;
        let envelope = envelope.clone();
        self.write(move |conn| {
            let changed = conn
                .prepare_cached("DELETE FROM messages WHERE seq = ?1 AND lease_id = ?2")
                .and_then(|mut s| s.execute(params![seq, lease_id]))
                .map_err(SqliteError::query("move to DLQ"))?;
            settle_check(changed, &envelope.id.to_string())?;
            insert_dead(conn, &envelope, now_ms())?;
            Ok(())
        })
        .await
        .map_err(Into::into)
    }

    async fn release(&self, delivery: &Delivery<Token>) -> Result<(), TransportError> {
        let Token { seq, lease_id } = delivery.token;
        let id = delivery.envelope.id.to_string();
        self.write_one(move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE messages SET leased = 0, due_ms = ?3 WHERE seq = ?1 AND lease_id = ?2",
                )
                .and_then(|mut s| s.execute(params![seq, lease_id, now_ms()]))
                .map_err(SqliteError::query("release"))?;
            settle_check(changed, &id)
        })
        .await
        .map_err(Into::into)
    }

    async fn isolate(
        &self,
        delivery: &Delivery<Token>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        let Token { seq, lease_id } = delivery.token;
        let id = envelope.id.to_string();
        let headers = envelope.to_wire_json();
        self.write_one(move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE messages SET lane = 'isolated', due_ms = ?3, leased = 0, headers = ?4
                     WHERE seq = ?1 AND lease_id = ?2",
                )
                .and_then(|mut s| s.execute(params![seq, lease_id, now_ms(), headers]))
                .map_err(SqliteError::query("move to the isolation lane"))?;
            settle_check(changed, &id)
        })
        .await
        .map_err(Into::into)
    }

    async fn fetch_isolated(
        &self,
        lanes: &LaneSet,
        lease: Duration,
    ) -> Result<Fetched<Token>, TransportError> {
        let queue = lanes.queue.clone();
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 4);
        self.write(move |conn| {
            let now = now_ms();
            let rows = due_rows(conn, queue.as_str(), "isolated", now, 1)?;
            let deliveries = lease_rows(conn, &queue, rows, now, lease_ms)?;
            let next_due_ms = if deliveries.is_empty() {
                isolated_due_on(conn, queue.as_str())?
            } else {
                None
            };
            Ok(Fetched {
                deliveries,
                next_due_ms,
            })
        })
        .await
        .map_err(Into::into)
    }

    async fn isolated_due(&self, lanes: &LaneSet) -> Result<Option<i64>, TransportError> {
        let queue = lanes.queue.to_string();
        self.read(move |conn| isolated_due_on(conn, &queue))
            .await
            .map_err(Into::into)
    }

    async fn extend_lease(
        &self,
        delivery: &Delivery<Token>,
        lease: Duration,
    ) -> Result<(), TransportError> {
        let Token { seq, lease_id } = delivery.token;
        let id = delivery.envelope.id.to_string();
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 4);
        self.write_one(move |conn| {
            let changed = conn
                .prepare_cached("UPDATE messages SET due_ms = ?3 WHERE seq = ?1 AND lease_id = ?2 AND leased = 1")
                .and_then(|mut s| s.execute(params![seq, lease_id, now_ms().saturating_add(lease_ms)]))
                .map_err(SqliteError::query("extend lease"))?;
            settle_check(changed, &id)
        })
        .await
        .map_err(Into::into)
    }
}

fn queue_depths_on(
    conn: &Connection,
    queue: &str,
    tiers: &[String],
) -> Result<QueueDepths, SqliteError> {
    let now = now_ms();
    let mut depths = QueueDepths {
        queue: queue.to_owned(),
        retry: tiers.iter().map(|t| (t.clone(), 0)).collect(),
        ..QueueDepths::default()
    };
    let mut stmt = conn
        .prepare_cached(
            "SELECT lane, leased = 1 AND due_ms > ?2 AS inflight, count(*), min(published_ms)
             FROM messages WHERE queue = ?1 GROUP BY lane, inflight",
        )
        .map_err(SqliteError::query("prepare depths"))?;
    let rows = stmt
        .query_map(params![queue, now], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, bool>(1)?,
                r.get::<_, u64>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(SqliteError::query("depths"))?;
    for (lane, inflight, count, oldest) in rows {
        if inflight {
            depths.inflight += count;
        } else {
            depths.add_waiting(&lane, count, oldest, now);
        }
    }
    // From the group summary, kept exact by triggers: counting a large DLQ's rows took
    // tens of milliseconds per queue.
    depths.dlq = conn
        .prepare_cached("SELECT coalesce(sum(dead), 0) FROM dead_groups WHERE queue = ?1")
        .and_then(|mut s| s.query_row(params![queue], |r| r.get(0)))
        .map_err(SqliteError::query("dlq depth"))?;
    Ok(depths)
}

impl LaneStats for Sqlite {
    async fn depths(&self) -> Result<Vec<QueueDepths>, TransportError> {
        self.read(|conn| {
            let mut names = conn
                .prepare(
                    "SELECT name, tiers FROM queues
                     UNION SELECT DISTINCT queue, NULL FROM messages
                     UNION SELECT DISTINCT queue, NULL FROM dead_groups WHERE dead > 0
                     ORDER BY 1, 2 DESC",
                )
                .map_err(SqliteError::query("prepare queue list"))?;
            let rows: Vec<(String, Option<String>)> = names
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(Iterator::collect)
                .map_err(SqliteError::query("queue list"))?;
            let mut out: Vec<QueueDepths> = Vec::new();
            for (name, tiers) in rows {
                if out.last().is_some_and(|d| d.queue == name) {
                    continue;
                }
                let tiers: Vec<String> = tiers
                    .filter(|t| !t.is_empty())
                    .map(|t| t.split(',').map(str::to_owned).collect())
                    .unwrap_or_default();
                out.push(queue_depths_on(conn, &name, &tiers)?);
            }
            Ok(out)
        })
        .await
        .map_err(Into::into)
    }

    async fn queue_depths(&self, lanes: &LaneSet) -> Result<QueueDepths, TransportError> {
        let queue = lanes.queue.to_string();
        let tiers: Vec<String> = lanes.tiers.iter().map(|t| t.name().to_owned()).collect();
        self.read(move |conn| queue_depths_on(conn, &queue, &tiers))
            .await
            .map_err(Into::into)
    }
}
