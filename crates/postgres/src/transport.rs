//! Lanes in PostgreSQL: the [`Transport`] for teams whose only infrastructure is
//! PostgreSQL.
//!
//! A message is a row of `messages` with a lane and a due time; a lease pushes the due
//! time into the future and bumps a fencing id, which every settle checks, so a
//! consumer whose lease ran out cannot settle a message someone else now holds. A fetch
//! is one statement (`FOR UPDATE SKIP LOCKED`: consumers on any number of hosts never
//! wait on each other's rows), and so is every settle: moving a message to a retry
//! tier, to the isolation lane, or to the dead letters (the same database, so the move
//! is one transaction). An idle fetch waits for a `NOTIFY` (see [`crate::wake`]) or the
//! next due time it knows of, not for a poll interval.

use std::time::Duration;

use redrive_core::{
    Bytes, DeadLetter, Delivery, Envelope, Fetched, Lane, LaneSet, LaneStats, MessageId,
    QueueDepths, QueueName, Tier, Transport, TransportError, now_ms,
};
use tokio_postgres::Row;

use crate::db::Postgres;
use crate::error::PgError;
use crate::store::{DeadRow, insert_dead_params};
use crate::wake::CHANNEL;

/// The longest an idle fetch waits for a wake-up before it looks again: the bound on
/// how late a message is found when a notification is lost (the listening connection
/// down), and on how long a shutdown waits for a fetch.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// The PostgreSQL backend's handle on a delivery: the row and the lease's fencing id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    seq: i64,
    lease_id: i64,
}

/// Leases due rows: retries first (they have already waited their tier), then main, in
/// due order. `$1` queue, `$2` now, `$3` how many, `$4` lease ms.
const FETCH: &str = "
    WITH r AS (
        SELECT seq, due_ms, leased FROM messages
        WHERE queue = $1 AND kind = 0 AND due_ms <= $2
        ORDER BY due_ms, seq LIMIT $3 FOR UPDATE SKIP LOCKED),
    m AS (
        SELECT seq, due_ms, leased FROM messages
        WHERE queue = $1 AND kind = 1 AND due_ms <= $2
        ORDER BY due_ms, seq LIMIT ($3 - (SELECT count(*) FROM r)) FOR UPDATE SKIP LOCKED),
    picked AS (SELECT * FROM r UNION ALL SELECT * FROM m)
    UPDATE messages t SET due_ms = $2 + $4, leased = true, lease_id = t.lease_id + 1
    FROM picked WHERE t.seq = picked.seq
    RETURNING t.seq, t.lane, picked.due_ms, picked.leased, t.lease_id, t.published_ms,
              t.key, t.payload, t.headers, t.kind";

/// Leases the isolation lane's first due row. Same arguments as [`FETCH`].
const FETCH_ISOLATED: &str = "
    WITH picked AS (
        SELECT seq, due_ms, leased FROM messages
        WHERE queue = $1 AND kind = 2 AND due_ms <= $2
        ORDER BY due_ms, seq LIMIT $3 FOR UPDATE SKIP LOCKED)
    UPDATE messages t SET due_ms = $2 + $4, leased = true, lease_id = t.lease_id + 1
    FROM picked WHERE t.seq = picked.seq
    RETURNING t.seq, t.lane, picked.due_ms, picked.leased, t.lease_id, t.published_ms,
              t.key, t.payload, t.headers, t.kind";

/// When the next message of main or a retry tier is due (a leased one: when its lease
/// runs out).
const NEXT_DUE: &str = "
    SELECT least((SELECT min(due_ms) FROM messages WHERE queue = $1 AND kind = 0),
                 (SELECT min(due_ms) FROM messages WHERE queue = $1 AND kind = 1))";

const ISOLATED_DUE: &str = "SELECT min(due_ms) FROM messages WHERE queue = $1 AND kind = 2";

/// The move to a retry tier, which wakes whoever waits on the queue (the tier's due
/// time may be sooner than what they wait for).
const RETRY: &str = "
    WITH moved AS (
        UPDATE messages SET lane = $3, due_ms = $4, leased = false, headers = $5
        WHERE seq = $1 AND lease_id = $2 RETURNING seq)
    SELECT pg_notify($6, $7) FROM moved";

const RELEASE: &str = "
    WITH moved AS (
        UPDATE messages SET leased = false, due_ms = $3
        WHERE seq = $1 AND lease_id = $2 RETURNING seq)
    SELECT pg_notify($4, $5) FROM moved";

const ISOLATE: &str = "
    UPDATE messages SET lane = 'isolated', due_ms = $3, leased = false, headers = $4
    WHERE seq = $1 AND lease_id = $2";

const EXTEND: &str = "UPDATE messages SET due_ms = $3 WHERE seq = $1 AND lease_id = $2 AND leased";

/// The move to the dead letters: the row leaves its lane and joins `dead_letters` in
/// one statement. `$1`, `$2` the token; the rest as [`insert_dead_params`].
const DEAD_LETTER: &str = "
    WITH gone AS (DELETE FROM messages WHERE seq = $1 AND lease_id = $2 RETURNING seq),
    stored AS (
        INSERT INTO dead_letters (id, queue, replayed, dead_at_ms, attempts, error_class, error,
                                  fingerprint, first_failed_ms, last_failed_ms, key, payload, headers,
                                  input_tokens, output_tokens, cost_micros)
        SELECT $3::text, $4::text, false, $5::bigint, $6::bigint, $7::text, $8::text, $9::text,
               $10::bigint, $11::bigint, $12::bytea, $13::bytea, $14::text,
               $15::bigint, $16::bigint, $17::bigint
        FROM gone
        ON CONFLICT (id) DO UPDATE SET
            queue = excluded.queue, replayed = false, compressed = false, dead_at_ms = excluded.dead_at_ms,
            attempts = excluded.attempts, error_class = excluded.error_class, error = excluded.error,
            fingerprint = excluded.fingerprint, first_failed_ms = excluded.first_failed_ms,
            last_failed_ms = excluded.last_failed_ms, key = excluded.key, payload = excluded.payload,
            headers = excluded.headers, input_tokens = excluded.input_tokens,
            output_tokens = excluded.output_tokens, cost_micros = excluded.cost_micros
        WHERE dead_letters.replayed
        RETURNING 1)
    SELECT count(*) FROM gone";

const PUBLISH: &str = "
    WITH known AS (
        INSERT INTO queues (name, created_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING)
    INSERT INTO messages (queue, lane, due_ms, published_ms, key, payload, headers)
    SELECT $1, 'main', greatest(nb, $2), $2, k, p, h
    FROM unnest($3::bigint[], $4::bytea[], $5::bytea[], $6::text[]) AS u(nb, k, p, h)";

fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 4)
}

fn fenced(changed: u64, id: &MessageId) -> Result<(), PgError> {
    if changed == 1 {
        Ok(())
    } else {
        Err(PgError::LeaseLost(id.to_string()))
    }
}

/// A leased row, and what it reads as.
struct Leased {
    kind: i16,
    seq: i64,
    delivery: Result<Delivery<Token>, Unreadable>,
}

/// A row redrive cannot read, quarantined in the dead letters.
struct Unreadable {
    lease_id: i64,
    envelope: Envelope,
}

fn read_leased(queue: &QueueName, row: &Row, now: i64) -> Leased {
    let seq: i64 = row.get(0);
    let lane: String = row.get(1);
    let published_ms: i64 = row.get(5);
    let lease_id: i64 = row.get(4);
    let key: Option<Vec<u8>> = row.get(6);
    let payload = Bytes::from(row.get::<_, Vec<u8>>(7));
    let headers: String = row.get(8);
    let id = || MessageId::at(queue.as_str(), published_ms, seq.unsigned_abs());
    let read = serde_json::from_str::<Vec<(String, String)>>(&headers)
        .map_err(|e| format!("headers are not a JSON list of name/value pairs: {e}"))
        .and_then(|wire| {
            let key = key
                .map(|k| String::from_utf8(k).map_err(|_| "the key is not UTF-8 text".to_owned()))
                .transpose()?;
            Envelope::from_wire_at(queue, key, payload.clone(), wire, id).map_err(|e| e.to_string())
        });
    let delivery = match read {
        Ok(envelope) => Ok(Delivery {
            envelope,
            lane: Lane::from_label(&lane).unwrap_or(Lane::Main),
            due_ms: row.get(2),
            unfinished_before: row.get(3),
            token: Token { seq, lease_id },
        }),
        Err(why) => {
            let why = format!("row {seq} of the messages table: {why}");
            tracing::warn!(%queue, reason = %why, "quarantining an unreadable message in the DLQ");
            let wire = serde_json::from_str(&headers).unwrap_or_default();
            Err(Unreadable {
                lease_id,
                envelope: Envelope::unreadable(
                    queue.clone(),
                    id(),
                    payload,
                    wire,
                    &why,
                    &lane,
                    now,
                ),
            })
        }
    };
    Leased {
        kind: row.get(9),
        seq,
        delivery,
    }
}

impl Postgres {
    /// Runs one leasing statement and reads what it leased, quarantining what cannot be
    /// read; deliveries in fetch order.
    async fn lease(
        &self,
        sql: &str,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Delivery<Token>>, PgError> {
        let now = now_ms();
        let rows = {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(sql)
                .await
                .map_err(PgError::query("prepare fetch"))?;
            client
                .query(
                    &statement,
                    &[
                        &queue.as_str(),
                        &now,
                        &crate::store::limit(max),
                        &lease_ms(lease),
                    ],
                )
                .await
                .map_err(PgError::query("fetch"))?
        };
        let mut leased: Vec<Leased> = rows.iter().map(|r| read_leased(queue, r, now)).collect();
        leased.sort_by_key(|l| {
            let due = l.delivery.as_ref().map_or(0, |d| d.due_ms);
            (l.kind, due, l.seq)
        });
        let mut deliveries = Vec::with_capacity(leased.len());
        for l in leased {
            match l.delivery {
                Ok(d) => deliveries.push(d),
                Err(bad) => {
                    let token = Token {
                        seq: l.seq,
                        lease_id: bad.lease_id,
                    };
                    self.move_to_dead(token, &bad.envelope, now).await?;
                }
            }
        }
        Ok(deliveries)
    }

    async fn move_to_dead(&self, token: Token, env: &Envelope, now: i64) -> Result<(), PgError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(DEAD_LETTER)
            .await
            .map_err(PgError::query("prepare the move to the DLQ"))?;
        let dead = DeadLetter {
            envelope: env.clone(),
            dead_at_ms: now,
        };
        let row = DeadRow::new(&dead);
        let mut params = vec![
            &token.seq as &(dyn tokio_postgres::types::ToSql + Sync),
            &token.lease_id,
        ];
        params.extend(insert_dead_params(&row));
        let gone: i64 = client
            .query_one(&statement, &params)
            .await
            .map_err(PgError::query("move to the DLQ"))?
            .get(0);
        fenced(u64::try_from(gone).unwrap_or(0), &env.id)
    }

    /// Runs a fenced settle that changes one row.
    async fn settle(
        &self,
        sql: &str,
        context: &'static str,
        id: &MessageId,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<(), PgError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(PgError::query(context))?;
        let changed = client
            .execute(&statement, params)
            .await
            .map_err(PgError::query(context))?;
        fenced(changed, id)
    }

    async fn next_due(&self, sql: &str, queue: &QueueName) -> Result<Option<i64>, PgError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(PgError::query("prepare next due time"))?;
        Ok(client
            .query_one(&statement, &[&queue.as_str()])
            .await
            .map_err(PgError::query("next due time"))?
            .get(0))
    }

    /// Records the tiers a consumer uses for `lanes.queue`, so `queues` shows every
    /// tier, empty ones included.
    async fn register_queue(&self, lanes: &LaneSet) -> Result<(), PgError> {
        let tiers = lanes
            .tiers
            .iter()
            .map(Tier::name)
            .collect::<Vec<_>>()
            .join(",");
        self.client()
            .await?
            .execute(
                "INSERT INTO queues (name, tiers, created_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET tiers = excluded.tiers",
                &[&lanes.queue.as_str(), &tiers, &now_ms()],
            )
            .await
            .map_err(PgError::query("register queue"))?;
        Ok(())
    }
}

impl Transport for Postgres {
    type Token = Token;

    async fn publish(&self, queue: &QueueName, batch: Vec<Envelope>) -> Result<(), TransportError> {
        if batch.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut not_before = Vec::with_capacity(batch.len());
        let mut keys = Vec::with_capacity(batch.len());
        let mut payloads = Vec::with_capacity(batch.len());
        let mut headers = Vec::with_capacity(batch.len());
        for mut env in batch {
            env.queue = queue.clone();
            not_before.push(env.not_before_ms);
            headers.push(env.to_wire_json());
            keys.push(env.key.map(String::into_bytes));
            payloads.push(env.payload.to_vec());
        }
        let client = self.client().await?;
        let statement = client
            .prepare_cached(PUBLISH)
            .await
            .map_err(PgError::query("prepare publish"))?;
        client
            .execute(
                &statement,
                &[
                    &queue.as_str(),
                    &now,
                    &not_before,
                    &keys,
                    &payloads,
                    &headers,
                ],
            )
            .await
            .map_err(PgError::query("publish"))?;
        Ok(())
    }

    async fn create_lanes(&self, lanes: &LaneSet) -> Result<(), TransportError> {
        // Lanes are rows: a queue exists once it is registered with its tiers.
        Ok(self.register_queue(lanes).await?)
    }

    async fn fetch(
        &self,
        lanes: &LaneSet,
        max: usize,
        lease: Duration,
    ) -> Result<Fetched<Token>, TransportError> {
        // Subscribed before looking, so a message published between the look and the
        // wait still wakes it.
        let mut woken = self.wakeups.subscribe(lanes.queue.as_str());
        let mut waited = false;
        loop {
            let deliveries = self.lease(FETCH, &lanes.queue, max, lease).await?;
            if deliveries.len() >= max {
                return Ok(Fetched {
                    deliveries,
                    next_due_ms: None,
                });
            }
            let next_due_ms = self.next_due(NEXT_DUE, &lanes.queue).await?;
            if !deliveries.is_empty() || waited {
                return Ok(Fetched {
                    deliveries,
                    next_due_ms,
                });
            }
            let wait = next_due_ms.map_or(IDLE_WAIT, |due| {
                Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0)).min(IDLE_WAIT)
            });
            if wait.is_zero() {
                return Ok(Fetched {
                    deliveries,
                    next_due_ms,
                });
            }
            // Woken or not, one more look, then back to the runner.
            let _ = tokio::time::timeout(wait, woken.changed()).await;
            waited = true;
        }
    }

    async fn ack(&self, delivery: &Delivery<Token>) -> Result<(), TransportError> {
        let Token { seq, lease_id } = delivery.token;
        let deleted = self.acks.ack(seq, lease_id).await?;
        Ok(fenced(u64::from(deleted), &delivery.envelope.id)?)
    }

    async fn retry(
        &self,
        delivery: &Delivery<Token>,
        tier: &Tier,
        due_ms: i64,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        let Token { seq, lease_id } = delivery.token;
        let lane = Lane::Retry(tier.name().to_owned()).label();
        let headers = envelope.to_wire_json();
        let wake = self.wakeups.payload(envelope.queue.as_str());
        Ok(self
            .settle(
                RETRY,
                "move to a retry tier",
                &envelope.id,
                &[&seq, &lease_id, &lane, &due_ms, &headers, &CHANNEL, &wake],
            )
            .await?)
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery<Token>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        Ok(self
            .move_to_dead(delivery.token, envelope, now_ms())
            .await?)
    }

    async fn release(&self, delivery: &Delivery<Token>) -> Result<(), TransportError> {
        let Token { seq, lease_id } = delivery.token;
        let wake = self.wakeups.payload(delivery.envelope.queue.as_str());
        Ok(self
            .settle(
                RELEASE,
                "release",
                &delivery.envelope.id,
                &[&seq, &lease_id, &now_ms(), &CHANNEL, &wake],
            )
            .await?)
    }

    async fn isolate(
        &self,
        delivery: &Delivery<Token>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        let Token { seq, lease_id } = delivery.token;
        let headers = envelope.to_wire_json();
        Ok(self
            .settle(
                ISOLATE,
                "move to the isolation lane",
                &envelope.id,
                &[&seq, &lease_id, &now_ms(), &headers],
            )
            .await?)
    }

    async fn fetch_isolated(
        &self,
        lanes: &LaneSet,
        lease: Duration,
    ) -> Result<Fetched<Token>, TransportError> {
        let deliveries = self.lease(FETCH_ISOLATED, &lanes.queue, 1, lease).await?;
        let next_due_ms = if deliveries.is_empty() {
            self.next_due(ISOLATED_DUE, &lanes.queue).await?
        } else {
            None
        };
        Ok(Fetched {
            deliveries,
            next_due_ms,
        })
    }

    async fn isolated_due(&self, lanes: &LaneSet) -> Result<Option<i64>, TransportError> {
        Ok(self.next_due(ISOLATED_DUE, &lanes.queue).await?)
    }

    async fn extend_lease(
        &self,
        delivery: &Delivery<Token>,
        lease: Duration,
    ) -> Result<(), TransportError> {
        let Token { seq, lease_id } = delivery.token;
        let until = now_ms().saturating_add(lease_ms(lease));
        Ok(self
            .settle(
                EXTEND,
                "extend lease",
                &delivery.envelope.id,
                &[&seq, &lease_id, &until],
            )
            .await?)
    }
}

impl Postgres {
    async fn queue_depths_of(&self, queue: &str, tiers: &[String]) -> Result<QueueDepths, PgError> {
        let now = now_ms();
        let mut depths = QueueDepths {
            queue: queue.to_owned(),
            retry: tiers.iter().map(|t| (t.clone(), 0)).collect(),
            ..QueueDepths::default()
        };
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT lane, leased AND due_ms > $2 AS inflight, count(*), min(published_ms)
                 FROM messages WHERE queue = $1 GROUP BY 1, 2",
                &[&queue, &now],
            )
            .await
            .map_err(PgError::query("lane depths"))?;
        for row in rows {
            let lane: String = row.get(0);
            let count = u64::try_from(row.get::<_, i64>(2)).unwrap_or(0);
            if row.get(1) {
                depths.inflight += count;
            } else {
                depths.add_waiting(&lane, count, row.get(3), now);
            }
        }
        let dlq: i64 = client
            .query_one(
                "SELECT count(*) FROM dead_letters WHERE NOT replayed AND queue = $1",
                &[&queue],
            )
            .await
            .map_err(PgError::query("dlq depth"))?
            .get(0);
        depths.dlq = u64::try_from(dlq).unwrap_or(0);
        Ok(depths)
    }
}

impl LaneStats for Postgres {
    async fn depths(&self) -> Result<Vec<QueueDepths>, TransportError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT name, max(tiers) FROM (
                     SELECT name, tiers FROM queues
                     UNION ALL SELECT DISTINCT queue, NULL FROM messages
                     UNION ALL SELECT DISTINCT queue, NULL FROM dead_letters WHERE NOT replayed
                 ) q GROUP BY name ORDER BY name",
                &[],
            )
            .await
            .map_err(PgError::query("queue list"))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let name: String = row.get(0);
            let tiers: Vec<String> = row
                .get::<_, Option<String>>(1)
                .filter(|t| !t.is_empty())
                .map(|t| t.split(',').map(str::to_owned).collect())
                .unwrap_or_default();
            out.push(self.queue_depths_of(&name, &tiers).await?);
        }
        Ok(out)
    }

    async fn queue_depths(&self, lanes: &LaneSet) -> Result<QueueDepths, TransportError> {
        let tiers: Vec<String> = lanes.tiers.iter().map(|t| t.name().to_owned()).collect();
        Ok(self.queue_depths_of(lanes.queue.as_str(), &tiers).await?)
    }
}
