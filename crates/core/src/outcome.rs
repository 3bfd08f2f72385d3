//! What a handler answers, and how each answer is classified into a failure.
//!
//! | answer | meaning |
//! |---|---|
//! | `Ok(())` | done: acknowledge |
//! | `Err(HandlerError::retry(..))` | transient: next retry tier |
//! | `Err(HandlerError::retry_after(d, ..))` | transient, and wait at least `d` |
//! | `Err(HandlerError::poison(..))` | permanently invalid: straight to the DLQ |
//! | `Err(HandlerError::crashed_beside_others(..))` | the process running it died while it ran beside others: run it alone to find the culprit |
//!
//! Panics, timeouts and lease expiry are classified by the runner, not the handler.

use std::time::Duration;

use crate::agent::{AgentContext, Cost, agent_name};
use crate::envelope::{Failure, FailureKind};

/// What a handler returns.
pub type HandlerResult = Result<(), HandlerError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Retry,
    RetryAfter(Duration),
    Poison,
    Suspect,
    Crashed,
}

/// A handler's failure: transient (retry, optionally after a delay) or poison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    verdict: Verdict,
    class: String,
    message: String,
    /// Boxed: most failures carry none, and a handler's `Result` stays small.
    agent: Option<Box<AgentContext>>,
}

impl HandlerError {
    /// A transient failure: the message moves to the next retry tier.
    #[must_use]
    pub fn retry(class: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Retry,
            class: class.into(),
            message: message.into(),
            agent: None,
        }
    }

    /// A transient failure that should not be retried before `delay` (an HTTP
    /// `Retry-After`, a rate limiter's reset time).
    #[must_use]
    pub fn retry_after(
        delay: Duration,
        class: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            verdict: Verdict::RetryAfter(delay),
            class: class.into(),
            message: message.into(),
            agent: None,
        }
    }

    /// A permanent failure: the message goes to the DLQ at once, without retries.
    #[must_use]
    pub fn poison(class: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Poison,
            class: class.into(),
            message: message.into(),
            agent: None,
        }
    }

    /// The process running the message (a worker) died while it ran this message beside
    /// others, so any of them may have killed it. The runner moves the message to the
    /// isolation lane uncounted, to run alone; where it cannot (a backend that does not
    /// isolate, or the message already ran alone), it counts as a crash of this message.
    #[must_use]
    pub fn crashed_beside_others(class: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Suspect,
            class: class.into(),
            message: message.into(),
            agent: None,
        }
    }

    /// The process running the message (a worker) died while it ran this message alone:
    /// the crash is this message's, counted as one, and the message runs alone from now
    /// on.
    #[must_use]
    pub fn crashed(class: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Crashed,
            class: class.into(),
            message: message.into(),
            agent: None,
        }
    }

    /// A transient failure from any error; the class is the error type's short name.
    #[must_use]
    pub fn from_error<E: std::error::Error>(error: &E) -> Self {
        Self::retry(short_type_name::<E>(), error.to_string())
    }

    /// Names the model the attempt called (kept with the failure, shown in triage).
    #[must_use]
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.agent.get_or_insert_default().model = agent_name(model);
        self
    }

    /// Names the tool the attempt was running when it failed.
    #[must_use]
    pub fn with_tool(mut self, tool: impl Into<String>) -> Self {
        self.agent.get_or_insert_default().tool = agent_name(tool);
        self
    }

    /// What the failed attempt cost: triage sums it per message and per error group,
    /// and `/metrics` per queue and class.
    #[must_use]
    pub fn with_cost(mut self, cost: Cost) -> Self {
        if self.agent.is_some() || !cost.is_zero() {
            self.agent.get_or_insert_default().cost = cost;
        }
        self
    }

    /// The model, tool and cost attached to this failure.
    #[must_use]
    pub fn agent(&self) -> &AgentContext {
        static NONE: AgentContext = AgentContext {
            model: None,
            tool: None,
            cost: Cost::ZERO,
        };
        self.agent.as_deref().unwrap_or(&NONE)
    }

    /// Whether this is a poison verdict.
    #[must_use]
    pub fn is_poison(&self) -> bool {
        self.verdict == Verdict::Poison
    }

    /// The error class.
    #[must_use]
    pub fn class(&self) -> &str {
        &self.class
    }

    /// The delay the handler asked for, if any.
    #[must_use]
    pub fn requested_delay(&self) -> Option<Duration> {
        match self.verdict {
            Verdict::RetryAfter(d) => Some(d),
            _ => None,
        }
    }

    fn kind(&self) -> FailureKind {
        match self.verdict {
            Verdict::Poison => FailureKind::Poison,
            // A crash is recorded as the consumer stopping without an outcome, which is
            // what makes a message run alone from then on.
            Verdict::Suspect | Verdict::Crashed => FailureKind::LeaseExpired,
            Verdict::Retry | Verdict::RetryAfter(_) => FailureKind::Retry,
        }
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.class, self.message)
    }
}

impl std::error::Error for HandlerError {}

/// The classified end of one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The handler succeeded.
    Ok,
    /// The attempt failed.
    Failed {
        /// The failure to record.
        failure: Failure,
        /// A delay the handler asked for.
        retry_after: Option<Duration>,
    },
    /// The process running the message died beside others
    /// ([`HandlerError::crashed_beside_others`]): a crash suspect, to be run alone. The
    /// failure is what is counted where it cannot be.
    Suspect {
        /// The crash, as it is recorded.
        failure: Failure,
    },
}

impl Outcome {
    /// Classifies a handler's result.
    #[must_use]
    pub fn from_result(result: HandlerResult, at_ms: i64) -> Self {
        match result {
            Ok(()) => Self::Ok,
            Err(e) => {
                let retry_after = e.requested_delay();
                let suspect = e.verdict == Verdict::Suspect;
                let mut failure = Failure::new(e.kind(), e.class, e.message, at_ms);
                if let Some(agent) = e.agent {
                    failure.agent = *agent;
                }
                if suspect {
                    Self::Suspect { failure }
                } else {
                    Self::Failed {
                        failure,
                        retry_after,
                    }
                }
            }
        }
    }

    /// The handler ran past its timeout.
    #[must_use]
    pub fn timeout(limit: Duration, at_ms: i64) -> Self {
        let message = format!(
            "handler did not finish within {}",
            crate::format_duration(limit)
        );
        Self::failed(Failure::new(
            FailureKind::Timeout,
            "timeout",
            message,
            at_ms,
        ))
    }

    /// The handler panicked.
    #[must_use]
    pub fn panic(message: &str, at_ms: i64) -> Self {
        Self::failed(Failure::new(FailureKind::Panic, "panic", message, at_ms))
    }

    /// The previous delivery's lease expired without an outcome.
    #[must_use]
    pub fn lease_expired(at_ms: i64) -> Self {
        let message = "the previous delivery ended without an outcome (consumer crashed, was killed, or its lease expired)";
        Self::failed(Failure::new(
            FailureKind::LeaseExpired,
            "lease_expired",
            message,
            at_ms,
        ))
    }

    /// The previous delivery, which ran alone in its process, ended without an outcome:
    /// the consumer stopped while running nothing else, so the crash is this message's.
    #[must_use]
    pub fn crashed_alone(at_ms: i64) -> Self {
        let message = "its consumer stopped while running this message alone (it crashed, was killed, or its lease expired): the crash is counted against it";
        Self::failed(Failure::new(
            FailureKind::LeaseExpired,
            "lease_expired",
            message,
            at_ms,
        ))
    }

    fn failed(failure: Failure) -> Self {
        Self::Failed {
            failure,
            retry_after: None,
        }
    }
}

/// `my_crate::errors::RateLimited` → `RateLimited`.
fn short_type_name<T>() -> String {
    let full = std::any::type_name::<T>();
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_classify_into_outcomes() {
        let table: [(HandlerResult, Option<(FailureKind, &str, Option<Duration>)>); 4] = [
            (Ok(()), None),
            (
                Err(HandlerError::retry("RateLimited", "slow down")),
                Some((FailureKind::Retry, "RateLimited", None)),
            ),
            (
                Err(HandlerError::retry_after(
                    Duration::from_secs(7),
                    "http_429",
                    "busy",
                )),
                Some((FailureKind::Retry, "http_429", Some(Duration::from_secs(7)))),
            ),
            (
                Err(HandlerError::poison("SchemaError", "missing field")),
                Some((FailureKind::Poison, "SchemaError", None)),
            ),
        ];
        for (result, want) in table {
            let got = match Outcome::from_result(result, 5) {
                Outcome::Ok => None,
                Outcome::Failed {
                    failure,
                    retry_after,
                } => {
                    assert_eq!(failure.at_ms, 5);
                    Some((failure.kind, failure.class.clone(), retry_after))
                }
                Outcome::Suspect { .. } => panic!("no crash in this table"),
            };
            assert_eq!(got, want.map(|(k, c, d)| (k, c.to_owned(), d)));
        }
    }

    #[test]
    fn runner_outcomes_have_stable_classes() {
        for (outcome, class, kind) in [
            (
                Outcome::timeout(Duration::from_secs(30), 0),
                "timeout",
                FailureKind::Timeout,
            ),
            (Outcome::panic("boom", 0), "panic", FailureKind::Panic),
            (
                Outcome::lease_expired(0),
                "lease_expired",
                FailureKind::LeaseExpired,
            ),
        ] {
            let Outcome::Failed { failure, .. } = outcome else {
                panic!("expected a failure")
            };
            assert_eq!((failure.class.as_str(), failure.kind), (class, kind));
        }
    }

    #[test]
    fn worker_crashes_are_suspects_beside_others_and_counted_alone() {
        let Outcome::Suspect { failure } = Outcome::from_result(
            Err(HandlerError::crashed_beside_others(
                "worker_crashed",
                "exit 9",
            )),
            1,
        ) else {
            panic!("expected a suspect")
        };
        assert_eq!(failure.kind, FailureKind::LeaseExpired);
        let Outcome::Failed { failure, .. } =
            Outcome::from_result(Err(HandlerError::crashed("worker_crashed", "exit 9")), 1)
        else {
            panic!("expected a failure")
        };
        assert_eq!(
            (failure.kind, failure.class.as_str()),
            (FailureKind::LeaseExpired, "worker_crashed")
        );
    }

    #[test]
    fn agent_context_goes_with_the_failure() {
        let err = HandlerError::retry("http_503", "down")
            .with_model("claude-sonnet")
            .with_tool(" ")
            .with_cost(Cost::new(10, 5, 0.25));
        let Outcome::Failed { failure, .. } = Outcome::from_result(Err(err), 1) else {
            panic!("expected a failure")
        };
        assert_eq!(failure.agent.model.as_deref(), Some("claude-sonnet"));
        assert_eq!(failure.agent.tool, None, "a blank tool is none");
        assert_eq!(failure.agent.cost.usd_micros, 250_000);
    }

    #[test]
    fn errors_are_classed_by_type_name() {
        let err = "x".parse::<u32>().unwrap_err();
        assert_eq!(HandlerError::from_error(&err).class(), "ParseIntError");
    }
}
