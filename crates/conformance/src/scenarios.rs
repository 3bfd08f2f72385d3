//! The scenarios. Each opens a fresh backend, drives it through the runner (or the
//! CLI, where a process must die), and asserts what a user would check.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redrive_core::{
    DeadFilter, DeadLetter, DeadLetterStore, DeadSelection, Envelope, FailureKind, HandlerError,
    LaneSet, LaneStats, QueueName, ReplayOptions, RetryPolicy, Transport, Unpaced, now_ms, replay,
};
use redrive_runner::{Handler, Runner, RunnerConfig, handler_fn};

use crate::{Fixture, Harness, LATENESS_BOUND_MS};

/// Longest any single scenario run may take before the test fails instead of hanging.
const RUN_LIMIT: Duration = Duration::from_secs(60);

fn queue() -> QueueName {
    QueueName::new("conformance.tasks").expect("valid queue name")
}

fn opts(max_replays: u32) -> ReplayOptions<'static> {
    ReplayOptions {
        max_replays,
        actor: "conformance",
        ..ReplayOptions::default()
    }
}

fn config() -> RunnerConfig {
    RunnerConfig {
        concurrency: 4,
        timeout: Duration::from_secs(10),
        lease: Duration::from_secs(5),
        grace: Duration::from_secs(5),
        idle_poll: Duration::from_millis(20),
        ..RunnerConfig::default()
    }
}

async fn publish<T: Transport>(t: &T, payloads: &[&[u8]]) -> Vec<Envelope> {
    let envs: Vec<Envelope> = payloads
        .iter()
        .map(|p| Envelope::new(queue(), p.to_vec()))
        .collect();
    t.publish(&queue(), envs.clone()).await.expect("publish");
    envs
}

/// Runs a runner until the queue is drained.
async fn drain<T: Transport + LaneStats + Clone, H: Handler>(
    t: &T,
    policy: &RetryPolicy,
    config: RunnerConfig,
    handler: H,
) {
    let runner = Runner::new(t.clone(), queue(), policy.clone(), config).until_idle();
    tokio::time::timeout(RUN_LIMIT, runner.run(handler, std::future::pending()))
        .await
        .expect("the run should finish well within its limit")
        .expect("the run should succeed");
}

async fn dead<S: DeadLetterStore>(s: &S) -> Vec<DeadLetter> {
    s.list(&DeadFilter::default(), None, 1000)
        .await
        .expect("list dead letters")
}

/// A handler that records every delivery it sees.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(i64, Envelope)>>>);

impl Seen {
    fn record(&self, env: &Envelope) {
        self.0.lock().expect("lock").push((now_ms(), env.clone()));
    }
    fn all(&self) -> Vec<(i64, Envelope)> {
        self.0.lock().expect("lock").clone()
    }
}

async fn open<H: Harness>(h: &H) -> Fixture<H::T, H::S> {
    h.open().await
}

/// Every retry waits its tier's delay: never handed out early, and late by at most
/// [`LATENESS_BOUND_MS`].
pub async fn tiers_are_honoured<H: Harness>(h: &H) {
    let b = open(h).await;
    let policy = RetryPolicy::parse("100ms,200ms,300ms").expect("tiers");
    publish(&b.transport, &[b"a", b"b", b"c"]).await;
    let seen = Seen::default();
    let rec = seen.clone();
    drain(
        &b.transport,
        &policy,
        config(),
        handler_fn(move |env: Envelope| {
            rec.record(&env);
            async { Err(HandlerError::retry("Flaky", "always fails")) }
        }),
    )
    .await;
    let deliveries = seen.all();
    assert_eq!(deliveries.len(), 3 * 4, "3 messages x 4 attempts");
    for (at, env) in deliveries.iter().filter(|(_, e)| e.attempt > 0) {
        let due = env
            .not_before_ms
            .expect("a retried message carries its due time");
        let failed_at = env.last_failure().expect("history").at_ms;
        let tier = policy.tiers()[(env.attempt - 1) as usize].delay();
        assert!(
            due - failed_at >= i64::try_from(tier.as_millis()).unwrap_or(0),
            "due time honours tier {tier:?}"
        );
        assert!(
            *at >= due,
            "attempt {} handed out {} ms early",
            env.attempt,
            due - at
        );
        assert!(
            at - due <= LATENESS_BOUND_MS,
            "attempt {} handed out {} ms late",
            env.attempt,
            at - due
        );
    }
}

/// A poison message goes to the DLQ at once, after one attempt.
pub async fn poison_goes_straight_to_the_dlq<H: Harness>(h: &H) {
    let b = open(h).await;
    let policy = RetryPolicy::parse("50ms,100ms").expect("tiers");
    let sent = publish(&b.transport, &[b"{not json"]).await;
    let seen = Seen::default();
    let rec = seen.clone();
    drain(
        &b.transport,
        &policy,
        config(),
        handler_fn(move |env: Envelope| {
            rec.record(&env);
            async { Err(HandlerError::poison("SchemaError", "payload is not JSON")) }
        }),
    )
    .await;
    assert_eq!(seen.all().len(), 1, "poison is not retried");
    let dead = dead(&b.store).await;
    assert_eq!(dead.len(), 1);
    let env = &dead[0].envelope;
    assert_eq!((env.id, env.attempt), (sent[0].id, 1));
    assert_eq!(
        env.last_failure().map(|f| (f.class.as_str(), f.kind)),
        Some(("SchemaError", FailureKind::Poison))
    );
    assert_eq!(
        b.transport
            .queue_depths(&LaneSet {
                queue: queue(),
                tiers: policy.tiers().to_vec()
            })
            .await
            .expect("depths")
            .dlq,
        1
    );
}

/// A message that fails twice and then succeeds is acknowledged, not dead.
pub async fn transient_failures_succeed_after_retries<H: Harness>(h: &H) {
    let b = open(h).await;
    let policy = RetryPolicy::parse("50ms,100ms,150ms").expect("tiers");
    publish(&b.transport, &[b"task"]).await;
    let seen = Seen::default();
    let rec = seen.clone();
    drain(
        &b.transport,
        &policy,
        config(),
        handler_fn(move |env: Envelope| {
            rec.record(&env);
            async move {
                if env.attempt < 2 {
                    Err(HandlerError::retry("RateLimited", "429"))
                } else {
                    Ok(())
                }
            }
        }),
    )
    .await;
    let attempts: Vec<u32> = seen.all().iter().map(|(_, e)| e.attempt).collect();
    assert_eq!(attempts, [0, 1, 2]);
    assert!(dead(&b.store).await.is_empty());
    let d = b
        .transport
        .queue_depths(&LaneSet {
            queue: queue(),
            tiers: policy.tiers().to_vec(),
        })
        .await
        .expect("depths");
    assert!(d.is_drained() && d.dlq == 0, "{d:?}");
}

/// An always-failing message is dead after max attempts, with one history entry per
/// attempt naming the lane it failed in.
pub async fn exhausted_messages_reach_the_dlq_with_full_history<H: Harness>(h: &H) {
    let b = open(h).await;
    let policy = RetryPolicy::parse("50ms,60ms,70ms").expect("tiers");
    let sent = publish(&b.transport, &[b"doomed 1", b"doomed 2"]).await;
    drain(
        &b.transport,
        &policy,
        config(),
        handler_fn(|env: Envelope| async move {
            Err(HandlerError::retry(
                "Upstream",
                format!("shard {} down", env.payload.len()),
            ))
        }),
    )
    .await;
    let dead = dead(&b.store).await;
    assert_eq!(dead.len(), 2);
    for d in &dead {
        let env = &d.envelope;
        assert!(sent.iter().any(|s| s.id == env.id));
        assert_eq!(env.attempt, policy.max_attempts());
        let lanes: Vec<&str> = env.history.iter().map(|f| f.lane.as_str()).collect();
        assert_eq!(lanes, ["main", "retry.50ms", "retry.60ms", "retry.70ms"]);
        let numbers: Vec<u32> = env.history.iter().map(|f| f.attempt).collect();
        assert_eq!(numbers, [1, 2, 3, 4]);
        assert!(
            env.first_failed_ms
                .is_some_and(|first| first <= env.history[3].at_ms)
        );
    }
    assert_eq!(
        dead[0].envelope.last_failure().map(|f| &f.fingerprint),
        dead[1].envelope.last_failure().map(|f| &f.fingerprint)
    );
}

/// A handler that runs past its timeout fails the attempt with class `timeout`.
pub async fn handler_timeout_is_a_failed_attempt<H: Harness>(h: &H) {
    let b = open(h).await;
    let policy = RetryPolicy::parse("50ms").expect("tiers");
    publish(&b.transport, &[b"slow"]).await;
    let cfg = RunnerConfig {
        timeout: Duration::from_millis(100),
        ..config()
    };
    let started = Instant::now();
    drain(
        &b.transport,
        &policy,
        cfg,
        handler_fn(|_env: Envelope| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(())
        }),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the slow handler was cut off"
    );
    let dead = dead(&b.store).await;
    assert_eq!(dead.len(), 1);
    let classes: Vec<(&str, FailureKind)> = dead[0]
        .envelope
        .history
        .iter()
        .map(|f| (f.class.as_str(), f.kind))
        .collect();
    assert_eq!(classes, [("timeout", FailureKind::Timeout); 2]);
}

/// A panicking handler fails only its own attempt; other messages carry on.
pub async fn handler_panic_is_a_failed_attempt<H: Harness>(h: &H) {
    let b = open(h).await;
    let policy = RetryPolicy::parse("50ms").expect("tiers");
    publish(&b.transport, &[b"boom", b"fine"]).await;
    let seen = Seen::default();
    let rec = seen.clone();
    drain(
        &b.transport,
        &policy,
        config(),
        handler_fn(move |env: Envelope| {
            rec.record(&env);
            async move {
                assert!(env.payload != b"boom"[..], "handler exploded on purpose");
                Ok(())
            }
        }),
    )
    .await;
    let fine = seen
        .all()
        .iter()
        .filter(|(_, e)| e.payload == b"fine"[..])
        .count();
    assert_eq!(fine, 1, "the healthy message was handled once");
    let dead = dead(&b.store).await;
    assert_eq!(dead.len(), 1);
    let last = dead[0].envelope.last_failure().expect("history");
    assert_eq!(
        (last.class.as_str(), last.kind),
        ("panic", FailureKind::Panic)
    );
    assert!(
        last.message.contains("exploded on purpose"),
        "{}",
        last.message
    );
}

/// A handler that runs three times longer than the lease keeps it by heartbeat: it is
/// delivered once, not handed to another worker meanwhile.
pub async fn long_handlers_keep_their_lease<H: Harness>(h: &H) {
    let b = open(h).await;
    let policy = RetryPolicy::parse("50ms").expect("tiers");
    publish(&b.transport, &[b"long"]).await;
    let seen = Seen::default();
    let rec = seen.clone();
    let cfg = RunnerConfig {
        lease: Duration::from_millis(300),
        ..config()
    };
    drain(
        &b.transport,
        &policy,
        cfg,
        handler_fn(move |env: Envelope| {
            rec.record(&env);
            async {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                Ok(())
            }
        }),
    )
    .await;
    assert_eq!(seen.all().len(), 1, "delivered exactly once");
    assert!(dead(&b.store).await.is_empty());
}

/// Shutdown releases in-flight deliveries after the grace period; the next delivery
/// is not counted as a failed attempt.
pub async fn graceful_shutdown_releases_without_counting<H: Harness>(h: &H) {
    let b = open(h).await;
    let policy = RetryPolicy::parse("50ms").expect("tiers");
    publish(&b.transport, &[b"interrupted"]).await;
    let started = Arc::new(tokio::sync::Notify::new());
    let signal = Arc::clone(&started);
    let cfg = RunnerConfig {
        grace: Duration::from_millis(100),
        ..config()
    };
    let runner = Runner::new(b.transport.clone(), queue(), policy.clone(), cfg);
    let shutdown = async move { signal.notified().await };
    let notify = Arc::clone(&started);
    let summary = tokio::time::timeout(
        RUN_LIMIT,
        runner.run(
            handler_fn(move |_env: Envelope| {
                notify.notify_one();
                async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok(())
                }
            }),
            shutdown,
        ),
    )
    .await
    .expect("shutdown within the limit")
    .expect("run");
    assert_eq!((summary.reason, summary.released), ("shutdown", 1));
    let seen = Seen::default();
    let rec = seen.clone();
    drain(
        &b.transport,
        &policy,
        config(),
        handler_fn(move |env: Envelope| {
            rec.record(&env);
            async { Ok(()) }
        }),
    )
    .await;
    let again = seen.all();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].1.attempt, again[0].1.history.len()),
        (0, 0),
        "a release is not a failed attempt"
    );
}

async fn cli_consume(
    b: &Fixture<impl Transport, impl DeadLetterStore>,
    extra: &[&str],
) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(&b.cli.bin);
    cmd.args(&b.cli.backend_args)
        .args(["consume", queue().as_str()])
        .args(extra)
        .env("REDRIVE_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd.spawn().expect("start redrive consume")
}

/// SIGKILL of `redrive consume` mid-handler loses nothing: the message is delivered
/// again once the lease expires. The crash is kept in its history but not counted: a
/// consumer killed from outside (a deploy, the OOM killer) is no fault of the message,
/// and it then ran alone and succeeded.
pub async fn sigkill_mid_handler_loses_nothing<H: Harness>(h: &H) {
    let b = open(h).await;
    let policy = RetryPolicy::parse("50ms,100ms").expect("tiers");
    let sent = publish(&b.transport, &[b"survivor"]).await;
    let lanes = LaneSet {
        queue: queue(),
        tiers: policy.tiers().to_vec(),
    };
    let mut child = cli_consume(
        &b,
        &[
            "--exec",
            "sleep 30",
            "--lease",
            "500ms",
            "--tiers",
            "50ms,100ms",
        ],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = b.transport.queue_depths(&lanes).await.expect("depths");
        if d.inflight == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer never took the message: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.start_kill().expect("SIGKILL");
    let _ = child.wait().await;
    let seen = Seen::default();
    let rec = seen.clone();
    drain(
        &b.transport,
        &policy,
        config(),
        handler_fn(move |env: Envelope| {
            rec.record(&env);
            async { Ok(()) }
        }),
    )
    .await;
    let again = seen.all();
    assert_eq!(again.len(), 1, "delivered again after the crash");
    let env = &again[0].1;
    assert_eq!(
        (env.id, &env.payload[..]),
        (sent[0].id, b"survivor".as_slice())
    );
    assert_eq!(
        env.attempt, 0,
        "a crash that may not be its own is not counted"
    );
    assert_eq!(env.history.len(), 1, "{:?}", env.history);
    assert_eq!(env.history[0].kind, FailureKind::LeaseExpired);
    assert!(!env.history[0].counted);
    assert!(dead(&b.store).await.is_empty());
}

/// A message whose handler kills the consumer process on every delivery still ends in
/// the DLQ after max attempts.
pub async fn crash_looping_message_reaches_the_dlq<H: Harness>(h: &H) {
    let b = open(h).await;
    let sent = publish(&b.transport, &[b"kills its consumer"]).await;
    let args = [
        "--exec",
        "kill -9 $PPID; sleep 5",
        "--lease",
        "300ms",
        "--tiers",
        "50ms,60ms",
        "--until-idle",
        "--poll",
        "20ms",
    ];
    for _ in 0..8 {
        let mut child = cli_consume(&b, &args).await;
        // Generous: on Kafka each consumer joins the group while the killed one's
        // session (6 s) has not yet run out, and the test broker's rebalances are slow.
        let status = tokio::time::timeout(Duration::from_secs(45), child.wait())
            .await
            .expect("consumer ends")
            .expect("wait");
        if status.success() {
            break;
        }
        // Let the dead consumer's lease run out before the next one starts.
        tokio::time::sleep(Duration::from_millis(350)).await;
    }
    let dead = dead(&b.store).await;
    assert_eq!(dead.len(), 1, "the crash-looping message is dead");
    let env = &dead[0].envelope;
    assert_eq!(env.id, sent[0].id);
    assert_eq!(env.attempt, 3, "max attempts with two tiers");
    assert!(
        env.history
            .iter()
            .all(|f| f.kind == FailureKind::LeaseExpired),
        "{:?}",
        env.history
    );
    assert_eq!(env.payload, b"kills its consumer"[..]);
}

/// Runs `redrive consume --until-idle` with `args` until a run ends on its own, starting
/// it again after every death as a supervisor would; returns how many runs died.
async fn supervise(
    b: &Fixture<impl Transport, impl DeadLetterStore>,
    args: &[&str],
    lease: Duration,
) -> usize {
    let mut deaths = 0;
    loop {
        let mut child = cli_consume(b, args).await;
        // Generous: on Kafka each consumer joins the group while the killed one's
        // session (6 s) has not yet run out, and the test broker's rebalances are slow.
        let status = tokio::time::timeout(Duration::from_secs(45), child.wait())
            .await
            .expect("consumer ends")
            .expect("wait");
        if status.success() {
            return deaths;
        }
        deaths += 1;
        assert!(deaths <= 20, "the consumer kept dying: {deaths} deaths");
        // Let the dead consumer's leases run out before the next one starts.
        tokio::time::sleep(lease + Duration::from_millis(50)).await;
    }
}

/// A message that kills its consumer takes nothing else with it: 40 good messages and
/// one killer, consumed 8 at a time with fetch-ahead on and the consumer restarted after
/// each death. The killer ends in the DLQ after max attempts, every one of them a crash
/// it caused alone; no good message is dead-lettered, and none was ever delivered with
/// a counted attempt, though several were in flight (or leased ahead) at each crash.
pub async fn a_crash_is_charged_only_to_the_message_that_caused_it<H: Harness>(h: &H) {
    let b = open(h).await;
    let dir =
        std::env::temp_dir().join(format!("redrive-crash-{}-{}", std::process::id(), now_ms()));
    std::fs::create_dir_all(&dir).expect("log dir");
    let log = dir.join("handled.log");
    let good: Vec<String> = (0..40).map(|i| format!("good-{i}")).collect();
    let mut payloads: Vec<&[u8]> = good.iter().map(|g| g.as_bytes()).collect();
    payloads.insert(17, b"killer");
    let sent = publish(&b.transport, &payloads).await;
    let killer = sent
        .iter()
        .find(|e| &e.payload[..] == b"killer")
        .expect("killer")
        .id;
    // The handler shell's parent is `redrive consume`: the killer SIGKILLs it.
    let handler = format!(
        "p=$(cat); case \"$p\" in killer) kill -9 $PPID; sleep 5;; esac; sleep 0.05; \
         echo \"$p $REDRIVE_ATTEMPT\" >> {}",
        log.display()
    );
    let lease = Duration::from_millis(400);
    let args = [
        "--exec",
        handler.as_str(),
        "--concurrency",
        "8",
        "--lease",
        "400ms",
        "--tiers",
        "50ms,60ms",
        "--until-idle",
        "--poll",
        "20ms",
    ];
    let deaths = supervise(&b, &args, lease).await;
    let dead = dead(&b.store).await;
    let ids: Vec<_> = dead.iter().map(|d| d.envelope.id).collect();
    assert_eq!(ids, vec![killer], "only the killer is dead: {dead:?}");
    let env = &dead[0].envelope;
    assert_eq!(env.attempt, 3, "max attempts with two tiers");
    let counted: Vec<_> = env.history.iter().filter(|f| f.counted).collect();
    assert_eq!(counted.len(), 3, "{:?}", env.history);
    assert!(
        counted.iter().all(|f| f.kind == FailureKind::LeaseExpired),
        "{:?}",
        env.history
    );
    assert!(
        deaths >= 3,
        "it crashed its consumer at least once per attempt: {deaths}"
    );
    let handled = std::fs::read_to_string(&log).unwrap_or_default();
    for g in &good {
        let attempts: Vec<&str> = handled
            .lines()
            .filter_map(|l| l.strip_prefix(g.as_str()).and_then(|r| r.strip_prefix(' ')))
            .collect();
        assert!(!attempts.is_empty(), "{g} was never handled: {handled}");
        assert!(
            attempts.iter().all(|a| *a == "0"),
            "{g} was charged an attempt for a crash it did not cause: {attempts:?}"
        );
    }
    let lanes = LaneSet {
        queue: queue(),
        tiers: RetryPolicy::parse("50ms,60ms")
            .expect("tiers")
            .tiers()
            .to_vec(),
    };
    let d = b.transport.queue_depths(&lanes).await.expect("depths");
    assert!(d.is_drained(), "nothing left in any lane: {d:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Messages redrive cannot read, written by another producer with the broker's own
/// client, are quarantined in the DLQ as `MalformedEnvelope` (acknowledged in their
/// lane), and the good messages around them are all handled: no fetch fails on them.
pub async fn malformed_messages_are_quarantined_and_the_rest_flow<H: Harness>(h: &H) {
    let b = open(h).await;
    let policy = RetryPolicy::parse("50ms").expect("tiers");
    publish(&b.transport, &[b"before-1", b"before-2"]).await;
    let bad = h.write_malformed(&b, &queue()).await;
    assert!(bad > 0);
    publish(&b.transport, &[b"after-1", b"after-2", b"after-3"]).await;
    let seen = Seen::default();
    let rec = seen.clone();
    drain(
        &b.transport,
        &policy,
        config(),
        handler_fn(move |env: Envelope| {
            rec.record(&env);
            async { Ok(()) }
        }),
    )
    .await;
    let mut handled: Vec<String> = seen
        .all()
        .iter()
        .map(|(_, e)| String::from_utf8_lossy(&e.payload).into_owned())
        .collect();
    handled.sort();
    assert_eq!(
        handled,
        ["after-1", "after-2", "after-3", "before-1", "before-2"],
        "every good message is handled once"
    );
    let dead = dead(&b.store).await;
    assert_eq!(
        dead.len(),
        bad,
        "each unreadable message is quarantined: {dead:?}"
    );
    for d in &dead {
        let last = d.envelope.last_failure().expect("a failure");
        assert_eq!(
            (last.class.as_str(), last.kind),
            ("MalformedEnvelope", FailureKind::Poison),
            "{last:?}"
        );
        assert!(!last.message.is_empty(), "it says what is wrong");
    }
}

/// A message from a producer that knows nothing of redrive has one id for good: the
/// same `REDRIVE_ID` on its first delivery, on its delivery after that consumer was
/// SIGKILLed, in the DLQ, and after a replay.
pub async fn a_plain_message_keeps_its_id_across_a_crash_and_a_replay<H: Harness>(h: &H) {
    let b = open(h).await;
    let dir =
        std::env::temp_dir().join(format!("redrive-plain-{}-{}", std::process::id(), now_ms()));
    std::fs::create_dir_all(&dir).expect("log dir");
    let log = dir.join("ids.log");
    let mark = dir.join("crashed");
    h.publish_plain(&b, &queue(), b"from a plain producer")
        .await;
    // First delivery: note the id and die. The next: note it and declare it poison.
    let handler = format!(
        "cat >/dev/null; echo \"$REDRIVE_ID\" >> {log}; \
         if [ ! -e {mark} ]; then touch {mark}; kill -9 $PPID; sleep 5; fi; exit 65",
        log = log.display(),
        mark = mark.display()
    );
    let lease = Duration::from_millis(400);
    let args = [
        "--exec",
        handler.as_str(),
        "--lease",
        "400ms",
        "--tiers",
        "50ms",
        "--until-idle",
        "--poll",
        "20ms",
    ];
    let deaths = supervise(&b, &args, lease).await;
    assert_eq!(deaths, 1);
    let ids: Vec<String> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        ids.len(),
        2,
        "delivered before and after the crash: {ids:?}"
    );
    assert_eq!(ids[0], ids[1], "the same id after the crash");
    let dead = dead(&b.store).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].envelope.id.to_string(),
        ids[0],
        "the same id in the DLQ"
    );
    assert_eq!(dead[0].envelope.payload, b"from a plain producer"[..]);
    replay(
        &b.transport,
        &b.store,
        &DeadSelection::Filter(DeadFilter::default()),
        &opts(5),
        &Unpaced,
    )
    .await
    .expect("replay");
    let seen = Seen::default();
    let rec = seen.clone();
    drain(
        &b.transport,
        &RetryPolicy::parse("50ms").expect("tiers"),
        config(),
        handler_fn(move |env: Envelope| {
            rec.record(&env);
            async { Ok(()) }
        }),
    )
    .await;
    let again = seen.all();
    assert_eq!(again.len(), 1);
    assert_eq!(
        again[0].1.id.to_string(),
        ids[0],
        "the same id after a replay"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Replay puts a dead message back in main with the same id and its history; it is
/// then handled normally.
pub async fn replay_keeps_the_id_and_history<H: Harness>(h: &H) {
    let b = open(h).await;
    let policy = RetryPolicy::parse("50ms").expect("tiers");
    let sent = publish(&b.transport, &[b"fix me"]).await;
    drain(
        &b.transport,
        &policy,
        config(),
        handler_fn(|_env: Envelope| async { Err(HandlerError::poison("Invalid", "bad input")) }),
    )
    .await;
    assert_eq!(dead(&b.store).await.len(), 1);
    let report = replay(
        &b.transport,
        &b.store,
        &DeadSelection::Filter(DeadFilter::default()),
        &opts(5),
        &Unpaced,
    )
    .await
    .expect("replay");
    assert_eq!((report.matched, report.replayed), (1, 1));
    assert!(
        dead(&b.store).await.is_empty(),
        "replayed messages leave the DLQ"
    );
    let seen = Seen::default();
    let rec = seen.clone();
    drain(
        &b.transport,
        &policy,
        config(),
        handler_fn(move |env: Envelope| {
            rec.record(&env);
            async { Ok(()) }
        }),
    )
    .await;
    let again = seen.all();
    assert_eq!(again.len(), 1);
    let env = &again[0].1;
    assert_eq!(env.id, sent[0].id, "replay keeps redrive-id");
    assert_eq!((env.attempt, env.replays, env.history.len()), (0, 1, 1));

    // Failing again after a replay returns it to the DLQ with its whole history; the
    // replay limit then keeps it there instead of looping.
    let report = replay(
        &b.transport,
        &b.store,
        &DeadSelection::Ids(vec![env.id]),
        &opts(5),
        &Unpaced,
    )
    .await
    .expect("replay");
    assert_eq!(report.matched, 0, "a handled message is no longer dead");
    let again = publish(&b.transport, &[b"still broken"]).await;
    let poison =
        || handler_fn(|_env: Envelope| async { Err(HandlerError::poison("Invalid", "bad input")) });
    drain(&b.transport, &policy, config(), poison()).await;
    let report = replay(
        &b.transport,
        &b.store,
        &DeadSelection::Ids(vec![again[0].id]),
        &opts(1),
        &Unpaced,
    )
    .await
    .expect("replay");
    assert_eq!(report.replayed, 1);
    drain(&b.transport, &policy, config(), poison()).await;
    let back = dead(&b.store).await;
    assert_eq!(back.len(), 1);
    assert_eq!(
        (
            back[0].envelope.id,
            back[0].envelope.replays,
            back[0].envelope.history.len()
        ),
        (again[0].id, 1, 2)
    );
    let report = replay(
        &b.transport,
        &b.store,
        &DeadSelection::Ids(vec![again[0].id]),
        &opts(1),
        &Unpaced,
    )
    .await
    .expect("replay");
    assert_eq!(
        (report.replayed, report.over_limit.as_slice()),
        (0, [again[0].id].as_slice())
    );
    assert_eq!(
        dead(&b.store).await.len(),
        1,
        "over the replay limit it stays dead"
    );
}

/// Non-UTF-8 and large payloads survive retry, dead-lettering and replay byte for byte.
pub async fn payloads_are_carried_byte_exact<H: Harness>(h: &H) {
    let b = open(h).await;
    let policy = RetryPolicy::parse("50ms").expect("tiers");
    let binary: Vec<u8> = (0..=255u8)
        .chain([0xff, 0xfe, 0x00, b'\n', b'\r'])
        .collect();
    let large: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let sent = publish(&b.transport, &[&binary, &large]).await;
    drain(
        &b.transport,
        &policy,
        config(),
        handler_fn(|_env: Envelope| async { Err(HandlerError::retry("Nope", "keeps failing")) }),
    )
    .await;
    let dead = dead(&b.store).await;
    assert_eq!(dead.len(), 2);
    for s in &sent {
        let d = dead
            .iter()
            .find(|d| d.envelope.id == s.id)
            .expect("dead copy");
        assert_eq!(
            d.envelope.payload,
            s.payload,
            "payload of {} bytes changed",
            s.payload.len()
        );
    }
    replay(
        &b.transport,
        &b.store,
        &DeadSelection::Filter(DeadFilter::default()),
        &opts(5),
        &Unpaced,
    )
    .await
    .expect("replay");
    let seen = Seen::default();
    let rec = seen.clone();
    drain(
        &b.transport,
        &policy,
        config(),
        handler_fn(move |env: Envelope| {
            rec.record(&env);
            async { Ok(()) }
        }),
    )
    .await;
    let mut got: Vec<Vec<u8>> = seen
        .all()
        .into_iter()
        .map(|(_, e)| e.payload.to_vec())
        .collect();
    got.sort();
    let mut want = vec![binary, large];
    want.sort();
    assert_eq!(got, want);
}
