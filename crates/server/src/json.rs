//! The JSON shapes of redrive's public formats: the HTTP API, the CLI's `--json`
//! output and `dlq export`. Converted by hand from core types, so the core's types are
//! not a public format by accident; one definition serves both the API and the CLI.

use base64::Engine as _;
use redrive_core::{CostJson, DeadGroup, DeadLetter, Failure, QueueDepths};
use serde::Serialize;
use serde_json::{Map, Value};

/// Unix ms as RFC 3339 UTC, e.g. `2026-11-27T21:04:05.123Z`.
pub fn rfc3339(ms: i64) -> String {
    // RFC 3339 ends at year 9999 (and the formatter panics past it): a time outside is
    // shown at the nearest end, never allowed to make a page or a listing fail.
    let ms = ms.clamp(0, redrive_core::MAX_TIME_MS);
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// A payload as JSON text, or base64 when it is not UTF-8.
pub fn payload_fields(payload: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(payload) {
        Ok(text) => (text.to_owned(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(payload),
            "base64",
        ),
    }
}

#[derive(Serialize)]
#[allow(missing_docs)]
pub struct FailureJson {
    pub attempt: u32,
    pub at: String,
    pub lane: String,
    pub kind: &'static str,
    pub error_class: String,
    pub error: String,
    pub fingerprint: String,
    /// Whether it counts towards max attempts (a crash that may have been another
    /// message's does not).
    pub counted: bool,
    /// The model the attempt called, when its handler said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The tool it was running, when its handler said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// What the attempt cost, when its handler said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<CostJson>,
}

impl From<&Failure> for FailureJson {
    fn from(f: &Failure) -> Self {
        Self {
            attempt: f.attempt,
            at: rfc3339(f.at_ms),
            lane: f.lane.clone(),
            kind: f.kind.as_str(),
            error_class: f.class.clone(),
            error: f.message.clone(),
            fingerprint: f.fingerprint.to_string(),
            counted: f.counted,
            model: f.agent.model.clone(),
            tool: f.agent.tool.clone(),
            cost: (!f.agent.cost.is_zero()).then(|| f.agent.cost.into()),
        }
    }
}

#[derive(Serialize)]
#[allow(missing_docs)]
pub struct DeadJson {
    pub id: String,
    pub queue: String,
    pub attempts: u32,
    pub replays: u32,
    pub error_class: String,
    pub error: String,
    pub fingerprint: String,
    pub key: Option<String>,
    pub payload: String,
    pub payload_encoding: &'static str,
    pub headers: Map<String, Value>,
    pub first_failed_at: Option<String>,
    pub last_failed_at: Option<String>,
    pub dead_at: String,
    /// What its failed attempts cost, summed (history trimmed or not).
    pub cost: CostJson,
    pub history: Vec<FailureJson>,
}

impl From<&DeadLetter> for DeadJson {
    fn from(d: &DeadLetter) -> Self {
        let env = &d.envelope;
        let last = env.last_failure();
        let (payload, payload_encoding) = payload_fields(&env.payload);
        Self {
            id: env.id.to_string(),
            queue: env.queue.to_string(),
            attempts: env.attempt,
            replays: env.replays,
            error_class: last.map(|f| f.class.clone()).unwrap_or_default(),
            error: last.map(|f| f.message.clone()).unwrap_or_default(),
            fingerprint: last.map(|f| f.fingerprint.to_string()).unwrap_or_default(),
            key: env.key.clone(),
            payload,
            payload_encoding,
            headers: env
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
            first_failed_at: env.first_failed_ms.map(rfc3339),
            last_failed_at: last.map(|f| rfc3339(f.at_ms)),
            dead_at: rfc3339(d.dead_at_ms),
            cost: env.spent.into(),
            history: env.history.iter().map(FailureJson::from).collect(),
        }
    }
}

#[derive(Serialize)]
#[allow(missing_docs)]
pub struct GroupJson {
    pub fingerprint: String,
    pub error_class: String,
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
    pub sample_error: String,
    pub queues: Vec<String>,
    /// Failed attempts of its messages, summed.
    pub attempts: u64,
    /// What those failed attempts cost, summed.
    pub cost: CostJson,
}

impl From<&DeadGroup> for GroupJson {
    fn from(g: &DeadGroup) -> Self {
        Self {
            fingerprint: g.fingerprint.clone(),
            error_class: g.error_class.clone(),
            count: g.count,
            first_seen: rfc3339(g.first_seen_ms),
            last_seen: rfc3339(g.last_seen_ms),
            sample_error: g.sample_error.clone(),
            queues: g.queues.clone(),
            attempts: g.attempts,
            cost: g.spent.into(),
        }
    }
}

#[derive(Serialize)]
#[allow(missing_docs)]
pub struct QueueJson {
    pub queue: String,
    pub main: u64,
    pub retry: Map<String, Value>,
    pub isolated: u64,
    pub dlq: u64,
    pub inflight: u64,
    pub oldest_main_age_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_dead_age_ms: Option<i64>,
    /// Consumers whose outage breaker on the queue is open now.
    pub breakers_open: u64,
}

impl From<&QueueDepths> for QueueJson {
    fn from(d: &QueueDepths) -> Self {
        Self {
            queue: d.queue.clone(),
            main: d.main,
            retry: d
                .retry
                .iter()
                .map(|(t, n)| (t.clone(), Value::from(*n)))
                .collect(),
            isolated: d.isolated,
            dlq: d.dlq,
            inflight: d.inflight,
            oldest_main_age_ms: d.oldest_main_age_ms,
            oldest_dead_age_ms: None,
            breakers_open: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        for (ms, want) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_123, "2000-02-29T00:00:00.123Z"),
            (1_795_900_000_000, "2026-11-28T21:06:40.000Z"),
            (4_102_444_799_999, "2099-12-31T23:59:59.999Z"),
            // Regression: a stored time past year 9999 made every listing panic.
            (300_000_000_000_000, "9999-12-31T23:59:59.999Z"),
            (i64::MAX, "9999-12-31T23:59:59.999Z"),
            (-5, "1970-01-01T00:00:00.000Z"),
        ] {
            assert_eq!(rfc3339(ms), want, "{ms}");
        }
    }
}

/// A replay job, as the API and `dlq jobs --json` show it.
#[derive(Serialize)]
pub struct JobJson {
    /// Its id.
    pub id: String,
    /// `running`, `paused`, `done` or `cancelled`.
    pub state: &'static str,
    /// Why it is paused or how it ended.
    pub note: String,
    /// When it started.
    pub created_at: String,
    /// When its state or a message last changed.
    pub updated_at: String,
    /// Who started it.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// What it selected.
    pub selection: String,
    /// Its target queue, when not each message's own.
    pub to: Option<String>,
    /// How many canaries went first.
    pub canary: u64,
    /// Whether they passed (or a person went on past them).
    pub canary_passed: bool,
    /// Most re-failures tolerated, in percent.
    pub max_failed_percent: f64,
    /// Each key's messages in order.
    pub ordered: bool,
    /// One message, replayed with its payload edited.
    pub edited: bool,
    /// Its messages per state.
    pub counts: redrive_core::JobCounts,
    /// The process running it now, if any.
    pub runner: Option<String>,
}

impl From<&redrive_core::JobView> for JobJson {
    fn from(v: &redrive_core::JobView) -> Self {
        Self {
            id: v.job.id.clone(),
            state: v.state.as_str(),
            note: v.note.clone(),
            created_at: rfc3339(v.job.created_at_ms),
            updated_at: rfc3339(v.updated_at_ms),
            actor: v.job.actor.clone(),
            reason: v.job.reason.clone(),
            selection: v.job.selection.clone(),
            to: v.job.to.clone(),
            canary: v.job.canary,
            canary_passed: v.job.canary_passed,
            max_failed_percent: v.job.max_failed_percent,
            ordered: v.job.ordered,
            edited: v.job.edited,
            counts: v.counts,
            runner: v.runner.clone(),
        }
    }
}

/// One message of a job.
#[derive(Serialize)]
pub struct JobItemJson {
    /// The message.
    pub id: String,
    /// Its key.
    pub key: Option<String>,
    /// Whether it was a canary.
    pub canary: bool,
    /// `pending`, `moved`, `ok`, `failed`, `held` or `skipped`.
    pub state: &'static str,
    /// The new error, or why it was held or skipped.
    pub detail: String,
    /// The error it died of before the job.
    pub was: String,
    /// When its state last changed.
    pub at: String,
}

impl From<&redrive_core::JobItem> for JobItemJson {
    fn from(i: &redrive_core::JobItem) -> Self {
        Self {
            id: i.id.to_string(),
            key: i.key.clone(),
            canary: i.canary,
            state: i.state.as_str(),
            detail: i.detail.clone(),
            was: i.was.clone(),
            at: rfc3339(i.at_ms),
        }
    }
}

/// A job with the messages worth a look: canaries, and those that failed again, were
/// held or skipped.
#[derive(Serialize)]
pub struct JobDetailJson {
    /// The job.
    #[serde(flatten)]
    pub job: JobJson,
    /// Its canaries and the messages that did not go through (at most 1,000).
    pub messages: Vec<JobItemJson>,
}

/// One replay a message went through, for its timeline.
#[derive(Serialize)]
pub struct LineageJson {
    /// The job.
    pub job: String,
    /// Who started it.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// When it started.
    pub started_at: String,
    /// What became of the message: `moved` (no outcome yet), `ok`, `failed`, `held`,
    /// `skipped` or `pending`.
    pub outcome: &'static str,
    /// Its new error, or why it was held or skipped.
    pub detail: String,
    /// When that was known.
    pub at: String,
    /// Whether its payload was edited for this replay.
    pub edited: bool,
}

impl From<&(redrive_core::ReplayJob, redrive_core::JobItem)> for LineageJson {
    fn from((job, item): &(redrive_core::ReplayJob, redrive_core::JobItem)) -> Self {
        Self {
            job: job.id.clone(),
            actor: job.actor.clone(),
            reason: job.reason.clone(),
            started_at: rfc3339(job.created_at_ms),
            outcome: item.state.as_str(),
            detail: item.detail.clone(),
            at: rfc3339(item.at_ms),
            edited: job.edited,
        }
    }
}

/// A dead message with the replay jobs it went through (`GET /api/v1/dead/{id}`,
/// `dlq show --json`).
#[derive(Serialize)]
pub struct DeadDetailJson {
    /// The message.
    #[serde(flatten)]
    pub dead: DeadJson,
    /// Every replay job that covered it, oldest first, with what became of it.
    pub replay_jobs: Vec<LineageJson>,
}
