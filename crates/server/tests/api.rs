//! The HTTP API and UI handlers through the `Router`, without a socket.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use redrive_core::{
    AgentContext, Cost, DeadLetter, DeadLetterStore, Envelope, Failure, FailureKind, LaneStats,
    QueueName, Transport,
};
use redrive_server::{App, Auth, LanesAndStore, Metrics, Tokens, Triage};
use redrive_sqlite::{Sqlite, SqliteConfig};
use serde_json::Value;
use tower::ServiceExt;

const OPERATOR: &str = "operator-token-0123456789";
const VIEWER: &str = "viewer-token-0123456789";
const XSS_SCRIPT: &str = "<script>alert(1)</script>";
const XSS_IMG: &str = "\"><img src=x onerror=alert(1)>";

struct Fixture {
    store: Sqlite,
    app: Arc<App>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn router(&self) -> Router {
        redrive_server::router(Arc::clone(&self.app))
    }
}

fn dead(queue: &str, payload: &str, class: &str, message: &str, at: i64) -> DeadLetter {
    dead_with(
        queue,
        payload,
        Failure::new(FailureKind::Poison, class, message, at),
    )
}

fn dead_with(queue: &str, payload: &str, failure: Failure) -> DeadLetter {
    let at = failure.at_ms;
    let mut env = Envelope::new(QueueName::new(queue).unwrap(), payload.to_owned())
        .with_header("x-note", XSS_SCRIPT);
    env.record_failure(failure, "main");
    DeadLetter {
        envelope: env,
        dead_at_ms: at,
    }
}

async fn fixture(tokens: Tokens, dead_count: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteConfig::new(dir.path().join("api.db")).open().unwrap();
    for i in 0..dead_count {
        let (class, msg) = if i % 3 == 0 {
            ("RateLimited", format!("429 for request {i}"))
        } else {
            ("SchemaError", format!("missing field in task {i}"))
        };
        store
            .insert(&dead(
                "agent.tasks",
                &format!("{{\"task\":{i}}}"),
                class,
                &msg,
                1_000 + i as i64,
            ))
            .await
            .unwrap();
    }
    // A failure whose handler reported hostile model and tool names, and a cost.
    let mut failure = Failure::new(
        FailureKind::Poison,
        "PromptInjection",
        format!("markup: {XSS_SCRIPT}"),
        5_000,
    );
    failure.agent = AgentContext {
        model: Some(XSS_IMG.to_owned()),
        tool: Some(XSS_SCRIPT.to_owned()),
        cost: Cost::new(1_200, 300, 0.0042),
    };
    store
        .insert(&dead_with(
            "other",
            &format!(
                "{{\"agent\":\"{XSS_SCRIPT}\",\"action\":\"{}\"}}",
                XSS_IMG.replace('"', "\\\"")
            ),
            failure,
        ))
        .await
        .unwrap();
    let triage: Arc<dyn Triage> = Arc::new(LanesAndStore::new(store.clone(), store.clone()));
    let app = Arc::new(App::new(
        triage,
        Auth::new(tokens),
        Arc::new(Metrics::new()),
    ));
    Fixture {
        store,
        app,
        _dir: dir,
    }
}

fn tokens() -> Tokens {
    Tokens::load(Some(OPERATOR), Some(VIEWER), None).unwrap()
}

async fn send(router: Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = router.oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap()
        .to_vec();
    (status, headers, body)
}

fn get(path: &str, token: Option<&str>) -> Request<Body> {
    let mut b = Request::get(path).header(header::HOST, "127.0.0.1:8080");
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(Body::empty()).unwrap()
}

fn post_json(path: &str, token: Option<&str>, body: &Value) -> Request<Body> {
    let mut b = Request::post(path)
        .header(header::HOST, "127.0.0.1:8080")
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(Body::from(body.to_string())).unwrap()
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

#[tokio::test]
async fn requests_without_a_token_are_refused_before_any_data() {
    let f = fixture(tokens(), 3).await;
    for path in [
        "/api/v1/queues",
        "/api/v1/dead",
        "/api/v1/groups",
        "/api/v1/export",
        "/metrics",
    ] {
        let (status, headers, body) = send(f.router(), get(path, None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(headers.get(header::WWW_AUTHENTICATE).unwrap(), "Bearer");
        assert!(
            !String::from_utf8_lossy(&body).contains("agent.tasks"),
            "{path} leaked data"
        );
    }
    let (status, _, _) = send(
        f.router(),
        get("/api/v1/queues", Some("wrong-token-wrong-token")),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, headers, _) = send(f.router(), get("/groups", None)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(
        headers
            .get(header::LOCATION)
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("/login?next=%2Fgroups")
    );
}

#[tokio::test]
async fn a_viewer_reads_but_gets_403_on_writes() {
    let f = fixture(tokens(), 3).await;
    let (status, _, _) = send(f.router(), get("/api/v1/dead", Some(VIEWER))).await;
    assert_eq!(status, StatusCode::OK);
    for (path, body) in [
        ("/api/v1/replay", serde_json::json!({"all": true})),
        ("/api/v1/purge", serde_json::json!({"all": true})),
    ] {
        let (status, _, body) = send(f.router(), post_json(path, Some(VIEWER), &body)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        assert!(json(&body)["error"].as_str().unwrap().contains("operator"));
    }
    assert_eq!(f.store.depth(None).await.unwrap(), 4, "nothing moved");
}

#[tokio::test]
async fn listing_filters_and_cursor_pages_cover_everything_once() {
    let f = fixture(tokens(), 120).await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/dead?queue=agent.tasks&limit=50&cursor={c}"),
            None => "/api/v1/dead?queue=agent.tasks&limit=50".to_owned(),
        };
        let (status, _, body) = send(f.router(), get(&path, Some(VIEWER))).await;
        assert_eq!(status, StatusCode::OK);
        let page = json(&body);
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 120);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 120, "no duplicates across pages");

    let (_, _, body) = send(
        f.router(),
        get("/api/v1/dead?class=RateLimited&limit=1000", Some(VIEWER)),
    )
    .await;
    assert_eq!(json(&body)["items"].as_array().unwrap().len(), 40);
    let (_, _, body) = send(
        f.router(),
        get("/api/v1/dead?q=task%207&limit=1000", Some(VIEWER)),
    )
    .await;
    let texts: Vec<String> = json(&body)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["error"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        !texts.is_empty() && texts.iter().all(|t| t.contains("task 7")),
        "{texts:?}"
    );
    let (status, _, body) =
        send(f.router(), get("/api/v1/dead?cursor=garbage", Some(VIEWER))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("invalid cursor")
    );

    let (_, _, body) = send(
        f.router(),
        get("/api/v1/groups?queue=agent.tasks", Some(VIEWER)),
    )
    .await;
    let groups = json(&body);
    let counts: Vec<u64> = groups
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["count"].as_u64().unwrap())
        .collect();
    assert_eq!(
        counts,
        [80, 40],
        "normalized messages group by class and text"
    );
}

#[tokio::test]
async fn operator_replays_with_dry_run_and_everything_is_audited() {
    let f = fixture(tokens(), 9).await;
    let lanes = redrive_core::LaneSet {
        queue: QueueName::new("agent.tasks").unwrap(),
        tiers: vec![],
    };
    let body = serde_json::json!({"filter": {"queue": "agent.tasks", "class": "SchemaError"}, "dry_run": true});
    let (status, _, resp) = send(
        f.router(),
        post_json("/api/v1/replay", Some(OPERATOR), &body),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let report = json(&resp);
    assert_eq!(
        (
            report["matched"].as_u64(),
            report["replayed"].as_u64(),
            report["dry_run"].as_bool()
        ),
        (Some(6), Some(6), Some(true))
    );
    assert_eq!(
        f.store.queue_depths(&lanes).await.unwrap().main,
        0,
        "a dry run moves nothing"
    );

    let body = serde_json::json!({"filter": {"queue": "agent.tasks", "class": "SchemaError"}, "rate_per_sec": 1000, "reason": "schema fixed"});
    let (_, _, resp) = send(
        f.router(),
        post_json("/api/v1/replay", Some(OPERATOR), &body),
    )
    .await;
    assert_eq!(json(&resp)["replayed"], 6);
    let d = f.store.queue_depths(&lanes).await.unwrap();
    assert_eq!((d.main, d.dlq), (6, 3));

    let (_, _, resp) = send(
        f.router(),
        get("/api/v1/dead?class=RateLimited", Some(OPERATOR)),
    )
    .await;
    let id = json(&resp)["items"][0]["id"].as_str().unwrap().to_owned();
    let body = serde_json::json!({"payload": "{\"task\":\"fixed\"}", "to": "agent.fixed"});
    let (status, _, resp) = send(
        f.router(),
        post_json(&format!("/api/v1/dead/{id}/replay"), Some(OPERATOR), &body),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(json(&resp)["by_queue"]["agent.fixed"], 1);
    let fixed = f
        .store
        .fetch(
            &redrive_core::LaneSet {
                queue: QueueName::new("agent.fixed").unwrap(),
                tiers: vec![],
            },
            10,
            std::time::Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(fixed.deliveries.len(), 1);
    assert_eq!(
        fixed.deliveries[0].envelope.payload,
        b"{\"task\":\"fixed\"}"[..]
    );
    assert_eq!(
        fixed.deliveries[0].envelope.id.to_string(),
        id,
        "an edited replay keeps the id"
    );

    let body = serde_json::json!({"filter": {"class": "RateLimited"}});
    let (_, _, resp) = send(
        f.router(),
        post_json("/api/v1/purge", Some(OPERATOR), &body),
    )
    .await;
    assert_eq!(json(&resp)["purged"], 2);

    let (_, _, resp) = send(f.router(), get("/api/v1/audit", Some(VIEWER))).await;
    let audit = json(&resp);
    let actions: Vec<(&str, u64, &str)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["count"].as_u64().unwrap(),
                e["actor"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("purge", 2, "api:operator"),
            ("replay", 1, "api:operator"),
            ("replay", 6, "api:operator")
        ]
    );
    assert_eq!(audit[2]["reason"], "schema fixed");
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let f = fixture(tokens(), 2).await;
    for (body, needle) in [
        (serde_json::json!({}), "exactly one of"),
        (serde_json::json!({"filter": {}}), "empty filter"),
        (serde_json::json!({"ids": ["nope"]}), "invalid message id"),
        (
            serde_json::json!({"all": true, "to": "bad queue"}),
            "invalid queue name",
        ),
        (
            serde_json::json!({"all": true, "rate_per_sec": 0}),
            "rate_per_sec",
        ),
    ] {
        let (status, _, resp) = send(
            f.router(),
            post_json("/api/v1/replay", Some(OPERATOR), &body),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            json(&resp)["error"].as_str().unwrap().contains(needle),
            "{body}: {}",
            String::from_utf8_lossy(&resp)
        );
    }
    let (status, _, resp) = send(
        f.router(),
        get(
            "/api/v1/dead/01a21ed2-7110-754d-80d2-085619addb45",
            Some(VIEWER),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        json(&resp)["error"]
            .as_str()
            .unwrap()
            .contains("no dead message")
    );
    let huge = vec![b'x'; redrive_server::MAX_BODY + 10];
    let req = Request::post("/api/v1/replay")
        .header(header::HOST, "127.0.0.1:8080")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {OPERATOR}"))
        .body(Body::from(huge))
        .unwrap();
    let (status, headers, resp) = send(f.router(), req).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_json_error(&headers, &resp);

    // Regression: query and body rejections came back as text/plain with statuses the
    // OpenAPI document did not list, a limit over the documented maximum was accepted,
    // and an unknown API path answered an empty 404.
    let raw = |method: &str, path: &str, content_type: &str, body: &str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "127.0.0.1:8080")
            .header(header::CONTENT_TYPE, content_type)
            .header(header::AUTHORIZATION, format!("Bearer {OPERATOR}"))
            .body(Body::from(body.to_owned()))
            .unwrap()
    };
    for (req, want) in [
        (
            raw("POST", "/api/v1/replay", "text/plain", r#"{"all":true}"#),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            raw("POST", "/api/v1/replay", "application/json", "{not json"),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw("POST", "/api/v1/replay", "application/json", r#"{"ids":5}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            raw(
                "POST",
                "/api/v1/purge",
                "application/json",
                r#"{"all":true,"extra":1}"#,
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            raw("GET", "/api/v1/dead?limit=1001", "application/json", ""),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw("GET", "/api/v1/dead?limit=-1", "application/json", ""),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw("GET", "/api/v1/groups?since_ms=abc", "application/json", ""),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw(
                "GET",
                "/api/v1/export?until_ms=300000000000000",
                "application/json",
                "",
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw("GET", "/api/v1/nothing-here", "application/json", ""),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let what = format!("{} {}", req.method(), req.uri());
        let (status, headers, resp) = send(f.router(), req).await;
        assert_eq!(status, want, "{what}: {}", String::from_utf8_lossy(&resp));
        assert_json_error(&headers, &resp);
    }
}

/// The API's error shape: `{"error": "..."}` as application/json.
fn assert_json_error(headers: &axum::http::HeaderMap, body: &[u8]) {
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    let message = json(body)["error"].as_str().map(str::to_owned);
    assert!(
        message.is_some_and(|m| !m.is_empty()),
        "{}",
        String::from_utf8_lossy(body)
    );
}

#[tokio::test]
async fn pages_escape_payloads_headers_and_errors() {
    let f = fixture(tokens(), 0).await;
    let (_, _, resp) = send(f.router(), get("/api/v1/dead?queue=other", Some(VIEWER))).await;
    let id = json(&resp)["items"][0]["id"].as_str().unwrap().to_owned();
    for path in [
        format!("/messages/{id}"),
        "/groups".to_owned(),
        "/messages?queue=other".to_owned(),
        "/".to_owned(),
    ] {
        let (status, headers, body) = send(f.router(), get(&path, Some(VIEWER))).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        let html = String::from_utf8(body).unwrap();
        assert!(
            !html.contains("<script>alert"),
            "{path} rendered a raw script tag"
        );
        assert!(
            !html.contains("<img src=x"),
            "{path} rendered a raw img tag"
        );
        let csp = headers
            .get(header::CONTENT_SECURITY_POLICY)
            .unwrap()
            .to_str()
            .unwrap();
        assert!(
            csp.contains("default-src 'none'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        if path.starts_with("/messages/") {
            assert!(
                html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
                "the payload is shown as text"
            );
            assert!(
                html.contains("tool <span class=\"mono\">&lt;script&gt;"),
                "the attempt's tool is shown, as text"
            );
            assert!(
                html.contains("$0.0042 · 1200 in / 300 out tokens"),
                "and its cost"
            );
            assert!(
                html.contains("&lt;img src=x onerror=alert(1)&gt;"),
                "the payload is shown as text"
            );
        }
    }
}

#[tokio::test]
async fn groups_and_messages_show_attempts_and_what_failures_cost() {
    let f = fixture(tokens(), 3).await;
    let (status, _, body) = send(f.router(), get("/api/v1/groups", Some(VIEWER))).await;
    assert_eq!(status, StatusCode::OK);
    let groups = json(&body);
    let injection = groups
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["error_class"] == "PromptInjection")
        .unwrap_or_else(|| panic!("{groups}"))
        .clone();
    assert_eq!(injection["attempts"], 1);
    assert_eq!(
        injection["cost"],
        serde_json::json!({"input_tokens": 1200, "output_tokens": 300, "usd": 0.0042})
    );
    let (_, _, body) = send(f.router(), get("/api/v1/dead?queue=other", Some(VIEWER))).await;
    let message = &json(&body)["items"][0];
    assert_eq!(message["cost"]["usd"], 0.0042);
    assert_eq!(message["history"][0]["tool"], XSS_SCRIPT);
    assert_eq!(message["history"][0]["cost"]["input_tokens"], 1200);
    // A failure that reported nothing has no agent fields.
    let (_, _, body) = send(
        f.router(),
        get("/api/v1/dead?queue=agent.tasks", Some(VIEWER)),
    )
    .await;
    let plain = &json(&body)["items"][0];
    assert!(plain["history"][0].get("model").is_none(), "{plain}");
    assert_eq!(plain["cost"]["usd"], 0.0);

    let fp = injection["fingerprint"].as_str().unwrap();
    let (status, _, body) = send(f.router(), get(&format!("/groups/{fp}"), Some(VIEWER))).await;
    assert_eq!(status, StatusCode::OK);
    let html = String::from_utf8(body).unwrap();
    assert!(
        html.contains("$0.0042 · 1200 in / 300 out tokens"),
        "{html}"
    );
}

#[tokio::test]
async fn ui_writes_need_the_session_csrf_token() {
    let f = fixture(tokens(), 3).await;
    // Sign in through the form.
    let req = Request::post("/login")
        .header(header::HOST, "127.0.0.1:8080")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("token={OPERATOR}&next=%2Fgroups")))
        .unwrap();
    let (status, headers, _) = send(f.router(), req).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = headers
        .get(header::SET_COOKIE)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_owned();
    let groups = f
        .store
        .groups(&redrive_core::DeadFilter::default(), 100)
        .await
        .unwrap();
    let fp = &groups[0].fingerprint;
    let form = |csrf: &str| {
        Request::post(format!("/groups/{fp}/replay"))
            .header(header::HOST, "127.0.0.1:8080")
            .header(header::COOKIE, &session)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!(
                "csrf={csrf}&expected={}",
                groups[0].count
            )))
            .unwrap()
    };
    let (status, _, _) = send(f.router(), form("forged")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // The real token is in the confirmation page's form.
    let req = Request::get(format!("/groups/{fp}/replay"))
        .header(header::HOST, "127.0.0.1:8080")
        .header(header::COOKIE, &session)
        .body(Body::empty())
        .unwrap();
    let (_, _, page) = send(f.router(), req).await;
    let page = String::from_utf8(page).unwrap();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    let cross = Request::post(format!("/groups/{fp}/replay"))
        .header(header::HOST, "127.0.0.1:8080")
        .header(header::ORIGIN, "https://evil.example")
        .header(header::COOKIE, &session)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!(
            "csrf={csrf}&expected={}",
            groups[0].count
        )))
        .unwrap();
    let (status, _, _) = send(f.router(), cross).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a cross-origin form post is refused"
    );
    let before = f.store.depth(None).await.unwrap();
    let (status, headers, _) = send(f.router(), form(&csrf)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(
        headers
            .get(header::LOCATION)
            .unwrap()
            .to_str()
            .unwrap()
            .contains("Replayed")
    );
    assert_eq!(f.store.depth(None).await.unwrap(), before - groups[0].count);
}

#[tokio::test]
async fn open_mode_answers_only_loopback_host_names() {
    let f = fixture(Tokens::default(), 1).await;
    let (status, _, _) = send(f.router(), get("/api/v1/queues", None)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "no token configured: local callers are operators"
    );
    let rebinding = Request::get("/api/v1/queues")
        .header(header::HOST, "attacker.example:8080")
        .body(Body::empty())
        .unwrap();
    let (status, _, _) = send(f.router(), rebinding).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let form_post = Request::post("/api/v1/purge")
        .header(header::HOST, "127.0.0.1:8080")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("all=true"))
        .unwrap();
    let (status, _, _) = send(f.router(), form_post).await;
    assert_eq!(
        status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "API writes must be JSON, which a cross-site form cannot send"
    );
}

#[tokio::test]
async fn export_streams_one_json_line_per_dead_message() {
    let f = fixture(tokens(), 1200).await;
    let (status, headers, body) = send(
        f.router(),
        get("/api/v1/export?queue=agent.tasks", Some(VIEWER)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers.get(header::CONTENT_TYPE).unwrap(),
        "application/x-ndjson"
    );
    let text = String::from_utf8(body).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1200);
    assert!(lines.iter().all(|l| l["queue"] == "agent.tasks"));
}

#[tokio::test]
async fn metrics_scrape_parses_and_reports_lanes() {
    let f = fixture(tokens(), 5).await;
    let (status, headers, body) = send(f.router(), get("/metrics", Some(VIEWER))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers
            .get(header::CONTENT_TYPE)
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = String::from_utf8(body).unwrap();
    assert_eq!(text.lines().last(), Some("# EOF"));
    let mut samples = std::collections::HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(name.starts_with("redrive_"), "{name}");
        samples.insert(name.to_owned(), value);
    }
    assert_eq!(
        samples.get(r#"redrive_lane_depth_messages{queue="agent.tasks",lane="dlq"}"#),
        Some(&5.0)
    );
    assert_eq!(
        samples.get(r#"redrive_dlq_messages{queue="agent.tasks",error_class="SchemaError"}"#),
        Some(&3.0)
    );
    assert!(
        samples.contains_key(r#"redrive_lane_oldest_age_seconds{queue="agent.tasks",lane="dlq"}"#)
    );
}

#[test]
fn openapi_documents_every_api_route() {
    let doc = redrive_server::openapi::document();
    let paths: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let source = include_str!("../src/lib.rs");
    let routes: Vec<&str> = source
        .lines()
        .filter_map(|l| l.trim().strip_prefix(".route(\"/api/v1/"))
        .map(|rest| rest.split('"').next().unwrap())
        .filter(|r| *r != "openapi.json")
        .collect();
    assert!(routes.len() >= 8, "{routes:?}");
    for route in routes {
        let full = format!("/api/v1/{route}");
        assert!(
            paths.contains(&full.as_str()),
            "{full} is not in openapi.json"
        );
    }
}

/// Regression: `next=/%09/evil.example/x` answered `303 location: /\t/evil.example/x`,
/// which browsers follow to another origin, and `next` holding CR/LF gave a 500.
#[tokio::test]
async fn sign_in_redirects_only_to_a_path_of_this_server() {
    let f = fixture(tokens(), 1).await;
    let sign_in = |next: &str| {
        Request::post("/login")
            .header(header::HOST, "127.0.0.1:8080")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("token={OPERATOR}&next={next}")))
            .unwrap()
    };
    for (next, to) in [
        ("%2Fgroups%3Fq%3D1", "/groups?q=1"),
        ("%2F%09%2Fevil.example%2Fx", "/"),
        ("%2F%0A%2Fevil.example", "/"),
        ("%2F%0D%0ASet-Cookie%3A+x%3D1", "/"),
        ("%2F%2Fevil.example", "/"),
        ("%2F%5Cevil.example", "/"),
        ("https%3A%2F%2Fevil.example", "/"),
        ("%2F%C3%A9", "/"),
    ] {
        let (status, headers, _) = send(f.router(), sign_in(next)).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "next={next}");
        assert_eq!(headers.get(header::LOCATION).unwrap(), to, "next={next}");
    }
}

/// Regression: sign-in had no rate limit (tokens could be guessed through the form as
/// fast as requests went), and the session cookie had no `Secure` flag even when the UI
/// was served over HTTPS behind a proxy.
#[tokio::test]
async fn sign_in_is_rate_limited_and_the_cookie_can_be_secure() {
    let f = fixture(tokens(), 1).await;
    let sign_in = |token: &str| {
        Request::post("/login")
            .header(header::HOST, "127.0.0.1:8080")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("token={token}&next=%2F")))
            .unwrap()
    };
    for i in 0..redrive_server::auth::SIGN_IN_FAILURES {
        let (status, _, _) = send(f.router(), sign_in(&format!("wrong-token-guess-{i:04}"))).await;
        assert_eq!(
            status,
            StatusCode::SEE_OTHER,
            "guess {i} is refused as usual"
        );
    }
    // Past the limit even the right token waits: the form no longer tells guesses apart.
    let (status, headers, _) = send(f.router(), sign_in(OPERATOR)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert!(headers.get(header::SET_COOKIE).is_none());
    // The bearer API is not the form: it keeps working.
    let (status, _, _) = send(f.router(), get("/api/v1/queues", Some(OPERATOR))).await;
    assert_eq!(status, StatusCode::OK);

    let secure = Auth::new(tokens()).with_secure_cookies(true);
    let redrive_server::SignIn::Session(id) = secure.sign_in(OPERATOR) else {
        panic!("signs in");
    };
    let cookie = secure.session_cookie(&id, false);
    assert!(
        cookie.ends_with("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let plain = Auth::new(tokens()).session_cookie("x", false);
    assert!(!plain.contains("Secure"), "{plain}");
}

/// A replay job through the API: started (202) and run by the server, paused by its
/// failing canaries (no consumer here reports, so the canary outcomes are written as a
/// consumer's reporter would), resumed, cancelled; every refusal says why, and the
/// message's timeline lists the job.
#[tokio::test]
async fn replay_jobs_start_run_and_obey_pause_resume_and_cancel() {
    use redrive_core::{ReplayJobs, ReplayOutcome};
    let f = fixture(tokens(), 12).await;
    let viewer = post_json(
        "/api/v1/jobs",
        Some(VIEWER),
        &serde_json::json!({"all": true, "canary": 2}),
    );
    assert_eq!(send(f.router(), viewer).await.0, StatusCode::FORBIDDEN);
    for (body, why) in [
        (serde_json::json!({"all": true}), "a job needs"),
        (
            serde_json::json!({"all": true, "canary": 2, "canary_percent": 5}),
            "not both",
        ),
        (serde_json::json!({"all": true, "canary": 0}), "at least 1"),
        (
            serde_json::json!({"all": true, "canary_percent": 101}),
            "at most 100",
        ),
        (
            serde_json::json!({"all": true, "ordered": true, "max_failed_percent": -1}),
            "from 0 to 100",
        ),
    ] {
        let (status, _, out) =
            send(f.router(), post_json("/api/v1/jobs", Some(OPERATOR), &body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            json(&out)["error"].as_str().unwrap().contains(why),
            "{body}: {}",
            String::from_utf8_lossy(&out)
        );
    }

    let start = serde_json::json!({"filter": {"queue": "agent.tasks", "class": "SchemaError"}, "canary": 2, "reason": "schema fix"});
    let (status, _, out) = send(
        f.router(),
        post_json("/api/v1/jobs", Some(OPERATOR), &start),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&out)
    );
    let job = json(&out);
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["canary"], 2);
    assert_eq!(job["counts"]["total"], 8, "the 8 SchemaError messages");
    assert_eq!(job["actor"], "api:operator");

    // The server moves the two canaries; they fail again.
    let canaries = wait_for(&f, &id, |j| j["counts"]["moved"] == 2).await;
    assert_eq!(canaries["counts"]["pending"], 6);
    let moved: Vec<_> = f
        .store
        .job_items(&id, None, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.canary)
        .map(|i| ReplayOutcome {
            id: i.id,
            replays: i.replays,
            error: Some("missing field, still".into()),
        })
        .collect();
    f.store.record_replay_outcomes(&moved).await.unwrap();
    let paused = wait_for(&f, &id, |j| j["state"] == "paused").await;
    assert!(
        paused["note"]
            .as_str()
            .unwrap()
            .contains("2 of 2 canaries failed again"),
        "{paused}"
    );

    let (status, _, out) = send(f.router(), get(&format!("/api/v1/jobs/{id}"), Some(VIEWER))).await;
    assert_eq!(status, StatusCode::OK);
    let detail = json(&out);
    let messages = detail["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert!(messages.iter().all(|m| {
        m["state"] == "failed"
            && m["was"]
                .as_str()
                .unwrap()
                .starts_with("missing field in task")
    }));
    // A message still dead shows the job in its timeline.
    let waiting = f
        .store
        .job_items(&id, None, 100)
        .await
        .unwrap()
        .into_iter()
        .find(|i| !i.canary)
        .unwrap();
    let (_, _, out) = send(
        f.router(),
        get(&format!("/api/v1/dead/{}", waiting.id), Some(VIEWER)),
    )
    .await;
    let lineage = &json(&out)["replay_jobs"];
    assert_eq!(lineage[0]["job"], id.as_str(), "{lineage}");
    assert_eq!(lineage[0]["outcome"], "pending");
    assert_eq!(lineage[0]["reason"], "schema fix");

    let act = |what: &str, token: &str| {
        post_json(
            &format!("/api/v1/jobs/{id}/{what}"),
            Some(token),
            &serde_json::json!({}),
        )
    };
    assert_eq!(
        send(f.router(), act("pause", OPERATOR)).await.0,
        StatusCode::CONFLICT,
        "already paused"
    );
    assert_eq!(
        send(f.router(), act("resume", VIEWER)).await.0,
        StatusCode::FORBIDDEN
    );
    let (status, _, out) = send(f.router(), act("resume", OPERATOR)).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&out));
    assert_eq!(
        json(&out)["canary_passed"],
        true,
        "going on past the failed canaries"
    );
    let (status, _, out) = send(f.router(), act("cancel", OPERATOR)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&out)["state"], "cancelled");
    assert_eq!(
        send(f.router(), act("resume", OPERATOR)).await.0,
        StatusCode::CONFLICT
    );

    let (status, _, out) = send(f.router(), get("/api/v1/jobs", Some(VIEWER))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&out).as_array().unwrap().len(), 1);
    let missing = "/api/v1/jobs/rj-00000000000000000000000000000000";
    assert_eq!(
        send(f.router(), get(missing, Some(VIEWER))).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send(f.router(), get("/api/v1/jobs/rj-nope", Some(VIEWER)))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
}

/// Polls a job through the API until `done` holds (at most 10 s).
async fn wait_for(f: &Fixture, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, _, out) = send(
            f.router(),
            get(&format!("/api/v1/jobs/{id}"), Some(OPERATOR)),
        )
        .await;
        let job = json(&out);
        if done(&job) {
            return job;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job never got there: {job}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The UI starts a replay job from a group's confirmation form (canaries), shows it
/// with its progress and the reason escaped, pauses it with the session's CSRF token,
/// and lists it among the jobs.
#[tokio::test]
async fn the_ui_starts_shows_and_pauses_a_canary_replay() {
    let f = fixture(tokens(), 6).await;
    let req = Request::post("/login")
        .header(header::HOST, "127.0.0.1:8080")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("token={OPERATOR}&next=%2Fgroups")))
        .unwrap();
    let (_, headers, _) = send(f.router(), req).await;
    let session = headers
        .get(header::SET_COOKIE)
        .unwrap()
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let page_of = |path: String| {
        Request::get(path)
            .header(header::HOST, "127.0.0.1:8080")
            .header(header::COOKIE, &session)
            .body(Body::empty())
            .unwrap()
    };
    let form = |path: String, body: String| {
        Request::post(path)
            .header(header::HOST, "127.0.0.1:8080")
            .header(header::COOKIE, &session)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(body))
            .unwrap()
    };
    let groups = f
        .store
        .groups(&redrive_core::DeadFilter::default(), 100)
        .await
        .unwrap();
    let g = groups
        .iter()
        .find(|g| g.error_class == "SchemaError")
        .unwrap();
    let (_, _, page) = send(
        f.router(),
        page_of(format!("/groups/{}/replay", g.fingerprint)),
    )
    .await;
    let page = String::from_utf8(page).unwrap();
    assert!(page.contains("name=\"canary\"") && page.contains("name=\"ordered\""));
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    let reason: String = form_urlencoded::byte_serialize(XSS_SCRIPT.as_bytes()).collect();
    let (status, headers, _) = send(
        f.router(),
        form(
            format!("/groups/{}/replay", g.fingerprint),
            format!("csrf={csrf}&expected={}&canary=1&reason={reason}", g.count),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let job_path = headers
        .get(header::LOCATION)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(job_path.starts_with("/jobs/rj-"), "{job_path}");

    let (status, _, page) = send(f.router(), page_of(job_path.clone())).await;
    assert_eq!(status, StatusCode::OK);
    let page = String::from_utf8(page).unwrap();
    assert!(!page.contains(XSS_SCRIPT), "the reason is escaped");
    assert!(page.contains("&lt;script&gt;"));
    assert!(page.contains("<progress"), "a progress bar");
    assert!(
        page.contains("id=\"job-pause\""),
        "a running job can be paused"
    );

    let (status, headers, _) = send(
        f.router(),
        form(format!("{job_path}/pause"), "csrf=forged".into()),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{headers:?}");
    let (status, headers, _) = send(
        f.router(),
        form(format!("{job_path}/pause"), format!("csrf={csrf}")),
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(
        headers
            .get(header::LOCATION)
            .unwrap()
            .to_str()
            .unwrap()
            .contains("paused")
    );
    let (_, _, page) = send(f.router(), page_of(job_path.clone())).await;
    let page = String::from_utf8(page).unwrap();
    assert!(
        page.contains("id=\"job-paused\"") && page.contains("id=\"job-resume\""),
        "{page}"
    );

    let (_, _, page) = send(f.router(), page_of("/jobs".into())).await;
    let page = String::from_utf8(page).unwrap();
    assert!(page.contains(&job_path[6..]), "listed");
}

/// The overview shows each open breaker as a banner, its consumer's name escaped, and
/// `/api/v1/queues` counts it.
#[tokio::test]
async fn an_open_breaker_is_a_banner_on_the_overview_and_counted_in_queues() {
    use redrive_core::{BreakerBoard, now_ms};
    let f = fixture(tokens(), 3).await;
    let now = now_ms();
    f.store
        .report_breaker(
            "agent.tasks",
            &format!("consume {XSS_IMG}"),
            Some((now - 60_000, now)),
        )
        .await
        .unwrap();
    let (status, _, page) = send(f.router(), get("/", Some(VIEWER))).await;
    assert_eq!(status, StatusCode::OK);
    let page = String::from_utf8(page).unwrap();
    assert!(page.contains("Breaker open on agent.tasks"), "{page}");
    assert!(!page.contains(XSS_IMG), "the consumer's name is escaped");
    let (_, _, out) = send(f.router(), get("/api/v1/queues", Some(VIEWER))).await;
    let queues = json(&out);
    let q = queues
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "agent.tasks")
        .unwrap();
    assert_eq!(q["breakers_open"], 1);
    f.store
        .report_breaker("agent.tasks", &format!("consume {XSS_IMG}"), None)
        .await
        .unwrap();
    let (_, _, page) = send(f.router(), get("/", Some(VIEWER))).await;
    assert!(!String::from_utf8(page).unwrap().contains("Breaker open"));
}

/// An edited replay is kept as a job of one, so the message's timeline says it was
/// edited and, once a consumer reports, how it fared.
#[tokio::test]
async fn an_edited_replay_is_in_the_messages_timeline() {
    use redrive_core::{ReplayJobs, ReplayOutcome};
    let f = fixture(tokens(), 3).await;
    let (_, _, out) = send(f.router(), get("/api/v1/dead?limit=1", Some(VIEWER))).await;
    let id = json(&out)["items"][0]["id"].as_str().unwrap().to_owned();
    let body = serde_json::json!({"payload": "{\"task\": \"fixed\"}", "reason": "fixed the field"});
    let (status, _, out) = send(
        f.router(),
        post_json(&format!("/api/v1/dead/{id}/replay"), Some(OPERATOR), &body),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&out));
    let message = redrive_core::MessageId::parse(&id).unwrap();
    let lineage = f.store.replays_of(&message).await.unwrap();
    assert_eq!(lineage.len(), 1);
    let (job, item) = &lineage[0];
    assert!(job.edited);
    assert_eq!(
        (job.reason.as_str(), job.actor.as_str()),
        ("fixed the field", "api:operator")
    );
    assert_eq!(
        (item.state, item.replays),
        (redrive_core::ItemState::Moved, 1)
    );
    let (_, _, out) = send(f.router(), get("/api/v1/jobs", Some(VIEWER))).await;
    let jobs = json(&out);
    assert_eq!(
        (jobs[0]["state"].as_str(), jobs[0]["edited"].as_bool()),
        (Some("done"), Some(true))
    );
    f.store
        .record_replay_outcomes(&[ReplayOutcome {
            id: message,
            replays: 1,
            error: None,
        }])
        .await
        .unwrap();
    assert_eq!(
        f.store.replays_of(&message).await.unwrap()[0].1.state,
        redrive_core::ItemState::Ok
    );
}
