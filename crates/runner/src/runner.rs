//! The consume loop.
//!
//! One fetch loop leases as many deliveries as there are free handler slots, and one
//! task per delivery runs the handler and settles the outcome. Shutdown stops the
//! fetch loop, lets in-flight handlers finish within a grace period, then releases
//! what is left so it is delivered again without counting an attempt.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redrive_core::{
    Delivery, Envelope, FailureKind, Fetched, LaneSet, LaneStats, Outcome, QueueName, RetryPolicy,
    Step, Transport, TransportError, now_ms,
};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::handler::Handler;
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
    /// Most deliveries leased in one fetch.
    pub fetch_batch: usize,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            concurrency: 8,
            timeout: Duration::from_secs(60),
            lease: Duration::from_secs(30),
            grace: Duration::from_secs(10),
            max_messages: None,
            idle_poll: Duration::from_millis(100),
            fetch_batch: 256,
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
    ///
    /// # Errors
    ///
    /// Fails on an unusable configuration, or when the idle check cannot read depths.
    /// Transport errors while fetching are logged and retried, not returned: a broker
    /// that is down for a while must not stop the consumer.
    pub async fn run<H: Handler>(
        self,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<Summary, RunError> {
        if self.config.concurrency == 0 {
            return Err(RunError::Config(
                "concurrency must be at least 1".to_owned(),
            ));
        }
        if self.config.lease < Duration::from_millis(30) {
            return Err(RunError::Config(
                "the lease must be at least 30ms".to_owned(),
            ));
        }
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        let (abort_tx, abort_rx) = watch::channel(false);
        // What every delivery's task shares: one reference count per message.
        let ctx = Arc::new(JobContext {
            transport: Arc::clone(&self.transport),
            handler,
            policy: self.policy.clone(),
            config: self.config.clone(),
            observers: self.observers.clone(),
            queue: self.lanes.queue.clone(),
            wake: Notify::new(),
            released: AtomicU64::new(0),
        });
        let wake = &ctx.wake;
        let released = &ctx.released;
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut delivered: u64 = 0;
        let mut fetch_errors: u32 = 0;
        let concurrency = self.config.concurrency;
        // Leased deliveries waiting for a free handler slot. Fetching ahead (up to one
        // slot's worth per slot) hides the fetch round trip behind running handlers.
        let mut buffer: VecDeque<Delivery<T::Token>> = VecDeque::new();
        let mut fetching: Option<JoinHandle<Result<Fetched<T::Token>, TransportError>>> = None;
        // An idle check runs beside the loop, so a retry coming due meanwhile is not held
        // up by it; it counts only if nothing was delivered since it started.
        let mut probing: Option<(JoinHandle<Result<bool, TransportError>>, u64)> = None;
        let mut fetch_at = Instant::now();
        tokio::pin!(shutdown);

        let reason = loop {
            if self.config.max_messages.is_some_and(|max| delivered >= max) {
                break "max-messages";
            }
            while tasks.try_join_next().is_some() {}
            let inflight = concurrency - permits.available_permits();
            let remaining = self.config.max_messages.map_or(usize::MAX, |m| {
                usize::try_from(m - delivered).unwrap_or(usize::MAX)
            });
            let room = (2 * concurrency)
                .saturating_sub(inflight + buffer.len())
                .min(self.config.fetch_batch)
                .min(remaining.saturating_sub(buffer.len()));
            // Fetch once a worthwhile batch fits, not as soon as one slot frees: with fast
            // handlers that would be one broker round trip (or one lease write) per
            // message or two.
            let worth = (concurrency.min(self.config.fetch_batch) / 2)
                .clamp(1, remaining.saturating_sub(buffer.len()).max(1));
            if fetching.is_none() && room >= worth && Instant::now() >= fetch_at {
                let transport = Arc::clone(&self.transport);
                let lanes = self.lanes.clone();
                let lease = self.config.lease;
                // A spawned fetch is never abandoned half-way: even at shutdown it is
                // awaited and what it leased is released, so no lease expires unseen
                // (which would count an attempt).
                fetching = Some(tokio::spawn(async move {
                    transport.fetch(&lanes, room, lease).await
                }));
            }
            tokio::select! {
                biased;
                () = &mut shutdown => break "shutdown",
                joined = async { fetching.as_mut().expect("guarded by the branch condition").await }, if fetching.is_some() => {
                    fetching = None;
                    let result = joined.unwrap_or_else(|e| Err(TransportError::Backend { context: "fetch task".into(), source: Box::new(e) }));
                    match result {
                        Ok(fetched) if fetched.deliveries.is_empty() => {
                            fetch_errors = 0;
                            let idle = buffer.is_empty() && permits.available_permits() == concurrency;
                            // A backend that knows when its next message is due is not idle.
                            if idle && fetched.next_due_ms.is_none() && probing.is_none()
                                && let Some(probe) = &self.idle_probe
                            {
                                probing = Some((tokio::spawn(probe(self.lanes.clone())), delivered));
                            }
                            let poll = Instant::now() + self.config.idle_poll;
                            fetch_at = fetched.next_due_ms.map_or(poll, |due| {
                                let wait = u64::try_from(due - now_ms()).unwrap_or(0);
                                poll.min(Instant::now() + Duration::from_millis(wait))
                            });
                        }
                        Ok(fetched) => {
                            fetch_errors = 0;
                            buffer.extend(fetched.deliveries);
                        }
                        Err(e @ TransportError::Misconfigured { .. }) => {
                            // Nothing is in flight yet: backends check their setup on the
                            // first fetch.
                            return Err(RunError::Misconfigured(e));
                        }
                        Err(e) => {
                            fetch_errors = fetch_errors.saturating_add(1);
                            let backoff = Duration::from_millis(100 * 2u64.pow(fetch_errors.min(6)));
                            tracing::warn!(queue = %self.lanes.queue, error = %e, retry_in_ms = backoff.as_millis() as u64, "fetch failed");
                            fetch_at = Instant::now() + backoff;
                        }
                    }
                }
                permit = Arc::clone(&permits).acquire_owned(), if !buffer.is_empty() => {
                    let (Ok(slot), Some(delivery)) = (permit, buffer.pop_front()) else { break "shutdown" };
                    delivered += 1;
                    let job = Job {
                        ctx: Arc::clone(&ctx),
                        abort: abort_rx.clone(),
                    };
                    tasks.spawn(job.run(delivery, slot));
                }
                probed = async { (&mut probing.as_mut().expect("guarded by the branch condition").0).await }, if probing.is_some() => {
                    let since = probing.take().map_or(0, |(_, at)| at);
                    let result = probed.unwrap_or_else(|e| Err(TransportError::Backend { context: "idle check".into(), source: Box::new(e) }));
                    match result {
                        Ok(true) if delivered == since && buffer.is_empty()
                            && permits.available_permits() == concurrency => break "idle",
                        Ok(_) => {}
                        Err(e) => return Err(RunError::Depths(e)),
                    }
                }
                // A settle may have freed room or scheduled a retry: look again.
                () = wake.notified(), if fetching.is_none() => fetch_at = Instant::now(),
                () = sleep_until(fetch_at), if fetching.is_none() && Instant::now() < fetch_at => {}
            }
        };

        // Deliveries fetched but never started go back uncounted.
        if let Some(pending) = fetching.take()
            && let Ok(Ok(fetched)) = pending.await
        {
            buffer.extend(fetched.deliveries);
        }
        for delivery in buffer.drain(..) {
            if let Err(e) = self.transport.release(&delivery).await {
                tracing::warn!(id = %delivery.envelope.id, error = %e, "release failed; the lease will expire instead");
            }
            released.fetch_add(1, Ordering::Relaxed);
        }

        // Graceful drain: in-flight handlers get the grace period, then are released.
        let drained = timeout(self.config.grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(queue = %self.lanes.queue, in_flight = tasks.len(), "grace period over: releasing in-flight deliveries");
            let _ = abort_tx.send(true);
            while tasks.join_next().await.is_some() {}
        }
        Ok(Summary {
            delivered,
            released: released.load(Ordering::Relaxed),
            reason,
        })
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

/// What the deliveries' tasks of one run share.
struct JobContext<T: Transport, H> {
    transport: Arc<T>,
    handler: H,
    policy: RetryPolicy,
    config: RunnerConfig,
    observers: Vec<Arc<dyn Observer>>,
    queue: QueueName,
    /// A settle may have freed room or scheduled a retry.
    wake: Notify,
    /// Deliveries released unfinished.
    released: AtomicU64,
}

/// Everything one delivery's task needs.
struct Job<T: Transport, H> {
    ctx: Arc<JobContext<T, H>>,
    abort: watch::Receiver<bool>,
}

impl<T: Transport, H> std::ops::Deref for Job<T, H> {
    type Target = JobContext<T, H>;

    fn deref(&self) -> &Self::Target {
        &self.ctx
    }
}

impl<T: Transport, H: Handler> Job<T, H> {
    async fn run(mut self, delivery: Delivery<T::Token>, _slot: OwnedSemaphorePermit) {
        let lateness = matches!(delivery.lane, redrive_core::Lane::Retry(_))
            .then(|| now_ms() - delivery.due_ms);
        for o in self.observers.iter() {
            o.delivered(&self.queue, &delivery.lane, lateness);
        }
        let mut handler_secs = None;
        let outcome = if delivery.unfinished_before {
            Outcome::lease_expired(now_ms())
        } else {
            let started = Instant::now();
            let outcome = self.handle(&delivery).await;
            handler_secs = Some(started.elapsed().as_secs_f64());
            match outcome {
                Some(outcome) => outcome,
                None => {
                    // Shutdown's grace period ran out: give the message back unsettled.
                    if let Err(e) = self.transport.release(&delivery).await {
                        tracing::warn!(id = %delivery.envelope.id, error = %e, "release failed; the lease will expire instead");
                    }
                    self.released.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        };
        self.settle(delivery, outcome, handler_secs).await;
        self.wake.notify_one();
    }

    /// Runs the handler with a timeout, panic isolation and a lease heartbeat.
    /// `None` means shutdown aborted it.
    ///
    /// The handler runs inside this task (a panic is caught where it is polled) under
    /// one timer that serves both the heartbeat and the deadline: a task and two timers
    /// per message were most of the runner's own cost.
    async fn handle(&mut self, delivery: &Delivery<T::Token>) -> Option<Outcome> {
        let ctx = Arc::clone(&self.ctx);
        let message: Envelope = delivery.envelope.clone();
        let mut run = CatchPanic(Box::pin(async move { ctx.handler.handle(message).await }));
        let started = Instant::now();
        let deadline = started + self.config.timeout;
        let beat = (self.config.lease / 3).max(Duration::from_millis(10));
        let mut next_beat = started + beat;
        let timer = sleep_until(next_beat.min(deadline));
        tokio::pin!(timer);
        loop {
            tokio::select! {
                result = &mut run => {
                    let at = now_ms();
                    return Some(match result {
                        Ok(result) => Outcome::from_result(result, at),
                        Err(panic) => Outcome::panic(&panic_message(panic), at),
                    });
                }
                () = &mut timer => {
                    if Instant::now() >= deadline {
                        // Dropping the handler's future cancels it.
                        return Some(Outcome::timeout(self.config.timeout, now_ms()));
                    }
                    if let Err(e) = self.transport.extend_lease(delivery, self.config.lease).await {
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

    fn report(&self, lane: &redrive_core::Lane, settled: Settled<'_>, handler_secs: Option<f64>) {
        for o in self.observers.iter() {
            o.settled(&self.queue, lane, settled, handler_secs);
        }
    }

    async fn settle(
        &self,
        delivery: Delivery<T::Token>,
        outcome: Outcome,
        handler_secs: Option<f64>,
    ) {
        let id = delivery.envelope.id;
        let lane = delivery.lane.label();
        let mut attempt = 0u32;
        loop {
            let result = match &outcome {
                Outcome::Ok => self.transport.ack(&delivery).await.map(|()| None),
                Outcome::Failed {
                    failure,
                    retry_after,
                } => {
                    let mut env = delivery.envelope.clone();
                    env.record_failure(failure.clone(), &lane);
                    let poison = failure.kind == FailureKind::Poison;
                    match self.policy.decide(env.attempt, poison, *retry_after) {
                        Step::Retry { tier, delay } => {
                            let due =
                                now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 4);
                            env.not_before_ms = Some(due);
                            self.transport
                                .retry(&delivery, &tier, due, &env)
                                .await
                                .map(|()| Some((failure, false, env)))
                        }
                        Step::Dead => self
                            .transport
                            .dead_letter(&delivery, &env)
                            .await
                            .map(|()| Some((failure, true, env))),
                    }
                }
            };
            match result {
                Ok(None) => {
                    self.report(&delivery.lane, Settled::Ok, handler_secs);
                    tracing::debug!(%id, lane, "ok");
                    return;
                }
                Ok(Some((failure, dead, env))) => {
                    let (class, kind) = (failure.class.as_str(), failure.kind);
                    let settled = if dead {
                        Settled::Dead { class, kind }
                    } else {
                        Settled::Retried { class, kind }
                    };
                    self.report(&delivery.lane, settled, handler_secs);
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

/// Polls a future and turns a panic inside it into `Err` with the panic's payload, so a
/// panicking handler fails only its own attempt.
struct CatchPanic<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchPanic<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
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
