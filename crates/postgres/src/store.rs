//! The PostgreSQL [`DeadLetterStore`]: one table of dead messages and the audit log,
//! shared by every process that opens the schema.

use redrive_core::{
    AuditEntry, Cost, Cursor, DeadFilter, DeadGroup, DeadLetter, DeadLetterStore, DeadSelection,
    DeadStats, Envelope, MessageId, QueueName, StoreError, describe_replayed, now_ms,
};
use tokio_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use crate::db::Postgres;
use crate::error::PgError;

/// Text PostgreSQL can hold: it refuses NUL in `text`, and a handler's error may carry
/// one. Only searchable copies go through here; the envelope itself (its history
/// included) is kept exactly in `headers`, which is JSON and escapes it.
pub(crate) fn text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{fffd}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// A statement's text and its arguments, numbered as they are added.
#[derive(Default)]
struct Sql {
    text: String,
    args: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Sql {
    fn new(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            args: Vec::new(),
        }
    }

    /// Adds an argument; returns its placeholder (`$N`).
    fn arg(&mut self, value: impl ToSql + Sync + Send + 'static) -> String {
        self.args.push(Box::new(value));
        format!("${}", self.args.len())
    }

    fn push(&mut self, text: &str) {
        self.text.push_str(text);
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }

    /// Appends the filter's conditions (the statement already has a WHERE clause).
    fn filter(&mut self, filter: &DeadFilter) {
        if let Some(q) = &filter.queue {
            let p = self.arg(q.to_string());
            self.push(&format!(" AND queue = {p}"));
        }
        if let Some(fp) = &filter.fingerprint {
            let p = self.arg(fp.clone());
            self.push(&format!(" AND fingerprint = {p}"));
        }
        if let Some(class) = &filter.error_class {
            let p = self.arg(text(class).into_owned());
            self.push(&format!(" AND error_class = {p}"));
        }
        if let Some(since) = filter.since_ms {
            let p = self.arg(since);
            self.push(&format!(" AND dead_at_ms >= {p}"));
        }
        if let Some(until) = filter.until_ms {
            let p = self.arg(until);
            self.push(&format!(" AND dead_at_ms < {p}"));
        }
        if let Some(t) = &filter.text {
            let in_error = self.arg(text(t).into_owned());
            let in_payload = self.arg(t.as_bytes().to_vec());
            self.push(&format!(
                " AND (strpos(error, {in_error}) > 0 OR position({in_payload}::bytea in payload) > 0)"
            ));
        }
    }
}

/// The columns every dead-letter read selects, in this order.
const DEAD_COLUMNS: &str = "id, queue, dead_at_ms, key, payload, headers, compressed";

fn to_dead(row: &tokio_postgres::Row) -> Result<DeadLetter, PgError> {
    let id: String = row.get(0);
    let corrupt = |reason: String| PgError::Corrupt {
        id: id.clone(),
        reason,
    };
    let queue: String = row.get(1);
    let queue = QueueName::new(&queue).map_err(|e| corrupt(e.to_string()))?;
    let key: Option<Vec<u8>> = row.get(3);
    let key = key
        .map(String::from_utf8)
        .transpose()
        .map_err(|e| corrupt(format!("key: {e}")))?;
    let payload: Vec<u8> = row.get(4);
    let payload = if row.get::<_, bool>(6) {
        zstd::decode_all(payload.as_slice())
            .map_err(|e| corrupt(format!("compressed payload: {e}")))?
    } else {
        payload
    };
    let headers: String = row.get(5);
    let wire: Vec<(String, String)> =
        serde_json::from_str(&headers).map_err(|e| corrupt(format!("headers: {e}")))?;
    let envelope =
        Envelope::from_wire(&queue, key, payload, wire).map_err(|e| corrupt(e.to_string()))?;
    Ok(DeadLetter {
        envelope,
        dead_at_ms: row.get(2),
    })
}

/// A dead letter's column values, in `INSERT_DEAD`'s order.
pub(crate) struct DeadRow<'a> {
    id: String,
    queue: &'a str,
    dead_at_ms: i64,
    attempts: i64,
    class: String,
    error: String,
    fingerprint: String,
    first_failed_ms: Option<i64>,
    last_failed_ms: Option<i64>,
    key: Option<&'a [u8]>,
    payload: &'a [u8],
    headers: String,
    input_tokens: i64,
    output_tokens: i64,
    cost_micros: i64,
}

impl<'a> DeadRow<'a> {
    pub(crate) fn new(dead: &'a DeadLetter) -> Self {
        let env = &dead.envelope;
        let last = env.last_failure();
        Self {
            id: env.id.to_string(),
            queue: env.queue.as_str(),
            dead_at_ms: dead.dead_at_ms,
            attempts: i64::from(env.attempt),
            class: text(last.map_or("unknown", |f| f.class.as_str())).into_owned(),
            error: text(last.map_or("", |f| f.message.as_str())).into_owned(),
            fingerprint: last.map_or(String::new(), |f| f.fingerprint.to_string()),
            first_failed_ms: env.first_failed_ms,
            last_failed_ms: last.map(|f| f.at_ms),
            key: env.key.as_ref().map(String::as_bytes),
            payload: &env.payload[..],
            headers: env.to_wire_json(),
            input_tokens: signed(env.spent.input_tokens),
            output_tokens: signed(env.spent.output_tokens),
            cost_micros: signed(env.spent.usd_micros),
        }
    }
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The fifteen arguments of a dead-letter insert, in column order.
pub(crate) fn insert_dead_params<'a>(row: &'a DeadRow<'_>) -> [&'a (dyn ToSql + Sync); 15] {
    [
        &row.id,
        &row.queue,
        &row.dead_at_ms,
        &row.attempts,
        &row.class,
        &row.error,
        &row.fingerprint,
        &row.first_failed_ms,
        &row.last_failed_ms,
        &row.key,
        &row.payload,
        &row.headers,
        &row.input_tokens,
        &row.output_tokens,
        &row.cost_micros,
    ]
}

/// Inserts a dead message; a replayed row of the same id comes back to life, a dead one
/// is left alone. Returns whether a row was written.
async fn insert_dead(
    client: &impl GenericClient,
    statement: &tokio_postgres::Statement,
    dead: &DeadLetter,
) -> Result<bool, PgError> {
    let row = DeadRow::new(dead);
    let changed = client
        .execute(statement, &insert_dead_params(&row))
        .await
        .map_err(PgError::query("insert dead letter"))?;
    Ok(changed == 1)
}

const INSERT_DEAD: &str = "
    INSERT INTO dead_letters (id, queue, replayed, dead_at_ms, attempts, error_class, error, fingerprint,
                              first_failed_ms, last_failed_ms, key, payload, headers,
                              input_tokens, output_tokens, cost_micros)
    VALUES ($1, $2, false, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
    ON CONFLICT (id) DO UPDATE SET
        queue = excluded.queue, replayed = false, compressed = false, dead_at_ms = excluded.dead_at_ms,
        attempts = excluded.attempts, error_class = excluded.error_class, error = excluded.error,
        fingerprint = excluded.fingerprint, first_failed_ms = excluded.first_failed_ms,
        last_failed_ms = excluded.last_failed_ms, key = excluded.key, payload = excluded.payload,
        headers = excluded.headers, input_tokens = excluded.input_tokens,
        output_tokens = excluded.output_tokens, cost_micros = excluded.cost_micros
    WHERE dead_letters.replayed";

async fn audit(
    client: &impl GenericClient,
    actor: &str,
    action: &str,
    detail: &str,
    count: u64,
    reason: &str,
) -> Result<(), PgError> {
    client
        .execute(
            "INSERT INTO audit (at_ms, actor, action, detail, count, reason) VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &now_ms(),
                &text(actor),
                &action,
                &text(detail),
                &i64::try_from(count).unwrap_or(i64::MAX),
                &text(reason),
            ],
        )
        .await
        .map_err(PgError::query("write audit log"))?;
    Ok(())
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

pub(crate) fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl DeadLetterStore for Postgres {
    async fn insert(&self, dead: &DeadLetter) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(INSERT_DEAD)
            .await
            .map_err(PgError::query("prepare dead-letter insert"))?;
        Ok(insert_dead(&**client, &statement, dead).await?)
    }

    async fn insert_batch(&self, dead: &[DeadLetter]) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let statement = client
            .prepare_cached(INSERT_DEAD)
            .await
            .map_err(PgError::query("prepare dead-letter insert"))?;
        let tx = client
            .transaction()
            .await
            .map_err(PgError::query("begin dead-letter batch"))?;
        let mut n = 0;
        for d in dead {
            n += u64::from(insert_dead(&*tx, &statement, d).await?);
        }
        tx.commit()
            .await
            .map_err(PgError::query("commit dead-letter batch"))?;
        Ok(n)
    }

    async fn list(
        &self,
        filter: &DeadFilter,
        cursor: Option<&Cursor>,
        n: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let mut sql = Sql::new(&format!(
            "SELECT {DEAD_COLUMNS} FROM dead_letters WHERE NOT replayed"
        ));
        sql.filter(filter);
        if let Some(c) = cursor {
            let at = sql.arg(c.dead_at_ms);
            let id = sql.arg(c.id.to_string());
            sql.push(&format!(" AND (dead_at_ms, id) > ({at}, {id})"));
        }
        let l = sql.arg(limit(n));
        sql.push(&format!(" ORDER BY dead_at_ms, id LIMIT {l}"));
        let rows = self
            .client()
            .await?
            .query(&sql.text, &sql.params())
            .await
            .map_err(PgError::query("list dead letters"))?;
        Ok(rows.iter().map(to_dead).collect::<Result<_, _>>()?)
    }

    async fn groups(&self, filter: &DeadFilter, n: usize) -> Result<Vec<DeadGroup>, StoreError> {
        let mut sql = Sql::new(
            "SELECT fingerprint, max(error_class), count(*), min(coalesce(first_failed_ms, dead_at_ms)),
                    max(coalesce(last_failed_ms, dead_at_ms)), (array_agg(error ORDER BY dead_at_ms DESC))[1],
                    string_agg(DISTINCT queue, ','), sum(attempts)::bigint, sum(input_tokens)::bigint,
                    sum(output_tokens)::bigint, sum(cost_micros)::bigint
             FROM dead_letters WHERE NOT replayed",
        );
        sql.filter(filter);
        let l = sql.arg(limit(n));
        sql.push(&format!(
            " GROUP BY fingerprint ORDER BY 3 DESC, 5 DESC, 1 LIMIT {l}"
        ));
        let rows = self
            .client()
            .await?
            .query(&sql.text, &sql.params())
            .await
            .map_err(PgError::query("group dead letters"))?;
        Ok(rows
            .iter()
            .map(|r| DeadGroup {
                fingerprint: r.get(0),
                error_class: r.get(1),
                count: count(r.get(2)),
                first_seen_ms: r.get(3),
                last_seen_ms: r.get(4),
                sample_error: r.get(5),
                queues: r
                    .get::<_, String>(6)
                    .split(',')
                    .map(str::to_owned)
                    .collect(),
                attempts: count(r.get(7)),
                spent: Cost {
                    input_tokens: count(r.get(8)),
                    output_tokens: count(r.get(9)),
                    usd_micros: count(r.get(10)),
                },
            })
            .collect())
    }

    async fn count(&self, filter: &DeadFilter) -> Result<u64, StoreError> {
        let mut sql = Sql::new("SELECT count(*) FROM dead_letters WHERE NOT replayed");
        sql.filter(filter);
        let row = self
            .client()
            .await?
            .query_one(&sql.text, &sql.params())
            .await
            .map_err(PgError::query("count dead letters"))?;
        Ok(count(row.get(0)))
    }

    async fn get(&self, id: &MessageId) -> Result<Option<DeadLetter>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {DEAD_COLUMNS} FROM dead_letters WHERE id = $1 AND NOT replayed"),
                &[&id.to_string()],
            )
            .await
            .map_err(PgError::query("get dead letter"))?;
        Ok(row.as_ref().map(to_dead).transpose()?)
    }

    async fn mark_replayed(
        &self,
        ids: &[MessageId],
        actor: &str,
        reason: &str,
    ) -> Result<u64, StoreError> {
        let detail = describe_replayed(ids);
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(PgError::query("begin replay mark"))?;
        let n = tx
            .execute(
                "UPDATE dead_letters SET replayed = true WHERE id = ANY($1) AND NOT replayed",
                &[&ids],
            )
            .await
            .map_err(PgError::query("mark replayed"))?;
        audit(&*tx, actor, "replay", &detail, n, reason).await?;
        tx.commit()
            .await
            .map_err(PgError::query("commit replay mark"))?;
        Ok(n)
    }

    async fn purge(
        &self,
        selection: &DeadSelection,
        actor: &str,
        reason: &str,
    ) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(PgError::query("begin purge"))?;
        let n = match selection {
            DeadSelection::Ids(ids) => {
                let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
                tx.execute(
                    "DELETE FROM dead_letters WHERE id = ANY($1) AND NOT replayed",
                    &[&ids],
                )
                .await
            }
            DeadSelection::Filter(filter) => {
                let mut sql = Sql::new("DELETE FROM dead_letters WHERE NOT replayed");
                sql.filter(filter);
                tx.execute(&sql.text, &sql.params()).await
            }
        }
        .map_err(PgError::query("purge"))?;
        audit(&*tx, actor, "purge", &selection.describe(), n, reason).await?;
        tx.commit().await.map_err(PgError::query("commit purge"))?;
        Ok(n)
    }

    async fn stats(&self) -> Result<Vec<DeadStats>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT queue, error_class, count(*) FILTER (WHERE NOT replayed), count(*),
                        min(dead_at_ms) FILTER (WHERE NOT replayed)
                 FROM dead_letters GROUP BY queue, error_class ORDER BY queue, error_class",
                &[],
            )
            .await
            .map_err(PgError::query("dead-letter stats"))?;
        Ok(rows
            .iter()
            .map(|r| DeadStats {
                queue: r.get(0),
                error_class: r.get(1),
                dead: count(r.get(2)),
                total: count(r.get(3)),
                oldest_dead_at_ms: r.get(4),
            })
            .collect())
    }

    async fn audit_log(&self, n: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT at_ms, actor, action, detail, count, reason FROM audit ORDER BY seq DESC LIMIT $1",
                &[&limit(n)],
            )
            .await
            .map_err(PgError::query("read audit log"))?;
        Ok(rows
            .iter()
            .map(|r| AuditEntry {
                at_ms: r.get(0),
                actor: r.get(1),
                action: r.get(2),
                detail: r.get(3),
                count: count(r.get(4)),
                reason: r.get(5),
            })
            .collect())
    }

    async fn depth(&self, queue: Option<&QueueName>) -> Result<u64, StoreError> {
        let mut sql = Sql::new("SELECT count(*) FROM dead_letters WHERE NOT replayed");
        if let Some(q) = queue {
            let p = sql.arg(q.to_string());
            sql.push(&format!(" AND queue = {p}"));
        }
        let row = self
            .client()
            .await?
            .query_one(&sql.text, &sql.params())
            .await
            .map_err(PgError::query("dlq depth"))?;
        Ok(count(row.get(0)))
    }
}
