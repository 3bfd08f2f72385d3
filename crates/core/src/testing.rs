//! An in-memory [`Transport`] for tests and experiments (feature `test-util`): lanes
//! and leases in memory, and counters of what a runner asked of it.
//!
//! It keeps the promises every backend keeps: a delivery is leased to one caller at a
//! time; a lease that runs out makes the message due again with `unfinished_before`
//! set; a settle with a lease that is gone is [`TransportError::LeaseLost`]; an
//! isolation-lane message is leased only by `fetch_isolated`, one at a time. Nothing is
//! durable: it is a model, not a backend.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::{
    Delivery, Envelope, Fetched, Lane, LaneSet, MessageId, QueueName, Tier, Transport,
    TransportError, now_ms,
};

/// What a fetch waits for before it answers (a broker round trip, a lease write): the
/// caller's own timer, since core has none.
pub type FetchDelay = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The handle on one delivery: its queue and lease.
#[derive(Debug, Clone)]
pub struct MemoryToken {
    queue: QueueName,
    lease: u64,
}

/// Lanes in memory. See the module documentation.
#[derive(Default)]
pub struct MemoryTransport {
    state: Mutex<State>,
    fetch_delay: Option<FetchDelay>,
    max_fetch: Option<usize>,
    fetches_in_flight: Option<usize>,
    fetching: AtomicUsize,
    most_fetching: AtomicUsize,
    fetches: AtomicUsize,
}

#[derive(Default)]
struct State {
    next: u64,
    queues: HashMap<QueueName, Lanes>,
}

#[derive(Default)]
struct Lanes {
    /// Main, first in first out.
    main: VecDeque<Waiting>,
    /// Retry tiers and redeliveries, by due time (then arrival).
    later: BTreeMap<(i64, u64), Waiting>,
    isolated: VecDeque<Waiting>,
    leased: HashMap<u64, Leased>,
    dead: Vec<Envelope>,
    acked: Vec<MessageId>,
    released: Vec<MessageId>,
    leases: usize,
}

struct Waiting {
    envelope: Envelope,
    lane: Lane,
    due_ms: i64,
    unfinished_before: bool,
}

struct Leased {
    waiting: Waiting,
    expires_ms: i64,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl MemoryTransport {
    /// An empty transport: no fetch delay, the trait's defaults for `max_fetch` and
    /// `fetches_in_flight`.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Every fetch awaits `delay()` after leasing and before answering, as a broker
    /// leases when asked and answers a round trip later.
    #[must_use]
    pub fn with_fetch_delay(mut self, delay: FetchDelay) -> Self {
        self.fetch_delay = Some(delay);
        self
    }

    /// What [`Transport::max_fetch`] answers.
    #[must_use]
    pub fn with_max_fetch(mut self, max: usize) -> Self {
        self.max_fetch = Some(max);
        self
    }

    /// What [`Transport::fetches_in_flight`] answers.
    #[must_use]
    pub fn with_fetches_in_flight(mut self, n: usize) -> Self {
        self.fetches_in_flight = Some(n);
        self
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn settle<R>(
        &self,
        d: &Delivery<MemoryToken>,
        then: impl FnOnce(&mut Lanes, Waiting, u64) -> R,
    ) -> Result<R, TransportError> {
        let token = &d.token;
        let mut state = self.state();
        let seq = state.next;
        state.next += 1;
        let lanes = state.queues.entry(token.queue.clone()).or_default();
        let leased =
            lanes
                .leased
                .remove(&token.lease)
                .ok_or_else(|| TransportError::LeaseLost {
                    id: d.envelope.id.to_string(),
                })?;
        Ok(then(lanes, leased.waiting, seq))
    }

    /// Ids of the messages acknowledged, in order.
    #[must_use]
    pub fn acked(&self, queue: &QueueName) -> Vec<MessageId> {
        self.state()
            .queues
            .get(queue)
            .map(|l| l.acked.clone())
            .unwrap_or_default()
    }

    /// Ids of the deliveries released (given back uncounted), in order.
    #[must_use]
    pub fn released(&self, queue: &QueueName) -> Vec<MessageId> {
        self.state()
            .queues
            .get(queue)
            .map(|l| l.released.clone())
            .unwrap_or_default()
    }

    /// The dead-lettered envelopes.
    #[must_use]
    pub fn dead(&self, queue: &QueueName) -> Vec<Envelope> {
        self.state()
            .queues
            .get(queue)
            .map(|l| l.dead.clone())
            .unwrap_or_default()
    }

    /// Deliveries leased so far (every fetch's, redeliveries included).
    #[must_use]
    pub fn leases(&self, queue: &QueueName) -> usize {
        self.state().queues.get(queue).map_or(0, |l| l.leases)
    }

    /// Calls to `fetch` so far.
    #[must_use]
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// The most `fetch` calls that were waiting at once.
    #[must_use]
    pub fn most_fetches_at_once(&self) -> usize {
        self.most_fetching.load(Ordering::SeqCst)
    }

    async fn answer(&self, deliveries: Vec<Delivery<MemoryToken>>) -> Fetched<MemoryToken> {
        if let Some(delay) = &self.fetch_delay {
            delay().await;
        }
        Fetched {
            deliveries,
            next_due_ms: None,
        }
    }
}

impl Lanes {
    /// Makes every delivery whose lease ran out due again, marked unfinished.
    fn expire(&mut self, now: i64, next: &mut u64) {
        let gone: Vec<u64> = self
            .leased
            .iter()
            .filter(|(_, l)| l.expires_ms <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(Leased { mut waiting, .. }) = self.leased.remove(&id) {
                waiting.unfinished_before = true;
                if waiting.lane == Lane::Isolated {
                    self.isolated.push_front(waiting);
                } else {
                    self.later.insert((now, *next), waiting);
                    *next += 1;
                }
            }
        }
    }

    fn lease(
        &mut self,
        queue: &QueueName,
        waiting: Waiting,
        id: u64,
        expires_ms: i64,
    ) -> Delivery<MemoryToken> {
        let delivery = Delivery {
            envelope: waiting.envelope.clone(),
            lane: waiting.lane.clone(),
            due_ms: waiting.due_ms,
            unfinished_before: waiting.unfinished_before,
            token: MemoryToken {
                queue: queue.clone(),
                lease: id,
            },
        };
        self.leases += 1;
        self.leased.insert(
            id,
            Leased {
                waiting,
                expires_ms,
            },
        );
        delivery
    }
}

impl Transport for MemoryTransport {
    type Token = MemoryToken;

    async fn publish(&self, queue: &QueueName, batch: Vec<Envelope>) -> Result<(), TransportError> {
        let now = now_ms();
        let mut state = self.state();
        let lanes = state.queues.entry(queue.clone()).or_default();
        lanes.main.extend(batch.into_iter().map(|envelope| Waiting {
            envelope,
            lane: Lane::Main,
            due_ms: now,
            unfinished_before: false,
        }));
        Ok(())
    }

    async fn create_lanes(&self, lanes: &LaneSet) -> Result<(), TransportError> {
        self.state().queues.entry(lanes.queue.clone()).or_default();
        Ok(())
    }

    async fn fetch(
        &self,
        lanes: &LaneSet,
        max: usize,
        lease: Duration,
    ) -> Result<Fetched<MemoryToken>, TransportError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let at_once = self.fetching.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_fetching.fetch_max(at_once, Ordering::SeqCst);
        // Leased when asked for, answered after the delay, as a broker does.
        let deliveries = {
            let now = now_ms();
            let expires_ms = now.saturating_add(millis(lease));
            let mut state = self.state();
            let State { next, queues } = &mut *state;
            let q = queues.entry(lanes.queue.clone()).or_default();
            q.expire(now, next);
            let mut out = Vec::new();
            while out.len() < max {
                let due_later = q
                    .later
                    .first_key_value()
                    .is_some_and(|((due, _), _)| *due <= now);
                let waiting = if due_later {
                    q.later.pop_first().map(|(_, w)| w)
                } else {
                    q.main.pop_front()
                };
                let Some(waiting) = waiting else { break };
                *next += 1;
                out.push(q.lease(&lanes.queue, waiting, *next, expires_ms));
            }
            out
        };
        let fetched = self.answer(deliveries).await;
        self.fetching.fetch_sub(1, Ordering::SeqCst);
        Ok(fetched)
    }

    async fn ack(&self, d: &Delivery<MemoryToken>) -> Result<(), TransportError> {
        self.settle(d, |lanes, w, _| lanes.acked.push(w.envelope.id))
    }

    async fn retry(
        &self,
        d: &Delivery<MemoryToken>,
        tier: &Tier,
        due_ms: i64,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        self.settle(d, |lanes, _, seq| {
            lanes.later.insert(
                (due_ms, seq),
                Waiting {
                    envelope: envelope.clone(),
                    lane: Lane::Retry(tier.name().to_owned()),
                    due_ms,
                    unfinished_before: false,
                },
            );
        })
    }

    async fn dead_letter(
        &self,
        d: &Delivery<MemoryToken>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        self.settle(d, |lanes, _, _| lanes.dead.push(envelope.clone()))
    }

    async fn release(&self, d: &Delivery<MemoryToken>) -> Result<(), TransportError> {
        self.settle(d, |lanes, w, seq| {
            lanes.released.push(w.envelope.id);
            if w.lane == Lane::Isolated {
                lanes.isolated.push_front(w);
            } else {
                lanes.later.insert((w.due_ms, seq), w);
            }
        })
    }

    async fn isolate(
        &self,
        d: &Delivery<MemoryToken>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        self.settle(d, |lanes, _, _| {
            lanes.isolated.push_back(Waiting {
                envelope: envelope.clone(),
                lane: Lane::Isolated,
                due_ms: now_ms(),
                unfinished_before: false,
            });
        })
    }

    async fn fetch_isolated(
        &self,
        lanes: &LaneSet,
        lease: Duration,
    ) -> Result<Fetched<MemoryToken>, TransportError> {
        let now = now_ms();
        let mut state = self.state();
        let State { next, queues } = &mut *state;
        let q = queues.entry(lanes.queue.clone()).or_default();
        q.expire(now, next);
        let deliveries = match q.isolated.pop_front() {
            Some(waiting) => {
                *next += 1;
                vec![q.lease(
                    &lanes.queue,
                    waiting,
                    *next,
                    now.saturating_add(millis(lease)),
                )]
            }
            None => Vec::new(),
        };
        Ok(Fetched {
            deliveries,
            next_due_ms: None,
        })
    }

    async fn isolated_due(&self, lanes: &LaneSet) -> Result<Option<i64>, TransportError> {
        let state = self.state();
        let Some(q) = state.queues.get(&lanes.queue) else {
            return Ok(None);
        };
        let waiting = q.isolated.front().map(|w| w.due_ms);
        let running_out = q
            .leased
            .values()
            .filter(|l| l.waiting.lane == Lane::Isolated)
            .map(|l| l.expires_ms)
            .min();
        Ok(waiting.into_iter().chain(running_out).min())
    }

    async fn extend_lease(
        &self,
        d: &Delivery<MemoryToken>,
        lease: Duration,
    ) -> Result<(), TransportError> {
        let mut state = self.state();
        let leased = state
            .queues
            .get_mut(&d.token.queue)
            .and_then(|q| q.leased.get_mut(&d.token.lease))
            .ok_or_else(|| TransportError::LeaseLost {
                id: d.envelope.id.to_string(),
            })?;
        leased.expires_ms = now_ms().saturating_add(millis(lease));
        Ok(())
    }

    fn max_fetch(&self) -> usize {
        self.max_fetch.unwrap_or(usize::MAX)
    }

    fn fetches_in_flight(&self) -> usize {
        self.fetches_in_flight.unwrap_or(1)
    }
}

/// An envelope of queue `agent.tasks` built from arbitrary parts, as the wire-format
/// property tests of every backend draw them: user headers named `redrive-…` are left
/// out (those names are redrive's own), and when `failed`, one retry failure with
/// `message` is recorded, so the envelope travels in its full form.
#[must_use]
pub fn sample_envelope(
    payload: Vec<u8>,
    key: Option<String>,
    headers: Vec<(String, String)>,
    message: String,
    failed: bool,
) -> Envelope {
    let queue = QueueName::new("agent.tasks").unwrap_or_else(|e| unreachable!("{e}"));
    let mut env = Envelope::new(queue, payload);
    env.key = key;
    env.headers = headers
        .into_iter()
        .filter(|(k, _)| !k.to_ascii_lowercase().starts_with("redrive-"))
        .collect();
    if failed {
        env.record_failure(
            crate::Failure::new(crate::FailureKind::Retry, "E", message, 5),
            "main",
        );
    }
    env
}
