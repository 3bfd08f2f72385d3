//! What tests against a real server share (feature `test-util`): a schema of the test's
//! own on the server `REDRIVE_TEST_POSTGRES_URL` names (default
//! postgres://postgres@127.0.0.1:5432/test; `./scripts/test` creates a throwaway
//! database per run), dropped with everything in it when the test ends.

use crate::{Postgres, PostgresConfig};

/// The server tests run against.
#[must_use]
pub fn server_url() -> String {
    std::env::var("REDRIVE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema of one test's own, dropped on drop. The drop blocks its thread, so tests
/// that hold one run on a multi-threaded runtime: the pool's connections must keep being
/// driven meanwhile.
#[derive(Debug)]
pub struct TestSchema {
    /// The schema's name.
    pub name: String,
}

impl TestSchema {
    /// A new, unused name; nothing is created until [`Self::open`] (or a redrive
    /// process given [`Self::url`]) opens it.
    #[must_use]
    pub fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Self {
            name: format!("t{}_{nanos}", std::process::id()),
        }
    }

    /// The URL of the schema (`?schema=NAME` on the test server).
    #[must_use]
    pub fn url(&self) -> String {
        format!("{}?schema={}", server_url(), self.name)
    }

    /// Opens (creates and migrates) the schema.
    ///
    /// # Panics
    ///
    /// When the server does not answer, saying how to start one.
    pub async fn open(&self) -> Postgres {
        PostgresConfig::new(&self.url())
            .unwrap_or_else(|e| panic!("{e}"))
            .open()
            .await
            .unwrap_or_else(|e| panic!("{e} (start PostgreSQL, or set REDRIVE_TEST_POSTGRES_URL)"))
    }

    /// A plain connection to the test server (its `search_path` is this schema), as
    /// another program would open one.
    ///
    /// # Panics
    ///
    /// When the server does not answer.
    pub async fn connect(&self) -> tokio_postgres::Client {
        let url = format!("{}?options=-csearch_path%3D{}", server_url(), self.name);
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("{e} (start PostgreSQL, or set REDRIVE_TEST_POSTGRES_URL)"));
        tokio::spawn(conn);
        client
    }
}

impl Default for TestSchema {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let (url, name) = (server_url(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                        .await;
                }
            });
        })
        .join();
    }
}
