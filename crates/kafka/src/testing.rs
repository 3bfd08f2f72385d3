//! What the Kafka tests share, here and in the `redrive` crate (feature `test-util`):
//! the broker under test, its settings, and a per-test topic prefix and group whose
//! topics are deleted afterwards.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// The broker under test.
pub fn kafka_url() -> String {
    std::env::var("REDRIVE_TEST_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".to_owned())
}

/// `host:port,…` of [`kafka_url`].
pub fn bootstrap() -> String {
    kafka_url().trim_start_matches("kafka://").to_owned()
}

/// Whether the broker under test is librdkafka's mock cluster (`crates/kafka-mock`,
/// `REDRIVE_TEST_KAFKA_MOCK=1`; `./scripts/test` runs the Kafka tests on it as well as
/// on tansu). What differs:
/// - it reads from inside a batch of several records, as a real broker does; tansu 0.6,
///   the default test broker, does not (a fetch that starts inside a multi-record batch
///   returns nothing, and it reports a partition's end as its last batch's first offset
///   + 1), so against tansu every test produces one record per batch;
/// - it has no CreateTopics (redrive's URL takes `topics=auto`) and no DeleteTopics (a
///   test's topics stay in its memory until it exits);
/// - it holds a rebalance for a second less than the members' session timeout.
pub fn mock() -> bool {
    std::env::var("REDRIVE_TEST_KAFKA_MOCK").is_ok_and(|v| v == "1")
}

/// Whether producers send batches of many records (see [`mock`]).
pub fn batched() -> bool {
    mock()
}

/// URL options for the broker under test (see [`mock`]): batches of many records
/// lingering a few milliseconds as real producers send them, or one record per batch;
/// lane topics created by a metadata request where CreateTopics is missing; a 2 s
/// session instead of redrive's 6 s where rebalances wait for it. tansu also answers
/// every fetch only after the fetch's whole maximum wait, data or not, so the wait is
/// kept short. Real Kafka needs none of these.
pub fn producer_settings() -> &'static str {
    if batched() {
        "topics=auto&linger.ms=20&fetch.wait.max.ms=10&session.timeout.ms=2000&heartbeat.interval.ms=300"
    } else {
        "batch.num.messages=1&fetch.wait.max.ms=10"
    }
}

/// The same as client properties, for a test's own plain producer.
pub fn plain_producer() -> rdkafka::ClientConfig {
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", bootstrap());
    if batched() {
        config.set("linger.ms", "20");
    } else {
        config.set("batch.num.messages", "1");
    }
    config
}

/// A test's own topics (`<prefix>…`) and groups; its topics are deleted on drop.
pub struct Scope {
    /// The prefix of every topic of this test (`t<pid><nanos>.`).
    pub prefix: String,
    /// The `kafka://` URL of the broker under test with this scope's prefix, group and
    /// [`producer_settings`].
    pub url: String,
}

impl Scope {
    /// A scope no other test shares (named from the process id and the clock).
    #[allow(clippy::new_without_default)] // A fresh, unique scope each call: not a default.
    pub fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let id = format!("t{:x}{:x}", std::process::id(), nanos);
        let prefix = format!("{id}.");
        let url = format!(
            "{}?prefix={prefix}&group={id}&{}",
            kafka_url(),
            producer_settings()
        );
        Self { prefix, url }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if mock() {
            return; // No DeleteTopics: the request would wait out its whole timeout.
        }
        let prefix = self.prefix.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let mut config = ClientConfig::new();
                config.set("bootstrap.servers", bootstrap());
                let (Ok(meta), Ok(admin)) = (
                    config.create::<BaseConsumer>(),
                    config.create::<AdminClient<DefaultClientContext>>(),
                ) else {
                    return;
                };
                let Ok(md) = meta.fetch_metadata(None, Duration::from_secs(5)) else {
                    return;
                };
                let mine: Vec<String> = md
                    .topics()
                    .iter()
                    .map(|t| t.name().to_owned())
                    .filter(|n| n.starts_with(&prefix))
                    .collect();
                let names: Vec<&str> = mine.iter().map(String::as_str).collect();
                if !names.is_empty() {
                    let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
                }
            });
        })
        .join();
    }
}
