//! The dead-letter store scenarios on PostgreSQL, plus what only a shared server has:
//! migrations that refuse a newer schema and processes that open one schema together.
//!
//! The server comes from `REDRIVE_TEST_POSTGRES_URL` (default
//! postgres://postgres@127.0.0.1:5432/test; `./scripts/test` creates a throwaway database
//! per run). Each test gets a schema of its own, dropped when it ends.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use redrive_core::DeadLetterStore;
use redrive_postgres::testing::{TestSchema, server_url};
use redrive_postgres::{PgError, Postgres, PostgresConfig, SCHEMA_VERSION};

type Schema = TestSchema;

async fn fresh() -> (Schema, Postgres) {
    let schema = Schema::new();
    let store = schema.open().await;
    (schema, store)
}

redrive_conformance::store_conformance!(fresh().await);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_that_start_together_migrate_once_and_share_the_store() {
    let schema = Schema::new();
    let url = schema.url();
    let opens = (0..4).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { PostgresConfig::new(&url).unwrap().open().await })
    });
    let mut stores = Vec::new();
    for o in opens {
        stores.push(o.await.unwrap().unwrap());
    }
    let d = redrive_conformance::store::dead("agent.tasks", "Invalid", "bad", "x", 1_000);
    // Two processes drain the same dead message: it is stored once.
    assert!(stores[0].insert(&d).await.unwrap());
    assert!(!stores[1].insert(&d).await.unwrap());
    assert_eq!(stores[2].depth(None).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_a_newer_redrive_wrote_is_refused() {
    let schema = Schema::new();
    drop(schema.open().await);
    let (client, conn) = tokio_postgres::connect(&server_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "UPDATE \"{}\".schema_version SET version = {}",
            schema.name,
            SCHEMA_VERSION + 1
        ))
        .await
        .unwrap();
    let err = PostgresConfig::new(&schema.url())
        .unwrap()
        .open()
        .await
        .unwrap_err();
    assert!(matches!(err, PgError::TooNew { .. }), "{err}");
    assert!(err.to_string().contains("upgrade redrive"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_not_there_is_a_clear_error_without_the_password() {
    let err = PostgresConfig::new("postgres://app:s3cret@127.0.0.1:1/none?connect_timeout=2")
        .unwrap()
        .open()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("127.0.0.1:1") && err.contains("unavailable"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_leads_until_its_lease_runs_out() {
    use redrive_core::alert::AlertStore;
    let (_schema, s) = fresh().await;
    assert!(
        s.lead("alerts", "a", 1_000, 3_000).await.unwrap(),
        "free: taken"
    );
    assert!(
        !s.lead("alerts", "b", 1_500, 3_000).await.unwrap(),
        "held by a"
    );
    assert!(
        s.lead("retention", "b", 1_500, 3_000).await.unwrap(),
        "another role is free"
    );
    assert!(
        s.lead("alerts", "a", 3_500, 3_000).await.unwrap(),
        "a renews, to 6,500"
    );
    assert!(
        !s.lead("alerts", "b", 6_499, 3_000).await.unwrap(),
        "renewed: still a's"
    );
    assert!(
        s.lead("alerts", "b", 6_500, 3_000).await.unwrap(),
        "run out: b takes over"
    );
    assert!(
        !s.lead("alerts", "a", 6_600, 3_000).await.unwrap(),
        "a lost it"
    );
}
