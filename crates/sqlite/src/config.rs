//! Configuration of the embedded backend: where the file is and how durable commits are.

use std::path::PathBuf;

use crate::error::SqliteError;

/// How hard a commit is pushed to disk before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=FULL`: every acknowledged publish, retry move and ack is fsynced
    /// before it is acknowledged; it survives power loss. Group commit amortizes the
    /// fsync over every operation waiting at the time.
    #[default]
    Full,
    /// `synchronous=NORMAL`: commits survive a crash of the process but the most
    /// recent ones may be lost on power loss or a kernel crash.
    Relaxed,
}

/// Where and how to open the embedded store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteConfig {
    /// The database file.
    pub path: PathBuf,
    /// Commit durability.
    pub durability: Durability,
}

impl SqliteConfig {
    /// A configuration for `path` with full durability.
    #[must_use]
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            durability: Durability::Full,
        }
    }

    /// Parses `sqlite://PATH[?durability=full|relaxed]`. `sqlite:///abs/path` and
    /// `sqlite://relative/path` both work.
    ///
    /// # Errors
    ///
    /// Returns [`SqliteError::Url`] for another scheme, an empty path, or an unknown
    /// option.
    pub fn from_url(url: &str) -> Result<Self, SqliteError> {
        let bad = |reason: &str| SqliteError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| bad("expected sqlite://PATH, e.g. sqlite://redrive.db"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if path.is_empty() {
            return Err(bad("the path is empty; e.g. sqlite://redrive.db"));
        }
        let mut config = Self::new(path);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("durability", "full")) => config.durability = Durability::Full,
                Some(("durability", "relaxed")) => config.durability = Durability::Relaxed,
                _ => {
                    return Err(bad(&format!(
                        "unknown option {pair:?}; the only option is durability=full|relaxed"
                    )));
                }
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_store_urls() {
        let table = [
            ("sqlite://redrive.db", "redrive.db", Durability::Full),
            (
                "sqlite:///var/lib/redrive.db",
                "/var/lib/redrive.db",
                Durability::Full,
            ),
            (
                "sqlite://x.db?durability=relaxed",
                "x.db",
                Durability::Relaxed,
            ),
            ("sqlite:x.db?durability=full", "x.db", Durability::Full),
        ];
        for (url, path, durability) in table {
            let c = SqliteConfig::from_url(url).unwrap();
            assert_eq!(
                (c.path, c.durability),
                (PathBuf::from(path), durability),
                "{url}"
            );
        }
        for url in [
            "postgres://x",
            "sqlite://",
            "sqlite://x.db?sync=off",
            "redrive.db",
        ] {
            let err = SqliteConfig::from_url(url).unwrap_err().to_string();
            assert!(err.contains(url), "{err}");
        }
    }
}
