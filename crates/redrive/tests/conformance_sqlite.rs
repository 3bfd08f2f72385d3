//! The conformance suite on the embedded SQLite backend.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use redrive_conformance::{Backend, Cli, Harness};
use redrive_sqlite::{Sqlite, SqliteConfig};

struct SqliteHarness;

impl Harness for SqliteHarness {
    type T = Sqlite;
    type S = Sqlite;

    async fn open(&self) -> Backend<Sqlite, Sqlite> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("conformance.db");
        let store = SqliteConfig::new(&path).open().expect("open store");
        Backend {
            transport: store.clone(),
            store,
            cli: Cli {
                bin: env!("CARGO_BIN_EXE_redrive").into(),
                backend_args: vec!["--store".into(), format!("sqlite://{}", path.display())],
            },
            guard: Box::new(dir),
        }
    }
}

redrive_conformance::conformance!(SqliteHarness);
