//! Decoders under fire: arbitrary input never panics any of core's parsers, and whatever
//! core writes reads back equal.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::time::Duration;

use proptest::prelude::*;
use redrive_core::{
    Envelope, Failure, FailureKind, Fingerprint, MAX_TIME_MS, MessageId, QueueName, RetryPolicy,
    format_duration, parse_duration,
};

/// Valid queue names: dot-separated segments, not ending in a lane suffix.
fn queue_name() -> impl Strategy<Value = QueueName> {
    "[a-z0-9][a-z0-9_-]{0,10}(\\.[a-z0-9_-]{1,8}){0,3}"
        .prop_filter_map("a lane suffix", |n| QueueName::new(n).ok())
}

fn kind() -> impl Strategy<Value = FailureKind> {
    prop_oneof![
        Just(FailureKind::Retry),
        Just(FailureKind::Poison),
        Just(FailureKind::Timeout),
        Just(FailureKind::Panic),
        Just(FailureKind::LeaseExpired),
    ]
}

/// A failure as a runner records it: any class and message (kept short enough to
/// travel whole in the history), a time redrive can show, counted or not.
fn failure() -> impl Strategy<Value = (Failure, bool, String)> {
    (
        kind(),
        "\\PC{0,20}",
        "\\PC{0,100}",
        0..=MAX_TIME_MS,
        any::<bool>(),
        "[a-z.0-9]{1,12}",
    )
        .prop_map(|(kind, class, message, at, counted, lane)| {
            (Failure::new(kind, class, message, at), counted, lane)
        })
}

/// User headers: any name not starting with `redrive-` (header names are case
/// insensitive), any value.
fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::vec(
        ("[a-zA-Z][a-zA-Z0-9_-]{0,15}", "\\PC{0,30}").prop_filter("redrive's own", |(k, _)| {
            !k.to_ascii_lowercase().starts_with("redrive-")
        }),
        0..4,
    )
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        queue_name(),
        proptest::option::of("\\PC{0,20}"),
        proptest::collection::vec(any::<u8>(), 0..64),
        headers(),
        proptest::collection::vec(failure(), 0..5),
        0u32..5,
        proptest::option::of(0..=MAX_TIME_MS),
    )
        .prop_map(
            |(queue, key, payload, headers, failures, replays, not_before)| {
                let mut env = Envelope::new(queue, payload);
                env.key = key;
                env.headers = headers;
                for (failure, counted, lane) in failures {
                    if counted {
                        env.record_failure(failure, &lane);
                    } else {
                        env.record_suspected_crash(&failure.message, failure.at_ms, &lane);
                    }
                }
                env.replays = replays;
                env.not_before_ms = not_before;
                env
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn an_envelope_reads_back_as_it_was_written(env in envelope()) {
        let back = Envelope::from_wire(&env.queue, env.key.clone(), env.payload.clone(), env.to_wire()).unwrap();
        prop_assert_eq!(back, env);
    }

    #[test]
    fn a_fresh_envelope_reads_back_from_its_compact_form(
        queue in queue_name(),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
        headers in headers(),
    ) {
        let mut env = Envelope::new(queue, payload);
        env.headers = headers;
        let wire = env.to_compact_wire();
        let id = Envelope::compact_id(wire.iter().map(|(k, v)| (k.as_str(), v.as_bytes())));
        prop_assert_eq!(id, Some(env.id));
        let back = Envelope::from_wire(&env.queue, None, env.payload.clone(), wire).unwrap();
        prop_assert_eq!(back, env);
    }

    #[test]
    fn any_headers_read_or_fail_without_a_panic(
        pairs in proptest::collection::vec(
            (prop_oneof![
                Just("redrive-version".to_owned()), Just("redrive-id".to_owned()),
                Just("redrive-attempt".to_owned()), Just("redrive-history".to_owned()),
                Just("redrive-not-before".to_owned()), Just("redrive-first-failed-at".to_owned()),
                Just("redrive-origin".to_owned()), Just("redrive-replays".to_owned()),
                Just("attempt".to_owned()), Just("error".to_owned()), "\\PC{0,12}",
            ], "\\PC{0,40}"),
            0..8),
        payload in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let q = QueueName::new("agent.tasks").unwrap();
        let _ = Envelope::from_wire(&q, None, payload.clone(), pairs.clone());
        let _ = Envelope::compact_id(pairs.iter().map(|(k, v)| (k.as_str(), v.as_bytes())));
        let at = || MessageId::at("agent.tasks", 1, 2);
        if let Ok(env) = Envelope::from_wire_at(&q, None, payload, pairs, at) {
            // Whatever it read, it can write and read again.
            let again = Envelope::from_wire(&env.queue, env.key.clone(), env.payload.clone(), env.to_wire()).unwrap();
            prop_assert_eq!(again.id, env.id);
            prop_assert_eq!(again.attempt, env.attempt);
        }
    }

    #[test]
    fn durations_and_tiers_parse_or_fail_without_a_panic(text in "\\PC{0,24}") {
        let _ = parse_duration(&text);
        let _ = RetryPolicy::parse(&text);
        let _ = QueueName::new(text.clone());
        let _ = MessageId::parse(&text);
    }

    #[test]
    fn a_duration_reads_back_from_its_shortest_form(ms in 1u64..=7 * 86_400_000) {
        let d = Duration::from_millis(ms);
        prop_assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        let policy = RetryPolicy::parse(&format_duration(d)).unwrap();
        prop_assert_eq!(policy.tiers()[0].delay(), d);
    }

    #[test]
    fn fingerprints_are_stable_and_never_panic(class in "\\PC{0,20}", message in "\\PC{0,200}") {
        prop_assert_eq!(Fingerprint::of(&class, &message), Fingerprint::of(&class, &message));
        let _ = redrive_core::normalize_message(&message);
    }
}
