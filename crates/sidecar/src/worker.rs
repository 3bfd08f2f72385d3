//! `--worker CMD`: long-lived worker processes speaking JSON lines on stdin/stdout
//! (docs/worker-protocol.md), for agents that pay a heavy start-up (an LLM SDK's import)
//! once instead of once per message.
//!
//! A worker says in its first line how many deliveries it takes at once; redrive then
//! writes one line per delivery and reads one line per result. stderr is the worker's
//! log, passed to redrive's. A worker that exits takes what it had in flight with it:
//! a delivery it held alone is charged with the crash ([`HandlerError::crashed`]),
//! deliveries it held beside others are crash suspects, run alone to find the culprit
//! ([`HandlerError::crashed_beside_others`]). A delivery whose handler timed out stops
//! its worker (the only way to stop its work). A stopped worker is started again on the
//! next delivery, after a backoff that grows with the crashes in a row. When the handler
//! is closed (or dropped) its workers' stdin is closed, which asks them to exit.

use std::collections::{HashMap, VecDeque};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use redrive_core::{Envelope, HandlerError, HandlerResult};
use redrive_runner::Handler;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, Command};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use crate::Structured;
use crate::group::{self, GroupGuard};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// How long a worker may take to send its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// stderr lines kept per worker for the failure message of a crash.
const STDERR_LINES: usize = 20;

/// The longest wait before starting a worker again after crashes in a row.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How long [`WorkerHandler::close`] waits for a worker to exit after its stdin closed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// Runs deliveries on long-lived worker processes.
#[derive(Clone)]
pub struct WorkerHandler {
    pool: Arc<Pool>,
}

impl std::fmt::Debug for WorkerHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandler")
            .field("command", &self.pool.command)
            .field("workers", &self.pool.slots.len())
            .finish()
    }
}

impl WorkerHandler {
    /// Asks every worker to exit (their stdin closes) and waits for them, stopping any
    /// still running after a grace period. Deliveries in flight keep their worker until
    /// they are answered; call this once the runner has returned. A delivery handled
    /// after `close` starts a worker again.
    pub async fn close(&self) {
        for slot in &self.pool.slots {
            let Some(Live {
                worker,
                mut exited,
                kill,
            }) = slot.live.lock().await.take()
            else {
                continue;
            };
            drop(worker);
            let exit = exited.wait_for(|done| *done);
            if tokio::time::timeout(EXIT_GRACE, exit).await.is_err() {
                tracing::warn!(
                    worker = slot.index,
                    "the worker did not exit within {} s of its stdin closing: stopping it",
                    EXIT_GRACE.as_secs()
                );
                kill.notify_one();
                let _ = exited.wait_for(|done| *done).await;
            }
        }
    }
}

struct Pool {
    command: String,
    slots: Vec<Slot>,
    next: AtomicUsize,
}

/// One place for a worker process, started when first needed and again after it stops.
struct Slot {
    index: usize,
    live: tokio::sync::Mutex<Option<Live>>,
    /// Crashes since the last answer: the restart backoff.
    crashes: Arc<AtomicU32>,
}

/// The slot's current worker, and word of its exit.
struct Live {
    worker: Arc<Worker>,
    /// Becomes true once the process has exited and been reaped.
    exited: watch::Receiver<bool>,
    /// Stops the process (the reader task owns it).
    kill: Arc<Notify>,
}

/// A running worker process. Its stdin stays open while this exists: the last handle
/// gone (the slot's and every in-flight delivery's), the writer task ends and the
/// worker reads end of file.
struct Worker {
    /// Delivery lines, written to the worker's stdin by its writer task.
    deliveries: mpsc::UnboundedSender<String>,
    pending: Mutex<HashMap<String, oneshot::Sender<HandlerResult>>>,
    permits: Arc<Semaphore>,
    dead: AtomicBool,
    kill: Arc<Notify>,
}

/// The worker's first line.
#[derive(Deserialize)]
struct Handshake {
    redrive_worker: u32,
    #[serde(default = "one")]
    concurrency: usize,
}

fn one() -> usize {
    1
}

impl WorkerHandler {
    /// `workers` processes of `command` (run with `sh -c`), started when first needed.
    #[must_use]
    pub fn new(command: impl Into<String>, workers: usize) -> Self {
        let slots = (0..workers.max(1))
            .map(|index| Slot {
                index,
                live: tokio::sync::Mutex::new(None),
                crashes: Arc::new(AtomicU32::new(0)),
            })
            .collect();
        Self {
            pool: Arc::new(Pool {
                command: command.into(),
                slots,
                next: AtomicUsize::new(0),
            }),
        }
    }
}

impl Slot {
    /// The live worker, started (after the backoff its crashes call for) when there is
    /// none.
    async fn worker(&self, command: &str) -> Result<Arc<Worker>, HandlerError> {
        let mut live = self.live.lock().await;
        if let Some(l) = live
            .as_ref()
            .filter(|l| !l.worker.dead.load(Ordering::Acquire))
        {
            return Ok(Arc::clone(&l.worker));
        }
        let crashes = self.crashes.load(Ordering::Relaxed);
        if crashes > 0 {
            let backoff = Duration::from_millis(100u64 << crashes.min(7)).min(MAX_BACKOFF);
            tokio::time::sleep(backoff).await;
        }
        let started = start(command, self.index, Arc::clone(&self.crashes)).await?;
        let worker = Arc::clone(&started.worker);
        *live = Some(started);
        Ok(worker)
    }
}

async fn start(command: &str, index: usize, crashes: Arc<AtomicU32>) -> Result<Live, HandlerError> {
    let unavailable = |why: String| {
        crashes.fetch_add(1, Ordering::Relaxed);
        HandlerError::retry("worker_unavailable", format!("worker `{command}`: {why}"))
    };
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .env("REDRIVE_WORKER_INDEX", index.to_string());
    group::own_group(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| unavailable(format!("cannot start it: {e}")))?;
    let pid = child.id();
    // Until the handshake is in, a failure to start stops everything the command began.
    let starting = GroupGuard::new(pid);
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(unavailable("its pipes could not be opened".into()));
    };
    let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
    tokio::spawn(log_stderr(stderr, index, Arc::clone(&tail)));
    let mut lines = BufReader::new(stdout).lines();
    let first = match tokio::time::timeout(HANDSHAKE_TIMEOUT, lines.next_line()).await {
        Ok(Ok(Some(line))) => line,
        Ok(Ok(None) | Err(_)) => {
            let status = child
                .wait()
                .await
                .map_or_else(|e| e.to_string(), |s| s.to_string());
            return Err(unavailable(format!(
                "it exited ({status}) before its handshake{}",
                stderr_suffix(&tail)
            )));
        }
        Err(_) => {
            return Err(unavailable(format!(
                "no handshake within {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            )));
        }
    };
    let handshake: Handshake = serde_json::from_str(&first).map_err(|e| {
        unavailable(format!(
            "its first line is not a handshake ({e}): {}",
            first.chars().take(200).collect::<String>()
        ))
    })?;
    if handshake.redrive_worker != PROTOCOL_VERSION {
        return Err(unavailable(format!(
            "it speaks protocol version {}; this redrive speaks {PROTOCOL_VERSION}",
            handshake.redrive_worker
        )));
    }
    let capacity = handshake.concurrency.clamp(1, 10_000);
    tracing::info!(worker = index, capacity, pid = child.id(), "worker started");
    starting.exited();
    let (deliveries, queued) = mpsc::unbounded_channel();
    tokio::spawn(write_deliveries(stdin, queued));
    let kill = Arc::new(Notify::new());
    let worker = Arc::new(Worker {
        deliveries,
        pending: Mutex::new(HashMap::new()),
        permits: Arc::new(Semaphore::new(capacity)),
        dead: AtomicBool::new(false),
        kill: Arc::clone(&kill),
    });
    let (exit_tx, exited) = watch::channel(false);
    let command = command.to_owned();
    // The reader holds the worker weakly, so that dropping the last handle closes its
    // stdin; with no handle left nothing is in flight.
    let weak = Arc::downgrade(&worker);
    let stop = Arc::clone(&kill);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                line = lines.next_line() => match line {
                    Ok(Some(line)) => {
                        if let Some(w) = weak.upgrade() {
                            answer(&w, &line, index, &crashes);
                        }
                    }
                    Ok(None) | Err(_) => break,
                },
                () = stop.notified() => match pid {
                    // The shell and whatever it started.
                    Some(pid) => group::kill(pid),
                    None => { let _ = child.start_kill(); }
                },
            }
        }
        let status = child
            .wait()
            .await
            .map_or_else(|e| e.to_string(), |s| s.to_string());
        let _ = exit_tx.send(true);
        let Some(w) = weak.upgrade() else {
            tracing::info!(worker = index, %status, "worker exited after its stdin closed");
            return;
        };
        w.dead.store(true, Ordering::Release);
        crashes.fetch_add(1, Ordering::Relaxed);
        let held: Vec<_> = lock(&w.pending).drain().collect();
        tracing::warn!(worker = index, %status, in_flight = held.len(), "worker stopped");
        let why = format!(
            "worker `{command}` exited ({status}){}",
            stderr_suffix(&tail)
        );
        let alone = held.len() == 1;
        for (_, reply) in held {
            let _ = reply.send(Err(if alone {
                HandlerError::crashed("worker_crashed", why.clone())
            } else {
                HandlerError::crashed_beside_others("worker_crashed", why.clone())
            }));
        }
    });
    Ok(Live {
        worker,
        exited,
        kill,
    })
}

/// Writes delivery lines to a worker, as many per write as are waiting (one system call,
/// and one wake-up of the worker, for a burst of deliveries). Ends when the worker is
/// dropped, which closes its stdin, or when a write fails because it is stopping.
async fn write_deliveries(mut stdin: ChildStdin, mut queued: mpsc::UnboundedReceiver<String>) {
    let mut batch = String::new();
    while let Some(line) = queued.recv().await {
        batch.clear();
        batch.push_str(&line);
        while batch.len() < 1 << 20 {
            match queued.try_recv() {
                Ok(line) => batch.push_str(&line),
                Err(_) => break,
            }
        }
        // A write that fails means the worker is stopping; its reader answers for
        // everything it held.
        if stdin.write_all(batch.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Routes one stdout line to the delivery it answers.
fn answer(worker: &Worker, line: &str, index: usize, crashes: &AtomicU32) {
    if line.trim().is_empty() {
        return;
    }
    // A result line: the structured result every handler kind shares, with the id of
    // the delivery it answers.
    let mut reply: Structured = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(worker = index, error = %e, line = %line.chars().take(200).collect::<String>(),
                "the worker wrote a line that is not a result (stdout is for the protocol; log to stderr)");
            return;
        }
    };
    let Some(id) = reply.id.take() else {
        tracing::warn!(worker = index, line = %line.chars().take(200).collect::<String>(), "the worker wrote a result without an id");
        return;
    };
    let Some(waiting) = lock(&worker.pending).remove(&id) else {
        tracing::warn!(worker = index, %id, "the worker answered a delivery it does not hold");
        return;
    };
    crashes.store(0, Ordering::Relaxed);
    let _ = waiting.send(reply.into_result());
}

async fn log_stderr(
    stderr: tokio::process::ChildStderr,
    index: usize,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "redrive::worker", worker = index, "{line}");
        let mut tail = lock(&tail);
        if tail.len() == STDERR_LINES {
            tail.pop_front();
        }
        tail.push_back(line.chars().take(500).collect());
    }
}

fn stderr_suffix(tail: &Mutex<VecDeque<String>>) -> String {
    let tail = lock(tail);
    if tail.is_empty() {
        " (no stderr)".to_owned()
    } else {
        format!(
            "; its last stderr lines: {}",
            tail.iter().cloned().collect::<Vec<_>>().join(" | ")
        )
    }
}

/// One delivery's line, serialized straight from the envelope's fields.
#[derive(Serialize)]
struct DeliveryLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: String,
    queue: &'a str,
    attempt: u32,
    replays: u32,
    key: Option<&'a str>,
    headers: Headers<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
}

/// Headers as one JSON object (a repeated name: the last value).
struct Headers<'a>(&'a [(String, String)]);

impl Serialize for Headers<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut last: Vec<&(String, String)> = Vec::with_capacity(self.0.len());
        for pair in self.0 {
            match last.iter_mut().find(|(name, _)| *name == pair.0) {
                Some(seen) => *seen = pair,
                None => last.push(pair),
            }
        }
        s.collect_map(last.into_iter().map(|(k, v)| (k, v)))
    }
}

fn delivery_line(msg: &Envelope) -> String {
    let text = std::str::from_utf8(&msg.payload).ok();
    let line = DeliveryLine {
        kind: "delivery",
        id: msg.id.to_string(),
        queue: msg.queue.as_str(),
        attempt: msg.attempt,
        replays: msg.replays,
        key: msg.key.as_deref(),
        headers: Headers(&msg.headers),
        payload: text,
        payload_base64: text
            .is_none()
            .then(|| base64::engine::general_purpose::STANDARD.encode(&msg.payload)),
    };
    let mut out = serde_json::to_string(&line).unwrap_or_else(|e| {
        // Strings and numbers always serialize; kept total rather than panicking.
        tracing::error!(error = %e, "could not write a delivery line");
        String::new()
    });
    out.push('\n');
    out
}

/// Removes an unanswered delivery when its handler is dropped (the runner's timeout),
/// and stops the worker: that is the only way to stop the work it is doing.
struct InFlight {
    worker: Arc<Worker>,
    id: String,
    _permit: OwnedSemaphorePermit,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if lock(&self.worker.pending).remove(&self.id).is_some() {
            tracing::warn!(id = %self.id, "a delivery was abandoned (timeout or shutdown): stopping its worker");
            self.worker.kill.notify_one();
        }
    }
}

impl Handler for WorkerHandler {
    async fn handle(&self, msg: Envelope) -> HandlerResult {
        let pool = &self.pool;
        let slot = &pool.slots[pool.next.fetch_add(1, Ordering::Relaxed) % pool.slots.len()];
        let line = delivery_line(&msg);
        let id = msg.id.to_string();
        let worker = slot.worker(&pool.command).await?;
        let permit = Arc::clone(&worker.permits)
            .acquire_owned()
            .await
            .map_err(|_| HandlerError::retry("worker_unavailable", "the worker is gone"))?;
        let (tx, rx) = oneshot::channel();
        lock(&worker.pending).insert(id.clone(), tx);
        let in_flight = InFlight {
            worker: Arc::clone(&worker),
            id,
            _permit: permit,
        };
        if worker.dead.load(Ordering::Acquire) {
            // It stopped between being picked and taking this delivery, which it never
            // saw: not its crash.
            lock(&worker.pending).remove(&in_flight.id);
            return Err(HandlerError::retry(
                "worker_unavailable",
                "the worker stopped before it received this message",
            ));
        }
        // A send that fails means the worker is stopping; its reader answers for
        // everything it held, this delivery included.
        let _ = worker.deliveries.send(line);
        let result = rx.await.unwrap_or_else(|_| {
            Err(HandlerError::crashed_beside_others(
                "worker_crashed",
                "the worker stopped without answering",
            ))
        });
        // Answered: nothing for the guard to undo.
        drop(in_flight);
        result
    }
}

#[cfg(test)]
mod tests {
    use redrive_core::{Envelope, QueueName};
    use serde_json::json;

    use super::{WorkerHandler, delivery_line};
    use crate::group;
    use redrive_runner::Handler;

    #[test]
    fn a_delivery_line_carries_every_field_on_one_line() {
        let q = QueueName::new("agent.tasks").unwrap();
        let mut msg = Envelope::new(q.clone(), "héllo \"x\"\n")
            .with_key("k-1")
            .with_header("x-tenant", "a")
            .with_header("x-tenant", "b");
        msg.attempt = 2;
        let line = delivery_line(&msg);
        assert!(
            line.ends_with('\n') && line.matches('\n').count() == 1,
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            json!({"type": "delivery", "id": msg.id.to_string(), "queue": "agent.tasks",
                   "attempt": 2, "replays": 0, "key": "k-1", "headers": {"x-tenant": "b"},
                   "payload": "héllo \"x\"\n"})
        );

        let binary = Envelope::new(q, vec![0xff, 0x00, 0xfe]);
        let v: serde_json::Value = serde_json::from_str(&delivery_line(&binary)).unwrap();
        assert_eq!(v["payload_base64"], "/wD+");
        assert!(v.get("payload").is_none() && v["key"].is_null(), "{v}");
    }

    #[tokio::test]
    async fn an_abandoned_delivery_stops_its_worker_and_what_it_started() {
        // A worker that takes deliveries and never answers, through a grandchild.
        let sleep = group::Grandchild::new("worker-group");
        let handler = WorkerHandler::new(
            format!("{}; echo '{{\"redrive_worker\": 1}}'; wait", sleep.start()),
            1,
        );
        let msg = Envelope::new(QueueName::new("agent.tasks").unwrap(), "x");
        let run = handler.handle(msg);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(500), run)
                .await
                .is_err(),
            "the worker should not have answered"
        );
        assert!(
            sleep.gone().await,
            "process {} outlived its stopped worker",
            sleep.pid()
        );
        handler.close().await;
    }
}
