//! Handlers for agents written in any language: run a command per message (`--exec`),
//! POST it to an HTTP endpoint (`--webhook`), or hand it to long-lived worker processes
//! (`--worker`). Both map their results onto redrive's
//! outcomes as docs/design.md tabulates ("Outcomes").

mod exec;
mod group;
mod webhook;
mod worker;

pub use exec::{EX_DATAERR, EX_TEMPFAIL, ExecHandler};
pub use webhook::{WebhookError, WebhookHandler};
pub use worker::{PROTOCOL_VERSION, WorkerHandler};

/// A structured result, as a worker answers, an `--exec` command writes to
/// `$REDRIVE_RESULT_FILE`, or a webhook returns as a JSON body: the outcome, the error
/// class and message, how long to wait before a retry, and the agent context (model,
/// tool, cost) of a failed attempt.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Structured {
    /// The delivery a worker's result answers (worker results only).
    #[serde(default)]
    id: Option<String>,
    outcome: String,
    #[serde(default)]
    class: Option<String>,
    #[serde(default)]
    message: Option<String>,
    /// Seconds before the retry may run.
    #[serde(default)]
    retry_after: Option<f64>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    tool: Option<String>,
    #[serde(default)]
    cost: Option<redrive_core::CostJson>,
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
        let (model, tool, cost) = (self.model, self.tool, self.cost);
        let with_agent = |mut e: HandlerError| {
            if let Some(model) = model {
                e = e.with_model(model);
            }
            if let Some(tool) = tool {
                e = e.with_tool(tool);
            }
            e.with_cost(cost.map(Into::into).unwrap_or_default())
        };
        let result = match self.outcome.as_str() {
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
        };
        result.map_err(with_agent)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn result_of(json: &str) -> redrive_core::HandlerResult {
        Structured::parse(json.as_bytes())
            .expect("has an outcome")
            .expect("reads")
            .into_result()
    }

    #[test]
    fn a_structured_failure_carries_model_tool_and_cost() {
        let err = result_of(
            r#"{"outcome":"retry","class":"RateLimited","retry_after":2,"model":"gpt-4o","tool":"search",
                "cost":{"input_tokens":1200,"output_tokens":300,"usd":0.0042}}"#,
        )
        .unwrap_err();
        assert_eq!(err.class(), "RateLimited");
        assert_eq!(
            err.requested_delay(),
            Some(std::time::Duration::from_secs(2))
        );
        let agent = err.agent();
        assert_eq!(
            (agent.model.as_deref(), agent.tool.as_deref()),
            (Some("gpt-4o"), Some("search"))
        );
        assert_eq!(agent.cost, redrive_core::Cost::new(1200, 300, 0.0042));
        // Each cost field is optional; none at all is no cost.
        let err = result_of(r#"{"outcome":"poison","cost":{"usd":1}}"#).unwrap_err();
        assert_eq!(err.agent().cost.usd_micros, 1_000_000);
        assert!(
            result_of(r#"{"outcome":"poison"}"#)
                .unwrap_err()
                .agent()
                .is_empty()
        );
        assert!(result_of(r#"{"outcome":"ok","cost":{"usd":1}}"#).is_ok());
        // A cost of the wrong shape makes the document unreadable, said as such.
        let bad = Structured::parse(br#"{"outcome":"retry","cost":{"input_tokens":-1}}"#).unwrap();
        assert!(bad.is_err());
    }
}
