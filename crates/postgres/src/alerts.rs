//! The PostgreSQL [`AlertStore`]: alert state and the notification outbox, beside the
//! dead letters they are about.

use redrive_core::StoreError;
use redrive_core::alert::{
    AlertPhase, AlertState, AlertStore, NewNotification, Notification, NotificationKind,
    Transition, announced,
};
use tokio_postgres::GenericClient;

use crate::db::Postgres;
use crate::error::PgError;
use crate::store::text;

const STATE_COLUMNS: &str = "rule, queue, phase, since_ms, fired_ms, resolved_ms, value";
const OUTBOX_COLUMNS: &str =
    "id, notifier, kind, rule, expr, queue, value, at_ms, attempts, last_error, sent_ms, failed";

fn value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn state(r: &tokio_postgres::Row) -> AlertState {
    AlertState {
        rule: r.get(0),
        queue: r.get(1),
        phase: AlertPhase::parse(r.get(2)).unwrap_or(AlertPhase::Resolved),
        since_ms: r.get(3),
        fired_ms: r.get(4),
        resolved_ms: r.get(5),
        value: u64::try_from(r.get::<_, i64>(6)).unwrap_or(0),
    }
}

fn notification(r: &tokio_postgres::Row) -> Notification {
    Notification {
        id: r.get(0),
        notifier: r.get(1),
        kind: if r.get::<_, &str>(2) == "resolve" {
            NotificationKind::Resolve
        } else {
            NotificationKind::Trigger
        },
        rule: r.get(3),
        expr: r.get(4),
        queue: r.get(5),
        value: u64::try_from(r.get::<_, i64>(6)).unwrap_or(0),
        at_ms: r.get(7),
        attempts: u32::try_from(r.get::<_, i32>(8)).unwrap_or(0),
        last_error: r.get(9),
        sent_ms: r.get(10),
        failed: r.get(11),
    }
}

/// Applies one transition; returns whether it changed the stored phase to what it
/// announces (`Fired`, `Resolved`).
async fn apply(tx: &impl GenericClient, t: &Transition) -> Result<bool, PgError> {
    let q = PgError::query("apply alert transition");
    let changed = match t {
        Transition::Pending(s) => {
            tx.execute(
                "INSERT INTO alerts (rule, queue, phase, since_ms, value) VALUES ($1, $2, 'pending', $3, $4)
                 ON CONFLICT (rule, queue) WHERE phase <> 'resolved' DO NOTHING",
                &[&text(&s.rule), &text(&s.queue), &s.since_ms, &value(s.value)],
            )
            .await
            .map_err(q)?;
            false
        }
        Transition::Fired(s) => {
            let updated = tx
                .execute(
                    "UPDATE alerts SET phase = 'firing', fired_ms = $3, value = $4
                     WHERE rule = $1 AND queue = $2 AND phase = 'pending'",
                    &[
                        &text(&s.rule),
                        &text(&s.queue),
                        &s.fired_ms,
                        &value(s.value),
                    ],
                )
                .await
                .map_err(PgError::query("fire alert"))?;
            updated == 1
                || tx
                    .execute(
                        "INSERT INTO alerts (rule, queue, phase, since_ms, fired_ms, value) VALUES ($1, $2, 'firing', $3, $4, $5)
                         ON CONFLICT (rule, queue) WHERE phase <> 'resolved' DO NOTHING",
                        &[&text(&s.rule), &text(&s.queue), &s.since_ms, &s.fired_ms, &value(s.value)],
                    )
                    .await
                    .map_err(q)?
                    == 1
        }
        Transition::Updated(s) => {
            tx.execute(
                "UPDATE alerts SET value = $3 WHERE rule = $1 AND queue = $2 AND phase <> 'resolved'",
                &[&text(&s.rule), &text(&s.queue), &value(s.value)],
            )
            .await
            .map_err(q)?;
            false
        }
        Transition::Resolved(s) => {
            tx.execute(
                "UPDATE alerts SET phase = 'resolved', resolved_ms = $3, value = $4
                 WHERE rule = $1 AND queue = $2 AND phase = 'firing'",
                &[
                    &text(&s.rule),
                    &text(&s.queue),
                    &s.resolved_ms,
                    &value(s.value),
                ],
            )
            .await
            .map_err(q)?
                == 1
        }
        Transition::Cancelled(s) => {
            tx.execute(
                "DELETE FROM alerts WHERE rule = $1 AND queue = $2 AND phase = 'pending'",
                &[&text(&s.rule), &text(&s.queue)],
            )
            .await
            .map_err(q)?;
            false
        }
    };
    Ok(changed)
}

impl AlertStore for Postgres {
    async fn open_alerts(&self) -> Result<Vec<AlertState>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {STATE_COLUMNS} FROM alerts WHERE phase <> 'resolved' ORDER BY since_ms"
                ),
                &[],
            )
            .await
            .map_err(PgError::query("read open alerts"))?;
        Ok(rows.iter().map(state).collect())
    }

    async fn past_alerts(&self, limit: usize) -> Result<Vec<AlertState>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {STATE_COLUMNS} FROM alerts WHERE phase = 'resolved' ORDER BY resolved_ms DESC LIMIT $1"
                ),
                &[&crate::store::limit(limit)],
            )
            .await
            .map_err(PgError::query("read past alerts"))?;
        Ok(rows.iter().map(state).collect())
    }

    async fn apply_transitions(
        &self,
        transitions: Vec<Transition>,
        notifications: Vec<NewNotification>,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(PgError::query("begin alert transitions"))?;
        let mut changed = Vec::new();
        for t in &transitions {
            if apply(&*tx, t).await? {
                changed.extend(t.announces());
            }
        }
        for n in &announced(notifications, &changed) {
            let at = match n.kind {
                NotificationKind::Trigger => n.state.fired_ms.unwrap_or(n.state.since_ms),
                NotificationKind::Resolve => n.state.resolved_ms.unwrap_or(n.state.since_ms),
            };
            tx.execute(
                "INSERT INTO alert_outbox (notifier, kind, rule, expr, queue, value, at_ms, next_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
                &[
                    &text(&n.notifier),
                    &n.kind.as_str(),
                    &text(&n.state.rule),
                    &text(&n.expr),
                    &text(&n.state.queue),
                    &value(n.state.value),
                    &at,
                ],
            )
            .await
            .map_err(PgError::query("enqueue notification"))?;
        }
        tx.commit()
            .await
            .map_err(PgError::query("commit alert transitions"))?;
        Ok(())
    }

    async fn due_notifications(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Notification>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {OUTBOX_COLUMNS} FROM alert_outbox WHERE next_ms IS NOT NULL AND next_ms <= $1 ORDER BY id LIMIT $2"
                ),
                &[&now_ms, &crate::store::limit(limit)],
            )
            .await
            .map_err(PgError::query("read due notifications"))?;
        Ok(rows.iter().map(notification).collect())
    }

    async fn record_delivery(
        &self,
        id: i64,
        result: Result<i64, (String, Option<i64>)>,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        match result {
            Ok(sent_ms) => client.execute(
                "UPDATE alert_outbox SET attempts = attempts + 1, sent_ms = $2, next_ms = NULL, last_error = NULL WHERE id = $1",
                &[&id, &sent_ms],
            ).await,
            Err((error, next)) => client.execute(
                "UPDATE alert_outbox SET attempts = attempts + 1, last_error = $2, next_ms = $3, failed = ($3::bigint IS NULL) WHERE id = $1",
                &[&id, &text(&error), &next],
            ).await,
        }
        .map_err(PgError::query("record delivery"))?;
        Ok(())
    }

    async fn lead(
        &self,
        role: &str,
        holder: &str,
        now_ms: i64,
        for_ms: i64,
    ) -> Result<bool, StoreError> {
        // Taken when free or run out, kept (renewed) by its holder, in one statement:
        // two processes asking at once cannot both get it.
        let row = self
            .client()
            .await?
            .query_opt(
                "INSERT INTO leases (role, holder, until_ms) VALUES ($1, $2, $3::bigint + $4::bigint)
                 ON CONFLICT (role) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms
                 WHERE leases.holder = excluded.holder OR leases.until_ms <= $3::bigint
                 RETURNING holder",
                &[&role, &text(holder), &now_ms, &for_ms],
            )
            .await
            .map_err(PgError::query("take the lease"))?;
        Ok(row.is_some())
    }

    async fn recent_notifications(&self, limit: usize) -> Result<Vec<Notification>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT {OUTBOX_COLUMNS} FROM alert_outbox ORDER BY id DESC LIMIT $1"),
                &[&crate::store::limit(limit)],
            )
            .await
            .map_err(PgError::query("read notifications"))?;
        Ok(rows.iter().map(notification).collect())
    }
}
