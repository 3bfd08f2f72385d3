//! Wall-clock time as unix milliseconds, the unit of every timestamp redrive stores.

use std::time::{SystemTime, UNIX_EPOCH};

/// The latest time redrive stores or shows: 9999-12-31T23:59:59.999Z. RFC 3339 has no
/// later date, so a later time could not be rendered; every way in refuses one.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// Whether `ms` is a time redrive can store and show: from the epoch to [`MAX_TIME_MS`].
#[must_use]
pub fn is_valid_time(ms: i64) -> bool {
    (0..=MAX_TIME_MS).contains(&ms)
}

/// The current time in milliseconds since the unix epoch.
#[must_use]
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
