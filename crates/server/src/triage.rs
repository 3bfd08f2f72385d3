//! The server's view of a backend: one object-safe trait over any `Transport` +
//! `DeadLetterStore` pair, so handlers are plain functions instead of being generic
//! over every backend type.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use redrive_core::{
    AuditEntry, Cursor, DeadFilter, DeadGroup, DeadLetter, DeadLetterStore, DeadSelection,
    DeadStats, JobItem, JobState, JobView, LaneStats, MessageId, Pace, QueueDepths, QueueName,
    ReplayJob, ReplayJobs, ReplayOptions, ReplayReport, Transport, replay, replay_edited,
};
use redrive_core::{BreakerBoard, OpenBreaker};
use redrive_runner::{JobOptions, JobSpec};
use tokio::time::Instant;

/// A boxed error from the backend; shown to operators only in the server log.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;
/// A boxed future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send + 'a>>;

/// A replay request, owned so it can cross the trait object.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    /// What to replay.
    pub selection: DeadSelection,
    /// Target queue instead of each message's own.
    pub to: Option<QueueName>,
    /// Report only.
    pub dry_run: bool,
    /// Most messages per second (none: as fast as possible).
    pub rate_per_sec: Option<u32>,
    /// Replay limit.
    pub max_replays: u32,
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: String,
}

/// Everything the triage UI and API need from a backend.
pub trait Triage: Send + Sync + 'static {
    /// Lane depths of every queue.
    fn depths(&self) -> BoxFuture<'_, Vec<QueueDepths>>;
    /// Dead-letter counts per queue and class.
    fn stats(&self) -> BoxFuture<'_, Vec<DeadStats>>;
    /// A page of dead messages.
    fn list(
        &self,
        filter: DeadFilter,
        cursor: Option<Cursor>,
        limit: usize,
    ) -> BoxFuture<'_, Vec<DeadLetter>>;
    /// Groups by fingerprint, largest first, at most `limit`.
    fn groups(&self, filter: DeadFilter, limit: usize) -> BoxFuture<'_, Vec<DeadGroup>>;
    /// How many dead messages match.
    fn count(&self, filter: DeadFilter) -> BoxFuture<'_, u64>;
    /// One dead message.
    fn get(&self, id: MessageId) -> BoxFuture<'_, Option<DeadLetter>>;
    /// Replays a selection.
    fn replay(&self, request: ReplayRequest) -> BoxFuture<'_, ReplayReport>;
    /// Replays one message with a new payload; `None` when it is not dead.
    fn replay_edited(
        &self,
        id: MessageId,
        payload: Vec<u8>,
        request: ReplayRequest,
    ) -> BoxFuture<'_, Option<ReplayReport>>;
    /// Purges a selection.
    fn purge(&self, selection: DeadSelection, actor: String, reason: String) -> BoxFuture<'_, u64>;
    /// The audit log, newest first.
    fn audit(&self, limit: usize) -> BoxFuture<'_, Vec<AuditEntry>>;
    /// Starts a replay job (its snapshot); [`Triage::run_job`] moves it.
    fn start_job(&self, selection: DeadSelection, spec: JobSpec) -> BoxFuture<'_, JobView>;
    /// Runs a job until it is done, paused or cancelled.
    fn run_job(&self, id: String, options: JobOptions) -> BoxFuture<'_, JobView>;
    /// One job or the newest `limit`.
    fn jobs(&self, id: Option<String>, limit: usize) -> BoxFuture<'_, Vec<JobView>>;
    /// A job's messages, at most `limit` after `after`.
    fn job_items(
        &self,
        id: String,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'_, Vec<JobItem>>;
    /// Changes a job's state if it is one of `from`.
    fn set_job_state(
        &self,
        id: String,
        from: Vec<JobState>,
        to: JobState,
        note: String,
    ) -> BoxFuture<'_, bool>;
    /// Sets a paused job running again for `actor` (see `redrive_runner::resume_job`);
    /// `false` when its state does not allow it.
    fn resume_job(&self, id: String, actor: String) -> BoxFuture<'_, bool>;
    /// The jobs that covered a message, with what became of it.
    fn replays_of(&self, id: MessageId) -> BoxFuture<'_, Vec<(ReplayJob, JobItem)>>;
    /// Consumers' outage breakers open now.
    fn open_breakers(&self) -> BoxFuture<'_, Vec<OpenBreaker>>;
}

/// A transport and a store, as one [`Triage`].
#[derive(Debug, Clone)]
pub struct LanesAndStore<T, S> {
    transport: T,
    store: S,
}

impl<T, S> LanesAndStore<T, S> {
    /// Pairs a transport with its dead-letter store.
    pub fn new(transport: T, store: S) -> Self {
        Self { transport, store }
    }
}

/// Paces a replay to a rate with Tokio's timer.
struct Rate {
    per_sec: u32,
    start: Instant,
}

impl Pace for Rate {
    async fn pause(&self, replayed: u64) {
        let due =
            self.start + Duration::from_secs_f64(replayed as f64 / f64::from(self.per_sec.max(1)));
        tokio::time::sleep_until(due).await;
    }
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(e: E) -> BackendError {
    Box::new(e)
}

impl<T, S> Triage for LanesAndStore<T, S>
where
    T: Transport + LaneStats,
    S: DeadLetterStore + ReplayJobs + BreakerBoard,
{
    fn depths(&self) -> BoxFuture<'_, Vec<QueueDepths>> {
        Box::pin(async move { self.transport.depths().await.map_err(boxed) })
    }

    fn stats(&self) -> BoxFuture<'_, Vec<DeadStats>> {
        Box::pin(async move { self.store.stats().await.map_err(boxed) })
    }

    fn list(
        &self,
        filter: DeadFilter,
        cursor: Option<Cursor>,
        limit: usize,
    ) -> BoxFuture<'_, Vec<DeadLetter>> {
        Box::pin(async move {
            self.store
                .list(&filter, cursor.as_ref(), limit)
                .await
                .map_err(boxed)
        })
    }

    fn groups(&self, filter: DeadFilter, limit: usize) -> BoxFuture<'_, Vec<DeadGroup>> {
        Box::pin(async move { self.store.groups(&filter, limit).await.map_err(boxed) })
    }

    fn count(&self, filter: DeadFilter) -> BoxFuture<'_, u64> {
        Box::pin(async move { self.store.count(&filter).await.map_err(boxed) })
    }

    fn get(&self, id: MessageId) -> BoxFuture<'_, Option<DeadLetter>> {
        Box::pin(async move { self.store.get(&id).await.map_err(boxed) })
    }

    fn replay(&self, r: ReplayRequest) -> BoxFuture<'_, ReplayReport> {
        Box::pin(async move {
            if !r.dry_run {
                // A job (so every replay is in its messages' timelines), run here.
                let spec = JobSpec {
                    actor: r.actor.clone(),
                    reason: r.reason.clone(),
                    to: r.to.clone(),
                    max_replays: r.max_replays,
                    canary: redrive_runner::Canary::None,
                    max_failed_percent: 0.0,
                    ordered: false,
                    rate_per_sec: r.rate_per_sec,
                };
                let (_, report) = redrive_runner::replay_as_job(
                    &self.transport,
                    &self.store,
                    &r.selection,
                    &spec,
                    &JobOptions {
                        owner: crate::jobs::server_owner(),
                        ..JobOptions::default()
                    },
                    |_| {},
                )
                .await
                .map_err(boxed)?;
                return Ok(report);
            }
            let options = ReplayOptions {
                to: r.to.as_ref(),
                max_replays: r.max_replays,
                dry_run: r.dry_run,
                actor: &r.actor,
                reason: &r.reason,
                batch: r
                    .rate_per_sec
                    .map_or(500, |rate| rate.clamp(1, 500) as usize),
            };
            let pace = Rate {
                per_sec: r.rate_per_sec.unwrap_or(u32::MAX),
                start: Instant::now(),
            };
            replay(&self.transport, &self.store, &r.selection, &options, &pace)
                .await
                .map_err(boxed)
        })
    }

    fn replay_edited(
        &self,
        id: MessageId,
        payload: Vec<u8>,
        r: ReplayRequest,
    ) -> BoxFuture<'_, Option<ReplayReport>> {
        Box::pin(async move {
            let options = ReplayOptions {
                to: r.to.as_ref(),
                max_replays: r.max_replays,
                dry_run: r.dry_run,
                actor: &r.actor,
                reason: &r.reason,
                ..ReplayOptions::default()
            };
            // Kept as a job of one, so the message's timeline shows the edit and what
            // became of it; written before the publish, so an outcome reported at once
            // finds it.
            let job = match self.store.get(&id).await.map_err(boxed)? {
                Some(dead) if !r.dry_run && dead.envelope.replays < r.max_replays => {
                    Some(record_edit(&self.store, &dead, &r).await.map_err(boxed)?)
                }
                _ => None,
            };
            let result = replay_edited(&self.transport, &self.store, &id, payload, &options).await;
            if let Some(job) = job {
                let (state, note) = match &result {
                    Ok(Some(report)) if report.replayed > 0 => {
                        (JobState::Done, "edited and replayed")
                    }
                    _ => (JobState::Cancelled, "the edited replay did not go out"),
                };
                self.store
                    .set_job_state(&job, &[JobState::Running], state, note)
                    .await
                    .map_err(boxed)?;
            }
            result.map_err(boxed)
        })
    }

    fn purge(&self, selection: DeadSelection, actor: String, reason: String) -> BoxFuture<'_, u64> {
        Box::pin(async move {
            self.store
                .purge(&selection, &actor, &reason)
                .await
                .map_err(boxed)
        })
    }

    fn audit(&self, limit: usize) -> BoxFuture<'_, Vec<AuditEntry>> {
        Box::pin(async move { self.store.audit_log(limit).await.map_err(boxed) })
    }

    fn start_job(&self, selection: DeadSelection, spec: JobSpec) -> BoxFuture<'_, JobView> {
        Box::pin(async move {
            redrive_runner::start_job(&self.store, &selection, &spec)
                .await
                .map_err(boxed)
        })
    }

    fn run_job(&self, id: String, options: JobOptions) -> BoxFuture<'_, JobView> {
        Box::pin(async move {
            redrive_runner::run_job(&self.transport, &self.store, &id, &options, |_| {})
                .await
                .map_err(boxed)
        })
    }

    fn jobs(&self, id: Option<String>, limit: usize) -> BoxFuture<'_, Vec<JobView>> {
        Box::pin(async move { self.store.jobs(id.as_deref(), limit).await.map_err(boxed) })
    }

    fn job_items(
        &self,
        id: String,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'_, Vec<JobItem>> {
        Box::pin(async move { self.store.job_items(&id, after, limit).await.map_err(boxed) })
    }

    fn set_job_state(
        &self,
        id: String,
        from: Vec<JobState>,
        to: JobState,
        note: String,
    ) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            self.store
                .set_job_state(&id, &from, to, &note)
                .await
                .map_err(boxed)
        })
    }

    fn resume_job(&self, id: String, actor: String) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            redrive_runner::resume_job(&self.store, &id, &actor)
                .await
                .map_err(boxed)
        })
    }

    fn replays_of(&self, id: MessageId) -> BoxFuture<'_, Vec<(ReplayJob, JobItem)>> {
        Box::pin(async move { self.store.replays_of(&id).await.map_err(boxed) })
    }

    fn open_breakers(&self) -> BoxFuture<'_, Vec<OpenBreaker>> {
        Box::pin(async move {
            self.store
                .open_breakers(redrive_core::now_ms())
                .await
                .map_err(boxed)
        })
    }
}

/// Stores a job of one for an edited replay of `dead`: its message moved (at the replay
/// count the replay will give it). Returns the job's id.
async fn record_edit<S: ReplayJobs>(
    store: &S,
    dead: &DeadLetter,
    r: &ReplayRequest,
) -> Result<String, redrive_core::StoreError> {
    let env = &dead.envelope;
    let now = redrive_core::now_ms();
    let job = ReplayJob {
        id: ReplayJob::new_id(),
        created_at_ms: now,
        actor: r.actor.clone(),
        reason: r.reason.clone(),
        selection: format!("message {}", env.id),
        to: r.to.as_ref().map(ToString::to_string),
        max_replays: r.max_replays,
        canary: 0,
        max_failed_percent: 0.0,
        ordered: false,
        canary_passed: true,
        forgiven: (0, 0),
        edited: true,
        rate_per_sec: None,
        moved_by_queue: Default::default(),
    };
    let item = JobItem {
        seq: 0,
        id: env.id,
        key: env.key.clone(),
        canary: false,
        state: redrive_core::ItemState::Moved,
        replays: env.replays + 1,
        detail: String::new(),
        was: env
            .last_failure()
            .map(|f| redrive_core::truncate_utf8(&f.message, 512).to_owned())
            .unwrap_or_default(),
        at_ms: now,
    };
    store.create_job(&job, &[item]).await?;
    Ok(job.id)
}
