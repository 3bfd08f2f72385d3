//! Compact durations such as `250ms`, `5s`, `5m`, `1h`, `7d`, used for tiers, timeouts,
//! alert rules and retention.
//!
//! Written here rather than taken from a crate because tier names are derived from
//! their delays and become lane names (`agent.tasks.retry.5m`): the printed form has
//! to be canonical, short and free of spaces, which general-purpose formatters are not.

use std::time::Duration;

/// Why a duration could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// The text was empty.
    #[error("empty duration: expected a number and a unit, such as 5s, 250ms, 5m or 1h")]
    Empty,
    /// The number part was missing or not a whole number.
    #[error(
        "invalid duration {0:?}: expected a whole number and a unit, such as 5s, 250ms, 5m or 1h"
    )]
    Invalid(String),
    /// The unit was missing or unknown.
    #[error(
        "invalid duration {0:?}: unknown or missing unit; use ms, s, m, h or d (for example 5s)"
    )]
    Unit(String),
    /// The duration overflowed.
    #[error("duration {0:?} is too large")]
    TooLarge(String),
}

/// Parses `250ms`, `5s`, `5m`, `1h` (a whole number followed by one unit).
///
/// # Errors
///
/// Returns a [`DurationError`] naming the text when it is empty, has no number, or
/// has a missing or unknown unit.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| DurationError::Unit(text.to_owned()))?;
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| DurationError::Invalid(text.to_owned()))?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(DurationError::Unit(text.to_owned())),
    };
    let millis = value
        .checked_mul(millis_per_unit)
        .ok_or_else(|| DurationError::TooLarge(text.to_owned()))?;
    Ok(Duration::from_millis(millis))
}

/// Formats a duration in its shortest exact form: `5m`, `90s`, `1500ms`.
#[must_use]
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0ms".to_owned();
    }
    for (unit, size) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_round_trip() {
        let table = [
            ("5s", 5_000, "5s"),
            ("30s", 30_000, "30s"),
            ("5m", 300_000, "5m"),
            ("1h", 3_600_000, "1h"),
            ("7d", 604_800_000, "7d"),
            ("48h", 172_800_000, "2d"),
            ("250ms", 250, "250ms"),
            ("1500ms", 1_500, "1500ms"),
            ("60s", 60_000, "1m"),
            ("90s", 90_000, "90s"),
            (" 2m ", 120_000, "2m"),
        ];
        for (text, millis, canonical) in table {
            let d = parse_duration(text).unwrap();
            assert_eq!(d, Duration::from_millis(millis), "{text}");
            assert_eq!(format_duration(d), canonical, "{text}");
        }
    }

    #[test]
    fn rejects_bad_input_with_the_text() {
        let table = [
            ("", DurationError::Empty),
            ("5", DurationError::Unit("5".into())),
            ("5x", DurationError::Unit("5x".into())),
            ("s", DurationError::Invalid("s".into())),
            ("-5s", DurationError::Invalid("-5s".into())),
            ("1.5s", DurationError::Unit("1.5s".into())),
            (
                "99999999999999999999h",
                DurationError::Invalid("99999999999999999999h".into()),
            ),
            (
                "9999999999999999h",
                DurationError::TooLarge("9999999999999999h".into()),
            ),
        ];
        for (text, want) in table {
            assert_eq!(parse_duration(text), Err(want), "{text:?}");
        }
    }
}
