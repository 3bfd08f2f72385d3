//! The `redrive` binary end to end, as a user drives it from a shell.

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use base64::Engine as _;
use serde_json::Value;

fn redrive(store: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .arg("--store")
        .arg(format!("sqlite://{}", store.display()))
        .args(args)
        .env("REDRIVE_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run redrive");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "unexpectedly succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// A sidecar handler in plain sh: exit 65 on malformed
/// input, 75 on the first delivery of every 10th task, always fail every 50th.
const HANDLER: &str = r#"p=$(cat)
case "$p" in
  '{"task":'*'}') n=${p#*:}; n=${n%\}} ;;
  *) echo "malformed payload: $p" >&2; exit 65 ;;
esac
if [ $((n % 50)) -eq 0 ]; then echo "task $n always fails" >&2; exit 1; fi
if [ $((n % 10)) -eq 0 ] && [ "$REDRIVE_ATTEMPT" = 0 ]; then echo "task $n is busy" >&2; exit 75; fi
exit 0"#;

#[test]
fn publish_consume_triage_and_replay_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.db");
    let mut input = String::new();
    for n in 1..=200 {
        input.push_str(&format!("{{\"task\":{n}}}\n"));
    }
    for n in 1..=5 {
        input.push_str(&format!("{{malformed {n}\n"));
    }
    assert_eq!(
        ok(&redrive(
            &store,
            &["publish", "agent.tasks"],
            input.as_bytes()
        ))
        .trim(),
        "published 205 messages to agent.tasks"
    );

    let consume = [
        "consume",
        "agent.tasks",
        "--exec",
        HANDLER,
        "--tiers",
        "50ms,100ms,150ms",
        "--until-idle",
        "--concurrency",
        "8",
        "--json",
    ];
    let summary = &json_lines(&ok(&redrive(&store, &consume, b"")))[0];
    assert_eq!(summary["stopped_by"], "idle");
    assert_eq!(summary["dead_lettered"], 9);

    let queues = json_lines(&ok(&redrive(&store, &["queues", "--json"], b"")));
    assert_eq!(queues.len(), 1);
    let q = &queues[0];
    assert_eq!(
        (
            q["queue"].as_str(),
            q["main"].as_u64(),
            q["dlq"].as_u64(),
            q["inflight"].as_u64()
        ),
        (Some("agent.tasks"), Some(0), Some(9), Some(0))
    );
    assert_eq!(
        q["retry"],
        serde_json::json!({"50ms": 0, "100ms": 0, "150ms": 0})
    );

    let dead = json_lines(&ok(&redrive(&store, &["dlq", "list", "--json"], b"")));
    assert_eq!(dead.len(), 9);
    let malformed: Vec<&Value> = dead
        .iter()
        .filter(|d| d["payload"].as_str().unwrap().starts_with("{malformed"))
        .collect();
    assert_eq!(malformed.len(), 5);
    assert!(
        malformed
            .iter()
            .all(|d| d["attempts"] == 1 && d["error_class"] == "exit_65")
    );
    let mut exhausted: Vec<&Value> = dead.iter().filter(|d| d["attempts"] == 4).collect();
    exhausted.sort_by_key(|d| {
        d["payload"].as_str().unwrap().len() * 1000
            + d["payload"]
                .as_str()
                .unwrap()
                .chars()
                .filter(char::is_ascii_digit)
                .collect::<String>()
                .parse::<usize>()
                .unwrap()
    });
    let payloads: Vec<&str> = exhausted
        .iter()
        .map(|d| d["payload"].as_str().unwrap())
        .collect();
    assert_eq!(
        payloads,
        [
            r#"{"task":50}"#,
            r#"{"task":100}"#,
            r#"{"task":150}"#,
            r#"{"task":200}"#
        ]
    );
    let fingerprint = &exhausted[0]["fingerprint"];
    assert!(
        exhausted.iter().all(|d| &d["fingerprint"] == fingerprint),
        "one fingerprint for the always-failing tasks"
    );
    for d in &exhausted {
        assert_eq!(d["history"].as_array().unwrap().len(), 4);
        for field in [
            "id",
            "queue",
            "error",
            "first_failed_at",
            "last_failed_at",
            "payload_encoding",
        ] {
            assert!(!d[field].is_null(), "{field} missing");
        }
    }

    let groups = json_lines(&ok(&redrive(
        &store,
        &["dlq", "list", "--group", "--json"],
        b"",
    )));
    let mut counts: Vec<u64> = groups
        .iter()
        .map(|g| g["count"].as_u64().unwrap())
        .collect();
    counts.sort_unstable();
    assert_eq!(counts, [4, 5]);
    for field in [
        "fingerprint",
        "count",
        "first_seen",
        "last_seen",
        "sample_error",
        "attempts",
        "cost",
    ] {
        assert!(!groups[0][field].is_null(), "{field} missing");
    }

    let replayed = &json_lines(&ok(&redrive(
        &store,
        &["dlq", "replay", "--all", "--json"],
        b"",
    )))[0];
    assert_eq!(replayed["replayed"], 9);
    let ids_before: Vec<&str> = dead.iter().map(|d| d["id"].as_str().unwrap()).collect();
    let seen_ids = dir.path().join("ids");
    let record = format!("cat >/dev/null; echo $REDRIVE_ID >> {}", seen_ids.display());
    ok(&redrive(
        &store,
        &["consume", "agent.tasks", "--exec", &record, "--until-idle"],
        b"",
    ));
    let seen = std::fs::read_to_string(&seen_ids).unwrap();
    let mut seen: Vec<&str> = seen.lines().collect();
    let mut before = ids_before.clone();
    seen.sort_unstable();
    before.sort_unstable();
    assert_eq!(seen, before, "replayed messages keep their ids");
    let q = &json_lines(&ok(&redrive(&store, &["queues", "--json"], b"")))[0];
    assert_eq!((q["main"].as_u64(), q["dlq"].as_u64()), (Some(0), Some(0)));
}

#[test]
fn bad_input_gets_a_clear_error_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.db");

    let err = failed(&redrive(&store, &["publish", "agent tasks"], b"x\n"));
    assert!(err.contains("invalid queue name \"agent tasks\""), "{err}");

    let err = failed(&redrive(
        &store,
        &["consume", "q", "--exec", "true", "--tiers", "5s,fast"],
        b"",
    ));
    assert!(
        err.contains("invalid --tiers") && err.contains("tier 2") && err.contains("fast"),
        "{err}"
    );

    let err = failed(&redrive(
        &store,
        &["publish", "q", "--max-payload", "16B"],
        b"short\nthis line is far too long\n",
    ));
    assert!(
        err.contains("line 2") && err.contains("nothing was published"),
        "{err}"
    );
    assert!(
        !store.exists()
            || ok(&redrive(&store, &["queues", "--json"], b""))
                .trim()
                .is_empty(),
        "nothing was published"
    );

    let err = failed(&redrive(
        &dir.path().join("missing/dir/s.db"),
        &["publish", "q"],
        b"x\n",
    ));
    assert!(
        err.contains("directory") && err.contains("does not exist"),
        "{err}"
    );

    let err = failed(&redrive(
        Path::new("/proc/redrive-test.db"),
        &["publish", "q"],
        b"x\n",
    ));
    assert!(err.contains("/proc/redrive-test.db"), "{err}");

    let err = failed(&redrive(&dir.path().join("typo.db"), &["dlq", "list"], b""));
    assert!(err.contains("no store at"), "{err}");

    // A file that is not a database: named, and its cause said once.
    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, b"not sqlite at all, just some bytes of text").unwrap();
    let err = failed(&redrive(&garbage, &["dlq", "list"], b""));
    assert!(
        err.contains("garbage.db") && err.contains("file is not a database"),
        "{err}"
    );
    assert!(
        !err.contains("file is not a database: file is not a database"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&garbage).unwrap(),
        b"not sqlite at all, just some bytes of text",
        "the file is left as it was"
    );

    let out = redrive(
        &store,
        &["consume", "q", "--exec", "true", "--no-such-flag"],
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));

    let out = redrive(&store, &["consume", "q"], b"");
    assert_eq!(out.status.code(), Some(2), "a handler is required");

    // The broker comparisons are their own program; the message says which.
    let err = failed(&redrive(
        &store,
        &["bench", "--broker", "nats://127.0.0.1:1"],
        b"",
    ));
    assert!(
        err.contains("cargo run --release -p redrive-bench"),
        "{err}"
    );

    ok(&redrive(&store, &["publish", "q"], b"seed\n"));
    let err = failed(&redrive(&store, &["dlq", "show", "not-a-uuid"], b""));
    assert!(err.contains("invalid message id"), "{err}");
    let err = failed(&redrive(
        &store,
        &["dlq", "show", "01a21ed2-7110-754d-80d2-085619addb45"],
        b"",
    ));
    assert!(err.contains("no dead message with id"), "{err}");
    let err = failed(&redrive(&store, &["dlq", "replay"], b""));
    assert!(err.contains("say which dead messages"), "{err}");
    let err = failed(&redrive(
        &store,
        &["publish", "q", "--header", "redrive-attempt=9"],
        b"x\n",
    ));
    assert!(err.contains("reserved"), "{err}");
}

#[test]
fn non_utf8_payloads_are_carried_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.db");
    let payload: &[u8] = b"\xff\xfe binary \x00 \x80";
    let mut input = payload.to_vec();
    input.push(b'\n');
    ok(&redrive(
        &store,
        &["publish", "bin", "--key", "k1", "--header", "tenant=acme"],
        &input,
    ));
    let check = "cat > /dev/null; [ \"$REDRIVE_KEY\" = k1 ] && [ \"$REDRIVE_HEADER_TENANT\" = acme ] && exit 65; exit 3";
    ok(&redrive(
        &store,
        &["consume", "bin", "--exec", check, "--until-idle"],
        b"",
    ));
    let exported = json_lines(&ok(&redrive(&store, &["dlq", "export"], b"")));
    assert_eq!(exported.len(), 1);
    let d = &exported[0];
    assert_eq!(
        (
            d["payload_encoding"].as_str(),
            d["error_class"].as_str(),
            d["key"].as_str()
        ),
        (Some("base64"), Some("exit_65"), Some("k1"))
    );
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(d["payload"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes, payload);
    assert_eq!(d["headers"]["tenant"], "acme");
}

#[test]
fn purge_asks_first_and_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.db");
    ok(&redrive(&store, &["publish", "q"], b"a\nb\n"));
    ok(&redrive(
        &store,
        &["consume", "q", "--exec", "exit 65", "--until-idle"],
        b"",
    ));
    let err = failed(&redrive(&store, &["dlq", "purge", "--queue", "q"], b""));
    assert!(
        err.contains("refusing to purge 2 dead messages") && err.contains("--yes"),
        "{err}"
    );
    assert_eq!(
        json_lines(&ok(&redrive(&store, &["dlq", "list", "--json"], b""))).len(),
        2
    );
    let out = json_lines(&ok(&redrive(
        &store,
        &["dlq", "purge", "--queue", "q", "--yes", "--json"],
        b"",
    )));
    assert_eq!(out[0]["purged"], 2);
    assert!(
        ok(&redrive(&store, &["dlq", "list", "--json"], b""))
            .trim()
            .is_empty()
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills a child process when dropped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_port(port: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens on {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn serve_refuses_a_public_bind_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args([
            "--store",
            &format!("sqlite://{}", dir.path().join("s.db").display()),
            "serve",
            "--bind",
            "0.0.0.0:0",
        ])
        .env_remove("REDRIVE_TOKEN")
        .env_remove("REDRIVE_VIEWER_TOKEN")
        .output()
        .unwrap();
    let err = failed(&out);
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without an access token")
            && err.contains("REDRIVE_TOKEN"),
        "{err}"
    );
}

#[tokio::test]
async fn a_public_server_refuses_requests_without_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.db");
    ok(&redrive(
        &store,
        &["publish", "q"],
        b"{\"secret\":\"payload\"}\n",
    ));
    ok(&redrive(
        &store,
        &["consume", "q", "--exec", "exit 65", "--until-idle"],
        b"",
    ));
    let port = free_port();
    let token = "public-bind-test-token-0123456789";
    let _server = Running(
        Command::new(env!("CARGO_BIN_EXE_redrive"))
            .args([
                "--store",
                &format!("sqlite://{}", store.display()),
                "serve",
                "--bind",
                &format!("0.0.0.0:{port}"),
            ])
            .env("REDRIVE_TOKEN", token)
            .env("REDRIVE_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_port(port);
    let http = reqwest::Client::new();
    for path in ["/api/v1/dead", "/api/v1/export", "/metrics", "/messages"] {
        let resp = http
            .get(format!("http://127.0.0.1:{port}{path}"))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.text().await.unwrap();
        assert!(
            status == 401 || (path == "/messages" && status == 200 && body.contains("Sign in")),
            "{path}: {status}"
        );
        assert!(
            !body.contains("secret"),
            "{path} showed data without a token"
        );
    }
    let resp = http
        .get(format!("http://127.0.0.1:{port}/api/v1/dead"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("secret"));
}

#[tokio::test]
async fn consume_exposes_its_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.db");
    ok(&redrive(&store, &["publish", "q"], b"slow\n"));
    let port = free_port();
    let _worker = Running(
        Command::new(env!("CARGO_BIN_EXE_redrive"))
            .args([
                "--store",
                &format!("sqlite://{}", store.display()),
                "consume",
                "q",
                "--exec",
                "sleep 30",
            ])
            .args(["--metrics-bind", &format!("127.0.0.1:{port}")])
            .env("REDRIVE_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    wait_for_port(port);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("redrive_inflight_messages{queue=\"q\"} 1") {
            assert!(
                text.contains("redrive_lane_depth_messages{queue=\"q\",lane=\"main\"} 0"),
                "{text}"
            );
            assert!(text.trim_end().ends_with("# EOF"));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never reported its delivery:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn serve(store: &Path, config: &Path, port: u16) -> Running {
    let child = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args([
            "--store",
            &format!("sqlite://{}", store.display()),
            "--config",
            &config.display().to_string(),
        ])
        .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
        .env("REDRIVE_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port);
    Running(child)
}

async fn wait_for_pages(sink: &redrive_conformance::http_sink::HttpSink, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let bodies = sink.json_bodies();
        if bodies.len() >= n {
            return bodies;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "waited for {n} pages, got {bodies:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A DLQ that stays non-empty for the rule's duration produces
/// exactly one PagerDuty trigger, and emptying it exactly one resolve with the same
/// dedup_key, with restarts of `serve` in between (one of them a SIGKILL while pending).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagerduty_pages_once_and_resolves_once_across_serve_restarts() {
    let pd = redrive_conformance::http_sink::HttpSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.db");
    ok(&redrive(&store, &["publish", "agent.tasks"], b"{bad\n"));
    ok(&redrive(
        &store,
        &[
            "consume",
            "agent.tasks",
            "--exec",
            "exit 65",
            "--until-idle",
        ],
        b"",
    ));
    let config = dir.path().join("redrive.toml");
    std::fs::write(
        &config,
        format!(
            "[alerts]\nevaluate_every = \"100ms\"\ndefault_rule = false\n\n[[alerts.rules]]\nname = \"dlq-not-empty\"\nwhen = \"dlq_depth > 0 for 2s\"\nnotify = [\"pd\"]\n\n[notifiers.pd]\nkind = \"pagerduty\"\nrouting_key = \"test-routing-key\"\nurl = \"{}/v2/enqueue\"\n",
            pd.url
        ),
    )
    .unwrap();
    ok(&redrive(
        &store,
        &["--config", &config.display().to_string(), "config", "check"],
        b"",
    ));

    // Pending for a second, then the server is killed outright and restarted.
    let port = free_port();
    let first = serve(&store, &config, port);
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    assert!(
        pd.received().is_empty(),
        "nothing is paged before the rule's duration"
    );
    drop(first);
    let second = serve(&store, &config, port);
    let pages = wait_for_pages(&pd, 1).await;
    assert_eq!(pages[0]["event_action"], "trigger");
    assert_eq!(pages[0]["dedup_key"], "redrive/dlq-not-empty/agent.tasks");

    // A restart while firing does not page again.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    drop(second);
    let _third = serve(&store, &config, port);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(
        pd.received().len(),
        1,
        "still exactly one trigger after the restart"
    );

    // Emptying the DLQ resolves, once, with the same key.
    ok(&redrive(&store, &["dlq", "purge", "--all", "--yes"], b""));
    let pages = wait_for_pages(&pd, 2).await;
    assert_eq!(pages[1]["event_action"], "resolve");
    assert_eq!(pages[1]["dedup_key"], pages[0]["dedup_key"]);
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    assert_eq!(pd.received().len(), 2, "exactly one resolve");
}

#[test]
fn config_check_lists_every_problem_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("redrive.toml");
    std::fs::write(
        &config,
        "[[queues]]\nname = \"bad name\"\ntiers = \"5s,x\"\n\n[retention]\nhot = \"forever\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args(["config", "check", &config.display().to_string()])
        .output()
        .unwrap();
    let err = failed(&out);
    assert!(err.contains("redrive.toml:line 2: queues.name"), "{err}");
    assert!(err.contains("redrive.toml:line 3: queues.tiers"), "{err}");
    assert!(err.contains("redrive.toml:line 6: retention.hot"), "{err}");
    assert!(err.contains("3 problem(s)"), "{err}");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../redrive.example.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args(["config", "check", example])
        .output()
        .unwrap();
    assert!(ok(&out).contains("OK"));
    // Other commands refuse to run on a broken config rather than ignore it.
    let out = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args(["--config", &config.display().to_string(), "queues"])
        .output()
        .unwrap();
    assert!(failed(&out).contains("has 3 problem(s)"));
}

#[test]
fn retention_run_compresses_warm_payloads_and_import_names_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.db");
    ok(&redrive(
        &store,
        &["publish", "q"],
        b"{\"a\":1}\n{\"a\":2}\n",
    ));
    ok(&redrive(
        &store,
        &["consume", "q", "--exec", "exit 65", "--until-idle"],
        b"",
    ));
    // Retention set so that everything already dead is past warm: `warm = 1ms` ages.
    let config = dir.path().join("redrive.toml");
    let archive = dir.path().join("archive");
    std::fs::write(
        &config,
        format!(
            "[retention]\nhot = \"1ms\"\nwarm = \"2ms\"\narchive_dir = \"{}\"\n",
            archive.display()
        ),
    )
    .unwrap();
    // Whole days only: messages that died today are archived once today is over, so
    // this run only compresses them.
    let run = json_lines(&ok(&redrive(
        &store,
        &[
            "--config",
            &config.display().to_string(),
            "retention",
            "run",
            "--json",
        ],
        b"",
    )));
    assert_eq!(run[0]["compressed"], 2);
    let dead = json_lines(&ok(&redrive(&store, &["dlq", "list", "--json"], b"")));
    let mut payloads: Vec<&str> = dead
        .iter()
        .map(|d| d["payload"].as_str().unwrap())
        .collect();
    payloads.sort_unstable();
    assert_eq!(
        payloads,
        ["{\"a\":1}", "{\"a\":2}"],
        "warm payloads read back unchanged"
    );
    let err = failed(&redrive(
        &store,
        &["archive", "import", "/nonexistent.jsonl.zst"],
        b"",
    ));
    assert!(err.contains("/nonexistent.jsonl.zst"), "{err}");
}

#[test]
fn queues_create_makes_every_lane_before_any_consumer_and_checks_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("redrive.db");
    let out = ok(&redrive(
        &store,
        &[
            "queues",
            "create",
            "agent.tasks",
            "agent.mail",
            "--tiers",
            "1s,2s",
            "--json",
        ],
        b"",
    ));
    let created = json_lines(&out);
    assert_eq!(created.len(), 2, "{out}");
    assert_eq!(created[0]["queue"], "agent.tasks");
    assert_eq!(created[0]["tiers"], serde_json::json!(["1s", "2s"]));
    let queues = json_lines(&ok(&redrive(&store, &["queues", "--json"], b"")));
    let names: Vec<&str> = queues
        .iter()
        .map(|q| q["queue"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["agent.mail", "agent.tasks"]);
    for q in &queues {
        assert_eq!(q["retry"], serde_json::json!({"1s": 0, "2s": 0}), "{q}");
        assert_eq!(
            (q["main"].as_u64(), q["isolated"].as_u64()),
            (Some(0), Some(0))
        );
    }
    // A bad name anywhere in the list: nothing is created, and the error names it.
    let err = failed(&redrive(
        &store,
        &["queues", "create", "fine", "bad name"],
        b"",
    ));
    assert!(err.contains("\"bad name\""), "{err}");
    let err = failed(&redrive(
        &store,
        &["queues", "create", "other.queue", "--tiers", "soon"],
        b"",
    ));
    assert!(err.contains("invalid tiers"), "{err}");
    let queues = json_lines(&ok(&redrive(&store, &["queues", "--json"], b"")));
    assert_eq!(queues.len(), 2, "nothing new was created");
}

/// Regression: an archive line with `"dead_at_ms": 300000000000000` (past year 9999)
/// was imported, and afterwards `dlq list`, `dlq show` and `dlq export` exited 101 (the
/// date formatter panicked). Now the import refuses it, naming the line, and imports
/// nothing of that file; a time in a header past 9999 is refused the same way.
#[test]
fn a_crafted_archive_record_is_refused_and_the_store_stays_readable() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("redrive.db");
    ok(&redrive(&store, &["publish", "agent.tasks"], b"fine\n"));
    let id = "01937b3c-0000-7000-8000-000000000001";
    let line = |dead_at: &str, headers: &str| {
        format!(
            r#"{{"v":1,"id":"{id}","queue":"agent.tasks","dead_at_ms":{dead_at},"key":null,"payload_b64":"eA==","headers":[["redrive-version","1"],["redrive-id","{id}"],["redrive-attempt","1"],["redrive-origin","agent.tasks"]{headers}]}}"#
        )
    };
    let write = |name: &str, lines: &[String]| {
        let path = dir.path().join(name);
        let text = lines.join("\n") + "\n";
        std::fs::write(&path, zstd::encode_all(text.as_bytes(), 3).unwrap()).unwrap();
        path
    };
    let far = write(
        "far.jsonl.zst",
        &[line("1700000000000", ""), line("300000000000000", "")],
    );
    let err = failed(&redrive(
        &store,
        &["archive", "import", far.to_str().unwrap()],
        b"",
    ));
    assert!(
        err.contains("line 2") && err.contains("dead_at_ms 300000000000000"),
        "{err}"
    );
    let header = write(
        "header.jsonl.zst",
        &[line(
            "1700000000000",
            r#",["redrive-first-failed-at","300000000000000"]"#,
        )],
    );
    let err = failed(&redrive(
        &store,
        &["archive", "import", header.to_str().unwrap()],
        b"",
    ));
    assert!(err.contains("redrive-first-failed-at"), "{err}");
    // Nothing of either file went in, and every listing still works.
    assert_eq!(ok(&redrive(&store, &["dlq", "list", "--json"], b"")), "");
    ok(&redrive(&store, &["dlq", "list", "--group", "--json"], b""));
    ok(&redrive(&store, &["dlq", "export"], b""));
}

/// Regression: an error text, payload or header holding `ESC ] 0;…BEL`, `ESC [2J` or
/// colour codes was written raw by `dlq list`, `dlq list --group` and `dlq show`: a dead
/// letter could retitle the operator's terminal, clear it or fake output.
#[test]
fn dead_letters_cannot_drive_the_operators_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("redrive.db");
    ok(&redrive(
        &store,
        &[
            "publish",
            "agent.tasks",
            "--header",
            "x-note=\u{1b}[2Jcleared",
        ],
        "{\"task\":\"\u{1b}[31mred\u{1b}]0;retitled\u{7}\"}\n".as_bytes(),
    ));
    ok(&redrive(
        &store,
        &[
            "consume",
            "agent.tasks",
            "--exec",
            "cat >/dev/null; printf 'Bad\\033]0;pwned\\007 fake\\rline\\302\\233' >&2; exit 65",
            "--until-idle",
            "--poll",
            "20ms",
        ],
        b"",
    ));
    let rows = json_lines(&ok(&redrive(&store, &["dlq", "list", "--json"], b"")));
    assert_eq!(rows.len(), 1);
    let id = rows[0]["id"].as_str().unwrap().to_owned();
    for args in [
        vec!["dlq", "list"],
        vec!["dlq", "list", "--group"],
        vec!["dlq", "show", &id],
    ] {
        let out = redrive(&store, &args, b"");
        let text = ok(&out);
        let acts = |c: char| c.is_control() && c != '\n' && c != '\t';
        assert!(
            !text.contains(acts),
            "{args:?} wrote a control character: {text:?}"
        );
        assert!(text.contains("\\x1b"), "{args:?} shows the escape: {text}");
    }
    let shown = ok(&redrive(&store, &["dlq", "show", &id], b""));
    assert!(
        shown.contains("\\x1b[2Jcleared") && shown.contains("\\x1b]0;retitled\\x07"),
        "{shown}"
    );
    assert!(
        shown.contains("fake\\rline") && shown.contains("\\u{9b}"),
        "{shown}"
    );
}

/// Regressions, each seen by a careless operator: blank CRLF lines were published as
/// one-byte `\r` messages (and every CRLF line kept its `\r`); `--tiers
/// 18446744073709551615ms` was accepted and parked a message for ever; `--concurrency
/// 1000000` made an idle consumer take a gigabyte; a `postgres://user:password@…` store
/// URL was echoed with its password.
#[test]
fn careless_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("redrive.db");
    let out = json_lines(&ok(&redrive(
        &store,
        &["publish", "agent.tasks", "--json"],
        b"{\"a\":1}\r\n\r\n{\"b\":2}\r\n",
    )));
    assert_eq!(out[0]["published"], 2, "{out:?}");
    assert_eq!(out[0]["skipped_empty_lines"], 1);
    ok(&redrive(
        &store,
        &[
            "consume",
            "agent.tasks",
            "--exec",
            "cat >/dev/null; exit 65",
            "--until-idle",
            "--poll",
            "20ms",
        ],
        b"",
    ));
    let dead = json_lines(&ok(&redrive(&store, &["dlq", "export"], b"")));
    let mut payloads: Vec<String> = dead
        .iter()
        .map(|d| d["payload"].as_str().unwrap().to_owned())
        .collect();
    payloads.sort();
    assert_eq!(
        payloads,
        ["{\"a\":1}", "{\"b\":2}"],
        "no \\r kept, no \\r message"
    );

    let err = failed(&redrive(
        &store,
        &[
            "consume",
            "agent.tasks",
            "--exec",
            "true",
            "--tiers",
            "5s,18446744073709551615ms",
        ],
        b"",
    ));
    assert!(err.contains("longer than 7d"), "{err}");
    let err = failed(&redrive(
        &store,
        &[
            "consume",
            "agent.tasks",
            "--exec",
            "true",
            "--concurrency",
            "1000000",
        ],
        b"",
    ));
    assert!(
        err.contains("--concurrency 1000000") && err.contains("10000"),
        "{err}"
    );

    // A store that is not there, and one of no known kind: clear errors, never the
    // password.
    for (store, says) in [
        (
            "postgres://app:s3cret-pw@127.0.0.1:1/redrive",
            "is unavailable: error connecting to server",
        ),
        (
            "mysql://app:s3cret-pw@db.example:3306/redrive",
            "unsupported store",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_redrive"))
            .args([
                "--store",
                store,
                "--broker",
                "redis://127.0.0.1:1",
                "queues",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(says) && !err.contains("s3cret-pw"), "{err}");
    }
}

#[test]
fn a_postgres_broker_refuses_a_second_store_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("other.db").display());
    let out = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args([
            "--broker",
            "postgres://app:s3cret-pw@127.0.0.1:1/ops?schema=agents",
            "--store",
            &store,
            "queues",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("keeps the dead letters in the same database") && err.contains(&store),
        "{err}"
    );
    assert!(!err.contains("s3cret-pw"), "{err}");
}
