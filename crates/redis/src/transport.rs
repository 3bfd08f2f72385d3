//! The Redis [`Transport`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Value;
use redis::aio::ConnectionManager;
use redrive_core::{
    Delivery, Envelope, Fetched, Lane, LaneSet, LaneStats, QueueDepths, QueueName, Tier, Transport,
    TransportError, now_ms,
};

use crate::config::RedisConfig;
use crate::error::RedisError;
use crate::scripts;
use crate::wire::{Entry, bytes, entries, envelope_of, wire};

/// The consumer group every redrive consumer of a queue joins.
pub(crate) const GROUP: &str = "redrive";

/// The backend's handle on a delivery: the stream entry id, and whether it is an entry of
/// the isolation stream (else of main).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    id: String,
    isolated: bool,
}

/// Key names of one queue; the `{queue}` hash tag keeps them in one cluster slot.
pub(crate) struct Keys {
    pub(crate) main: String,
    pub(crate) isolated: String,
    pub(crate) dlq: String,
    tiers: String,
    prefix: String,
}

impl Keys {
    pub(crate) fn of(ns: &str, queue: &str) -> Self {
        let prefix = format!("{ns}:{{{queue}}}");
        Self {
            main: format!("{prefix}:main"),
            isolated: format!("{prefix}:isolated"),
            dlq: format!("{prefix}:dlq"),
            tiers: format!("{prefix}:tiers"),
            prefix,
        }
    }
    fn retry(&self, tier: &str) -> String {
        format!("{}:retry:{tier}", self.prefix)
    }
    fn hash_prefix(&self) -> String {
        format!("{}:msg:", self.prefix)
    }
    /// The stream a delivery's entry is in.
    fn stream_of(&self, token: &Token) -> &str {
        if token.isolated {
            &self.isolated
        } else {
            &self.main
        }
    }
}

/// Streams, sorted sets and Lua scripts on one Redis, through a reconnecting connection.
#[derive(Clone)]
pub struct RedisTransport {
    conn: ConnectionManager,
    address: String,
    namespace: String,
    consumer: String,
    ready: Arc<Mutex<HashSet<String>>>,
    tiers: Arc<Mutex<std::collections::HashMap<String, (std::time::Instant, Vec<String>)>>>,
    last_reclaim: Arc<Mutex<Option<std::time::Instant>>>,
    /// The lease the last fetch asked for (ms): when an isolation-lane lease runs out.
    lease_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("address", &self.address)
            .field("consumer", &self.consumer)
            .finish()
    }
}

impl RedisTransport {
    pub(crate) fn new(conn: ConnectionManager, address: String, namespace: String) -> Self {
        let consumer = format!("c-{}", uuid::Uuid::new_v4().simple());
        Self {
            conn,
            address,
            namespace,
            consumer,
            ready: Arc::default(),
            tiers: Arc::default(),
            last_reclaim: Arc::default(),
            lease_ms: Arc::new(std::sync::atomic::AtomicU64::new(30_000)),
        }
    }

    pub(crate) fn keys(&self, queue: &str) -> Keys {
        Keys::of(&self.namespace, queue)
    }

    fn queues_key(&self) -> String {
        format!("{}:queues", self.namespace)
    }

    pub(crate) fn err(
        &self,
        context: &'static str,
    ) -> impl Fn(redis::RedisError) -> RedisError + '_ {
        move |source| RedisError::Command {
            address: self.address.clone(),
            context,
            source,
        }
    }

    pub(crate) fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Creates the consumer group (from the stream's start) once per queue and process.
    pub(crate) async fn ensure(
        &self,
        queue: &str,
        stream: &str,
        group: &str,
    ) -> Result<(), RedisError> {
        let mark = format!("{stream}/{group}");
        if self.ready.lock().is_ok_and(|r| r.contains(&mark)) {
            return Ok(());
        }
        let mut conn = self.conn();
        let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Ok(_) => {}
            Err(e) if e.to_string().contains("BUSYGROUP") => {}
            Err(e) => return Err(self.err("create consumer group")(e)),
        }
        let _: i64 = redis::cmd("SADD")
            .arg(self.queues_key())
            .arg(queue)
            .query_async(&mut conn)
            .await
            .map_err(self.err("register queue"))?;
        if let Ok(mut r) = self.ready.lock() {
            r.insert(mark);
        }
        Ok(())
    }

    /// Every queue redrive has seen on this Redis.
    pub(crate) async fn queues(&self) -> Result<Vec<String>, RedisError> {
        let mut conn = self.conn();
        let mut q: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.queues_key())
            .query_async(&mut conn)
            .await
            .map_err(self.err("list queues"))?;
        q.sort();
        Ok(q)
    }

    /// The consumer's tiers plus every tier that ever held messages of the queue (left
    /// by consumers with other tiers), looked up at most every 5 s.
    async fn tier_names(&self, keys: &Keys, lanes: &LaneSet) -> Result<Vec<String>, RedisError> {
        let mut names: Vec<String> = lanes.tiers.iter().map(|t| t.name().to_owned()).collect();
        let cached = self.tiers.lock().ok().and_then(|c| {
            c.get(&keys.tiers)
                .filter(|(at, _)| at.elapsed() < Duration::from_secs(5))
                .map(|(_, v)| v.clone())
        });
        let seen = match cached {
            Some(seen) => seen,
            None => {
                let mut conn = self.conn();
                let seen: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(&keys.tiers)
                    .query_async(&mut conn)
                    .await
                    .map_err(self.err("list tiers"))?;
                if let Ok(mut c) = self.tiers.lock() {
                    c.insert(
                        keys.tiers.clone(),
                        (std::time::Instant::now(), seen.clone()),
                    );
                }
                seen
            }
        };
        for t in seen {
            if !names.contains(&t) {
                names.push(t);
            }
        }
        Ok(names)
    }

    async fn settle(
        &self,
        script: &redis::Script,
        keys: &[&str],
        args: &[&[u8]],
        id: &str,
    ) -> Result<(), RedisError> {
        let mut conn = self.conn();
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        inv.arg(GROUP).arg(&self.consumer).arg(id);
        for a in args {
            inv.arg(*a);
        }
        let done: i64 = inv
            .invoke_async(&mut conn)
            .await
            .map_err(self.err("settle"))?;
        if done == 1 {
            Ok(())
        } else {
            Err(RedisError::LeaseLost(id.to_owned()))
        }
    }

    /// An entry as a delivery; `None` when it could not be read and was quarantined in
    /// the DLQ stream instead (or will be, at its next delivery, if that failed).
    async fn delivery(
        &self,
        queue: &QueueName,
        keys: &Keys,
        e: &Entry,
        reclaimed: bool,
        isolated: bool,
    ) -> Option<Delivery<Token>> {
        let token = Token {
            id: e.id.clone(),
            isolated,
        };
        let stream = keys.stream_of(&token);
        let envelope = match envelope_of(queue, stream, e) {
            Ok(envelope) => envelope,
            Err(raw) => {
                let why = raw
                    .last_failure()
                    .map(|f| f.message.clone())
                    .unwrap_or_default();
                tracing::warn!(%queue, reason = %why, "quarantining an unreadable entry in the DLQ stream");
                if let Err(err) = self.dead_letter_entry(keys, &token, &raw).await {
                    tracing::warn!(%queue, error = %err, "could not quarantine an unreadable entry; it will be delivered again");
                }
                return None;
            }
        };
        let lane = e
            .text("lane")
            .and_then(|l| Lane::from_label(&l))
            .unwrap_or(Lane::Main);
        let due_ms = e
            .text("due")
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(now_ms);
        let lane = if isolated { Lane::Isolated } else { lane };
        Some(Delivery {
            envelope,
            lane,
            due_ms,
            unfinished_before: reclaimed,
            token,
        })
    }

    /// Moves an entry to the DLQ stream as `envelope` and removes it from its stream.
    async fn dead_letter_entry(
        &self,
        keys: &Keys,
        token: &Token,
        envelope: &Envelope,
    ) -> Result<(), RedisError> {
        self.move_entry(&scripts::DEAD, &keys.dlq, keys, token, envelope)
            .await
    }

    /// Adds `envelope` to the stream `to` with `script` (DEAD or ISOLATE: they take the
    /// same arguments) and removes the delivery's entry from its own stream.
    async fn move_entry(
        &self,
        script: &redis::Script,
        to: &str,
        keys: &Keys,
        token: &Token,
        envelope: &Envelope,
    ) -> Result<(), RedisError> {
        let has_key = if envelope.key.is_some() { "1" } else { "0" };
        let key = envelope.key.clone().unwrap_or_default();
        let headers = wire(envelope);
        let at = now_ms().to_string();
        let args: [&[u8]; 5] = [
            &envelope.payload,
            key.as_bytes(),
            has_key.as_bytes(),
            headers.as_bytes(),
            at.as_bytes(),
        ];
        self.settle(script, &[keys.stream_of(token), to], &args, &token.id)
            .await
    }

    /// Parses a fetch script's `{claimed, fresh, next_due}` reply into deliveries.
    async fn deliveries(
        &self,
        queue: &QueueName,
        keys: &Keys,
        reply: Value,
        isolated: bool,
    ) -> Result<Fetched<Token>, RedisError> {
        let stream = if isolated { &keys.isolated } else { &keys.main };
        let Value::Array(parts) = reply else {
            return Err(RedisError::Malformed {
                key: stream.clone(),
                id: "-".into(),
                reason: "unexpected fetch reply".into(),
            });
        };
        let mut deliveries = Vec::new();
        if let Some(claimed) = parts.first() {
            for e in entries(claimed)
                .into_iter()
                .filter(|e| !e.fields.is_empty())
            {
                deliveries.extend(self.delivery(queue, keys, &e, true, isolated).await);
            }
        }
        if let Some(fresh) = parts.get(1) {
            for e in entries(fresh) {
                deliveries.extend(self.delivery(queue, keys, &e, false, isolated).await);
            }
        }
        let next_due_ms = parts
            .get(2)
            .and_then(bytes)
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse().ok());
        Ok(Fetched {
            deliveries,
            next_due_ms,
        })
    }
}

impl Transport for RedisTransport {
    type Token = Token;

    async fn publish(&self, queue: &QueueName, batch: Vec<Envelope>) -> Result<(), TransportError> {
        let keys = self.keys(queue.as_str());
        self.ensure(queue.as_str(), &keys.main, GROUP).await?;
        let now = now_ms();
        let mut pipe = redis::pipe();
        for mut env in batch {
            env.queue = queue.clone();
            let due = env.not_before_ms.unwrap_or(now).max(now);
            let cmd = pipe
                .cmd("XADD")
                .arg(&keys.main)
                .arg("*")
                .arg("payload")
                .arg(&env.payload[..])
                .arg("h")
                .arg(wire(&env));
            cmd.arg("lane").arg("main").arg("due").arg(due);
            if let Some(k) = &env.key {
                cmd.arg("key").arg(k);
            }
            cmd.ignore();
        }
        let mut conn = self.conn();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(self.err("publish"))?;
        Ok(())
    }

    async fn create_lanes(&self, lanes: &LaneSet) -> Result<(), TransportError> {
        let queue = lanes.queue.as_str();
        let keys = self.keys(queue);
        self.ensure(queue, &keys.main, GROUP).await?;
        self.ensure(queue, &keys.isolated, GROUP).await?;
        if !lanes.tiers.is_empty() {
            // Retry tiers are sorted sets made by their first member; listing the names
            // lets `queues` show them empty.
            let mut conn = self.conn();
            let names: Vec<&str> = lanes.tiers.iter().map(Tier::name).collect();
            let _: i64 = redis::cmd("SADD")
                .arg(&keys.tiers)
                .arg(names)
                .query_async(&mut conn)
                .await
                .map_err(self.err("register tiers"))?;
        }
        Ok(())
    }

    async fn fetch(
        &self,
        lanes: &LaneSet,
        max: usize,
        lease: Duration,
    ) -> Result<Fetched<Token>, TransportError> {
        let queue = &lanes.queue;
        let keys = self.keys(queue.as_str());
        self.ensure(queue.as_str(), &keys.main, GROUP).await?;
        let tiers = self.tier_names(&keys, lanes).await?;
        self.lease_ms.store(
            u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        // Reclaiming scans the pending list, so it runs at most every 250 ms per process.
        let reclaim = {
            let mut last = self
                .last_reclaim
                .lock()
                .map_err(|_| RedisError::LeaseLost("reclaim clock".into()))?;
            if last.is_none_or(|t| t.elapsed() >= Duration::from_millis(250)) {
                *last = Some(std::time::Instant::now());
                i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)
            } else {
                -1
            }
        };
        let mut inv = scripts::FETCH.prepare_invoke();
        inv.key(&keys.main);
        for t in &tiers {
            inv.key(keys.retry(t));
        }
        inv.arg(GROUP)
            .arg(&self.consumer)
            .arg(now_ms())
            .arg(max)
            .arg(keys.hash_prefix())
            .arg(reclaim);
        let mut conn = self.conn();
        let reply: Value = inv
            .invoke_async(&mut conn)
            .await
            .map_err(self.err("fetch"))?;
        Ok(self.deliveries(queue, &keys, reply, false).await?)
    }

    async fn ack(&self, d: &Delivery<Token>) -> Result<(), TransportError> {
        let keys = self.keys(d.envelope.queue.as_str());
        self.settle(&scripts::ACK, &[keys.stream_of(&d.token)], &[], &d.token.id)
            .await
            .map_err(Into::into)
    }

    async fn retry(
        &self,
        d: &Delivery<Token>,
        tier: &Tier,
        due_ms: i64,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        let keys = self.keys(envelope.queue.as_str());
        let token = uuid::Uuid::new_v4().simple().to_string();
        let zset = keys.retry(tier.name());
        let hash = format!("{}{token}", keys.hash_prefix());
        let lane = Lane::Retry(tier.name().to_owned()).label();
        let due = due_ms.to_string();
        let has_key = if envelope.key.is_some() { "1" } else { "0" };
        let key = envelope.key.clone().unwrap_or_default();
        let headers = wire(envelope);
        let args: [&[u8]; 8] = [
            due.as_bytes(),
            token.as_bytes(),
            &envelope.payload,
            key.as_bytes(),
            has_key.as_bytes(),
            headers.as_bytes(),
            lane.as_bytes(),
            tier.name().as_bytes(),
        ];
        self.settle(
            &scripts::RETRY,
            &[keys.stream_of(&d.token), &zset, &hash, &keys.tiers],
            &args,
            &d.token.id,
        )
        .await
        .map_err(Into::into)
    }

    async fn dead_letter(
        &self,
        d: &Delivery<Token>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        let keys = self.keys(envelope.queue.as_str());
        self.dead_letter_entry(&keys, &d.token, envelope)
            .await
            .map_err(Into::into)
    }

    async fn release(&self, d: &Delivery<Token>) -> Result<(), TransportError> {
        let keys = self.keys(d.envelope.queue.as_str());
        self.settle(
            &scripts::RELEASE,
            &[keys.stream_of(&d.token)],
            &[],
            &d.token.id,
        )
        .await
        .map_err(Into::into)
    }

    async fn extend_lease(
        &self,
        d: &Delivery<Token>,
        _lease: Duration,
    ) -> Result<(), TransportError> {
        let keys = self.keys(d.envelope.queue.as_str());
        self.settle(
            &scripts::EXTEND,
            &[keys.stream_of(&d.token)],
            &[],
            &d.token.id,
        )
        .await
        .map_err(Into::into)
    }

    async fn isolate(
        &self,
        d: &Delivery<Token>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        let queue = envelope.queue.as_str();
        let keys = self.keys(queue);
        self.ensure(queue, &keys.isolated, GROUP).await?;
        self.move_entry(&scripts::ISOLATE, &keys.isolated, &keys, &d.token, envelope)
            .await
            .map_err(Into::into)
    }

    async fn fetch_isolated(
        &self,
        lanes: &LaneSet,
        lease: Duration,
    ) -> Result<Fetched<Token>, TransportError> {
        let queue = &lanes.queue;
        let keys = self.keys(queue.as_str());
        self.ensure(queue.as_str(), &keys.isolated, GROUP).await?;
        let mut conn = self.conn();
        let reply: Value = scripts::FETCH_ISOLATED
            .key(&keys.isolated)
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX))
            .arg(now_ms())
            .invoke_async(&mut conn)
            .await
            .map_err(self.err("fetch from the isolation lane"))?;
        Ok(self.deliveries(queue, &keys, reply, true).await?)
    }

    async fn isolated_due(&self, lanes: &LaneSet) -> Result<Option<i64>, TransportError> {
        let queue = lanes.queue.as_str();
        let keys = self.keys(queue);
        self.ensure(queue, &keys.isolated, GROUP).await?;
        let mut conn = self.conn();
        let due: String = scripts::ISOLATED_DUE_SCRIPT
            .key(&keys.isolated)
            .arg(GROUP)
            .arg("-")
            .arg(self.lease_ms.load(std::sync::atomic::Ordering::Relaxed))
            .arg(now_ms())
            .invoke_async(&mut conn)
            .await
            .map_err(self.err("look at the isolation lane"))?;
        Ok(due.parse().ok())
    }
}

impl RedisTransport {
    /// Depths of one queue's Redis lanes (the DLQ count is what is not drained yet).
    pub(crate) async fn redis_depths(
        &self,
        queue: &str,
        configured: &[String],
    ) -> Result<QueueDepths, RedisError> {
        let keys = self.keys(queue);
        let mut conn = self.conn();
        let len: u64 = redis::cmd("XLEN")
            .arg(&keys.main)
            .query_async(&mut conn)
            .await
            .map_err(self.err("depth"))?;
        let pending: Value = redis::cmd("XPENDING")
            .arg(&keys.main)
            .arg(GROUP)
            .query_async(&mut conn)
            .await
            .unwrap_or(Value::Nil);
        let pending_count = |pending: &Value| -> u64 {
            match pending {
                Value::Array(p) => p
                    .first()
                    .and_then(bytes)
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
                _ => 0,
            }
        };
        let inflight = pending_count(&pending);
        let isolated_len: u64 = redis::cmd("XLEN")
            .arg(&keys.isolated)
            .query_async(&mut conn)
            .await
            .map_err(self.err("depth"))?;
        let isolated_pending = if isolated_len > 0 {
            let p: Value = redis::cmd("XPENDING")
                .arg(&keys.isolated)
                .arg(GROUP)
                .query_async(&mut conn)
                .await
                .unwrap_or(Value::Nil);
            pending_count(&p)
        } else {
            0
        };
        let mut tiers: Vec<String> = configured.to_vec();
        let seen: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&keys.tiers)
            .query_async(&mut conn)
            .await
            .map_err(self.err("list tiers"))?;
        for t in seen {
            if !tiers.contains(&t) {
                tiers.push(t);
            }
        }
        let mut retry = Vec::new();
        for t in tiers {
            let n: u64 = redis::cmd("ZCARD")
                .arg(keys.retry(&t))
                .query_async(&mut conn)
                .await
                .map_err(self.err("depth"))?;
            retry.push((t, n));
        }
        let dlq: u64 = redis::cmd("XLEN")
            .arg(&keys.dlq)
            .query_async(&mut conn)
            .await
            .map_err(self.err("depth"))?;
        Ok(QueueDepths {
            queue: queue.to_owned(),
            main: len.saturating_sub(inflight),
            retry,
            isolated: isolated_len.saturating_sub(isolated_pending),
            dlq,
            inflight: inflight + isolated_pending,
            oldest_main_age_ms: None,
        })
    }
}

impl LaneStats for RedisTransport {
    async fn depths(&self) -> Result<Vec<QueueDepths>, TransportError> {
        let mut out = Vec::new();
        for q in self.queues().await? {
            out.push(self.redis_depths(&q, &[]).await?);
        }
        Ok(out)
    }

    async fn queue_depths(&self, lanes: &LaneSet) -> Result<QueueDepths, TransportError> {
        let tiers: Vec<String> = lanes.tiers.iter().map(|t| t.name().to_owned()).collect();
        Ok(self.redis_depths(lanes.queue.as_str(), &tiers).await?)
    }
}

impl RedisConfig {
    /// Connects, and checks the server answers (the start-up health check).
    ///
    /// # Errors
    ///
    /// [`RedisError::Unreachable`] naming the address when Redis is down or refuses.
    pub async fn connect(&self) -> Result<RedisTransport, RedisError> {
        let unreachable = |e: redis::RedisError| RedisError::Unreachable {
            address: self.shown(),
            reason: e.to_string(),
        };
        let client = redis::Client::open(self.url.as_str()).map_err(unreachable)?;
        let settings = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(2);
        let mut conn = client
            .get_connection_manager_with_config(settings)
            .await
            .map_err(unreachable)?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(unreachable)?;
        Ok(RedisTransport::new(
            conn,
            self.shown(),
            self.namespace.clone(),
        ))
    }
}
