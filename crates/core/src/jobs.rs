//! Replay jobs as the store keeps them: what a replay was asked to do, the messages it
//! covers (a snapshot taken when it starts), and what became of each one.
//!
//! The job itself is run by `redrive-runner` (it waits, so it needs a timer); consumers
//! report how replayed messages fared through [`ReplayJobs::record_replay_outcomes`].

use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::envelope::MessageId;
use crate::store::StoreError;

/// Where a replay job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Moving messages, or waiting for the outcome of those it moved.
    Running,
    /// Stopped by a person or by its canary / failure-rate check; `resume` goes on.
    Paused,
    /// Every message was moved (or, in an ordered job, held behind one that failed).
    Done,
    /// Stopped for good; what was not moved stays dead.
    Cancelled,
}

impl JobState {
    /// The name stored and shown.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Done => "done",
            Self::Cancelled => "cancelled",
        }
    }

    /// Reads a stored name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(Self::Running),
            "paused" => Some(Self::Paused),
            "done" => Some(Self::Done),
            "cancelled" => Some(Self::Cancelled),
            _ => None,
        }
    }

    /// Whether the job can change no more.
    #[must_use]
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Cancelled)
    }
}

/// What a replay job was asked to do. Written once when it starts, and again when its
/// canaries pass; its state lives beside it (see [`ReplayJobs::set_job_state`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayJob {
    /// Its id (`rj-` and 32 hexadecimal digits, time-ordered).
    pub id: String,
    /// When it was started (unix ms).
    pub created_at_ms: i64,
    /// Who started it.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// The selection, as the audit log names it.
    pub selection: String,
    /// The target queue, when not each message's own.
    pub to: Option<String>,
    /// Messages already replayed this many times stay dead.
    pub max_replays: u32,
    /// How many messages go first, alone, as canaries (0: none).
    pub canary: u64,
    /// Most re-failures tolerated, in percent of the outcomes known (canaries and the
    /// rest alike); more pauses the job.
    pub max_failed_percent: f64,
    /// Each key's messages one at a time, in their original order.
    pub ordered: bool,
    /// Whether the canaries passed, or a person resumed past them.
    pub canary_passed: bool,
    /// Re-failures and outcomes a person chose to go on past (by resuming a job its
    /// failure rate paused): the rate counts only what came after.
    #[serde(default)]
    pub forgiven: (u64, u64),
    /// A single message replayed with its payload edited during triage.
    #[serde(default)]
    pub edited: bool,
    /// Most messages moved per second (none: as fast as the backend takes them).
    #[serde(default)]
    pub rate_per_sec: Option<u32>,
    /// Messages published so far, per target queue.
    #[serde(default)]
    pub moved_by_queue: std::collections::BTreeMap<String, u64>,
}

impl ReplayJob {
    /// A fresh job id: `rj-` and a UUIDv7's 32 hexadecimal digits, time-ordered, so
    /// listings sort by age.
    #[must_use]
    pub fn new_id() -> String {
        format!("rj-{}", MessageId::new().to_string().replace('-', ""))
    }

    /// Whether `failed` of `known` outcomes is more than this job tolerates.
    #[must_use]
    pub fn too_many_failed(&self, failed: u64, known: u64) -> bool {
        known > 0 && failed as f64 * 100.0 > self.max_failed_percent * known as f64
    }
}

/// What became of one message of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemState {
    /// Still dead, not moved yet.
    Pending,
    /// Published back; no outcome reported yet.
    Moved,
    /// Its first attempt after the replay succeeded.
    Ok,
    /// Its first attempt after the replay failed.
    Failed,
    /// Ordered jobs: left dead behind an earlier message of its key that failed again.
    Held,
    /// Not moved: no longer dead, or at its replay limit.
    Skipped,
}

impl ItemState {
    /// The name stored and shown.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Moved => "moved",
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Held => "held",
            Self::Skipped => "skipped",
        }
    }

    /// Reads a stored name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "moved" => Some(Self::Moved),
            "ok" => Some(Self::Ok),
            "failed" => Some(Self::Failed),
            "held" => Some(Self::Held),
            "skipped" => Some(Self::Skipped),
            _ => None,
        }
    }
}

/// One message of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobItem {
    /// Its place in the job: the order messages are moved in (per key, in ordered
    /// jobs).
    pub seq: u64,
    /// The message.
    pub id: MessageId,
    /// Its key; ordered jobs keep each key's order.
    pub key: Option<String>,
    /// Whether it is one of the canaries.
    pub canary: bool,
    /// What became of it.
    pub state: ItemState,
    /// Its replay count once moved (to match the outcome to this replay).
    pub replays: u32,
    /// The new error of a message that failed again, or why it was skipped or held.
    pub detail: String,
    /// Its error when the job started (what it died of before this replay).
    pub was: String,
    /// When its state last changed (unix ms).
    pub at_ms: i64,
}

impl JobItem {
    /// Whether a job's listing shows it: a canary, or one that did not go through
    /// (failed again, held, skipped).
    #[must_use]
    pub fn is_notable(&self) -> bool {
        self.canary
            || matches!(
                self.state,
                ItemState::Failed | ItemState::Held | ItemState::Skipped
            )
    }
}

/// How many of a job's messages are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct JobCounts {
    /// Messages in the job.
    pub total: u64,
    /// Not moved yet.
    pub pending: u64,
    /// Moved, outcome unknown.
    pub moved: u64,
    /// Succeeded after the replay.
    pub ok: u64,
    /// Failed again.
    pub failed: u64,
    /// Held behind a message of their key that failed again.
    pub held: u64,
    /// Skipped.
    pub skipped: u64,
}

impl JobCounts {
    /// Adds `n` messages in `state`.
    pub fn add(&mut self, state: ItemState, n: u64) {
        self.total += n;
        *match state {
            ItemState::Pending => &mut self.pending,
            ItemState::Moved => &mut self.moved,
            ItemState::Ok => &mut self.ok,
            ItemState::Failed => &mut self.failed,
            ItemState::Held => &mut self.held,
            ItemState::Skipped => &mut self.skipped,
        } += n;
    }
}

/// A job with its state and counts, as listings show it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    /// What it was asked to do.
    pub job: ReplayJob,
    /// Where it stands.
    pub state: JobState,
    /// Why it is paused or how it ended, in a sentence.
    pub note: String,
    /// When its state last changed (unix ms).
    pub updated_at_ms: i64,
    /// Its messages per state.
    pub counts: JobCounts,
    /// The process running it now (its lease is current), if any.
    pub runner: Option<String>,
    /// The last process that ran it, whether it still does or not (empty: none yet).
    pub last_runner: String,
}

/// How a replayed message's first attempt after its replay ended, as a consumer
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayOutcome {
    /// The message.
    pub id: MessageId,
    /// Its replay count (the replay this outcome follows).
    pub replays: u32,
    /// `None` when it succeeded; the new error when it failed.
    pub error: Option<String>,
}

/// Replay jobs, kept with the dead letters (every store that keeps dead letters keeps
/// jobs, so a job outlives the process that started it).
pub trait ReplayJobs: Send + Sync + 'static {
    /// Stores a new job (state running) with its messages.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn create_job(
        &self,
        job: &ReplayJob,
        items: &[JobItem],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Rewrites what a job was asked to do (its state is left alone).
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn update_job(&self, job: &ReplayJob) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Moves a job to `to` if its state is one of `from`; returns whether it did.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn set_job_state(
        &self,
        id: &str,
        from: &[JobState],
        to: JobState,
        note: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Takes or renews the right to run a job until `until_ms`: granted when nobody
    /// holds it, `owner` already does, or the holder's lease ran out. `until_ms` 0 gives
    /// it back. Returns whether `owner` holds it now.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn claim_job(
        &self,
        id: &str,
        owner: &str,
        until_ms: i64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// One job (`id` given) or the newest `limit` jobs, with their counts.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn jobs(
        &self,
        id: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<JobView>, StoreError>> + Send;

    /// A job's messages in `seq` order, after `after` (exclusive), at most `limit`.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn job_items(
        &self,
        id: &str,
        after: Option<u64>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<JobItem>, StoreError>> + Send;

    /// Writes the state, replay count and detail of some of a job's messages (by
    /// `seq`).
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn update_job_items(
        &self,
        id: &str,
        items: &[JobItem],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records how replayed messages fared: each one moved by a job, with the same
    /// replay count and no outcome yet, becomes ok or failed. Other reports (a message
    /// replayed outside any job, a second report) change nothing.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn record_replay_outcomes(
        &self,
        outcomes: &[ReplayOutcome],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The jobs that covered a message, oldest first, with what became of it in each.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn replays_of(
        &self,
        id: &MessageId,
    ) -> impl Future<Output = Result<Vec<(ReplayJob, JobItem)>, StoreError>> + Send;
}

/// A consumer's outage breaker that is open, as the consumer reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenBreaker {
    /// The queue.
    pub queue: String,
    /// The consumer (process and host).
    pub consumer: String,
    /// When it opened (unix ms).
    pub since_ms: i64,
    /// When the consumer last said it is still open (unix ms); a consumer that stopped
    /// saying so is gone, and its report stale.
    pub seen_ms: i64,
}

/// How long an open breaker's report holds without being renewed.
pub const BREAKER_REPORT_TTL_MS: i64 = 90_000;

/// Where consumers report their open breakers, so `serve` can show them and page on
/// them: kept with the dead letters, which every process of a deployment shares.
pub trait BreakerBoard: Send + Sync + 'static {
    /// Records that `consumer`'s breaker on `queue` is open (since `since_ms`, still at
    /// `seen_ms`), or with `None` that it closed.
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn report_breaker(
        &self,
        queue: &str,
        consumer: &str,
        open: Option<(i64, i64)>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The breakers open now (reports renewed within [`BREAKER_REPORT_TTL_MS`] of
    /// `now_ms`).
    ///
    /// # Errors
    ///
    /// Fails when the store is unavailable.
    fn open_breakers(
        &self,
        now_ms: i64,
    ) -> impl Future<Output = Result<Vec<OpenBreaker>, StoreError>> + Send;
}
