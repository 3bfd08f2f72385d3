//! The triage UI in a real headless Chromium, driven through chromedriver (WebDriver):
//! sign in, open an error group, look at a message whose payload is markup, replay the
//! group, and check that nothing from a payload ever runs. Screenshots go to the test
//! target's scratch folder (`target/tmp/screenshots/`), or to `docs/screenshots/` with
//! `REDRIVE_UPDATE_SCREENSHOTS=1`, so a test run leaves the work tree as it was.
//!
//! Needs Debian's `chromium` and `chromium-driver`; `scripts/test` installs them when
//! missing and sets `REDRIVE_TEST_BROWSER=1`, which makes their absence a failure.
//!
//! The WebDriver calls are a dozen JSON requests, made with reqwest directly rather than
//! through a WebDriver client crate that would add ~20 crates to a 2-core build.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

const OPERATOR: &str = "browser-test-operator-token-42";
const VIEWER: &str = "browser-test-viewer-token-42";
const W3C_ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Kills a child process when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Driver {
    http: reqwest::Client,
    base: String,
}

impl Driver {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"));
        let value: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: bad JSON: {e}"));
        value["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let v = self.call(reqwest::Method::POST, path, Some(body)).await;
        assert!(v.get("error").is_none(), "webdriver POST {path}: {v}");
        v
    }

    async fn get(&self, path: &str) -> Value {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    async fn find(&self, using: &str, value: &str) -> String {
        let v = self
            .post("/element", json!({ "using": using, "value": value }))
            .await;
        v[W3C_ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {value}: {v}"))
            .to_owned()
    }

    async fn css(&self, selector: &str) -> String {
        self.find("css selector", selector).await
    }

    async fn click(&self, element: &str) {
        self.post(&format!("/element/{element}/click"), json!({}))
            .await;
    }

    async fn type_into(&self, element: &str, text: &str) {
        self.post(
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn text(&self, element: &str) -> String {
        self.get(&format!("/element/{element}/text"))
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits (up to 10 s) for the page URL to satisfy `ok`, as a click's navigation may
    /// still be loading when the click returns.
    async fn wait_url(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let url = self.url().await;
            if ok(&url) {
                return url;
            }
            assert!(
                Instant::now() < deadline,
                "waited for {what}; still at {url}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn url(&self) -> String {
        self.get("/url")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn script(&self, js: &str) -> Value {
        self.post("/execute/sync", json!({ "script": js, "args": [] }))
            .await
    }

    /// Whether a JavaScript dialog (alert) is open.
    async fn alert_open(&self) -> bool {
        self.get("/alert/text").await.get("error").is_none()
    }

    async fn screenshot(&self, name: &str) {
        let png = self.get("/screenshot").await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        let dir = if std::env::var_os("REDRIVE_UPDATE_SCREENSHOTS").is_some() {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/screenshots")
        } else {
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots")
        };
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the demo with the UI and returns its URL once the scenario has finished.
fn start_demo(store: &std::path::Path) -> (Guard, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args([
            "--store",
            &format!("sqlite://{}", store.display()),
            "demo",
            "--tasks",
            "60",
            "--bind",
            "127.0.0.1:0",
        ])
        .env("REDRIVE_TOKEN", OPERATOR)
        .env("REDRIVE_VIEWER_TOKEN", VIEWER)
        .env("REDRIVE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start redrive demo");
    let stdout = child.stdout.take().unwrap();
    let guard = Guard(child);
    let mut url = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("triage UI: ") {
            url = Some(
                rest.split_whitespace()
                    .next()
                    .unwrap()
                    .trim_end_matches('/')
                    .to_owned(),
            );
        }
        if line.contains("serving until Ctrl-C") {
            return (guard, url.expect("the demo printed its URL"));
        }
    }
    panic!("the demo ended without serving its UI");
}

async fn start_browser(http: &reqwest::Client) -> (Guard, Driver) {
    let port = free_port();
    let driver = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver (Debian package chromium-driver)");
    let guard = Guard(driver);
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get(format!("{base}/status")).send().await.is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let profile = tempfile::tempdir().unwrap().keep();
    let caps = json!({ "capabilities": { "alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1280,900", format!("--user-data-dir={}", profile.display())]
        }
    }}});
    let resp: Value = http
        .post(format!("{base}/session"))
        .json(&caps)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = resp["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no session: {resp}"))
        .to_owned();
    (
        guard,
        Driver {
            http: http.clone(),
            base: format!("{base}/session/{session}"),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_open_a_group_replay_it_and_never_run_a_payload() {
    if std::env::var_os("REDRIVE_TEST_BROWSER").is_none() {
        eprintln!(
            "browser test not run: set REDRIVE_TEST_BROWSER=1 (scripts/test does, after installing chromium)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_demo, url) = start_demo(&dir.path().join("demo.db"));
    let http = reqwest::Client::new();
    let (_chromedriver, d) = start_browser(&http).await;

    // Signing in.
    d.goto(&format!("{url}/")).await;
    assert!(
        d.url().await.contains("/login"),
        "the UI asks for a token first"
    );
    let token = d.css("#token").await;
    d.type_into(&token, OPERATOR).await;
    d.click(&d.css("button[type=submit]").await).await;
    let home = format!("{url}/");
    d.wait_url("the overview after signing in", |u| u == home)
        .await;
    let h1 = d.text(&d.css("h1").await).await;
    assert_eq!(h1, "Overview");
    d.screenshot("overview.png").await;

    // The error groups, and the group of the markup-carrying task.
    d.goto(&format!("{url}/groups")).await;
    d.screenshot("groups.png").await;
    let group = d
        .find("xpath", "//a[strong[text()='PromptInjection']]")
        .await;
    d.click(&group).await;
    d.wait_url("the group page", |u| u.contains("/groups/"))
        .await;
    d.click(&d.css("td.mono a").await).await;
    d.wait_url("the message page", |u| u.contains("/messages/"))
        .await;

    // The message: its markup is shown as text and nothing from it runs.
    let payload = d.text(&d.css("#payload").await).await;
    assert!(payload.contains("<script>alert(1)</script>"), "{payload}");
    assert!(
        payload.contains(r#"\"><img src=x onerror=alert(1)>"#),
        "{payload}"
    );
    assert!(!d.alert_open().await, "a payload ran as script");
    let counts = d.script("return [document.scripts.length, document.images.length, document.body.innerText.includes('onerror=alert(1)')]").await;
    assert_eq!(
        counts,
        json!([0, 0, true]),
        "no script or img element came from the payload"
    );
    d.screenshot("message.png").await;

    // Replaying the group from the UI, behind a confirmation that states the count.
    d.click(&d.find("xpath", "//dd/a[contains(@href, '/groups/')]").await)
        .await;
    d.wait_url("the group page", |u| u.contains("/groups/"))
        .await;
    d.click(
        &d.find(
            "xpath",
            "//a[contains(@class, 'button') and starts-with(text(), 'Replay ')]",
        )
        .await,
    )
    .await;
    d.wait_url("the confirmation", |u| u.ends_with("/replay"))
        .await;
    let count = d.text(&d.css("#confirm-count").await).await;
    assert_eq!(count, "1 dead messages");
    d.screenshot("replay-confirm.png").await;
    d.click(&d.css("#confirm").await).await;
    d.wait_url("the groups page with a notice", |u| u.contains("notice="))
        .await;
    let notice = d.text(&d.css(".notice").await).await;
    assert_eq!(notice, "Replayed 1 of 1 messages.");
    assert!(!d.alert_open().await);

    // The message is back in main.
    let queues: Value = http
        .get(format!("{url}/api/v1/queues"))
        .bearer_auth(VIEWER)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(queues[0]["queue"], "agent.tasks");
    assert_eq!(
        queues[0]["main"], 1,
        "the replayed message waits in main: {queues}"
    );
    d.goto(&format!("{url}/")).await;
    d.screenshot("overview-after-replay.png").await;

    // A viewer can look but not replay.
    let replay: reqwest::StatusCode = http
        .post(format!("{url}/api/v1/replay"))
        .bearer_auth(VIEWER)
        .json(&json!({"all": true}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(replay, reqwest::StatusCode::FORBIDDEN);
    let _ = d.call(reqwest::Method::DELETE, "", None).await;
}
