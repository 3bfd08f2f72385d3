//! The dead-letter store scenarios on the embedded store.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

/// A fresh store in a scratch directory, removed when the scenario ends.
fn open() -> (tempfile::TempDir, redrive_sqlite::Sqlite) {
    let dir = tempfile::tempdir().unwrap();
    let store = redrive_sqlite::SqliteConfig::new(dir.path().join("dead.db"))
        .open()
        .unwrap();
    (dir, store)
}

redrive_conformance::store_conformance!(open());
