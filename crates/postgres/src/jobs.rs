//! Replay jobs in PostgreSQL: `replay_jobs` and `replay_items`, shared by every process
//! on the schema (a job started by one `serve` is seen, paused or resumed by another).

use redrive_core::{
    BREAKER_REPORT_TTL_MS, BreakerBoard, ItemState, JobCounts, JobItem, JobState, JobView,
    MessageId, OpenBreaker, ReplayJob, ReplayJobs, ReplayOutcome, StoreError, now_ms,
};
use tokio_postgres::{GenericClient, Row};

use crate::db::Postgres;
use crate::error::PgError;
use crate::store::text;

fn corrupt(id: &str, reason: impl std::fmt::Display) -> PgError {
    PgError::Corrupt {
        id: format!("replay job {id}"),
        reason: reason.to_string(),
    }
}

fn spec_json(job: &ReplayJob) -> Result<String, PgError> {
    serde_json::to_string(job).map_err(|e| corrupt(&job.id, e))
}

async fn counts<C: GenericClient>(client: &C, job: &str) -> Result<JobCounts, PgError> {
    let rows = client
        .query(
            "SELECT state, count(*) FROM replay_items WHERE job = $1 GROUP BY state",
            &[&job],
        )
        .await
        .map_err(PgError::query("count a job's messages"))?;
    let mut counts = JobCounts::default();
    for row in rows {
        let state: String = row.get(0);
        let n: i64 = row.get(1);
        let state = ItemState::parse(&state).ok_or_else(|| corrupt(job, "unknown item state"))?;
        counts.add(state, n.unsigned_abs());
    }
    Ok(counts)
}

/// Reads an item from columns `seq, id, key, canary, state, replays, detail, was, at_ms`
/// starting at `at`.
fn item(job: &str, row: &Row, at: usize) -> Result<JobItem, PgError> {
    let id: String = row.get(at + 1);
    let state: String = row.get(at + 4);
    let seq: i64 = row.get(at);
    let replays: i32 = row.get(at + 5);
    Ok(JobItem {
        seq: seq.unsigned_abs(),
        id: MessageId::parse(&id).map_err(|e| corrupt(job, e))?,
        key: row.get(at + 2),
        canary: row.get(at + 3),
        state: ItemState::parse(&state).ok_or_else(|| corrupt(job, "unknown item state"))?,
        replays: u32::try_from(replays).unwrap_or(0),
        detail: row.get(at + 6),
        was: row.get(at + 7),
        at_ms: row.get(at + 8),
    })
}

const ITEM_COLUMNS: &str = "seq, id, key, canary, state, replays, detail, was, at_ms";

impl ReplayJobs for Postgres {
    async fn create_job(&self, job: &ReplayJob, items: &[JobItem]) -> Result<(), StoreError> {
        let spec = spec_json(job)?;
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(PgError::query("begin a replay job"))?;
        tx.execute(
            "INSERT INTO replay_jobs (id, created_ms, updated_ms, state, spec) VALUES ($1, $2, $2, 'running', $3)",
            &[&job.id, &job.created_at_ms, &spec],
        )
        .await
        .map_err(PgError::query("create a replay job"))?;
        // In slices, as arrays: one statement per thousand messages, not one each.
        for chunk in items.chunks(1000) {
            let seqs: Vec<i64> = chunk.iter().map(|i| i.seq as i64).collect();
            let ids: Vec<String> = chunk.iter().map(|i| i.id.to_string()).collect();
            let keys: Vec<Option<String>> = chunk
                .iter()
                .map(|i| i.key.as_deref().map(|k| text(k).into_owned()))
                .collect();
            let canaries: Vec<bool> = chunk.iter().map(|i| i.canary).collect();
            let states: Vec<&str> = chunk.iter().map(|i| i.state.as_str()).collect();
            let replays: Vec<i32> = chunk
                .iter()
                .map(|i| i32::try_from(i.replays).unwrap_or(i32::MAX))
                .collect();
            let details: Vec<String> = chunk.iter().map(|i| text(&i.detail).into_owned()).collect();
            let was: Vec<String> = chunk.iter().map(|i| text(&i.was).into_owned()).collect();
            let ats: Vec<i64> = chunk.iter().map(|i| i.at_ms).collect();
            tx.execute(
                "INSERT INTO replay_items (job, seq, id, key, canary, state, replays, detail, was, at_ms) \
                 SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::boolean[], $6::text[], $7::int[], $8::text[], $9::text[], $10::bigint[])",
                &[&job.id, &seqs, &ids, &keys, &canaries, &states, &replays, &details, &was, &ats],
            )
            .await
            .map_err(PgError::query("add a job's messages"))?;
        }
        tx.commit()
            .await
            .map_err(PgError::query("commit a replay job"))?;
        Ok(())
    }

    async fn update_job(&self, job: &ReplayJob) -> Result<(), StoreError> {
        let spec = spec_json(job)?;
        let client = self.client().await?;
        client
            .execute(
                "UPDATE replay_jobs SET spec = $2, updated_ms = $3 WHERE id = $1",
                &[&job.id, &spec, &now_ms()],
            )
            .await
            .map_err(PgError::query("update a replay job"))?;
        Ok(())
    }

    async fn set_job_state(
        &self,
        id: &str,
        from: &[JobState],
        to: JobState,
        note: &str,
    ) -> Result<bool, StoreError> {
        let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE replay_jobs SET state = $3, note = $4, updated_ms = $5 WHERE id = $1 AND state = ANY($2)",
                &[&id, &from, &to.as_str(), &text(note).as_ref(), &now_ms()],
            )
            .await
            .map_err(PgError::query("change a job's state"))?;
        Ok(n > 0)
    }

    async fn claim_job(&self, id: &str, owner: &str, until_ms: i64) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE replay_jobs SET owner = $2, lease_ms = $3 \
                 WHERE id = $1 AND (owner = $2 OR owner = '' OR lease_ms < $4)",
                &[&id, &text(owner).as_ref(), &until_ms, &now_ms()],
            )
            .await
            .map_err(PgError::query("claim a replay job"))?;
        Ok(n > 0)
    }

    async fn jobs(&self, id: Option<&str>, limit: usize) -> Result<Vec<JobView>, StoreError> {
        let client = self.client().await?;
        let rows = match id {
            Some(id) => client
                .query(
                    "SELECT id, state, note, updated_ms, spec, owner, lease_ms FROM replay_jobs WHERE id = $1",
                    &[&id],
                )
                .await,
            None => client
                .query(
                    "SELECT id, state, note, updated_ms, spec, owner, lease_ms FROM replay_jobs ORDER BY created_ms DESC, id DESC LIMIT $1",
                    &[&i64::try_from(limit).unwrap_or(i64::MAX)],
                )
                .await,
        }
        .map_err(PgError::query("list replay jobs"))?;
        let mut views = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.get(0);
            let state: String = row.get(1);
            let spec: String = row.get(4);
            let owner: String = row.get(5);
            let lease: i64 = row.get(6);
            views.push(JobView {
                runner: (lease > now_ms() && !owner.is_empty()).then(|| owner.clone()),
                last_runner: owner,
                job: serde_json::from_str(&spec).map_err(|e| corrupt(&id, e))?,
                state: JobState::parse(&state).ok_or_else(|| corrupt(&id, "unknown state"))?,
                note: row.get(2),
                updated_at_ms: row.get(3),
                counts: counts(&**client, &id).await?,
            });
        }
        Ok(views)
    }

    async fn job_items(
        &self,
        id: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<JobItem>, StoreError> {
        let client = self.client().await?;
        let after = after.map_or(-1, |a| a as i64);
        let rows = client
            .query(
                &format!(
                    "SELECT {ITEM_COLUMNS} FROM replay_items WHERE job = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                ),
                &[&id, &after, &i64::try_from(limit).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(PgError::query("list a job's messages"))?;
        rows.iter()
            .map(|r| item(id, r, 0).map_err(Into::into))
            .collect()
    }

    async fn update_job_items(&self, id: &str, items: &[JobItem]) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(PgError::query("begin a job update"))?;
        for chunk in items.chunks(1000) {
            let seqs: Vec<i64> = chunk.iter().map(|i| i.seq as i64).collect();
            let states: Vec<&str> = chunk.iter().map(|i| i.state.as_str()).collect();
            let replays: Vec<i32> = chunk
                .iter()
                .map(|i| i32::try_from(i.replays).unwrap_or(i32::MAX))
                .collect();
            let details: Vec<String> = chunk.iter().map(|i| text(&i.detail).into_owned()).collect();
            let ats: Vec<i64> = chunk.iter().map(|i| i.at_ms).collect();
            tx.execute(
                "UPDATE replay_items i SET state = u.state, replays = u.replays, detail = u.detail, at_ms = u.at_ms \
                 FROM unnest($2::bigint[], $3::text[], $4::int[], $5::text[], $6::bigint[]) AS u(seq, state, replays, detail, at_ms) \
                 WHERE i.job = $1 AND i.seq = u.seq",
                &[&id, &seqs, &states, &replays, &details, &ats],
            )
            .await
            .map_err(PgError::query("update a job's messages"))?;
        }
        tx.execute(
            "UPDATE replay_jobs SET updated_ms = $2 WHERE id = $1",
            &[&id, &now_ms()],
        )
        .await
        .map_err(PgError::query("update a replay job"))?;
        tx.commit()
            .await
            .map_err(PgError::query("commit a job update"))?;
        Ok(())
    }

    async fn record_replay_outcomes(&self, outcomes: &[ReplayOutcome]) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = outcomes.iter().map(|o| o.id.to_string()).collect();
        let replays: Vec<i32> = outcomes
            .iter()
            .map(|o| i32::try_from(o.replays).unwrap_or(i32::MAX))
            .collect();
        let states: Vec<&str> = outcomes
            .iter()
            .map(|o| match o.error {
                None => ItemState::Ok.as_str(),
                Some(_) => ItemState::Failed.as_str(),
            })
            .collect();
        let details: Vec<String> = outcomes
            .iter()
            .map(|o| text(o.error.as_deref().unwrap_or("")).into_owned())
            .collect();
        let client = self.client().await?;
        client
            .execute(
                "UPDATE replay_items i SET state = u.state, detail = u.detail, at_ms = $5 \
                 FROM unnest($1::text[], $2::int[], $3::text[], $4::text[]) AS u(id, replays, state, detail) \
                 WHERE i.id = u.id AND i.replays = u.replays AND i.state = 'moved'",
                &[&ids, &replays, &states, &details, &now_ms()],
            )
            .await
            .map_err(PgError::query("record replay outcomes"))?;
        Ok(())
    }

    async fn replays_of(&self, id: &MessageId) -> Result<Vec<(ReplayJob, JobItem)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT j.id, j.spec, i.seq, i.id, i.key, i.canary, i.state, i.replays, i.detail, i.was, i.at_ms \
                 FROM replay_items i JOIN replay_jobs j ON j.id = i.job WHERE i.id = $1 ORDER BY j.created_ms, j.id",
                &[&id.to_string()],
            )
            .await
            .map_err(PgError::query("list a message's replays"))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let job: String = row.get(0);
            let spec: String = row.get(1);
            let spec: ReplayJob = serde_json::from_str(&spec).map_err(|e| corrupt(&job, e))?;
            out.push((spec, item(&job, row, 2)?));
        }
        Ok(out)
    }
}

impl BreakerBoard for Postgres {
    async fn report_breaker(
        &self,
        queue: &str,
        consumer: &str,
        open: Option<(i64, i64)>,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let (queue, consumer) = (text(queue), text(consumer));
        match open {
            Some((since, seen)) => client
                .execute(
                    "INSERT INTO breakers (queue, consumer, since_ms, seen_ms) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (queue, consumer) DO UPDATE SET since_ms = excluded.since_ms, seen_ms = excluded.seen_ms",
                    &[&queue.as_ref(), &consumer.as_ref(), &since, &seen],
                )
                .await,
            None => client
                .execute(
                    "DELETE FROM breakers WHERE queue = $1 AND consumer = $2",
                    &[&queue.as_ref(), &consumer.as_ref()],
                )
                .await,
        }
        .map_err(PgError::query("report a breaker"))?;
        Ok(())
    }

    async fn open_breakers(&self, now_ms: i64) -> Result<Vec<OpenBreaker>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT queue, consumer, since_ms, seen_ms FROM breakers WHERE seen_ms > $1 ORDER BY queue, since_ms",
                &[&(now_ms - BREAKER_REPORT_TTL_MS)],
            )
            .await
            .map_err(PgError::query("list open breakers"))?;
        Ok(rows
            .iter()
            .map(|r| OpenBreaker {
                queue: r.get(0),
                consumer: r.get(1),
                since_ms: r.get(2),
                seen_ms: r.get(3),
            })
            .collect())
    }
}
