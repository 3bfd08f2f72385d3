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

use crate::error::RedisError;
use crate::scripts;

/// The consumer group every redrive consumer of a queue joins.
pub(crate) const GROUP: &str = "redrive";

/// The backend's handle on a delivery: the stream entry id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    id: String,
}

/// Key names of one queue; the `{queue}` hash tag keeps them in one cluster slot.
pub(crate) struct Keys {
    pub(crate) main: String,
    pub(crate) dlq: String,
    tiers: String,
    prefix: String,
}

impl Keys {
    pub(crate) fn of(ns: &str, queue: &str) -> Self {
        let prefix = format!("{ns}:{{{queue}}}");
        Self {
            main: format!("{prefix}:main"),
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
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("address", &self.address)
            .field("consumer", &self.consumer)
            .finish()
    }
}

/// A parsed stream entry.
pub(crate) struct Entry {
    pub(crate) id: String,
    pub(crate) fields: Vec<(String, Vec<u8>)>,
}

impl Entry {
    pub(crate) fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
    fn text(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// `[[id, [f, v, …]], …]` → entries.
pub(crate) fn entries(v: &Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = String::from_utf8(bytes(pair.first()?)?).ok()?;
            let fields = match pair.get(1)? {
                Value::Array(kv) => kv
                    .chunks(2)
                    .filter_map(|c| {
                        Some((
                            String::from_utf8(bytes(c.first()?)?).ok()?,
                            bytes(c.get(1)?)?,
                        ))
                    })
                    .collect(),
                _ => Vec::new(), // A deleted entry still listed as pending.
            };
            Some(Entry { id, fields })
        })
        .collect()
}

/// `XREADGROUP` reply: `[[stream, entries]]` or nil.
pub(crate) fn read_reply(v: &Value) -> Vec<Entry> {
    match v {
        Value::Array(streams) => streams
            .iter()
            .filter_map(|s| {
                if let Value::Array(pair) = s {
                    pair.get(1).map(entries)
                } else {
                    None
                }
            })
            .flatten()
            .collect(),
        Value::Map(streams) => streams.iter().flat_map(|(_, e)| entries(e)).collect(),
        _ => Vec::new(),
    }
}

/// Reads an envelope from an entry.
pub(crate) fn envelope_of(queue: &QueueName, key: &str, e: &Entry) -> Result<Envelope, RedisError> {
    let malformed = |reason: String| RedisError::Malformed {
        key: key.to_owned(),
        id: e.id.clone(),
        reason,
    };
    let payload = e
        .get("payload")
        .ok_or_else(|| malformed("no payload field".into()))?
        .to_vec();
    let headers: Vec<(String, String)> = match e.get("h") {
        Some(h) => serde_json::from_slice(h).map_err(|err| malformed(format!("headers: {err}")))?,
        None => Vec::new(),
    };
    Envelope::from_wire(queue, e.text("key"), payload, headers)
        .map_err(|err| malformed(err.to_string()))
}

fn wire(env: &Envelope) -> String {
    serde_json::to_string(&env.to_wire()).unwrap_or_else(|_| "[]".to_owned())
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

    fn delivery(
        &self,
        queue: &QueueName,
        keys: &Keys,
        e: &Entry,
        reclaimed: bool,
    ) -> Result<Delivery<Token>, RedisError> {
        let envelope = envelope_of(queue, &keys.main, e)?;
        let lane = e
            .text("lane")
            .and_then(|l| Lane::from_label(&l))
            .unwrap_or(Lane::Main);
        let due_ms = e
            .text("due")
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(now_ms);
        Ok(Delivery {
            envelope,
            lane,
            due_ms,
            unfinished_before: reclaimed,
            token: Token { id: e.id.clone() },
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
        let Value::Array(parts) = reply else {
            return Err(RedisError::Malformed {
                key: keys.main.clone(),
                id: "-".into(),
                reason: "unexpected fetch reply".into(),
            }
            .into());
        };
        let mut deliveries = Vec::new();
        if let Some(claimed) = parts.first() {
            for e in entries(claimed)
                .into_iter()
                .filter(|e| !e.fields.is_empty())
            {
                deliveries.push(self.delivery(queue, &keys, &e, true)?);
            }
        }
        if let Some(fresh) = parts.get(1) {
            for e in entries(fresh) {
                deliveries.push(self.delivery(queue, &keys, &e, false)?);
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

    async fn ack(&self, d: &Delivery<Token>) -> Result<(), TransportError> {
        let keys = self.keys(d.envelope.queue.as_str());
        self.settle(&scripts::ACK, &[&keys.main], &[], &d.token.id)
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
            &[&keys.main, &zset, &hash, &keys.tiers],
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
        self.settle(&scripts::DEAD, &[&keys.main, &keys.dlq], &args, &d.token.id)
            .await
            .map_err(Into::into)
    }

    async fn release(&self, d: &Delivery<Token>) -> Result<(), TransportError> {
        let keys = self.keys(d.envelope.queue.as_str());
        self.settle(&scripts::RELEASE, &[&keys.main], &[], &d.token.id)
            .await
            .map_err(Into::into)
    }

    async fn extend_lease(
        &self,
        d: &Delivery<Token>,
        _lease: Duration,
    ) -> Result<(), TransportError> {
        let keys = self.keys(d.envelope.queue.as_str());
        self.settle(&scripts::EXTEND, &[&keys.main], &[], &d.token.id)
            .await
            .map_err(Into::into)
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
        let inflight = match &pending {
            Value::Array(p) => p
                .first()
                .and_then(bytes)
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            _ => 0,
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
            dlq,
            inflight,
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
