//! An envelope as a Kafka record and back: headers out, envelope in.

use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use redrive_core::{Envelope, MessageId, QueueName};

/// An envelope's headers as a record's.
pub(crate) fn encode(env: &Envelope, extra: &[(&str, String)]) -> OwnedHeaders {
    // A record that never failed carries its id alone: every header is bytes in each
    // record and in every fetch of it (BENCHMARKS.md, Kafka: one header instead of four
    // raised the consume rate by half).
    let wire = if extra.is_empty() && env.is_fresh() {
        env.to_compact_wire()
    } else {
        env.to_wire()
    };
    let mut h = OwnedHeaders::new_with_capacity(wire.len() + extra.len());
    for (k, v) in &wire {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    for (k, v) in extra {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    h
}

/// A record as an envelope: Kafka headers are a list (names may repeat), values bytes.
pub(crate) fn decode(
    queue: &QueueName,
    msg: &impl Message,
) -> Result<Envelope, Box<(String, Envelope)>> {
    let payload = || msg.payload().unwrap_or_default().to_vec();
    let key = || msg.key().map(|k| String::from_utf8_lossy(k).into_owned());
    let Some(headers) = msg.headers() else {
        // A plain producer's record: no header to read.
        let mut env = Envelope::new_with_id(queue.clone(), payload(), id_at(msg));
        env.key = key();
        return Ok(env);
    };
    // A record that never failed carries its id alone: read it in place, copying only
    // the user's headers.
    let all = || headers.iter().map(|h| (h.key, h.value.unwrap_or_default()));
    if let Some(id) = Envelope::compact_id(all()) {
        let mut env = Envelope::new_with_id(queue.clone(), payload(), id);
        env.key = key();
        env.headers = all()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("redrive-id"))
            .map(|(k, v)| (k.to_owned(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        return Ok(env);
    }
    match Envelope::from_wire_at(queue, key(), payload(), headers_of(msg), || id_at(msg)) {
        Ok(env) => Ok(env),
        Err(e) => {
            // Read again from the record on this rare path, rather than copying every
            // record's payload and headers ahead in case it is needed.
            let mut raw = Envelope::new_with_id(queue.clone(), payload(), id_at(msg));
            raw.key = key();
            raw.headers = headers_of(msg);
            Err(Box::new((e.to_string(), raw)))
        }
    }
}

/// The id of a record that carries no `redrive-id` (its producer is not redrive),
/// derived from where it sits, so every delivery of it (after a crash or a rebalance,
/// or a DLQ record drained again) is the same message with the same idempotency key.
/// A random id per delivery would change the key each time, and costs a draw from the
/// system's random source per record.
///
/// Layout (a UUID version 8; its version and variant bits take six of the bits): the
/// record's timestamp in ms (48 bits, so ids sort by time as UUIDv7s do, and a topic
/// deleted and created again does not repeat its ids), then the partition shifted by a
/// hash of the topic name (12 bits: distinct for every partition of a topic below
/// 4,096), then the offset (62 bits).
pub(crate) fn id_at(msg: &impl Message) -> MessageId {
    let timestamp = msg.timestamp().to_millis().unwrap_or(0).max(0);
    // So main and a retry topic differ at the same position.
    let topic = MessageId::place_hash(msg.topic());
    let place = (topic as u16).wrapping_add(msg.partition() as u16) & 0x0fff;
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&timestamp.to_be_bytes()[2..]);
    bytes[6..8].copy_from_slice(&place.to_be_bytes());
    bytes[8..].copy_from_slice(&msg.offset().max(0).to_be_bytes());
    MessageId::derived(bytes)
}

fn headers_of(msg: &impl Message) -> Vec<(String, String)> {
    let Some(h) = msg.headers() else {
        return Vec::new();
    };
    h.iter()
        .map(|header| {
            let value = header
                .value
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            (header.key.to_owned(), value.into_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use rdkafka::Timestamp;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};

    use super::*;

    fn record(topic: &str, partition: i32, offset: i64, headers: &[(&str, &str)]) -> OwnedMessage {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        OwnedMessage::new(
            Some(b"{\"n\":1}".to_vec()),
            Some(b"k".to_vec()),
            topic.to_owned(),
            Timestamp::CreateTime(1_764_000_000_000),
            partition,
            offset,
            (!headers.is_empty()).then_some(h),
        )
    }

    fn id_of(msg: &OwnedMessage) -> MessageId {
        let queue = QueueName::new("agent.tasks").unwrap();
        match decode(&queue, msg) {
            Ok(env) => env.id,
            Err(bad) => bad.1.id,
        }
    }

    #[test]
    fn a_plain_producers_record_keeps_its_id_across_deliveries() {
        let plain = record("agent.tasks", 2, 41, &[]);
        assert_eq!(id_of(&plain), id_of(&plain.clone()), "same record, same id");
        // Hand-written headers, and broken redrive headers, are no different.
        let legacy = record("agent.tasks", 2, 41, &[("attempt", "2")]);
        assert_eq!(id_of(&legacy), id_of(&legacy.clone()));
        let broken = record("agent.tasks", 2, 41, &[("redrive-attempt", "three")]);
        assert_eq!(id_of(&broken), id_of(&broken.clone()));
    }

    #[test]
    fn ids_differ_wherever_the_records_differ() {
        let ids = [
            id_of(&record("agent.tasks", 0, 41, &[])),
            id_of(&record("agent.tasks", 1, 41, &[])),
            id_of(&record("agent.tasks", 0, 42, &[])),
            id_of(&record("agent.tasks.retry.5s", 0, 41, &[])),
        ];
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // Every partition of one topic below 4,096 gets its own ids.
        let mut seen = std::collections::HashSet::new();
        for p in 0..4096 {
            assert!(
                seen.insert(id_of(&record("agent.tasks", p, 7, &[]))),
                "partition {p}"
            );
        }
    }

    #[test]
    fn redrives_own_id_is_kept() {
        let id = MessageId::new();
        let text = id.to_string();
        let compact = record("agent.tasks", 0, 1, &[("redrive-id", &text)]);
        assert_eq!(id_of(&compact), id);
        let full = record(
            "agent.tasks",
            0,
            1,
            &[
                ("redrive-version", "1"),
                ("redrive-id", &text),
                ("redrive-attempt", "2"),
            ],
        );
        assert_eq!(id_of(&full), id);
    }
}

/// Decoders under fire: a record written the way the transport writes one reads back
/// equal, and a record with any headers decodes or is quarantined, never a panic.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use rdkafka::Timestamp;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
    use redrive_core::QueueName;
    use redrive_core::testing::sample_envelope;

    use super::decode;

    fn record(key: Option<&str>, payload: &[u8], headers: &[(String, Vec<u8>)]) -> OwnedMessage {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            });
        }
        OwnedMessage::new(
            Some(payload.to_vec()),
            key.map(|k| k.as_bytes().to_vec()),
            "agent.tasks".to_owned(),
            Timestamp::CreateTime(1_764_000_000_000),
            1,
            42,
            (!headers.is_empty()).then_some(h),
        )
    }

    fn queue() -> QueueName {
        QueueName::new("agent.tasks").expect("queue")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn an_envelope_reads_back_as_it_was_written(
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            key in proptest::option::of("\\PC{1,20}"),
            headers in proptest::collection::vec(("[a-zA-Z][a-zA-Z0-9_-]{0,12}", "\\PC{0,20}"), 0..4),
            message in "\\PC{0,80}",
            failed in any::<bool>(),
        ) {
            let env = sample_envelope(payload, key, headers, message, failed);
            // As the transport writes a record: the compact form when it never failed.
            let wire = if env.is_fresh() { env.to_compact_wire() } else { env.to_wire() };
            let wire: Vec<(String, Vec<u8>)> = wire.into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
            let back = decode(&queue(), &record(env.key.as_deref(), &env.payload, &wire)).map_err(|b| b.0);
            prop_assert_eq!(back, Ok(env));
        }

        #[test]
        fn any_headers_decode_or_are_quarantined_without_a_panic(
            headers in proptest::collection::vec(
                (prop_oneof![Just("redrive-id".to_owned()), Just("redrive-version".to_owned()),
                    Just("redrive-attempt".to_owned()), Just("redrive-history".to_owned()),
                    Just("attempt".to_owned()), "\\PC{1,12}"],
                 proptest::collection::vec(any::<u8>(), 0..24)),
                0..6),
            key in proptest::option::of("\\PC{0,8}"),
        ) {
            let _ = decode(&queue(), &record(key.as_deref(), b"x", &headers));
        }
    }
}
