//! The conformance suite on the NATS JetStream backend (lanes in JetStream, dead letters
//! drained into SQLite). NATS comes from `REDRIVE_TEST_NATS_URL` (default
//! nats://127.0.0.1:4222, which `scripts/test` makes sure is running); each scenario gets
//! its own namespace (streams, subjects and history bucket), deleted afterwards.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use redrive_conformance::{Backend, Cli, Harness};
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

    async fn open(&self) -> Backend<Self::T, Self::S> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead.db");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let namespace = format!("t{:x}{:x}", std::process::id(), nanos);
        let url = format!("{}?namespace={namespace}&ids={}", nats_url(), self.ids);
        let url_for_cli = url.clone();
        let transport = NatsConfig::new(&url)
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| {
                panic!("{e} (start nats-server -js, or set REDRIVE_TEST_NATS_URL)")
            });
        let store = SqliteConfig::new(&path).open().unwrap();
        let backend = NatsBackend::new(transport, store);
        Backend {
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
