//! Counters a runner keeps about its own work, read by `bench`, `demo` and metrics.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of one runner. Cheap to update from many tasks.
#[derive(Debug, Default)]
pub struct Stats {
    delivered: AtomicU64,
    succeeded: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    timeouts: AtomicU64,
    panics: AtomicU64,
    lease_expired: AtomicU64,
    isolated: AtomicU64,
    spared: AtomicU64,
    breaker_opened: AtomicU64,
    settle_errors: AtomicU64,
    by_class: Mutex<Vec<(String, u64, u64)>>,
    lateness_ms: Mutex<Vec<u32>>,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Deliveries handed to the handler (or settled for an expired lease).
    pub delivered: u64,
    /// Acknowledged.
    pub succeeded: u64,
    /// Moved to a retry tier.
    pub retried: u64,
    /// Moved to the DLQ.
    pub dead: u64,
    /// Handler timeouts.
    pub timeouts: u64,
    /// Handler panics.
    pub panics: u64,
    /// Deliveries found unfinished (crash or expired lease).
    pub lease_expired: u64,
    /// Crash suspects moved to the isolation lane, uncounted, to be run alone.
    pub isolated: u64,
    /// Failures not counted because the queue's breaker was open.
    pub spared: u64,
    /// Times the queue's breaker opened.
    pub breaker_opened: u64,
    /// Settle calls that failed (the lease then expires and the message returns).
    pub settle_errors: u64,
    /// Per error class: (class, retried, dead).
    pub by_class: Vec<(String, u64, u64)>,
}

impl crate::Observer for Stats {
    fn delivered(
        &self,
        _queue: &redrive_core::QueueName,
        _lane: &redrive_core::Lane,
        lateness_ms: Option<i64>,
    ) {
        self.delivered();
        if let Some(ms) = lateness_ms {
            self.lateness(ms);
        }
    }

    fn settled(
        &self,
        _queue: &redrive_core::QueueName,
        _lane: &redrive_core::Lane,
        settled: crate::Settled<'_>,
        _handler_secs: Option<f64>,
    ) {
        match settled {
            crate::Settled::Ok => self.succeeded(),
            crate::Settled::Retried { class, kind, .. } => self.failed(class, false, kind),
            crate::Settled::Dead { class, kind, .. } => self.failed(class, true, kind),
            crate::Settled::Isolated => {
                self.isolated.fetch_add(1, Ordering::Relaxed);
            }
            crate::Settled::Spared { .. } => {
                self.spared.fetch_add(1, Ordering::Relaxed);
            }
            crate::Settled::Unsettled => self.settle_error(),
        }
    }

    fn breaker(&self, _queue: &redrive_core::QueueName, state: crate::BreakerState) {
        if state == crate::BreakerState::Open {
            self.breaker_opened.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Stats {
    fn delivered(&self) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }
    fn succeeded(&self) {
        self.succeeded.fetch_add(1, Ordering::Relaxed);
    }
    fn failed(&self, class: &str, dead: bool, kind: redrive_core::FailureKind) {
        use redrive_core::FailureKind as K;
        match kind {
            K::Timeout => self.timeouts.fetch_add(1, Ordering::Relaxed),
            K::Panic => self.panics.fetch_add(1, Ordering::Relaxed),
            K::LeaseExpired => self.lease_expired.fetch_add(1, Ordering::Relaxed),
            K::Retry | K::Poison => 0,
        };
        let counter = if dead { &self.dead } else { &self.retried };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut classes) = self.by_class.lock() {
            let entry = match classes.iter().position(|(c, _, _)| c == class) {
                Some(i) => &mut classes[i],
                None => {
                    classes.push((class.to_owned(), 0, 0));
                    let last = classes.len() - 1;
                    &mut classes[last]
                }
            };
            if dead { entry.2 += 1 } else { entry.1 += 1 }
        }
    }
    fn settle_error(&self) {
        self.settle_errors.fetch_add(1, Ordering::Relaxed);
    }
    fn lateness(&self, ms: i64) {
        if let Ok(mut l) = self.lateness_ms.lock() {
            l.push(u32::try_from(ms.max(0)).unwrap_or(u32::MAX));
        }
    }

    /// The counters now.
    #[must_use]
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            delivered: self.delivered.load(Ordering::Relaxed),
            succeeded: self.succeeded.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead: self.dead.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            panics: self.panics.load(Ordering::Relaxed),
            lease_expired: self.lease_expired.load(Ordering::Relaxed),
            isolated: self.isolated.load(Ordering::Relaxed),
            spared: self.spared.load(Ordering::Relaxed),
            breaker_opened: self.breaker_opened.load(Ordering::Relaxed),
            settle_errors: self.settle_errors.load(Ordering::Relaxed),
            by_class: self.by_class.lock().map(|c| c.clone()).unwrap_or_default(),
        }
    }

    /// Every retry delivery's lateness (ms past its due time), in arrival order.
    #[must_use]
    pub fn lateness_samples(&self) -> Vec<u32> {
        self.lateness_ms
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }
}
