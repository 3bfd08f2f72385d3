//! Wall-clock time as unix milliseconds, the unit of every timestamp redrive stores.

use std::time::{SystemTime, UNIX_EPOCH};

/// The current time in milliseconds since the unix epoch.
#[must_use]
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
