//! `--webhook URL`: POST each payload to an HTTP endpoint.
//!
//! | response | outcome |
//! |---|---|
//! | 2xx | ok |
//! | 429 or 503 with `Retry-After` | retry, not before that delay |
//! | 5xx, 408, 429, connection error, timeout | retry |
//! | other 4xx | poison |
//!
//! A JSON response body with an `outcome` (`{"outcome": "retry", "class":
//! "RateLimited", "message": "…", "retry_after": 30}`, as a worker answers;
//! docs/worker-protocol.md) decides instead of the status, whatever the status.

use std::time::Duration;

use redrive_core::{Envelope, HandlerError, HandlerResult, MAX_ERROR_BYTES};
use redrive_runner::Handler;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::{Structured, Tail};

/// The webhook handler could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookError {
    /// The URL is not http(s).
    #[error("invalid webhook URL {0:?}: expected http:// or https://")]
    Url(String),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// POSTs each message to a URL.
#[derive(Debug, Clone)]
pub struct WebhookHandler {
    client: reqwest::Client,
    url: reqwest::Url,
    /// The URL without path and query, for error messages: webhook URLs often carry a
    /// secret (Slack-style tokens in the path), and error messages are stored.
    shown: String,
}

impl WebhookHandler {
    /// A handler posting to `url`, giving up on a request after `timeout`.
    ///
    /// # Errors
    ///
    /// Fails when `url` is not an http(s) URL.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, WebhookError> {
        let parsed = reqwest::Url::parse(url).map_err(|_| WebhookError::Url(url.to_owned()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(WebhookError::Url(url.to_owned()));
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("redrive/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let shown = format!(
            "{}://{}/…",
            parsed.scheme(),
            parsed.host_str().unwrap_or("?")
        );
        let shown = match parsed.port() {
            Some(port) => shown.replacen("/…", &format!(":{port}/…"), 1),
            None => shown,
        };
        Ok(Self {
            client,
            url: parsed,
            shown,
        })
    }

    fn headers(msg: &Envelope) -> HeaderMap {
        let mut map = HeaderMap::new();
        let content_type = if serde_json_like(&msg.payload) {
            "application/json"
        } else {
            "application/octet-stream"
        };
        map.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static(content_type),
        );
        let mut put = |name: &str, value: &str| {
            // Header values cannot hold newlines; such values (multi-line errors) are
            // left out rather than mangled.
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                map.append(n, v);
            }
        };
        for (name, value) in msg.to_wire() {
            put(&name, &value);
        }
        put("redrive-queue", msg.queue.as_str());
        if let Some(key) = &msg.key {
            put("redrive-key", key);
        }
        map
    }
}

/// The error and its causes, without the URL reqwest puts in its own message.
fn error_chain(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    if parts.is_empty() {
        "request failed".to_owned()
    } else {
        parts.join(": ")
    }
}

fn serde_json_like(payload: &[u8]) -> bool {
    matches!(
        payload.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'{' | b'[')
    )
}

/// Reads `Retry-After` in its delay-seconds form.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

impl Handler for WebhookHandler {
    async fn handle(&self, msg: Envelope) -> HandlerResult {
        let headers = Self::headers(&msg);
        let response = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .body(msg.payload)
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(HandlerError::retry(
                    "http_timeout",
                    format!("POST {} timed out", self.shown),
                ));
            }
            Err(e) => {
                return Err(HandlerError::retry(
                    "http_connect",
                    format!("POST {} failed: {}", self.shown, error_chain(&e)),
                ));
            }
        };
        let status = response.status();
        let json = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if status.is_success() && !json {
            return Ok(());
        }
        let wait = retry_after(response.headers());
        let body = response.bytes().await.unwrap_or_default();
        if json {
            match Structured::parse(&body[..body.len().min(64 * 1024)]) {
                Some(Ok(structured)) => return structured.into_result(),
                Some(Err(why)) => {
                    tracing::warn!(url = %self.shown, reason = %why, "ignoring a JSON result that does not read; the HTTP status decides");
                }
                None => {}
            }
        }
        if status.is_success() {
            return Ok(());
        }
        let mut tail = Tail::new(MAX_ERROR_BYTES);
        tail.push(&body);
        let body = tail.text();
        let class = format!("http_{}", status.as_u16());
        let message = if body.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {body}")
        };
        let code = status.as_u16();
        Err(match (code, wait) {
            (429 | 503, Some(wait)) => HandlerError::retry_after(wait, class, message),
            (408 | 429, _) | (500..=599, _) => HandlerError::retry(class, message),
            _ => HandlerError::poison(class, message),
        })
    }
}

#[cfg(test)]
mod tests {
    use redrive_core::{FailureKind, Outcome, QueueName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A one-shot HTTP server that answers every request with `response`.
    async fn server(response: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = vec![0u8; 65536];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            }
        });
        format!("http://{addr}/hook")
    }

    async fn outcome(response: &'static str) -> Outcome {
        let url = server(response).await;
        let handler = WebhookHandler::new(&url, Duration::from_secs(5)).unwrap();
        let msg = Envelope::new(QueueName::new("agent.tasks").unwrap(), "{\"task\":1}");
        Outcome::from_result(handler.handle(msg).await, 0)
    }

    #[tokio::test]
    async fn status_codes_map_to_outcomes() {
        let table: [(&'static str, Option<(&str, FailureKind, Option<Duration>)>); 9] = [
            ("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", None),
            (
                "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops",
                Some(("http_500", FailureKind::Retry, None)),
            ),
            (
                "HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n",
                Some(("http_408", FailureKind::Retry, None)),
            ),
            (
                "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n",
                Some(("http_429", FailureKind::Retry, Some(Duration::from_secs(7)))),
            ),
            (
                "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\nContent-Length: 0\r\n\r\n",
                Some(("http_503", FailureKind::Retry, Some(Duration::from_secs(2)))),
            ),
            (
                "HTTP/1.1 422 Unprocessable Entity\r\nContent-Length: 9\r\n\r\nbad field",
                Some(("http_422", FailureKind::Poison, None)),
            ),
            // A JSON body with an outcome decides, whatever the status.
            (
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 57\r\n\r\n{\"outcome\":\"retry\",\"class\":\"RateLimited\",\"retry_after\":3}",
                Some((
                    "RateLimited",
                    FailureKind::Retry,
                    Some(Duration::from_secs(3)),
                )),
            ),
            (
                "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: 42\r\n\r\n{\"outcome\":\"poison\",\"class\":\"SchemaError\"}",
                Some(("SchemaError", FailureKind::Poison, None)),
            ),
            // Without an outcome, the status decides.
            (
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}",
                None,
            ),
        ];
        for (response, want) in table {
            let got = match outcome(response).await {
                Outcome::Ok => None,
                Outcome::Failed {
                    failure,
                    retry_after,
                } => Some((failure.class, failure.kind, retry_after)),
                Outcome::Suspect { failure } => Some((failure.class, failure.kind, None)),
            };
            assert_eq!(
                got,
                want.map(|(c, k, d)| (c.to_owned(), k, d)),
                "{response}"
            );
        }
    }

    #[tokio::test]
    async fn unreachable_endpoint_is_a_retry() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        drop(listener);
        let handler = WebhookHandler::new(&url, Duration::from_secs(2)).unwrap();
        let err = handler
            .handle(Envelope::new(QueueName::new("q").unwrap(), "x"))
            .await
            .unwrap_err();
        assert_eq!((err.class(), err.is_poison()), ("http_connect", false));
    }

    #[tokio::test]
    async fn error_messages_do_not_carry_the_url_path() {
        // Webhook URLs often embed a secret token in the path; errors are stored.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/services/T000/SECRET-TOKEN?key=hunter2",
            listener.local_addr().unwrap()
        );
        drop(listener);
        let handler = WebhookHandler::new(&url, Duration::from_secs(2)).unwrap();
        let msg = Envelope::new(QueueName::new("q").unwrap(), "x");
        let text = format!("{:?}", Outcome::from_result(handler.handle(msg).await, 0));
        assert!(
            !text.contains("SECRET") && !text.contains("hunter2"),
            "{text}"
        );
        assert!(text.contains("127.0.0.1"), "{text}");
    }

    #[test]
    fn refuses_non_http_urls() {
        for url in ["ftp://x", "not a url", "file:///etc/passwd"] {
            assert!(
                WebhookHandler::new(url, Duration::from_secs(1)).is_err(),
                "{url}"
            );
        }
    }
}
