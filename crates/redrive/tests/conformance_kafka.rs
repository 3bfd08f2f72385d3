//! The conformance suite on the Kafka backend (lanes as topics, dead letters drained
//! into SQLite). The broker comes from `REDRIVE_TEST_KAFKA_URL` (default
//! kafka://127.0.0.1:9092, where `scripts/test` starts tansu); each scenario gets its own
//! topic prefix and consumer groups, and its topics are deleted afterwards.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use redrive_conformance::{Cli, Fixture, Harness};
use redrive_core::{LaneSet, LaneStats, QueueName};
use redrive_kafka::{KafkaBackend, KafkaConfig};
use redrive_sqlite::{Sqlite, SqliteConfig};

struct KafkaHarness;

impl Harness for KafkaHarness {
    type T = KafkaBackend<Sqlite>;
    type S = KafkaBackend<Sqlite>;

    async fn open(&self) -> Fixture<Self::T, Self::S> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead.db");
        let scope = redrive_kafka::testing::Scope::new();
        let transport = KafkaConfig::new(&scope.url)
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{e} (run ./scripts/test, or set REDRIVE_TEST_KAFKA_URL)"));
        let store = SqliteConfig::new(&path).open().unwrap();
        let backend = KafkaBackend::new(transport, store);
        Fixture {
            transport: backend.clone(),
            store: backend,
            cli: Cli {
                bin: env!("CARGO_BIN_EXE_redrive").into(),
                backend_args: vec![
                    "--broker".into(),
                    scope.url.clone(),
                    "--store".into(),
                    format!("sqlite://{}", path.display()),
                ],
            },
            guard: Box::new((dir, scope)),
        }
    }

    async fn write_malformed(&self, b: &Fixture<Self::T, Self::S>, queue: &QueueName) -> usize {
        let (producer, topic) = raw(b, queue).await;
        let records: [(&str, &str, &[u8]); 3] = [
            ("redrive-version", "99", b"from a future redrive"),
            (
                "redrive-attempt",
                "many",
                b"an attempt that is not a number",
            ),
            ("redrive-id", "not-a-uuid", b"an id that is not a UUID"),
        ];
        for (name, value, payload) in records {
            let mut headers =
                rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                    key: name,
                    value: Some(value.as_bytes()),
                });
            if name == "redrive-attempt" {
                headers = headers.insert(rdkafka::message::Header {
                    key: "redrive-version",
                    value: Some(b"1".as_slice()),
                });
            }
            let record = rdkafka::producer::FutureRecord::<(), _>::to(&topic)
                .payload(payload)
                .headers(headers);
            producer
                .send(record, std::time::Duration::from_secs(10))
                .await
                .unwrap();
        }
        records.len()
    }

    async fn publish_plain(
        &self,
        b: &Fixture<Self::T, Self::S>,
        queue: &QueueName,
        payload: &[u8],
    ) {
        let (producer, topic) = raw(b, queue).await;
        let record = rdkafka::producer::FutureRecord::<(), _>::to(&topic).payload(payload);
        producer
            .send(record, std::time::Duration::from_secs(10))
            .await
            .unwrap();
    }
}

/// A plain producer, and the scenario's topic for `queue` (a record produced to it is
/// how another producer publishes to redrive). The queue's topics are made first.
async fn raw(
    b: &Fixture<KafkaBackend<Sqlite>, KafkaBackend<Sqlite>>,
    queue: &QueueName,
) -> (rdkafka::producer::FutureProducer, String) {
    let lanes = LaneSet {
        queue: queue.clone(),
        tiers: Vec::new(),
    };
    b.transport.queue_depths(&lanes).await.unwrap();
    let (_, scope) = b
        .guard
        .downcast_ref::<(tempfile::TempDir, redrive_kafka::testing::Scope)>()
        .unwrap();
    // Batched as the broker under test allows (see `redrive_kafka::testing::batched`).
    let producer = redrive_kafka::testing::plain_producer().create().unwrap();
    (producer, format!("{}{queue}", scope.prefix))
}

redrive_conformance::conformance!(KafkaHarness);
