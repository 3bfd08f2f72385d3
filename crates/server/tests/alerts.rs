//! Alert rules and notifiers with a controllable clock and local HTTP receivers standing
//! in for Slack, PagerDuty and a webhook.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::collections::BTreeMap;
use std::sync::Arc;

use redrive_conformance::http_sink::HttpSink;
use redrive_core::alert::{AlertPhase, AlertStore, Condition, Rule};
use redrive_core::{
    DeadFilter, DeadLetter, DeadLetterStore, DeadSelection, Envelope, Failure, FailureKind,
    QueueName,
};
use redrive_server::alerting::Alerting;
use redrive_server::notify::{Notifier, Notifiers};
use redrive_server::{LanesAndStore, Metrics, Triage};
use redrive_sqlite::{Sqlite, SqliteConfig};
use serde_json::Value;

const MIN: i64 = 60_000;
const T0: i64 = 1_800_000_000_000;

struct Sinks {
    slack: HttpSink,
    pagerduty: HttpSink,
    webhook: HttpSink,
}

async fn sinks() -> Sinks {
    Sinks {
        slack: HttpSink::start().await,
        pagerduty: HttpSink::start().await,
        webhook: HttpSink::start().await,
    }
}

fn alerting(
    store: &Sqlite,
    sinks: &Sinks,
    rules: Vec<Rule>,
    metrics: Arc<Metrics>,
) -> Alerting<Sqlite> {
    let notifiers = Notifiers::new(BTreeMap::from([
        (
            "slack".to_owned(),
            Notifier::Slack {
                url: format!("{}/services/T0/B0/secret", sinks.slack.url),
            },
        ),
        (
            "pd".to_owned(),
            Notifier::PagerDuty {
                routing_key: "R0UT1NG".into(),
                url: format!("{}/v2/enqueue", sinks.pagerduty.url),
            },
        ),
        (
            "hook".to_owned(),
            Notifier::Webhook {
                url: format!("{}/hook", sinks.webhook.url),
            },
        ),
    ]))
    .unwrap();
    let triage: Arc<dyn Triage> = Arc::new(LanesAndStore::new(store.clone(), store.clone()));
    Alerting::new(
        store.clone(),
        triage,
        rules,
        notifiers,
        "http://triage.example:8080/".into(),
        metrics,
    )
}

fn default_rule() -> Vec<Rule> {
    vec![Rule::default_rule(vec![
        "slack".into(),
        "pd".into(),
        "hook".into(),
    ])]
}

async fn kill(store: &Sqlite, queue: &str, n: usize, at: i64) {
    let rows: Vec<DeadLetter> = (0..n)
        .map(|i| {
            let mut env =
                Envelope::new(QueueName::new(queue).unwrap(), format!("{{\"task\":{i}}}"));
            env.record_failure(
                Failure::new(
                    FailureKind::Retry,
                    "RateLimited",
                    format!("429 <b>slow</b> down {i}"),
                    at,
                ),
                "main",
            );
            DeadLetter {
                envelope: env,
                dead_at_ms: at,
            }
        })
        .collect();
    store.insert_batch(&rows).await.unwrap();
}

fn open(dir: &std::path::Path) -> Sqlite {
    SqliteConfig::new(dir.join("alerts.db")).open().unwrap()
}

#[tokio::test]
async fn the_default_rule_pages_once_after_five_minutes_and_resolves_once_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let sinks = sinks().await;
    let store = open(dir.path());
    kill(&store, "agent.tasks", 3, T0).await;
    let metrics = Arc::new(Metrics::new());
    let a = alerting(&store, &sinks, default_rule(), Arc::clone(&metrics));

    // Non-empty for 4m59s: pending, nobody paged.
    for t in [0, MIN, 4 * MIN + 59_000] {
        a.evaluate(T0 + t).await.unwrap();
        a.deliver(T0 + t).await.unwrap();
    }
    assert!(sinks.pagerduty.received().is_empty());
    assert_eq!(
        store.open_alerts().await.unwrap()[0].phase,
        AlertPhase::Pending
    );

    // A restart while pending: the new process keeps counting from the same start.
    let a = alerting(&store, &sinks, default_rule(), Arc::clone(&metrics));
    a.evaluate(T0 + 5 * MIN).await.unwrap();
    a.deliver(T0 + 5 * MIN).await.unwrap();
    let pd = sinks.pagerduty.json_bodies();
    assert_eq!(pd.len(), 1, "exactly one trigger");
    assert_eq!(pd[0]["event_action"], "trigger");
    assert_eq!(pd[0]["routing_key"], "R0UT1NG");
    assert_eq!(pd[0]["dedup_key"], "redrive/dlq-not-empty/agent.tasks");
    assert_eq!(pd[0]["payload"]["source"], "redrive");
    assert_eq!(pd[0]["payload"]["severity"], "error");
    assert_eq!(pd[0]["payload"]["component"], "agent.tasks");
    assert!(
        pd[0]["payload"]["summary"]
            .as_str()
            .unwrap()
            .contains("dlq_depth > 0 for 5m")
    );
    assert_eq!(pd[0]["payload"]["custom_details"]["dlq_depth"], 3);
    assert_eq!(
        pd[0]["links"][0]["href"],
        "http://triage.example:8080/groups?queue=agent.tasks"
    );

    // Another restart while firing, and more evaluations: no second page.
    let a = alerting(&store, &sinks, default_rule(), Arc::clone(&metrics));
    for t in [6, 7, 8] {
        a.evaluate(T0 + t * MIN).await.unwrap();
        a.deliver(T0 + t * MIN).await.unwrap();
    }
    assert_eq!(sinks.pagerduty.received().len(), 1);

    // The DLQ empties: exactly one resolve, same dedup key.
    store
        .purge(
            &DeadSelection::Filter(DeadFilter::default()),
            "test",
            "fixed",
        )
        .await
        .unwrap();
    for t in [9, 10] {
        a.evaluate(T0 + t * MIN).await.unwrap();
        a.deliver(T0 + t * MIN).await.unwrap();
    }
    let pd = sinks.pagerduty.json_bodies();
    assert_eq!(pd.len(), 2);
    assert_eq!(pd[1]["event_action"], "resolve");
    assert_eq!(pd[1]["dedup_key"], pd[0]["dedup_key"]);
    assert_eq!(
        store.past_alerts(10).await.unwrap()[0].resolved_ms,
        Some(T0 + 9 * MIN)
    );

    // Slack and the webhook got the same two events in their own formats.
    let slack = sinks.slack.json_bodies();
    assert_eq!(slack.len(), 2);
    let blocks = slack[0]["blocks"].to_string();
    assert!(
        blocks.contains("DLQ alert firing: agent.tasks") && blocks.contains("3× `RateLimited`"),
        "{blocks}"
    );
    assert!(
        blocks.contains("&lt;b&gt;slow&lt;/b&gt;"),
        "error text is escaped for Slack: {blocks}"
    );
    assert!(blocks.contains("<http://triage.example:8080/groups?queue=agent.tasks|Open triage>"));
    assert!(slack[1]["text"].as_str().unwrap().contains("resolved"));
    assert!(
        sinks.slack.received()[0]
            .request_line
            .starts_with("POST /services/T0/B0/secret ")
    );
    let hook = sinks.webhook.json_bodies();
    let events: Vec<&str> = hook.iter().map(|h| h["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["alert.triggered", "alert.resolved"]);
    assert_eq!(hook[0]["version"], 1);
    assert_eq!(hook[0]["top_errors"][0]["count"], 3);
    assert_eq!(hook[0]["at"], "2027-01-15T08:05:00.000Z");
}

#[tokio::test]
async fn failed_notifications_are_retried_with_backoff_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let sinks = sinks().await;
    let store = open(dir.path());
    kill(&store, "q", 1, T0).await;
    let metrics = Arc::new(Metrics::new());
    let rule = Rule {
        name: "now".into(),
        condition: Condition::parse("dlq_depth > 0").unwrap(),
        queue: None,
        notify: vec!["pd".into()],
    };
    let a = alerting(&store, &sinks, vec![rule], Arc::clone(&metrics));
    sinks.pagerduty.answer_next(&[503, 429]);
    a.evaluate(T0).await.unwrap();
    assert_eq!(a.deliver(T0).await.unwrap(), 0);
    assert_eq!(
        a.deliver(T0 + 1_000).await.unwrap(),
        0,
        "not due yet: backoff"
    );
    assert_eq!(
        a.deliver(T0 + 5_000).await.unwrap(),
        0,
        "second failure (429)"
    );
    assert_eq!(
        a.deliver(T0 + 14_000).await.unwrap(),
        0,
        "backoff doubled to 10 s"
    );
    assert_eq!(a.deliver(T0 + 15_000).await.unwrap(), 1);
    let notes = store.recent_notifications(5).await.unwrap();
    assert_eq!(
        (notes[0].attempts, notes[0].sent_ms),
        (3, Some(T0 + 15_000))
    );
    let text = metrics.encode().unwrap();
    assert!(
        text.contains(
            r#"redrive_alert_notifications_total{notifier="pd",kind="trigger",result="failed"} 2"#
        ),
        "{text}"
    );
    assert!(text.contains(
        r#"redrive_alert_notifications_total{notifier="pd",kind="trigger",result="sent"} 1"#
    ));
    // A permanent error (400) is not retried.
    kill(&store, "other", 1, T0).await;
    sinks.pagerduty.answer_next(&[400]);
    a.evaluate(T0 + 20_000).await.unwrap();
    a.deliver(T0 + 20_000).await.unwrap();
    let notes = store.recent_notifications(1).await.unwrap();
    assert!(
        notes[0].failed && notes[0].last_error.as_deref().unwrap().contains("HTTP 400"),
        "{:?}",
        notes[0]
    );
    assert!(
        !notes[0].last_error.as_deref().unwrap().contains("R0UT1NG"),
        "no secret in stored errors"
    );
}

#[tokio::test]
async fn age_and_rate_rules_fire_at_the_right_moment() {
    let dir = tempfile::tempdir().unwrap();
    let sinks = sinks().await;
    let store = open(dir.path());
    let rules = vec![
        Rule {
            name: "stale".into(),
            condition: Condition::parse("oldest_dead_age > 1h").unwrap(),
            queue: Some("a".into()),
            notify: vec!["hook".into()],
        },
        Rule {
            name: "burst".into(),
            condition: Condition::parse("dead_letter_rate > 5 per 10m").unwrap(),
            queue: None,
            notify: vec!["hook".into()],
        },
    ];
    let a = alerting(&store, &sinks, rules, Arc::new(Metrics::new()));
    kill(&store, "a", 1, T0).await;
    a.evaluate(T0 + 59 * MIN).await.unwrap();
    a.deliver(T0 + 59 * MIN).await.unwrap();
    assert!(
        sinks.webhook.json_bodies().is_empty(),
        "59 minutes old is not stale yet"
    );
    a.evaluate(T0 + 61 * MIN).await.unwrap();
    a.deliver(T0 + 61 * MIN).await.unwrap();
    let events: Vec<(String, String)> = sinks
        .webhook
        .json_bodies()
        .iter()
        .map(|b| {
            (
                b["rule"].as_str().unwrap().into(),
                b["event"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(events, [("stale".to_owned(), "alert.triggered".to_owned())]);
    kill(&store, "b", 6, T0 + 62 * MIN).await;
    a.evaluate(T0 + 63 * MIN).await.unwrap();
    a.deliver(T0 + 63 * MIN).await.unwrap();
    let last: Value = sinks.webhook.json_bodies().pop().unwrap();
    assert_eq!(
        (
            last["rule"].as_str(),
            last["queue"].as_str(),
            last["value"].as_u64()
        ),
        (Some("burst"), Some("b"), Some(6))
    );
    a.evaluate(T0 + 73 * MIN).await.unwrap();
    a.deliver(T0 + 73 * MIN).await.unwrap();
    let last: Value = sinks.webhook.json_bodies().pop().unwrap();
    assert_eq!(
        (last["rule"].as_str(), last["event"].as_str()),
        (Some("burst"), Some("alert.resolved")),
        "the burst left the window"
    );
}

/// A consumer's open breaker pages through the configured notifiers as
/// `breaker.opened`, and as `breaker.closed` once it closes; a report its consumer
/// stopped renewing (the consumer died) does not keep it open.
#[tokio::test]
async fn an_open_breaker_pages_as_breaker_opened_then_breaker_closed() {
    use redrive_core::{BreakerBoard, LaneSet, Transport, now_ms};
    let dir = tempfile::tempdir().unwrap();
    let sinks = sinks().await;
    let store = open(dir.path());
    store
        .create_lanes(&LaneSet {
            queue: QueueName::new("agent.tasks").unwrap(),
            tiers: Vec::new(),
        })
        .await
        .unwrap();
    let rules = vec![Rule::breaker_rule(vec!["hook".into(), "slack".into()])];
    let a = alerting(&store, &sinks, rules, Arc::new(Metrics::new()));
    let now = now_ms();
    store
        .report_breaker("agent.tasks", "consume (pid 7)", Some((now, now)))
        .await
        .unwrap();
    a.evaluate(T0).await.unwrap();
    a.deliver(T0).await.unwrap();
    let hook = sinks.webhook.json_bodies();
    assert_eq!(hook.len(), 1);
    assert_eq!(
        (
            hook[0]["event"].as_str(),
            hook[0]["rule"].as_str(),
            hook[0]["queue"].as_str(),
            hook[0]["value"].as_u64()
        ),
        (
            Some("breaker.opened"),
            Some("breaker"),
            Some("agent.tasks"),
            Some(1)
        )
    );
    let slack = sinks.slack.json_bodies();
    assert!(
        slack[0]["text"]
            .as_str()
            .unwrap()
            .contains("breaker.opened"),
        "{}",
        slack[0]
    );

    a.evaluate(T0 + MIN).await.unwrap();
    a.deliver(T0 + MIN).await.unwrap();
    assert_eq!(
        sinks.webhook.json_bodies().len(),
        1,
        "paged once while it stays open"
    );

    store
        .report_breaker("agent.tasks", "consume (pid 7)", None)
        .await
        .unwrap();
    a.evaluate(T0 + 2 * MIN).await.unwrap();
    a.deliver(T0 + 2 * MIN).await.unwrap();
    let last = sinks.webhook.json_bodies().pop().unwrap();
    assert_eq!(last["event"], "breaker.closed");

    // A consumer killed while its breaker was open stops renewing the report.
    store
        .report_breaker(
            "agent.tasks",
            "consume (pid 8)",
            Some((now - 300_000, now - 100_000)),
        )
        .await
        .unwrap();
    assert!(store.open_breakers(now).await.unwrap().is_empty());
    store
        .report_breaker(
            "agent.tasks",
            "consume (pid 9)",
            Some((now - 300_000, now - 10_000)),
        )
        .await
        .unwrap();
    let open = store.open_breakers(now).await.unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(
        (open[0].consumer.as_str(), open[0].since_ms),
        ("consume (pid 9)", now - 300_000)
    );
}
