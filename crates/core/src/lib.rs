//! The core of redrive: what a message is, what a handler can answer, how failures are
//! grouped and retried, and the two seams every backend implements.
//!
//! This crate knows nothing about SQL, HTTP, Kafka or any other broker. It holds the
//! envelope and its versioned wire format, the retry policy (tiers, jitter, max
//! attempts), handler outcomes and their classification, error fingerprints, and the
//! [`Transport`] and [`DeadLetterStore`] traits.

mod agent;
pub mod alert;
mod brokered;
mod duration;
mod envelope;
mod failpoint;
mod fingerprint;
mod jobs;
mod outcome;
mod policy;
mod queue;
mod replay;
mod retention;
mod store;
#[cfg(feature = "test-util")]
pub mod testing;
mod time;
mod transport;

pub use agent::{AgentContext, Cost, CostJson, MAX_AGENT_NAME_BYTES};
pub use brokered::{Brokered, DlqSource};
/// The payload type of [`Envelope`], re-exported so users need no `bytes` dependency.
pub use bytes::Bytes;
pub use duration::{DurationError, format_duration, parse_duration};
pub use envelope::{
    Envelope, Failure, FailureKind, HEADER_PREFIX, MALFORMED, MAX_ERROR_BYTES, MAX_HISTORY,
    MessageId, WIRE_VERSION, WireError, truncate_utf8,
};
pub use failpoint::{FAILPOINTS, failpoint, failpoints_built};
pub use fingerprint::{Fingerprint, normalize_message};
pub use jobs::{
    BREAKER_REPORT_TTL_MS, BreakerBoard, ItemState, JobCounts, JobItem, JobState, JobView,
    OpenBreaker, ReplayJob, ReplayJobs, ReplayOutcome,
};
pub use outcome::{HandlerError, HandlerResult, Outcome};
pub use policy::{DEFAULT_TIERS, PolicyError, RetryPolicy, Step, Tier};
pub use queue::{Lane, LaneSet, QueueError, QueueName};
pub use replay::{
    Pace, ReplayError, ReplayOptions, ReplayReport, Unpaced, replay, replay_dead, replay_edited,
};
pub use retention::{DAY_MS, RetentionStore, WARM_ZSTD_LEVEL};
pub use store::{
    AuditEntry, Cursor, DeadFilter, DeadGroup, DeadLetter, DeadLetterStore, DeadSelection,
    DeadStats, StoreError, describe_replayed,
};
pub use time::{MAX_TIME_MS, due_after, is_valid_time, now_ms};
pub use transport::{Delivery, Fetched, LaneStats, QueueDepths, Transport, TransportError};
