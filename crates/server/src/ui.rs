//! The triage web UI: server-rendered HTML, no JavaScript. Everything shown from a
//! message (payload, headers, errors, keys, queue names) is untrusted and goes through
//! maud's escaping; nothing here uses `PreEscaped` on message data.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Form, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{DOCTYPE, Markup, html};
use redrive_core::{
    Cursor, DeadFilter, DeadLetter, DeadSelection, MessageId, QueueName, format_duration, now_ms,
};
use serde::Deserialize;

use crate::App;
use crate::api::{FilterQuery, decode_cursor, encode_cursor};
use crate::auth::{Caller, Role, SignIn};
use crate::error::ApiError;
use crate::json::rfc3339;
use crate::triage::ReplayRequest;

/// Percent-encodes a query or path value.
#[must_use]
pub fn url_encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

fn ago(ms: i64) -> String {
    let secs = u64::try_from((now_ms() - ms).max(0) / 1000).unwrap_or(0);
    if secs == 0 {
        return "just now".to_owned();
    }
    let rounded = match secs {
        0..=119 => secs,
        120..=7199 => secs / 60 * 60,
        7200..=172_799 => secs / 3600 * 3600,
        _ => secs / 86_400 * 86_400,
    };
    let d = format_duration(std::time::Duration::from_secs(rounded));
    let d = if rounded >= 86_400 {
        format!("{}d", rounded / 86_400)
    } else {
        d
    };
    format!("{d} ago")
}

fn first_line(text: &str, max: usize) -> String {
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    if line.chars().count() <= max {
        line.to_owned()
    } else {
        format!("{}…", line.chars().take(max).collect::<String>())
    }
}

/// A page in the common layout.
fn page(title: &str, caller: Option<&Caller>, notice: Option<&str>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · redrive" }
                link rel="stylesheet" href="/static/style.css";
            }
            body {
                header {
                    a.brand href="/" { "redrive" }
                    @if let Some(c) = caller {
                        a href="/" { "Overview" }
                        a href="/groups" { "Error groups" }
                        a href="/messages" { "Dead messages" }
                        a href="/jobs" { "Replay jobs" }
                        a href="/alerts" { "Alerts" }
                        a href="/audit" { "Audit log" }
                        span.who { (c.actor) " · " (c.role.as_str()) }
                        @if c.via == crate::auth::Via::Session {
                            form method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(c.csrf);
                                button.secondary type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main {
                    @if let Some(n) = notice { div.notice role="status" { (n) } }
                    (body)
                }
            }
        }
    }
}

/// A UI error: the same messages as the API, as a page.
pub struct UiError(ApiError);

impl From<ApiError> for UiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<crate::triage::BackendError> for UiError {
    fn from(e: crate::triage::BackendError) -> Self {
        Self(ApiError::Internal(e))
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let (status, message) = self.0.parts();
        let body = page(
            "Error",
            None,
            None,
            html! { h1 { "Something went wrong" } p.err { (message) } p { a href="/" { "Back to the overview" } } },
        );
        (status, body).into_response()
    }
}

type UiResult = Result<Response, UiError>;

/// Most groups one page lists.
const GROUPS_SHOWN: usize = 200;

fn forbid(caller: &Caller, csrf: &str) -> Result<(), UiError> {
    if caller.role < Role::Operator {
        return Err(ApiError::Forbidden(
            "this needs the operator role; you are signed in read-only".into(),
        )
        .into());
    }
    if !caller.csrf_ok(csrf) {
        return Err(ApiError::Forbidden(
            "the form expired or did not come from this site: reload the page and try again".into(),
        )
        .into());
    }
    Ok(())
}

#[derive(Debug, Deserialize, Default)]
pub(crate) struct Notice {
    notice: Option<String>,
}

/// `GET /static/style.css`.
pub(crate) async fn stylesheet() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("static/style.css"),
    )
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginQuery {
    next: Option<String>,
    failed: Option<String>,
}

/// Where to go after signing in: a path on this server, else `/`.
///
/// Only visible ASCII is accepted: browsers drop tabs and newlines from a URL before
/// reading it, so `/\t/evil.example` would become the other origin `//evil.example`,
/// and CR/LF cannot go in a header at all. A second `/` or a `\` at the start would
/// name another host too.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n[1..].starts_with(['/', '\\'])
                && !n.contains('\\')
                && n.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            n.to_owned()
        }
        _ => "/".to_owned(),
    }
}

/// `GET /login`.
pub(crate) async fn login_form(
    State(app): State<Arc<App>>,
    Query(q): Query<LoginQuery>,
) -> Response {
    if app.auth.is_open() {
        return Redirect::to("/").into_response();
    }
    let next = safe_next(q.next.as_deref());
    page("Sign in", None, None, html! {
        div.login.card {
            h1 { "Sign in" }
            @if q.failed.is_some() { p.err role="alert" { "That token is not valid." } }
            form method="post" action="/login" {
                label for="token" { "Access token (REDRIVE_TOKEN or REDRIVE_VIEWER_TOKEN)" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                input type="hidden" name="next" value=(next);
                button type="submit" { "Sign in" }
            }
        }
    })
    .into_response()
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginForm {
    token: String,
    next: Option<String>,
}

/// `POST /login`: sets an HttpOnly, SameSite=Strict session cookie.
pub(crate) async fn login(State(app): State<Arc<App>>, Form(form): Form<LoginForm>) -> Response {
    let next = safe_next(form.next.as_deref());
    match app.auth.sign_in(&form.token) {
        SignIn::Session(id) => {
            let cookie = app.auth.session_cookie(&id, false);
            ([(header::SET_COOKIE, cookie)], Redirect::to(&next)).into_response()
        }
        SignIn::Refused => {
            tracing::warn!("sign-in with an invalid token");
            Redirect::to(&format!("/login?failed=1&next={}", url_encode(&next))).into_response()
        }
        SignIn::Limited(wait) => {
            tracing::warn!("sign-in refused: too many failed sign-ins in the last minute");
            let secs = wait.as_secs().max(1);
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, secs.to_string())],
                page("Sign in", None, None, html! {
                    div.login.card {
                        h1 { "Too many failed sign-ins" }
                        p.err role="alert" { "Too many sign-ins failed in the last minute. Try again in " (secs) " s." }
                    }
                }),
            )
                .into_response()
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct CsrfForm {
    csrf: String,
}

/// `POST /logout`.
pub(crate) async fn logout(
    State(app): State<Arc<App>>,
    headers: axum::http::HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    let session = crate::auth::session_cookie(&headers);
    if let Some(id) = session {
        // Only our own sign-out button (which carries the session's form token) ends it.
        if app
            .auth
            .identify(None, Some(&id))
            .is_some_and(|c| c.csrf_ok(&form.csrf))
        {
            app.auth.sign_out(&id);
        }
    }
    let expire = app.auth.session_cookie("", true);
    ([(header::SET_COOKIE, expire)], Redirect::to("/login")).into_response()
}

/// An inline SVG line chart of DLQ depth samples.
fn chart(points: &[(i64, u64)]) -> Markup {
    const W: f64 = 560.0;
    const H: f64 = 110.0;
    let max = points.iter().map(|p| p.1).max().unwrap_or(0).max(1) as f64;
    let n = points.len().max(2) as f64 - 1.0;
    let coords: Vec<String> = points
        .iter()
        .enumerate()
        .map(|(i, (_, v))| {
            format!(
                "{:.1},{:.1}",
                30.0 + (i as f64 / n) * (W - 40.0),
                10.0 + (1.0 - *v as f64 / max) * (H - 30.0)
            )
        })
        .collect();
    let first = points.first().map(|p| ago(p.0)).unwrap_or_default();
    html! {
        svg.chart width=(W) height=(H) viewBox=(format!("0 0 {W} {H}")) role="img" aria-label="DLQ depth over time" {
            text x="2" y="14" { (max as u64) }
            text x="2" y=(H - 22.0) { "0" }
            text x="30" y=(H - 4.0) { (first) }
            text x=(W - 60.0) y=(H - 4.0) { "now" }
            @if coords.len() >= 2 { polyline points=(coords.join(" ")) {} }
        }
    }
}

/// `GET /`: every queue's lanes, DLQ depth over time, the biggest error groups.
pub(crate) async fn overview(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Query(n): Query<Notice>,
) -> UiResult {
    let depths = app.triage.depths().await?;
    let groups = app.triage.groups(DeadFilter::default(), 5).await?;
    let breakers = app.triage.open_breakers().await?;
    let samples = app.history.samples();
    let body = html! {
        h1 { "Overview" }
        @for b in &breakers {
            div.warning role="alert" .breaker-banner {
                strong { "Breaker open on " (b.queue) }
                " since " (rfc3339(b.since_ms)) " (" (ago(b.since_ms)) ", " (b.consumer) "): its upstream seems down. "
                "No new messages are taken and nothing is dead-lettered for the outage; one message probes now and then, and the first that succeeds closes it."
            }
        }
        @if depths.is_empty() {
            p.muted { "No queues yet. Publish with " code { "redrive publish QUEUE" } "." }
        } @else {
            table {
                thead { tr { th { "Queue" } th.num { "Main" } th { "Retry tiers" } th.num { "Isolated" } th.num { "DLQ" } th.num { "In flight" } th { "Oldest in main" } } }
                tbody {
                    @for d in &depths {
                        tr {
                            td { a href=(format!("/messages?queue={}", url_encode(&d.queue))) { (d.queue) } }
                            td.num { (d.main) }
                            td.lanes { @for (tier, count) in &d.retry { span { (tier) ": " strong { (count) } } } }
                            td.num { (d.isolated) }
                            td.num { @if d.dlq > 0 { strong.err { (d.dlq) } } @else { "0" } }
                            td.num { (d.inflight) }
                            td { (d.oldest_main_age_ms.map(|a| ago(now_ms() - a)).unwrap_or_else(|| "–".into())) }
                        }
                    }
                }
            }
            h2 { "DLQ depth over time" }
            @for d in &depths {
                @let points: Vec<(i64, u64)> = samples.iter().map(|s| (s.at_ms, s.dlq.iter().find(|(q, _)| *q == d.queue).map_or(0, |x| x.1))).collect();
                div.card {
                    div { strong { (d.queue) } span.muted { " · " (d.dlq) " dead now · " (points.len()) " samples" } }
                    (chart(&points))
                }
            }
        }
        h2 { "Top error groups" }
        (groups_table(&groups.iter().take(5).cloned().collect::<Vec<_>>()))
        p { a href="/groups" { "All groups →" } }
    };
    Ok(page("Overview", Some(&caller), n.notice.as_deref(), body).into_response())
}

fn groups_table(groups: &[redrive_core::DeadGroup]) -> Markup {
    html! {
        @if groups.is_empty() {
            p.muted { "The DLQ is empty." }
        } @else {
            table {
                thead { tr { th.num { "Count" } th { "Error" } th { "Queues" } th.num { "Attempts" } th { "Spent on failures" } th { "First seen" } th { "Last seen" } } }
                tbody {
                    @for g in groups {
                        tr {
                            td.num.count { (g.count) }
                            td {
                                a href=(format!("/groups/{}", url_encode(&g.fingerprint))) { strong { (g.error_class) } }
                                div.mono { (first_line(&g.sample_error, 140)) }
                                div.muted.mono { (g.fingerprint) }
                            }
                            td { (g.queues.join(", ")) }
                            td.num { (g.attempts) }
                            td.spent { (g.spent) }
                            td { (ago(g.first_seen_ms)) }
                            td { (ago(g.last_seen_ms)) }
                        }
                    }
                }
            }
        }
    }
}

fn filter_form(action: &str, f: &FilterQuery) -> Markup {
    html! {
        form.filters method="get" action=(action) {
            div { label for="f-queue" { "Queue" } input #f-queue name="queue" value=(f.queue.clone().unwrap_or_default()); }
            div { label for="f-class" { "Error class" } input #f-class name="class" value=(f.class.clone().unwrap_or_default()); }
            div { label for="f-fp" { "Fingerprint" } input #f-fp name="fingerprint" value=(f.fingerprint.clone().unwrap_or_default()); }
            div { label for="f-q" { "Text in error or payload" } input #f-q name="q" value=(f.q.clone().unwrap_or_default()); }
            button type="submit" { "Filter" }
        }
    }
}

/// `GET /groups`.
pub(crate) async fn groups(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Query(f): Query<FilterQuery>,
    Query(n): Query<Notice>,
) -> UiResult {
    let filter = f.to_filter()?;
    let total = app.triage.count(filter.clone()).await?;
    let groups = app.triage.groups(filter, GROUPS_SHOWN + 1).await?;
    let more = groups.len() > GROUPS_SHOWN;
    let groups = &groups[..groups.len().min(GROUPS_SHOWN)];
    let body = html! {
        h1 { "Error groups" span.muted { " · " (total) " dead messages" } }
        (filter_form("/groups", &f))
        (groups_table(groups))
        @if more { p.muted { "Showing the " (GROUPS_SHOWN) " largest groups; filter to see others." } }
    };
    Ok(page("Error groups", Some(&caller), n.notice.as_deref(), body).into_response())
}

fn messages_table(items: &[DeadLetter]) -> Markup {
    html! {
        @if items.is_empty() {
            p.muted { "No dead messages match." }
        } @else {
            table {
                thead { tr { th { "Message" } th { "Queue" } th.num { "Attempts" } th { "Error" } th { "Dead" } } }
                tbody {
                    @for d in items {
                        @let last = d.envelope.last_failure();
                        tr {
                            td.mono {
                                a href=(format!("/messages/{}", d.envelope.id)) { (d.envelope.id) }
                                // A message that keeps coming back after replays says so.
                                @if d.envelope.replays > 0 {
                                    " " span.badge.back title="replayed and dead again" { "back " (d.envelope.replays) "×" }
                                }
                            }
                            td { (d.envelope.queue) }
                            td.num { (d.envelope.attempt) }
                            td {
                                strong { (last.map(|f| f.class.as_str()).unwrap_or("")) }
                                div.mono { (first_line(last.map(|f| f.message.as_str()).unwrap_or(""), 120)) }
                            }
                            td { (ago(d.dead_at_ms)) }
                        }
                    }
                }
            }
        }
    }
}

async fn group_count(app: &App, fp: &str) -> Result<Option<redrive_core::DeadGroup>, UiError> {
    let filter = DeadFilter {
        fingerprint: Some(fp.to_owned()),
        ..DeadFilter::default()
    };
    Ok(app.triage.groups(filter, 1).await?.into_iter().next())
}

/// `GET /groups/{fp}`.
pub(crate) async fn group(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(fp): Path<String>,
    Query(n): Query<Notice>,
) -> UiResult {
    let Some(g) = group_count(&app, &fp).await? else {
        let body = html! { h1 { "Group " span.mono { (fp) } } p.muted { "No dead messages have this fingerprint (any more)." } p { a href="/groups" { "All groups" } } };
        return Ok((
            StatusCode::NOT_FOUND,
            page("Group", Some(&caller), n.notice.as_deref(), body),
        )
            .into_response());
    };
    let filter = DeadFilter {
        fingerprint: Some(fp.clone()),
        ..DeadFilter::default()
    };
    let items = app.triage.list(filter, None, 100).await?;
    let body = html! {
        h1 { (g.error_class) span.muted { " · " (g.count) " dead messages" } }
        dl.meta {
            dt { "Fingerprint" } dd.mono { (g.fingerprint) }
            dt { "Queues" } dd { (g.queues.join(", ")) }
            dt { "First seen" } dd { (rfc3339(g.first_seen_ms)) " (" (ago(g.first_seen_ms)) ")" }
            dt { "Last seen" } dd { (rfc3339(g.last_seen_ms)) " (" (ago(g.last_seen_ms)) ")" }
            dt { "Failed attempts" } dd { (g.attempts) }
            dt { "Spent on them" } dd #group-spent { (g.spent) }
        }
        h2 { "Sample error" }
        pre { (g.sample_error) }
        @if caller.role >= Role::Operator {
            div.actions {
                a.button href=(format!("/groups/{}/replay", url_encode(&fp))) { "Replay " (g.count) " messages…" }
                a.button.danger-btn href=(format!("/groups/{}/purge", url_encode(&fp))) { "Purge " (g.count) " messages…" }
            }
        }
        h2 { "Messages" @if g.count > 100 { span.muted { " (first 100)" } } }
        (messages_table(&items))
    };
    Ok(page(&g.error_class, Some(&caller), n.notice.as_deref(), body).into_response())
}

/// `GET /groups/{fp}/replay`: the confirmation, stating the count.
pub(crate) async fn group_replay_confirm(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(fp): Path<String>,
) -> UiResult {
    confirm_group(&app, &caller, &fp, "replay", None).await
}

/// `GET /groups/{fp}/purge`.
pub(crate) async fn group_purge_confirm(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(fp): Path<String>,
) -> UiResult {
    confirm_group(&app, &caller, &fp, "purge", None).await
}

async fn confirm_group(
    app: &App,
    caller: &Caller,
    fp: &str,
    action: &str,
    changed: Option<u64>,
) -> UiResult {
    if caller.role < Role::Operator {
        return Err(ApiError::Forbidden(
            "this needs the operator role; you are signed in read-only".into(),
        )
        .into());
    }
    let Some(g) = group_count(app, fp).await? else {
        return Ok(Redirect::to(&format!(
            "/groups?notice={}",
            url_encode("That group is empty now.")
        ))
        .into_response());
    };
    let replay = action == "replay";
    let body = html! {
        h1 { @if replay { "Replay a group" } @else { "Purge a group" } }
        @if let Some(before) = changed {
            div.warning role="alert" { "The group changed since you asked: it had " (before) " messages and now has " (g.count) ". Check the count and confirm again." }
        }
        div class=(if replay { "card" } else { "danger" }) {
            p {
                @if replay { "Replay " } @else { "Permanently delete " }
                strong #confirm-count { (g.count) " dead messages" }
                " of group " strong { (g.error_class) } " (" span.mono { (g.fingerprint) } ")"
                @if replay { " back to " (g.queues.join(", ")) "?" } @else { "? This cannot be undone." }
            }
            pre { (first_line(&g.sample_error, 300)) }
            form method="post" action=(format!("/groups/{}/{action}", url_encode(fp))) {
                input type="hidden" name="csrf" value=(caller.csrf);
                input type="hidden" name="expected" value=(g.count);
                @if replay {
                    div { label for="to" { "Target queue (empty: each message's own)" } input #to name="to"; }
                    div { label for="rate" { "Rate limit, messages per second (empty: no limit)" } input #rate name="rate" inputmode="numeric"; }
                    div { label for="canary" { "Canaries first: a number or a percentage; the rest go only if none fails again (empty: all at once)" } input #canary name="canary" placeholder="5 or 10%"; }
                    div { label { input #ordered type="checkbox" name="ordered" value="on"; " Keep each key's order: one message per key at a time, a key held behind one that fails again" } }
                }
                div { label for="reason" { "Reason (audit log)" } input #reason name="reason" size="60"; }
                div.actions {
                    @if replay { button #confirm type="submit" { "Replay " (g.count) " messages" } }
                    @else { button.danger-btn #confirm type="submit" { "Purge " (g.count) " messages" } }
                    a.button.secondary href=(format!("/groups/{}", url_encode(fp))) { "Cancel" }
                }
            }
        }
    };
    Ok(page("Confirm", Some(caller), None, body).into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct GroupAction {
    csrf: String,
    expected: u64,
    to: Option<String>,
    rate: Option<String>,
    #[serde(default)]
    reason: String,
    /// Canaries first (a number or a percentage): the replay becomes a job.
    canary: Option<String>,
    /// `on`: each key in order, as a job.
    ordered: Option<String>,
}

/// The canaries a form asked for: a number, a percentage, or none.
fn canary_field(text: Option<&str>) -> Result<redrive_runner::Canary, UiError> {
    use redrive_runner::Canary;
    let Some(t) = text.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(Canary::None);
    };
    let bad = || -> UiError {
        ApiError::BadRequest(format!(
            "invalid canaries {t:?}: a number of messages (5) or a percentage (10%)"
        ))
        .into()
    };
    match t.strip_suffix('%') {
        Some(p) => p
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|p| *p > 0.0 && *p <= 100.0)
            .map(Canary::Percent)
            .ok_or_else(bad),
        None => t
            .parse::<u64>()
            .ok()
            .filter(|n| *n >= 1)
            .map(Canary::Count)
            .ok_or_else(bad),
    }
}

fn target(to: Option<&str>) -> Result<Option<QueueName>, UiError> {
    to.map(str::trim)
        .filter(|t| !t.is_empty())
        .map(QueueName::new)
        .transpose()
        .map_err(|e| ApiError::BadRequest(e.to_string()).into())
}

/// `POST /groups/{fp}/replay`.
pub(crate) async fn group_replay(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(fp): Path<String>,
    Form(form): Form<GroupAction>,
) -> UiResult {
    forbid(&caller, &form.csrf)?;
    let now = group_count(&app, &fp).await?.map_or(0, |g| g.count);
    if now != form.expected {
        return confirm_group(&app, &caller, &fp, "replay", Some(form.expected)).await;
    }
    let rate = match form
        .rate
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
    {
        Some(r) => Some(r.parse::<u32>().ok().filter(|r| *r > 0).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "invalid rate {r:?}: a whole number of messages per second"
            ))
        })?),
        None => None,
    };
    let canary = canary_field(form.canary.as_deref())?;
    let ordered = form.ordered.as_deref() == Some("on");
    if canary != redrive_runner::Canary::None || ordered {
        let selection = DeadSelection::Filter(DeadFilter {
            fingerprint: Some(fp.clone()),
            ..DeadFilter::default()
        });
        let spec = redrive_runner::JobSpec {
            actor: caller.actor.clone(),
            reason: form.reason,
            to: target(form.to.as_deref())?,
            max_replays: app.max_replays,
            canary,
            max_failed_percent: 0.0,
            ordered,
            rate_per_sec: None,
        };
        let v = app.triage.start_job(selection, spec).await?;
        app.jobs.spawn(v.job.id.clone());
        return Ok(Redirect::to(&format!("/jobs/{}", v.job.id)).into_response());
    }
    let request = ReplayRequest {
        selection: DeadSelection::Filter(DeadFilter {
            fingerprint: Some(fp.clone()),
            ..DeadFilter::default()
        }),
        to: target(form.to.as_deref())?,
        dry_run: false,
        rate_per_sec: rate,
        max_replays: app.max_replays,
        actor: caller.actor.clone(),
        reason: form.reason,
    };
    let report = app.triage.replay(request).await?;
    app.metrics.replayed(&report.by_queue);
    let mut notice = format!(
        "Replayed {} of {} messages.",
        report.replayed, report.matched
    );
    if !report.over_limit.is_empty() {
        notice.push_str(&format!(
            " {} stayed dead: they reached the replay limit ({}).",
            report.over_limit.len(),
            app.max_replays
        ));
    }
    Ok(Redirect::to(&format!("/groups?notice={}", url_encode(&notice))).into_response())
}

/// `POST /groups/{fp}/purge`.
pub(crate) async fn group_purge(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(fp): Path<String>,
    Form(form): Form<GroupAction>,
) -> UiResult {
    forbid(&caller, &form.csrf)?;
    let now = group_count(&app, &fp).await?.map_or(0, |g| g.count);
    if now != form.expected {
        return confirm_group(&app, &caller, &fp, "purge", Some(form.expected)).await;
    }
    let selection = DeadSelection::Filter(DeadFilter {
        fingerprint: Some(fp),
        ..DeadFilter::default()
    });
    let n = app
        .triage
        .purge(selection, caller.actor.clone(), form.reason)
        .await?;
    Ok(Redirect::to(&format!(
        "/groups?notice={}",
        url_encode(&format!("Purged {n} messages."))
    ))
    .into_response())
}

/// `GET /messages`: filtered, cursor-paginated.
pub(crate) async fn messages(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Query(filter_query): Query<FilterQuery>,
    Query(q): Query<crate::api::PageQuery>,
) -> UiResult {
    const PAGE: usize = 50;
    let filter = filter_query.to_filter()?;
    let cursor = q
        .cursor
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(decode_cursor)
        .transpose()?;
    let mut items = app.triage.list(filter, cursor, PAGE + 1).await?;
    let more = items.len() > PAGE;
    items.truncate(PAGE);
    let next = more
        .then(|| {
            items.last().map(|d| {
                encode_cursor(&Cursor {
                    dead_at_ms: d.dead_at_ms,
                    id: d.envelope.id,
                })
            })
        })
        .flatten();
    let mut params: Vec<(&str, String)> = Vec::new();
    for (k, v) in [
        ("queue", &filter_query.queue),
        ("class", &filter_query.class),
        ("fingerprint", &filter_query.fingerprint),
        ("q", &filter_query.q),
    ] {
        if let Some(v) = v.as_ref().filter(|v| !v.is_empty()) {
            params.push((k, v.clone()));
        }
    }
    let body = html! {
        h1 { "Dead messages" }
        (filter_form("/messages", &filter_query))
        (messages_table(&items))
        @if let Some(c) = next {
            @let link = params
                .iter()
                .map(|(k, v)| format!("{k}={}", url_encode(v)))
                .chain(std::iter::once(format!("cursor={}", url_encode(&c))))
                .collect::<Vec<_>>();
            p { a href=(format!("/messages?{}", link.join("&"))) { "Next page →" } }
        }
    };
    Ok(page("Dead messages", Some(&caller), q.notice.as_deref(), body).into_response())
}

/// A payload for display: pretty JSON, plain text, or a note for binary.
fn shown_payload(bytes: &[u8]) -> (String, &'static str) {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes)
        && let Ok(pretty) = serde_json::to_string_pretty(&v)
    {
        return (pretty, "JSON");
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_owned(), "text"),
        Err(_) => {
            use base64::Engine as _;
            (
                base64::engine::general_purpose::STANDARD.encode(bytes),
                "binary, shown as base64",
            )
        }
    }
}

async fn dead_or_404(app: &App, id: &str) -> Result<(MessageId, DeadLetter), UiError> {
    let id = crate::api::parse_id(id)?;
    match app.triage.get(id).await? {
        Some(d) => Ok((id, d)),
        None => Err(ApiError::NotFound(format!(
            "no dead message with id {id}: it may have been replayed or purged"
        ))
        .into()),
    }
}

/// `GET /messages/{id}`: payload, headers, attempt timeline, edit and replay.
pub(crate) async fn message(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(n): Query<Notice>,
) -> UiResult {
    let (message_id, d) = dead_or_404(&app, &id).await?;
    let lineage = app.triage.replays_of(message_id).await?;
    let env = &d.envelope;
    let last = env.last_failure();
    let (payload, kind) = shown_payload(&env.payload);
    let editable = std::str::from_utf8(&env.payload).ok();
    let body = html! {
        h1 { "Dead message" }
        dl.meta {
            dt { "Id" } dd.mono #message-id { (env.id) }
            dt { "Queue" } dd { (env.queue) }
            dt { "Attempts" } dd { (env.attempt) }
            dt { "Replays" } dd { (env.replays) }
            @if !env.spent.is_zero() { dt { "Spent on failed attempts" } dd #message-spent { (env.spent) } }
            @if let Some(k) = &env.key { dt { "Key" } dd.mono { (k) } }
            @if let Some(f) = last {
                dt { "Error class" } dd { strong { (f.class) } }
                dt { "Fingerprint" } dd.mono { a href=(format!("/groups/{}", url_encode(f.fingerprint.as_str()))) { (f.fingerprint) } }
            }
            dt { "Dead since" } dd { (rfc3339(d.dead_at_ms)) " (" (ago(d.dead_at_ms)) ")" }
            @if let Some(first) = env.first_failed_ms { dt { "First failed" } dd { (rfc3339(first)) } }
        }
        h2 { "Payload " span.muted { "(" (env.payload.len()) " bytes, " (kind) ")" } }
        pre #payload { (payload) }
        h2 { "Headers" }
        @if env.headers.is_empty() { p.muted { "No user headers." } } @else {
            table { tbody { @for (k, v) in &env.headers { tr { td.mono { (k) } td.mono { (v) } } } } }
        }
        h2 { "Attempts" }
        ol.timeline {
            @for f in &env.history {
                li {
                    div {
                        strong { "#" (f.attempt) " " (f.class) }
                        span.muted { " · " (f.kind.as_str()) " · from " (f.lane) " · " (rfc3339(f.at_ms)) }
                        @if !f.counted { span.muted { " · not counted" } }
                    }
                    @if !f.agent.is_empty() {
                        div.agent {
                            @if let Some(m) = &f.agent.model { span { "model " span.mono { (m) } } " " }
                            @if let Some(t) = &f.agent.tool { span { "tool " span.mono { (t) } } " " }
                            @if !f.agent.cost.is_zero() { span.spent { (f.agent.cost) } }
                        }
                    }
                    pre { (f.message) }
                }
            }
        }
        @if !lineage.is_empty() {
            h2 { "Replays" }
            ol.timeline #replays {
                @for (job, item) in &lineage {
                    li {
                        div {
                            a href=(format!("/jobs/{}", job.id)) { strong { (job.id) } }
                            span.muted { " · by " (job.actor) " · " (rfc3339(job.created_at_ms)) }
                            @if job.edited { " " span.badge { "edited" } }
                            @if !job.reason.is_empty() { span.muted { " · " (job.reason) } }
                        }
                        div { (item_outcome(item)) }
                        @if !item.detail.is_empty() { pre { (item.detail) } }
                    }
                }
            }
        }
        @if caller.role >= Role::Operator {
            h2 { "Fix and replay" }
            @if let Some(text) = editable {
                form method="post" action=(format!("/messages/{}/preview", env.id)) {
                    input type="hidden" name="csrf" value=(caller.csrf);
                    label for="edit-payload" { "Payload (edit it, then preview the change)" }
                    textarea #edit-payload name="payload" spellcheck="false" { (text) }
                    div { label for="edit-to" { "Target queue (empty: " (env.queue) ")" } input #edit-to name="to"; }
                    div { label for="edit-reason" { "Reason (audit log)" } input #edit-reason name="reason" size="60"; }
                    div.actions { button #preview type="submit" { "Preview replay" } }
                }
            } @else {
                p.muted { "This payload is not UTF-8 text, so it cannot be edited here; it can be replayed unchanged." }
                form method="post" action=(format!("/messages/{}/replay", env.id)) {
                    input type="hidden" name="csrf" value=(caller.csrf);
                    input type="hidden" name="unchanged" value="1";
                    div.actions { button type="submit" { "Replay unchanged" } }
                }
            }
            div.actions { a.button.danger-btn href=(format!("/messages/{}/purge", env.id)) { "Purge…" } }
        }
    };
    Ok(page("Dead message", Some(&caller), n.notice.as_deref(), body).into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct EditForm {
    csrf: String,
    payload: Option<String>,
    unchanged: Option<String>,
    to: Option<String>,
    #[serde(default)]
    reason: String,
}

fn diff(old: &str, new: &str) -> Markup {
    let diff = similar::TextDiff::from_lines(old, new);
    html! {
        div.diff #diff {
            @for change in diff.iter_all_changes() {
                @let line = change.to_string_lossy();
                @let line = line.trim_end_matches('\n');
                @match change.tag() {
                    similar::ChangeTag::Delete => div.del { "- " (line) },
                    similar::ChangeTag::Insert => div.ins { "+ " (line) },
                    similar::ChangeTag::Equal => div { "  " (line) },
                }
            }
        }
    }
}

/// `POST /messages/{id}/preview`: the diff before the confirm.
pub(crate) async fn message_preview(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Form(form): Form<EditForm>,
) -> UiResult {
    forbid(&caller, &form.csrf)?;
    let (id, d) = dead_or_404(&app, &id).await?;
    let old = String::from_utf8_lossy(&d.envelope.payload).into_owned();
    // Browsers submit textareas with CRLF line ends; keep the payload's own.
    let new = form.payload.unwrap_or_default().replace("\r\n", "\n");
    let target = target(form.to.as_deref())?;
    let was_json = serde_json::from_str::<serde_json::Value>(&old).is_ok();
    let is_json = serde_json::from_str::<serde_json::Value>(&new).is_ok();
    // Diff pretty-printed JSON when both sides are JSON, so a one-line payload shows
    // which field changed; the replay sends exactly the edited text.
    let (old_view, new_view) = match (
        serde_json::from_str::<serde_json::Value>(&old),
        serde_json::from_str::<serde_json::Value>(&new),
    ) {
        (Ok(a), Ok(b)) => (
            serde_json::to_string_pretty(&a).unwrap_or(old.clone()),
            serde_json::to_string_pretty(&b).unwrap_or(new.clone()),
        ),
        _ => (old.clone(), new.clone()),
    };
    let body = html! {
        h1 { "Preview replay" }
        @if was_json && !is_json { div.warning role="alert" { "The edited payload is not valid JSON any more; the original was." } }
        @if old == new { p.muted { "The payload is unchanged." } }
        p { "Message " span.mono { (id) } " will go back to " strong { (target.as_ref().map_or(d.envelope.queue.to_string(), ToString::to_string)) } " with the same id and its history." }
        (diff(&old_view, &new_view))
        form method="post" action=(format!("/messages/{id}/replay")) {
            input type="hidden" name="csrf" value=(caller.csrf);
            input type="hidden" name="payload" value=(new);
            input type="hidden" name="to" value=(form.to.clone().unwrap_or_default());
            input type="hidden" name="reason" value=(form.reason);
            div.actions {
                button #confirm type="submit" { "Confirm replay" }
                a.button.secondary href=(format!("/messages/{id}")) { "Cancel" }
            }
        }
    };
    Ok(page("Preview replay", Some(&caller), None, body).into_response())
}

/// `POST /messages/{id}/replay`.
pub(crate) async fn message_replay(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Form(form): Form<EditForm>,
) -> UiResult {
    forbid(&caller, &form.csrf)?;
    let id = crate::api::parse_id(&id)?;
    let request = ReplayRequest {
        selection: DeadSelection::Ids(vec![id]),
        to: target(form.to.as_deref())?,
        dry_run: false,
        rate_per_sec: None,
        max_replays: app.max_replays,
        actor: caller.actor.clone(),
        reason: form.reason.clone(),
    };
    let report = match (form.unchanged.is_some(), form.payload) {
        (false, Some(payload)) => {
            let reason = if form.reason.is_empty() {
                "edited in the UI and replayed".to_owned()
            } else {
                form.reason
            };
            app.triage
                .replay_edited(
                    id,
                    payload.replace("\r\n", "\n").into_bytes(),
                    ReplayRequest { reason, ..request },
                )
                .await?
        }
        _ => Some(app.triage.replay(request).await?),
    };
    let Some(report) = report.filter(|r| r.matched > 0) else {
        return Err(ApiError::NotFound(format!(
            "no dead message with id {id}: it may have been replayed or purged"
        ))
        .into());
    };
    app.metrics.replayed(&report.by_queue);
    let notice = if report.replayed == 1 {
        format!("Replayed message {id}.")
    } else {
        format!(
            "Message {id} stayed dead: it reached the replay limit ({}).",
            app.max_replays
        )
    };
    Ok(Redirect::to(&format!("/messages?notice={}", url_encode(&notice))).into_response())
}

/// `GET /messages/{id}/purge`.
pub(crate) async fn message_purge_confirm(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> UiResult {
    if caller.role < Role::Operator {
        return Err(ApiError::Forbidden(
            "this needs the operator role; you are signed in read-only".into(),
        )
        .into());
    }
    let (id, d) = dead_or_404(&app, &id).await?;
    let body = html! {
        h1 { "Purge a message" }
        div.danger {
            p { "Permanently delete " strong #confirm-count { "1 dead message" } " (" span.mono { (id) } ", " (d.envelope.queue) ")? This cannot be undone." }
            form method="post" action=(format!("/messages/{id}/purge")) {
                input type="hidden" name="csrf" value=(caller.csrf);
                div { label for="reason" { "Reason (audit log)" } input #reason name="reason" size="60"; }
                div.actions { button.danger-btn #confirm type="submit" { "Purge 1 message" } a.button.secondary href=(format!("/messages/{id}")) { "Cancel" } }
            }
        }
    };
    Ok(page("Confirm", Some(&caller), None, body).into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct PurgeForm {
    csrf: String,
    #[serde(default)]
    reason: String,
}

/// `POST /messages/{id}/purge`.
pub(crate) async fn message_purge(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Form(form): Form<PurgeForm>,
) -> UiResult {
    forbid(&caller, &form.csrf)?;
    let id = crate::api::parse_id(&id)?;
    let n = app
        .triage
        .purge(
            DeadSelection::Ids(vec![id]),
            caller.actor.clone(),
            form.reason,
        )
        .await?;
    Ok(Redirect::to(&format!(
        "/messages?notice={}",
        url_encode(&format!("Purged {n} message."))
    ))
    .into_response())
}

/// `GET /audit`.
pub(crate) async fn audit(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
) -> UiResult {
    let entries = app.triage.audit(200).await?;
    let body = html! {
        h1 { "Audit log" }
        @if entries.is_empty() { p.muted { "Nothing replayed, edited or purged yet." } } @else {
            table {
                thead { tr { th { "When" } th { "Who" } th { "What" } th.num { "How many" } th { "On" } th { "Why" } } }
                tbody {
                    @for e in &entries {
                        tr { td { (rfc3339(e.at_ms)) } td { (e.actor) } td { (e.action) } td.num { (e.count) } td.mono { (e.detail) } td { (e.reason) } }
                    }
                }
            }
        }
    };
    Ok(page("Audit log", Some(&caller), None, body).into_response())
}

/// `GET /alerts`: rules, open and past alerts, and notification deliveries.
pub(crate) async fn alerts(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
) -> UiResult {
    let Some(view) = app.alerts.clone() else {
        let body = html! { h1 { "Alerts" } p.muted { "Alerting is not running in this process." } };
        return Ok(page("Alerts", Some(&caller), None, body).into_response());
    };
    let open = view.open().await?;
    let past = view.past(50).await?;
    let notes = view.notifications(50).await?;
    let when = |ms: Option<i64>| {
        ms.map(|m| format!("{} ({})", rfc3339(m), ago(m)))
            .unwrap_or_else(|| "–".to_owned())
    };
    let body = html! {
        h1 { "Alerts" }
        h2 { "Rules" }
        table {
            thead { tr { th { "Name" } th { "Condition" } th { "Queues" } } }
            tbody { @for (name, expr, queue) in view.rules() { tr { td { (name) } td.mono { (expr) } td { (queue) } } } }
        }
        h2 { "Open" }
        @if open.is_empty() { p.muted { "No alert is pending or firing." } } @else {
            table #open-alerts {
                thead { tr { th { "Rule" } th { "Queue" } th { "State" } th { "Since" } th { "Fired" } th.num { "Value" } } }
                tbody {
                    @for a in &open {
                        tr {
                            td { (a.rule) } td { (a.queue) }
                            td { @if a.phase == redrive_core::alert::AlertPhase::Firing { strong.err { "firing" } } @else { "pending" } }
                            td { (when(Some(a.since_ms))) } td { (when(a.fired_ms)) } td.num { (a.value) }
                        }
                    }
                }
            }
        }
        h2 { "Past" }
        @if past.is_empty() { p.muted { "No alert has resolved yet." } } @else {
            table {
                thead { tr { th { "Rule" } th { "Queue" } th { "Fired" } th { "Resolved" } } }
                tbody { @for a in &past { tr { td { (a.rule) } td { (a.queue) } td { (when(a.fired_ms)) } td { (when(a.resolved_ms)) } } } }
            }
        }
        h2 { "Notifications" }
        @if notes.is_empty() { p.muted { "Nothing sent yet." } } @else {
            table {
                thead { tr { th { "Notifier" } th { "Kind" } th { "Rule / queue" } th.num { "Attempts" } th { "Result" } } }
                tbody {
                    @for n in &notes {
                        tr {
                            td { (n.notifier) } td { (n.kind.as_str()) } td { (n.rule) " / " (n.queue) } td.num { (n.attempts) }
                            td {
                                @if let Some(sent) = n.sent_ms { "sent " (ago(sent)) }
                                @else if n.failed { strong.err { "gave up: " } (n.last_error.clone().unwrap_or_default()) }
                                @else if let Some(e) = &n.last_error { span.err { "retrying: " (e) } }
                                @else { "queued" }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(page("Alerts", Some(&caller), None, body).into_response())
}

/// What became of a message in a job, in words.
fn item_outcome(item: &redrive_core::JobItem) -> &'static str {
    use redrive_core::ItemState;
    match item.state {
        ItemState::Pending => "not moved yet",
        ItemState::Moved => "moved; no outcome yet",
        ItemState::Ok => "succeeded",
        ItemState::Failed => "failed again",
        ItemState::Held => "held: an earlier message of its key failed again",
        ItemState::Skipped => "skipped",
    }
}

/// A job's progress bar: how many of its messages have settled one way or another.
fn job_bar(c: &redrive_core::JobCounts) -> Markup {
    let settled = c.ok + c.failed + c.held + c.skipped;
    html! {
        progress max=(c.total.max(1)) value=(settled) { (settled) " / " (c.total) }
        " " span.muted { (settled) " / " (c.total) }
    }
}

/// `GET /jobs`: replay jobs, newest first.
pub(crate) async fn jobs(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Query(n): Query<Notice>,
) -> UiResult {
    let jobs = app.triage.jobs(None, 100).await?;
    let body = html! {
        h1 { "Replay jobs" }
        p.muted { "Replays started with canaries or in key order. Start one from an error group's Replay page, or with "
            span.mono { "redrive dlq replay --canary N" } "." }
        @if jobs.is_empty() { p.muted #no-jobs { "No replay jobs yet." } } @else {
            table #jobs {
                thead { tr { th { "Job" } th { "State" } th { "Progress" } th { "OK" } th { "Failed again" } th { "Held" } th { "Started" } th { "Note" } } }
                tbody {
                    @for v in &jobs {
                        tr {
                            td.mono { a href=(format!("/jobs/{}", v.job.id)) { (v.job.id) } }
                            td { (v.state.as_str()) }
                            td { (job_bar(&v.counts)) }
                            td { (v.counts.ok) } td { (v.counts.failed) } td { (v.counts.held) }
                            td { (ago(v.job.created_at_ms)) " by " (v.job.actor) }
                            td { (first_line(&v.note, 120)) }
                        }
                    }
                }
            }
        }
    };
    Ok(page("Replay jobs", Some(&caller), n.notice.as_deref(), body).into_response())
}

/// `GET /jobs/{id}`: one job, its canaries and the messages that did not go through.
pub(crate) async fn job(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(n): Query<Notice>,
) -> UiResult {
    let v = match app.triage.jobs(Some(id.clone()), 1).await?.pop() {
        Some(v) => v,
        None => {
            return Err(
                ApiError::NotFound(format!("no replay job {}", first_line(&id, 40))).into(),
            );
        }
    };
    let items = crate::api::job_notable(&app, &v.job.id, 500).await?;
    let c = &v.counts;
    let body = html! {
        h1 { "Replay job " span.mono { (v.job.id) } }
        @if v.state == redrive_core::JobState::Paused {
            div.warning role="alert" #job-paused { "Paused: " (v.note) }
        }
        dl.meta {
            dt { "State" } dd #job-state { (v.state.as_str()) }
            dt { "Progress" } dd { (job_bar(c)) }
            dt { "Messages" } dd { (c.total) " in all: " (c.ok) " ok, " (c.failed) " failed again, " (c.held) " held, " (c.skipped) " skipped, " (c.moved) " moved awaiting outcome, " (c.pending) " not moved" }
            dt { "Started" } dd { (rfc3339(v.job.created_at_ms)) " by " (v.job.actor) }
            @if !v.job.reason.is_empty() { dt { "Reason" } dd { (v.job.reason) } }
            dt { "Selection" } dd { (v.job.selection) @if let Some(t) = &v.job.to { " → " (t) } }
            dt { "Mode" } dd {
                @if v.job.ordered { "each key in its original order" } @else { "unordered" }
                @if v.job.canary > 0 { ", " (v.job.canary) " canaries (" @if v.job.canary_passed { "passed" } @else { "not passed" } ")" }
            }
            @if v.state != redrive_core::JobState::Paused && !v.note.is_empty() { dt { "Note" } dd { (v.note) } }
            @if let Some(r) = &v.runner { dt { "Run by" } dd { (r) } }
        }
        @if caller.role >= Role::Operator && !v.state.is_final() {
            div.actions {
                @for (action, label) in [("pause", "Pause"), ("resume", "Resume"), ("cancel", "Cancel")] {
                    @let shown = match action {
                        "pause" => v.state == redrive_core::JobState::Running,
                        "resume" => v.state == redrive_core::JobState::Paused,
                        _ => true,
                    };
                    @if shown {
                        form method="post" action=(format!("/jobs/{}/{action}", v.job.id)) {
                            input type="hidden" name="csrf" value=(caller.csrf);
                            button.secondary #(format!("job-{action}")) type="submit" { (label) }
                        }
                    }
                }
            }
        }
        h2 { "Canaries, and messages that did not go through" }
        @if items.is_empty() { p.muted { "None." } } @else {
            table #job-messages {
                thead { tr { th { "Message" } th { "Key" } th { "Outcome" } th { "New error" } th { "Error before" } } }
                tbody {
                    @for i in &items {
                        tr {
                            td.mono { a href=(format!("/messages/{}", i.id)) { (i.id) } @if i.canary { " " span.muted { "(canary)" } } }
                            td.mono { (i.key.as_deref().unwrap_or("")) }
                            td { (item_outcome(i)) }
                            td { pre { (i.detail) } }
                            td { pre { (i.was) } }
                        }
                    }
                }
            }
        }
    };
    Ok(page("Replay job", Some(&caller), n.notice.as_deref(), body).into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct JobForm {
    csrf: String,
}

/// `POST /jobs/{id}/{action}`: pause, resume or cancel.
pub(crate) async fn job_action(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<JobForm>,
) -> UiResult {
    forbid(&caller, &form.csrf)?;
    let action = match action.as_str() {
        "pause" => crate::api::JobAction::Pause,
        "resume" => crate::api::JobAction::Resume,
        "cancel" => crate::api::JobAction::Cancel,
        _ => return Err(ApiError::NotFound("no such action".into()).into()),
    };
    let v = crate::api::act_on_job(&app, &id, action, &caller.actor).await?;
    let notice = format!("The job is {} now.", v.state.as_str());
    Ok(Redirect::to(&format!(
        "/jobs/{}?notice={}",
        v.job.id,
        url_encode(&notice)
    ))
    .into_response())
}
