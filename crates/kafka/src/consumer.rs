//! One consumer-group member per queue, polled on a thread of its own.
//!
//! The thread polls the queue's main and retry topics into a bounded buffer that
//! `fetch` takes from. Per partition it keeps which offsets are out (buffered or leased)
//! and which are settled; the offset it commits is the first one not settled, so a
//! record whose next lane is not yet confirmed is never committed past. Commits are
//! asynchronous and batched (every [`COMMIT_EVERY`]). A record the runner gives back
//! unstarted goes back into the buffer as it was, not fetched again.
//!
//! A retry-topic record that is not due yet waits in memory with the records behind it,
//! each handed out when due (no fetch again at the due time, so no lateness from one).
//! Past [`HELD_CAP`] waiting records the partition is paused and sought back, and it
//! resumes as they come due. Other partitions, and main, keep flowing.
//!
//! In ordered mode a partition hands out only its first unsettled record, and a failed
//! record goes back to the front of the line with its tier's due time instead of to a
//! retry topic: the partition waits for it, so records of one key are handled in order.
//!
//! Kafka keeps no delivery count, so leases are recorded in a second consumer group
//! (`<group>.leased`), used as a durable number per partition: before records are
//! handed to the runner, that group's offset is raised past them. A member that finds,
//! at assignment, a leased mark above the committed offset knows the records in between
//! were leased by a member that died without settling them: each counts a failed
//! attempt on redelivery, like an expired lease on the other backends.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use redrive_core::{Envelope, Lane, QueueName, now_ms};

pub(crate) use crate::slots::Slot;
use crate::slots::Slots;
use crate::wire::decode;

/// Most records polled ahead of `fetch`: a few fetches' worth, so the poll thread keeps
/// polling while the runner takes one in.
pub(crate) const READY_CAP: usize = 4096;
/// A poll thread waiting on a full buffer resumes once `fetch` has taken it below this.
const REFILL_BELOW: usize = READY_CAP * 3 / 4;
/// Most buffered records a lease write covers beyond the ones taken: the next fetch then
/// finds its records covered without a write, and a crash charges an attempt to at most
/// this many records that were never handed out.
pub(crate) const COVER_AHEAD: usize = 1024;
/// Most records polled in one burst: what librdkafka already holds, taken without
/// waiting and buffered under one lock.
const BURST: usize = 256;
/// Most retry records held in memory per partition before it is paused.
const HELD_CAP: usize = 512;
/// How often settled offsets are committed.
pub(crate) const COMMIT_EVERY: Duration = Duration::from_millis(100);
/// How often the poll thread reports, at `debug` level, what it holds unsettled.
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// Longest a blocking broker call may take.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A topic partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Tp {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
}

/// One assigned partition.
struct Part {
    /// Changes with every assignment: settles from an older one are refused.
    epoch: u64,
    /// The committed offset read when the partition was assigned.
    from: i64,
    /// Records below this were leased by a member that never settled them.
    unfinished_below: i64,
    /// The leased mark as last written.
    reserved: i64,
    /// The offset last committed (-1: none).
    committed: i64,
    /// One past the highest offset polled (-1: none yet).
    next: i64,
    /// Offsets polled and not yet committed past.
    pending: Slots,
    /// Retry records polled before they were due, in offset order, each handed out
    /// when due without being fetched again.
    held: VecDeque<Polled>,
    /// Paused because [`HELD_CAP`] records are held.
    paused: bool,
    /// Set when a record arrived with [`HELD_CAP`] held: the partition was sought back
    /// to this offset, and records from it on are fetched again after it resumes.
    refetch: Option<i64>,
}

/// Where a partition stood when this member gave it back.
///
/// A member whose assignment is lost (its session ran out while the broker was away)
/// cannot commit what it settled, and its leased mark, raised ahead of `fetch`, stays
/// up. Read as they are, the offsets would tell whoever is assigned the partition next
/// that a member died holding every record between them, and each would be run alone,
/// one at a time: hundreds of records after an outage of a few seconds. When the
/// partition comes back to this member, which did not die, it knows better.
#[derive(Clone, Copy, Debug)]
struct GivenBack {
    /// The committed offset the assignment started from.
    from: i64,
    /// Every record below this was settled by this member: its outcome is durable.
    settled_to: i64,
    /// The leased mark as the broker has it from this member.
    mark: i64,
}

impl GivenBack {
    /// Where the partition starts when it comes back, from its committed offset `c` and
    /// leased mark `m` on the broker: the offset to commit up to (nothing below it is
    /// delivered again), with nothing counted as unfinished; `None` when the offsets
    /// say another member leased past this one's mark meanwhile (it would have raised
    /// the mark) or someone moved the committed offset back.
    ///
    /// The records between the offsets were leased by this member, which is running:
    /// none of them stopped it. Those it settled are committed past; the others are
    /// delivered again, uncounted. A member that held the partition meanwhile leased
    /// records below the mark only as crash suspects, each moved to the isolation lane
    /// before it ran, so none of its crashes is missed here.
    fn resume(&self, c: i64, m: i64) -> Option<i64> {
        (m == self.mark && c >= self.from).then_some(c.max(self.settled_to))
    }
}

impl State {
    /// The first `max` buffered records, marked leased.
    fn take_first(&mut self, max: usize) -> Vec<Polled> {
        let n = max.min(self.ready.len());
        let taken: Vec<Polled> = self.ready.drain(..n).collect();
        // Records come in runs of one partition: look it up once per run.
        let mut at: Option<(&Tp, Option<&mut Part>)> = None;
        for p in &taken {
            if at.as_ref().is_none_or(|(tp, _)| **tp != p.tp) {
                at = Some((&p.tp, self.parts.get_mut(&p.tp)));
            }
            if let Some((_, Some(part))) = at.as_mut()
                && part.epoch == p.epoch
            {
                part.pending.set(p.offset, Slot::Leased);
            }
        }
        taken
    }

    /// Ordered mode: per partition, only the first unsettled record, once it is due.
    /// Records of partitions this member no longer owns are dropped.
    fn take_in_order(&mut self, max: usize) -> Vec<Polled> {
        let now = now_ms();
        let mut taken = Vec::new();
        let mut i = 0;
        while i < self.ready.len() && taken.len() < max {
            let p = &self.ready[i];
            let Some(part) = self
                .parts
                .get_mut(&p.tp)
                .filter(|part| part.epoch == p.epoch)
            else {
                self.ready.remove(i);
                continue;
            };
            let first = part.pending.first_unsettled();
            if first == Some((p.offset, Slot::Buffered)) && p.due_ms <= now {
                part.pending.set(p.offset, Slot::Leased);
                taken.extend(self.ready.remove(i));
            } else {
                i += 1;
            }
        }
        taken
    }
}

impl Part {
    /// The offset that may be committed: the first one not settled.
    fn position(&self) -> i64 {
        self.pending.first_unsettled().map_or(self.next, |(o, _)| o)
    }
}

/// A leased mark to write: one past the last record it covers, for one assignment of a
/// partition.
pub(crate) struct Mark {
    pub(crate) tp: Tp,
    pub(crate) offset: i64,
    pub(crate) epoch: u64,
}

/// A polled record waiting for `fetch`.
pub(crate) struct Polled {
    pub(crate) tp: Tp,
    pub(crate) offset: i64,
    pub(crate) epoch: u64,
    pub(crate) lane: Lane,
    pub(crate) due_ms: i64,
    /// Leased before by a member that died holding it.
    pub(crate) unfinished: bool,
    /// The envelope, or why its redrive headers do not parse and the raw record.
    pub(crate) envelope: Result<Envelope, Box<(String, Envelope)>>,
}

/// A topic the member reads, and its lane.
pub(crate) struct LaneTopic {
    pub(crate) topic: Arc<str>,
    pub(crate) lane: Lane,
    pub(crate) delay_ms: i64,
}

#[derive(Default)]
pub(crate) struct State {
    parts: HashMap<Tp, Part>,
    pub(crate) ready: VecDeque<Polled>,
    /// Partitions assigned and not yet read from the broker.
    to_init: Vec<Tp>,
    /// What this member knew of each partition it gave back, for when it comes back.
    given_back: HashMap<Tp, GivenBack>,
    epoch: u64,
    /// Commit everything again (an asynchronous commit failed).
    recommit: bool,
    /// The buffer [`Shared::settled`] is swapped with, kept to reuse its allocation.
    spare: Vec<(Tp, i64, u64)>,
}

/// What the poll thread and the transport share.
pub(crate) struct Shared {
    pub(crate) queue: QueueName,
    pub(crate) lanes: Vec<LaneTopic>,
    state: Mutex<State>,
    /// Settled offsets not yet applied to `state` (partition, offset, epoch). Workers
    /// add to it under a lock of its own, so a settle never waits for the poll thread
    /// admitting a burst (or `fetch` taking a thousand records); whoever takes `state`
    /// next applies them.
    settled: Mutex<Vec<(Tp, i64, u64)>>,
    /// Wakes a waiting `fetch`.
    pub(crate) signal: tokio::sync::Notify,
    /// Wakes the poll thread waiting on a full buffer (with `state`'s lock).
    room: Condvar,
    /// Member of `<group>.leased`: its committed offsets are the leased marks.
    pub(crate) marks: Arc<BaseConsumer>,
    /// Held while a leased mark is written or lowered, for the whole broker call: writes
    /// go one at a time, so a mark never goes down on the broker because an older write
    /// landed after a newer one, and no write lands after a hand-back lowered the mark
    /// of a partition given up (the write, next in line, finds it gone and skips it).
    /// Taken before `state`, never while holding it.
    pub(crate) mark_writes: Mutex<()>,
    /// A write raising the marks ahead of `fetch` is in flight.
    pub(crate) raising_ahead: AtomicBool,
    /// One record at a time per partition, retried in place.
    pub(crate) ordered: bool,
    /// Most buffered records a lease write covers beyond the ones taken
    /// ([`COVER_AHEAD`]; none for the isolation lane, where a leased record must be one
    /// that runs).
    cover_ahead: usize,
    /// The isolation lane: offsets are committed synchronously, and a fetch waits for
    /// every settle to be committed, so that after a crash the records between the
    /// committed offset and the leased mark are exactly the one that was running.
    pub(crate) isolation: bool,
}

impl Shared {
    pub(crate) fn new(
        queue: QueueName,
        lanes: Vec<LaneTopic>,
        marks: Arc<BaseConsumer>,
        ordered: bool,
        cover_ahead: usize,
    ) -> Self {
        Self {
            queue,
            lanes,
            state: Mutex::default(),
            settled: Mutex::default(),
            signal: tokio::sync::Notify::new(),
            room: Condvar::new(),
            marks,
            mark_writes: Mutex::new(()),
            raising_ahead: AtomicBool::new(false),
            ordered,
            cover_ahead,
            isolation: cover_ahead == 0,
        }
    }

    /// The shared state, with every settle made so far applied to it.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; carry on with it.
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut settled = std::mem::take(&mut st.spare);
        std::mem::swap(
            &mut settled,
            &mut self
                .settled
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if settled.is_empty() {
            st.spare = settled;
            return st;
        }
        // Settles come in runs on one partition: look it up once per run.
        let mut at: Option<(&Tp, &mut Part)> = None;
        for (tp, offset, epoch) in &settled {
            if at.as_ref().is_none_or(|(t, _)| *t != tp) {
                at = st.parts.get_mut(tp).map(|part| (tp, part));
            }
            if let Some((_, part)) = at.as_mut()
                && part.epoch == *epoch
            {
                part.pending.set(*offset, Slot::Settled);
                part.pending.prune();
            }
            // Otherwise from an older assignment: the record is delivered again.
        }
        settled.clear();
        st.spare = settled;
        st
    }

    /// Takes up to `max` polled records, marking them leased.
    pub(crate) fn take(&self, max: usize) -> Vec<Polled> {
        let mut st = self.lock();
        let full = st.ready.len() >= REFILL_BELOW;
        let taken = if self.ordered {
            st.take_in_order(max)
        } else {
            st.take_first(max)
        };
        if full && st.ready.len() < REFILL_BELOW {
            self.room.notify_one();
        }
        taken
    }

    /// Puts taken records back at the front of the buffer, to be handed out again:
    /// their leases could not be recorded, the runner gave them back unstarted, or (in
    /// ordered mode) one failed and waits in place for its due time.
    /// Returns how many went back; a record of a partition reassigned meanwhile does
    /// not (its new owner delivers it).
    ///
    /// A record given back is not fetched from the broker again: after a seek back to
    /// it, made around a broker outage, a partition once fetched nothing more.
    pub(crate) fn untake(&self, taken: Vec<Polled>) -> usize {
        let mut st = self.lock();
        let mut back = 0;
        for p in taken.into_iter().rev() {
            if let Some(part) = st.parts.get_mut(&p.tp)
                && part.epoch == p.epoch
            {
                part.pending.set(p.offset, Slot::Buffered);
                st.ready.push_front(p);
                back += 1;
            }
        }
        drop(st);
        if back > 0 {
            self.signal.notify_one();
        }
        back
    }

    /// What handing out `taken` needs, in one pass: whether every record of it is
    /// already below its partition's leased mark as last written (records of a
    /// partition reassigned meanwhile count as covered: they are settled nowhere), and
    /// the marks to raise per partition, past the taken records and up to
    /// `cover_ahead` buffered behind them (one write covers a burst).
    pub(crate) fn marks_for(&self, taken: &[Polled]) -> (bool, Vec<Mark>) {
        let st = self.lock();
        let mut covered = true;
        let mut raise: Vec<Mark> = Vec::new();
        // Records come in runs of one partition: look it up once per run.
        let mut at: Option<(&Tp, Option<&Part>)> = None;
        let ahead = st.ready.iter().take(self.cover_ahead);
        for (i, p) in taken.iter().chain(ahead).enumerate() {
            if at.is_none_or(|(tp, _)| *tp != p.tp) {
                at = Some((&p.tp, st.parts.get(&p.tp)));
            }
            let Some((_, Some(part))) = at else {
                continue;
            };
            if part.epoch == p.epoch && p.offset >= part.reserved {
                if i < taken.len() {
                    covered = false;
                }
                match raise.iter_mut().find(|m| m.tp == p.tp) {
                    Some(m) => m.offset = m.offset.max(p.offset + 1),
                    None => raise.push(Mark {
                        tp: p.tp.clone(),
                        offset: p.offset + 1,
                        epoch: p.epoch,
                    }),
                }
            }
        }
        (covered, raise)
    }

    pub(crate) fn raised(&self, marks: &[Mark]) {
        let mut st = self.lock();
        for m in marks {
            if let Some(part) = st.parts.get_mut(&m.tp).filter(|p| p.epoch == m.epoch) {
                part.reserved = part.reserved.max(m.offset);
            }
        }
    }

    /// The marks of `marks` still above what was last written, on partitions still
    /// assigned as they were when the marks were worked out (a mark of an earlier
    /// assignment would count records of this one that were never handed out).
    pub(crate) fn still_to_raise(&self, marks: Vec<Mark>) -> Vec<Mark> {
        let st = self.lock();
        marks
            .into_iter()
            .filter(|m| {
                st.parts
                    .get(&m.tp)
                    .is_some_and(|part| part.epoch == m.epoch && m.offset > part.reserved)
            })
            .collect()
    }

    /// Records an outcome; `false` when the partition was reassigned meanwhile.
    ///
    /// A settled record outside ordered mode is only noted here (see `settled`): it
    /// counts once the state is next locked, within the poll thread's next turn, and if
    /// its partition was reassigned meanwhile it is delivered again by the new owner,
    /// as it would be had the reassignment come just after.
    pub(crate) fn settle(&self, tp: &Tp, offset: i64, epoch: u64, slot: Slot) -> bool {
        if slot == Slot::Settled && !self.ordered {
            self.settled
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((tp.clone(), offset, epoch));
            return true;
        }
        let mut st = self.lock();
        let Some(part) = st.parts.get_mut(tp).filter(|p| p.epoch == epoch) else {
            return false;
        };
        part.pending.set(offset, slot);
        part.pending.prune();
        drop(st);
        if self.ordered {
            // The partition's next record may go now.
            self.signal.notify_one();
        }
        true
    }

    /// Whether polled records wait to be taken.
    pub(crate) fn has_ready(&self) -> bool {
        !self.lock().ready.is_empty()
    }

    /// Whether every settled record is committed past (the broker has the offsets).
    pub(crate) fn all_committed(&self) -> bool {
        self.lock()
            .parts
            .values()
            .all(|p| p.position() < 0 || p.committed >= p.position())
    }

    /// When the first record waiting for its due time comes due.
    pub(crate) fn next_due_ms(&self) -> Option<i64> {
        let st = self.lock();
        let held = st
            .parts
            .values()
            .filter_map(|p| p.held.front().map(|h| h.due_ms));
        // Only ordered mode puts records not yet due in `ready` (thousands may wait
        // there, and this runs every turn of the poll thread).
        let in_place = self
            .ordered
            .then(|| {
                let now = now_ms();
                st.ready
                    .iter()
                    .map(|p| p.due_ms)
                    .filter(|due| *due > now)
                    .min()
            })
            .flatten();
        held.chain(in_place).min()
    }

    /// What this member knows that the broker may not report yet: per partition, one
    /// past the highest offset polled; and how many polled records are not settled
    /// (held retries included).
    pub(crate) fn local_view(&self) -> (HashMap<(String, i32), i64>, u64) {
        let st = self.lock();
        let next = st
            .parts
            .iter()
            .map(|(tp, p)| {
                let held = p.held.back().map_or(-1, |h| h.offset + 1);
                ((tp.topic.to_string(), tp.partition), p.next.max(held))
            })
            .collect();
        let unsettled = st
            .parts
            .values()
            .map(|p| {
                let out = p.pending.unsettled();
                (out + p.held.len()) as u64
            })
            .sum();
        (next, unsettled)
    }
}

/// The consumer context: rebalances commit what is settled before partitions go.
pub(crate) struct Ctx {
    pub(crate) shared: Arc<Shared>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let gone: Vec<Tp> = tpl
                .elements()
                .iter()
                .map(|e| Tp {
                    topic: e.topic().into(),
                    partition: e.partition(),
                })
                .collect();
            hand_back(consumer, &self.shared, &gone);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut st = self.shared.lock();
            for e in tpl.elements() {
                st.to_init.push(Tp {
                    topic: e.topic().into(),
                    partition: e.partition(),
                });
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        // A commit can succeed as a whole and fail for some partitions (a broker that
        // restarted and does not know the member's generation yet, say): those are
        // committed again too, or their offsets would stay behind for good.
        let failed = offsets.elements().into_iter().find_map(|e| e.error().err());
        if let Some(e) = result.err().or(failed) {
            tracing::warn!(queue = %self.shared.queue, error = %e, "offset commit failed; it will be retried");
            self.shared.lock().recommit = true;
        }
    }
}

/// Commits what is settled on partitions this member gives up, synchronously, and
/// lowers their leased mark to just past the last record still leased (buffered records,
/// given back or not yet taken, were never handed to a handler, so they must not count).
fn hand_back(consumer: &BaseConsumer<Ctx>, shared: &Shared, gone: &[Tp]) {
    // A mark write in flight lands before the lowering below, and a later one skips
    // these partitions: the next member counts only what this one still leases.
    let _no_write_meanwhile = shared
        .mark_writes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut commit = TopicPartitionList::new();
    let mut lower = TopicPartitionList::new();
    let mut given_back = Vec::new();
    {
        let mut st = shared.lock();
        for tp in gone {
            let Some(part) = st.parts.remove(tp) else {
                continue;
            };
            let pos = part.position();
            if pos < 0 {
                continue;
            }
            if pos > part.committed {
                let _ = commit.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(pos));
            }
            // Only records handed out and not settled may count as unfinished on the
            // next member: the mark, raised past whole bursts, comes down to just past
            // the last of them.
            let keep = part
                .pending
                .last_leased()
                .map_or(pos, |offset| (offset + 1).max(pos));
            let lowered_to = (part.reserved > keep).then_some(keep);
            if let Some(keep) = lowered_to {
                let _ = lower.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(keep));
            }
            let back = GivenBack {
                from: part.from,
                settled_to: pos,
                mark: part.reserved,
            };
            given_back.push((tp.clone(), back, lowered_to));
        }
        st.ready.retain(|p| !gone.contains(&p.tp));
        st.to_init.retain(|tp| !gone.contains(tp));
    }
    if commit.count() > 0
        && let Err(e) = consumer.commit(&commit, CommitMode::Sync)
    {
        tracing::warn!(queue = %shared.queue, error = %e, "commit on hand-back failed; settled records will be delivered again");
    }
    let lowered = lower.count() > 0
        && match shared.marks.commit(&lower, CommitMode::Sync) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(queue = %shared.queue, error = %e, "could not clear leased marks; the next member counts them as unfinished");
                false
            }
        };
    // Remembered as the broker now has it, in case the partition comes back.
    let mut st = shared.lock();
    for (tp, mut back, lowered_to) in given_back {
        if lowered && let Some(keep) = lowered_to {
            back.mark = keep;
        }
        st.given_back.insert(tp, back);
    }
}

/// The member's poll thread.
pub(crate) struct Member {
    pub(crate) shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Member {
    /// Subscribes `consumer` to the lanes' topics and starts polling.
    pub(crate) fn start(consumer: BaseConsumer<Ctx>) -> KafkaResult<Self> {
        let shared = Arc::clone(&consumer.context().shared);
        let topics: Vec<&str> = shared.lanes.iter().map(|l| &*l.topic).collect();
        consumer.subscribe(&topics)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name(format!("redrive-kafka-{}", shared.queue))
                .spawn(move || poll_loop(&consumer, &stop))
                .map_err(|e| {
                    rdkafka::error::KafkaError::ClientCreation(format!(
                        "cannot start the poll thread: {e}"
                    ))
                })?
        };
        Ok(Self {
            shared,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

fn poll_loop(consumer: &BaseConsumer<Ctx>, stop: &AtomicBool) {
    let shared = Arc::clone(&consumer.context().shared);
    let mut committed_at = Instant::now();
    let mut reported_at = Instant::now();
    // Reused from burst to burst: growing a fresh one moved every record several times.
    let mut burst = Vec::with_capacity(BURST);
    while !stop.load(Ordering::Relaxed) {
        init_assigned(consumer, &shared);
        resume_due(consumer, &shared);
        if committed_at.elapsed() >= COMMIT_EVERY {
            let mode = if shared.isolation {
                CommitMode::Sync
            } else {
                CommitMode::Async
            };
            commit(consumer, &shared, mode);
            committed_at = Instant::now();
        }
        if reported_at.elapsed() >= REPORT_EVERY && tracing::enabled!(tracing::Level::DEBUG) {
            report(&shared);
            reported_at = Instant::now();
        }
        let st = shared.lock();
        if st.ready.len() >= READY_CAP {
            // `fetch` is behind: poll again once it has taken a quarter of the buffer, or
            // within 5 ms for the housekeeping above. A fixed 5 ms sleep here let the
            // buffer run dry at 600k records/s.
            let more = |st: &mut State| st.ready.len() >= REFILL_BELOW;
            drop(
                shared
                    .room
                    .wait_timeout_while(st, Duration::from_millis(5), more),
            );
            continue;
        }
        drop(st);
        // Wake for the next held record's due time, or within 50 ms.
        let wait = shared
            .next_due_ms()
            .map_or(50, |due| (due - now_ms()).clamp(0, 50));
        let mut timeout = Duration::from_millis(u64::try_from(wait).unwrap_or(0));
        // What librdkafka already holds is taken without waiting, up to a burst, and
        // admitted under one lock with one wake-up for `fetch`.
        while burst.len() < BURST {
            match consumer.poll(timeout) {
                None => break,
                Some(Ok(msg)) => burst.extend(incoming(&shared, &msg)),
                Some(Err(e)) => {
                    tracing::warn!(queue = %shared.queue, error = %e, "Kafka consumer error");
                    break;
                }
            }
            timeout = Duration::ZERO;
        }
        if !burst.is_empty() {
            admit(consumer, &shared, &mut burst);
        }
    }
    // Stopping: commit what is settled and give every partition back.
    let all: Vec<Tp> = shared.lock().parts.keys().cloned().collect();
    hand_back(consumer, &shared, &all);
    consumer.unsubscribe();
}

/// What each partition holds that is not committed past (`debug` level): where a run
/// that does not drain is stuck.
fn report(shared: &Shared) {
    let st = shared.lock();
    for (tp, part) in &st.parts {
        let first = part.pending.first_unsettled();
        if first.is_none() && part.held.is_empty() && part.committed >= part.position() {
            continue;
        }
        tracing::debug!(
            queue = %shared.queue,
            topic = %tp.topic,
            partition = tp.partition,
            committed = part.committed,
            position = part.position(),
            first_unsettled = ?first,
            unsettled = part.pending.unsettled(),
            held = part.held.len(),
            paused = part.paused,
            "partition not committed to its end"
        );
    }
}

/// Reads the committed offset and the leased mark of newly assigned partitions.
fn init_assigned(consumer: &BaseConsumer<Ctx>, shared: &Shared) {
    let tps = std::mem::take(&mut shared.lock().to_init);
    if tps.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for tp in &tps {
        tpl.add_partition(&tp.topic, tp.partition);
    }
    let read = |c: KafkaResult<TopicPartitionList>, what: &str| match c {
        Ok(list) => Some(list),
        Err(e) => {
            tracing::warn!(queue = %shared.queue, error = %e, "could not read the {what} offsets");
            None
        }
    };
    let committed = read(
        consumer.committed_offsets(tpl.clone(), CALL_TIMEOUT),
        "committed",
    );
    let marks = read(shared.marks.committed_offsets(tpl, CALL_TIMEOUT), "leased");
    let (Some(committed), Some(marks)) = (committed, marks) else {
        // Try again on the next turn.
        shared.lock().to_init.extend(tps);
        return;
    };
    let at = |list: &TopicPartitionList, tp: &Tp| match list
        .find_partition(&tp.topic, tp.partition)
        .map(|e| e.offset())
    {
        Some(Offset::Offset(n)) => n,
        _ => -1,
    };
    let mut st = shared.lock();
    for tp in tps {
        st.epoch += 1;
        let (c, m) = (at(&committed, &tp), at(&marks, &tp));
        let back = st.given_back.remove(&tp).and_then(|b| b.resume(c, m));
        let (unfinished_below, settled_to) = match back {
            Some(settled_to) => {
                if m > c {
                    tracing::info!(queue = %shared.queue, topic = %tp.topic, partition = tp.partition, from = c, to = m, settled_to, "partition back after this member lost it: records it settled are committed past, the others delivered again uncounted");
                }
                (-1, settled_to)
            }
            None if m > c => {
                tracing::info!(queue = %shared.queue, topic = %tp.topic, partition = tp.partition, from = c, to = m, "records leased by a member that stopped without settling them: each is a crash suspect, run alone");
                (m, c)
            }
            None => (-1, c),
        };
        let part = Part {
            epoch: st.epoch,
            from: c,
            unfinished_below,
            reserved: m.max(c),
            committed: c,
            next: settled_to,
            pending: Slots::default(),
            held: VecDeque::new(),
            paused: false,
            refetch: None,
        };
        st.parts.insert(tp, part);
    }
}

fn seek(consumer: &BaseConsumer<Ctx>, tp: &Tp, offset: i64) {
    if let Err(e) = consumer.seek(
        &tp.topic,
        tp.partition,
        Offset::Offset(offset),
        Duration::from_secs(1),
    ) {
        tracing::warn!(topic = %tp.topic, partition = tp.partition, offset, error = %e, "seek failed");
    }
}

fn one(tp: &Tp) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.topic, tp.partition);
    tpl
}

/// Hands out held records that are due and resumes their partitions.
fn resume_due(consumer: &BaseConsumer<Ctx>, shared: &Shared) {
    let now = now_ms();
    let due: Vec<Tp> = {
        let mut st = shared.lock();
        let mut released = Vec::new();
        let mut resumed = Vec::new();
        for (tp, part) in &mut st.parts {
            if part.held.front().is_none_or(|h| h.due_ms > now) {
                continue;
            }
            while part.held.front().is_some_and(|h| h.due_ms <= now)
                && let Some(held) = part.held.pop_front()
            {
                part.pending.set(held.offset, Slot::Buffered);
                part.next = part.next.max(held.offset + 1);
                released.push(held);
            }
            if part.paused && part.held.len() < HELD_CAP / 2 {
                part.paused = false;
                part.refetch = None;
                resumed.push(tp.clone());
            }
        }
        let any = !released.is_empty();
        st.ready.extend(released);
        if any {
            shared.signal.notify_one();
        }
        resumed
    };
    for tp in due {
        if let Err(e) = consumer.resume(&one(&tp)) {
            tracing::warn!(topic = %tp.topic, partition = tp.partition, error = %e, "resume failed");
        }
    }
}

/// Commits, per partition, the first offset not settled.
fn commit(consumer: &BaseConsumer<Ctx>, shared: &Shared, mode: CommitMode) {
    let mut tpl = TopicPartitionList::new();
    let mut positions = Vec::new();
    {
        let mut st = shared.lock();
        let all = std::mem::take(&mut st.recommit);
        for (tp, part) in &mut st.parts {
            let pos = part.position();
            if pos >= 0 && (pos > part.committed || (all && pos == part.committed)) {
                let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(pos));
                if matches!(mode, CommitMode::Async) {
                    part.committed = pos;
                } else {
                    positions.push((tp.clone(), part.epoch, pos));
                }
            }
        }
    }
    if tpl.count() == 0 {
        return;
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => {
            // A synchronous commit counts once the broker has it.
            let mut st = shared.lock();
            for (tp, epoch, pos) in positions {
                if let Some(part) = st.parts.get_mut(&tp).filter(|p| p.epoch == epoch) {
                    part.committed = part.committed.max(pos);
                }
            }
        }
        Err(e) => {
            tracing::warn!(queue = %shared.queue, error = %e, "offset commit failed; it will be retried");
            shared.lock().recommit = true;
        }
    }
}

/// A polled record, read out of librdkafka's message.
struct Incoming {
    lane: usize,
    partition: i32,
    offset: i64,
    /// The record's timestamp (ms), if it has one.
    timestamp: Option<i64>,
    envelope: Result<Envelope, Box<(String, Envelope)>>,
}

/// Reads a record of one of the lanes' topics.
fn incoming(shared: &Shared, msg: &BorrowedMessage<'_>) -> Option<Incoming> {
    let lane = shared.lanes.iter().position(|l| &*l.topic == msg.topic())?;
    Some(Incoming {
        lane,
        partition: msg.partition(),
        offset: msg.offset(),
        timestamp: msg.timestamp().to_millis(),
        envelope: decode(&shared.queue, msg),
    })
}

/// Buffers a burst of polled records for `fetch` (retry records not yet due are held),
/// then makes the seeks and pauses that asked for.
fn admit(consumer: &BaseConsumer<Ctx>, shared: &Shared, burst: &mut Vec<Incoming>) {
    let now = now_ms();
    let mut seeks: Vec<(Tp, i64)> = Vec::new();
    let mut pauses: Vec<Tp> = Vec::new();
    let mut any = false;
    {
        let mut guard = shared.lock();
        let State { parts, ready, .. } = &mut *guard;
        // Records come in runs of one partition: look it up once per run.
        let mut at: Option<((usize, i32), Option<&mut Part>)> = None;
        for rec in burst.drain(..) {
            let lane = &shared.lanes[rec.lane];
            let tp = Tp {
                topic: Arc::clone(&lane.topic),
                partition: rec.partition,
            };
            let offset = rec.offset;
            let key = (rec.lane, rec.partition);
            if at.as_ref().is_none_or(|(k, _)| *k != key) {
                at = Some((key, parts.get_mut(&tp)));
            }
            let Some((_, Some(part))) = at.as_mut() else {
                // Not (or no longer) this member's partition.
                continue;
            };
            if part.pending.get(offset).is_some() || offset < part.next {
                // Fetched again after a seek back (see `refetch`): already here.
                continue;
            }
            if part.held.back().is_some_and(|h| offset <= h.offset)
                || part.refetch.is_some_and(|r| offset >= r)
            {
                // Already held, or fetched again after the partition resumes.
                continue;
            }
            let env_ref = match &rec.envelope {
                Ok(e) => e,
                Err(bad) => &bad.1,
            };
            let stamped = rec.timestamp.unwrap_or(now);
            let due_ms = match &lane.lane {
                Lane::Retry(_) => env_ref.not_before_ms.unwrap_or(stamped + lane.delay_ms),
                _ => stamped,
            };
            let retry = matches!(lane.lane, Lane::Retry(_));
            if retry {
                tracing::trace!(topic = %tp.topic, offset, late_ms = now - due_ms, "retry record polled");
            }
            let polled = Polled {
                tp,
                offset,
                epoch: part.epoch,
                lane: lane.lane.clone(),
                due_ms,
                unfinished: offset < part.unfinished_below,
                envelope: rec.envelope,
            };
            if retry && (due_ms > now || !part.held.is_empty()) {
                // Not due (or behind one that is not): it waits in memory, in offset
                // order (records of one tier come due in that order). Past HELD_CAP the
                // partition is paused, and what was fetched beyond is fetched again
                // after it resumes.
                if part.held.len() >= HELD_CAP {
                    part.refetch = Some(offset);
                    seeks.push((polled.tp, offset));
                    continue;
                }
                let tp = polled.tp.clone();
                part.held.push_back(polled);
                if part.held.len() >= HELD_CAP && !part.paused {
                    part.paused = true;
                    pauses.push(tp);
                }
                continue;
            }
            part.pending.set(offset, Slot::Buffered);
            part.next = part.next.max(offset + 1);
            ready.push_back(polled);
            any = true;
        }
    }
    if any {
        shared.signal.notify_one();
    }
    for tp in pauses {
        if let Err(e) = consumer.pause(&one(&tp)) {
            tracing::warn!(topic = %tp.topic, partition = tp.partition, error = %e, "pause failed");
        }
    }
    for (tp, offset) in seeks {
        seek(consumer, &tp, offset);
    }
}

#[cfg(test)]
mod tests {
    use super::GivenBack;

    #[test]
    fn a_partition_back_after_a_lost_assignment_counts_nothing_as_unfinished() {
        // Assigned at 100, settled up to 240, mark raised ahead to 891; nothing of it
        // reached the broker before the assignment was lost.
        let back = GivenBack {
            from: 100,
            settled_to: 240,
            mark: 891,
        };
        // Nobody else moved the offsets: commit past what this member settled.
        assert_eq!(back.resume(100, 891), Some(240));
        // Its last commit landed after all.
        assert_eq!(back.resume(200, 891), Some(240));
        // A member in between moved suspects to the isolation lane and committed past.
        assert_eq!(back.resume(500, 891), Some(500));
        // A member in between leased past the mark (and raised it): its records may
        // have stopped it, so the offsets are read as they are.
        assert_eq!(back.resume(240, 1200), None);
        // Someone moved the committed offset back on purpose: records are read again.
        assert_eq!(back.resume(50, 891), None);
    }
}
