//! One test per defect of the hand-written Kafka retry consumer that redrive replaces
//! (the common pattern: a loop that produces a failed record to a retry topic with
//! `attempt` / `error` headers, then commits): each would fail on the defect and passes
//! on redrive.
//!
//! 1. Retry topics consumed at once, so the delays never happen.
//! 2. A payload that fails to parse raises outside the `try` and kills the loop.
//! 3. Headers read as a dict although the client returns a list.
//! 4. The next-lane produce not confirmed before the offset commit, so a crash between
//!    the two loses the message.
//!
//! Needs a Kafka-protocol broker at `REDRIVE_TEST_KAFKA_URL` (`scripts/test` starts one).

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use redrive_core::{
    DeadFilter, DeadLetterStore, Envelope, FailureKind, HandlerError, LaneSet, LaneStats,
    QueueName, RetryPolicy, Transport, now_ms,
};
use redrive_kafka::{KafkaBackend, KafkaConfig};
use redrive_runner::{Handler, Runner, RunnerConfig, handler_fn, json_handler};
use redrive_sqlite::{Sqlite, SqliteConfig};

use redrive_kafka::testing::Scope;

fn queue() -> QueueName {
    QueueName::new("agent.tasks").unwrap()
}

struct Setup {
    backend: KafkaBackend<Sqlite>,
    scope: Scope,
    // Read by the crash-point test only (built with the failpoints feature).
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let scope = Scope::new();
    let transport = KafkaConfig::new(&scope.url)
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e} (run ./scripts/test, or set REDRIVE_TEST_KAFKA_URL)"));
    let store = SqliteConfig::new(dir.path().join("dead.db"))
        .open()
        .unwrap();
    Setup {
        backend: KafkaBackend::new(transport, store),
        scope,
        dir,
    }
}

fn config() -> RunnerConfig {
    RunnerConfig {
        concurrency: 4,
        timeout: Duration::from_secs(10),
        lease: Duration::from_secs(5),
        idle_poll: Duration::from_millis(20),
        ..RunnerConfig::default()
    }
}

/// Runs until main and the retry topics are drained.
async fn drain<H: Handler>(b: &KafkaBackend<Sqlite>, policy: &RetryPolicy, handler: H) {
    let runner = Runner::new(b.clone(), queue(), policy.clone(), config()).until_idle();
    tokio::time::timeout(
        Duration::from_secs(90),
        runner.run(handler, std::future::pending()),
    )
    .await
    .expect("the run finishes")
    .expect("the run succeeds");
}

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(i64, Envelope)>>>);

impl Seen {
    fn record(&self, env: &Envelope) {
        self.0.lock().unwrap().push((now_ms(), env.clone()));
    }
    fn all(&self) -> Vec<(i64, Envelope)> {
        self.0.lock().unwrap().clone()
    }
}

/// Produces a record the way a hand-written producer would, straight to `topic`.
async fn produce_raw(topic: &str, key: &str, payload: &[u8], headers: &[(&str, &str)]) {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", redrive_kafka::testing::bootstrap())
        .create()
        .unwrap();
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload).headers(h),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// Defect 1: with tiers 1s, 2s, 4s no retry is handed out before it is due, and main
/// keeps flowing while retries wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_wait_their_tier_while_main_keeps_flowing() {
    let s = setup().await;
    let policy = RetryPolicy::parse("1s,2s,4s").unwrap();
    let failing = Envelope::new(queue(), b"fails three times".to_vec());
    let failing_id = failing.id;
    s.backend.publish(&queue(), vec![failing]).await.unwrap();
    // Main traffic, published every 200 ms until the last retry is handed out.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (b, done) = (s.backend.clone(), Arc::clone(&done));
        tokio::spawn(async move {
            let mut published = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) && published < 300 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let env = Envelope::new(queue(), format!("main {published}").into_bytes());
                b.publish(&queue(), vec![env]).await.unwrap();
                published += 1;
            }
            published
        })
    };
    let seen = Seen::default();
    let rec = seen.clone();
    let last = Arc::clone(&done);
    drain(
        &s.backend,
        &policy,
        handler_fn(move |env: Envelope| {
            rec.record(&env);
            if env.id == failing_id && env.attempt == 3 {
                last.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let fail = env.id == failing_id && env.attempt < 3;
            async move {
                if fail {
                    Err(HandlerError::retry("Flaky", "not yet"))
                } else {
                    Ok(())
                }
            }
        }),
    )
    .await;
    let published = publisher.await.unwrap();
    // The run may end before the publisher's last messages: handle any left.
    let rest = Seen::default();
    let rec = rest.clone();
    drain(
        &s.backend,
        &policy,
        handler_fn(move |env: Envelope| {
            rec.record(&env);
            async { Ok(()) }
        }),
    )
    .await;

    let all: Vec<(i64, Envelope)> = seen.all().into_iter().chain(rest.all()).collect();
    let retries: Vec<&(i64, Envelope)> = all.iter().filter(|(_, e)| e.id == failing_id).collect();
    assert_eq!(retries.len(), 4, "main + three tiers");
    for (at, env) in retries.iter().skip(1) {
        let due = env.not_before_ms.expect("a retry carries its due time");
        let failed = env.last_failure().unwrap().at_ms;
        let tier = policy.tiers()[(env.attempt - 1) as usize]
            .delay()
            .as_millis() as i64;
        assert!(due - failed >= tier, "due time honours the {tier} ms tier");
        assert!(
            *at >= due,
            "attempt {} handed out {} ms early",
            env.attempt,
            due - at
        );
    }
    // Main kept flowing: messages published while the 4 s retry waited were handled
    // before it came due.
    let last_retry_due = retries[3].1.not_before_ms.unwrap();
    let waiting_since = retries[3].1.last_failure().unwrap().at_ms;
    let handled_meanwhile = all
        .iter()
        .filter(|(at, e)| e.id != failing_id && *at > waiting_since && *at < last_retry_due)
        .count();
    assert!(
        handled_meanwhile >= 10,
        "only {handled_meanwhile} main messages handled while the retry waited 4 s"
    );
    let mains = all.iter().filter(|(_, e)| e.id != failing_id).count();
    assert_eq!(mains, published, "every main message handled");
    drop(s);
}

#[derive(serde::Deserialize)]
#[allow(dead_code)] // Decoding is the point.
struct Task {
    n: u32,
}

/// Defect 2: a payload that does not parse is quarantined as poison after one attempt,
/// and so is a record whose redrive headers do not parse; the loop goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparseable_records_are_quarantined_and_the_loop_goes_on() {
    let s = setup().await;
    let policy = RetryPolicy::parse("1s").unwrap();
    let good = |n: u32| Envelope::new(queue(), format!("{{\"n\":{n}}}").into_bytes());
    let bad = Envelope::new(queue(), b"{\"n\": oops".to_vec());
    let bad_id = bad.id;
    s.backend
        .publish(&queue(), vec![good(1), bad, good(2)])
        .await
        .unwrap();
    // A record whose own redrive headers are broken (not a number).
    let main_topic = format!("{}agent.tasks", s.scope.prefix);
    produce_raw(
        &main_topic,
        "k",
        b"{\"n\":3}",
        &[("redrive-version", "1"), ("redrive-attempt", "three")],
    )
    .await;
    s.backend.publish(&queue(), vec![good(4)]).await.unwrap();
    let handled = Arc::new(Mutex::new(Vec::new()));
    let h = Arc::clone(&handled);
    drain(
        &s.backend,
        &policy,
        json_handler(move |t: Task, _env: Envelope| {
            h.lock().unwrap().push(t.n);
            async { Ok(()) }
        }),
    )
    .await;
    let mut handled = handled.lock().unwrap().clone();
    handled.sort_unstable();
    assert_eq!(handled, vec![1, 2, 4], "the loop survived both");
    let dead = s
        .backend
        .list(&DeadFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    let decode = dead
        .iter()
        .find(|d| d.envelope.id == bad_id)
        .expect("the bad payload");
    assert_eq!(decode.envelope.attempt, 1);
    assert_eq!(decode.envelope.history[0].kind, FailureKind::Poison);
    let headers = dead.iter().find(|d| d.envelope.id != bad_id).unwrap();
    assert_eq!(
        headers.envelope.last_failure().unwrap().class,
        "MalformedEnvelope"
    );
    assert!(
        headers
            .envelope
            .last_failure()
            .unwrap()
            .message
            .contains("redrive-attempt"),
        "the reason names the header"
    );
    assert_eq!(
        headers.envelope.payload,
        b"{\"n\":3}"[..],
        "kept byte for byte"
    );
}

/// Defect 3: headers are a list: the hand-written pattern's `attempt` / `error` / `trace`
/// are understood (so its retry topics migrate), repeated user headers all survive, and
/// a legacy record in a retry topic waits for its record time + the tier delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_written_headers_are_read_as_a_list() {
    let s = setup().await;
    let policy = RetryPolicy::parse("1s,2s").unwrap();
    // Create the topics (a consumer would) before producing the legacy record.
    s.backend
        .queue_depths(&LaneSet {
            queue: queue(),
            tiers: policy.tiers().to_vec(),
        })
        .await
        .unwrap();
    let produced_at = now_ms();
    produce_raw(
        &format!("{}agent.tasks.retry.1s", s.scope.prefix),
        "user-42",
        b"{\"task\":\"summarise\"}",
        &[
            ("attempt", "1"),
            ("error", "TimeoutError: upstream took 30s"),
            ("trace", "Traceback (most recent call last): ..."),
            ("x-tag", "a"),
            ("x-tag", "b"),
        ],
    )
    .await;
    let seen = Seen::default();
    let rec = seen.clone();
    drain(
        &s.backend,
        &policy,
        handler_fn(move |env: Envelope| {
            rec.record(&env);
            async { Err(HandlerError::retry("TimeoutError", "still slow")) }
        }),
    )
    .await;
    let seen = seen.all();
    let (at, first) = &seen[0];
    assert!(
        *at >= produced_at + 1000,
        "the legacy retry waited its tier"
    );
    assert_eq!(first.attempt, 1, "attempt header read");
    assert_eq!(first.key.as_deref(), Some("user-42"));
    assert!(
        first
            .last_failure()
            .unwrap()
            .message
            .contains("upstream took 30s")
    );
    let tags: Vec<&str> = first
        .headers
        .iter()
        .filter(|(k, _)| k == "x-tag")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(tags, ["a", "b"], "repeated headers kept in order");
    // Attempt 1 was the legacy one: two more (2 s tier, then max attempts 3) and dead.
    assert_eq!(seen.len(), 2);
    let dead = s
        .backend
        .list(&DeadFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.attempt, 3);
    assert_eq!(
        dead[0].envelope.key.as_deref(),
        Some("user-42"),
        "key kept to the DLQ"
    );
}

/// Defect 4: a consumer killed after its retry-topic produce was acknowledged and before
/// the source offset was committed loses nothing: the record is delivered again.
// Needs the crash points: `cargo test --features redrive/failpoints` (./scripts/test).
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_next_lane_produce_and_commit_loses_nothing() {
    let s = setup().await;
    let sent = Envelope::new(queue(), b"survives the crash".to_vec());
    let id = sent.id;
    s.backend.publish(&queue(), vec![sent]).await.unwrap();
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args(["--broker", &s.scope.url])
        .args([
            "--store",
            &format!("sqlite://{}", s.dir.path().join("dead.db").display()),
        ])
        .args([
            "consume",
            "agent.tasks",
            "--exec",
            "exit 75",
            "--tiers",
            "200ms",
        ])
        .env("REDRIVE_FAILPOINT", "next-lane-written")
        .env("REDRIVE_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .status();
    let status = tokio::time::timeout(Duration::from_secs(60), status)
        .await
        .expect("the consumer reaches the failpoint")
        .unwrap();
    assert!(!status.success(), "killed at the failpoint: {status:?}");
    let policy = RetryPolicy::parse("200ms").unwrap();
    let seen = Seen::default();
    let rec = seen.clone();
    drain(
        &s.backend,
        &policy,
        handler_fn(move |env: Envelope| {
            rec.record(&env);
            async { Ok(()) }
        }),
    )
    .await;
    let seen = seen.all();
    assert!(
        seen.iter()
            .any(|(_, e)| e.id == id && e.payload == b"survives the crash"[..]),
        "delivered again after the crash: {seen:?}"
    );
    assert!(
        s.backend
            .list(&DeadFilter::default(), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}
