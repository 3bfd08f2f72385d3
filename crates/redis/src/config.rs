//! Where the Redis server is, and how to connect.

use crate::error::RedisError;

/// How to reach Redis.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, without redrive's own options.
    pub url: String,
    /// Prefix of every key redrive writes (default `redrive`), so several
    /// deployments can share one Redis.
    pub namespace: String,
}

impl std::fmt::Debug for RedisConfig {
    // The URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("address", &self.shown())
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl RedisConfig {
    /// Parses `redis://host:port[/db][?namespace=NAME]`.
    ///
    /// # Errors
    ///
    /// [`RedisError::Unreachable`] for a URL that is not `redis://` or `rediss://`, or an
    /// unknown option.
    pub fn new(url: impl Into<String>) -> Result<Self, RedisError> {
        let url = url.into();
        let bad = |reason: &str| RedisError::Unreachable {
            address: url.clone(),
            reason: reason.to_owned(),
        };
        if !url.starts_with("redis://") && !url.starts_with("rediss://") {
            return Err(bad(
                "expected redis://HOST:PORT (e.g. redis://127.0.0.1:6379)",
            ));
        }
        let (base, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
        let mut namespace = "redrive".to_owned();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("namespace", ns))
                    if !ns.is_empty()
                        && ns
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
                {
                    namespace = ns.to_owned();
                }
                _ => {
                    return Err(bad(&format!(
                        "unknown option {pair:?}; the only option is namespace=NAME"
                    )));
                }
            }
        }
        Ok(Self {
            url: base.to_owned(),
            namespace,
        })
    }

    /// The address without credentials, for messages.
    #[must_use]
    pub fn shown(&self) -> String {
        let rest = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, r)| r);
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        format!("redis://{host}")
    }
}
