//! The `Transport` seam: moving envelopes between the lanes of one backend.
//!
//! A transport publishes, hands out due deliveries under a lease, and settles each
//! delivery exactly one way: ack, move to a retry tier, move to the DLQ, or release.
//! Each settling call returns only once the next place of the message is durable, so
//! the caller may treat success as "safe to forget".

use std::future::Future;
use std::time::Duration;

use crate::envelope::Envelope;
use crate::policy::Tier;
use crate::queue::{Lane, LaneSet, QueueName};

/// A transport failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The backend could not be reached.
    #[error("{backend} at {address} is unreachable: {source}")]
    Unavailable {
        /// Backend kind, e.g. `sqlite`, `kafka`.
        backend: &'static str,
        /// Where it was expected (never includes credentials).
        address: String,
        /// The underlying error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The delivery's lease was lost (it expired and the message went to another
    /// consumer), so this consumer must not settle it.
    #[error("lease lost for message {id}: it expired and the message will be delivered again")]
    LeaseLost {
        /// The message id.
        id: String,
    },
    /// The backend's setup contradicts what the consumer was asked to do (a queue's
    /// settings, a name collision); retrying cannot help, so the consumer stops.
    #[error("{backend}: {reason}")]
    Misconfigured {
        /// Backend kind.
        backend: &'static str,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A message over the backend's size limit.
    #[error("message is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Any other backend error, with what was being done.
    #[error("{context}: {source}")]
    Backend {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// One hand-over of an envelope under a lease.
#[derive(Debug)]
pub struct Delivery<T> {
    /// The message.
    pub envelope: Envelope,
    /// The lane it came from.
    pub lane: Lane,
    /// When it became due (unix ms): its retry due time, or when it was published.
    pub due_ms: i64,
    /// The previous delivery of this message ended without an outcome (the consumer
    /// crashed or its lease expired). The runner counts that as a failed attempt.
    pub unfinished_before: bool,
    /// The backend's handle on this delivery.
    pub token: T,
}

/// The result of a fetch.
#[derive(Debug)]
pub struct Fetched<T> {
    /// Deliveries now leased to the caller.
    pub deliveries: Vec<Delivery<T>>,
    /// When the next message of these lanes becomes due, if the backend knows, so an
    /// idle runner can sleep exactly until then.
    pub next_due_ms: Option<i64>,
}

/// Moves envelopes between the lanes of one backend.
///
/// Implementations document which capability traits ([`LaneStats`], …) they add.
pub trait Transport: Send + Sync + 'static {
    /// The backend's handle on one delivery (a row and lease id, a receipt handle, an
    /// offset, an ack subject).
    type Token: Send + Sync + 'static;

    /// Publishes envelopes to `queue`'s main lane; returns once they are durable.
    ///
    /// # Errors
    ///
    /// Fails when the backend is unreachable or refuses the batch; then none or only
    /// some of the envelopes may be published, and the caller should publish again
    /// (ids make that idempotent downstream).
    fn publish(
        &self,
        queue: &QueueName,
        batch: Vec<Envelope>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Creates every lane of `lanes.queue` that is missing (main, the retry tiers, the
    /// isolation lane, the DLQ), so that a producer can publish to it before any
    /// consumer ran. Idempotent: existing lanes are left as they are.
    ///
    /// # Errors
    ///
    /// Fails when the backend is unreachable or refuses to create a lane.
    fn create_lanes(
        &self,
        lanes: &LaneSet,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Leases up to `max` due deliveries from the lanes for `lease`.
    ///
    /// # Errors
    ///
    /// Fails when the backend is unreachable.
    fn fetch(
        &self,
        lanes: &LaneSet,
        max: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<Fetched<Self::Token>, TransportError>> + Send;

    /// The delivery succeeded: forget the message.
    ///
    /// # Errors
    ///
    /// [`TransportError::LeaseLost`] when the lease expired meanwhile.
    fn ack(
        &self,
        delivery: &Delivery<Self::Token>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Moves the message to a retry tier, due at `due_ms`, with `envelope` (its failure
    /// recorded) replacing the delivered one. The copy is durable before the source
    /// is released.
    ///
    /// # Errors
    ///
    /// [`TransportError::LeaseLost`] when the lease expired meanwhile.
    fn retry(
        &self,
        delivery: &Delivery<Self::Token>,
        tier: &Tier,
        due_ms: i64,
        envelope: &Envelope,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Moves the message to the DLQ as `envelope` (its last failure recorded).
    ///
    /// # Errors
    ///
    /// [`TransportError::LeaseLost`] when the lease expired meanwhile.
    fn dead_letter(
        &self,
        delivery: &Delivery<Self::Token>,
        envelope: &Envelope,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Gives the delivery back unsettled and uncounted (graceful shutdown).
    ///
    /// # Errors
    ///
    /// Fails when the backend is unreachable; the lease then expires on its own.
    fn release(
        &self,
        delivery: &Delivery<Self::Token>,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Moves a crash suspect to its queue's isolation lane ([`Lane::Isolated`]) as
    /// `envelope`, without counting an attempt. The runner does this, instead of running
    /// the handler, with a delivery whose previous delivery ended unfinished while it was
    /// in flight beside others (any of them may have stopped the consumer), and with one
    /// that stopped its consumer before ([`Envelope::crashed_before`]). The copy is
    /// durable before the source is settled.
    ///
    /// # Errors
    ///
    /// [`TransportError::LeaseLost`] when the lease expired meanwhile.
    fn isolate(
        &self,
        delivery: &Delivery<Self::Token>,
        envelope: &Envelope,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Leases at most one due delivery of `lanes.queue`'s isolation lane for `lease`.
    ///
    /// The runner asks only while no other handler of its process runs, and runs what it
    /// gets alone, so a delivery from this lane that ended unfinished stopped its
    /// consumer by itself: its next delivery has `unfinished_before` set, and the runner
    /// counts that crash. A backend must therefore never lease an isolation-lane message
    /// to anyone but a caller of this method, and never lease it ahead of its run.
    ///
    /// # Errors
    ///
    /// Fails when the backend is unreachable.
    fn fetch_isolated(
        &self,
        lanes: &LaneSet,
        lease: Duration,
    ) -> impl Future<Output = Result<Fetched<Self::Token>, TransportError>> + Send;

    /// When the first message of `lanes.queue`'s isolation lane is due (unix ms; now or
    /// earlier when one is due, an unfinished one whose lease ran out included), `None`
    /// when the lane is empty. A look without a lease, cheap enough to ask every few
    /// seconds: the runner then clears its process for an isolation round only when one
    /// may find something. A backend that cannot tell exactly answers early, never late.
    ///
    /// # Errors
    ///
    /// Fails when the backend is unreachable.
    fn isolated_due(
        &self,
        lanes: &LaneSet,
    ) -> impl Future<Output = Result<Option<i64>, TransportError>> + Send;

    /// Whether this backend moves crash suspects to an isolation lane. One that cannot
    /// without breaking a promise of its own (Kafka's strict per-key order) says no, and
    /// the runner counts every unfinished delivery as an attempt instead.
    fn isolates(&self) -> bool {
        true
    }

    /// Keeps a long handler's lease alive for another `lease`.
    ///
    /// # Errors
    ///
    /// [`TransportError::LeaseLost`] when it had already expired.
    fn extend_lease(
        &self,
        delivery: &Delivery<Self::Token>,
        lease: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// The most deliveries this backend serves well from one fetch: a runner asks for
    /// no more at a time than this and its own `fetch_batch`. Default: no limit.
    fn max_fetch(&self) -> usize {
        usize::MAX
    }

    /// How many fetches a runner may have waiting on this backend at once. A broker
    /// that answers each fetch with its own round trip stays busy when the next fetch
    /// is already queued behind the one it is serving. A backend that says more than
    /// one must serve concurrent `fetch` calls without handing one message to both
    /// (a JetStream consumer never gives a message pending an ack to a second pull).
    /// Default: one at a time.
    fn fetches_in_flight(&self) -> usize {
        1
    }
}

/// Depth of each lane of one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueDepths {
    /// The queue.
    pub queue: String,
    /// Messages waiting in main (due or not).
    pub main: u64,
    /// Messages waiting per retry tier, by tier name.
    pub retry: Vec<(String, u64)>,
    /// Crash suspects waiting to be run alone (the isolation lane).
    pub isolated: u64,
    /// Dead messages.
    pub dlq: u64,
    /// Deliveries leased to a consumer right now.
    pub inflight: u64,
    /// Age of the oldest message waiting in main, in ms.
    pub oldest_main_age_ms: Option<i64>,
}

impl QueueDepths {
    /// Counts `count` messages waiting (not in flight) in the lane labelled `label`
    /// ([`Lane::label`]); `oldest_published_ms` ages main. A retry tier not yet listed is
    /// added; an unknown label counts as main.
    pub fn add_waiting(
        &mut self,
        label: &str,
        count: u64,
        oldest_published_ms: Option<i64>,
        now_ms: i64,
    ) {
        match Lane::from_label(label) {
            Some(Lane::Retry(tier)) => match self.retry.iter_mut().find(|(t, _)| *t == tier) {
                Some((_, n)) => *n += count,
                None => self.retry.push((tier, count)),
            },
            Some(Lane::Isolated) => self.isolated += count,
            _ => {
                self.main += count;
                self.oldest_main_age_ms = oldest_published_ms.map(|o| (now_ms - o).max(0));
            }
        }
    }

    /// Nothing waiting in main, any retry tier or the isolation lane, and nothing in
    /// flight.
    #[must_use]
    pub fn is_drained(&self) -> bool {
        self.main == 0
            && self.isolated == 0
            && self.inflight == 0
            && self.retry.iter().all(|(_, n)| *n == 0)
    }
}

/// Capability: report lane depths. Needed by `queues` and `consume --until-idle`.
pub trait LaneStats: Send + Sync {
    /// Depths of every queue the backend knows.
    ///
    /// # Errors
    ///
    /// Fails when the backend is unreachable.
    fn depths(&self) -> impl Future<Output = Result<Vec<QueueDepths>, TransportError>> + Send;

    /// Depths of one queue's lanes.
    ///
    /// # Errors
    ///
    /// Fails when the backend is unreachable.
    fn queue_depths(
        &self,
        lanes: &LaneSet,
    ) -> impl Future<Output = Result<QueueDepths, TransportError>> + Send;
}
