//! `postgres://…` URLs: what libpq users write, plus redrive's own options.

use std::str::FromStr;

use crate::error::PgError;
use crate::tls::{SslMode, TlsSettings};

/// `%XX` escapes decoded (a path in a URL query may carry them).
fn percent_decoded(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the store lives and how to reach it.
///
/// `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?OPTIONS]` (or `postgresql://`),
/// with libpq's options (`sslmode`, `connect_timeout`, `application_name`, …) and
/// redrive's own:
/// - `schema=NAME`: the schema redrive's tables live in (default `redrive`), so several
///   deployments can share one database;
/// - `pool=N`: connections kept open (default 8).
///
/// TLS follows libpq: `sslmode=disable|prefer|require|verify-ca|verify-full` (default
/// `prefer`) and `sslrootcert=FILE` (PEM); see [`SslMode`].
#[derive(Clone)]
pub struct PostgresConfig {
    pub(crate) pg: tokio_postgres::Config,
    pub(crate) tls: TlsSettings,
    /// The schema redrive's tables live in.
    pub schema: String,
    /// Connections kept open.
    pub pool_size: usize,
    /// The URL without its password, for messages and logs.
    pub(crate) display: String,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("PostgresConfig")
            .field("url", &self.display)
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

impl PostgresConfig {
    /// Parses a `postgres://` or `postgresql://` URL.
    ///
    /// # Errors
    ///
    /// A URL that is not PostgreSQL's, an unknown or invalid option, a schema name that
    /// is not a plain identifier, or a TLS mode this build cannot honour.
    pub fn new(url: &str) -> Result<Self, PgError> {
        let invalid = |reason: String| PgError::Url {
            url: without_password(url),
            reason,
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(invalid(
                "expected postgres://USER@HOST[:PORT]/DATABASE".into(),
            ));
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut schema = "redrive".to_owned();
        let mut pool_size = 8;
        let mut tls = TlsSettings {
            mode: SslMode::Prefer,
            root_cert: None,
        };
        let mut passed = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "schema" => schema = value.to_owned(),
                "pool" => {
                    pool_size = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=256).contains(n))
                        .ok_or_else(|| invalid(format!("pool={value}: expected 1 to 256")))?;
                }
                "sslmode" => {
                    tls.mode = SslMode::parse(value).ok_or_else(|| {
                        invalid(format!(
                            "sslmode={value}: expected disable, prefer, require, verify-ca or \
                             verify-full"
                        ))
                    })?;
                }
                "sslrootcert" if !value.is_empty() => {
                    tls.root_cert = Some(percent_decoded(value).into());
                }
                _ => passed.push(pair),
            }
        }
        let valid_schema = !schema.is_empty()
            && schema.len() <= 63
            && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid_schema {
            return Err(invalid(format!(
                "schema={schema}: expected a lower-case identifier (a-z, 0-9, _; at most 63)"
            )));
        }
        let rebuilt = if passed.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", passed.join("&"))
        };
        let mut pg =
            tokio_postgres::Config::from_str(&rebuilt).map_err(|e| invalid(e.to_string()))?;
        if pg.get_dbname().is_none() {
            return Err(invalid(
                "no database: expected postgres://USER@HOST/DATABASE".into(),
            ));
        }
        pg.options(format!("-c search_path={schema}"));
        pg.ssl_mode(tls.mode.negotiation());
        if pg.get_application_name().is_none() {
            pg.application_name("redrive");
        }
        Ok(Self {
            pg,
            tls,
            display: format!("{}?schema={schema}", without_password(base)),
            schema,
            pool_size,
        })
    }

    /// The URL without its password.
    #[must_use]
    pub fn display(&self) -> &str {
        &self.display
    }
}

/// `url` with the password of its user info, if any, replaced by `***`.
#[must_use]
pub fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(u, _)| u);
            let hidden = if authority[..authority.len() - host.len() - 1].contains(':') {
                ":***"
            } else {
                ""
            };
            format!("{scheme}://{user}{hidden}@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_gives_the_schema_and_pool_and_never_shows_the_password() {
        let c = PostgresConfig::new(
            "postgres://app:s3cret@db.internal:6543/jobs?schema=team_a&pool=4&connect_timeout=5",
        )
        .unwrap();
        assert_eq!((c.schema.as_str(), c.pool_size), ("team_a", 4));
        assert_eq!(
            c.display(),
            "postgres://app:***@db.internal:6543/jobs?schema=team_a"
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        let c = PostgresConfig::new("postgresql://postgres@127.0.0.1/test").unwrap();
        assert_eq!((c.schema.as_str(), c.pool_size), ("redrive", 8));
    }

    #[test]
    fn bad_urls_are_refused_with_the_reason_and_without_the_password() {
        for (url, says) in [
            ("mysql://u@h/db", "expected postgres://"),
            ("postgres://u:pw@h/db?schema=Team-A", "schema=Team-A"),
            ("postgres://u:pw@h/db?schema=", "schema="),
            ("postgres://u:pw@h/db?pool=0", "pool=0"),
            (
                "postgres://u:pw@h/db?sslmode=sometimes",
                "sslmode=sometimes",
            ),
            ("postgres://u:pw@h/db?no_such_option=1", "no_such_option"),
            ("postgres://u:pw@h", "no database"),
        ] {
            let err = PostgresConfig::new(url).unwrap_err().to_string();
            assert!(err.contains(says), "{url}: {err}");
            assert!(!err.contains("pw"), "{url}: {err}");
        }
    }
}
