//! Opening the backend a `--store` URL names, with errors that say what to fix.

use std::path::Path;

use anyhow::{Context, Result, bail};
use redrive_sqlite::{Sqlite, SqliteConfig};

/// Opens the store. Commands that only read pass `create = false`, so a mistyped path
/// is an error instead of a new, empty store.
pub fn open(url: &str, create: bool) -> Result<Sqlite> {
    if !url.starts_with("sqlite:") {
        let scheme = url.split("://").next().unwrap_or(url);
        bail!(
            "unsupported store {scheme:?} in --store {url:?}: this build supports sqlite://PATH \
             (e.g. sqlite://redrive.db)"
        );
    }
    let config = SqliteConfig::from_url(url)?;
    check_path(&config.path, create)?;
    config.open().with_context(|| format!("opening --store {url}"))
}

fn check_path(path: &Path, create: bool) -> Result<()> {
    if path.is_dir() {
        bail!("--store points at {}, which is a directory; name a file, e.g. sqlite://{}/redrive.db", path.display(), path.display());
    }
    if !create && !path.exists() {
        bail!(
            "no store at {}: nothing has been published there yet. Check --store / REDRIVE_STORE, \
             or publish first",
            path.display()
        );
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        bail!("cannot create the store {}: directory {} does not exist", path.display(), dir.display());
    }
    Ok(())
}
