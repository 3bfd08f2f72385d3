//! Replay jobs in the embedded store: `replay_jobs` and `replay_items`.

use redrive_core::{
    BREAKER_REPORT_TTL_MS, BreakerBoard, ItemState, JobCounts, JobItem, JobState, JobView,
    MessageId, OpenBreaker, ReplayJob, ReplayJobs, ReplayOutcome, StoreError, now_ms,
};
use rusqlite::{Connection, OptionalExtension, params};

use crate::db::Sqlite;
use crate::error::SqliteError;

fn corrupt(id: &str, reason: impl std::fmt::Display) -> SqliteError {
    SqliteError::Corrupt {
        id: format!("replay job {id}"),
        reason: reason.to_string(),
    }
}

fn spec_json(job: &ReplayJob) -> Result<String, SqliteError> {
    serde_json::to_string(job).map_err(|e| corrupt(&job.id, e))
}

fn counts(conn: &Connection, job: &str) -> Result<JobCounts, SqliteError> {
    let mut counts = JobCounts::default();
    let mut stmt = conn
        .prepare_cached("SELECT state, count(*) FROM replay_items WHERE job = ?1 GROUP BY state")
        .map_err(SqliteError::query("count a job's messages"))?;
    let rows = stmt
        .query_map([job], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .and_then(Iterator::collect::<rusqlite::Result<Vec<_>>>)
        .map_err(SqliteError::query("count a job's messages"))?;
    for (state, n) in rows {
        let state = ItemState::parse(&state).ok_or_else(|| corrupt(job, "unknown item state"))?;
        counts.add(state, n.unsigned_abs());
    }
    Ok(counts)
}

type JobRow = (String, String, String, i64, String, String, i64);

fn view(
    conn: &Connection,
    (id, state, note, updated, spec, owner, lease): JobRow,
) -> Result<JobView, SqliteError> {
    let job: ReplayJob = serde_json::from_str(&spec).map_err(|e| corrupt(&id, e))?;
    let state = JobState::parse(&state).ok_or_else(|| corrupt(&id, "unknown state"))?;
    Ok(JobView {
        counts: counts(conn, &id)?,
        job,
        state,
        note,
        updated_at_ms: updated,
        runner: (lease > now_ms() && !owner.is_empty()).then(|| owner.clone()),
        last_runner: owner,
    })
}

type ItemRow = (
    i64,
    String,
    Option<String>,
    bool,
    String,
    i64,
    String,
    String,
    i64,
);

fn item(
    job: &str,
    (seq, id, key, canary, state, replays, detail, was, at): ItemRow,
) -> Result<JobItem, SqliteError> {
    Ok(JobItem {
        seq: seq.unsigned_abs(),
        id: MessageId::parse(&id).map_err(|e| corrupt(job, e))?,
        key,
        canary,
        state: ItemState::parse(&state).ok_or_else(|| corrupt(job, "unknown item state"))?,
        replays: u32::try_from(replays).unwrap_or(0),
        detail,
        was,
        at_ms: at,
    })
}

fn item_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ItemRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
    ))
}

const ITEM_COLUMNS: &str = "seq, id, key, canary, state, replays, detail, was, at_ms";

impl ReplayJobs for Sqlite {
    async fn create_job(&self, job: &ReplayJob, items: &[JobItem]) -> Result<(), StoreError> {
        let spec = spec_json(job)?;
        let (id, created) = (job.id.clone(), job.created_at_ms);
        let items = items.to_vec();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO replay_jobs (id, created_ms, updated_ms, state, spec) VALUES (?1, ?2, ?2, 'running', ?3)",
            )
            .and_then(|mut s| s.execute(params![id, created, spec]))
            .map_err(SqliteError::query("create a replay job"))?;
            let mut stmt = conn
                .prepare_cached(
                    "INSERT INTO replay_items (job, seq, id, key, canary, state, replays, detail, was, at_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .map_err(SqliteError::query("add a job's messages"))?;
            for i in &items {
                stmt.execute(params![
                    id,
                    i.seq as i64,
                    i.id.to_string(),
                    i.key,
                    i.canary,
                    i.state.as_str(),
                    i.replays,
                    i.detail,
                    i.was,
                    i.at_ms
                ])
                .map_err(SqliteError::query("add a job's messages"))?;
            }
            Ok(())
        })
        .await
        .map_err(Into::into)
    }

    async fn update_job(&self, job: &ReplayJob) -> Result<(), StoreError> {
        let spec = spec_json(job)?;
        let id = job.id.clone();
        self.write(move |conn| {
            conn.prepare_cached("UPDATE replay_jobs SET spec = ?2, updated_ms = ?3 WHERE id = ?1")
                .and_then(|mut s| s.execute(params![id, spec, now_ms()]))
                .map_err(SqliteError::query("update a replay job"))?;
            Ok(())
        })
        .await
        .map_err(Into::into)
    }

    async fn set_job_state(
        &self,
        id: &str,
        from: &[JobState],
        to: JobState,
        note: &str,
    ) -> Result<bool, StoreError> {
        let (id, note) = (id.to_owned(), note.to_owned());
        let from: Vec<&'static str> = from.iter().map(|s| s.as_str()).collect();
        self.write(move |conn| {
            let current: Option<String> = conn
                .prepare_cached("SELECT state FROM replay_jobs WHERE id = ?1")
                .and_then(|mut s| s.query_row([&id], |r| r.get(0)).optional())
                .map_err(SqliteError::query("read a job's state"))?;
            match current {
                Some(state) if from.contains(&state.as_str()) => {
                    conn.prepare_cached(
                        "UPDATE replay_jobs SET state = ?2, note = ?3, updated_ms = ?4 WHERE id = ?1",
                    )
                    .and_then(|mut s| s.execute(params![id, to.as_str(), note, now_ms()]))
                    .map_err(SqliteError::query("change a job's state"))?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
        .await
        .map_err(Into::into)
    }

    async fn claim_job(&self, id: &str, owner: &str, until_ms: i64) -> Result<bool, StoreError> {
        let (id, owner) = (id.to_owned(), owner.to_owned());
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE replay_jobs SET owner = ?2, lease_ms = ?3 \
                     WHERE id = ?1 AND (owner = ?2 OR owner = '' OR lease_ms < ?4)",
                )
                .and_then(|mut s| s.execute(params![id, owner, until_ms, now_ms()]))
                .map_err(SqliteError::query("claim a replay job"))?;
            Ok(n > 0)
        })
        .await
        .map_err(Into::into)
    }

    async fn jobs(&self, id: Option<&str>, limit: usize) -> Result<Vec<JobView>, StoreError> {
        let id = id.map(str::to_owned);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let row = |r: &rusqlite::Row<'_>| -> rusqlite::Result<JobRow> {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
            };
            let rows: Vec<JobRow> = match &id {
                Some(id) => conn
                    .prepare_cached(
                        "SELECT id, state, note, updated_ms, spec, owner, lease_ms FROM replay_jobs WHERE id = ?1",
                    )
                    .and_then(|mut s| s.query_map([id], row)?.collect()),
                None => conn
                    .prepare_cached(
                        "SELECT id, state, note, updated_ms, spec, owner, lease_ms FROM replay_jobs ORDER BY created_ms DESC, id DESC LIMIT ?1",
                    )
                    .and_then(|mut s| s.query_map([limit], row)?.collect()),
            }
            .map_err(SqliteError::query("list replay jobs"))?;
            rows.into_iter().map(|r| view(conn, r)).collect()
        })
        .await
        .map_err(Into::into)
    }

    async fn job_items(
        &self,
        id: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<JobItem>, StoreError> {
        let id = id.to_owned();
        let after = after.map_or(-1, |a| a as i64);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let rows: Vec<ItemRow> = conn
                .prepare_cached(&format!(
                    "SELECT {ITEM_COLUMNS} FROM replay_items WHERE job = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
                ))
                .and_then(|mut s| s.query_map(params![id, after, limit], item_row)?.collect())
                .map_err(SqliteError::query("list a job's messages"))?;
            rows.into_iter().map(|r| item(&id, r)).collect()
        })
        .await
        .map_err(Into::into)
    }

    async fn update_job_items(&self, id: &str, items: &[JobItem]) -> Result<(), StoreError> {
        let id = id.to_owned();
        let items = items.to_vec();
        self.write(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE replay_items SET state = ?3, replays = ?4, detail = ?5, at_ms = ?6 WHERE job = ?1 AND seq = ?2",
                )
                .map_err(SqliteError::query("update a job's messages"))?;
            for i in &items {
                stmt.execute(params![
                    id,
                    i.seq as i64,
                    i.state.as_str(),
                    i.replays,
                    i.detail,
                    i.at_ms
                ])
                .map_err(SqliteError::query("update a job's messages"))?;
            }
            conn.prepare_cached("UPDATE replay_jobs SET updated_ms = ?2 WHERE id = ?1")
                .and_then(|mut s| s.execute(params![id, now_ms()]))
                .map_err(SqliteError::query("update a replay job"))?;
            Ok(())
        })
        .await
        .map_err(Into::into)
    }

    async fn record_replay_outcomes(&self, outcomes: &[ReplayOutcome]) -> Result<(), StoreError> {
        let outcomes = outcomes.to_vec();
        self.write(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE replay_items SET state = ?3, detail = ?4, at_ms = ?5 \
                     WHERE id = ?1 AND replays = ?2 AND state = 'moved'",
                )
                .map_err(SqliteError::query("record replay outcomes"))?;
            let now = now_ms();
            for o in &outcomes {
                let (state, detail) = match &o.error {
                    None => (ItemState::Ok, ""),
                    Some(e) => (ItemState::Failed, e.as_str()),
                };
                stmt.execute(params![
                    o.id.to_string(),
                    o.replays,
                    state.as_str(),
                    detail,
                    now
                ])
                .map_err(SqliteError::query("record replay outcomes"))?;
            }
            Ok(())
        })
        .await
        .map_err(Into::into)
    }

    async fn replays_of(&self, id: &MessageId) -> Result<Vec<(ReplayJob, JobItem)>, StoreError> {
        let id = id.to_string();
        self.read(move |conn| {
            let rows: Vec<(String, String, ItemRow)> = conn
                .prepare_cached(
                    "SELECT j.id, j.spec, i.seq, i.id, i.key, i.canary, i.state, i.replays, i.detail, i.was, i.at_ms \
                     FROM replay_items i JOIN replay_jobs j ON j.id = i.job WHERE i.id = ?1 ORDER BY j.created_ms, j.id",
                )
                .and_then(|mut s| {
                    s.query_map([&id], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            (r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?),
                        ))
                    })?
                    .collect()
                })
                .map_err(SqliteError::query("list a message's replays"))?;
            rows.into_iter()
                .map(|(job, spec, row)| {
                    let spec: ReplayJob = serde_json::from_str(&spec).map_err(|e| corrupt(&job, e))?;
                    Ok((spec, item(&job, row)?))
                })
                .collect()
        })
        .await
        .map_err(Into::into)
    }
}

impl BreakerBoard for Sqlite {
    async fn report_breaker(
        &self,
        queue: &str,
        consumer: &str,
        open: Option<(i64, i64)>,
    ) -> Result<(), StoreError> {
        let (queue, consumer) = (queue.to_owned(), consumer.to_owned());
        self.write(move |conn| {
            match open {
                Some((since, seen)) => conn
                    .prepare_cached(
                        "INSERT INTO breakers (queue, consumer, since_ms, seen_ms) VALUES (?1, ?2, ?3, ?4) \
                         ON CONFLICT (queue, consumer) DO UPDATE SET since_ms = excluded.since_ms, seen_ms = excluded.seen_ms",
                    )
                    .and_then(|mut s| s.execute(params![queue, consumer, since, seen])),
                None => conn
                    .prepare_cached("DELETE FROM breakers WHERE queue = ?1 AND consumer = ?2")
                    .and_then(|mut s| s.execute(params![queue, consumer])),
            }
            .map_err(SqliteError::query("report a breaker"))?;
            Ok(())
        })
        .await
        .map_err(Into::into)
    }

    async fn open_breakers(&self, now_ms: i64) -> Result<Vec<OpenBreaker>, StoreError> {
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT queue, consumer, since_ms, seen_ms FROM breakers WHERE seen_ms > ?1 ORDER BY queue, since_ms",
            )
            .and_then(|mut s| {
                s.query_map([now_ms - BREAKER_REPORT_TTL_MS], |r| {
                    Ok(OpenBreaker {
                        queue: r.get(0)?,
                        consumer: r.get(1)?,
                        since_ms: r.get(2)?,
                        seen_ms: r.get(3)?,
                    })
                })?
                .collect()
            })
            .map_err(SqliteError::query("list open breakers"))
        })
        .await
        .map_err(Into::into)
    }
}
