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

use crate::config::{IdPlacement, NatsConfig};
use crate::error::{NatsError, call};
use crate::wire::{
    append_compact, created_ms, envelope_of, id_in_stream, id_of_subject, is_compact,
    read_envelope, to_headers, wire_of,
};

impl NatsConfig {
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
            .map_err(|e| unreachable(history_bucket_failed(&self.namespace, &e)))?;
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

/// Why the history bucket could not be made: JetStream off (or silent) is the usual
/// cause, but a server that answered with an error (its store, its limits) says so.
fn history_bucket_failed(namespace: &str, e: &jetstream::context::CreateKeyValueError) -> String {
    use jetstream::context::{CreateStreamError, CreateStreamErrorKind};
    let answered = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<CreateStreamError>())
        .and_then(|s| match s.kind() {
            CreateStreamErrorKind::JetStream(err) => Some(err),
            _ => None,
        });
    match answered {
        Some(err) => {
            format!("JetStream refused to create the stream of bucket {namespace}_history: {err}")
        }
        None => {
            format!("JetStream is not enabled or not answering (run nats-server with -js): {e}")
        }
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
