//! The embedded [`AlertStore`]: alert state and the notification outbox, in the same
//! file as the dead letters they are about.

use redrive_core::StoreError;
use redrive_core::alert::{
    AlertPhase, AlertState, AlertStore, NewNotification, Notification, NotificationKind,
    Transition, announced,
};
use rusqlite::{Connection, params};

use crate::db::Sqlite;
use crate::error::SqliteError;

fn state_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AlertState> {
    let phase: String = r.get(2)?;
    Ok(AlertState {
        rule: r.get(0)?,
        queue: r.get(1)?,
        phase: AlertPhase::parse(&phase).unwrap_or(AlertPhase::Resolved),
        since_ms: r.get(3)?,
        fired_ms: r.get(4)?,
        resolved_ms: r.get(5)?,
        value: r.get(6)?,
    })
}

fn notification_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Notification> {
    let kind: String = r.get(2)?;
    Ok(Notification {
        id: r.get(0)?,
        notifier: r.get(1)?,
        kind: if kind == "resolve" {
            NotificationKind::Resolve
        } else {
            NotificationKind::Trigger
        },
        rule: r.get(3)?,
        expr: r.get(4)?,
        queue: r.get(5)?,
        value: r.get(6)?,
        at_ms: r.get(7)?,
        attempts: r.get(8)?,
        last_error: r.get(9)?,
        sent_ms: r.get(10)?,
        failed: r.get(11)?,
    })
}

const STATE_COLUMNS: &str = "rule, queue, phase, since_ms, fired_ms, resolved_ms, value";
const OUTBOX_COLUMNS: &str =
    "id, notifier, kind, rule, expr, queue, value, at_ms, attempts, last_error, sent_ms, failed";

/// Applies one transition; returns whether it changed the stored phase to what it
/// announces (`Fired`, `Resolved`).
fn apply(conn: &Connection, t: &Transition) -> Result<bool, SqliteError> {
    let q = SqliteError::query("apply alert transition");
    match t {
        Transition::Pending(s) => {
            conn.execute(
                "INSERT INTO alerts (rule, queue, phase, since_ms, value) VALUES (?1, ?2, 'pending', ?3, ?4)
                 ON CONFLICT (rule, queue) WHERE phase != 'resolved' DO NOTHING",
                params![s.rule, s.queue, s.since_ms, s.value],
            )
            .map_err(q)?;
        }
        Transition::Fired(s) => {
            let updated = conn
                .execute(
                    "UPDATE alerts SET phase = 'firing', fired_ms = ?3, value = ?4
                     WHERE rule = ?1 AND queue = ?2 AND phase = 'pending'",
                    params![s.rule, s.queue, s.fired_ms, s.value],
                )
                .map_err(SqliteError::query("fire alert"))?;
            if updated == 0 {
                let inserted = conn.execute(
                    "INSERT INTO alerts (rule, queue, phase, since_ms, fired_ms, value) VALUES (?1, ?2, 'firing', ?3, ?4, ?5)
                     ON CONFLICT (rule, queue) WHERE phase != 'resolved' DO NOTHING",
                    params![s.rule, s.queue, s.since_ms, s.fired_ms, s.value],
                )
                .map_err(q)?;
                return Ok(inserted == 1);
            }
            return Ok(true);
        }
        Transition::Updated(s) => {
            conn.execute(
                "UPDATE alerts SET value = ?3 WHERE rule = ?1 AND queue = ?2 AND phase != 'resolved'",
                params![s.rule, s.queue, s.value],
            )
            .map_err(q)?;
        }
        Transition::Resolved(s) => {
            let updated = conn
                .execute(
                    "UPDATE alerts SET phase = 'resolved', resolved_ms = ?3, value = ?4
                     WHERE rule = ?1 AND queue = ?2 AND phase = 'firing'",
                    params![s.rule, s.queue, s.resolved_ms, s.value],
                )
                .map_err(q)?;
            return Ok(updated == 1);
        }
        Transition::Cancelled(s) => {
            conn.execute(
                "DELETE FROM alerts WHERE rule = ?1 AND queue = ?2 AND phase = 'pending'",
                params![s.rule, s.queue],
            )
            .map_err(q)?;
        }
    }
    Ok(false)
}

impl AlertStore for Sqlite {
    async fn open_alerts(&self) -> Result<Vec<AlertState>, StoreError> {
        self.read(|conn| {
            conn.prepare_cached(&format!(
                "SELECT {STATE_COLUMNS} FROM alerts WHERE phase != 'resolved' ORDER BY since_ms"
            ))
            .and_then(|mut s| s.query_map([], state_from_row)?.collect())
            .map_err(SqliteError::query("read open alerts"))
        })
        .await
        .map_err(Into::into)
    }

    async fn past_alerts(&self, limit: usize) -> Result<Vec<AlertState>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {STATE_COLUMNS} FROM alerts WHERE phase = 'resolved' ORDER BY resolved_ms DESC LIMIT ?1"
            ))
            .and_then(|mut s| s.query_map([limit], state_from_row)?.collect())
            .map_err(SqliteError::query("read past alerts"))
        })
        .await
        .map_err(Into::into)
    }

    async fn apply_transitions(
        &self,
        transitions: Vec<Transition>,
        notifications: Vec<NewNotification>,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            let mut changed = Vec::new();
            for t in &transitions {
                if apply(conn, t)? {
                    changed.extend(t.announces());
                }
            }
            let notifications = announced(notifications, &changed);
            let mut insert = conn
                .prepare_cached(
                    "INSERT INTO alert_outbox (notifier, kind, rule, expr, queue, value, at_ms, next_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
                )
                .map_err(SqliteError::query("prepare outbox"))?;
            for n in &notifications {
                let at = match n.kind {
                    NotificationKind::Trigger => n.state.fired_ms.unwrap_or(n.state.since_ms),
                    NotificationKind::Resolve => n.state.resolved_ms.unwrap_or(n.state.since_ms),
                };
                insert
                    .execute(params![n.notifier, n.kind.as_str(), n.state.rule, n.expr, n.state.queue, n.state.value, at])
                    .map_err(SqliteError::query("enqueue notification"))?;
            }
            Ok(())
        })
        .await
        .map_err(Into::into)
    }

    async fn due_notifications(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<Notification>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {OUTBOX_COLUMNS} FROM alert_outbox WHERE next_ms IS NOT NULL AND next_ms <= ?1 ORDER BY id LIMIT ?2"
            ))
            .and_then(|mut s| s.query_map(params![now_ms, limit], notification_from_row)?.collect())
            .map_err(SqliteError::query("read due notifications"))
        })
        .await
        .map_err(Into::into)
    }

    async fn record_delivery(
        &self,
        id: i64,
        result: Result<i64, (String, Option<i64>)>,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            match result {
                Ok(sent_ms) => conn.execute(
                    "UPDATE alert_outbox SET attempts = attempts + 1, sent_ms = ?2, next_ms = NULL, last_error = NULL WHERE id = ?1",
                    params![id, sent_ms],
                ),
                Err((error, next)) => conn.execute(
                    "UPDATE alert_outbox SET attempts = attempts + 1, last_error = ?2, next_ms = ?3, failed = (?3 IS NULL) WHERE id = ?1",
                    params![id, error, next],
                ),
            }
            .map_err(SqliteError::query("record delivery"))?;
            Ok(())
        })
        .await
        .map_err(Into::into)
    }

    async fn recent_notifications(&self, limit: usize) -> Result<Vec<Notification>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {OUTBOX_COLUMNS} FROM alert_outbox ORDER BY id DESC LIMIT ?1"
            ))
            .and_then(|mut s| s.query_map([limit], notification_from_row)?.collect())
            .map_err(SqliteError::query("read notifications"))
        })
        .await
        .map_err(Into::into)
    }
}
