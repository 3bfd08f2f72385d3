//! Notifiers: Slack incoming webhooks, PagerDuty Events API v2 and a generic JSON
//! webhook. Their URLs and keys are secrets: never logged, never in `Debug` output,
//! never in stored error messages.

use std::collections::BTreeMap;
use std::time::Duration;

use redrive_core::DeadGroup;
use redrive_core::alert::{Notification, NotificationKind};
use serde_json::{Value, json};

use crate::json::rfc3339;

/// PagerDuty's Events API v2 endpoint.
pub const PAGERDUTY_EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// One configured destination.
#[derive(Clone)]
pub enum Notifier {
    /// A Slack incoming webhook.
    Slack {
        /// The webhook URL (a secret).
        url: String,
    },
    /// PagerDuty Events API v2.
    PagerDuty {
        /// The integration's routing key (a secret).
        routing_key: String,
        /// The events endpoint (overridable for tests and EU accounts).
        url: String,
    },
    /// Any HTTP endpoint taking JSON.
    Webhook {
        /// The URL (may hold a secret).
        url: String,
    },
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

impl Notifier {
    /// `slack`, `pagerduty` or `webhook`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Slack { .. } => "slack",
            Self::PagerDuty { .. } => "pagerduty",
            Self::Webhook { .. } => "webhook",
        }
    }
}

/// What a message says besides the alert itself.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// Dead messages in the queue now.
    pub dlq_depth: u64,
    /// The largest error groups of the queue.
    pub top_groups: Vec<DeadGroup>,
    /// A link to the queue's groups in the triage UI.
    pub link: String,
}

/// Why a delivery failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError {
    /// Worth trying again (network, 429, 5xx).
    pub retryable: bool,
    /// What happened, safe to store and show (no URL, no key).
    pub message: String,
}

/// Escapes text for Slack's mrkdwn: the three control characters.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn first_line(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    if line.chars().count() <= max {
        line.to_owned()
    } else {
        format!("{}…", line.chars().take(max).collect::<String>())
    }
}

/// Whether a notification is a breaker event (`breaker.opened` / `breaker.closed`)
/// rather than a DLQ alert.
fn is_breaker(n: &Notification) -> bool {
    n.expr == redrive_core::alert::Condition::BreakerOpen.to_string()
}

/// The event a notification announces, as webhooks name it.
fn event(n: &Notification) -> &'static str {
    match (is_breaker(n), n.kind) {
        (true, NotificationKind::Trigger) => "breaker.opened",
        (true, NotificationKind::Resolve) => "breaker.closed",
        (false, NotificationKind::Trigger) => "alert.triggered",
        (false, NotificationKind::Resolve) => "alert.resolved",
    }
}

fn summary(n: &Notification) -> String {
    if is_breaker(n) {
        return match n.kind {
            NotificationKind::Trigger => format!(
                "{}: breaker.opened: the consumer's upstream seems down ({} consumer(s)); no new messages are taken and nothing is dead-lettered for the outage",
                n.queue, n.value
            ),
            NotificationKind::Resolve => format!(
                "{}: breaker.closed: a probe succeeded; the queue flows again",
                n.queue
            ),
        };
    }
    match n.kind {
        NotificationKind::Trigger => format!(
            "{}: DLQ alert {} ({}), value {}",
            n.queue, n.rule, n.expr, n.value
        ),
        NotificationKind::Resolve => {
            format!("{}: DLQ alert {} resolved ({})", n.queue, n.rule, n.expr)
        }
    }
}

/// The JSON body a notifier sends (documented in README; checked by tests).
#[must_use]
pub fn body(notifier: &Notifier, n: &Notification, ctx: &Context) -> Value {
    let top: Vec<Value> = ctx
        .top_groups
        .iter()
        .map(|g| json!({"fingerprint": g.fingerprint, "error_class": g.error_class, "count": g.count, "sample_error": first_line(&g.sample_error, 200)}))
        .collect();
    match notifier {
        Notifier::Slack { .. } => {
            let firing = n.kind == NotificationKind::Trigger;
            let head = if is_breaker(n) {
                format!(
                    "{} *{}*",
                    if firing {
                        ":warning:"
                    } else {
                        ":large_green_circle:"
                    },
                    slack_escape(&summary(n))
                )
            } else if firing {
                format!(
                    ":red_circle: *DLQ alert firing: {}*",
                    slack_escape(&n.queue)
                )
            } else {
                format!(
                    ":large_green_circle: *DLQ alert resolved: {}*",
                    slack_escape(&n.queue)
                )
            };
            let detail = format!(
                "Rule `{}`: `{}` · {} dead messages now",
                slack_escape(&n.rule),
                slack_escape(&n.expr),
                ctx.dlq_depth
            );
            let mut blocks = vec![
                json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("{head}\n{detail}")}}),
            ];
            if firing && !ctx.top_groups.is_empty() {
                let lines: Vec<String> = ctx
                    .top_groups
                    .iter()
                    .map(|g| {
                        format!(
                            "• {}× `{}` {}",
                            g.count,
                            slack_escape(&g.error_class),
                            slack_escape(&first_line(&g.sample_error, 120))
                        )
                    })
                    .collect();
                blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("*Top errors*\n{}", lines.join("\n"))}}));
            }
            blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("<{}|Open triage>", ctx.link)}}));
            json!({ "text": summary(n), "blocks": blocks })
        }
        Notifier::PagerDuty { routing_key, .. } => match n.kind {
            NotificationKind::Trigger => json!({
                "routing_key": routing_key,
                "event_action": "trigger",
                "dedup_key": n.dedup_key(),
                "payload": {
                    "summary": first_line(&summary(n), 1000),
                    "source": "redrive",
                    "severity": "error",
                    "component": n.queue,
                    "group": "redrive",
                    "class": n.rule,
                    "timestamp": rfc3339(n.at_ms),
                    "custom_details": {"rule": n.rule, "expr": n.expr, "value": n.value, "dlq_depth": ctx.dlq_depth, "top_errors": top}
                },
                "links": [{"href": ctx.link, "text": "Open triage"}],
                "client": "redrive",
                "client_url": ctx.link,
            }),
            NotificationKind::Resolve => json!({
                "routing_key": routing_key,
                "event_action": "resolve",
                "dedup_key": n.dedup_key(),
            }),
        },
        Notifier::Webhook { .. } => json!({
            "version": 1,
            "event": event(n),
            "rule": n.rule,
            "expr": n.expr,
            "queue": n.queue,
            "value": n.value,
            "dlq_depth": ctx.dlq_depth,
            "at": rfc3339(n.at_ms),
            "dedup_key": n.dedup_key(),
            "url": ctx.link,
            "top_errors": top,
        }),
    }
}

/// The configured notifiers, by name, with one HTTP client.
#[derive(Clone, Debug)]
pub struct Notifiers {
    by_name: BTreeMap<String, Notifier>,
    client: reqwest::Client,
}

impl Notifiers {
    /// Notifiers by name; requests time out after 10 s.
    ///
    /// # Errors
    ///
    /// Fails only if the HTTP client cannot be built.
    pub fn new(by_name: BTreeMap<String, Notifier>) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .user_agent(concat!("redrive/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { by_name, client })
    }

    /// The names, sorted.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    /// Sends one notification.
    ///
    /// # Errors
    ///
    /// A [`SendError`] saying whether to try again.
    pub async fn send(&self, n: &Notification, ctx: &Context) -> Result<(), SendError> {
        let Some(notifier) = self.by_name.get(&n.notifier) else {
            return Err(SendError {
                retryable: false,
                message: format!("no notifier named {:?} is configured", n.notifier),
            });
        };
        let url = match notifier {
            Notifier::Slack { url }
            | Notifier::Webhook { url }
            | Notifier::PagerDuty { url, .. } => url,
        };
        let response = self
            .client
            .post(url)
            .json(&body(notifier, n, ctx))
            .send()
            .await
            .map_err(|e| SendError {
                retryable: true,
                message: if e.is_timeout() {
                    "timed out".to_owned()
                } else {
                    "could not connect".to_owned()
                },
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text: String = response
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        Err(SendError {
            retryable: status.as_u16() == 429 || status.is_server_error() || status.as_u16() == 408,
            message: format!(
                "{} answered HTTP {status}: {}",
                notifier.kind(),
                text.trim()
            ),
        })
    }
}
