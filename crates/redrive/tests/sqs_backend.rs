//! What the SQS backend promises beyond the conformance suite: SQS's own redrive policy
//! catches a message that kills every consumer, and triage shows it with its receive
//! count; an existing redrive policy is reported, never changed; names map `.` to `-`
//! and a collision is refused; an unreachable endpoint, missing or refused credentials
//! give clear errors that never show a secret; throttling is retried with backoff.
//!
//! Runs against the local SQS-compatible server `scripts/test` starts (moto).

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

mod sqs_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use redrive_sqs::SqsConfig;

fn redrive(scope_url: &str, store: &std::path::Path, args: &[&str]) -> Output {
    let (args, input) = match args {
        ["publish", queue, "--payload", payload] => (vec!["publish", *queue], Some(*payload)),
        other => (other.to_vec(), None),
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args(["--broker", scope_url])
        .args(["--store", &format!("sqlite://{}", store.display())])
        .args(&args)
        .env("REDRIVE_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(line) = input {
        writeln!(stdin, "{line}").unwrap();
    }
    drop(stdin);
    child.wait_with_output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn client(scope_url: &str) -> aws_sdk_sqs::Client {
    SqsConfig::new(scope_url)
        .unwrap()
        .sdk_client()
        .await
        .unwrap_or_else(|e| panic!("{e} (run ./scripts/test)"))
        .0
}

async fn attribute(c: &aws_sdk_sqs::Client, url: &str, name: QueueAttributeName) -> String {
    c.get_queue_attributes()
        .queue_url(url)
        .attribute_names(name.clone())
        .send()
        .await
        .unwrap()
        .attributes()
        .and_then(|a| a.get(&name).cloned())
        .unwrap_or_default()
}

async fn queue_url(c: &aws_sdk_sqs::Client, name: &str) -> String {
    c.get_queue_url()
        .queue_name(name)
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killing_message_is_dead_lettered_by_its_own_crashes_with_sqs_policy_as_backstop()
 {
    let scope = sqs_support::Scope::new();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("dead.db");
    ok(&redrive(
        &scope.url,
        &store,
        &[
            "publish",
            "agent.tasks",
            "--payload",
            "{\"task\":\"kills its consumer\"}",
        ],
    ));
    // Every consumer is killed by its own handler. Tiers 1s,2s: max attempts 3.
    let args = [
        "consume",
        "agent.tasks",
        "--exec",
        "kill -9 $PPID; sleep 5",
        "--lease",
        "1s",
        "--tiers",
        "1s,2s",
        "--until-idle",
        "--poll",
        "50ms",
    ];
    let c = client(&scope.url).await;
    let main = queue_url(&c, &format!("{}agent-tasks", scope.prefix)).await;
    let dlq = queue_url(&c, &format!("{}agent-tasks-dlq", scope.prefix)).await;
    let isolated = queue_url(&c, &format!("{}agent-tasks-isolated", scope.prefix)).await;
    let mut finished = false;
    for _ in 0..12 {
        let out = redrive(&scope.url, &store, &args);
        if out.status.success() {
            finished = true;
            break;
        }
        // Let the dead consumer's lease (1 s) run out.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    assert!(
        finished,
        "a consumer should find the queue empty in the end"
    );
    // SQS's own count is a backstop well above max attempts, on both queues a message
    // is received from: a crash beside others is not an attempt.
    for url in [&main, &isolated] {
        let policy: serde_json::Value =
            serde_json::from_str(&attribute(&c, url, QueueAttributeName::RedrivePolicy).await)
                .unwrap();
        assert_eq!(
            policy["maxReceiveCount"].to_string().trim_matches('"'),
            "16"
        );
    }
    let out = ok(&redrive(&scope.url, &store, &["dlq", "list", "--json"]));
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{out}");
    let id = rows[0]["id"].as_str().unwrap().to_owned();
    let shown = ok(&redrive(
        &scope.url,
        &store,
        &["dlq", "show", &id, "--json"],
    ));
    let shown: serde_json::Value = serde_json::from_str(shown.trim()).unwrap();
    assert_eq!(shown["attempts"], 3, "{shown}");
    assert_eq!(shown["payload"], "{\"task\":\"kills its consumer\"}");
    let history = shown["history"].as_array().unwrap();
    let counted: Vec<&serde_json::Value> =
        history.iter().filter(|f| f["counted"] == true).collect();
    assert_eq!(counted.len(), 3, "{history:?}");
    assert!(
        counted
            .iter()
            .all(|f| f["kind"] == "lease_expired" && f["lane"] == "isolated"),
        "each counted crash happened while it ran alone: {history:?}"
    );
    // Drained: deleted from SQS once the store had it.
    let waiting: u64 = attribute(&c, &dlq, QueueAttributeName::ApproximateNumberOfMessages)
        .await
        .parse()
        .unwrap();
    assert_eq!(waiting, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sqs_moved_by_its_redrive_policy_is_triaged_with_its_receive_count() {
    let scope = sqs_support::Scope::new();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("dead.db");
    ok(&redrive(
        &scope.url,
        &store,
        &["queues", "create", "agent.tasks", "--tiers", "1s,2s"],
    ));
    let c = client(&scope.url).await;
    let main = queue_url(&c, &format!("{}agent-tasks", scope.prefix)).await;
    c.send_message()
        .queue_url(&main)
        .message_body("received and never settled")
        .send()
        .await
        .unwrap();
    // Consumers that die before they can settle it: received 16 times (the backstop),
    // after which SQS moves it to the DLQ by itself.
    for _ in 0..40 {
        let got = c
            .receive_message()
            .queue_url(&main)
            .visibility_timeout(0)
            .send()
            .await
            .unwrap();
        if got.messages().is_empty()
            && attribute(&c, &main, QueueAttributeName::ApproximateNumberOfMessages).await == "0"
        {
            break;
        }
    }
    let out = ok(&redrive(&scope.url, &store, &["dlq", "list", "--json"]));
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{out}");
    let id = rows[0]["id"].as_str().unwrap().to_owned();
    let shown = ok(&redrive(
        &scope.url,
        &store,
        &["dlq", "show", &id, "--json"],
    ));
    let shown: serde_json::Value = serde_json::from_str(shown.trim()).unwrap();
    assert_eq!(shown["payload"], "received and never settled");
    let history = shown["history"].as_array().unwrap();
    assert!(
        history.iter().all(|f| f["kind"] == "lease_expired"),
        "{history:?}"
    );
    // SQS moved it, not redrive: a message redrive sends to the DLQ carries its own
    // failures, one SQS moved is told by its receive count.
    let last = history.last().unwrap()["error"].as_str().unwrap();
    assert!(
        last.contains("SQS moved it to the dead-letter queue after 16 receives"),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_redrive_policy_is_reported_never_changed() {
    let scope = sqs_support::Scope::new();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("dead.db");
    let c = client(&scope.url).await;
    let dlq = c
        .create_queue()
        .queue_name(format!("{}orders-dlq", scope.prefix))
        .send()
        .await
        .unwrap();
    let arn = attribute(&c, dlq.queue_url().unwrap(), QueueAttributeName::QueueArn).await;
    // Below max attempts (3 with two tiers): SQS would move messages before redrive
    // counted their attempts.
    let theirs = format!("{{\"deadLetterTargetArn\":\"{arn}\",\"maxReceiveCount\":\"2\"}}");
    let main = c
        .create_queue()
        .queue_name(format!("{}orders", scope.prefix))
        .attributes(QueueAttributeName::RedrivePolicy, theirs)
        .send()
        .await
        .unwrap();
    let main = main.queue_url().unwrap().to_owned();
    let out = redrive(
        &scope.url,
        &store,
        &[
            "consume",
            "orders",
            "--exec",
            "true",
            "--tiers",
            "1s,2s",
            "--until-idle",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs a maxReceiveCount of at least 3") && err.contains("does not change"),
        "{err}"
    );
    let policy: serde_json::Value =
        serde_json::from_str(&attribute(&c, &main, QueueAttributeName::RedrivePolicy).await)
            .unwrap();
    assert_eq!(
        policy["maxReceiveCount"].to_string().trim_matches('"'),
        "2",
        "unchanged: {policy}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_names_map_dots_to_dashes_and_collisions_are_refused() {
    let scope = sqs_support::Scope::new();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("dead.db");
    ok(&redrive(
        &scope.url,
        &store,
        &["publish", "agent.tasks", "--payload", "{}"],
    ));
    let c = client(&scope.url).await;
    let url = queue_url(&c, &format!("{}agent-tasks", scope.prefix)).await;
    let visible = attribute(&c, &url, QueueAttributeName::ApproximateNumberOfMessages).await;
    assert_eq!(visible, "1");
    let out = redrive(
        &scope.url,
        &store,
        &["publish", "agent-tasks", "--payload", "{}"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("belongs to redrive queue agent.tasks") && err.contains("'.' as '-'"),
        "{err}"
    );
    let listed = ok(&redrive(&scope.url, &store, &["queues", "--json"]));
    assert!(listed.contains("\"agent.tasks\""), "{listed}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn an_unreachable_endpoint_is_a_clear_error() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let out = redrive(
        &format!("sqs://us-east-1?endpoint=http://127.0.0.1:{port}"),
        &dir.path().join("s.db"),
        &["publish", "q", "--payload", "{}"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "SQS at http://127.0.0.1:{port} (region us-east-1) is unreachable"
        )),
        "{err}"
    );
}

#[test]
fn missing_credentials_are_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args(["--broker", &sqs_support::Scope::new().url])
        .args([
            "--store",
            &format!("sqlite://{}", home.path().join("s.db").display()),
        ])
        .args(["publish", "q"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("HOME", home.path())
        .env("AWS_CONFIG_FILE", home.path().join("none"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.path().join("none"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no AWS credentials found"), "{err}");
}

/// A stand-in for SQS that answers each request from a script (one JSON-protocol
/// response per request, the last one repeated), counting requests.
fn scripted_sqs(script: Vec<(u16, &'static str)>) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let n = count.fetch_add(1, Ordering::SeqCst);
            let (status, json) = script[n.min(script.len() - 1)];
            let reason = if status == 200 { "OK" } else { "Bad Request" };
            let _ = write!(
                stream,
                "HTTP/1.1 {status} {reason}\r\nContent-Type: application/x-amz-json-1.0\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{json}",
                json.len()
            );
        }
    });
    (port, seen)
}

#[test]
fn throttling_is_retried_with_backoff() {
    let throttled =
        r#"{"__type":"com.amazonaws.sqs#ThrottlingException","message":"Rate exceeded"}"#;
    let (port, seen) = scripted_sqs(vec![(400, throttled), (400, throttled), (200, "{}")]);
    let dir = tempfile::tempdir().unwrap();
    let out = redrive(
        &format!("sqs://us-east-1?endpoint=http://127.0.0.1:{port}"),
        &dir.path().join("s.db"),
        &["queues", "--json"],
    );
    ok(&out);
    assert!(
        seen.load(Ordering::SeqCst) >= 3,
        "two throttled calls, then the retry that succeeded"
    );
}

#[test]
fn refused_credentials_are_a_clear_error_that_never_shows_the_secret() {
    let refused = r#"{"__type":"com.amazon.coral.service#UnrecognizedClientException","message":"The security token included in the request is invalid."}"#;
    let (port, _) = scripted_sqs(vec![(400, refused)]);
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args([
            "--broker",
            &format!("sqs://us-east-1?endpoint=http://127.0.0.1:{port}"),
        ])
        .args([
            "--store",
            &format!("sqlite://{}", dir.path().join("s.db").display()),
        ])
        .args(["publish", "q"])
        .env("AWS_ACCESS_KEY_ID", "AKIAREDRIVETEST")
        .env("AWS_SECRET_ACCESS_KEY", "s3cr3t-never-printed")
        .env("REDRIVE_LOG", "debug")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("credentials were refused"), "{err}");
    assert!(!err.contains("s3cr3t-never-printed"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("s3cr3t-never-printed"));
}

/// Whole-second tiers ride on the visibility timeout, rounded up: a retry is never
/// received before it is due, by this consumer or any other, and is late by about a
/// second at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_second_tiers_are_never_early() {
    use redrive_core::{Envelope, HandlerError, QueueName, RetryPolicy, Transport, now_ms};
    use redrive_runner::{Runner, RunnerConfig, handler_fn};

    let scope = sqs_support::Scope::new();
    let dir = tempfile::tempdir().unwrap();
    let transport = SqsConfig::new(&scope.url).unwrap().connect().await.unwrap();
    let store = redrive_sqlite::SqliteConfig::new(dir.path().join("dead.db"))
        .open()
        .unwrap();
    let backend = redrive_sqs::SqsBackend::new(transport, store);
    let queue = QueueName::new("tiers").unwrap();
    backend
        .publish(&queue, vec![Envelope::new(queue.clone(), b"{}".to_vec())])
        .await
        .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let rec = Arc::clone(&seen);
    let policy = RetryPolicy::parse("1s,2s").unwrap();
    let config = RunnerConfig {
        concurrency: 2,
        lease: Duration::from_secs(5),
        idle_poll: Duration::from_millis(20),
        ..RunnerConfig::default()
    };
    let runner = Runner::new(backend.clone(), queue, policy, config).until_idle();
    tokio::time::timeout(
        Duration::from_secs(60),
        runner.run(
            handler_fn(move |env: Envelope| {
                rec.lock().unwrap().push((now_ms(), env));
                async { Err(HandlerError::retry("Flaky", "always")) }
            }),
            std::future::pending(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "main, then the 1s and 2s tiers");
    for (at, env) in seen.iter().filter(|(_, e)| e.attempt > 0) {
        let due = env.not_before_ms.unwrap();
        assert!(
            *at >= due,
            "attempt {} handed out {} ms early",
            env.attempt,
            due - at
        );
        assert!(
            at - due <= 2000,
            "attempt {} handed out {} ms late",
            env.attempt,
            at - due
        );
    }
}
