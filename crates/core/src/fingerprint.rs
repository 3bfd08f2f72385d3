//! Error fingerprints: a stable hash of the error class and the normalized message, so
//! that failures differing only in numbers, ids, UUIDs or hex group together, the way
//! an error tracker groups events.

use std::fmt;
use std::sync::LazyLock;

use regex::{Captures, Regex};
use sha2::{Digest, Sha256};

/// UUIDs and `0x` literals first, then every alphanumeric token. Underscores and other
/// punctuation separate tokens, so prefixed ids (`req_9f8e7d6c`, `task-42`) normalize too.
static TOKENS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?x)
        (?P<uuid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})
        | (?P<hex0x>0[xX][0-9a-fA-F]+)
        | (?P<token>[0-9A-Za-z]+)
        ",
    )
    .unwrap_or_else(|e| unreachable!("the fingerprint pattern is a valid regex: {e}"))
});

static DIGITS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[0-9]+").unwrap_or_else(|e| unreachable!("valid regex: {e}")));

static SPACES: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\s+").unwrap_or_else(|e| unreachable!("valid regex: {e}")));

/// Replaces the variable parts of an error message with placeholders and folds
/// whitespace: `task 42 timed out after 3.5s (req_9f8e7d6c5b4a)` becomes
/// `task <n> timed out after <n>.<n>s (req_<hex>)`.
///
/// A token of 8 or more hex digits with at least one digit is an id (`<hex>`); a run of
/// letters a-f alone is usually a word ("accepted", "deadbeef") and is kept. Other
/// digit runs become `<n>`, also inside words (`v2`, `task42`).
#[must_use]
pub fn normalize_message(message: &str) -> String {
    let replaced = TOKENS.replace_all(message, |caps: &Captures<'_>| {
        if caps.name("uuid").is_some() {
            return "<uuid>".to_owned();
        }
        if caps.name("hex0x").is_some() {
            return "<hex>".to_owned();
        }
        let token = caps.name("token").map_or("", |m| m.as_str());
        let has_digit = token.bytes().any(|b| b.is_ascii_digit());
        if token.len() >= 8 && has_digit && token.bytes().all(|b| b.is_ascii_hexdigit()) {
            "<hex>".to_owned()
        } else if has_digit {
            DIGITS.replace_all(token, "<n>").into_owned()
        } else {
            token.to_owned()
        }
    });
    SPACES.replace_all(replaced.trim(), " ").into_owned()
}

/// A 16-hex-digit fingerprint of an error class and message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// Fingerprints an error: the class and the normalized message.
    #[must_use]
    pub fn of(class: &str, message: &str) -> Self {
        let mut hash = Sha256::new();
        hash.update(class.as_bytes());
        hash.update([0]);
        hash.update(normalize_message(message).as_bytes());
        let digest = hash.finalize();
        Self(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Wraps a fingerprint read back from storage or a header.
    #[must_use]
    pub fn from_stored(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The fingerprint as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_variable_tokens() {
        let table = [
            ("task 42 failed", "task <n> failed"),
            ("timed out after 3.5s", "timed out after <n>.<n>s"),
            (
                "request req_9f8e7d6c5b4a failed",
                "request req_<hex> failed",
            ),
            ("KeyError: 'task_123'", "KeyError: 'task_<n>'"),
            ("model gpt4o-v2 down", "model gpt<n>o-v<n> down"),
            (
                "id 0194f7a2-7c1e-7b3a-9d2e-3f4a5b6c7d8e gone",
                "id <uuid> gone",
            ),
            ("at 0x7ffd5e8c1a2b", "at <hex>"),
            ("req 9f8e7d6c5b4a missing", "req <hex> missing"),
            ("  many   spaces\n\there ", "many spaces here"),
            ("accepted deadbeef", "accepted deadbeef"),
        ];
        for (input, want) in table {
            assert_eq!(normalize_message(input), want, "{input:?}");
        }
    }

    #[test]
    fn same_error_with_other_values_shares_a_fingerprint() {
        let same = [
            (
                "RateLimited",
                "429 rate limit exceeded, retry in 17s (request 1a2b3c4d5e6f)",
                "429 rate limit exceeded, retry in 3s (request 99ffee00aa11)",
            ),
            (
                "ToolTimeout",
                "tool web_search timed out after 30000 ms",
                "tool web_search timed out after 30001 ms",
            ),
            ("exit_1", "task 50 always fails", "task 200 always fails"),
            (
                "SchemaError",
                "message 0194f7a2-7c1e-7b3a-9d2e-3f4a5b6c7d8e: missing field `task`",
                "message 0194f7a3-0000-7b3a-9d2e-3f4a5b6c7d8f: missing field `task`",
            ),
            (
                "panic",
                "index out of bounds: len is 3 but index is 7",
                "index out of bounds: len is 10 but index is 12",
            ),
        ];
        for (class, a, b) in same {
            assert_eq!(
                Fingerprint::of(class, a),
                Fingerprint::of(class, b),
                "{a:?} vs {b:?}"
            );
        }
    }

    #[test]
    fn different_errors_do_not_share_a_fingerprint() {
        let different = [
            (
                ("RateLimited", "rate limit exceeded"),
                ("RateLimited", "quota exhausted"),
            ),
            (
                ("SchemaError", "missing field `task`"),
                ("SchemaError", "missing field `agent`"),
            ),
            (("exit_1", "task failed"), ("exit_75", "task failed")),
            (
                ("ToolTimeout", "tool web_search timed out"),
                ("ToolTimeout", "tool code_exec timed out"),
            ),
        ];
        for ((ca, ma), (cb, mb)) in different {
            assert_ne!(
                Fingerprint::of(ca, ma),
                Fingerprint::of(cb, mb),
                "{ca}:{ma} vs {cb}:{mb}"
            );
        }
    }

    #[test]
    fn fingerprints_are_stable_across_releases() {
        // Stored fingerprints group old and new failures, so the hash must not drift.
        let fp = Fingerprint::of("exit_1", "task 50 always fails");
        assert_eq!(fp.as_str().len(), 16);
        assert_eq!(fp, Fingerprint::of("exit_1", "task   7 always fails "));
        assert_eq!(fp.as_str(), "5ac1f59ac057aed8");
    }
}
