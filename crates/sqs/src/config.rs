//! `sqs://REGION[?prefix=&endpoint=&wait=]`: where SQS is and how queues are named.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_sqs::config::ProvideCredentials;
use redrive_core::QueueName;

use crate::error::SqsError;
use crate::metrics::CallCount;

/// SQS's limit on queue names.
const MAX_SQS_NAME: usize = 80;

/// How to reach SQS and name the queues.
///
/// Credentials are never part of it: they come from the standard AWS chain
/// (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE` and `~/.aws`, container
/// and instance roles).
#[derive(Clone, Debug)]
pub struct SqsConfig {
    /// The AWS region, e.g. `eu-west-1`.
    pub region: String,
    /// An endpoint other than AWS's (a local SQS-compatible server), from `endpoint=`,
    /// `--sqs-endpoint` or `AWS_ENDPOINT_URL`.
    pub endpoint: Option<String>,
    /// Prepended to every SQS queue name (isolates deployments sharing an account).
    pub prefix: String,
    /// Long-poll wait of one receive, whole seconds 0-20 (default 1).
    pub wait_secs: i32,
}

impl SqsConfig {
    /// Parses `sqs://REGION[?prefix=P&endpoint=URL&wait=SECONDS]`.
    ///
    /// # Errors
    ///
    /// [`SqsError::Config`] naming what is wrong.
    pub fn new(url: &str) -> Result<Self, SqsError> {
        let bad = |what: String| {
            SqsError::Config(format!(
                "--broker {url:?}: {what}; expected sqs://REGION[?prefix=NAME&endpoint=URL&wait=SECONDS] \
                 (e.g. sqs://eu-west-1)"
            ))
        };
        let rest = url
            .strip_prefix("sqs://")
            .ok_or_else(|| bad("not an sqs:// URL".into()))?;
        let (region, query) = rest.split_once('?').unwrap_or((rest, ""));
        let region = region.trim_end_matches('/');
        if region.is_empty()
            || !region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(bad(format!("{region:?} is not an AWS region name")));
        }
        let mut config = Self {
            region: region.to_owned(),
            endpoint: None,
            prefix: String::new(),
            wait_secs: 1,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("prefix", p)) => {
                    if !p
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    {
                        return Err(bad(format!(
                            "prefix {p:?} may only hold letters, digits, '-' and '_'"
                        )));
                    }
                    p.clone_into(&mut config.prefix);
                }
                Some(("endpoint", e)) => {
                    config.set_endpoint(e).map_err(|e| bad(e.to_string()))?;
                }
                Some(("wait", w)) => {
                    config.wait_secs = w
                        .parse()
                        .ok()
                        .filter(|w| (0..=20).contains(w))
                        .ok_or_else(|| bad(format!("wait={w} is not 0 to 20 seconds")))?;
                }
                _ => {
                    return Err(bad(format!(
                        "unknown option {pair:?}; options are prefix=, endpoint=URL and wait=SECONDS"
                    )));
                }
            }
        }
        Ok(config)
    }

    /// Points the client at another endpoint than AWS's (`endpoint=`, `--sqs-endpoint`).
    ///
    /// # Errors
    ///
    /// [`SqsError::Config`] unless it is an `http://` or `https://` URL with a host.
    pub fn set_endpoint(&mut self, url: &str) -> Result<(), SqsError> {
        let host = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .unwrap_or_default();
        if host.is_empty() || host.starts_with('/') {
            return Err(SqsError::Config(format!(
                "SQS endpoint {url:?} is not an http:// or https:// URL with a host \
                 (e.g. http://127.0.0.1:9324)"
            )));
        }
        self.endpoint = Some(url.to_owned());
        Ok(())
    }

    /// The SQS name of `queue`'s main lane: the prefix, then the queue name with each
    /// `.` written as `-` (SQS names hold only letters, digits, `-` and `_`), so
    /// `agent.tasks` is `agent-tasks`.
    #[must_use]
    pub fn sqs_name(&self, queue: &QueueName) -> String {
        format!("{}{}", self.prefix, queue.as_str().replace('.', "-"))
    }

    /// The SQS name of `queue`'s dead-letter queue: [`Self::sqs_name`] + `-dlq`.
    #[must_use]
    pub fn dlq_name(&self, queue: &QueueName) -> String {
        format!("{}-dlq", self.sqs_name(queue))
    }

    /// The SQS name of `queue`'s isolation lane (crash suspects, run alone):
    /// [`Self::sqs_name`] + `-isolated`.
    #[must_use]
    pub fn isolated_name(&self, queue: &QueueName) -> String {
        format!("{}-isolated", self.sqs_name(queue))
    }

    /// Checks that `queue`'s SQS names fit SQS's 80 characters.
    ///
    /// # Errors
    ///
    /// [`SqsError::Config`] naming the queue, its SQS name and the rule.
    pub fn check_name(&self, queue: &QueueName) -> Result<(), SqsError> {
        let longest = self.isolated_name(queue);
        if longest.len() > MAX_SQS_NAME {
            return Err(SqsError::Config(format!(
                "queue {queue} maps to the SQS queues {}, {} and {longest}, over SQS's \
                 {MAX_SQS_NAME} characters (names map '.' to '-', after the prefix {:?}); use a \
                 shorter queue name or prefix",
                self.sqs_name(queue),
                self.dlq_name(queue),
                self.prefix
            )));
        }
        Ok(())
    }

    /// Where SQS is, for messages (never credentials).
    #[must_use]
    pub fn address(&self) -> String {
        let endpoint = self
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL_SQS").ok())
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        match endpoint {
            Some(e) => format!("{e} (region {})", self.region),
            None => format!("sqs.{}.amazonaws.com", self.region),
        }
    }

    /// An SDK client for this configuration, with credentials from the standard chain
    /// checked, and the counter of HTTP calls it makes (every attempt, retries included).
    ///
    /// # Errors
    ///
    /// [`SqsError::Unreachable`] when there are no credentials.
    pub async fn sdk_client(&self) -> Result<(aws_sdk_sqs::Client, CallCount), SqsError> {
        let unreachable = |reason: String| SqsError::Unreachable {
            address: self.address(),
            reason,
        };
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(self.region.clone()))
            // Throttling and transient errors are retried with exponential backoff and
            // jitter by the SDK's standard retry strategy.
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(8)
                    .with_initial_backoff(Duration::from_millis(50))
                    .with_max_backoff(Duration::from_secs(5)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    // Long polls last up to 20 s.
                    .operation_attempt_timeout(Duration::from_secs(30))
                    .build(),
            );
        if let Some(endpoint) = &self.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let shared = loader.load().await;
        let Some(provider) = shared.credentials_provider() else {
            return Err(unreachable(
                "no AWS credentials provider is configured".into(),
            ));
        };
        provider.provide_credentials().await.map_err(|e| {
            unreachable(format!(
                "no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or \
                 AWS_PROFILE with ~/.aws/credentials, or run with an instance/container role): {e}"
            ))
        })?;
        let calls = CallCount::default();
        let config = aws_sdk_sqs::config::Builder::from(&shared)
            .interceptor(calls.clone())
            .build();
        Ok((aws_sdk_sqs::Client::from_conf(config), calls))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_region_and_options() {
        let c =
            SqsConfig::new("sqs://eu-west-1?prefix=prod_&endpoint=http://127.0.0.1:9324&wait=20")
                .expect("valid");
        assert_eq!(c.region, "eu-west-1");
        assert_eq!(c.prefix, "prod_");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9324"));
        assert_eq!(c.wait_secs, 20);
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        for url in [
            "sqs://",
            "sqs://EU WEST",
            "redis://x",
            "sqs://eu-west-1?wait=21",
            "sqs://eu-west-1?prefix=a.b",
            "sqs://eu-west-1?endpoint=ftp://x",
            "sqs://eu-west-1?secret=x",
        ] {
            let e = SqsConfig::new(url).expect_err(url).to_string();
            assert!(e.contains("expected sqs://REGION"), "{url}: {e}");
        }
    }

    #[test]
    fn names_map_dots_to_dashes_and_fit_sqs() {
        let c = SqsConfig::new("sqs://us-east-1?prefix=t1-").expect("valid");
        let q = QueueName::new("agent.tasks").expect("queue");
        assert_eq!(c.sqs_name(&q), "t1-agent-tasks");
        assert_eq!(c.dlq_name(&q), "t1-agent-tasks-dlq");
        assert_eq!(c.isolated_name(&q), "t1-agent-tasks-isolated");
        assert!(c.check_name(&q).is_ok());
        let long =
            SqsConfig::new("sqs://us-east-1?prefix=a-very-long-deployment-prefix-").expect("valid");
        let q = QueueName::new("x".repeat(60)).expect("queue");
        let e = long.check_name(&q).expect_err("too long").to_string();
        assert!(e.contains("over SQS's 80 characters"), "{e}");
    }
}
