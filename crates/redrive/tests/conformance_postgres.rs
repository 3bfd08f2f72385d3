//! The conformance suite with PostgreSQL: lanes and dead letters in one schema
//! (`--broker postgres://…`), and PostgreSQL as the dead-letter store behind Redis lanes
//! (`--broker redis://… --store postgres://…`). The server comes from
//! `REDRIVE_TEST_POSTGRES_URL`, Redis from `REDRIVE_TEST_REDIS_URL` (`scripts/test` makes
//! sure both answer); each scenario gets a schema (and a Redis namespace) of its own.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use redrive_conformance::{Cli, Fixture, Harness};
use redrive_core::QueueName;
use redrive_postgres::Postgres;
use redrive_postgres::testing::TestSchema;

/// Lanes in PostgreSQL.
struct PostgresHarness;

fn schema(b: &Fixture<Postgres, Postgres>) -> &TestSchema {
    b.guard.downcast_ref::<TestSchema>().unwrap()
}

impl Harness for PostgresHarness {
    type T = Postgres;
    type S = Postgres;

    async fn open(&self) -> Fixture<Postgres, Postgres> {
        let schema = TestSchema::new();
        let store = schema.open().await;
        Fixture {
            transport: store.clone(),
            store,
            cli: Cli {
                bin: env!("CARGO_BIN_EXE_redrive").into(),
                backend_args: vec!["--broker".into(), schema.url()],
            },
            guard: Box::new(schema),
        }
    }

    async fn write_malformed(&self, b: &Fixture<Postgres, Postgres>, queue: &QueueName) -> usize {
        let client = schema(b).connect().await;
        let rows: [(&[u8], Option<&[u8]>, &str); 5] = [
            (b"headers that are not JSON", None, "{not json"),
            (
                b"headers that are not a list",
                None,
                r#"{"redrive-id":"x"}"#,
            ),
            (
                b"from a future redrive",
                None,
                r#"[["redrive-version","99"]]"#,
            ),
            (
                b"an attempt that is not a number",
                None,
                r#"[["redrive-version","1"],["redrive-attempt","many"]]"#,
            ),
            (b"a key that is not text", Some(b"\xff\xfe"), "[]"),
        ];
        for (payload, key, headers) in rows {
            client
                .execute(
                    "INSERT INTO messages (queue, payload, key, headers) VALUES ($1, $2, $3, $4)",
                    &[&queue.as_str(), &payload, &key, &headers],
                )
                .await
                .unwrap();
        }
        rows.len()
    }

    async fn publish_plain(
        &self,
        b: &Fixture<Postgres, Postgres>,
        queue: &QueueName,
        payload: &[u8],
    ) {
        // What a producer that knows nothing of redrive writes: the defaults do the rest.
        schema(b)
            .connect()
            .await
            .execute(
                "INSERT INTO messages (queue, payload) VALUES ($1, $2)",
                &[&queue.as_str(), &payload],
            )
            .await
            .unwrap();
    }
}

mod lanes_in_postgres {
    use super::PostgresHarness;
    redrive_conformance::conformance!(PostgresHarness);
}

/// Redis lanes, dead letters in PostgreSQL.
mod store_behind_redis {
    use redrive_conformance::{Cli, Fixture, Harness};
    use redrive_core::QueueName;
    use redrive_postgres::Postgres;
    use redrive_postgres::testing::TestSchema;
    use redrive_redis::{RedisBackend, RedisConfig};

    struct RedisPostgresHarness;

    fn redis_url() -> String {
        std::env::var("REDRIVE_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    /// The scenario's schema, and its Redis keys deleted when it ends.
    struct Guard {
        _schema: TestSchema,
        namespace: String,
    }

    impl Drop for Guard {
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

    type Backend = RedisBackend<Postgres>;

    async fn stream(
        b: &Fixture<Backend, Backend>,
        queue: &QueueName,
    ) -> (redis::aio::MultiplexedConnection, String) {
        let namespace = &b.guard.downcast_ref::<Guard>().unwrap().namespace;
        let client = redis::Client::open(redis_url()).unwrap();
        let conn = client.get_multiplexed_async_connection().await.unwrap();
        (conn, format!("{namespace}:{{{queue}}}:main"))
    }

    impl Harness for RedisPostgresHarness {
        type T = Backend;
        type S = Backend;

        async fn open(&self) -> Fixture<Backend, Backend> {
            let schema = TestSchema::new();
            let namespace = format!("pg{}", schema.name);
            let url = format!("{}?namespace={namespace}", redis_url());
            let transport = RedisConfig::new(url.as_str())
                .unwrap()
                .connect()
                .await
                .unwrap_or_else(|e| {
                    panic!("{e} (start redis-server, or set REDRIVE_TEST_REDIS_URL)")
                });
            let backend = RedisBackend::new(transport, schema.open().await);
            Fixture {
                transport: backend.clone(),
                store: backend,
                cli: Cli {
                    bin: env!("CARGO_BIN_EXE_redrive").into(),
                    backend_args: vec!["--broker".into(), url, "--store".into(), schema.url()],
                },
                guard: Box::new(Guard {
                    _schema: schema,
                    namespace,
                }),
            }
        }

        async fn write_malformed(&self, b: &Fixture<Backend, Backend>, queue: &QueueName) -> usize {
            let (mut conn, stream) = stream(b, queue).await;
            let entries: [&[(&str, &[u8])]; 2] = [
                &[("task", b"no payload field")],
                &[("payload", b"h is not JSON"), ("h", b"{not json")],
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
            b: &Fixture<Backend, Backend>,
            queue: &QueueName,
            payload: &[u8],
        ) {
            let (mut conn, stream) = stream(b, queue).await;
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

    redrive_conformance::conformance!(RedisPostgresHarness);
}
