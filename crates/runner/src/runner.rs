//! The consume loop.
//!
//! One fetch loop leases deliveries into a line as handler slots free up, and one
//! worker per slot takes them from it, runs the handler and settles the outcome.
//! Shutdown stops the fetch loop, lets in-flight handlers finish within a grace period,
//! then releases what is left so it is delivered again without counting an attempt.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use redrive_core::{
    Delivery, Envelope, Failure, FailureKind, Fetched, HandlerResult, Lane, LaneSet, LaneStats,
    Outcome, QueueName, RetryPolicy, Step, Transport, TransportError, now_ms,
};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::breaker::{Breaker, BreakerConfig, BreakerState, Change, Charge, Gate};
use crate::handler::Handler;
use crate::isolation::{GATE, Quiet};
use crate::observer::{Observer, Settled};
use crate::stats::Stats;

/// How a runner behaves.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Handlers running at once.
    pub concurrency: usize,
    /// Longest a handler may run before the attempt counts as failed.
    pub timeout: Duration,
    /// How long a delivery is leased; kept alive by a heartbeat every third of it
    /// while the handler runs. After a crash, the message returns once it expires.
    pub lease: Duration,
    /// How long shutdown waits for in-flight handlers before releasing them.
    pub grace: Duration,
    /// Stop after this many deliveries.
    pub max_messages: Option<u64>,
    /// How often an idle runner looks for new messages published by other processes.
    pub idle_poll: Duration,
    /// Most deliveries leased in one fetch (and held ahead of the handlers). Reached
    /// only by handlers fast enough to start that many within a second: slower ones
    /// fetch less at a time.
    pub fetch_batch: usize,
    /// Largest payload handed to a handler; a larger one is dead-lettered as
    /// `MalformedEnvelope` without running the handler.
    pub max_payload: usize,
    /// The outage breaker; `None` turns it off.
    pub breaker: Option<BreakerConfig>,
}

/// Most handlers a runner runs at once. Each slot is a task waiting for work: a million
/// of them took a gigabyte before any message arrived.
pub const MAX_CONCURRENCY: usize = 10_000;

/// How often a runner looks whether its queue's isolation lane holds a message due.
const ISOLATION_LOOK: Duration = Duration::from_secs(2);
/// After it met a crash suspect, a runner fetches no further ahead than one delivery per
/// slot for this long: a crash then leaves fewer suspects to run alone.
const CAUTIOUS_MS: i64 = 30_000;
/// How many times a message's failures may go uncounted because of the breaker, per
/// attempt its policy allows (and at most half the kept history, where they are
/// counted): a bound, so that a backlog of messages that fail on their own (which looks
/// like an outage) still reaches the DLQ.
const MAX_SPARED_PER_ATTEMPT: usize = 2;
/// The uncounted history entry of a crash suspect.
const SUSPECT: &str = "its consumer stopped while this message was in flight beside others \
    (or leased ahead of its handler): any of them may have caused it, so it is not counted, \
    and the message is run alone";

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            concurrency: 8,
            timeout: Duration::from_secs(60),
            lease: Duration::from_secs(30),
            grace: Duration::from_secs(10),
            max_messages: None,
            idle_poll: Duration::from_millis(100),
            // Per-fetch costs (a broker round trip, a lease transaction) add up: at 256
            // the NATS bench's median ratio was 0.64x, at 1024 0.71-0.75x (BENCHMARKS.md, NATS).
            fetch_batch: 1024,
            max_payload: 16 * 1024 * 1024,
            breaker: Some(BreakerConfig::default()),
        }
    }
}

/// Why a runner stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The configuration cannot work.
    #[error("invalid runner configuration: {0}")]
    Config(String),
    /// The backend refuses this consumer's setup (see
    /// [`TransportError::Misconfigured`]).
    #[error("{0}")]
    Misconfigured(TransportError),
    /// The idle check (`--until-idle`) could not read lane depths.
    #[error("cannot read lane depths: {0}")]
    Depths(TransportError),
    /// The runner's task was cancelled: the runtime is shutting down.
    #[error("the runner was cancelled: the async runtime is shutting down")]
    Cancelled,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Deliveries started.
    pub delivered: u64,
    /// Deliveries released unfinished at shutdown.
    pub released: u64,
    /// Why the run ended: `shutdown`, `max-messages` or `idle`.
    pub reason: &'static str,
}

type IdleProbe = Arc<
    dyn Fn(LaneSet) -> Pin<Box<dyn Future<Output = Result<bool, TransportError>> + Send>>
        + Send
        + Sync,
>;

/// Consumes one queue's lanes with a handler.
pub struct Runner<T: Transport> {
    transport: Arc<T>,
    lanes: LaneSet,
    policy: RetryPolicy,
    config: RunnerConfig,
    stats: Arc<Stats>,
    observers: Vec<Arc<dyn Observer>>,
    idle_probe: Option<IdleProbe>,
}

impl<T: Transport> Runner<T> {
    /// A runner for `queue`'s main lane and the policy's retry tiers.
    pub fn new(
        transport: impl Into<Arc<T>>,
        queue: QueueName,
        policy: RetryPolicy,
        config: RunnerConfig,
    ) -> Self {
        let lanes = LaneSet {
            queue,
            tiers: policy.tiers().to_vec(),
        };
        let stats: Arc<Stats> = Arc::default();
        let observers: Vec<Arc<dyn Observer>> = vec![Arc::clone(&stats) as Arc<dyn Observer>];
        Self {
            transport: transport.into(),
            lanes,
            policy,
            config,
            stats,
            observers,
            idle_probe: None,
        }
    }

    /// Adds an observer (a metrics exporter, a progress display).
    #[must_use]
    pub fn observe(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observers.push(observer);
        self
    }

    /// The live counters of this runner.
    #[must_use]
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// The lanes this runner reads.
    #[must_use]
    pub fn lanes(&self) -> &LaneSet {
        &self.lanes
    }

    /// Runs until `shutdown` resolves (or a limit is reached), then drains gracefully.
    /// Dropping the returned future stops the run the same way, in the background.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    ///
    /// # Errors
    ///
    /// Fails on an unusable configuration, when the idle check cannot read depths, or
    /// when the runtime shuts down under the run ([`RunError::Cancelled`]). Transport
    /// errors while fetching are logged and retried, not returned: a broker that is down
    /// for a while must not stop the consumer.
    pub async fn run<H: Handler>(
        self,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<Summary, RunError> {
        // The fetch loop runs as a task on the runtime's workers. Awaited in place from
        // `block_on` (a `#[tokio::main]` body, the CLI), it would live on a thread of its
        // own and be woken across threads, a futex wake-up, each time a worker settles a
        // delivery.
        let (stop, stopped) = oneshot::channel::<()>();
        let mut looping = tokio::spawn(self.drive(handler, async move {
            // Sent, or dropped because this future was: either way, drain and stop.
            let _ = stopped.await;
        }));
        tokio::pin!(shutdown);
        let joined = tokio::select! {
            biased;
            joined = &mut looping => joined,
            () = &mut shutdown => {
                let _ = stop.send(());
                looping.await
            }
        };
        match joined {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(RunError::Cancelled),
        }
    }

    async fn drive<H: Handler>(
        self,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<Summary, RunError> {
        if !(1..=MAX_CONCURRENCY).contains(&self.config.concurrency) {
            return Err(RunError::Config(format!(
                "concurrency must be from 1 to {MAX_CONCURRENCY}, not {}",
                self.config.concurrency
            )));
        }
        if self.config.lease < Duration::from_millis(30) {
            return Err(RunError::Config(
                "the lease must be at least 30ms".to_owned(),
            ));
        }
        let (abort_tx, abort_rx) = watch::channel(false);
        // What every worker shares.
        let ctx = Arc::new(WorkerContext {
            transport: Arc::clone(&self.transport),
            handler,
            policy: self.policy.clone(),
            config: self.config.clone(),
            observers: self.observers.clone(),
            queue: self.lanes.queue.clone(),
            wake: Notify::new(),
            released: AtomicU64::new(0),
            line: Line::default(),
            isolate_wanted: AtomicBool::new(false),
            stopping: watch::channel(false).0,
            suspect_at_ms: AtomicI64::new(i64::MIN / 2),
            alone_runs: AtomicU64::new(0),
            breaker: Breaker::new(
                self.config.breaker.clone(),
                self.config.timeout + self.config.lease,
            ),
        });
        // The process-wide gate asks this run's line whether it is busy.
        let quiet: Arc<dyn Quiet> = Arc::clone(&ctx) as Arc<dyn Quiet>;
        GATE.register(Arc::downgrade(&quiet));
        drop(quiet);
        let isolates = self.transport.isolates();
        let concurrency = self.config.concurrency;
        let fetch_batch = self
            .config
            .fetch_batch
            .min(self.transport.max_fetch())
            .max(1);
        // One long-lived worker per handler slot takes leased deliveries from the line:
        // a task spawned per delivery cost more than a fast handler itself.
        let mut workers: JoinSet<()> = JoinSet::new();
        let start_worker = |workers: &mut JoinSet<()>| {
            let worker = Worker {
                ctx: Arc::clone(&ctx),
                abort: abort_rx.clone(),
            };
            workers.spawn(worker.work());
        };
        for _ in 0..concurrency {
            start_worker(&mut workers);
        }
        let wake = &ctx.wake;
        let released = &ctx.released;
        let line = &ctx.line;
        let mut fetch_errors: u32 = 0;
        // Fetches in flight, with how many deliveries each asked for. A transport that
        // serves each fetch from its own broker round trip may take a second while the
        // first is answered, so the broker always has the next one waiting.
        let overlap = self.transport.fetches_in_flight().max(1);
        let mut fetching: JoinSet<Result<Fetched<T::Token>, TransportError>> = JoinSet::new();
        let mut asked: Vec<(tokio::task::Id, usize)> = Vec::with_capacity(overlap);
        // An idle check runs beside the loop, so a retry coming due meanwhile is not held
        // up by it; it counts only if nothing was delivered since it started.
        let mut probing: Option<(JoinHandle<Result<bool, TransportError>>, u64)> = None;
        let mut fetch_at = Instant::now();
        let mut came_back_empty = false;
        let mut pace = StartRate::new();
        // Isolation rounds run the isolation lane's due messages one at a time, each with
        // the process to itself: one at the start (a crashed predecessor's suspects), one
        // when this run isolated a suspect, and one when a look says one is due.
        let mut round: Option<JoinHandle<Option<i64>>> = None;
        let mut round_at: Option<Instant> = isolates.then(Instant::now);
        let mut looking: Option<JoinHandle<Result<Option<i64>, TransportError>>> = None;
        let mut look_at = Instant::now() + ISOLATION_LOOK;
        tokio::pin!(shutdown);

        let reason = loop {
            // A worker that panicked (in a transport, not a handler: those are caught)
            // is replaced, so the run keeps its concurrency.
            while let Some(ended) = workers.try_join_next() {
                if let Err(e) = ended {
                    tracing::error!(queue = %self.lanes.queue, error = %e, "a worker stopped; starting another");
                    start_worker(&mut workers);
                }
            }
            if isolates && round.is_none() {
                let now = Instant::now();
                if ctx.isolate_wanted.swap(false, Ordering::AcqRel)
                    || round_at.is_some_and(|at| at <= now)
                {
                    round_at = None;
                    let worker = Worker {
                        ctx: Arc::clone(&ctx),
                        abort: abort_rx.clone(),
                    };
                    round = Some(tokio::spawn(isolation_round(worker, self.lanes.clone())));
                } else if looking.is_none() && now >= look_at {
                    look_at = now + ISOLATION_LOOK;
                    let transport = Arc::clone(&self.transport);
                    let lanes = self.lanes.clone();
                    looking = Some(tokio::spawn(
                        async move { transport.isolated_due(&lanes).await },
                    ));
                }
            }
            let Counts {
                waiting,
                busy,
                started,
            } = line.counts();
            if self.config.max_messages.is_some_and(|max| started >= max) {
                break "max-messages";
            }
            let remaining = self.config.max_messages.map_or(usize::MAX, |m| {
                usize::try_from(m - started).unwrap_or(usize::MAX)
            });
            // Leased deliveries wait in the line for a free worker: fetching ahead hides
            // the fetch round trip behind running handlers. How far ahead follows the
            // pace: one slot's worth per slot at least, and up to a fetch batch when
            // handlers are fast enough to start that many within a second (and a
            // quarter of the lease, which only running deliveries renew).
            pace.update(started);
            // Soon after a crash (suspects met), fetch no further ahead than a slot's
            // worth: were the crash to come again, fewer would be suspects.
            let cautious = now_ms() - ctx.suspect_at_ms.load(Ordering::Relaxed) < CAUTIOUS_MS;
            let ahead = if cautious {
                concurrency
            } else {
                pace.ahead(concurrency, fetch_batch, self.config.lease)
            };
            let FetchPlan {
                mut room,
                mut worth,
                every_settle,
                wake_on,
            } = FetchPlan::new(Window {
                concurrency,
                ahead,
                fetch_batch,
                busy,
                waiting,
                incoming: asked.iter().map(|(_, n)| n).sum(),
                remaining,
                came_back_empty,
            });
            let may_fetch = fetching.len() < overlap;
            // The outage breaker: while it is open nothing is fetched but, now and then,
            // one message to probe with.
            let gate = ctx.breaker.gate(Instant::now());
            let shut = match gate {
                Gate::Flow => None,
                Gate::Probe => {
                    room = room.min(1);
                    worth = 1;
                    None
                }
                Gate::Shut(until) => Some(until),
            };
            if shut.is_none()
                && may_fetch
                && (room < worth || every_settle)
                && wake_on.is_some_and(|on| line.wake_on(on))
            {
                continue;
            }
            if shut.is_none() && may_fetch && room >= worth && Instant::now() >= fetch_at {
                if gate == Gate::Probe {
                    ctx.breaker.probe_sent(Instant::now());
                    tracing::info!(queue = %self.lanes.queue, "breaker half-open: probing with one message");
                }
                let transport = Arc::clone(&self.transport);
                let lanes = self.lanes.clone();
                let lease = self.config.lease;
                // A spawned fetch is never abandoned half-way: even at shutdown it is
                // awaited and what it leased is released, so no lease expires unseen
                // (which would count an attempt).
                let task =
                    fetching.spawn(async move { transport.fetch(&lanes, room, lease).await });
                asked.push((task.id(), room));
                continue;
            }
            tokio::select! {
                biased;
                () = &mut shutdown => break "shutdown",
                Some(joined) = fetching.join_next_with_id() => {
                    let id = match &joined {
                        Ok((id, _)) => *id,
                        Err(e) => e.id(),
                    };
                    asked.retain(|(task, _)| *task != id);
                    let result = joined.map_or_else(|e| Err(TransportError::Backend { context: "fetch task".into(), source: Box::new(e) }), |(_, r)| r);
                    match result {
                        Ok(fetched) if fetched.deliveries.is_empty() => {
                            ctx.breaker.probe_missed(Instant::now());
                            fetch_errors = 0;
                            came_back_empty = true;
                            let idle = line.counts().is_empty() && fetching.is_empty();
                            // A backend that knows when its next message is due is not idle.
                            if idle && fetched.next_due_ms.is_none() && probing.is_none()
                                && let Some(probe) = &self.idle_probe
                            {
                                let alone = ctx.alone_runs.load(Ordering::Acquire);
                                probing = Some((tokio::spawn(probe(self.lanes.clone())), started + alone));
                            }
                            let poll = Instant::now() + self.config.idle_poll;
                            fetch_at = fetched.next_due_ms.map_or(poll, |due| {
                                let wait = u64::try_from(due - now_ms()).unwrap_or(0);
                                poll.min(Instant::now() + Duration::from_millis(wait))
                            });
                        }
                        Ok(fetched) => {
                            fetch_errors = 0;
                            came_back_empty = false;
                            // The other fetch in flight may have come back empty and set
                            // an idle wait: this one found messages, so look again now.
                            fetch_at = Instant::now();
                            let at = Instant::now();
                            redrive_core::failpoint("fetched");
                            line.push(fetched.deliveries.into_iter().map(|d| (d, at)));
                        }
                        Err(e @ TransportError::Misconfigured { .. }) => {
                            // Nothing has run yet: backends check their setup on the
                            // first fetch.
                            let unstarted = line.close();
                            self.release_unstarted(unstarted, &mut fetching, released).await;
                            return Err(RunError::Misconfigured(e));
                        }
                        Err(e) => {
                            ctx.breaker.probe_missed(Instant::now());
                            fetch_errors = fetch_errors.saturating_add(1);
                            let backoff = Duration::from_millis(100 * 2u64.pow(fetch_errors.min(6)));
                            tracing::warn!(queue = %self.lanes.queue, error = %e, retry_in_ms = backoff.as_millis() as u64, "fetch failed");
                            fetch_at = Instant::now() + backoff;
                        }
                    }
                }
                probed = async { (&mut probing.as_mut().expect("guarded by the branch condition").0).await }, if probing.is_some() => {
                    let since = probing.take().map_or(0, |(_, at)| at);
                    let result = probed.unwrap_or_else(|e| Err(TransportError::Backend { context: "idle check".into(), source: Box::new(e) }));
                    match result {
                        Ok(true) => {
                            // A fetch may be in flight: on a long-polling broker (SQS) one
                            // always is by the time a slow check answers, so waiting for none
                            // made `--until-idle` depend on the check answering within the
                            // poll interval. What such a fetch leases is released at the end
                            // (`release_unstarted`), uncounted, so nothing is lost.
                            let now = line.counts();
                            let alone = ctx.alone_runs.load(Ordering::Acquire);
                            if now.started + alone == since && now.is_empty() && round.is_none() {
                                break "idle";
                            }
                        }
                        Ok(false) => {}
                        Err(e) => {
                            let unstarted = line.close();
                            self.release_unstarted(unstarted, &mut fetching, released).await;
                            return Err(RunError::Depths(e));
                        }
                    }
                }
                ended = async { (&mut round.as_mut().expect("guarded by the branch condition")).await }, if round.is_some() => {
                    round = None;
                    let next = match ended {
                        Ok(next) => next,
                        Err(e) if e.is_panic() => {
                            tracing::error!(queue = %self.lanes.queue, "an isolation round panicked; trying again in a second");
                            Some(now_ms() + 1000)
                        }
                        Err(_) => None,
                    };
                    round_at = next.map(instant_at);
                }
                looked = async { (&mut looking.as_mut().expect("guarded by the branch condition")).await }, if looking.is_some() => {
                    looking = None;
                    match looked {
                        Ok(Ok(Some(due))) => {
                            let at = instant_at(due);
                            round_at = Some(round_at.map_or(at, |r| r.min(at)));
                        }
                        Ok(Ok(None)) => {}
                        Ok(Err(e)) => tracing::debug!(queue = %self.lanes.queue, error = %e, "could not look at the isolation lane"),
                        Err(_) => {}
                    }
                }
                // A settle freed room, scheduled a retry or isolated a suspect: look again.
                // (With a fetch in flight its return comes first: an isolation round
                // asked for meanwhile starts then.)
                () = wake.notified(), if may_fetch => fetch_at = Instant::now(),
                () = sleep_until(fetch_at), if shut.is_none() && may_fetch && Instant::now() < fetch_at => {}
                () = sleep_until(shut.unwrap_or(fetch_at)), if shut.is_some() => {}
                () = sleep_until(round_at.unwrap_or(look_at).min(look_at)), if isolates && round.is_none() => {}
            }
        };
        // An isolation round waiting for the gate gives up; one running a delivery
        // finishes it within the grace period like any worker.
        ctx.stopping.send_replace(true);
        if let Some(look) = looking.take() {
            look.abort();
        }

        let unstarted = line.close();
        self.release_unstarted(unstarted, &mut fetching, released)
            .await;

        // Graceful drain: in-flight handlers (an isolation round's included) get the
        // grace period, then are released.
        let drained = timeout(self.config.grace, async {
            while workers.join_next().await.is_some() {}
            if let Some(r) = round.as_mut() {
                let _ = r.await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(queue = %self.lanes.queue, in_flight = line.counts().busy, "grace period over: releasing in-flight deliveries");
            let _ = abort_tx.send(true);
            while workers.join_next().await.is_some() {}
            if let Some(r) = round.take() {
                let _ = r.await;
            }
        }
        Ok(Summary {
            delivered: line.counts().started + ctx.alone_runs.load(Ordering::Acquire),
            released: released.load(Ordering::Relaxed),
            reason,
        })
    }

    /// Deliveries fetched but never started go back uncounted: those waiting in the
    /// line, and those the fetches still in flight lease (awaited, never abandoned).
    async fn release_unstarted(
        &self,
        unstarted: Vec<(Delivery<T::Token>, Instant)>,
        fetching: &mut JoinSet<Result<Fetched<T::Token>, TransportError>>,
        released: &AtomicU64,
    ) {
        let mut unstarted: Vec<Delivery<T::Token>> =
            unstarted.into_iter().map(|(d, _)| d).collect();
        while let Some(pending) = fetching.join_next().await {
            if let Ok(Ok(fetched)) = pending {
                unstarted.extend(fetched.deliveries);
            }
        }
        for delivery in unstarted {
            if let Err(e) = self.transport.release(&delivery).await {
                tracing::warn!(id = %delivery.envelope.id, error = %e, "release failed; the lease will expire instead");
            }
            released.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<T: Transport + LaneStats> Runner<T> {
    /// Stops once main and every retry lane of the queue are empty and nothing is in
    /// flight (`--until-idle`).
    #[must_use]
    pub fn until_idle(mut self) -> Self {
        let transport = Arc::clone(&self.transport);
        self.idle_probe = Some(Arc::new(move |lanes: LaneSet| {
            let transport = Arc::clone(&transport);
            Box::pin(async move { transport.queue_depths(&lanes).await.map(|d| d.is_drained()) })
        }));
        self
    }
}

/// How fast deliveries start, measured over the last quarter second or so, or over the
/// last [`StartRate::SAMPLE`] starts when those come sooner.
struct StartRate {
    since: Instant,
    started_then: u64,
    per_sec: f64,
}

impl StartRate {
    const WINDOW: Duration = Duration::from_millis(250);
    /// Enough starts to measure by: fast handlers reach their pace within milliseconds
    /// instead of running a whole window on one slot's worth of fetch-ahead.
    const SAMPLE: u64 = 1024;

    fn new() -> Self {
        Self {
            since: Instant::now(),
            started_then: 0,
            per_sec: 0.0,
        }
    }

    fn update(&mut self, started: u64) {
        let elapsed = self.since.elapsed();
        if elapsed >= Self::WINDOW || started - self.started_then >= Self::SAMPLE {
            self.per_sec = (started - self.started_then) as f64 / elapsed.as_secs_f64();
            self.since = Instant::now();
            self.started_then = started;
        }
    }

    /// Deliveries to hold beyond the running ones: what starts within a second (and
    /// a quarter of the lease), between one per slot and one fetch batch.
    fn ahead(&self, concurrency: usize, fetch_batch: usize, lease: Duration) -> usize {
        let horizon = (lease / 4).min(Duration::from_secs(1)).as_secs_f64();
        let paced = (self.per_sec * horizon) as usize;
        paced.clamp(concurrency, fetch_batch.max(concurrency))
    }
}

/// What the workers of one run share.
struct WorkerContext<T: Transport, H> {
    transport: Arc<T>,
    handler: H,
    policy: RetryPolicy,
    config: RunnerConfig,
    observers: Vec<Arc<dyn Observer>>,
    queue: QueueName,
    /// Wakes the fetch loop: settles freed the room it waits for, or one scheduled
    /// a retry.
    wake: Notify,
    /// Deliveries released unfinished.
    released: AtomicU64,
    /// Leased deliveries waiting for a worker, with when they were leased.
    line: Line<(Delivery<T::Token>, Instant)>,
    /// A worker isolated a suspect: the fetch loop starts an isolation round.
    isolate_wanted: AtomicBool,
    /// The run is ending: an isolation round takes nothing more.
    stopping: watch::Sender<bool>,
    /// When this run last met a crash suspect (unix ms).
    suspect_at_ms: AtomicI64,
    /// Deliveries run alone by isolation rounds.
    alone_runs: AtomicU64,
    /// The outage breaker, fed by every worker's outcomes, obeyed by the fetch loop.
    breaker: Breaker,
}

impl<T: Transport, H: Send + Sync + 'static> Quiet for WorkerContext<T, H> {
    fn busy(&self) -> usize {
        self.line.counts().busy
    }

    fn resume(&self) {
        self.line.ready.notify_waiters();
    }
}

/// The moment a unix-ms time falls at, on Tokio's clock.
fn instant_at(ms: i64) -> Instant {
    let wait = u64::try_from(ms - now_ms()).unwrap_or(0);
    Instant::now() + Duration::from_millis(wait)
}

/// Leased deliveries waiting for a worker, shared by the fetch loop and the workers.
/// One lock guards the deliveries and the counts the fetch loop sizes its fetches by,
/// so a delivery is always either waiting or counted busy.
struct Line<D> {
    state: Mutex<LineState<D>>,
    /// Deliveries were added, or the line closed.
    ready: Notify,
}

struct LineState<D> {
    waiting: VecDeque<D>,
    /// Deliveries taken by a worker and not yet finished.
    busy: usize,
    /// Deliveries taken by workers since the run started.
    started: u64,
    /// Workers waiting for a delivery.
    idle: usize,
    /// Shutdown: nothing more is taken.
    closed: bool,
    /// When a settle should wake the fetch loop; `None` when it is not waiting for one.
    wake_on: Option<WakeOn>,
}

/// What the fetch loop knows when it decides whether to fetch.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// Handler slots.
    concurrency: usize,
    /// How many deliveries to lease beyond the slots (from the pace).
    ahead: usize,
    /// The most one fetch may ask for.
    fetch_batch: usize,
    /// Deliveries running, and leased ones waiting in the line.
    busy: usize,
    waiting: usize,
    /// What the fetches in flight asked for.
    incoming: usize,
    /// Deliveries still to start before `--max-messages` (`usize::MAX` without it).
    remaining: usize,
    /// The last fetch found nothing.
    came_back_empty: bool,
}

/// The fetch loop's decision, worked out from a [`Window`] alone (pure: table-tested).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FetchPlan {
    /// How many deliveries a fetch now may ask for.
    room: usize,
    /// The least worth a fetch: once this much fits, not as soon as one slot frees
    /// (with fast handlers that would be one broker round trip, or one lease write, per
    /// message or two).
    worth: usize,
    /// Every settle wakes the loop: the last fetch found nothing (what a settle frees
    /// may make more ready, a Kafka partition's next records say), or everything left
    /// to run is already leased (to see the end).
    every_settle: bool,
    /// Which settle wakes the loop; `None` when no settle can make room (fetches in
    /// flight and the pace fallen): then only a fetch coming back wakes it.
    wake_on: Option<WakeOn>,
}

impl FetchPlan {
    fn new(w: Window) -> Self {
        // Still to lease before `--max-messages` is reached.
        let left = w.remaining.saturating_sub(w.waiting + w.incoming);
        let room = (w.concurrency + w.ahead)
            .saturating_sub(w.busy + w.waiting + w.incoming)
            .min(w.fetch_batch)
            .min(left);
        let worth = (w.ahead.min(w.fetch_batch) / 2).clamp(1, left.max(1));
        // Settles wake the loop only once a worthwhile fetch fits again: a wake-up per
        // settled delivery cost more than fast handlers themselves.
        let every_settle = w.came_back_empty || left == 0;
        let wake_on = if every_settle {
            Some(WakeOn::AnySettle)
        } else {
            (w.concurrency + w.ahead)
                .checked_sub(worth + w.incoming)
                .map(WakeOn::AtMost)
        };
        Self {
            room,
            worth,
            every_settle,
            wake_on,
        }
    }
}

/// When a settle wakes the fetch loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WakeOn {
    /// The next settle, whatever it leaves.
    AnySettle,
    /// A settle that leaves at most this many deliveries busy or waiting.
    AtMost(usize),
}

impl<D> Default for Line<D> {
    fn default() -> Self {
        Self {
            state: Mutex::new(LineState {
                waiting: VecDeque::new(),
                busy: 0,
                started: 0,
                idle: 0,
                closed: false,
                wake_on: None,
            }),
            ready: Notify::new(),
        }
    }
}

/// What the line holds at one moment.
#[derive(Debug, Clone, Copy)]
struct Counts {
    waiting: usize,
    busy: usize,
    started: u64,
}

impl Counts {
    fn is_empty(self) -> bool {
        self.waiting == 0 && self.busy == 0
    }
}

/// What a worker is told to do next.
enum Next<D> {
    Run(D),
    Wait,
    Stop,
}

impl<D> Line<D> {
    fn lock(&self) -> MutexGuard<'_, LineState<D>> {
        // The lock is never held across a call that can panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn counts(&self) -> Counts {
        let st = self.lock();
        Counts {
            waiting: st.waiting.len(),
            busy: st.busy,
            started: st.started,
        }
    }

    /// Adds deliveries and wakes as many idle workers as there are new deliveries.
    fn push(&self, deliveries: impl ExactSizeIterator<Item = D>) {
        let wakes = {
            let mut st = self.lock();
            let wakes = deliveries.len().min(st.idle);
            st.waiting.extend(deliveries);
            wakes
        };
        for _ in 0..wakes {
            self.ready.notify_one();
        }
    }

    /// The next delivery for a worker; `waited` says whether the worker waited for
    /// it (and is idle no more).
    fn take(&self, waited: bool) -> Next<D> {
        let mut st = self.lock();
        if waited {
            st.idle = st.idle.saturating_sub(1);
        }
        if st.closed {
            return Next::Stop;
        }
        // While an isolation round wants the process to itself nothing new starts (read
        // under this lock: see `Gate::wanted`); its end wakes the waiting workers.
        let next = if GATE.wanted() {
            None
        } else {
            st.waiting.pop_front()
        };
        match next {
            Some(d) => {
                st.busy += 1;
                st.started += 1;
                // A wake-up meant for another worker may have been taken by this one.
                if !st.waiting.is_empty() && st.idle > 0 {
                    self.ready.notify_one();
                }
                Next::Run(d)
            }
            None => {
                st.idle += 1;
                Next::Wait
            }
        }
    }

    /// Asks the settles to wake the fetch loop `on` that condition; `true` when the
    /// line already meets it (settles since the loop counted): look again, do not wait.
    fn wake_on(&self, on: WakeOn) -> bool {
        let mut st = self.lock();
        if let WakeOn::AtMost(n) = on
            && st.busy + st.waiting.len() <= n
        {
            return true;
        }
        st.wake_on = Some(on);
        false
    }

    /// A worker finished a delivery; `true` when the fetch loop asked to be woken now.
    fn done(&self) -> bool {
        let (wake, quiet) = {
            let mut st = self.lock();
            st.busy -= 1;
            let wake = match st.wake_on {
                Some(WakeOn::AnySettle) => true,
                Some(WakeOn::AtMost(n)) => st.busy + st.waiting.len() <= n,
                None => false,
            };
            if wake {
                st.wake_on = None;
            }
            (wake, st.busy == 0)
        };
        if quiet {
            GATE.went_quiet();
        }
        wake
    }

    /// Stops the workers taking deliveries and returns those still waiting.
    fn close(&self) -> Vec<D> {
        let left = {
            let mut st = self.lock();
            st.closed = true;
            st.waiting.drain(..).collect()
        };
        self.ready.notify_waiters();
        left
    }
}

/// Counts a delivery finished, even when its worker unwinds, and wakes the fetch loop
/// if it asked for it.
struct Busy<'a, D> {
    line: &'a Line<D>,
    wake: &'a Notify,
    finished: bool,
}

impl<D> Busy<'_, D> {
    /// Counts the delivery finished; `true` when that woke the fetch loop.
    fn finish(mut self) -> bool {
        self.finished = true;
        let woke = self.line.done();
        if woke {
            self.wake.notify_one();
        }
        woke
    }
}

impl<D> Drop for Busy<'_, D> {
    fn drop(&mut self) {
        if !self.finished && self.line.done() {
            self.wake.notify_one();
        }
    }
}

/// One worker: runs deliveries from the line, one at a time.
struct Worker<T: Transport, H> {
    ctx: Arc<WorkerContext<T, H>>,
    abort: watch::Receiver<bool>,
}

impl<T: Transport, H> std::ops::Deref for Worker<T, H> {
    type Target = WorkerContext<T, H>;

    fn deref(&self) -> &Self::Target {
        &self.ctx
    }
}

impl<T: Transport, H: Handler> Worker<T, H> {
    async fn work(mut self) {
        let ctx = Arc::clone(&self.ctx);
        let mut waited = false;
        loop {
            let next = {
                // Registered before the line is looked at, so no wake-up is missed; and
                // dropped before a delivery runs, so none is held by a busy worker.
                let ready = ctx.line.ready.notified();
                tokio::pin!(ready);
                ready.as_mut().enable();
                match ctx.line.take(waited) {
                    Next::Wait => {
                        ready.await;
                        waited = true;
                        continue;
                    }
                    next => next,
                }
            };
            waited = false;
            let Next::Run((delivery, leased_at)) = next else {
                return;
            };
            let busy = Busy {
                line: &ctx.line,
                wake: &ctx.wake,
                finished: false,
            };
            self.run(&delivery, leased_at).await;
            if busy.finish() {
                // Let the fetch loop run now. With fast handlers a worker finds the next
                // delivery ready and never waits, so the loop, woken onto this thread,
                // would run only once the line is empty: every fetch round trip would
                // then stall all workers instead of overlapping their work.
                tokio::task::yield_now().await;
            }
        }
    }

    /// Handles and settles one delivery taken from the line, or moves it to the
    /// isolation lane when it is a crash suspect.
    async fn run(&mut self, delivery: &Delivery<T::Token>, leased_at: Instant) {
        if leased_at.elapsed() >= self.config.lease {
            // It waited in the line past its lease (behind an isolation round, say): the
            // backend may have handed it to another consumer already. Give it back
            // rather than run it on a lease that is no longer this consumer's.
            if let Err(e) = Box::pin(self.transport.release(delivery)).await {
                tracing::debug!(id = %delivery.envelope.id, error = %e, "a delivery whose lease ran out in the line could not be released");
            }
            self.released.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suspect = delivery.unfinished_before || delivery.envelope.crashed_before();
        if suspect && delivery.lane != Lane::Isolated && self.transport.isolates() {
            Box::pin(self.isolate(delivery)).await;
            return;
        }
        if !self.breaker.admit(delivery.envelope.id) {
            // The breaker opened while it waited in the line: give it back unstarted.
            if let Err(e) = Box::pin(self.transport.release(delivery)).await {
                tracing::debug!(id = %delivery.envelope.id, error = %e, "a delivery held back by the open breaker could not be released");
            }
            self.released.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.run_handler(delivery).await;
    }

    /// Moves a crash suspect to the isolation lane, uncounted, to be run alone.
    async fn isolate(&self, delivery: &Delivery<T::Token>) {
        let why = delivery.unfinished_before.then_some(SUSPECT);
        self.isolate_noting(delivery, why).await;
    }

    /// As [`Self::isolate`], recording `why` (uncounted) when it is a new suspicion.
    async fn isolate_noting(&self, delivery: &Delivery<T::Token>, why: Option<&str>) {
        let mut envelope = delivery.envelope.clone();
        if let Some(why) = why {
            let now = now_ms();
            self.suspect_at_ms.store(now, Ordering::Relaxed);
            envelope.record_suspected_crash(why, now, &delivery.lane.label());
        }
        match self.transport.isolate(delivery, &envelope).await {
            Ok(()) => {
                self.report(&delivery.lane, Settled::Isolated, None);
                tracing::info!(id = %delivery.envelope.id, queue = %self.queue, crashed_before = delivery.envelope.crashed_before(), "crash suspect moved to the isolation lane, to run alone");
                self.isolate_wanted.store(true, Ordering::Release);
                self.wake.notify_one();
            }
            Err(e) => {
                // Its lease runs out and it comes back unfinished, to be isolated then.
                tracing::warn!(id = %delivery.envelope.id, error = %e, "could not move a crash suspect to the isolation lane; it will be delivered again");
                self.report(&delivery.lane, Settled::Unsettled, None);
            }
        }
    }

    /// Runs the handler on a delivery and settles its outcome (or, when shutdown aborts
    /// it, releases it). A delivery whose previous one ended unfinished reaches this
    /// only from the isolation lane, where it ran alone: that crash is counted.
    async fn run_handler(&mut self, delivery: &Delivery<T::Token>) {
        let lateness = matches!(delivery.lane, redrive_core::Lane::Retry(_))
            .then(|| now_ms() - delivery.due_ms);
        for o in self.observers.iter() {
            o.delivered(&self.queue, &delivery.lane, lateness);
        }
        let mut handler_secs = None;
        let size = delivery.envelope.payload.len();
        let outcome = if delivery.unfinished_before {
            Outcome::crashed_alone(now_ms())
        } else if size > self.config.max_payload {
            let message = format!(
                "payload of {size} bytes is over the consumer's limit of {} bytes (max_payload)",
                self.config.max_payload
            );
            Outcome::Failed {
                failure: Failure::new(FailureKind::Poison, "MalformedEnvelope", message, now_ms()),
                retry_after: None,
            }
        } else {
            let started = Instant::now();
            let outcome = self.handle(delivery).await;
            handler_secs = Some(started.elapsed().as_secs_f64());
            match outcome {
                Some(outcome) => outcome,
                None => {
                    // Shutdown's grace period ran out: give the message back unsettled.
                    if let Err(e) = Box::pin(self.transport.release(delivery)).await {
                        tracing::warn!(id = %delivery.envelope.id, error = %e, "release failed; the lease will expire instead");
                    }
                    self.released.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        };
        let outcome = match outcome {
            // The process that ran it (a worker) died while it ran beside others: run it
            // alone to learn whose crash it was. Where it already ran alone, or cannot be
            // isolated, the crash is counted against it.
            Outcome::Suspect { failure } => {
                if delivery.lane != Lane::Isolated && self.transport.isolates() {
                    Box::pin(self.isolate_noting(delivery, Some(&failure.message))).await;
                    return;
                }
                Outcome::Failed {
                    failure,
                    retry_after: None,
                }
            }
            other => other,
        };
        let (charge, change) = self
            .breaker
            .record(delivery.envelope.id, &outcome, Instant::now());
        if let Some(change) = change {
            self.breaker_changed(&change);
        }
        let outcome = match outcome {
            Outcome::Failed {
                failure,
                retry_after,
            } if charge == Charge::Spare && self.may_spare(&delivery.envelope) => {
                Box::pin(self.spare(delivery, failure, retry_after, handler_secs)).await;
                return;
            }
            other => other,
        };
        redrive_core::failpoint("handled");
        self.settle(delivery, outcome, handler_secs).await;
        redrive_core::failpoint("settled");
    }

    /// Runs the handler with a timeout, panic isolation and a lease heartbeat.
    /// `None` means shutdown aborted it.
    ///
    /// The handler runs inside this task (a panic is caught where it is polled) under
    /// one timer that serves both the heartbeat and the deadline: a task and two timers
    /// per message were most of the runner's own cost.
    async fn handle(&mut self, delivery: &Delivery<T::Token>) -> Option<Outcome> {
        let message: Envelope = delivery.envelope.clone();
        // Pinned in place: the worker's task, allocated once, holds it (a box per
        // delivery showed in profiles).
        let run = std::pin::pin!(self.ctx.handler.handle(message));
        let mut run = CatchPanic(run);
        // A handler that finishes on its first poll (a fast one, or one that fails at
        // once) needs no timer: arming and dropping one per delivery showed in profiles.
        let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut run).poll(cx))).await;
        if let Poll::Ready(result) = first {
            return Some(outcome_of(result));
        }
        let started = Instant::now();
        let deadline = started + self.config.timeout;
        let beat = (self.config.lease / 3).max(Duration::from_millis(10));
        let mut next_beat = started + beat;
        let timer = sleep_until(next_beat.min(deadline));
        tokio::pin!(timer);
        loop {
            tokio::select! {
                result = &mut run => return Some(outcome_of(result)),
                () = &mut timer => {
                    if Instant::now() >= deadline {
                        // Dropping the handler's future cancels it.
                        return Some(Outcome::timeout(self.config.timeout, now_ms()));
                    }
                    if let Err(e) = Box::pin(self.transport.extend_lease(delivery, self.config.lease)).await {
                        tracing::warn!(id = %delivery.envelope.id, error = %e, "lease heartbeat failed");
                    }
                    next_beat += beat;
                    timer.as_mut().reset(next_beat.min(deadline));
                }
                changed = self.abort.changed() => {
                    if changed.is_ok() && *self.abort.borrow() {
                        return None;
                    }
                }
            }
        }
    }

    fn breaker_changed(&self, change: &Change) {
        let state = match change {
            Change::Opened { failures, ratio } => {
                tracing::warn!(queue = %self.queue, failures, failing = format!("{:.0}%", ratio * 100.0),
                    "breaker open: most attempts fail with retryable errors across many messages (an outage?); \
                     no new messages are taken, failures are not counted, one message probes now and then");
                BreakerState::Open
            }
            Change::Closed => {
                tracing::info!(queue = %self.queue, "breaker closed: the probe succeeded; taking messages again");
                BreakerState::Closed
            }
        };
        for o in self.observers.iter() {
            o.breaker(&self.queue, state);
        }
        // The fetch loop may be waiting for this.
        self.wake.notify_one();
    }

    /// Whether a failure of this message may still go uncounted. A message spared over
    /// and over is failing on its own (a whole backlog of such messages looks like an
    /// outage): past a bound its failures count.
    fn may_spare(&self, envelope: &Envelope) -> bool {
        let limit = (MAX_SPARED_PER_ATTEMPT * self.policy.max_attempts() as usize)
            .min(redrive_core::MAX_HISTORY / 2);
        envelope.uncounted_failures() < limit
    }

    /// Schedules a message whose attempt failed while the breaker was open again, in
    /// its retry lane (the first tier from main), without counting the attempt.
    async fn spare(
        &self,
        delivery: &Delivery<T::Token>,
        mut failure: Failure,
        retry_after: Option<Duration>,
        handler_secs: Option<f64>,
    ) {
        let id = delivery.envelope.id;
        let tiers = self.policy.tiers();
        let tier = match &delivery.lane {
            Lane::Retry(name) => tiers.iter().find(|t| t.name() == name),
            _ => None,
        }
        .or_else(|| tiers.first());
        let Some(tier) = tier else {
            // No retry lane to wait in: give it back as it came.
            if let Err(e) = self.transport.release(delivery).await {
                tracing::warn!(%id, error = %e, "release failed; the lease will expire instead");
            }
            self.released.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let delay = retry_after.unwrap_or_default().max(tier.delay());
        let due = redrive_core::due_after(delay);
        failure.message = format!(
            "{} (not counted: the queue's breaker was open)",
            failure.message
        );
        let class = failure.class.clone();
        let mut env = delivery.envelope.clone();
        env.record_uncounted_failure(failure, &delivery.lane.label());
        env.not_before_ms = Some(due);
        match self.transport.retry(delivery, tier, due, &env).await {
            Ok(()) => {
                self.report(
                    &delivery.lane,
                    Settled::Spared { class: &class },
                    handler_secs,
                );
                tracing::debug!(%id, class = %class, "failed while the breaker was open: scheduled again, uncounted");
            }
            Err(e) => {
                tracing::warn!(%id, error = %e, "could not reschedule a message that failed while the breaker was open; its lease will expire and it comes back");
                self.report(&delivery.lane, Settled::Unsettled, handler_secs);
            }
        }
        self.wake.notify_one();
    }

    fn report(&self, lane: &redrive_core::Lane, settled: Settled<'_>, handler_secs: Option<f64>) {
        for o in self.observers.iter() {
            o.settled(&self.queue, lane, settled, handler_secs);
        }
    }

    /// Tells observers how a replayed message's first attempt since its replay went.
    fn report_replay(&self, delivered: &Envelope, error: Option<&str>) {
        if delivered.replays > 0 && delivered.attempt == 0 {
            for o in self.observers.iter() {
                o.replay_settled(delivered, error);
            }
        }
    }

    async fn settle(
        &self,
        delivery: &Delivery<T::Token>,
        outcome: Outcome,
        handler_secs: Option<f64>,
    ) {
        let id = delivery.envelope.id;
        let mut attempt = 0u32;
        loop {
            let failed = match &outcome {
                Outcome::Ok => None,
                Outcome::Failed {
                    failure,
                    retry_after,
                } => Some((failure, *retry_after)),
                // A suspect that could not be isolated is counted like any failure.
                Outcome::Suspect { failure } => Some((failure, None)),
            };
            let result = match failed {
                None => self.transport.ack(delivery).await.map(|()| None),
                Some((failure, retry_after)) => {
                    let mut env = delivery.envelope.clone();
                    env.record_failure(failure.clone(), &delivery.lane.label());
                    let poison = failure.kind == FailureKind::Poison;
                    match self.policy.decide(env.attempt, poison, retry_after) {
                        Step::Retry { tier, delay } => {
                            let due = redrive_core::due_after(delay);
                            env.not_before_ms = Some(due);
                            // Boxed, like every rare path: inline, it would make each
                            // worker's future several kilobytes larger.
                            Box::pin(self.transport.retry(delivery, &tier, due, &env))
                                .await
                                .map(|()| Some((failure, false, env)))
                        }
                        Step::Dead => Box::pin(self.transport.dead_letter(delivery, &env))
                            .await
                            .map(|()| Some((failure, true, env))),
                    }
                }
            };
            match result {
                Ok(None) => {
                    self.report(&delivery.lane, Settled::Ok, handler_secs);
                    self.report_replay(&delivery.envelope, None);
                    tracing::debug!(%id, lane = %delivery.lane.label(), "ok");
                    return;
                }
                Ok(Some((failure, dead, env))) => {
                    let (class, kind, cost) =
                        (failure.class.as_str(), failure.kind, failure.agent.cost);
                    let settled = if dead {
                        Settled::Dead { class, kind, cost }
                    } else {
                        Settled::Retried { class, kind, cost }
                    };
                    self.report(&delivery.lane, settled, handler_secs);
                    self.report_replay(&delivery.envelope, Some(&failure.message));
                    // A retry was scheduled (or a DLQ written): the fetch loop may need
                    // to look sooner than it planned.
                    self.wake.notify_one();
                    if dead {
                        tracing::info!(%id, queue = %env.queue, attempts = env.attempt, class = %failure.class, fingerprint = %failure.fingerprint, "dead-lettered");
                    } else {
                        tracing::debug!(%id, attempt = env.attempt, class = %failure.class, "retry scheduled");
                    }
                    return;
                }
                Err(TransportError::LeaseLost { .. }) => {
                    tracing::warn!(%id, "lease lost before settling: another delivery of this message owns it now");
                    self.report(&delivery.lane, Settled::Unsettled, handler_secs);
                    return;
                }
                Err(e) if attempt < 3 => {
                    attempt += 1;
                    tracing::warn!(%id, error = %e, attempt, "settle failed; trying again");
                    sleep(Duration::from_millis(100 * u64::from(attempt * attempt))).await;
                }
                Err(e) => {
                    tracing::error!(%id, error = %e, "settle failed; the lease will expire and the message will be delivered again");
                    self.report(&delivery.lane, Settled::Unsettled, handler_secs);
                    return;
                }
            }
        }
    }
}

/// One isolation round: runs the isolation lane's due deliveries one at a time, each
/// with no other handler of the process running, until the lane has nothing due.
/// Returns when it next will (unix ms), if the backend knows.
///
/// A delivery from this lane whose previous delivery ended unfinished stopped its
/// consumer while running alone: the crash is counted (see `Worker::run_handler`).
async fn isolation_round<T: Transport, H: Handler>(
    mut worker: Worker<T, H>,
    lanes: LaneSet,
) -> Option<i64> {
    let mut stopping = worker.stopping.subscribe();
    loop {
        // Waiting for the gate may take as long as the process's longest handler: a
        // shutdown meanwhile ends the round (dropping the wait reopens the gate).
        let alone = tokio::select! {
            biased;
            _ = stopping.wait_for(|stop| *stop) => return None,
            alone = GATE.alone() => alone,
        };
        if *stopping.borrow() {
            return None;
        }
        let lease = worker.config.lease;
        let fetched = match worker.transport.fetch_isolated(&lanes, lease).await {
            Ok(fetched) => fetched,
            Err(e) => {
                tracing::warn!(queue = %lanes.queue, error = %e, "could not fetch from the isolation lane; trying again in a second");
                return Some(now_ms() + 1000);
            }
        };
        if fetched.deliveries.is_empty() {
            return fetched.next_due_ms;
        }
        for delivery in &fetched.deliveries {
            worker.alone_runs.fetch_add(1, Ordering::AcqRel);
            tracing::info!(id = %delivery.envelope.id, queue = %lanes.queue, crashed_alone_before = delivery.unfinished_before, "running a crash suspect alone");
            worker.run_handler(delivery).await;
        }
        drop(alone);
    }
}

/// Polls a future and turns a panic inside it into `Err` with the panic's payload, so a
/// panicking handler fails only its own attempt.
struct CatchPanic<'a, F>(Pin<&'a mut F>);

impl<F: Future> Future for CatchPanic<'_, F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// The outcome of a handler's run (or of its panic).
fn outcome_of(result: Result<HandlerResult, Box<dyn std::any::Any + Send>>) -> Outcome {
    match result {
        // The clock is read only for a failure's time.
        Ok(Ok(())) => Outcome::Ok,
        Ok(result) => Outcome::from_result(result, now_ms()),
        Err(panic) => Outcome::panic(&panic_message(panic), now_ms()),
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "the handler panicked with a non-text payload".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{FetchPlan, StartRate, WakeOn, Window};

    /// A window of 50 slots, fetch batch 1,024, nothing running, no `--max-messages`.
    fn window() -> Window {
        Window {
            concurrency: 50,
            ahead: 50,
            fetch_batch: 1024,
            busy: 0,
            waiting: 0,
            incoming: 0,
            remaining: usize::MAX,
            came_back_empty: false,
        }
    }

    #[test]
    fn the_fetch_plan_follows_the_window() {
        let cases: [(&str, Window, FetchPlan); 7] = [
            (
                "idle: room for the slots and one slot's worth ahead",
                window(),
                FetchPlan {
                    room: 100,
                    worth: 25,
                    every_settle: false,
                    wake_on: Some(WakeOn::AtMost(75)),
                },
            ),
            (
                "busy and waiting deliveries take room",
                Window {
                    busy: 50,
                    waiting: 30,
                    ..window()
                },
                FetchPlan {
                    room: 20,
                    worth: 25,
                    every_settle: false,
                    wake_on: Some(WakeOn::AtMost(75)),
                },
            ),
            (
                "what a fetch in flight asked for takes room, and lowers the wake-up",
                Window {
                    busy: 50,
                    incoming: 40,
                    ..window()
                },
                FetchPlan {
                    room: 10,
                    worth: 25,
                    every_settle: false,
                    wake_on: Some(WakeOn::AtMost(35)),
                },
            ),
            (
                "a fast pace fetches ahead up to a fetch batch",
                Window {
                    ahead: 4096,
                    ..window()
                },
                FetchPlan {
                    room: 1024,
                    worth: 512,
                    every_settle: false,
                    wake_on: Some(WakeOn::AtMost(3634)),
                },
            ),
            (
                "--max-messages caps room and worth at what is left",
                Window {
                    remaining: 7,
                    waiting: 3,
                    ..window()
                },
                FetchPlan {
                    room: 4,
                    worth: 4,
                    every_settle: false,
                    wake_on: Some(WakeOn::AtMost(96)),
                },
            ),
            (
                "everything left already leased: every settle wakes the loop",
                Window {
                    remaining: 5,
                    waiting: 5,
                    ..window()
                },
                FetchPlan {
                    room: 0,
                    worth: 1,
                    every_settle: true,
                    wake_on: Some(WakeOn::AnySettle),
                },
            ),
            (
                "the last fetch came back empty: every settle wakes the loop",
                Window {
                    came_back_empty: true,
                    ..window()
                },
                FetchPlan {
                    room: 100,
                    worth: 25,
                    every_settle: true,
                    wake_on: Some(WakeOn::AnySettle),
                },
            ),
        ];
        for (what, w, want) in cases {
            assert_eq!(FetchPlan::new(w), want, "{what}");
        }
    }

    #[test]
    fn no_settle_can_make_room_when_fetches_in_flight_asked_for_it_all() {
        let w = Window {
            ahead: 10,
            concurrency: 10,
            incoming: 30,
            ..window()
        };
        assert_eq!(FetchPlan::new(w).wake_on, None);
    }

    #[test]
    fn fetch_ahead_follows_the_start_rate_between_a_slot_and_a_batch() {
        let at = |per_sec: f64| StartRate {
            per_sec,
            ..StartRate::new()
        };
        let lease = Duration::from_secs(30);
        // (starts per second, deliveries held ahead): one per slot at least, what starts
        // within a second, at most a fetch batch.
        for (per_sec, want) in [(0.0, 50), (49.0, 50), (600.0, 600), (50_000.0, 1024)] {
            assert_eq!(
                at(per_sec).ahead(50, 1024, lease),
                want,
                "{per_sec} starts/s"
            );
        }
        // A short lease shortens the horizon to a quarter of it: 400 ms at 1,000/s.
        assert_eq!(at(1000.0).ahead(50, 1024, Duration::from_millis(1600)), 400);
    }
}
