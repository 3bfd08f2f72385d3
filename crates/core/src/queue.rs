//! Queue names and lanes: `agent.tasks`, `agent.tasks.retry.5s`, `agent.tasks.dlq`.

use std::fmt;
use std::sync::Arc;

use crate::policy::Tier;

/// Longest queue name accepted. Brokers have their own limits (Kafka 249, SQS 80);
/// this leaves room for the `.retry.<tier>` and `.dlq` suffixes under all of them.
pub const MAX_QUEUE_NAME: usize = 64;

/// Why a queue name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The name breaks the naming rule.
    #[error(
        "invalid queue name {name:?}: {reason}; a queue name is 1-{MAX_QUEUE_NAME} characters of \
         letters, digits, '.', '_' and '-', starting with a letter or digit (e.g. agent.tasks)"
    )]
    Invalid {
        /// The refused name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A validated queue name, such as `agent.tasks`. Shared, not copied: every delivery
/// carries one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(Arc<str>);

impl QueueName {
    /// Validates a queue name.
    ///
    /// # Errors
    ///
    /// Returns [`QueueError::Invalid`] when the name is empty, too long, uses other
    /// characters than letters, digits, `.`, `_`, `-`, or ends in a lane suffix
    /// (`.dlq`, `.isolated`, `.retry.*`), which would make lane names ambiguous.
    pub fn new(name: impl Into<String>) -> Result<Self, QueueError> {
        let name = name.into();
        let invalid = |reason| QueueError::Invalid {
            name: name.clone(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("it is empty"));
        }
        if name.len() > MAX_QUEUE_NAME {
            return Err(invalid("it is too long"));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(invalid("it contains a character that is not allowed"));
        }
        if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(invalid("it does not start with a letter or digit"));
        }
        if name.ends_with('.') || name.contains("..") {
            return Err(invalid("it has an empty segment between dots"));
        }
        if name.ends_with(".dlq")
            || name.ends_with(".isolated")
            || name.contains(".retry.")
            || name.ends_with(".retry")
        {
            return Err(invalid(
                "it ends in a lane suffix (.dlq, .isolated or .retry.<tier>)",
            ));
        }
        Ok(Self(name.into()))
    }

    /// The name as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name of one of this queue's lanes, e.g. `agent.tasks.retry.5s`.
    #[must_use]
    pub fn lane_name(&self, lane: &Lane) -> String {
        match lane {
            Lane::Main => self.0.to_string(),
            Lane::Retry(tier) => format!("{}.retry.{tier}", self.0),
            Lane::Isolated => format!("{}.isolated", self.0),
            Lane::Dlq => format!("{}.dlq", self.0),
        }
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for QueueName {
    type Err = QueueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// One lane of a queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Where new and replayed messages arrive.
    Main,
    /// A retry tier, named by its delay (`5s`).
    Retry(String),
    /// Crash suspects: messages whose consumer stopped while they were in flight beside
    /// others, and messages that crashed their consumer before. Each is run alone, so a
    /// crash while it runs is its own.
    Isolated,
    /// The dead-letter queue.
    Dlq,
}

impl Lane {
    /// The short label used in metrics and tables: `main`, `retry.5s`, `dlq`.
    #[must_use]
    pub fn label(&self) -> String {
        match self {
            Self::Main => "main".to_owned(),
            Self::Retry(tier) => format!("retry.{tier}"),
            Self::Isolated => "isolated".to_owned(),
            Self::Dlq => "dlq".to_owned(),
        }
    }

    /// Parses a label written by [`Lane::label`].
    #[must_use]
    pub fn from_label(label: &str) -> Option<Self> {
        match label {
            "main" => Some(Self::Main),
            "isolated" => Some(Self::Isolated),
            "dlq" => Some(Self::Dlq),
            _ => label
                .strip_prefix("retry.")
                .map(|t| Self::Retry(t.to_owned())),
        }
    }
}

/// The lanes a consumer reads: a queue's main lane and its retry tiers.
#[derive(Debug, Clone)]
pub struct LaneSet {
    /// The queue.
    pub queue: QueueName,
    /// Its retry tiers, in order.
    pub tiers: Vec<Tier>,
}

impl LaneSet {
    /// Deliveries a message of this queue gets before it is dead, as its retry policy
    /// counts them ([`crate::RetryPolicy::max_attempts`]).
    #[must_use]
    pub fn max_attempts(&self) -> u32 {
        crate::policy::attempts_for(self.tiers.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_conventional_names() {
        for name in [
            "agent.tasks",
            "a",
            "orders-v2",
            "billing_events.eu-1",
            "9lives",
        ] {
            assert_eq!(QueueName::new(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn refuses_bad_names_saying_why() {
        let table = [
            ("", "it is empty"),
            ("has space", "it contains a character that is not allowed"),
            ("agent/tasks", "it contains a character that is not allowed"),
            ("ünïcode", "it contains a character that is not allowed"),
            (".hidden", "it does not start with a letter or digit"),
            ("agent.", "it has an empty segment between dots"),
            ("a..b", "it has an empty segment between dots"),
            (
                "agent.tasks.dlq",
                "it ends in a lane suffix (.dlq, .isolated or .retry.<tier>)",
            ),
            (
                "agent.tasks.isolated",
                "it ends in a lane suffix (.dlq, .isolated or .retry.<tier>)",
            ),
            (
                "agent.tasks.retry.5s",
                "it ends in a lane suffix (.dlq, .isolated or .retry.<tier>)",
            ),
        ];
        for (name, reason) in table {
            let err = QueueName::new(name).unwrap_err();
            assert_eq!(
                err,
                QueueError::Invalid {
                    name: name.into(),
                    reason
                },
                "{name:?}"
            );
            assert!(
                err.to_string().contains("agent.tasks"),
                "message shows an example"
            );
        }
        assert!(QueueName::new("x".repeat(MAX_QUEUE_NAME + 1)).is_err());
    }

    #[test]
    fn lane_names_follow_the_convention() {
        let q = QueueName::new("agent.tasks").unwrap();
        assert_eq!(q.lane_name(&Lane::Main), "agent.tasks");
        assert_eq!(
            q.lane_name(&Lane::Retry("5s".into())),
            "agent.tasks.retry.5s"
        );
        assert_eq!(q.lane_name(&Lane::Dlq), "agent.tasks.dlq");
        assert_eq!(q.lane_name(&Lane::Isolated), "agent.tasks.isolated");
        for lane in [
            Lane::Main,
            Lane::Retry("30s".into()),
            Lane::Isolated,
            Lane::Dlq,
        ] {
            assert_eq!(Lane::from_label(&lane.label()), Some(lane));
        }
    }
}
