//! `redrive serve`: the triage web UI, the JSON API under `/api/v1` and Prometheus
//! `/metrics`, over any backend (a [`Triage`]).
//!
//! The server binds to loopback by default and refuses any other address without an
//! access token; it escapes everything it renders (payloads, headers and errors are
//! untrusted) and sends a Content-Security-Policy that forbids inline scripts, so even
//! a rendering mistake could not run a payload.

pub mod alerting;
pub mod api;
pub mod auth;
pub mod error;
mod extract;
pub mod history;
pub mod jobs;
pub mod json;
pub mod metrics;
pub mod notify;
pub mod openapi;
pub mod triage;
pub mod ui;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

pub use crate::auth::{Auth, Role, SignIn, Tokens};
pub use crate::history::DepthHistory;
pub use crate::metrics::Metrics;
pub use crate::triage::{LanesAndStore, Triage};

/// Largest request body accepted (an edited payload is the biggest legitimate one).
pub const MAX_BODY: usize = 2 * 1024 * 1024;

/// Shared state of every request.
pub struct App {
    /// The backend.
    pub triage: Arc<dyn Triage>,
    /// Access control.
    pub auth: Auth,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// DLQ depth samples for the overview chart.
    pub history: Arc<DepthHistory>,
    /// Replay limit applied to UI and API replays.
    pub max_replays: u32,
    /// Alert state for the UI, when alerting runs.
    pub alerts: Option<Arc<dyn alerting::AlertView>>,
    /// Runs the replay jobs started here (and adopts orphaned ones, when supervised).
    pub jobs: Arc<jobs::JobRunner>,
}

impl App {
    /// State for a server over `triage`.
    pub fn new(triage: Arc<dyn Triage>, auth: Auth, metrics: Arc<Metrics>) -> Self {
        Self {
            jobs: jobs::JobRunner::new(Arc::clone(&triage), jobs::server_owner()),
            triage,
            auth,
            metrics,
            history: Arc::new(DepthHistory::new(360)),
            max_replays: 5,
            alerts: None,
        }
    }
}

/// Every route, with authentication, security headers and a body limit.
pub fn router(app: Arc<App>) -> Router {
    let protected = Router::new()
        .route("/", get(ui::overview))
        .route("/groups", get(ui::groups))
        .route("/groups/{fp}", get(ui::group))
        .route(
            "/groups/{fp}/replay",
            get(ui::group_replay_confirm).post(ui::group_replay),
        )
        .route(
            "/groups/{fp}/purge",
            get(ui::group_purge_confirm).post(ui::group_purge),
        )
        .route("/messages", get(ui::messages))
        .route("/messages/{id}", get(ui::message))
        .route("/messages/{id}/preview", post(ui::message_preview))
        .route("/messages/{id}/replay", post(ui::message_replay))
        .route(
            "/messages/{id}/purge",
            get(ui::message_purge_confirm).post(ui::message_purge),
        )
        .route("/audit", get(ui::audit))
        .route("/jobs", get(ui::jobs))
        .route("/jobs/{id}", get(ui::job))
        .route("/jobs/{id}/{action}", post(ui::job_action))
        .route("/alerts", get(ui::alerts))
        .route("/api/v1/queues", get(api::queues))
        .route("/api/v1/dead", get(api::dead_list))
        .route("/api/v1/dead/{id}", get(api::dead_get))
        .route("/api/v1/dead/{id}/replay", post(api::replay_one))
        .route("/api/v1/groups", get(api::groups))
        .route("/api/v1/replay", post(api::replay_bulk))
        .route("/api/v1/purge", post(api::purge))
        .route("/api/v1/export", get(api::export))
        .route("/api/v1/audit", get(api::audit))
        .route("/api/v1/jobs", get(api::jobs_list).post(api::job_start))
        .route("/api/v1/jobs/{id}", get(api::job_get))
        .route("/api/v1/jobs/{id}/pause", post(api::job_pause))
        .route("/api/v1/jobs/{id}/resume", post(api::job_resume))
        .route("/api/v1/jobs/{id}/cancel", post(api::job_cancel))
        .route("/metrics", get(scrape))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            authenticate,
        ));
    Router::new()
        .merge(protected)
        .route("/login", get(ui::login_form).post(ui::login))
        .route("/logout", post(ui::logout))
        .route("/static/style.css", get(ui::stylesheet))
        .route("/api/v1/openapi.json", get(api::openapi))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(security_headers))
        .with_state(app)
}

/// Any path not routed: the API's JSON error shape under `/api/`, plain text elsewhere.
async fn not_found(uri: axum::http::Uri) -> Response {
    if wants_json(uri.path()) {
        error::ApiError::NotFound(format!("no such API path: {}", uri.path())).into_response()
    } else {
        (StatusCode::NOT_FOUND, "not found\n").into_response()
    }
}

fn wants_json(path: &str) -> bool {
    path.starts_with("/api/") || path == "/metrics"
}

/// Identifies the caller (bearer token, session cookie, or open local mode) and refuses
/// cross-origin writes and, in open mode, non-loopback `Host` names.
async fn authenticate(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if app.auth.is_open() && !auth::loopback_host(&host) {
        return (StatusCode::FORBIDDEN, "this server has no access token, so it only answers requests for a loopback host name\n")
            .into_response();
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let session = auth::session_cookie(headers);
    let writes = !matches!(*req.method(), Method::GET | Method::HEAD);
    // A foreign Origin on a write is refused outright. An opaque origin ("null", sent by
    // privacy settings and sandboxed frames) proves nothing either way, so such writes
    // fall through to the CSRF token (forms) and the JSON-only rule (API).
    if writes
        && let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok())
        && origin != "null"
        && origin.split("://").nth(1) != Some(host.as_str())
    {
        return (StatusCode::FORBIDDEN, "cross-origin write refused\n").into_response();
    }
    let path = req.uri().path().to_owned();
    match app.auth.identify(bearer, session.as_deref()) {
        Some(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        None if wants_json(&path) => {
            let body = serde_json::json!({"error": "authentication required: send Authorization: Bearer TOKEN"});
            let mut resp = (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            resp
        }
        None => {
            let next = if path.starts_with('/') && !path.starts_with("//") {
                path
            } else {
                "/".to_owned()
            };
            Redirect::to(&format!("/login?next={}", ui::url_encode(&next))).into_response()
        }
    }
}

/// Headers that keep a rendered payload from ever acting as code.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    resp
}

/// `GET /metrics`: refresh the backend gauges, then encode.
async fn scrape(State(app): State<Arc<App>>) -> Response {
    refresh_metrics(&app.triage, &app.metrics).await;
    match app.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Reads lane depths and DLQ stats into the metrics' gauges.
pub async fn refresh_metrics(triage: &Arc<dyn Triage>, metrics: &Metrics) {
    match (triage.depths().await, triage.stats().await) {
        (Ok(depths), Ok(stats)) => metrics.set_backend(depths, stats),
        (Err(e), _) | (_, Err(e)) => tracing::warn!(error = %e, "metrics: cannot read the backend"),
    }
}

/// A router with only `/metrics`, for `redrive consume --metrics-bind`.
pub fn metrics_router(triage: Arc<dyn Triage>, metrics: Arc<Metrics>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let (triage, metrics) = (Arc::clone(&triage), Arc::clone(&metrics));
            async move {
                refresh_metrics(&triage, &metrics).await;
                match metrics.encode() {
                    Ok(text) => (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response(),
                    Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }
        }),
    )
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The bind is not allowed without a token.
    #[error("{0}")]
    Insecure(String),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("the server stopped: {0}")]
    Io(#[from] std::io::Error),
}

/// Binds `addr` (after the loopback / token check); returns the listener and the
/// address actually bound (port 0 picks a free port).
///
/// # Errors
///
/// A non-loopback address without tokens, or a bind failure.
pub async fn bind(
    app: &App,
    addr: SocketAddr,
) -> Result<(tokio::net::TcpListener, SocketAddr), ServeError> {
    app.auth.check_bind(addr).map_err(ServeError::Insecure)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    Ok((listener, local))
}

/// Serves until `shutdown` resolves, sampling DLQ depth every `sample_every`.
///
/// # Errors
///
/// Fails when the server stops with an I/O error.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    sample_every: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let sampler = tokio::spawn(history::sample(
        Arc::clone(&app.triage),
        Arc::clone(&app.history),
        sample_every,
    ));
    let result = axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown)
        .await;
    sampler.abort();
    result.map_err(ServeError::Io)
}
