//! The conformance suite on the SQS backend (lanes as SQS queues with their native
//! redrive policy, dead letters drained into SQLite), against the SQS-compatible server
//! `scripts/test` starts (moto, on 127.0.0.1:9324; `REDRIVE_TEST_SQS_ENDPOINT` to use
//! another). Each scenario gets its own queue-name prefix.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

mod sqs_support;

use redrive_conformance::{Backend, Cli, Harness};
use redrive_sqlite::{Sqlite, SqliteConfig};
use redrive_sqs::{SqsBackend, SqsConfig};

struct SqsHarness;

impl Harness for SqsHarness {
    type T = SqsBackend<Sqlite>;
    type S = SqsBackend<Sqlite>;

    async fn open(&self) -> Backend<Self::T, Self::S> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead.db");
        let scope = sqs_support::Scope::new();
        let transport = SqsConfig::new(&scope.url)
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{e} (run ./scripts/test, which starts a local SQS server and exports test \
                     credentials, or set REDRIVE_TEST_SQS_ENDPOINT and AWS_ACCESS_KEY_ID / \
                     AWS_SECRET_ACCESS_KEY)"
                )
            });
        let store = SqliteConfig::new(&path).open().unwrap();
        let backend = SqsBackend::new(transport, store);
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
            guard: Box::new(dir),
        }
    }
}

redrive_conformance::conformance!(SqsHarness);
