//! Hooks for what a runner does, so metrics exporters and progress displays can follow
//! along without the runner knowing about them.

use redrive_core::{Cost, Envelope, FailureKind, Lane, QueueName};

use crate::BreakerState;

/// How a delivery was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled<'a> {
    /// Acknowledged.
    Ok,
    /// Moved to a retry tier.
    Retried {
        /// Error class.
        class: &'a str,
        /// How it failed.
        kind: FailureKind,
        /// What the failed attempt cost, as its handler reported.
        cost: Cost,
    },
    /// Moved to the DLQ.
    Dead {
        /// Error class.
        class: &'a str,
        /// How it failed.
        kind: FailureKind,
        /// What the failed attempt cost, as its handler reported.
        cost: Cost,
    },
    /// Moved, uncounted, to the isolation lane to be run alone: a crash suspect (its
    /// consumer stopped while it was in flight beside others) or a message that
    /// crashed its consumer before.
    Isolated,
    /// Failed while the queue's breaker was open: moved back to a retry lane without
    /// counting the attempt.
    Spared {
        /// Error class.
        class: &'a str,
    },
    /// Could not be settled (lease lost or the backend failed); it will come back.
    Unsettled,
}

/// Receives the runner's events. Methods are called from handler tasks: keep them
/// cheap and non-blocking.
pub trait Observer: Send + Sync + 'static {
    /// A delivery was handed out; `lateness_ms` is set for retry-lane deliveries.
    fn delivered(&self, queue: &QueueName, lane: &Lane, lateness_ms: Option<i64>) {
        let _ = (queue, lane, lateness_ms);
    }

    /// A delivery was settled; `handler_secs` is how long the handler ran, if it ran.
    fn settled(
        &self,
        queue: &QueueName,
        lane: &Lane,
        settled: Settled<'_>,
        handler_secs: Option<f64>,
    ) {
        let _ = (queue, lane, settled, handler_secs);
    }

    /// A replayed message's first attempt since its replay ended: `error` is `None` when
    /// it succeeded, else the new error. Replay jobs wait for this (see
    /// [`crate::ReplayReporter`]).
    fn replay_settled(&self, envelope: &Envelope, error: Option<&str>) {
        let _ = (envelope, error);
    }

    /// The queue's outage breaker opened or closed.
    fn breaker(&self, queue: &QueueName, state: BreakerState) {
        let _ = (queue, state);
    }
}
