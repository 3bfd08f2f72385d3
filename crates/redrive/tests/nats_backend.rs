//! NATS-specific behaviour beyond the conformance suite: a message that reaches the
//! consumer's `max_deliver` (its consumer died before redrive could count the crash) is
//! caught by the MAX_DELIVERIES advisory and moved to the DLQ stream, then the store,
//! with its payload; a message whose redrive headers do not parse is quarantined without
//! stopping the others. NATS comes from `REDRIVE_TEST_NATS_URL` (default
//! nats://127.0.0.1:4222, which `scripts/test` makes sure is running).

#![allow(clippy::unwrap_used)] // Test helpers panic with the failing value; that is their job.

use std::time::{Duration, Instant};

use redrive_core::{
    DeadFilter, DeadLetter, DeadLetterStore, Envelope, FailureKind, HandlerResult, LaneSet,
    LaneStats, QueueName, RetryPolicy, Transport,
};
use redrive_nats::{IdPlacement, NatsBackend, NatsConfig, NatsTransport};
use redrive_runner::{Handler, Runner, RunnerConfig, Summary, handler_fn};
use redrive_sqlite::{Sqlite, SqliteConfig};

fn nats_url() -> String {
    std::env::var("REDRIVE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A backend in a namespace of its own, whose streams are deleted afterwards.
struct Fixture {
    backend: NatsBackend<Sqlite>,
    js: async_nats::jetstream::Context,
    namespace: String,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new(options: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let namespace = format!("nb{}", redrive_conformance::unique_name());
        let url = format!("{}?namespace={namespace}{options}", nats_url());
        let transport: NatsTransport = NatsConfig::new(&url)
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| {
                panic!("{e} (start nats-server -js, or set REDRIVE_TEST_NATS_URL)")
            });
        let store = SqliteConfig::new(dir.path().join("dead.db"))
            .open()
            .unwrap();
        let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
        Self {
            backend: NatsBackend::new(transport, store),
            js,
            namespace,
            _dir: dir,
        }
    }

    /// Publishes to `queue`'s main subject as another producer would (with redrive's
    /// headers only if `headers` carry them) and waits until the stream has it.
    async fn publish_foreign(
        &self,
        queue: &str,
        headers: Option<async_nats::HeaderMap>,
        payload: &'static str,
    ) {
        let subject = format!("{}.{queue}", self.namespace);
        let ack = match headers {
            Some(h) => {
                self.js
                    .publish_with_headers(subject, h, payload.into())
                    .await
            }
            None => self.js.publish(subject, payload.into()).await,
        };
        ack.unwrap().await.unwrap();
    }

    /// Reads the store (which drains the broker's DLQ first) until `id` is there.
    async fn dead(&self, id: redrive_core::MessageId, within: Duration) -> DeadLetter {
        let deadline = Instant::now() + within;
        loop {
            if let Some(d) = self.backend.get(&id).await.unwrap() {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "message {id} did not reach the dead-letter store within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn stream_messages(&self, name: &str) -> u64 {
        let mut s = self.js.get_stream(name).await.unwrap();
        s.info().await.unwrap().state.messages
    }

    /// Consumes `queue` with `tiers` until it is idle (20 s at most).
    async fn drain(&self, queue: &QueueName, tiers: &str, handler: impl Handler) -> Summary {
        let runner = Runner::new(
            self.backend.clone(),
            queue.clone(),
            RetryPolicy::parse(tiers).unwrap(),
            RunnerConfig {
                idle_poll: Duration::from_millis(20),
                ..RunnerConfig::default()
            },
        )
        .until_idle();
        tokio::time::timeout(
            Duration::from_secs(20),
            runner.run(handler, std::future::pending()),
        )
        .await
        .expect("the run ends within 20 s (a stuck consumer would not)")
        .unwrap()
    }

    async fn cleanup(self) {
        let mut names = self.js.stream_names();
        let mut mine = Vec::new();
        while let Some(Ok(name)) = next(&mut names).await {
            if name.starts_with(&format!("{}_", self.namespace))
                || name == format!("KV_{}_history", self.namespace)
            {
                mine.push(name);
            }
        }
        for name in mine {
            let _ = self.js.delete_stream(&name).await;
        }
    }
}

async fn next<S: futures_core::Stream + Unpin>(s: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *s).poll_next(cx)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_reaches_max_deliver_is_moved_to_the_dlq_by_the_advisory() {
    let f = Fixture::new("&max_deliver=2").await;
    let queue = QueueName::new("agent.tasks").unwrap();
    let lanes = LaneSet {
        queue: queue.clone(),
        tiers: RetryPolicy::parse("50ms,60ms").unwrap().tiers().to_vec(),
    };
    let payload = r#"{"task":"summarise","doc":"a long one"}"#;
    let mut env = Envelope::new(queue.clone(), payload);
    env.headers.push(("tenant".into(), "acme".into()));
    let id = env.id;
    f.backend.publish(&queue, vec![env]).await.unwrap();

    // Two consumers take the message and die before settling anything: not even the
    // second delivery, which shows redrive the first one's crash, gets an outcome.
    let lease = Duration::from_secs(1);
    for delivery in 1..=2 {
        let deadline = Instant::now() + Duration::from_secs(10);
        let fetched = loop {
            let f = f.backend.fetch(&lanes, 1, lease).await.unwrap();
            if !f.deliveries.is_empty() {
                break f;
            }
            assert!(Instant::now() < deadline, "delivery {delivery} never came");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let d = &fetched.deliveries[0];
        assert_eq!(d.envelope.id, id);
        assert_eq!(d.unfinished_before, delivery > 1);
        // Dropped unsettled: the consumer "crashed".
    }
    // The server gives up on it at the next pull after the ack wait.
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    // nats-server 2.9 leaves the pull that meets the exhausted message unanswered: that
    // fetch gives up after its timeout, the next one answers.
    let mut empty = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while empty < 2 {
        assert!(Instant::now() < deadline, "fetches kept failing");
        if let Ok(f) = f.backend.fetch(&lanes, 1, lease).await {
            assert!(
                f.deliveries.is_empty(),
                "max_deliver=2 must stop a third delivery"
            );
            empty += 1;
        }
    }

    let dead = f.dead(id, Duration::from_secs(15)).await;
    assert_eq!(dead.envelope.payload, payload.as_bytes());
    assert_eq!(
        dead.envelope.headers,
        vec![("tenant".to_owned(), "acme".to_owned())]
    );
    assert_eq!(dead.envelope.attempt, 2, "{:?}", dead.envelope.history);
    assert_eq!(dead.envelope.history.len(), 2);
    assert!(
        dead.envelope
            .history
            .iter()
            .all(|h| h.kind == FailureKind::LeaseExpired),
        "{:?}",
        dead.envelope.history
    );
    let last = &dead.envelope.history.last().unwrap().message;
    assert!(
        last.contains("after 2 deliveries") && last.contains("max_deliver"),
        "{last}"
    );

    // Gone from main, the advisory handled.
    let ns = &f.namespace;
    assert_eq!(f.stream_messages(&format!("{ns}_agent_tasks")).await, 0);
    assert_eq!(
        f.stream_messages(&format!("{ns}_agent_tasks_exhausted"))
            .await,
        0
    );
    let depths = f.backend.queue_depths(&lanes).await.unwrap();
    assert_eq!((depths.main, depths.inflight, depths.dlq), (0, 0, 1));
    f.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_message_is_quarantined_and_the_others_are_handled() {
    let f = Fixture::new("").await;
    let queue = QueueName::new("agent.tasks").unwrap();
    let good = Envelope::new(queue.clone(), "fine");
    let good_id = good.id;
    f.backend.publish(&queue, vec![good]).await.unwrap();
    // Another producer's message with a redrive header that does not parse.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "redrive-wire",
        r#"[["redrive-version","1"],["redrive-attempt","not a number"]]"#,
    );
    headers.insert("trace", "t-1");
    f.publish_foreign("agent.tasks", Some(headers), "broken but kept")
        .await;

    let handled = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&handled);
    let summary = f
        .drain(
            &queue,
            "50ms",
            handler_fn(move |env: Envelope| {
                seen.lock().unwrap().push(env.id);
                async { HandlerResult::Ok(()) }
            }),
        )
        .await;
    assert_eq!(summary.reason, "idle");
    assert_eq!(*handled.lock().unwrap(), vec![good_id]);

    let dead = f
        .backend
        .list(&DeadFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let d = &dead[0].envelope;
    assert_eq!(d.payload, b"broken but kept"[..]);
    assert_eq!(d.headers, vec![("trace".to_owned(), "t-1".to_owned())]);
    let failure = d.history.last().unwrap();
    assert_eq!(
        (failure.kind, failure.class.as_str()),
        (FailureKind::Poison, "MalformedEnvelope")
    );
    assert!(
        failure.message.contains("redrive-attempt"),
        "{}",
        failure.message
    );
    f.cleanup().await;
}

/// A message from a plain NATS producer (no redrive headers) keeps one identity across
/// redeliveries: its retry is handled with attempt 1, not counted as a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_producers_message_is_retried_like_any_other() {
    let f = Fixture::new("").await;
    let queue = QueueName::new("agent.tasks").unwrap();
    // Streams exist once redrive has published to the queue.
    f.backend.publish(&queue, Vec::new()).await.unwrap();
    f.publish_foreign("agent.tasks", None, "from elsewhere")
        .await;

    let handled = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&handled);
    let summary = f
        .drain(
            &queue,
            "50ms,100ms",
            handler_fn(move |env: Envelope| {
                seen.lock()
                    .unwrap()
                    .push((env.id, env.attempt, env.payload.clone()));
                let first = env.attempt == 0;
                async move {
                    if first {
                        HandlerResult::Err(redrive_core::HandlerError::retry("Flaky", "once"))
                    } else {
                        HandlerResult::Ok(())
                    }
                }
            }),
        )
        .await;
    assert_eq!(summary.reason, "idle");
    let handled = handled.lock().unwrap().clone();
    assert_eq!(
        handled.iter().map(|(_, a, _)| *a).collect::<Vec<_>>(),
        vec![0, 1],
        "{handled:?}"
    );
    assert_eq!(handled[0].0, handled[1].0, "one identity across deliveries");
    assert!(
        handled
            .iter()
            .all(|(_, _, p)| p[..] == b"from elsewhere"[..])
    );
    assert_eq!(f.backend.count(&DeadFilter::default()).await.unwrap(), 0);
    f.cleanup().await;
}

/// Regression: a NATS publish to a queue no consumer had opened failed with "no stream".
/// `redrive queues create` makes every lane first, so another producer can publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_create_lets_a_plain_producer_publish_before_any_consumer() {
    let f = Fixture::new("").await;
    let subject = format!("{}.agent.tasks", f.namespace);
    let before =
        f.js.publish(subject.clone(), "too early".into())
            .await
            .unwrap()
            .await;
    assert!(before.is_err(), "no stream yet: {before:?}");
    let url = format!("{}?namespace={}", nats_url(), f.namespace);
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_redrive"))
        .args(["--broker", &url])
        .args([
            "--store",
            &format!("sqlite://{}", dir.path().join("s.db").display()),
        ])
        .args(["queues", "create", "agent.tasks", "--tiers", "1s"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.publish_foreign("agent.tasks", None, "from a plain producer")
        .await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let rec = std::sync::Arc::clone(&seen);
    let queue = QueueName::new("agent.tasks").unwrap();
    f.drain(
        &queue,
        "1s",
        handler_fn(move |env: Envelope| {
            rec.lock().unwrap().push(env.payload.to_vec());
            async { HandlerResult::Ok(()) }
        }),
    )
    .await;
    assert_eq!(*seen.lock().unwrap(), [b"from a plain producer".to_vec()]);
    f.cleanup().await;
}

#[test]
fn broker_url_options_are_checked() {
    for (url, expected) in [
        ("nats://h:4222?replicas=9", "a number from 1 to 5"),
        ("nats://h:4222?storage=disk", "file or memory"),
        ("nats://h:4222?max_deliver=0", "at least 1"),
        ("nats://h:4222?ids=key", "subject or header"),
        (
            "nats://h:4222?bogus=1",
            "the options are namespace=NAME, replicas",
        ),
    ] {
        let e = NatsConfig::new(url).unwrap_err().to_string();
        assert!(e.contains(expected), "{url}: {e}");
    }
    let c = NatsConfig::new("nats://h:4222?replicas=3&storage=memory&max_deliver=7").unwrap();
    assert_eq!((c.replicas, c.max_deliver), (3, Some(7)));
    assert_eq!(c.ids, IdPlacement::Header);
    assert_eq!(
        c.storage,
        async_nats::jetstream::stream::StorageType::Memory
    );
    let c = NatsConfig::new("nats://h:4222?ids=subject").unwrap();
    assert_eq!(c.ids, IdPlacement::Subject);
}

#[tokio::test]
async fn a_server_that_refuses_the_setup_says_why_not_that_jetstream_is_off() {
    // A single server cannot keep 3 replicas: JetStream answers, with an error.
    let namespace = format!("nb{}", redrive_conformance::unique_name());
    let url = format!("{}?namespace={namespace}&replicas=3", nats_url());
    let Err(e) = NatsConfig::new(&url).unwrap().connect().await else {
        panic!("a single nats-server accepted replicas=3");
    };
    let e = e.to_string();
    assert!(
        e.contains("JetStream refused") && e.contains(&format!("{namespace}_history")),
        "{e}"
    );
    assert!(!e.contains("not enabled"), "{e}");
}
