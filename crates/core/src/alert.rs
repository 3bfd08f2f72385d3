//! Alert rules and their state machine: when a DLQ condition has held long enough to
//! page someone, and when it has cleared.
//!
//! The engine is pure: it takes the time and what was observed, and returns the
//! transitions to persist and notify. A caller runs it on a timer with the real clock;
//! tests run it with any clock they like.

use std::fmt;
use std::time::Duration;

use crate::duration::{format_duration, parse_duration};

/// What a rule watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// `dlq_depth > N for DUR`: more than N dead messages, continuously for DUR.
    DlqDepth {
        /// N.
        above: u64,
        /// DUR (zero: at once).
        for_ms: i64,
    },
    /// `oldest_dead_age > DUR`: the oldest dead message is older than DUR.
    OldestDeadAge {
        /// DUR in ms.
        above_ms: i64,
    },
    /// `dead_letter_rate > N per DUR`: more than N messages died within the last DUR.
    DeadLetterRate {
        /// N.
        above: u64,
        /// DUR in ms.
        per_ms: i64,
    },
    /// `breaker_open`: a consumer's outage breaker on the queue is open (its upstream
    /// seems down). Fires as `breaker.opened`, resolves as `breaker.closed`.
    BreakerOpen,
}

/// Why a rule expression was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid alert rule {rule:?}: {reason}; expected `dlq_depth > N for DUR`, `oldest_dead_age > DUR` or `dead_letter_rate > N per DUR`"
)]
pub struct RuleError {
    /// The rule text.
    pub rule: String,
    /// What is wrong.
    pub reason: String,
}

impl Condition {
    /// Parses a rule expression.
    ///
    /// # Errors
    ///
    /// A [`RuleError`] naming the expression and what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, RuleError> {
        let bad = |reason: &str| RuleError {
            rule: text.to_owned(),
            reason: reason.to_owned(),
        };
        let words: Vec<&str> = text.split_whitespace().collect();
        let ms = |w: &str| -> Result<i64, RuleError> {
            let d = parse_duration(w).map_err(|e| bad(&e.to_string()))?;
            Ok(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        };
        let n = |w: &str| {
            w.parse::<u64>()
                .map_err(|_| bad(&format!("{w:?} is not a whole number")))
        };
        match words.as_slice() {
            ["breaker_open"] => Ok(Self::BreakerOpen),
            ["dlq_depth", ">", count] => Ok(Self::DlqDepth {
                above: n(count)?,
                for_ms: 0,
            }),
            ["dlq_depth", ">", count, "for", dur] => Ok(Self::DlqDepth {
                above: n(count)?,
                for_ms: ms(dur)?,
            }),
            ["oldest_dead_age", ">", dur] => Ok(Self::OldestDeadAge { above_ms: ms(dur)? }),
            ["dead_letter_rate", ">", count, "per", dur] => {
                let per_ms = ms(dur)?;
                if per_ms == 0 {
                    return Err(bad("the window must be longer than zero"));
                }
                Ok(Self::DeadLetterRate {
                    above: n(count)?,
                    per_ms,
                })
            }
            [first, ..]
                if ![
                    "dlq_depth",
                    "oldest_dead_age",
                    "dead_letter_rate",
                    "breaker_open",
                ]
                .contains(first) =>
            {
                Err(bad(&format!("unknown measure {first:?}")))
            }
            _ => Err(bad("it does not have the expected shape")),
        }
    }

    /// How long the condition must hold before the alert fires.
    #[must_use]
    pub fn hold_ms(&self) -> i64 {
        match self {
            Self::DlqDepth { for_ms, .. } => *for_ms,
            _ => 0,
        }
    }

    /// Whether an observation breaks the rule, and the value that was compared.
    #[must_use]
    pub fn breached(&self, o: &Observation) -> (bool, u64) {
        match self {
            Self::DlqDepth { above, .. } => (o.dlq_depth > *above, o.dlq_depth),
            Self::OldestDeadAge { above_ms } => {
                let age = o.oldest_dead_age_ms.unwrap_or(0);
                (
                    o.oldest_dead_age_ms.is_some_and(|a| a > *above_ms),
                    u64::try_from(age).unwrap_or(0),
                )
            }
            Self::DeadLetterRate { above, .. } => (o.dead_in_window > *above, o.dead_in_window),
            Self::BreakerOpen => (o.breakers_open > 0, o.breakers_open),
        }
    }

    /// The rate window, for observers that need to count recent deaths.
    #[must_use]
    pub fn window_ms(&self) -> Option<i64> {
        match self {
            Self::DeadLetterRate { per_ms, .. } => Some(*per_ms),
            _ => None,
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = |ms: i64| format_duration(Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
        match self {
            Self::DlqDepth { above, for_ms: 0 } => write!(f, "dlq_depth > {above}"),
            Self::DlqDepth { above, for_ms } => write!(f, "dlq_depth > {above} for {}", d(*for_ms)),
            Self::OldestDeadAge { above_ms } => write!(f, "oldest_dead_age > {}", d(*above_ms)),
            Self::DeadLetterRate { above, per_ms } => {
                write!(f, "dead_letter_rate > {above} per {}", d(*per_ms))
            }
            Self::BreakerOpen => f.write_str("breaker_open"),
        }
    }
}

/// A named rule, for one queue or each queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Its name, part of the dedup key: keep it stable.
    pub name: String,
    /// What it watches.
    pub condition: Condition,
    /// One queue, or every queue (`None`), each alerting on its own.
    pub queue: Option<String>,
    /// Notifier names to tell.
    pub notify: Vec<String>,
}

impl Rule {
    /// The breaker rule, on beside the default rule: pages when a consumer's outage
    /// breaker opens, and again when it closes.
    #[must_use]
    pub fn breaker_rule(notify: Vec<String>) -> Self {
        Self {
            name: "breaker".to_owned(),
            condition: Condition::BreakerOpen,
            queue: None,
            notify,
        }
    }

    /// The default rule: any DLQ depth above 0 for 5 minutes, every queue
    /// (docs/design.md, "Triage, paging, retention, security").
    #[must_use]
    pub fn default_rule(notify: Vec<String>) -> Self {
        Self {
            name: "dlq-not-empty".to_owned(),
            condition: Condition::DlqDepth {
                above: 0,
                for_ms: 5 * 60_000,
            },
            queue: None,
            notify,
        }
    }
}

/// What was measured for one queue at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// The queue.
    pub queue: String,
    /// Dead messages now.
    pub dlq_depth: u64,
    /// Age of the oldest dead message.
    pub oldest_dead_age_ms: Option<i64>,
    /// Messages that died within the rate window of the rule being evaluated.
    pub dead_in_window: u64,
    /// Consumers whose outage breaker on the queue is open.
    pub breakers_open: u64,
}

/// Where one (rule, queue) alert stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertPhase {
    /// The condition holds but not for long enough yet.
    Pending,
    /// Paged.
    Firing,
    /// Cleared after firing.
    Resolved,
}

impl AlertPhase {
    /// The stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Firing => "firing",
            Self::Resolved => "resolved",
        }
    }

    /// Parses [`AlertPhase::as_str`].
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "pending" => Some(Self::Pending),
            "firing" => Some(Self::Firing),
            "resolved" => Some(Self::Resolved),
            _ => None,
        }
    }
}

/// The persisted state of one (rule, queue) alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertState {
    /// Rule name.
    pub rule: String,
    /// Queue.
    pub queue: String,
    /// Phase.
    pub phase: AlertPhase,
    /// When the condition started to hold (unix ms).
    pub since_ms: i64,
    /// When it fired.
    pub fired_ms: Option<i64>,
    /// When it resolved.
    pub resolved_ms: Option<i64>,
    /// The last compared value.
    pub value: u64,
}

impl AlertState {
    /// The stable key a pager uses to tie trigger and resolve together.
    #[must_use]
    pub fn dedup_key(&self) -> String {
        dedup_key(&self.rule, &self.queue)
    }
}

/// `redrive/<rule>/<queue>`: stable across restarts and releases.
#[must_use]
pub fn dedup_key(rule: &str, queue: &str) -> String {
    format!("redrive/{rule}/{queue}")
}

/// A change to announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Started pending (store only, nobody is told).
    Pending(AlertState),
    /// Fired: page.
    Fired(AlertState),
    /// Cleared: resolve the page.
    Resolved(AlertState),
    /// The condition stopped before the alert fired: forget it.
    Cancelled(AlertState),
    /// Still firing or pending with a new value (store only).
    Updated(AlertState),
}

/// Evaluates `rules` against `observations` at `now_ms`, given the current `states`.
/// Returns the transitions to persist (and, for fire / resolve, to notify).
#[must_use]
pub fn evaluate(
    rules: &[Rule],
    observations: &[Observation],
    states: &[AlertState],
    now_ms: i64,
) -> Vec<Transition> {
    let mut out = Vec::new();
    for rule in rules {
        for o in observations
            .iter()
            .filter(|o| rule.queue.as_ref().is_none_or(|q| *q == o.queue))
        {
            let (breached, value) = rule.condition.breached(o);
            let current = states.iter().find(|s| {
                s.rule == rule.name && s.queue == o.queue && s.phase != AlertPhase::Resolved
            });
            match (current, breached) {
                (None, true) => {
                    let state = AlertState {
                        rule: rule.name.clone(),
                        queue: o.queue.clone(),
                        phase: AlertPhase::Pending,
                        since_ms: now_ms,
                        fired_ms: None,
                        resolved_ms: None,
                        value,
                    };
                    if rule.condition.hold_ms() == 0 {
                        out.push(Transition::Fired(AlertState {
                            phase: AlertPhase::Firing,
                            fired_ms: Some(now_ms),
                            ..state
                        }));
                    } else {
                        out.push(Transition::Pending(state));
                    }
                }
                (Some(s), true)
                    if s.phase == AlertPhase::Pending
                        && now_ms - s.since_ms >= rule.condition.hold_ms() =>
                {
                    out.push(Transition::Fired(AlertState {
                        phase: AlertPhase::Firing,
                        fired_ms: Some(now_ms),
                        value,
                        ..s.clone()
                    }));
                }
                (Some(s), true) => {
                    if s.value != value {
                        out.push(Transition::Updated(AlertState { value, ..s.clone() }));
                    }
                }
                (Some(s), false) if s.phase == AlertPhase::Firing => {
                    out.push(Transition::Resolved(AlertState {
                        phase: AlertPhase::Resolved,
                        resolved_ms: Some(now_ms),
                        value,
                        ..s.clone()
                    }));
                }
                (Some(s), false) => out.push(Transition::Cancelled(s.clone())),
                (None, false) => {}
            }
        }
        // A queue that vanished from the observations has nothing dead: clear its alerts.
        for s in states
            .iter()
            .filter(|s| s.rule == rule.name && s.phase != AlertPhase::Resolved)
        {
            if !observations.iter().any(|o| o.queue == s.queue) {
                let cleared = Observation {
                    queue: s.queue.clone(),
                    ..Observation::default()
                };
                let (breached, _) = rule.condition.breached(&cleared);
                if !breached {
                    out.push(match s.phase {
                        AlertPhase::Firing => Transition::Resolved(AlertState {
                            phase: AlertPhase::Resolved,
                            resolved_ms: Some(now_ms),
                            value: 0,
                            ..s.clone()
                        }),
                        _ => Transition::Cancelled(s.clone()),
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(queue: &str, depth: u64) -> Observation {
        Observation {
            queue: queue.to_owned(),
            dlq_depth: depth,
            oldest_dead_age_ms: (depth > 0).then_some(1000),
            dead_in_window: 0,
            breakers_open: 0,
        }
    }

    fn apply(states: &mut Vec<AlertState>, transitions: &[Transition]) {
        for t in transitions {
            let s = match t {
                Transition::Pending(s)
                | Transition::Fired(s)
                | Transition::Resolved(s)
                | Transition::Updated(s) => s.clone(),
                Transition::Cancelled(s) => {
                    states.retain(|x| !(x.rule == s.rule && x.queue == s.queue));
                    continue;
                }
            };
            states.retain(|x| !(x.rule == s.rule && x.queue == s.queue));
            states.push(s);
        }
    }

    #[test]
    fn parses_and_prints_rules() {
        let table = [
            (
                "dlq_depth > 0 for 5m",
                Condition::DlqDepth {
                    above: 0,
                    for_ms: 300_000,
                },
            ),
            (
                "dlq_depth > 10",
                Condition::DlqDepth {
                    above: 10,
                    for_ms: 0,
                },
            ),
            (
                "oldest_dead_age > 1h",
                Condition::OldestDeadAge {
                    above_ms: 3_600_000,
                },
            ),
            (
                "dead_letter_rate > 100 per 10m",
                Condition::DeadLetterRate {
                    above: 100,
                    per_ms: 600_000,
                },
            ),
        ];
        for (text, want) in table {
            let c = Condition::parse(text).unwrap();
            assert_eq!(c, want);
            assert_eq!(c.to_string(), text);
        }
        for bad in [
            "dlq_depth >= 0",
            "dlq_depth > x for 5m",
            "dlq_depth > 0 for 5x",
            "queue_depth > 3",
            "dead_letter_rate > 1 per 0s",
            "",
        ] {
            let err = Condition::parse(bad).unwrap_err();
            assert!(
                err.to_string().contains("expected `dlq_depth > N for DUR`"),
                "{err}"
            );
        }
    }

    #[test]
    fn fires_after_the_hold_and_resolves_once() {
        let rules = [Rule::default_rule(vec![])];
        let mut states = Vec::new();
        let mut fired = 0;
        let mut resolved = 0;
        let min = 60_000;
        // DLQ non-empty from t=0 to t=9m, evaluated every 30s.
        for step in 0..40 {
            let now = step * 30_000;
            let depth = if now < 9 * min { 3 } else { 0 };
            let t = evaluate(&rules, &[obs("agent.tasks", depth)], &states, now);
            for tr in &t {
                match tr {
                    Transition::Fired(s) => {
                        fired += 1;
                        assert_eq!(
                            s.fired_ms,
                            Some(5 * min),
                            "fires exactly when 5m have passed"
                        );
                    }
                    Transition::Resolved(s) => {
                        resolved += 1;
                        assert_eq!(s.resolved_ms, Some(9 * min));
                        assert_eq!(s.dedup_key(), "redrive/dlq-not-empty/agent.tasks");
                    }
                    _ => {}
                }
            }
            apply(&mut states, &t);
        }
        assert_eq!((fired, resolved), (1, 1));
    }

    #[test]
    fn a_blip_shorter_than_the_hold_never_fires() {
        let rules = [Rule::default_rule(vec![])];
        let mut states = Vec::new();
        for (now, depth) in [
            (0, 1),
            (60_000, 1),
            (120_000, 0),
            (180_000, 1),
            (240_000, 1),
        ] {
            let t = evaluate(&rules, &[obs("q", depth)], &states, now);
            assert!(
                !t.iter().any(|t| matches!(t, Transition::Fired(_))),
                "fired at {now}"
            );
            apply(&mut states, &t);
        }
        assert_eq!(
            states[0].since_ms, 180_000,
            "the hold restarts after the blip"
        );
    }

    #[test]
    fn per_queue_alerts_and_instant_rules() {
        let rules = [
            Rule {
                name: "old".into(),
                condition: Condition::parse("oldest_dead_age > 1h").unwrap(),
                queue: None,
                notify: vec![],
            },
            Rule {
                name: "rate".into(),
                condition: Condition::parse("dead_letter_rate > 5 per 1m").unwrap(),
                queue: Some("b".into()),
                notify: vec![],
            },
        ];
        let o = [
            Observation {
                queue: "a".into(),
                dlq_depth: 1,
                oldest_dead_age_ms: Some(2 * 3_600_000),
                dead_in_window: 9,
                breakers_open: 0,
            },
            Observation {
                queue: "b".into(),
                dlq_depth: 1,
                oldest_dead_age_ms: Some(60_000),
                dead_in_window: 9,
                breakers_open: 0,
            },
        ];
        let t = evaluate(&rules, &o, &[], 0);
        let fired: Vec<(String, String)> = t
            .iter()
            .filter_map(|t| {
                if let Transition::Fired(s) = t {
                    Some((s.rule.clone(), s.queue.clone()))
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(
            fired,
            [
                ("old".to_owned(), "a".to_owned()),
                ("rate".to_owned(), "b".to_owned())
            ]
        );
    }

    #[test]
    fn a_queue_that_disappears_resolves() {
        let rules = [Rule {
            name: "r".into(),
            condition: Condition::parse("dlq_depth > 0").unwrap(),
            queue: None,
            notify: vec![],
        }];
        let mut states = Vec::new();
        let t = evaluate(&rules, &[obs("gone", 2)], &states, 0);
        apply(&mut states, &t);
        assert_eq!(states[0].phase, AlertPhase::Firing);
        let t = evaluate(&rules, &[], &states, 1000);
        assert!(matches!(t.as_slice(), [Transition::Resolved(s)] if s.queue == "gone"));
    }
}

/// Trigger or resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotificationKind {
    /// The alert fired.
    Trigger,
    /// The alert cleared.
    Resolve,
}

impl NotificationKind {
    /// The stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trigger => "trigger",
            Self::Resolve => "resolve",
        }
    }
}

/// A notification waiting in (or sent from) the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Outbox id.
    pub id: i64,
    /// The notifier's name.
    pub notifier: String,
    /// Trigger or resolve.
    pub kind: NotificationKind,
    /// The rule's name.
    pub rule: String,
    /// The rule's expression, for the message.
    pub expr: String,
    /// The queue.
    pub queue: String,
    /// The value that crossed the threshold.
    pub value: u64,
    /// When the transition happened (unix ms).
    pub at_ms: i64,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// The last delivery error, if any.
    pub last_error: Option<String>,
    /// When it was delivered.
    pub sent_ms: Option<i64>,
    /// Given up after too many failures.
    pub failed: bool,
}

impl Notification {
    /// The pager's dedup key for this alert.
    #[must_use]
    pub fn dedup_key(&self) -> String {
        dedup_key(&self.rule, &self.queue)
    }
}

/// A notification to enqueue with a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewNotification {
    /// The notifier's name.
    pub notifier: String,
    /// Trigger or resolve.
    pub kind: NotificationKind,
    /// The rule's expression.
    pub expr: String,
    /// The state it announces.
    pub state: AlertState,
}

impl Transition {
    /// `(rule, queue, kind)` of the notification this transition announces: `Fired` a
    /// trigger, `Resolved` a resolve, the others none.
    #[must_use]
    pub fn announces(&self) -> Option<(String, String, NotificationKind)> {
        match self {
            Self::Fired(s) => Some((s.rule.clone(), s.queue.clone(), NotificationKind::Trigger)),
            Self::Resolved(s) => Some((s.rule.clone(), s.queue.clone(), NotificationKind::Resolve)),
            Self::Pending(_) | Self::Cancelled(_) | Self::Updated(_) => None,
        }
    }
}

/// The notifications to enqueue for the transitions a store actually applied: `changed`
/// holds `(rule, queue, kind)` of each `Fired` or `Resolved` that changed the stored
/// phase. One applied a second time (two evaluators racing, a round repeated after a
/// crash) changes nothing and so announces nothing: a page is sent once.
#[must_use]
pub fn announced(
    notifications: Vec<NewNotification>,
    changed: &[(String, String, NotificationKind)],
) -> Vec<NewNotification> {
    notifications
        .into_iter()
        .filter(|n| {
            changed.iter().any(|(rule, queue, kind)| {
                *rule == n.state.rule && *queue == n.state.queue && *kind == n.kind
            })
        })
        .collect()
}

/// Capability: persist alert state and the notification outbox, so a restart neither
/// pages again for an open alert nor forgets a pending one or an unsent page.
pub trait AlertStore: Send + Sync {
    /// Alerts that are pending or firing.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn open_alerts(
        &self,
    ) -> impl std::future::Future<Output = Result<Vec<AlertState>, crate::StoreError>> + Send;

    /// Recently resolved alerts, newest first.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn past_alerts(
        &self,
        limit: usize,
    ) -> impl std::future::Future<Output = Result<Vec<AlertState>, crate::StoreError>> + Send;

    /// Applies transitions and enqueues their notifications in one transaction.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable; then nothing was applied.
    fn apply_transitions(
        &self,
        transitions: Vec<Transition>,
        notifications: Vec<NewNotification>,
    ) -> impl std::future::Future<Output = Result<(), crate::StoreError>> + Send;

    /// Notifications due for delivery at `now_ms`, oldest first.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn due_notifications(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> impl std::future::Future<Output = Result<Vec<Notification>, crate::StoreError>> + Send;

    /// Records a delivery attempt: sent, or failed with an error and the next try
    /// (`None` when giving up).
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn record_delivery(
        &self,
        id: i64,
        result: Result<i64, (String, Option<i64>)>,
    ) -> impl std::future::Future<Output = Result<(), crate::StoreError>> + Send;

    /// The latest notifications, newest first (for the UI).
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn recent_notifications(
        &self,
        limit: usize,
    ) -> impl std::future::Future<Output = Result<Vec<Notification>, crate::StoreError>> + Send;

    /// Takes or keeps, for `for_ms` from `now_ms`, the right to do `role` (`alerts`:
    /// evaluate rules and send notifications; `retention`: sweep) as `holder`; `false`
    /// while another holder's lease runs. Many processes share a store that has more
    /// than one host behind it; each calls this before each round, and the one that
    /// gets `true` does the round, so a page is sent once. A holder that dies is
    /// replaced once its lease runs out. A store only one process opens (SQLite's file)
    /// keeps the default: always `true`.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable; the caller then skips the round.
    fn lead(
        &self,
        role: &str,
        holder: &str,
        now_ms: i64,
        for_ms: i64,
    ) -> impl std::future::Future<Output = Result<bool, crate::StoreError>> + Send {
        let _ = (role, holder, now_ms, for_ms);
        async { Ok(true) }
    }
}
