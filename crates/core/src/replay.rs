//! Replay: moving dead messages back to a main lane, keeping their id and history.
//!
//! Written once over the two seams, so every backend replays the same way: publish to
//! the target first, then mark replayed in the store. A crash between the two leaves
//! the message both in main and in the DLQ (delivered at least once), never in neither.

use std::future::Future;

use crate::envelope::{Envelope, MessageId};
use crate::queue::QueueName;
use crate::store::{Cursor, DeadLetter, DeadLetterStore, DeadSelection, StoreError};
use crate::transport::{Transport, TransportError};

/// How many dead messages are read and published per round.
const REPLAY_BATCH: usize = 500;

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// Reading or marking the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Publishing failed; messages already published are reported in the error.
    #[error("publishing to {queue} failed after {replayed} messages were replayed: {source}")]
    Publish {
        /// The target queue.
        queue: String,
        /// How many were replayed before the failure.
        replayed: u64,
        /// The transport error.
        source: TransportError,
    },
}

/// What a replay did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Dead messages the selection matched.
    pub matched: u64,
    /// Messages published back (in a dry run: that would be).
    pub replayed: u64,
    /// Messages left dead because they reached the replay limit.
    pub over_limit: Vec<MessageId>,
    /// Per target queue, how many.
    pub by_queue: Vec<(String, u64)>,
}

/// How a replay runs.
#[derive(Debug, Clone)]
pub struct ReplayOptions<'a> {
    /// Replay into this queue instead of each message's own.
    pub to: Option<&'a QueueName>,
    /// Messages already replayed this many times stay dead.
    pub max_replays: u32,
    /// Report what would move; move nothing.
    pub dry_run: bool,
    /// Who asked (for the audit log).
    pub actor: &'a str,
    /// Why (for the audit log).
    pub reason: &'a str,
    /// Most messages published per batch (the pacing unit).
    pub batch: usize,
}

impl Default for ReplayOptions<'_> {
    fn default() -> Self {
        Self {
            to: None,
            max_replays: 5,
            dry_run: false,
            actor: "unknown",
            reason: "",
            batch: REPLAY_BATCH,
        }
    }
}

/// Paces a replay: called after each published batch with the running total, it may
/// wait before the next one (a rate limit). Core has no timer, so the caller brings one.
pub trait Pace: Send + Sync {
    /// Waits as long as the rate requires after `replayed` messages.
    fn pause(&self, replayed: u64) -> impl Future<Output = ()> + Send;
}

/// No pacing: replay as fast as the backend takes it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unpaced;

impl Pace for Unpaced {
    async fn pause(&self, _replayed: u64) {}
}

/// Replays the selected dead messages to their origin queue, or to `options.to`.
///
/// Each replayed message keeps its id and history, starts again at attempt 0, and has
/// its replay count raised; messages already replayed `max_replays` times stay dead
/// (listed in the report) so a message that keeps failing cannot loop forever.
///
/// # Errors
///
/// Fails when the store cannot be read or marked, or publishing fails; the error says
/// how many were replayed before it.
pub async fn replay<T: Transport, S: DeadLetterStore, P: Pace>(
    transport: &T,
    store: &S,
    selection: &DeadSelection,
    options: &ReplayOptions<'_>,
    pace: &P,
) -> Result<ReplayReport, ReplayError> {
    let mut report = ReplayReport::default();
    let batch = options.batch.clamp(1, REPLAY_BATCH);
    match selection {
        DeadSelection::Ids(ids) => {
            for chunk in ids.chunks(batch) {
                let mut page = Vec::new();
                for id in chunk {
                    if let Some(dead) = store.get(id).await? {
                        page.push(dead);
                    }
                }
                replay_batch(transport, store, page, options, &mut report).await?;
                pace.pause(report.replayed).await;
            }
        }
        DeadSelection::Filter(filter) => {
            // Paging by (dead_at, id) is stable while replayed rows leave the filter:
            // rows behind the cursor may vanish, rows ahead of it are untouched.
            let mut cursor: Option<Cursor> = None;
            loop {
                let page = store.list(filter, cursor.as_ref(), batch).await?;
                let Some(last) = page.last() else { break };
                cursor = Some(Cursor {
                    dead_at_ms: last.dead_at_ms,
                    id: last.envelope.id,
                });
                let full = page.len() == batch;
                replay_batch(transport, store, page, options, &mut report).await?;
                if !full {
                    break;
                }
                pace.pause(report.replayed).await;
            }
        }
    }
    Ok(report)
}

/// Replays one dead message with its payload replaced (a fix made during triage).
/// Returns `None` when no dead message has that id.
///
/// # Errors
///
/// As [`replay`].
pub async fn replay_edited<T: Transport, S: DeadLetterStore>(
    transport: &T,
    store: &S,
    id: &MessageId,
    payload: Vec<u8>,
    options: &ReplayOptions<'_>,
) -> Result<Option<ReplayReport>, ReplayError> {
    let Some(mut dead) = store.get(id).await? else {
        return Ok(None);
    };
    dead.envelope.payload = payload.into();
    let mut report = ReplayReport::default();
    replay_batch(transport, store, vec![dead], options, &mut report).await?;
    Ok(Some(report))
}

/// Replays dead messages already read from the store (a caller that read them to decide,
/// as a replay job does, need not read them again), in batches of at most
/// `options.batch`.
///
/// # Errors
///
/// As [`replay`].
pub async fn replay_dead<T: Transport, S: DeadLetterStore>(
    transport: &T,
    store: &S,
    dead: Vec<DeadLetter>,
    options: &ReplayOptions<'_>,
) -> Result<ReplayReport, ReplayError> {
    let mut report = ReplayReport::default();
    let batch = options.batch.clamp(1, REPLAY_BATCH);
    let mut dead = dead.into_iter().peekable();
    while dead.peek().is_some() {
        let page: Vec<DeadLetter> = dead.by_ref().take(batch).collect();
        replay_batch(transport, store, page, options, &mut report).await?;
    }
    Ok(report)
}

async fn replay_batch<T: Transport, S: DeadLetterStore>(
    transport: &T,
    store: &S,
    page: Vec<DeadLetter>,
    options: &ReplayOptions<'_>,
    report: &mut ReplayReport,
) -> Result<(), ReplayError> {
    report.matched += page.len() as u64;
    let mut by_target: Vec<(QueueName, Vec<Envelope>)> = Vec::new();
    for dead in page {
        let mut env = dead.envelope;
        if env.replays >= options.max_replays {
            report.over_limit.push(env.id);
            continue;
        }
        let target = options.to.cloned().unwrap_or_else(|| env.queue.clone());
        env.queue = target.clone();
        env.attempt = 0;
        env.replays += 1;
        env.not_before_ms = None;
        match by_target.iter_mut().find(|(q, _)| *q == target) {
            Some((_, batch)) => batch.push(env),
            None => by_target.push((target, vec![env])),
        }
    }
    for (queue, batch) in by_target {
        let ids: Vec<MessageId> = batch.iter().map(|e| e.id).collect();
        let n = batch.len() as u64;
        if !options.dry_run {
            transport
                .publish(&queue, batch)
                .await
                .map_err(|source| ReplayError::Publish {
                    queue: queue.to_string(),
                    replayed: report.replayed,
                    source,
                })?;
            crate::failpoint("replay-published");
            let reason = if options.reason.is_empty() {
                format!("replay to {queue}")
            } else {
                options.reason.to_owned()
            };
            store.mark_replayed(&ids, options.actor, &reason).await?;
        }
        report.replayed += n;
        match report
            .by_queue
            .iter_mut()
            .find(|(q, _)| q == queue.as_str())
        {
            Some((_, count)) => *count += n,
            None => report.by_queue.push((queue.to_string(), n)),
        }
    }
    Ok(())
}
