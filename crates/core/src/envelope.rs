//! The envelope: payload bytes, user headers and redrive's metadata (id, attempt,
//! failure history), with its versioned wire format as string headers.
//!
//! The wire format is what crosses a broker (Kafka headers, NATS headers, SQS message
//! attributes, Redis stream fields) and what the embedded store keeps, so a message
//! means the same thing on every backend.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::agent::{AgentContext, Cost, CostJson};
use crate::fingerprint::Fingerprint;
use crate::queue::{QueueError, QueueName};

/// The failure class of a message quarantined because redrive cannot read it.
pub const MALFORMED: &str = "MalformedEnvelope";
/// Version of the wire format written by this release.
pub const WIRE_VERSION: u32 = 1;
/// Every redrive header starts with this; other headers belong to the user.
pub const HEADER_PREFIX: &str = "redrive-";
/// Longest error message kept with a failure, in bytes (the tail of a longer one).
pub const MAX_ERROR_BYTES: usize = 4096;
/// Longest error message kept per history entry, in bytes.
const MAX_HISTORY_MESSAGE_BYTES: usize = 512;
/// Most failures kept in the history; the first one and the latest ones are kept.
pub const MAX_HISTORY: usize = 32;

/// Why headers could not be read as an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A redrive header held a value that does not parse.
    #[error("header {header}: invalid value {value:?}: {expected}")]
    Header {
        /// The header name.
        header: &'static str,
        /// The value found.
        value: String,
        /// What was expected instead.
        expected: &'static str,
    },
    /// Written by a newer redrive.
    #[error(
        "wire format version {0} is newer than this redrive understands ({WIRE_VERSION}); upgrade redrive"
    )]
    Version(u32),
    /// The origin queue named in the headers is not a valid queue name.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// A message's identity: a UUIDv7, kept across retries and replays, the idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(Uuid);

impl MessageId {
    /// A new, time-ordered id.
    #[must_use]
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// An id derived from 16 bytes that already identify the message (a UUID version 8,
    /// whose version and variant bits overwrite six of them): the same bytes always
    /// give the same id, so a message whose producer gave it none keeps one across
    /// redeliveries.
    #[must_use]
    pub fn derived(bytes: [u8; 16]) -> Self {
        Self(uuid::Builder::from_custom_bytes(bytes).into_uuid())
    }

    /// A 32-bit hash (FNV-1a) of the name of the place a [`Self::derived`] id comes from
    /// (a stream, a topic), so that two places with the same positions give different ids.
    /// Stable across releases: changing it would change every such id.
    #[must_use]
    pub fn place_hash(name: &str) -> u32 {
        name.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        })
    }

    /// The id of a message that carries none (its producer is not redrive), derived
    /// from where it sits: `place` (a stream, a queue), a time the place fixes for it in
    /// unix ms (the place's creation, the message's arrival) and its position there (a
    /// sequence). The same place, time and position always give the same id; ids sort
    /// by that time, as UUIDv7s do.
    #[must_use]
    pub fn at(place: &str, time_ms: i64, position: u64) -> Self {
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&time_ms.to_be_bytes()[2..]);
        // The place's hash folded to 16 bits: places whose times agree still differ.
        let hash = Self::place_hash(place);
        bytes[6..8].copy_from_slice(&((hash >> 16) ^ (hash & 0xffff)).to_be_bytes()[2..]);
        bytes[8..].copy_from_slice(&position.to_be_bytes());
        Self::derived(bytes)
    }

    /// Parses an id from its text form.
    ///
    /// # Errors
    ///
    /// Returns the parser's error when `text` is not a UUID.
    pub fn parse(text: &str) -> Result<Self, uuid::Error> {
        Uuid::parse_str(text.trim()).map(Self)
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The handler reported a transient failure.
    Retry,
    /// The handler reported the message as permanently invalid.
    Poison,
    /// The handler ran past its timeout.
    Timeout,
    /// The handler panicked (or its process was killed).
    Panic,
    /// The delivery's lease expired without an outcome: the consumer crashed or hung.
    LeaseExpired,
}

impl FailureKind {
    /// The stable name stored with a failure.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::Poison => "poison",
            Self::Timeout => "timeout",
            Self::Panic => "panic",
            Self::LeaseExpired => "lease_expired",
        }
    }

    /// Parses [`FailureKind::as_str`]; unknown names read as `Retry`.
    #[must_use]
    pub fn parse(text: &str) -> Self {
        match text {
            "poison" => Self::Poison,
            "timeout" => Self::Timeout,
            "panic" => Self::Panic,
            "lease_expired" => Self::LeaseExpired,
            _ => Self::Retry,
        }
    }
}

/// One failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// When it failed (unix ms).
    pub at_ms: i64,
    /// Which attempt this was, 1-based.
    pub attempt: u32,
    /// The lane the message was delivered from (`main`, `retry.5s`).
    pub lane: String,
    /// How it failed.
    pub kind: FailureKind,
    /// The error class, e.g. `RateLimited`, `exit_75`, `http_503`, `timeout`.
    pub class: String,
    /// The error message (truncated to its last [`MAX_ERROR_BYTES`] bytes).
    pub message: String,
    /// Fingerprint of class and message.
    pub fingerprint: Fingerprint,
    /// Whether it counts towards max attempts. A crash that cannot be pinned on this
    /// message (its consumer stopped while it was in flight beside others) is kept in
    /// the history for triage but not counted.
    pub counted: bool,
    /// The model, tool and cost the handler reported for this attempt.
    pub agent: AgentContext,
}

impl Failure {
    /// A failure at `at_ms`, fingerprinted from its class and message.
    #[must_use]
    pub fn new(
        kind: FailureKind,
        class: impl Into<String>,
        message: impl Into<String>,
        at_ms: i64,
    ) -> Self {
        let class = class.into();
        let message = tail_utf8(&message.into(), MAX_ERROR_BYTES).to_owned();
        let fingerprint = Fingerprint::of(&class, &message);
        Self {
            at_ms,
            attempt: 0,
            lane: String::new(),
            kind,
            class,
            message,
            fingerprint,
            counted: true,
            agent: AgentContext::default(),
        }
    }
}

/// A message with its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Identity, kept across retries and replays.
    pub id: MessageId,
    /// The queue the message belongs to (its origin).
    pub queue: QueueName,
    /// Partitioning / ordering key, if any.
    pub key: Option<String>,
    /// The payload, byte-exact. Shared, not copied, when the envelope is cloned (each
    /// delivery's handler gets a clone) or read from a broker's buffer.
    pub payload: Bytes,
    /// User headers, passed through untouched (W3C `traceparent` included).
    pub headers: Vec<(String, String)>,
    /// Failed attempts so far: 0 on the first delivery.
    pub attempt: u32,
    /// How many times the message was replayed from the DLQ.
    pub replays: u32,
    /// Not to be handed out before this time (unix ms).
    pub not_before_ms: Option<i64>,
    /// When the first failure happened, kept even if the history is trimmed.
    pub first_failed_ms: Option<i64>,
    /// Failed attempts, oldest first (at most [`MAX_HISTORY`]).
    pub history: Vec<Failure>,
    /// What every failed attempt cost, summed (kept when the history is trimmed).
    pub spent: Cost,
}

/// One history entry as written in the `redrive-history` header.
#[derive(Serialize, Deserialize)]
struct WireFailure {
    at: i64,
    n: u32,
    lane: String,
    kind: String,
    class: String,
    msg: String,
    fp: String,
    /// Written only when false: `counted` is the rule, and older readers skip it.
    #[serde(default = "counts", skip_serializing_if = "Clone::clone")]
    c: bool,
    /// The agent context, written only when the handler reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cost: Option<CostJson>,
}

fn counts() -> bool {
    true
}

impl Envelope {
    /// A new message for `queue` with a fresh id.
    #[must_use]
    pub fn new(queue: QueueName, payload: impl Into<Bytes>) -> Self {
        Self::new_with_id(queue, payload.into(), MessageId::new())
    }

    /// A message for `queue` that already has its id (a backend reading back one that
    /// never failed, without the full header parse).
    #[must_use]
    pub fn new_with_id(queue: QueueName, payload: impl Into<Bytes>, id: MessageId) -> Self {
        Self {
            id,
            queue,
            key: None,
            payload: payload.into(),
            headers: Vec::new(),
            attempt: 0,
            replays: 0,
            not_before_ms: None,
            first_failed_ms: None,
            history: Vec::new(),
            spent: Cost::default(),
        }
    }

    /// Sets the key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a user header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The most recent failure.
    #[must_use]
    pub fn last_failure(&self) -> Option<&Failure> {
        self.history.last()
    }

    /// Records a failed attempt: counts it, stamps it and appends it to the history,
    /// trimming the history to its first entry and the latest ones.
    pub fn record_failure(&mut self, mut failure: Failure, lane: &str) {
        self.attempt = self.attempt.saturating_add(1);
        failure.attempt = self.attempt;
        failure.lane = lane.to_owned();
        self.first_failed_ms.get_or_insert(failure.at_ms);
        self.push_history(failure);
    }

    /// Appends to the history, trimming it to its first entry and the latest ones, and
    /// adds what the attempt cost to what the message has cost.
    fn push_history(&mut self, failure: Failure) {
        self.spent.add(failure.agent.cost);
        self.history.push(failure);
        if self.history.len() > MAX_HISTORY {
            self.history.remove(1);
        }
    }

    /// What can be read of a message redrive cannot read as an envelope (its redrive
    /// headers do not parse, a field is missing), as a dead letter to quarantine: the
    /// payload and the user's headers kept, redrive's dropped, and `why` (which header,
    /// which value) recorded as a poison failure of class [`MALFORMED`].
    #[must_use]
    pub fn unreadable(
        queue: QueueName,
        id: MessageId,
        payload: impl Into<Bytes>,
        headers: Vec<(String, String)>,
        why: &str,
        lane: &str,
        at_ms: i64,
    ) -> Self {
        let mut raw = Self::new_with_id(queue, payload, id);
        raw.headers = headers
            .into_iter()
            .filter(|(k, _)| !is_redrive_header(k))
            .collect();
        raw.record_failure(
            Failure::new(FailureKind::Poison, MALFORMED, why, at_ms),
            lane,
        );
        raw
    }

    /// Records, without counting it, that this message's consumer stopped while the
    /// message was in flight beside others (or leased ahead of its handler): the crash
    /// may have been any of theirs, so the message is run alone next, and only a crash
    /// while it runs alone is counted ([`Self::crashed_before`]).
    pub fn record_suspected_crash(&mut self, message: &str, at_ms: i64, lane: &str) {
        let mut failure = Failure::new(FailureKind::LeaseExpired, "lease_expired", message, at_ms);
        failure.counted = false;
        failure.attempt = self.attempt;
        failure.lane = lane.to_owned();
        self.push_history(failure);
    }

    /// Records a failed attempt without counting it: the failure was an outage's (the
    /// queue's breaker was open), not the message's. The history keeps it, marked.
    pub fn record_uncounted_failure(&mut self, mut failure: Failure, lane: &str) {
        failure.counted = false;
        failure.attempt = self.attempt;
        failure.lane = lane.to_owned();
        self.push_history(failure);
    }

    /// How many failures were recorded without counting them because of an outage
    /// ([`Self::record_uncounted_failure`]; uncounted crash suspicions are not these).
    #[must_use]
    pub fn uncounted_failures(&self) -> usize {
        self.history
            .iter()
            .filter(|f| !f.counted && f.kind != FailureKind::LeaseExpired)
            .count()
    }

    /// Whether a crash was counted against this message before: it stopped its consumer
    /// while it ran alone, so it is run alone again.
    #[must_use]
    pub fn crashed_before(&self) -> bool {
        self.history
            .iter()
            .any(|f| f.counted && f.kind == FailureKind::LeaseExpired)
    }

    /// Records `deliveries` attempts that ended without an outcome (the consumer died
    /// or its lease expired), each a `lease_expired` failure with `message`: how a
    /// broker's own count of lost deliveries joins the history.
    pub fn record_lost_deliveries(&mut self, deliveries: u64, message: &str, at_ms: i64) {
        for _ in 0..deliveries {
            let lane = if self.attempt == 0 { "main" } else { "retry" };
            self.record_failure(
                Failure::new(FailureKind::LeaseExpired, "lease_expired", message, at_ms),
                lane,
            );
        }
    }

    /// Whether the envelope is as a publish sends it: never failed, never replayed,
    /// not waiting for a due time. A backend may write such an envelope in the compact
    /// wire form, `redrive-id` alone beside the user's headers, which [`Self::from_wire`]
    /// reads as version 1 with every other field at its default; most traffic is this.
    #[must_use]
    pub fn is_fresh(&self) -> bool {
        self.attempt == 0
            && self.replays == 0
            && self.not_before_ms.is_none()
            && self.first_failed_ms.is_none()
            && self.history.is_empty()
            && self.spent.is_zero()
    }

    /// The compact wire form of a fresh envelope ([`Self::is_fresh`]): `redrive-id`,
    /// then the user's headers.
    #[must_use]
    pub fn to_compact_wire(&self) -> Vec<(String, String)> {
        let mut out = Vec::with_capacity(1 + self.headers.len());
        out.push(("redrive-id".to_owned(), self.id.to_string()));
        out.extend(self.headers.iter().cloned());
        out
    }

    /// The id of headers in the compact wire form ([`Self::to_compact_wire`]): a
    /// `redrive-id` holding a UUID and no other redrive header. `None` for any other
    /// form, which [`Self::from_wire`] reads. A consumer reads nearly every record
    /// (those that never failed) this way, from the broker's own header buffers, then
    /// builds the envelope with [`Self::new_with_id`] and the other headers.
    #[must_use]
    pub fn compact_id<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Option<MessageId> {
        let mut id = None;
        for (name, value) in headers {
            if !is_redrive_header(name) {
                continue;
            }
            if id.is_some() || !name.eq_ignore_ascii_case("redrive-id") {
                return None;
            }
            id = Some(MessageId::parse(std::str::from_utf8(value).ok()?).ok()?);
        }
        id
    }

    /// [`Self::to_wire`] as the JSON list of name/value pairs the stores and Redis keep.
    #[must_use]
    pub fn to_wire_json(&self) -> String {
        serde_json::to_string(&self.to_wire()).unwrap_or_else(|_| "[]".to_owned())
    }

    /// The envelope as wire headers: redrive's own, then the user's.
    #[must_use]
    pub fn to_wire(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::with_capacity(12 + self.headers.len());
        let mut put = |name: &str, value: String| out.push((name.to_owned(), value));
        put("redrive-version", WIRE_VERSION.to_string());
        put("redrive-id", self.id.to_string());
        put("redrive-attempt", self.attempt.to_string());
        put("redrive-origin", self.queue.to_string());
        if self.replays > 0 {
            put("redrive-replays", self.replays.to_string());
        }
        if let Some(at) = self.not_before_ms {
            put("redrive-not-before", at.to_string());
        }
        if let Some(at) = self.first_failed_ms {
            put("redrive-first-failed-at", at.to_string());
        }
        if let Some(last) = self.last_failure() {
            put("redrive-last-failed-at", last.at_ms.to_string());
            put("redrive-error-class", last.class.clone());
            put("redrive-error", last.message.clone());
            put("redrive-fingerprint", last.fingerprint.to_string());
            let history: Vec<WireFailure> = self
                .history
                .iter()
                .map(|f| WireFailure {
                    at: f.at_ms,
                    n: f.attempt,
                    lane: f.lane.clone(),
                    kind: f.kind.as_str().to_owned(),
                    class: f.class.clone(),
                    msg: tail_utf8(&f.message, MAX_HISTORY_MESSAGE_BYTES).to_owned(),
                    fp: f.fingerprint.to_string(),
                    c: f.counted,
                    model: f.agent.model.clone(),
                    tool: f.agent.tool.clone(),
                    cost: (!f.agent.cost.is_zero()).then(|| f.agent.cost.into()),
                })
                .collect();
            put(
                "redrive-history",
                serde_json::to_string(&history).unwrap_or_default(),
            );
        }
        if !self.spent.is_zero() {
            put(
                "redrive-spent",
                serde_json::to_string(&CostJson::from(self.spent)).unwrap_or_default(),
            );
        }
        out.extend(self.headers.iter().cloned());
        out
    }

    /// Reads an envelope from wire headers.
    ///
    /// A message without redrive headers (written by any producer) becomes a new
    /// envelope for `queue`. The plain `attempt`, `error` and `trace` headers of the
    /// common hand-written Kafka retry pattern are understood, so existing retry topics
    /// migrate: `attempt` becomes the attempt count and `error` the last failure.
    ///
    /// # Errors
    ///
    /// Returns a [`WireError`] naming the header whose value does not parse, or when the
    /// wire version is newer than this release.
    pub fn from_wire(
        queue: &QueueName,
        key: Option<String>,
        payload: impl Into<Bytes>,
        headers: Vec<(String, String)>,
    ) -> Result<Self, WireError> {
        Self::from_wire_at(queue, key, payload, headers, MessageId::new)
    }

    /// [`Self::from_wire`] for a backend that can name a message by where it sits (a
    /// stream entry, a row, an offset): a message whose headers carry no `redrive-id`
    /// (a plain producer's) gets `position()` as its id, so every delivery of it, after
    /// a crash or a release, has the same idempotency key.
    ///
    /// # Errors
    ///
    /// As [`Self::from_wire`].
    pub fn from_wire_at(
        queue: &QueueName,
        key: Option<String>,
        payload: impl Into<Bytes>,
        headers: Vec<(String, String)>,
        position: impl FnOnce() -> MessageId,
    ) -> Result<Self, WireError> {
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        // A `redrive-id` alone is the compact form of a fresh envelope (`is_fresh`).
        let versioned = find("redrive-version").is_some() || find("redrive-id").is_some();
        if !versioned {
            let mut env = Self::new_with_id(queue.clone(), payload, position());
            env.key = key;
            return Ok(Self::from_foreign(env, headers));
        }
        let version: u32 =
            parse_header(find("redrive-version"), "redrive-version", "a whole number")?
                .unwrap_or(1);
        if version > WIRE_VERSION {
            return Err(WireError::Version(version));
        }
        // The id read here spares drawing a fresh one (a random-number syscall) per
        // message consumed.
        let id = match find("redrive-id") {
            Some(id) => MessageId::parse(id).map_err(|_| WireError::Header {
                header: "redrive-id",
                value: id.to_owned(),
                expected: "a UUID",
            })?,
            None => position(),
        };
        let mut env = Self::new_with_id(queue.clone(), payload, id);
        env.key = key;
        if let Some(origin) = find("redrive-origin") {
            env.queue = QueueName::new(origin)?;
        }
        env.attempt = parse_header(find("redrive-attempt"), "redrive-attempt", "a whole number")?
            .unwrap_or(0);
        env.replays = parse_header(find("redrive-replays"), "redrive-replays", "a whole number")?
            .unwrap_or(0);
        env.not_before_ms = parse_time(find("redrive-not-before"), "redrive-not-before")?;
        env.first_failed_ms =
            parse_time(find("redrive-first-failed-at"), "redrive-first-failed-at")?;
        if let Some(history) = find("redrive-history") {
            let wire: Vec<WireFailure> =
                serde_json::from_str(history).map_err(|_| WireError::Header {
                    header: "redrive-history",
                    value: tail_utf8(history, 80).to_owned(),
                    expected: "a JSON array of failures",
                })?;
            if let Some(w) = wire.iter().find(|w| !crate::is_valid_time(w.at)) {
                return Err(WireError::Header {
                    header: "redrive-history",
                    value: w.at.to_string(),
                    expected: TIME,
                });
            }
            env.history = wire
                .into_iter()
                .map(|w| Failure {
                    at_ms: w.at,
                    attempt: w.n,
                    lane: w.lane,
                    kind: FailureKind::parse(&w.kind),
                    class: w.class,
                    message: w.msg,
                    fingerprint: Fingerprint::from_stored(w.fp),
                    counted: w.c,
                    agent: AgentContext {
                        model: w.model,
                        tool: w.tool,
                        cost: w.cost.map(Cost::from).unwrap_or_default(),
                    },
                })
                .collect();
            // The history keeps short messages; the last failure's full message travels
            // in its own header.
            if let (Some(last), Some(full)) = (env.history.last_mut(), find("redrive-error")) {
                full.clone_into(&mut last.message);
            }
        }
        if let Some(spent) = find("redrive-spent") {
            let cost: CostJson = serde_json::from_str(spent).map_err(|_| WireError::Header {
                header: "redrive-spent",
                value: tail_utf8(spent, 80).to_owned(),
                expected: "a JSON cost object",
            })?;
            env.spent = cost.into();
        }
        env.headers = headers
            .into_iter()
            .filter(|(k, _)| !is_redrive_header(k))
            .collect();
        Ok(env)
    }

    /// Adopts a message written without redrive headers, reading the legacy pattern's
    /// `attempt` / `error` / `trace` headers if they are there.
    fn from_foreign(mut env: Self, headers: Vec<(String, String)>) -> Self {
        let legacy = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let attempt = legacy("attempt").and_then(|a| a.trim().parse::<u32>().ok());
        if let Some(attempt) = attempt {
            let error = legacy("error").unwrap_or_default();
            let message = match legacy("trace") {
                Some(trace) if !trace.is_empty() => format!("{error}\n{trace}"),
                _ => error.clone(),
            };
            let class = error
                .split(':')
                .next()
                .filter(|c| !c.is_empty() && !c.contains(' '))
                .unwrap_or("legacy");
            if attempt > 0 {
                let mut failure = Failure::new(FailureKind::Retry, class, message, crate::now_ms());
                failure.attempt = attempt;
                failure.lane = "legacy".to_owned();
                env.first_failed_ms = Some(failure.at_ms);
                env.history.push(failure);
            }
            env.attempt = attempt;
        }
        // A stray `redrive-*` header (a key a producer set by hand) is redrive's, not the
        // user's: kept, it would be written back as redrive's own and fail to read.
        let read_as_legacy =
            |k: &str| attempt.is_some() && matches!(k, "attempt" | "error" | "trace");
        env.headers = headers
            .into_iter()
            .filter(|(k, _)| !is_redrive_header(k) && !read_as_legacy(k))
            .collect();
        env
    }
}

/// Whether a header is redrive's. Compared as bytes: a header name from another
/// producer may hold any character, and slicing it as text at byte 8 panicked when a
/// multi-byte character spanned that byte (found by the property tests).
fn is_redrive_header(name: &str) -> bool {
    name.as_bytes()
        .get(..HEADER_PREFIX.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(HEADER_PREFIX.as_bytes()))
}

fn parse_header<T: std::str::FromStr>(
    value: Option<&str>,
    header: &'static str,
    expected: &'static str,
) -> Result<Option<T>, WireError> {
    value
        .map(|v| {
            v.trim().parse::<T>().map_err(|_| WireError::Header {
                header,
                value: v.to_owned(),
                expected,
            })
        })
        .transpose()
}

/// What a time header must hold.
const TIME: &str = "unix milliseconds between 1970 and 9999";

/// A time header: unix milliseconds redrive can show ([`crate::is_valid_time`]).
fn parse_time(value: Option<&str>, header: &'static str) -> Result<Option<i64>, WireError> {
    let ms: Option<i64> = parse_header(value, header, TIME)?;
    match ms {
        Some(ms) if !crate::is_valid_time(ms) => Err(WireError::Header {
            header,
            value: ms.to_string(),
            expected: TIME,
        }),
        ms => Ok(ms),
    }
}

/// The last `max` bytes of `text`, cut on a character boundary.
fn tail_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The first `max` bytes of `text`, cut on a character boundary.
#[must_use]
pub fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> QueueName {
        QueueName::new("agent.tasks").unwrap()
    }

    fn failed_twice() -> Envelope {
        let mut env = Envelope::new(queue(), b"{\"task\":1}\xff".to_vec())
            .with_key("user-7")
            .with_header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            );
        env.record_failure(
            Failure::new(
                FailureKind::Retry,
                "RateLimited",
                "429 too many requests",
                1_000,
            ),
            "main",
        );
        env.record_failure(
            Failure::new(
                FailureKind::Timeout,
                "timeout",
                "handler ran past 30s\nline two",
                2_000,
            ),
            "retry.5s",
        );
        env.replays = 1;
        env.not_before_ms = Some(9_000);
        env
    }

    #[test]
    fn agent_context_travels_per_attempt_and_spend_survives_trimming() {
        let mut env = Envelope::new(queue(), b"x".to_vec());
        for n in 0..MAX_HISTORY + 3 {
            let mut f = Failure::new(FailureKind::Retry, "http_503", "upstream down", 10);
            f.agent = AgentContext {
                model: Some("gpt-4o-mini".to_owned()),
                tool: (n == 0).then(|| "web_search".to_owned()),
                cost: Cost::new(1000, 200, 0.0015),
            };
            env.record_failure(f, "main");
        }
        let attempts = u64::try_from(MAX_HISTORY + 3).unwrap();
        assert_eq!(env.history.len(), MAX_HISTORY, "the history is trimmed");
        assert_eq!(
            env.spent,
            Cost {
                input_tokens: 1000 * attempts,
                output_tokens: 200 * attempts,
                usd_micros: 1500 * attempts
            },
            "the spend is not"
        );
        let back = Envelope::from_wire(&queue(), None, b"x".to_vec(), env.to_wire()).unwrap();
        assert_eq!(back.spent, env.spent);
        assert_eq!(back.history, env.history);
        assert_eq!(back.history[0].agent.tool.as_deref(), Some("web_search"));
        assert_eq!(back.history[1].agent.tool, None);
        // Nothing reported: nothing written.
        let plain = failed_twice();
        assert!(plain.to_wire().iter().all(|(k, _)| k != "redrive-spent"));
        assert!(!plain.to_wire_json().contains("\"model\""));
        // A spend that does not read names its header.
        let mut wire = env.to_wire();
        wire.iter_mut()
            .find(|(k, _)| k == "redrive-spent")
            .unwrap()
            .1 = "lots".to_owned();
        let err = Envelope::from_wire(&queue(), None, b"x".to_vec(), wire).unwrap_err();
        assert!(err.to_string().contains("redrive-spent"), "{err}");
    }

    #[test]
    fn an_uncounted_crash_travels_as_such_and_does_not_count() {
        let mut env = Envelope::new(queue(), b"x".to_vec());
        env.record_suspected_crash("in flight beside others", 5, "main");
        assert_eq!(env.attempt, 0, "not counted");
        assert!(
            !env.crashed_before(),
            "a suspicion is not a crash of its own"
        );
        let back = Envelope::from_wire(&queue(), None, b"x".to_vec(), env.to_wire()).unwrap();
        assert_eq!(back.history.len(), 1);
        assert!(!back.history[0].counted);
        assert_eq!(back.attempt, 0);
        // A counted crash makes it a known crasher, and reads back counted.
        let mut env = back;
        env.record_failure(
            Failure::new(FailureKind::LeaseExpired, "lease_expired", "alone", 6),
            "isolated",
        );
        assert!(env.crashed_before());
        let back = Envelope::from_wire(&queue(), None, b"x".to_vec(), env.to_wire()).unwrap();
        assert_eq!(
            back.history.iter().map(|f| f.counted).collect::<Vec<_>>(),
            [false, true]
        );
        assert!(back.crashed_before());
        // A history written before `counted` existed reads as counted.
        let old = r#"[{"at":1,"n":1,"lane":"main","kind":"retry","class":"E","msg":"m","fp":"f"}]"#;
        let wire = vec![
            ("redrive-version".to_owned(), "1".to_owned()),
            ("redrive-id".to_owned(), MessageId::new().to_string()),
            ("redrive-attempt".to_owned(), "1".to_owned()),
            ("redrive-history".to_owned(), old.to_owned()),
        ];
        let read = Envelope::from_wire(&queue(), None, b"x".to_vec(), wire).unwrap();
        assert!(read.history[0].counted);
    }

    #[test]
    fn a_plain_message_is_named_by_its_position_and_its_redrive_headers_are_not_users() {
        let plain = vec![
            ("traceparent".to_owned(), "00-ab".to_owned()),
            ("redrive-key".to_owned(), "k".to_owned()),
        ];
        let at = || MessageId::at("redrive:{agent.tasks}:main", 1_700_000_000_000, 42);
        let one = Envelope::from_wire_at(&queue(), None, b"x".to_vec(), plain.clone(), at).unwrap();
        let two = Envelope::from_wire_at(&queue(), None, b"x".to_vec(), plain, at).unwrap();
        assert_eq!(one.id, two.id, "the same place gives the same id");
        assert_eq!(one.id, at());
        assert_eq!(
            one.headers,
            [("traceparent".to_owned(), "00-ab".to_owned())]
        );
        // Ids differ by position, time and place.
        assert_ne!(
            at(),
            MessageId::at("redrive:{agent.tasks}:main", 1_700_000_000_000, 43)
        );
        assert_ne!(
            at(),
            MessageId::at("redrive:{agent.tasks}:main", 1_700_000_000_001, 42)
        );
        assert_ne!(
            at(),
            MessageId::at("redrive:{agent.other}:main", 1_700_000_000_000, 42)
        );
        // redrive's own id wins over the position.
        let env = Envelope::new(queue(), b"x".to_vec());
        let read =
            Envelope::from_wire_at(&queue(), None, b"x".to_vec(), env.to_wire(), at).unwrap();
        assert_eq!(read.id, env.id);
    }

    #[test]
    fn an_unreadable_message_keeps_its_bytes_and_says_why() {
        let raw = Envelope::unreadable(
            queue(),
            MessageId::at("q", 1, 2),
            b"\xffpayload".to_vec(),
            vec![
                ("redrive-version".to_owned(), "99".to_owned()),
                ("x-user".to_owned(), "kept".to_owned()),
            ],
            "header redrive-version: 99 is newer",
            "main",
            7,
        );
        assert_eq!(&raw.payload[..], b"\xffpayload");
        assert_eq!(raw.headers, [("x-user".to_owned(), "kept".to_owned())]);
        let last = raw.last_failure().unwrap();
        assert_eq!(
            (last.class.as_str(), last.kind),
            (MALFORMED, FailureKind::Poison)
        );
        assert!(last.message.contains("redrive-version"));
    }

    #[test]
    fn wire_round_trip_keeps_everything() {
        let env = failed_twice();
        let wire = env.to_wire();
        let back =
            Envelope::from_wire(&queue(), env.key.clone(), env.payload.clone(), wire).unwrap();
        assert_eq!(back, env);
        assert_eq!(back.attempt, 2);
        assert_eq!(back.history[1].lane, "retry.5s");
        assert_eq!(back.first_failed_ms, Some(1_000));
    }

    #[test]
    fn wire_headers_are_the_documented_ones() {
        let wire = failed_twice().to_wire();
        let names: Vec<&str> = wire.iter().map(|(k, _)| k.as_str()).collect();
        for name in [
            "redrive-version",
            "redrive-id",
            "redrive-attempt",
            "redrive-origin",
            "redrive-not-before",
            "redrive-first-failed-at",
            "redrive-last-failed-at",
            "redrive-error-class",
            "redrive-error",
            "redrive-fingerprint",
            "redrive-replays",
            "redrive-history",
            "traceparent",
        ] {
            assert!(names.contains(&name), "missing {name} in {names:?}");
        }
        let get = |n: &str| wire.iter().find(|(k, _)| k == n).unwrap().1.clone();
        assert_eq!(get("redrive-attempt"), "2");
        assert_eq!(get("redrive-error-class"), "timeout");
        assert_eq!(get("redrive-last-failed-at"), "2000");
    }

    #[test]
    fn the_compact_form_of_a_fresh_envelope_reads_back_whole() {
        let env = Envelope::new(queue(), b"{}".to_vec())
            .with_key("user-7")
            .with_header("tenant", "acme");
        assert!(env.is_fresh());
        assert!(!failed_twice().is_fresh());
        let compact = env.to_compact_wire();
        assert_eq!(
            compact,
            vec![
                ("redrive-id".to_owned(), env.id.to_string()),
                ("tenant".to_owned(), "acme".to_owned()),
            ]
        );
        let back =
            Envelope::from_wire(&queue(), env.key.clone(), env.payload.clone(), compact).unwrap();
        assert_eq!(back, env);
        // An id that is not one is reported, not replaced.
        let bad = vec![("redrive-id".to_owned(), "nope".to_owned())];
        let err = Envelope::from_wire(&queue(), None, b"{}".to_vec(), bad).unwrap_err();
        assert!(err.to_string().contains("redrive-id"), "{err}");
    }

    #[test]
    fn foreign_messages_get_a_fresh_identity() {
        let env = Envelope::from_wire(
            &queue(),
            None,
            b"hi".to_vec(),
            vec![("x-user".into(), "1".into())],
        )
        .unwrap();
        assert_eq!((env.attempt, env.history.len()), (0, 0));
        assert_eq!(env.headers, vec![("x-user".to_owned(), "1".to_owned())]);
    }

    #[test]
    fn legacy_attempt_error_trace_headers_migrate() {
        let headers = vec![
            ("attempt".to_owned(), "2".to_owned()),
            ("error".to_owned(), "ValueError: bad task 17".to_owned()),
            (
                "trace".to_owned(),
                "Traceback (most recent call last): ...".to_owned(),
            ),
            ("tenant".to_owned(), "acme".to_owned()),
        ];
        let env = Envelope::from_wire(&queue(), None, b"{}".to_vec(), headers).unwrap();
        assert_eq!(env.attempt, 2);
        let last = env.last_failure().unwrap();
        assert_eq!(last.class, "ValueError");
        assert!(
            last.message
                .starts_with("ValueError: bad task 17\nTraceback")
        );
        assert_eq!(env.headers, vec![("tenant".to_owned(), "acme".to_owned())]);
    }

    #[test]
    fn bad_header_values_are_named() {
        let table = [
            ("redrive-attempt", "two", "redrive-attempt"),
            ("redrive-id", "not-a-uuid", "redrive-id"),
            ("redrive-history", "[{", "redrive-history"),
            ("redrive-not-before", "soon", "redrive-not-before"),
        ];
        for (name, value, named) in table {
            let headers = vec![
                ("redrive-version".to_owned(), "1".to_owned()),
                (name.to_owned(), value.to_owned()),
            ];
            let err = Envelope::from_wire(&queue(), None, vec![], headers).unwrap_err();
            assert!(err.to_string().contains(named), "{err}");
        }
        let newer = vec![("redrive-version".to_owned(), "9".to_owned())];
        assert_eq!(
            Envelope::from_wire(&queue(), None, vec![], newer),
            Err(WireError::Version(9))
        );
    }

    #[test]
    fn history_is_bounded_and_keeps_the_first_failure() {
        let mut env = Envelope::new(queue(), "x");
        for i in 0..100 {
            env.record_failure(
                Failure::new(FailureKind::Retry, "E", format!("fail {i}"), i),
                "main",
            );
        }
        assert_eq!(env.attempt, 100);
        assert_eq!(env.history.len(), MAX_HISTORY);
        assert_eq!(env.history[0].message, "fail 0");
        assert_eq!(env.history.last().unwrap().message, "fail 99");
        assert_eq!(env.first_failed_ms, Some(0));
    }

    #[test]
    fn long_errors_keep_their_tail_on_a_char_boundary() {
        let long = format!("{}é end", "x".repeat(MAX_ERROR_BYTES));
        let f = Failure::new(FailureKind::Retry, "E", long, 0);
        assert!(f.message.len() <= MAX_ERROR_BYTES);
        assert!(f.message.ends_with("é end"));
        assert_eq!(truncate_utf8("héllo", 2), "h");
    }

    #[test]
    fn place_hash_is_fnv_1a() {
        // Published FNV-1a 32-bit values: derived ids depend on them staying so.
        assert_eq!(MessageId::place_hash(""), 0x811c_9dc5);
        assert_eq!(MessageId::place_hash("a"), 0xe40c_292c);
        assert_eq!(MessageId::place_hash("foobar"), 0xbf9c_f968);
    }

    #[test]
    fn compact_id_reads_only_the_compact_form() {
        let borrowed = |wire: &[(String, String)]| -> Vec<(String, Vec<u8>)> {
            wire.iter()
                .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
                .collect()
        };
        let as_refs = |h: &[(String, Vec<u8>)]| -> Option<MessageId> {
            Envelope::compact_id(h.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
        };
        let fresh = Envelope::new(queue(), "x").with_header("traceparent", "00-ab-cd-01");
        let compact = borrowed(&fresh.to_compact_wire());
        assert_eq!(as_refs(&compact), Some(fresh.id));
        // Whatever else the headers hold is not the compact form: from_wire reads it.
        assert_eq!(as_refs(&borrowed(&failed_twice().to_wire())), None);
        assert_eq!(as_refs(&borrowed(&fresh.to_wire())), None);
        assert_eq!(as_refs(&[]), None);
        let bad = vec![("redrive-id".to_owned(), b"not-a-uuid".to_vec())];
        assert_eq!(as_refs(&bad), None);
        let twice = [compact.clone(), compact].concat();
        assert_eq!(as_refs(&twice), None);
    }
}
