//! Named crash points: places between two steps where a process may die, so tests and
//! the crash-point bench can kill a consumer exactly there.
//!
//! Built only with the `failpoints` feature (test and bench builds); otherwise
//! [`failpoint`] is an empty inline function and no environment variable is read.
//! With it, `REDRIVE_FAILPOINT=NAME` aborts the process (as a SIGKILL would: nothing is
//! flushed, no destructor runs) the first time NAME is reached, and
//! `REDRIVE_FAILPOINT=NAME:N` the N-th time.
//!
//! The points, in the order a message meets them:
//!
//! | name | where |
//! |---|---|
//! | `fetched` | the runner holds leased deliveries, none handed to a handler yet |
//! | `handled` | a handler finished; its outcome is not settled yet |
//! | `next-lane-written` | a retry, isolation or DLQ copy is durable; the source is not released yet (brokers whose move is not one atomic step) |
//! | `settled` | a settle returned |
//! | `drain-stored` | drained dead letters are in the store; the broker's DLQ still has them |
//! | `replay-published` | replayed messages are back in their queue; the store still has them as dead |
//! | `job-step-marked` | a replay job marked a step's messages moved; none is published yet |
//! | `archive-renamed` | an archive file is complete; its messages are still in the store |

/// Every point, for the crash-point bench and its report.
pub const FAILPOINTS: &[&str] = &[
    "fetched",
    "handled",
    "next-lane-written",
    "settled",
    "drain-stored",
    "replay-published",
    "job-step-marked",
    "archive-renamed",
];

/// Aborts the process here if `REDRIVE_FAILPOINT` names this point (and this is the
/// hit it counts to). A no-op without the `failpoints` feature.
#[cfg(feature = "failpoints")]
pub fn failpoint(name: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static AT: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let at = AT.get_or_init(|| {
        let spec = std::env::var("REDRIVE_FAILPOINT").ok()?;
        Some(match spec.split_once(':') {
            Some((point, n)) => (point.to_owned(), n.parse().unwrap_or(1).max(1)),
            None => (spec, 1),
        })
    });
    if let Some((point, n)) = at
        && point == name
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n
    {
        eprintln!("redrive: failpoint {name} (hit {n}): aborting");
        std::process::abort();
    }
}

/// Aborts the process here if `REDRIVE_FAILPOINT` names this point. A no-op without
/// the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn failpoint(_name: &str) {}

/// Whether this build has crash points (the `failpoints` feature).
#[must_use]
pub const fn failpoints_built() -> bool {
    cfg!(feature = "failpoints")
}
