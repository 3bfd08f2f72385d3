//! The conformance suite on the Kafka backend (lanes as topics, dead letters drained
//! into SQLite). The broker comes from `REDRIVE_TEST_KAFKA_URL` (default
//! kafka://127.0.0.1:9092, where `scripts/test` starts tansu); each scenario gets its own
//! topic prefix and consumer groups, and its topics are deleted afterwards.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

mod kafka_support;

use redrive_conformance::{Backend, Cli, Harness};
use redrive_kafka::{KafkaBackend, KafkaConfig};
use redrive_sqlite::{Sqlite, SqliteConfig};

struct KafkaHarness;

impl Harness for KafkaHarness {
    type T = KafkaBackend<Sqlite>;
    type S = KafkaBackend<Sqlite>;

    async fn open(&self) -> Backend<Self::T, Self::S> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead.db");
        let scope = kafka_support::Scope::new();
        let transport = KafkaConfig::new(&scope.url)
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{e} (run ./scripts/test, or set REDRIVE_TEST_KAFKA_URL)"));
        let store = SqliteConfig::new(&path).open().unwrap();
        let backend = KafkaBackend::new(transport, store);
        Backend {
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
}

redrive_conformance::conformance!(KafkaHarness);
