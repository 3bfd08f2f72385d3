//! [`Brokered`]: a broker's lanes plus the dead-letter store of record, as one backend.
//!
//! A broker transport moves dead messages to its own DLQ lane; the store is where triage
//! happens. Every read of the store first drains the broker's DLQ lane into it (the
//! broker acknowledges a drained message only after the store has it), so callers see
//! one backend whatever the broker. Written once here for every broker.

use std::future::Future;
use std::time::Duration;

use crate::envelope::{Envelope, MessageId};
use crate::jobs::{
    BreakerBoard, JobItem, JobState, JobView, OpenBreaker, ReplayJob, ReplayJobs, ReplayOutcome,
};
use crate::policy::Tier;
use crate::queue::{LaneSet, QueueName};
use crate::store::{
    AuditEntry, Cursor, DeadFilter, DeadGroup, DeadLetter, DeadLetterStore, DeadSelection,
    DeadStats, StoreError,
};
use crate::transport::{Delivery, Fetched, LaneStats, QueueDepths, Transport, TransportError};

/// Capability of a broker transport with a DLQ lane of its own.
pub trait DlqSource: Send + Sync + 'static {
    /// Moves every dead message waiting in the broker's DLQ lanes into `store`,
    /// acknowledging each in the broker only after the store has it; returns how many.
    ///
    /// # Errors
    ///
    /// Fails when the broker or the store does; messages not yet stored stay in the broker.
    fn drain_into<S: DeadLetterStore>(
        &self,
        store: &S,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// A broker's lanes and a dead-letter store, as one backend.
#[derive(Clone)]
pub struct Brokered<T, S> {
    transport: T,
    store: S,
}

impl<T, S> std::fmt::Debug for Brokered<T, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Brokered")
    }
}

impl<T: DlqSource, S: DeadLetterStore> Brokered<T, S> {
    /// Pairs a connected transport with a store.
    pub fn new(transport: T, store: S) -> Self {
        Self { transport, store }
    }

    /// The store of record.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The broker transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Moves the broker's waiting dead messages into the store; returns how many.
    ///
    /// # Errors
    ///
    /// As [`DlqSource::drain_into`].
    pub async fn drain(&self) -> Result<u64, StoreError> {
        self.transport.drain_into(&self.store).await
    }
}

fn store_err(e: StoreError) -> TransportError {
    TransportError::Backend {
        context: "dead-letter store".into(),
        source: Box::new(e),
    }
}

impl<T: Transport + DlqSource, S: DeadLetterStore + Clone> Transport for Brokered<T, S> {
    type Token = T::Token;

    async fn publish(&self, queue: &QueueName, batch: Vec<Envelope>) -> Result<(), TransportError> {
        self.transport.publish(queue, batch).await
    }
    async fn create_lanes(&self, lanes: &LaneSet) -> Result<(), TransportError> {
        self.transport.create_lanes(lanes).await
    }
    async fn fetch(
        &self,
        lanes: &LaneSet,
        max: usize,
        lease: Duration,
    ) -> Result<Fetched<T::Token>, TransportError> {
        self.transport.fetch(lanes, max, lease).await
    }
    async fn ack(&self, d: &Delivery<T::Token>) -> Result<(), TransportError> {
        self.transport.ack(d).await
    }
    async fn retry(
        &self,
        d: &Delivery<T::Token>,
        tier: &Tier,
        due_ms: i64,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        self.transport.retry(d, tier, due_ms, envelope).await
    }
    async fn dead_letter(
        &self,
        d: &Delivery<T::Token>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        self.transport.dead_letter(d, envelope).await
    }
    async fn release(&self, d: &Delivery<T::Token>) -> Result<(), TransportError> {
        self.transport.release(d).await
    }
    async fn extend_lease(
        &self,
        d: &Delivery<T::Token>,
        lease: Duration,
    ) -> Result<(), TransportError> {
        self.transport.extend_lease(d, lease).await
    }
    async fn isolate(
        &self,
        d: &Delivery<T::Token>,
        envelope: &Envelope,
    ) -> Result<(), TransportError> {
        self.transport.isolate(d, envelope).await
    }
    async fn fetch_isolated(
        &self,
        lanes: &LaneSet,
        lease: Duration,
    ) -> Result<Fetched<T::Token>, TransportError> {
        self.transport.fetch_isolated(lanes, lease).await
    }
    async fn isolated_due(&self, lanes: &LaneSet) -> Result<Option<i64>, TransportError> {
        self.transport.isolated_due(lanes).await
    }
    fn isolates(&self) -> bool {
        self.transport.isolates()
    }
    fn max_fetch(&self) -> usize {
        self.transport.max_fetch()
    }

    fn fetches_in_flight(&self) -> usize {
        self.transport.fetches_in_flight()
    }
}

/// Lane depths come from the broker; the DLQ depth is the store's after a drain.
impl<T: LaneStats + DlqSource, S: DeadLetterStore + Clone> LaneStats for Brokered<T, S> {
    async fn depths(&self) -> Result<Vec<QueueDepths>, TransportError> {
        self.drain().await.map_err(store_err)?;
        let mut out = self.transport.depths().await?;
        for d in &mut out {
            d.dlq = self
                .store
                .depth(QueueName::new(&d.queue).ok().as_ref())
                .await
                .map_err(store_err)?;
        }
        Ok(out)
    }

    async fn queue_depths(&self, lanes: &LaneSet) -> Result<QueueDepths, TransportError> {
        self.drain().await.map_err(store_err)?;
        let mut d = self.transport.queue_depths(lanes).await?;
        d.dlq = self
            .store
            .depth(Some(&lanes.queue))
            .await
            .map_err(store_err)?;
        Ok(d)
    }
}

impl<T: DlqSource, S: DeadLetterStore + BreakerBoard + Clone> BreakerBoard for Brokered<T, S> {
    async fn report_breaker(
        &self,
        queue: &str,
        consumer: &str,
        open: Option<(i64, i64)>,
    ) -> Result<(), StoreError> {
        self.store.report_breaker(queue, consumer, open).await
    }
    async fn open_breakers(&self, now_ms: i64) -> Result<Vec<OpenBreaker>, StoreError> {
        self.store.open_breakers(now_ms).await
    }
}

impl<T: DlqSource, S: DeadLetterStore + ReplayJobs + Clone> ReplayJobs for Brokered<T, S> {
    async fn create_job(&self, job: &ReplayJob, items: &[JobItem]) -> Result<(), StoreError> {
        self.store.create_job(job, items).await
    }
    async fn update_job(&self, job: &ReplayJob) -> Result<(), StoreError> {
        self.store.update_job(job).await
    }
    async fn set_job_state(
        &self,
        id: &str,
        from: &[JobState],
        to: JobState,
        note: &str,
    ) -> Result<bool, StoreError> {
        self.store.set_job_state(id, from, to, note).await
    }
    async fn claim_job(&self, id: &str, owner: &str, until_ms: i64) -> Result<bool, StoreError> {
        self.store.claim_job(id, owner, until_ms).await
    }
    async fn jobs(&self, id: Option<&str>, limit: usize) -> Result<Vec<JobView>, StoreError> {
        self.store.jobs(id, limit).await
    }
    async fn job_items(
        &self,
        id: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<JobItem>, StoreError> {
        self.store.job_items(id, after, limit).await
    }
    async fn update_job_items(&self, id: &str, items: &[JobItem]) -> Result<(), StoreError> {
        self.store.update_job_items(id, items).await
    }
    async fn record_replay_outcomes(&self, outcomes: &[ReplayOutcome]) -> Result<(), StoreError> {
        self.store.record_replay_outcomes(outcomes).await
    }
    async fn replays_of(&self, id: &MessageId) -> Result<Vec<(ReplayJob, JobItem)>, StoreError> {
        self.store.replays_of(id).await
    }
}

impl<T: DlqSource, S: DeadLetterStore + Clone> DeadLetterStore for Brokered<T, S> {
    async fn insert(&self, dead: &DeadLetter) -> Result<bool, StoreError> {
        self.store.insert(dead).await
    }
    async fn insert_batch(&self, dead: &[DeadLetter]) -> Result<u64, StoreError> {
        self.store.insert_batch(dead).await
    }
    async fn list(
        &self,
        filter: &DeadFilter,
        cursor: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.drain().await?;
        self.store.list(filter, cursor, limit).await
    }
    async fn groups(
        &self,
        filter: &DeadFilter,
        limit: usize,
    ) -> Result<Vec<DeadGroup>, StoreError> {
        self.drain().await?;
        self.store.groups(filter, limit).await
    }
    async fn count(&self, filter: &DeadFilter) -> Result<u64, StoreError> {
        self.drain().await?;
        self.store.count(filter).await
    }
    async fn get(&self, id: &MessageId) -> Result<Option<DeadLetter>, StoreError> {
        self.drain().await?;
        self.store.get(id).await
    }
    async fn mark_replayed(
        &self,
        ids: &[MessageId],
        actor: &str,
        reason: &str,
    ) -> Result<u64, StoreError> {
        self.store.mark_replayed(ids, actor, reason).await
    }
    async fn purge(
        &self,
        selection: &DeadSelection,
        actor: &str,
        reason: &str,
    ) -> Result<u64, StoreError> {
        self.drain().await?;
        self.store.purge(selection, actor, reason).await
    }
    async fn stats(&self) -> Result<Vec<DeadStats>, StoreError> {
        self.drain().await?;
        self.store.stats().await
    }
    async fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.store.audit_log(limit).await
    }
    async fn depth(&self, queue: Option<&QueueName>) -> Result<u64, StoreError> {
        self.drain().await?;
        self.store.depth(queue).await
    }
}
