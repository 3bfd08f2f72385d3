//! The JetStream [`Transport`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer::pull, stream};
use bytes::Bytes;
use redrive_core::{
    Delivery, Envelope, Fetched, Lane, LaneSet, LaneStats, MessageId, QueueDepths, QueueName, Tier,
    Transport, TransportError, now_ms,
};

/// A JetStream backend error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// NATS could not be reached at start.
    #[error("NATS at {address} is unreachable: {reason}")]
    Unreachable {
        /// Where.
        address: String,
        /// Why.
        reason: String,
    },
    /// A JetStream call failed.
    #[error("NATS JetStream: {context}: {reason}")]
    Call {
        /// What was being done.
        context: &'static str,
        /// Why.
        reason: String,
    },
    /// A message is not a redrive message.
    #[error("NATS JetStream: message {seq} of {stream} is not a redrive message: {reason}")]
    Malformed {
        /// Stream.
        stream: String,
        /// Stream sequence.
        seq: u64,
        /// Why.
        reason: String,
    },
}

impl From<NatsError> for TransportError {
    fn from(e: NatsError) -> Self {
        match e {
            NatsError::Unreachable { address, reason } => Self::Unavailable {
                backend: "nats",
                address,
                source: reason.into(),
            },
            other => Self::Backend {
                context: "nats".into(),
                source: Box::new(other),
            },
        }
    }
}

impl From<NatsError> for redrive_core::StoreError {
    fn from(e: NatsError) -> Self {
        Self::Backend {
            context: "nats".into(),
            source: Box::new(e),
        }
    }
}

pub(crate) fn call<E: std::fmt::Display>(context: &'static str) -> impl Fn(E) -> NatsError {
    move |e| NatsError::Call {
        context,
        reason: e.to_string(),
    }
}

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

    /// Connects and checks JetStream answers.
    ///
    /// # Errors
    ///
    /// [`NatsError::Unreachable`] naming the address.
    pub async fn connect(&self) -> Result<NatsTransport, NatsError> {
        let shown = self
            .url
            .rsplit_once('@')
            .map_or(self.url.clone(), |(_, h)| format!("nats://{h}"));
        let unreachable = |reason: String| NatsError::Unreachable {
            address: shown.clone(),
            reason,
        };
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(3))
            // Down at start is an error to report; a drop later is reconnected forever.
            .max_reconnects(None)
            .connect(self.url.as_str());
        let client = tokio::time::timeout(Duration::from_secs(5), client)
            .await
            .map_err(|_| unreachable("no answer within 5 s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::time::timeout(Duration::from_secs(5), client.flush())
            .await
            .map_err(|_| unreachable("no answer within 5 s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let js = jetstream::new(client.clone());
        // Creating the history bucket is also the check that JetStream is enabled.
        let history = js
            .create_key_value(jetstream::kv::Config {
                bucket: format!("{}_history", self.namespace),
                history: 1,
                num_replicas: self.replicas,
                storage: self.storage,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                unreachable(format!(
                    "JetStream is not enabled or not answering (run nats-server with -js): {e}"
                ))
            })?;
        Ok(NatsTransport {
            client,
            js,
            history,
            ns: self.namespace.clone(),
            settings: Settings {
                replicas: self.replicas,
                storage: self.storage,
                max_deliver: self.max_deliver,
                ids: self.ids,
            },
            ready: Arc::default(),
            upkeep: Arc::default(),
        })
    }
}

/// The backend's handle on a delivery: where its acks go, and its delivery count.
///
/// Only the ack subject is kept, not the JetStream message: the message carries a copy
/// of the client's context, several hundred bytes moved with every delivery.
#[derive(Clone)]
pub struct Token {
    reply: async_nats::Subject,
    delivered: i64,
    /// A message of the isolation stream (else of main).
    isolated: bool,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("delivered", &self.delivered)
            .finish()
    }
}

/// Streams, a durable pull consumer and a KV bucket on one NATS server.
#[derive(Clone)]
pub struct NatsTransport {
    client: async_nats::Client,
    js: jetstream::Context,
    history: jetstream::kv::Store,
    ns: String,
    pub(crate) settings: Settings,
    ready: Arc<Mutex<std::collections::HashMap<String, (Consumer, i64)>>>,
    pub(crate) upkeep: Arc<Mutex<std::collections::HashMap<String, crate::exhausted::Upkeep>>>,
}

/// What the streams and the consumer are created with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    pub(crate) replicas: usize,
    pub(crate) storage: stream::StorageType,
    pub(crate) max_deliver: Option<i64>,
    pub(crate) ids: IdPlacement,
}

pub(crate) type Consumer = jetstream::consumer::Consumer<pull::Config>;

/// What the history bucket keeps per message between deliveries.
#[derive(serde::Serialize, serde::Deserialize, Default)]
pub(crate) struct Record {
    /// The envelope's wire headers after its last failure (history included).
    pub(crate) h: Vec<(String, String)>,
    /// The lane label of the retry it is waiting in.
    lane: String,
    /// When it is due.
    due: i64,
    /// Deliveries this backend ended with a `Nak` (a failure's delay, or a release).
    naks: u32,
    /// Deliveries that ended without an outcome (crashes), already accounted for.
    crashes: u32,
}

impl Record {
    /// Deliveries whose end is accounted for.
    pub(crate) fn settled(&self) -> u64 {
        u64::from(self.naks) + u64::from(self.crashes)
    }
}

/// Names for one queue.
pub(crate) struct Names {
    pub(crate) stream: String,
    pub(crate) subject: String,
    /// With `ids=subject`, messages that never failed are published to `<id_prefix>.<id>`.
    pub(crate) id_prefix: String,
    /// Whether publishes put ids in subjects: asked for, and the main stream takes
    /// `<id_prefix>.*` (set by `ensure_streams`).
    pub(crate) ids_in_subject: bool,
    pub(crate) dlq_stream: String,
    pub(crate) dlq_subject: String,
    /// Captures the server's MAX_DELIVERIES advisories for the main stream's consumer.
    pub(crate) exhausted_stream: String,
    pub(crate) exhausted_subject: String,
    /// The isolation lane: crash suspects, run one at a time.
    pub(crate) isolated_stream: String,
    pub(crate) isolated_subject: String,
}

/// The durable consumer of every main stream.
pub(crate) const CONSUMER: &str = "redrive";

fn sanitize(queue: &str) -> String {
    queue
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

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
fn is_compact(env: &Envelope) -> bool {
    env.is_fresh()
        && env
            .key
            .as_deref()
            .is_none_or(|k| !k.is_empty() && !k.contains(['\r', '\n']))
}

/// The compact form's headers besides the id: the key, and the user's headers.
fn append_compact(h: &mut HeaderMap, env: &Envelope) {
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

impl NatsTransport {
    /// With `ids=subject`, messages that never failed are published to `<this>.<id>`.
    pub(crate) fn id_prefix(&self, queue: &str) -> String {
        format!("{}-id.{queue}", self.ns)
    }

    pub(crate) fn names(&self, queue: &str) -> Names {
        let base = format!("{}_{}", self.ns, sanitize(queue));
        Names {
            subject: format!("{}.{queue}", self.ns),
            id_prefix: self.id_prefix(queue),
            ids_in_subject: false,
            exhausted_stream: format!("{base}_exhausted"),
            exhausted_subject: format!(
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{base}.{CONSUMER}"
            ),
            dlq_stream: format!("{base}_dlq"),
            dlq_subject: format!("{}-dlq.{queue}", self.ns),
            isolated_stream: format!("{base}_isolated"),
            isolated_subject: format!("{}-isolated.{queue}", self.ns),
            stream: base,
        }
    }

    pub(crate) fn js(&self) -> &jetstream::Context {
        &self.js
    }

    pub(crate) fn history(&self) -> &jetstream::kv::Store {
        &self.history
    }

    /// Creates the queue's streams if missing. The queue name travels in the stream's
    /// description, so `queues` can list it back.
    pub(crate) async fn ensure_streams(&self, queue: &str) -> Result<Names, NatsError> {
        let mut n = self.names(queue);
        let in_subject = self.settings.ids == IdPlacement::Subject;
        let id_subjects = format!("{}.*", n.id_prefix);
        let mut subjects = vec![n.subject.clone()];
        if in_subject {
            subjects.push(id_subjects.clone());
        }
        let main = self
            .js
            .get_or_create_stream(stream::Config {
                name: n.stream.clone(),
                subjects,
                description: Some(queue.to_owned()),
                retention: stream::RetentionPolicy::WorkQueue,
                storage: self.settings.storage,
                num_replicas: self.settings.replicas,
                ..Default::default()
            })
            .await
            .map_err(call("create the main stream"))?;
        let config = &main.cached_info().config;
        n.ids_in_subject = in_subject && config.subjects.contains(&id_subjects);
        if in_subject && !n.ids_in_subject {
            // A stream made before ids travelled in subjects, or by hand: add theirs.
            let mut config = config.clone();
            config.subjects.push(id_subjects);
            match self.js.update_stream(config).await {
                Ok(_) => n.ids_in_subject = true,
                Err(e) => {
                    tracing::warn!(stream = %n.stream, error = %e, "cannot add the id subjects to the main stream; messages carry their id in a header instead");
                }
            }
        }
        let limits = stream::RetentionPolicy::Limits;
        let work = stream::RetentionPolicy::WorkQueue;
        let dlq = (&n.dlq_stream, &n.dlq_subject, "dead letters", limits);
        self.side_stream(queue, dlq, "create the DLQ stream")
            .await?;
        let isolated = (
            &n.isolated_stream,
            &n.isolated_subject,
            "crash suspects, run alone",
            work,
        );
        self.side_stream(queue, isolated, "create the isolation stream")
            .await?;
        // The server announces a message that reached the consumer's max_deliver only to
        // whoever listens at that moment; a stream keeps the announcements until they
        // are handled (see `exhausted`).
        let exhausted = (
            &n.exhausted_stream,
            &n.exhausted_subject,
            "max-deliveries advisories",
            work,
        );
        self.side_stream(queue, exhausted, "create the advisory stream")
            .await?;
        Ok(n)
    }

    /// Creates one of a queue's streams besides main, if missing: `(name, subject, what
    /// it holds, retention)`. Its description names the queue and what it holds.
    async fn side_stream(
        &self,
        queue: &str,
        (name, subject, holds, retention): (&String, &String, &str, stream::RetentionPolicy),
        context: &'static str,
    ) -> Result<(), NatsError> {
        self.js
            .get_or_create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![subject.clone()],
                description: Some(format!("{queue} ({holds})")),
                retention,
                storage: self.settings.storage,
                num_replicas: self.settings.replicas,
                ..Default::default()
            })
            .await
            .map_err(call(context))?;
        Ok(())
    }

    /// The queue's durable consumer, and when its main stream was created (ms).
    async fn consumer(
        &self,
        lanes: &LaneSet,
        lease: Duration,
    ) -> Result<(Consumer, i64), NatsError> {
        let queue = lanes.queue.as_str();
        if let Some(c) = self.ready.lock().ok().and_then(|r| r.get(queue).cloned()) {
            return Ok(c);
        }
        let n = self.ensure_streams(queue).await?;
        let stream = self
            .js
            .get_stream(&n.stream)
            .await
            .map_err(call("open the main stream"))?;
        let max_attempts = i64::from(lanes.max_attempts());
        let consumer: Consumer = stream
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.into()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: lease,
                    // A backstop: redrive dead-letters at max attempts itself. A message
                    // that reaches it anyway is moved by `exhausted`.
                    max_deliver: self.settings.max_deliver.unwrap_or(max_attempts * 2 + 10),
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(call("create the durable consumer"))?;
        let created = created_ms(&stream);
        if let Ok(mut r) = self.ready.lock() {
            r.insert(queue.to_owned(), (consumer.clone(), created));
        }
        Ok((consumer, created))
    }

    /// The durable consumer of the queue's isolation stream. It has no `max_deliver`: a
    /// message there is delivered only to a runner that runs it alone, which counts each
    /// crash it causes and dead-letters it at max attempts.
    async fn isolated_consumer(
        &self,
        lanes: &LaneSet,
        lease: Duration,
    ) -> Result<(Consumer, i64), NatsError> {
        let key = format!("{}\0isolated", lanes.queue);
        if let Some(c) = self.ready.lock().ok().and_then(|r| r.get(&key).cloned()) {
            return Ok(c);
        }
        let n = self.ensure_streams(lanes.queue.as_str()).await?;
        let stream = self
            .js
            .get_stream(&n.isolated_stream)
            .await
            .map_err(call("open the isolation stream"))?;
        let consumer: Consumer = stream
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.into()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: lease,
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await
            .map_err(call("create the isolation stream's consumer"))?;
        let created = created_ms(&stream);
        if let Ok(mut r) = self.ready.lock() {
            r.insert(key, (consumer.clone(), created));
        }
        Ok((consumer, created))
    }

    /// Turns a pulled message into a delivery; `None` when it was quarantined (its
    /// redrive headers do not parse) or put off (a `redrive-not-before` still ahead).
    async fn decode(
        &self,
        lanes: &LaneSet,
        (stream, created, id_prefix): (&str, i64, &str),
        msg: jetstream::Message,
        isolated: bool,
    ) -> Result<Option<Delivery<Token>>, NatsError> {
        let now = now_ms();
        let (delivered, seq) = match msg.info() {
            Ok(i) => (i.delivered, i.stream_sequence),
            Err(e) => return Err(call("message info")(e)),
        };
        let async_nats::Message {
            subject,
            reply,
            payload,
            headers,
            ..
        } = msg.message;
        // Present: `info` was read from it.
        let Some(reply) = reply else { return Ok(None) };
        let decoded = id_of_subject(&subject, id_prefix)
            .transpose()
            .and_then(|subject_id| {
                read_envelope(&lanes.queue, subject_id, headers.as_ref(), &payload, || {
                    id_in_stream(stream, created, seq)
                })
            });
        let mut envelope = match decoded {
            Ok(env) => env,
            Err(why) => {
                let (wire, _) = wire_of(headers.as_ref());
                let why = format!("message {seq} of {stream}: {why}");
                let id = id_in_stream(stream, created, seq);
                self.quarantine(&lanes.queue, &reply, (id, wire), payload, &why)
                    .await;
                return Ok(None);
            }
        };
        let mut lane = Lane::Main;
        let mut due_ms = now;
        let mut accounted = 0;
        if delivered > 1
            && let Some(r) = self.record(&envelope.id.to_string()).await?
        {
            let payload = std::mem::take(&mut envelope.payload);
            envelope =
                envelope_of(&lanes.queue, r.h, payload).map_err(|reason| NatsError::Malformed {
                    stream: stream.to_owned(),
                    seq,
                    reason,
                })?;
            lane = Lane::from_label(&r.lane).unwrap_or(Lane::Main);
            due_ms = r.due;
            accounted = i64::from(r.naks) + i64::from(r.crashes);
        }
        let token = Token {
            reply,
            delivered,
            isolated,
        };
        // A message published with a due time still ahead (a retry that left the
        // isolation lane, or a producer's `redrive-not-before`) waits for it as a retry
        // does: its record first, then a `Nak` with the rest of the delay.
        if delivered == 1
            && let Some(due) = envelope.not_before_ms.filter(|due| *due > now)
        {
            let tier = lanes
                .tiers
                .get(envelope.attempt.saturating_sub(1) as usize)
                .or(lanes.tiers.last());
            let lane = tier.map_or(Lane::Main, |t| Lane::Retry(t.name().to_owned()));
            self.put_off(&envelope, &token, lane, due, (0, 0)).await?;
            return Ok(None);
        }
        // Earlier deliveries that neither this backend ended (Nak) nor were already
        // counted as crashes: the consumer holding them died.
        let unfinished_before = delivered - 1 > accounted;
        Ok(Some(Delivery {
            envelope,
            lane: if isolated { Lane::Isolated } else { lane },
            due_ms,
            unfinished_before,
            token,
        }))
    }

    /// Writes the message's record (its envelope, the lane it waits in, its due time),
    /// then gives it back with a `Nak` delayed until `due_ms`.
    async fn put_off(
        &self,
        envelope: &Envelope,
        token: &Token,
        lane: Lane,
        due_ms: i64,
        (naks, crashes): (u32, u32),
    ) -> Result<(), NatsError> {
        let mut wire = envelope.to_wire();
        if let Some(k) = &envelope.key {
            wire.push(("redrive-key".into(), k.clone()));
        }
        let record = Record {
            h: wire,
            lane: lane.label(),
            due: due_ms,
            naks: naks + 1,
            crashes,
        };
        // The history is durable before the delivery is given back with its delay.
        self.put_record(&envelope.id.to_string(), &record).await?;
        let delay = Duration::from_millis(u64::try_from(due_ms - now_ms()).unwrap_or(0).max(1));
        self.confirm(
            Some(&token.reply),
            AckKind::Nak(Some(delay)),
            "nak with delay",
        )
        .await
    }

    /// Publishes `envelope` to `subject` and waits until its stream has stored it.
    async fn publish_stored(
        &self,
        subject: String,
        envelope: &Envelope,
        context: &'static str,
    ) -> Result<(), NatsError> {
        let headers = to_headers(envelope, &[]);
        self.js
            .publish_with_headers(subject, headers, envelope.payload.clone())
            .await
            .map_err(call(context))?
            .await
            .map_err(call(context))?;
        Ok(())
    }

    pub(crate) async fn record(&self, id: &str) -> Result<Option<Record>, NatsError> {
        let v = self
            .history
            .get(id)
            .await
            .map_err(call("read the history bucket"))?;
        Ok(v.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    async fn put_record(&self, id: &str, r: &Record) -> Result<(), NatsError> {
        let body = serde_json::to_vec(r).unwrap_or_default();
        self.history
            .put(id, body.into())
            .await
            .map_err(call("write the history bucket"))?;
        Ok(())
    }

    /// Naks sent and crashes accounted for so far, counting as accounted the crashes this
    /// delivery revealed (the runner records them as one failed attempt).
    async fn outcomes(&self, d: &Delivery<Token>) -> Result<(u32, u32), NatsError> {
        let (naks, crashes) = if d.token.delivered > 1 {
            self.record(&d.envelope.id.to_string())
                .await?
                .map_or((0, 0), |r| (r.naks, r.crashes))
        } else {
            (0, 0)
        };
        let earlier = u32::try_from(d.token.delivered - 1).unwrap_or(0);
        let crashes = if d.unfinished_before {
            earlier.saturating_sub(naks)
        } else {
            crashes
        };
        Ok((naks, crashes))
    }

    /// Sends an ack of `kind` to a message's ack subject (`reply`) and waits for the
    /// server to confirm it.
    pub(crate) async fn confirm(
        &self,
        reply: Option<&async_nats::Subject>,
        kind: AckKind,
        context: &'static str,
    ) -> Result<(), NatsError> {
        let Some(reply) = reply.cloned() else {
            return Err(NatsError::Call {
                context,
                reason: "the message has no reply subject".into(),
            });
        };
        let body: bytes::Bytes = kind.into();
        self.client
            .request(reply, body)
            .await
            .map_err(call(context))?;
        Ok(())
    }

    /// Publishes a dead envelope to its queue's DLQ stream (marked with the time it
    /// died) and waits until the stream has stored it.
    pub(crate) async fn publish_dead(&self, envelope: &Envelope) -> Result<(), NatsError> {
        let n = self.names(envelope.queue.as_str());
        let headers = to_headers(envelope, &[("redrive-dead-at", now_ms().to_string())]);
        self.js
            .publish_with_headers(n.dlq_subject, headers, envelope.payload.clone())
            .await
            .map_err(call("publish to the DLQ stream"))?
            .await
            .map_err(call("DLQ publish acknowledgement"))?;
        Ok(())
    }

    /// Moves a message whose redrive headers do not parse to the DLQ stream without a
    /// handler, then terminates it in main. If either step fails it stays in main and is
    /// quarantined at its next delivery; the rest of the batch goes on.
    async fn quarantine(
        &self,
        queue: &QueueName,
        reply: &async_nats::Subject,
        (id, wire): (MessageId, Vec<(String, String)>),
        payload: Bytes,
        why: &str,
    ) {
        let raw = Envelope::unreadable(queue.clone(), id, payload, wire, why, "main", now_ms());
        tracing::warn!(%queue, reason = %why, "quarantining an unreadable message in the DLQ stream");
        let moved = async {
            self.publish_dead(&raw).await?;
            self.confirm(Some(reply), AckKind::Term, "terminate").await
        };
        if let Err(e) = moved.await {
            tracing::warn!(%queue, error = %e, "could not quarantine an unreadable message; it will be delivered again");
        }
    }

    async fn forget(&self, d: &Delivery<Token>) {
        if d.token.delivered > 1
            && let Err(e) = self.history.delete(d.envelope.id.to_string()).await
        {
            tracing::warn!(id = %d.envelope.id, error = %e, "could not forget a settled message's history");
        }
    }
}

impl Transport for NatsTransport {
    type Token = Token;

    async fn publish(&self, queue: &QueueName, batch: Vec<Envelope>) -> Result<(), TransportError> {
        let n = self.ensure_streams(queue.as_str()).await?;
        let mut acks = Vec::with_capacity(batch.len());
        for mut env in batch {
            env.queue = queue.clone();
            let ack = if n.ids_in_subject && is_compact(&env) {
                // The id in the subject: most messages then carry no header at all.
                let subject = format!("{}.{}", n.id_prefix, env.id);
                let mut headers = HeaderMap::new();
                append_compact(&mut headers, &env);
                if headers.is_empty() {
                    self.js.publish(subject, env.payload).await
                } else {
                    self.js
                        .publish_with_headers(subject, headers, env.payload)
                        .await
                }
            } else {
                let headers = to_headers(&env, &[]);
                self.js
                    .publish_with_headers(n.subject.clone(), headers, env.payload)
                    .await
            };
            acks.push(ack.map_err(call("publish"))?);
        }
        // Published only once JetStream has stored them.
        for ack in acks {
            ack.await.map_err(call("publish acknowledgement"))?;
        }
        Ok(())
    }

    async fn create_lanes(&self, lanes: &LaneSet) -> Result<(), TransportError> {
        // Retries wait in main (a `Nak` with a delay): the streams are all the lanes. The
        // durable consumer is left to the first consumer, whose lease is its ack wait.
        self.ensure_streams(lanes.queue.as_str()).await?;
        Ok(())
    }

    async fn fetch(
        &self,
        lanes: &LaneSet,
        max: usize,
        lease: Duration,
    ) -> Result<Fetched<Token>, TransportError> {
        let (consumer, created) = self.consumer(lanes, lease).await?;
        self.sweep_soon(&lanes.queue);
        // A fetch whose reply was lost to a reconnect would wait forever; give up and let
        // the runner fetch again.
        let msgs =
            tokio::time::timeout(Duration::from_secs(5), fetch_batch(&consumer, max, "fetch"))
                .await;
        let msgs = match msgs {
            Ok(result) => result?,
            Err(_) => {
                // After a reconnect a pull may go unanswered: push out what the client
                // holds and look the consumer up again before the next fetch.
                if let Ok(mut r) = self.ready.lock() {
                    r.remove(lanes.queue.as_str());
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), self.client.flush()).await;
                return Err(NatsError::Call {
                    context: "fetch",
                    reason: "no answer within 5 s".into(),
                }
                .into());
            }
        };
        let mut deliveries = Vec::with_capacity(msgs.len());
        let stream = &consumer.cached_info().stream_name;
        let id_prefix = self.id_prefix(lanes.queue.as_str());
        for msg in msgs {
            let at = (stream.as_str(), created, id_prefix.as_str());
            deliveries.extend(self.decode(lanes, at, msg, false).await?);
        }
        Ok(Fetched {
            deliveries,
            next_due_ms: None,
        })
    }

    async fn ack(&self, d: &Delivery<Token>) -> Result<(), TransportError> {
        // A plain ack is not waited for: if it is lost, the message is delivered again
        // (at least once still holds), and waiting would halve throughput.
        self.client
            .publish(d.token.reply.clone(), bytes::Bytes::new())
            .await
            .map_err(call("ack"))?;
        if d.token.delivered > 1 {
            // Boxed: the history delete is rare, and inline it would make every
            // delivery's task several kilobytes larger.
            Box::pin(self.forget(d)).await;
        }
        Ok(())
    }

    async fn retry(
        &self,
        d: &Delivery<Token>,
        tier: &Tier,
        due_ms: i64,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        if d.token.isolated {
            // Back to main, due later: the isolation lane holds only what is due now.
            let n = self.names(envelope.queue.as_str());
            let mut env = envelope.clone();
            env.not_before_ms = Some(due_ms);
            self.forget(d).await;
            self.publish_stored(n.subject, &env, "publish a retry to the main stream")
                .await?;
            redrive_core::failpoint("next-lane-written");
            self.confirm(Some(&d.token.reply), AckKind::Ack, "ack")
                .await?;
            return Ok(());
        }
        let outcomes = self.outcomes(d).await?;
        let lane = Lane::Retry(tier.name().to_owned());
        self.put_off(envelope, &d.token, lane, due_ms, outcomes)
            .await?;
        Ok(())
    }

    async fn dead_letter(
        &self,
        d: &Delivery<Token>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        self.publish_dead(envelope).await?;
        redrive_core::failpoint("next-lane-written");
        // Only once the DLQ stream has it is the message terminated in main.
        self.confirm(Some(&d.token.reply), AckKind::Term, "terminate")
            .await?;
        self.forget(d).await;
        Ok(())
    }

    async fn release(&self, d: &Delivery<Token>) -> Result<(), TransportError> {
        let id = d.envelope.id.to_string();
        let (naks, crashes) = self.outcomes(d).await?;
        let mut h = d.envelope.to_wire();
        if let Some(k) = &d.envelope.key {
            h.push(("redrive-key".into(), k.clone()));
        }
        let record = Record {
            h,
            lane: d.lane.label(),
            due: d.due_ms,
            naks: naks + 1,
            crashes,
        };
        self.put_record(&id, &record).await?;
        self.confirm(Some(&d.token.reply), AckKind::Nak(None), "release")
            .await?;
        Ok(())
    }

    async fn extend_lease(
        &self,
        d: &Delivery<Token>,
        _lease: Duration,
    ) -> Result<(), TransportError> {
        self.client
            .publish(d.token.reply.clone(), AckKind::Progress.into())
            .await
            .map_err(call("extend the lease"))?;
        Ok(())
    }

    async fn isolate(
        &self,
        d: &Delivery<Token>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        let n = self.ensure_streams(envelope.queue.as_str()).await?;
        // Its record goes first: the copy's deliveries are counted afresh. A crash before
        // the copy is stored leaves the message in main, unfinished again, to be
        // isolated at its next delivery.
        self.forget(d).await;
        self.publish_stored(
            n.isolated_subject,
            envelope,
            "publish to the isolation stream",
        )
        .await?;
        redrive_core::failpoint("next-lane-written");
        self.confirm(Some(&d.token.reply), AckKind::Ack, "ack")
            .await?;
        Ok(())
    }

    async fn fetch_isolated(
        &self,
        lanes: &LaneSet,
        lease: Duration,
    ) -> Result<Fetched<Token>, TransportError> {
        let (consumer, created) = self.isolated_consumer(lanes, lease).await?;
        let msgs = tokio::time::timeout(
            Duration::from_secs(5),
            fetch_batch(&consumer, 1, "fetch from the isolation stream"),
        )
        .await
        .map_err(|_| NatsError::Call {
            context: "fetch from the isolation stream",
            reason: "no answer within 5 s".into(),
        })??;
        let stream = &consumer.cached_info().stream_name;
        let mut deliveries = Vec::with_capacity(msgs.len());
        for msg in msgs {
            let at = (stream.as_str(), created, "");
            deliveries.extend(self.decode(lanes, at, msg, true).await?);
        }
        Ok(Fetched {
            deliveries,
            next_due_ms: None,
        })
    }

    async fn isolated_due(&self, lanes: &LaneSet) -> Result<Option<i64>, TransportError> {
        let n = self.ensure_streams(lanes.queue.as_str()).await?;
        let stream = self
            .js
            .get_stream(&n.isolated_stream)
            .await
            .map_err(call("open the isolation stream"))?;
        let Ok(mut consumer) = stream.get_consumer::<pull::Config>(CONSUMER).await else {
            // No consumer yet: nothing was ever fetched from it.
            let mut stream = stream;
            let waiting = stream
                .info()
                .await
                .map_err(call("isolation stream info"))?
                .state
                .messages;
            return Ok((waiting > 0).then(now_ms));
        };
        let info = consumer.info().await.map_err(call("consumer info"))?;
        Ok(if info.num_pending > 0 {
            Some(now_ms())
        } else if info.num_ack_pending > 0 {
            // Leased to a runner running it alone: due again if its lease runs out.
            let wait = i64::try_from(info.config.ack_wait.as_millis()).unwrap_or(30_000);
            Some(now_ms() + wait)
        } else {
            None
        })
    }

    fn fetches_in_flight(&self) -> usize {
        // The server serves pull requests in turn; with the next one already waiting it
        // goes on sending while the runner takes in the batch it just answered
        // (BENCHMARKS.md, NATS: "two pulls in flight").
        2
    }
}

impl NatsTransport {
    /// Depths from the consumer's counters: undelivered messages are "main"; delivered
    /// ones not yet acknowledged (running, or waiting out a retry delay) are "in flight".
    ///
    /// A server killed mid-run can come back with messages its consumer had already
    /// acknowledged still in the work-queue stream (nats-server 2.9 restores the ack floor
    /// but not the removals): nobody will ever be handed them again. Everything below the
    /// ack floor is acknowledged, so such leftovers are purged here.
    pub(crate) async fn nats_depths(&self, queue: &str) -> Result<QueueDepths, NatsError> {
        let n = self.names(queue);
        let mut stream = self
            .js
            .get_stream(&n.stream)
            .await
            .map_err(call("open the main stream"))?;
        let total = stream
            .info()
            .await
            .map_err(call("stream info"))?
            .state
            .messages;
        let (undelivered, inflight) = match stream.get_consumer::<pull::Config>(CONSUMER).await {
            Ok(mut c) => {
                let info = c.info().await.map_err(call("consumer info"))?;
                let (pending, acking) = (info.num_pending, info.num_ack_pending as u64);
                if total > pending + acking
                    && let Ok(name) = QueueName::new(queue)
                    && let Some(floor) = self
                        .leftovers_to_purge(&name, info.ack_floor.stream_sequence)
                        .await?
                {
                    let purged = stream
                        .purge()
                        .sequence(floor + 1)
                        .await
                        .map_err(call("purge acknowledged leftovers"))?
                        .purged;
                    if purged > 0 {
                        tracing::warn!(
                            queue,
                            purged,
                            ack_floor = floor,
                            "removed messages the server kept after they were acknowledged (a restart lost their removal)"
                        );
                    }
                }
                (pending, acking)
            }
            Err(_) => (total, 0),
        };
        let mut dlq = self
            .js
            .get_stream(&n.dlq_stream)
            .await
            .map_err(call("open the DLQ stream"))?;
        let dead = dlq
            .info()
            .await
            .map_err(call("DLQ stream info"))?
            .state
            .messages;
        // The isolation stream: waiting suspects, and those running alone.
        let (isolated, running_alone) = match self.js.get_stream(&n.isolated_stream).await {
            Ok(stream) => match stream.get_consumer::<pull::Config>(CONSUMER).await {
                Ok(mut c) => {
                    let info = c.info().await.map_err(call("consumer info"))?;
                    (info.num_pending, info.num_ack_pending as u64)
                }
                Err(_) => {
                    let mut stream = stream;
                    let waiting = stream
                        .info()
                        .await
                        .map_err(call("isolation stream info"))?
                        .state
                        .messages;
                    (waiting, 0)
                }
            },
            // Made by an older redrive: no isolation lane yet.
            Err(_) => (0, 0),
        };
        Ok(QueueDepths {
            queue: queue.to_owned(),
            main: undelivered,
            retry: Vec::new(),
            isolated,
            dlq: dead,
            inflight: inflight + running_alone,
            oldest_main_age_ms: None,
        })
    }

    /// Queues with a stream in this namespace (from the streams' descriptions).
    pub(crate) async fn queue_names(&self) -> Result<Vec<String>, NatsError> {
        let mut names = self.js.streams();
        let mut out = Vec::new();
        let prefix = format!("{}_", self.ns);
        while let Some(info) = futures_like::next(&mut names).await {
            let info = info.map_err(call("list streams"))?;
            // A main stream's description is its queue's name (the DLQ and advisory
            // streams have longer ones).
            if info.config.name.starts_with(&prefix)
                && let Some(q) = info.config.description
                && QueueName::new(q.as_str()).is_ok()
                && self.names(&q).stream == info.config.name
            {
                out.push(q);
            }
        }
        out.sort();
        Ok(out)
    }
}

impl LaneStats for NatsTransport {
    async fn depths(&self) -> Result<Vec<QueueDepths>, TransportError> {
        let mut out = Vec::new();
        for q in self.queue_names().await? {
            out.push(self.nats_depths(&q).await?);
        }
        Ok(out)
    }

    async fn queue_depths(&self, lanes: &LaneSet) -> Result<QueueDepths, TransportError> {
        self.ensure_streams(lanes.queue.as_str()).await?;
        Ok(self.nats_depths(lanes.queue.as_str()).await?)
    }
}

/// What a pull consumer has ready, up to `max` messages, without waiting for more.
pub(crate) async fn fetch_batch(
    consumer: &Consumer,
    max: usize,
    context: &'static str,
) -> Result<Vec<jetstream::Message>, NatsError> {
    let mut batch = consumer
        .fetch()
        .max_messages(max)
        .messages()
        .await
        .map_err(call(context))?;
    let mut msgs = Vec::with_capacity(max);
    while let Some(msg) = futures_like::next(&mut batch).await {
        msgs.push(msg.map_err(call(context))?);
    }
    Ok(msgs)
}

/// A durable pull consumer with explicit acks, created if missing.
pub(crate) async fn durable(
    stream: &jetstream::stream::Stream,
    name: &str,
    ack_wait: Duration,
    context: &'static str,
) -> Result<Consumer, NatsError> {
    stream
        .get_or_create_consumer(
            name,
            pull::Config {
                durable_name: Some(name.into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait,
                ..Default::default()
            },
        )
        .await
        .map_err(call(context))
}

/// `StreamExt::next` without a futures dependency.
pub(crate) mod futures_like {
    use std::pin::Pin;

    use futures_core::Stream;

    pub(crate) async fn next<S: Stream + Unpin>(s: &mut S) -> Option<S::Item> {
        std::future::poll_fn(|cx| Pin::new(&mut *s).poll_next(cx)).await
    }
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
    use redrive_core::{Envelope, Failure, FailureKind, MessageId, QueueName};

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
            let mut env = Envelope::new(queue(), payload);
            env.key = key;
            env.headers = headers
                .into_iter()
                .filter(|(k, _)| !k.to_ascii_lowercase().starts_with("redrive-"))
                .collect();
            if failed {
                env.record_failure(Failure::new(FailureKind::Retry, "E", message, 5), "main");
            }
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
