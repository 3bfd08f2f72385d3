//! Two `serve` processes on one PostgreSQL store and one Redis broker: every dead message
//! is stored once whichever process drained it, with one of them SIGKILLed mid-drain and
//! restarted, and a DLQ that stays non-empty pages PagerDuty (a local receiver) exactly
//! once and resolves exactly once, with the process that sent the page killed between.
//!
//! PostgreSQL from `REDRIVE_TEST_POSTGRES_URL` (a schema of this test's own, dropped at
//! the end), Redis from `REDRIVE_TEST_REDIS_URL` (a namespace of its own).

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use redrive_conformance::http_sink::HttpSink;
use redrive_conformance::own_server::free_port;

fn postgres_url() -> String {
    std::env::var("REDRIVE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn redis_url() -> String {
    std::env::var("REDRIVE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn redrive(config: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_redrive"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("REDRIVE_LOG", "warn")
        .env_remove("REDRIVE_STORE")
        .env_remove("REDRIVE_BROKER")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "redrive {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A `serve` process, SIGKILLed when dropped.
struct Serve(Child);

impl Serve {
    fn start(config: &Path, port: u16) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_redrive"))
            .arg("--config")
            .arg(config)
            .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
            .args(["--sample-every", "100ms"])
            .env("REDRIVE_LOG", "warn")
            .env_remove("REDRIVE_STORE")
            .env_remove("REDRIVE_BROKER")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self(child)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill(); // SIGKILL
        let _ = self.0.wait();
    }
}

async fn pg() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("{e} (start PostgreSQL, or set REDRIVE_TEST_POSTGRES_URL)"));
    tokio::spawn(conn);
    client
}

/// Waits until `check` holds, up to 30 s.
async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "waited 30 s for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serve_processes_share_one_store_store_each_death_once_and_page_once() {
    let pd = HttpSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("t{}_{}", std::process::id(), redrive_core::now_ms());
    let config = dir.path().join("redrive.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"{pg}?schema={tag}\"\n\n[broker]\nurl = \"{redis}?namespace={tag}\"\n\n\
             [alerts]\nevaluate_every = \"100ms\"\ndefault_rule = false\n\n\
             [[alerts.rules]]\nname = \"dlq-not-empty\"\nwhen = \"dlq_depth > 0 for 1s\"\nnotify = [\"pd\"]\n\n\
             [notifiers.pd]\nkind = \"pagerduty\"\nrouting_key = \"test-routing-key\"\nurl = \"{pd}/v2/enqueue\"\n",
            pg = postgres_url(),
            redis = redis_url(),
            pd = pd.url,
        ),
    )
    .unwrap();

    // 300 poison messages reach the broker's DLQ lane; no `serve` runs yet.
    const N: usize = 300;
    let lines: String = (0..N).map(|i| format!("{{\"task\":{i}}}\n")).collect();
    redrive(&config, &["publish", "agent.tasks"], lines.as_bytes());
    redrive(
        &config,
        &[
            "consume",
            "agent.tasks",
            "--exec",
            "exit 65",
            "--until-idle",
            "-c",
            "16",
        ],
        b"",
    );

    // Both drain at once; the first is killed outright mid-drain and started again.
    let (port_a, port_b) = (free_port(), free_port());
    let a = Serve::start(&config, port_a);
    let _b = Serve::start(&config, port_b);
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(a);
    let a = Serve::start(&config, port_a);

    let db = pg().await;
    let count = format!("SELECT count(*), count(DISTINCT id) FROM \"{tag}\".dead_letters");
    until("every dead message in the store", async || {
        db.query_opt(&count, &[])
            .await
            .ok()
            .flatten()
            .is_some_and(|r| r.get::<_, i64>(0) == N as i64)
    })
    .await;
    let row = db.query_one(&count, &[]).await.unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (N as i64, N as i64)
    );
    let tasks: HashSet<String> = db
        .query(&format!("SELECT payload FROM \"{tag}\".dead_letters"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| String::from_utf8(r.get::<_, Vec<u8>>(0)).unwrap())
        .collect();
    assert_eq!(tasks.len(), N, "each published message stored once");

    // One trigger, whichever process evaluates.
    until("the trigger", async || !pd.json_bodies().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pages = pd.json_bodies();
    assert_eq!(
        pages.len(),
        1,
        "exactly one trigger from two processes: {pages:?}"
    );
    assert_eq!(pages[0]["event_action"], "trigger");

    // The process leading alerting may be either: kill one, then the other takes over
    // (after the lease of three rounds) and does not page again.
    drop(a);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(pd.json_bodies().len(), 1, "still one trigger after a kill");

    // Emptying the DLQ from any process resolves, once.
    redrive(&config, &["dlq", "purge", "--all", "--yes"], b"");
    until("the resolve", async || pd.json_bodies().len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pages = pd.json_bodies();
    assert_eq!(pages.len(), 2, "exactly one resolve: {pages:?}");
    assert_eq!(pages[1]["event_action"], "resolve");
    assert_eq!(pages[1]["dedup_key"], pages[0]["dedup_key"]);

    let _ = db
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{tag}\" CASCADE"))
        .await;
}
