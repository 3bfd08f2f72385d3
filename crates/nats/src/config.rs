//! The `nats://` URL: where NATS is, and the settings of the streams and consumers
//! redrive creates.

use async_nats::jetstream::stream;

use crate::error::NatsError;

/// How to reach NATS, and the settings of the streams and consumers redrive creates.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// `nats://host:port`.
    pub url: String,
    /// Prefix of stream, subject and bucket names (default `redrive`).
    pub namespace: String,
    /// Replicas of every stream redrive creates (default 1; 3 or 5 on a cluster).
    pub replicas: usize,
    /// Where the streams keep messages (default file storage).
    pub storage: stream::StorageType,
    /// The consumer's `max_deliver`. Default: twice the policy's max attempts plus 10,
    /// a backstop above redrive's own counting; a message that reaches it is moved to the
    /// DLQ stream through the server's MAX_DELIVERIES advisory.
    pub max_deliver: Option<i64>,
    /// Where a message that never failed carries its id: in a `redrive-id` header (the
    /// default) or in its subject, which spares both clients a header per message but
    /// costs the server memory per message waiting (ARCHITECTURE.md has the figures).
    pub ids: IdPlacement,
}

/// Where a message that never failed carries its id. Either is read whatever the
/// setting, so producers and consumers may differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdPlacement {
    /// In a `redrive-id` header, on the subject `<namespace>.<queue>`.
    Header,
    /// As the last token of its subject, `<namespace>-id.<queue>.<id>`: no header to
    /// parse, but JetStream keeps an index entry per subject, in memory, for every
    /// message waiting in the stream.
    Subject,
}

const OPTIONS: &str =
    "namespace=NAME, replicas=1..5, storage=file|memory, max_deliver=N, ids=header|subject";

impl NatsConfig {
    /// Parses `nats://host:port[?namespace=NAME&replicas=N&storage=file|memory&max_deliver=N&ids=header|subject]`.
    /// The settings apply to the streams and the consumer redrive creates; existing ones
    /// are used as they are.
    ///
    /// # Errors
    ///
    /// Another scheme, an unknown option or a value out of range.
    pub fn new(url: &str) -> Result<Self, NatsError> {
        let shown = url.split_once('?').map_or(url, |(base, _)| base);
        let bad = |reason: &str| NatsError::Unreachable {
            address: shown.to_owned(),
            reason: reason.to_owned(),
        };
        if !url.starts_with("nats://") {
            return Err(bad(
                "expected nats://HOST:PORT (e.g. nats://127.0.0.1:4222)",
            ));
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut config = Self {
            url: base.to_owned(),
            namespace: "redrive".to_owned(),
            replicas: 1,
            storage: stream::StorageType::File,
            max_deliver: None,
            ids: IdPlacement::Header,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let invalid = |rule: &str| bad(&format!("option {pair:?}: {rule}"));
            match key {
                "namespace" => {
                    if value.is_empty()
                        || !value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    {
                        return Err(invalid("letters, digits, '_' and '-' only"));
                    }
                    value.clone_into(&mut config.namespace);
                }
                "replicas" => {
                    config.replicas = value
                        .parse()
                        .ok()
                        .filter(|r| (1..=5).contains(r))
                        .ok_or_else(|| invalid("a number from 1 to 5"))?;
                }
                "storage" => {
                    config.storage = match value {
                        "file" => stream::StorageType::File,
                        "memory" => stream::StorageType::Memory,
                        _ => return Err(invalid("file or memory")),
                    };
                }
                "max_deliver" => {
                    config.max_deliver = Some(
                        value
                            .parse()
                            .ok()
                            .filter(|n| *n >= 1)
                            .ok_or_else(|| invalid("a number of deliveries, at least 1"))?,
                    );
                }
                "ids" => {
                    config.ids = match value {
                        "subject" => IdPlacement::Subject,
                        "header" => IdPlacement::Header,
                        _ => return Err(invalid("subject or header")),
                    };
                }
                _ => {
                    return Err(bad(&format!(
                        "unknown option {pair:?}; the options are {OPTIONS}"
                    )));
                }
            }
        }
        Ok(config)
    }
}
