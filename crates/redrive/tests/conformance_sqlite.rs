//! The conformance suite on the embedded SQLite backend.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use redrive_conformance::{Cli, Fixture, Harness};
use redrive_core::QueueName;
use redrive_sqlite::{Sqlite, SqliteConfig};

struct SqliteHarness;

/// A connection of its own to the scenario's database file, as another program would
/// open it.
fn connect(b: &Fixture<Sqlite, Sqlite>) -> rusqlite::Connection {
    let url = &b.cli.backend_args[1];
    let path = url.strip_prefix("sqlite://").unwrap();
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    conn
}

/// Inserts a row into the messages table as SQL written by hand would.
fn insert(
    conn: &rusqlite::Connection,
    queue: &QueueName,
    payload: &dyn rusqlite::ToSql,
    headers: &dyn rusqlite::ToSql,
) {
    conn.execute(
        "INSERT INTO messages (queue, lane, due_ms, published_ms, payload, headers)
         VALUES (?1, 'main', 0, 1700000000000, ?2, ?3)",
        rusqlite::params![queue.as_str(), payload, headers],
    )
    .unwrap();
}

impl Harness for SqliteHarness {
    type T = Sqlite;
    type S = Sqlite;

    async fn open(&self) -> Fixture<Sqlite, Sqlite> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("conformance.db");
        let store = SqliteConfig::new(&path).open().expect("open store");
        Fixture {
            transport: store.clone(),
            store,
            cli: Cli {
                bin: env!("CARGO_BIN_EXE_redrive").into(),
                backend_args: vec!["--store".into(), format!("sqlite://{}", path.display())],
            },
            guard: Box::new(dir),
        }
    }

    async fn write_malformed(&self, b: &Fixture<Sqlite, Sqlite>, queue: &QueueName) -> usize {
        let conn = connect(b);
        let rows: [(&[u8], &str); 4] = [
            (b"headers that are not JSON", "{not json"),
            (b"headers that are not a list", r#"{"redrive-id":"x"}"#),
            (b"from a future redrive", r#"[["redrive-version","99"]]"#),
            (
                b"an attempt that is not a number",
                r#"[["redrive-version","1"],["redrive-attempt","many"]]"#,
            ),
        ];
        for (payload, headers) in rows {
            insert(&conn, queue, &payload, &headers);
        }
        rows.len()
    }

    async fn publish_plain(&self, b: &Fixture<Sqlite, Sqlite>, queue: &QueueName, payload: &[u8]) {
        insert(&connect(b), queue, &payload, &"[]");
    }
}

redrive_conformance::conformance!(SqliteHarness);
