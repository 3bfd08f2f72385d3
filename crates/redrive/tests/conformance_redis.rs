//! The conformance suite on the Redis backend (lanes in Redis, dead letters drained into
//! SQLite). Redis comes from `REDRIVE_TEST_REDIS_URL` (default redis://127.0.0.1:6379,
//! which `scripts/test` makes sure is running); each scenario gets its own key namespace.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use redrive_conformance::{Cli, Fixture, Harness};
use redrive_core::QueueName;
use redrive_redis::{RedisBackend, RedisConfig};
use redrive_sqlite::{Sqlite, SqliteConfig};

struct RedisHarness;

fn redis_url() -> String {
    std::env::var("REDRIVE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

impl Harness for RedisHarness {
    type T = RedisBackend<Sqlite>;
    type S = RedisBackend<Sqlite>;

    async fn open(&self) -> Fixture<Self::T, Self::S> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead.db");
        let namespace = format!("test-{}", redrive_conformance::unique_name());
        let url = format!("{}?namespace={namespace}", redis_url());
        let url_for_cli = url.clone();
        let transport = RedisConfig::new(url.as_str())
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{e} (start redis-server, or set REDRIVE_TEST_REDIS_URL)"));
        let store = SqliteConfig::new(&path).open().unwrap();
        let backend = RedisBackend::new(transport, store);
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
        let (mut conn, stream) = raw(b, queue).await;
        let entries: [&[(&str, &[u8])]; 4] = [
            &[("task", b"no payload field")],
            &[("payload", b"h is not JSON"), ("h", b"{not json")],
            &[
                ("payload", b"from a future redrive"),
                ("h", br#"[["redrive-version","99"]]"#),
            ],
            &[
                ("payload", b"an id that is not a UUID"),
                (
                    "h",
                    br#"[["redrive-version","1"],["redrive-id","not-a-uuid"]]"#,
                ),
            ],
        ];
        for fields in entries {
            let _: String = redis::cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg(fields)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        entries.len()
    }

    async fn publish_plain(
        &self,
        b: &Fixture<Self::T, Self::S>,
        queue: &QueueName,
        payload: &[u8],
    ) {
        let (mut conn, stream) = raw(b, queue).await;
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("payload")
            .arg(payload)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// A plain Redis connection, and the scenario's main stream for `queue` (`XADD` to it is
/// how another producer publishes to redrive).
async fn raw(
    b: &Fixture<RedisBackend<Sqlite>, RedisBackend<Sqlite>>,
    queue: &QueueName,
) -> (redis::aio::MultiplexedConnection, String) {
    let namespace = &b.guard.downcast_ref::<Cleanup>().unwrap().namespace;
    let client = redis::Client::open(redis_url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    (conn, format!("{namespace}:{{{queue}}}:main"))
}

/// Deletes a scenario's keys from the shared Redis when the scenario ends.
struct Cleanup {
    _dir: tempfile::TempDir,
    namespace: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(redis_url()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection() else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.namespace))
            .query(&mut conn)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(keys).query(&mut conn);
        }
    }
}

redrive_conformance::conformance!(RedisHarness);
