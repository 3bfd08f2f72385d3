//! Who may do what: tokens, sign-in sessions, roles and CSRF protection.
//!
//! - No token configured: only a loopback bind is allowed, every local caller is an
//!   operator, and the `Host` header must name a loopback address (so a web page cannot
//!   reach the server through DNS rebinding).
//! - Tokens configured: the API takes `Authorization: Bearer TOKEN`; the UI signs in
//!   with a form that sets an HttpOnly, SameSite=Strict session cookie.
//! - Viewers read; operators also replay, edit and purge.
//! - State-changing requests are CSRF-safe: UI forms carry a per-session token, and API
//!   writes must be JSON (a cross-site form cannot send that without a CORS preflight,
//!   which this server never grants) with no foreign `Origin`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

/// How long a UI session lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The session cookie's name.
pub const COOKIE: &str = "redrive_session";

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read everything.
    Viewer,
    /// Also replay, edit and purge.
    Operator,
}

impl Role {
    /// The role's name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
        }
    }
}

/// Why tokens could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token file could not be read.
    #[error("cannot read the token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A line of the token file is malformed.
    #[error(
        "token file {path}, line {line}: {reason}; expected `operator TOKEN [NAME]` or `viewer TOKEN [NAME]`"
    )]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A token too short to be a secret.
    #[error(
        "a {role} token is shorter than 16 characters; use a long random token (e.g. `openssl rand -hex 24`)"
    )]
    Weak {
        /// The role.
        role: &'static str,
    },
    /// A token with a space or a control character: no `Authorization` header or
    /// sign-in form can carry it intact, so it could never match.
    #[error(
        "a {role} token contains a space or a control character, so no request could ever \
         present it; use visible characters only (e.g. `openssl rand -hex 24`)"
    )]
    Unusable {
        /// The role.
        role: &'static str,
    },
}

#[derive(Clone)]
struct Token {
    secret: String,
    role: Role,
    name: String,
}

/// The configured access tokens.
#[derive(Clone, Default)]
pub struct Tokens {
    tokens: Vec<Token>,
}

impl std::fmt::Debug for Tokens {
    // Never print secrets, even in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.tokens.len())
            .finish()
    }
}

impl Tokens {
    /// Tokens from `REDRIVE_TOKEN` (operator) and `REDRIVE_VIEWER_TOKEN` (viewer)
    /// values, plus a token file if given.
    ///
    /// # Errors
    ///
    /// Fails when the file cannot be read, a line is malformed, or a token is shorter
    /// than 16 characters.
    pub fn load(
        operator: Option<&str>,
        viewer: Option<&str>,
        file: Option<&Path>,
    ) -> Result<Self, TokenError> {
        let mut tokens = Self::default();
        if let Some(secret) = operator.filter(|s| !s.is_empty()) {
            tokens.add(secret, Role::Operator, "operator")?;
        }
        if let Some(secret) = viewer.filter(|s| !s.is_empty()) {
            tokens.add(secret, Role::Viewer, "viewer")?;
        }
        if let Some(path) = file {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
                path: shown.clone(),
                source,
            })?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let bad = |reason| TokenError::Line {
                    path: shown.clone(),
                    line: i + 1,
                    reason,
                };
                let mut parts = line.split_whitespace();
                let role = match parts.next() {
                    Some("operator") => Role::Operator,
                    Some("viewer") => Role::Viewer,
                    _ => return Err(bad("unknown role")),
                };
                let secret = parts.next().ok_or_else(|| bad("missing token"))?;
                let name = parts.next().unwrap_or(role.as_str());
                if parts.next().is_some() {
                    return Err(bad("too many fields"));
                }
                tokens.add(secret, role, name)?;
            }
        }
        Ok(tokens)
    }

    fn add(&mut self, secret: &str, role: Role, name: &str) -> Result<(), TokenError> {
        // Regression: sixteen spaces passed the length check and then matched nothing.
        if secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(TokenError::Unusable {
                role: role.as_str(),
            });
        }
        if secret.chars().count() < 16 {
            return Err(TokenError::Weak {
                role: role.as_str(),
            });
        }
        self.tokens.push(Token {
            secret: secret.to_owned(),
            role,
            name: name.to_owned(),
        });
        Ok(())
    }

    /// No token configured.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The role and name a secret grants, compared in constant time.
    #[must_use]
    pub fn check(&self, secret: &str) -> Option<(Role, String)> {
        let mut found = None;
        for t in &self.tokens {
            if bool::from(t.secret.as_bytes().ct_eq(secret.as_bytes())) {
                found = Some((t.role, t.name.clone()));
            }
        }
        found
    }
}

/// How a caller proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// No tokens configured; a loopback caller.
    Open,
    /// `Authorization: Bearer`.
    Bearer,
    /// The UI's session cookie.
    Session,
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Their role.
    pub role: Role,
    /// How they authenticated.
    pub via: Via,
    /// Their CSRF token (for forms).
    pub csrf: String,
    /// Who, for the audit log.
    pub actor: String,
}

impl Caller {
    /// Whether a form's CSRF token is this caller's.
    #[must_use]
    pub fn csrf_ok(&self, presented: &str) -> bool {
        !self.csrf.is_empty() && bool::from(self.csrf.as_bytes().ct_eq(presented.as_bytes()))
    }
}

struct Session {
    role: Role,
    name: String,
    csrf: String,
    expires: Instant,
}

/// Access control state.
pub struct Auth {
    tokens: Tokens,
    sessions: Mutex<HashMap<String, Session>>,
    /// The form token used when no tokens are configured (one per process).
    open_csrf: String,
    /// When recent sign-ins failed, newest last: past [`SIGN_IN_FAILURES`] within
    /// [`SIGN_IN_WINDOW`] the form answers 429 without looking at the token.
    failures: Mutex<std::collections::VecDeque<Instant>>,
    /// Session cookies carry `Secure` (the UI is served over HTTPS, say by a proxy).
    secure_cookies: bool,
}

/// Failed sign-ins allowed per [`SIGN_IN_WINDOW`], across all callers.
pub const SIGN_IN_FAILURES: usize = 10;
/// The window over which failed sign-ins are counted.
pub const SIGN_IN_WINDOW: Duration = Duration::from_secs(60);

/// What a sign-in attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignIn {
    /// Signed in: the new session's id.
    Session(String),
    /// The token is not valid.
    Refused,
    /// Too many failed attempts lately; try again after this long.
    Limited(Duration),
}

/// A random secret: two UUIDv4s from the OS random source (244 random bits).
fn random_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

impl Auth {
    /// Access control with these tokens.
    #[must_use]
    pub fn new(tokens: Tokens) -> Self {
        Self {
            tokens,
            sessions: Mutex::default(),
            open_csrf: random_secret(),
            failures: Mutex::default(),
            secure_cookies: false,
        }
    }

    /// Marks session cookies `Secure`, for a UI served over HTTPS (`serve
    /// --cookie-secure`, behind a TLS-terminating proxy).
    #[must_use]
    pub fn with_secure_cookies(mut self, secure: bool) -> Self {
        self.secure_cookies = secure;
        self
    }

    /// The `Set-Cookie` value for a session id (an empty one, with `expire`, signs out).
    #[must_use]
    pub fn session_cookie(&self, id: &str, expire: bool) -> String {
        let age = if expire { 0 } else { SESSION_TTL.as_secs() };
        let secure = if self.secure_cookies { "; Secure" } else { "" };
        format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={age}{secure}")
    }

    /// Whether callers need no token.
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Refuses a non-loopback bind without tokens.
    ///
    /// # Errors
    ///
    /// Returns the message to show when the bind is not allowed.
    pub fn check_bind(&self, addr: SocketAddr) -> Result<(), String> {
        if addr.ip().is_loopback() || !self.is_open() {
            return Ok(());
        }
        Err(format!(
            "refusing to listen on {addr} without an access token: anyone who can reach that address could \
             read payloads and replay or purge messages. Set REDRIVE_TOKEN (operator) and optionally \
             REDRIVE_VIEWER_TOKEN, or pass --token-file, or bind to 127.0.0.1"
        ))
    }

    /// The caller for a bearer token or a session cookie; in open mode, the local operator.
    #[must_use]
    pub fn identify(&self, bearer: Option<&str>, session: Option<&str>) -> Option<Caller> {
        if self.is_open() {
            return Some(Caller {
                role: Role::Operator,
                via: Via::Open,
                csrf: self.open_csrf.clone(),
                actor: "local".into(),
            });
        }
        if let Some(secret) = bearer {
            return self.tokens.check(secret).map(|(role, name)| Caller {
                role,
                via: Via::Bearer,
                csrf: String::new(),
                actor: format!("api:{name}"),
            });
        }
        let id = session?;
        let mut sessions = self.sessions.lock().ok()?;
        sessions.retain(|_, s| s.expires > Instant::now());
        sessions.get(id).map(|s| Caller {
            role: s.role,
            via: Via::Session,
            csrf: s.csrf.clone(),
            actor: format!("ui:{}", s.name),
        })
    }

    /// Signs in with a token. Past [`SIGN_IN_FAILURES`] failures within
    /// [`SIGN_IN_WINDOW`] every attempt is [`SignIn::Limited`], the token not even
    /// compared: guessing tokens through the form takes that long per ten guesses.
    #[must_use]
    pub fn sign_in(&self, secret: &str) -> SignIn {
        let now = Instant::now();
        {
            let mut failures = self
                .failures
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            while failures
                .front()
                .is_some_and(|t| now.duration_since(*t) >= SIGN_IN_WINDOW)
            {
                failures.pop_front();
            }
            if failures.len() >= SIGN_IN_FAILURES {
                let oldest = failures.front().copied().unwrap_or(now);
                return SignIn::Limited(SIGN_IN_WINDOW.saturating_sub(now.duration_since(oldest)));
            }
        }
        match self.session_for(secret) {
            Some(id) => SignIn::Session(id),
            None => {
                self.failures
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push_back(now);
                SignIn::Refused
            }
        }
    }

    fn session_for(&self, secret: &str) -> Option<String> {
        let (role, name) = self.tokens.check(secret.trim())?;
        let id = secret_id();
        let session = Session {
            role,
            name,
            csrf: random_secret(),
            expires: Instant::now() + SESSION_TTL,
        };
        self.sessions.lock().ok()?.insert(id.clone(), session);
        Some(id)
    }

    /// Ends a session.
    pub fn sign_out(&self, id: &str) {
        if let Ok(mut s) = self.sessions.lock() {
            s.remove(id);
        }
    }
}

fn secret_id() -> String {
    random_secret()
}

/// The session id from the request's `Cookie` headers, if any.
#[must_use]
pub fn session_cookie(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// Whether a `Host` header names a loopback address (open mode accepts no other).
#[must_use]
pub fn loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OP: &str = "operator-secret-0123456789";
    const VIEW: &str = "viewer-secret-0123456789";

    #[test]
    fn roles_from_tokens() {
        let t = Tokens::load(Some(OP), Some(VIEW), None).unwrap();
        assert_eq!(t.check(OP).map(|r| r.0), Some(Role::Operator));
        assert_eq!(t.check(VIEW).map(|r| r.0), Some(Role::Viewer));
        assert_eq!(t.check("operator-secret-012345678"), None);
        assert_eq!(t.check(""), None);
        assert!(
            !format!("{t:?}").contains("secret"),
            "debug output hides tokens"
        );
    }

    #[test]
    fn a_token_no_request_could_present_is_refused() {
        for secret in [
            " ".repeat(20),
            format!("{OP} more"),
            format!("{OP}\n"),
            format!("\t{OP}"),
        ] {
            let err = Tokens::load(Some(&secret), None, None).unwrap_err();
            assert!(
                matches!(err, TokenError::Unusable { role: "operator" }),
                "{secret:?}: {err}"
            );
        }
        let err = Tokens::load(None, Some(&" ".repeat(16)), None).unwrap_err();
        assert!(
            err.to_string().contains("viewer token contains a space"),
            "{err}"
        );
    }

    #[test]
    fn token_file_is_checked_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(
            &path,
            "# who may do what\noperator aaaaaaaaaaaaaaaaaaaa alice\nviewer bbbbbbbbbbbbbbbbbbbb\n",
        )
        .unwrap();
        let t = Tokens::load(None, None, Some(&path)).unwrap();
        assert_eq!(
            t.check("aaaaaaaaaaaaaaaaaaaa"),
            Some((Role::Operator, "alice".into()))
        );
        std::fs::write(
            &path,
            "operator aaaaaaaaaaaaaaaaaaaa\nadmin cccccccccccccccccccc\n",
        )
        .unwrap();
        let err = Tokens::load(None, None, Some(&path))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && err.contains("unknown role"),
            "{err}"
        );
        assert!(matches!(
            Tokens::load(Some("short"), None, None),
            Err(TokenError::Weak { .. })
        ));
    }

    #[test]
    fn binds_need_a_token_off_loopback() {
        let open = Auth::new(Tokens::default());
        assert!(open.check_bind("127.0.0.1:8080".parse().unwrap()).is_ok());
        assert!(open.check_bind("[::1]:8080".parse().unwrap()).is_ok());
        let err = open
            .check_bind("0.0.0.0:8080".parse().unwrap())
            .unwrap_err();
        assert!(err.contains("REDRIVE_TOKEN"), "{err}");
        let closed = Auth::new(Tokens::load(Some(OP), None, None).unwrap());
        assert!(closed.check_bind("0.0.0.0:8080".parse().unwrap()).is_ok());
    }

    #[test]
    fn sessions_carry_role_and_csrf() {
        let auth = Auth::new(Tokens::load(Some(OP), Some(VIEW), None).unwrap());
        assert_eq!(auth.sign_in("wrong-token-wrong-token"), SignIn::Refused);
        let SignIn::Session(id) = auth.sign_in(VIEW) else {
            panic!("a valid token signs in")
        };
        let caller = auth.identify(None, Some(&id)).unwrap();
        assert_eq!((caller.role, caller.via), (Role::Viewer, Via::Session));
        assert!(caller.csrf_ok(&caller.csrf.clone()) && !caller.csrf_ok("forged"));
        auth.sign_out(&id);
        assert!(auth.identify(None, Some(&id)).is_none());
        assert!(auth.identify(None, None).is_none());
    }

    #[test]
    fn loopback_hosts() {
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "[::1]:8080",
            "localhost",
            "127.0.0.2",
        ] {
            assert!(loopback_host(host), "{host}");
        }
        for host in [
            "evil.example:8080",
            "192.168.1.10:8080",
            "127.0.0.1.evil.example",
        ] {
            assert!(!loopback_host(host), "{host}");
        }
    }
}
