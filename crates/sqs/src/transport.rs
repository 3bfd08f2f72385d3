//! The SQS [`Transport`].
//!
//! The receive count SQS keeps per message is the attempt count: a retry hides the
//! received message for its tier's delay (`ChangeMessageVisibility`), so its next
//! receive is its next attempt, and a consumer that crashes leaves the message to come
//! back when its lease (the visibility timeout) runs out, one receive later. The queue's
//! own redrive policy (`maxReceiveCount` = max attempts) moves a message that crashes
//! every consumer to `QUEUE-dlq` without anyone's help.
//!
//! SQS keeps no per-message state besides the receive count, so a failure's details
//! (class, message, fingerprint) are remembered by the consumer that saw them, until the
//! message's next receive; a receive that no consumer here recorded an outcome for is
//! taken for a crash. SQS counts visibility in whole seconds: longer delays are rounded
//! up (never early), delays under a second are waited in memory.
//!
//! Crash suspects (a receive nobody here recorded an outcome for, in main) are moved to a
//! third queue, `QUEUE-isolated`, received from only by a runner that runs nothing else:
//! there every receive beyond the first is a crash the message caused alone, and is
//! counted. A retry out of it is sent back to main, delayed.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, Message, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use redrive_core::{
    Delivery, Envelope, Failure, FailureKind, Fetched, Lane, LaneSet, LaneStats, QueueDepths,
    QueueName, Tier, Transport, TransportError, now_ms,
};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::config::SqsConfig;
use crate::error::{SqsError, during, is_lease_lost};
use crate::metrics::CallCount;
use crate::wire;

/// SQS's largest message (body and attributes), and largest batch.
pub(crate) const MAX_MESSAGE: usize = 1_048_576;
/// SQS's longest visibility timeout: 12 hours.
const MAX_VISIBILITY_SECS: i64 = 43_200;
/// SQS's longest delivery delay: 15 minutes.
const MAX_DELAY_SECS: i32 = 900;

/// The `maxReceiveCount` redrive sets: a backstop well above `max_attempts`, which
/// redrive counts itself.
pub(crate) fn backstop(max_attempts: usize) -> usize {
    max_attempts * 2 + 10
}
/// Messages per receive and per batch call: SQS's maximum.
pub(crate) const BATCH: usize = 10;
/// How long an ack waits for others to share its delete call.
const DELETE_LINGER: Duration = Duration::from_millis(5);
/// The tag that names the redrive queue an SQS queue belongs to.
pub(crate) const QUEUE_TAG: &str = "redrive-queue";
/// Batch sends in flight at once while publishing.
const PUBLISH_CONCURRENCY: usize = 8;
/// Failures remembered between receives, at most (older ones are dropped first).
const MAX_KNOWN: usize = 100_000;

pub(crate) const UNRECORDED: &str = "an earlier receive ended without an outcome recorded by \
    this consumer (a consumer crashed, was killed or its lease expired, or it failed on a \
    consumer that has since stopped)";

/// The backend's handle on a delivery: the receipt handle of one receive.
#[derive(Clone)]
pub struct Token {
    message_id: Arc<str>,
    receipt: Arc<str>,
    receives: u32,
    queue: Arc<Queue>,
    /// Received from the isolation queue (else from main).
    isolated: bool,
}

impl Token {
    /// The SQS queue it was received from.
    fn url(&self) -> &str {
        if self.isolated {
            &self.queue.isolated_url
        } else {
            &self.queue.url
        }
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("message_id", &self.message_id)
            .field("receives", &self.receives)
            .finish_non_exhaustive()
    }
}

/// What this consumer knows of a message between two of its receives.
#[derive(Clone)]
struct Known {
    /// The receive it was settled on.
    receives: u32,
    /// Its envelope after that (payload left out: the next receive brings it).
    envelope: Envelope,
    lane: Lane,
    due_ms: i64,
}

/// One queue's SQS queues and this process's state for them.
pub(crate) struct Queue {
    pub(crate) name: QueueName,
    pub(crate) url: String,
    pub(crate) dlq_url: String,
    pub(crate) isolated_url: String,
    policy_checked: AtomicBool,
    lease_secs: AtomicI32,
    fetch: tokio::sync::Mutex<FetchState>,
    /// Deliveries waiting in memory for the sub-second part of their delay.
    held: Mutex<Vec<Delivery<Token>>>,
    held_changed: Notify,
    deletes: mpsc::UnboundedSender<(Arc<str>, oneshot::Sender<Result<(), SqsError>>)>,
}

impl Queue {
    /// When the first delivery waiting in memory is due.
    fn next_due(&self) -> Result<Option<i64>, SqsError> {
        let held = self.held.lock().map_err(|_| poisoned())?;
        Ok(held.iter().map(|d| d.due_ms).min())
    }
}

#[derive(Default)]
struct FetchState {
    /// A receive in flight, kept across fetches so none of its messages is dropped.
    pending: Option<JoinHandle<Result<Vec<Message>, SqsError>>>,
    /// Deliveries received but not handed out yet (a fetch asked for fewer).
    ready: VecDeque<Delivery<Token>>,
}

pub(crate) struct Inner {
    pub(crate) client: Client,
    calls: CallCount,
    pub(crate) config: SqsConfig,
    queues: Mutex<HashMap<QueueName, Arc<Queue>>>,
    setup: tokio::sync::Mutex<()>,
    known: Mutex<HashMap<Arc<str>, Known>>,
    pub(crate) drain_lock: tokio::sync::Mutex<()>,
    /// SQS queue URL → the redrive queue it belongs to (from its tag), or none.
    pub(crate) owners: Mutex<HashMap<String, Option<QueueName>>>,
}

/// SQS queues per redrive queue: `QUEUE` (dots as dashes) and `QUEUE-dlq`.
#[derive(Clone)]
pub struct SqsTransport {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for SqsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsTransport")
            .field("region", &self.inner.config.region)
            .field("prefix", &self.inner.config.prefix)
            .finish_non_exhaustive()
    }
}

/// The lane a message is in after `attempt` failed attempts.
pub(crate) fn lane_at(attempt: u32, tiers: &[Tier]) -> Lane {
    match (attempt as usize).checked_sub(1) {
        None => Lane::Main,
        Some(_) if tiers.is_empty() => Lane::Main,
        Some(i) => Lane::Retry(tiers[i.min(tiers.len() - 1)].name().to_owned()),
    }
}

/// How far a due time (rounded up to the millisecond) and [`now_ms`] (rounded down) may
/// add to a delay.
const CLOCK_ROUNDING_MS: i64 = 2;

fn ceil_secs(ms: i64) -> i64 {
    (ms.max(0) + 999) / 1000
}

impl SqsTransport {
    pub(crate) fn new(client: Client, config: SqsConfig, calls: CallCount) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                calls,
                config,
                queues: Mutex::default(),
                setup: tokio::sync::Mutex::default(),
                known: Mutex::default(),
                drain_lock: tokio::sync::Mutex::default(),
                owners: Mutex::default(),
            }),
        }
    }

    /// SQS calls this transport has made so far (every attempt, retries included).
    #[must_use]
    pub fn api_calls(&self) -> u64 {
        self.inner.calls.get()
    }

    pub(crate) fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The queue's SQS queues, created when missing (main and DLQ).
    pub(crate) async fn queue(&self, name: &QueueName) -> Result<Arc<Queue>, SqsError> {
        if let Some(q) = self.cached(name) {
            return Ok(q);
        }
        let _one_at_a_time = self.inner.setup.lock().await;
        if let Some(q) = self.cached(name) {
            return Ok(q);
        }
        let config = &self.inner.config;
        config.check_name(name)?;
        let url = self.ensure_queue(&config.sqs_name(name), name).await?;
        let dlq_url = self.ensure_queue(&config.dlq_name(name), name).await?;
        let isolated_url = self.ensure_queue(&config.isolated_name(name), name).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(delete_loop(self.inner.client.clone(), url.clone(), rx));
        let q = Arc::new(Queue {
            name: name.clone(),
            url,
            dlq_url,
            isolated_url,
            policy_checked: AtomicBool::new(false),
            lease_secs: AtomicI32::new(30),
            fetch: tokio::sync::Mutex::default(),
            held: Mutex::default(),
            held_changed: Notify::new(),
            deletes: tx,
        });
        if let Ok(mut qs) = self.inner.queues.lock() {
            qs.insert(name.clone(), Arc::clone(&q));
        }
        Ok(q)
    }

    fn cached(&self, name: &QueueName) -> Option<Arc<Queue>> {
        self.inner.queues.lock().ok()?.get(name).cloned()
    }

    /// The URL of `sqs_name`, created (tagged with `queue`) when missing. An existing
    /// queue tagged for another redrive queue is refused: two names that differ only in
    /// `.` and `-` map to the same SQS name.
    async fn ensure_queue(&self, sqs_name: &str, queue: &QueueName) -> Result<String, SqsError> {
        let client = &self.inner.client;
        match client.get_queue_url().queue_name(sqs_name).send().await {
            Ok(out) => {
                let url = out.queue_url().unwrap_or_default().to_owned();
                if let Some(owner) = self.owner(&url).await?
                    && owner != *queue
                {
                    return Err(SqsError::Config(format!(
                        "the SQS queue {sqs_name} belongs to redrive queue {owner}, not {queue}: \
                         SQS names write '.' as '-', so the two collide; rename one of them"
                    )));
                }
                Ok(url)
            }
            Err(e) => {
                let e = during("look up the queue")(e);
                if !matches!(
                    e.code(),
                    Some("AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist")
                ) {
                    return Err(e);
                }
                let out = client
                    .create_queue()
                    .queue_name(sqs_name)
                    .attributes(
                        QueueAttributeName::MaximumMessageSize,
                        MAX_MESSAGE.to_string(),
                    )
                    // 14 days, SQS's longest: dead letters wait for a drain.
                    .attributes(QueueAttributeName::MessageRetentionPeriod, "1209600")
                    .tags(QUEUE_TAG, queue.as_str())
                    .send()
                    .await
                    .map_err(during("create the queue"))?;
                let url = out.queue_url().unwrap_or_default().to_owned();
                if let Ok(mut o) = self.inner.owners.lock() {
                    o.insert(url.clone(), Some(queue.clone()));
                }
                tracing::info!(queue = %queue, sqs = sqs_name, "created SQS queue");
                Ok(url)
            }
        }
    }

    /// The redrive queue an SQS queue is tagged for (cached).
    pub(crate) async fn owner(&self, url: &str) -> Result<Option<QueueName>, SqsError> {
        if let Some(o) = self
            .inner
            .owners
            .lock()
            .ok()
            .and_then(|o| o.get(url).cloned())
        {
            return Ok(o);
        }
        let tags = self
            .inner
            .client
            .list_queue_tags()
            .queue_url(url)
            .send()
            .await
            .map_err(during("read the queue's tags"))?;
        let owner = tags
            .tags()
            .and_then(|t| t.get(QUEUE_TAG))
            .and_then(|q| QueueName::new(q).ok());
        if let Ok(mut o) = self.inner.owners.lock() {
            o.insert(url.to_owned(), owner.clone());
        }
        Ok(owner)
    }

    /// Sets the main and isolation queues' redrive policies to `QUEUE-dlq` with
    /// `maxReceiveCount` = [`backstop`] (twice max attempts plus 10: a receive that
    /// ends in a crash beside others is not an attempt, so SQS's count runs ahead of
    /// redrive's), or checks the one main has: one that would move a message before
    /// redrive's own count does (below max attempts, or to another queue) is reported,
    /// never changed.
    async fn check_policy(&self, q: &Queue, lanes: &LaneSet) -> Result<(), SqsError> {
        if q.policy_checked.load(Ordering::Acquire) {
            return Ok(());
        }
        for tier in &lanes.tiers {
            if tier.delay() > Duration::from_secs(MAX_VISIBILITY_SECS as u64) {
                return Err(SqsError::Config(format!(
                    "tier {} is longer than SQS's longest visibility timeout (12h); use tiers up \
                     to 12h on SQS",
                    tier.name()
                )));
            }
        }
        let max = lanes.max_attempts() as usize;
        let wanted = backstop(max);
        let client = &self.inner.client;
        let arn = client
            .get_queue_attributes()
            .queue_url(&q.dlq_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(during("read the DLQ's ARN"))?
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
            .unwrap_or_default();
        let current = client
            .get_queue_attributes()
            .queue_url(&q.url)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send()
            .await
            .map_err(during("read the queue's redrive policy"))?
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy).cloned())
            .filter(|p| !p.trim().is_empty());
        let sqs_name = self.inner.config.sqs_name(&q.name);
        let tiers: Vec<&str> = lanes.tiers.iter().map(Tier::name).collect();
        match current {
            None => {
                self.set_policy(&q.url, &arn, wanted).await?;
                tracing::info!(queue = %q.name, max_receive_count = wanted, "set the SQS redrive policy");
            }
            Some(policy) => {
                let parsed: serde_json::Value = serde_json::from_str(&policy).unwrap_or_default();
                let target = parsed["deadLetterTargetArn"].as_str().unwrap_or_default();
                let count = match &parsed["maxReceiveCount"] {
                    serde_json::Value::String(s) => s.parse::<usize>().ok(),
                    v => v.as_u64().and_then(|n| usize::try_from(n).ok()),
                };
                if target != arn || count.is_none_or(|c| c < max) {
                    return Err(SqsError::Config(format!(
                        "the SQS queue {sqs_name} has the redrive policy {policy}, but redrive \
                         needs a maxReceiveCount of at least {max} (max attempts with tiers {}; \
                         {wanted} recommended) and the dead-letter queue {arn}. redrive does not \
                         change an existing policy: pass tiers that match, or update it with \
                         `aws sqs set-queue-attributes --queue-url {} --attributes '{{\"RedrivePolicy\":\"{{\\\"deadLetterTargetArn\\\":\\\"{arn}\\\",\\\"maxReceiveCount\\\":\\\"{wanted}\\\"}}\"}}'`",
                        tiers.join(","),
                        q.url
                    )));
                }
            }
        }
        // The isolation queue's backstop, set when it has none.
        let isolated_policy = client
            .get_queue_attributes()
            .queue_url(&q.isolated_url)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send()
            .await
            .map_err(during("read the isolation queue's redrive policy"))?
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy).cloned())
            .filter(|p| !p.trim().is_empty());
        if isolated_policy.is_none() {
            self.set_policy(&q.isolated_url, &arn, wanted).await?;
        }
        q.policy_checked.store(true, Ordering::Release);
        Ok(())
    }

    async fn set_policy(&self, url: &str, arn: &str, max_receives: usize) -> Result<(), SqsError> {
        let policy = serde_json::json!({
            "deadLetterTargetArn": arn,
            "maxReceiveCount": max_receives.to_string(),
        });
        self.inner
            .client
            .set_queue_attributes()
            .queue_url(url)
            .attributes(QueueAttributeName::RedrivePolicy, policy.to_string())
            .send()
            .await
            .map_err(during("set the queue's redrive policy"))?;
        Ok(())
    }

    fn remember(&self, token: &Token, envelope: &Envelope, lane: Lane, due_ms: i64) {
        let mut envelope = envelope.clone();
        envelope.payload = redrive_core::Bytes::new();
        if let Ok(mut known) = self.inner.known.lock() {
            if known.len() >= MAX_KNOWN {
                // Whatever is due longest ago has most likely been received elsewhere.
                let mut dues: Vec<i64> = known.values().map(|k| k.due_ms).collect();
                let cut = dues.len() / 2;
                let (_, median, _) = dues.select_nth_unstable(cut);
                let median = *median;
                known.retain(|_, k| k.due_ms > median);
            }
            known.insert(
                Arc::clone(&token.message_id),
                Known {
                    receives: token.receives,
                    envelope,
                    lane,
                    due_ms,
                },
            );
        }
    }

    fn forget(&self, token: &Token) {
        if let Ok(mut known) = self.inner.known.lock() {
            known.remove(&token.message_id);
        }
    }

    /// Hides a received message for `secs` seconds from now.
    async fn hide(&self, token: &Token, secs: i64, id: &str) -> Result<(), TransportError> {
        let secs = i32::try_from(secs.clamp(0, MAX_VISIBILITY_SECS)).unwrap_or(0);
        match self
            .inner
            .client
            .change_message_visibility()
            .queue_url(token.url())
            .receipt_handle(token.receipt.as_ref())
            .visibility_timeout(secs)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = during("change the message's visibility")(e);
                if is_lease_lost(e.code()) {
                    Err(TransportError::LeaseLost { id: id.to_owned() })
                } else {
                    Err(e.into())
                }
            }
        }
    }

    /// Deletes a received message, sharing one batch call with other acks of main.
    async fn delete(&self, token: &Token, id: &str) -> Result<(), TransportError> {
        if token.isolated {
            // Rare: one call of its own.
            return match self
                .inner
                .client
                .delete_message()
                .queue_url(&token.queue.isolated_url)
                .receipt_handle(token.receipt.as_ref())
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(e) => {
                    let e = during("delete the message")(e);
                    if is_lease_lost(e.code()) {
                        Err(TransportError::LeaseLost { id: id.to_owned() })
                    } else {
                        Err(e.into())
                    }
                }
            };
        }
        let (tx, rx) = oneshot::channel();
        token
            .queue
            .deletes
            .send((Arc::clone(&token.receipt), tx))
            .map_err(|_| SqsError::call("delete the message", "the delete batcher stopped"))?;
        let result = rx.await.unwrap_or_else(|_| {
            Err(SqsError::call(
                "delete the message",
                "the delete batcher stopped",
            ))
        });
        match result {
            Ok(()) => Ok(()),
            Err(e) if is_lease_lost(e.code()) => {
                Err(TransportError::LeaseLost { id: id.to_owned() })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `envelope` to the queue's DLQ, marked with the time it died.
    async fn send_dead(&self, q: &Queue, envelope: &Envelope) -> Result<(), SqsError> {
        let out = wire::encode(envelope, &[("redrive-dead-at", now_ms().to_string())]);
        self.inner
            .client
            .send_message()
            .queue_url(&q.dlq_url)
            .message_body(out.body)
            .set_message_attributes(Some(out.attributes))
            .send()
            .await
            .map_err(during("send to the DLQ"))?;
        Ok(())
    }

    /// Sends `envelope` to `url`, hidden for `delay_secs` (SQS's longest: 15 minutes).
    async fn send_to(
        &self,
        url: &str,
        envelope: &Envelope,
        delay_secs: i32,
        context: &'static str,
    ) -> Result<(), SqsError> {
        let out = wire::encode(envelope, &[]);
        self.inner
            .client
            .send_message()
            .queue_url(url)
            .message_body(out.body)
            .set_message_attributes(Some(out.attributes))
            .delay_seconds(delay_secs.clamp(0, MAX_DELAY_SECS))
            .send()
            .await
            .map_err(during(context))?;
        Ok(())
    }

    /// Turns a received message into a delivery; `None` when it could not be read and was
    /// quarantined in the DLQ instead.
    async fn deliver(
        &self,
        q: &Arc<Queue>,
        lanes: &LaneSet,
        m: Message,
        isolated: bool,
    ) -> Option<Delivery<Token>> {
        let incoming = wire::decode(&lanes.queue, &m);
        let message_id: Arc<str> = m.message_id().unwrap_or_default().into();
        let token = Token {
            message_id: Arc::clone(&message_id),
            receipt: m.receipt_handle().unwrap_or_default().into(),
            receives: incoming.receives,
            queue: Arc::clone(q),
            isolated,
        };
        let now = now_ms();
        let envelope = match incoming.envelope {
            Ok(env) => env,
            Err((why, mut raw)) => {
                tracing::warn!(queue = %lanes.queue, message_id = %message_id, reason = %why, "quarantining an unreadable message in the DLQ");
                raw.record_failure(
                    Failure::new(FailureKind::Poison, "MalformedEnvelope", why, now),
                    "main",
                );
                // If either step fails the message stays in main and comes back after its
                // visibility timeout, to be quarantined then; the rest of the batch goes on.
                let moved = match self.send_dead(q, &raw).await {
                    Ok(()) => self
                        .delete(&token, &raw.id.to_string())
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = moved {
                    tracing::warn!(queue = %lanes.queue, message_id = %message_id, error = %e, "could not quarantine an unreadable message; it will come back");
                }
                return None;
            }
        };
        let known = self.inner.known.lock().ok().and_then(|k| {
            k.get(&message_id)
                .filter(|k| k.receives < incoming.receives)
                .cloned()
        });
        let (mut envelope, lane, due_ms, base) = match known {
            Some(k) => {
                let mut env = k.envelope;
                env.payload = envelope.payload;
                (env, k.lane, k.due_ms, k.receives)
            }
            None => {
                let lane = lane_at(envelope.attempt, &lanes.tiers);
                // Sent with a due time (a retry out of the isolation lane): due then.
                let due = envelope.not_before_ms.unwrap_or(now).max(now);
                (envelope, lane, due, 0)
            }
        };
        // Receives since the last outcome this consumer recorded. In main, any of them
        // may have ended in a crash beside others: the runner isolates the message and
        // counts nothing. In the isolation queue each ended in a crash while the message
        // ran alone: all but the latest are counted here, the latest by the runner.
        let unrecorded = incoming.receives.saturating_sub(1).saturating_sub(base);
        if isolated {
            for _ in 1..unrecorded {
                envelope.record_failure(
                    Failure::new(FailureKind::LeaseExpired, "lease_expired", UNRECORDED, now),
                    "isolated",
                );
            }
        }
        let (lane, due_ms) = if isolated {
            (Lane::Isolated, now)
        } else if unrecorded > 0 {
            (lane_at(envelope.attempt, &lanes.tiers), now)
        } else {
            (lane, due_ms)
        };
        Some(Delivery {
            envelope,
            lane,
            due_ms,
            unfinished_before: unrecorded > 0,
            token,
        })
    }
}

async fn send_batch(
    client: Client,
    url: String,
    entries: Vec<SendMessageBatchRequestEntry>,
) -> Result<(), SqsError> {
    let total = entries.len();
    let out = client
        .send_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await
        .map_err(during("send a batch"))?;
    if let Some(f) = out.failed().first() {
        return Err(SqsError::Call {
            context: "send a batch".into(),
            reason: format!(
                "{} of {total} messages refused, e.g. {}: {}",
                out.failed().len(),
                f.code(),
                f.message().unwrap_or_default()
            ),
            code: Some(f.code().to_owned()),
        });
    }
    Ok(())
}

async fn receive(
    client: Client,
    url: String,
    max: usize,
    wait_secs: i32,
    visibility_secs: i32,
) -> Result<Vec<Message>, SqsError> {
    let out = client
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(i32::try_from(max.clamp(1, BATCH)).unwrap_or(10))
        .wait_time_seconds(wait_secs)
        .visibility_timeout(visibility_secs)
        .message_attribute_names("All")
        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
        .send()
        .await
        .map_err(during("receive"))?;
    Ok(out.messages.unwrap_or_default())
}

/// Deletes received messages in batches of up to ten, answering each ack.
async fn delete_loop(
    client: Client,
    url: String,
    mut rx: mpsc::UnboundedReceiver<(Arc<str>, oneshot::Sender<Result<(), SqsError>>)>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + DELETE_LINGER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) => batch.push(job),
                _ => break,
            }
        }
        let entries: Vec<DeleteMessageBatchRequestEntry> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, (receipt, _))| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(receipt.as_ref())
                    .build()
                    .ok()
            })
            .collect();
        let result = client
            .delete_message_batch()
            .queue_url(&url)
            .set_entries(Some(entries))
            .send()
            .await;
        match result {
            Ok(out) => {
                let failed: HashMap<&str, (&str, &str)> = out
                    .failed()
                    .iter()
                    .map(|f| (f.id(), (f.code(), f.message().unwrap_or_default())))
                    .collect();
                for (i, (_, tx)) in batch.into_iter().enumerate() {
                    let answer = match failed.get(i.to_string().as_str()) {
                        None => Ok(()),
                        Some((code, message)) => Err(SqsError::Call {
                            context: "delete the message".into(),
                            reason: format!("{code}: {message}"),
                            code: Some((*code).to_owned()),
                        }),
                    };
                    let _ = tx.send(answer);
                }
            }
            Err(e) => {
                let e = during("delete a batch of messages")(e);
                for (_, tx) in batch {
                    let _ = tx.send(Err(e.clone()));
                }
            }
        }
    }
}

impl Transport for SqsTransport {
    type Token = Token;

    async fn publish(&self, queue: &QueueName, batch: Vec<Envelope>) -> Result<(), TransportError> {
        let q = self.queue(queue).await?;
        let mut batches: Vec<Vec<SendMessageBatchRequestEntry>> = Vec::new();
        let mut entries: Vec<SendMessageBatchRequestEntry> = Vec::with_capacity(BATCH);
        let mut bytes = 0;
        for mut env in batch {
            env.queue = queue.clone();
            let out = wire::encode(&env, &[]);
            if out.size > MAX_MESSAGE {
                return Err(TransportError::TooLarge {
                    size: out.size,
                    limit: MAX_MESSAGE,
                });
            }
            if entries.len() == BATCH || bytes + out.size > MAX_MESSAGE {
                batches.push(std::mem::take(&mut entries));
                bytes = 0;
            }
            bytes += out.size;
            let entry = SendMessageBatchRequestEntry::builder()
                .id(entries.len().to_string())
                .message_body(out.body)
                .set_message_attributes(Some(out.attributes))
                .build()
                .map_err(|e| SqsError::call("build a send batch", e))?;
            entries.push(entry);
        }
        if !entries.is_empty() {
            batches.push(entries);
        }
        // A few batch calls in flight at once: a long publish is bound by round trips.
        let mut sending = tokio::task::JoinSet::new();
        for entries in batches {
            if sending.len() >= PUBLISH_CONCURRENCY
                && let Some(done) = sending.join_next().await
            {
                done.map_err(|e| SqsError::call("send a batch", e))??;
            }
            sending.spawn(send_batch(
                self.inner.client.clone(),
                q.url.clone(),
                entries,
            ));
        }
        while let Some(done) = sending.join_next().await {
            done.map_err(|e| SqsError::call("send a batch", e))??;
        }
        Ok(())
    }

    async fn create_lanes(&self, lanes: &LaneSet) -> Result<(), TransportError> {
        // Main, DLQ and isolation queues, and main's redrive policy for these tiers (a
        // retry waits hidden in main: the tiers need no queue of their own).
        let q = self.queue(&lanes.queue).await?;
        self.check_policy(&q, lanes).await?;
        Ok(())
    }

    async fn fetch(
        &self,
        lanes: &LaneSet,
        max: usize,
        lease: Duration,
    ) -> Result<Fetched<Token>, TransportError> {
        let q = self.queue(&lanes.queue).await?;
        self.check_policy(&q, lanes).await?;
        let lease_secs = i32::try_from(ceil_secs(
            i64::try_from(lease.as_millis()).unwrap_or(i64::MAX),
        ))
        .unwrap_or(i32::MAX)
        .clamp(1, MAX_VISIBILITY_SECS as i32);
        q.lease_secs.store(lease_secs, Ordering::Relaxed);
        let max = max.max(1);
        let mut st = q.fetch.lock().await;
        loop {
            let now = now_ms();
            st.ready.extend(
                q.held
                    .lock()
                    .map_err(|_| poisoned())?
                    .extract_if(.., |d| d.due_ms <= now),
            );
            let next_due = q.next_due()?;
            if !st.ready.is_empty() {
                let n = max.min(st.ready.len());
                return Ok(Fetched {
                    deliveries: st.ready.drain(..n).collect(),
                    next_due_ms: next_due,
                });
            }
            let mut receiving = match st.pending.take() {
                Some(r) => r,
                None => {
                    // While something waits in memory, poll without waiting.
                    let wait = if next_due.is_some() {
                        0
                    } else {
                        self.inner.config.wait_secs
                    };
                    tokio::spawn(receive(
                        self.inner.client.clone(),
                        q.url.clone(),
                        BATCH,
                        wait,
                        lease_secs,
                    ))
                }
            };
            let woken = q.held_changed.notified();
            let until_due = async {
                match next_due {
                    Some(due) => {
                        let ms = u64::try_from(due - now_ms()).unwrap_or(0);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    None => std::future::pending().await,
                }
            };
            let received = tokio::select! {
                r = &mut receiving => Some(r),
                () = until_due => None,
                () = woken => None,
            };
            let Some(received) = received else {
                st.pending = Some(receiving);
                continue;
            };
            let messages = received.map_err(|e| SqsError::call("receive", e))??;
            let empty = messages.is_empty();
            for m in messages {
                if let Some(d) = self.deliver(&q, lanes, m, false).await {
                    let wait = d.due_ms - now_ms();
                    if wait >= 1000 {
                        // Received before its due time (sent with SQS's longest delay, 15
                        // minutes, and due later): hidden again for the rest, and this
                        // receive remembered as no attempt.
                        self.remember(&d.token, &d.envelope, d.lane.clone(), d.due_ms);
                        let id = d.envelope.id.to_string();
                        if let Err(e) = self.hide(&d.token, ceil_secs(wait), &id).await {
                            tracing::warn!(%id, error = %e, "could not hide a message received before its due time");
                        }
                    } else if wait > 0 {
                        q.held.lock().map_err(|_| poisoned())?.push(d);
                    } else {
                        st.ready.push_back(d);
                    }
                }
            }
            if empty && st.ready.is_empty() {
                return Ok(Fetched {
                    deliveries: Vec::new(),
                    next_due_ms: q.next_due()?,
                });
            }
        }
    }

    async fn ack(&self, d: &Delivery<Token>) -> Result<(), TransportError> {
        self.delete(&d.token, &d.envelope.id.to_string()).await?;
        self.forget(&d.token);
        Ok(())
    }

    async fn retry(
        &self,
        d: &Delivery<Token>,
        tier: &Tier,
        due_ms: i64,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        let lane = Lane::Retry(tier.name().to_owned());
        let id = envelope.id.to_string();
        if d.token.isolated {
            // Back to main, delayed: the isolation queue holds only what is due now.
            let mut env = envelope.clone();
            env.not_before_ms = Some(due_ms);
            // Received a moment early, it is held until `not_before` where it lands.
            let delay = i32::try_from(ceil_secs(due_ms - now_ms() - CLOCK_ROUNDING_MS))
                .unwrap_or(MAX_DELAY_SECS);
            self.send_to(&d.token.queue.url, &env, delay, "send a retry to main")
                .await?;
            redrive_core::failpoint("next-lane-written");
            self.delete(&d.token, &id).await?;
            self.forget(&d.token);
            return Ok(());
        }
        // Remembered before it is hidden: the next receive may come from this process.
        self.remember(&d.token, envelope, lane.clone(), due_ms);
        // Due times are rounded up to the millisecond and `now_ms` rounds down: forgiven
        // here, or a 1 s tier would hide for 2 s. Hiding starts no earlier than now, so
        // the whole delay still passes before anyone receives it.
        let delay = due_ms - now_ms() - CLOCK_ROUNDING_MS;
        if delay >= 1000 {
            // SQS counts in whole seconds: rounded up, so that no consumer anywhere
            // receives it before it is due (late by under a second at most).
            return self.hide(&d.token, ceil_secs(delay), &id).await;
        }
        // Under a second: wait in memory, keeping the message hidden until then.
        let lease_ms = i64::from(d.token.queue.lease_secs.load(Ordering::Relaxed)) * 1000;
        self.hide(&d.token, ceil_secs(delay + lease_ms), &id)
            .await?;
        let q = &d.token.queue;
        q.held.lock().map_err(|_| poisoned())?.push(Delivery {
            envelope: envelope.clone(),
            lane,
            due_ms,
            unfinished_before: false,
            token: d.token.clone(),
        });
        q.held_changed.notify_one();
        Ok(())
    }

    async fn dead_letter(
        &self,
        d: &Delivery<Token>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        // The DLQ has it before main lets it go.
        self.send_dead(&d.token.queue, envelope).await?;
        redrive_core::failpoint("next-lane-written");
        self.delete(&d.token, &envelope.id.to_string()).await?;
        self.forget(&d.token);
        Ok(())
    }

    async fn release(&self, d: &Delivery<Token>) -> Result<(), TransportError> {
        if d.token.isolated {
            // Another process would take its next receive in the isolation queue for a
            // crash: a fresh copy has no receive to count.
            let id = d.envelope.id.to_string();
            self.send_to(
                &d.token.queue.isolated_url,
                &d.envelope,
                0,
                "send to the isolation queue",
            )
            .await?;
            self.delete(&d.token, &id).await?;
            self.forget(&d.token);
            return Ok(());
        }
        // The next receive of this message is not an attempt: say so before it can come.
        self.remember(&d.token, &d.envelope, d.lane.clone(), d.due_ms);
        self.hide(&d.token, 0, &d.envelope.id.to_string()).await
    }

    async fn extend_lease(
        &self,
        d: &Delivery<Token>,
        lease: Duration,
    ) -> Result<(), TransportError> {
        let ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        self.hide(&d.token, ceil_secs(ms).max(1), &d.envelope.id.to_string())
            .await
    }

    async fn isolate(
        &self,
        d: &Delivery<Token>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        // The isolation queue has it before main lets it go.
        let q = &d.token.queue;
        self.send_to(&q.isolated_url, envelope, 0, "send to the isolation queue")
            .await?;
        redrive_core::failpoint("next-lane-written");
        self.delete(&d.token, &envelope.id.to_string()).await?;
        self.forget(&d.token);
        Ok(())
    }

    async fn fetch_isolated(
        &self,
        lanes: &LaneSet,
        lease: Duration,
    ) -> Result<Fetched<Token>, TransportError> {
        let q = self.queue(&lanes.queue).await?;
        let lease_secs = i32::try_from(ceil_secs(
            i64::try_from(lease.as_millis()).unwrap_or(i64::MAX),
        ))
        .unwrap_or(i32::MAX)
        .clamp(1, MAX_VISIBILITY_SECS as i32);
        let messages = receive(
            self.inner.client.clone(),
            q.isolated_url.clone(),
            1,
            0,
            lease_secs,
        )
        .await?;
        let mut deliveries = Vec::new();
        for m in messages {
            deliveries.extend(self.deliver(&q, lanes, m, true).await);
        }
        Ok(Fetched {
            deliveries,
            next_due_ms: None,
        })
    }

    async fn isolated_due(&self, lanes: &LaneSet) -> Result<Option<i64>, TransportError> {
        let q = self.queue(&lanes.queue).await?;
        let (waiting, running) = self.counts(&q.isolated_url).await?;
        let lease_ms = i64::from(q.lease_secs.load(Ordering::Relaxed)) * 1000;
        Ok(if waiting > 0 {
            Some(now_ms())
        } else if running > 0 {
            // Received by a runner running it alone: due again if its lease runs out.
            Some(now_ms() + lease_ms)
        } else {
            None
        })
    }
}

fn poisoned() -> SqsError {
    SqsError::call("held deliveries", "a lock was poisoned by a panic")
}

impl SqsTransport {
    /// Approximate counts of one SQS queue: (visible + delayed, in flight).
    pub(crate) async fn counts(&self, url: &str) -> Result<(u64, u64), SqsError> {
        let out = self
            .inner
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(during("read the queue's counts"))?;
        let get = |n: QueueAttributeName| -> u64 {
            out.attributes()
                .and_then(|a| a.get(&n))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok((
            get(QueueAttributeName::ApproximateNumberOfMessages)
                + get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
            get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        ))
    }

    async fn depths_of(&self, q: &Queue) -> Result<QueueDepths, SqsError> {
        let (main, inflight) = self.counts(&q.url).await?;
        let (dead, dead_inflight) = self.counts(&q.dlq_url).await?;
        let (isolated, running_alone) = self.counts(&q.isolated_url).await?;
        Ok(QueueDepths {
            queue: q.name.to_string(),
            main,
            // A retry waits hidden in main, so it is counted in flight.
            retry: Vec::new(),
            isolated,
            dlq: dead + dead_inflight,
            inflight: inflight + running_alone,
            oldest_main_age_ms: None,
        })
    }

    /// The SQS queue URLs under this prefix (all pages).
    pub(crate) async fn queue_urls(&self) -> Result<Vec<String>, SqsError> {
        let mut urls = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let out = self
                .inner
                .client
                .list_queues()
                .queue_name_prefix(self.inner.config.prefix.clone())
                .max_results(1000)
                .set_next_token(next.take())
                .send()
                .await
                .map_err(during("list queues"))?;
            urls.extend(out.queue_urls().iter().cloned());
            match out.next_token() {
                Some(t) if !t.is_empty() => next = Some(t.to_owned()),
                _ => return Ok(urls),
            }
        }
    }
}

impl LaneStats for SqsTransport {
    async fn depths(&self) -> Result<Vec<QueueDepths>, TransportError> {
        let mut names = Vec::new();
        for url in self.queue_urls().await? {
            if url.ends_with("-dlq") {
                continue;
            }
            if let Some(owner) = self.owner(&url).await? {
                names.push(owner);
            }
        }
        names.sort();
        names.dedup();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let q = self.queue(&name).await?;
            out.push(self.depths_of(&q).await?);
        }
        Ok(out)
    }

    async fn queue_depths(&self, lanes: &LaneSet) -> Result<QueueDepths, TransportError> {
        let q = self.queue(&lanes.queue).await?;
        let mut d = self.depths_of(&q).await?;
        // Waiting in this process's memory is still in flight for SQS; nothing to add.
        d.retry = lanes
            .tiers
            .iter()
            .map(|t| (t.name().to_owned(), 0))
            .collect();
        Ok(d)
    }
}

impl SqsConfig {
    /// Builds the client ([`Self::sdk_client`]) and checks SQS answers (one
    /// `ListQueues`).
    ///
    /// # Errors
    ///
    /// [`SqsError::Unreachable`] when there are no credentials, the endpoint does not
    /// answer, or SQS refuses the credentials.
    pub async fn connect(&self) -> Result<SqsTransport, SqsError> {
        let address = self.address();
        let unreachable = |reason: String| SqsError::Unreachable {
            address: address.clone(),
            reason,
        };
        let (client, calls) = self.sdk_client().await?;
        // One quick call: an endpoint that is down fails here, not on the first fetch.
        let probe = client
            .list_queues()
            .queue_name_prefix(format!("{}redrive-probe", self.prefix))
            .max_results(1)
            .customize()
            .config_override(
                aws_sdk_sqs::config::Config::builder().retry_config(
                    RetryConfig::standard()
                        .with_max_attempts(4)
                        .with_initial_backoff(Duration::from_millis(50)),
                ),
            )
            .send();
        match tokio::time::timeout(Duration::from_secs(10), probe).await {
            Err(_) => return Err(unreachable("no answer within 10 s".into())),
            Ok(Err(e)) => {
                let e = during("list queues")(e);
                let hint = match e.code() {
                    Some(
                        "InvalidClientTokenId"
                        | "UnrecognizedClientException"
                        | "SignatureDoesNotMatch"
                        | "InvalidAccessKeyId"
                        | "AccessDenied"
                        | "AccessDeniedException",
                    ) => " (the credentials were refused: check AWS_ACCESS_KEY_ID / AWS_PROFILE)",
                    _ => "",
                };
                return Err(unreachable(format!("{e}{hint}")));
            }
            Ok(Ok(_)) => {}
        }
        Ok(SqsTransport::new(client, self.clone(), calls))
    }
}
