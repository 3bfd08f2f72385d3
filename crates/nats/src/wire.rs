//! An envelope as a NATS message and back: headers (or the subject) out, envelope in.

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use redrive_core::{Envelope, MessageId, QueueName};

/// The envelope as NATS headers: redrive's own in one JSON header (NATS header values
/// cannot hold newlines, error messages can), user headers as they are.
///
/// A message that has never failed (what every publish sends) carries only a
/// `redrive-id` header instead: a header costs the server and both clients per byte,
/// and this is most of the traffic. [`wire_of`] reads either form.
pub(crate) fn to_headers(env: &Envelope, extra: &[(&str, String)]) -> HeaderMap {
    if extra.is_empty() && is_compact(env) {
        let mut h = HeaderMap::new();
        h.insert(ID, env.id.to_string().as_str());
        append_compact(&mut h, env);
        return h;
    }
    let mut h = HeaderMap::new();
    let mut wire: Vec<(String, String)> = env
        .to_wire()
        .into_iter()
        .filter(|(k, _)| k.starts_with("redrive-"))
        .collect();
    if let Some(k) = &env.key {
        wire.push(("redrive-key".into(), k.clone()));
    }
    for (k, v) in extra {
        wire.push(((*k).to_owned(), v.clone()));
    }
    h.insert(
        WIRE,
        serde_json::to_string(&wire).unwrap_or_default().as_str(),
    );
    append_user(&mut h, env);
    h
}

/// redrive's headers in full, as JSON pairs.
const WIRE: &str = "redrive-wire";
/// The compact form of a message that has never failed: its id, and its key if any.
const ID: &str = "redrive-id";
const KEY: &str = "redrive-key";

/// Whether the envelope travels in the compact form: it never failed, and its key (if
/// any) fits in a header value.
pub(crate) fn is_compact(env: &Envelope) -> bool {
    env.is_fresh()
        && env
            .key
            .as_deref()
            .is_none_or(|k| !k.is_empty() && !k.contains(['\r', '\n']))
}

/// The compact form's headers besides the id: the key, and the user's headers.
pub(crate) fn append_compact(h: &mut HeaderMap, env: &Envelope) {
    if let Some(k) = &env.key {
        h.insert(KEY, k.as_str());
    }
    append_user(h, env);
}

/// The id a message carries as the last token of its subject (`<prefix>.<id>`):
/// `None` on another subject, an error when the token is not an id.
pub(crate) fn id_of_subject(subject: &str, prefix: &str) -> Option<Result<MessageId, String>> {
    let token = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    Some(
        MessageId::parse(token)
            .map_err(|_| format!("subject {subject:?} does not end in a message id")),
    )
}

fn append_user(h: &mut HeaderMap, env: &Envelope) {
    for (k, v) in &env.headers {
        if !v.contains(['\r', '\n']) {
            h.append(k.as_str(), v.as_str());
        }
    }
}

/// Reads what [`to_headers`] wrote, in either form (or any NATS message's headers): the
/// pairs it could read, and why a `redrive-wire` header could not be, if one could not.
pub(crate) fn wire_of(headers: Option<&HeaderMap>) -> (Vec<(String, String)>, Option<String>) {
    let mut out = Vec::new();
    let mut bad = None;
    let Some(h) = headers else {
        return (out, bad);
    };
    let full = h.get(WIRE).is_some();
    for (name, values) in h.iter() {
        let name: &str = name.as_ref();
        for v in values {
            if name == WIRE {
                match serde_json::from_str::<Vec<(String, String)>>(v.as_str()) {
                    Ok(pairs) => out.extend(pairs),
                    Err(e) => {
                        bad = Some(format!(
                            "header {WIRE} is not a JSON list of header pairs: {e}"
                        ));
                    }
                }
            } else {
                if name == ID && !full {
                    // The compact form: a message redrive published that never failed.
                    out.push(("redrive-version".to_owned(), "1".to_owned()));
                }
                out.push((name.to_owned(), v.to_string()));
            }
        }
    }
    (out, bad)
}

/// The envelope of a message in the compact form (only `redrive-id`, and `redrive-key`,
/// beside user headers), read without building the list of wire headers; `None` when the
/// headers are in another form (or the id does not parse: the full path reports it).
fn compact_of(
    queue: &QueueName,
    subject_id: Option<MessageId>,
    headers: Option<&HeaderMap>,
    payload: &Bytes,
) -> Option<Envelope> {
    let Some(headers) = headers else {
        // Published with its id in the subject and nothing else.
        return Some(Envelope::new_with_id(
            queue.clone(),
            payload.clone(),
            subject_id?,
        ));
    };
    // One pass over the headers: `HeaderMap::get` would build (and allocate) a header
    // name per lookup and hash it, which showed per message in profiles.
    let mut id = subject_id;
    let mut key = None;
    let mut user = Vec::new();
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        match name {
            WIRE => return None,
            ID => id = Some(MessageId::parse(values.first()?.as_str()).ok()?),
            KEY => key = values.first().map(|v| v.to_string()),
            _ => user.extend(values.iter().map(|v| (name.to_owned(), v.to_string()))),
        }
    }
    let mut env = Envelope::new_with_id(queue.clone(), payload.clone(), id?);
    env.key = key;
    env.headers = user;
    Some(env)
}

/// A main-stream message's envelope, in whichever form it travels. Its id is, in order:
/// redrive's header, the subject's last token (`subject_id`), or where it sits
/// (`position`, for a plain producer's message).
pub(crate) fn read_envelope(
    queue: &QueueName,
    subject_id: Option<MessageId>,
    headers: Option<&HeaderMap>,
    payload: &Bytes,
    position: impl FnOnce() -> MessageId,
) -> Result<Envelope, String> {
    if let Some(env) = compact_of(queue, subject_id, headers, payload) {
        return Ok(env);
    }
    let (wire, bad) = wire_of(headers);
    if let Some(why) = bad {
        return Err(why);
    }
    let known_id = has_id(&wire);
    let mut env = envelope_of(queue, wire, payload.clone())?;
    if !known_id {
        env.id = subject_id.unwrap_or_else(position);
    }
    Ok(env)
}

/// When the stream was created (ms since the epoch).
pub(crate) fn created_ms(stream: &jetstream::stream::Stream) -> i64 {
    i64::try_from(stream.cached_info().created.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// The id of a message that carries no `redrive-id` (its producer is not redrive),
/// derived from where it sits — its stream, when that stream was created, and its
/// sequence — so every delivery of it is the same message: its history is found again
/// and its retries count. (A random id per delivery made each retry look like a crash.)
pub(crate) fn id_in_stream(stream: &str, created_ms: i64, seq: u64) -> MessageId {
    MessageId::at(stream, created_ms, seq)
}

/// Whether redrive's headers name the message's id.
pub(crate) fn has_id(wire: &[(String, String)]) -> bool {
    wire.iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("redrive-id"))
}

pub(crate) fn envelope_of(
    queue: &QueueName,
    wire: Vec<(String, String)>,
    payload: Bytes,
) -> Result<Envelope, String> {
    let key = wire
        .iter()
        .find(|(k, _)| k == "redrive-key")
        .map(|(_, v)| v.clone());
    Envelope::from_wire(queue, key, payload, wire).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use redrive_core::{Envelope, Failure, FailureKind, QueueName};

    use super::{
        WIRE, append_compact, compact_of, envelope_of, id_in_stream, id_of_subject, to_headers,
        wire_of,
    };

    #[test]
    fn a_message_that_never_failed_travels_with_its_id_alone_and_reads_back_whole() {
        let queue = QueueName::new("agent.tasks").unwrap();
        let mut env = Envelope::new(queue.clone(), "payload").with_key("user-7");
        env.headers.push(("trace".into(), "t-1".into()));
        let h = to_headers(&env, &[]);
        assert!(h.get(WIRE).is_none());
        assert_eq!(h.get("redrive-id").unwrap().as_str(), env.id.to_string());
        assert_eq!(h.get("redrive-key").unwrap().as_str(), "user-7");

        let fast = compact_of(&queue, None, Some(&h), &Bytes::from_static(b"payload")).unwrap();
        let full =
            envelope_of(&queue, wire_of(Some(&h)).0, Bytes::from_static(b"payload")).unwrap();
        for read in [fast, full] {
            assert_eq!(read.id, env.id);
            assert_eq!(read.key.as_deref(), Some("user-7"));
            assert_eq!(read.headers, env.headers);
            assert_eq!(read.payload, b"payload"[..]);
            assert_eq!((read.attempt, read.queue.as_str()), (0, "agent.tasks"));
        }
    }

    #[test]
    fn a_message_that_failed_keeps_the_full_headers() {
        let queue = QueueName::new("agent.tasks").unwrap();
        let mut env = Envelope::new(queue.clone(), "payload");
        env.record_failure(
            Failure::new(FailureKind::Retry, "Timeout", "upstream slow", 1),
            "main",
        );
        let h = to_headers(&env, &[]);
        assert!(h.get(WIRE).is_some());
        assert!(compact_of(&queue, None, Some(&h), &Bytes::from_static(b"payload")).is_none());
        let read =
            envelope_of(&queue, wire_of(Some(&h)).0, Bytes::from_static(b"payload")).unwrap();
        assert_eq!((read.id, read.attempt), (env.id, 1));
        assert_eq!(read.history[0].class, "Timeout");
    }

    #[test]
    fn a_compact_id_that_does_not_parse_is_reported_not_replaced() {
        let queue = QueueName::new("agent.tasks").unwrap();
        let mut h = async_nats::HeaderMap::new();
        h.insert("redrive-id", "not-a-uuid");
        assert!(compact_of(&queue, None, Some(&h), &Bytes::from_static(b"x")).is_none());
        let err = envelope_of(&queue, wire_of(Some(&h)).0, Bytes::from_static(b"x")).unwrap_err();
        assert!(err.contains("redrive-id"), "{err}");
    }

    #[test]
    fn an_id_in_the_subject_is_read_with_or_without_headers() {
        let queue = QueueName::new("agent.tasks").unwrap();
        let env = Envelope::new(queue.clone(), "payload");
        let subject = format!("redrive-id.agent.tasks.{}", env.id);
        let id = id_of_subject(&subject, "redrive-id.agent.tasks")
            .unwrap()
            .unwrap();
        assert_eq!(id, env.id);
        let bare = compact_of(&queue, Some(id), None, &Bytes::from_static(b"payload")).unwrap();
        assert_eq!((bare.id, bare.key, bare.attempt), (env.id, None, 0));

        // A key and user headers still travel as headers beside the subject's id.
        let mut keyed = Envelope::new(queue.clone(), "payload").with_key("user-7");
        keyed.headers.push(("trace".into(), "t-1".into()));
        let mut h = async_nats::HeaderMap::new();
        append_compact(&mut h, &keyed);
        assert!(h.get("redrive-id").is_none());
        let read = compact_of(&queue, Some(keyed.id), Some(&h), &Bytes::new()).unwrap();
        assert_eq!(read.id, keyed.id);
        assert_eq!(read.key.as_deref(), Some("user-7"));
        assert_eq!(read.headers, keyed.headers);
    }

    #[test]
    fn a_subject_id_is_only_read_under_the_queues_own_prefix() {
        // Another queue whose name extends this one's is not this queue's id subject.
        let other = "redrive-id.agent.tasks2.0190c0de-0000-7000-8000-000000000000";
        assert!(id_of_subject(other, "redrive-id.agent.tasks").is_none());
        assert!(id_of_subject("redrive.agent.tasks", "redrive-id.agent.tasks").is_none());
        let bad = id_of_subject("redrive-id.agent.tasks.nope", "redrive-id.agent.tasks");
        assert!(bad.unwrap().unwrap_err().contains("nope"));
    }

    #[test]
    fn a_message_without_an_id_is_named_by_where_it_sits() {
        let id = id_in_stream("redrive_agent_tasks", 1_764_000_000_000, 42);
        assert_eq!(
            id,
            id_in_stream("redrive_agent_tasks", 1_764_000_000_000, 42)
        );
        for other in [
            id_in_stream("redrive_agent_tasks", 1_764_000_000_000, 43),
            id_in_stream("redrive_agent_other", 1_764_000_000_000, 42),
            // The stream deleted and created again: sequences start over.
            id_in_stream("redrive_agent_tasks", 1_764_000_000_001, 42),
        ] {
            assert_ne!(id, other);
        }
    }
}

/// Decoders under fire: whatever `to_headers` writes reads back equal, and arbitrary
/// headers never panic the reader.
#[cfg(test)]
mod properties {
    use async_nats::HeaderMap;
    use bytes::Bytes;
    use proptest::prelude::*;
    use redrive_core::testing::sample_envelope;
    use redrive_core::{Envelope, MessageId, QueueName};

    use super::{read_envelope, to_headers};

    fn queue() -> QueueName {
        QueueName::new("agent.tasks").expect("queue")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn an_envelope_reads_back_as_it_was_written(
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            key in proptest::option::of("[ -~]{1,20}"),
            headers in proptest::collection::vec(("[a-zA-Z][a-zA-Z0-9_-]{0,12}", "[ -~]{0,20}"), 0..4),
            message in "\\PC{0,80}",
            failed in any::<bool>(),
        ) {
            let env = sample_envelope(payload, key, headers, message, failed);
            let h = to_headers(&env, &[]);
            let payload = Bytes::from(env.payload.to_vec());
            let back = read_envelope(&queue(), None, Some(&h), &payload, || MessageId::at("s", 1, 1));
            // NATS headers are a map: headers of different names come back in another
            // order (each name's values keep theirs).
            let sorted = |mut e: Envelope| {
                e.headers.sort_by(|a, b| a.0.cmp(&b.0));
                e
            };
            prop_assert_eq!(back.map(sorted), Ok(sorted(env)));
        }

        #[test]
        fn any_headers_read_or_fail_without_a_panic(
            pairs in proptest::collection::vec(
                (prop_oneof![Just("redrive-wire".to_owned()), Just("redrive-id".to_owned()),
                    Just("redrive-key".to_owned()), "[a-zA-Z][a-zA-Z0-9_-]{0,12}"], "[ -~]{0,40}"),
                0..5),
            subject_id in proptest::option::of(any::<u128>()),
        ) {
            let mut h = HeaderMap::new();
            for (k, v) in &pairs {
                h.append(k.as_str(), v.as_str());
            }
            let subject_id = subject_id.map(|n| MessageId::derived(n.to_be_bytes()));
            let _ = read_envelope(&queue(), subject_id, Some(&h), &Bytes::from_static(b"x"), || MessageId::at("s", 1, 1));
        }
    }
}
