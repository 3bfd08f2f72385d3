//! The conformance suite: the scenarios every redrive backend must pass, written once and
//! generic over the backend.
//!
//! A backend joins by implementing [`Harness`] in a test file and invoking
//! [`conformance!`], which expands to one `#[tokio::test]` per scenario:
//!
//! ```text
//! redrive_conformance::conformance!(MyHarness::new());
//! ```
//!
//! Delays are milliseconds, so the whole suite runs in seconds on any backend.

pub mod http_sink;
pub mod own_server;
pub mod scenarios;
pub mod store;
pub mod under_load;

use std::future::Future;
use std::path::PathBuf;

use redrive_core::{DeadLetterStore, LaneStats, QueueName, Transport};

/// The upper bound on retry lateness the suite asserts: a retry is handed out no
/// earlier than its due time and no later than this after it.
pub const LATENESS_BOUND_MS: i64 = 100;

/// A name no other scenario, test process or earlier run uses: the process id, the
/// clock and a counter (the clock alone can repeat between two threads started together,
/// and two scenarios sharing a broker namespace would create and delete each other's
/// streams). Lowercase hex, so it fits stream, bucket, key and queue names.
pub fn unique_name() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() % (1 << 48));
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{:x}{nanos:x}{n:x}", std::process::id())
}

/// How to run the `redrive` binary against this backend, for scenarios that need a
/// real process to kill.
#[derive(Debug, Clone)]
pub struct Cli {
    /// Path to the `redrive` binary.
    pub bin: PathBuf,
    /// Arguments selecting this backend, e.g. `["--store", "sqlite:///tmp/x.db"]`.
    pub backend_args: Vec<String>,
}

/// One fresh backend for one scenario.
pub struct Fixture<T, S> {
    /// Its transport.
    pub transport: T,
    /// Its dead-letter store.
    pub store: S,
    /// How the CLI reaches it.
    pub cli: Cli,
    /// Anything that must live as long as the backend (a temporary directory).
    pub guard: Box<dyn std::any::Any + Send + Sync>,
}

/// A backend under test.
pub trait Harness: Send + Sync {
    /// The transport type.
    type T: Transport + LaneStats + Clone;
    /// The store type.
    type S: DeadLetterStore + Clone;

    /// A fresh backend with no messages, isolated from every other scenario.
    fn open(&self) -> impl Future<Output = Fixture<Self::T, Self::S>> + Send;

    /// Writes messages redrive cannot read to `queue`'s main lane with the backend's
    /// own client (SQL for SQLite), as a careless or hostile producer would: missing
    /// fields, redrive headers that do not parse, a wire version from the future.
    /// Returns how many it wrote.
    fn write_malformed(
        &self,
        b: &Fixture<Self::T, Self::S>,
        queue: &QueueName,
    ) -> impl Future<Output = usize> + Send;

    /// Publishes `payload` to `queue`'s main lane with the backend's own client, as a
    /// producer that knows nothing of redrive would: no redrive headers at all.
    fn publish_plain(
        &self,
        b: &Fixture<Self::T, Self::S>,
        queue: &QueueName,
        payload: &[u8],
    ) -> impl Future<Output = ()> + Send;
}

/// Expands to one test per scenario for a harness expression.
#[macro_export]
macro_rules! conformance {
    ($harness:expr) => {
        $crate::conformance!(@each $harness;
            tiers_are_honoured,
            poison_goes_straight_to_the_dlq,
            transient_failures_succeed_after_retries,
            exhausted_messages_reach_the_dlq_with_full_history,
            handler_timeout_is_a_failed_attempt,
            handler_panic_is_a_failed_attempt,
            long_handlers_keep_their_lease,
            graceful_shutdown_releases_without_counting,
            sigkill_mid_handler_loses_nothing,
            crash_looping_message_reaches_the_dlq,
            a_crash_is_charged_only_to_the_message_that_caused_it,
            malformed_messages_are_quarantined_and_the_rest_flow,
            a_plain_message_keeps_its_id_across_a_crash_and_a_replay,
            replay_keeps_the_id_and_history,
            payloads_are_carried_byte_exact
        );
    };
    (@each $harness:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let harness = $harness;
                $crate::scenarios::$name(&harness).await;
            }
        )*
    };
}
