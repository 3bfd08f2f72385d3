//! Handlers for agents written in any language: run a command per message (`--exec`),
//! POST it to an HTTP endpoint (`--webhook`), or hand it to long-lived worker processes
//! (`--worker`). Both map their results onto redrive's
//! outcomes as docs/design.md tabulates ("Outcomes").

mod exec;
mod webhook;
mod worker;

pub use exec::{EX_DATAERR, EX_TEMPFAIL, ExecHandler};
pub use webhook::{WebhookError, WebhookHandler};
pub use worker::{PROTOCOL_VERSION, WorkerHandler};

/// A structured result, as a worker answers, an `--exec` command writes to
/// `$REDRIVE_RESULT_FILE`, or a webhook returns as a JSON body: the outcome, the error
/// class and message, and how long to wait before a retry.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Structured {
    outcome: String,
    #[serde(default)]
    class: Option<String>,
    #[serde(default)]
    message: Option<String>,
    /// Seconds before the retry may run.
    #[serde(default)]
    retry_after: Option<f64>,
}

impl Structured {
    /// Parses a JSON document with an `outcome`; `None` when there is none, the reason
    /// when the document does not read.
    pub(crate) fn parse(bytes: &[u8]) -> Option<Result<Self, String>> {
        let value: serde_json::Value = match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => return Some(Err(format!("not JSON: {e}"))),
        };
        value.get("outcome")?;
        Some(serde_json::from_value(value).map_err(|e| e.to_string()))
    }

    pub(crate) fn into_result(self) -> redrive_core::HandlerResult {
        use redrive_core::HandlerError;
        let class = self.class.unwrap_or_else(|| self.outcome.clone());
        let message = self.message.unwrap_or_default();
        match self.outcome.as_str() {
            "ok" => Ok(()),
            "poison" => Err(HandlerError::poison(class, message)),
            "retry" => match self.retry_after.filter(|s| s.is_finite() && *s > 0.0) {
                // At most a week: a longer wait is a mistake, not a plan.
                Some(secs) => Err(HandlerError::retry_after(
                    std::time::Duration::from_secs_f64(secs.min(7.0 * 86_400.0)),
                    class,
                    message,
                )),
                None => Err(HandlerError::retry(class, message)),
            },
            other => Err(HandlerError::retry(
                "result_unreadable",
                format!("the handler answered outcome {other:?}; expected ok, retry or poison"),
            )),
        }
    }
}

/// Keeps the last `max` bytes written to it.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    buf: Vec<u8>,
    max: usize,
}

impl Tail {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > self.max * 2 {
            let cut = self.buf.len() - self.max;
            self.buf.drain(..cut);
        }
    }

    pub(crate) fn text(&self) -> String {
        let start = self.buf.len().saturating_sub(self.max);
        String::from_utf8_lossy(&self.buf[start..])
            .trim()
            .to_owned()
    }
}
