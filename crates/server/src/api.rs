//! The JSON API under `/api/v1`, described by `openapi.json`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use redrive_core::{Cursor, DeadFilter, DeadSelection, MessageId, QueueName};
use serde::{Deserialize, Serialize};

use crate::App;
use crate::auth::{Caller, Role, Via};
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::json::{
    DeadDetailJson, DeadJson, GroupJson, JobDetailJson, JobItemJson, JobJson, LineageJson,
    QueueJson,
};
use crate::triage::ReplayRequest;

/// Most items one page may hold.
const MAX_PAGE: usize = 1000;
/// Most ids one bulk request may name.
const MAX_IDS: usize = 10_000;
/// The most canaries a job may ask for.
const MAX_CANARIES: u64 = 1_000_000_000;
/// The fastest replay rate a request may ask for.
const MAX_RATE: u32 = 100_000;

/// Filters shared by listing, grouping, export, replay and purge.
#[derive(Debug, Default, Deserialize, Serialize, Clone)]
pub struct FilterQuery {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this fingerprint.
    pub fingerprint: Option<String>,
    /// Only this error class.
    pub class: Option<String>,
    /// Dead at or after (unix ms).
    pub since_ms: Option<i64>,
    /// Dead before (unix ms).
    pub until_ms: Option<i64>,
    /// Text in the error or the payload.
    pub q: Option<String>,
}

impl FilterQuery {
    /// The core filter; empty strings count as absent (HTML forms send them).
    ///
    /// # Errors
    ///
    /// A bad queue name.
    pub fn to_filter(&self) -> Result<DeadFilter, ApiError> {
        let some = |v: &Option<String>| {
            v.as_ref()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        };
        check_times(self.since_ms, self.until_ms)?;
        Ok(DeadFilter {
            queue: some(&self.queue)
                .map(QueueName::new)
                .transpose()
                .map_err(|e| ApiError::BadRequest(e.to_string()))?,
            fingerprint: some(&self.fingerprint),
            error_class: some(&self.class),
            since_ms: self.since_ms,
            until_ms: self.until_ms,
            text: some(&self.q),
        })
    }
}

/// `since_ms` and `until_ms` must be times redrive can show.
fn check_times(since_ms: Option<i64>, until_ms: Option<i64>) -> Result<(), ApiError> {
    for (name, ms) in [("since_ms", since_ms), ("until_ms", until_ms)] {
        if ms.is_some_and(|ms| !redrive_core::is_valid_time(ms)) {
            return Err(ApiError::BadRequest(format!(
                "{name} must be unix milliseconds from 0 to {}",
                redrive_core::MAX_TIME_MS
            )));
        }
    }
    Ok(())
}

/// Paging parameters. A separate extractor from [`FilterQuery`] rather than a
/// `#[serde(flatten)]`, because flattening breaks numeric fields in query strings.
#[derive(Debug, Deserialize)]
pub(crate) struct PageQuery {
    pub(crate) cursor: Option<String>,
    pub(crate) limit: Option<usize>,
    pub(crate) notice: Option<String>,
}

/// `dead_at_ms.id` as one opaque string.
#[must_use]
pub fn encode_cursor(c: &Cursor) -> String {
    format!("{}.{}", c.dead_at_ms, c.id)
}

/// Parses [`encode_cursor`].
///
/// # Errors
///
/// A cursor that was not produced by this server.
pub fn decode_cursor(text: &str) -> Result<Cursor, ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "invalid cursor {text:?}: pass back the next_cursor of a previous page"
        ))
    };
    let (at, id) = text.split_once('.').ok_or_else(bad)?;
    Ok(Cursor {
        dead_at_ms: at.parse().map_err(|_| bad())?,
        id: MessageId::parse(id).map_err(|_| bad())?,
    })
}

/// A page size from 1 to [`MAX_PAGE`], `default` when not given.
fn page_limit(limit: Option<usize>, default: usize) -> Result<usize, ApiError> {
    match limit.unwrap_or(default) {
        n @ 1..=MAX_PAGE => Ok(n),
        n => Err(ApiError::BadRequest(format!(
            "limit {n} is out of range: from 1 to {MAX_PAGE}"
        ))),
    }
}

pub(crate) fn parse_id(id: &str) -> Result<MessageId, ApiError> {
    MessageId::parse(id)
        .map_err(|_| ApiError::BadRequest(format!("invalid message id {id:?}: expected a UUID")))
}

/// Writes need the operator role, and a session caller must also prove the request came
/// from our own pages.
fn require_operator(caller: &Caller, headers: &HeaderMap) -> Result<(), ApiError> {
    if caller.role < Role::Operator {
        return Err(ApiError::Forbidden(
            "this needs the operator role; your token is read-only".to_owned(),
        ));
    }
    if caller.via == Via::Session {
        let presented = headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !caller.csrf_ok(presented) {
            return Err(ApiError::Forbidden(
                "missing or wrong X-CSRF-Token header".to_owned(),
            ));
        }
    }
    Ok(())
}

pub(crate) async fn queues(State(app): State<Arc<App>>) -> Result<Json<Vec<QueueJson>>, ApiError> {
    let depths = app.triage.depths().await?;
    let stats = app.triage.stats().await?;
    let breakers = app.triage.open_breakers().await?;
    let now = redrive_core::now_ms();
    Ok(Json(
        depths
            .iter()
            .map(|d| {
                let mut q = QueueJson::from(d);
                q.breakers_open = breakers.iter().filter(|b| b.queue == d.queue).count() as u64;
                q.oldest_dead_age_ms = stats
                    .iter()
                    .filter(|s| s.queue == d.queue)
                    .filter_map(|s| s.oldest_dead_at_ms)
                    .min()
                    .map(|at| (now - at).max(0));
                q
            })
            .collect(),
    ))
}

#[derive(Serialize)]
pub(crate) struct Page {
    items: Vec<DeadJson>,
    next_cursor: Option<String>,
}

pub(crate) async fn dead_list(
    State(app): State<Arc<App>>,
    ApiQuery(f): ApiQuery<FilterQuery>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page>, ApiError> {
    let filter = f.to_filter()?;
    let cursor = q
        .cursor
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(decode_cursor)
        .transpose()?;
    let limit = page_limit(q.limit, 50)?;
    let mut items = app.triage.list(filter, cursor, limit + 1).await?;
    let more = items.len() > limit;
    items.truncate(limit);
    let next_cursor = more
        .then(|| {
            items.last().map(|d| {
                encode_cursor(&Cursor {
                    dead_at_ms: d.dead_at_ms,
                    id: d.envelope.id,
                })
            })
        })
        .flatten();
    Ok(Json(Page {
        items: items.iter().map(DeadJson::from).collect(),
        next_cursor,
    }))
}

pub(crate) async fn dead_get(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<DeadDetailJson>, ApiError> {
    let id = parse_id(&id)?;
    match app.triage.get(id).await? {
        Some(d) => Ok(Json(DeadDetailJson {
            dead: DeadJson::from(&d),
            replay_jobs: app
                .triage
                .replays_of(id)
                .await?
                .iter()
                .map(LineageJson::from)
                .collect(),
        })),
        None => Err(ApiError::NotFound(format!("no dead message with id {id}"))),
    }
}

pub(crate) async fn groups(
    State(app): State<Arc<App>>,
    ApiQuery(q): ApiQuery<FilterQuery>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Vec<GroupJson>>, ApiError> {
    let limit = page_limit(page.limit, 200)?;
    let groups = app.triage.groups(q.to_filter()?, limit).await?;
    Ok(Json(groups.iter().map(GroupJson::from).collect()))
}

/// Body of `POST /api/v1/dead/{id}/replay`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReplayOne {
    /// A replacement payload (UTF-8 text), if the message was fixed.
    payload: Option<String>,
    /// Target queue.
    to: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    reason: String,
}

/// A whole number from a JSON body, written as `5` or `5.0` (JSON Schema's `integer`
/// takes both); null or absent is `None`.
fn whole<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    use serde::de::Error as _;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = n.as_i64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| f as i64)
    });
    whole
        .and_then(|w| T::try_from(w).ok())
        .map(Some)
        .ok_or_else(|| D::Error::custom(format!("{n} is not a whole number in range")))
}

/// A field that, when given, must hold a value: `null` is refused rather than taken for
/// "absent", so that a request means one thing.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A bulk selection's filter: the fields of [`FilterQuery`], and nothing else.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkFilter {
    queue: Option<String>,
    fingerprint: Option<String>,
    class: Option<String>,
    #[serde(default, deserialize_with = "whole")]
    since_ms: Option<i64>,
    #[serde(default, deserialize_with = "whole")]
    until_ms: Option<i64>,
    q: Option<String>,
}

impl BulkFilter {
    /// The core filter. Unlike a query string's, an empty text field is refused: JSON
    /// can leave a field out, so an empty one is a mistake, not a form's blank.
    fn to_filter(&self) -> Result<DeadFilter, ApiError> {
        let texts = [
            ("queue", &self.queue),
            ("fingerprint", &self.fingerprint),
            ("class", &self.class),
            ("q", &self.q),
        ];
        if let Some((name, _)) = texts.iter().find(|(_, v)| v.as_deref() == Some("")) {
            return Err(ApiError::BadRequest(format!(
                "filter.{name} is empty: leave it out to match any"
            )));
        }
        check_times(self.since_ms, self.until_ms)?;
        Ok(DeadFilter {
            queue: self
                .queue
                .as_deref()
                .map(QueueName::new)
                .transpose()
                .map_err(|e| ApiError::BadRequest(e.to_string()))?,
            fingerprint: self.fingerprint.clone(),
            error_class: self.class.clone(),
            since_ms: self.since_ms,
            until_ms: self.until_ms,
            text: self.q.clone(),
        })
    }
}

/// Body of `POST /api/v1/replay` and `/purge`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Bulk {
    #[serde(default, deserialize_with = "present")]
    ids: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    filter: Option<BulkFilter>,
    #[serde(default)]
    all: bool,
    to: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default, deserialize_with = "whole")]
    rate_per_sec: Option<u32>,
    #[serde(default, deserialize_with = "whole")]
    max_replays: Option<u32>,
    #[serde(default)]
    reason: String,
}

impl Bulk {
    fn selection(&self) -> Result<DeadSelection, ApiError> {
        target(self.to.as_ref())?;
        if self
            .rate_per_sec
            .is_some_and(|r| !(1..=MAX_RATE).contains(&r))
        {
            return Err(ApiError::BadRequest(format!(
                "rate_per_sec must be from 1 to {MAX_RATE}"
            )));
        }
        match self.ids.as_ref().map(Vec::len) {
            Some(0) => {
                return Err(ApiError::BadRequest(
                    "\"ids\" is empty: name at least one message".into(),
                ));
            }
            Some(n) if n > MAX_IDS => {
                return Err(ApiError::BadRequest(format!(
                    "{n} ids in one request: at most {MAX_IDS}; select by a filter instead"
                )));
            }
            _ => {}
        }
        match (&self.ids, &self.filter, self.all) {
            (Some(ids), None, false) => Ok(DeadSelection::Ids(
                ids.iter().map(|i| parse_id(i)).collect::<Result<_, _>>()?,
            )),
            (None, Some(f), false) => {
                let filter = f.to_filter()?;
                if filter == DeadFilter::default() {
                    return Err(ApiError::BadRequest(
                        "an empty filter selects everything: say \"all\": true instead".into(),
                    ));
                }
                Ok(DeadSelection::Filter(filter))
            }
            (None, None, true) => Ok(DeadSelection::Filter(DeadFilter::default())),
            _ => Err(ApiError::BadRequest(
                "select with exactly one of \"ids\", \"filter\" or \"all\": true".into(),
            )),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct ReplayJson {
    dry_run: bool,
    matched: u64,
    replayed: u64,
    over_replay_limit: Vec<String>,
    by_queue: serde_json::Map<String, serde_json::Value>,
}

impl ReplayJson {
    pub(crate) fn new(r: &redrive_core::ReplayReport, dry_run: bool) -> Self {
        Self {
            dry_run,
            matched: r.matched,
            replayed: r.replayed,
            over_replay_limit: r.over_limit.iter().map(ToString::to_string).collect(),
            by_queue: r
                .by_queue
                .iter()
                .map(|(q, n)| (q.clone(), serde_json::Value::from(*n)))
                .collect(),
        }
    }
}

fn target(to: Option<&String>) -> Result<Option<QueueName>, ApiError> {
    to.map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(QueueName::new)
        .transpose()
        .map_err(|e| ApiError::BadRequest(e.to_string()))
}

pub(crate) async fn replay_one(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<ReplayOne>,
) -> Result<Json<ReplayJson>, ApiError> {
    require_operator(&caller, &headers)?;
    let id = parse_id(&id)?;
    let request = ReplayRequest {
        selection: DeadSelection::Ids(vec![id]),
        to: target(body.to.as_ref())?,
        dry_run: body.dry_run,
        rate_per_sec: None,
        max_replays: app.max_replays,
        actor: caller.actor.clone(),
        reason: body.reason.clone(),
    };
    let report = match body.payload {
        Some(payload) => {
            let reason = if body.reason.is_empty() {
                "edited and replayed".to_owned()
            } else {
                body.reason
            };
            app.triage
                .replay_edited(
                    id,
                    payload.into_bytes(),
                    ReplayRequest { reason, ..request },
                )
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("no dead message with id {id}")))?
        }
        None => app.triage.replay(request).await?,
    };
    if report.matched == 0 {
        return Err(ApiError::NotFound(format!("no dead message with id {id}")));
    }
    if !body.dry_run {
        app.metrics.replayed(&report.by_queue);
    }
    Ok(Json(ReplayJson::new(&report, body.dry_run)))
}

pub(crate) async fn replay_bulk(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Bulk>,
) -> Result<Json<ReplayJson>, ApiError> {
    require_operator(&caller, &headers)?;
    let request = ReplayRequest {
        selection: body.selection()?,
        to: target(body.to.as_ref())?,
        dry_run: body.dry_run,
        rate_per_sec: body.rate_per_sec,
        max_replays: body.max_replays.unwrap_or(app.max_replays),
        actor: caller.actor.clone(),
        reason: body.reason.clone(),
    };
    let report = app.triage.replay(request).await?;
    if !body.dry_run {
        app.metrics.replayed(&report.by_queue);
    }
    Ok(Json(ReplayJson::new(&report, body.dry_run)))
}

pub(crate) async fn purge(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Bulk>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require_operator(&caller, &headers)?;
    let selection = body.selection()?;
    if body.dry_run {
        let count = match &selection {
            DeadSelection::Ids(ids) => {
                let mut n = 0u64;
                for id in ids {
                    n += u64::from(app.triage.get(*id).await?.is_some());
                }
                n
            }
            DeadSelection::Filter(f) => app.triage.count(f.clone()).await?,
        };
        return Ok(Json(
            serde_json::json!({ "dry_run": true, "purged": count }),
        ));
    }
    let n = app
        .triage
        .purge(selection, caller.actor.clone(), body.reason.clone())
        .await?;
    Ok(Json(serde_json::json!({ "dry_run": false, "purged": n })))
}

#[derive(Serialize)]
pub(crate) struct AuditJson {
    at: String,
    actor: String,
    action: String,
    detail: String,
    count: u64,
    reason: String,
}

pub(crate) async fn audit(State(app): State<Arc<App>>) -> Result<Json<Vec<AuditJson>>, ApiError> {
    let entries = app.triage.audit(500).await?;
    Ok(Json(
        entries
            .into_iter()
            .map(|e| AuditJson {
                at: crate::json::rfc3339(e.at_ms),
                actor: e.actor,
                action: e.action,
                detail: e.detail,
                count: e.count,
                reason: e.reason,
            })
            .collect(),
    ))
}

/// A channel receiver as a body stream, for streamed export.
struct Lines(tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>);

impl futures_core::Stream for Lines {
    type Item = Result<Vec<u8>, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

pub(crate) async fn export(
    State(app): State<Arc<App>>,
    ApiQuery(q): ApiQuery<FilterQuery>,
) -> Result<Response, ApiError> {
    let filter = q.to_filter()?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut cursor: Option<Cursor> = None;
        loop {
            let page = match app.triage.list(filter.clone(), cursor.clone(), 500).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "export failed mid-stream");
                    let _ = tx
                        .send(Err(std::io::Error::other(
                            "export failed; see the server log",
                        )))
                        .await;
                    return;
                }
            };
            let Some(last) = page.last() else { return };
            cursor = Some(Cursor {
                dead_at_ms: last.dead_at_ms,
                id: last.envelope.id,
            });
            let mut chunk = Vec::new();
            for d in &page {
                if serde_json::to_writer(&mut chunk, &DeadJson::from(d)).is_ok() {
                    chunk.push(b'\n');
                }
            }
            if tx.send(Ok(chunk)).await.is_err() {
                return; // The client went away.
            }
        }
    });
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"dead-letters.jsonl\"",
            ),
        ],
        Body::from_stream(Lines(rx)),
    )
        .into_response())
}

pub(crate) async fn openapi() -> impl IntoResponse {
    Json(crate::openapi::document())
}

/// Body of `POST /api/v1/jobs`: a selection as for `/replay`, and how the job moves it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewJob {
    #[serde(default, deserialize_with = "present")]
    ids: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    filter: Option<BulkFilter>,
    #[serde(default)]
    all: bool,
    to: Option<String>,
    #[serde(default, deserialize_with = "whole")]
    max_replays: Option<u32>,
    #[serde(default)]
    reason: String,
    #[serde(default, deserialize_with = "whole")]
    canary: Option<u64>,
    canary_percent: Option<f64>,
    max_failed_percent: Option<f64>,
    #[serde(default)]
    ordered: bool,
}

impl NewJob {
    fn spec(&self, actor: &str, max_replays: u32) -> Result<redrive_runner::JobSpec, ApiError> {
        use redrive_runner::Canary;
        let canary = match (self.canary, self.canary_percent) {
            (Some(_), Some(_)) => {
                return Err(ApiError::BadRequest(
                    "give \"canary\" (a number of messages) or \"canary_percent\", not both".into(),
                ));
            }
            (Some(0), None) => {
                return Err(ApiError::BadRequest("\"canary\" must be at least 1".into()));
            }
            (Some(n), None) if n > MAX_CANARIES => {
                return Err(ApiError::BadRequest(format!(
                    "\"canary\" is at most {MAX_CANARIES}"
                )));
            }
            (Some(n), None) => Canary::Count(n),
            (None, Some(p)) if p > 0.0 && p <= 100.0 => Canary::Percent(p),
            (None, Some(_)) => {
                return Err(ApiError::BadRequest(
                    "\"canary_percent\" must be more than 0 and at most 100".into(),
                ));
            }
            (None, None) => Canary::None,
        };
        let max_failed_percent = self.max_failed_percent.unwrap_or(0.0);
        if !(0.0..=100.0).contains(&max_failed_percent) {
            return Err(ApiError::BadRequest(
                "\"max_failed_percent\" must be from 0 to 100".into(),
            ));
        }
        if canary == Canary::None && !self.ordered {
            return Err(ApiError::BadRequest(
                "a job needs \"canary\", \"canary_percent\" or \"ordered\": true (a plain replay is POST /api/v1/replay)".into(),
            ));
        }
        Ok(redrive_runner::JobSpec {
            actor: actor.to_owned(),
            reason: self.reason.clone(),
            to: target(self.to.as_ref())?,
            max_replays: self.max_replays.unwrap_or(max_replays),
            canary,
            max_failed_percent,
            ordered: self.ordered,
            rate_per_sec: None,
        })
    }

    fn selection(&self) -> Result<DeadSelection, ApiError> {
        Bulk {
            ids: self.ids.clone(),
            filter: self.filter.clone(),
            all: self.all,
            to: self.to.clone(),
            dry_run: false,
            rate_per_sec: None,
            max_replays: self.max_replays,
            reason: String::new(),
        }
        .selection()
    }
}

/// Starts a replay job and runs it in the background; answers at once with the job.
pub(crate) async fn job_start(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<NewJob>,
) -> Result<(StatusCode, Json<JobJson>), ApiError> {
    require_operator(&caller, &headers)?;
    let selection = body.selection()?;
    let spec = body.spec(&caller.actor, app.max_replays)?;
    let v = app.triage.start_job(selection, spec).await?;
    app.jobs.spawn(v.job.id.clone());
    Ok((StatusCode::ACCEPTED, Json(JobJson::from(&v))))
}

/// Query of `GET /api/v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobsQuery {
    limit: Option<u64>,
}

pub(crate) async fn jobs_list(
    State(app): State<Arc<App>>,
    ApiQuery(q): ApiQuery<JobsQuery>,
) -> Result<Json<Vec<JobJson>>, ApiError> {
    let limit = match q.limit {
        None => 50,
        Some(n @ 1..=1000) => usize::try_from(n).unwrap_or(1000),
        Some(_) => return Err(ApiError::BadRequest("limit must be from 1 to 1000".into())),
    };
    let jobs = app.triage.jobs(None, limit).await?;
    Ok(Json(jobs.iter().map(JobJson::from).collect()))
}

/// A job id as a path segment: `rj-` and 32 hexadecimal digits.
fn job_id(id: &str) -> Result<String, ApiError> {
    let ok =
        id.len() == 35 && id.starts_with("rj-") && id[3..].bytes().all(|b| b.is_ascii_hexdigit());
    if ok {
        Ok(id.to_owned())
    } else {
        Err(ApiError::BadRequest(format!(
            "{:?} is not a job id (rj- and 32 hexadecimal digits)",
            redrive_core::truncate_utf8(id, 40)
        )))
    }
}

pub(crate) async fn job_one(app: &App, id: &str) -> Result<redrive_core::JobView, ApiError> {
    app.triage
        .jobs(Some(id.to_owned()), 1)
        .await?
        .pop()
        .ok_or_else(|| ApiError::NotFound(format!("no replay job {id}")))
}

/// The messages of a job worth a look: canaries, and those that failed again, were held
/// or skipped; at most `limit`.
pub(crate) async fn job_notable(
    app: &App,
    id: &str,
    limit: usize,
) -> Result<Vec<redrive_core::JobItem>, ApiError> {
    let mut out = Vec::new();
    let mut after = None;
    while out.len() < limit {
        let page = app.triage.job_items(id.to_owned(), after, 10_000).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        out.extend(page.into_iter().filter(redrive_core::JobItem::is_notable));
    }
    out.truncate(limit);
    Ok(out)
}

pub(crate) async fn job_get(
    State(app): State<Arc<App>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<JobDetailJson>, ApiError> {
    let id = job_id(&id)?;
    let v = job_one(&app, &id).await?;
    let items = job_notable(&app, &id, 1000).await?;
    Ok(Json(JobDetailJson {
        job: JobJson::from(&v),
        messages: items.iter().map(JobItemJson::from).collect(),
    }))
}

/// What a person can do to a job.
#[derive(Debug, Clone, Copy)]
pub(crate) enum JobAction {
    Pause,
    Resume,
    Cancel,
}

/// Pauses, resumes or cancels a job for `actor`; answers with it afterwards.
pub(crate) async fn act_on_job(
    app: &App,
    id: &str,
    action: JobAction,
    actor: &str,
) -> Result<redrive_core::JobView, ApiError> {
    use redrive_core::JobState;
    let v = job_one(app, id).await?;
    let changed = match action {
        JobAction::Pause => {
            let note = format!("paused by {actor}");
            app.triage
                .set_job_state(
                    id.to_owned(),
                    vec![JobState::Running],
                    JobState::Paused,
                    note,
                )
                .await?
        }
        JobAction::Resume => {
            app.triage
                .resume_job(id.to_owned(), actor.to_owned())
                .await?
        }
        JobAction::Cancel => {
            let note = format!("cancelled by {actor}; what was not moved stays dead");
            let from = vec![JobState::Running, JobState::Paused];
            app.triage
                .set_job_state(id.to_owned(), from, JobState::Cancelled, note)
                .await?
        }
    };
    if !changed {
        return Err(ApiError::Conflict(format!(
            "job {id} is {}: it cannot be {}",
            v.state.as_str(),
            match action {
                JobAction::Pause => "paused",
                JobAction::Resume => "resumed",
                JobAction::Cancel => "cancelled",
            }
        )));
    }
    if let JobAction::Resume = action {
        app.jobs.spawn(id.to_owned());
    }
    job_one(app, id).await
}

async fn job_action(
    app: Arc<App>,
    caller: Caller,
    headers: HeaderMap,
    id: String,
    action: JobAction,
) -> Result<Json<JobJson>, ApiError> {
    require_operator(&caller, &headers)?;
    let id = job_id(&id)?;
    let v = act_on_job(&app, &id, action, &caller.actor).await?;
    Ok(Json(JobJson::from(&v)))
}

pub(crate) async fn job_pause(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<JobJson>, ApiError> {
    job_action(app, caller, headers, id, JobAction::Pause).await
}

pub(crate) async fn job_resume(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<JobJson>, ApiError> {
    job_action(app, caller, headers, id, JobAction::Resume).await
}

pub(crate) async fn job_cancel(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<JobJson>, ApiError> {
    job_action(app, caller, headers, id, JobAction::Cancel).await
}
