//! Wall-clock time as unix milliseconds, the unit of every timestamp redrive stores.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// The millisecond at which `delay` from now will have passed, rounded up: a message
/// due then is never taken before its whole delay has gone by (taking it is checked
/// against [`now_ms`], which rounds down).
#[must_use]
pub fn due_after(delay: Duration) -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let at = since_epoch.saturating_add(delay);
    let ms = at.as_millis() + u128::from(!at.subsec_nanos().is_multiple_of(1_000_000));
    i64::try_from(ms).unwrap_or(i64::MAX / 4).min(i64::MAX / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_due_time_is_never_before_the_whole_delay() {
        for _ in 0..1000 {
            let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            let due = due_after(Duration::from_millis(5));
            let whole = (before + Duration::from_millis(5)).as_nanos();
            assert!(i128::from(due) * 1_000_000 >= whole as i128);
            assert!(due <= now_ms() + 6);
        }
        assert_eq!(due_after(Duration::MAX), i64::MAX / 4);
    }
}
