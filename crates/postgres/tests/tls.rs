//! TLS with libpq's `sslmode` meanings, against the test server's own certificate. The
//! test server must offer TLS: Debian's PostgreSQL does out of the box, with the
//! `ssl-cert` package's self-signed "snakeoil" certificate (issued for `localhost`),
//! which these tests take as the trusted root where one is needed, and
//! `tests/unrelated-root.pem` as one that signed nothing the server has.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use redrive_core::DeadLetterStore;
use redrive_postgres::PostgresConfig;
use redrive_postgres::testing::TestSchema;

const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// Whether a connection named `app` is encrypted, as the server sees it.
async fn encrypted(schema: &TestSchema, app: &str) -> bool {
    schema
        .connect()
        .await
        .query_one(
            "SELECT coalesce(bool_and(s.ssl), false) FROM pg_stat_ssl s
             JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0)
}

async fn open(url: &str) -> Result<redrive_postgres::Postgres, String> {
    PostgresConfig::new(url)
        .map_err(|e| e.to_string())?
        .open()
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_encrypts_and_disable_does_not() {
    let schema = TestSchema::new();
    for (mode, want) in [("require", true), ("disable", false), ("prefer", true)] {
        let app = format!("redrive-tls-{mode}-{}", schema.name);
        let store = open(&format!(
            "{}&sslmode={mode}&application_name={app}",
            schema.url()
        ))
        .await
        .unwrap();
        store.depth(None).await.unwrap();
        assert_eq!(encrypted(&schema, &app).await, want, "sslmode={mode}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_modes_check_the_certificate_as_libpq_does() {
    let schema = TestSchema::new();
    let url = schema.url();
    let localhost = url.replacen("@127.0.0.1", "@localhost", 1);
    assert_ne!(url, localhost, "the test server is expected at 127.0.0.1");
    // The certificate is issued for localhost and signed by itself.
    open(&format!(
        "{localhost}&sslmode=verify-full&sslrootcert={SNAKEOIL}"
    ))
    .await
    .unwrap();
    open(&format!("{url}&sslmode=verify-ca&sslrootcert={SNAKEOIL}"))
        .await
        .unwrap();
    let wrong_name = open(&format!("{url}&sslmode=verify-full&sslrootcert={SNAKEOIL}"))
        .await
        .unwrap_err();
    assert!(wrong_name.contains("certificate"), "{wrong_name}");
    // A root that signed nothing the server has (its key was thrown away).
    let unrelated = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/unrelated-root.pem");
    let untrusted = open(&format!(
        "{localhost}&sslmode=verify-full&sslrootcert={unrelated}"
    ))
    .await
    .unwrap_err();
    assert!(untrusted.contains("certificate"), "{untrusted}");
    let missing = open(&format!(
        "{url}&sslmode=verify-ca&sslrootcert=/no/such/root.pem"
    ))
    .await
    .unwrap_err();
    assert!(missing.contains("/no/such/root.pem"), "{missing}");
}
