//! The conformance suite on the NATS JetStream backend (lanes in JetStream, dead letters
//! drained into SQLite). NATS comes from `REDRIVE_TEST_NATS_URL` (default
//! nats://127.0.0.1:4222, which `scripts/test` makes sure is running); each scenario gets
//! its own namespace (streams, subjects and history bucket), deleted afterwards.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use redrive_conformance::{Cli, Fixture, Harness};
use redrive_core::{LaneSet, LaneStats, QueueName};
use redrive_nats::{NatsBackend, NatsConfig};
use redrive_sqlite::{Sqlite, SqliteConfig};

/// `ids`: where a message that never failed carries its id (`header` or `subject`).
struct NatsHarness {
    ids: &'static str,
}

fn nats_url() -> String {
    std::env::var("REDRIVE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

impl Harness for NatsHarness {
    type T = NatsBackend<Sqlite>;
    type S = NatsBackend<Sqlite>;

    async fn open(&self) -> Fixture<Self::T, Self::S> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead.db");
        let namespace = format!("t{}", redrive_conformance::unique_name());
        let url = format!("{}?namespace={namespace}&ids={}", nats_url(), self.ids);
        let url_for_cli = url.clone();
        let config = NatsConfig::new(&url).unwrap();
        // One more try after a server-side refusal: nats-server 2.9 has once answered a
        // bucket creation with a 500 under the suite's parallel load.
        let transport = match config.connect().await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("connecting failed once ({e}); trying again");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                config.connect().await.unwrap_or_else(|e| {
                    panic!("{e} (start nats-server -js, or set REDRIVE_TEST_NATS_URL)")
                })
            }
        };
        let store = SqliteConfig::new(&path).open().unwrap();
        let backend = NatsBackend::new(transport, store);
        Fixture {
            transport: backend.clone(),
            store: backend,
            cli: Cli {
                bin: env!("CARGO_BIN_EXE_redrive").into(),
                backend_args: vec![
                    "--broker".into(),
                    url_for_cli,
                    "--store".into(),
                    format!("sqlite://{}", path.display()),
                ],
            },
            guard: Box::new(Cleanup {
                _dir: dir,
                namespace,
            }),
        }
    }

    async fn write_malformed(&self, b: &Fixture<Self::T, Self::S>, queue: &QueueName) -> usize {
        let (js, subject) = raw(b, queue).await;
        let messages: [(&str, &str, &[u8]); 3] = [
            ("redrive-wire", "{not json", b"wire header that is not JSON"),
            (
                "redrive-wire",
                r#"[["redrive-version","99"],["redrive-id","0192f0c4-0000-7000-8000-000000000001"]]"#,
                b"from a future redrive",
            ),
            ("redrive-id", "not-a-uuid", b"an id that is not a UUID"),
        ];
        for (name, value, payload) in messages {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(name, value);
            js.publish_with_headers(subject.clone(), headers, payload.to_vec().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        messages.len()
    }

    async fn publish_plain(
        &self,
        b: &Fixture<Self::T, Self::S>,
        queue: &QueueName,
        payload: &[u8],
    ) {
        let (js, subject) = raw(b, queue).await;
        js.publish(subject, payload.to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

/// A plain JetStream client, and the scenario's subject for `queue` (a publish to it is
/// how another producer publishes to redrive). The queue's streams are made first.
async fn raw(
    b: &Fixture<NatsBackend<Sqlite>, NatsBackend<Sqlite>>,
    queue: &QueueName,
) -> (async_nats::jetstream::Context, String) {
    let lanes = LaneSet {
        queue: queue.clone(),
        tiers: Vec::new(),
    };
    b.transport.queue_depths(&lanes).await.unwrap();
    let namespace = &b.guard.downcast_ref::<Cleanup>().unwrap().namespace;
    let client = async_nats::connect(nats_url()).await.unwrap();
    (
        async_nats::jetstream::new(client),
        format!("{namespace}.{queue}"),
    )
}

/// Deletes a scenario's streams and history bucket from the shared server afterwards.
struct Cleanup {
    _dir: tempfile::TempDir,
    namespace: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ns = self.namespace.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(client) = async_nats::connect(nats_url()).await else {
                    return;
                };
                let js = async_nats::jetstream::new(client);
                for name in [
                    format!("{ns}_conformance_tasks"),
                    format!("{ns}_conformance_tasks_dlq"),
                    format!("{ns}_conformance_tasks_exhausted"),
                    format!("{ns}_conformance_tasks_isolated"),
                    format!("KV_{ns}_history"),
                ] {
                    let _ = js.delete_stream(&name).await;
                }
            });
        })
        .join();
    }
}

redrive_conformance::conformance!(NatsHarness { ids: "header" });

/// The same scenarios with ids in subjects (`?ids=subject`).
mod ids_in_subjects {
    use super::NatsHarness;
    redrive_conformance::conformance!(NatsHarness { ids: "subject" });
}
