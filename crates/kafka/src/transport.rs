//! The Kafka [`Transport`]: topics per lane, a consumer-group member per queue.

use std::collections::HashMap;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use redrive_core::{
    Delivery, Envelope, Failure, FailureKind, Fetched, Lane, LaneSet, LaneStats, QueueDepths,
    QueueName, Tier, Transport, TransportError, now_ms,
};

use crate::config::KafkaConfig;
use crate::consumer::{
    CALL_TIMEOUT, COMMIT_EVERY, COVER_AHEAD, Ctx, LaneTopic, Mark, Member, Polled, Shared, Slot, Tp,
};
use crate::error::{KafkaError, during};
use crate::wire::encode;

/// How an isolation lane's topic name ends (no queue name may end so).
const ISOLATED_SUFFIX: &str = ".isolated";

/// How a member fetches (each may be overridden in the broker URL). Public so that a
/// benchmark's plain consumer can fetch the same way.
pub const FETCH_SETTINGS: &[(&str, &str)] = &[
    // A resumed partition waits for the fetch in flight: keep it short, so a retry is
    // handed out within ~50 ms of its due time.
    ("fetch.wait.max.ms", "50"),
    ("queued.max.messages.kbytes", "16384"),
    // Past that buffer librdkafka postpones a partition's next fetch by this much (1 s
    // by default), and the poll thread then drains the buffer and waits: stalls of
    // 0.24-0.5 s in a 1.8 s bench window (BENCHMARKS.md, Kafka). Looking
    // again every 20 ms costs next to nothing.
    ("fetch.queue.backoff.ms", "20"),
];

/// The backend's handle on one delivery: its record's partition and offset, and the
/// assignment it was polled under.
#[derive(Clone)]
pub struct Token {
    shared: Arc<Shared>,
    tp: Tp,
    offset: i64,
    epoch: u64,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}[{}]@{}",
            self.tp.topic, self.tp.partition, self.offset
        )
    }
}

/// Lanes as Kafka topics: `QUEUE`, `QUEUE.retry.<tier>`, `QUEUE.dlq`.
#[derive(Clone)]
pub struct KafkaTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KafkaTransport({})", self.inner.config.shown())
    }
}

pub(crate) struct Inner {
    pub(crate) config: KafkaConfig,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// Metadata and watermarks (no group).
    pub(crate) meta: BaseConsumer,
    /// Topics known to exist, with their partition counts.
    topics: Mutex<HashMap<String, i32>>,
    /// Consumer-group members, by queue.
    members: Mutex<HashMap<String, Arc<Member>>>,
    /// Per queue: a client of its group and one of its leased-marks group, for reading
    /// committed offsets (neither joins its group).
    readers: Mutex<HashMap<String, Arc<Readers>>>,
    /// Reads the DLQ topics for the drain, committing in `<group>.drain`.
    pub(crate) drainer: BaseConsumer,
    pub(crate) drain_lock: tokio::sync::Mutex<()>,
}

struct Readers {
    group: BaseConsumer,
    marks: Arc<BaseConsumer>,
    /// The same two for the isolation lane's member (groups `<group>.isolated` and
    /// `<group>.isolated.leased`).
    isolated_group: BaseConsumer,
    isolated_marks: Arc<BaseConsumer>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl KafkaConfig {
    /// Creates the clients and checks a broker answers.
    ///
    /// # Errors
    ///
    /// [`KafkaError::Unreachable`] naming the brokers.
    pub async fn connect(&self) -> Result<KafkaTransport, KafkaError> {
        let unreachable = |reason: String| KafkaError::Unreachable {
            address: self.shown(),
            reason,
        };
        let producer: FutureProducer = self
            .client_config(&[
                ("acks", "all"),
                ("linger.ms", "2"),
                // A broker that stays down fails a send within 15 s instead of 5 min.
                ("message.timeout.ms", "15000"),
            ])
            .create()
            .map_err(|e| unreachable(e.to_string()))?;
        let admin: AdminClient<DefaultClientContext> = self
            .client_config(&[])
            .create()
            .map_err(|e| unreachable(e.to_string()))?;
        let meta: BaseConsumer = self
            .client_config(&[("enable.auto.commit", "false")])
            .create()
            .map_err(|e| unreachable(e.to_string()))?;
        let drainer: BaseConsumer = self
            .client_config(&[
                ("group.id", &format!("{}.{}drain", self.group, self.prefix)),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                // A drain reads each partition to its end and stops there at once.
                ("enable.partition.eof", "true"),
                ("fetch.wait.max.ms", "10"),
            ])
            .create()
            .map_err(|e| unreachable(e.to_string()))?;
        let transport = KafkaTransport {
            inner: Arc::new(Inner {
                config: self.clone(),
                producer,
                admin,
                meta,
                topics: Mutex::default(),
                members: Mutex::default(),
                readers: Mutex::default(),
                drainer,
                drain_lock: tokio::sync::Mutex::new(()),
            }),
        };
        transport
            .blocking(|i| i.meta.fetch_metadata(None, Duration::from_secs(5)))
            .await?
            .map_err(|e| unreachable(format!("no broker answered within 5 s ({e})")))?;
        Ok(transport)
    }
}

impl KafkaTransport {
    /// Runs a blocking librdkafka call off the async threads.
    pub(crate) async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> R + Send + 'static,
    ) -> Result<R, KafkaError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(during("blocking Kafka call"))
    }

    pub(crate) fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    pub(crate) fn inner_drain_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.inner.drain_lock
    }

    fn topic(&self, queue: &QueueName, lane: &Lane) -> String {
        self.inner.config.topic(&queue.lane_name(lane))
    }

    /// Partition counts of every topic in the cluster.
    pub(crate) async fn topic_partitions(&self) -> Result<HashMap<String, i32>, KafkaError> {
        let md = self
            .blocking(|i| i.meta.fetch_metadata(None, CALL_TIMEOUT))
            .await?
            .map_err(during("read topic metadata"))?;
        Ok(md
            .topics()
            .iter()
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .map(|t| {
                (
                    t.name().to_owned(),
                    i32::try_from(t.partitions().len()).unwrap_or(i32::MAX),
                )
            })
            .collect())
    }

    /// Creates `names` with `topics=auto`: asks for their metadata as a producer, which
    /// a broker with `auto.create.topics.enable` answers by creating them with its
    /// default partition count. The isolation lane is written to its partition 0 only,
    /// so it keeps one line whatever the count.
    async fn auto_create(&self, names: Vec<String>) -> Result<(), KafkaError> {
        self.blocking(move |i| {
            for name in &names {
                i.producer
                    .client()
                    .fetch_metadata(Some(name), CALL_TIMEOUT)
                    .map_err(|e| KafkaError::call(format!("create topic {name}"), e))?;
            }
            Ok(())
        })
        .await?
    }

    /// Creates the lanes' topics that are missing, with the main topic's partition
    /// count, and checks the ones present.
    async fn ensure_topics(&self, queue: &QueueName, tiers: &[Tier]) -> Result<(), KafkaError> {
        let mut names = vec![self.topic(queue, &Lane::Main)];
        names.extend(
            tiers
                .iter()
                .map(|t| self.topic(queue, &Lane::Retry(t.name().to_owned()))),
        );
        names.push(self.topic(queue, &Lane::Dlq));
        // One partition: one member at a time runs the queue's crash suspects.
        let isolated = self.topic(queue, &Lane::Isolated);
        names.push(isolated.clone());
        if names
            .iter()
            .all(|n| lock(&self.inner.topics).contains_key(n))
        {
            return Ok(());
        }
        let mut present = self.topic_partitions().await?;
        let main = &names[0];
        let partitions = present
            .get(main)
            .copied()
            .unwrap_or(self.inner.config.partitions);
        let missing: Vec<&String> = names.iter().filter(|n| !present.contains_key(*n)).collect();
        for name in names
            .iter()
            .filter(|n| **n != isolated && present.get(*n).is_some_and(|p| *p != partitions))
        {
            tracing::warn!(topic = %name, partitions = present[name], main_partitions = partitions, "lane topic has a different partition count than {main}; retries still work, but keys spread differently");
        }
        if !missing.is_empty() {
            let new: Vec<NewTopic<'_>> = missing
                .iter()
                .map(|n| {
                    NewTopic::new(
                        n,
                        if **n == isolated { 1 } else { partitions },
                        TopicReplication::Fixed(self.inner.config.replication),
                    )
                })
                .collect();
            if self.inner.config.auto_topics {
                self.auto_create(missing.iter().map(|n| (*n).clone()).collect())
                    .await?;
            } else {
                let results = self
                    .inner
                    .admin
                    .create_topics(
                        new.iter(),
                        &AdminOptions::new().request_timeout(Some(CALL_TIMEOUT)),
                    )
                    .await
                    .map_err(during("create topics"))?;
                for r in results {
                    match r {
                        Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((topic, code)) => {
                            return Err(KafkaError::call(format!("create topic {topic}"), code));
                        }
                    }
                }
            }
            // Wait until the metadata shows them, so a consumer subscribing now sees them.
            for _ in 0..50 {
                present = self.topic_partitions().await?;
                if missing.iter().all(|n| present.contains_key(*n)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if self.inner.config.auto_topics
                && let Some(absent) = missing.iter().find(|n| !present.contains_key(**n))
            {
                return Err(KafkaError::call(
                    format!("create topic {absent}"),
                    "topics=auto, but the broker did not create it when asked for it; enable \
                     auto.create.topics.enable on the broker, or drop topics=auto",
                ));
            }
        }
        let mut known = lock(&self.inner.topics);
        for n in names {
            let p = present.get(&n).copied().unwrap_or(partitions);
            known.insert(n, p);
        }
        Ok(())
    }

    fn readers(&self, queue: &QueueName) -> Result<Arc<Readers>, KafkaError> {
        let mut readers = lock(&self.inner.readers);
        if let Some(r) = readers.get(queue.as_str()) {
            return Ok(Arc::clone(r));
        }
        let group = self.inner.config.group_of(queue.as_str());
        let client = |group: &str| -> Result<BaseConsumer, KafkaError> {
            self.inner
                .config
                .client_config(&[("group.id", group), ("enable.auto.commit", "false")])
                .create()
                .map_err(during("create a Kafka client"))
        };
        let r = Arc::new(Readers {
            group: client(&group)?,
            marks: Arc::new(client(&format!("{group}.leased"))?),
            isolated_group: client(&format!("{group}.isolated"))?,
            isolated_marks: Arc::new(client(&format!("{group}.isolated.leased"))?),
        });
        readers.insert(queue.as_str().to_owned(), Arc::clone(&r));
        Ok(r)
    }

    /// This process's member of the queue's consumer group, started on first use.
    async fn member(&self, lanes: &LaneSet) -> Result<Arc<Member>, KafkaError> {
        self.member_of(lanes, false).await
    }

    /// This process's member of the queue's consumer group (`isolated`: of its
    /// isolation lane's group, which reads only `QUEUE.isolated`), started on first use.
    async fn member_of(&self, lanes: &LaneSet, isolated: bool) -> Result<Arc<Member>, KafkaError> {
        let key = if isolated {
            format!("{}\0isolated", lanes.queue)
        } else {
            lanes.queue.to_string()
        };
        if let Some(m) = lock(&self.inner.members).get(&key) {
            return Ok(Arc::clone(m));
        }
        self.ensure_topics(&lanes.queue, &lanes.tiers).await?;
        let mut members = lock(&self.inner.members);
        if let Some(m) = members.get(&key) {
            return Ok(Arc::clone(m));
        }
        let mut topics = Vec::new();
        if isolated {
            topics.push(LaneTopic {
                topic: self.topic(&lanes.queue, &Lane::Isolated).into(),
                lane: Lane::Isolated,
                delay_ms: 0,
            });
        } else {
            topics.push(LaneTopic {
                topic: self.topic(&lanes.queue, &Lane::Main).into(),
                lane: Lane::Main,
                delay_ms: 0,
            });
            for t in &lanes.tiers {
                let lane = Lane::Retry(t.name().to_owned());
                topics.push(LaneTopic {
                    topic: self.topic(&lanes.queue, &lane).into(),
                    lane,
                    delay_ms: i64::try_from(t.delay().as_millis()).unwrap_or(i64::MAX / 4),
                });
            }
        }
        let readers = self.readers(&lanes.queue)?;
        let (marks, cover_ahead) = if isolated {
            // A leased record of the isolation lane must be one that runs: a crash then
            // counts against it alone.
            (Arc::clone(&readers.isolated_marks), 0)
        } else {
            (Arc::clone(&readers.marks), COVER_AHEAD)
        };
        let shared = Arc::new(Shared::new(
            lanes.queue.clone(),
            topics,
            marks,
            self.inner.config.ordered && !isolated,
            cover_ahead,
        ));
        let mut group = self.inner.config.group_of(lanes.queue.as_str());
        if isolated {
            group.push_str(".isolated");
        }
        let mut settings = vec![
            ("group.id", group.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            // A member that dies is noticed within 6 s (the broker's usual minimum).
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "1000"),
            ("max.poll.interval.ms", "600000"),
        ];
        settings.extend_from_slice(FETCH_SETTINGS);
        let consumer: BaseConsumer<Ctx> = self
            .inner
            .config
            .client_config(&settings)
            .create_with_context(Ctx { shared })
            .map_err(during("create the consumer"))?;
        let member = Arc::new(Member::start(consumer).map_err(during("subscribe"))?);
        members.insert(key, Arc::clone(&member));
        Ok(member)
    }

    /// Queues a record for `topic`; the returned future resolves once the broker has it.
    fn send(
        &self,
        topic: &str,
        env: &Envelope,
        extra: &[(&str, String)],
    ) -> Result<DeliveryFuture, (rdkafka::error::KafkaError, bool)> {
        let mut record = FutureRecord::to(topic)
            .payload(&env.payload[..])
            .headers(encode(env, extra));
        if let Some(k) = &env.key {
            record = record.key(k.as_bytes());
        }
        if topic.ends_with(ISOLATED_SUFFIX) {
            // One line for the queue's suspects, even on a topic made with more
            // partitions than the one asked for (see `auto_create`).
            record = record.partition(0);
        }
        self.inner.producer.send_result(record).map_err(|(e, _)| {
            let full =
                e == rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull);
            (e, full)
        })
    }

    async fn confirm(topic: &str, f: DeliveryFuture) -> Result<(), KafkaError> {
        match f.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(KafkaError::call(format!("produce to {topic}"), e)),
            Err(_) => Err(KafkaError::call(
                format!("produce to {topic}"),
                "the producer was closed",
            )),
        }
    }

    /// Produces one record and waits until the broker has it.
    async fn produce(
        &self,
        topic: &str,
        env: &Envelope,
        extra: &[(&str, String)],
    ) -> Result<(), KafkaError> {
        loop {
            match self.send(topic, env, extra) {
                Ok(f) => return Self::confirm(topic, f).await,
                Err((_, true)) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err((e, false)) => return Err(KafkaError::call(format!("produce to {topic}"), e)),
            }
        }
    }

    /// Dead-letters a record whose redrive headers do not parse, without a handler.
    async fn quarantine(
        &self,
        queue: &QueueName,
        (tp, offset, lane): (&Tp, i64, &Lane),
        why: &str,
        mut raw: Envelope,
    ) -> Result<(), TransportError> {
        raw.record_failure(
            Failure::new(
                FailureKind::Poison,
                "MalformedEnvelope",
                format!("record {}[{}]@{offset}: {why}", tp.topic, tp.partition),
                now_ms(),
            ),
            &lane.label(),
        );
        let dlq = self.topic(queue, &Lane::Dlq);
        tracing::warn!(topic = %tp.topic, partition = tp.partition, offset, reason = %why, "record with malformed redrive headers: moved to {dlq}");
        self.produce(&dlq, &raw, &[("redrive-dead-at", now_ms().to_string())])
            .await?;
        Ok(())
    }

    /// Writes leased marks (one write at a time, skipping what is already written).
    async fn write_marks(&self, shared: &Arc<Shared>, marks: Vec<Mark>) -> Result<(), KafkaError> {
        // Marks another write covered already need no trip to a blocking thread.
        let marks = shared.still_to_raise(marks);
        if marks.is_empty() {
            return Ok(());
        }
        let shared = Arc::clone(shared);
        let started = std::time::Instant::now();
        let written = self
            .blocking(move |_| -> rdkafka::error::KafkaResult<usize> {
                // Checked again and written under the lock a hand-back lowers marks
                // under, in this thread, so a cancelled fetch cannot leave a write
                // running outside it.
                let _one_at_a_time = shared
                    .mark_writes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let list = shared.still_to_raise(marks);
                if list.is_empty() {
                    return Ok(0);
                }
                let mut tpl = TopicPartitionList::new();
                for m in &list {
                    let _ = tpl.add_partition_offset(
                        &m.tp.topic,
                        m.tp.partition,
                        Offset::Offset(m.offset),
                    );
                }
                shared.marks.commit(&tpl, CommitMode::Sync)?;
                shared.raised(&list);
                Ok(list.len())
            })
            .await
            .and_then(|r| r.map_err(during("record leases")))?;
        if written > 0 {
            tracing::trace!(
                ms = started.elapsed().as_millis() as u64,
                partitions = written,
                "leases recorded"
            );
        }
        Ok(())
    }

    /// Puts `d`'s record back into its member's buffer as `envelope` on `lane`, handed
    /// out again at `due_ms` (see `Shared::untake`).
    fn put_back(
        d: &Delivery<Token>,
        lane: Lane,
        due_ms: i64,
        unfinished: bool,
        envelope: Envelope,
    ) -> Result<(), TransportError> {
        let t = &d.token;
        let again = Polled {
            tp: t.tp.clone(),
            offset: t.offset,
            epoch: t.epoch,
            lane,
            due_ms,
            unfinished,
            envelope: Ok(envelope),
        };
        if t.shared.untake(vec![again]) == 1 {
            Ok(())
        } else {
            Err(TransportError::LeaseLost {
                id: d.envelope.id.to_string(),
            })
        }
    }

    fn settle(d: &Delivery<Token>, slot: Slot) -> Result<(), TransportError> {
        let t = &d.token;
        if t.shared.settle(&t.tp, t.offset, t.epoch, slot) {
            Ok(())
        } else {
            Err(TransportError::LeaseLost {
                id: d.envelope.id.to_string(),
            })
        }
    }
}

impl Transport for KafkaTransport {
    type Token = Token;

    async fn publish(&self, queue: &QueueName, batch: Vec<Envelope>) -> Result<(), TransportError> {
        self.ensure_topics(queue, &[]).await?;
        let topic = self.topic(queue, &Lane::Main);
        let mut waiting = std::collections::VecDeque::with_capacity(batch.len());
        for mut env in batch {
            env.queue = queue.clone();
            loop {
                match self.send(&topic, &env, &[]) {
                    Ok(f) => {
                        waiting.push_back(f);
                        break;
                    }
                    // The producer's queue is full: wait for the oldest to be confirmed.
                    Err((_, true)) => match waiting.pop_front() {
                        Some(f) => Self::confirm(&topic, f).await?,
                        None => tokio::time::sleep(Duration::from_millis(5)).await,
                    },
                    Err((e, false)) => {
                        return Err(KafkaError::call(format!("produce to {topic}"), e).into());
                    }
                }
            }
        }
        // Published only once the broker has every record.
        for f in waiting {
            Self::confirm(&topic, f).await?;
        }
        Ok(())
    }

    async fn create_lanes(&self, lanes: &LaneSet) -> Result<(), TransportError> {
        self.ensure_topics(&lanes.queue, &lanes.tiers).await?;
        Ok(())
    }

    async fn fetch(
        &self,
        lanes: &LaneSet,
        max: usize,
        _lease: Duration,
    ) -> Result<Fetched<Token>, TransportError> {
        let member = self.member(lanes).await?;
        // Wait up to 250 ms for records. A wake-up can find nothing (the poll thread
        // signals every record, and one signal is kept while no fetch waits): wait again
        // rather than come back empty, which would idle the runner for its poll interval.
        self.fetch_from(&member, max, Duration::from_millis(250))
            .await
    }

    async fn ack(&self, d: &Delivery<Token>) -> Result<(), TransportError> {
        Self::settle(d, Slot::Settled)
    }

    async fn retry(
        &self,
        d: &Delivery<Token>,
        tier: &Tier,
        due_ms: i64,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        let mut env = envelope.clone();
        env.not_before_ms = Some(due_ms);
        let lane = Lane::Retry(tier.name().to_owned());
        let t = &d.token;
        if t.shared.ordered {
            // In place, at the front of its partition's line, handed out again at its
            // due time: the partition waits for it (its offset stays uncommitted).
            return Self::put_back(d, lane, due_ms, false, env);
        }
        let topic = self.topic(&d.token.shared.queue, &lane);
        self.produce(&topic, &env, &[]).await?;
        redrive_core::failpoint("next-lane-written");
        // Only now may the source offset be committed past.
        Self::settle(d, Slot::Settled)
    }

    async fn dead_letter(
        &self,
        d: &Delivery<Token>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        let topic = self.topic(&d.token.shared.queue, &Lane::Dlq);
        self.produce(
            &topic,
            envelope,
            &[("redrive-dead-at", now_ms().to_string())],
        )
        .await?;
        redrive_core::failpoint("next-lane-written");
        Self::settle(d, Slot::Settled)
    }

    async fn release(&self, d: &Delivery<Token>) -> Result<(), TransportError> {
        Self::put_back(
            d,
            d.lane.clone(),
            d.due_ms,
            d.unfinished_before,
            d.envelope.clone(),
        )
    }

    async fn extend_lease(
        &self,
        _d: &Delivery<Token>,
        _lease: Duration,
    ) -> Result<(), TransportError> {
        // The group membership is the lease: the poll thread keeps it alive.
        Ok(())
    }

    async fn isolate(
        &self,
        d: &Delivery<Token>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        let topic = self.topic(&d.token.shared.queue, &Lane::Isolated);
        self.produce(&topic, envelope, &[]).await?;
        redrive_core::failpoint("next-lane-written");
        Self::settle(d, Slot::Settled)
    }

    async fn fetch_isolated(
        &self,
        lanes: &LaneSet,
        _lease: Duration,
    ) -> Result<Fetched<Token>, TransportError> {
        let member = self.member_of(lanes, true).await?;
        // The record run before must be committed past, or a crash now would count it
        // too (it lies below the leased mark). The poll thread commits this lane
        // synchronously every COMMIT_EVERY.
        let deadline = std::time::Instant::now() + COMMIT_EVERY * 5;
        while !member.shared.all_committed() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !member.shared.all_committed() {
            return Ok(Fetched {
                deliveries: Vec::new(),
                next_due_ms: Some(now_ms() + 100),
            });
        }
        // The process waits for this fetch with nothing running: a short look only.
        self.fetch_from(&member, 1, Duration::from_millis(20)).await
    }

    async fn isolated_due(&self, lanes: &LaneSet) -> Result<Option<i64>, TransportError> {
        // The lane has one partition: the member that owns it polls whatever is there
        // into its buffer; another process's member sees nothing (the owner runs them).
        let member = self.member_of(lanes, true).await?;
        Ok(member.shared.has_ready().then(now_ms))
    }

    fn isolates(&self) -> bool {
        // Strict per-key order: a record may not leave its partition's line.
        !self.inner.config.ordered
    }

    fn max_fetch(&self) -> usize {
        // Each fetch that hands out records beyond the leased mark waits for one commit:
        // the more it takes, the fewer it waits for. 256 capped the bench near 140k
        // msgs/s (a fetch every ~1.8 ms, most of it the write); 1024, with the poll
        // thread buffering up to 4096, ran at 196-215k (BENCHMARKS.md, Kafka).
        1024
    }
}

impl KafkaTransport {
    /// Takes up to `max` records from `member`'s buffer, waiting up to `wait` for
    /// some, and records their leases before handing them out.
    async fn fetch_from(
        &self,
        member: &Member,
        max: usize,
        wait: Duration,
    ) -> Result<Fetched<Token>, TransportError> {
        let shared = &member.shared;
        let deadline = std::time::Instant::now() + wait;
        let taken = loop {
            let taken = shared.take(max);
            if !taken.is_empty() {
                break taken;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let next_due_ms = shared.next_due_ms();
            if left.is_zero() {
                return Ok(Fetched {
                    deliveries: Vec::new(),
                    next_due_ms,
                });
            }
            // A record retried in place is handed out at its due time: look again then.
            let until_due = next_due_ms.map_or(left, |due| {
                Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0).max(1))
            });
            let _ = tokio::time::timeout(left.min(until_due), shared.signal.notified()).await;
        };
        // The leases are durable before anything is handed out. Each write also covers
        // up to COVER_AHEAD buffered records, so the next fetch usually finds its
        // records covered already: it hands them out at once and raises the marks for
        // the records behind them in the background, so no fetch waits for a write
        // while the runner keeps up.
        let (covered, raise) = shared.marks_for(&taken);
        if covered {
            if !raise.is_empty() && !shared.raising_ahead.swap(true, AtomicOrdering::AcqRel) {
                let (me, shared) = (self.clone(), Arc::clone(shared));
                tokio::spawn(async move {
                    if let Err(e) = me.write_marks(&shared, raise).await {
                        tracing::warn!(queue = %shared.queue, error = %e, "could not record leases ahead; the next fetch records its own");
                    }
                    shared.raising_ahead.store(false, AtomicOrdering::Release);
                });
            }
        } else if let Err(e) = self.write_marks(shared, raise).await {
            shared.untake(taken);
            return Err(e.into());
        }
        let mut deliveries = Vec::with_capacity(taken.len());
        let mut taken = taken.into_iter();
        while let Some(p) = taken.next() {
            let p = match p {
                Polled {
                    tp,
                    offset,
                    epoch,
                    lane,
                    due_ms,
                    unfinished,
                    envelope: Ok(envelope),
                } => {
                    deliveries.push(Delivery {
                        envelope,
                        lane,
                        due_ms,
                        unfinished_before: unfinished,
                        token: Token {
                            shared: Arc::clone(shared),
                            tp,
                            offset,
                            epoch,
                        },
                    });
                    continue;
                }
                malformed => malformed,
            };
            // Only a record whose redrive headers do not parse gets here.
            let Err(bad) = &p.envelope else {
                continue;
            };
            let (why, raw) = &**bad;
            let at = (&p.tp, p.offset, &p.lane);
            match self.quarantine(&shared.queue, at, why, raw.clone()).await {
                Ok(()) => {
                    shared.settle(&p.tp, p.offset, p.epoch, Slot::Settled);
                }
                Err(e) => {
                    // Everything not handed out yet goes back, this record first.
                    shared.untake(std::iter::once(p).chain(taken).collect());
                    if deliveries.is_empty() {
                        return Err(e);
                    }
                    tracing::warn!(queue = %shared.queue, error = %e, "could not quarantine a malformed record; it is tried again on the next fetch");
                    break;
                }
            }
        }
        Ok(Fetched {
            deliveries,
            next_due_ms: None,
        })
    }
}

impl KafkaTransport {
    /// Queues in the cluster: topics `Q` that have a `Q.dlq` beside them.
    pub(crate) async fn queue_names(&self) -> Result<Vec<String>, KafkaError> {
        Ok(self.queues_in(&self.topic_partitions().await?))
    }

    /// The queues among `topics` (as [`KafkaTransport::topic_partitions`] returns them).
    pub(crate) fn queues_in(&self, topics: &HashMap<String, i32>) -> Vec<String> {
        let prefix = &self.inner.config.prefix;
        let mut out: Vec<String> = topics
            .keys()
            .filter_map(|t| t.strip_prefix(prefix.as_str()))
            .filter_map(|t| t.strip_suffix(".dlq"))
            .filter(|q| topics.contains_key(&format!("{prefix}{q}")))
            .map(str::to_owned)
            .collect();
        out.sort();
        out
    }

    /// Depths from offsets, as any process sees them: per partition, records between
    /// the committed offset and the leased mark are in flight, the rest up to the end
    /// are waiting (in a retry topic, due or not). A process with a member of the group
    /// adds what it has polled and not settled.
    async fn kafka_depths(&self, queue: &str) -> Result<QueueDepths, KafkaError> {
        let name = QueueName::new(queue).map_err(during("queue name"))?;
        let topics = self.topic_partitions().await?;
        let main = self.topic(&name, &Lane::Main);
        let isolated = self.topic(&name, &Lane::Isolated);
        let retry_prefix = format!("{main}.retry.");
        let mut lanes: Vec<(String, Lane, i32)> = Vec::new();
        for (t, p) in &topics {
            if *t == main {
                lanes.push((t.clone(), Lane::Main, *p));
            } else if *t == isolated {
                lanes.push((t.clone(), Lane::Isolated, *p));
            } else if let Some(tier) = t.strip_prefix(&retry_prefix) {
                lanes.push((t.clone(), Lane::Retry(tier.to_owned()), *p));
            }
        }
        let readers = self.readers(&name)?;
        let (mut local_next, mut local_unsettled) = (HashMap::new(), 0);
        for key in [queue.to_owned(), format!("{queue}\0isolated")] {
            if let Some(m) = lock(&self.inner.members).get(&key).cloned() {
                let (next, unsettled) = m.shared.local_view();
                local_next.extend(next);
                local_unsettled += unsettled;
            }
        }
        let counts = self
            .blocking(move |inner| -> Result<Vec<(Lane, i64, i64)>, KafkaError> {
                // The isolation lane's offsets live in its own member's groups.
                let (mut tpl, mut isolated_tpl) =
                    (TopicPartitionList::new(), TopicPartitionList::new());
                for (t, lane, n) in &lanes {
                    for p in 0..*n {
                        if *lane == Lane::Isolated {
                            isolated_tpl.add_partition(t, p);
                        } else {
                            tpl.add_partition(t, p);
                        }
                    }
                }
                let offsets = |group: &BaseConsumer, list: &TopicPartitionList, what| {
                    if list.count() == 0 {
                        return Ok(TopicPartitionList::new());
                    }
                    group
                        .committed_offsets(list.clone(), CALL_TIMEOUT)
                        .map_err(during(what))
                };
                let committed = offsets(&readers.group, &tpl, "read committed offsets")?;
                let marks = offsets(&readers.marks, &tpl, "read leased marks")?;
                let isolated_committed =
                    offsets(&readers.isolated_group, &isolated_tpl, "read committed offsets")?;
                let isolated_marks =
                    offsets(&readers.isolated_marks, &isolated_tpl, "read leased marks")?;
                let at = |list: &TopicPartitionList, t: &str, p: i32| match list
                    .find_partition(t, p)
                    .map(|e| e.offset())
                {
                    Some(Offset::Offset(n)) => n,
                    _ => -1,
                };
                let mut out = Vec::new();
                for (t, lane, n) in &lanes {
                    let (committed, marks) = if *lane == Lane::Isolated {
                        (&isolated_committed, &isolated_marks)
                    } else {
                        (&committed, &marks)
                    };
                    let (mut leased, mut waiting) = (0, 0);
                    for p in 0..*n {
                        let (low, high) = inner
                            .meta
                            .fetch_watermarks(t, p, CALL_TIMEOUT)
                            .map_err(during("read watermarks"))?;
                        // What this process has polled is there, whatever the broker's
                        // (possibly lagging) end-offset answer says.
                        let high = high.max(local_next.get(&(t.clone(), p)).copied().unwrap_or(-1));
                        let c = at(committed, t, p).max(low);
                        let m = at(marks, t, p).clamp(c, high.max(c));
                        tracing::trace!(topic = %t, partition = p, committed = c, leased_to = m, end = high, "lane partition");
                        leased += m - c;
                        waiting += (high - m).max(0);
                    }
                    out.push((lane.clone(), leased, waiting));
                }
                Ok(out)
            })
            .await??;
        let mut d = QueueDepths {
            queue: queue.to_owned(),
            ..QueueDepths::default()
        };
        for (lane, leased, waiting) in counts {
            d.inflight += u64::try_from(leased).unwrap_or(0);
            let waiting = u64::try_from(waiting).unwrap_or(0);
            match lane {
                Lane::Retry(t) => d.retry.push((t, waiting)),
                Lane::Isolated => d.isolated += waiting,
                Lane::Main | Lane::Dlq => d.main += waiting,
            }
        }
        d.inflight = d.inflight.max(local_unsettled);
        d.retry
            .sort_by_key(|(t, _)| redrive_core::parse_duration(t).unwrap_or(Duration::MAX));
        Ok(d)
    }
}

impl LaneStats for KafkaTransport {
    async fn depths(&self) -> Result<Vec<QueueDepths>, TransportError> {
        let mut out = Vec::new();
        for q in self.queue_names().await? {
            out.push(self.kafka_depths(&q).await?);
        }
        Ok(out)
    }

    async fn queue_depths(&self, lanes: &LaneSet) -> Result<QueueDepths, TransportError> {
        self.ensure_topics(&lanes.queue, &lanes.tiers).await?;
        let started = std::time::Instant::now();
        let d = self.kafka_depths(lanes.queue.as_str()).await?;
        tracing::trace!(
            ms = started.elapsed().as_millis() as u64,
            "lane depths read"
        );
        Ok(d)
    }
}
