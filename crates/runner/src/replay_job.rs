//! Replay jobs: a replay that moves dead messages back in steps and watches how they
//! fare, instead of all at once.
//!
//! A job is a snapshot of the selected dead messages, kept in the store with what became
//! of each. It can send a few messages first as canaries and go on only if they
//! succeed, pause when too many of the rest fail again, and, when ordered, move each
//! key's messages one at a time in their original order, each only after the one before
//! it succeeded. It learns outcomes from consumers: a consumer with a
//! [`ReplayReporter`] writes how each replayed message's first attempt went.
//!
//! Every step is written before it is taken, so a job stopped at any point (a crash, a
//! `pause`) resumes where it was: a message marked moved but still dead is moved again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redrive_core::{
    DeadLetterStore, DeadSelection, Envelope, ItemState, JobItem, JobState, JobView, QueueName,
    ReplayError, ReplayJob, ReplayJobs, ReplayOptions, ReplayOutcome, StoreError, Transport,
    now_ms,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::observer::Observer;

/// How a job runs.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// How often the job looks for outcomes and pause requests.
    pub poll: Duration,
    /// How long moved messages may go without any outcome before the job pauses (no
    /// consumer is running, or it does not report).
    pub outcome_wait: Duration,
    /// Most messages moved and not yet settled at any time in a job with canaries, once
    /// they passed: the job starts at the canaries' number, widens as outcomes come
    /// back, and never runs further ahead of its consumers than this, so its failure
    /// rate can still pause it.
    pub window: usize,
    /// Who runs it (shown while it runs): one process at a time holds a job.
    pub owner: String,
}

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(100),
            outcome_wait: Duration::from_secs(600),
            window: 2_000,
            owner: this_process("redrive"),
        }
    }
}

/// How long a job stays held by a process that stopped renewing its hold (it renews
/// every third of that).
const LEASE: Duration = Duration::from_secs(10);

/// What a new job covers and how it moves.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Who starts it.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// The target queue, when not each message's own.
    pub to: Option<QueueName>,
    /// Messages already replayed this many times stay dead.
    pub max_replays: u32,
    /// Canaries: a number of messages, or a percentage of the selection.
    pub canary: Canary,
    /// Most re-failures tolerated, in percent of the outcomes known.
    pub max_failed_percent: f64,
    /// Each key's messages one at a time, in their original order.
    pub ordered: bool,
    /// Most messages moved per second (none: as fast as the backend takes them).
    pub rate_per_sec: Option<u32>,
}

/// Most messages one step of a job moves: a plain job shows progress, and can be
/// paused, every this many.
const STEP_MAX: usize = 5_000;

/// How many canaries a job sends first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Canary {
    /// None: the job moves everything at once (ordered jobs still go key by key).
    None,
    /// This many messages.
    Count(u64),
    /// This percentage of the selection, at least one message.
    Percent(f64),
}

/// Takes the snapshot of a new job: the selected dead messages, their order and the
/// canaries. Returns the job, stored and running; [`run_job`] moves it.
///
/// Messages move in the order they died; in an ordered job, each key's in the order of
/// their ids, which redrive gives in time order (the order they were first published).
///
/// # Errors
///
/// Fails when the store cannot be read or written.
pub async fn start_job<S: DeadLetterStore + ReplayJobs>(
    store: &S,
    selection: &DeadSelection,
    spec: &JobSpec,
) -> Result<JobView, StoreError> {
    // Each message's id, key and the error it died of.
    let mut picked: Vec<(redrive_core::MessageId, Option<String>, String)> = Vec::new();
    let was = |env: &Envelope| {
        env.last_failure()
            .map(|f| redrive_core::truncate_utf8(&f.message, 512).to_owned())
            .unwrap_or_default()
    };
    match selection {
        DeadSelection::Ids(ids) => {
            for id in ids {
                if let Some(dead) = store.get(id).await? {
                    let w = was(&dead.envelope);
                    picked.push((dead.envelope.id, dead.envelope.key, w));
                }
            }
        }
        DeadSelection::Filter(filter) => {
            let mut cursor = None;
            loop {
                let page = store.list(filter, cursor.as_ref(), 1000).await?;
                let Some(last) = page.last() else { break };
                cursor = Some(redrive_core::Cursor {
                    dead_at_ms: last.dead_at_ms,
                    id: last.envelope.id,
                });
                picked.extend(page.into_iter().map(|d| {
                    let w = was(&d.envelope);
                    (d.envelope.id, d.envelope.key, w)
                }));
            }
        }
    }
    if spec.ordered {
        picked.sort_by_key(|p| p.0);
    }
    let canaries = match spec.canary {
        Canary::None => 0,
        Canary::Count(n) => n.min(picked.len() as u64),
        // At least one of a selection that has any.
        Canary::Percent(p) => ((picked.len() as f64 * p / 100.0).ceil() as u64)
            .max(1)
            .min(picked.len() as u64),
    };
    let now = now_ms();
    let mut items: Vec<JobItem> = picked
        .into_iter()
        .enumerate()
        .map(|(seq, (id, key, was))| JobItem {
            seq: seq as u64,
            id,
            key,
            canary: false,
            state: ItemState::Pending,
            replays: 0,
            detail: String::new(),
            was,
            at_ms: now,
        })
        .collect();
    // Canaries: the first messages, or in an ordered job the first of as many keys.
    let mut chosen = 0;
    let mut keys_seen = std::collections::HashSet::new();
    for item in &mut items {
        if chosen >= canaries {
            break;
        }
        if !spec.ordered || keys_seen.insert(order_key(item)) {
            item.canary = true;
            chosen += 1;
        }
    }
    let job = ReplayJob {
        id: ReplayJob::new_id(),
        created_at_ms: now,
        actor: spec.actor.clone(),
        reason: spec.reason.clone(),
        selection: selection.describe(),
        to: spec.to.as_ref().map(ToString::to_string),
        max_replays: spec.max_replays,
        canary: chosen,
        max_failed_percent: spec.max_failed_percent,
        ordered: spec.ordered,
        canary_passed: chosen == 0,
        forgiven: (0, 0),
        edited: false,
        rate_per_sec: spec.rate_per_sec,
        moved_by_queue: Default::default(),
    };
    store.create_job(&job, &items).await?;
    view(store, &job.id).await
}

/// A message without a key is ordered with nothing else: its id stands for its key.
fn order_key(item: &JobItem) -> String {
    match &item.key {
        Some(k) => format!("k:{k}"),
        None => format!("i:{}", item.id),
    }
}

async fn view<S: ReplayJobs>(store: &S, id: &str) -> Result<JobView, StoreError> {
    store
        .jobs(Some(id), 1)
        .await?
        .pop()
        .ok_or_else(|| StoreError::Backend {
            context: format!("replay job {id}"),
            source: "no such job".into(),
        })
}

async fn all_items<S: ReplayJobs>(store: &S, id: &str) -> Result<Vec<JobItem>, StoreError> {
    let mut items = Vec::new();
    loop {
        let page = store
            .job_items(id, items.last().map(|i: &JobItem| i.seq), 10_000)
            .await?;
        if page.is_empty() {
            return Ok(items);
        }
        items.extend(page);
    }
}

fn lease_until() -> i64 {
    now_ms() + i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX / 4)
}

fn held_elsewhere(id: &str, v: Option<JobView>) -> ReplayError {
    let by = v
        .and_then(|v| v.runner)
        .unwrap_or_else(|| "another process".to_owned());
    ReplayError::Store(StoreError::Backend {
        context: format!("replay job {id}"),
        source: format!(
            "it is being run by {by} (if that process is gone, its hold runs out within {} s)",
            LEASE.as_secs()
        )
        .into(),
    })
}

/// Runs a job until it is done, paused (by its checks or by someone) or cancelled, and
/// returns how it stands then. `progress` is called each round with the job's view.
/// One process at a time runs a job: it holds it with a lease it renews, and gives it
/// back when it returns.
///
/// # Errors
///
/// Fails when another process runs the job, or the store or the transport fails; the
/// job stays running and a second `run_job` resumes it.
pub async fn run_job<T, S>(
    transport: &T,
    store: &S,
    id: &str,
    options: &JobOptions,
    progress: impl FnMut(&JobView),
) -> Result<JobView, ReplayError>
where
    T: Transport,
    S: DeadLetterStore + ReplayJobs,
{
    if !store.claim_job(id, &options.owner, lease_until()).await? {
        return Err(held_elsewhere(id, store.jobs(Some(id), 1).await?.pop()));
    }
    let result = drive(transport, store, id, options, progress).await;
    if let Err(e) = store.claim_job(id, &options.owner, 0).await {
        tracing::warn!(job = id, error = %e, "could not give a replay job back; its hold runs out in 10 s");
    }
    // Given back: nobody runs it now.
    result.map(|v| JobView { runner: None, ..v })
}

async fn drive<T, S>(
    transport: &T,
    store: &S,
    id: &str,
    options: &JobOptions,
    mut progress: impl FnMut(&JobView),
) -> Result<JobView, ReplayError>
where
    T: Transport,
    S: DeadLetterStore + ReplayJobs,
{
    recover(store, &view(store, id).await?.job).await?;
    let mut last_change = Instant::now();
    let mut last_settled = u64::MAX;
    let mut renewed = Instant::now();
    let mut waiting_on: Option<(redrive_core::JobCounts, ReplayJob)> = None;
    let began = Instant::now();
    let mut moved_here = 0u64;
    loop {
        if renewed.elapsed() >= LEASE / 3 {
            if !store.claim_job(id, &options.owner, lease_until()).await? {
                return Err(held_elsewhere(id, store.jobs(Some(id), 1).await?.pop()));
            }
            renewed = Instant::now();
        }
        let v = view(store, id).await?;
        progress(&v);
        if v.state != JobState::Running {
            return Ok(v);
        }
        let settled = v.counts.ok + v.counts.failed;
        if settled != last_settled {
            last_settled = settled;
            last_change = Instant::now();
        }
        // Waiting, with nothing changed since (no outcome, no edit of the job), the
        // step is the same: the messages are not read again.
        let unchanged = waiting_on.as_ref() == Some(&(v.counts, v.job.clone()));
        let step = if unchanged {
            Step::Wait
        } else {
            let items = all_items(store, id).await?;
            next_step(&v, &items, options.window)
        };
        waiting_on = (step == Step::Wait).then(|| (v.counts, v.job.clone()));
        match step {
            Step::Move(batch) => {
                let report = move_items(transport, store, &v.job, batch).await?;
                if report.replayed > 0 {
                    let mut job = v.job.clone();
                    for (queue, n) in &report.by_queue {
                        *job.moved_by_queue.entry(queue.clone()).or_default() += n;
                    }
                    store.update_job(&job).await?;
                    // Paced: no faster than the rate since this run began.
                    if let Some(rate) = job.rate_per_sec {
                        moved_here += report.replayed;
                        let due =
                            Duration::from_secs_f64(moved_here as f64 / f64::from(rate.max(1)));
                        tokio::time::sleep(due.saturating_sub(began.elapsed())).await;
                    }
                }
                last_change = Instant::now();
                continue;
            }
            Step::Finish(state, note) => {
                store
                    .set_job_state(id, &[JobState::Running], state, &note)
                    .await?;
                continue;
            }
            Step::CanariesPassed => {
                let mut job = v.job.clone();
                job.canary_passed = true;
                store.update_job(&job).await?;
                continue;
            }
            Step::Wait => {}
        }
        if v.counts.moved > 0 && last_change.elapsed() >= options.outcome_wait {
            let note = format!(
                "no outcome for {} moved message(s) in {}: is a consumer running on their queue, reporting replays?",
                v.counts.moved,
                redrive_core::format_duration(options.outcome_wait)
            );
            store
                .set_job_state(id, &[JobState::Running], JobState::Paused, &note)
                .await?;
            continue;
        }
        tokio::time::sleep(options.poll).await;
    }
}

/// Sorts out what a job stopped mid-step (a crash, a kill) left behind. A message is
/// marked moved, then published, then marked replayed in the store; stopped between
/// those, it is still dead at its old replay count:
///
/// - with an outcome already (a consumer handled it), it was published: its stale dead
///   copy is marked replayed now, as the step would have;
/// - moved, with no outcome yet, it may or may not have been published: it goes back to
///   pending and is moved again (at least once, as every replay).
async fn recover<S: DeadLetterStore + ReplayJobs>(
    store: &S,
    job: &ReplayJob,
) -> Result<(), StoreError> {
    let id = job.id.as_str();
    let mut back = Vec::new();
    let mut published = Vec::new();
    for mut item in all_items(store, id).await? {
        if !matches!(
            item.state,
            ItemState::Moved | ItemState::Ok | ItemState::Failed
        ) || item.replays == 0
        {
            continue;
        }
        let Some(dead) = store.get(&item.id).await? else {
            continue;
        };
        if dead.envelope.replays >= item.replays {
            continue;
        }
        if item.state == ItemState::Moved {
            item.state = ItemState::Pending;
            item.at_ms = now_ms();
            back.push(item);
        } else {
            published.push(item.id);
        }
    }
    if !published.is_empty() {
        tracing::info!(
            job = id,
            messages = published.len(),
            "marking replayed what a stopped job had published"
        );
        store
            .mark_replayed(
                &published,
                &job.actor,
                &format!("replay job {id}: published before it was interrupted"),
            )
            .await?;
    }
    if !back.is_empty() {
        tracing::info!(
            job = id,
            messages = back.len(),
            "moving again what a stopped job may not have published"
        );
        store.update_job_items(id, &back).await?;
    }
    Ok(())
}

#[derive(Debug, PartialEq)]
enum Step {
    Move(Vec<JobItem>),
    Finish(JobState, String),
    CanariesPassed,
    Wait,
}

/// What a running job does next, given its messages.
fn next_step(v: &JobView, items: &[JobItem], window: usize) -> Step {
    let job = &v.job;
    if !job.canary_passed {
        let canaries: Vec<&JobItem> = items.iter().filter(|i| i.canary).collect();
        let pending: Vec<JobItem> = canaries
            .iter()
            .filter(|i| i.state == ItemState::Pending)
            .map(|i| (*i).clone())
            .collect();
        if !pending.is_empty() {
            return Step::Move(pending);
        }
        if canaries.iter().any(|i| i.state == ItemState::Moved) {
            return Step::Wait;
        }
        let failed: Vec<&&JobItem> = canaries
            .iter()
            .filter(|i| i.state == ItemState::Failed)
            .collect();
        let known = canaries
            .iter()
            .filter(|i| matches!(i.state, ItemState::Ok | ItemState::Failed))
            .count() as u64;
        if job.too_many_failed(failed.len() as u64, known) {
            let first = failed.first().map_or("", |i| i.detail.as_str());
            return Step::Finish(
                JobState::Paused,
                format!(
                    "{} of {} canaries failed again (first new error: {}); the rest stay dead",
                    failed.len(),
                    canaries.len(),
                    redrive_core::truncate_utf8(first, 300)
                ),
            );
        }
        return Step::CanariesPassed;
    }
    // Past the canaries, a job that has them keeps watching the failure rate of the
    // rest (the canaries were judged already), from where a person last resumed it.
    if job.canary > 0 {
        let (failed, known) = rest_outcomes(items);
        let (failed, known) = (
            failed.saturating_sub(job.forgiven.0),
            known.saturating_sub(job.forgiven.1),
        );
        if job.too_many_failed(failed, known) {
            return Step::Finish(
                JobState::Paused,
                format!(
                    "{failed} of {known} replayed messages failed again, more than the {}% allowed; the rest stay dead",
                    job.max_failed_percent
                ),
            );
        }
    }
    if job.ordered {
        return ordered_step(items);
    }
    let outstanding = items.iter().filter(|i| i.state == ItemState::Moved).count();
    // A job with canaries widens as outcomes come back (as many in flight as have
    // settled, at least the canaries' number): a fix that breaks later on fails a few
    // messages before the failure rate pauses it, not a whole window.
    let limit = if job.canary > 0 {
        let settled = (v.counts.ok + v.counts.failed) as usize;
        settled.max(job.canary as usize).min(window)
    } else {
        usize::MAX
    };
    let per_step = job
        .rate_per_sec
        .map_or(STEP_MAX, |r| (r as usize).clamp(1, STEP_MAX));
    let room = limit.saturating_sub(outstanding).min(per_step);
    let batch: Vec<JobItem> = items
        .iter()
        .filter(|i| i.state == ItemState::Pending)
        .take(room)
        .cloned()
        .collect();
    if !batch.is_empty() {
        return Step::Move(batch);
    }
    // A job with canaries also waits for its last outcomes: they may still pause it.
    if items.iter().any(|i| i.state == ItemState::Pending) || (job.canary > 0 && outstanding > 0) {
        return Step::Wait;
    }
    Step::Finish(JobState::Done, done_note(items))
}

/// Sets a paused job (or a running one nobody runs) running again for `actor`; returns
/// whether its state allowed it. Resuming a job its checks paused is a person's
/// decision to go on: past canaries already judged (ones still on their way, after a
/// pause for want of a consumer, are waited for as before), and past the re-failures
/// seen so far (the rate counts from here).
///
/// # Errors
///
/// Fails when the store is unavailable or has no such job.
pub async fn resume_job<S: ReplayJobs>(
    store: &S,
    id: &str,
    actor: &str,
) -> Result<bool, StoreError> {
    let v = view(store, id).await?;
    let note = format!("resumed by {actor}");
    if !store
        .set_job_state(
            id,
            &[JobState::Paused, JobState::Running],
            JobState::Running,
            &note,
        )
        .await?
    {
        return Ok(false);
    }
    if v.state == JobState::Paused {
        let items = all_items(store, id).await?;
        let mut job = v.job;
        job.canary_passed |= items
            .iter()
            .filter(|i| i.canary)
            .all(|i| !matches!(i.state, ItemState::Pending | ItemState::Moved));
        job.forgiven = rest_outcomes(&items);
        store.update_job(&job).await?;
    }
    Ok(true)
}

/// How this process names itself as a job's runner or a breaker's consumer:
/// `ROLE (pid N on HOST)`.
#[must_use]
pub fn this_process(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    format!("{role} (pid {} on {host})", std::process::id())
}

/// Re-failures and known outcomes among the messages that are not canaries.
fn rest_outcomes(items: &[JobItem]) -> (u64, u64) {
    let rest = items.iter().filter(|i| !i.canary);
    let failed = rest
        .clone()
        .filter(|i| i.state == ItemState::Failed)
        .count() as u64;
    let known = rest
        .filter(|i| matches!(i.state, ItemState::Ok | ItemState::Failed))
        .count() as u64;
    (failed, known)
}

/// Ordered: per key, the first message not yet succeeded decides. Pending, it moves;
/// moved, the key waits; failed, the key's later messages are held.
fn ordered_step(items: &[JobItem]) -> Step {
    let mut by_key: HashMap<String, Vec<&JobItem>> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    for item in items {
        let k = order_key(item);
        by_key
            .entry(k.clone())
            .or_insert_with(|| {
                order.push(k);
                Vec::new()
            })
            .push(item);
    }
    let mut moves = Vec::new();
    let mut holds = Vec::new();
    let mut waiting = false;
    for k in &order {
        let key_items = &by_key[k];
        let Some(pos) = key_items
            .iter()
            .position(|i| !matches!(i.state, ItemState::Ok | ItemState::Skipped))
        else {
            continue;
        };
        let head = key_items[pos];
        match head.state {
            ItemState::Pending => moves.push(head.clone()),
            ItemState::Moved => waiting = true,
            ItemState::Failed | ItemState::Held => {
                let blocker = if head.state == ItemState::Failed {
                    head.id.to_string()
                } else {
                    head.detail.clone()
                };
                for later in &key_items[pos + 1..] {
                    if later.state == ItemState::Pending {
                        let mut held = (*later).clone();
                        held.state = ItemState::Held;
                        held.detail = if head.state == ItemState::Failed {
                            format!("held behind {blocker}, which failed again")
                        } else {
                            blocker.clone()
                        };
                        held.at_ms = now_ms();
                        holds.push(held);
                    }
                }
            }
            ItemState::Ok | ItemState::Skipped => {}
        }
    }
    if !holds.is_empty() {
        // Written as a move of nothing: `move_items` stores them and publishes none.
        holds.extend(moves);
        return Step::Move(holds);
    }
    if !moves.is_empty() {
        return Step::Move(moves);
    }
    if waiting {
        return Step::Wait;
    }
    Step::Finish(JobState::Done, done_note(items))
}

fn done_note(items: &[JobItem]) -> String {
    let count = |s: ItemState| items.iter().filter(|i| i.state == s).count();
    let (held, failed, skipped) = (
        count(ItemState::Held),
        count(ItemState::Failed),
        count(ItemState::Skipped),
    );
    let mut note = format!("{} message(s) replayed", items.len() - held - skipped);
    if failed > 0 {
        note.push_str(&format!(", {failed} failed again"));
    }
    if held > 0 {
        note.push_str(&format!(
            ", {held} held (still dead) behind a message of their key that failed again"
        ));
    }
    if skipped > 0 {
        note.push_str(&format!(", {skipped} skipped (no longer dead)"));
    }
    note
}

/// Moves a step's messages: marks them moved first (so an outcome reported at once
/// finds them), then publishes them; held ones are only written.
async fn move_items<T, S>(
    transport: &T,
    store: &S,
    job: &ReplayJob,
    batch: Vec<JobItem>,
) -> Result<redrive_core::ReplayReport, ReplayError>
where
    T: Transport,
    S: DeadLetterStore + ReplayJobs,
{
    let now = now_ms();
    let mut write = Vec::with_capacity(batch.len());
    let mut letters = Vec::new();
    for mut item in batch {
        item.at_ms = now;
        if item.state == ItemState::Held {
            write.push(item);
            continue;
        }
        match store.get(&item.id).await? {
            None => {
                item.state = ItemState::Skipped;
                item.detail = "no longer dead (replayed or purged meanwhile)".to_owned();
            }
            Some(dead) if dead.envelope.replays >= job.max_replays => {
                item.state = ItemState::Failed;
                item.detail = format!(
                    "{OVER_LIMIT} {} times, the job's limit",
                    dead.envelope.replays
                );
            }
            Some(dead) => {
                item.state = ItemState::Moved;
                item.replays = dead.envelope.replays + 1;
                item.detail.clear();
                letters.push(dead);
            }
        }
        write.push(item);
    }
    store.update_job_items(&job.id, &write).await?;
    if letters.is_empty() {
        return Ok(redrive_core::ReplayReport::default());
    }
    redrive_core::failpoint("job-step-marked");
    let to = job
        .to
        .as_deref()
        .map(QueueName::new)
        .transpose()
        .map_err(|e| {
            ReplayError::Store(StoreError::Backend {
                context: format!("replay job {}", job.id),
                source: Box::new(e),
            })
        })?;
    // The audit log keeps the person's reason as they gave it; the job has the rest.
    let reason = if job.reason.is_empty() {
        format!("replay job {}", job.id)
    } else {
        job.reason.clone()
    };
    let options = ReplayOptions {
        to: to.as_ref(),
        max_replays: job.max_replays,
        actor: &job.actor,
        reason: &reason,
        ..ReplayOptions::default()
    };
    // Read once, above: published as read.
    let result = redrive_core::replay_dead(transport, store, letters, &options).await;
    result.inspect_err(|e| {
        // Nothing of this step is known to be out: it goes again on resume, where
        // `recover` sorts out what was published.
        tracing::warn!(job = %job.id, error = %e, "a replay job's step failed");
    })
}

/// A plain replay as a job: takes the snapshot, moves everything (in steps, paced if
/// the spec has a rate) and returns the job with what a plain replay reports: matched,
/// published per target queue, and the messages left dead at their replay limit. Kept
/// as a job, the replay is in each message's timeline and its outcomes are recorded.
///
/// # Errors
///
/// As [`start_job`] and [`run_job`].
pub async fn replay_as_job<T, S>(
    transport: &T,
    store: &S,
    selection: &DeadSelection,
    spec: &JobSpec,
    options: &JobOptions,
    progress: impl FnMut(&JobView),
) -> Result<(JobView, redrive_core::ReplayReport), ReplayError>
where
    T: Transport,
    S: DeadLetterStore + ReplayJobs,
{
    let spec = JobSpec {
        canary: Canary::None,
        ordered: false,
        ..spec.clone()
    };
    let started = start_job(store, selection, &spec).await?;
    let v = run_job(transport, store, &started.job.id, options, progress).await?;
    let mut over_limit = Vec::new();
    let mut after = None;
    loop {
        let page = store.job_items(&v.job.id, after, 10_000).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        over_limit.extend(
            page.iter()
                .filter(|i| i.state == ItemState::Failed && i.detail.starts_with(OVER_LIMIT))
                .map(|i| i.id),
        );
    }
    let report = redrive_core::ReplayReport {
        matched: v.counts.total,
        replayed: v.job.moved_by_queue.values().sum(),
        over_limit,
        by_queue: v
            .job
            .moved_by_queue
            .iter()
            .map(|(q, n)| (q.clone(), *n))
            .collect(),
    };
    Ok((v, report))
}

/// How the detail of a message left dead at its replay limit begins.
const OVER_LIMIT: &str = "stayed dead: already replayed";

/// Reports how replayed messages fare to the store, for the replay jobs waiting on
/// them. Add it to a runner with [`crate::Runner::observe`]; call [`Self::close`] when
/// the runner has stopped, so the last outcomes are written.
pub struct ReplayReporter {
    tx: Mutex<Option<mpsc::UnboundedSender<ReplayOutcome>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl ReplayReporter {
    /// Starts the task that writes outcomes to `store`, in batches.
    pub fn new<S: ReplayJobs + Clone>(store: S) -> Arc<Self> {
        let (tx, mut rx) = mpsc::unbounded_channel::<ReplayOutcome>();
        let task = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < 512 {
                    match rx.try_recv() {
                        Ok(o) => batch.push(o),
                        Err(_) => break,
                    }
                }
                for attempt in 1..=3u64 {
                    match store.record_replay_outcomes(&batch).await {
                        Ok(()) => break,
                        Err(e) if attempt < 3 => {
                            tracing::warn!(error = %e, attempt, "could not record replay outcomes; trying again");
                            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                        }
                        Err(e) => tracing::error!(error = %e, outcomes = batch.len(),
                            "could not record replay outcomes; replay jobs waiting on them will pause"),
                    }
                }
            }
        });
        Arc::new(Self {
            tx: Mutex::new(Some(tx)),
            task: Mutex::new(Some(task)),
        })
    }

    /// Writes what is still queued and stops the writer.
    pub async fn close(&self) {
        drop(self.tx.lock().ok().and_then(|mut t| t.take()));
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Observer for ReplayReporter {
    fn replay_settled(&self, envelope: &Envelope, error: Option<&str>) {
        let outcome = ReplayOutcome {
            id: envelope.id,
            replays: envelope.replays,
            error: error.map(str::to_owned),
        };
        if let Ok(tx) = self.tx.lock()
            && let Some(tx) = tx.as_ref()
        {
            let _ = tx.send(outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use redrive_core::{JobCounts, MessageId};

    use super::*;

    fn job(canary: u64, ordered: bool) -> ReplayJob {
        ReplayJob {
            id: "rj-test".into(),
            created_at_ms: 0,
            actor: "test".into(),
            reason: String::new(),
            selection: String::new(),
            to: None,
            max_replays: 5,
            canary,
            max_failed_percent: 0.0,
            ordered,
            canary_passed: canary == 0,
            forgiven: (0, 0),
            edited: false,
            rate_per_sec: None,
            moved_by_queue: Default::default(),
        }
    }

    fn items(keys: &[&str], canaries: usize) -> Vec<JobItem> {
        keys.iter()
            .enumerate()
            .map(|(n, k)| JobItem {
                seq: n as u64,
                id: MessageId::new(),
                key: Some((*k).to_owned()),
                canary: n < canaries,
                state: ItemState::Pending,
                replays: 0,
                detail: String::new(),
                was: String::new(),
                at_ms: 0,
            })
            .collect()
    }

    fn view(job: ReplayJob, items: &[JobItem]) -> JobView {
        let mut counts = JobCounts::default();
        for i in items {
            counts.add(i.state, 1);
        }
        JobView {
            job,
            state: JobState::Running,
            note: String::new(),
            updated_at_ms: 0,
            counts,
            runner: None,
            last_runner: String::new(),
        }
    }

    fn moved(step: &Step) -> Vec<u64> {
        match step {
            Step::Move(batch) => batch
                .iter()
                .filter(|i| i.state != ItemState::Held)
                .map(|i| i.seq)
                .collect(),
            other => panic!("expected a move, got {other:?}"),
        }
    }

    #[test]
    fn canaries_go_alone_and_decide() {
        let mut all = items(&["a"; 10], 2);
        let j = job(2, false);
        assert_eq!(moved(&next_step(&view(j.clone(), &all), &all, 500)), [0, 1]);
        all[0].state = ItemState::Moved;
        all[1].state = ItemState::Moved;
        assert_eq!(next_step(&view(j.clone(), &all), &all, 500), Step::Wait);
        all[0].state = ItemState::Ok;
        all[1].state = ItemState::Failed;
        match next_step(&view(j.clone(), &all), &all, 500) {
            Step::Finish(JobState::Paused, note) => {
                assert!(note.contains("1 of 2 canaries"), "{note}")
            }
            other => panic!("{other:?}"),
        }
        all[1].state = ItemState::Ok;
        assert_eq!(next_step(&view(j, &all), &all, 500), Step::CanariesPassed);
    }

    #[test]
    fn after_the_canaries_the_job_widens_with_outcomes_and_pauses_on_a_failure() {
        let mut all = items(&["a"; 20], 2);
        let mut j = job(2, false);
        j.canary_passed = true;
        all[0].state = ItemState::Ok;
        all[1].state = ItemState::Ok;
        // Two settled: two in flight.
        assert_eq!(moved(&next_step(&view(j.clone(), &all), &all, 500)), [2, 3]);
        for i in &mut all[2..4] {
            i.state = ItemState::Ok;
        }
        // Four settled: four in flight, and at most the window.
        assert_eq!(
            moved(&next_step(&view(j.clone(), &all), &all, 500)),
            [4, 5, 6, 7]
        );
        assert_eq!(
            moved(&next_step(&view(j.clone(), &all), &all, 3)),
            [4, 5, 6]
        );
        all[4].state = ItemState::Failed;
        assert!(matches!(
            next_step(&view(j.clone(), &all), &all, 500),
            Step::Finish(JobState::Paused, _)
        ));
        // A person went on past that failure: it no longer counts.
        j.forgiven = rest_outcomes(&all);
        assert!(matches!(
            next_step(&view(j, &all), &all, 500),
            Step::Move(_)
        ));
    }

    #[test]
    fn ordered_keys_move_one_at_a_time_and_a_failure_holds_only_its_key() {
        let mut all = items(&["a", "b", "a", "b", "a"], 0);
        let j = job(0, true);
        assert_eq!(moved(&next_step(&view(j.clone(), &all), &all, 500)), [0, 1]);
        all[0].state = ItemState::Moved;
        all[1].state = ItemState::Moved;
        assert_eq!(next_step(&view(j.clone(), &all), &all, 500), Step::Wait);
        all[0].state = ItemState::Failed;
        all[1].state = ItemState::Ok;
        let step = next_step(&view(j.clone(), &all), &all, 500);
        let Step::Move(batch) = &step else {
            panic!("{step:?}")
        };
        let held: Vec<u64> = batch
            .iter()
            .filter(|i| i.state == ItemState::Held)
            .map(|i| i.seq)
            .collect();
        assert_eq!(held, [2, 4], "a's later messages wait");
        assert_eq!(moved(&step), [3], "b goes on");
        for i in batch {
            all[i.seq as usize] = i.clone();
        }
        all[3].state = ItemState::Ok;
        match next_step(&view(j, &all), &all, 500) {
            Step::Finish(JobState::Done, note) => assert!(note.contains("2 held"), "{note}"),
            other => panic!("{other:?}"),
        }
    }
}
