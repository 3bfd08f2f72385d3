//! What every dead-letter store must do, written once and generic over the store:
//! inserts that a drain may repeat, listings in order with a cursor, every filter,
//! groups by fingerprint, replay and purge with their audit entries, the counts
//! metrics and alerts read, the alert state with its notification outbox, and what
//! retention needs (compression in place, whole days to archive, deletes after).
//!
//! A store joins by invoking [`store_conformance!`](crate::store_conformance) with an
//! expression that opens a fresh, empty store (and what must live as long as it).

#![allow(clippy::unwrap_used)] // Scenarios panic with the failing value; that is their job.

use redrive_core::alert::{
    AlertPhase, AlertState, AlertStore, NewNotification, NotificationKind, Transition,
};
use redrive_core::{
    AgentContext, BreakerBoard, Cost, Cursor, DeadFilter, DeadLetter, DeadLetterStore,
    DeadSelection, Envelope, Failure, FailureKind, ItemState, JobItem, JobState, MessageId,
    QueueName, ReplayJob, ReplayJobs, ReplayOutcome, RetentionStore,
};

/// A dead message of `queue` that failed with `class`/`message`, dead at `dead_at_ms`.
#[must_use]
pub fn dead(queue: &str, class: &str, message: &str, payload: &str, dead_at_ms: i64) -> DeadLetter {
    let queue = QueueName::new(queue).unwrap();
    let mut envelope = Envelope::new(queue, payload.to_owned());
    envelope.key = Some("k-1".into());
    envelope.headers = vec![("trace".into(), "t-1".into())];
    envelope.record_failure(
        Failure::new(
            FailureKind::Retry,
            class,
            "first try failed",
            dead_at_ms - 10,
        ),
        "main",
    );
    envelope.record_failure(
        Failure::new(FailureKind::Poison, class, message, dead_at_ms),
        "retry.5s",
    );
    DeadLetter {
        envelope,
        dead_at_ms,
    }
}

fn ids(letters: &[DeadLetter]) -> Vec<MessageId> {
    letters.iter().map(|d| d.envelope.id).collect()
}

/// Free-text search finds a substring of the error or the payload, exactly and
/// case-sensitively, follows purges and second deaths, and takes any characters as text.
pub async fn text_search_follows_every_change<S: DeadLetterStore>(s: &S) {
    let a = dead(
        "agent.tasks",
        "Timeout",
        "tool web_search timed out",
        "{\"doc\":\"needle-one\"}",
        1_000,
    );
    let b = dead(
        "agent.tasks",
        "Invalid",
        "bad json",
        "{\"doc\":\"needle-two\"}",
        2_000,
    );
    s.insert_batch(&[a.clone(), b.clone()]).await.unwrap();
    let search = |text: &str| {
        let filter = DeadFilter {
            text: Some(text.to_owned()),
            ..DeadFilter::default()
        };
        async move { ids(&s.list(&filter, None, 10).await.unwrap()) }
    };
    assert_eq!(search("web_search").await, ids(std::slice::from_ref(&a)));
    assert_eq!(search("needle-two").await, ids(std::slice::from_ref(&b)));
    assert_eq!(search("eedle").await, ids(&[a.clone(), b.clone()]));
    assert_eq!(search("Needle").await, [], "case-sensitive");
    assert_eq!(
        search("ne").await,
        ids(&[a.clone(), b.clone()]),
        "under 3 characters"
    );
    for hostile in [
        "\"needle\"",
        "needle\" OR \"bad",
        "NEAR(a b)",
        "*",
        "a\0b",
        "'; --",
    ] {
        assert_eq!(search(hostile).await, [], "{hostile:?} is text, not syntax");
    }

    let mut again = dead(
        "agent.tasks",
        "Quota",
        "quota exceeded",
        "{\"doc\":\"fresh\"}",
        9_000,
    );
    again.envelope.id = b.envelope.id;
    s.mark_replayed(&[b.envelope.id], "alice", "retry")
        .await
        .unwrap();
    assert_eq!(search("needle-two").await, [], "replayed: not dead");
    assert!(s.insert(&again).await.unwrap());
    assert_eq!(search("quota").await, ids(std::slice::from_ref(&again)));
    assert_eq!(search("needle-two").await, [], "dead again: its new text");

    let by_id = DeadSelection::Ids(vec![a.envelope.id]);
    assert_eq!(s.purge(&by_id, "bob", "noise").await.unwrap(), 1);
    assert_eq!(search("web_search").await, [], "purged");
    assert_eq!(
        s.count(&DeadFilter {
            text: Some("fresh".into()),
            ..DeadFilter::default()
        })
        .await
        .unwrap(),
        1
    );
}

/// A dead message reads back as it was stored, and storing it again (a drain that
/// repeats after a crash) changes nothing.
pub async fn an_insert_reads_back_and_repeats_harmlessly<S: DeadLetterStore>(s: &S) {
    let d = dead(
        "agent.tasks",
        "Invalid",
        "bad json at 3",
        "{\"x\":1}",
        1_000,
    );
    assert!(s.insert(&d).await.unwrap(), "the first insert stores it");
    assert!(!s.insert(&d).await.unwrap(), "the second does nothing");
    assert_eq!(s.insert_batch(std::slice::from_ref(&d)).await.unwrap(), 0);
    let back = s.get(&d.envelope.id).await.unwrap().expect("stored");
    assert_eq!(back, d, "every field, history included, reads back");
    assert_eq!(s.depth(None).await.unwrap(), 1);
    assert_eq!(s.get(&MessageId::new()).await.unwrap(), None);
}

/// Listings are oldest first, continue after a cursor, and honour every filter.
pub async fn listings_are_ordered_paged_and_filtered<S: DeadLetterStore>(s: &S) {
    let a = dead("agent.tasks", "Invalid", "bad json", "alpha", 1_000);
    let b = dead("agent.tasks", "Timeout", "model timed out", "beta", 2_000);
    let c = dead("billing", "Invalid", "bad json", "gamma", 3_000);
    assert_eq!(
        s.insert_batch(&[c.clone(), a.clone(), b.clone()])
            .await
            .unwrap(),
        3
    );

    let all = s.list(&DeadFilter::default(), None, 10).await.unwrap();
    assert_eq!(ids(&all), ids(&[a.clone(), b.clone(), c.clone()]));
    let first = s.list(&DeadFilter::default(), None, 2).await.unwrap();
    assert_eq!(ids(&first), ids(&[a.clone(), b.clone()]));
    let cursor = Cursor {
        dead_at_ms: b.dead_at_ms,
        id: b.envelope.id,
    };
    let rest = s
        .list(&DeadFilter::default(), Some(&cursor), 10)
        .await
        .unwrap();
    assert_eq!(ids(&rest), ids(std::slice::from_ref(&c)));

    let by = |f: DeadFilter| async move { ids(&s.list(&f, None, 10).await.unwrap()) };
    let queue = Some(QueueName::new("billing").unwrap());
    assert_eq!(
        by(DeadFilter {
            queue,
            ..DeadFilter::default()
        })
        .await,
        ids(std::slice::from_ref(&c))
    );
    let class = Some("Timeout".to_owned());
    assert_eq!(
        by(DeadFilter {
            error_class: class,
            ..DeadFilter::default()
        })
        .await,
        ids(std::slice::from_ref(&b))
    );
    let fingerprint = Some(a.envelope.last_failure().unwrap().fingerprint.to_string());
    assert_eq!(
        by(DeadFilter {
            fingerprint,
            ..DeadFilter::default()
        })
        .await,
        ids(&[a.clone(), c.clone()])
    );
    assert_eq!(
        by(DeadFilter {
            since_ms: Some(2_000),
            until_ms: Some(3_000),
            ..DeadFilter::default()
        })
        .await,
        ids(std::slice::from_ref(&b))
    );
    assert_eq!(
        by(DeadFilter {
            text: Some("timed out".into()),
            ..DeadFilter::default()
        })
        .await,
        ids(std::slice::from_ref(&b)),
        "text matches the error"
    );
    assert_eq!(
        by(DeadFilter {
            text: Some("gamm".into()),
            ..DeadFilter::default()
        })
        .await,
        ids(std::slice::from_ref(&c)),
        "text matches the payload"
    );
    let invalid = DeadFilter {
        error_class: Some("Invalid".into()),
        ..DeadFilter::default()
    };
    assert_eq!(s.count(&invalid).await.unwrap(), 2);
    assert_eq!(s.count(&DeadFilter::default()).await.unwrap(), 3);
    assert_eq!(
        s.depth(Some(&QueueName::new("agent.tasks").unwrap()))
            .await
            .unwrap(),
        2
    );
}

/// Groups by fingerprint, largest first, with the queues each spans.
pub async fn groups_are_by_fingerprint_largest_first<S: DeadLetterStore>(s: &S) {
    let batch = [
        dead("agent.tasks", "Invalid", "bad json", "1", 1_000),
        dead("billing", "Invalid", "bad json", "2", 2_000),
        dead("agent.tasks", "Invalid", "bad json", "3", 3_000),
        dead("agent.tasks", "Timeout", "model timed out", "4", 4_000),
    ];
    s.insert_batch(&batch).await.unwrap();
    let groups = s.groups(&DeadFilter::default(), 10).await.unwrap();
    assert_eq!(groups.len(), 2);
    let big = &groups[0];
    assert_eq!((big.error_class.as_str(), big.count), ("Invalid", 3));
    assert_eq!(big.sample_error, "bad json");
    let mut queues = big.queues.clone();
    queues.sort();
    assert_eq!(queues, ["agent.tasks", "billing"]);
    assert!(
        big.first_seen_ms <= 1_000 && big.last_seen_ms == 3_000,
        "{big:?}"
    );
    assert_eq!(
        (groups[1].error_class.as_str(), groups[1].count),
        ("Timeout", 1)
    );
    let billing = DeadFilter {
        queue: Some(QueueName::new("billing").unwrap()),
        ..DeadFilter::default()
    };
    let groups = s.groups(&billing, 10).await.unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].count, 1);
    let recent = DeadFilter {
        since_ms: Some(2_500),
        ..DeadFilter::default()
    };
    let counts: Vec<u64> = s
        .groups(&recent, 10)
        .await
        .unwrap()
        .iter()
        .map(|g| g.count)
        .collect();
    assert_eq!(counts, [1, 1]);
    assert_eq!(s.groups(&DeadFilter::default(), 1).await.unwrap().len(), 1);
}

/// A replayed message leaves the DLQ (once), is audited, and comes back to life when it
/// dies again.
pub async fn replay_marks_once_audits_and_a_second_death_revives<S: DeadLetterStore>(s: &S) {
    let d = dead("agent.tasks", "Invalid", "bad json", "x", 1_000);
    let other = dead("agent.tasks", "Invalid", "bad json", "y", 1_500);
    s.insert_batch(&[d.clone(), other.clone()]).await.unwrap();
    let id = d.envelope.id;
    assert_eq!(
        s.mark_replayed(&[id], "alice", "fixed the parser")
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.mark_replayed(&[id], "alice", "again").await.unwrap(), 0);
    assert_eq!(s.get(&id).await.unwrap(), None, "replayed: no longer dead");
    assert_eq!(s.depth(None).await.unwrap(), 1);
    let log = s.audit_log(10).await.unwrap();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(
        (log[1].action.as_str(), log[1].actor.as_str(), log[1].count),
        ("replay", "alice", 1)
    );
    assert_eq!(log[1].reason, "fixed the parser");
    assert_eq!(log[0].count, 0, "newest first");

    let mut again = d.clone();
    again.dead_at_ms = 9_000;
    assert!(
        s.insert(&again).await.unwrap(),
        "dead again after its replay"
    );
    assert_eq!(s.get(&id).await.unwrap().unwrap().dead_at_ms, 9_000);
    let stats = s.stats().await.unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!((stats[0].dead, stats[0].total), (2, 2));
    assert_eq!(stats[0].oldest_dead_at_ms, Some(1_500));
}

/// A dead message whose two failed attempts each reported a model, a tool and a cost.
fn dead_with_cost(queue: &str, payload: &str, dead_at_ms: i64) -> DeadLetter {
    let mut d = dead(queue, "http_503", "upstream down", payload, dead_at_ms);
    let env = &mut d.envelope;
    env.history.clear();
    env.attempt = 0;
    env.spent = Cost::default();
    for (n, tool) in [(1, "web_search"), (2, "summarize")] {
        let mut f = Failure::new(
            FailureKind::Retry,
            "http_503",
            "upstream down",
            dead_at_ms - 10 + n,
        );
        f.agent = AgentContext {
            model: Some("gpt-4o-mini".into()),
            tool: Some(tool.into()),
            cost: Cost::new(1_000, 250, 0.0125),
        };
        env.record_failure(f, "main");
    }
    d
}

/// A group sums the attempts of its messages and what their failed attempts cost; the
/// sums follow replays, purges and compression, and each attempt keeps its own model,
/// tool and cost.
pub async fn groups_sum_attempts_and_what_failures_cost<S: DeadLetterStore + RetentionStore>(
    s: &S,
) {
    let batch = [
        dead_with_cost("agent.tasks", "1", 1_000),
        dead_with_cost("agent.tasks", "2", 2_000),
        dead_with_cost("billing", "3", 3_000),
        dead("agent.tasks", "Invalid", "bad json", "4", 4_000),
    ];
    s.insert_batch(&batch).await.unwrap();
    let costly = |groups: &[redrive_core::DeadGroup]| {
        groups
            .iter()
            .find(|g| g.error_class == "http_503")
            .cloned()
            .unwrap()
    };
    let g = costly(&s.groups(&DeadFilter::default(), 10).await.unwrap());
    assert_eq!((g.count, g.attempts), (3, 6));
    assert_eq!(
        g.spent,
        Cost {
            input_tokens: 6_000,
            output_tokens: 1_500,
            usd_micros: 75_000
        }
    );
    let plain = s
        .groups(
            &DeadFilter {
                error_class: Some("Invalid".into()),
                ..DeadFilter::default()
            },
            10,
        )
        .await
        .unwrap();
    assert_eq!((plain[0].attempts, plain[0].spent), (2, Cost::default()));
    // A filter the summary cannot answer sums the messages themselves.
    let recent = DeadFilter {
        since_ms: Some(1_500),
        ..DeadFilter::default()
    };
    let g = costly(&s.groups(&recent, 10).await.unwrap());
    assert_eq!((g.count, g.attempts, g.spent.usd_micros), (2, 4, 50_000));

    let back = s.get(&batch[0].envelope.id).await.unwrap().unwrap();
    assert_eq!(
        back, batch[0],
        "each attempt reads back with its model, tool and cost"
    );
    assert_eq!(
        back.envelope.history[0].agent.tool.as_deref(),
        Some("web_search")
    );

    s.compress_between(0, 10_000).await.unwrap();
    s.mark_replayed(&[batch[0].envelope.id], "alice", "fixed")
        .await
        .unwrap();
    s.purge(
        &DeadSelection::Ids(vec![batch[2].envelope.id]),
        "alice",
        "noise",
    )
    .await
    .unwrap();
    let g = costly(&s.groups(&DeadFilter::default(), 10).await.unwrap());
    assert_eq!(
        (
            g.count,
            g.attempts,
            g.spent.input_tokens,
            g.spent.usd_micros
        ),
        (1, 2, 2_000, 25_000)
    );
    // Dead again after its replay: counted again, once.
    s.insert(&batch[0]).await.unwrap();
    let g = costly(&s.groups(&DeadFilter::default(), 10).await.unwrap());
    assert_eq!((g.count, g.attempts, g.spent.usd_micros), (2, 4, 50_000));
}

/// Purges by id and by filter delete only dead messages, with an audit entry each.
pub async fn purges_delete_what_they_select_and_are_audited<S: DeadLetterStore>(s: &S) {
    let a = dead("agent.tasks", "Invalid", "bad json", "a", 1_000);
    let b = dead("agent.tasks", "Timeout", "model timed out", "b", 2_000);
    let c = dead("billing", "Timeout", "model timed out", "c", 3_000);
    s.insert_batch(&[a.clone(), b.clone(), c.clone()])
        .await
        .unwrap();
    let by_id = DeadSelection::Ids(vec![a.envelope.id, MessageId::new()]);
    assert_eq!(s.purge(&by_id, "bob", "noise").await.unwrap(), 1);
    let timeouts = DeadSelection::Filter(DeadFilter {
        error_class: Some("Timeout".into()),
        queue: Some(QueueName::new("agent.tasks").unwrap()),
        ..DeadFilter::default()
    });
    assert_eq!(s.purge(&timeouts, "bob", "model fixed").await.unwrap(), 1);
    assert_eq!(
        ids(&s.list(&DeadFilter::default(), None, 10).await.unwrap()),
        ids(&[c])
    );
    let log = s.audit_log(10).await.unwrap();
    let actions: Vec<(&str, u64)> = log.iter().map(|e| (e.action.as_str(), e.count)).collect();
    assert_eq!(actions, [("purge", 1), ("purge", 1)]);
    assert_eq!(log[0].reason, "model fixed");
    let stats = s.stats().await.unwrap();
    let dead: u64 = stats.iter().map(|st| st.dead).sum();
    assert_eq!(
        dead, 1,
        "purged messages are gone from the counts: {stats:?}"
    );
}

/// Payloads of any bytes and hostile text in every field are stored and read back
/// exactly.
pub async fn hostile_bytes_read_back_exactly<S: DeadLetterStore>(s: &S) {
    let queue = QueueName::new("agent.tasks").unwrap();
    let payload: Vec<u8> = (0..=255u8).chain([0, 0, 0xff]).collect();
    let mut envelope = Envelope::new(queue, payload);
    envelope.key = Some("'; DROP TABLE dead_letters; --".into());
    envelope.headers = vec![("x-evil".into(), "\u{1b}]0;pwned\u{7}<script>".into())];
    envelope.record_failure(
        Failure::new(
            FailureKind::Poison,
            "Bad\"Class",
            "line 1\nline 2 \u{0} nul",
            5,
        ),
        "main",
    );
    let d = DeadLetter {
        envelope,
        dead_at_ms: 5,
    };
    assert!(s.insert(&d).await.unwrap());
    assert_eq!(s.get(&d.envelope.id).await.unwrap().unwrap(), d);
    let found = s
        .list(
            &DeadFilter {
                text: Some("line 2".into()),
                ..DeadFilter::default()
            },
            None,
            10,
        )
        .await
        .unwrap();
    assert_eq!(ids(&found), ids(&[d]));
}

fn alert(rule: &str, phase: AlertPhase, since_ms: i64, value: u64) -> AlertState {
    AlertState {
        rule: rule.into(),
        queue: "agent.tasks".into(),
        phase,
        since_ms,
        fired_ms: (phase != AlertPhase::Pending).then_some(since_ms + 300_000),
        resolved_ms: (phase == AlertPhase::Resolved).then_some(since_ms + 900_000),
        value,
    }
}

/// Alert transitions and their notifications are stored together; a transition applied
/// twice (two evaluations racing, or one repeated after a crash) leaves one alert and
/// one notification; the outbox hands out what is due and records each delivery.
pub async fn alerts_and_their_outbox_persist<S: AlertStore>(s: &S) {
    let pending = alert("dlq-not-empty", AlertPhase::Pending, 1_000, 1);
    s.apply_transitions(vec![Transition::Pending(pending.clone())], vec![])
        .await
        .unwrap();
    s.apply_transitions(vec![Transition::Pending(pending.clone())], vec![])
        .await
        .unwrap();
    assert_eq!(s.open_alerts().await.unwrap(), [pending]);

    let firing = alert("dlq-not-empty", AlertPhase::Firing, 1_000, 3);
    let page = |kind, state: &AlertState| NewNotification {
        notifier: "pagerduty".into(),
        kind,
        expr: "dlq_depth > 0 for 5m".into(),
        state: state.clone(),
    };
    s.apply_transitions(
        vec![Transition::Fired(firing.clone())],
        vec![page(NotificationKind::Trigger, &firing)],
    )
    .await
    .unwrap();
    assert_eq!(
        s.open_alerts().await.unwrap(),
        std::slice::from_ref(&firing)
    );
    // A second evaluator (or a repeated round) fires it again: no second page.
    s.apply_transitions(
        vec![Transition::Fired(firing.clone())],
        vec![page(NotificationKind::Trigger, &firing)],
    )
    .await
    .unwrap();
    let due = s
        .due_notifications(firing.fired_ms.unwrap(), 10)
        .await
        .unwrap();
    assert_eq!(due.len(), 1, "one trigger however often it is applied");
    let n = &due[0];
    assert_eq!(
        (n.kind, n.value, n.attempts),
        (NotificationKind::Trigger, 3, 0)
    );
    assert_eq!(n.at_ms, firing.fired_ms.unwrap());
    assert!(
        s.due_notifications(n.at_ms - 1, 10)
            .await
            .unwrap()
            .is_empty(),
        "not due yet"
    );

    // A failure is retried later; a success takes it out of the due list.
    s.record_delivery(
        n.id,
        Err(("503 from the pager".into(), Some(n.at_ms + 5_000))),
    )
    .await
    .unwrap();
    assert!(
        s.due_notifications(n.at_ms + 4_999, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = s.due_notifications(n.at_ms + 5_000, 10).await.unwrap();
    assert_eq!(
        (again[0].attempts, again[0].last_error.as_deref()),
        (1, Some("503 from the pager"))
    );
    s.record_delivery(n.id, Ok(n.at_ms + 5_100)).await.unwrap();
    assert!(
        s.due_notifications(i64::MAX / 2, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let resolved = alert("dlq-not-empty", AlertPhase::Resolved, 1_000, 0);
    s.apply_transitions(
        vec![Transition::Resolved(resolved.clone())],
        vec![page(NotificationKind::Resolve, &resolved)],
    )
    .await
    .unwrap();
    s.apply_transitions(
        vec![Transition::Resolved(resolved.clone())],
        vec![page(NotificationKind::Resolve, &resolved)],
    )
    .await
    .unwrap();
    assert!(s.open_alerts().await.unwrap().is_empty());
    assert_eq!(s.past_alerts(10).await.unwrap(), [resolved]);
    let recent = s.recent_notifications(10).await.unwrap();
    let kinds: Vec<_> = recent
        .iter()
        .map(|n| (n.kind, n.sent_ms.is_some(), n.failed))
        .collect();
    assert_eq!(
        kinds,
        [
            (NotificationKind::Resolve, false, false),
            (NotificationKind::Trigger, true, false)
        ],
        "newest first"
    );
    // Given up: failed, and never due again.
    let resolve = &recent[0];
    s.record_delivery(resolve.id, Err(("400 bad key".into(), None)))
        .await
        .unwrap();
    assert!(
        s.due_notifications(i64::MAX / 2, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.recent_notifications(1).await.unwrap()[0].failed);
}

/// Retention's seam: warm payloads are compressed in place and still read back
/// exactly; whole past days are offered for archiving; archived messages are deleted
/// with an audit entry; replayed history is forgotten past its cutoff.
pub async fn retention_compresses_archives_and_forgets<S: DeadLetterStore + RetentionStore>(s: &S) {
    const DAY: i64 = 86_400_000;
    let old = dead(
        "agent.tasks",
        "Invalid",
        "bad json",
        &"x".repeat(2_000),
        10 * DAY + 5,
    );
    let warm = dead(
        "billing",
        "Invalid",
        "bad json",
        &"y".repeat(2_000),
        11 * DAY + 7,
    );
    let hot = dead("agent.tasks", "Invalid", "bad json", "z", 12 * DAY + 9);
    s.insert_batch(&[old.clone(), warm.clone(), hot.clone()])
        .await
        .unwrap();

    assert_eq!(s.compress_between(0, 12 * DAY).await.unwrap(), 2);
    assert_eq!(
        s.compress_between(0, 12 * DAY).await.unwrap(),
        0,
        "once only"
    );
    assert_eq!(
        s.get(&old.envelope.id).await.unwrap().unwrap(),
        old,
        "reads back as stored"
    );
    let listed = s.list(&DeadFilter::default(), None, 10).await.unwrap();
    assert_eq!(listed, [old.clone(), warm.clone(), hot.clone()]);

    let days = s.archivable_days(12 * DAY + 100).await.unwrap();
    assert_eq!(
        days,
        [
            ("agent.tasks".to_owned(), 10 * DAY),
            ("billing".to_owned(), 11 * DAY)
        ]
    );
    let n = s
        .delete_archived(
            &[old.envelope.id, hot.envelope.id],
            "agent.tasks-day10.jsonl.zst",
        )
        .await
        .unwrap();
    assert_eq!(n, 2);
    let log = s.audit_log(1).await.unwrap();
    assert_eq!((log[0].action.as_str(), log[0].count), ("archive", 2));
    assert_eq!(log[0].detail, "agent.tasks-day10.jsonl.zst");

    s.mark_replayed(&[warm.envelope.id], "alice", "fixed")
        .await
        .unwrap();
    assert_eq!(
        s.forget_replayed_before(11 * DAY).await.unwrap(),
        0,
        "died after the cutoff"
    );
    assert_eq!(s.forget_replayed_before(12 * DAY).await.unwrap(), 1);
    assert!(
        s.stats().await.unwrap().is_empty(),
        "nothing left, not even history"
    );
}

/// A replay job keeps what it was asked, its messages in order, state changes only
/// from the states named, and outcomes only for messages it moved at that replay count.
pub async fn replay_jobs_keep_their_messages_states_and_outcomes<S: ReplayJobs>(s: &S) {
    let job = ReplayJob {
        id: ReplayJob::new_id(),
        created_at_ms: 1_000,
        actor: "alice".into(),
        reason: "parser fix \u{0}\u{1f600}".into(),
        selection: "queue agent.tasks".into(),
        to: None,
        max_replays: 5,
        canary: 1,
        max_failed_percent: 0.0,
        ordered: true,
        canary_passed: false,
        forgiven: (0, 0),
        edited: false,
        rate_per_sec: None,
        moved_by_queue: Default::default(),
    };
    let ids: Vec<MessageId> = (0..3).map(|_| MessageId::new()).collect();
    let items: Vec<JobItem> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| JobItem {
            seq: n as u64,
            id: *id,
            key: Some(format!("key-{}", n % 2)),
            canary: n == 0,
            state: ItemState::Pending,
            replays: 0,
            detail: String::new(),
            was: "bad json\u{0}".into(),
            at_ms: 1_000,
        })
        .collect();
    s.create_job(&job, &items).await.unwrap();
    let other = ReplayJob {
        id: ReplayJob::new_id(),
        created_at_ms: 2_000,
        ..job.clone()
    };
    s.create_job(&other, &[]).await.unwrap();

    let listed = s.jobs(None, 10).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].job.id, other.id, "newest first");
    let v = s.jobs(Some(&job.id), 1).await.unwrap().pop().unwrap();
    assert_eq!(v.job.reason, job.reason, "kept exactly");
    assert_eq!(v.state, JobState::Running);
    assert_eq!((v.counts.total, v.counts.pending), (3, 3));
    assert!(s.jobs(Some("rj-none"), 1).await.unwrap().is_empty());

    let read = s.job_items(&job.id, None, 10).await.unwrap();
    assert_eq!(read.len(), 3);
    assert_eq!(read[0].id, ids[0]);
    assert!(read[0].canary && !read[1].canary);
    assert_eq!(read[1].key.as_deref(), Some("key-1"));
    assert!(read[2].was.starts_with("bad json"));
    let after = s.job_items(&job.id, Some(0), 1).await.unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].seq, 1, "paged by seq");

    // Moved at replay count 1; an outcome for another count or message changes nothing.
    let mut moved = read[0].clone();
    moved.state = ItemState::Moved;
    moved.replays = 1;
    let mut held = read[2].clone();
    held.state = ItemState::Held;
    held.detail = "held behind it".into();
    s.update_job_items(&job.id, &[moved, held]).await.unwrap();
    s.record_replay_outcomes(&[
        ReplayOutcome {
            id: ids[0],
            replays: 2,
            error: None,
        },
        ReplayOutcome {
            id: ids[1],
            replays: 0,
            error: None,
        },
    ])
    .await
    .unwrap();
    let v = s.jobs(Some(&job.id), 1).await.unwrap().pop().unwrap();
    assert_eq!((v.counts.moved, v.counts.pending, v.counts.held), (1, 1, 1));
    s.record_replay_outcomes(&[ReplayOutcome {
        id: ids[0],
        replays: 1,
        error: Some("still bad\u{0}".into()),
    }])
    .await
    .unwrap();
    s.record_replay_outcomes(&[ReplayOutcome {
        id: ids[0],
        replays: 1,
        error: None,
    }])
    .await
    .unwrap();
    let first = s.job_items(&job.id, None, 1).await.unwrap().pop().unwrap();
    assert_eq!(first.state, ItemState::Failed, "the first outcome stands");
    assert!(first.detail.starts_with("still bad"));

    // State changes only from the states named.
    assert!(
        !s.set_job_state(&job.id, &[JobState::Paused], JobState::Running, "")
            .await
            .unwrap()
    );
    assert!(
        s.set_job_state(
            &job.id,
            &[JobState::Running],
            JobState::Paused,
            "1 of 1 canaries failed"
        )
        .await
        .unwrap()
    );
    let v = s.jobs(Some(&job.id), 1).await.unwrap().pop().unwrap();
    assert_eq!(
        (v.state, v.note.as_str()),
        (JobState::Paused, "1 of 1 canaries failed")
    );
    let mut passed = job.clone();
    passed.canary_passed = true;
    s.update_job(&passed).await.unwrap();
    let v = s.jobs(Some(&job.id), 1).await.unwrap().pop().unwrap();
    assert!(v.job.canary_passed);
    assert_eq!(
        v.state,
        JobState::Paused,
        "rewriting the job leaves its state"
    );

    let lineage = s.replays_of(&ids[0]).await.unwrap();
    assert_eq!(lineage.len(), 1);
    assert_eq!(lineage[0].0.id, job.id);
    assert_eq!(lineage[0].1.state, ItemState::Failed);
}

/// An open breaker's report holds while renewed, is withdrawn when it closes, and goes
/// stale when its consumer stops renewing it.
pub async fn breaker_reports_hold_while_renewed<S: BreakerBoard>(s: &S) {
    let now = 1_800_000_000_000;
    s.report_breaker("agent.tasks", "consume (pid 1)", Some((now - 5_000, now)))
        .await
        .unwrap();
    s.report_breaker(
        "agent.tasks",
        "consume (pid 2)",
        Some((now - 500_000, now - 100_000)),
    )
    .await
    .unwrap();
    s.report_breaker("other", "consume (pid 3) \u{0}<b>", Some((now, now)))
        .await
        .unwrap();
    let open = s.open_breakers(now).await.unwrap();
    let seen: Vec<(&str, &str)> = open
        .iter()
        .map(|b| (b.queue.as_str(), b.consumer.as_str()))
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen[0],
        ("agent.tasks", "consume (pid 1)"),
        "the stale one is gone"
    );
    assert_eq!(open[0].since_ms, now - 5_000);
    assert_eq!(seen[1].0, "other");
    // Renewed: the same row, a later sighting.
    s.report_breaker(
        "agent.tasks",
        "consume (pid 1)",
        Some((now - 5_000, now + 60_000)),
    )
    .await
    .unwrap();
    assert_eq!(s.open_breakers(now + 120_000).await.unwrap().len(), 1);
    s.report_breaker("agent.tasks", "consume (pid 1)", None)
        .await
        .unwrap();
    assert!(
        s.open_breakers(now + 1)
            .await
            .unwrap()
            .iter()
            .all(|b| b.queue != "agent.tasks")
    );
}

/// Expands to one `#[tokio::test]` per store scenario; `$open` is an expression (it may
/// `.await`) that gives a fresh, empty store as `(guard, store)`: the guard (a scratch
/// directory, say) is kept until the scenario ends.
#[macro_export]
macro_rules! store_conformance {
    ($open:expr) => {
        $crate::store_conformance!(@each $open;
            an_insert_reads_back_and_repeats_harmlessly,
            listings_are_ordered_paged_and_filtered,
            text_search_follows_every_change,
            groups_are_by_fingerprint_largest_first,
            groups_sum_attempts_and_what_failures_cost,
            replay_marks_once_audits_and_a_second_death_revives,
            purges_delete_what_they_select_and_are_audited,
            hostile_bytes_read_back_exactly,
            alerts_and_their_outbox_persist,
            retention_compresses_archives_and_forgets,
            replay_jobs_keep_their_messages_states_and_outcomes,
            breaker_reports_hold_while_renewed
        );
    };
    (@each $open:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (_guard, store) = $open;
                $crate::store::$name(&store).await;
            }
        )*
    };
}
