//! The alert evaluator and the notification dispatcher that `serve` runs.
//!
//! Every `evaluate_every`, rules are evaluated against what the backend looks like; the
//! resulting transitions and their notifications are written in one transaction to the
//! store (the outbox). The dispatcher delivers due notifications and retries failures
//! with exponential backoff. Because both the alert state and the outbox are persisted,
//! a restart neither pages twice for an open alert nor forgets a pending one.

use std::sync::Arc;
use std::time::Duration;

use redrive_core::alert::{
    AlertState, AlertStore, NewNotification, Notification, NotificationKind, Observation, Rule,
    Transition, evaluate,
};
use redrive_core::{DeadFilter, QueueName, now_ms};

use crate::metrics::Metrics;
use crate::notify::{Context, Notifiers};
use crate::triage::{BackendError, BoxFuture, Triage};

/// Attempts before a notification is given up.
const MAX_ATTEMPTS: u32 = 12;

/// What the UI shows about alerts.
pub trait AlertView: Send + Sync + 'static {
    /// Pending and firing alerts.
    fn open(&self) -> BoxFuture<'_, Vec<AlertState>>;
    /// Resolved alerts, newest first.
    fn past(&self, limit: usize) -> BoxFuture<'_, Vec<AlertState>>;
    /// Recent notifications, newest first.
    fn notifications(&self, limit: usize) -> BoxFuture<'_, Vec<Notification>>;
    /// The rules, as `name: expr (queue)` lines.
    fn rules(&self) -> Vec<(String, String, String)>;
}

/// Evaluates rules and delivers notifications.
pub struct Alerting<S> {
    store: S,
    triage: Arc<dyn Triage>,
    rules: Vec<Rule>,
    notifiers: Notifiers,
    public_url: String,
    metrics: Arc<Metrics>,
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(e: E) -> BackendError {
    Box::new(e)
}

impl<S: AlertStore + Clone + 'static> Alerting<S> {
    /// An evaluator for `rules` over `triage`, persisting in `store`.
    pub fn new(
        store: S,
        triage: Arc<dyn Triage>,
        rules: Vec<Rule>,
        notifiers: Notifiers,
        public_url: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            triage,
            rules,
            notifiers,
            public_url: public_url.trim_end_matches('/').to_owned(),
            metrics,
        }
    }

    async fn observe(&self, now: i64) -> Result<Vec<Observation>, BackendError> {
        let depths = self.triage.depths().await?;
        let stats = self.triage.stats().await?;
        let breakers = self.triage.open_breakers().await?;
        let window = self
            .rules
            .iter()
            .filter_map(|r| r.condition.window_ms())
            .max();
        let mut out = Vec::new();
        for d in depths {
            let oldest = stats
                .iter()
                .filter(|s| s.queue == d.queue)
                .filter_map(|s| s.oldest_dead_at_ms)
                .min();
            let dead_in_window = match window {
                Some(w) => {
                    let filter = DeadFilter {
                        queue: QueueName::new(&d.queue).ok(),
                        since_ms: Some(now - w),
                        ..DeadFilter::default()
                    };
                    self.triage.count(filter).await?
                }
                None => 0,
            };
            let breakers_open = breakers.iter().filter(|b| b.queue == d.queue).count() as u64;
            out.push(Observation {
                queue: d.queue,
                dlq_depth: d.dlq,
                oldest_dead_age_ms: oldest.map(|o| (now - o).max(0)),
                dead_in_window,
                breakers_open,
            });
        }
        Ok(out)
    }

    /// Evaluates every rule at `now_ms` and persists the transitions with their
    /// notifications. Returns the transitions.
    ///
    /// # Errors
    ///
    /// Fails when the backend cannot be read or the store written; nothing changes then.
    pub async fn evaluate(&self, now_ms: i64) -> Result<Vec<Transition>, BackendError> {
        let observations = self.observe(now_ms).await?;
        let states = self.store.open_alerts().await.map_err(boxed)?;
        let transitions = evaluate(&self.rules, &observations, &states, now_ms);
        if transitions.is_empty() {
            return Ok(transitions);
        }
        let mut notifications = Vec::new();
        for t in &transitions {
            let (kind, state) = match t {
                Transition::Fired(s) => (NotificationKind::Trigger, s),
                Transition::Resolved(s) => (NotificationKind::Resolve, s),
                _ => continue,
            };
            let Some(rule) = self.rules.iter().find(|r| r.name == state.rule) else {
                continue;
            };
            tracing::warn!(rule = %rule.name, queue = %state.queue, value = state.value, kind = kind.as_str(), "alert {}", if kind == NotificationKind::Trigger { "fired" } else { "resolved" });
            for notifier in &rule.notify {
                notifications.push(NewNotification {
                    notifier: notifier.clone(),
                    kind,
                    expr: rule.condition.to_string(),
                    state: state.clone(),
                });
            }
        }
        self.store
            .apply_transitions(transitions.clone(), notifications)
            .await
            .map_err(boxed)?;
        Ok(transitions)
    }

    /// Delivers the notifications due at `now_ms`; failures are retried later with
    /// exponential backoff (5 s, 10 s, 20 s … capped at 10 min), up to 12 attempts.
    ///
    /// # Errors
    ///
    /// Fails when the store cannot be read or written.
    pub async fn deliver(&self, now_ms: i64) -> Result<usize, BackendError> {
        let due = self
            .store
            .due_notifications(now_ms, 50)
            .await
            .map_err(boxed)?;
        let mut sent = 0;
        for n in due {
            let ctx = self.context(&n.queue).await;
            let result = self.notifiers.send(&n, &ctx).await;
            let record = match result {
                Ok(()) => {
                    sent += 1;
                    self.metrics
                        .notification(&n.notifier, n.kind.as_str(), "sent");
                    Ok(now_ms)
                }
                Err(e) => {
                    let attempts = n.attempts + 1;
                    let give_up = !e.retryable || attempts >= MAX_ATTEMPTS;
                    self.metrics.notification(
                        &n.notifier,
                        n.kind.as_str(),
                        if give_up { "gave_up" } else { "failed" },
                    );
                    tracing::warn!(notifier = %n.notifier, rule = %n.rule, queue = %n.queue, attempts, error = %e.message, give_up, "notification failed");
                    let backoff = (5_000i64 << (attempts - 1).min(7)).min(600_000);
                    Err((e.message, (!give_up).then_some(now_ms + backoff)))
                }
            };
            self.store
                .record_delivery(n.id, record)
                .await
                .map_err(boxed)?;
        }
        Ok(sent)
    }

    async fn context(&self, queue: &str) -> Context {
        let filter = DeadFilter {
            queue: QueueName::new(queue).ok(),
            ..DeadFilter::default()
        };
        let top_groups = self
            .triage
            .groups(filter.clone(), 3)
            .await
            .unwrap_or_default();
        let dlq_depth = self.triage.count(filter).await.unwrap_or(0);
        let link = format!(
            "{}/groups?queue={}",
            self.public_url,
            crate::ui::url_encode(queue)
        );
        Context {
            dlq_depth,
            top_groups,
            link,
        }
    }

    /// Evaluates and delivers every `every`, forever, in the rounds this process leads:
    /// of all the processes sharing the store, one at a time evaluates and sends
    /// ([`AlertStore::lead`]), and when it dies another takes over once its lease of
    /// three rounds (at least 1 s, at most a minute) has run out.
    pub async fn run(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let holder = redrive_core::MessageId::new().to_string();
        let lease = (every * 3).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(60_000);
        let mut leading = false;
        loop {
            tick.tick().await;
            let now = now_ms();
            match self.store.lead("alerts", &holder, now, lease_ms).await {
                Ok(true) if !leading => {
                    leading = true;
                    tracing::info!(%holder, "this process evaluates alerts and sends notifications");
                }
                Ok(true) => {}
                Ok(false) => {
                    if leading {
                        tracing::warn!(%holder, "another process now evaluates alerts");
                    }
                    leading = false;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot tell whether this process leads alerting; skipping the round");
                    continue;
                }
            }
            if let Err(e) = self.evaluate(now).await {
                tracing::error!(error = %e, "alert evaluation failed");
            }
            if let Err(e) = self.deliver(now).await {
                tracing::error!(error = %e, "notification delivery failed");
            }
        }
    }
}

impl<S: AlertStore + Clone + 'static> AlertView for Alerting<S> {
    fn open(&self) -> BoxFuture<'_, Vec<AlertState>> {
        Box::pin(async move { self.store.open_alerts().await.map_err(boxed) })
    }

    fn past(&self, limit: usize) -> BoxFuture<'_, Vec<AlertState>> {
        Box::pin(async move { self.store.past_alerts(limit).await.map_err(boxed) })
    }

    fn notifications(&self, limit: usize) -> BoxFuture<'_, Vec<Notification>> {
        Box::pin(async move { self.store.recent_notifications(limit).await.map_err(boxed) })
    }

    fn rules(&self) -> Vec<(String, String, String)> {
        self.rules
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    r.condition.to_string(),
                    r.queue.clone().unwrap_or_else(|| "every queue".to_owned()),
                )
            })
            .collect()
    }
}
