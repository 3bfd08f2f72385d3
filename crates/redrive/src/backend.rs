//! Opening the backend that `--store` and `--broker` name, with errors that say what to
//! fix, and one enum over the backends for commands that are not generic.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use redrive_core::{
    AuditEntry, Cursor, DeadFilter, DeadGroup, DeadLetter, DeadLetterStore, DeadSelection,
    DeadStats, Delivery, Envelope, Fetched, JobItem, JobState, JobView, LaneSet, LaneStats,
    MessageId, QueueDepths, QueueName, ReplayJob, ReplayJobs, ReplayOutcome, StoreError, Tier,
    Transport, TransportError,
};
use redrive_core::{BreakerBoard, OpenBreaker};
use redrive_kafka::{KafkaBackend, KafkaConfig};
use redrive_nats::{NatsBackend, NatsConfig};
use redrive_postgres::{Postgres, PostgresConfig};
use redrive_redis::{RedisBackend, RedisConfig};
use redrive_sqlite::{Sqlite, SqliteConfig};

use crate::store::AnyStore;
use redrive_sqs::{SqsBackend, SqsConfig};

use crate::cli::Cli;

/// What `--broker` names, parsed once by its backend's own URL parser.
#[allow(clippy::large_enum_variant)] // Parsed once per process.
pub enum Broker {
    /// `redis://` or `rediss://`.
    Redis(RedisConfig),
    /// `nats://`.
    Nats(NatsConfig),
    /// `kafka://`.
    Kafka(KafkaConfig),
    /// `sqs://`.
    Sqs(SqsConfig),
    /// `postgres://` or `postgresql://`: lanes and dead letters in one database.
    Postgres(PostgresConfig),
}

impl Broker {
    /// Parses a broker URL: the scheme picks the backend, whose parser checks the rest.
    ///
    /// # Errors
    ///
    /// An unknown scheme (the message lists the supported ones), or the backend's own
    /// error for the rest of the URL.
    pub fn parse(url: &str) -> Result<Self> {
        let scheme = url.split("://").next().unwrap_or(url);
        Ok(match scheme {
            "redis" | "rediss" => Self::Redis(RedisConfig::new(url)?),
            "nats" => Self::Nats(NatsConfig::new(url)?),
            "kafka" => Self::Kafka(KafkaConfig::new(url)?),
            "sqs" => Self::Sqs(SqsConfig::new(url)?),
            "postgres" | "postgresql" => Self::Postgres(PostgresConfig::new(url)?),
            _ => bail!(
                "unsupported broker {scheme:?}: this build supports redis://HOST:PORT, \
                 nats://HOST:PORT, kafka://HOST:PORT[,HOST:PORT…], sqs://REGION and \
                 postgres://USER@HOST/DATABASE"
            ),
        })
    }
}

/// Opens the SQLite store. Commands that only read pass `create = false`, so a mistyped
/// path is an error instead of a new, empty store.
pub fn open(url: &str, create: bool) -> Result<Sqlite> {
    if !url.starts_with("sqlite:") {
        let scheme = url.split("://").next().unwrap_or(url);
        bail!(
            "unsupported store {scheme:?} in --store {:?}: use sqlite://PATH (e.g. \
             sqlite://redrive.db) or postgres://USER@HOST/DATABASE; brokers go in --broker",
            without_secrets(url)
        );
    }
    let config = SqliteConfig::from_url(url)?;
    check_path(&config.path, create)?;
    config
        .open()
        .with_context(|| format!("opening --store {url}"))
}

/// A URL as it may be shown: a password in it (`scheme://user:password@host`) and the
/// query (where options such as `sasl.password=` or `token=` live) are masked.
pub fn without_secrets(url: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut shown = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest
                .split_once('/')
                .map_or((rest, None), |(a, p)| (a, Some(p)));
            let authority = match authority.rsplit_once('@') {
                Some((user, host)) => {
                    let user = user.split_once(':').map_or(user, |(name, _)| name);
                    format!("{user}:***@{host}")
                }
                None => authority.to_owned(),
            };
            match path {
                Some(p) => format!("{scheme}://{authority}/{p}"),
                None => format!("{scheme}://{authority}"),
            }
        }
        None => base.to_owned(),
    };
    if !query.is_empty() {
        shown.push_str("?…");
    }
    shown
}

fn check_path(path: &Path, create: bool) -> Result<()> {
    if path.is_dir() {
        bail!(
            "--store points at {}, which is a directory; name a file, e.g. sqlite://{}/redrive.db",
            path.display(),
            path.display()
        );
    }
    if !create && !path.exists() {
        bail!(
            "no store at {}: nothing has been published there yet. Check --store / REDRIVE_STORE, \
             or publish first",
            path.display()
        );
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        bail!(
            "cannot create the store {}: directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    Ok(())
}

/// The backend a command runs on: lanes in SQLite, or in a broker with SQLite as the
/// dead-letter store of record.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // One per process, cloned rarely: boxing buys nothing.
pub enum AnyBackend {
    /// Everything in one SQLite file.
    Sqlite(Sqlite),
    /// Redis lanes; dead letters in SQLite or PostgreSQL.
    Redis(RedisBackend<AnyStore>),
    /// NATS JetStream lanes; dead letters in SQLite or PostgreSQL.
    Nats(NatsBackend<AnyStore>),
    /// Kafka topics; dead letters in SQLite or PostgreSQL.
    Kafka(KafkaBackend<AnyStore>),
    /// SQS queues; dead letters in SQLite or PostgreSQL.
    Sqs(SqsBackend<AnyStore>),
    /// Everything in one PostgreSQL schema.
    Postgres(Postgres),
}

impl AnyBackend {
    /// The dead-letter store of record (alert state, retention, audit).
    pub fn store(&self) -> AnyStore {
        match self {
            Self::Sqlite(s) => AnyStore::Sqlite(s.clone()),
            Self::Redis(r) => r.store().clone(),
            Self::Nats(n) => n.store().clone(),
            Self::Kafka(k) => k.store().clone(),
            Self::Sqs(q) => q.store().clone(),
            Self::Postgres(p) => AnyStore::Postgres(p.clone()),
        }
    }

    /// Moves a broker's waiting dead messages into the store; returns how many.
    pub async fn drain(&self) -> Result<u64, StoreError> {
        match self {
            Self::Sqlite(_) | Self::Postgres(_) => Ok(0),
            Self::Redis(r) => r.drain().await,
            Self::Nats(n) => n.drain().await,
            Self::Kafka(k) => k.drain().await,
            Self::Sqs(q) => q.drain().await,
        }
    }
}

/// The retry policy `queue` is configured with in the config file, else the default
/// tiers (`5s,30s,5m`).
pub fn configured_policy(cli: &Cli, queue: &QueueName) -> redrive_core::RetryPolicy {
    cli.loaded
        .queues
        .get(queue.as_str())
        .and_then(|q| q.tiers.clone())
        .unwrap_or_default()
}

/// Creates the lanes of every queue of the config file (`consume` and `serve` do at
/// start), so producers can publish to them before a consumer of each ran.
///
/// # Errors
///
/// A queue name that does not parse, or a backend that refuses.
pub async fn create_configured_lanes(cli: &Cli, store: &AnyBackend) -> Result<()> {
    for name in cli.loaded.queues.keys() {
        let queue = QueueName::new(name.as_str())?;
        let lanes = LaneSet {
            tiers: configured_policy(cli, &queue).tiers().to_vec(),
            queue,
        };
        store
            .create_lanes(&lanes)
            .await
            .with_context(|| format!("creating the lanes of {}", lanes.queue))?;
    }
    Ok(())
}

/// Opens what `--store` and `--broker` say. With a broker, the store is the dead-letter
/// store of record and is created when missing.
///
/// # Errors
///
/// A URL that does not parse, or a backend that cannot be reached.
pub async fn open_any(cli: &Cli, create: bool) -> Result<AnyBackend> {
    open_urls(
        cli.store_url(),
        cli.broker_url(),
        cli.sqs_endpoint.as_deref(),
        create,
    )
    .await
}

/// Opens the backend of a store URL and an optional broker URL (what `open_any` reads
/// from the command line).
///
/// # Errors
///
/// A URL that does not parse, or a backend that cannot be reached.
pub async fn open_urls(
    store_url: &str,
    broker_url: Option<&str>,
    sqs_endpoint: Option<&str>,
    create: bool,
) -> Result<AnyBackend> {
    let Some(url) = broker_url else {
        return Ok(match crate::store::open(store_url, create).await? {
            AnyStore::Sqlite(s) => AnyBackend::Sqlite(s),
            // PostgreSQL holds lanes as well as dead letters, as SQLite does.
            AnyStore::Postgres(p) => AnyBackend::Postgres(p),
        });
    };
    // With a broker, the store is the dead-letter store of record: created when missing,
    // and opened first, so that a bad --store is reported before the broker is tried.
    let store = || crate::store::open(store_url, true);
    Ok(match Broker::parse(url)? {
        Broker::Redis(config) => {
            let store = store().await?;
            let transport = config.connect().await.context("--broker")?;
            AnyBackend::Redis(RedisBackend::new(transport, store))
        }
        Broker::Nats(config) => {
            let store = store().await?;
            let transport = config.connect().await.context("--broker")?;
            AnyBackend::Nats(NatsBackend::new(transport, store))
        }
        Broker::Kafka(config) => {
            let store = store().await?;
            let transport = config.connect().await.context("--broker")?;
            AnyBackend::Kafka(KafkaBackend::new(transport, store))
        }
        Broker::Sqs(mut config) => {
            if let Some(endpoint) = sqs_endpoint {
                config.set_endpoint(endpoint).context("--sqs-endpoint")?;
            }
            let store = store().await?;
            let transport = config.connect().await.context("--broker")?;
            AnyBackend::Sqs(SqsBackend::new(transport, store))
        }
        Broker::Postgres(config) => {
            // The lanes' database is the store of record too (a move to the DLQ is one
            // transaction): another store beside it would split the dead letters.
            let same = store_url == crate::cli::DEFAULT_STORE
                || PostgresConfig::new(store_url).is_ok_and(|s| s.display() == config.display());
            if !same {
                bail!(
                    "--broker {} keeps the dead letters in the same database: drop --store {} \
                     (or give the same URL)",
                    config.display(),
                    without_secrets(store_url)
                );
            }
            let lanes = config
                .open()
                .await
                .with_context(|| format!("opening --broker {}", config.display()))?;
            AnyBackend::Postgres(lanes)
        }
    })
}

/// A delivery of any backend.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // Moved once per delivery; a box would allocate as much.
pub enum AnyToken {
    /// SQLite.
    Sqlite(redrive_sqlite::Token),
    /// Redis.
    Redis(redrive_redis::Token),
    /// NATS.
    Nats(redrive_nats::Token),
    /// Kafka.
    Kafka(redrive_kafka::Token),
    /// SQS.
    Sqs(redrive_sqs::Token),
    /// PostgreSQL.
    Postgres(redrive_postgres::Token),
}

fn with_token<T>(d: &Delivery<AnyToken>, token: T) -> Delivery<T> {
    Delivery {
        envelope: d.envelope.clone(),
        lane: d.lane.clone(),
        due_ms: d.due_ms,
        unfinished_before: d.unfinished_before,
        token,
    }
}

fn mismatch() -> TransportError {
    TransportError::Backend {
        context: "backend".into(),
        source: "a delivery was settled on another backend than it came from".into(),
    }
}

macro_rules! settle {
    ($self:expr, $d:expr, |$b:ident, $x:ident| $call:expr) => {
        match ($self, &$d.token) {
            (AnyBackend::Sqlite($b), AnyToken::Sqlite(t)) => {
                let $x = with_token($d, *t);
                $call
            }
            (AnyBackend::Redis($b), AnyToken::Redis(t)) => {
                let $x = with_token($d, t.clone());
                $call
            }
            (AnyBackend::Nats($b), AnyToken::Nats(t)) => {
                let $x = with_token($d, t.clone());
                $call
            }
            (AnyBackend::Kafka($b), AnyToken::Kafka(t)) => {
                let $x = with_token($d, t.clone());
                $call
            }
            (AnyBackend::Sqs($b), AnyToken::Sqs(t)) => {
                let $x = with_token($d, t.clone());
                $call
            }
            (AnyBackend::Postgres($b), AnyToken::Postgres(t)) => {
                let $x = with_token($d, *t);
                $call
            }
            _ => Err(mismatch()),
        }
    };
}

macro_rules! each_backend {
    ($self:expr, |$b:ident| $call:expr) => {
        match $self {
            AnyBackend::Sqlite($b) => $call,
            AnyBackend::Redis($b) => $call,
            AnyBackend::Nats($b) => $call,
            AnyBackend::Kafka($b) => $call,
            AnyBackend::Sqs($b) => $call,
            AnyBackend::Postgres($b) => $call,
        }
    };
}

/// A backend's fetch result, its tokens wrapped.
fn wrap<T>(f: Fetched<T>, w: impl Fn(T) -> AnyToken) -> Fetched<AnyToken> {
    Fetched {
        next_due_ms: f.next_due_ms,
        deliveries: f
            .deliveries
            .into_iter()
            .map(|d| Delivery {
                envelope: d.envelope,
                lane: d.lane,
                due_ms: d.due_ms,
                unfinished_before: d.unfinished_before,
                token: w(d.token),
            })
            .collect(),
    }
}

impl Transport for AnyBackend {
    type Token = AnyToken;

    async fn publish(&self, queue: &QueueName, batch: Vec<Envelope>) -> Result<(), TransportError> {
        each_backend!(self, |b| b.publish(queue, batch).await)
    }
    async fn create_lanes(&self, lanes: &LaneSet) -> Result<(), TransportError> {
        each_backend!(self, |b| b.create_lanes(lanes).await)
    }
    async fn fetch(
        &self,
        lanes: &LaneSet,
        max: usize,
        lease: Duration,
    ) -> Result<Fetched<AnyToken>, TransportError> {
        match self {
            Self::Sqlite(s) => Ok(wrap(s.fetch(lanes, max, lease).await?, AnyToken::Sqlite)),
            Self::Redis(r) => Ok(wrap(r.fetch(lanes, max, lease).await?, AnyToken::Redis)),
            Self::Nats(n) => Ok(wrap(n.fetch(lanes, max, lease).await?, AnyToken::Nats)),
            Self::Kafka(k) => Ok(wrap(k.fetch(lanes, max, lease).await?, AnyToken::Kafka)),
            Self::Sqs(q) => Ok(wrap(q.fetch(lanes, max, lease).await?, AnyToken::Sqs)),
            Self::Postgres(p) => Ok(wrap(p.fetch(lanes, max, lease).await?, AnyToken::Postgres)),
        }
    }
    async fn ack(&self, d: &Delivery<AnyToken>) -> Result<(), TransportError> {
        settle!(self, d, |b, x| b.ack(&x).await)
    }
    async fn retry(
        &self,
        d: &Delivery<AnyToken>,
        tier: &Tier,
        due_ms: i64,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        settle!(self, d, |b, x| b.retry(&x, tier, due_ms, envelope).await)
    }
    async fn dead_letter(
        &self,
        d: &Delivery<AnyToken>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        settle!(self, d, |b, x| b.dead_letter(&x, envelope).await)
    }
    async fn release(&self, d: &Delivery<AnyToken>) -> Result<(), TransportError> {
        settle!(self, d, |b, x| b.release(&x).await)
    }
    async fn extend_lease(
        &self,
        d: &Delivery<AnyToken>,
        lease: Duration,
    ) -> Result<(), TransportError> {
        settle!(self, d, |b, x| b.extend_lease(&x, lease).await)
    }
    async fn isolate(
        &self,
        d: &Delivery<AnyToken>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        settle!(self, d, |b, x| b.isolate(&x, envelope).await)
    }
    async fn fetch_isolated(
        &self,
        lanes: &LaneSet,
        lease: Duration,
    ) -> Result<Fetched<AnyToken>, TransportError> {
        match self {
            Self::Sqlite(s) => Ok(wrap(
                s.fetch_isolated(lanes, lease).await?,
                AnyToken::Sqlite,
            )),
            Self::Redis(r) => Ok(wrap(r.fetch_isolated(lanes, lease).await?, AnyToken::Redis)),
            Self::Nats(n) => Ok(wrap(n.fetch_isolated(lanes, lease).await?, AnyToken::Nats)),
            Self::Kafka(k) => Ok(wrap(k.fetch_isolated(lanes, lease).await?, AnyToken::Kafka)),
            Self::Sqs(q) => Ok(wrap(q.fetch_isolated(lanes, lease).await?, AnyToken::Sqs)),
            Self::Postgres(p) => Ok(wrap(
                p.fetch_isolated(lanes, lease).await?,
                AnyToken::Postgres,
            )),
        }
    }
    async fn isolated_due(&self, lanes: &LaneSet) -> Result<Option<i64>, TransportError> {
        each_backend!(self, |b| b.isolated_due(lanes).await)
    }
    fn isolates(&self) -> bool {
        each_backend!(self, |b| b.isolates())
    }
    fn max_fetch(&self) -> usize {
        each_backend!(self, |b| b.max_fetch())
    }

    fn fetches_in_flight(&self) -> usize {
        each_backend!(self, |b| b.fetches_in_flight())
    }
}

impl LaneStats for AnyBackend {
    async fn depths(&self) -> Result<Vec<QueueDepths>, TransportError> {
        each_backend!(self, |b| b.depths().await)
    }
    async fn queue_depths(&self, lanes: &LaneSet) -> Result<QueueDepths, TransportError> {
        each_backend!(self, |b| b.queue_depths(lanes).await)
    }
}

impl BreakerBoard for AnyBackend {
    async fn report_breaker(
        &self,
        queue: &str,
        consumer: &str,
        open: Option<(i64, i64)>,
    ) -> Result<(), StoreError> {
        each_backend!(self, |b| b.report_breaker(queue, consumer, open).await)
    }
    async fn open_breakers(&self, now_ms: i64) -> Result<Vec<OpenBreaker>, StoreError> {
        each_backend!(self, |b| b.open_breakers(now_ms).await)
    }
}

impl ReplayJobs for AnyBackend {
    async fn create_job(&self, job: &ReplayJob, items: &[JobItem]) -> Result<(), StoreError> {
        each_backend!(self, |b| b.create_job(job, items).await)
    }
    async fn update_job(&self, job: &ReplayJob) -> Result<(), StoreError> {
        each_backend!(self, |b| b.update_job(job).await)
    }
    async fn set_job_state(
        &self,
        id: &str,
        from: &[JobState],
        to: JobState,
        note: &str,
    ) -> Result<bool, StoreError> {
        each_backend!(self, |b| b.set_job_state(id, from, to, note).await)
    }
    async fn claim_job(&self, id: &str, owner: &str, until_ms: i64) -> Result<bool, StoreError> {
        each_backend!(self, |b| b.claim_job(id, owner, until_ms).await)
    }
    async fn jobs(&self, id: Option<&str>, limit: usize) -> Result<Vec<JobView>, StoreError> {
        each_backend!(self, |b| b.jobs(id, limit).await)
    }
    async fn job_items(
        &self,
        id: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<JobItem>, StoreError> {
        each_backend!(self, |b| b.job_items(id, after, limit).await)
    }
    async fn update_job_items(&self, id: &str, items: &[JobItem]) -> Result<(), StoreError> {
        each_backend!(self, |b| b.update_job_items(id, items).await)
    }
    async fn record_replay_outcomes(&self, outcomes: &[ReplayOutcome]) -> Result<(), StoreError> {
        each_backend!(self, |b| b.record_replay_outcomes(outcomes).await)
    }
    async fn replays_of(&self, id: &MessageId) -> Result<Vec<(ReplayJob, JobItem)>, StoreError> {
        each_backend!(self, |b| b.replays_of(id).await)
    }
}

impl DeadLetterStore for AnyBackend {
    async fn insert(&self, dead: &DeadLetter) -> Result<bool, StoreError> {
        each_backend!(self, |b| b.insert(dead).await)
    }
    async fn insert_batch(&self, dead: &[DeadLetter]) -> Result<u64, StoreError> {
        each_backend!(self, |b| b.insert_batch(dead).await)
    }
    async fn list(
        &self,
        filter: &DeadFilter,
        cursor: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        each_backend!(self, |b| b.list(filter, cursor, limit).await)
    }
    async fn groups(
        &self,
        filter: &DeadFilter,
        limit: usize,
    ) -> Result<Vec<DeadGroup>, StoreError> {
        each_backend!(self, |b| b.groups(filter, limit).await)
    }
    async fn count(&self, filter: &DeadFilter) -> Result<u64, StoreError> {
        each_backend!(self, |b| b.count(filter).await)
    }
    async fn get(&self, id: &MessageId) -> Result<Option<DeadLetter>, StoreError> {
        each_backend!(self, |b| b.get(id).await)
    }
    async fn mark_replayed(
        &self,
        ids: &[MessageId],
        actor: &str,
        reason: &str,
    ) -> Result<u64, StoreError> {
        each_backend!(self, |b| b.mark_replayed(ids, actor, reason).await)
    }
    async fn purge(
        &self,
        selection: &DeadSelection,
        actor: &str,
        reason: &str,
    ) -> Result<u64, StoreError> {
        each_backend!(self, |b| b.purge(selection, actor, reason).await)
    }
    async fn stats(&self) -> Result<Vec<DeadStats>, StoreError> {
        each_backend!(self, |b| b.stats().await)
    }
    async fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        each_backend!(self, |b| b.audit_log(limit).await)
    }
    async fn depth(&self, queue: Option<&QueueName>) -> Result<u64, StoreError> {
        each_backend!(self, |b| b.depth(queue).await)
    }
}

#[cfg(test)]
mod tests {
    use super::without_secrets;

    #[test]
    fn urls_are_shown_without_their_secrets() {
        for (url, shown) in [
            (
                "postgres://app:s3cret@db:5432/redrive",
                "postgres://app:***@db:5432/redrive",
            ),
            (
                "postgresql://app:p%40ss@db/x?sslmode=require&password=y",
                "postgresql://app:***@db/x?…",
            ),
            (
                "redis://:only-a-password@cache:6379",
                "redis://:***@cache:6379",
            ),
            ("kafka://k1:9092?sasl.password=p", "kafka://k1:9092?…"),
            ("sqlite://redrive.db", "sqlite://redrive.db"),
            ("mysql://root@db", "mysql://root:***@db"),
        ] {
            let got = without_secrets(url);
            assert_eq!(got, shown, "{url}");
            assert!(!got.contains("s3cret") && !got.contains("only-a-password"));
        }
    }
}
