//! An envelope as an SQS message: the body carries the payload (as text when it is text
//! SQS accepts, else base64), redrive's metadata travels packed in one message attribute
//! (`redrive`, a JSON list of header pairs), and user headers as their own attributes
//! when they fit SQS's rules and its limit of 10 attributes, else packed too.

use std::collections::HashMap;

use aws_sdk_sqs::types::{Message, MessageAttributeValue};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use redrive_core::{Envelope, MessageId, QueueName};

/// The attribute holding redrive's metadata.
pub(crate) const META: &str = "redrive";
/// The attribute saying how the body encodes the payload, when it is not plain text.
pub(crate) const BODY: &str = "redrive-body";
/// User headers sent as attributes of their own, at most (SQS allows 10 in all).
const MAX_USER_ATTRIBUTES: usize = 8;

/// A message ready to send: body and attributes.
pub(crate) struct Outgoing {
    pub(crate) body: String,
    pub(crate) attributes: HashMap<String, MessageAttributeValue>,
    /// Bytes SQS counts against its size limit (body, attribute names, types, values).
    pub(crate) size: usize,
}

fn text(value: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .expect("data type is set")
}

/// Characters SQS accepts in a body or string attribute (XML 1.0 characters).
fn sqs_text(s: &str) -> bool {
    s.chars().all(|c| {
        matches!(c, '\u{9}' | '\u{a}' | '\u{d}' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
    })
}

fn attribute_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !name.to_ascii_lowercase().starts_with("aws.")
        && !name.to_ascii_lowercase().starts_with("amazon.")
        && !name.eq_ignore_ascii_case(META)
        && !name.eq_ignore_ascii_case(BODY)
}

/// Encodes `env` (with `extra` redrive headers, such as the time it died).
pub(crate) fn encode(env: &Envelope, extra: &[(&str, String)]) -> Outgoing {
    let mut meta: Vec<(String, String)> = env
        .to_wire()
        .into_iter()
        .filter(|(k, _)| k.starts_with("redrive-"))
        .collect();
    if let Some(k) = &env.key {
        meta.push(("redrive-key".into(), k.clone()));
    }
    for (k, v) in extra {
        meta.push(((*k).to_owned(), v.clone()));
    }
    let mut attributes = HashMap::new();
    let own = env.headers.len() <= MAX_USER_ATTRIBUTES
        && env
            .headers
            .iter()
            .all(|(k, v)| attribute_name_ok(k) && !v.is_empty() && sqs_text(v))
        // SQS keeps attributes as a map: `decode` reads them back in name order, so
        // only headers already in that order (and with distinct names) can travel as
        // attributes without being reordered (found by the property tests).
        && env.headers.windows(2).all(|w| w[0].0 < w[1].0);
    if own {
        for (k, v) in &env.headers {
            attributes.insert(k.clone(), text(v));
        }
    } else {
        meta.extend(env.headers.iter().cloned());
    }
    let body = match std::str::from_utf8(&env.payload) {
        Ok(s) if !s.is_empty() && sqs_text(s) => s.to_owned(),
        _ => {
            let encoding = if env.payload.is_empty() {
                "empty"
            } else {
                "base64"
            };
            attributes.insert(BODY.to_owned(), text(encoding));
            if env.payload.is_empty() {
                " ".to_owned()
            } else {
                B64.encode(&env.payload)
            }
        }
    };
    let packed = serde_json::to_string(&meta).unwrap_or_default();
    attributes.insert(META.to_owned(), text(&packed));
    let size = body.len()
        + attributes
            .iter()
            .map(|(k, v)| k.len() + "String".len() + v.string_value().map_or(0, str::len))
            .sum::<usize>();
    Outgoing {
        body,
        attributes,
        size,
    }
}

/// What a received message says.
pub(crate) struct Incoming {
    /// The envelope, or why it could not be read (with the raw payload kept).
    pub(crate) envelope: Result<Envelope, (String, Envelope)>,
    /// Receives so far, this one included (SQS's `ApproximateReceiveCount`).
    pub(crate) receives: u32,
    /// The time redrive moved it to a DLQ, when it did (not SQS's redrive policy).
    pub(crate) dead_at_ms: Option<i64>,
}

/// Decodes a received message of `queue`.
pub(crate) fn decode(queue: &QueueName, m: &Message) -> Incoming {
    use aws_sdk_sqs::types::MessageSystemAttributeName as Sys;
    let receives = m
        .attributes()
        .and_then(|a| a.get(&Sys::ApproximateReceiveCount))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let attrs = m.message_attributes();
    let attr = |name: &str| {
        attrs
            .and_then(|a| a.get(name))
            .and_then(|v| v.string_value())
    };
    let body = m.body().unwrap_or_default();
    let raw_payload = || match attr(BODY) {
        Some("base64") => B64
            .decode(body)
            .unwrap_or_else(|_| body.as_bytes().to_vec()),
        Some("empty") => Vec::new(),
        _ => body.as_bytes().to_vec(),
    };
    let payload = match attr(BODY) {
        Some("base64") => B64
            .decode(body)
            .map_err(|e| format!("its body is marked base64 but does not decode: {e}")),
        Some("empty") | None => Ok(raw_payload()),
        Some(other) => Err(format!("unknown body encoding {other:?}")),
    };
    let mut wire: Vec<(String, String)> = Vec::new();
    let mut meta_error = None;
    if let Some(packed) = attr(META) {
        match serde_json::from_str::<Vec<(String, String)>>(packed) {
            Ok(pairs) => wire.extend(pairs),
            Err(e) => {
                meta_error = Some(format!(
                    "its {META:?} attribute is not a JSON list of header pairs: {e}"
                ))
            }
        }
    }
    if let Some(a) = attrs {
        let mut user: Vec<(&String, &MessageAttributeValue)> = a
            .iter()
            .filter(|(k, _)| k.as_str() != META && k.as_str() != BODY)
            .collect();
        user.sort_by(|x, y| x.0.cmp(y.0));
        for (k, v) in user {
            if let Some(s) = v.string_value() {
                wire.push((k.clone(), s.to_owned()));
            }
        }
    }
    let dead_at_ms = wire
        .iter()
        .find(|(k, _)| k == "redrive-dead-at")
        .and_then(|(_, v)| v.parse().ok())
        .filter(|ms| redrive_core::is_valid_time(*ms));
    let key = wire
        .iter()
        .find(|(k, _)| k == "redrive-key")
        .map(|(_, v)| v.clone());
    let foreign = !wire.iter().any(|(k, _)| k == "redrive-version");
    let raw = || {
        let mut env = Envelope::new(queue.clone(), raw_payload());
        if let Some(id) = m.message_id().and_then(|id| MessageId::parse(id).ok()) {
            env.id = id;
        }
        env
    };
    let envelope = match (meta_error, payload) {
        (Some(why), _) | (None, Err(why)) => Err((why, raw())),
        (None, Ok(payload)) => {
            let wire = wire
                .into_iter()
                .filter(|(k, _)| k != "redrive-dead-at" && k != "redrive-key")
                .collect();
            match Envelope::from_wire(queue, key, payload, wire) {
                Ok(mut env) => {
                    // A message from any producer keeps one id across its receives: SQS's.
                    if foreign
                        && let Some(id) = m.message_id().and_then(|id| MessageId::parse(id).ok())
                    {
                        env.id = id;
                    }
                    Ok(env)
                }
                Err(e) => Err((e.to_string(), raw())),
            }
        }
    };
    Incoming {
        envelope,
        receives,
        dead_at_ms,
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_sqs::types::MessageSystemAttributeName as Sys;
    use redrive_core::{Failure, FailureKind};

    use super::*;

    fn received(out: &Outgoing, receives: u32) -> Message {
        let mut b = Message::builder()
            .message_id("2f0c4a4e-63a3-4c43-9b0a-3f1f9d2d1a11")
            .receipt_handle("r")
            .body(out.body.clone())
            .attributes(Sys::ApproximateReceiveCount, receives.to_string());
        for (k, v) in &out.attributes {
            b = b.message_attributes(k.clone(), v.clone());
        }
        b.build()
    }

    fn queue() -> QueueName {
        QueueName::new("agent.tasks").expect("queue")
    }

    #[test]
    fn text_binary_and_empty_payloads_round_trip() {
        let binary: Vec<u8> = (0..=255u8).collect();
        for payload in [
            b"{\"task\":1}".to_vec(),
            binary,
            Vec::new(),
            b"nul \0 inside".to_vec(),
        ] {
            let mut env = Envelope::new(queue(), payload.clone()).with_key("k-1");
            env.record_failure(
                Failure::new(FailureKind::Retry, "Upstream", "line one\nline two", 1),
                "main",
            );
            let out = encode(&env, &[]);
            assert!(sqs_text(&out.body) && !out.body.is_empty());
            let back = decode(&queue(), &received(&out, 2));
            let got = back.envelope.unwrap_or_else(|(why, _)| panic!("{why}"));
            assert_eq!(got, env);
            assert_eq!(back.receives, 2);
        }
    }

    #[test]
    fn user_headers_are_attributes_when_they_fit_and_packed_when_not() {
        let env = Envelope::new(queue(), b"x".to_vec()).with_header("traceparent", "00-ab-cd-01");
        let out = encode(&env, &[]);
        assert!(out.attributes.contains_key("traceparent"));
        let back = decode(&queue(), &received(&out, 1))
            .envelope
            .expect("decodes");
        assert_eq!(back.headers, env.headers);

        let mut many = Envelope::new(queue(), b"x".to_vec());
        for i in 0..12 {
            many = many.with_header(format!("h{i:02}"), format!("v{i}"));
        }
        many = many.with_header("bad name!", "x");
        let out = encode(&many, &[]);
        assert!(out.attributes.len() <= 10, "{}", out.attributes.len());
        let back = decode(&queue(), &received(&out, 1))
            .envelope
            .expect("decodes");
        assert_eq!(back.headers, many.headers);
    }

    #[test]
    fn a_message_from_another_producer_keeps_the_sqs_id() {
        let m = Message::builder()
            .message_id("2f0c4a4e-63a3-4c43-9b0a-3f1f9d2d1a11")
            .body("plain text")
            .message_attributes("attempt", text("2"))
            .message_attributes("error", text("Timeout: upstream"))
            .build();
        let env = decode(&queue(), &m).envelope.expect("adopted");
        assert_eq!(env.id.to_string(), "2f0c4a4e-63a3-4c43-9b0a-3f1f9d2d1a11");
        assert_eq!(
            env.attempt, 2,
            "the hand-written pattern's attempt header is read"
        );
        assert_eq!(env.payload, b"plain text"[..]);
    }

    #[test]
    fn broken_metadata_is_reported_with_the_payload_kept() {
        let m = Message::builder()
            .message_id("2f0c4a4e-63a3-4c43-9b0a-3f1f9d2d1a11")
            .body("keep me")
            .message_attributes(META, text("{not json"))
            .build();
        let (why, raw) = decode(&queue(), &m).envelope.expect_err("malformed");
        assert!(why.contains("redrive"), "{why}");
        assert_eq!(raw.payload, b"keep me"[..]);
    }
}

/// Decoders under fire: arbitrary messages never panic `decode`, and whatever `encode`
/// writes reads back equal.
#[cfg(test)]
mod properties {
    use aws_sdk_sqs::types::{Message, MessageAttributeValue, MessageSystemAttributeName as Sys};
    use proptest::prelude::*;
    use redrive_core::QueueName;
    use redrive_core::testing::sample_envelope;

    use super::{decode, encode};

    fn queue() -> QueueName {
        QueueName::new("agent.tasks").expect("queue")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn an_envelope_reads_back_as_it_was_written(
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            key in proptest::option::of("\\PC{1,20}"),
            headers in proptest::collection::vec(("[a-zA-Z][a-zA-Z0-9 !._-]{0,12}", "\\PC{0,20}"), 0..12),
            message in "\\PC{0,80}",
            failed in any::<bool>(),
        ) {
            let env = sample_envelope(payload, key, headers, message, failed);
            let out = encode(&env, &[]);
            let mut m = Message::builder()
                .message_id("2f0c4a4e-63a3-4c43-9b0a-3f1f9d2d1a11")
                .body(out.body.clone())
                .attributes(Sys::ApproximateReceiveCount, "1");
            for (k, v) in &out.attributes {
                m = m.message_attributes(k.clone(), v.clone());
            }
            let back = decode(&queue(), &m.build()).envelope.map_err(|(why, _)| why);
            prop_assert_eq!(back, Ok(env));
        }

        #[test]
        fn any_message_decodes_or_is_quarantined_without_a_panic(
            body in proptest::option::of("\\PC{0,40}"),
            attrs in proptest::collection::vec(
                (prop_oneof![Just("redrive".to_owned()), Just("redrive-body".to_owned()), "\\PC{1,12}"], "\\PC{0,40}"),
                0..5),
            receives in proptest::option::of("\\PC{0,5}"),
        ) {
            let mut m = Message::builder();
            if let Some(b) = body {
                m = m.body(b);
            }
            if let Some(r) = receives {
                m = m.attributes(Sys::ApproximateReceiveCount, r);
            }
            for (k, v) in attrs {
                let v = MessageAttributeValue::builder().data_type("String").string_value(v).build().expect("value");
                m = m.message_attributes(k, v);
            }
            let _ = decode(&queue(), &m.build());
        }
    }
}
